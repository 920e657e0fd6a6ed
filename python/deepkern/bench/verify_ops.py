"""Verify-family op microbenchmark: the compiled kernels against their plain-PyTorch references.

The question: what does a bound-propagation step cost per neuron? Three ops, each on the
neurons of many boxes at once:

- ``relaxation``: ``activation_relaxation`` for ReLU, sigmoid and tanh, on intervals of mixed
  signs (a third below 0, a third above, a third across it: the crossing ones need the tangent
  searches);
- ``dual``: ``dual_activation_max`` per activation, with coefficients of every sign;
- ``interval``: ``interval_linear`` of a batch of boxes through a dense layer (two GEMMs and two
  elementwise passes).

Before anything is timed, the kernel's outputs are compared with the reference's (to float32
rounding): a case that disagrees fails with an :class:`~deepkern.bench.common.AgreementError`.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch

from deepkern.bench import common
from deepkern.ops import verify

__all__ = ["HELP", "OPS", "add_arguments", "collect"]

HELP = "verify ops (interval_linear, activation_relaxation, dual_activation_max) against references"

OPS = ("relaxation", "dual", "interval")
DEFAULT_NEURONS = 1_000_000
QUICK_NEURONS = 2_000
# interval: (boxes, inputs, outputs) of the dense layer.
DEFAULT_LAYER = (1024, 1024, 1024)
QUICK_LAYER = (16, 32, 24)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--ops", nargs="+", default=list(OPS), choices=OPS, help="ops to run (default: all)"
    )
    parser.add_argument(
        "--neurons",
        type=int,
        default=None,
        help=f"neurons per elementwise case (default {DEFAULT_NEURONS:.0e}, {QUICK_NEURONS} quick)",
    )


def _intervals(n: int, device, generator) -> tuple[torch.Tensor, torch.Tensor]:
    centre = torch.randn(n, generator=generator) * 3
    width = torch.rand(n, generator=generator) * 6
    lower = centre - width / 2
    return lower.to(device), (lower + width).to(device)


def _check_agreement(ours, reference, name: str) -> None:
    for index, (got, want) in enumerate(zip(ours, reference)):
        if not torch.allclose(got, want, rtol=1e-5, atol=1e-5):
            error = float((got - want).abs().max())
            raise common.AgreementError(f"{name}: output {index} differs by {error:.2e}")


def _cases(args, device, generator) -> list[tuple[str, int, Callable, Callable]]:
    """(case, work items, ours, reference) for every requested op."""
    neurons = args.neurons or (QUICK_NEURONS if args.quick else DEFAULT_NEURONS)
    cases = []
    lower, upper = _intervals(neurons, device, generator)
    if "relaxation" in args.ops:
        for kind in verify.ACTIVATIONS:
            cases.append(
                (
                    f"relaxation {kind}",
                    neurons,
                    lambda kind=kind: verify.activation_relaxation(lower, upper, kind),
                    lambda kind=kind: verify.reference_activation_relaxation(lower, upper, kind),
                )
            )
    if "dual" in args.ops:
        linear = torch.randn(neurons, generator=generator).to(device)
        act = (torch.randn(neurons, generator=generator) * 4).to(device)
        for kind in verify.ACTIVATIONS:
            cases.append(
                (
                    f"dual {kind}",
                    neurons,
                    lambda kind=kind: verify.dual_activation_max(lower, upper, linear, act, kind),
                    lambda kind=kind: verify.reference_dual_activation_max(
                        lower, upper, linear, act, kind
                    ),
                )
            )
    if "interval" in args.ops:
        boxes, inputs, outputs = QUICK_LAYER if args.quick else DEFAULT_LAYER
        box_lower, box_upper = _intervals(boxes * inputs, device, generator)
        box_lower, box_upper = box_lower.view(boxes, inputs), box_upper.view(boxes, inputs)
        weight = (torch.randn(outputs, inputs, generator=generator) / inputs**0.5).to(device)
        bias = torch.randn(outputs, generator=generator).to(device)
        cases.append(
            (
                f"interval {boxes}x{inputs} -> {outputs}",
                boxes * outputs,
                lambda: verify.interval_linear(box_lower, box_upper, weight, bias),
                lambda: verify.reference_interval_linear(box_lower, box_upper, weight, bias),
            )
        )
    return cases


def collect(args: argparse.Namespace, progress: Callable[[str], None]) -> common.Report:
    device = common.resolve_device(args.device)
    if args.neurons is not None and args.neurons < 1:
        raise ValueError(f"--neurons must be positive, got {args.neurons}")
    min_run_time = args.min_run_time or (0.02 if args.quick else 1.0)
    env = common.environment(device)
    generator = torch.Generator().manual_seed(0)
    rows = []
    for name, items, ours, reference in _cases(args, device, generator):
        progress(name)
        try:
            _check_agreement(ours(), reference(), name)
        except Exception as error:  # a failed case is reported in its row, not hidden
            rows.append({"case": name, "error": f"{type(error).__name__}: {error}"})
            continue
        timings = common.time_calls({"ours": ours, "reference": reference}, min_run_time)
        row = common.comparison_row(name, timings["ours"].median, timings["reference"].median)
        row["items"] = items
        row["ns_per_item"] = 1e9 * timings["ours"].median / items
        rows.append(row)

    columns = common.comparison_columns() + [
        common.Column("items", "items"),
        common.Column("ns_per_item", "ours ns/item", lambda v: f"{v:.3g}"),
        common.Column("error", "error", align="<"),
    ]
    notes = [
        "times are medians per call; ref/ours above 1 means the kernel is faster; an item is a "
        "neuron (an output entry for interval)"
    ]
    return common.Report(family="verify_ops", columns=columns, rows=rows, env=env, notes=notes)
