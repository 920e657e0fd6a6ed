"""The Lagrangian dual bound of Dvijotham et al. (2018) for a verifiable network.

The network is read as alternating affine maps and activations,

    z_k = A_k x_k + b_k            k = 0 .. K-1   (each A_k is every affine layer between two
    x_{k+1} = h_k(z_k)             k = 0 .. K-2    activations composed: Linear, Conv2d,
                                                   ElementwiseAffine, Flatten, Reshape)

with x_0 in the input box [l, u] and the output y = z_{K-1}. We want a lower bound of
min c^T y. The pre-activation bounds z_k in [l_k, u_k] are valid constraints, and so is
x_{k+1} in [h(l_k), h(u_k)] (every activation here is monotone). Multipliers mu_k and lambda_k
(one per neuron, k = 0 .. K-2) relax the equalities:

    L = c^T (A_{K-1} x_{K-1} + b_{K-1}) + sum_k mu_k^T (A_k x_k + b_k - z_k)
                                        + sum_k lambda_k^T (h(z_k) - x_{k+1}).

Weak duality: for every choice of multipliers, the minimum of L over the boxes is at most the
true minimum, since L equals the objective wherever the equalities hold. L separates:

    min L = c^T b_{K-1} + sum_k mu_k^T b_k
          + sum_{k=0}^{K-1} min over x_k in its box of (A_k^T mu_k - lambda_{k-1})^T x_k
          - sum_k sum_neurons max over z in [l_k, u_k] of (mu_k z - lambda_k h(z)),

with mu_{K-1} = c and lambda_{-1} = 0. The linear terms have the closed form
g^T centre - |g|^T radius; the per-neuron maxima are ``dual_activation_max(l_k, u_k, mu_k,
-lambda_k)``. The bound is concave in the multipliers; its supergradients are the residuals
of the relaxed equalities at the minimiser, which autograd gives (the maximiser is held fixed,
the envelope theorem). Adam climbs it.

A good start is CROWN's backward pass: lambda_{k} = A_{k+1}^T mu_{k+1} makes each x_{k+1} term
vanish, and mu_k = slope_k * lambda_k with the slope of the linear relaxation CROWN would pick
(ReLU: the lower line for positive lambda, the chord for negative; sigmoid and tanh: the chord).
The dual at that start is at least CROWN's bound, since each per-neuron term is the exact
minimum over [l_k, u_k] rather than a relaxation's intercept. For a one-hidden-layer ReLU
network the optimum of this dual equals the triangle LP relaxation's value.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from deepkern.ops import verify as verify_ops
from deepkern.verify.network import ElementwiseAffine, Reshape

__all__ = ["dual_bound"]

_ACTIVATIONS: dict[type, str] = {nn.ReLU: "relu", nn.Sigmoid: "sigmoid", nn.Tanh: "tanh"}

# Adam's step on the scaled multipliers (a tenth of each neuron's scale), and the fraction of it
# left at the last step (geometric decay): large steps leave CROWN's point quickly, small ones
# settle near the nonsmooth optimum. Tuned on random ReLU nets of 1 to 3 hidden layers, where
# these reached the LP value of one-hidden-layer nets to about 1e-3 in 300 steps.
_RELATIVE_STEP = 0.1
_FINAL_STEP_FRACTION = 0.01
# Neurons whose CROWN lambda is zero get this fraction of their layer's mean as a scale.
_SCALE_FLOOR = 0.1


# ---------------------------------------------------------------------------------------------
# The network as affine blocks between activations


@dataclass
class _Map:
    """One affine layer in float64: ``forward`` with its offset, ``adjoint`` of its linear part.

    Both act on batches ``[N, *shape]``; ``in_shape`` and ``out_shape`` are one sample's shapes.
    """

    forward: Callable[[Tensor], Tensor]
    adjoint: Callable[[Tensor], Tensor]
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]


@dataclass
class _Block:
    """All affine layers between two activations (possibly none: the identity)."""

    maps: list[_Map]
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    bias: Tensor  # [out units]: the block applied to zero

    def adjoint(self, v: Tensor) -> Tensor:
        """``A^T v`` for ``v [N, out units]``, returned as ``[N, in units]``."""
        v = v.reshape(v.shape[0], *self.out_shape)
        for step in reversed(self.maps):
            v = step.adjoint(v)
        return v.reshape(v.shape[0], -1)


def _linear_map(layer: nn.Linear, shape, index: int, dtype, device) -> _Map:
    if len(shape) != 1 or shape[0] != layer.in_features:
        raise ValueError(
            f"network: nn.Linear at index {index} expects {layer.in_features} flat features, "
            f"gets samples of shape {tuple(shape)}"
        )
    weight = layer.weight.detach().to(dtype=dtype, device=device)
    bias = None if layer.bias is None else layer.bias.detach().to(dtype=dtype, device=device)
    return _Map(
        forward=lambda x: F.linear(x, weight, bias),
        adjoint=lambda v: v @ weight,
        in_shape=tuple(shape),
        out_shape=(layer.out_features,),
    )


def _conv_map(layer: nn.Conv2d, shape, index: int, dtype, device) -> _Map:
    if layer.padding_mode != "zeros" or isinstance(layer.padding, str):
        raise ValueError(
            f"network: nn.Conv2d at index {index} must use numeric zero padding, got "
            f"padding={layer.padding!r}, padding_mode={layer.padding_mode!r}"
        )
    given = tuple(shape)
    if len(given) == 1:
        # A flat input box reaches a convolution: read it as square images (channels first).
        channels = layer.in_channels
        side = math.isqrt(given[0] // channels) if given[0] % channels == 0 else 0
        if side * side * channels != given[0]:
            raise ValueError(
                f"network: nn.Conv2d at index {index} gets {given[0]} flat features, which are "
                f"not square images of {channels} channels; pass input_shape"
            )
        shape = (channels, side, side)
    if len(shape) != 3 or shape[0] != layer.in_channels:
        raise ValueError(
            f"network: nn.Conv2d at index {index} expects {layer.in_channels} input channels, "
            f"gets samples of shape {given}"
        )
    image = tuple(shape)
    weight = layer.weight.detach().to(dtype=dtype, device=device)
    bias = None if layer.bias is None else layer.bias.detach().to(dtype=dtype, device=device)
    options = dict(
        stride=layer.stride, padding=layer.padding, dilation=layer.dilation, groups=layer.groups
    )
    probe = torch.zeros(1, *image, dtype=dtype, device=device)
    out_shape = tuple(F.conv2d(probe, weight, **options).shape[1:])
    # The transposed convolution maps back onto the input's exact size: rows and columns the
    # stride skipped come back through output_padding.
    output_padding = tuple(
        size - ((out - 1) * s - 2 * p + d * (k - 1) + 1)
        for size, out, s, p, d, k in zip(
            image[1:], out_shape[1:], layer.stride, layer.padding, layer.dilation, layer.kernel_size
        )
    )

    def adjoint(v: Tensor) -> Tensor:
        back = F.conv_transpose2d(v, weight, None, output_padding=output_padding, **options)
        return back.reshape(v.shape[0], *given)

    return _Map(
        forward=lambda x: F.conv2d(x.reshape(x.shape[0], *image), weight, bias, **options),
        adjoint=adjoint,
        in_shape=given,
        out_shape=out_shape,
    )


def _elementwise_map(layer: ElementwiseAffine, shape, index: int, dtype, device) -> _Map:
    scale = layer.scale.detach().to(dtype=dtype, device=device)
    shift = layer.shift.detach().to(dtype=dtype, device=device)
    try:
        out_shape = torch.broadcast_shapes((1, *shape), (1, *scale.shape), (1, *shift.shape))
    except RuntimeError:
        out_shape = None
    if out_shape is None or tuple(out_shape[1:]) != tuple(shape):
        raise ValueError(
            f"network: ElementwiseAffine at index {index} has scale {tuple(scale.shape)} and "
            f"shift {tuple(shift.shape)}, which do not broadcast against samples of shape "
            f"{tuple(shape)} without changing it"
        )
    return _Map(
        forward=lambda x: x * scale + shift,
        adjoint=lambda v: v * scale,
        in_shape=tuple(shape),
        out_shape=tuple(shape),
    )


def _reshape_map(layer: nn.Module, shape, index: int, dtype, device) -> _Map:
    try:
        out_shape = tuple(layer(torch.zeros(1, *shape, dtype=dtype)).shape[1:])
    except RuntimeError as error:
        raise ValueError(
            f"network: {type(layer).__name__} at index {index} cannot take samples of shape "
            f"{tuple(shape)}: {error}"
        ) from error
    return _Map(
        forward=lambda x: x.reshape(x.shape[0], *out_shape),
        adjoint=lambda v: v.reshape(v.shape[0], *shape),
        in_shape=tuple(shape),
        out_shape=out_shape,
    )


def _split_network(
    network: nn.Sequential, input_shape: tuple[int, ...], dtype, device
) -> tuple[list[_Block], list[str]]:
    """The network as K affine blocks and the K - 1 activation kinds between them."""
    if not isinstance(network, nn.Sequential):
        raise ValueError(f"network must be an nn.Sequential, got {type(network).__name__}")
    blocks_maps: list[list[_Map]] = [[]]
    kinds: list[str] = []
    shape = tuple(input_shape)
    for index, layer in enumerate(network):
        if type(layer) in _ACTIVATIONS:
            kinds.append(_ACTIVATIONS[type(layer)])
            blocks_maps.append([])
            continue
        if isinstance(layer, nn.Linear):
            step = _linear_map(layer, shape, index, dtype, device)
        elif isinstance(layer, nn.Conv2d):
            step = _conv_map(layer, shape, index, dtype, device)
        elif isinstance(layer, ElementwiseAffine):
            step = _elementwise_map(layer, shape, index, dtype, device)
        elif isinstance(layer, (nn.Flatten, Reshape)):
            step = _reshape_map(layer, shape, index, dtype, device)
        else:
            raise ValueError(
                f"network: layer {index} ({type(layer).__name__}) is not one of Linear, Conv2d, "
                "Flatten, Reshape, ElementwiseAffine, ReLU, Sigmoid, Tanh"
            )
        blocks_maps[-1].append(step)
        shape = step.out_shape

    blocks = []
    shape = tuple(input_shape)
    for maps in blocks_maps:
        in_shape = maps[0].in_shape if maps else shape
        out_shape = maps[-1].out_shape if maps else shape
        zero = torch.zeros(1, *in_shape, dtype=dtype, device=device)
        for step in maps:
            zero = step.forward(zero)
        blocks.append(_Block(maps, in_shape, out_shape, zero.reshape(-1)))
        shape = out_shape
    return blocks, kinds


# ---------------------------------------------------------------------------------------------
# The dual function


def _box_minimum(coef: Tensor, lower: Tensor, upper: Tensor) -> Tensor:
    """min over x in [lower, upper] of coef . x, summed over the last dimension."""
    centre = (upper + lower) / 2
    radius = (upper - lower) / 2
    return (coef * centre).sum(-1) - (coef.abs() * radius).sum(-1)


def _activation(kind: str) -> Callable[[Tensor], Tensor]:
    return {"relu": torch.relu, "sigmoid": torch.sigmoid, "tanh": torch.tanh}[kind]


@dataclass
class _Problem:
    blocks: list[_Block]
    kinds: list[str]
    boxes: list[tuple[Tensor, Tensor]]  # the box of each x_k, [B, 1, units]
    pre: list[tuple[Tensor, Tensor]]  # the bounds of each z_k, [B, 1, units]
    coefficients: Tensor  # [B, S, outputs]

    def adjoint(self, k: int, mu: Tensor) -> Tensor:
        batch, specs = mu.shape[:2]
        flat = self.blocks[k].adjoint(mu.reshape(batch * specs, -1))
        return flat.reshape(batch, specs, -1)

    def value(self, mus: list[Tensor], gaps: list[Tensor]) -> Tensor:
        """The dual function, [B, S], differentiable in the multipliers.

        The multipliers come as ``mus`` and ``gaps = lambda_k - A_{k+1}^T mu_{k+1}``: a
        change of one mu then carries through to the lambda below it, as in CROWN's backward
        pass, rather than opening a gap that the x_{k+1} box term penalises. The dual is the
        same function of (mu, lambda); only the coordinates Adam moves in differ.
        """
        last = len(self.blocks) - 1
        all_mus = [*mus, self.coefficients]
        backward = [self.adjoint(k, mu) for k, mu in enumerate(all_mus)]
        total = 0
        for k, block in enumerate(self.blocks):
            mu = all_mus[k]
            total = total + (mu * block.bias).sum(-1)
            # The coefficient of x_k is A_k^T mu_k - lambda_{k-1} = -gap_{k-1}.
            coef = backward[0] if k == 0 else -gaps[k - 1]
            lower, upper = self.boxes[k]
            total = total + _box_minimum(coef, lower, upper)
            if k == last:
                break
            lam = backward[k + 1] + gaps[k]
            lo, hi = self.pre[k]
            best, argmax = verify_ops.dual_activation_max(lo, hi, mu, -lam, self.kinds[k])
            # The op's value is the bound; its gradient comes from the maximiser held fixed
            # (the envelope theorem), whatever the op's own autograd does at kinks.
            z = argmax.detach()
            at_z = mu * z - lam * _activation(self.kinds[k])(z)
            total = total - (best.detach() + at_z - at_z.detach()).sum(-1)
        return total

    def crown_start(self, relu_slopes=None) -> tuple[list[Tensor], list[Tensor]]:
        """Multipliers from CROWN's backward pass (see the module's docstring); with
        ``relu_slopes`` (per activation layer, None or Tensor[B, S, units] in [0, 1]), those
        lower slopes for the ReLUs, e.g. alpha-CROWN's, whose bound the start then matches."""
        mus: list[Tensor] = [None] * len(self.kinds)
        lambdas: list[Tensor] = [None] * len(self.kinds)
        following = self.coefficients
        for k in reversed(range(len(self.kinds))):
            lam = self.adjoint(k + 1, following)
            lo, hi = self.pre[k]
            if self.kinds[k] == "relu":
                given = relu_slopes[k] if relu_slopes is not None else None
                if given is not None:
                    lo, hi = lo.expand_as(given), hi.expand_as(given)
                lower_slope, _, upper_slope, _ = verify_ops.activation_relaxation(
                    lo, hi, "relu", given
                )
                slope = torch.where(lam >= 0, lower_slope, upper_slope)
            else:
                act = _activation(self.kinds[k])
                width = hi - lo
                narrow = width <= 1e-12
                safe = torch.where(narrow, torch.ones_like(width), width)
                chord = (act(hi) - act(lo)) / safe
                at_middle = act((hi + lo) / 2)
                if self.kinds[k] == "sigmoid":
                    tangent = at_middle * (1 - at_middle)
                else:
                    tangent = 1 - at_middle**2
                slope = torch.where(narrow, tangent, chord)
            mus[k] = slope * lam
            lambdas[k] = lam
            following = mus[k]
        return mus, lambdas


