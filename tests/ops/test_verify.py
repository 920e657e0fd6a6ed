"""The verify family's kernels: hand-worked answers, the plain-PyTorch references, soundness of
the relaxations and dual maxima on dense grids, gradients, opcheck and bad input."""

import pytest
import torch

from deepkern.ops import verify
from tests.conftest import DEVICES

F32, F64 = torch.float32, torch.float64
DTYPES = [F32, F64]
SMOOTH = ("sigmoid", "tanh")
ACT = {"relu": torch.relu, "sigmoid": torch.sigmoid, "tanh": torch.tanh}
# Kernel against reference: both compute in float64, so float32 results agree to an ulp or two,
# float64 ones to rounding. Smooth relaxations differ more where the tangent point is
# ill-conditioned (the tangent gap is flat near a tangent point close to 0): there the kernel's
# Newton search and the reference's bisection may decide a sign differently, and both slopes
# are sound.
TOLERANCE = {F32: dict(rtol=3e-7, atol=3e-7), F64: dict(rtol=1e-11, atol=1e-12)}
SMOOTH_TOLERANCE = {F32: TOLERANCE[F32], F64: dict(rtol=1e-7, atol=1e-8)}


def _intervals(n: int, dtype, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random intervals over many scales: centres from 1e-3 to 1e3, widths from 1e-8 to 1e6,
    about a third on each side of 0 and a third across it, some of width 0."""
    g = torch.Generator().manual_seed(seed)
    centre = torch.randn(n, generator=g, dtype=F64) * 10 ** (torch.rand(n, generator=g) * 6 - 3)
    width = 10 ** (torch.rand(n, generator=g, dtype=F64) * 14 - 8)
    lower = centre - width * torch.rand(n, generator=g, dtype=F64)
    upper = lower + width
    upper[::17] = lower[::17]
    lower, upper = lower.to(dtype), upper.to(dtype)
    return lower, torch.maximum(upper, lower)


def _grid(lower: torch.Tensor, upper: torch.Tensor, points: int) -> torch.Tensor:
    """points values of lower's dtype from lower to upper per interval, ends included."""
    k = torch.linspace(0, 1, points, dtype=F64)
    x = lower.double()[:, None] + (upper.double() - lower.double())[:, None] * k
    x = x.to(lower.dtype)
    return torch.minimum(torch.maximum(x, lower[:, None]), upper[:, None])


# ---------------------------------------------------------------------------------------------
# Hand-worked answers


def test_interval_linear_hand_worked():
    lower = torch.tensor([[-1.0, 0.0], [2.0, 2.0]], dtype=F64)
    upper = torch.tensor([[1.0, 2.0], [2.0, 3.0]], dtype=F64)
    weight = torch.tensor([[1.0, -1.0], [2.0, 0.5]], dtype=F64)
    out_lower, out_upper = verify.interval_linear(
        lower, upper, weight, torch.tensor([0.5, 0.0], dtype=F64)
    )
    # x1 - x2 + 0.5 over [-1, 1] x [0, 2] is [-2.5, 1.5]; 2 x1 + x2 / 2 is [-2, 3].
    assert out_lower.tolist() == [[-2.5, -2.0], [-0.5, 5.0]]
    assert out_upper.tolist() == [[1.5, 3.0], [0.5, 5.5]]


def test_relu_relaxation_hand_worked():
    lower = torch.tensor([-1.0, -3.0, 0.5, -2.0, 0.0], dtype=F64)
    upper = torch.tensor([3.0, 1.0, 2.0, -1.0, 0.0], dtype=F64)
    ls, lb, us, ub = verify.activation_relaxation(lower, upper, "relu")
    assert ls.tolist() == [1.0, 0.0, 1.0, 0.0, 1.0]
    assert lb.tolist() == [0.0] * 5
    assert us.tolist() == [0.75, 0.25, 1.0, 0.0, 1.0]
    assert ub.tolist() == pytest.approx([0.75, 0.75, 0.0, 0.0, 0.0], rel=1e-14)
    slope = torch.full_like(lower, 0.3)
    ls, *_ = verify.activation_relaxation(lower, upper, "relu", slope)
    assert ls.tolist() == [0.3, 0.3, 1.0, 0.0, 1.0]


def test_smooth_relaxation_on_one_sided_pieces():
    # Convex piece [-3, -1]: chord above, tangent at the midpoint -2 below; the concave piece
    # [1, 3] mirrors it.
    for kind in SMOOTH:
        act = ACT[kind]
        lower, upper = torch.tensor([-3.0, 1.0], dtype=F64), torch.tensor([-1.0, 3.0], dtype=F64)
        ls, lb, us, ub = verify.activation_relaxation(lower, upper, kind)
        chord = (act(upper) - act(lower)) / 2
        middle = torch.tensor([-2.0, 2.0], dtype=F64)
        tangent = torch.func.vmap(torch.func.grad(act))(middle)
        torch.testing.assert_close(torch.stack([us[0], ls[1]]), chord, rtol=1e-14, atol=0)
        torch.testing.assert_close(torch.stack([ls[0], us[1]]), tangent, rtol=1e-14, atol=0)
        # The chord passes through the ends, the tangent through the midpoint (up to margin).
        assert abs(float(us[0] * -1 + ub[0] - act(torch.tensor(-1.0, dtype=F64)))) < 1e-14
        assert abs(float(ls[0] * -2 + lb[0] - act(torch.tensor(-2.0, dtype=F64)))) < 1e-14


def test_crossing_relaxation_touches_the_curve():
    # Across 0 the upper line goes through (lower, act(lower)) and touches the concave side:
    # no line through that point with a smaller slope stays above.
    lower = torch.tensor([-4.0, -0.5, -20.0], dtype=F64)
    upper = torch.tensor([6.0, 8.0, 30.0], dtype=F64)
    for kind in SMOOTH:
        act = ACT[kind]
        _, _, us, ub = verify.activation_relaxation(lower, upper, kind)
        x = _grid(lower, upper, 200001)[:, 1:]
        best_chord = ((act(x) - act(lower)[:, None]) / (x - lower[:, None])).amax(1)
        assert (us >= best_chord - 1e-12).all() and (us <= best_chord + 1e-8).all()
        torch.testing.assert_close(us * lower + ub, act(lower), rtol=0, atol=1e-14)


def test_dual_max_hand_worked():
    lower = torch.tensor([-2.0, -2.0, -1.0, -5.0], dtype=F64)
    upper = torch.tensor([1.0, 1.0, 3.0, 5.0], dtype=F64)
    linear = torch.tensor([-0.5, 0.5, -2.0, 0.0], dtype=F64)
    act = torch.tensor([1.0, -1.0, 1.0, 0.0], dtype=F64)
    value, argmax = verify.dual_activation_max(lower, upper, linear, act, "relu")
    # -0.5 z + relu(z): 1 at z = -2; 0.5 z - relu(z): 0 at z = 0; -2 z + relu(z): 2 at -1;
    # 0: the first end.
    assert value.tolist() == pytest.approx([1.0, 0.0, 2.0, 0.0], rel=1e-14, abs=1e-15)
    assert argmax.tolist() == [-2.0, 0.0, -1.0, -5.0]
    # On [-1, 3], tanh(z) - z / 2 peaks where 1 - tanh^2 = 1/2, at z = atanh(sqrt(1/2)).
    z0 = torch.atanh(torch.tensor(0.5, dtype=F64).sqrt())
    value, argmax = verify.dual_activation_max(
        torch.tensor(-1.0, dtype=F64), torch.tensor(3.0, dtype=F64), -0.5 * act[0], act[0], "tanh"
    )
    torch.testing.assert_close(argmax, z0, rtol=1e-14, atol=0)
    torch.testing.assert_close(value, torch.tanh(z0) - z0 / 2, rtol=1e-14, atol=0)


# ---------------------------------------------------------------------------------------------
# Against the references


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_interval_linear_matches_reference(device, dtype):
    g = torch.Generator().manual_seed(1)
    lower = torch.randn(3, 4, 7, generator=g, dtype=dtype)
    upper = lower + torch.rand(3, 4, 7, generator=g, dtype=dtype)
    weight = torch.randn(5, 7, generator=g, dtype=dtype)
    bias = torch.randn(5, generator=g, dtype=dtype)
    for b in (bias, None):
        want = verify.reference_interval_linear(lower, upper, weight, b)
        args = [t.to(device) if t is not None else None for t in (lower, upper, weight, b)]
        got = verify.interval_linear(*args)
        for x, y in zip(got, want):
            assert x.shape == (3, 4, 5) and x.dtype == dtype
            torch.testing.assert_close(x.cpu(), y, rtol=1e-5 if dtype == F32 else 1e-12, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", verify.ACTIVATIONS)
def test_activation_relaxation_matches_reference(device, dtype, kind):
    lower, upper = _intervals(3000, dtype, seed=2)
    slope_options = [None]
    if kind == "relu":
        slope_options.append(torch.rand(3000, generator=torch.Generator().manual_seed(3)).to(dtype))
    for slope in slope_options:
        want = verify.reference_activation_relaxation(lower, upper, kind, slope)
        args = [t.to(device) if t is not None else None for t in (lower, upper, slope)]
        got = verify.activation_relaxation(args[0], args[1], kind, args[2])
        for x, y in zip(got, want):
            assert x.shape == lower.shape and x.dtype == dtype
            tolerance = TOLERANCE if kind == "relu" else SMOOTH_TOLERANCE
            torch.testing.assert_close(x.cpu(), y, **tolerance[dtype])


def _dual_inputs(n: int, dtype, seed: int):
    g = torch.Generator().manual_seed(seed)
    lower = torch.randn(n, generator=g, dtype=F64) * 4
    upper = lower + torch.rand(n, generator=g, dtype=F64) * 8
    linear = torch.randn(n, generator=g, dtype=F64)
    act = torch.randn(n, generator=g, dtype=F64) * 4
    act[::7] = 0
    linear[::11] = 0
    upper[::13] = lower[::13]
    return [t.to(dtype) for t in (lower, upper, linear, act)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", verify.ACTIVATIONS)
def test_dual_activation_max_matches_reference(device, dtype, kind):
    inputs = _dual_inputs(3000, dtype, seed=4)
    want_value, want_argmax = verify.reference_dual_activation_max(*inputs, kind)
    value, argmax = verify.dual_activation_max(*[t.to(device) for t in inputs], kind)
    torch.testing.assert_close(value.cpu(), want_value, **TOLERANCE[dtype])
    # Maximisers may differ only where two candidates tie; then both reach the value.
    lower, upper, linear, act = (t.double() for t in inputs)
    z = argmax.cpu().double()
    reached = linear * z + act * ACT[kind](z)
    assert ((z >= lower) & (z <= upper)).all()
    torch.testing.assert_close(reached, value.cpu().double(), rtol=2e-6, atol=2e-6)


# ---------------------------------------------------------------------------------------------
# Soundness on dense grids


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", verify.ACTIVATIONS)
def test_relaxation_encloses_the_activation_on_grids(dtype, kind):
    lower, upper = _intervals(2000, dtype, seed=5)
    # Intervals that matter in practice too: one-sided, across 0, tiny, huge, on the edges.
    extra = torch.tensor(
        [[-1e6, 1e6], [-1e-7, 1e-7], [-30.0, -29.0], [40.0, 41.0], [-1e-30, 5.0], [-5.0, 1e-30]]
        + [[-1.0, 1.0], [0.0, 0.0], [0.0, 2.0], [-2.0, 0.0], [1.0, 1.0 + 1e-6], [-700.0, 1.0]]
        + [[-1e30, 1e30], [-1e15, 3.0], [-3.0, 1e15], [-1e-40, 1.0], [-1.0, 1e-40]],
        dtype=dtype,
    )
    lower, upper = torch.cat([lower, extra[:, 0]]), torch.cat([upper, extra[:, 1]])
    ls, lb, us, ub = (t.double()[:, None] for t in verify.activation_relaxation(lower, upper, kind))
    x = _grid(lower, upper, 1001)
    exact = ACT[kind](x.double())
    in_dtype = ACT[kind](x).double()
    # The lines evaluated exactly (float64 is exact here for float32 coefficients and points
    # up to rounding far below the margin) enclose both the exact and the dtype's activation.
    below = ls * x.double() + lb
    above = us * x.double() + ub
    assert (below <= torch.minimum(exact, in_dtype)).all()
    assert (above >= torch.maximum(exact, in_dtype)).all()
    if kind != "relu":
        # Tight: the lines meet the curve to within the margin somewhere on every interval.
        eps = torch.finfo(dtype).eps
        assert ((above - exact).amin(1) <= 64 * eps).all()
        assert ((exact - below).amin(1) <= 64 * eps).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", verify.ACTIVATIONS)
def test_dual_value_bounds_the_grid_maximum(dtype, kind):
    lower, upper, linear, act = _dual_inputs(2000, dtype, seed=6)
    # Every sign of both coefficients, and ratios near the peak slope.
    linear = linear * torch.tensor([1.0, -1.0], dtype=dtype).repeat(1000)
    act[5::9] = -4 * linear[5::9]
    value, argmax = verify.dual_activation_max(lower, upper, linear, act, kind)
    points = 20001
    x = _grid(lower, upper, points).double()
    a, c = linear.double()[:, None], act.double()[:, None]
    objective = a * x + c * ACT[kind](x)
    grid_max = objective.amax(1)
    assert (value.double() >= grid_max).all()
    # Within grid resolution: the slope of the objective is at most |a| + |c| peak.
    step = (upper.double() - lower.double()) / (points - 1)
    resolution = step * (linear.double().abs() + act.double().abs()) + 1e-5
    assert (value.double() - grid_max <= resolution).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_relu_chord_rounds_up_to_the_next_representable_value(dtype):
    # Float32 results round up by one ulp where the float64 value falls between two floats:
    # the chord's slope and bias are the smallest values of the dtype at or above their
    # float64 values (float64 biases carry a margin of a few ulps on top).
    lower, upper = _intervals(4000, dtype, seed=9)
    extra = torch.tensor([[-1e-40, 1.0], [-1.0, 1e-40], [-3.0, 7.0], [-1e-30, 1e30]], dtype=dtype)
    lower, upper = torch.cat([lower, extra[:, 0]]), torch.cat([upper, extra[:, 1]])
    unstable = (lower < 0) & (upper > 0)
    lower, upper = lower[unstable], upper[unstable]
    _, _, slope, bias = verify.activation_relaxation(lower, upper, "relu")
    exact_slope = upper.double() / (upper.double() - lower.double())
    exact_bias = -slope.double() * lower.double()
    assert (slope.double() >= exact_slope).all() and (bias.double() >= exact_bias).all()
    if dtype == F32:
        below = torch.nextafter(slope, torch.tensor(-float("inf")))
        assert (below.double() < exact_slope).all()
        below = torch.nextafter(bias, torch.tensor(-float("inf")))
        assert (below.double() < exact_bias).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_bad_value_deep_in_a_large_input_is_named(dtype):
    # Past the first parallel range: the vectorised loops flag a range and name its bad entry.
    n, index = 100_000, 77_777
    lower = torch.linspace(-2, 1, n, dtype=dtype)
    upper = lower + 1
    linear, act = torch.ones(n, dtype=dtype), -torch.ones(n, dtype=dtype)
    nan = float("nan")
    cases = [
        (f"lower must be finite.*nan.*flat index {index}", "lower", nan),
        (f"upper must be finite.*inf.*flat index {index}", "upper", float("inf")),
        (f"lower must not exceed upper.*flat index {index}", "lower", 5.0),
    ]
    for message, name, value in cases:
        bad = {"lower": lower.clone(), "upper": upper.clone()}
        bad[name][index] = value
        with pytest.raises(RuntimeError, match=message):
            verify.activation_relaxation(bad["lower"], bad["upper"], "relu")
        with pytest.raises(RuntimeError, match=message):
            verify.dual_activation_max(bad["lower"], bad["upper"], linear, act, "relu")
        with pytest.raises(RuntimeError, match=message):
            verify.interval_linear(
                bad["lower"].view(1000, 100),
                bad["upper"].view(1000, 100),
                torch.ones(3, 100, dtype=dtype),
            )
    slope = torch.full((n,), 0.5, dtype=dtype)
    slope[index] = 1.5
    with pytest.raises(RuntimeError, match=f"relu_lower_slope must lie.*flat index {index}"):
        verify.activation_relaxation(lower, upper, "relu", slope)
    act[index] = nan
    with pytest.raises(RuntimeError, match=f"act_coef must be finite.*flat index {index}"):
        verify.dual_activation_max(lower, upper, linear, act, "relu")


# ---------------------------------------------------------------------------------------------
# Gradients


def test_interval_linear_gradcheck():
    g = torch.Generator().manual_seed(7)
    lower = torch.randn(2, 3, 4, generator=g, dtype=F64)
    upper = (lower + torch.rand(2, 3, 4, generator=g, dtype=F64)).requires_grad_()
    lower.requires_grad_()
    weight = torch.randn(5, 4, generator=g, dtype=F64, requires_grad=True)
    bias = torch.randn(5, generator=g, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(verify.interval_linear, (lower, upper, weight, bias))
    assert torch.autograd.gradcheck(
        lambda lo, hi, w: verify.interval_linear(lo, hi, w), (lower, upper, weight)
    )


def test_relu_relaxation_gradcheck():
    g = torch.Generator().manual_seed(8)
    lower = (-torch.rand(20, generator=g, dtype=F64) * 2 + 0.5).requires_grad_()
    upper = (lower.detach() + 0.2 + torch.rand(20, generator=g, dtype=F64)).requires_grad_()
    slope = torch.rand(20, generator=g, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda lo, hi, s: verify.activation_relaxation(lo, hi, "relu", s), (lower, upper, slope)
    )
    ls, *_ = verify.activation_relaxation(lower.detach(), upper.detach(), "relu", slope)
    (grad,) = torch.autograd.grad(ls.sum(), slope)
    unstable = (lower < 0) & (upper > 0)
    assert grad.tolist() == unstable.to(F64).tolist()


@pytest.mark.parametrize("kind", verify.ACTIVATIONS)
def test_dual_max_gradcheck(kind):
    lower, upper, linear, act = _dual_inputs(40, F64, seed=9)
    # No zero-width intervals and no zero coefficients: away from ties between candidates the
    # maximiser moves smoothly.
    upper = upper + 0.1
    linear, act = linear + 0.3 * linear.sign() + 0.01, act + 0.3 * act.sign() + 0.01
    tensors = [t.clone().requires_grad_() for t in (lower, upper, linear, act)]
    assert torch.autograd.gradcheck(
        lambda *t: verify.dual_activation_max(*t, kind)[0], tensors, atol=1e-6
    )


def test_dual_max_broadcasts_and_reduces_gradients():
    g = torch.Generator().manual_seed(10)
    lower = torch.randn(6, generator=g, dtype=F64)
    upper = (lower + torch.rand(6, generator=g, dtype=F64) + 0.1).requires_grad_()
    lower.requires_grad_()
    linear = torch.randn(4, 6, generator=g, dtype=F64, requires_grad=True)
    act = torch.randn(1, 6, generator=g, dtype=F64, requires_grad=True)
    value, argmax = verify.dual_activation_max(lower, upper, linear, act, "sigmoid")
    want, _ = verify.reference_dual_activation_max(
        lower.detach().expand(4, 6), upper.detach().expand(4, 6), linear.detach(),
        act.detach().expand(4, 6), "sigmoid",
    )  # fmt: skip
    assert value.shape == (4, 6) and not argmax.requires_grad
    torch.testing.assert_close(value.detach(), want, **TOLERANCE[F64])
    assert torch.autograd.gradcheck(
        lambda *t: verify.dual_activation_max(*t, "sigmoid")[0], (lower, upper, linear, act)
    )


def test_smooth_relaxation_refuses_gradients_of_bounds():
    lower = torch.tensor([-1.0], requires_grad=True)
    with pytest.raises(ValueError, match="not differentiable in lower and upper"):
        verify.activation_relaxation(lower, lower.detach() + 1, "tanh")
    with torch.no_grad():
        verify.activation_relaxation(lower, lower + 1, "tanh")


@pytest.mark.parametrize("kind", verify.ACTIVATIONS)
def test_opcheck(kind):
    g = torch.Generator().manual_seed(11)
    lower = torch.randn(3, 5, generator=g, dtype=F64)
    upper = lower + torch.rand(3, 5, generator=g, dtype=F64)
    linear, act = torch.randn(3, 5, generator=g, dtype=F64), torch.randn(5, generator=g, dtype=F64)
    code = verify.KIND_CODES[kind]
    slope = torch.rand(3, 5, generator=g, dtype=F64, requires_grad=True) if kind == "relu" else None
    bounds = [lower.clone().requires_grad_(kind == "relu"), upper.clone().requires_grad_(False)]
    torch.library.opcheck(torch.ops.deepkern.activation_relaxation, (*bounds, code, slope))
    torch.library.opcheck(
        torch.ops.deepkern.dual_activation_max,
        (lower.clone().requires_grad_(), upper, linear.requires_grad_(), act, code),
    )
    weight = torch.randn(4, 5, generator=g, dtype=F64, requires_grad=True)
    torch.library.opcheck(torch.ops.deepkern.interval_linear, (lower, upper, weight, None))


def test_compiles_without_graph_breaks():
    lower, upper, linear, act = _dual_inputs(16, torch.float32, seed=12)

    @torch.compile(fullgraph=True, backend="eager")
    def bound(lower, upper, linear, act):
        lo, hi = verify.interval_linear(lower[None], upper[None], torch.eye(16))
        ls, lb, us, ub = verify.activation_relaxation(lo, hi, "relu")
        return verify.dual_activation_max(lo, hi, linear, act, "tanh")[0].sum() + us.sum()

    want = verify.dual_activation_max(lower[None], upper[None], linear, act, "tanh")[0].sum()
    want = want + verify.activation_relaxation(lower, upper, "relu")[2].sum()
    torch.testing.assert_close(bound(lower, upper, linear, act), want)


# ---------------------------------------------------------------------------------------------
# Edge cases and bad input


@pytest.mark.parametrize("device", DEVICES)
def test_empty_inputs(device):
    empty = torch.empty(0, 3, device=device)
    out = verify.interval_linear(empty, empty, torch.randn(2, 3, device=device))
    assert [t.shape for t in out] == [(0, 2)] * 2
    out = verify.interval_linear(
        torch.zeros(4, 0, device=device), torch.zeros(4, 0, device=device),
        torch.randn(2, 0, device=device), torch.ones(2, device=device),
    )  # fmt: skip
    assert out[0].tolist() == [[1.0, 1.0]] * 4
    for kind in verify.ACTIVATIONS:
        assert all(t.shape == (0, 3) for t in verify.activation_relaxation(empty, empty, kind))
        value, argmax = verify.dual_activation_max(empty, empty, empty, empty, kind)
        assert value.shape == argmax.shape == (0, 3)


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_inputs(device):
    g = torch.Generator().manual_seed(13)
    base_lower = torch.randn(8, 6, generator=g, dtype=F64)
    base_upper = base_lower + torch.rand(8, 6, generator=g, dtype=F64)
    lower, upper = base_lower.T.to(device), base_upper.T.to(device)  # [6, 8], transposed
    weight = torch.randn(8, 5, generator=g, dtype=F64).T.to(device)  # [5, 8], transposed
    got = verify.interval_linear(lower, upper, weight)
    want = verify.reference_interval_linear(lower.cpu(), upper.cpu(), weight.cpu(), None)
    for x, y in zip(got, want):
        torch.testing.assert_close(x.cpu(), y)
    for kind in verify.ACTIVATIONS:
        got = verify.activation_relaxation(lower[:, ::2], upper[:, ::2], kind)
        want = verify.activation_relaxation(lower[:, ::2].contiguous(), upper[:, ::2].clone(), kind)
        for x, y in zip(got, want):
            assert torch.equal(x, y)
        coef = torch.randn(8, 6, generator=g, dtype=F64).T.to(device)
        got = verify.dual_activation_max(lower, upper, coef, coef[:, :1], kind)
        want = verify.dual_activation_max(
            lower.contiguous(), upper.contiguous(), coef.contiguous(), coef[:, :1].clone(), kind
        )
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_bad_inputs_name_the_argument():
    lower, upper = torch.tensor([-1.0, 0.0, 1.0]), torch.tensor([1.0, 2.0, 3.0])
    bad = {
        "lower must not exceed upper.*flat index 1": (torch.tensor([-1.0, 3.0, 1.0]), upper),
        "lower must be finite.*nan.*flat index 2": (torch.tensor([-1.0, 0.0, float("nan")]), upper),
        "upper must be finite.*inf": (lower, torch.tensor([1.0, float("inf"), 3.0])),
        "upper must have the shape of lower": (lower, upper[:2]),
        "upper must have the dtype of lower": (lower, upper.double()),
        "lower must be float32 or float64": (lower.half(), upper.half()),
    }
    for message, (lo, hi) in bad.items():
        with pytest.raises(RuntimeError, match=message):
            verify.activation_relaxation(lo, hi, "sigmoid")
        if "shape" not in message:
            with pytest.raises(RuntimeError, match=message):
                verify.dual_activation_max(lo, hi, lower, lower, "relu")
            with pytest.raises(RuntimeError, match=message):
                verify.interval_linear(lo, hi, torch.ones(2, 3, dtype=lo.dtype))

    with pytest.raises(ValueError, match="kind must be one of"):
        verify.activation_relaxation(lower, upper, "gelu")
    with pytest.raises(ValueError, match="kind must be one of"):
        verify.dual_activation_max(lower, upper, lower, upper, "softplus")
    with pytest.raises(RuntimeError, match="kind must be 0 \\(relu\\), 1"):
        torch.ops.deepkern.activation_relaxation(lower, upper, 7, None)
    with pytest.raises(RuntimeError, match="relu_lower_slope must lie in \\[0, 1\\].*1.5"):
        verify.activation_relaxation(lower, upper, "relu", torch.tensor([0.0, 1.5, 1.0]))
    with pytest.raises(RuntimeError, match="relu_lower_slope must lie in \\[0, 1\\].*nan"):
        verify.activation_relaxation(lower, upper, "relu", torch.tensor([0.0, float("nan"), 1.0]))
    with pytest.raises(ValueError, match="relu_lower_slope applies to kind 'relu' only"):
        verify.activation_relaxation(lower, upper, "tanh", torch.zeros(3))
    with pytest.raises(RuntimeError, match="relu_lower_slope must have the shape of lower"):
        verify.activation_relaxation(lower, upper, "relu", torch.zeros(2))
    with pytest.raises(RuntimeError, match="linear_coef must be finite"):
        verify.dual_activation_max(lower, upper, torch.tensor(float("nan")), lower, "tanh")
    with pytest.raises(RuntimeError, match="act_coef must be finite"):
        verify.dual_activation_max(lower, upper, lower, torch.tensor(float("-inf")), "tanh")
    with pytest.raises(RuntimeError, match="act_coef of shape \\[2\\] does not broadcast"):
        verify.dual_activation_max(lower, upper, lower, torch.ones(2), "tanh")
    with pytest.raises(RuntimeError, match="linear_coef must have the dtype of lower"):
        verify.dual_activation_max(lower, upper, lower.double(), lower, "tanh")
    with pytest.raises(RuntimeError, match="weight must have shape \\[m, 3\\]"):
        verify.interval_linear(lower, upper, torch.ones(2, 4))
    with pytest.raises(RuntimeError, match="bias must have shape \\[2\\]"):
        verify.interval_linear(lower, upper, torch.ones(2, 3), torch.ones(3))
    with pytest.raises(RuntimeError, match="weight must have the dtype of lower"):
        verify.interval_linear(lower, upper, torch.ones(2, 3, dtype=F64))
