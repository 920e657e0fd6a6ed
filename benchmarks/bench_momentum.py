"""Momentum ResNet microbenchmark: ``python benchmarks/bench_momentum.py [--json out.json] ...``.

The same code as ``deepkern bench momentum``; see ``deepkern.bench.momentum`` for what it
measures and ``--help`` for the options.
"""

import sys

from deepkern import bench

if __name__ == "__main__":
    sys.exit(bench.main(["momentum", *sys.argv[1:]]))