# ---------------------------------------------------------------------------------------------
# Argument checks


def _check_arguments(lower, upper, coefficients, intermediate, steps, time_limit):
    for name, t in (("lower", lower), ("upper", upper), ("coefficients", coefficients)):
        if not isinstance(t, Tensor) or not t.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor")
    if lower.dim() != 2 or lower.shape != upper.shape:
        raise ValueError(
            f"lower and upper must both be [B, n], got {tuple(lower.shape)} and "
            f"{tuple(upper.shape)}"
        )
    if bool((lower > upper).any()):
        raise ValueError("lower must not exceed upper anywhere")
    if not (bool(torch.isfinite(lower).all()) and bool(torch.isfinite(upper).all())):
        raise ValueError("lower and upper must be finite")
    if coefficients.dim() not in (2, 3) or (
        coefficients.dim() == 3 and coefficients.shape[0] != lower.shape[0]
    ):
        raise ValueError(
            f"coefficients must be [S, outputs] or [B, S, outputs] with B = {lower.shape[0]}, "
            f"got {tuple(coefficients.shape)}"
        )
    if not isinstance(intermediate, (list, tuple)):
        raise ValueError("intermediate must be a list of (lower, upper) pairs")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be a non-negative integer, got {steps!r}")
    if time_limit is not None and not time_limit >= 0:
        raise ValueError(f"time_limit must be None or non-negative, got {time_limit!r}")


