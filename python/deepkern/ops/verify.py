"""Bound propagation for network verification: interval matrix products, per-neuron linear
relaxations of activations, and the per-neuron inner maximum of the Lagrangian dual.

Conventions. Boxes are given by ``lower`` and ``upper`` tensors of the same shape
``[..., n]``, with ``lower <= upper`` elementwise; leading dimensions are batch dimensions (many
input boxes, many specifications) and are carried through unchanged. ``kind`` names the
activation: ``"relu"``, ``"sigmoid"`` or ``"tanh"``.

  interval_linear(lower [..., n], upper [..., n], weight [m, n], bias [m] or None)
      -> (out_lower [..., m], out_upper [..., m])
      The exact interval image of the box under x -> x @ weight.T + bias, computed in
      center-radius form: center @ weight.T + bias -/+ radius @ |weight|.T.

  activation_relaxation(lower, upper, kind, relu_lower_slope=None)
      -> (lower_slope, lower_bias, upper_slope, upper_bias), each shaped like ``lower``
      Two lines that enclose the activation on [lower, upper]:
          lower_slope * x + lower_bias <= act(x) <= upper_slope * x + upper_bias.
      For ReLU, neurons that are always off or always on get the exact lines; unstable ones
      (lower < 0 < upper) get the chord above and ``relu_lower_slope`` (values in [0, 1],
      shaped like ``lower``; default: 1 where upper > -lower, else 0) below. Gradients flow
      to ``relu_lower_slope``, which is how optimised slopes are trained.

  dual_activation_max(lower, upper, linear_coef, act_coef, kind) -> (value, argmax)
      The closed-form inner maximum of the Lagrangian dual, per neuron:
          value  = max over z in [lower, upper] of  linear_coef * z + act_coef * act(z)
          argmax = a maximiser z*.
      The derivatives of value are z* (linear_coef) and act(z*) (act_coef).

This module holds the public ops and the plain-PyTorch references that tests and benchmarks
compare the kernels against.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "ACTIVATIONS",
    "interval_linear",
    "activation_relaxation",
    "dual_activation_max",
    "reference_interval_linear",
    "reference_activation_relaxation",
    "reference_dual_activation_max",
    "KIND_CODES",
]

ACTIVATIONS = ("relu", "sigmoid", "tanh")


def _activation(kind: str):
    if kind == "relu":
        return torch.relu
    if kind == "sigmoid":
        return torch.sigmoid
    if kind == "tanh":
        return torch.tanh
    raise ValueError(f"kind must be one of {ACTIVATIONS}, got {kind!r}")


def reference_interval_linear(
    lower: Tensor, upper: Tensor, weight: Tensor, bias: Tensor | None
) -> tuple[Tensor, Tensor]:
    center = (upper + lower) / 2
    radius = (upper - lower) / 2
    out_center = center @ weight.T
    if bias is not None:
        out_center = out_center + bias
    out_radius = radius @ weight.abs().T
    return out_center - out_radius, out_center + out_radius


# ---------------------------------------------------------------------------------------------
# Shared by the references: double arithmetic, rounded outward to the input dtype
#
# The kernels compute every relaxation and maximum in float64 whatever the input dtype and round
# the result outward once, so that float32 lines and maxima are sound against the exact
# activation. The references do the same, step by step, so that the two agree to rounding.

_BISECTION_STEPS = 48  # bracket width 1400 / 2^48 < 1e-11 at the very worst, under 1e-13 usually
_MARGIN_EPS = 4.0  # outward margin, in epsilons of the output dtype, of the smooth lines
_CENTER = {"sigmoid": 0.5, "tanh": 0.0}
_PEAK_SLOPE = {"sigmoid": 0.25, "tanh": 1.0}


def _round_up(x: Tensor, dtype: torch.dtype) -> Tensor:
    """The nearest value of ``dtype`` at or above each float64 value."""
    if dtype == torch.float64:
        return x
    y = x.to(dtype)
    return torch.where(y.double() < x, torch.nextafter(y, y.new_tensor(float("inf"))), y)


def _round_down(x: Tensor, dtype: torch.dtype) -> Tensor:
    return -_round_up(-x, dtype)


def _activation_slope(kind: str, x: Tensor) -> Tensor:
    """act'(x), without overflow for large |x|; 0 at the ReLU kink."""
    if kind == "relu":
        return (x > 0).to(x.dtype)
    if kind == "sigmoid":
        e = torch.exp(-x.abs())
        return e / ((1 + e) * (1 + e))
    e = torch.exp(-2 * x.abs())
    return 4 * e / ((1 + e) * (1 + e))


