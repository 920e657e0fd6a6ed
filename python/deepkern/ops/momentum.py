"""Momentum ResNet steps: the fused forward, inverse and backward steps, in float and exact modes.

A momentum residual layer with residual function ``f`` and momentum ``gamma`` maps (x, v) to::

    v' = gamma * v + (1 - gamma) * f(x)
    x' = x + v'

It is invertible given ``f``: ``x = x' - v'``, then ``v = (v' - (1 - gamma) f(x)) / gamma``. The
float inverse loses bits at every layer (dividing by gamma amplifies rounding errors by 1/gamma),
so the exact ops keep x and v in int64 fixed point and push the bits that the multiplication by
gamma = numer / denom drops onto a per-element arbitrary-precision integer, the buffer. The
buffer grows by log2(denom / numer) bits per layer and element, which is the information the
layer destroys; nothing else is stored.
"""

from __future__ import annotations

import math
from fractions import Fraction

import torch
from torch import Tensor

__all__ = [
    "forward",
    "inverse",
    "backward",
    "exact_forward",
    "exact_inverse",
    "exact_gamma",
    "buffer_limbs",
    "to_fixed",
    "from_fixed",
    "reference_forward",
    "reference_inverse",
    "reference_backward",
    "DEFAULT_FRAC_BITS",
    "MAX_DENOMINATOR",
]

# 32 fractional bits: float32 states above 2^-9 in magnitude convert without loss, and the
# kernels' range (|x| < 2^52 in fixed point) leaves |x| < 2^20 before they report an error.
DEFAULT_FRAC_BITS = 32
# Limbs are 32 bits and the kernels multiply them by the denominator in 64-bit integers.
MAX_DENOMINATOR = 1 << 16
# The kernels keep fixed-point magnitudes below 2^52 (see momentum.h).
STATE_BITS = 52
_STATE_LIMIT = 2.0**STATE_BITS


# ---------------------------------------------------------------------------------------------
# Float mode


def forward(x: Tensor, v: Tensor, f: Tensor, gamma: float) -> tuple[Tensor, Tensor]:
    """One fused momentum step: ``v' = gamma v + (1 - gamma) f``, ``x' = x + v'``.

    Args:
        x (Tensor[*], float32, float64, float16 or bfloat16): position.
        v (Tensor[*], same dtype, shape and device as x): velocity.
        f (Tensor[*], same dtype, shape and device as x): the residual function at x.
        gamma (float in (0, 1]): momentum.

    Returns:
        (x_next, v_next), each shaped like x. float16 and bfloat16 accumulate in float32.

    Raises:
        RuntimeError: on dtype, shape or device mismatch, or gamma outside (0, 1].

    Differentiable in x, v and f. Deterministic; no host synchronisation.

    Example:
        >>> x_next, v_next = forward(x, torch.zeros_like(x), torch.tanh(x), 0.9)
    """
    return torch.ops.deepkern.momentum_forward(x, v, f, float(gamma))


def inverse(x_next: Tensor, v_next: Tensor, f: Tensor, gamma: float) -> tuple[Tensor, Tensor]:
    """Undo one momentum step: ``x = x' - v'``, ``v = (v' - (1 - gamma) f) / gamma``.

    ``f`` must be the residual function evaluated at the recovered ``x = x_next - v_next``, which
    the caller computes first. In floating point the recovered velocity carries the rounding
    error of ``v'`` amplified by 1 / gamma; use the exact ops when that matters.

    Args:
        x_next, v_next (Tensor[*], floating point): the state after the step.
        f (Tensor[*], same dtype and shape): f(x_next - v_next).
        gamma (float in (0, 1]): momentum.

    Returns:
        (x, v), each shaped like x_next.
    """
    return torch.ops.deepkern.momentum_inverse(x_next, v_next, f, float(gamma))


def backward(
    grad_x_next: Tensor, grad_v_next: Tensor, vjp: Tensor, gamma: float
) -> tuple[Tensor, Tensor]:
    """Gradients of the state before a momentum step, from those after it.

    With ``s = grad_x_next + grad_v_next`` and ``vjp = J_f(x)^T ((1 - gamma) s)`` (computed by
    the caller with autograd, since f is any module): ``grad_x = grad_x_next + vjp`` and
    ``grad_v = gamma s``.

    Args:
        grad_x_next, grad_v_next (Tensor[*], floating point): gradients after the step.
        vjp (Tensor[*], same dtype and shape): the vector-Jacobian product above.
        gamma (float in (0, 1]): momentum.

    Returns:
        (grad_x, grad_v), each shaped like grad_x_next.
    """
    return torch.ops.deepkern.momentum_backward(grad_x_next, grad_v_next, vjp, float(gamma))


