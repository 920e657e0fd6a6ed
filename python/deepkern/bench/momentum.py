"""Momentum ResNets: time and memory of one training step against depth, per memory strategy.

The question: does the reversible backward keep activation memory flat in depth, and what does
it cost in time against plain autograd, against checkpointing and against the ``momentumnet``
package? Two residual functions stand for the two usual workloads:

- ``mlp``: ``f = Linear(w, w) -> Tanh -> Linear(w, w)`` on a batch of vectors;
- ``conv``: ``f = Conv3x3 -> BatchNorm -> ReLU -> Conv3x3`` on a batch of small images.

Variants, all sharing the same residual modules (so the same parameters) and the same input:

- ``reversible``: ``MomentumNet(memory="reversible", exact=False)``;
- ``exact``: ``MomentumNet(memory="reversible", exact=True)``;
- ``autograd``: ``MomentumNet(memory="backprop")``, the baseline every ratio refers to;
- ``checkpoint``: the same momentum steps with ``torch.utils.checkpoint`` around each residual
  function (``use_reentrant=False``);
- ``momentumnet``: ``momentumnet.MomentumNet(use_backprop=False)``, when that package is
  installed.

Before anything is timed, each variant's output and gradients (input and every parameter) are
compared with the baseline's, and all of them with the same network run in float64. Deep nets
are ill-conditioned, so float32 autograd itself strays from float64 (by a few percent with
BatchNorm from depth 128); ``exact`` and ``checkpoint`` must stay within a few times that of the
baseline, or their row fails with an :class:`~deepkern.bench.common.AgreementError` and is not
timed. The float ``reversible`` variant and ``momentumnet`` lose bits when they invert the
forward pass, so their error is only reported.

Memory is counted by :func:`deepkern.bench.memory.measure_step` after a warm-up step, with the
gradient buffers kept between steps (``zero_grad(set_to_none=False)``): the peak it reports is
then what one step allocates above parameters and gradients, activations and temporaries.
"""

from __future__ import annotations

import argparse
import copy
import gc
import importlib.util
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from deepkern.bench import common
from deepkern.bench.common import AgreementError, Column
from deepkern.bench.memory import measure_step
from deepkern.nn import MomentumNet
from deepkern.ops import momentum as ops

__all__ = [
    "HELP",
    "NETS",
    "VARIANTS",
    "CheckpointedMomentum",
    "NetSpec",
    "add_arguments",
    "build_variant",
    "collect",
    "net_spec",
]

HELP = "MomentumNet training step: time and peak memory against depth, per memory strategy"

VARIANTS = ("reversible", "exact", "autograd", "checkpoint", "momentumnet")
BASELINE = "autograd"
OURS = ("reversible", "exact")
OUTSIDE = "momentumnet"
NETS = ("mlp", "conv")
DEFAULT_DEPTHS = (8, 32, 128, 512)
QUICK_DEPTHS = (4, 8)

# Variants that must agree with plain autograd before they are timed. Checkpointing replays the
# same float32 operations; exact mode rounds the state to 2^-32 instead of to float32, a change
# of the same size as float32 rounding. Either way the difference from the baseline is a second
# rounding of an equally conditioned computation, so it may reach about twice the baseline's
# own distance from float64; a factor 4 leaves room for unlucky layers, and the floor (80
# float32 ulps) covers shallow nets where the baseline is nearly exact.
MUST_AGREE = ("exact", "checkpoint")
AGREEMENT_FACTOR = 4.0
AGREEMENT_FLOOR = 1e-5

# What the reversible variants aim for on a CPU; reported, never asserted.
FLATNESS_TARGET = 1.2
TIME_TARGET = 1.5


# ---------------------------------------------------------------------------------------------
# Networks


@dataclass(frozen=True)
class NetSpec:
    """A residual function and its input.

    Attributes:
        name: ``"mlp"`` or ``"conv"``.
        input_shape: the batch fed to the network.
        make: builds one residual function (fresh parameters from the global generator).
        description: sizes, for the report.
    """

    name: str
    input_shape: tuple[int, ...]
    make: Callable[[], nn.Module]
    description: str


