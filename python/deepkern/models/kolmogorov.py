"""Deep Kolmogorov solver (Beck, Becker, Grohs, Jaafari and Jentzen, "Solving the Kolmogorov PDE
by means of deep learning", 2018; J. Sci. Comput. 2021).

For a diffusion ``dX = mu(X) dt + Sigma dW`` started at x, the function
``u(T, x) = E[phi(X_T^x)]`` solves the Kolmogorov backward equation with terminal value phi.
Among all functions f of x, the conditional expectation u(T, .) is the one that minimises
``E |f(xi) - phi(X_T^xi)|^2`` for a start point xi drawn uniformly from a box [a, b]^d. The solver
therefore regresses a network on pairs (xi, phi(X_T^xi)) with one fresh Euler-Maruyama path per
pair and fresh pairs at every step; no path is ever reused and no value of u is ever needed.

This module holds:

- the test problems (:class:`KolmogorovProblem`, :data:`PROBLEMS`, :func:`make_problem`): the heat
  equation with a paraboloid and with a Gaussian terminal value, an Ornstein-Uhlenbeck process,
  a process with a nonlinear (sine network) drift, and the max-call option on d independent
  geometric Brownian motions; each with its reference: closed forms, a one-dimensional quadrature
  for the max-call, or the Monte Carlo reductions of :mod:`deepkern.ops.sde`;
- the networks: the paper's two-hidden-layer net (:class:`PlainNet`) and a residual net of the
  same parameter budget (:class:`KolmogorovResNet`);
- :class:`EulerMaruyamaResNet`, a ResNet whose residual blocks are the Euler-Maruyama steps of
  an SDE: with the kernel's noise it reproduces :func:`deepkern.ops.sde.simulate`, and its mean
  over noise is u(T, x);
- :func:`train` with :class:`TrainConfig` (seeded, checkpointed, resumable, data parallel under
  ``torch.distributed``) and :func:`evaluate` (relative L1, L2 and L-infinity errors);
- the ``deepkern kolmogorov`` and ``deepkern reproduce kolmogorov`` commands.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from deepkern.models.training import (
    data_parallel,
    environment,
    progress_bar,
    rank_and_world,
    save_atomic,
    write_json,
)
from deepkern.ops import sde

__all__ = [
    "KolmogorovProblem",
    "PROBLEMS",
    "make_problem",
    "heat_problem",
    "gaussian_heat_problem",
    "ornstein_uhlenbeck_problem",
    "sine_drift_problem",
    "max_call_problem",
    "heat_solution",
    "gaussian_heat_solution",
    "ornstein_uhlenbeck_solution",
    "max_call_solution",
    "PlainNet",
    "KolmogorovResNet",
    "build_network",
    "count_parameters",
    "output_statistics",
    "EulerMaruyamaResNet",
    "TrainConfig",
    "train",
    "evaluate",
    "relative_errors",
    "add_kolmogorov_arguments",
    "run_kolmogorov",
    "add_reproduce_arguments",
    "run_reproduce",
]

logger = logging.getLogger("deepkern.models.kolmogorov")

_DTYPES = {"float32": torch.float32, "float64": torch.float64}


# ---------------------------------------------------------------------------------------------
# Closed forms


def _diffusion_variance(sigma: Tensor, dim: int) -> Tensor:
    """Diagonal of Sigma Sigma^T as Tensor[d], for a scalar, diagonal or matrix Sigma."""
    if sigma.dim() == 2:
        return (sigma * sigma).sum(1)
    return (sigma * sigma).expand(dim)


def heat_solution(x: Tensor, sigma: Tensor, T: float) -> Tensor:
    """u(T, x) = E|x + Sigma W_T|^2 = |x|^2 + T trace(Sigma Sigma^T).

    Args:
        x (Tensor[N, d]): start points.
        sigma (Tensor[], Tensor[d] or Tensor[d, d]): the diffusion.
        T (float): the time horizon.

    Returns:
        Tensor[N].
    """
    return (x * x).sum(-1) + T * _diffusion_variance(sigma, x.shape[-1]).sum()


def gaussian_heat_solution(x: Tensor, sigma: Tensor, T: float, scale: float) -> Tensor:
    """u(T, x) = E exp(-|x + Sigma W_T|^2 / scale) for a scalar or diagonal Sigma.

    Coordinate i of X_T is normal with mean x_i and variance v_i = sigma_i^2 T, and a Gaussian
    integral gives ``E exp(-Y^2 / c) = (1 + 2 v / c)^(-1/2) exp(-m^2 / (c + 2 v))`` for
    ``Y ~ N(m, v)``; the coordinates are independent, so u is the product over i.

    Args:
        x (Tensor[N, d]): start points.
        sigma (Tensor[] or Tensor[d]): the diffusion (independent coordinates).
        T (float): the time horizon.
        scale (float > 0): c in exp(-|y|^2 / c).

    Returns:
        Tensor[N].
    """
    if sigma.dim() == 2:
        raise ValueError("gaussian_heat_solution needs a scalar or diagonal sigma")
    v = _diffusion_variance(sigma, x.shape[-1]) * T
    log_u = -(x * x / (scale + 2 * v)).sum(-1) - 0.5 * torch.log1p(2 * v / scale).sum()
    return torch.exp(log_u)


def ornstein_uhlenbeck_solution(
    x: Tensor,
    theta: Tensor,
    level: Tensor,
    sigma: Tensor,
    T: float,
    steps: int | None = None,
) -> Tensor:
    """u(T, x) = E|X_T|^2 for ``dX_i = theta_i (level_i - X_i) dt + sigma_i dW_i``.

    In continuous time (``steps`` None) each coordinate is normal with mean
    ``level + exp(-theta T) (x - level)`` and variance
    ``sigma^2 (1 - exp(-2 theta T)) / (2 theta)``.
    The Euler-Maruyama chain with ``steps`` steps of size h is the linear recursion
    ``Y <- level + a (Y - level) + sigma sqrt(h) Z`` with ``a = 1 - theta h``, whose mean is
    ``level + a^n (x - level)`` and whose variance is ``sigma^2 h (1 - a^(2n)) / (1 - a^2)``: the
    exact expectation of what the simulated paths average to. Then u = sum of mean^2 + variance.

    Args:
        x (Tensor[N, d]): start points.
        theta (Tensor[d], positive): mean-reversion rates.
        level (Tensor[d]): long-run means.
        sigma (Tensor[] or Tensor[d]): diagonal diffusion.
        T (float): the time horizon.
        steps (int or None): Euler-Maruyama steps; None for the SDE itself.

    Returns:
        Tensor[N].
    """
    var_scale = _diffusion_variance(sigma, x.shape[-1])
    if steps is None:
        decay = torch.exp(-theta * T)
        var = var_scale * -torch.expm1(-2 * theta * T) / (2 * theta)
    else:
        h = T / steps
        a = 1 - theta * h
        decay = a**steps
        # sum_{k < n} a^(2k), written without dividing by 1 - a^2 (zero when theta h = 2).
        geometric = torch.where(
            (a * a - 1).abs() > 1e-12, (1 - a ** (2 * steps)) / (1 - a * a), float(steps)
        )
        var = var_scale * h * geometric
    mean = level + decay * (x - level)
    return (mean * mean + var).sum(-1)


# Gauss-Legendre nodes per panel and panels per integral of the max-call quadrature: with the
# integrand analytic and its scale at least min_i sigma_i sqrt(T), 8 panels of 32 nodes agree
# with 32 panels of 128 nodes to 1e-13 at d = 100 (and with Black-Scholes to 1e-14 at d = 1).
_QUADRATURE_NODES = 32
_QUADRATURE_PANELS = 8
# The integral stops where every coordinate is 12 standard deviations above its mean: beyond,
# the survival function is below d * Phi(-12), about 1e-31 per coordinate.
_QUADRATURE_REACH = 12.0


def max_call_solution(
    mean: Tensor, std: Tensor, strike: float, discount: float = 1.0, chunk: int = 256
) -> Tensor:
    """``discount * E max(max_i exp(Y_i) - strike, 0)`` for independent normal Y_i.

    Y_i has mean ``mean_i`` and standard deviation ``std_i``.

    With ``M = max_i exp(Y_i)``, ``E (M - K)^+ = int_K^inf P(M > s) ds`` and
    ``P(M > s) = 1 - prod_i Phi((log s - mean_i) / std_i)``. After ``s = e^z`` the integral over
    z is smooth and is computed by composite Gauss-Legendre quadrature in float64, the product
    as ``-expm1(sum log Phi)`` so that tiny survival probabilities keep their digits. The max-call
    on d independent geometric Brownian motions is the case ``mean = log x + (mu - sigma^2/2) T``,
    ``std = sigma sqrt(T)``.

    Args:
        mean (Tensor[N, d]): means of the log-prices at T.
        std (Tensor[d], positive): their standard deviations.
        strike (float > 0): K.
        discount (float): factor applied to the expectation (exp(-r T) for a price).
        chunk (int): start points per pass (memory is chunk x 256 x d float64 numbers).

    Returns:
        Tensor[N] in the dtype of ``mean``.
    """
    out_dtype = mean.dtype
    mean = mean.to(torch.float64)
    std = std.to(device=mean.device, dtype=torch.float64)
    nodes, weights = _gauss_legendre(_QUADRATURE_NODES, mean.device)
    lo = math.log(strike)
    edges = torch.linspace(0, 1, _QUADRATURE_PANELS + 1, dtype=torch.float64, device=mean.device)
    values = []
    for start in range(0, mean.shape[0], chunk):
        m = mean[start : start + chunk]
        hi = (m + _QUADRATURE_REACH * std).amax(-1).clamp(min=lo + 1e-9)
        a = lo + (hi[:, None] - lo) * edges[:-1]
        b = lo + (hi[:, None] - lo) * edges[1:]
        half = ((b - a) / 2)[..., None]
        z = ((a + b) / 2)[..., None] + half * nodes  # [n, panels, nodes]
        log_cdf = torch.special.log_ndtr((z[..., None] - m[:, None, None, :]) / std)
        survival = -torch.expm1(log_cdf.sum(-1))
        values.append((survival * torch.exp(z) * half * weights).sum((-1, -2)))
    if not values:
        return mean.new_zeros(0).to(out_dtype)
    return (discount * torch.cat(values)).to(out_dtype)


@functools.lru_cache(maxsize=8)
def _gauss_legendre_cpu(n: int) -> tuple[Tensor, Tensor]:
    import numpy as np

    nodes, weights = np.polynomial.legendre.leggauss(n)
    return torch.from_numpy(nodes), torch.from_numpy(weights)


def _gauss_legendre(n: int, device) -> tuple[Tensor, Tensor]:
    nodes, weights = _gauss_legendre_cpu(n)
    return nodes.to(device), weights.to(device)


# ---------------------------------------------------------------------------------------------
# Problems


@dataclass(frozen=True, eq=False)
class KolmogorovProblem:
    """A Kolmogorov problem: an SDE, a terminal value phi and a box of start points.

    The solver learns ``u(T, x) = E[phi(X_T)]`` for network inputs x uniform in
    ``[low, high]^dim``. The SDE ``dX = mu(X) dt + Sigma dW`` starts at ``start(x)`` (x itself
    when ``start`` is None) and is simulated with ``sde_steps`` Euler-Maruyama steps.

    Attributes:
        name: the registry name.
        dim: d.
        low, high: the box [low, high]^d of network inputs.
        T: the time horizon.
        sigma (Tensor[], Tensor[d] or Tensor[d, d] lower-triangular): the diffusion.
        drift: the drift, from the kernels' families.
        sde_steps: Euler-Maruyama steps per path.
        payoff: phi, Tensor[N, d] of terminal states -> Tensor[N].
        solution: u(T, x) for inputs Tensor[N, d] -> Tensor[N], or None when only a Monte Carlo
            reference exists.
        solution_kind: how ``solution`` is computed ("closed form", "quadrature").
        discrete_solution: the same expectation for the Euler-Maruyama chain, when it differs
            from ``solution`` (the learnable target; their gap is the discretisation error).
        start: network input -> SDE start point, Tensor[N, d] -> Tensor[N, d]; None for x.
        functional, strike, log_coordinates, discount: how ``sde.monte_carlo`` computes the same
            expectation (discount multiplies its result); functional None falls back to
            simulated paths reduced in PyTorch.
        description: one line for tables and logs.
    """

    name: str
    dim: int
    low: float
    high: float
    T: float
    sigma: Tensor
    drift: sde.Drift
    sde_steps: int
    payoff: Callable[[Tensor], Tensor]
    solution: Callable[[Tensor], Tensor] | None = None
    solution_kind: str = "closed form"
    discrete_solution: Callable[[Tensor], Tensor] | None = None
    start: Callable[[Tensor], Tensor] | None = None
    functional: str | None = None
    strike: float = 0.0
    log_coordinates: bool = False
    discount: float = 1.0
    description: str = ""

    @property
    def h(self) -> float:
        """The Euler-Maruyama step size T / sde_steps."""
        return self.T / self.sde_steps

    @property
    def dtype(self) -> torch.dtype:
        return self.sigma.dtype

    @property
    def device(self) -> torch.device:
        return self.sigma.device

    def sample(self, n: int, generator: torch.Generator) -> Tensor:
        """n network inputs uniform in the box: Tensor[n, d] (drawn on the CPU, then moved)."""
        u = torch.rand(n, self.dim, generator=generator, dtype=torch.float64)
        x = self.low + (self.high - self.low) * u
        return x.to(device=self.device, dtype=self.dtype)

    def state(self, x: Tensor) -> Tensor:
        """The SDE start point of each network input: Tensor[N, d]."""
        return x if self.start is None else self.start(x)

    def labels(self, x: Tensor, seed: int) -> Tensor:
        """phi(X_T) on one fresh path per input: Tensor[N], the regression targets.

        Args:
            x (Tensor[N, d]): network inputs.
            seed (int): Philox key of the paths (path n uses the stream of row n).
        """
        with torch.no_grad():
            x_T = sde.simulate(
                self.state(x), self.sigma, self.drift, h=self.h, steps=self.sde_steps, seed=seed
            )
            return self.payoff(x_T)

    def monte_carlo(
        self, x: Tensor, paths: int, seed: int, chunk: int = 64
    ) -> tuple[Tensor, Tensor]:
        """Monte Carlo estimate of u(T, x) and its standard error, both Tensor[N].

        Uses the fused reduction of ``sde.monte_carlo`` (no path stored) when the payoff is one
        of its functionals, and otherwise simulates ``paths`` terminal states per point in
        chunks of at most about 2^20 paths and reduces them here.

        Args:
            x (Tensor[N, d]): network inputs.
            paths (int >= 2): paths per point.
            seed (int): seed of the paths (each chunk of points gets a stream derived from it).
            chunk (int): points per call of the fused reduction.
        """
        if self.functional is None:
            chunk = max(1, min(chunk, (1 << 20) // paths))
        means, errors = [], []
        for start in range(0, x.shape[0], chunk):
            xs = self.state(x[start : start + chunk])
            chunk_seed = _derived_seed(seed, start)
            if self.functional is not None:
                out = sde.monte_carlo(
                    xs,
                    self.sigma,
                    self.drift,
                    h=self.h,
                    steps=self.sde_steps,
                    paths=paths,
                    functional=self.functional,
                    offset=self.strike,
                    log_coordinates=self.log_coordinates,
                    seed=chunk_seed,
                )
                means.append(self.discount * out[:, 0])
                errors.append(self.discount * out[:, 2])
            else:
                x_T = sde.simulate(
                    xs.repeat_interleave(paths, 0),
                    self.sigma,
                    self.drift,
                    h=self.h,
                    steps=self.sde_steps,
                    seed=chunk_seed,
                )
                values = self.payoff(x_T).reshape(-1, paths)
                means.append(values.mean(1))
                errors.append(values.std(1) / math.sqrt(paths))
        if not means:
            empty = x.new_zeros(0)
            return empty, empty
        return torch.cat(means), torch.cat(errors)

    def reference(self, x: Tensor, paths: int, seed: int) -> tuple[Tensor, Tensor, str]:
        """u(T, x) from the best available source: (values, standard errors, kind).

        Closed forms and quadratures have zero standard error; otherwise a Monte Carlo estimate
        with ``paths`` paths per point.
        """
        if self.solution is not None:
            u = self.solution(x)
            return u, torch.zeros_like(u), self.solution_kind
        u, se = self.monte_carlo(x, paths, seed)
        return u, se, f"Monte Carlo, {paths} paths per point"


def _squared_norm(y: Tensor) -> Tensor:
    return (y * y).sum(-1)


def _gaussian_payoff(y: Tensor, scale: float) -> Tensor:
    return torch.exp(-(y * y).sum(-1) / scale)


def _max_call_payoff(y: Tensor, strike: float, discount: float) -> Tensor:
    return discount * (torch.exp(y).amax(-1) - strike).clamp(min=0)


def _shift_log(x: Tensor, shift: Tensor) -> Tensor:
    return torch.log(x) + shift


def heat_problem(
    dim: int, dtype: torch.dtype = torch.float32, device="cpu", sde_steps: int | None = None
) -> KolmogorovProblem:
    """The paper's heat equation: ``u_t = Laplace u``, u(0, x) = |x|^2, on [0, 1]^d at T = 1.

    Its SDE is ``dX = sqrt(2) dW`` (the generator of sqrt(2) W is the Laplacian), so
    ``u(T, x) = |x|^2 + 2 T d``. Zero drift makes one Euler-Maruyama step exact.
    """
    sigma = torch.tensor(math.sqrt(2.0), dtype=dtype, device=device)
    T = 1.0
    return KolmogorovProblem(
        name="heat",
        dim=dim,
        low=0.0,
        high=1.0,
        T=T,
        sigma=sigma,
        drift=sde.Drift.zero(),
        sde_steps=sde_steps or 1,
        payoff=_squared_norm,
        solution=functools.partial(heat_solution, sigma=sigma, T=T),
        functional="squared_norm",
        description="heat equation, phi = |x|^2, sigma = sqrt(2), [0, 1]^d, T = 1",
    )


def gaussian_heat_problem(
    dim: int, dtype: torch.dtype = torch.float32, device="cpu", sde_steps: int | None = None
) -> KolmogorovProblem:
    """The heat equation with a Gaussian terminal value ``phi(x) = exp(-|x|^2 / d)``.

    The width grows with d so that phi keeps values of order one on [0, 1]^d in every
    dimension. The solution is a Gaussian convolution (:func:`gaussian_heat_solution`).
    """
    sigma = torch.tensor(math.sqrt(2.0), dtype=dtype, device=device)
    T, scale = 1.0, float(dim)
    return KolmogorovProblem(
        name="heat-gaussian",
        dim=dim,
        low=0.0,
        high=1.0,
        T=T,
        sigma=sigma,
        drift=sde.Drift.zero(),
        sde_steps=sde_steps or 1,
        payoff=functools.partial(_gaussian_payoff, scale=scale),
        solution=functools.partial(gaussian_heat_solution, sigma=sigma, T=T, scale=scale),
        description="heat equation, phi = exp(-|x|^2 / d), sigma = sqrt(2), [0, 1]^d, T = 1",
    )


def ornstein_uhlenbeck_problem(
    dim: int, dtype: torch.dtype = torch.float32, device="cpu", sde_steps: int | None = None
) -> KolmogorovProblem:
    """An Ornstein-Uhlenbeck process pulled towards 1, phi = |x|^2, on [0, 1]^d at T = 1.

    ``dX_i = theta_i (1 - X_i) dt + sigma_i dW_i`` with rates theta from 0.5 to 1.5 and
    volatilities sigma from 0.5 to 1 across the coordinates. The linear drift is
    ``A x + b`` with ``A = -diag(theta)`` and ``b = theta``. The reference is the closed form of
    the SDE; ``discrete_solution`` is that of the Euler-Maruyama chain being sampled (100 steps
    by default, a gap of about 0.3% relative).
    """
    theta = torch.linspace(0.5, 1.5, dim, dtype=dtype, device=device)
    level = torch.ones(dim, dtype=dtype, device=device)
    sigma = torch.linspace(0.5, 1.0, dim, dtype=dtype, device=device)
    T, steps = 1.0, sde_steps or 100
    solution = functools.partial(
        ornstein_uhlenbeck_solution, theta=theta, level=level, sigma=sigma, T=T
    )
    return KolmogorovProblem(
        name="ou",
        dim=dim,
        low=0.0,
        high=1.0,
        T=T,
        sigma=sigma,
        drift=sde.Drift.linear(-torch.diag(theta), theta * level),
        sde_steps=steps,
        payoff=_squared_norm,
        solution=solution,
        discrete_solution=functools.partial(solution, steps=steps),
        functional="squared_norm",
        description="Ornstein-Uhlenbeck towards 1, phi = |x|^2, [0, 1]^d, T = 1",
    )


# The sine-drift problem's network is fixed by this seed, so that the problem is the same in
# every run; its hidden width is 16.
_SINE_DRIFT_SEED = 20180601
_SINE_DRIFT_HIDDEN = 16


def sine_drift_problem(
    dim: int, dtype: torch.dtype = torch.float32, device="cpu", sde_steps: int | None = None
) -> KolmogorovProblem:
    """A nonlinear drift: ``mu(x) = W2 sin(W1 x + b1) + b2``, phi = |x|^2, [0, 1]^d, T = 1.

    The weights are fixed (seeded) random draws scaled so that the pre-activations and the
    drift are of order one in every dimension; sigma = 1. No closed form is known: the
    reference is Monte Carlo over the same Euler-Maruyama chain (32 steps by default), with
    its standard error.
    """
    g = torch.Generator().manual_seed(_SINE_DRIFT_SEED)
    hidden = _SINE_DRIFT_HIDDEN

    def draw(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=g, dtype=torch.float64)).to(dtype).to(device)

    w1 = draw(hidden, dim, scale=2.0 / math.sqrt(dim))
    b1 = (math.pi * (2 * torch.rand(hidden, generator=g, dtype=torch.float64) - 1)).to(dtype)
    w2 = draw(dim, hidden, scale=1.0 / math.sqrt(hidden))
    b2 = draw(dim, scale=0.1)
    return KolmogorovProblem(
        name="sine-drift",
        dim=dim,
        low=0.0,
        high=1.0,
        T=1.0,
        sigma=torch.tensor(1.0, dtype=dtype, device=device),
        drift=sde.Drift.mlp(w1, b1.to(device), w2, b2, "sine"),
        sde_steps=sde_steps or 32,
        payoff=_squared_norm,
        functional="squared_norm",
        description="sine-network drift, sigma = 1, phi = |x|^2, [0, 1]^d, T = 1",
    )


# The paper's max-call setting: interest rate r, dividend yield c (drift r - c), strike K,
# volatilities 0.1 + i / 200 for asset i = 1..d, start prices in [90, 110]^d, T = 1.
_MAX_CALL_RATE = 0.05
_MAX_CALL_DIVIDEND = 0.10
_MAX_CALL_STRIKE = 100.0


def max_call_problem(
    dim: int, dtype: torch.dtype = torch.float32, device="cpu", sde_steps: int | None = None
) -> KolmogorovProblem:
    """The max-call option on d independent geometric Brownian motions (the paper's setting).

    Prices follow ``dS_i = (r - c) S_i dt + sigma_i S_i dW_i``; the payoff is
    ``exp(-r T) max(max_i S_i - K, 0)``. In log coordinates ``Y = log S`` the SDE has the
    constant drift ``b = r - c - sigma^2 / 2`` and the constant diffusion diag(sigma), so one
    Euler-Maruyama step is exact and ``Y_T = log S_0 + b T + sigma W_T``. The constant drift is
    folded into the start point (``start(x) = log x + b T``) and the kernel runs driftless: the
    kernels have no constant-drift family, and a linear drift with A = 0 would spend d^2
    operations per step on a zero matrix. The network sees the prices x in [90, 110]^d; the
    reference is the quadrature :func:`max_call_solution`.
    """
    T = 1.0
    sigma = (0.1 + torch.arange(1, dim + 1, dtype=torch.float64) / 200).to(dtype).to(device)
    shift = (_MAX_CALL_RATE - _MAX_CALL_DIVIDEND - sigma.double() ** 2 / 2) * T
    shift = shift.to(dtype).to(device)
    discount = math.exp(-_MAX_CALL_RATE * T)
    start = functools.partial(_shift_log, shift=shift)

    def solution(x: Tensor) -> Tensor:
        mean = torch.log(x.double()) + shift.double()
        return max_call_solution(
            mean, sigma.double() * math.sqrt(T), _MAX_CALL_STRIKE, discount
        ).to(x.dtype)

    return KolmogorovProblem(
        name="max-call",
        dim=dim,
        low=90.0,
        high=110.0,
        T=T,
        sigma=sigma,
        drift=sde.Drift.zero(),
        sde_steps=sde_steps or 1,
        payoff=functools.partial(_max_call_payoff, strike=_MAX_CALL_STRIKE, discount=discount),
        solution=solution,
        solution_kind="quadrature",
        start=start,
        functional="max_call",
        strike=_MAX_CALL_STRIKE,
        log_coordinates=True,
        discount=discount,
        description=(
            "max-call on independent geometric Brownian motions, K = 100, r = 0.05, "
            "c = 0.1, sigma_i = 0.1 + i/200, [90, 110]^d, T = 1"
        ),
    )


PROBLEMS: dict[str, Callable[..., KolmogorovProblem]] = {
    "heat": heat_problem,
    "heat-gaussian": gaussian_heat_problem,
    "ou": ornstein_uhlenbeck_problem,
    "sine-drift": sine_drift_problem,
    "max-call": max_call_problem,
}


def _check_problem_name(name) -> str:
    key = str(name).replace("_", "-")
    if key not in PROBLEMS:
        raise ValueError(f"unknown problem {name!r}; choose one of {', '.join(PROBLEMS)}")
    return key


def _check_dim(dim) -> int:
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
        raise ValueError(f"dim must be a positive integer, got {dim!r}")
    return dim


def make_problem(
    name: str,
    dim: int,
    dtype: torch.dtype = torch.float32,
    device="cpu",
    sde_steps: int | None = None,
) -> KolmogorovProblem:
    """Build a registered problem.

    Args:
        name: one of :data:`PROBLEMS` ("heat", "heat-gaussian", "ou", "sine-drift",
            "max-call"; underscores are accepted for hyphens).
        dim (int >= 1): the dimension d.
        dtype (float32 or float64): of the SDE and the references.
        device: where the SDE runs.
        sde_steps (int >= 1 or None): Euler-Maruyama steps; None for the problem's default.

    Returns:
        KolmogorovProblem.

    Raises:
        ValueError: an unknown name, a dim that is not a positive integer, a bad dtype or step
            count.

    Example:
        >>> problem = make_problem("heat", 10)
        >>> problem.solution(torch.zeros(1, 10))
        tensor([20.])
    """
    key = _check_problem_name(name)
    _check_dim(dim)
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
    if sde_steps is not None:
        _check_count("sde_steps", sde_steps, 1)
    return PROBLEMS[key](dim, dtype=dtype, device=device, sde_steps=sde_steps)


def output_statistics(
    problem: KolmogorovProblem, points: int, paths: int, seed: int
) -> tuple[float, float]:
    """Estimates of the mean and the standard deviation of u(T, x) over the box.

    The labels phi(X_T) are u(T, x) plus noise that is usually far larger than u's variation
    over the box (for the heat equation at d = 100, a spread of 33 around a u that varies by 3),
    so their spread says little about u's. With ``paths`` labels per point, the variance of the
    per-point means, less their mean squared standard error, is an unbiased estimate of u's
    variance over the box.

    Args:
        problem: the problem.
        points: uniform points of the box.
        paths (>= 2): paths per point.
        seed: seed of the points and paths.

    Returns:
        (mean, spread), with the spread floored at a tenth of the spread of the per-point means
        when the estimate is not positive.
    """
    generator = torch.Generator().manual_seed(_derived_seed(seed, 5))
    x = problem.sample(points, generator)
    means, errors = problem.monte_carlo(x, paths, sde.default_seed(generator))
    means, errors = means.double(), errors.double()
    total = float(means.var()) if points > 1 else 0.0
    signal = total - float(errors.square().mean())
    spread = math.sqrt(max(signal, 0.01 * total))
    return float(means.mean()), spread if spread > 0 else 1.0


# ---------------------------------------------------------------------------------------------
# Networks


def _linear(n_in: int, n_out: int, generator: torch.Generator | None) -> nn.Linear:
    # No bias: a batch normalisation follows every linear map and would cancel it.
    layer = nn.Linear(n_in, n_out, bias=False)
    nn.init.xavier_uniform_(layer.weight, generator=generator)
    return layer


class _OutputNorm(nn.Module):
    """Shared by both networks: the final batch normalisation and its data-driven start."""

    out_norm: nn.BatchNorm1d

    @torch.no_grad()
    def init_output(self, mean: float, spread: float) -> None:
        """Start the output at a given mean and spread over the box.

        The last layer is a batch normalisation, so the output is ``gamma * n + beta`` with n
        normalised over the batch: its batch mean is beta and its spread gamma, which start at
        0 and 1. For targets such as option prices near 160, Adam with steps of 1e-3 needs some
        1e5 steps for beta alone to walk there; a spread of 1 where u varies by 0.1 over the
        box forces the network to misfit until gamma has shrunk. Setting both from estimates
        of u's mean and spread (:func:`output_statistics`) removes that phase. The running
        statistics of the layer are left alone.

        Args:
            mean: the mean of u(T, x) over the box.
            spread (> 0): the standard deviation of u(T, x) over the box.
        """
        self.out_norm.bias.fill_(float(mean))
        self.out_norm.weight.fill_(float(spread))


class PlainNet(_OutputNorm):
    """The paper's network: batch normalisation at the input, after each hidden linear map and
    at the output; tanh activations; hidden width d + 100.

    ``x -> BN -> [Linear -> BN -> tanh] x depth -> Linear -> BN -> u``

    Args:
        dim: input dimension d.
        width: hidden width; d + 100 when None.
        depth: hidden layers (2 in the paper).
        generator: the random source of the initial weights (Glorot uniform).

    Shapes:
        forward(x: Tensor[N, d]) -> Tensor[N]. Training mode needs N >= 2 (batch statistics).
    """

    def __init__(
        self,
        dim: int,
        width: int | None = None,
        depth: int = 2,
        generator: torch.Generator | None = None,
    ):
        super().__init__()
        _check_dim(dim)
        width = dim + 100 if width is None else width
        if width < 1 or depth < 1:
            raise ValueError(f"width and depth must be positive, got {width} and {depth}")
        self.dim, self.width, self.depth = dim, width, depth
        self.in_norm = nn.BatchNorm1d(dim)
        layers: list[nn.Module] = []
        n_in = dim
        for _ in range(depth):
            layers += [_linear(n_in, width, generator), nn.BatchNorm1d(width), nn.Tanh()]
            n_in = width
        self.hidden = nn.Sequential(*layers)
        self.out = _linear(width, 1, generator)
        self.out_norm = nn.BatchNorm1d(1)

    def forward(self, x: Tensor) -> Tensor:
        return self.out_norm(self.out(self.hidden(self.in_norm(x)))).squeeze(-1)


class KolmogorovResNet(_OutputNorm):
    """A pre-activation residual network with the parameter budget of :class:`PlainNet`.

    ``x -> BN -> Linear -> [z + Linear(tanh(BN(z)))] x blocks -> BN -> tanh -> Linear -> BN``

    With ``width`` None the width is the largest whose parameter count does not exceed that of
    the plain net of width d + 100 (see :func:`resnet_width`).

    Args:
        dim: input dimension d.
        width: hidden width; matched to the plain net's budget when None.
        blocks: residual blocks.
        generator: the random source of the initial weights.

    Shapes:
        forward(x: Tensor[N, d]) -> Tensor[N].
    """

    def __init__(
        self,
        dim: int,
        width: int | None = None,
        blocks: int = 3,
        generator: torch.Generator | None = None,
    ):
        super().__init__()
        _check_dim(dim)
        if blocks < 1:
            raise ValueError(f"blocks must be positive, got {blocks}")
        width = resnet_width(dim, blocks) if width is None else width
        if width < 1:
            raise ValueError(f"width must be positive, got {width}")
        self.dim, self.width, self.blocks = dim, width, blocks
        self.in_norm = nn.BatchNorm1d(dim)
        self.stem = _linear(dim, width, generator)
        self.norms = nn.ModuleList(nn.BatchNorm1d(width) for _ in range(blocks))
        self.branches = nn.ModuleList(_linear(width, width, generator) for _ in range(blocks))
        self.head_norm = nn.BatchNorm1d(width)
        self.out = _linear(width, 1, generator)
        self.out_norm = nn.BatchNorm1d(1)

    def forward(self, x: Tensor) -> Tensor:
        z = self.stem(self.in_norm(x))
        for norm, branch in zip(self.norms, self.branches):
            z = z + branch(torch.tanh(norm(z)))
        return self.out_norm(self.out(torch.tanh(self.head_norm(z)))).squeeze(-1)


def _plain_parameters(dim: int, width: int, depth: int = 2) -> int:
    # Input BN (2d), first linear (d w), each hidden BN (2w), further linears (w^2), output
    # linear (w) and output BN (2).
    return 2 * dim + dim * width + depth * 2 * width + (depth - 1) * width * width + width + 2


def _resnet_parameters(dim: int, width: int, blocks: int) -> int:
    # Input BN, stem, per block a BN and a square linear, head BN, output linear and BN.
    return 2 * dim + dim * width + blocks * (2 * width + width * width) + 3 * width + 2


def resnet_width(dim: int, blocks: int = 3) -> int:
    """The widest :class:`KolmogorovResNet` within the parameter count of ``PlainNet(dim)``."""
    budget = _plain_parameters(dim, dim + 100)
    # Solve blocks w^2 + (d + 2 blocks + 3) w + 2 d + 2 = budget for w, then step down to fit.
    a, b, c = blocks, dim + 2 * blocks + 3, 2 * dim + 2 - budget
    width = max(1, int((-b + math.sqrt(b * b - 4 * a * c)) / (2 * a)))
    while width > 1 and _resnet_parameters(dim, width, blocks) > budget:
        width -= 1
    return width


def build_network(
    kind: str, dim: int, width: int | None = None, generator: torch.Generator | None = None
) -> nn.Module:
    """A :class:`PlainNet` ("plain") or :class:`KolmogorovResNet` ("resnet") for inputs in R^d."""
    if kind == "plain":
        return PlainNet(dim, width, generator=generator)
    if kind == "resnet":
        return KolmogorovResNet(dim, width, generator=generator)
    raise ValueError(f"network must be 'plain' or 'resnet', got {kind!r}")


def count_parameters(model: nn.Module) -> int:
    """Number of trainable numbers in ``model``."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# ---------------------------------------------------------------------------------------------
# The Euler-Maruyama ResNet


class EulerMaruyamaStep(nn.Module):
    """The residual function of one Euler-Maruyama block: ``h mu(x) + sqrt(h) Sigma z``.

    Every block of an :class:`EulerMaruyamaResNet` applies this same module (the SDE's drift
    does not change between steps), so its drift parameters are shared, trainable weights.

    Args:
        sigma (Tensor[], Tensor[d] or Tensor[d, d] lower-triangular): the diffusion (a buffer).
        drift (sde.Drift or None): the drift; its tensors become parameters of this module.
        h (float > 0): the step size.

    Shapes:
        forward(x: Tensor[N, d], z: Tensor[N, d]) -> Tensor[N, d].
    """

    _NAMES = ("matrix", "bias", "out_matrix", "out_bias")

    def __init__(self, sigma: Tensor, drift: sde.Drift | None, h: float):
        super().__init__()
        if not (h > 0 and math.isfinite(h)):
            raise ValueError(f"h must be positive and finite, got {h}")
        drift = drift or sde.Drift.zero()
        self.h = float(h)
        self.kind, self.activation = drift.kind, drift.activation
        self.register_buffer("sigma", sigma.detach().clone())
        for name, value in zip(self._NAMES, drift.parameters()):
            param = None if value is None else nn.Parameter(value.detach().clone())
            self.register_parameter(name, param)

    def drift(self) -> sde.Drift:
        """The drift with this module's (live, differentiable) parameters."""
        return sde.Drift(self.kind, self.activation, *(getattr(self, n) for n in self._NAMES))

    def forward(self, x: Tensor, z: Tensor) -> Tensor:
        params = [getattr(self, n) for n in self._NAMES]
        mu = sde.drift_value(x, self.kind, self.activation, params)
        noise = z @ self.sigma.T if self.sigma.dim() == 2 else self.sigma * z
        # The same grouping as the kernel, h mu + sqrt(h) Sigma z added to x in one go, keeps
        # the two paths equal to the last few bits.
        return mu * self.h + math.sqrt(self.h) * noise


class EulerMaruyamaResNet(nn.Module):
    """A ResNet whose residual blocks are the Euler-Maruyama steps of ``dX = mu dt + Sigma dW``.

    Block k maps ``x -> x + h mu(x) + sqrt(h) Sigma z_k``: a residual network of ``steps``
    weight-tied blocks whose k-th block is fed the normal vector z_k. Fed the kernels' own
    normals (:func:`deepkern.ops.sde.normals` with a seed, the default) its output is the path
    that :func:`deepkern.ops.sde.simulate` computes with that seed, and its average of phi over
    independent noise is ``E phi(X_T^x) = u(T, x)`` for the Euler-Maruyama chain. It runs as
    plain PyTorch, storing every block's activations for autograd; the fused kernel is the fast
    path, this module the readable one that exposes the blocks.

    Args:
        sigma (Tensor[], Tensor[d] or Tensor[d, d] lower-triangular): the diffusion.
        drift (sde.Drift or None): the drift (its tensors become trainable parameters).
        h (float > 0): the step size.
        steps (int >= 0): the number of blocks.

    Shapes:
        forward(x0: Tensor[P, d]) -> Tensor[P, d], or Tensor[P, steps // save_every + 1, d].

    Example:
        >>> net = EulerMaruyamaResNet(torch.tensor(0.5), h=0.01, steps=100)
        >>> x_T = net(torch.zeros(8, 3), seed=1)  # equals sde.simulate(..., seed=1)
    """

    def __init__(self, sigma: Tensor, drift: sde.Drift | None = None, *, h: float, steps: int):
        super().__init__()
        if isinstance(steps, bool) or int(steps) != steps or steps < 0:
            raise ValueError(f"steps must be a non-negative integer, got {steps!r}")
        self.steps = int(steps)
        self.step = EulerMaruyamaStep(sigma, drift, h)

    @property
    def h(self) -> float:
        return self.step.h

    @classmethod
    def from_problem(cls, problem: KolmogorovProblem) -> EulerMaruyamaResNet:
        """The network of a problem's SDE with its step size and step count."""
        return cls(problem.sigma, problem.drift, h=problem.h, steps=problem.sde_steps)

    def forward(
        self,
        x0: Tensor,
        seed: int | None = None,
        noise: Tensor | None = None,
        *,
        first_step: int = 0,
        antithetic: bool = False,
        save_every: int = 0,
    ) -> Tensor:
        """Run the blocks from x0.

        Args:
            x0 (Tensor[P, d]): start points.
            seed (int): Philox key of the kernels' normals (used when ``noise`` is None).
            noise (Tensor[steps, P, d]): explicit normals z_0 ... z_{steps-1} instead.
            first_step, antithetic: as for :func:`deepkern.ops.sde.simulate`.
            save_every (int): 0 returns the last state; k > 0 also the states at blocks
                0, k, 2k, ... (steps must be a multiple of k).

        Returns:
            Tensor[P, d], or Tensor[P, steps // save_every + 1, d].
        """
        if noise is None:
            if seed is None:
                raise ValueError("pass a seed (for the kernels' normals) or the noise itself")
            noise = sde.normals(x0.detach(), self.steps, seed, first_step, antithetic)
        if noise.shape != (self.steps, *x0.shape):
            raise ValueError(
                f"noise must have shape {[self.steps, *x0.shape]}, got {list(noise.shape)}"
            )
        if save_every and self.steps % save_every:
            raise ValueError(f"steps ({self.steps}) must be a multiple of save_every")
        x, saved = x0, [x0]
        for k in range(self.steps):
            x = x + self.step(x, noise[k])
            if save_every and (k + 1) % save_every == 0:
                saved.append(x)
        return torch.stack(saved, dim=1) if save_every else x

    @torch.no_grad()
    def expectation(
        self, x: Tensor, payoff: Callable[[Tensor], Tensor], paths: int, seed: int
    ) -> tuple[Tensor, Tensor]:
        """Average of ``payoff(X_T)`` over ``paths`` noise draws per start point.

        Args:
            x (Tensor[N, d]): start points.
            payoff: Tensor[M, d] -> Tensor[M].
            paths (int >= 2): draws per point.
            seed (int): Philox key; draw m of point n uses the stream of row n * paths + m.

        Returns:
            (mean, standard error), each Tensor[N].
        """
        if paths < 2:
            raise ValueError(f"paths must be at least 2, got {paths}")
        values = payoff(self(x.repeat_interleave(paths, 0), seed=seed)).reshape(-1, paths)
        return values.mean(1), values.std(1) / math.sqrt(paths)


# ---------------------------------------------------------------------------------------------
# Evaluation


def relative_errors(prediction: Tensor, reference: Tensor) -> dict[str, float]:
    """Relative L1, L2 and L-infinity errors over the test points.

    With ``e_n = |prediction_n - reference_n| / |reference_n|`` (the paper's pointwise relative
    error, averaged over uniform points of the box): ``rel_l1 = mean e``,
    ``rel_l2 = sqrt(mean e^2)``, ``rel_linf = max e``.

    Args:
        prediction (Tensor[N]), reference (Tensor[N]): values at the same points.

    Returns:
        dict of floats (nan for N = 0).
    """
    if prediction.numel() == 0:
        nan = float("nan")
        return {"rel_l1": nan, "rel_l2": nan, "rel_linf": nan}
    e = ((prediction.double() - reference.double()) / reference.double().abs()).abs()
    return {
        "rel_l1": float(e.mean()),
        "rel_l2": float(e.square().mean().sqrt()),
        "rel_linf": float(e.max()),
    }


@torch.no_grad()
def evaluate(
    model: nn.Module,
    problem: KolmogorovProblem,
    points: int = 4096,
    seed: int = 0,
    reference_paths: int = 4096,
    batch_size: int = 8192,
    return_values: bool = False,
) -> dict:
    """Errors of ``model`` against the problem's reference on fresh uniform points of the box.

    Args:
        model: maps Tensor[N, d] to Tensor[N]; evaluated in eval mode (mode restored after).
        problem: the problem.
        points: test points, uniform in the box, drawn from ``seed`` (a stream that training
            never uses).
        seed: seed of the points and of a Monte Carlo reference.
        reference_paths: paths per point when the reference is Monte Carlo.
        batch_size: points per forward pass.
        return_values: also return the tensors under ``values``.

    Returns:
        dict with ``rel_l1``, ``rel_l2``, ``rel_linf``, ``points``, ``reference`` (its kind),
        ``reference_rel_se_mean`` and ``reference_rel_se_max`` (standard error of a Monte Carlo
        reference relative to it; 0 for closed forms), ``constant_rel_l1`` (the error of the
        best-guess constant, the mean of the reference), ``discretisation_rel_l1`` (the gap
        between the SDE and its Euler-Maruyama chain, when the problem knows both; None
        otherwise) and, with ``return_values``, ``values``: dict of ``x`` Tensor[N, d],
        ``prediction``, ``reference``, ``standard_error`` Tensor[N].
    """
    generator = torch.Generator().manual_seed(_derived_seed(seed, 2))
    x = problem.sample(points, generator)
    u, se, kind = problem.reference(x, reference_paths, _derived_seed(seed, 3))

    was_training = model.training
    model.eval()
    try:
        chunks = [model(x[i : i + batch_size]) for i in range(0, points, batch_size)]
    finally:
        model.train(was_training)
    prediction = torch.cat(chunks).to(u.dtype) if chunks else u.new_zeros(0)

    result = {"points": points, "reference": kind, **relative_errors(prediction, u)}
    rel_se = se.double() / u.double().abs()
    result["reference_rel_se_mean"] = float(rel_se.mean()) if points else 0.0
    result["reference_rel_se_max"] = float(rel_se.max()) if points else 0.0
    result["constant_rel_l1"] = relative_errors(u.mean().expand_as(u), u)["rel_l1"]
    result["discretisation_rel_l1"] = None
    if problem.discrete_solution is not None and points:
        result["discretisation_rel_l1"] = relative_errors(problem.discrete_solution(x), u)["rel_l1"]
    if return_values:
        result["values"] = {"x": x, "prediction": prediction, "reference": u, "standard_error": se}
    return result


# ---------------------------------------------------------------------------------------------
# Training


@dataclass
class TrainConfig:
    """Settings of :func:`train`.

    Attributes:
        problem: a name from :data:`PROBLEMS`.
        dim: the dimension d.
        steps: optimiser steps; each draws ``batch_size`` fresh start points and one fresh path
            per point.
        batch_size: pairs per step and process (at least 2: batch normalisation).
        lr: Adam's initial learning rate.
        lr_decay_at: fractions of ``steps`` at which the learning rate is multiplied by
            ``lr_decay`` (the paper: 1e-3, 1e-4 after a third, 1e-5 after two thirds).
        lr_decay: the factor.
        network: "plain" or "resnet".
        width: hidden width; the network's default when None.
        sde_steps: Euler-Maruyama steps; the problem's default when None.
        seed: seeds the initial weights (through :func:`build_network` in the commands) and the
            data: step k of process r draws from a generator seeded by (seed, r, k), so a
            resumed run draws exactly what the uninterrupted one would have.
        device: where to train ("cpu", "cuda", "cuda:1").
        dtype: "float32" or "float64".
        output_init: start the output layer at estimates of u's mean and spread over the box
            (:func:`output_statistics`); skipped when resuming.
        checkpoint: file written atomically every ``checkpoint_every`` steps and at the end.
        checkpoint_every: steps between checkpoints.
        resume: continue from ``checkpoint`` when that file exists.
        progress: show a tqdm progress bar (first process only).
        log_every: steps between loss records (and checks that the loss is finite).
        eval_points: test points of the final evaluation; 0 skips it.
        reference_paths: paths per test point when the reference is Monte Carlo.
    """

    problem: str = "heat"
    dim: int = 10
    steps: int = 2000
    batch_size: int = 1024
    lr: float = 1e-3
    lr_decay_at: tuple[float, ...] = (1 / 3, 2 / 3)
    lr_decay: float = 0.1
    network: str = "plain"
    width: int | None = None
    sde_steps: int | None = None
    seed: int = 0
    device: str = "cpu"
    dtype: str = "float32"
    output_init: bool = True
    checkpoint: str | None = None
    checkpoint_every: int = 1000
    resume: bool = False
    progress: bool = True
    log_every: int = 100
    eval_points: int = 4096
    reference_paths: int = 4096

    def __post_init__(self):
        self.problem = _check_problem_name(self.problem)
        _check_dim(self.dim)
        _check_count("steps", self.steps, 0)
        _check_count("batch_size", self.batch_size, 2, "batch normalisation needs two samples")
        _check_count("checkpoint_every", self.checkpoint_every, 1)
        _check_count("log_every", self.log_every, 1)
        _check_count("eval_points", self.eval_points, 0)
        _check_count("reference_paths", self.reference_paths, 2)
        if self.sde_steps is not None:
            _check_count("sde_steps", self.sde_steps, 1)
        if self.width is not None:
            _check_count("width", self.width, 1)
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be positive and finite, got {self.lr}")
        if not 0 < self.lr_decay <= 1:
            raise ValueError(f"lr_decay must be in (0, 1], got {self.lr_decay}")
        self.lr_decay_at = tuple(float(f) for f in self.lr_decay_at)
        if any(not 0 < f < 1 for f in self.lr_decay_at):
            raise ValueError(f"lr_decay_at must hold fractions in (0, 1), got {self.lr_decay_at}")
        if self.network not in ("plain", "resnet"):
            raise ValueError(f"network must be 'plain' or 'resnet', got {self.network!r}")
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {self.dtype!r}")
        if self.resume and not self.checkpoint:
            raise ValueError("resume needs a checkpoint path")

    @property
    def torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.dtype]

    def make_problem(self) -> KolmogorovProblem:
        """The problem these settings describe, on their device and dtype."""
        return make_problem(self.problem, self.dim, self.torch_dtype, self.device, self.sde_steps)

    def make_network(self) -> nn.Module:
        """The network these settings describe, its initial weights drawn from ``seed``."""
        generator = torch.Generator().manual_seed(_derived_seed(self.seed, 4))
        return build_network(self.network, self.dim, self.width, generator)


