"""Vehicle-routing benchmark: time per instance of the learned policies against OR-Tools and
PyVRP, and training throughput.

For each problem size, the same random instances (Nazari et al.'s distribution) are solved by
a policy (greedy, best of sampled solutions, beam search; batched, so time per instance is
the batch's time over its size), by Clarke-Wright savings, and by OR-Tools and PyVRP with a
time limit equal to the policy's sampling time per instance: the same budget, so the table
reads as the quality each method reaches in that time. Every solution is checked before it
counts. The policy is the one in ``--checkpoint``, or a freshly initialised one (whose lengths
say nothing about quality, only about time). The second table gives training steps in
instances per second.
"""

from __future__ import annotations

import argparse
import importlib.util
import time

import numpy as np

from deepkern.bench import common

HELP = "CVRP: policy inference time against OR-Tools and PyVRP, and training throughput"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--sizes", type=int, nargs="+", default=None, help="customers per instance (10 20 50)"
    )
    parser.add_argument("--instances", type=int, default=None, help="instances per size")
    parser.add_argument(
        "--model",
        choices=("nazari", "attention"),
        default="attention",
        help="policy to build when no --checkpoint is given",
    )
    parser.add_argument("--checkpoint", default=None, help="a trained policy checkpoint")
    parser.add_argument("--samples", type=int, default=16, help="samples per instance")
    parser.add_argument("--width", type=int, default=10, help="beam width")


def _mean_cost(batch, solve_one) -> tuple[float, float]:
    """Mean length and seconds per instance of a one-instance-at-a-time solver."""
    from deepkern.data.routing import distance_matrix, route_cost

    costs, started = [], time.perf_counter()
    for i in range(len(batch)):
        distances = distance_matrix(batch.locs[i].double().numpy(), "EXACT")
        routes = solve_one(distances, batch.demands[i].numpy(), int(batch.capacity[i]))
        costs.append(route_cost(distances, routes))
    return float(np.mean(costs)), (time.perf_counter() - started) / max(1, len(batch))


def collect(args: argparse.Namespace, progress) -> common.Report:
    from deepkern.data.routing import generate_vrp
    from deepkern.models import vrp, vrp_baselines

    device = common.resolve_device(args.device)
    sizes = args.sizes or ([10] if args.quick else [10, 20, 50])
    count = args.instances or (4 if args.quick else 64)
    samples, width = (2, 2) if args.quick else (args.samples, args.width)
    if count < 1 or samples < 1 or width < 1:
        raise ValueError("--instances, --samples and --width must be at least 1")
    if args.checkpoint:
        policy, meta = vrp.load_policy(args.checkpoint, device)
        model = meta["model"]
    else:
        model = args.model
        sizes_of = {"hidden": 16, "layers": 1, "heads": 2} if args.quick else {}
        if model == "nazari":
            sizes_of.pop("layers", None)
            sizes_of.pop("heads", None)
        policy = vrp.build_policy(model, seed=0, **sizes_of).to(device).eval()
    min_run_time = args.min_run_time or (0.02 if args.quick else 1.0)

    rows, notes = [], []
    for size in sizes:
        batch = generate_vrp(size, count, seed=size)
        policy_rows = {}
        for decode in ("greedy", "sample", "beam"):
            progress(f"VRP{size}: {model} {decode}")
            solutions = vrp.solve(policy, batch, decode, samples=samples, width=width)
            timing = common.time_call(
                lambda d=decode, b=batch: vrp.solve(policy, b, d, samples=samples, width=width),
                min_run_time,
            )
            label = {"greedy": "greedy", "sample": f"sample {samples}", "beam": f"beam {width}"}
            policy_rows[decode] = {
                "case": f"VRP{size}",
                "method": f"{model} {label[decode]}",
                "time_s": timing.median / count,
                "length": float(solutions.cost.mean()),
            }
        rows += policy_rows.values()
        budget = max(policy_rows["sample"]["time_s"], 0.01)

        solvers = [("clarke-wright", lambda d, q, c: vrp_baselines.clarke_wright(d, q, c))]
        for name, module, solver in (
            ("or-tools", "ortools", vrp_baselines.solve_ortools),
            ("pyvrp", "pyvrp", vrp_baselines.solve_pyvrp),
        ):
            if importlib.util.find_spec(module) is None:
                notes.append(f"{module} is not installed: its rows are left out")
                continue
            solvers.append(
                (
                    f"{name} ({budget * 1e3:.0f} ms)",
                    lambda d, q, c, s=solver, t=budget: s(d, q, c, t, 1e4),
                )
            )
        for name, solve_one in solvers:
            progress(f"VRP{size}: {name}")
            length, seconds = _mean_cost(batch, solve_one)
            rows.append({"case": f"VRP{size}", "method": name, "time_s": seconds, "length": length})
        best = min(row["length"] for row in rows if row["case"] == f"VRP{size}")
        greedy_time = policy_rows["greedy"]["time_s"]
        for row in rows:
            if row["case"] == f"VRP{size}":
                row["gap"] = 100 * (row["length"] - best) / best
                row["time_ratio"] = common.ratio(row["time_s"], greedy_time)

    summary = []
    for kind in ("nazari", "attention"):
        progress(f"training throughput: {kind}")
        config = vrp.VRPTrainConfig(
            model=kind,
            hidden=16 if args.quick else 128,
            layers=1 if args.quick else 3,
            heads=2 if args.quick else 8,
            num_customers=sizes[0],
            baseline="critic" if kind == "nazari" else "shared",
            shared_samples=2,
            epochs=1,
            steps_per_epoch=1 if args.quick else 5,
            batch_size=8 if args.quick else 128,
            val_size=0,
            device=str(device),
            progress=False,
        )
        trained = vrp.build_policy(kind, seed=0, **config.policy_args())
        metrics = vrp.train(trained, config)
        summary.append(
            {
                "model": kind,
                "case": f"VRP{sizes[0]}",
                "batch": config.batch_size,
                "instances_per_s": metrics["instances_per_second"],
            }
        )
    if not args.checkpoint:
        notes.append("no --checkpoint: the policy is untrained; its lengths show time only")
    notes.append("gap: length above the best method of the size; time ratio: to greedy")
    notes.append("OR-Tools and PyVRP get the policy's sampling time per instance (at least 10 ms)")

    columns = [
        common.Column("case", "case", align="<"),
        common.Column("method", "method", align="<"),
        common.Column("time_s", "time/instance", common.seconds),
        common.Column("time_ratio", "time/greedy", common.times),
        common.Column("length", "mean length", lambda v: f"{v:.3f}"),
        common.Column("gap", "gap %", lambda v: f"{v:.1f}"),
    ]
    summary_columns = [
        common.Column("model", "model", align="<"),
        common.Column("case", "case", align="<"),
        common.Column("batch", "batch"),
        common.Column("instances_per_s", "instances/s", lambda v: f"{v:.0f}"),
    ]
    return common.Report(
        family="vrp",
        columns=columns,
        rows=rows,
        summary_title="training throughput (REINFORCE steps)",
        summary_columns=summary_columns,
        summary=summary,
        env=common.environment(device),
        notes=notes,
    )
