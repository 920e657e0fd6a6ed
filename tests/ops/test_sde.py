"""The sde ops: the Philox stream, the fused Euler-Maruyama kernel against the plain loop on the
same normals, the laws of Brownian motion and Ornstein-Uhlenbeck, Monte Carlo reductions,
gradients by noise replay, and bad input."""

import functools
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from deepkern.ops import sde
from tests.conftest import DEVICES

F64 = torch.float64
# Five standard errors: a correct kernel fails one such check with probability below 1e-6.
Z = 5.0


def _philox4x32_10(counters: np.ndarray, key: int) -> np.ndarray:
    """Philox4x32-10 in NumPy, from the published round function: counters [n, 4] uint32."""
    c = counters.astype(np.uint64)
    k0, k1 = np.uint64(key & 0xFFFFFFFF), np.uint64(key >> 32)
    mask = np.uint64(0xFFFFFFFF)
    for _ in range(10):
        p0 = np.uint64(0xD2511F53) * c[:, 0]
        p1 = np.uint64(0xCD9E8D57) * c[:, 2]
        c = np.stack(
            [
                (p1 >> np.uint64(32)) ^ c[:, 1] ^ k0,
                p1 & mask,
                (p0 >> np.uint64(32)) ^ c[:, 3] ^ k1,
                p0 & mask,
            ],
            axis=1,
        )
        k0 = (k0 + np.uint64(0x9E3779B9)) & mask
        k1 = (k1 + np.uint64(0xBB67AE85)) & mask
    return c.astype(np.uint32)


def _box_muller(words: np.ndarray) -> np.ndarray:
    """The kernels' transform in float64: u = (w0 >> 1) 2^-31 + 2^-32, angle (w1 >> 8) 2^-24."""
    w = words.astype(np.float64)
    out = []
    for pair in range(2):
        u = np.floor(w[:, 2 * pair] / 2) * 2.0**-31 + 2.0**-32
        turn = np.floor(w[:, 2 * pair + 1] / 256) * 2.0**-24
        radius = np.sqrt(-2 * np.log(u))
        out += [radius * np.cos(2 * np.pi * turn), radius * np.sin(2 * np.pi * turn)]
    return np.stack(out, axis=1)


def test_philox_reference_reproduces_the_published_known_answer():
    zero = _philox4x32_10(np.zeros((1, 4), dtype=np.uint32), 0)
    assert [int(v) for v in zero[0]] == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]


@pytest.mark.parametrize("antithetic", [False, True])
def test_normals_are_box_muller_of_the_philox_stream(antithetic):
    paths, dim, steps, first, seed = 300, 7, 3, 5, 2**40 + 12345
    z = sde.normals(torch.zeros(paths, dim, dtype=F64), steps, seed, first, antithetic).numpy()
    p, k, b = np.meshgrid(np.arange(paths), np.arange(steps), np.arange(2), indexing="ij")
    source = p >> 1 if antithetic else p
    counters = np.stack([source, np.zeros_like(p), k + first, b], axis=-1).reshape(-1, 4)
    want = _box_muller(_philox4x32_10(counters.astype(np.uint32), seed))
    want = want.reshape(paths, steps, 8)[:, :, :dim].transpose(1, 0, 2)
    if antithetic:
        want = want * np.where(np.arange(paths) % 2 == 1, -1.0, 1.0)[None, :, None]
    # float32 arithmetic: a few units in the last place of the radius and the angle.
    np.testing.assert_allclose(z, want, rtol=0, atol=2e-6 * (1 + np.abs(want)).max())
    assert np.abs(z - want).max() < 1e-6 * 8