def net_spec(name: str, quick: bool = False) -> NetSpec:
    """The residual function and input of a named net, at full or tiny (``quick``) size.

    Full sizes: ``mlp`` is width 256 at batch 128; ``conv`` is 16 channels of 16x16 images
    at batch 8. Both states then hold 32768 numbers, and at depth 512 a plain-autograd step
    keeps 100 to 200 MiB of activations and takes about a second on one CPU thread, so that
    all depths and variants run in about five minutes on an idle machine.

    Raises:
        ValueError: an unknown name.
    """
    if name == "mlp":
        width, batch = (16, 8) if quick else (256, 128)

        def make() -> nn.Module:
            return nn.Sequential(nn.Linear(width, width), nn.Tanh(), nn.Linear(width, width))

        return NetSpec(name, (batch, width), make, f"width {width}, batch {batch}")
    if name == "conv":
        channels, size, batch = (4, 6, 4) if quick else (16, 16, 8)

        def make() -> nn.Module:
            return nn.Sequential(
                # No bias before BatchNorm: the normalisation removes it, so its gradient
                # would be rounding noise and its relative error meaningless.
                nn.Conv2d(channels, channels, 3, padding=1, bias=False),
                nn.BatchNorm2d(channels),
                nn.ReLU(),
                nn.Conv2d(channels, channels, 3, padding=1),
            )

        description = f"{channels} channels, {size}x{size}, batch {batch}"
        return NetSpec(name, (batch, channels, size, size), make, description)
    raise ValueError(f"unknown net {name!r}; known: {', '.join(NETS)}")


def _build_functions(spec: NetSpec, depth: int, seed: int, device: torch.device):
    # A private generator state, so that the benchmark neither depends on nor moves the
    # caller's random stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        functions = nn.ModuleList(spec.make() for _ in range(depth))
    return functions.to(device)


class CheckpointedMomentum(nn.Module):
    """The momentum network with ``torch.utils.checkpoint`` around each residual function.

    The momentum step is deepkern's fused one, as in ``MomentumNet(memory="backprop")``, so that
    this variant differs from the baseline only in how activations are kept: the input of each
    layer is stored, everything inside the residual function is recomputed in the backward.

    Args:
        functions (nn.ModuleList): the residual functions.
        gamma (float in (0, 1]): momentum.
    """

    def __init__(self, functions: nn.ModuleList, gamma: float):
        super().__init__()
        self.functions = functions
        self.gamma = gamma

    def forward(self, x: Tensor) -> Tensor:
        v = torch.zeros_like(x)
        for function in self.functions:
            fx = checkpoint(function, x, use_reentrant=False)
            x, v = ops.forward(x, v, fx, self.gamma)
        return x


def momentumnet_available() -> bool:
    """Whether the outside ``momentumnet`` package can be imported."""
    return importlib.util.find_spec("momentumnet") is not None


def build_variant(variant: str, functions: nn.ModuleList, gamma: float) -> nn.Module:
    """Wrap shared residual functions as one of :data:`VARIANTS`.

    Raises:
        ValueError: an unknown variant.
        ImportError: ``momentumnet`` asked for but not installed.
    """
    if variant == "reversible":
        return MomentumNet(functions, gamma, memory="reversible", exact=False)
    if variant == "exact":
        return MomentumNet(functions, gamma, memory="reversible", exact=True)
    if variant == "autograd":
        return MomentumNet(functions, gamma, memory="backprop")
    if variant == "checkpoint":
        return CheckpointedMomentum(functions, gamma)
    if variant == "momentumnet":
        import momentumnet

        return momentumnet.MomentumNet(list(functions), gamma, use_backprop=False)
    raise ValueError(f"unknown variant {variant!r}; known: {', '.join(VARIANTS)}")


# ---------------------------------------------------------------------------------------------
# Agreement and measurement


def _outputs_and_gradients(
    model: nn.Module, functions: nn.ModuleList, x: Tensor, probe: Tensor
) -> list[Tensor]:
    functions.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    out = model(x)
    out.backward(probe)
    return [out.detach(), x.grad] + [p.grad for p in functions.parameters()]


def relative_error(got: Tensor, want: Tensor) -> float:
    """``max |got - want| / max |want|``; infinite when either holds a non-finite value."""
    difference = (got.double() - want.double()).abs().max().item()
    scale = want.double().abs().max().item()
    error = difference / scale if scale > 0 else difference
    return error if math.isfinite(error) else math.inf


def tolerance(baseline_error: float) -> float:
    """The largest error against plain autograd accepted for :data:`MUST_AGREE` variants.

    Args:
        baseline_error: plain autograd's own relative error against float64, outputs and
            gradients together.
    """
    return max(AGREEMENT_FACTOR * baseline_error, AGREEMENT_FLOOR)


