"""The Lagrangian dual bound: valid against sampled and attacked points, tighter with steps,
at the LP value on one-hidden-layer ReLU nets, and clear errors on bad input."""

import numpy as np
import pytest
import torch
from scipy.optimize import linprog
from torch import nn

from deepkern.ops import verify as verify_ops
from deepkern.verify import ElementwiseAffine, Reshape
from deepkern.verify.dual import _split_network, dual_bound

ACTIVATION = {"relu": nn.ReLU, "sigmoid": nn.Sigmoid, "tanh": nn.Tanh}


def interval_bounds(network, lower, upper, input_shape=None):
    """Pre-activation bounds of every activation layer by plain interval arithmetic; a
    convolution goes through interval_linear as its dense matrix (the tests' sizes are tiny)."""
    shape = input_shape or (lower.shape[1],)
    lo, hi = lower.double(), upper.double()
    found = []
    for layer in network:
        if isinstance(layer, tuple(ACTIVATION.values())):
            found.append((lo, hi))
            lo, hi = layer(lo), layer(hi)
            continue
        if isinstance(layer, nn.Linear):
            weight, bias = layer.weight.double(), layer.bias.double()
            lo, hi = verify_ops.interval_linear(lo, hi, weight.detach(), bias.detach())
            shape = (layer.out_features,)
            continue
        if isinstance(layer, nn.Conv2d):
            layer = layer.double()
            basis = torch.eye(lo.shape[1], dtype=torch.float64).reshape(-1, *shape)
            bias = layer(torch.zeros(1, *shape, dtype=torch.float64)).detach()
            dense = (layer(basis).detach() - bias).reshape(lo.shape[1], -1).T
            lo, hi = verify_ops.interval_linear(lo, hi, dense, bias.reshape(-1))
            shape = tuple(bias.shape[1:])
            continue
        # Elementwise affine and reshapes: push both corners through, then reorder.
        a = layer(lo.reshape(-1, *shape)).detach()
        b = layer(hi.reshape(-1, *shape)).detach()
        shape = tuple(a.shape[1:])
        lo, hi = (
            torch.minimum(a, b).reshape(a.shape[0], -1),
            torch.maximum(a, b).reshape(a.shape[0], -1),
        )
    return found


def empirical_minimum(
    network, lower, upper, coefficients, samples=4000, pgd_steps=60, seed=0, input_shape=None
):
    """An upper estimate of the true minimum per box and spec: the best of random samples,
    corners and a projected-gradient attack from the best samples."""
    g = torch.Generator().manual_seed(seed)
    batch, inputs = lower.shape
    shape = input_shape or (lower.shape[1],)
    double = network.double()

    def net(flat):
        return double(flat.reshape(-1, *shape))

    width = upper - lower
    x = lower[:, None] + width[:, None] * torch.rand(batch, samples, inputs, generator=g).double()
    x[:, 0], x[:, 1] = lower, upper
    values = torch.einsum(
        "bno,so->bns",
        net(x.reshape(batch * samples, inputs)).view(batch, samples, -1),
        coefficients,
    )
    best = values.min(1).values  # [B, S]

    # Attack each spec from its best sample.
    start = x.gather(1, values.argmin(1)[..., None].expand(-1, -1, inputs))  # [B, S, n]
    z = start.clone().requires_grad_()
    step = width[:, None] / 20
    for _ in range(pgd_steps):
        out = torch.einsum(
            "bso,so->bs", net(z.reshape(-1, inputs)).view(*z.shape[:2], -1), coefficients
        )
        (grad,) = torch.autograd.grad(out.sum(), z)
        with torch.no_grad():
            z -= step * grad.sign()
            z.copy_(torch.maximum(torch.minimum(z, upper[:, None]), lower[:, None]))
            best = torch.minimum(best, out.detach())
        step = step * 0.95
    return best


