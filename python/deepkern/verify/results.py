"""Verification results on disk: VNN-COMP result files, instance lists and result tables.

A VNN-COMP result file starts with the verdict on its own line: ``sat`` (a counterexample
exists), ``unsat`` (the property holds), ``timeout``, ``unknown`` or ``error``. After ``sat``
comes the counterexample as one s-expression of input and output values::

    sat
    ((X_0 0.6)
     (X_1 -0.5)
     (Y_0 4.2))

VNN-COMP 2021 wrote ``holds`` and ``violated`` for ``unsat`` and ``sat``; they are read as such.

An instance list is the competition's CSV: ``onnx,vnnlib,timeout`` per line, paths relative to
the CSV's folder. A result table is a CSV with a header: ``onnx, vnnlib, verdict, seconds,
bound, note``.
"""

from __future__ import annotations

import csv
import io
import math
import os
import re
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor

VERDICTS = ("sat", "unsat", "timeout", "unknown", "error")
_OLD_VERDICTS = {"holds": "unsat", "violated": "sat"}
_VALUE_NAME = re.compile(r"([XY])_(0|[1-9]\d*)")
RESULT_COLUMNS = ("onnx", "vnnlib", "verdict", "seconds", "bound", "note")


class ResultFormatError(ValueError):
    """A result file or instance list that does not follow its format."""


# -- VNN-COMP result files ----------------------------------------------------------------------


def format_result(verdict: str, counterexample: tuple[Tensor, Tensor] | None = None) -> str:
    """The text of a VNN-COMP result file.

    Args:
        verdict: one of ``sat``, ``unsat``, ``timeout``, ``unknown``, ``error``.
        counterexample: ``(x [inputs], y [outputs])`` for ``sat`` (required there), else None.

    Raises:
        ValueError: an unknown verdict, ``sat`` without a counterexample, or a counterexample
            with another verdict or with values that are not finite.
    """
    if verdict not in VERDICTS:
        raise ValueError(f"verdict must be one of {', '.join(VERDICTS)}, got {verdict!r}")
    if (verdict == "sat") != (counterexample is not None):
        raise ValueError("a counterexample goes with verdict 'sat' and only with it")
    if counterexample is None:
        return verdict + "\n"

    x, y = (torch.as_tensor(v, dtype=torch.float64).reshape(-1) for v in counterexample)
    if not (bool(torch.isfinite(x).all()) and bool(torch.isfinite(y).all())):
        raise ValueError("counterexample values must be finite")
    # repr of a Python float is the shortest text that reads back to the same double.
    pairs = [f"(X_{i} {value!r})" for i, value in enumerate(x.tolist())]
    pairs += [f"(Y_{j} {value!r})" for j, value in enumerate(y.tolist())]
    return "sat\n(" + "\n ".join(pairs) + ")\n"


def write_result(
    path: str, verdict: str, counterexample: tuple[Tensor, Tensor] | None = None
) -> None:
    """Writes a VNN-COMP result file (atomically: a reader never sees half of it).

    Args and Raises: as :func:`format_result`, plus ``OSError`` when the file cannot be
    written.
    """
    _write_atomically(path, format_result(verdict, counterexample))


