"""The momentum ops against their plain-PyTorch references, in float and exact modes."""

import math

import pytest
import torch

from deepkern.ops import momentum as ops
from tests.conftest import DEVICES

TOLERANCES = {
    torch.float32: dict(rtol=1e-6, atol=1e-6),
    torch.float64: dict(rtol=1e-12, atol=1e-12),
    torch.float16: dict(rtol=2e-3, atol=2e-3),
    torch.bfloat16: dict(rtol=1.6e-2, atol=1.6e-2),
}
FLOAT_OPS = [
    (ops.forward, ops.reference_forward),
    (ops.inverse, ops.reference_inverse),
    (ops.backward, ops.reference_backward),
]
SHAPES = [(7,), (3, 5, 4), (0,), (2, 0, 3), (1,)]


def _layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    """The same values as a contiguous, permuted or sliced tensor."""
    if layout == "permuted" and t.dim() >= 2:
        return t.transpose(0, -1).contiguous().transpose(0, -1)
    if layout == "sliced" and t.numel() > 0:
        wide = torch.cat([t, t], dim=-1)
        return wide[..., : t.shape[-1]]
    return t


def _inputs(shape, dtype, device, layout="contiguous", seed=0):
    g = torch.Generator().manual_seed(seed)
    tensors = [torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(3)]
    return [_layout(t.to(dtype=dtype, device=device), layout) for t in tensors]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("layout", ["contiguous", "permuted", "sliced"])
@pytest.mark.parametrize("op,reference", FLOAT_OPS)
def test_float_ops_match_reference(op, reference, layout, shape, dtype, device):
    a, b, c = _inputs(shape, dtype, device, layout)
    for gamma in (0.9, 0.5, 1.0):
        got = op(a, b, c, gamma)
        want = reference(a, b, c, gamma)
        for g, w in zip(got, want):
            assert g.shape == w.shape and g.dtype == dtype
            torch.testing.assert_close(g, w, **TOLERANCES[dtype])


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("op,reference", FLOAT_OPS)
def test_low_precision_on_cuda(op, reference, dtype):
    a, b, c = _inputs((1000,), dtype, "cuda")
    got = op(a, b, c, 0.9)
    want = reference(*(t.double() for t in (a, b, c)), 0.9)
    for g, w in zip(got, want):
        torch.testing.assert_close(g.double(), w, **TOLERANCES[dtype])


@pytest.mark.cuda
@pytest.mark.parametrize("op,reference", FLOAT_OPS)
def test_cuda_matches_cpu(op, reference):
    a, b, c = _inputs((4, 1000), torch.float64, "cpu")
    got = op(a.cuda(), b.cuda(), c.cuda(), 0.9)
    want = op(a, b, c, 0.9)
    for g, w in zip(got, want):
        torch.testing.assert_close(g.cpu(), w, rtol=1e-14, atol=1e-14)


@pytest.mark.parametrize("op,reference", FLOAT_OPS)
def test_gradcheck(op, reference):
    a, b, c = (t.requires_grad_() for t in _inputs((3, 4), torch.float64, "cpu"))
    assert torch.autograd.gradcheck(lambda *t: op(*t, 0.7), (a, b, c))
    assert torch.autograd.gradgradcheck(lambda *t: op(*t, 0.7), (a, b, c))


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_float_ops(device):
    for name in ("momentum_forward", "momentum_inverse", "momentum_backward"):
        op = getattr(torch.ops.deepkern, name)
        for shape in [(5,), (2, 3)]:
            a, b, c = (t.requires_grad_() for t in _inputs(shape, torch.float64, device))
            torch.library.opcheck(op, (a, b, c, 0.8))


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_exact_ops(device):
    gamma = ops.exact_gamma(0.9)
    x = ops.to_fixed(torch.randn(6, dtype=torch.float64)).to(device)
    v = ops.to_fixed(torch.randn(6, dtype=torch.float64)).to(device)
    f = torch.randn(6, dtype=torch.float64, device=device)
    buffer = torch.zeros(1, 6, dtype=torch.int32, device=device)
    args = (x, v, f, buffer, gamma.numerator, gamma.denominator, 32)
    torch.library.opcheck(torch.ops.deepkern.momentum_exact_forward, (*args, 2))
    torch.library.opcheck(torch.ops.deepkern.momentum_exact_inverse, (*args, 1))


def test_compile_fullgraph():
    a, b, c = _inputs((4, 5), torch.float32, "cpu")

    @torch.compile(fullgraph=True, backend="aot_eager")
    def two_steps(x, v, f):
        x, v = ops.forward(x, v, f, 0.9)
        return ops.forward(x, v, torch.tanh(x), 0.9)

    x1, v1 = ops.reference_forward(a, b, c, 0.9)
    want = ops.reference_forward(x1, v1, torch.tanh(x1), 0.9)
    for g, w in zip(two_steps(a, b, c), want):
        torch.testing.assert_close(g, w)


