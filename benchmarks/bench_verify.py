"""Bound computation microbenchmark: ``python benchmarks/bench_verify.py [--json out.json] ...``.

The same code as ``deepkern bench verify``; see ``deepkern.bench.verify`` for what it measures and
``--help`` for the options.
"""

import sys

from deepkern import bench

if __name__ == "__main__":
    sys.exit(bench.main(["verify", *sys.argv[1:]]))