def random_net(kind, widths, seed):
    torch.manual_seed(seed)
    layers = []
    for n_in, n_out in zip(widths[:-2], widths[1:-1]):
        layers += [nn.Linear(n_in, n_out), ACTIVATION[kind]()]
    layers.append(nn.Linear(widths[-2], widths[-1]))
    return nn.Sequential(*layers).double()


def random_boxes(batch, inputs, radius, seed):
    g = torch.Generator().manual_seed(seed)
    centre = torch.rand(batch, inputs, generator=g, dtype=torch.float64) * 2 - 1
    return centre - radius, centre + radius


@pytest.mark.parametrize("kind", ["relu", "sigmoid", "tanh"])
def test_bound_is_valid_and_improves_with_steps(kind):
    net = random_net(kind, [4, 24, 24, 3], seed=1)
    lower, upper = random_boxes(3, 4, 0.4, seed=2)
    coefficients = torch.randn(
        5, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(3)
    )
    intermediate = interval_bounds(net, lower, upper)

    start = dual_bound(net, lower, upper, coefficients, intermediate, steps=0)
    tuned = dual_bound(net, lower, upper, coefficients, intermediate, steps=60)
    minimum = empirical_minimum(net, lower, upper, coefficients)

    assert start.shape == tuned.shape == (3, 5) and tuned.dtype == torch.float64
    assert bool((tuned <= minimum + 1e-9).all()), (tuned - minimum).max()
    # The best bound seen: never below the start, and better somewhere.
    assert bool((tuned >= start).all())
    assert float((tuned - start).mean()) > 1e-3 * float((minimum - start).mean())


def test_sigmoid_bound_holds_on_a_dense_grid():
    torch.manual_seed(4)
    net = nn.Sequential(
        nn.Linear(2, 16), nn.Sigmoid(), nn.Linear(16, 16), nn.Sigmoid(), nn.Linear(16, 2)
    ).double()
    net[0].weight.data *= 4  # steep sigmoids, where a relaxation is easiest to get wrong
    lower = torch.tensor([[-1.0, -0.5], [0.2, 0.1]], dtype=torch.float64)
    upper = lower + torch.tensor([[1.5, 1.0], [0.3, 0.9]], dtype=torch.float64)
    coefficients = torch.tensor([[1.0, -1.0], [-2.0, 0.5], [0.0, 1.0]], dtype=torch.float64)
    intermediate = interval_bounds(net, lower, upper)

    bound = dual_bound(net, lower, upper, coefficients, intermediate, steps=100)

    t = torch.linspace(0, 1, 301, dtype=torch.float64)
    grid = torch.cartesian_prod(t, t)
    for b in range(2):
        points = lower[b] + grid * (upper[b] - lower[b])
        minimum = (net(points).detach() @ coefficients.T).min(0).values
        assert bool((bound[b] <= minimum + 1e-9).all()), (bound[b], minimum)
        # Not vacuous: within a loose distance of the truth on a small box.
        assert bool((minimum - bound[b] < 2.0).all())


def _lp_value(net, lower, upper, c, pre_lo, pre_hi):
    """min c @ net(x) over the box with the triangle relaxation of each unstable ReLU."""
    w0, b0 = net[0].weight.detach().numpy(), net[0].bias.detach().numpy()
    w1, b1 = net[2].weight.detach().numpy(), net[2].bias.detach().numpy()
    inputs, hidden = w0.shape[1], w0.shape[0]
    objective = np.concatenate([np.zeros(inputs), c @ w1])
    rows, rhs = [], []
    bounds = list(zip(lower, upper))
    for j in range(hidden):
        lo, hi = pre_lo[j], pre_hi[j]
        z_row = np.concatenate([w0[j], np.zeros(hidden)])
        y_row = np.zeros(inputs + hidden)
        y_row[inputs + j] = 1
        if hi <= 0:
            bounds.append((0, 0))
        elif lo >= 0:  # y = z: two inequalities
            bounds.append((None, None))
            rows += [z_row - y_row, y_row - z_row]
            rhs += [-b0[j], b0[j]]
        else:  # y >= 0, y >= z, y <= hi (z - lo) / (hi - lo)
            bounds.append((0, None))
            slope = hi / (hi - lo)
            rows += [z_row - y_row, y_row - slope * z_row]
            rhs += [-b0[j], slope * (b0[j] - lo)]
    result = linprog(objective, A_ub=np.array(rows), b_ub=np.array(rhs), bounds=bounds)
    assert result.status == 0, result.message
    return result.fun + c @ b1