# ---------------------------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize(
    "make_args,message",
    [
        (lambda a, b, c: (a, b.float(), c, 0.9), "v must have the dtype of x"),
        (lambda a, b, c: (a, b, c[:2], 0.9), "f must have the shape of x"),
        (lambda a, b, c: (a.long(), b.long(), c.long(), 0.9), "x must be a floating-point"),
        (lambda a, b, c: (a, b, c, 0.0), "gamma must lie in \\(0, 1\\]"),
        (lambda a, b, c: (a, b, c, 1.5), "gamma must lie in \\(0, 1\\]"),
        (lambda a, b, c: (a, b, c, float("nan")), "gamma must lie in \\(0, 1\\]"),
        (
            lambda a, b, c: (a, b.to("meta"), c, 0.9),
            "(v must be on the device of x|all inputs must be on one device)",
        ),
    ],
)
def test_forward_rejects_bad_input(make_args, message):
    a, b, c = _inputs((3, 4), torch.float64, "cpu")
    with pytest.raises(RuntimeError, match=message):
        ops.forward(*make_args(a, b, c))


def test_backward_and_inverse_name_their_arguments():
    a, b, c = _inputs((3, 4), torch.float64, "cpu")
    with pytest.raises(RuntimeError, match="vjp must have the shape of grad_x_next"):
        ops.backward(a, b, c[:1], 0.9)
    with pytest.raises(RuntimeError, match="v_next must have the dtype of x_next"):
        ops.inverse(a, b.float(), c, 0.9)


def _exact_args(n=6, limbs=1):
    x = ops.to_fixed(torch.randn(n, dtype=torch.float64))
    v = ops.to_fixed(torch.randn(n, dtype=torch.float64))
    f = torch.randn(n, dtype=torch.float64)
    return x, v, f, torch.zeros(limbs, n, dtype=torch.int32)


@pytest.mark.parametrize(
    "change,message",
    [
        (dict(x=lambda t: t.double()), "x must have dtype Long"),
        (dict(buffer=lambda t: t.long()), "buffer must have dtype Int"),
        (dict(buffer=lambda t: t[:, :3]), "buffer must have shape \\[limbs, 6\\]"),
        (dict(f=lambda t: t[:3]), "f must have the shape of x"),
        (dict(denom=0), "denom must lie in \\[1, 65536\\]"),
        (dict(denom=1 << 17), "denom must lie in \\[1, 65536\\]"),
        (dict(numer=11), "numer must lie in \\[1, denom = 10\\]"),
        (dict(frac_bits=60), "frac_bits must lie in \\[0, 52\\]"),
        (dict(limbs=0), "buffer_limbs must be at least 1"),
    ],
)
def test_exact_forward_rejects_bad_input(change, message):
    x, v, f, buffer = _exact_args(limbs=1)
    tensors = dict(x=x, v=v, f=f, buffer=buffer)
    for key in ("x", "v", "f", "buffer"):
        if key in change:
            tensors[key] = change[key](tensors[key])
    scalars = dict(numer=9, denom=10, frac_bits=32, limbs=1)
    scalars.update({k: val for k, val in change.items() if k in scalars})
    with pytest.raises(RuntimeError, match=message):
        torch.ops.deepkern.momentum_exact_forward(
            tensors["x"],
            tensors["v"],
            tensors["f"],
            tensors["buffer"],
            scalars["numer"],
            scalars["denom"],
            scalars["frac_bits"],
            scalars["limbs"],
        )


def test_exact_buffer_cannot_shrink_forward_or_grow_inverse():
    x, v, f, buffer = _exact_args(limbs=2)
    gamma = ops.exact_gamma(0.9)
    with pytest.raises(RuntimeError, match="buffer_limbs must be at least the 2 limbs"):
        ops.exact_forward(x, v, f, buffer, gamma, 32, 1)
    with pytest.raises(RuntimeError, match="buffer_limbs must be at most the 2 limbs"):
        ops.exact_inverse(x, v, f, buffer, gamma, 32, 3)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), 1e30])
def test_exact_reports_nonfinite_and_out_of_range_f(bad):
    x, v, f, buffer = _exact_args()
    f[2] = bad
    *_, status = ops.exact_forward(x, v, f, buffer, ops.exact_gamma(0.9), 32, 1)
    assert int(status[1]) == 1


def test_exact_reports_state_leaving_the_range():
    x, v, f, buffer = _exact_args()
    x[0] = 2**52 - 1
    v[0] = 2**51
    f.zero_()
    *_, status = ops.exact_forward(x, v, f, buffer, ops.exact_gamma(0.9), 32, 1)
    assert int(status[1]) == 1


