"""Bound computation microbenchmark: the time of one call of
``deepkern.verify.bounds.compute_bounds`` per method (IBP, CROWN, alpha-CROWN and the Lagrangian
dual, the last two with a fixed number of steps), beside the bound it gives.

Two networks from VNN-COMP 2021: ACAS Xu ``ACASXU_run2a_1_1_batch_2000.onnx`` (5 inputs, six
hidden layers of 50 ReLUs, 5 outputs) and ``mnist-net_256x2.onnx`` (784 inputs, two hidden
layers of 256 ReLUs, 10 outputs), read from the verification data folder; where the folder is
absent, random networks of the same shapes stand in and the table says so. Each is bounded on
1 box and on 1000 boxes at once: small boxes around seeded random points of the input domain,
with one row per competing output (ACAS Xu: y_j - y_0, is "clear of conflict" still preferred;
MNIST: y_label - y_j for the predicted label). The bound column is the mean lower bound over
boxes and rows: higher is tighter.

"ours" runs with the package's verify ops; "reference" runs the same methods with the
plain-PyTorch references of those ops swapped in, and must give the same bounds before anything
is timed. auto_LiRPA's IBP, CROWN and alpha-CROWN join when it is importable.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
from collections.abc import Callable, Iterator

import torch
from torch import nn

from deepkern.bench import common
from deepkern.ops import verify as verify_ops

HELP = "bound propagation (IBP, CROWN, alpha) and the Lagrangian dual on ACAS Xu and MNIST nets"

METHODS = ("ibp", "crown", "alpha", "dual")

# name -> (file under the data folder, layer widths of the stand-in, box radius, domain)
_NETWORKS = {
    "acasxu": ("acasxu/ACASXU_run2a_1_1_batch_2000.onnx", [5, 50, 50, 50, 50, 50, 50, 5]),
    "mnist": ("mnistfc/mnist-net_256x2.onnx", [784, 256, 256, 10]),
}
# Input domains and radii of the boxes: ACAS Xu's inputs are normalised to about [-0.5, 0.5];
# MNIST's are pixels in [0, 1], with the radius of its VNN-COMP properties' smaller epsilon.
_BOXES = {"acasxu": (-0.3, 0.3, 0.02), "mnist": (0.0, 1.0, 0.015)}
_QUICK_WIDTHS = {"acasxu": [5, 8, 8, 5], "mnist": [16, 12, 12, 10]}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--networks", nargs="+", default=list(_NETWORKS), choices=list(_NETWORKS))
    parser.add_argument(
        "--methods", nargs="+", default=list(METHODS), choices=METHODS, help="(default: all)"
    )
    parser.add_argument(
        "--boxes",
        nargs="+",
        type=int,
        default=None,
        help="boxes bounded at once (default: 1 and 1000; --quick: 1 and 4)",
    )
    parser.add_argument(
        "--alpha-steps", type=int, default=None, help="alpha-CROWN's Adam steps (20; --quick 3)"
    )
    parser.add_argument(
        "--dual-steps", type=int, default=None, help="the dual's Adam steps (50; --quick 3)"
    )
    parser.add_argument(
        "--data",
        default=None,
        metavar="DIR",
        help="the verification data folder (default: DEEPKERN_VERIFICATION_DATA, or "
        "shared/data/verification beside the repository)",
    )


def find_data(given: str | None = None) -> str | None:
    """The verification data folder: ``given``, the environment's, or the shared one beside the
    repository (or beside the folder that holds it); None where none exists."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    candidates = [
        given,
        os.environ.get("DEEPKERN_VERIFICATION_DATA"),
        os.path.join(root, "..", "shared", "data", "verification"),
        os.path.join(root, "..", "..", "shared", "data", "verification"),
    ]
    return next((os.path.abspath(c) for c in candidates if c and os.path.isdir(c)), None)


