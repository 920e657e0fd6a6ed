"""Fused Euler-Maruyama simulation with counter-based normals, and Monte Carlo reductions.

The scheme, for a batch of paths with start points x0::

    X_{k+1} = X_k + mu(X_k) h + sqrt(h) Sigma Z_k

with constant diffusion Sigma (a scalar, a diagonal, or a lower-triangular matrix) and a drift
from a fixed family (``Drift.zero()``, ``Drift.linear(A, b)``, ``Drift.mlp(W1, b1, W2, b2)``).
The normals Z_k come from Philox4x32-10 addressed by (seed, path, step): a run gives the same
numbers whatever the thread count or device, any step can be replayed, and nothing but the
requested states is ever stored. With ``antithetic=True`` paths 2j and 2j + 1 use opposite
normals.

Normals: each Philox block of four 32-bit words gives four normals by the Box-Muller transform,
computed in float32 for both dtypes (radius from 31 bits, at most 6.66; angle from 24 bits) with
the package's own logarithm, sine and cosine polynomials and explicit fused multiply-adds. The
normals are therefore the same bits on every CPU instruction-set tier and on CUDA, and within a
few float32 units in the last place of the exact transform of their words. A float64
simulation uses these float32-precision normals; its arithmetic is float64.

CPU kernels: paths advance in tiles of 16 lanes, vectorised for AVX-512, AVX2 or neither, picked
at run time (``deepkern.build_info()["cpu_capability"]``; lower it with the environment variable
``DEEPKERN_CPU_CAPABILITY=generic|avx2|avx512`` or ``deepkern._C.set_cpu_capability``). The
zero, linear, tanh and ReLU drifts vectorise; softplus and sine call the C library per element.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "Drift",
    "ACTIVATIONS",
    "FUNCTIONALS",
    "simulate",
    "monte_carlo",
    "normals",
    "default_seed",
    "drift_value",
    "reference_simulate",
    "plain_loop_simulate",
]

ACTIVATIONS = {"tanh": 0, "relu": 1, "softplus": 2, "sine": 3}
FUNCTIONALS = {"squared_norm": 0, "basket_call": 1, "max_call": 2, "affine": 3}
_ZERO, _LINEAR, _MLP = 0, 1, 2


@dataclass(frozen=True)
class Drift:
    """A drift from the kernels' fixed families.

    Use the constructors: ``Drift.zero()``, ``Drift.linear(A, b)`` for ``A x + b`` with
    ``A [d, d]`` and ``b [d]``, and ``Drift.mlp(W1, b1, W2, b2, activation)`` for
    ``W2 act(W1 x + b1) + b2`` with ``W1 [H, d]``, ``b1 [H]``, ``W2 [d, H]``, ``b2 [d]`` and
    ``act`` one of tanh, relu, softplus, sine. Parameters are differentiable.
    """

    kind: int
    activation: int = 0
    matrix: Tensor | None = None
    bias: Tensor | None = None
    out_matrix: Tensor | None = None
    out_bias: Tensor | None = None

    @staticmethod
    def zero() -> Drift:
        return Drift(_ZERO)

    @staticmethod
    def linear(A: Tensor, b: Tensor) -> Drift:
        return Drift(_LINEAR, 0, A, b)

    @staticmethod
    def mlp(W1: Tensor, b1: Tensor, W2: Tensor, b2: Tensor, activation: str = "tanh") -> Drift:
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
        return Drift(_MLP, ACTIVATIONS[activation], W1, b1, W2, b2)

    def parameters(self) -> list[Tensor | None]:
        return [self.matrix, self.bias, self.out_matrix, self.out_bias]


def _integer(name: str, value) -> int:
    """``value`` as an int; floats, strings and bools are refused rather than truncated."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    return int(value)


def _checked_seed(seed: int | None, generator: torch.Generator | None) -> int:
    if seed is None:
        return default_seed(generator)
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise ValueError(f"seed must be an integer in [0, 2^63), got {seed!r}")
    return seed


def default_seed(generator: torch.Generator | None = None) -> int:
    """A 62-bit seed drawn from torch's generator, so ``torch.manual_seed`` fixes the run."""
    return int(torch.randint(0, 2**62, (1,), generator=generator).item())