def test_to_fixed_rejects_nonfinite_and_huge():
    with pytest.raises(ValueError, match="NaN or infinite"):
        ops.to_fixed(torch.tensor([1.0, float("nan")]))
    with pytest.raises(ValueError, match="too large for exact mode"):
        ops.to_fixed(torch.tensor([2.0**20]))


@pytest.mark.parametrize("gamma", [0.0, -0.1, 1.1, float("nan"), float("inf")])
def test_exact_gamma_rejects_outside_unit_interval(gamma):
    with pytest.raises(ValueError, match="gamma must be a finite number in \\(0, 1\\]"):
        ops.exact_gamma(gamma)


# ---------------------------------------------------------------------------------------------
# Exact reversibility


def _residual(weight: torch.Tensor):
    """A nonlinear residual function f(x) = 2 tanh(W x) on the rows of x, in float64."""
    return lambda x: 2.0 * torch.tanh(x @ weight)


def _run_stack(x0, v0, f, gamma, depth, bits=32):
    """Forward through `depth` exact layers and back; returns the start and the recovered state."""
    g = ops.exact_gamma(gamma)
    fixed_x, fixed_v = ops.to_fixed(x0, bits), ops.to_fixed(v0, bits)
    start = (fixed_x.clone(), fixed_v.clone())
    buffer = torch.zeros(1, x0.numel(), dtype=torch.int32)
    sums, errors = [], 0
    for k in range(depth):
        fx = f(ops.from_fixed(fixed_x, bits, torch.float64))
        fixed_x, fixed_v, buffer, status = ops.exact_forward(
            fixed_x, fixed_v, fx, buffer, g, bits, ops.buffer_limbs(g, k + 1)
        )
        sums.append(int(status[0]))
        errors += int(status[1])
    assert errors == 0
    peak_limbs = buffer.shape[0]
    for k in reversed(range(depth)):
        fx = f(ops.from_fixed(fixed_x - fixed_v, bits, torch.float64))
        fixed_x, fixed_v, buffer, status = ops.exact_inverse(
            fixed_x, fixed_v, fx, buffer, g, bits, ops.buffer_limbs(g, k)
        )
        assert int(status[0]) == sums[k] and int(status[1]) == 0
    return start, (fixed_x, fixed_v), buffer, peak_limbs


@pytest.mark.parametrize("gamma", [0.5, 0.9, 0.99])
def test_exact_recovers_input_bit_for_bit_at_depth_1000(gamma):
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(32, 8, generator=g, dtype=torch.float64)
    v0 = 0.1 * torch.randn(32, 8, generator=g, dtype=torch.float64)
    weight = torch.randn(8, 8, generator=g, dtype=torch.float64) / math.sqrt(8)
    start, end, buffer, peak_limbs = _run_stack(x0, v0, _residual(weight), gamma, 1000)
    assert torch.equal(start[0], end[0]) and torch.equal(start[1], end[1])
    assert torch.count_nonzero(buffer) == 0
    # The buffer holds what the layers destroyed: about 1000 log2(1 / gamma) bits per element.
    assert peak_limbs == ops.buffer_limbs(ops.exact_gamma(gamma), 1000)
    assert peak_limbs * 32 >= 1000 * math.log2(1 / gamma)
    # Inputs on the fixed-point grid come back as the very same floats.
    assert torch.equal(
        ops.from_fixed(end[0], 32, torch.float64), ops.from_fixed(start[0], 32, torch.float64)
    )