def random_network(widths: list[int], seed: int = 0) -> nn.Sequential:
    """A ReLU network of the given widths, initialised like PyTorch's Linear from a seed."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for n_in, n_out in zip(widths[:-1], widths[1:]):
        layers += [nn.Linear(n_in, n_out), nn.ReLU()]
    return nn.Sequential(*layers[:-1]).eval()


def load_network(name: str, data: str | None, quick: bool) -> tuple[nn.Sequential, str]:
    """The benchmark's network and where it came from (the file, or a random stand-in)."""
    path, widths = _NETWORKS[name]
    if quick:
        return random_network(_QUICK_WIDTHS[name]), "random, tiny"
    if data is not None and os.path.isfile(os.path.join(data, path)):
        from deepkern.verify.onnx_loader import load_onnx

        network, _ = load_onnx(os.path.join(data, path))
        return network, os.path.basename(path)
    return random_network(widths), "random, same shape (data absent)"


def make_boxes(name: str, network: nn.Sequential, boxes: int, device, seed: int = 0):
    """``boxes`` small boxes in the input domain and the rows to bound, as described above."""
    inputs = next(m for m in network if isinstance(m, nn.Linear)).in_features
    low, high, radius = _BOXES[name]
    g = torch.Generator().manual_seed(seed)
    centre = low + (high - low) * torch.rand(boxes, inputs, generator=g, dtype=torch.float64)
    lower = (centre - radius).clamp(low, high)
    upper = (centre + radius).clamp(low, high)
    with torch.no_grad():
        network = copy.deepcopy(network).double().cpu()
        outputs = network(centre).shape[1]
        eye = torch.eye(outputs, dtype=torch.float64)
        if name == "acasxu":
            coefficients = (eye[1:] - eye[0]).expand(boxes, -1, -1)
        else:
            label = network(centre).argmax(1)
            rows = eye[label][:, None, :] - eye[None, :, :].expand(boxes, -1, -1)
            keep = torch.arange(outputs)[None, :] != label[:, None]
            coefficients = rows[keep].reshape(boxes, outputs - 1, outputs)
    return lower.to(device), upper.to(device), coefficients.to(device)


@contextlib.contextmanager
def reference_ops() -> Iterator[None]:
    """Swap the plain-PyTorch references in for the verify ops while inside."""
    names = ("interval_linear", "activation_relaxation", "dual_activation_max")
    saved = {name: getattr(verify_ops, name) for name in names}
    try:
        for name in names:
            setattr(verify_ops, name, getattr(verify_ops, f"reference_{name}"))
        yield
    finally:
        for name, op in saved.items():
            setattr(verify_ops, name, op)


def auto_lirpa_available() -> bool:
    try:
        import auto_LiRPA  # noqa: F401
    except ImportError:
        return False
    return True


def _auto_lirpa_call(network, lower, upper, coefficients, method, steps) -> Callable:
    """auto_LiRPA's bound of the same rows, or None for a method it does not have."""
    from auto_LiRPA import BoundedModule, BoundedTensor, PerturbationLpNorm

    names = {"ibp": "IBP", "crown": "CROWN", "alpha": "alpha-CROWN"}
    if method not in names:
        return None
    model = BoundedModule(network, torch.zeros_like(lower[:1]), device=lower.device)
    if method == "alpha":
        model.set_bound_opts({"optimize_bound_args": {"iteration": steps}})
    centre = (lower + upper) / 2
    bounded = BoundedTensor(centre, PerturbationLpNorm(x_L=lower, x_U=upper))

    def call():
        lb, _ = model.compute_bounds(x=(bounded,), C=coefficients, method=names[method])
        return lb

    return call


def _bound_call(network, lower, upper, coefficients, method, steps) -> Callable:
    from deepkern.verify.bounds import compute_bounds

    def call():
        result = compute_bounds(
            network, lower, upper, coefficients, method, steps=steps, upper_bound=False
        )
        return result.lower

    return call