def _chord_slope(lower, upper, act_lower, act_upper, lowest, highest) -> Tensor:
    width = upper - lower
    slope = torch.where(width > 0, (act_upper - act_lower) / width, lowest)
    return torch.minimum(torch.maximum(slope, lowest), highest)


def _smooth_upper_line(kind: str, lower: Tensor, upper: Tensor) -> tuple[Tensor, Tensor]:
    """(slope, value at lower) of a line above sigmoid or tanh on [lower, upper], in float64.

    Convex piece (upper <= 0): the chord. Concave piece (lower >= 0): the tangent at the
    midpoint. Across the inflection point: the line through (lower, act(lower)) tangent to the
    concave side at d > 0, found by bisection on h(x) = act'(x) (x - lower) - (act(x) -
    act(lower)), which is positive before d and negative after; or the chord when d >= upper.
    The slope is act' at the bisection's last point with h > 0, at or before d, where act' is
    at least act'(d): sound however far the bisection got.
    """
    act = _activation(kind)
    act_lower, act_upper = act(lower), act(upper)
    zero = torch.zeros_like(lower)
    peak = torch.full_like(lower, _PEAK_SLOPE[kind])

    convex_slope = _chord_slope(
        lower,
        upper,
        act_lower,
        act_upper,
        _activation_slope(kind, lower),
        _activation_slope(kind, upper),
    )
    middle = lower + (upper - lower) / 2
    concave_slope = _activation_slope(kind, middle)
    concave_value = act(middle) - concave_slope * (middle - lower)

    # h(end) < 0 for this end (the kernel's header proves it): the bisection's bracket.
    if kind == "sigmoid":
        end = 3 + 2 * torch.log1p(-lower.clamp_max(0))
    else:
        end = 1.5 + torch.log1p(-2 * lower.clamp_max(0))
    right = torch.minimum(upper, end)

    def gap(x):
        return _activation_slope(kind, x) * (x - lower) - (act(x) - act_lower)

    below, above = zero, right
    for _ in range(_BISECTION_STEPS):
        middle_point = below + (above - below) / 2
        positive = gap(middle_point) > 0
        below = torch.where(positive, middle_point, below)
        above = torch.where(positive, above, middle_point)
    crossing_slope = torch.where(
        gap(right) < 0,
        _activation_slope(kind, below),
        torch.where(
            right < upper, peak, _chord_slope(lower, upper, act_lower, act_upper, zero, peak)
        ),
    )

    concave = (upper > 0) & (lower >= 0)
    slope = torch.where(
        upper <= 0, convex_slope, torch.where(concave, concave_slope, crossing_slope)
    )
    value = torch.where(concave, concave_value, act_lower)
    return slope, value


