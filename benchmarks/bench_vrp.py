"""CVRP benchmark: ``python benchmarks/bench_vrp.py [--json out.json] ...``.

The same code as ``deepkern bench vrp``; see ``deepkern.bench.vrp`` for what it measures
(policy inference time per instance against OR-Tools and PyVRP at the same time budget, and
training throughput) and ``--help`` for the options.
"""

import sys

from deepkern import bench

if __name__ == "__main__":
    sys.exit(bench.main(["vrp", *sys.argv[1:]]))