def test_one_hidden_layer_relu_reaches_the_lp_value():
    net = random_net("relu", [5, 30, 3], seed=5)
    lower, upper = random_boxes(2, 5, 0.4, seed=6)
    coefficients = torch.randn(
        3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(7)
    )
    intermediate = interval_bounds(net, lower, upper)

    start = dual_bound(net, lower, upper, coefficients, intermediate, steps=0)
    bound = dual_bound(net, lower, upper, coefficients, intermediate, steps=400)

    ((pre_lo, pre_hi),) = intermediate
    for b in range(2):
        for s in range(3):
            lp = _lp_value(
                net,
                lower[b].numpy(),
                upper[b].numpy(),
                coefficients[s].numpy(),
                pre_lo[b].numpy(),
                pre_hi[b].numpy(),
            )
            # Weak duality: never above the LP; and most of the way there from CROWN's start.
            assert float(bound[b, s]) <= lp + 1e-7
            assert lp - float(bound[b, s]) <= 0.05 * (lp - float(start[b, s])) + 1e-3, (
                lp,
                float(bound[b, s]),
                float(start[b, s]),
            )


def test_convolutional_network_with_normalisation_and_reshapes():
    torch.manual_seed(8)
    net = nn.Sequential(
        Reshape((1, 6, 6)),
        ElementwiseAffine(torch.tensor([[[2.0]]]), torch.tensor([[[-0.5]]])),
        nn.Conv2d(1, 3, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(3, 4, 2, stride=1),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(4 * 2 * 2, 3),
    ).double()
    lower, upper = random_boxes(2, 36, 0.1, seed=9)
    coefficients = torch.tensor([[1.0, -1.0, 0.0], [0.0, 1.0, -1.0]], dtype=torch.float64)
    intermediate = interval_bounds(net, lower, upper)

    bound = dual_bound(net, lower, upper, coefficients, intermediate, steps=40)
    minimum = empirical_minimum(net, lower, upper, coefficients, samples=2000, pgd_steps=40)

    assert bound.shape == (2, 2)
    assert bool((bound <= minimum + 1e-9).all()), (bound, minimum)


def test_a_flat_box_reaches_a_convolution_as_square_images():
    torch.manual_seed(10)
    net = nn.Sequential(nn.Conv2d(2, 2, 3, stride=2), nn.ReLU(), nn.Flatten(), nn.Linear(8, 1))
    net = net.double()
    lower, upper = random_boxes(1, 2 * 5 * 5, 0.05, seed=11)
    intermediate = interval_bounds(net, lower, upper, input_shape=(2, 5, 5))
    coefficients = torch.ones(1, 1, dtype=torch.float64)

    flat = dual_bound(net, lower, upper, coefficients, intermediate, steps=5)
    shaped = dual_bound(
        net, lower, upper, coefficients, intermediate, steps=5, input_shape=(2, 5, 5)
    )

    torch.testing.assert_close(flat, shaped)
    minimum = empirical_minimum(net, lower, upper, coefficients, input_shape=(2, 5, 5))
    assert float(flat) <= float(minimum)


def test_adjoints_are_transposes_of_the_forward_maps():
    torch.manual_seed(12)
    net = nn.Sequential(
        Reshape((2, 7, 7)),
        nn.Conv2d(2, 3, 3, stride=2, padding=1, dilation=1),
        nn.Conv2d(3, 2, 2, stride=3),  # 4x4 -> 1x1: the stride skips a row and a column
        ElementwiseAffine(torch.randn(2, 1, 1), torch.randn(2, 1, 1)),
        nn.Flatten(),
        nn.Linear(2, 5),
    )
    (block,), kinds = _split_network(net, (98,), torch.float64, torch.device("cpu"))
    x = torch.randn(4, 98, dtype=torch.float64)
    v = torch.randn(4, 5, dtype=torch.float64)

    forward = net.double()(x).detach() - block.bias
    assert kinds == []
    torch.testing.assert_close((forward * v).sum(1), (x * block.adjoint(v)).sum(1))


def test_an_affine_network_gets_its_exact_minimum():
    net = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2)).double()
    lower, upper = random_boxes(2, 3, 0.5, seed=13)
    coefficients = torch.tensor([[1.0, 2.0]], dtype=torch.float64)

    bound = dual_bound(net, lower, upper, coefficients, [], steps=10)

    weight = (coefficients @ net[1].weight @ net[0].weight).detach()
    offset = (coefficients @ (net[1].weight @ net[0].bias + net[1].bias)).detach()
    exact = torch.where(weight > 0, lower[:, None], upper[:, None]).mul(weight).sum(-1) + offset
    torch.testing.assert_close(bound, exact)


