"""MomentumNet: reversible gradients against plain backpropagation, and the replay rules."""

import pytest
import torch
from torch import nn

from deepkern.nn import MomentumNet, NondeterministicResidualError
from deepkern.ops import momentum as ops


def _mlp_functions(depth, width=8, seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    functions = [nn.Sequential(nn.Linear(width, width), nn.Tanh()) for _ in range(depth)]
    return [f.to(dtype) for f in functions]


def _grads(net, x, loss=lambda y: (y**2).sum()):
    x = x.detach().clone().requires_grad_(True)
    net.zero_grad(set_to_none=True)
    out = net(x)
    loss(out).backward()
    return out.detach(), [x.grad] + [p.grad for p in net.parameters()]


class _RoundedTo(torch.autograd.Function):
    """Takes the value of `rounded` and passes gradients to `value` unchanged."""

    @staticmethod
    def forward(ctx, value, rounded):
        return rounded.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def _fixed_point_backprop(functions, x, gamma, bits=ops.DEFAULT_FRAC_BITS):
    """Plain autograd through the same fixed-point forward that exact mode runs.

    The values follow the exact kernels; the rounding to the fixed-point grid counts as the
    identity in the backward pass, which is what the reversible backward computes.
    """
    g = ops.exact_gamma(gamma)
    gamma_value = float(g)
    fixed_x, fixed_v = ops.to_fixed(x, bits), ops.to_fixed(torch.zeros_like(x), bits)
    buffer = torch.zeros(1, x.numel(), dtype=torch.int32)
    xs = _RoundedTo.apply(x, ops.from_fixed(fixed_x, bits, x.dtype))
    vs = torch.zeros_like(x)
    for k, f in enumerate(functions):
        fx = f(xs)
        fixed_x, fixed_v, buffer, _ = ops.exact_forward(
            fixed_x, fixed_v, fx.detach(), buffer, g, bits, ops.buffer_limbs(g, k + 1)
        )
        v_float = gamma_value * vs + (1 - gamma_value) * fx
        x_float = xs + v_float
        vs = _RoundedTo.apply(v_float, ops.from_fixed(fixed_v, bits, x.dtype))
        xs = _RoundedTo.apply(x_float, ops.from_fixed(fixed_x, bits, x.dtype))
    return xs


@pytest.mark.parametrize("gamma", [0.5, 0.9, 0.99])
def test_exact_reversible_gradients_equal_backprop_through_the_same_forward(gamma):
    depth = 100
    x = torch.randn(4, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    net = MomentumNet(_mlp_functions(depth), gamma=gamma, exact=True)
    out, grads = _grads(net, x)

    xr = x.clone().requires_grad_(True)
    reference = _fixed_point_backprop(net.functions, xr, gamma)
    assert torch.equal(out, reference.detach())
    (reference**2).sum().backward()
    want = [xr.grad] + [p.grad for p in net.parameters()]
    for got, expected in zip(grads, want):
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("gamma", [0.5, 0.9])
def test_exact_reversible_close_to_float_backprop(gamma):
    x = torch.randn(4, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    functions = _mlp_functions(60)
    _, exact = _grads(MomentumNet(functions, gamma=gamma, exact=True), x)
    _, plain = _grads(MomentumNet(functions, gamma=gamma, memory="backprop"), x)
    # The two forwards differ by the fixed-point rounding (2^-32 per layer), which sixty
    # nonlinear layers amplify to about 1e-6 in the gradients.
    for got, expected in zip(exact, plain):
        torch.testing.assert_close(got, expected, rtol=2e-5, atol=1e-6)


def test_float_reversible_matches_backprop_at_moderate_depth():
    x = torch.randn(4, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    functions = _mlp_functions(20)
    out_r, rev = _grads(MomentumNet(functions, gamma=0.9, exact=False), x)
    out_b, plain = _grads(MomentumNet(functions, gamma=0.9, memory="backprop"), x)
    torch.testing.assert_close(out_r, out_b)
    for got, expected in zip(rev, plain):
        torch.testing.assert_close(got, expected, rtol=1e-8, atol=1e-10)


def test_exact_gradients_at_depth_1000_are_those_of_backprop():
    x = torch.randn(2, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    net = MomentumNet(_mlp_functions(1000, width=4), gamma=0.5, exact=True)
    _, grads = _grads(net, x)
    xr = x.clone().requires_grad_(True)
    (_fixed_point_backprop(net.functions, xr, 0.5) ** 2).sum().backward()
    want = [xr.grad] + [p.grad for p in net.parameters()]
    for got, expected in zip(grads, want):
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


def test_float32_exact_mode_and_velocity_gradient():
    torch.manual_seed(5)
    functions = [nn.Sequential(nn.Linear(6, 6), nn.ReLU()) for _ in range(30)]
    x = torch.randn(3, 6, requires_grad=True)
    v = torch.randn(3, 6, requires_grad=True)
    out, vel = MomentumNet(functions, gamma=0.9)(x, v, return_velocity=True)
    (out.sum() + vel.square().sum()).backward()
    x2, v2 = x.detach().clone().requires_grad_(), v.detach().clone().requires_grad_()
    out2, vel2 = MomentumNet(functions, gamma=0.9, memory="backprop")(x2, v2, return_velocity=True)
    (out2.sum() + vel2.square().sum()).backward()
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(v.grad, v2.grad, rtol=1e-4, atol=1e-5)


def test_shared_module_accumulates_gradients():
    torch.manual_seed(6)
    shared = nn.Sequential(nn.Linear(5, 5), nn.Tanh()).double()
    x = torch.randn(2, 5, dtype=torch.float64)
    _, rev = _grads(MomentumNet([shared] * 10, gamma=0.8), x)
    _, plain = _grads(MomentumNet([shared] * 10, gamma=0.8, memory="backprop"), x)
    for got, expected in zip(rev, plain):
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-9)


def _conv_bn_functions(depth, seed=0):
    torch.manual_seed(seed)
    return [
        nn.Sequential(nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU())
        for _ in range(depth)
    ]


@pytest.mark.parametrize("exact", [True, False])
def test_batchnorm_statistics_move_once_per_forward(exact):
    x = torch.randn(4, 3, 6, 6, generator=torch.Generator().manual_seed(7))
    rev = MomentumNet(_conv_bn_functions(5), gamma=0.9, exact=exact)
    plain = MomentumNet(_conv_bn_functions(5), gamma=0.9, memory="backprop")
    rev(x).sum().backward()
    plain(x).sum().backward()
    for (name, a), b in zip(rev.named_buffers(), plain.buffers()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    assert all(int(b) == 1 for n, b in rev.named_buffers() if "num_batches" in n)


@pytest.mark.parametrize("exact", [True, False])
def test_dropout_replays_its_random_state(exact):
    torch.manual_seed(8)
    functions = [nn.Sequential(nn.Linear(16, 16), nn.Dropout(0.3), nn.Tanh()) for _ in range(8)]
    functions = [f.double() for f in functions]
    x = torch.randn(4, 16, dtype=torch.float64)
    torch.manual_seed(123)
    _, rev = _grads(MomentumNet(functions, gamma=0.9, exact=exact), x)
    after_reversible = torch.get_rng_state()
    torch.manual_seed(123)
    _, plain = _grads(MomentumNet(functions, gamma=0.9, memory="backprop"), x)
    assert torch.equal(after_reversible, torch.get_rng_state())
    for got, expected in zip(rev, plain):
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-8)


class _Drifting(nn.Module):
    """Gives a slightly different answer on every call: not deterministic."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 4).double()
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return torch.tanh(self.linear(x)) + 1e-6 * self.calls


def test_exact_mode_refuses_gradients_of_a_nondeterministic_function():
    net = MomentumNet([_Drifting() for _ in range(3)], gamma=0.9, exact=True)
    x = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    out = net(x)
    with pytest.raises(NondeterministicResidualError, match="residual function 2 did not"):
        out.sum().backward()
    assert x.grad is None
    assert all(p.grad is None for p in net.parameters())


def test_inference_without_grad_matches_training_forward():
    functions = _mlp_functions(12)
    x = torch.randn(3, 8, dtype=torch.float64)
    for exact in (True, False):
        net = MomentumNet(functions, exact=exact)
        with torch.no_grad():
            a = net(x)
        b = net(x.clone().requires_grad_())
        assert torch.equal(a, b.detach())


def test_init_speed_and_empty_stack():
    x = torch.randn(2, 3)
    assert torch.equal(MomentumNet([], init_speed=0.5)(x), x)
    out, v = MomentumNet([], init_speed=0.5, exact=False)(x, return_velocity=True)
    assert torch.equal(v, torch.full_like(x, 0.5))


# ---------------------------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize("gamma", [0.0, -0.5, 1.01, float("nan")])
def test_rejects_gamma_outside_unit_interval(gamma):
    with pytest.raises(ValueError, match="gamma must be a number in \\(0, 1\\]"):
        MomentumNet(_mlp_functions(2), gamma=gamma)


def test_rejects_unknown_memory_mode():
    with pytest.raises(ValueError, match="memory must be 'reversible' or 'backprop'"):
        MomentumNet(_mlp_functions(2), memory="checkpoint")


@pytest.mark.parametrize(
    "memory,exact", [("reversible", True), ("reversible", False), ("backprop", False)]
)
def test_rejects_a_function_that_changes_shape(memory, exact):
    functions = _mlp_functions(2, dtype=torch.float32) + [nn.Linear(8, 3)]
    net = MomentumNet(functions, memory=memory, exact=exact)
    with pytest.raises(ValueError, match="residual function 2 \\(Linear\\) must return a tensor"):
        net(torch.randn(2, 8, requires_grad=True))


def test_exact_mode_rejects_nonfinite_input_and_output():
    net = MomentumNet(_mlp_functions(3, dtype=torch.float32))
    with pytest.raises(ValueError, match="NaN or infinite"):
        net(torch.tensor([[float("nan")] * 8]))

    class _Blowup(nn.Module):
        def forward(self, x):
            return x * float("inf")

    net = MomentumNet(_mlp_functions(2, dtype=torch.float32) + [_Blowup()])
    with pytest.raises(ValueError, match="residual function 2 returned non-finite values"):
        net(torch.randn(2, 8, requires_grad=True))


def test_rejects_integer_input_and_mismatched_velocity():
    net = MomentumNet(_mlp_functions(2, dtype=torch.float32))
    with pytest.raises(ValueError, match="x must be a floating-point tensor"):
        net(torch.ones(2, 8, dtype=torch.int64))
    with pytest.raises(ValueError, match="v must match x"):
        net(torch.ones(2, 8), torch.ones(2, 7))


def test_warns_when_exact_mode_rounds_gamma():
    with pytest.warns(UserWarning, match="exact mode uses gamma"):
        MomentumNet(_mlp_functions(1), gamma=0.123456789)


@pytest.mark.parametrize("exact", [True, False])
def test_memory_is_flat_in_depth(exact):
    """Neither activations nor a second copy of the parameter gradients grow with depth."""
    from deepkern.bench.memory import measure_step

    peaks = {}
    for depth in (8, 64):
        net = MomentumNet(_mlp_functions(depth, width=64, dtype=torch.float32), exact=exact)
        x = torch.randn(32, 64)

        def step(net=net, x=x):
            net(x).square().sum().backward()

        step()  # the .grad buffers exist from here on, as in a training loop
        peaks[depth] = measure_step(step, exclude=list(net.parameters()))
    assert peaks[64].saved_bytes <= 1.1 * peaks[8].saved_bytes
    assert peaks[64].peak_bytes <= 1.3 * peaks[8].peak_bytes


def test_autograd_grad_returns_parameter_gradients():
    functions = _mlp_functions(6)
    net = MomentumNet(functions, gamma=0.9)
    x = torch.randn(3, 8, dtype=torch.float64)
    params = list(net.parameters())
    got = torch.autograd.grad(net(x).sum(), params)
    want = torch.autograd.grad(MomentumNet(functions, memory="backprop")(x).sum(), params)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-9)
    assert all(p.grad is None for p in params)


def test_backward_twice_with_retained_graph():
    net = MomentumNet(_mlp_functions(5), gamma=0.7)
    x = torch.randn(2, 8, dtype=torch.float64, requires_grad=True)
    out = net(x).sum()
    first = torch.autograd.grad(out, x, retain_graph=True)[0]
    second = torch.autograd.grad(out, x)[0]
    assert torch.equal(first, second)


@pytest.mark.parametrize("exact", [True, False])
def test_double_backward_is_refused_not_wrong(exact):
    net = MomentumNet(_mlp_functions(3), exact=exact)
    x = torch.randn(2, 8, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(net(x).square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="differentiate twice"):
        grad.square().sum().backward()


def test_gamma_too_close_to_one_for_exact_mode():
    with pytest.raises(ValueError, match="exact mode's fractions"):
        MomentumNet(_mlp_functions(1), gamma=0.999999)
    MomentumNet(_mlp_functions(1), gamma=0.999999, exact=False)


def test_changing_gamma_after_construction_takes_effect():
    functions = _mlp_functions(4)
    x = torch.randn(2, 8, dtype=torch.float64)
    net = MomentumNet(functions, gamma=0.9)
    net.gamma = 0.5
    assert torch.equal(net(x), MomentumNet(functions, gamma=0.5)(x))


def test_too_large_initial_velocity_is_named():
    net = MomentumNet(_mlp_functions(1, dtype=torch.float32))
    with pytest.raises(ValueError, match="v \\(the initial velocity\\) is too large"):
        net(torch.zeros(1, 8), torch.full((1, 8), 2e6))