def reference_forward(x: Tensor, v: Tensor, f: Tensor, gamma: float) -> tuple[Tensor, Tensor]:
    """The plain PyTorch momentum step that the kernels are tested against."""
    v_next = gamma * v + (1 - gamma) * f
    return x + v_next, v_next


def reference_inverse(
    x_next: Tensor, v_next: Tensor, f: Tensor, gamma: float
) -> tuple[Tensor, Tensor]:
    """The plain PyTorch inverse step."""
    return x_next - v_next, (v_next - (1 - gamma) * f) / gamma


def reference_backward(
    grad_x_next: Tensor, grad_v_next: Tensor, vjp: Tensor, gamma: float
) -> tuple[Tensor, Tensor]:
    """The plain PyTorch backward step."""
    return grad_x_next + vjp, gamma * (grad_x_next + grad_v_next)


def _fake_pair(a: Tensor, b: Tensor, c: Tensor, gamma: float) -> tuple[Tensor, Tensor]:
    torch._check(a.shape == b.shape and a.shape == c.shape, lambda: "shapes must agree")
    torch._check(a.dtype == b.dtype and a.dtype == c.dtype, lambda: "dtypes must agree")
    torch._check(
        a.device == b.device and a.device == c.device,
        lambda: f"all inputs must be on one device, got {a.device}, {b.device}, {c.device}",
    )
    torch._check(0.0 < gamma <= 1.0, lambda: f"gamma must lie in (0, 1], got {gamma}")
    return torch.empty_like(a, memory_format=torch.contiguous_format), torch.empty_like(
        a, memory_format=torch.contiguous_format
    )


for _name in ("momentum_forward", "momentum_inverse", "momentum_backward"):
    torch.library.register_fake(f"deepkern::{_name}")(_fake_pair)


def _setup_save_gamma(ctx, inputs, output):
    ctx.gamma = inputs[3]


def _forward_grad(ctx, grad_x_next, grad_v_next):
    # x' = x + gamma v + (1 - gamma) f and v' = gamma v + (1 - gamma) f.
    total = grad_x_next + grad_v_next
    return grad_x_next, ctx.gamma * total, (1 - ctx.gamma) * total, None


def _inverse_grad(ctx, grad_x, grad_v):
    # x = x' - v' and v = (v' - (1 - gamma) f) / gamma.
    gamma = ctx.gamma
    return grad_x, grad_v / gamma - grad_x, -(1 - gamma) / gamma * grad_v, None


def _backward_grad(ctx, grad_grad_x, grad_grad_v):
    # grad_x = grad_x' + vjp and grad_v = gamma (grad_x' + grad_v').
    gamma = ctx.gamma
    scaled = gamma * grad_grad_v
    return grad_grad_x + scaled, scaled, grad_grad_x, None


torch.library.register_autograd(
    "deepkern::momentum_forward", _forward_grad, setup_context=_setup_save_gamma
)
torch.library.register_autograd(
    "deepkern::momentum_inverse", _inverse_grad, setup_context=_setup_save_gamma
)
torch.library.register_autograd(
    "deepkern::momentum_backward", _backward_grad, setup_context=_setup_save_gamma
)


# ---------------------------------------------------------------------------------------------
# Exact mode


def exact_gamma(gamma: float) -> Fraction:
    """The fraction numer / denom (denom <= 65536) that exact mode uses for ``gamma``.

    Raises:
        ValueError: if gamma is not a finite number in (0, 1], or lies so close to 1 that the
            fraction would be 1 and the residual functions would drop out.
    """
    if isinstance(gamma, bool) or not (
        isinstance(gamma, (int, float)) and math.isfinite(gamma) and 0.0 < gamma <= 1.0
    ):
        raise ValueError(f"gamma must be a finite number in (0, 1], got {gamma!r}")
    fraction = Fraction(gamma).limit_denominator(MAX_DENOMINATOR)
    if fraction == 0:
        fraction = Fraction(1, MAX_DENOMINATOR)
    if fraction == 1 and gamma != 1:
        raise ValueError(
            f"gamma = {gamma!r} is within 1/{2 * MAX_DENOMINATOR} of 1, where exact mode's "
            f"fractions (denominators up to {MAX_DENOMINATOR}) round it to 1; use "
            f"gamma <= {1 - 1 / MAX_DENOMINATOR!r} or exact=False"
        )
    return fraction


def buffer_limbs(gamma: Fraction, steps: int) -> int:
    """32-bit limbs that the buffer needs after ``steps`` exact forward steps from zero.

    Each step maps the buffer B to floor(B / n) d + u with u < d, so B_k < c B_{k-1} + d with
    c = d / n, and from zero B_k < d n c^k / (d - n): k log2(d / n) + log2(d n / (d - n)) bits.
    Two spare bits absorb the rounding of the logarithms. At gamma = 0.9 that is 0.152 bits per
    step; at 0.5, one.
    """
    numer, denom = gamma.numerator, gamma.denominator
    if numer == denom or steps == 0:
        return 1
    bits = steps * math.log2(denom / numer) + math.log2(denom * numer / (denom - numer)) + 2
    return max(1, math.ceil(bits / 32))


