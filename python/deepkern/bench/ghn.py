"""GHN-2 sweep microbenchmark: the level-synchronous sweep of the gated graph network (all
nodes of a level, across the graphs of a meta-batch, in one GRU call, messages gathered with
``gather_reduce``) against the node-by-node sweep (one GRU call per node), forward alone and
forward plus backward, on meta-batches of 1 and 8 generated architectures and on ResNet-50.

What is timed is the node embedding and the sweeps (``embed`` and ``propagate``), the part the
two schedules differ in; the decoders are shared. Both schedules' node states and gradients are
checked to agree before anything is timed. Peak memory of a forward-and-backward step comes
from :mod:`deepkern.bench.memory`.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch

from deepkern.bench import common, memory
from deepkern.models import ghn

HELP = "GHN-2 gated graph network: level-synchronous sweep against node-by-node"

# (case, meta-batch size or None for ResNet-50)
_DEFAULT_CASES = [("1 generated net", 1), ("8 generated nets", 8), ("ResNet-50", None)]
# Above this many edges the node-by-node sweep's peak memory is not measured on the CPU.
_PROFILE_EDGES = 50_000

_QUICK_CASES = [("1 generated net", 1), ("2 generated nets", 2)]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--hidden", type=int, default=32, help="GHN state size (default 32)")
    parser.add_argument("--seed", type=int, default=0, help="architectures' seed (default 0)")
    parser.add_argument(
        "--no-backward", action="store_true", help="time the forward alone, not forward+backward"
    )


def _graphs(count: int | None, seed: int) -> list:
    """The meta-batch's graphs: ``count`` generated architectures (train split; the width
    does not change a graph, only its shapes) or, for None, ResNet-50."""
    if count is None:
        from deepkern.data.compgraph import graph_of
        from deepkern.models.resnet import resnet50

        return [graph_of(resnet50(num_classes=10, in_channels=3), torch.randn(2, 3, 32, 32))]
    return ghn._architecture_pool("train", count, seed, image_size=8, channels=8)[2]


def _states(model: ghn.GHN2, plan: ghn.SweepPlan, sweep: str) -> torch.Tensor:
    return model.propagate(plan, model.embed(plan), sweep)


def _check_agreement(model: ghn.GHN2, plan: ghn.SweepPlan, weights: torch.Tensor) -> None:
    outputs = {}
    for sweep in ghn.SWEEPS:
        model.zero_grad(set_to_none=True)
        states = _states(model, plan, sweep)
        (states * weights).sum().backward()
        grads = [p.grad.clone() if p.grad is not None else None for p in model.parameters()]
        outputs[sweep] = (states.detach(), grads)
    model.zero_grad(set_to_none=True)
    (level, level_grads), (node, node_grads) = outputs["level"], outputs["node"]
    if not torch.allclose(level, node, rtol=1e-4, atol=1e-5):
        error = float((level - node).abs().max())
        raise common.AgreementError(f"node states differ by up to {error:.3g}")
    for a, b in zip(level_grads, node_grads):
        if a is None or b is None:
            continue
        if not torch.allclose(a, b, rtol=1e-3, atol=1e-4):
            raise common.AgreementError(
                f"gradients differ by up to {float((a - b).abs().max()):.3g}"
            )


def _call(model, plan, sweep: str, backward: bool, weights) -> Callable[[], object]:
    if not backward:

        def forward():
            with torch.no_grad():
                return _states(model, plan, sweep)

        return forward

    def step():
        (_states(model, plan, sweep) * weights).sum().backward()

    return step


def collect(args: argparse.Namespace, progress: Callable[[str], None]) -> common.Report:
    device = common.resolve_device(args.device)
    if args.hidden < 4 or args.hidden % 4:
        raise ValueError(f"--hidden must be a positive multiple of 4, got {args.hidden}")
    cases = _QUICK_CASES if args.quick else _DEFAULT_CASES
    min_run_time = args.min_run_time or (0.02 if args.quick else 1.0)
    modes = ["forward"] if args.no_backward else ["forward", "forward+backward"]
    env = common.environment(device)
    torch.manual_seed(args.seed)
    model = ghn.GHN2(hidden=args.hidden).to(device)
    rows = []

    for name, count in cases:
        progress(f"{name}: building graphs")
        graphs = _graphs(count, args.seed)
        plan = ghn.plan_sweep(graphs)
        nodes, levels = plan.num_nodes, len(plan.forward)
        weights = torch.randn(nodes, args.hidden, generator=torch.Generator().manual_seed(1))
        weights = weights.to(device)
        shape = {"case": name, "nodes": nodes, "edges": int(plan.sources.numel()), "levels": levels}
        try:
            _check_agreement(model, plan, weights)
        except Exception as error:  # a failed case is reported in its row, not hidden
            for mode in modes:
                rows.append({**shape, "mode": mode, "error": f"{type(error).__name__}: {error}"})
            continue
        for mode in modes:
            progress(f"{name}: {mode}")
            backward = mode != "forward"
            calls = {s: _call(model, plan, s, backward, weights) for s in ghn.SWEEPS}
            timings = common.time_calls(calls, min_run_time=min_run_time)
            row = {**shape, "mode": mode}
            row["level_s"], row["node_s"] = timings["level"].median, timings["node"].median
            row["ratio"] = common.ratio(row["node_s"], row["level_s"])
            if backward:
                params = list(model.parameters())
                for sweep, call in calls.items():
                    # The CPU profiler keeps an event per operation: the node-by-node sweep of
                    # a large meta-batch runs millions and would need tens of GiB to record.
                    if sweep == "node" and device.type == "cpu" and shape["edges"] > _PROFILE_EDGES:
                        continue
                    model.zero_grad(set_to_none=True)
                    used = memory.measure_step(call, device, exclude=params)
                    row[f"{sweep}_peak_bytes"] = used.peak_bytes
                model.zero_grad(set_to_none=True)
            rows.append(row)

    columns = [
        common.Column("case", "case", align="<"),
        common.Column("nodes", "nodes"),
        common.Column("edges", "edges"),
        common.Column("levels", "levels"),
        common.Column("mode", "mode", align="<"),
        common.Column("level_s", "level sweep", common.seconds),
        common.Column("node_s", "node by node", common.seconds),
        common.Column("ratio", "node/level", common.times),
        common.Column("level_peak_bytes", "level MiB", common.mebibytes),
        common.Column("node_peak_bytes", "node MiB", common.mebibytes),
    ]
    notes = [
        "level sweep: all nodes of a level across the meta-batch in one GRU call; node by node: "
        "one GRU call per node. Peak memory of a forward+backward step (allocations minus frees); "
        f"on the CPU not measured for the node-by-node sweep above {_PROFILE_EDGES} edges.",
    ]
    eight = [r for r in rows if r["case"].startswith("8 ") and r.get("ratio") is not None]
    for row in eight:
        verdict = "met" if row["ratio"] >= 10 else "missed"
        notes.append(
            f"target >= 10x for meta-batch 8 ({row['mode']}): {row['ratio']:.1f}x, {verdict}"
        )
    return common.Report(family="ghn", columns=columns, rows=rows, env=env, notes=notes)