def test_every_cpu_tier_draws_and_simulates_the_same_bits():
    from deepkern import _C

    best = _C.cpu_capability()
    tiers = ["generic", "avx2", "avx512"]
    tiers = tiers[: tiers.index(best) + 1]
    x0 = torch.randn(77, 5, dtype=torch.float32)
    drift = sde.Drift.mlp(torch.randn(6, 5), torch.randn(6), torch.randn(5, 6), torch.randn(5))
    sigma = torch.tril(torch.rand(5, 5)) + torch.eye(5)
    results = []
    try:
        for tier in tiers:
            _C.set_cpu_capability(tier)
            results.append(
                (
                    sde.normals(x0, 3, seed=9),
                    sde.simulate(x0, sigma, drift, h=0.05, steps=7, seed=9, save_every=7),
                    sde.monte_carlo(x0[:2].double(), sigma.double(), h=0.1, steps=3, paths=40),
                )
            )
    finally:
        _C.set_cpu_capability(best)
    for other in results[1:]:
        for got, want in zip(other[:2], results[0][:2]):
            assert torch.equal(got, want)
    with pytest.raises(RuntimeError, match="cpu capability must be"):
        _C.set_cpu_capability("sse9")


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_tanh_drift_is_accurate_to_the_last_bits(dtype):
    """One step from x0 = 0 with no noise, h = 1, W1 = W2 = I and b1 = z gives exactly tanh(z)."""
    z = torch.cat([torch.linspace(-25, 25, 1001), torch.logspace(-30, 1, 200)]).to(dtype)
    n = z.numel()
    eye = torch.eye(n, dtype=dtype)
    drift = sde.Drift.mlp(eye, z, eye, torch.zeros(n, dtype=dtype))
    x0 = torch.zeros(1, n, dtype=dtype)
    got = sde.simulate(x0, torch.tensor(0.0, dtype=dtype), drift, h=1.0, steps=1, seed=1)[0]
    eps = torch.finfo(dtype).eps
    assert ((got - torch.tanh(z)).abs() <= 4 * eps * torch.tanh(z).abs()).all()


def test_normals_are_standard_and_independent():
    z = sde.normals(torch.zeros(50000, 4, dtype=F64), steps=2, seed=11).reshape(-1, 4)
    n = z.shape[0]
    assert (z.mean(0).abs() < Z / math.sqrt(n)).all()
    assert ((z.var(0) - 1).abs() < Z * math.sqrt(2 / (n - 1))).all()
    corr = torch.corrcoef(z.T) - torch.eye(4, dtype=F64)
    assert corr.abs().max() < Z / math.sqrt(n)


def _drifts(d, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    yield "zero", sde.Drift.zero()
    yield "linear", sde.Drift.linear(0.3 * r(d, d), r(d))
    for act in sde.ACTIVATIONS:
        yield f"mlp-{act}", sde.Drift.mlp(r(7, d), r(7), 0.3 * r(d, 7), r(d), act)


def _sigmas(d, dtype):
    g = torch.Generator().manual_seed(1)
    yield "scalar", torch.tensor(0.4, dtype=dtype)
    yield "diagonal", torch.rand(d, generator=g, dtype=dtype)
    yield "triangular", torch.tril(torch.randn(d, d, generator=g, dtype=dtype))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_kernel_matches_plain_loop_on_the_same_normals(dtype, device):
    d = 3
    x0 = torch.randn(40, d, dtype=dtype, generator=torch.Generator().manual_seed(2)).to(device)
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == F64 else dict(rtol=2e-5, atol=2e-5)
    for _, sigma in _sigmas(d, dtype):
        for _, drift in _drifts(d, dtype):
            sigma_d = sigma.to(device)
            drift_d = sde.Drift(
                drift.kind,
                drift.activation,
                *[p.to(device) if p is not None else None for p in drift.parameters()],
            )
            for antithetic in (False, True):
                got = sde.simulate(
                    x0,
                    sigma_d,
                    drift_d,
                    h=0.05,
                    steps=12,
                    seed=7,
                    antithetic=antithetic,
                    save_every=4,
                )
                want = sde.reference_simulate(
                    x0,
                    sigma_d,
                    drift_d,
                    h=0.05,
                    steps=12,
                    seed=7,
                    antithetic=antithetic,
                    save_every=4,
                )
                torch.testing.assert_close(got, want, **tol)
                terminal = sde.simulate(
                    x0, sigma_d, drift_d, h=0.05, steps=12, seed=7, antithetic=antithetic
                )
                torch.testing.assert_close(terminal, got[:, -1], rtol=0, atol=0)


def test_reproducible_across_thread_counts_and_continuable():
    x0 = torch.randn(333, 5, dtype=F64)
    drift = dict(_drifts(5, F64))["mlp-tanh"]
    sigma = torch.tensor(0.3, dtype=F64)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = sde.simulate(x0, sigma, drift, h=0.01, steps=20, seed=5)
        torch.set_num_threads(max(2, threads))
        many = sde.simulate(x0, sigma, drift, h=0.01, steps=20, seed=5)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, many)
    half = sde.simulate(x0, sigma, drift, h=0.01, steps=10, seed=5)
    rest = sde.simulate(half, sigma, drift, h=0.01, steps=10, seed=5, first_step=10)
    assert torch.equal(rest, one)
    assert not torch.equal(one, sde.simulate(x0, sigma, drift, h=0.01, steps=20, seed=6))


