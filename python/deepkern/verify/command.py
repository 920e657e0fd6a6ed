"""``deepkern verify``: one ONNX network against one VNN-LIB property, or a list of instances.

This is command-line code: it prints. The verification itself is
:func:`deepkern.verify.solver.verify`.
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
import time
from dataclasses import dataclass

import torch
from torch import Tensor, nn

METHODS = ("ibp", "crown", "alpha", "dual")


def add_verify_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``deepkern verify``."""
    parser.add_argument("network", nargs="?", help="the network, an .onnx file")
    parser.add_argument("spec", nargs="?", help="the property, a .vnnlib file")
    parser.add_argument(
        "--timeout", type=float, default=60.0, help="seconds for one instance (default 60)"
    )
    parser.add_argument(
        "--method",
        choices=METHODS,
        default="alpha",
        help="the bounds behind the proof: interval (ibp), linear relaxation (crown), "
        "optimised linear relaxation (alpha, the default) or the Lagrangian dual (dual)",
    )
    parser.add_argument("--result", help="write the VNN-COMP result file of one instance here")
    parser.add_argument("--seed", type=int, default=0, help="seed of the counterexample search")
    parser.add_argument(
        "--instances", help="a VNN-COMP instance list (onnx,vnnlib,timeout per line) to run"
    )
    parser.add_argument("--results", help="with --instances: write the result table (CSV) here")
    parser.add_argument(
        "--timeout-scale",
        type=float,
        default=1.0,
        help="with --instances: multiply every listed timeout by this (default 1)",
    )


@dataclass
class Outcome:
    """What one instance came to, with the time it took from loading to verdict."""

    verdict: str
    seconds: float
    bound: float | None = None
    counterexample: tuple[Tensor, Tensor] | None = None
    note: str = ""


def verify_instance(
    network_path: str, spec_path: str, *, timeout: float, method: str = "alpha", seed: int = 0
) -> Outcome:
    """Loads a network and a property and verifies one against the other.

    Loading and parsing count against ``timeout``, as they do in VNN-COMP.

    Raises:
        OnnxImportError, VnnlibError (both ValueError), OSError: the files cannot be used.
    """
    from deepkern.verify.onnx_loader import load_onnx
    from deepkern.verify.solver import verify
    from deepkern.verify.vnnlib import parse_vnnlib

    start = time.perf_counter()
    network, input_shape = load_onnx(network_path)
    spec = parse_vnnlib(spec_path, math.prod(input_shape), _output_count(network, input_shape))
    remaining = timeout - (time.perf_counter() - start)
    if remaining <= 0:
        return Outcome("timeout", time.perf_counter() - start, note="loading took the time")

    result = verify(
        network, spec, timeout=remaining, method=method, seed=seed, input_shape=input_shape
    )
    return Outcome(
        result.verdict,
        time.perf_counter() - start,
        result.bound,
        result.counterexample,
    )


def _output_count(network: nn.Sequential, input_shape: tuple[int, ...]) -> int:
    tensors = [*network.parameters(), *network.buffers()]
    dtype = tensors[0].dtype if tensors else torch.float32
    with torch.no_grad():
        return int(network(torch.zeros(1, *input_shape, dtype=dtype)).shape[1])


def run_verify(args: argparse.Namespace) -> int:
    """``deepkern verify``: prints the verdicts; returns 0, or 1 when an instance of a list
    could not be run (its row says why)."""
    if not (math.isfinite(args.timeout) and args.timeout > 0):
        raise ValueError(f"--timeout must be a positive number of seconds, got {args.timeout}")
    if args.instances:
        if args.network or args.spec or args.result:
            raise ValueError(
                "--instances runs a list: give no NET.onnx, SPEC.vnnlib or --result with it"
            )
        return _run_instances(args)
    if args.results or args.timeout_scale != 1.0:
        raise ValueError("--results and --timeout-scale go with --instances")
    if not (args.network and args.spec):
        raise ValueError("give NET.onnx and SPEC.vnnlib, or --instances FILE.csv")
    for what, path in (("network", args.network), ("property", args.spec)):
        if not os.path.isfile(path):
            problem = "is a folder, not a file" if os.path.isdir(path) else "no such file"
            raise ValueError(f"{what} {path}: {problem}")
    _check_writable("--result", args.result, inputs=(args.network, args.spec))
    return _run_one(args)