def read_result(path: str) -> tuple[str, tuple[Tensor, Tensor] | None]:
    """Reads a VNN-COMP result file.

    Returns:
        ``(verdict, counterexample)``: the verdict (``holds`` and ``violated`` read as
        ``unsat`` and ``sat``) and, after ``sat``, ``(x [inputs], y [outputs])`` in float64.

    Raises:
        ResultFormatError: an unknown verdict or a malformed counterexample; the message
            names the file and line.
        OSError: the file cannot be read.
    """
    from deepkern.verify.vnnlib import VnnlibError, _List, _parse_expressions, _Word

    with open(path, encoding="utf-8") as file:
        lines = file.read().split("\n")
    first = next((n for n, line in enumerate(lines) if line.strip()), None)
    if first is None:
        raise ResultFormatError(f"{path}: the file is empty")
    verdict = lines[first].strip().lower()
    verdict = _OLD_VERDICTS.get(verdict, verdict)
    if verdict not in VERDICTS:
        raise ResultFormatError(f"{path}:{first + 1}: unknown verdict {lines[first].strip()!r}")

    rest = "\n" * (first + 1) + "\n".join(lines[first + 1 :])
    try:
        expressions = _parse_expressions(rest)
    except VnnlibError as error:
        raise ResultFormatError(f"{path}:{error}") from error
    if verdict != "sat":
        if expressions:
            line = expressions[0].line
            raise ResultFormatError(f"{path}:{line}: unexpected text after {verdict!r}")
        return verdict, None
    if len(expressions) != 1 or not isinstance(expressions[0], _List):
        raise ResultFormatError(f"{path}:{first + 2}: expected one list of (NAME VALUE) pairs")

    values: dict[str, dict[int, float]] = {"X": {}, "Y": {}}
    for pair in expressions[0].items:
        if (
            not isinstance(pair, _List)
            or len(pair.items) != 2
            or not all(isinstance(item, _Word) for item in pair.items)
        ):
            raise ResultFormatError(f"{path}:{pair.line}: expected (NAME VALUE)")
        name, text = pair.items[0].text, pair.items[1].text
        match = _VALUE_NAME.fullmatch(name)
        if match is None:
            raise ResultFormatError(f"{path}:{pair.line}: {name!r} is not X_<i> or Y_<j>")
        kind, index = match.group(1), int(match.group(2))
        try:
            value = float(text)
        except ValueError:
            raise ResultFormatError(f"{path}:{pair.line}: {text!r} is not a number") from None
        if not math.isfinite(value) or index in values[kind]:
            raise ResultFormatError(f"{path}:{pair.line}: {name} {text} is not allowed")
        values[kind][index] = value

    tensors = []
    for kind in ("X", "Y"):
        indices = sorted(values[kind])
        if indices != list(range(len(indices))) or not indices:
            raise ResultFormatError(f"{path}: the {kind}_ values must be numbered 0, 1, 2, ...")
        tensors.append(torch.tensor([values[kind][i] for i in indices], dtype=torch.float64))
    return verdict, (tensors[0], tensors[1])


# -- instance lists ---------------------------------------------------------------------------


@dataclass
class Instance:
    """One line of an instance list: resolved paths, the time limit, and what is missing."""

    onnx: str
    vnnlib: str
    timeout: float
    line: int
    problem: str | None = None


def read_instances(path: str) -> list[Instance]:
    """Reads a VNN-COMP instance list ``onnx,vnnlib,timeout``.

    Paths are relative to the CSV's folder. A path that is not there is also looked for by its
    file name in the CSV's folder (instance lists name sub-folders such as ``nets/``, while a
    copy of the files may sit beside the CSV). A file found in neither place does not stop the
    reading: its instance gets a ``problem`` that says so.

    Raises:
        ResultFormatError: a line without three fields, or a timeout that is not a positive
            number; the message names the file and line.
        OSError: the CSV cannot be read.
    """
    folder = os.path.dirname(os.path.abspath(path))
    instances = []
    with open(path, encoding="utf-8", newline="") as file:
        try:
            text = file.read()
        except UnicodeDecodeError as error:
            raise ResultFormatError(f"{path}: not a text CSV ({error.reason})") from error
    if "\x00" in text:
        raise ResultFormatError(f"{path}: not a text CSV (it holds NUL bytes)")
    for line_number, row in enumerate(csv.reader(text.splitlines()), start=1):
        fields = [field.strip() for field in row]
        if not any(fields):
            continue
        if len(fields) != 3:
            raise ResultFormatError(
                f"{path}:{line_number}: expected onnx,vnnlib,timeout, got {len(fields)} fields"
            )
        try:
            timeout = float(fields[2])
        except ValueError:
            timeout = math.nan
        if not (math.isfinite(timeout) and timeout > 0):
            raise ResultFormatError(
                f"{path}:{line_number}: timeout must be a positive number, got {fields[2]!r}"
            )
        onnx_path, onnx_found = _locate(folder, fields[0])
        vnnlib_path, vnnlib_found = _locate(folder, fields[1])
        missing = [p for p, found in ((onnx_path, onnx_found), (vnnlib_path, vnnlib_found))
                   if not found]  # fmt: skip
        problem = f"missing file {', '.join(missing)}" if missing else None
        instances.append(Instance(onnx_path, vnnlib_path, timeout, line_number, problem))
    return instances