def test_default_seed_follows_torch_generator():
    x0 = torch.zeros(10, 2)
    torch.manual_seed(3)
    a = sde.simulate(x0, torch.tensor(1.0), h=0.1, steps=3)
    b = sde.simulate(x0, torch.tensor(1.0), h=0.1, steps=3)
    torch.manual_seed(3)
    assert torch.equal(a, sde.simulate(x0, torch.tensor(1.0), h=0.1, steps=3))
    assert not torch.equal(a, b)


def test_antithetic_pairs_mirror_each_other():
    x0 = torch.randn(1, 3, dtype=F64).expand(10, 3).contiguous()
    x = sde.simulate(x0, torch.tensor(0.7, dtype=F64), h=0.1, steps=9, seed=1, antithetic=True)
    torch.testing.assert_close(x[0::2] + x[1::2], 2 * x0[0::2], rtol=0, atol=1e-14)


# ---------------------------------------------------------------------------------------------
# Laws


def test_brownian_motion_mean_and_covariance():
    n, d, T, steps = 100000, 3, 1.0, 50
    chol = torch.tensor([[0.5, 0.0, 0.0], [0.2, 0.3, 0.0], [-0.1, 0.4, 0.6]], dtype=F64)
    start = torch.tensor([1.0, -2.0, 0.5], dtype=F64)
    x = sde.simulate(start.expand(n, d).contiguous(), chol, h=T / steps, steps=steps, seed=21)
    cov = chol @ chol.T * T
    std = cov.diagonal().sqrt()
    assert ((x.mean(0) - start).abs() < Z * std / math.sqrt(n)).all()
    sample = torch.cov(x.T)
    # Standard error of a Gaussian sample covariance: sqrt((s_ii s_jj + s_ij^2) / n).
    se = ((cov.diagonal()[:, None] * cov.diagonal()[None, :] + cov**2) / n).sqrt()
    assert ((sample - cov).abs() < Z * se).all()


