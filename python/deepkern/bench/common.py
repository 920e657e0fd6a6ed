"""What every microbenchmark family shares: timing, the machine's state, one table, JSON.

A family measures and returns a :class:`Report` (rows of plain values); the command prints the
report with :func:`format_report` and writes it with :func:`write_json`. Library code never
prints.
"""

from __future__ import annotations

import json
import math
import os
import platform
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils import benchmark

__all__ = [
    "AgreementError",
    "Column",
    "Report",
    "Timing",
    "comparison_columns",
    "comparison_row",
    "environment",
    "format_report",
    "format_table",
    "ratio",
    "read_loadavg",
    "time_call",
    "time_calls",
    "write_json",
]


class AgreementError(AssertionError):
    """A variant's outputs or gradients differ from the baseline's before anything is timed."""


# ---------------------------------------------------------------------------------------------
# Timing


@dataclass
class Timing:
    """Seconds per call of a timed function.

    Attributes:
        median: median over the measured blocks, in seconds per call.
        iqr: interquartile range of the blocks, in seconds per call.
        calls: how many calls were timed (the warm-up excluded).
    """

    median: float
    iqr: float
    calls: int


def time_calls(
    fns: Mapping[str, Callable[[], object]], min_run_time: float = 1.0, rounds: int = 3
) -> dict[str, Timing]:
    """Time several functions in turn with ``torch.utils.benchmark.Timer``, interleaved.

    Each function gets ``min_run_time`` seconds of measurement, split into ``rounds`` rounds;
    every round visits all functions once. On a shared machine the load changes by the
    minute, so timing A fully and then B fully skews their ratio; interleaving spreads any
    spell of load over all of them. The first round of each function is a
    ``blocked_autorange``, which warms up and picks the block size (the calls per timed
    block); later rounds time blocks of that size. On CUDA the timer synchronises the device
    around each block.

    Args:
        fns: name -> the work to time, called with no arguments.
        min_run_time: seconds of measurement per function, warm-up excluded. A call slower
            than ``min_run_time / rounds`` is measured once per round.
        rounds: how many times to visit every function.

    Returns:
        name -> Timing, with the median and interquartile range over all blocks.

    Example:
        >>> x = torch.ones(8)
        >>> t = time_calls({"sum": x.sum, "mean": x.mean}, min_run_time=0.01)
        >>> t["sum"].median > 0
        True
    """
    if rounds < 1:
        raise ValueError(f"rounds must be at least 1, got {rounds}")
    threads = torch.get_num_threads()
    timers = {
        name: benchmark.Timer(stmt="fn()", globals={"fn": fn}, label=name, num_threads=threads)
        for name, fn in fns.items()
    }
    share = min_run_time / rounds
    per_call: dict[str, list[float]] = {name: [] for name in fns}
    block_size: dict[str, int] = {}
    for _ in range(rounds):
        for name, timer in timers.items():
            if name not in block_size:
                measurement = timer.blocked_autorange(min_run_time=share)
                block_size[name] = measurement.number_per_run
                per_call[name] += measurement.times
                continue
            spent = 0.0
            while spent < share:
                measurement = timer.timeit(block_size[name])
                per_call[name] += measurement.times
                spent += sum(measurement.raw_times)
    return {name: _timing(per_call[name], block_size[name] * len(per_call[name])) for name in fns}


def _timing(samples: list[float], calls: int) -> Timing:
    ordered = torch.tensor(samples, dtype=torch.float64)
    low, median, high = torch.quantile(
        ordered, torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64)
    )
    return Timing(median=float(median), iqr=float(high - low), calls=calls)


def time_call(fn: Callable[[], object], min_run_time: float = 1.0) -> Timing:
    """Time one function: :func:`time_calls` with a single round.

    Example:
        >>> time_call(lambda: torch.ones(8).sum(), min_run_time=0.01).median > 0
        True
    """
    return time_calls({"fn": fn}, min_run_time, rounds=1)["fn"]


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    """``numerator / denominator``, or None when either is missing or the quotient undefined."""
    if numerator is None or denominator is None or denominator == 0:
        return None
    if not (math.isfinite(numerator) and math.isfinite(denominator)):
        return None
    return numerator / denominator


# ---------------------------------------------------------------------------------------------
# The machine


def resolve_device(name: str | None) -> torch.device:
    """The device a benchmark runs on: ``name``, or CUDA when available, else the CPU.

    Raises:
        ValueError: an unknown device name, or CUDA asked for where there is none.
    """
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise ValueError(f"--device: {error}") from error
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for, but this torch has no usable CUDA device")
    return device


def read_loadavg(path: str = "/proc/loadavg") -> list[float] | None:
    """The 1, 5 and 15 minute load averages, or None where the file does not exist.

    On a machine shared with other tenants the load says whether a slow row is ours or theirs,
    so every report records it when it starts and when it ends.
    """
    try:
        fields = Path(path).read_text().split()
        return [float(value) for value in fields[:3]]
    except (OSError, ValueError, IndexError):
        return None


def environment(device: torch.device | str = "cpu") -> dict:
    """What the numbers depend on: versions, threads, device and the load when called."""
    device = torch.device(device)
    info = {
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "device": str(device),
        "loadavg_start": read_loadavg(),
    }
    if device.type == "cuda":
        info["device_name"] = torch.cuda.get_device_name(device)
    try:
        import deepkern

        info["deepkern"] = deepkern.__version__
        info["cpu_capability"] = deepkern.build_info()["cpu_capability"]
    except ImportError:
        info["deepkern"] = None
    return info