def _activation_bounds(intermediate, blocks, kinds, batch, dtype, device):
    if len(intermediate) != len(kinds):
        raise ValueError(
            f"intermediate must hold one (lower, upper) pair per activation layer: the network "
            f"has {len(kinds)}, got {len(intermediate)}"
        )
    pre = []
    for k, pair in enumerate(intermediate):
        units = math.prod(blocks[k].out_shape)
        if len(pair) != 2:
            raise ValueError(f"intermediate[{k}] must be a (lower, upper) pair")
        lo, hi = (t.to(dtype=dtype, device=device) for t in pair)
        if lo.shape != (batch, units) or hi.shape != (batch, units):
            raise ValueError(
                f"intermediate[{k}] must be two [B, units] = [{batch}, {units}] tensors, got "
                f"{tuple(lo.shape)} and {tuple(hi.shape)}"
            )
        if not (bool(torch.isfinite(lo).all()) and bool(torch.isfinite(hi).all())):
            raise ValueError(f"intermediate[{k}] must be finite")
        # A split can leave a neuron's interval empty; nothing is lost by bounding over the
        # single point lo instead, since the minimum over an empty box is +inf anyway.
        hi = torch.maximum(hi, lo)
        pre.append((lo.unsqueeze(1), hi.unsqueeze(1)))
    return pre