def _smooth_relaxation(kind: str, lower: Tensor, upper: Tensor) -> tuple[Tensor, ...]:
    """The four outputs of activation_relaxation for sigmoid or tanh, rounded outward."""
    dtype = lower.dtype
    eps = torch.finfo(dtype).eps
    low, high = lower.double(), upper.double()

    slope, value = _smooth_upper_line(kind, low, high)
    upper_slope = _round_up(slope, dtype)
    shift = upper_slope.double() * low
    margin = _MARGIN_EPS * eps * (1 + value.abs() + shift.abs())
    upper_bias = _round_up(value - shift + margin, dtype)

    # The lower line is the upper line of [-upper, -lower], reflected through the centre of
    # symmetry: act(x) = 2 center - act(-x).
    slope, value = _smooth_upper_line(kind, -high, -low)
    value = 2 * _CENTER[kind] - value
    lower_slope = _round_up(slope, dtype)
    shift = lower_slope.double() * high
    margin = _MARGIN_EPS * eps * (1 + value.abs() + shift.abs())
    lower_bias = _round_down(value - shift - margin, dtype)
    return lower_slope, lower_bias, upper_slope, upper_bias


def reference_activation_relaxation(
    lower: Tensor, upper: Tensor, kind: str, relu_lower_slope: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Plain-PyTorch lines enclosing the activation on [lower, upper]; see the module notes."""
    if kind != "relu":
        _activation(kind)
        return _smooth_relaxation(kind, lower, upper)

    on = lower >= 0
    unstable = (lower < 0) & (upper > 0)
    width = (upper - lower).clamp_min(torch.finfo(lower.dtype).tiny)
    chord_slope = torch.where(unstable, upper / width, on.to(lower.dtype))
    chord_bias = torch.where(unstable, -chord_slope * lower, torch.zeros_like(lower))
    if relu_lower_slope is None:
        relu_lower_slope = (upper > -lower).to(lower.dtype)
    lower_slope = torch.where(unstable, relu_lower_slope, on.to(lower.dtype))
    return lower_slope, torch.zeros_like(lower), chord_slope, chord_bias


def _stationary_point(kind: str, linear_coef: Tensor, act_coef: Tensor) -> Tensor:
    """z0 >= 0 with act'(+-z0) = -linear_coef / act_coef, or -1 where there is none."""
    ratio = -linear_coef / act_coef
    inside = (act_coef != 0) & (ratio > 0) & (ratio <= _PEAK_SLOPE[kind])
    ratio = torch.where(inside, ratio, torch.full_like(ratio, _PEAK_SLOPE[kind] / 2))
    if kind == "tanh":
        # tanh(z0) = t = sqrt(1 - r); atanh(t) = log((1 + t) / sqrt(r)) as 1 - t = r / (1 + t).
        t = torch.sqrt(1 - ratio)
        z0 = torch.log((1 + t) / torch.sqrt(ratio))
    else:
        # sigmoid'(z) = tanh'(z / 2) / 4.
        q = torch.sqrt(1 - 4 * ratio)
        z0 = 2 * torch.log((1 + q) / (2 * torch.sqrt(ratio)))
    return torch.where(inside, z0, torch.full_like(z0, -1.0))


def reference_dual_activation_max(
    lower: Tensor, upper: Tensor, linear_coef: Tensor, act_coef: Tensor, kind: str
) -> tuple[Tensor, Tensor]:
    """Plain-PyTorch closed-form inner maximum of the dual; see the module notes."""
    act = _activation(kind)
    dtype = lower.dtype
    lower, upper, linear_coef, act_coef = torch.broadcast_tensors(
        lower, upper, linear_coef, act_coef
    )
    low, high = lower.double(), upper.double()
    a, c = linear_coef.double(), act_coef.double()
    candidates = [low, high]
    if kind == "relu":
        # Piecewise linear: a maximum sits at an end or at the kink.
        candidates.append(torch.where((low < 0) & (high > 0), torch.zeros_like(low), low))
    else:
        # Stationary points: act'(z) = -linear_coef / act_coef, where act' is in (0, peak].
        z0 = _stationary_point(kind, a, c)
        for z in (-z0, z0):
            candidates.append(torch.where(z0 >= 0, torch.minimum(torch.maximum(z, low), high), low))

    points = torch.stack(candidates)
    linear_part = a * points
    act_part = c * act(points)
    best = (linear_part + act_part).argmax(dim=0, keepdim=True)
    pick = lambda t: t.gather(0, best)[0]  # noqa: E731
    margin = _MARGIN_EPS * torch.finfo(torch.float64).eps
    margin = margin * (pick(linear_part).abs() + pick(act_part).abs())
    value = _round_up(pick(linear_part + act_part) + margin, dtype)
    argmax = torch.minimum(torch.maximum(pick(points).to(dtype), lower), upper)
    return value, argmax


# ---------------------------------------------------------------------------------------------
# The public ops: compiled kernels (deepkern._C) with fake kernels and autograd rules

KIND_CODES = {kind: code for code, kind in enumerate(ACTIVATIONS)}


def _kind_code(kind: str) -> int:
    if kind not in KIND_CODES:
        raise ValueError(f"kind must be one of {ACTIVATIONS}, got {kind!r}")
    return KIND_CODES[kind]


def interval_linear(
    lower: Tensor, upper: Tensor, weight: Tensor, bias: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """The interval image of a box under ``x -> x @ weight.T + bias``.

    Computed in center-radius form: ``center @ weight.T + bias -/+ radius @ |weight|.T`` with
    ``center = (lower + upper) / 2`` and ``radius = (upper - lower) / 2``. One kernel pass forms
    center and radius (checking the bounds), two BLAS products follow, and a second pass adds
    the bias and forms both bounds in place.

    Args:
        lower (Tensor[..., n], float32 or float64): lower ends of the boxes.
        upper (Tensor[..., n], dtype and device of lower): upper ends, ``lower <= upper``.
        weight (Tensor[m, n]): the linear map.
        bias (Tensor[m] or None): its offset.

    Returns:
        (out_lower, out_upper), each Tensor[..., m]: the exact interval image in exact
        arithmetic. Floating-point rounding of the products is not widened: a sound verifier
        checks its final answer in float64 with a margin.

    Raises:
        RuntimeError: wrong dtypes, devices or shapes, non-finite bounds or ``lower > upper``
            somewhere (naming the argument and the first bad entry).

    Differentiable in lower, upper, weight and bias. Checking the bounds' values costs one
    host synchronisation on CUDA.

    Example:
        >>> lo, hi = interval_linear(torch.tensor([-1.0, 0.0]), torch.tensor([1.0, 2.0]),
        ...                          torch.tensor([[1.0, -1.0]]), torch.tensor([0.5]))
        >>> lo.item(), hi.item()
        (-2.5, 1.5)
    """
    return tuple(torch.ops.deepkern.interval_linear(lower, upper, weight, bias))


def activation_relaxation(
    lower: Tensor, upper: Tensor, kind: str, relu_lower_slope: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Two lines per neuron that enclose the activation on [lower, upper].

    ``lower_slope * x + lower_bias <= act(x) <= upper_slope * x + upper_bias`` for every x in
    [lower, upper].

    ReLU: exact lines for stable neurons; for unstable ones (lower < 0 < upper) the chord above
    and ``relu_lower_slope * x`` below (default slope: 1 where upper > -lower, else 0).

    Sigmoid and tanh (convex below 0, concave above), CROWN-style tight lines:

    - upper <= 0: the chord above, the tangent at the midpoint below;
    - lower >= 0: the tangent at the midpoint above, the chord below;
    - lower < 0 < upper: above, the line through (lower, act(lower)) tangent to the curve at
      some d > 0 (the chord when d >= upper); below, the line through (upper, act(upper))
      tangent at some d' < 0 (the chord when d' <= lower). The tangent points come from a
      safeguarded Newton search (bisection where a step would leave the bracket) that keeps
      the slope on the sound side.

    Soundness under rounding: everything is computed in float64 and rounded outward once.
    Sigmoid and tanh lines are moved out by ``4 * eps(dtype) * (1 + |pivot value| +
    |slope * pivot|)`` (about 1e-6 in float32, 1e-15 in float64), so that they enclose both
    the exact activation and PyTorch's evaluation of it in the input dtype, with the lines
    evaluated exactly. The ReLU chord rounds its slope and bias up (float64 biases move up by a
    few ulps).

    Args:
        lower (Tensor[...], float32 or float64): pre-activation lower bounds, finite.
        upper (Tensor[...], like lower): upper bounds, finite, ``lower <= upper``.
        kind: "relu", "sigmoid" or "tanh".
        relu_lower_slope (Tensor[...] like lower, values in [0, 1], or None): ReLU only.

    Returns:
        (lower_slope, lower_bias, upper_slope, upper_bias), each shaped like ``lower``.

    Raises:
        ValueError: unknown kind; ``relu_lower_slope`` with kind other than "relu"; lower or
            upper requiring grad with kind "sigmoid" or "tanh".
        RuntimeError: wrong dtypes, devices or shapes; NaN or infinite bounds; lower > upper;
            a slope outside [0, 1] (naming the argument and the first bad entry).

    Differentiable in ``relu_lower_slope`` (how optimised slopes train) and, for ReLU, in
    lower and upper through the chord (the default slope is a step function: no gradient).
    Sigmoid and tanh lines are not differentiable in lower and upper. Checking values costs
    one host synchronisation on CUDA.

    Example:
        >>> ls, lb, us, ub = activation_relaxation(torch.tensor([-1.0]), torch.tensor([3.0]),
        ...                                        "relu")
        >>> ls.item(), lb.item(), us.item(), ub.item()
        (1.0, 0.0, 0.75, 0.75)
    """
    code = _kind_code(kind)
    if relu_lower_slope is not None and kind != "relu":
        raise ValueError(f"relu_lower_slope applies to kind 'relu' only, got kind {kind!r}")
    if kind != "relu" and torch.is_grad_enabled() and (lower.requires_grad or upper.requires_grad):
        raise ValueError(
            f"activation_relaxation is not differentiable in lower and upper for kind {kind!r}: "
            "detach them"
        )
    return tuple(torch.ops.deepkern.activation_relaxation(lower, upper, code, relu_lower_slope))


def dual_activation_max(
    lower: Tensor, upper: Tensor, linear_coef: Tensor, act_coef: Tensor, kind: str
) -> tuple[Tensor, Tensor]:
    """Per neuron, ``max over z in [lower, upper] of linear_coef * z + act_coef * act(z)``.

    The closed form of the Lagrangian dual's inner maximisation (Dvijotham et al. 2018). The
    maximum sits at an end, at the ReLU kink, or at a stationary point of sigmoid or tanh,
    ``act'(z) = -linear_coef / act_coef`` (two, +-z0, when the ratio lies in (0, peak act']):

    - tanh: ``z0 = log((1 + t) / sqrt(r))`` with ``t = sqrt(1 - r)``;
    - sigmoid: ``z0 = 2 log((1 + q) / (2 sqrt(r)))`` with ``q = sqrt(1 - 4 r)``.

    The candidates are compared in float64; the value is rounded up after a margin of four
    float64 ulps of its terms, so that it bounds the true maximum from above, as a dual bound
    needs.

    Args:
        lower, upper (Tensor, float32 or float64, broadcastable): the interval, finite,
            ``lower <= upper``.
        linear_coef, act_coef (Tensor, same dtype, broadcastable): finite coefficients.
        kind: "relu", "sigmoid" or "tanh".

    Returns:
        (value, argmax), Tensors of the broadcast shape; ``argmax`` is a maximiser in [lower,
        upper] (the first of l, u, the kink or -z0, +z0 on ties).

    Raises:
        ValueError: unknown kind.
        RuntimeError: dtypes, devices or shapes that do not fit, non-finite inputs, lower >
            upper (naming the argument and the first bad entry).

    Differentiable by the envelope theorem: d value / d linear_coef = argmax, d value /
    d act_coef = act(argmax), and d value / d lower (upper) = linear_coef + act_coef *
    act'(end) where the maximiser sits at that end (at lower when both). ``argmax`` is not
    differentiable. Broadcast inputs are copied to the full shape once. Checking values costs
    one host synchronisation on CUDA.

    Example:
        >>> value, z = dual_activation_max(torch.tensor([-2.0]), torch.tensor([1.0]),
        ...                                torch.tensor([-0.5]), torch.tensor([1.0]), "relu")
        >>> value.item(), z.item()
        (1.0, -2.0)
    """
    code = _kind_code(kind)
    return tuple(torch.ops.deepkern.dual_activation_max(lower, upper, linear_coef, act_coef, code))


@torch.library.register_fake("deepkern::interval_linear")
def _fake_interval_linear(lower, upper, weight, bias):
    torch._check(lower.dim() >= 1, lambda: "lower must have shape [..., n]")
    torch._check(upper.shape == lower.shape, lambda: "upper must have the shape of lower")
    torch._check(
        weight.dim() == 2 and weight.shape[1] == lower.shape[-1],
        lambda: "weight must have shape [m, n] with n = lower.size(-1)",
    )
    if bias is not None:
        torch._check(bias.shape == (weight.shape[0],), lambda: "bias must have shape [m]")
    shape = (*lower.shape[:-1], weight.shape[0])
    return lower.new_empty(shape), lower.new_empty(shape)


@torch.library.register_fake("deepkern::activation_relaxation")
def _fake_activation_relaxation(lower, upper, kind, relu_lower_slope):
    torch._check(0 <= kind <= 2, lambda: f"kind must be 0, 1 or 2, got {kind}")
    torch._check(upper.shape == lower.shape, lambda: "upper must have the shape of lower")
    if relu_lower_slope is not None:
        torch._check(kind == 0, lambda: "relu_lower_slope applies to kind 0 (relu) only")
        torch._check(
            relu_lower_slope.shape == lower.shape,
            lambda: "relu_lower_slope must have the shape of lower",
        )
    return tuple(lower.new_empty(lower.shape) for _ in range(4))


@torch.library.register_fake("deepkern::dual_activation_max")
def _fake_dual_activation_max(lower, upper, linear_coef, act_coef, kind):
    torch._check(0 <= kind <= 2, lambda: f"kind must be 0, 1 or 2, got {kind}")
    shape = torch.broadcast_shapes(lower.shape, upper.shape, linear_coef.shape, act_coef.shape)
    return lower.new_empty(shape), lower.new_empty(shape)


def _interval_setup(ctx, inputs, output):
    lower, upper, weight, bias = inputs
    ctx.has_bias = bias is not None
    ctx.save_for_backward(lower, upper, weight)


def _interval_backward(ctx, grad_lower, grad_upper):
    lower, upper, weight = ctx.saved_tensors
    n, m = weight.shape[1], weight.shape[0]
    grad_lower = (
        torch.zeros(lower.shape[:-1] + (m,), dtype=lower.dtype, device=lower.device)
        if grad_lower is None
        else grad_lower
    )
    grad_upper = torch.zeros_like(grad_lower) if grad_upper is None else grad_upper
    # out = c W^T + b -/+ r |W|^T: the center takes the sum of the gradients, the radius their
    # difference, and lower = c - r, upper = c + r send them back halved.
    grad_center = (grad_upper + grad_lower).reshape(-1, m)
    grad_radius = (grad_upper - grad_lower).reshape(-1, m)
    center = ((lower + upper) / 2).reshape(-1, n)
    radius = ((upper - lower) / 2).reshape(-1, n)
    d_center = grad_center @ weight
    d_radius = grad_radius @ weight.abs()
    grad_in_lower = ((d_center - d_radius) / 2).reshape(lower.shape)
    grad_in_upper = ((d_center + d_radius) / 2).reshape(upper.shape)
    grad_weight = grad_center.T @ center + torch.sign(weight) * (grad_radius.T @ radius)
    grad_bias = grad_center.sum(0) if ctx.has_bias else None
    return grad_in_lower, grad_in_upper, grad_weight, grad_bias


def _relaxation_setup(ctx, inputs, output):
    lower, upper, kind, relu_lower_slope = inputs
    ctx.kind = kind
    ctx.has_slope = relu_lower_slope is not None
    ctx.save_for_backward(lower, upper)


def _relaxation_backward(ctx, grad_lower_slope, grad_lower_bias, grad_upper_slope, grad_upper_bias):
    lower, upper = ctx.saved_tensors
    needs_bounds = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
    if ctx.kind != 0 and needs_bounds:
        raise RuntimeError(
            "activation_relaxation is not differentiable in lower and upper for sigmoid and tanh"
        )
    unstable = (lower < 0) & (upper > 0)
    zero = torch.zeros_like(lower)
    grad_slope = None
    if ctx.has_slope and grad_lower_slope is not None:
        grad_slope = torch.where(unstable, grad_lower_slope, zero)
    grad_in_lower = grad_in_upper = None
    if needs_bounds:
        # Chord s = u / (u - l), b = -s l: ds/dl = u / w^2, ds/du = -l / w^2, db/dl = -u^2 / w^2,
        # db/du = l^2 / w^2 with w = u - l.
        g_s = zero if grad_upper_slope is None else grad_upper_slope
        g_b = zero if grad_upper_bias is None else grad_upper_bias
        width2 = torch.where(unstable, (upper - lower) ** 2, torch.ones_like(lower))
        grad_in_lower = torch.where(unstable, (g_s * upper - g_b * upper**2) / width2, zero)
        grad_in_upper = torch.where(unstable, (-g_s * lower + g_b * lower**2) / width2, zero)
    return grad_in_lower, grad_in_upper, None, grad_slope


def _dual_setup(ctx, inputs, output):
    lower, upper, linear_coef, act_coef, kind = inputs
    ctx.kind = kind
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(lower, upper, linear_coef, act_coef, output[1])


def _dual_backward(ctx, grad_value, grad_argmax):
    lower, upper, linear_coef, act_coef, argmax = ctx.saved_tensors
    kind = ACTIVATIONS[ctx.kind]
    act = _activation(kind)

    def reduce_to(grad, like):
        return grad.sum_to_size(like.shape) if grad.shape != like.shape else grad

    grads = [None] * 5
    if ctx.needs_input_grad[2]:
        grads[2] = reduce_to(grad_value * argmax, linear_coef)
    if ctx.needs_input_grad[3]:
        grads[3] = reduce_to(grad_value * act(argmax), act_coef)
    if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
        # Envelope theorem at a maximiser on the boundary: the derivative of the objective.
        at_lower = argmax == lower
        at_upper = (argmax == upper) & ~at_lower
        slope_lower = linear_coef + act_coef * _activation_slope(kind, lower)
        slope_upper = linear_coef + act_coef * _activation_slope(kind, upper)
        zero = torch.zeros_like(grad_value)
        if ctx.needs_input_grad[0]:
            grads[0] = reduce_to(torch.where(at_lower, grad_value * slope_lower, zero), lower)
        if ctx.needs_input_grad[1]:
            grads[1] = reduce_to(torch.where(at_upper, grad_value * slope_upper, zero), upper)
    return tuple(grads)


torch.library.register_autograd(
    "deepkern::interval_linear", _interval_backward, setup_context=_interval_setup
)
torch.library.register_autograd(
    "deepkern::activation_relaxation", _relaxation_backward, setup_context=_relaxation_setup
)
torch.library.register_autograd(
    "deepkern::dual_activation_max", _dual_backward, setup_context=_dual_setup
)