def _errors(got: list[Tensor], want: list[Tensor]) -> tuple[float, float]:
    out_error = relative_error(got[0], want[0])
    grad_error = max((relative_error(g, w) for g, w in zip(got[1:], want[1:])), default=0.0)
    return out_error, grad_error


def _training_step(model: nn.Module, functions: nn.ModuleList, x: Tensor, probe: Tensor):
    # Zeroing in place keeps the gradient buffers allocated, so that a step's peak counts what
    # the step itself allocates.
    def step() -> None:
        functions.zero_grad(set_to_none=False)
        model(x).backward(probe)

    return step


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"[:200]


@dataclass
class _Depth:
    """Everything one depth shares between variants."""

    spec: NetSpec
    depth: int
    functions: nn.ModuleList
    x: Tensor
    probe: Tensor
    reference: list[Tensor]
    truth: list[Tensor]
    param_bytes: int


def _check_variant(
    variant: str,
    case: _Depth,
    gamma: float,
    device: torch.device,
    progress: Callable[[str], None],
) -> tuple[dict, Callable[[], None] | None]:
    """Agreement and memory of one variant; returns its row and its step, None on failure."""
    spec, depth = case.spec, case.depth
    row = {"net": spec.name, "depth": depth, "variant": variant, "param_bytes": case.param_bytes}
    label = f"{spec.name} depth {depth} {variant}"
    try:
        model = build_variant(variant, case.functions, gamma)

        # This step is also the warm-up: it runs the variant's code once and leaves a gradient
        # buffer on every parameter, which the steps below zero in place. The baseline runs it
        # too, rather than reuse the reference: zeroing the reference's own buffers in place
        # would erase it.
        progress(f"{label}: agreement")
        got = _outputs_and_gradients(model, case.functions, case.x, case.probe)
        out_error, grad_error = _errors(got, case.reference)
        row.update(out_error=out_error, grad_error=grad_error)
        out_f64, grad_f64 = _errors(got, case.truth)
        row.update(out_error_f64=out_f64, grad_error_f64=grad_f64)
        del got
        if variant in MUST_AGREE:
            base_out, base_grad = _errors(case.reference, case.truth)
            limit = row["tolerance"] = tolerance(max(base_out, base_grad))
            if not max(out_error, grad_error) <= limit:
                raise AgreementError(
                    f"differs from plain autograd by {max(out_error, grad_error):.3g} "
                    f"(output {out_error:.3g}, gradients {grad_error:.3g}), more than "
                    f"{limit:.3g}, {AGREEMENT_FACTOR:g} times autograd's own error "
                    "against float64"
                )

        progress(f"{label}: memory")
        step = _training_step(model, case.functions, case.x, case.probe)
        exclude = [*case.functions.parameters(), case.x, case.probe]
        memory = measure_step(step, device, exclude=exclude)
        row.update(saved_bytes=memory.saved_bytes, peak_bytes=memory.peak_bytes)
        return row, step
    except Exception as error:  # a failing variant is a result; the others still run
        row["error"] = _first_line(error)
        progress(f"{label}: failed: {row['error']}")
        return row, None


def _measure_depth(
    case: _Depth,
    variants: list[str],
    gamma: float,
    device: torch.device,
    min_run_time: float,
    progress: Callable[[str], None],
) -> list[dict]:
    rows, steps = [], {}
    for variant in variants:
        row, step = _check_variant(variant, case, gamma, device, progress)
        rows.append(row)
        if step is not None:
            steps[variant] = step

    progress(f"{case.spec.name} depth {case.depth}: timing {', '.join(steps)}")
    try:
        timings = common.time_calls(steps, min_run_time)
    except Exception as error:  # every step ran above, so this is rare; keep the memory rows
        timings = {}
        for row in rows:
            row.setdefault("error", _first_line(error))
    for row in rows:
        timing = timings.get(row["variant"])
        if timing is not None:
            row.update(time_s=timing.median, time_iqr_s=timing.iqr, calls=timing.calls)
    return rows


