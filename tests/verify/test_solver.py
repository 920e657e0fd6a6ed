"""verify: known answers on small networks, counterexamples that are real, thresholds a hair
either side of the true maximum, hidden corners, disjunctions, timeouts and bad input."""

from __future__ import annotations

import math
import os

import pytest
import torch
from torch import nn

from deepkern.verify import Disjunct, Region, Specification, solver
from deepkern.verify.bounds import compute_bounds
from deepkern.verify.solver import verify
from tests.verify.shared_data import SHARED
from tests.verify.test_bounds import _milp_minimum


def _spec(lower, upper, disjuncts) -> Specification:
    lower = torch.as_tensor(lower, dtype=torch.float64)
    upper = torch.as_tensor(upper, dtype=torch.float64)
    parts = [
        Disjunct(torch.as_tensor(c, dtype=torch.float64), torch.as_tensor(d, dtype=torch.float64))
        for c, d in disjuncts
    ]
    outputs = parts[0].coefficients.shape[1]
    return Specification([Region(lower, upper, parts)], lower.numel(), outputs)


def _check_counterexample(network, spec, result):
    assert result.verdict == "sat"
    x, y = result.counterexample
    region = spec.regions[0]
    assert bool(((x >= region.lower) & (x <= region.upper)).all())
    with torch.no_grad():
        again = network(x.to(torch.float32)[None]).to(torch.float64)[0]
    assert torch.equal(again, y)
    assert any(bool((d.coefficients @ y <= d.bounds).all()) for d in region.disjuncts)


def _mlp(sizes, seed):
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for number, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(fan_in, fan_out))
        if number < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def _float32_maximum(network, lower, upper) -> float:
    """The largest float32 output of a 1-input network on a dense grid (exact for piecewise
    linear networks up to the grid spacing, which the tests' margins exceed)."""
    grid = torch.linspace(lower, upper, 200001, dtype=torch.float32)[:, None]
    with torch.no_grad():
        return float(network(grid).max())


@pytest.mark.parametrize("gap", [1e-3, -1e-3])
def test_threshold_a_hair_above_or_below_the_true_maximum(gap):
    # One input: the maximum over the box is found exactly enough by a dense grid.
    network = _mlp((1, 16, 16, 1), seed=0)
    top = _float32_maximum(network, -1.0, 1.0)
    # Unsafe iff y >= threshold, i.e. -y <= -threshold.
    spec = _spec([-1.0], [1.0], [([[-1.0]], [-(top + gap)])])
    result = verify(network, spec, timeout=30, seed=1)
    if gap > 0:
        assert result.verdict == "unsat"
        assert result.bound is not None and result.bound > 0
    else:
        _check_counterexample(network, spec, result)


def test_counterexample_hidden_in_a_tiny_corner():
    # y = 1000 relu(x0 + x1 - 1.998) is positive on a corner of area 2e-6 of the unit square,
    # where gradients elsewhere are zero: random points and PGD miss it, the search must not.
    network = nn.Sequential(nn.Linear(2, 1), nn.ReLU(), nn.Linear(1, 1))
    with torch.no_grad():
        network[0].weight.copy_(torch.tensor([[1.0, 1.0]]))
        network[0].bias.copy_(torch.tensor([-1.998]))
        network[2].weight.copy_(torch.tensor([[1000.0]]))
        network[2].bias.zero_()
    unsafe = _spec([0.0, 0.0], [1.0, 1.0], [([[-1.0]], [-1.5])])
    result = verify(network, unsafe, timeout=30)
    _check_counterexample(network, unsafe, result)
    # The maximum is 2: above it the property holds.
    safe = _spec([0.0, 0.0], [1.0, 1.0], [([[-1.0]], [-2.01])])
    assert verify(network, safe, timeout=30).verdict == "unsat"


