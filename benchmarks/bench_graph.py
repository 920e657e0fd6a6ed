"""Segment reduction microbenchmark: ``python benchmarks/bench_graph.py [--json out.json] ...``.

The same code as ``deepkern bench graph``; see ``deepkern.bench.graph`` for what it measures and
``--help`` for the options.
"""

import sys

from deepkern import bench

if __name__ == "__main__":
    sys.exit(bench.main(["graph", *sys.argv[1:]]))