def _prepare_depth(spec: NetSpec, depth: int, gamma: float, seed: int, device) -> _Depth:
    functions = _build_functions(spec, depth, seed, device)
    generator = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(spec.input_shape, generator=generator).to(device)
    probe = torch.randn(spec.input_shape, generator=generator).to(device)
    baseline = build_variant(BASELINE, functions, gamma)
    reference = _outputs_and_gradients(baseline, functions, x, probe)

    # The same network and data in float64, a copy so that the shared modules stay float32.
    functions64 = copy.deepcopy(functions).double()
    baseline64 = build_variant(BASELINE, functions64, gamma)
    truth = _outputs_and_gradients(baseline64, functions64, x.double(), probe.double())
    del functions64, baseline64

    param_bytes = sum(p.numel() * p.element_size() for p in functions.parameters())
    return _Depth(spec, depth, functions, x, probe, reference, truth, param_bytes)


def _add_ratios(rows: list[dict]) -> None:
    baselines = {(r["net"], r["depth"]): r for r in rows if r["variant"] == BASELINE}
    for row in rows:
        base = baselines.get((row["net"], row["depth"]), {})
        row["time_ratio"] = common.ratio(row.get("time_s"), base.get("time_s"))
        row["peak_ratio"] = common.ratio(row.get("peak_bytes"), base.get("peak_bytes"))
        row["saved_ratio"] = common.ratio(row.get("saved_bytes"), base.get("saved_bytes"))


# ---------------------------------------------------------------------------------------------
# Summary: flatness in depth and the targets


def _summarise(rows: list[dict]) -> list[dict]:
    summary = []
    keys = dict.fromkeys((r["net"], r["variant"]) for r in rows)
    for net, variant in keys:
        mine = sorted(
            (r for r in rows if r["net"] == net and r["variant"] == variant and "error" not in r),
            key=lambda r: r["depth"],
        )
        if not mine:
            continue
        low, high = mine[0], mine[-1]
        time_ratios = [r["time_ratio"] for r in mine if r.get("time_ratio") is not None]
        outside = {
            r["depth"]: r["time_s"]
            for r in rows
            if r["net"] == net and r["variant"] == OUTSIDE and "time_s" in r
        }
        vs_outside = [common.ratio(r["time_s"], outside.get(r["depth"])) for r in mine]
        vs_outside = [value for value in vs_outside if value is not None]
        summary.append(
            {
                "net": net,
                "variant": variant,
                "depths": f"{low['depth']}..{high['depth']}",
                "peak_low_bytes": low["peak_bytes"],
                "peak_high_bytes": high["peak_bytes"],
                "flatness": common.ratio(high["peak_bytes"], low["peak_bytes"]),
                "saved_flatness": common.ratio(high["saved_bytes"], low["saved_bytes"]),
                "worst_time_ratio": max(time_ratios, default=None),
                "worst_vs_outside": max(vs_outside, default=None),
            }
        )
    return summary


def _verdict(value: float | None, target: float) -> str:
    if value is None:
        return "not measured"
    return "met" if value <= target else "MISSED"


def _target_notes(summary: list[dict]) -> list[str]:
    notes = []
    for entry in summary:
        if entry["variant"] not in OURS:
            continue
        name = f"{entry['net']} {entry['variant']}"
        flat, slow, outside = (
            entry["flatness"],
            entry["worst_time_ratio"],
            entry["worst_vs_outside"],
        )
        notes.append(
            f"{name}: peak flatness {_number(flat)} (target <= {FLATNESS_TARGET}: "
            f"{_verdict(flat, FLATNESS_TARGET)}); worst time vs autograd {_number(slow)}x "
            f"(target <= {TIME_TARGET}: {_verdict(slow, TIME_TARGET)}); worst time vs "
            f"momentumnet {_number(outside)}x (target < 1: {_verdict(outside, 1.0)})"
        )
    return notes


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _columns(failures: bool) -> list[Column]:
    columns = [
        Column("net", "net", align="<"),
        Column("depth", "depth"),
        Column("variant", "variant", align="<"),
        Column("time_s", "time/step", common.seconds),
        Column("time_ratio", "vs autograd", common.times),
        Column("saved_bytes", "saved MiB", common.mebibytes),
        Column("peak_bytes", "peak MiB", common.mebibytes),
        Column("peak_ratio", "peak vs autograd", common.times),
        Column("param_bytes", "param MiB", common.mebibytes),
        Column("out_error", "out err", lambda v: f"{v:.1e}"),
        Column("grad_error", "grad err", lambda v: f"{v:.1e}"),
        Column("grad_error_f64", "grad err f64", lambda v: f"{v:.1e}"),
    ]
    return columns + [Column("error", "failure", align="<")] if failures else columns