def test_a_counterexample_that_only_float32_rounding_makes():
    # y = 1 - relu(K (x0 - a)) - relu(K (a - x0)) reaches 1 at the float32 number x0 = a
    # alone, and there only because float32 rounds K a to the stored bias; in exact
    # arithmetic y(a) < 1. The search must judge points as the float32 network computes them.
    a, k = float(torch.tensor(0.3141592)), 1e5
    network = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 1))
    with torch.no_grad():
        network[0].weight.copy_(torch.tensor([[k, 0.0], [-k, 0.0]]))
        network[0].bias.copy_(torch.tensor([-k * a, k * a]))
        network[2].weight.copy_(torch.tensor([[-1.0, -1.0]]))
        network[2].bias.copy_(torch.tensor([1.0]))
    spec = _spec([0.0, 0.0], [1.0, 1.0], [([[-1.0]], [-1.0])])  # unsafe iff y >= 1
    result = verify(network, spec, timeout=30, seed=0)
    _check_counterexample(network, spec, result)
    assert result.counterexample[0][0].item() == a


def test_disjunctions_need_every_disjunct_cleared():
    network = _mlp((3, 12, 2), seed=2)
    lower, upper = [-1.0] * 3, [1.0] * 3
    grid = torch.rand(20000, 3) * 2 - 1
    with torch.no_grad():
        y = network(grid).to(torch.float64)
    top0, top1 = float(y[:, 0].max()), float(y[:, 1].max())
    impossible = ([[-1.0, 0.0]], [-(top0 + 10.0)])
    reachable = ([[0.0, -1.0]], [-(top1 - 0.05)])
    also_impossible = ([[0.0, -1.0]], [-(top1 + 10.0)])
    assert (
        verify(network, _spec(lower, upper, [impossible, also_impossible]), timeout=30).verdict
        == "unsat"
    )
    spec = _spec(lower, upper, [impossible, reachable])
    _check_counterexample(network, spec, verify(network, spec, timeout=30))


def test_a_contradictory_conjunction_is_cleared_at_the_root():
    # y <= 0 and y >= 1 cannot both hold; no single row's bound shows it over a box where y
    # spans [-5, 5], their mean (0 <= -1/2) does.
    network = nn.Sequential(nn.Linear(2, 1))
    with torch.no_grad():
        network[0].weight.copy_(torch.tensor([[5.0, 0.0]]))
        network[0].bias.zero_()
    spec = _spec([-1.0, -1.0], [1.0, 1.0], [([[1.0], [-1.0]], [0.0, -1.0])])
    result = verify(network, spec, timeout=10)
    assert result.verdict == "unsat"
    assert "domains" not in result.details


@pytest.mark.parametrize("method", ["ibp", "crown", "dual"])
def test_relu_splitting_with_every_bound_method(method):
    network = _mlp((40, 8, 8, 2), seed=11)
    center = torch.rand(40, generator=torch.Generator().manual_seed(12), dtype=torch.float64)
    lower, upper = center - 0.05, center + 0.05
    row = torch.tensor([1.0, -1.0], dtype=torch.float64)
    exact = _milp_minimum(network.double(), lower, upper, row)
    network = network.float()
    spec = _spec(lower, upper, [(row[None], [exact - 0.05])])
    result = verify(network, spec, timeout=60, method=method)
    assert result.verdict == "unsat"
    spec = _spec(lower, upper, [(row[None], [exact + 0.05])])
    _check_counterexample(network, spec, verify(network, spec, timeout=60, method=method))