def test_ornstein_uhlenbeck_matches_its_discrete_closed_form():
    """With linear drift theta (mu - x) the Euler scheme is an AR(1) recursion with known law:
    mean mu + a^k (x0 - mu) and variance sigma^2 h (1 - a^{2k}) / (1 - a^2), a = 1 - theta h."""
    n, theta, mu, sigma, h, steps = 100000, 2.0, 1.5, 0.8, 0.02, 60
    drift = sde.Drift.linear(
        -theta * torch.eye(2, dtype=F64), torch.full((2,), theta * mu, dtype=F64)
    )
    x0 = torch.full((n, 2), -1.0, dtype=F64)
    x = sde.simulate(x0, torch.tensor(sigma, dtype=F64), drift, h=h, steps=steps, seed=8)
    a = 1 - theta * h
    mean = mu + a**steps * (-1.0 - mu)
    var = sigma**2 * h * (1 - a ** (2 * steps)) / (1 - a**2)
    assert ((x.mean(0) - mean).abs() < Z * math.sqrt(var / n)).all()
    assert ((x.var(0) - var).abs() < Z * var * math.sqrt(2 / (n - 1))).all()
    # And the continuous-time law, to the scheme's O(h) accuracy.
    t = h * steps
    assert abs(mean - (mu + math.exp(-theta * t) * (-1.0 - mu))) < 2 * theta * h
    assert abs(var - sigma**2 * (1 - math.exp(-2 * theta * t)) / (2 * theta)) < 2 * theta * h * var


# ---------------------------------------------------------------------------------------------
# Monte Carlo reductions