def _summary_columns() -> list[Column]:
    return [
        Column("net", "net", align="<"),
        Column("variant", "variant", align="<"),
        Column("depths", "depths"),
        Column("peak_low_bytes", "peak MiB (low)", common.mebibytes),
        Column("peak_high_bytes", "peak MiB (high)", common.mebibytes),
        Column("flatness", "peak high/low", common.times),
        Column("saved_flatness", "saved high/low", common.times),
        Column("worst_time_ratio", "worst vs autograd", common.times),
        Column("worst_vs_outside", "worst vs momentumnet", common.times),
    ]


# ---------------------------------------------------------------------------------------------
# The family's interface


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The momentum family's options."""
    parser.add_argument(
        "--depths",
        type=int,
        nargs="+",
        default=None,
        help=f"network depths (default {' '.join(map(str, DEFAULT_DEPTHS))}; "
        f"{' '.join(map(str, QUICK_DEPTHS))} with --quick)",
    )
    parser.add_argument("--nets", nargs="+", choices=NETS, default=list(NETS))
    parser.add_argument(
        "--variants",
        nargs="+",
        choices=VARIANTS,
        default=list(VARIANTS),
        help="memory strategies to compare (momentumnet is left out when not installed)",
    )
    parser.add_argument("--gamma", type=float, default=0.9, help="momentum (default 0.9)")
    parser.add_argument("--seed", type=int, default=0, help="parameter and input seed")


def _options(args: argparse.Namespace):
    device = common.resolve_device(args.device)
    depths = list(args.depths or (QUICK_DEPTHS if args.quick else DEFAULT_DEPTHS))
    if any(depth < 1 for depth in depths):
        raise ValueError(f"depths must be positive, got {depths}")
    min_run_time = args.min_run_time
    if min_run_time is None:
        min_run_time = 0.02 if args.quick else 1.0
    if min_run_time <= 0:
        raise ValueError(f"--min-run-time must be positive, got {min_run_time}")
    return device, sorted(set(depths)), min_run_time


def collect(args: argparse.Namespace, progress: Callable[[str], None]) -> common.Report:
    """Measure every (net, depth, variant) asked for and return the report.

    Args:
        args: options from :func:`add_arguments` plus the common ones.
        progress: receives one line per phase of each case.

    Returns:
        The report: one row per case, with time (``time_s``, median seconds per step),
        ``saved_bytes`` and ``peak_bytes`` above parameters and gradients, ``param_bytes``,
        the relative ``out_error`` and ``grad_error`` against plain autograd, ratios to plain
        autograd, or ``error`` when the variant failed; a summary per net and variant with the
        memory flatness peak(deepest) / peak(shallowest); notes on the targets.

    Raises:
        ValueError: bad option values.
    """
    device, depths, min_run_time = _options(args)
    env = common.environment(device)
    variants = list(dict.fromkeys(args.variants))
    notes = []
    if OUTSIDE in variants and not momentumnet_available():
        variants.remove(OUTSIDE)
        notes.append("momentumnet is not installed: its variant was left out")

    rows: list[dict] = []
    env["nets"] = {}
    for name in dict.fromkeys(args.nets):
        spec = net_spec(name, args.quick)
        env["nets"][name] = spec.description
        for depth in depths:
            progress(f"{name} depth {depth}: plain autograd reference")
            case = _prepare_depth(spec, depth, args.gamma, args.seed, device)
            rows += _measure_depth(case, variants, args.gamma, device, min_run_time, progress)
            del case
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()

    _add_ratios(rows)
    summary = _summarise(rows)
    env.update(gamma=args.gamma, min_run_time=min_run_time, dtype="float32")
    notes = _net_notes(env["nets"]) + notes + _target_notes(summary)
    return common.Report(
        family="momentum",
        columns=_columns(any("error" in row for row in rows)),
        rows=rows,
        summary_title="memory flatness in depth: peak MiB at the deepest over the shallowest",
        summary_columns=_summary_columns(),
        summary=summary,
        env=env,
        notes=notes,
    )


def _net_notes(nets: dict[str, str]) -> list[str]:
    return [
        "nets: " + "; ".join(f"{name} ({description})" for name, description in nets.items()),
        "time: median per forward+backward step; saved: peak bytes autograd held; peak: peak "
        "bytes allocated in the step above parameters and gradients; err: max relative "
        "difference from plain autograd, per output or gradient tensor; err f64: the same "
        "against the network run in float64",
    ]
