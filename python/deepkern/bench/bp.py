"""Loopy belief propagation microbenchmark: the batched kernel against the plain-PyTorch BP a
user would write (``graph.reference_loopy_bp``) on batches of small binary MRFs.

Graphs are square grids or random graphs (about two undirected edges per node), with float32
log-potentials drawn from N(0, 0.5^2). Every case first checks that the kernel agrees with the
reference on the first graphs of the batch (marginals, messages, iteration counts), then times
both, interleaved. The reference updates every message of the batch until the slowest graph
converges; the kernel lets each graph stop on its own, so part of the speed-up is that.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable

import torch

from deepkern.bench import common
from deepkern.ops import graph

HELP = "loopy belief propagation: batched kernel against plain PyTorch"

# Ten times the plain version on one CPU thread.
TARGET_RATIO = 10.0
TOL = 1e-5
MAX_ITERS = 100

_DEFAULT_CASES = [
    # (kind, graphs, nodes, mode)
    ("grid", 10_000, 9, "sum"),
    ("grid", 10_000, 9, "max"),
    ("grid", 1_000, 100, "sum"),
    ("grid", 1_000, 100, "max"),
    ("random", 1_000, 50, "sum"),
    ("random", 1_000, 50, "max"),
    ("random", 100, 100, "sum"),
]
_QUICK_CASES = [("grid", 40, 9, "sum"), ("grid", 20, 16, "max"), ("random", 20, 12, "sum")]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--cases",
        nargs="+",
        default=None,
        metavar="KIND:GRAPHS:NODES:MODE",
        help="cases to run, e.g. grid:1000:100:sum (kind grid or random; mode sum or max; "
        "a grid has the square number of nodes at or below NODES)",
    )


def _parse_case(text: str) -> tuple[str, int, int, str]:
    try:
        kind, graphs, nodes, mode = text.split(":")
        case = kind, int(graphs), int(nodes), mode
    except ValueError as error:
        raise ValueError(f"--cases entries look like grid:1000:100:sum, got {text!r}") from error
    if kind not in ("grid", "random") or mode not in ("sum", "max") or min(case[1:3]) < 2:
        raise ValueError(f"bad case {text!r}: kind grid or random, sizes >= 2, mode sum or max")
    return case


def _grid_edges(nodes: int) -> torch.Tensor:
    side = max(2, math.isqrt(nodes))
    index = torch.arange(side * side).reshape(side, side)
    across = torch.stack([index[:, :-1].flatten(), index[:, 1:].flatten()], 1)
    down = torch.stack([index[:-1, :].flatten(), index[1:, :].flatten()], 1)
    return torch.cat([across, down])


def make_batch(kind: str, graphs: int, nodes: int, generator: torch.Generator, device) -> tuple:
    """The op's arguments for ``graphs`` binary MRFs of one kind, float32, in graph order."""
    if kind == "grid":
        local = _grid_edges(nodes)
        nodes = int(local.max()) + 1
        count = torch.full((graphs,), local.shape[0])
        pairs = (
            local.repeat(graphs, 1)
            + (torch.arange(graphs) * nodes).repeat_interleave(local.shape[0])[:, None]
        )
    else:
        # About 2 * nodes distinct undirected edges per graph, sampled with replacement and
        # deduplicated; no self-loops.
        draws = 2 * nodes
        u = torch.randint(0, nodes, (graphs, draws), generator=generator)
        v = (u + torch.randint(1, nodes, (graphs, draws), generator=generator)) % nodes
        low, high = torch.minimum(u, v), torch.maximum(u, v)
        key = (torch.arange(graphs)[:, None] * nodes + low) * nodes + high
        key = torch.unique(key.flatten())
        g, rest = key // (nodes * nodes), key % (nodes * nodes)
        pairs = torch.stack([rest // nodes, rest % nodes], 1) + (g * nodes)[:, None]
        count = torch.bincount(g, minlength=graphs)
    undirected = pairs.shape[0]
    src = pairs.flatten()
    dst = pairs.flip(1).flatten()
    reverse = torch.arange(2 * undirected) ^ 1
    unary = 0.5 * torch.randn(graphs * nodes, 2, generator=generator)
    half = 0.5 * torch.randn(undirected, 2, 2, generator=generator)
    pairwise = torch.stack([half, half.transpose(1, 2)], 1).reshape(-1, 2, 2)
    node_graph = torch.arange(graphs).repeat_interleave(nodes)
    tensors = (unary, pairwise, src, dst, reverse, node_graph)
    return (*(t.to(device) for t in tensors), graphs), 2 * count


def _first_graphs(args: tuple, keep: int) -> tuple:
    """The same batch cut down to its first ``keep`` graphs (nodes and edges in graph order)."""
    unary, pairwise, src, dst, reverse, node_graph, _ = args
    nodes = int((node_graph < keep).sum())
    edges = int((node_graph[dst] < keep).sum())
    return (
        unary[:nodes],
        pairwise[:edges],
        src[:edges],
        dst[:edges],
        reverse[:edges],
        (node_graph[:nodes]),
        keep,
    )


def _check_agreement(args: tuple, mode: str) -> None:
    few = _first_graphs(args, min(args[-1], 64))
    got = graph.loopy_bp(*few, mode=mode, tol=TOL, max_iters=MAX_ITERS)
    want = graph.reference_loopy_bp(*few, mode=mode, tol=TOL, max_iters=MAX_ITERS)
    error = max(float((a - b).abs().max()) if a.numel() else 0.0 for a, b in zip(got[:2], want[:2]))
    if not error < 1e-4:
        raise common.AgreementError(f"kernel differs from the reference by {error:.2e}")
    # A graph whose last change lands within rounding of tol may stop one iteration apart.
    if not int((got.iterations - want.iterations).abs().max()) <= 1:
        raise common.AgreementError("kernel and reference iteration counts differ by over 1")


def collect(args: argparse.Namespace, progress: Callable[[str], None]) -> common.Report:
    device = common.resolve_device(args.device)
    cases = [_parse_case(c) for c in args.cases] if args.cases else None
    cases = cases or (_QUICK_CASES if args.quick else _DEFAULT_CASES)
    min_run_time = args.min_run_time or (0.02 if args.quick else 1.0)
    env = common.environment(device)
    generator = torch.Generator().manual_seed(0)
    rows = []

    for kind, graphs, nodes, mode in cases:
        name = f"{graphs} x {kind} {nodes} {mode}"
        progress(name)
        row = {"case": name}
        try:
            batch, edges_per_graph = make_batch(kind, graphs, nodes, generator, device)
            _check_agreement(batch, mode)
            options = dict(mode=mode, tol=TOL, max_iters=MAX_ITERS)
            calls = {
                "ours": lambda b=batch, o=options: graph.loopy_bp(*b, **o),
                "reference": lambda b=batch, o=options: graph.reference_loopy_bp(*b, **o),
            }
            timings = common.time_calls(calls, min_run_time=min_run_time)
            ours_s = timings["ours"].median
            row.update(common.comparison_row(name, ours_s, timings["reference"].median))
            iterations = calls["ours"]().iterations.cpu()
            updates = float((iterations * edges_per_graph).sum())
            row["edges"] = int(edges_per_graph.sum())
            row["mean_iterations"] = float(iterations.double().mean())
            row["max_iterations"] = int(iterations.max())
            row["updates_per_s"] = updates / ours_s
        except Exception as error:  # a failed case is reported in its row, not hidden
            row["error"] = f"{type(error).__name__}: {error}"
        rows.append(row)

    ratios = [row["reference_ratio"] for row in rows if row.get("reference_ratio")]
    met = bool(ratios) and min(ratios) >= TARGET_RATIO
    columns = common.comparison_columns() + [
        common.Column("edges", "edges"),
        common.Column("mean_iterations", "mean its", lambda v: f"{v:.1f}"),
        common.Column("max_iterations", "max its"),
        common.Column("updates_per_s", "msg updates/s", lambda v: f"{v / 1e6:.1f} M"),
    ]
    if any(row.get("error") for row in rows):
        columns.append(common.Column("error", "error", align="<"))
    return common.Report(
        family="bp",
        columns=columns,
        rows=rows,
        env=env,
        notes=[
            "ref/ours above 1 means the kernel is faster; float32, 2 states, "
            f"tol {TOL:g}, at most {MAX_ITERS} iterations",
            "the reference updates every message until the slowest graph converges (max its); "
            "the kernel stops each graph on its own (mean its); msg updates/s counts the "
            "kernel's directed-edge updates",
            f"target ref/ours >= {TARGET_RATIO:g} on every case: "
            + ("met" if met else "missed")
            + (f" (lowest {min(ratios):.1f}x)" if ratios else ""),
        ],
    )
