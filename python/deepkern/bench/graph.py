"""Segment reduction microbenchmark: ``deepkern.ops.graph.segment_reduce`` (sum, mean, max),
forward alone and forward plus backward, against what PyTorch offers for the same job:
``index_add`` (sum and mean), ``scatter_reduce`` and ``torch.segment_reduce``, and torch_scatter's
``segment_csr`` when it is installed.

Two workloads: the readout of a batch of small graphs (one segment per graph over its node
features) and the neighbour aggregation of one large sparse graph (one segment per node over
the messages of its incoming edges), the latter also from node features: ``gather_reduce``
fused against ``x[col]`` followed by each other variant. Segments are never empty here, so
that every library's convention for empty segments gives the same answer. Every variant's
output and gradient are checked against ours before anything is timed.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch

from deepkern.bench import common
from deepkern.ops import graph

HELP = "segment sum, mean and max: the CSR kernels against index_add, scatter_reduce and others"

REDUCTIONS = ("sum", "mean", "max")
VARIANTS = ("ours", "index_add", "scatter_reduce", "torch.segment_reduce", "torch_scatter")

# (name, segments, smallest segment, largest segment, features, gather): with gather set, the
# rows are the messages x[col[e]] of the edges of a graph with one node per segment, which
# gather_reduce reads from x directly and the others gather first (x[col], then reduce).
_DEFAULT_CASES = [
    ("1e3 graphs of 10-100 nodes", 1_000, 10, 100, 16, False),
    ("1e4 graphs of 10-100 nodes", 10_000, 10, 100, 16, False),
    ("1e5 graphs of 10 nodes", 100_000, 10, 10, 16, False),
    ("sparse graph 1e5 nodes 1e6 edges", 100_000, 1, 19, 16, False),
    ("gather: same graph, x[col] fused", 100_000, 1, 19, 16, True),
]
_QUICK_CASES = [
    ("50 graphs of 5-10 nodes", 50, 5, 10, 4, False),
    ("sparse graph 500 nodes", 500, 1, 9, 4, False),
    ("gather: same graph, x[col] fused", 500, 1, 9, 4, True),
]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--reductions",
        nargs="+",
        default=list(REDUCTIONS),
        choices=REDUCTIONS,
        help="reductions to run (default: all)",
    )
    parser.add_argument(
        "--no-backward", action="store_true", help="time the forward alone, not forward+backward"
    )


def torch_scatter_available() -> bool:
    try:
        import torch_scatter  # noqa: F401
    except ImportError:
        return False
    return True


def _variants(values: torch.Tensor, rowptr: torch.Tensor, reduce: str) -> dict[str, Callable]:
    """name -> function of the values computing the reduction; the ones that support it."""
    counts = rowptr.diff()
    segments = counts.numel()
    index = torch.repeat_interleave(torch.arange(segments, device=values.device), counts)
    shape = (segments, *values.shape[1:])
    wide_index = index.view(-1, *([1] * (values.dim() - 1))).expand_as(values)
    divisor = counts.clamp(min=1).to(values.dtype).view(-1, *([1] * (values.dim() - 1)))

    variants: dict[str, Callable] = {"ours": lambda v: graph.segment_reduce(v, rowptr, reduce)}
    if reduce in ("sum", "mean"):

        def index_add(v):
            out = v.new_zeros(shape).index_add(0, index, v)
            return out if reduce == "sum" else out / divisor

        variants["index_add"] = index_add
    scatter_name = {"sum": "sum", "mean": "mean", "max": "amax"}[reduce]
    variants["scatter_reduce"] = lambda v: v.new_zeros(shape).scatter_reduce(
        0, wide_index, v, scatter_name, include_self=False
    )
    variants["torch.segment_reduce"] = lambda v: torch.segment_reduce(
        v, reduce, lengths=counts, unsafe=True
    )
    if torch_scatter_available():
        import torch_scatter

        variants["torch_scatter"] = lambda v: torch_scatter.segment_csr(v, rowptr, reduce=reduce)
    return variants


def _gathered(variants: dict[str, Callable], rowptr, col, reduce) -> dict[str, Callable]:
    """The variants on x: ours fused, the others after materialising the messages x[col]."""
    fused = {"ours": lambda v: graph.gather_reduce(v, rowptr, col, None, reduce)}
    others = {
        k: (lambda v, fn=fn: fn(v.index_select(0, col)))
        for k, fn in variants.items()
        if k != "ours"
    }
    return fused | others


def _distinct_values(rows: int, features: int, generator) -> torch.Tensor:
    """Shuffled multiples of 1 / (rows * features): no ties, which the libraries break
    differently in the gradient of max (float32 normals tie a few times among 10^7 values).
    Exact in float32 up to 2^24 values, which every case stays under."""
    count = rows * features
    if count > 2**24:
        raise ValueError(f"a case of {count} values exceeds the 2^24 distinct float32 values")
    return torch.randperm(count, generator=generator).view(rows, features).float() / count


def _make_case(segments, smallest, largest, features, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    counts = torch.randint(smallest, largest + 1, (segments,), generator=g)
    rowptr = torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)])
    values = _distinct_values(int(rowptr[-1]), features, g)
    # Distinct sources within each row: a node gathered twice would tie with itself in max,
    # where the libraries split the gradient differently.
    first = torch.repeat_interleave(torch.randint(0, segments, (segments,), generator=g), counts)
    step = torch.arange(int(rowptr[-1])) - torch.repeat_interleave(rowptr[:-1], counts)
    col = torch.randperm(segments, generator=g)[(first + step) % segments]
    x = _distinct_values(segments, features, g)
    return values.to(device), rowptr.to(device), col.to(device), x.to(device)


def _with_backward(fn: Callable, values: torch.Tensor, grad_out: torch.Tensor) -> Callable:
    leaf = values.detach().requires_grad_()

    def run():
        out = fn(leaf)
        return torch.autograd.grad(out, leaf, grad_out)[0]

    return run


def _check_agreement(variants, values, grad_out) -> None:
    leaf = values.detach().requires_grad_()
    ours = variants["ours"](leaf)
    (ours_grad,) = torch.autograd.grad(ours, leaf, grad_out)
    for name, fn in variants.items():
        leaf = values.detach().requires_grad_()
        out = fn(leaf)
        (grad,) = torch.autograd.grad(out, leaf, grad_out)
        for what, got, want in (("output", out, ours), ("gradient", grad, ours_grad)):
            if not torch.allclose(got, want, rtol=1e-4, atol=1e-4):
                error = float((got - want).detach().abs().max())
                raise common.AgreementError(f"{name}'s {what} differs from ours by {error:.2e}")


def collect(args: argparse.Namespace, progress: Callable[[str], None]) -> common.Report:
    device = common.resolve_device(args.device)
    cases = _QUICK_CASES if args.quick else _DEFAULT_CASES
    min_run_time = args.min_run_time or (0.02 if args.quick else 1.0)
    modes = ["forward"] if args.no_backward else ["forward", "forward+backward"]
    env = common.environment(device)
    rows = []

    for name, segments, smallest, largest, features, gather in cases:
        values, rowptr, col, x = _make_case(segments, smallest, largest, features, device)
        grad_out = torch.randn(segments, features, device=device)
        # The tensor the variants take and differentiate: the rows, or x to gather them from.
        inputs = x if gather else values
        for reduce in args.reductions:
            variants = _variants(values, rowptr, reduce)
            if gather:
                variants = _gathered(variants, rowptr, col, reduce)
            try:
                _check_agreement(variants, inputs, grad_out)
            except Exception as error:  # a failed case is reported in its row, not hidden
                for mode in modes:
                    rows.append({"case": name, "reduce": reduce, "mode": mode})
                    rows[-1]["error"] = f"{type(error).__name__}: {error}"
                continue
            for mode in modes:
                progress(f"{name}: {reduce} {mode}")
                row = {"case": name, "reduce": reduce, "mode": mode, "rows": values.shape[0]}
                if mode == "forward":
                    calls = {k: (lambda fn=fn, v=inputs: fn(v)) for k, fn in variants.items()}
                else:
                    calls = {k: _with_backward(fn, inputs, grad_out) for k, fn in variants.items()}
                timings = common.time_calls(calls, min_run_time=min_run_time)
                for variant, timing in timings.items():
                    row[f"{variant}_s"] = timing.median
                others = {k: t.median for k, t in timings.items() if k != "ours"}
                best = min(others, key=others.get)
                row["best_other"] = best
                row["best_ratio"] = common.ratio(others[best], timings["ours"].median)
                rows.append(row)

    columns = [
        common.Column("case", "case", align="<"),
        common.Column("reduce", "reduce", align="<"),
        common.Column("mode", "mode", align="<"),
    ]
    columns += [common.Column(f"{v}_s", v, common.seconds) for v in VARIANTS]
    columns += [
        common.Column("best_other", "best other", align="<"),
        common.Column("best_ratio", "best/ours", common.times),
    ]
    met = [r for r in rows if r.get("best_ratio") is not None and r["mode"] != "forward"]
    slower = [r for r in met if r["best_ratio"] < 1.0]
    notes = [
        "times are medians per call; best/ours above 1 means ours is faster than every other "
        "variant on that row",
        f"target, forward+backward at least as fast as the best other: met on "
        f"{len(met) - len(slower)} of {len(met)} rows",
    ]
    if not torch_scatter_available():
        notes.append("torch_scatter is not installed: its column is empty")
    return common.Report(family="graph", columns=columns, rows=rows, env=env, notes=notes)
