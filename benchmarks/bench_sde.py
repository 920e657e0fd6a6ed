"""Euler-Maruyama microbenchmark: ``python benchmarks/bench_sde.py [--json out.json] ...``.

The same code as ``deepkern bench sde``; see ``deepkern.bench.sde`` for what it measures and
``--help`` for the options.
"""

import sys

from deepkern import bench

if __name__ == "__main__":
    sys.exit(bench.main(["sde", *sys.argv[1:]]))