# ---------------------------------------------------------------------------------------------
# Tables


def _plain(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


@dataclass
class Column:
    """One column of a printed table.

    Attributes:
        key: the row field it shows.
        header: the column title.
        fmt: turns a present value into text; a missing value (None) prints as ``-``.
        align: ``"<"`` for text, ``">"`` for numbers.
    """

    key: str
    header: str
    fmt: Callable[[object], str] = _plain
    align: str = ">"

    def cell(self, row: Mapping) -> str:
        value = row.get(self.key)
        return "-" if value is None else self.fmt(value)


def seconds(value: float) -> str:
    """A duration with a unit that keeps three significant digits readable."""
    for scale, unit in ((1.0, "s"), (1e-3, "ms"), (1e-6, "us")):
        if abs(value) >= scale:
            return f"{value / scale:.3g} {unit}"
    return f"{value * 1e9:.3g} ns"


def times(value: float) -> str:
    """A ratio, printed as a factor."""
    return f"{value:.2f}x"


def mebibytes(value: float) -> str:
    """Bytes as MiB: one decimal from 1 MiB up, three below (tiny test sizes)."""
    mib = value / 2**20
    return f"{mib:.1f}" if abs(mib) >= 1 else f"{mib:.3f}"


def format_table(rows: Sequence[Mapping], columns: Sequence[Column]) -> str:
    """Rows as a fixed-width text table, one line per row under a header and a rule.

    Args:
        rows: mappings from column keys to values; missing keys print as ``-``.
        columns: what to show, in order.

    Returns:
        The table as one string without a trailing newline.

    Example:
        >>> print(format_table([{"case": "a", "t": 0.5}], [Column("case", "case", align="<"),
        ...                                                 Column("t", "time", seconds)]))
        case  time
        ----  -----
        a     500 ms
    """
    cells = [[c.header for c in columns]] + [[c.cell(row) for c in columns] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    lines = []
    for n, line in enumerate(cells):
        text = "  ".join(
            f"{value:{c.align}{width}}" for value, c, width in zip(line, columns, widths)
        )
        lines.append(text.rstrip())
        if n == 0:
            lines.append("  ".join("-" * width for width in widths))
    return "\n".join(lines)


def comparison_columns(outside: str | None = None) -> list[Column]:
    """The standard columns of a kernel against its reference and an outside library.

    Args:
        outside: the outside library's name, or None to leave its two columns out.
    """
    columns = [
        Column("case", "case", align="<"),
        Column("ours_s", "ours", seconds),
        Column("reference_s", "reference", seconds),
        Column("reference_ratio", "ref/ours", times),
    ]
    if outside is not None:
        columns += [
            Column("outside_s", outside, seconds),
            Column("outside_ratio", f"{outside}/ours", times),
        ]
    return columns


def comparison_row(
    case: str, ours_s: float, reference_s: float, outside_s: float | None = None
) -> dict:
    """One row for :func:`comparison_columns`: times in seconds and speed-ups over ours.

    A ratio above 1 means ours is faster than the other implementation.
    """
    return {
        "case": case,
        "ours_s": ours_s,
        "reference_s": reference_s,
        "reference_ratio": ratio(reference_s, ours_s),
        "outside_s": outside_s,
        "outside_ratio": ratio(outside_s, ours_s),
    }


# ---------------------------------------------------------------------------------------------
# Reports


@dataclass
class Report:
    """What a benchmark family returns: its table, a second summary table, and the machine.

    Attributes:
        family: the family name (``"momentum"``).
        columns: the main table's columns.
        rows: the main table's rows; plain Python values only, so that they serialise.
        summary_title: a heading for the summary table.
        summary_columns: the summary table's columns (empty for none).
        summary: the summary table's rows.
        env: :func:`environment` at the start, with ``loadavg_end`` added at the end.
        notes: short lines printed under the tables (targets met or missed, skipped variants).
    """

    family: str
    columns: list[Column]
    rows: list[dict]
    summary_title: str = ""
    summary_columns: list[Column] = field(default_factory=list)
    summary: list[dict] = field(default_factory=list)
    env: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def failed(self) -> bool:
        """Whether any row records an error in place of a measurement."""
        return any(row.get("error") for row in self.rows)


def _load_text(load: list[float] | None) -> str:
    return "unavailable" if load is None else " ".join(f"{value:.2f}" for value in load)


def format_report(report: Report) -> str:
    """The report as printed: machine line, main table, summary table, notes."""
    env = report.env
    head = (
        f"deepkern bench {report.family}: torch {env.get('torch')}, "
        f"{env.get('torch_threads')} threads, device {env.get('device')}, "
        f"loadavg at start {_load_text(env.get('loadavg_start'))}, "
        f"at end {_load_text(env.get('loadavg_end'))}"
    )
    parts = [head, "", format_table(report.rows, report.columns)]
    if report.summary_columns:
        parts += ["", report.summary_title, format_table(report.summary, report.summary_columns)]
    if report.notes:
        parts += [""] + report.notes
    return "\n".join(parts)


def _json_safe(value):
    # JSON has no NaN or infinity; a missing or diverged measurement is written as null.
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def write_json(path: str | os.PathLike, report: Report) -> None:
    """Write the report's rows, summary, notes and machine state as JSON.

    The file is written beside its destination and renamed into place, so that an interrupted
    run never leaves half a file.
    """
    path = Path(path)
    payload = {
        "family": report.family,
        "env": report.env,
        "rows": report.rows,
        "summary": report.summary,
        "notes": report.notes,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(_json_safe(payload), indent=2) + "\n")
    partial.replace(path)