def _check_writable(option: str, path: str | None, inputs: tuple = ()) -> None:
    # Checked before any instance runs: a list can take hours, and its table comes last.
    if path is None:
        return
    if not path:
        raise ValueError(f"{option} needs a file name")
    if os.path.isdir(path):
        raise ValueError(f"{option} {path} is a folder; give the name of a file")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise ValueError(f"{option} {path}: the folder {folder} does not exist")
    for given in inputs:
        if (
            given
            and os.path.exists(given)
            and os.path.exists(path)
            and os.path.samefile(given, path)
        ):
            raise ValueError(f"{option} {path} is an input of the run; it would be overwritten")
    probe = None
    try:
        descriptor, probe = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".part")
        os.close(descriptor)
    except OSError as error:
        raise ValueError(f"{option} {path}: cannot write in {folder} ({error.strerror})") from error
    finally:
        if probe is not None:
            os.remove(probe)


def _run_one(args: argparse.Namespace) -> int:
    from deepkern.verify.results import write_result

    outcome = verify_instance(
        args.network, args.spec, timeout=args.timeout, method=args.method, seed=args.seed
    )
    print(f"{outcome.verdict} ({outcome.seconds:.2f} s, {_bound_text(outcome)})")
    if outcome.counterexample is not None:
        x, y = outcome.counterexample
        print(f"counterexample: x = {_preview(x)}, network(x) = {_preview(y)}")
    if args.result:
        try:
            write_result(args.result, outcome.verdict, outcome.counterexample)
        except OSError as error:
            raise ValueError(f"--result: {error.strerror}") from error
        print(f"result written to {args.result}")
    return 0


def _run_instances(args: argparse.Namespace) -> int:
    from deepkern.verify.results import InstanceResult, read_instances, write_results_csv

    if not (math.isfinite(args.timeout_scale) and args.timeout_scale > 0):
        raise ValueError(f"--timeout-scale must be positive, got {args.timeout_scale}")
    _check_writable("--results", args.results, inputs=(args.instances,))
    try:
        instances = read_instances(args.instances)
    except OSError as error:
        raise ValueError(f"--instances: cannot read {args.instances} ({error.strerror})") from error
    if not instances:
        raise ValueError(f"{args.instances}: the list holds no instances")

    rows, failures = [], 0
    width = len(str(len(instances)))
    for number, instance in enumerate(instances, start=1):
        if instance.problem is not None:
            outcome = Outcome("error", 0.0, note=instance.problem)
        else:
            try:
                outcome = verify_instance(
                    instance.onnx,
                    instance.vnnlib,
                    timeout=instance.timeout * args.timeout_scale,
                    method=args.method,
                    seed=args.seed,
                )
            except (ValueError, OSError, RuntimeError) as error:
                # One instance that cannot be run does not end the list; its row says why.
                outcome = Outcome("error", 0.0, note=f"{type(error).__name__}: {error}")
        failures += outcome.verdict == "error"

        name = f"{os.path.basename(instance.onnx)} {os.path.basename(instance.vnnlib)}"
        detail = outcome.note if outcome.verdict == "error" else _bound_text(outcome)
        print(
            f"[{number:>{width}}/{len(instances)}] {name}: {outcome.verdict} "
            f"({outcome.seconds:.2f} s, {detail})"
        )
        rows.append(
            InstanceResult(
                instance.onnx,
                instance.vnnlib,
                outcome.verdict,
                outcome.seconds,
                outcome.bound,
                outcome.note,
            )
        )

    counts = {v: sum(r.verdict == v for r in rows) for v in dict.fromkeys(r.verdict for r in rows)}
    print(", ".join(f"{count} {verdict}" for verdict, count in counts.items()))
    if args.results:
        try:
            write_results_csv(args.results, rows)
        except OSError as error:
            raise ValueError(f"--results: {error.strerror}") from error
        print(f"results written to {args.results}")
    return 1 if failures else 0


def _bound_text(outcome: Outcome) -> str:
    return "no bound" if outcome.bound is None else f"bound {outcome.bound:.6g}"


def _preview(values: Tensor, count: int = 6) -> str:
    shown = ", ".join(f"{v:.6g}" for v in values.reshape(-1)[:count].tolist())
    more = f", ... ({values.numel()} values)" if values.numel() > count else ""
    return f"[{shown}{more}]"


__all__ = ["METHODS", "Outcome", "add_verify_arguments", "run_verify", "verify_instance"]