# ---------------------------------------------------------------------------------------------
# The public function


def dual_bound(
    network: nn.Sequential,
    lower: Tensor,
    upper: Tensor,
    coefficients: Tensor,
    intermediate: list[tuple[Tensor, Tensor]],
    *,
    steps: int,
    time_limit: float | None = None,
    input_shape: tuple[int, ...] | None = None,
    relu_slopes: list | None = None,
) -> Tensor:
    """A lower bound of ``coefficients @ network(x)`` over each input box, from the Lagrangian
    dual (see the module's docstring for the derivation).

    Any multipliers give a valid bound, so the result is valid whenever the optimisation
    stops: it is the best bound seen, per box and specification, over the start (CROWN's
    multipliers) and ``steps`` Adam steps, or fewer when ``time_limit`` runs out first.
    Everything is computed in float64.

    Args:
        network: an ``nn.Sequential`` of the verifiable layers (``deepkern.verify``).
        lower (Tensor[B, n]): the input boxes' lower corners, samples flattened.
        upper (Tensor[B, n]): their upper corners, ``lower <= upper``.
        coefficients (Tensor[S, outputs] or Tensor[B, S, outputs]): the linear functions of the
            outputs to bound from below, shared by all boxes or one set per box.
        intermediate: one ``(lo, hi)`` pair per activation layer, each ``Tensor[B, units]``
            (pre-activations flattened, channels first), valid bounds of that layer's input
            over each box. Tighter bounds give a tighter dual.
        steps: Adam steps on the multipliers (0: the dual at CROWN's multipliers).
        time_limit: seconds after which no further step starts, or None.
        input_shape: the shape of one sample, when the network does not take flat samples
            (default: ``(n,)``; a Conv2d that meets flat samples reads them as square images).
        relu_slopes: optional, per activation layer, None or Tensor[B, S, units] in [0, 1]:
            lower slopes for the ReLUs of the starting point (e.g. alpha-CROWN's), so that the
            dual starts at least at that bound.

    Returns:
        Tensor[B, S], float64, on ``lower``'s device: valid lower bounds.

    Raises:
        ValueError: a layer outside the verifiable set, shapes that disagree, bad steps or
            time limit, an empty or non-finite box.

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1))
        >>> lo, hi = -torch.ones(1, 2), torch.ones(1, 2)
        >>> pre = verify_ops.interval_linear(lo, hi, net[0].weight.detach(), net[0].bias.detach())
        >>> dual_bound(net, lo, hi, torch.ones(1, 1), [pre], steps=10).shape
        torch.Size([1, 1])
    """
    start_time = time.perf_counter()
    _check_arguments(lower, upper, coefficients, intermediate, steps, time_limit)
    dtype, device = torch.float64, lower.device
    batch, inputs = lower.shape
    if input_shape is None:
        input_shape = (inputs,)
    elif math.prod(input_shape) != inputs:
        raise ValueError(f"input_shape {tuple(input_shape)} does not hold {inputs} features")

    with torch.no_grad():
        blocks, kinds = _split_network(network, tuple(input_shape), dtype, device)
    outputs = math.prod(blocks[-1].out_shape)
    if coefficients.shape[-1] != outputs:
        raise ValueError(
            f"coefficients must have {outputs} columns (the network's outputs), got "
            f"{coefficients.shape[-1]}"
        )
    coefficients = coefficients.to(dtype=dtype, device=device)
    if coefficients.dim() == 2:
        coefficients = coefficients.expand(batch, *coefficients.shape)
    specs = coefficients.shape[1]
    if batch == 0 or specs == 0:
        return torch.zeros(batch, specs, dtype=dtype, device=device)

    pre = _activation_bounds(intermediate, blocks, kinds, batch, dtype, device)
    lower, upper = lower.to(dtype).unsqueeze(1), upper.to(dtype).unsqueeze(1)
    boxes = [(lower, upper)]
    for kind, (lo, hi) in zip(kinds, pre):
        act = _activation(kind)
        boxes.append((act(lo), act(hi)))
    problem = _Problem(blocks, kinds, boxes, pre, coefficients)

    with torch.no_grad():
        if relu_slopes is not None:
            if len(relu_slopes) != len(kinds):
                raise ValueError(
                    f"relu_slopes must have one entry per activation layer ({len(kinds)}), "
                    f"got {len(relu_slopes)}"
                )
            relu_slopes = [
                None if t is None else t.to(dtype=dtype, device=device).clamp(0, 1)
                for t in relu_slopes
            ]
        mus, lambdas = problem.crown_start(relu_slopes)
        gaps = [torch.zeros_like(lam) for lam in lambdas]
        best = problem.value(mus, gaps)
    if not kinds or steps == 0:
        return best

    # Adam moves every coordinate by about the same step, while the multipliers of one layer
    # differ by orders of magnitude: it works on the multipliers divided by a per-neuron scale,
    # the size of CROWN's lambda there (with a floor for neurons whose lambda is zero).
    count = len(kinds)
    scales = []
    for lam in lambdas:
        magnitude = lam.abs()
        floor = magnitude.mean(-1, keepdim=True) * _SCALE_FLOOR
        scales.append(torch.maximum(magnitude, floor).clamp_min(torch.finfo(dtype).tiny))
    scales = scales + scales
    params = [(t / scale).requires_grad_() for t, scale in zip((*mus, *gaps), scales)]
    optimizer = torch.optim.Adam(params, lr=_RELATIVE_STEP)
    decay = _FINAL_STEP_FRACTION ** (1 / steps)

    def multipliers():
        scaled = [p * scale for p, scale in zip(params, scales)]
        return scaled[:count], scaled[count:]

    for _ in range(steps):
        if time_limit is not None and time.perf_counter() - start_time >= time_limit:
            break
        value = problem.value(*multipliers())
        best = torch.maximum(best, value.detach())
        optimizer.zero_grad(set_to_none=True)
        (-value.sum()).backward()
        optimizer.step()
        for group in optimizer.param_groups:
            group["lr"] *= decay
    else:
        with torch.no_grad():
            best = torch.maximum(best, problem.value(*multipliers()))
    return best
