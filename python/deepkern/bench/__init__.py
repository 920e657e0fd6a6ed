"""Microbenchmarks, one family per kernel family: ``deepkern bench FAMILY [options]``.

A family is a module in this package that provides:

- ``HELP``: one line for the command's help.
- ``add_arguments(parser)``: its own options, beside the common ``--json``, ``--device``,
  ``--quick``, ``--min-run-time`` and ``--threads`` that every family gets.
- ``collect(args, progress) -> common.Report``: measure and return rows; ``progress`` takes
  one-line messages about what runs now. It prints nothing itself.

Adding a family is one line in ``FAMILIES``; the command and ``benchmarks/bench_<family>.py``
find it there.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from types import ModuleType

import torch

from deepkern.bench import common
from deepkern.bench.common import AgreementError

__all__ = ["FAMILIES", "AgreementError", "add_arguments", "collect", "main", "run"]

# Family name -> module. Imported only when that family runs, so that one family's optional
# outside library never slows or breaks another's command.
FAMILIES: dict[str, str] = {
    "bp": "deepkern.bench.bp",
    "momentum": "deepkern.bench.momentum",
    "sde": "deepkern.bench.sde",
    "graph": "deepkern.bench.graph",
    "vrp": "deepkern.bench.vrp",
    "verify": "deepkern.bench.verify",
    "verify_ops": "deepkern.bench.verify_ops",
    "ghn": "deepkern.bench.ghn",
}


def _family(name: str) -> ModuleType:
    if name not in FAMILIES:
        raise ValueError(f"unknown benchmark family {name!r}; known: {', '.join(FAMILIES)}")
    return importlib.import_module(FAMILIES[name])


def _add_common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--json", metavar="PATH", default=None, help="also write the table's rows as JSON"
    )
    parser.add_argument(
        "--device", default=None, help="torch device to run on (default: cuda when available)"
    )
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for tests and smoke runs")
    parser.add_argument(
        "--min-run-time",
        type=float,
        default=None,
        metavar="SECONDS",
        help="seconds of measurement per timed case (default 1, or 0.02 with --quick)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        metavar="N",
        help="torch CPU threads while measuring (default 1; 0 keeps torch's own setting)",
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Give ``parser`` one sub-command per family, each with the common and its own options."""
    families = parser.add_subparsers(dest="family", required=True, metavar="FAMILY")
    for name in FAMILIES:
        module = _family(name)
        sub = families.add_parser(name, help=module.HELP, description=module.HELP)
        _add_common_arguments(sub)
        module.add_arguments(sub)


def collect(args: argparse.Namespace, progress=None) -> common.Report:
    """Run the family named by ``args.family`` and return its report, without printing.

    Args:
        args: parsed options from a parser built by :func:`add_arguments`.
        progress: called with one-line messages while the benchmark runs, or None.

    Returns:
        The family's report, with the load average at the end recorded in ``report.env``.

    Raises:
        ValueError: unknown family or bad option values.
    """
    module = _family(args.family)
    threads = getattr(args, "threads", 0)
    if threads < 0:
        raise ValueError(f"--threads must be 0 or positive, got {threads}")
    previous = torch.get_num_threads()
    # One thread by default: when other processes share the cores, a descheduled OpenMP worker
    # stalls every parallel region at its barrier, and a step of a few milliseconds can take
    # seconds. Ratios taken on one thread stay stable under such load.
    if threads:
        torch.set_num_threads(threads)
    try:
        report = module.collect(args, progress or (lambda message: None))
    finally:
        torch.set_num_threads(previous)
    report.env["loadavg_end"] = common.read_loadavg()
    return report


class _Progress:
    """Prints each phase with the seconds since the start, to standard error."""

    def __init__(self):
        self.start = time.perf_counter()

    def __call__(self, message: str) -> None:
        elapsed = time.perf_counter() - self.start
        print(f"  [{elapsed:7.1f} s] {message}", file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> int:
    """Run one family, print its table and write ``--json`` when given.

    Returns:
        0 when every case ran, 1 when a case failed: a variant that disagreed with its baseline
        (an :class:`AgreementError`) or raised. The table is printed either way, the failed
        rows with their error and no measurement.
    """
    report = collect(args, _Progress())
    print(common.format_report(report))
    if args.json:
        common.write_json(args.json, report)
        print(f"\nwrote {args.json}")
    return 1 if report.failed else 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``benchmarks/bench_<family>.py`` scripts: ``FAMILY [options]``."""
    parser = argparse.ArgumentParser(prog="deepkern-bench", description=__doc__.split("\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))