def to_fixed(x: Tensor, frac_bits: int = DEFAULT_FRAC_BITS, name: str = "x") -> Tensor:
    """Round a float tensor to int64 fixed point with ``frac_bits`` fractional bits.

    Rounds half to even, through float64, where scaling by a power of two is exact.

    Raises:
        ValueError: if x holds non-finite values or values too large for the fixed-point range
            (|x| >= 2^(52 - frac_bits)). This reads the tensor's values (a host sync on CUDA).
    """
    if isinstance(frac_bits, bool) or not isinstance(frac_bits, int) or not 0 <= frac_bits <= 52:
        raise ValueError(f"frac_bits must be an integer in [0, 52], got {frac_bits!r}")
    scaled = x.detach().to(torch.float64) * (2.0**frac_bits)
    finite = torch.isfinite(scaled)
    if not bool(finite.all()):
        raise ValueError(f"exact mode needs finite inputs, but {name} holds NaN or infinite values")
    if x.numel() and float(scaled.abs().max()) >= _STATE_LIMIT:
        raise ValueError(
            f"{name} is too large for exact mode: |{name}| must stay below "
            f"2^{STATE_BITS - frac_bits} with {frac_bits} fractional bits, got max "
            f"|{name}| = {float(x.abs().max()):.6g}"
        )
    return torch.round(scaled).to(torch.int64)


def from_fixed(x: Tensor, frac_bits: int = DEFAULT_FRAC_BITS, dtype=torch.float32) -> Tensor:
    """The float value of an int64 fixed-point tensor, rounded to ``dtype``."""
    return (x.to(torch.float64) * (2.0**-frac_bits)).to(dtype)


def exact_forward(
    x: Tensor,
    v: Tensor,
    f: Tensor,
    buffer: Tensor,
    gamma: Fraction,
    frac_bits: int,
    limbs: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One exact momentum step on fixed-point states.

    Args:
        x, v (Tensor[*], int64): position and velocity in fixed point.
        f (Tensor[*], floating point, same shape and device): f at ``from_fixed(x)``.
        buffer (Tensor[L, x.numel()], int32): the lost-bits buffer (32-bit limbs, little endian).
        gamma (Fraction): from ``exact_gamma``.
        frac_bits (int): fractional bits of x and v.
        limbs (int >= L): limbs of the returned buffer, from ``buffer_limbs``.

    Returns:
        (x_next, v_next, buffer_next, status): ``status`` is int64[2] holding a checksum of the
        fixed-point updates (to detect a residual function that is not deterministic) and the
        number of elements that left the fixed-point range or met a non-finite f. The caller
        checks ``status[1] == 0``; the op does not synchronise to do so.
    """
    return torch.ops.deepkern.momentum_exact_forward(
        x, v, f, buffer, gamma.numerator, gamma.denominator, frac_bits, limbs
    )


def exact_inverse(
    x_next: Tensor,
    v_next: Tensor,
    f: Tensor,
    buffer: Tensor,
    gamma: Fraction,
    frac_bits: int,
    limbs: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Undo ``exact_forward`` bit for bit, given f at ``from_fixed(x_next - v_next)``.

    Returns (x, v, buffer, status) with the buffer cut to ``limbs`` limbs; the status checksum
    equals the forward's when f gave the same values, and status[1] counts elements that were
    out of range or whose dropped limbs were not empty.
    """
    return torch.ops.deepkern.momentum_exact_inverse(
        x_next, v_next, f, buffer, gamma.numerator, gamma.denominator, frac_bits, limbs
    )


def _fake_exact(x, v, f, buffer, numer, denom, frac_bits, limbs):
    torch._check(x.shape == v.shape and x.shape == f.shape, lambda: "shapes must agree")
    torch._check(buffer.dim() == 2, lambda: "buffer must be 2-D")
    torch._check(
        x.device == v.device == f.device == buffer.device,
        lambda: "x, v, f and buffer must be on one device",
    )
    return (
        torch.empty_like(x, memory_format=torch.contiguous_format),
        torch.empty_like(v, memory_format=torch.contiguous_format),
        buffer.new_empty((limbs, x.numel())),
        x.new_empty((2,)),
    )


torch.library.register_fake("deepkern::momentum_exact_forward")(_fake_exact)
torch.library.register_fake("deepkern::momentum_exact_inverse")(_fake_exact)
