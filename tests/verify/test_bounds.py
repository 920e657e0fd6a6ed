"""compute_bounds: valid bounds for every method, the order IBP <= CROWN <= alpha <= exact,
splits, the rounding model and bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from deepkern.verify import ElementwiseAffine
from deepkern.verify.bounds import (
    OptimisedVariables,
    affine_rows,
    compute_bounds,
    infer_input_shape,
    prepare_network,
)

ACTIVATIONS = {"relu": nn.ReLU, "sigmoid": nn.Sigmoid, "tanh": nn.Tanh}
METHODS = ("ibp", "crown", "alpha")


def _mlp(activation: str, sizes=(4, 12, 10, 3), seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for number, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(fan_in, fan_out))
        if number < len(sizes) - 2:
            layers.append(ACTIVATIONS[activation]())
    return nn.Sequential(*layers).double()


def _conv_net(activation: str) -> nn.Sequential:
    torch.manual_seed(1)
    return nn.Sequential(
        ElementwiseAffine(torch.tensor([[[2.0]]]), torch.tensor([[[-0.5]]])),
        nn.Conv2d(1, 3, 3, stride=2, padding=1),
        ACTIVATIONS[activation](),
        nn.Flatten(),
        nn.Linear(3 * 4 * 4, 6),
        ACTIVATIONS[activation](),
        nn.Linear(6, 3),
    ).double()


def _boxes(count: int, inputs: int, width: float, seed: int):
    generator = torch.Generator().manual_seed(seed)
    lower = torch.rand(count, inputs, generator=generator, dtype=torch.float64) - 0.5
    upper = lower + width * torch.rand(count, inputs, generator=generator, dtype=torch.float64)
    return lower, upper


def _extremes(network, lower, upper, coefficients, shape, seed: int = 0):
    """Sampled and PGD-searched min and max of coefficients @ network(x) over each box."""
    generator = torch.Generator().manual_seed(seed)
    count, inputs = lower.shape
    points = 64
    x = lower.unsqueeze(1) + (upper - lower).unsqueeze(1) * torch.rand(
        count, points, inputs, generator=generator, dtype=torch.float64
    )
    lowest = torch.full((count, coefficients.shape[0]), math.inf, dtype=torch.float64)
    highest = -lowest
    for sign in (1.0, -1.0):
        z = x.clone()
        for _ in range(30):
            z.requires_grad_(True)
            values = network(z.reshape(-1, *shape)).reshape(count, points, -1) @ coefficients.T
            (gradient,) = torch.autograd.grad(sign * values.sum(), z)
            with torch.no_grad():
                lowest = torch.minimum(lowest, values.amin(1))
                highest = torch.maximum(highest, values.amax(1))
                step = 0.1 * (upper - lower).unsqueeze(1)
                z = torch.minimum(
                    torch.maximum(z - step * gradient.sign(), lower[:, None]), upper[:, None]
                )
    return lowest, highest


@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
@pytest.mark.parametrize("kind", ["linear", "conv"])
@pytest.mark.parametrize("intermediate_pass", ["backward", "forward"])
def test_bounds_hold_at_sampled_and_attacked_points(activation, kind, intermediate_pass):
    network = _mlp(activation) if kind == "linear" else _conv_net(activation)
    shape = (4,) if kind == "linear" else (1, 8, 8)
    lower, upper = _boxes(5, math.prod(shape), 0.4, seed=2)
    coefficients = torch.randn(4, 3, generator=torch.Generator().manual_seed(3)).double()
    lowest, highest = _extremes(network, lower, upper, coefficients, shape)
    previous = None
    for method in METHODS:
        result = compute_bounds(
            network,
            lower,
            upper,
            coefficients,
            method,
            input_shape=shape,
            intermediate_pass=intermediate_pass,
        )
        assert result.lower.shape == (5, 4) and result.upper.shape == (5, 4)
        assert bool((result.lower <= lowest + 1e-9).all()), method
        assert bool((result.upper >= highest - 1e-9).all()), method
        if previous is not None and method == "alpha":
            # alpha starts from CROWN's slopes and keeps the best iterate.
            assert bool((result.lower >= previous - 1e-9).all())
        previous = result.lower


def test_per_box_coefficients_and_intermediate_bounds():
    network = _mlp("relu")
    lower, upper = _boxes(3, 4, 0.3, seed=4)
    coefficients = torch.randn(3, 2, 3, generator=torch.Generator().manual_seed(5)).double()
    batched = compute_bounds(network, lower, upper, coefficients, "crown")
    for box in range(3):
        alone = compute_bounds(
            network, lower[box : box + 1], upper[box : box + 1], coefficients[box], "crown"
        )
        torch.testing.assert_close(alone.lower[0], batched.lower[box])
    assert len(batched.intermediate) == 2
    for (lo, hi), units in zip(batched.intermediate, (12, 10)):
        assert lo.shape == (3, units) and bool((lo <= hi).all())


def _milp_minimum(network: nn.Sequential, lower, upper, row, fixed=None) -> float:
    """min of row @ network(x) over the box: a big-M mixed-integer program on IBP bounds.
    ``fixed`` maps (hidden layer, unit) to 1 (pre-activation >= 0) or -1 (<= 0)."""
    from scipy.optimize import Bounds, LinearConstraint, milp

    linears = [m for m in network if isinstance(m, nn.Linear)]
    ibp = compute_bounds(network, lower[None], upper[None], row[None], "crown").intermediate
    # Variables: inputs, then per hidden layer its post-activation values and binaries.
    sizes = [lower.numel()] + [2 * lin.out_features for lin in linears[:-1]]
    offsets = np.cumsum([0] + sizes)
    total = int(offsets[-1])
    rows, lows, highs = [], [], []
    var_lo = np.full(total, -np.inf)
    var_hi = np.full(total, np.inf)
    integrality = np.zeros(total)
    var_lo[: lower.numel()] = lower.numpy()
    var_hi[: lower.numel()] = upper.numpy()
    previous = slice(0, lower.numel())
    for index, linear in enumerate(linears[:-1]):
        weight, bias = linear.weight.detach().numpy(), linear.bias.detach().numpy()
        lo, hi = (t[0].numpy() for t in ibp[index])
        base = int(offsets[index + 1])
        units = linear.out_features
        for j in range(units):
            h, b = base + j, base + units + j
            var_lo[h], var_hi[h] = 0.0, max(hi[j], 0.0)
            var_lo[b], var_hi[b] = 0.0, 1.0
            state = (fixed or {}).get((index, j))
            if state is not None:
                var_lo[b] = var_hi[b] = 1.0 if state > 0 else 0.0
            integrality[b] = 1
            pre = np.zeros(total)
            pre[previous] = weight[j]
            # h >= z;  h <= z - lo (1 - b);  h <= hi b
            first = -pre.copy()
            first[h] += 1
            rows.append(first), lows.append(bias[j]), highs.append(np.inf)
            second = -pre.copy()
            second[h] += 1
            second[b] -= lo[j]
            rows.append(second), lows.append(-np.inf), highs.append(bias[j] - lo[j])
            third = np.zeros(total)
            third[h] = 1
            third[b] = -max(hi[j], 0.0)
            rows.append(third), lows.append(-np.inf), highs.append(0.0)
        previous = slice(base, base + units)
    last = linears[-1]
    objective = np.zeros(total)
    objective[previous] = row.numpy() @ last.weight.detach().numpy()
    constant = float(row.numpy() @ last.bias.detach().numpy())
    result = milp(
        objective,
        constraints=LinearConstraint(np.array(rows), lows, highs),
        integrality=integrality,
        bounds=Bounds(var_lo, var_hi),
    )
    assert result.success
    return float(result.fun) + constant


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ordering_against_exact_minimum(seed):
    network = _mlp("relu", sizes=(3, 10, 8, 2), seed=seed)
    lower, upper = _boxes(1, 3, 0.8, seed=seed + 10)
    row = torch.tensor([1.0, -1.0], dtype=torch.float64)
    exact = _milp_minimum(network, lower[0], upper[0], row)
    found = {
        method: float(compute_bounds(network, lower, upper, row[None], method, steps=30).lower)
        for method in METHODS
    }
    assert found["ibp"] <= found["crown"] + 1e-9
    assert found["crown"] <= found["alpha"] + 1e-9
    assert found["alpha"] <= exact + 1e-7
    # The MIP is exact: a sampled point never beats it.
    sampled, _ = _extremes(network, lower, upper, row[None], (3,))
    assert exact <= float(sampled) + 1e-7


def test_splits_bound_their_halves_and_empty_splits_give_infinity():
    network = _mlp("relu", sizes=(2, 6, 2), seed=3)
    lower = torch.tensor([[-1.0, -1.0]], dtype=torch.float64)
    upper = torch.tensor([[1.0, 1.0]], dtype=torch.float64)
    row = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    base = compute_bounds(network, lower, upper, row, "crown")
    lo, hi = base.intermediate[0]
    unit = int(((lo < 0) & (hi > 0))[0].nonzero()[0, 0])

    grid = torch.stack(
        torch.meshgrid(*[torch.linspace(-1, 1, 201, dtype=torch.float64)] * 2, indexing="ij"), -1
    ).reshape(-1, 2)
    with torch.no_grad():
        pre = network[0](grid)[:, unit]
        values = network(grid) @ row[0]
    for active in (True, False):
        split_lo = torch.full_like(lo, -math.inf)
        split_hi = torch.full_like(hi, math.inf)
        if active:
            split_lo[0, unit] = 0.0
        else:
            split_hi[0, unit] = 0.0
        result = compute_bounds(network, lower, upper, row, "crown", splits=[(split_lo, split_hi)])
        inside = pre >= 0 if active else pre <= 0
        assert float(result.lower) <= float(values[inside].min().detach()) + 1e-9

    # A neuron forced active whose upper bound is below zero leaves nothing to bound.
    dead_lo = torch.full_like(lo, -math.inf)
    dead_lo[0, unit] = float(hi[0, unit]) + 1.0
    empty = compute_bounds(network, lower, upper, row, "alpha", splits=[(dead_lo, None)])
    assert math.isinf(float(empty.lower)) and float(empty.lower) > 0


def _random_splits(network, lower, upper, row, count: int, seed: int):
    """``count`` unstable ReLUs of each hidden layer, fixed to the sides a random point of the
    box takes (so the subdomain is not empty): (splits for compute_bounds, the same for
    _milp_minimum)."""
    generator = torch.Generator().manual_seed(seed)
    base = compute_bounds(network, lower, upper, row, "crown")
    point = lower + (upper - lower) * torch.rand(
        lower.shape, generator=generator, dtype=lower.dtype
    )
    sides = []
    with torch.no_grad():
        for module in network:
            point = module(point)
            if isinstance(module, nn.Linear):
                sides.append(point[0])
    splits, fixed = [], {}
    for layer, (lo, hi) in enumerate(base.intermediate):
        split_lo = torch.full_like(lo, -math.inf)
        split_hi = torch.full_like(hi, math.inf)
        unstable = ((lo < 0) & (hi > 0))[0].nonzero().squeeze(-1)
        picked = unstable[torch.randperm(unstable.numel(), generator=generator)[:count]]
        for unit in picked.tolist():
            side = 1 if float(sides[layer][unit]) >= 0 else -1
            (split_lo if side > 0 else split_hi)[0, unit] = 0.0
            fixed[(layer, unit)] = side
        splits.append((split_lo, split_hi))
    return splits, fixed


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_split_multipliers_stay_below_the_exact_minimum_and_tighten(seed):
    network = _mlp("relu", sizes=(3, 12, 10, 2), seed=seed)
    lower, upper = _boxes(1, 3, 0.9, seed=seed + 20)
    row = torch.tensor([[1.0, -1.0]], dtype=torch.float64)
    splits, fixed = _random_splits(network, lower, upper, row, count=3, seed=seed)
    exact = _milp_minimum(network, lower[0], upper[0], row[0], fixed)
    crown = compute_bounds(network, lower, upper, row, "crown", splits=splits)
    optimised = compute_bounds(network, lower, upper, row, "alpha", splits=splits, steps=200)
    assert float(crown.lower) <= float(optimised.lower) + 1e-12
    assert float(optimised.lower) <= exact + 1e-7
    # The multipliers carry weight only on split sides.
    for index, (above, below) in optimised.variables.multipliers.items():
        split_lo, split_hi = splits[index]
        assert bool((above[0, 0][torch.isinf(split_lo[0])] == 0).all())
        assert bool((below[0, 0][torch.isinf(split_hi[0])] == 0).all())
        assert bool((above >= 0).all() and (below >= 0).all())


def test_split_multipliers_close_the_gap_on_an_affine_piece():
    # Every ReLU fixed: the network is affine on the subdomain, and with trained multipliers
    # the bound approaches the exact minimum over the box and the split constraints.
    network = _mlp("relu", sizes=(2, 6, 2), seed=3)
    lower = torch.tensor([[-1.0, -1.0]], dtype=torch.float64)
    upper = torch.tensor([[1.0, 1.0]], dtype=torch.float64)
    row = torch.tensor([[1.0, -1.0]], dtype=torch.float64)
    splits, fixed = _random_splits(network, lower, upper, row, count=6, seed=0)
    exact = _milp_minimum(network, lower[0], upper[0], row[0], fixed)
    without = compute_bounds(network, lower, upper, row, "alpha", splits=splits, steps=0)
    trained = compute_bounds(network, lower, upper, row, "alpha", splits=splits, steps=500)
    assert float(trained.lower) <= exact + 1e-7
    assert exact - float(trained.lower) < 0.25 * (exact - float(without.lower)) + 1e-6


def test_resuming_from_variables_never_loses_the_bound():
    network = _mlp("relu", sizes=(4, 16, 16, 3), seed=5)
    lower, upper = _boxes(3, 4, 0.6, seed=5)
    rows = torch.eye(3, dtype=torch.float64)[:2]
    splits, _ = _random_splits(network, lower[:1], upper[:1], rows[:1], count=2, seed=5)
    splits = [(lo.expand(3, -1), hi.expand(3, -1)) for lo, hi in splits]
    first = compute_bounds(network, lower, upper, rows, "alpha", splits=splits, steps=10)
    again = compute_bounds(
        network, lower, upper, rows, "alpha", splits=splits, steps=0, start=first.variables
    )
    torch.testing.assert_close(again.lower, first.lower, rtol=0, atol=1e-12)
    longer = compute_bounds(
        network, lower, upper, rows, "alpha", splits=splits, steps=10, start=first.variables
    )
    assert bool((longer.lower >= first.lower - 1e-12).all())
    # Variables are per final-pass row: lower bounds, then the negated rows for upper bounds.
    assert first.variables.slopes[0].shape == (3, 4, 16)


def test_given_bounds_tightened_again_only_where_asked():
    network = _mlp("relu", sizes=(4, 16, 16, 3), seed=6)
    lower, upper = _boxes(2, 4, 0.6, seed=6)
    rows = torch.eye(3, dtype=torch.float64)
    fresh = compute_bounds(network, lower, upper, rows, "crown")
    loose = [(lo - 1.0, hi + 1.0) for lo, hi in fresh.intermediate]
    kept = compute_bounds(network, lower, upper, rows, "crown", intermediate=loose)
    redone = compute_bounds(
        network,
        lower,
        upper,
        rows,
        "crown",
        intermediate=loose,
        refresh=[None, torch.tensor([True, False])],
    )
    # The first layer's interval is exact anyway; the second is tightened on box 0 only.
    torch.testing.assert_close(redone.intermediate[1][0][0], fresh.intermediate[1][0][0])
    torch.testing.assert_close(redone.intermediate[1][0][1], kept.intermediate[1][0][1])
    assert bool((redone.lower[0] >= kept.lower[0] - 1e-12).all())


def test_affine_rows_are_the_network_on_a_fixed_piece():
    network = _mlp("relu", sizes=(3, 8, 6, 2), seed=7)
    lower, upper = _boxes(1, 3, 0.6, seed=7)
    row = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    splits, _ = _random_splits(network, lower, upper, row, count=8, seed=7)
    result = compute_bounds(network, lower, upper, row, "crown", splits=splits)
    intermediate = [(lo[0], hi[0]) for lo, hi in result.intermediate]
    net = prepare_network(network, (3,))
    out_a, out_offset = affine_rows(net, intermediate, torch.eye(2, dtype=torch.float64))
    first_a, first_offset = affine_rows(net, intermediate, torch.eye(6, dtype=torch.float64), 1)
    # Points of the box on this piece: every pre-activation on its side.
    x = lower + (upper - lower) * torch.rand(4000, 3, dtype=torch.float64)
    with torch.no_grad():
        z1 = network[0](x)
        z2 = network[2](torch.relu(z1))
        y = network(x)
    inside = torch.ones(x.shape[0], dtype=torch.bool)
    for z, (lo, hi) in zip((z1, z2), intermediate):
        inside &= ((z >= lo - 1e-12) & (z <= hi + 1e-12)).all(-1)
    assert int(inside.sum()) > 0
    torch.testing.assert_close(x[inside] @ out_a.T + out_offset, y[inside])
    torch.testing.assert_close(x[inside] @ first_a.T + first_offset, z2[inside])


@pytest.mark.parametrize("activation", ["relu", "tanh"])
def test_the_dual_starts_at_least_at_alpha(activation):
    network = _mlp(activation, sizes=(4, 16, 16, 3), seed=9)
    lower, upper = _boxes(3, 4, 0.8, seed=9)
    rows = torch.eye(3, dtype=torch.float64)
    alpha = compute_bounds(network, lower, upper, rows, "alpha", upper_bound=False)
    dual = compute_bounds(network, lower, upper, rows, "dual", steps=1, upper_bound=False)
    assert bool((dual.lower >= alpha.lower - 1e-9).all())


def test_rounding_model_only_loosens():
    network = _mlp("tanh", sizes=(4, 20, 20, 3)).float()
    lower, upper = _boxes(4, 4, 0.5, seed=6)
    coefficients = torch.eye(3, dtype=torch.float64)
    exact = prepare_network(network, (4,))
    rounded = prepare_network(network, (4,))
    rounded.rounding_unit = 2.0**-24
    for method in METHODS:
        plain = compute_bounds(exact, lower, upper, coefficients, method)
        wide = compute_bounds(rounded, lower, upper, coefficients, method)
        assert bool((wide.lower <= plain.lower).all() and (wide.upper >= plain.upper).all())
        # float32 rounding of a 20-wide layer moves the bounds by far less than 1e-3.
        assert float((plain.lower - wide.lower).max()) < 1e-3


def test_input_shape_is_inferred_from_the_layers():
    affine = nn.Sequential(
        ElementwiseAffine(torch.zeros(1, 1, 1, 5), torch.zeros(1, 1, 1, 5)),
        nn.Flatten(),
        nn.Linear(5, 2),
    )
    assert infer_input_shape(affine, 5) == (1, 1, 5)
    assert infer_input_shape(_conv_net("relu"), 64) == (1, 8, 8)
    assert infer_input_shape(_mlp("relu"), 4) == (4,)


def test_bad_input_names_the_argument():
    network = _mlp("relu")
    lower, upper = _boxes(2, 4, 0.1, seed=0)
    row = torch.eye(3, dtype=torch.float64)
    with pytest.raises(ValueError, match="method"):
        compute_bounds(network, lower, upper, row, "lp")
    with pytest.raises(ValueError, match="lower and upper"):
        compute_bounds(network, lower, upper[:, :3], row, "ibp")
    with pytest.raises(ValueError, match="must not exceed"):
        compute_bounds(network, upper + 1, upper, row, "ibp")
    with pytest.raises(ValueError, match="columns"):
        compute_bounds(network, lower, upper, torch.eye(2, dtype=torch.float64), "crown")
    with pytest.raises(ValueError, match="splits"):
        compute_bounds(network, lower, upper, row, "crown", splits=[None])
    with pytest.raises(ValueError, match="not a verifiable layer"):
        compute_bounds(nn.Sequential(nn.Linear(4, 3), nn.GELU()), lower, upper, row, "ibp")
    with pytest.raises(ValueError, match="intermediate_pass"):
        compute_bounds(network, lower, upper, row, "crown", intermediate_pass="sideways")
    with pytest.raises(ValueError, match="refresh"):
        compute_bounds(network, lower, upper, row, "crown", refresh=[None])
    with pytest.raises(ValueError, match=r"refresh\[1\] must be a bool tensor \[2\]"):
        compute_bounds(network, lower, upper, row, "crown", refresh=[None, torch.tensor([0, 1])])
    wide = torch.zeros(2, 7, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"splits\[0\] lo must be a tensor \[2, 12\]"):
        compute_bounds(network, lower, upper, row, "crown", splits=[(wide, None), None])
    with pytest.raises(ValueError, match=r"splits\[0\] must be a \(lo, hi\) pair"):
        compute_bounds(network, lower, upper, row, "crown", splits=[wide[:, :2], None])
    nan = torch.full((2, 12), math.nan, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"intermediate\[0\] hi must not hold NaN"):
        compute_bounds(network, lower, upper, row, "crown", intermediate=[(None, nan), None])
    with pytest.raises(ValueError, match=r"splits\[0\] lo must not hold inf"):
        compute_bounds(
            network,
            lower,
            upper,
            row,
            "crown",
            splits=[(torch.full_like(nan, math.inf), None), None],
        )
    for steps in (-1, 2.5, True):
        with pytest.raises(ValueError, match="steps must be a whole number"):
            compute_bounds(network, lower, upper, row, "alpha", steps=steps)
    with pytest.raises(ValueError, match="coefficients must be finite"):
        compute_bounds(network, lower, upper, row * math.nan, "crown")
    with pytest.raises(ValueError, match="start must be OptimisedVariables"):
        compute_bounds(network, lower, upper, row, "alpha", start={"slopes": {}})
    wrong = OptimisedVariables({0: torch.zeros(2, 3, 12, dtype=torch.float64)})
    with pytest.raises(ValueError, match=r"start.slopes\[0\] must be \[2, 6, 12\]"):
        compute_bounds(network, lower, upper, row, "alpha", start=wrong)
    with pytest.raises(ValueError, match="no activation layer 5"):
        compute_bounds(
            network,
            lower,
            upper,
            row,
            "alpha",
            start=OptimisedVariables({5: torch.zeros(2, 6, 12)}),
        )