def _check_count(name: str, value, minimum: int, why: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        reason = f" ({why})" if why else ""
        raise ValueError(f"{name} must be an integer >= {minimum}{reason}, got {value!r}")


_MASK64 = (1 << 64) - 1
# The output layer's start (:func:`output_statistics`): 1024 points with 64 paths each put the
# spread within about 7% (one standard error) for the heat equation at d = 100, where label
# noise has 120 times u's variance; the cost is 64 batches of 1024 paths, no network evaluation.
_OUTPUT_INIT_POINTS = 1024
_OUTPUT_INIT_PATHS = 64


def _derived_seed(*parts: int) -> int:
    """A 63-bit seed from a tuple of integers (SplitMix64 finaliser chained over the parts)."""
    state = 0x9E3779B97F4A7C15
    for part in parts:
        state = (state ^ (int(part) & _MASK64)) * 0xBF58476D1CE4E5B9 & _MASK64
        state ^= state >> 31
        state = (state + 0x9E3779B97F4A7C15) * 0x94D049BB133111EB & _MASK64
        state ^= state >> 29
    return state >> 1


def _learning_rate(config: TrainConfig, step: int) -> float:
    passed = sum(step >= int(f * config.steps) for f in config.lr_decay_at)
    return config.lr * config.lr_decay**passed


def _batch(problem: KolmogorovProblem, config: TrainConfig, rank: int, step: int):
    """Step ``step``'s inputs Tensor[B, d] and targets Tensor[B] on process ``rank``."""
    generator = torch.Generator().manual_seed(_derived_seed(config.seed, 1, rank, step))
    x = problem.sample(config.batch_size, generator)
    return x, problem.labels(x, sde.default_seed(generator))


def _config_record(config: TrainConfig) -> dict:
    record = dataclasses.asdict(config)
    record["lr_decay_at"] = list(record["lr_decay_at"])
    return record


def _load_checkpoint(path: str, model: nn.Module, optimizer, config: TrainConfig, device):
    state = torch.load(path, map_location=device, weights_only=True)
    saved = state.get("config", {})
    for key in ("problem", "dim", "network", "width", "sde_steps", "dtype"):
        if key in saved and saved[key] != getattr(config, key):
            raise ValueError(
                f"checkpoint {path} was written for {key}={saved[key]!r}, but the settings say "
                f"{key}={getattr(config, key)!r}"
            )
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    if state.get("steps") != config.steps:
        logger.warning(
            "checkpoint %s was written for %s steps, training for %s: the learning-rate "
            "schedule changes from here",
            path,
            state.get("steps"),
            config.steps,
        )
    logger.info("resumed from %s after step %d", path, state["step"])
    return int(state["step"]), list(state["history"])


def train(model: nn.Module, config: TrainConfig, problem: KolmogorovProblem | None = None) -> dict:
    """Train ``model`` to approximate u(T, .) on the problem's box with Adam on squared error.

    Every step draws ``batch_size`` start points uniformly from the box and one fresh
    Euler-Maruyama path for each (:meth:`KolmogorovProblem.labels`, the fused kernel) and
    takes an Adam step on the mean squared error between the network and phi(X_T). When
    ``torch.distributed`` is initialised, the model is wrapped in DistributedDataParallel and
    every process draws its own batch (the effective batch is ``world * batch_size``); the
    first process writes checkpoints, shows the bar and evaluates.

    Args:
        model: maps Tensor[N, d] to Tensor[N] (for example :class:`PlainNet`); trained in
            place and moved to ``config.device`` and ``config.dtype``.
        config: the settings.
        problem: the problem; built from ``config`` when None (it must match config.dim).

    Returns:
        dict with ``problem``, ``dim``, ``network``, ``parameters``, ``steps``, ``start_step``
        (above 0 after a resume), ``batch_size``, ``world_size``, ``final_loss`` (mean over the
        last logging window), ``seconds`` (this call, training only), ``history`` (one record
        of step, mean loss and learning rate per ``log_every`` steps) and ``evaluation`` (the
        dict of :func:`evaluate`, or None when ``eval_points`` is 0 or on other processes).

    Raises:
        ValueError: a model or problem whose dimension differs from ``config.dim``, a
            checkpoint written for other settings, or a loss that is not finite (lower lr).
        ImportError: progress bars asked for without tqdm installed.

    Example:
        >>> config = TrainConfig(problem="heat", dim=10, steps=500, progress=False)
        >>> metrics = train(config.make_network(), config)
        >>> metrics["evaluation"]["rel_l1"]
    """
    problem = problem or config.make_problem()
    if problem.dim != config.dim:
        raise ValueError(f"the problem has dimension {problem.dim}, the settings {config.dim}")
    model_dim = getattr(model, "dim", config.dim)
    if model_dim != config.dim:
        raise ValueError(f"the model takes inputs of dimension {model_dim}, not {config.dim}")
    device = torch.device(config.device)
    model.to(device=device, dtype=config.torch_dtype)
    rank, world = rank_and_world()

    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    start_step, history = 0, []
    if config.resume and os.path.exists(config.checkpoint):
        start_step, history = _load_checkpoint(config.checkpoint, model, optimizer, config, device)
    elif config.output_init and config.steps > 0 and hasattr(model, "init_output"):
        # Every process computes the same estimate from the same seed, so all start from the
        # same weights (DistributedDataParallel copies process 0's parameters anyway).
        points = min(config.batch_size, _OUTPUT_INIT_POINTS)
        model.init_output(*output_statistics(problem, points, _OUTPUT_INIT_PATHS, config.seed))

    net = data_parallel(model, device, world)

    started = time.perf_counter()
    bar = progress_bar(
        max(0, config.steps - start_step),
        f"{problem.name} d={problem.dim}",
        config.progress and rank == 0,
    )
    net.train()
    window = torch.zeros((), dtype=torch.float64, device=device)
    window_start = start_step
    try:
        for step in range(start_step, config.steps):
            lr = _learning_rate(config, step)
            for group in optimizer.param_groups:
                group["lr"] = lr
            x, y = _batch(problem, config, rank, step)
            loss = F.mse_loss(net(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            window += loss.detach().double()
            bar.update(1)

            done = step + 1
            if done % config.log_every == 0 or done == config.steps:
                # Reading the loss synchronises with the device: once per window is enough.
                mean_loss = float(window) / (done - window_start)
                if not math.isfinite(mean_loss):
                    raise ValueError(
                        f"the training loss is not finite at step {done}; lower the learning "
                        f"rate (now {config.lr})"
                    )
                history.append({"step": done, "loss": mean_loss, "lr": lr})
                bar.set_postfix(loss=f"{mean_loss:.4g}")
                logger.info("%s step %d: loss %.6g, lr %.1e", problem.name, done, mean_loss, lr)
                window.zero_()
                window_start = done
            if config.checkpoint and (done % config.checkpoint_every == 0 or done == config.steps):
                if rank == 0:
                    save_atomic(
                        {
                            "step": done,
                            "steps": config.steps,
                            "model": model.state_dict(),
                            "optimizer": optimizer.state_dict(),
                            "history": history,
                            "config": _config_record(config),
                        },
                        config.checkpoint,
                    )
                if world > 1:
                    dist.barrier()
    finally:
        bar.close()
    seconds = time.perf_counter() - started

    evaluation = None
    if config.eval_points and rank == 0:
        evaluation = evaluate(
            model, problem, config.eval_points, config.seed, config.reference_paths
        )
        logger.info(
            "%s d=%d: relative L1 %.3e, L2 %.3e, Linf %.3e against the %s",
            problem.name,
            problem.dim,
            evaluation["rel_l1"],
            evaluation["rel_l2"],
            evaluation["rel_linf"],
            evaluation["reference"],
        )
    return {
        "problem": problem.name,
        "dim": problem.dim,
        "network": config.network,
        "parameters": count_parameters(model),
        "steps": config.steps,
        "start_step": start_step,
        "batch_size": config.batch_size,
        "world_size": world,
        "final_loss": history[-1]["loss"] if history else None,
        "seconds": seconds,
        "history": history,
        "evaluation": evaluation,
    }


# ---------------------------------------------------------------------------------------------
# Commands: deepkern kolmogorov, deepkern reproduce kolmogorov


def _add_training_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--network", choices=["plain", "resnet"], help="default plain")
    parser.add_argument("--width", type=int, help="hidden width (default d + 100 for plain)")
    parser.add_argument("--batch-size", type=int, help="pairs (x, phi(X_T)) per step")
    parser.add_argument("--lr", type=float, help="Adam's initial learning rate (default 1e-3)")
    parser.add_argument("--seed", type=int, default=0, help="seed of weights and data")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    parser.add_argument("--dtype", choices=sorted(_DTYPES), default="float32")
    parser.add_argument("--threads", type=int, help="CPU threads for torch")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def _apply_threads(args: argparse.Namespace) -> None:
    threads = getattr(args, "threads", None)
    if threads is not None:
        if threads < 1:
            raise ValueError(f"--threads must be positive, got {threads}")
        torch.set_num_threads(threads)


def add_kolmogorov_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``deepkern kolmogorov``.

    The defaults (heat equation, d = 10, 2000 steps of 1024 paths) run in under a minute on two
    CPU cores. The paper's size for one problem, on a GPU::

        deepkern kolmogorov --problem max-call --dim 100 --steps 750000 --batch-size 8192 \\
            --device cuda --checkpoint runs/max-call.pt --resume
    """
    parser.description = (
        "Learn u(T, x) = E[phi(X_T^x)] on a box with the deep Kolmogorov method (fresh "
        "Euler-Maruyama paths from the fused sde kernel at every step), then measure relative "
        "L1, L2 and L-infinity errors on fresh test points against a closed form, a quadrature "
        "or a Monte Carlo reference; writes results.json and prediction.png."
    )
    parser.add_argument("--problem", default="heat", help=f"one of {', '.join(PROBLEMS)}")
    parser.add_argument("--dim", type=int, default=10, help="the dimension d (default 10)")
    parser.add_argument("--steps", type=int, default=2000, help="training steps (default 2000)")
    parser.add_argument("--sde-steps", type=int, help="Euler-Maruyama steps per path")
    _add_training_arguments(parser)
    parser.add_argument("--eval-points", type=int, default=4096, help="test points")
    parser.add_argument(
        "--reference-paths", type=int, default=4096, help="paths per test point (Monte Carlo)"
    )
    parser.add_argument("--checkpoint", help="checkpoint file, written atomically")
    parser.add_argument("--resume", action="store_true", help="continue from --checkpoint")
    parser.add_argument(
        "--out", default="deepkern-out/kolmogorov", help="folder for results.json, prediction.png"
    )


def _config_from_args(args: argparse.Namespace, **overrides) -> TrainConfig:
    settings = dict(
        problem=args.problem,
        dim=args.dim,
        steps=args.steps,
        sde_steps=getattr(args, "sde_steps", None),
        seed=args.seed,
        device=args.device,
        dtype=args.dtype,
        checkpoint=getattr(args, "checkpoint", None),
        resume=getattr(args, "resume", False),
        progress=not args.no_progress,
        eval_points=0,
    )
    for name in ("network", "width", "batch_size", "lr"):
        if getattr(args, name, None) is not None:
            settings[name] = getattr(args, name)
    settings.update(overrides)
    return TrainConfig(**settings)


def run_kolmogorov(args: argparse.Namespace) -> int:
    """``deepkern kolmogorov``: train, evaluate, print a table, write results.json and a plot.

    Returns:
        0 on success.
    """
    _apply_threads(args)
    _check_count("--eval-points", args.eval_points, 1)
    _check_count("--reference-paths", args.reference_paths, 2)
    config = _config_from_args(args)
    problem = config.make_problem()
    model = config.make_network()
    print(
        f"{problem.name}, d = {problem.dim}: {problem.description}\n"
        f"{config.network} network, {count_parameters(model):,} parameters; {config.steps} "
        f"steps of {config.batch_size} paths ({problem.sde_steps} Euler-Maruyama steps each) "
        f"on {config.device}"
    )
    metrics = train(model, config, problem)
    started = time.perf_counter()
    evaluation = evaluate(
        model, problem, args.eval_points, config.seed, args.reference_paths, return_values=True
    )
    eval_seconds = time.perf_counter() - started
    values = evaluation.pop("values")
    metrics["evaluation"] = evaluation
    print(_result_table(evaluation))
    print(
        f"reference: {evaluation['reference']} on {evaluation['points']} uniform test points"
        + _reference_note(evaluation)
    )

    os.makedirs(args.out, exist_ok=True)
    json_path = os.path.join(args.out, "results.json")
    png_path = os.path.join(args.out, "prediction.png")
    report = {
        "settings": _config_record(config),
        "problem": {"name": problem.name, "dim": problem.dim, "description": problem.description},
        "training": metrics,
        "evaluation_seconds": eval_seconds,
        "environment": environment(config.device),
    }
    write_json(json_path, report)
    _write_plot(png_path, problem, values, evaluation)
    print(f"training {metrics['seconds']:.1f} s, evaluation {eval_seconds:.1f} s")
    print(f"wrote {json_path} and {png_path}")
    return 0


def _result_table(evaluation: dict) -> str:
    header = f"{'error':<16} | {'network':>10} | {'constant':>10}"
    lines = [header, "-" * len(header)]
    lines.append(
        f"{'relative L1':<16} | {evaluation['rel_l1']:>10.3e} | "
        f"{evaluation['constant_rel_l1']:>10.3e}"
    )
    lines.append(f"{'relative L2':<16} | {evaluation['rel_l2']:>10.3e} | {'':>10}")
    lines.append(f"{'relative L-inf':<16} | {evaluation['rel_linf']:>10.3e} | {'':>10}")
    return "\n".join(lines)


def _reference_note(evaluation: dict) -> str:
    note = ""
    if evaluation["reference_rel_se_max"] > 0:
        note += (
            f"; its relative standard error is {evaluation['reference_rel_se_mean']:.1e} on "
            f"average, {evaluation['reference_rel_se_max']:.1e} at most"
        )
    if evaluation.get("discretisation_rel_l1") is not None:
        note += (
            f"; the Euler-Maruyama chain itself is {evaluation['discretisation_rel_l1']:.1e} "
            "(relative L1) from the SDE's solution"
        )
    return note


def _write_plot(path: str, problem: KolmogorovProblem, values: dict, evaluation: dict) -> None:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as error:
        raise ImportError("the plot needs matplotlib: pip install deepkern[models]") from error

    # A Figure with its own Agg canvas: no pyplot state, no display needed.
    figure = Figure(figsize=(10, 4), layout="constrained")
    FigureCanvasAgg(figure)
    scatter, histogram = figure.subplots(1, 2)
    u = values["reference"].double().cpu()
    pred = values["prediction"].double().cpu()
    shown = slice(0, 4096)
    scatter.scatter(u[shown], pred[shown], s=2, alpha=0.5)
    lo, hi = float(u.min()), float(u.max())
    scatter.plot([lo, hi], [lo, hi], color="black", linewidth=0.8)
    scatter.set_xlabel(f"reference u(T, x) ({evaluation['reference']})")
    scatter.set_ylabel("network")
    scatter.set_title(f"{problem.name}, d = {problem.dim}")
    rel = ((pred - u) / u.abs()).abs().clamp(min=1e-12)
    histogram.hist(torch.log10(rel).numpy(), bins=50)
    histogram.set_xlabel("log10 relative error")
    histogram.set_ylabel("test points")
    histogram.set_title(
        f"relative L1 {evaluation['rel_l1']:.2e}, L-inf {evaluation['rel_linf']:.2e}"
    )
    figure.savefig(path, dpi=110)


# Published figures to print beside ours, keyed by (problem, dim): relative L1, L2 and L-inf
# errors, the training steps and batch behind them, and where they come from. Only figures
# that were checked against their source are listed.
PUBLISHED = {
    ("max-call", 100): {
        "rel_l1": 1.0e-3,
        "rel_l2": 1.3e-3,
        "rel_linf": 6.2e-3,
        "steps": 588_000,
        "batch_size": 8192,
        "source": (
            "rerun of the paper's max-call setting in the Feynman-Kac notebook accompanying "
            "Blechschmidt and Ernst, 'Three ways to solve PDEs with neural networks' (2021): "
            "stopped at step 588,000 of 750,000; its reference is Monte Carlo with 1,024,000 "
            "paths per point"
        ),
    },
}

_REPRODUCE_CASES = tuple((p, d) for p in ("heat", "max-call") for d in (1, 10, 100))


@dataclass
class _ReproduceSize:
    steps: int
    batch_size: int
    eval_points: int
    cases: tuple[tuple[str, int], ...] = _REPRODUCE_CASES


_SIZES = {
    "quick": _ReproduceSize(steps=100, batch_size=128, eval_points=256, cases=(("heat", 2),)),
    "default": _ReproduceSize(steps=2000, batch_size=1024, eval_points=4096),
    # The paper's settings: 750,000 Adam steps of 8192 paths, learning rate 1e-3 divided by 10
    # after 250,000 and 500,000 steps.
    "full": _ReproduceSize(steps=750_000, batch_size=8192, eval_points=100_000),
}


def add_reproduce_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``deepkern reproduce kolmogorov``.

    By default each case trains the paper's network for 2000 steps of 1024 paths: a few minutes
    in all on two CPU cores (on cores shared with other busy processes, ``--threads 1`` avoids
    stalls of the OpenMP thread pool). ``--full`` uses the published sizes (750,000 steps of
    8192 paths per case; hours on a GPU)::

        deepkern reproduce kolmogorov --full --device cuda --checkpoint-dir runs/kolmogorov
    """
    parser.description = (
        "The deep Kolmogorov method on the paper's heat equation (phi = |x|^2 on [0, 1]^d) and "
        "max-call option (independent geometric Brownian motions on [90, 110]^d): our relative "
        "errors beside published ones. Default: a CPU-sized run of a few minutes. --full: the "
        "published 750,000 steps of 8192 paths (for a GPU)."
    )
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--full", action="store_true", help="the published sizes (GPU)")
    size.add_argument("--quick", action="store_true", help="a run of seconds (for tests)")
    parser.add_argument(
        "--cases",
        nargs="+",
        metavar="PROBLEM:DIM",
        help="cases to run, e.g. heat:10 max-call:100 (default "
        + " ".join(f"{p}:{d}" for p, d in _REPRODUCE_CASES)
        + ")",
    )
    parser.add_argument("--steps", type=int, help="training steps per case")
    _add_training_arguments(parser)
    parser.add_argument("--eval-points", type=int, help="test points per case")
    parser.add_argument("--checkpoint-dir", help="write one checkpoint per case here")
    parser.add_argument("--resume", action="store_true", help="continue from the checkpoints")
    parser.add_argument("--out", help="also write the results as JSON to this file")


def _parse_cases(cases: Sequence[str] | None, default) -> tuple[tuple[str, int], ...]:
    if not cases:
        return tuple(default)
    parsed = []
    for case in cases:
        name, _, dim = case.partition(":")
        try:
            parsed.append((_check_problem_name(name), int(dim)))
        except ValueError as error:
            if "unknown problem" in str(error):
                raise
            raise ValueError(f"a case is PROBLEM:DIM, for example heat:10; got {case!r}") from None
    return tuple(parsed)


def run_reproduce(args: argparse.Namespace) -> int:
    """``deepkern reproduce kolmogorov``: our errors beside the published ones.

    Returns:
        0 on success.
    """
    _apply_threads(args)
    size = _SIZES["full" if args.full else "quick" if args.quick else "default"]
    cases = _parse_cases(args.cases, size.cases)
    eval_points = args.eval_points if args.eval_points is not None else size.eval_points
    _check_count("--eval-points", eval_points, 1)
    rows = []
    started = time.perf_counter()
    for problem_name, dim in cases:
        checkpoint = None
        if args.checkpoint_dir:
            checkpoint = os.path.join(args.checkpoint_dir, f"{problem_name}-{dim}.pt")
        config = _config_from_args(
            argparse.Namespace(
                **{**vars(args), "problem": problem_name, "dim": dim, "checkpoint": checkpoint}
            ),
            steps=args.steps if args.steps is not None else size.steps,
            batch_size=args.batch_size if args.batch_size is not None else size.batch_size,
            resume=bool(args.resume and checkpoint),
            eval_points=eval_points,
        )
        model = config.make_network()
        metrics = train(model, config)
        rows.append({"problem": problem_name, "dim": dim, **metrics})
    total = time.perf_counter() - started

    print(_reproduce_table(rows))
    print(
        "relative errors are means (L1), root mean squares (L2) and maxima (L-inf) of "
        "|network - u| / |u| over uniform test points; u is the closed form (heat) or a "
        "quadrature exact to 1e-13 (max-call)."
    )
    for key, figure in PUBLISHED.items():
        if key in {(r["problem"], r["dim"]) for r in rows}:
            print(f"published {key[0]} d={key[1]}: {figure['source']}")
    print(f"total {total:.0f} s")
    if args.out:
        report = {
            "rows": rows,
            "published": {f"{p}:{d}": v for (p, d), v in PUBLISHED.items()},
            "seconds": total,
            "environment": environment(args.device),
        }
        write_json(args.out, report)
    return 0


def _reproduce_table(rows: list[dict]) -> str:
    header = (
        f"{'case':<14} | {'steps x batch':>15} | {'rel L1':>8} | {'rel L2':>8} | "
        f"{'rel Linf':>8} | {'published L1 (steps x batch)':>29} | {'seconds':>7}"
    )
    lines = [header, "-" * len(header)]
    for r in rows:
        e = r["evaluation"]
        published = PUBLISHED.get((r["problem"], r["dim"]))
        if published:
            theirs = (
                f"{published['rel_l1']:.1e} ({published['steps']:,} x {published['batch_size']})"
            )
        else:
            theirs = "-"
        lines.append(
            f"{r['problem'] + ' d=' + str(r['dim']):<14} | "
            f"{str(r['steps']) + ' x ' + str(r['batch_size']):>15} | {e['rel_l1']:>8.2e} | "
            f"{e['rel_l2']:>8.2e} | {e['rel_linf']:>8.2e} | {theirs:>29} | {r['seconds']:>7.1f}"
        )
    return "\n".join(lines)