def _measure(name, network, source, boxes, method, args, device, min_run_time) -> dict:
    row = {"case": f"{name} x{boxes}", "network": source, "method": method}
    lower, upper, coefficients = make_boxes(name, network, boxes, device)
    steps = {"alpha": args.alpha_steps, "dual": args.dual_steps}.get(method)
    ours = _bound_call(network, lower, upper, coefficients, method, steps)

    def reference():
        with reference_ops():
            return ours()

    # The kernels round their lines outward by a few ulps; optimised methods (Adam on slopes
    # or multipliers, on a nonsmooth function) then follow different paths that can end a few
    # percent apart on a deep network, so they are compared at their common start.
    start = _bound_call(network, lower, upper, coefficients, method, 0) if steps else ours
    with reference_ops():
        reference_start = start()
    start_bound = start()
    if not torch.allclose(start_bound, reference_start, rtol=1e-6, atol=1e-6):
        error = float((start_bound - reference_start).abs().max())
        raise common.AgreementError(f"the reference ops' bounds differ from ours by {error:.2e}")
    ours_bound, reference_bound = ours(), reference()
    row["reference_bound"] = float(reference_bound.mean())
    calls = {"ours": ours, "reference": reference}
    if auto_lirpa_available():
        outside = _auto_lirpa_call(network, lower, upper, coefficients, method, steps)
        if outside is not None:
            calls["auto_LiRPA"] = outside
            row["auto_LiRPA_bound"] = float(outside().double().mean())
    timings = common.time_calls(calls, min_run_time=min_run_time)
    row.update(
        common.comparison_row(
            row["case"],
            timings["ours"].median,
            timings["reference"].median,
            timings["auto_LiRPA"].median if "auto_LiRPA" in timings else None,
        )
    )
    row["network"], row["method"], row["steps"] = source, method, steps
    row["specs"] = coefficients.shape[1]
    row["bound"] = float(ours_bound.mean())
    return row


def collect(args: argparse.Namespace, progress: Callable[[str], None]) -> common.Report:
    device = common.resolve_device(args.device)
    min_run_time = args.min_run_time or (0.02 if args.quick else 1.0)
    box_counts = args.boxes or ([1, 4] if args.quick else [1, 1000])
    if args.alpha_steps is None:
        args.alpha_steps = 3 if args.quick else 20
    if args.dual_steps is None:
        args.dual_steps = 3 if args.quick else 50
    for value, what in ((args.alpha_steps, "--alpha-steps"), (args.dual_steps, "--dual-steps")):
        if value < 0:
            raise ValueError(f"{what} must be 0 or positive, got {value}")
    if any(count < 1 for count in box_counts):
        raise ValueError(f"--boxes must be positive, got {box_counts}")
    data = None if args.quick else find_data(args.data)
    env = common.environment(device)
    env["data"] = data
    rows = []

    for name in args.networks:
        network, source = load_network(name, data, args.quick)
        network = network.to(device)
        for boxes in box_counts:
            for method in args.methods:
                progress(f"{name} x{boxes}: {method}")
                try:
                    row = _measure(name, network, source, boxes, method, args, device, min_run_time)
                except Exception as error:  # a failed case is reported in its row, not hidden
                    row = {"case": f"{name} x{boxes}", "network": source, "method": method}
                    row["error"] = f"{type(error).__name__}: {error}"
                rows.append(row)

    outside = "auto_LiRPA" if auto_lirpa_available() else None
    columns = [
        common.Column("case", "case", align="<"),
        common.Column("method", "method", align="<"),
    ]
    columns += common.comparison_columns(outside)[1:]
    columns += [
        common.Column("bound", "mean bound", lambda v: f"{v:.4g}"),
        common.Column("reference_bound", "ref bound", lambda v: f"{v:.4g}"),
        common.Column("specs", "rows"),
        common.Column("network", "network", align="<"),
    ]
    if outside:
        columns.insert(-2, common.Column("auto_LiRPA_bound", "auto_LiRPA bound"))
    notes = [
        "times are medians per call of compute_bounds; ref/ours above 1 means ours is faster; "
        f"alpha takes {args.alpha_steps} steps and dual {args.dual_steps}",
        "mean bound: the mean lower bound over boxes and rows (higher is tighter)",
    ]
    if data is None and not args.quick:
        notes.append("verification data folder absent: random networks of the same shapes")
    if outside is None:
        notes.append("auto_LiRPA is not importable: its columns are left out")
    return common.Report(family="verify", columns=columns, rows=rows, env=env, notes=notes)