def normals(
    like: Tensor, steps: int, seed: int, first_step: int = 0, antithetic: bool = False
) -> Tensor:
    """The normals the kernels draw: ``Tensor[steps, paths, dim]`` for ``like [paths, dim]``.

    Entry [k, p, i] is Z_{first_step + k} of path p, coordinate i. Used by the reference and to
    measure the generator's rate alone.
    """
    return torch.ops.deepkern.sde_normals(
        like, steps, first_step, _checked_seed(seed, None), antithetic
    )


def simulate(
    x0: Tensor,
    sigma: Tensor,
    drift: Drift | None = None,
    *,
    h: float,
    steps: int,
    save_every: int = 0,
    seed: int | None = None,
    antithetic: bool = False,
    first_step: int = 0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Simulate Euler-Maruyama paths without storing them.

    Args:
        x0 (Tensor[P, d], float32 or float64): one start point per path.
        sigma (Tensor[], Tensor[d] or Tensor[d, d] lower-triangular, dtype of x0): diffusion.
        drift (Drift): the drift; zero when None.
        h (float > 0): step size. steps (int >= 0): number of steps.
        save_every (int): 0 returns X_steps; k > 0 returns the states at steps 0, k, 2k, ...,
            steps (steps must be a multiple of k).
        seed (int): Philox key; drawn from torch's generator (or ``generator``) when None.
        antithetic (bool): paths 2j and 2j + 1 use opposite normals.
        first_step (int): step index of x0 in the noise stream, to continue a simulation.

    Returns:
        Tensor[P, d], or Tensor[P, steps // save_every + 1, d] with save_every.

    Raises:
        RuntimeError: on negative step counts, a Sigma that is not square or not lower-
            triangular, drift parameters of the wrong shape, non-finite inputs.

    Gradients flow to x0 and the drift parameters (not to sigma). The backward replays the
    noise from its counters with checkpoints every ceil(sqrt(steps)) steps: it holds
    about 2 sqrt(steps) states per path (checkpoints plus one segment), where storing the path
    would hold ``steps``, and costs about two more forward simulations. Checking inputs reads
    their values once (a host synchronisation on CUDA).

    Example:
        >>> x_T = simulate(torch.zeros(1000, 3), torch.tensor(0.5), h=0.01, steps=100, seed=1)
    """
    drift = drift or Drift.zero()
    seed = _checked_seed(seed, generator)
    return torch.ops.deepkern.sde_euler(
        x0,
        sigma,
        *drift.parameters(),
        drift.kind,
        drift.activation,
        float(h),
        _integer("steps", steps),
        _integer("first_step", first_step),
        _integer("save_every", save_every),
        seed,
        bool(antithetic),
    )


def monte_carlo(
    x0: Tensor,
    sigma: Tensor,
    drift: Drift | None = None,
    *,
    h: float,
    steps: int,
    paths: int,
    functional: str = "squared_norm",
    weights: Tensor | None = None,
    offset: float = 0.0,
    log_coordinates: bool = False,
    seed: int | None = None,
    antithetic: bool = False,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Mean, variance and standard error of a terminal functional, without storing paths.

    For each start point, ``paths`` paths are simulated and reduced on the fly (Welford's
    update per chunk, chunks merged in a fixed order: deterministic).

    Args:
        x0 (Tensor[B, d]): start points. sigma, drift, h, steps, seed, antithetic: as
            ``simulate``; path m of start b uses the noise stream of path ``b * paths + m``.
        paths (int >= 2, even with antithetic): paths per start point.
        functional: "squared_norm" (|X_T|^2), "basket_call" (max(w . Y - offset, 0)),
            "max_call" (max(max_i Y_i - offset, 0)) or "affine" (w . Y + offset), where
            Y = exp(X_T) with ``log_coordinates`` (geometric Brownian motion in log
            coordinates) and Y = X_T otherwise.
        weights (Tensor[d]): w for basket and affine functionals; ones when None.

    Returns:
        Tensor[B, 3]: mean, unbiased variance and standard error of the mean.

    Not differentiable; use ``simulate`` and a PyTorch functional for gradients.
    """
    if functional not in FUNCTIONALS:
        raise ValueError(f"functional must be one of {sorted(FUNCTIONALS)}, got {functional!r}")
    if x0.requires_grad or any(
        p is not None and p.requires_grad for p in (drift or Drift.zero()).parameters()
    ):
        raise ValueError(
            "monte_carlo is not differentiable; simulate the paths with simulate() and reduce "
            "them with PyTorch to get gradients"
        )
    drift = drift or Drift.zero()
    seed = _checked_seed(seed, generator)
    if weights is None:
        weights = torch.ones(x0.shape[-1], dtype=x0.dtype, device=x0.device)
    return torch.ops.deepkern.sde_monte_carlo(
        x0,
        sigma,
        *drift.parameters(),
        drift.kind,
        drift.activation,
        float(h),
        _integer("steps", steps),
        _integer("paths", paths),
        seed,
        bool(antithetic),
        FUNCTIONALS[functional],
        weights,
        float(offset),
        bool(log_coordinates),
    )


# ---------------------------------------------------------------------------------------------
# References


def drift_value(x: Tensor, kind: int, activation: int, params) -> Tensor:
    """mu(x) for a batch of states, in plain PyTorch (differentiable)."""
    A, b, W2, b2 = params
    if kind == _ZERO:
        return torch.zeros_like(x)
    if kind == _LINEAR:
        return x @ A.T + b
    pre = x @ A.T + b
    act = (torch.tanh, torch.relu, torch.nn.functional.softplus, torch.sin)[activation]
    return act(pre) @ W2.T + b2


def _diffuse(sigma: Tensor, z: Tensor) -> Tensor:
    if sigma.dim() == 2:
        return z @ sigma.T
    return sigma * z


def reference_simulate(
    x0: Tensor,
    sigma: Tensor,
    drift: Drift | None = None,
    *,
    h: float,
    steps: int,
    seed: int,
    save_every: int = 0,
    antithetic: bool = False,
    first_step: int = 0,
) -> Tensor:
    """The plain PyTorch Euler-Maruyama loop on the kernels' own normals (for tests)."""
    drift = drift or Drift.zero()
    z_all = normals(x0.detach(), steps, seed, first_step, antithetic)
    x, saved = x0, [x0]
    for k in range(steps):
        step = drift_value(x, drift.kind, drift.activation, drift.parameters()) * h
        x = x + (step + math.sqrt(h) * _diffuse(sigma, z_all[k]))
        if save_every and (k + 1) % save_every == 0:
            saved.append(x)
    return torch.stack(saved, dim=1) if save_every else x


def plain_loop_simulate(
    x0: Tensor,
    sigma: Tensor,
    drift: Drift | None = None,
    *,
    h: float,
    steps: int,
    generator: torch.Generator | None = None,
) -> Tensor:
    """What a user would write without deepkern: torch.randn each step (for benchmarks)."""
    drift = drift or Drift.zero()
    x = x0
    sqrt_h = math.sqrt(h)
    for _ in range(steps):
        z = torch.randn(x.shape, dtype=x.dtype, device=x.device, generator=generator)
        x = x + drift_value(x, drift.kind, drift.activation, drift.parameters()) * h
        x = x + sqrt_h * _diffuse(sigma, z)
    return x


# ---------------------------------------------------------------------------------------------
# Fake kernels and autograd


def _check_fake_devices(x0, *others) -> None:
    for t in others:
        if t is not None:
            torch._check(
                t.device == x0.device,
                lambda t=t: (
                    f"every tensor must be on the device of x0 ({x0.device}), got {t.device}"
                ),
            )


@torch.library.register_fake("deepkern::sde_euler")
def _fake_euler(
    x0,
    sigma,
    matrix,
    bias,
    out_matrix,
    out_bias,
    drift_kind,
    activation,
    h,
    steps,
    first_step,
    save_every,
    seed,
    antithetic,
):
    _check_fake_devices(x0, sigma, matrix, bias, out_matrix, out_bias)
    torch._check(
        save_every == 0 or steps % save_every == 0,
        lambda: f"steps ({steps}) must be a multiple of save_every ({save_every})",
    )
    torch._check(x0.dim() == 2, lambda: "x0 must have shape [paths, dim]")
    torch._check(steps >= 0, lambda: f"steps must be non-negative, got {steps}")
    if save_every > 0:
        return x0.new_empty((x0.shape[0], steps // save_every + 1, x0.shape[1]))
    return x0.new_empty(x0.shape)


@torch.library.register_fake("deepkern::sde_normals")
def _fake_normals(like, steps, first_step, seed, antithetic):
    torch._check(like.dim() == 2, lambda: "like must have shape [paths, dim]")
    return like.new_empty((steps, like.shape[0], like.shape[1]))


@torch.library.register_fake("deepkern::sde_monte_carlo")
def _fake_monte_carlo(
    x0,
    sigma,
    matrix,
    bias,
    out_matrix,
    out_bias,
    drift_kind,
    activation,
    h,
    steps,
    paths,
    seed,
    antithetic,
    functional,
    weights,
    offset,
    log_coordinates,
):
    _check_fake_devices(x0, sigma, matrix, bias, out_matrix, out_bias, weights)
    torch._check(x0.dim() == 2, lambda: "x0 must have shape [starts, dim]")
    return x0.new_empty((x0.shape[0], 3))


def _euler_setup(ctx, inputs, output):
    (
        x0,
        sigma,
        matrix,
        bias,
        out_matrix,
        out_bias,
        drift_kind,
        activation,
        h,
        steps,
        first_step,
        save_every,
        seed,
        antithetic,
    ) = inputs
    if sigma.requires_grad:
        raise NotImplementedError(
            "sde_euler has no gradient with respect to sigma; detach sigma or simulate with "
            "reference_simulate"
        )
    ctx.save_for_backward(x0, sigma, matrix, bias, out_matrix, out_bias)
    ctx.config = (drift_kind, activation, h, steps, first_step, save_every, seed, antithetic)


def _euler_backward(ctx, grad_out):
    if torch.is_grad_enabled():
        raise RuntimeError(
            "sde_euler supports first derivatives only (its backward replays the noise outside "
            "autograd); for create_graph=True use reference_simulate"
        )
    x0, sigma, *params = ctx.saved_tensors
    drift_kind, activation, h, steps, first_step, save_every, seed, antithetic = ctx.config
    params = [p.detach() if p is not None else None for p in params]
    x0 = x0.detach()

    def run(start, count, offset, every):
        return torch.ops.deepkern.sde_euler(
            start,
            sigma.detach(),
            *params,
            drift_kind,
            activation,
            h,
            count,
            offset,
            every,
            seed,
            antithetic,
        )

    # Checkpoints every `span` steps, the forward replayed once from x0.
    span = max(1, math.ceil(math.sqrt(steps))) if steps else 1
    bounds = list(range(0, steps, span)) + [steps]
    checkpoints = [x0]
    for lo, hi in zip(bounds[:-1], bounds[1:-1]):
        checkpoints.append(run(checkpoints[-1], hi - lo, first_step + lo, 0))

    def injected(step):
        if save_every == 0:
            return grad_out if step == steps else None
        return grad_out[:, step // save_every] if step % save_every == 0 else None

    adjoint = injected(steps)
    adjoint = torch.zeros_like(x0) if adjoint is None else adjoint.clone()
    wanted = [p for p in params if p is not None]
    param_grads = [torch.zeros_like(p) for p in wanted]

    # Walk the segments backwards, replaying each one's states from its checkpoint.
    for segment in reversed(range(len(bounds) - 1)):
        lo, hi = bounds[segment], bounds[segment + 1]
        states = run(checkpoints[segment], hi - lo, first_step + lo, 1)
        for k in reversed(range(hi - lo)):
            if drift_kind == _ZERO:  # mu = 0: the adjoint only collects injected gradients
                extra = injected(lo + k)
                if extra is not None:
                    adjoint = adjoint + extra
                continue
            x = states[:, k].requires_grad_(True)
            live = [p.requires_grad_(True) for p in wanted]
            with torch.enable_grad():
                mu = drift_value(x, drift_kind, activation, _rebuild(params, live))
                grads = torch.autograd.grad(
                    mu, [x] + live, adjoint * h, allow_unused=True, materialize_grads=True
                )
            adjoint = adjoint + grads[0]
            for total, g in zip(param_grads, grads[1:]):
                total += g
            extra = injected(lo + k)
            if extra is not None:
                adjoint = adjoint + extra

    out_params = iter(param_grads)
    param_out = [next(out_params) if p is not None else None for p in params]
    return (adjoint, None, *param_out) + (None,) * 8


def _rebuild(params, live):
    it = iter(live)
    return [next(it) if p is not None else None for p in params]


torch.library.register_autograd("deepkern::sde_euler", _euler_backward, setup_context=_euler_setup)