def test_per_box_coefficients_and_a_zero_time_limit():
    net = random_net("relu", [3, 10, 2], seed=14)
    lower, upper = random_boxes(2, 3, 0.3, seed=15)
    intermediate = interval_bounds(net, lower, upper)
    shared = torch.tensor([[1.0, -1.0]], dtype=torch.float64)

    per_box = dual_bound(net, lower, upper, shared.expand(2, 1, 2), intermediate, steps=20)
    together = dual_bound(net, lower, upper, shared, intermediate, steps=20)
    at_start = dual_bound(net, lower, upper, shared, intermediate, steps=0)
    no_time = dual_bound(net, lower, upper, shared, intermediate, steps=20, time_limit=0)

    torch.testing.assert_close(per_box, together)
    torch.testing.assert_close(no_time, at_start)
    empty = dual_bound(
        net, lower[:0], upper[:0], shared, [(p[:0], q[:0]) for p, q in intermediate], steps=3
    )
    assert empty.shape == (0, 1)


def test_bad_input_names_the_argument():
    net = random_net("relu", [3, 4, 2], seed=16)
    lower, upper = random_boxes(2, 3, 0.1, seed=17)
    intermediate = interval_bounds(net, lower, upper)
    c = torch.ones(1, 2, dtype=torch.float64)

    with pytest.raises(ValueError, match="intermediate must hold one"):
        dual_bound(net, lower, upper, c, [], steps=1)
    with pytest.raises(ValueError, match=r"intermediate\[0\] must be two \[B, units\]"):
        dual_bound(net, lower, upper, c, [(lower, upper)], steps=1)
    with pytest.raises(ValueError, match="lower must not exceed upper"):
        dual_bound(net, upper, lower, c, intermediate, steps=1)
    with pytest.raises(ValueError, match="coefficients must have 2 columns"):
        dual_bound(net, lower, upper, torch.ones(1, 3), intermediate, steps=1)
    with pytest.raises(ValueError, match="steps must be a non-negative integer"):
        dual_bound(net, lower, upper, c, intermediate, steps=-1)
    with pytest.raises(ValueError, match=r"layer 1 \(ELU\)"):
        dual_bound(nn.Sequential(nn.Linear(3, 2), nn.ELU()), lower, upper, c, [], steps=1)
    with pytest.raises(ValueError, match="nn.Linear at index 0 expects 5"):
        dual_bound(nn.Sequential(nn.Linear(5, 2)), lower, upper, c, [], steps=1)
    with pytest.raises(ValueError, match="not square images"):
        dual_bound(nn.Sequential(nn.Conv2d(1, 1, 1)), lower, upper, c, [], steps=1)
