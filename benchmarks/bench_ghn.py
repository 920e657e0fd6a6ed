"""GHN-2 sweep microbenchmark: ``python benchmarks/bench_ghn.py [--json out.json] ...``.

The same code as ``deepkern bench ghn``; see ``deepkern.bench.ghn`` for what it measures and
``--help`` for the options.
"""

import sys

from deepkern import bench

if __name__ == "__main__":
    sys.exit(bench.main(["ghn", *sys.argv[1:]]))
