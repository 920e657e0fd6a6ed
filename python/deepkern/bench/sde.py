"""Euler-Maruyama microbenchmark: paths per second of the fused kernel against the plain PyTorch
loop a user would write and against ``torchsde.sdeint`` (Euler, additive noise), and the rate
of the kernel's normal generator alone.

Every case first checks that the kernel agrees with the plain loop run on the kernel's own
normals, then times the three implementations, interleaved. Memory is the peak allocation of
one call, which for the kernel is the output alone whatever the step count.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable

import torch

from deepkern.bench import common
from deepkern.bench.memory import measure_step
from deepkern.ops import sde

HELP = "Euler-Maruyama paths: fused kernel against the plain loop and torchsde"

_DEFAULT_CASES = [
    # (dim, paths, steps, drift)
    (10, 100_000, 100, "zero"),
    (10, 100_000, 100, "linear"),
    (10, 100_000, 100, "mlp"),
    (1, 100_000, 100, "zero"),
    (100, 10_000, 100, "linear"),
    (10, 10_000, 1000, "linear"),
]
_QUICK_CASES = [(4, 2000, 20, "zero"), (4, 2000, 20, "linear"), (4, 1000, 20, "mlp")]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--cases",
        nargs="+",
        default=None,
        metavar="D:PATHS:STEPS:DRIFT",
        help="cases to run, e.g. 10:100000:100:linear (drift zero, linear or mlp)",
    )
    parser.add_argument("--no-torchsde", action="store_true", help="skip torchsde")


def _parse_case(text: str) -> tuple[int, int, int, str]:
    try:
        dim, paths, steps, drift = text.split(":")
        case = int(dim), int(paths), int(steps), drift
    except ValueError as error:
        raise ValueError(f"--cases entries look like 10:100000:100:linear, got {text!r}") from error
    if drift not in ("zero", "linear", "mlp") or min(case[:3]) < 1:
        raise ValueError(f"bad case {text!r}: positive sizes, drift zero, linear or mlp")
    return case


def _drift(kind: str, dim: int, device) -> sde.Drift:
    g = torch.Generator().manual_seed(0)
    if kind == "zero":
        return sde.Drift.zero()
    if kind == "linear":
        A = -torch.eye(dim) + 0.1 * torch.randn(dim, dim, generator=g) / math.sqrt(dim)
        return sde.Drift.linear(A.to(device), torch.zeros(dim, device=device))
    hidden = 32
    W1 = torch.randn(hidden, dim, generator=g) / math.sqrt(dim)
    W2 = torch.randn(dim, hidden, generator=g) / math.sqrt(hidden)
    return sde.Drift.mlp(
        W1.to(device),
        torch.zeros(hidden, device=device),
        W2.to(device),
        torch.zeros(dim, device=device),
        "tanh",
    )


def _torchsde_runner(x0, sigma, drift, h, steps) -> Callable[[], object] | None:
    try:
        import torchsde
    except ImportError:
        return None

    class _Additive(torch.nn.Module):
        noise_type, sde_type = "diagonal", "ito"

        def f(self, t, y):
            return sde.drift_value(y, drift.kind, drift.activation, drift.parameters())

        def g(self, t, y):
            return sigma.expand_as(y)

    times = torch.tensor([0.0, h * steps], device=x0.device)
    model = _Additive()
    return lambda: torchsde.sdeint(model, x0, times, method="euler", dt=h)


def _calls(x0, sigma, drift, h, steps) -> dict[str, Callable[[], object]]:
    return {
        "ours": lambda: sde.simulate(x0, sigma, drift, h=h, steps=steps, seed=1),
        "reference": lambda: sde.plain_loop_simulate(x0, sigma, drift, h=h, steps=steps),
    }


def _check_agreement(x0, sigma, drift, h, steps) -> None:
    few = x0[:64]
    got = sde.simulate(few, sigma, drift, h=h, steps=min(steps, 50), seed=5)
    want = sde.reference_simulate(few, sigma, drift, h=h, steps=min(steps, 50), seed=5)
    error = float((got - want).abs().max() / want.abs().max().clamp(min=1e-30))
    if not error < 1e-4:
        raise common.AgreementError(f"kernel differs from the plain loop by {error:.2e}")


def collect(args: argparse.Namespace, progress: Callable[[str], None]) -> common.Report:
    device = common.resolve_device(args.device)
    cases = [_parse_case(c) for c in args.cases] if args.cases else None
    cases = cases or (_QUICK_CASES if args.quick else _DEFAULT_CASES)
    min_run_time = args.min_run_time or (0.02 if args.quick else 1.0)
    env = common.environment(device)
    h = 0.01
    rows = []

    for dim, paths, steps, kind in cases:
        name = f"d={dim} paths={paths} steps={steps} {kind}"
        progress(name)
        x0 = torch.zeros(paths, dim, device=device)
        sigma = torch.tensor(0.5, device=device)
        drift = _drift(kind, dim, device)
        row = {"case": name}
        try:
            _check_agreement(x0, sigma, drift, h, steps)
            calls = _calls(x0, sigma, drift, h, steps)
            outside = None if args.no_torchsde else _torchsde_runner(x0, sigma, drift, h, steps)
            if outside is not None:
                calls["outside"] = outside
            timings = common.time_calls(calls, min_run_time=min_run_time)
            ours_s = timings["ours"].median
            row.update(
                common.comparison_row(
                    name,
                    ours_s,
                    timings["reference"].median,
                    timings["outside"].median if "outside" in timings else None,
                )
            )
            row["path_steps_per_s"] = paths * steps / ours_s
            row["normals_per_s"] = paths * steps * dim / ours_s
            if device.type == "cuda":
                # Bytes that must cross memory: the start points in, the terminal states out.
                moved = 2 * x0.numel() * x0.element_size()
                row["bandwidth_fraction"] = moved / ours_s / _copy_bandwidth(device)
            row["peak_bytes"] = measure_step(calls["ours"], device).peak_bytes
        except Exception as error:  # a failed case is reported in its row, not hidden
            row["error"] = f"{type(error).__name__}: {error}"
        rows.append(row)

    summary = _generator_rates(device, min_run_time, args.quick)
    for row in rows:
        if "normals_per_s" in row:
            row["generator_fraction"] = row["normals_per_s"] / summary["kernel_normals_per_s"]
    columns = common.comparison_columns("torchsde") + [
        common.Column("path_steps_per_s", "path-steps/s", lambda v: f"{v / 1e6:.1f} M"),
        common.Column("normals_per_s", "normals/s", lambda v: f"{v / 1e6:.0f} M"),
        common.Column("generator_fraction", "of generator", lambda v: f"{v:.2f}"),
        common.Column("peak_bytes", "peak MiB", common.mebibytes),
    ]
    if device.type == "cuda":
        columns.append(common.Column("bandwidth_fraction", "of copy bw", lambda v: f"{v:.3f}"))
    return common.Report(
        family="sde",
        columns=columns,
        rows=rows,
        summary_title="normal generation alone (normals per second)",
        summary_columns=[
            common.Column("kernel_normals_per_s", "sde.normals", lambda v: f"{v / 1e6:.1f} M"),
            common.Column("randn_per_s", "torch.randn", lambda v: f"{v / 1e6:.1f} M"),
            common.Column("ratio", "randn/normals", common.times),
        ],
        summary=[summary],
        env=env,
        notes=[
            "ref/ours and torchsde/ours above 1 mean the fused kernel is faster; "
            "the plain loop draws torch.randn each step, torchsde runs sdeint(method='euler')",
            "normals/s counts the normals the simulation consumed; 'of generator' divides it by "
            "the rate of sde.normals alone (which also writes its output), the bound the "
            "generator puts on a simulation",
            "on CUDA, 'of copy bw' is the memory traffic a simulation cannot avoid (start points "
            "in, terminal states out) over the bandwidth of a device-to-device copy",
        ],
    )


def _copy_bandwidth(device) -> float:
    """Bytes per second (read plus write) of a 1 GiB device-to-device copy."""
    source = torch.empty(2**28, dtype=torch.float32, device=device)
    target = torch.empty_like(source)
    timing = common.time_calls({"copy": lambda: target.copy_(source)}, min_run_time=0.2)
    return 2 * source.numel() * source.element_size() / timing["copy"].median


def _generator_rates(device, min_run_time: float, quick: bool) -> dict:
    like = torch.zeros(2000 if quick else 100_000, 10, device=device)
    steps = 10
    timings = common.time_calls(
        {
            "kernel": lambda: sde.normals(like, steps, seed=1),
            "randn": lambda: torch.randn(steps, *like.shape, device=device),
        },
        min_run_time=min_run_time,
    )
    count = steps * like.numel()
    kernel_rate = count / timings["kernel"].median
    randn_rate = count / timings["randn"].median
    return {
        "kernel_normals_per_s": kernel_rate,
        "randn_per_s": randn_rate,
        "ratio": randn_rate / kernel_rate,
    }
