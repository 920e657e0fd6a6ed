"""Loopy belief propagation microbenchmark: ``python benchmarks/bench_bp.py [--json out.json]``.

The same code as ``deepkern bench bp``; see ``deepkern.bench.bp`` for what it measures and
``--help`` for the options.
"""

import sys

from deepkern import bench

if __name__ == "__main__":
    sys.exit(bench.main(["bp", *sys.argv[1:]]))