@pytest.mark.parametrize("memory", ["inherited", "forgotten"])
def test_relu_splitting_on_many_inputs_matches_the_exact_minimum(monkeypatch, memory):
    # 40 inputs send the search to ReLU splitting; a MIP gives the exact answer. Without
    # memory for what parents pass on, subproblems start afresh and still decide.
    if memory == "forgotten":
        monkeypatch.setattr(solver, "_STORED_BYTES_LIMIT", 0)
    network = _mlp((40, 24, 24, 2), seed=3)
    center = torch.rand(40, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    lower, upper = center - 0.1, center + 0.1
    row = torch.tensor([1.0, -1.0], dtype=torch.float64)
    exact = _milp_minimum(network.double(), lower, upper, row)
    network = network.float()
    root = compute_bounds(network, lower[None], upper[None], row[None], "alpha")
    # Unsafe iff y0 - y1 <= threshold.
    below = exact - 0.02
    result = verify(network, _spec(lower, upper, [(row[None], [below])]), timeout=60)
    assert result.verdict == "unsat"
    if float(root.lower) < below:
        assert result.details["strategy"] == "relu split" and result.details["domains"] > 1
        assert ("parents_forgotten_at" in result.details) == (memory == "forgotten")
    spec = _spec(lower, upper, [(row[None], [exact + 0.02])])
    _check_counterexample(network, spec, verify(network, spec, timeout=60))


def test_a_counterexample_beyond_a_flat_plateau_is_found():
    # y = 1 - 10 relu(sum(x) - 39.5) on [0, 1]^40: around every random point the output is
    # flat (no gradient for PGD); only near the all-ones corner does it drop below zero.
    hidden = nn.Linear(40, 1)
    output = nn.Linear(1, 1)
    with torch.no_grad():
        hidden.weight.fill_(1.0)
        hidden.bias.fill_(-39.5)
        output.weight.fill_(-10.0)
        output.bias.fill_(1.0)
    network = nn.Sequential(hidden, nn.ReLU(), output)
    spec = _spec([0.0] * 40, [1.0] * 40, [([[1.0]], [0.0])])
    result = verify(network, spec, timeout=30)
    _check_counterexample(network, spec, result)


@pytest.mark.parametrize("margin", [0.02, -1e-4])
def test_subproblems_with_every_relu_fixed_are_decided(monkeypatch, margin):
    # With the attacks and the bound corners taken away, a counterexample can only come from
    # the linear program on a subproblem where every ReLU is fixed; 1e-4 under the exact
    # minimum, the proof needs such subproblems too, bounded with the program's duals.
    network = _mlp((40, 6, 2), seed=8)
    center = torch.rand(40, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    lower, upper = center - 0.3, center + 0.3
    row = torch.tensor([1.0, -1.0], dtype=torch.float64)
    exact = _milp_minimum(network.double(), lower, upper, row)
    network = network.float()
    monkeypatch.setattr(solver._Problem, "attack", lambda *args, **kwargs: None)
    monkeypatch.setattr(solver, "_bound_corners", lambda a, lower, upper, rows: (lower + upper) / 2)
    spec = _spec(lower, upper, [(row[None], [exact + margin])])
    result = verify(network, spec, timeout=60)
    if margin > 0:
        _check_counterexample(network, spec, result)
    else:
        assert result.verdict == "unsat"
    assert result.details["linear_programs"] >= 1


def test_a_short_timeout_never_claims_a_proof():
    network = _mlp((5, 64, 64, 64, 1), seed=5)
    lower, upper = [-1.0] * 5, [1.0] * 5
    points = torch.rand(50000, 5) * 2 - 1
    with torch.no_grad():
        top = float(network(points).max())
    # Barely above the sampled maximum: hard to prove, and impossible in 0.5 seconds.
    spec = _spec(lower, upper, [([[-1.0]], [-(top + 1e-4)])])
    result = verify(network, spec, timeout=0.5)
    assert result.verdict in ("timeout", "sat")
    if result.verdict == "sat":
        _check_counterexample(network, spec, result)


def test_bad_arguments_are_named():
    network = _mlp((2, 3, 1), seed=0)
    spec = _spec([0.0, 0.0], [1.0, 1.0], [([[1.0]], [0.0])])
    with pytest.raises(ValueError, match="method"):
        verify(network, spec, timeout=1, method="simplex")
    with pytest.raises(ValueError, match="timeout"):
        verify(network, spec, timeout=0)
    with pytest.raises(ValueError, match="spec"):
        verify(network, "prop.vnnlib", timeout=1)
    wrong = _spec([0.0, 0.0, 0.0], [1.0, 1.0, 1.0], [([[1.0]], [0.0])])
    with pytest.raises(ValueError, match="inputs"):
        verify(network, wrong, timeout=1)
    # Half precision overflows the rounding model; a mixed network computes in no one type.
    for half in (torch.float16, torch.bfloat16):
        with pytest.raises(ValueError, match="float32 or float64 throughout"):
            verify(_mlp((2, 3, 1), seed=0).to(half), spec, timeout=1)
    mixed = _mlp((2, 3, 1), seed=0)
    mixed[2].double()
    with pytest.raises(ValueError, match="has float32, float64"):
        verify(mixed, spec, timeout=1)


DATA = SHARED


@pytest.mark.skipif(
    not DATA or not os.path.isdir(os.path.join(DATA, "acasxu")),
    reason="verification benchmark data absent",
)
@pytest.mark.parametrize(
    ("network_file", "property_file", "expected"),
    [
        ("ACASXU_run2a_1_9_batch_2000.onnx", "prop_1.vnnlib", "unsat"),
        ("ACASXU_run2a_1_9_batch_2000.onnx", "prop_3.vnnlib", "sat"),
    ],
)
def test_acas_xu_instances(network_file, property_file, expected):
    onnx_loader = pytest.importorskip("deepkern.verify.onnx_loader")
    vnnlib = pytest.importorskip("deepkern.verify.vnnlib")
    network, shape = onnx_loader.load_onnx(os.path.join(DATA, "acasxu", network_file))
    spec = vnnlib.parse_vnnlib(os.path.join(DATA, "acasxu", property_file), math.prod(shape), 5)
    result = verify(network, spec, timeout=60)
    assert result.verdict == expected
    if expected == "sat":
        _check_counterexample(network.float(), spec, result)


@pytest.mark.parametrize("look_ahead", [True, False])
def test_both_split_choices_match_the_exact_minimum_on_few_inputs(monkeypatch, look_ahead):
    # Five inputs send the search to input splitting; a MIP gives the exact answer, and a
    # threshold either side of it must come out unsat and sat whichever way boxes are split.
    monkeypatch.setattr(solver, "_LOOK_AHEAD", look_ahead)
    monkeypatch.setattr(solver, "_STAGED", False)
    network = _mlp((5, 8, 8, 3), seed=5)
    lower = torch.full((5,), -1.0, dtype=torch.float64)
    upper = torch.full((5,), 1.0, dtype=torch.float64)
    row = torch.tensor([1.0, -1.0, 0.0], dtype=torch.float64)
    exact = _milp_minimum(network.double(), lower, upper, row)
    network = network.float()
    safe = verify(network, _spec(lower, upper, [(row[None], [exact - 0.05])]), timeout=60)
    assert safe.verdict == "unsat"
    assert safe.details["strategy"] == "input split" and safe.details["domains"] > 1
    assert ("look_ahead_boxes" in safe.details) == look_ahead
    spec = _spec(lower, upper, [(row[None], [exact + 0.05])])
    _check_counterexample(network, spec, verify(network, spec, timeout=60))


def test_a_counterexample_region_smaller_than_the_falsifier_sees_is_not_called_unsat():
    # y = relu(x0 + ... + x4 - 4.99999) - 1e-7 is positive only on a corner of the cube of
    # volume ~1e-24; the look-ahead's bounds must leave that corner open until it is found.
    network = nn.Sequential(nn.Linear(5, 1), nn.ReLU(), nn.Linear(1, 1))
    with torch.no_grad():
        network[0].weight.fill_(1.0)
        network[0].bias.fill_(-4.99999)
        network[2].weight.fill_(1.0)
        network[2].bias.fill_(-1e-7)
    spec = _spec([0.0] * 5, [1.0] * 5, [([[-1.0]], [0.0])])
    result = verify(network, spec, timeout=30)
    _check_counterexample(network, spec, result)


def test_the_callers_thread_count_comes_back():
    network = _mlp((2, 8, 1), seed=6)
    spec = _spec([-1.0, -1.0], [1.0, 1.0], [([[-1.0]], [-100.0])])
    threads = torch.get_num_threads()
    assert verify(network, spec, timeout=10).verdict == "unsat"
    assert torch.get_num_threads() == threads