def test_float_inverse_drifts_where_exact_does_not():
    """The failure exact mode exists for: float recovery error grows by 1 / gamma per layer."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(64, generator=g, dtype=torch.float32)
    weight = torch.randn(8, 8, generator=g, dtype=torch.float32) / math.sqrt(8)
    f = lambda t: torch.tanh(t.view(8, 8) @ weight).view(-1)  # noqa: E731
    x0, v = x.clone(), torch.zeros_like(x)
    for _ in range(100):
        x, v = ops.forward(x, v, f(x), 0.5)
    for _ in range(100):
        prev = x - v
        x, v = ops.inverse(x, v, f(prev), 0.5)
    error = (x - x0).abs().max()
    assert not torch.isfinite(error) or error > 1.0


def test_exact_inverse_detects_a_different_f():
    x, v, f, buffer = _exact_args()
    g = ops.exact_gamma(0.9)
    x1, v1, b1, status = ops.exact_forward(x, v, f, buffer, g, 32, 1)
    *_, replay = ops.exact_inverse(x1, v1, f + 1e-6, b1, g, 32, 1)
    assert int(replay[0]) != int(status[0])


def test_exact_negative_values_and_gamma_one():
    x = torch.tensor([-5, -1, 0, 1, 5], dtype=torch.int64) * (1 << 20) - 3
    v = torch.tensor([-7, 3, -1, 0, 9], dtype=torch.int64) * (1 << 20) - 1
    f = torch.linspace(-1, 1, 5, dtype=torch.float64)
    for gamma in (1.0, 0.5, 0.75, 1 / 3):
        fr = ops.exact_gamma(gamma)
        buffer = torch.zeros(1, 5, dtype=torch.int32)
        x1, v1, b1, _ = ops.exact_forward(x, v, f, buffer, fr, 20, ops.buffer_limbs(fr, 1))
        x0, v0, b0, _ = ops.exact_inverse(x1, v1, f, b1, fr, 20, 1)
        assert torch.equal(x0, x) and torch.equal(v0, v) and torch.count_nonzero(b0) == 0


def test_exact_forward_is_close_to_float_step():
    a, b, c = _inputs((50,), torch.float64, "cpu")
    g = ops.exact_gamma(0.9)
    x1, v1, _, _ = ops.exact_forward(
        ops.to_fixed(a), ops.to_fixed(b), c, torch.zeros(1, 50, dtype=torch.int32), g, 32, 1
    )
    want_x, want_v = ops.reference_forward(a, b, c, 0.9)
    torch.testing.assert_close(ops.from_fixed(x1, 32, torch.float64), want_x, rtol=0, atol=1e-9)
    torch.testing.assert_close(ops.from_fixed(v1, 32, torch.float64), want_v, rtol=0, atol=1e-9)


def test_exact_empty_input():
    x = torch.zeros(0, dtype=torch.int64)
    out = ops.exact_forward(
        x, x, torch.zeros(0), torch.zeros(1, 0, dtype=torch.int32), ops.exact_gamma(0.9), 32, 2
    )
    assert out[0].shape == (0,) and out[2].shape == (2, 0) and int(out[3][1]) == 0


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_exact_cuda_matches_cpu_bit_for_bit(dtype):
    g = torch.Generator().manual_seed(3)
    x = ops.to_fixed(torch.randn(5000, generator=g, dtype=torch.float64))
    v = ops.to_fixed(torch.randn(5000, generator=g, dtype=torch.float64))
    f = torch.randn(5000, generator=g, dtype=torch.float64).to(dtype)
    buffer = torch.randint(0, 2**31 - 1, (3, 5000), generator=g, dtype=torch.int32)
    fr = ops.exact_gamma(0.9)
    cpu = ops.exact_forward(x, v, f, buffer, fr, 32, 4)
    gpu = ops.exact_forward(x.cuda(), v.cuda(), f.cuda(), buffer.cuda(), fr, 32, 4)
    for a, b in zip(cpu, gpu):
        assert torch.equal(a, b.cpu())
    back_cpu = ops.exact_inverse(*cpu[:2], f, cpu[2], fr, 32, 3)
    back_gpu = ops.exact_inverse(*gpu[:2], f.cuda(), gpu[2], fr, 32, 3)
    for a, b in zip(back_cpu, back_gpu):
        assert torch.equal(a, b.cpu())
    assert torch.equal(back_cpu[0], x) and torch.equal(back_cpu[2], buffer)


@pytest.mark.parametrize(
    "numer,denom", [(1, 65536), (65521, 65536), (3, 7), (9, 10), (1, 1), (32768, 65535)]
)
def test_exact_round_trip_at_extreme_values_and_fractions(numer, denom):
    """Large magnitudes of both signs and awkward fractions: the divisions must stay exact."""
    from fractions import Fraction

    g = torch.Generator().manual_seed(numer)
    limit = 2**51
    x = torch.randint(-limit, limit, (4000,), generator=g, dtype=torch.int64)
    v = torch.randint(-limit, limit, (4000,), generator=g, dtype=torch.int64)
    v[:8] = torch.tensor([-limit, limit - 1, -1, 0, 1, -denom, denom - 1, -(2**32) - 1])
    f = torch.randn(4000, generator=g, dtype=torch.float64)
    buffer = torch.randint(0, 2**31 - 1, (2, 4000), generator=g, dtype=torch.int32)
    fraction = Fraction(numer, denom)
    limbs = 2 + ops.buffer_limbs(fraction, 1)
    x1, v1, b1, status = ops.exact_forward(x, v, f, buffer, fraction, 12, limbs)
    assert int(status[1]) == 0
    # v' is the fixed-point update plus v numer / denom to within one unit.
    update = torch.round(f * (2.0**12) * (1 - numer / denom)).to(torch.int64)
    scaled = (v1 - update).double()
    assert ((scaled - v.double() * numer / denom).abs() <= 1 + 2**-40 * v.double().abs()).all()
    x0, v0, b0, status = ops.exact_inverse(x1, v1, f, b1, fraction, 12, 2)
    assert int(status[1]) == 0
    assert torch.equal(x0, x) and torch.equal(v0, v) and torch.equal(b0, buffer)