@pytest.mark.parametrize("functional", list(sde.FUNCTIONALS))
@pytest.mark.parametrize("log_coordinates", [False, True])
def test_monte_carlo_equals_reducing_simulated_paths(functional, log_coordinates):
    d, paths = 3, 3000
    g = torch.Generator().manual_seed(4)
    starts = 0.3 * torch.randn(2, d, generator=g, dtype=F64)
    weights = torch.rand(d, generator=g, dtype=F64)
    drift = dict(_drifts(d, F64))["linear"]
    sigma = torch.tensor([0.2, 0.3, 0.1], dtype=F64)
    stats = sde.monte_carlo(
        starts,
        sigma,
        drift,
        h=0.05,
        steps=10,
        paths=paths,
        functional=functional,
        weights=weights,
        offset=0.9,
        log_coordinates=log_coordinates,
        seed=3,
    )
    # Path m of start b is path b * paths + m of one big simulation.
    x = sde.simulate(starts.repeat_interleave(paths, 0), sigma, drift, h=0.05, steps=10, seed=3)
    y = x.exp() if log_coordinates else x
    values = {
        "squared_norm": (x**2).sum(1),
        "basket_call": (y @ weights - 0.9).clamp(min=0),
        "max_call": (y.max(1).values - 0.9).clamp(min=0),
        "affine": y @ weights + 0.9,
    }[functional].view(2, paths)
    torch.testing.assert_close(stats[:, 0], values.mean(1), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(stats[:, 1], values.var(1), rtol=1e-8, atol=1e-12)
    torch.testing.assert_close(stats[:, 2], (values.var(1) / paths).sqrt(), rtol=1e-8, atol=1e-12)


def test_monte_carlo_heat_equation_closed_form():
    """E |x + sigma W_T|^2 = |x|^2 + T trace(sigma sigma^T)."""
    x = torch.tensor([[0.5, -1.0, 2.0], [0.0, 0.0, 0.0]], dtype=F64)
    stats = sde.monte_carlo(
        x, torch.tensor(0.6, dtype=F64), h=0.1, steps=10, paths=40000, seed=9, antithetic=True
    )
    exact = (x**2).sum(1) + 1.0 * 3 * 0.36
    assert ((stats[:, 0] - exact).abs() < Z * stats[:, 2]).all()


# ---------------------------------------------------------------------------------------------
# Gradients


@pytest.mark.parametrize("save_every", [0, 3])
def test_gradcheck_mlp_drift(save_every):
    g = torch.Generator().manual_seed(5)
    r = lambda *s: torch.randn(*s, generator=g, dtype=F64).requires_grad_()  # noqa: E731
    x0, W1, b1, W2, b2 = r(4, 3), r(5, 3), r(5), r(3, 5), r(3)
    sigma = torch.tensor([0.3, 0.2, 0.1], dtype=F64)

    def run(x0, W1, b1, W2, b2):
        drift = sde.Drift.mlp(W1, b1, W2, b2, "softplus")
        return sde.simulate(x0, sigma, drift, h=0.05, steps=9, seed=2, save_every=save_every)

    assert torch.autograd.gradcheck(run, (x0, W1, b1, W2, b2))


def test_gradcheck_linear_drift_and_matches_autograd_of_the_loop():
    g = torch.Generator().manual_seed(6)
    x0 = torch.randn(6, 2, generator=g, dtype=F64, requires_grad=True)
    A = (0.5 * torch.randn(2, 2, generator=g, dtype=F64)).requires_grad_()
    b = torch.randn(2, generator=g, dtype=F64, requires_grad=True)
    sigma = torch.tril(torch.ones(2, 2, dtype=F64))

    def run(x0, A, b):
        return sde.simulate(x0, sigma, sde.Drift.linear(A, b), h=0.1, steps=17, seed=4)

    assert torch.autograd.gradcheck(run, (x0, A, b))
    grads = torch.autograd.grad(run(x0, A, b).sin().sum(), (x0, A, b))
    ref = sde.reference_simulate(x0, sigma, sde.Drift.linear(A, b), h=0.1, steps=17, seed=4)
    want = torch.autograd.grad(ref.sin().sum(), (x0, A, b))
    for got, expected in zip(grads, want):
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    x0 = torch.randn(5, 2, dtype=F64, device=device, requires_grad=True)
    sigma = torch.tensor(0.5, dtype=F64, device=device)
    A = torch.randn(2, 2, dtype=F64, device=device, requires_grad=True)
    b = torch.randn(2, dtype=F64, device=device)
    torch.library.opcheck(
        torch.ops.deepkern.sde_euler, (x0, sigma, A, b, None, None, 1, 0, 0.1, 4, 0, 2, 3, False)
    )
    torch.library.opcheck(torch.ops.deepkern.sde_normals, (x0.detach(), 3, 1, 5, True))
    torch.library.opcheck(
        torch.ops.deepkern.sde_monte_carlo,
        (
            x0.detach(),
            sigma,
            None,
            None,
            None,
            None,
            0,
            0,
            0.1,
            4,
            8,
            3,
            False,
            0,
            torch.ones(2, dtype=F64, device=device),
            0.0,
            False,
        ),
    )


def test_empty_and_zero_steps():
    x0 = torch.randn(4, 2)
    assert torch.equal(sde.simulate(x0, torch.tensor(1.0), h=0.1, steps=0, seed=1), x0)
    empty = sde.simulate(torch.zeros(0, 2), torch.tensor(1.0), h=0.1, steps=5, seed=1)
    assert empty.shape == (0, 2)
    assert sde.normals(torch.zeros(0, 3), 4, seed=1).shape == (4, 0, 3)


# ---------------------------------------------------------------------------------------------
# Bad input


def _call(**changes):
    args = dict(x0=torch.zeros(3, 2), sigma=torch.tensor(1.0), drift=None, h=0.1, steps=4, seed=1)
    args.update(changes)
    x0, sigma, drift = args.pop("x0"), args.pop("sigma"), args.pop("drift")
    return sde.simulate(x0, sigma, drift, **args)


@pytest.mark.parametrize(
    "changes,message",
    [
        (dict(steps=-1), "steps must be non-negative"),
        (dict(h=0.0), "h \\(the step size\\) must be positive"),
        (dict(h=float("nan")), "h \\(the step size\\) must be positive"),
        (dict(save_every=3), "must be a multiple of save_every"),
        (dict(sigma=torch.ones(2, 3)), "matrix sigma must be square"),
        (dict(sigma=torch.ones(2, 2)), "must be lower-triangular"),
        (dict(sigma=torch.ones(3)), "diagonal sigma must have 2 entries"),
        (dict(sigma=torch.ones(1, 2, 2)), "sigma must be a scalar, a vector"),
        (dict(sigma=torch.tensor(1.0, dtype=F64)), "sigma must have the dtype of x0"),
        (dict(sigma=torch.tensor(float("inf"))), "sigma must be finite"),
        (dict(x0=torch.tensor([[0.0, float("nan")]])), "x0 must be finite"),
        (dict(x0=torch.zeros(3)), "x0 must have shape \\[paths, dim\\]"),
        (dict(x0=torch.zeros(3, 2, dtype=torch.int64)), "x0 must be float32 or float64"),
        (dict(drift=sde.Drift.linear(torch.ones(3, 3), torch.ones(2))), "A must have shape"),
        (dict(drift=sde.Drift.linear(torch.ones(2, 2), torch.ones(3))), "b must have shape"),
        (
            dict(
                drift=sde.Drift.mlp(
                    torch.ones(4, 2), torch.ones(4), torch.ones(2, 5), torch.ones(2)
                )
            ),
            "W2 must have shape",
        ),
        (
            dict(drift=sde.Drift.linear(torch.full((2, 2), float("nan")), torch.ones(2))),
            "A must be finite",
        ),
        (dict(drift=sde.Drift(1)), "A is required by the linear drift"),
        (dict(drift=sde.Drift(0, 0, torch.ones(2, 2))), "A must be None for the zero drift"),
        (dict(drift=sde.Drift(5)), "drift_kind must be 0"),
        (
            dict(
                drift=sde.Drift(
                    2, 9, torch.ones(4, 2), torch.ones(4), torch.ones(2, 4), torch.ones(2)
                )
            ),
            "activation must be 0",
        ),
    ],
)
def test_simulate_rejects_bad_input(changes, message):
    with pytest.raises(RuntimeError, match=message):
        _call(**changes)


def test_monte_carlo_rejects_bad_input():
    x0, sigma = torch.zeros(2, 2), torch.tensor(1.0)
    with pytest.raises(RuntimeError, match="paths must be at least 2"):
        sde.monte_carlo(x0, sigma, h=0.1, steps=2, paths=1, seed=1)
    with pytest.raises(RuntimeError, match="paths must be even with antithetic"):
        sde.monte_carlo(x0, sigma, h=0.1, steps=2, paths=5, seed=1, antithetic=True)
    with pytest.raises(RuntimeError, match="weights must have shape \\[2\\]"):
        sde.monte_carlo(
            x0, sigma, h=0.1, steps=2, paths=4, seed=1, functional="affine", weights=torch.ones(3)
        )
    with pytest.raises(ValueError, match="functional must be one of"):
        sde.monte_carlo(x0, sigma, h=0.1, steps=2, paths=4, seed=1, functional="median")
    with pytest.raises(ValueError, match="monte_carlo is not differentiable"):
        sde.monte_carlo(x0.requires_grad_(), sigma, h=0.1, steps=2, paths=4, seed=1)


def test_sigma_gradient_is_refused():
    with pytest.raises(NotImplementedError, match="no gradient with respect to sigma"):
        _call(sigma=torch.tensor(1.0, requires_grad=True))


def test_unknown_activation_name():
    with pytest.raises(ValueError, match="activation must be one of"):
        sde.Drift.mlp(torch.ones(1, 1), torch.ones(1), torch.ones(1, 1), torch.ones(1), "gelu")


@pytest.mark.cuda
def test_cuda_matches_cpu():
    d = 4
    x0 = torch.randn(300, d, dtype=F64)
    for _, sigma in _sigmas(d, F64):
        for _, drift in _drifts(d, F64):
            cpu = sde.simulate(x0, sigma, drift, h=0.02, steps=25, seed=3)
            drift_cuda = sde.Drift(
                drift.kind,
                drift.activation,
                *[p.cuda() if p is not None else None for p in drift.parameters()],
            )
            gpu = sde.simulate(x0.cuda(), sigma.cuda(), drift_cuda, h=0.02, steps=25, seed=3)
            torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-11, atol=1e-11)
    stats_cpu = sde.monte_carlo(
        x0[:3], torch.tensor(0.5, dtype=F64), h=0.1, steps=5, paths=5000, seed=2
    )
    stats_gpu = sde.monte_carlo(
        x0[:3].cuda(),
        torch.tensor(0.5, dtype=F64, device="cuda"),
        h=0.1,
        steps=5,
        paths=5000,
        seed=2,
    )
    torch.testing.assert_close(stats_gpu.cpu(), stats_cpu, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("seed", [-1, 2**63, 1.5, True])
def test_seed_must_be_a_63_bit_integer(seed):
    with pytest.raises(ValueError, match="seed must be an integer in \\[0, 2\\^63\\)"):
        _call(seed=seed)


def test_zero_drift_gradient_and_first_order_only():
    x0 = torch.randn(3, 2, requires_grad=True)
    sde.simulate(x0, torch.tensor(0.5), h=0.1, steps=4, seed=1).sum().backward()
    assert torch.equal(x0.grad, torch.ones(3, 2))
    x0 = torch.randn(3, 2, dtype=F64, requires_grad=True)
    drift = sde.Drift.linear(torch.eye(2, dtype=F64), torch.zeros(2, dtype=F64))
    out = sde.simulate(x0, torch.tensor(0.5, dtype=F64), drift, h=0.1, steps=4, seed=1)
    with pytest.raises(RuntimeError, match="first derivatives only"):
        torch.autograd.grad(out.sum(), x0, create_graph=True)


def test_mixed_devices_and_step_overflow_are_refused():
    with pytest.raises(RuntimeError, match="device of x0"):
        _call(sigma=torch.tensor(0.5, device="meta"))
    with pytest.raises(RuntimeError, match="first_step \\+ steps must stay below 2\\^32"):
        _call(steps=1, first_step=2**63 - 1)


def test_cpu_capability_environment_variable():
    script = (
        "import torch, deepkern\n"
        "from deepkern.ops import sde\n"
        "sde.normals(torch.zeros(3, 2), 1, seed=1)\n"
        "print(deepkern.build_info()['cpu_capability'])\n"
    )
    run = functools.partial(subprocess.run, [sys.executable, "-c", script], capture_output=True)
    chosen = run(env={**os.environ, "DEEPKERN_CPU_CAPABILITY": "generic"}, text=True)
    assert chosen.returncode == 0, chosen.stderr
    assert chosen.stdout.strip() == "generic"
    refused = run(env={**os.environ, "DEEPKERN_CPU_CAPABILITY": "sse9"}, text=True)
    assert refused.returncode != 0
    assert "cpu capability must be 'generic', 'avx2' or 'avx512', got 'sse9'" in refused.stderr


@pytest.mark.cuda
@pytest.mark.parametrize("antithetic", [False, True])
def test_cuda_draws_the_same_normal_bits_as_the_cpu(antithetic):
    like = torch.zeros(1000, 9)
    cpu = sde.normals(like, 4, seed=77, first_step=3, antithetic=antithetic)
    gpu = sde.normals(like.cuda(), 4, seed=77, first_step=3, antithetic=antithetic)
    assert torch.equal(gpu.cpu(), cpu)


@pytest.mark.parametrize(
    "name, value", [("steps", 2.5), ("steps", "10"), ("steps", True), ("save_every", 2.5)]
)
def test_counts_must_be_integers(name, value):
    args = dict(h=0.1, steps=4, seed=1)
    args[name] = value
    with pytest.raises(ValueError, match=f"{name} must be an integer"):
        sde.simulate(torch.zeros(3, 2), torch.tensor(1.0), **args)
    with pytest.raises(ValueError, match="paths must be an integer"):
        sde.monte_carlo(torch.zeros(1, 2), torch.tensor(1.0), h=0.1, steps=2, paths=100.9, seed=1)