def _locate(folder: str, name: str) -> tuple[str, bool]:
    """The path of a listed file, and whether it exists."""
    listed = os.path.normpath(os.path.join(folder, name))
    if os.path.isfile(listed):
        return listed, True
    beside = os.path.join(folder, os.path.basename(name))
    if os.path.isfile(beside):
        return beside, True
    return listed, False


# -- result tables ----------------------------------------------------------------------------


@dataclass
class InstanceResult:
    """One row of a result table."""

    onnx: str
    vnnlib: str
    verdict: str
    seconds: float
    bound: float | None = None
    note: str = ""


def write_results_csv(path: str, rows: Iterable[InstanceResult]) -> None:
    """Writes a result table with a header row (atomically).

    Raises:
        ValueError: a row with an unknown verdict.
        OSError: the file cannot be written.
    """
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(RESULT_COLUMNS)
    for row in rows:
        if row.verdict not in VERDICTS:
            raise ValueError(f"verdict must be one of {', '.join(VERDICTS)}, got {row.verdict!r}")
        bound = "" if row.bound is None else repr(float(row.bound))
        writer.writerow([row.onnx, row.vnnlib, row.verdict, f"{row.seconds:.3f}", bound, row.note])
    _write_atomically(path, buffer.getvalue())


def read_results_csv(path: str) -> list[InstanceResult]:
    """Reads a table written by :func:`write_results_csv`.

    Raises:
        ResultFormatError: a missing or different header, or a malformed row.
    """
    with open(path, encoding="utf-8", newline="") as file:
        rows = list(csv.reader(file))
    if not rows or tuple(rows[0]) != RESULT_COLUMNS:
        raise ResultFormatError(f"{path}:1: expected the header {','.join(RESULT_COLUMNS)}")
    results = []
    for line_number, row in enumerate(rows[1:], start=2):
        try:
            onnx, vnnlib, verdict, seconds, bound, note = row
            if verdict not in VERDICTS:
                raise ValueError(f"unknown verdict {verdict!r}")
            results.append(
                InstanceResult(
                    onnx, vnnlib, verdict, float(seconds), float(bound) if bound else None, note
                )
            )
        except ValueError as error:
            raise ResultFormatError(f"{path}:{line_number}: {error}") from None
    return results


def _write_atomically(path: str, text: str) -> None:
    """Writes through a temporary file beside ``path``, so a failure leaves no half file; an
    error names ``path``, not the temporary file."""
    folder = os.path.dirname(os.path.abspath(path))
    temporary = None
    try:
        descriptor, temporary = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".part")
        with os.fdopen(descriptor, "w", encoding="utf-8") as file:
            file.write(text)
        os.replace(temporary, path)
    except OSError as error:
        raise OSError(error.errno, f"cannot write {path} ({error.strerror})") from error
    finally:
        if temporary is not None and os.path.exists(temporary):
            os.remove(temporary)


__all__ = [
    "RESULT_COLUMNS",
    "VERDICTS",
    "Instance",
    "InstanceResult",
    "ResultFormatError",
    "format_result",
    "read_instances",
    "read_result",
    "read_results_csv",
    "write_result",
    "write_results_csv",
]
