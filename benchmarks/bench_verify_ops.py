"""Verify op microbenchmark: ``python benchmarks/bench_verify_ops.py [--json out.json] ...``.

The same code as ``deepkern bench verify_ops``; see ``deepkern.bench.verify_ops`` for what it
measures and ``--help`` for the options.
"""

import sys

from deepkern import bench

if __name__ == "__main__":
    sys.exit(bench.main(["verify_ops", *sys.argv[1:]]))
