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


def reference_activation_relaxation(
    lower: Tensor, upper: Tensor, kind: str, relu_lower_slope: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    act = _activation(kind)
    if kind != "relu":
        # Sound but loose: the activations are monotone, so constants bound them.
        zero = torch.zeros_like(lower)
        return zero, act(lower), zero, act(upper)

    on = lower >= 0
    unstable = (lower < 0) & (upper > 0)
    width = (upper - lower).clamp_min(torch.finfo(lower.dtype).tiny)
    chord_slope = torch.where(unstable, upper / width, on.to(lower.dtype))
    chord_bias = torch.where(unstable, -chord_slope * lower, torch.zeros_like(lower))
    if relu_lower_slope is None:
        relu_lower_slope = (upper > -lower).to(lower.dtype)
    lower_slope = torch.where(unstable, relu_lower_slope, on.to(lower.dtype))
    return lower_slope, torch.zeros_like(lower), chord_slope, chord_bias


def reference_dual_activation_max(
    lower: Tensor, upper: Tensor, linear_coef: Tensor, act_coef: Tensor, kind: str
) -> tuple[Tensor, Tensor]:
    act = _activation(kind)
    lower, upper, linear_coef, act_coef = torch.broadcast_tensors(
        lower, upper, linear_coef, act_coef
    )
    candidates = [lower, upper]
    if kind == "relu":
        # Piecewise linear: a maximum sits at an end or at the kink.
        candidates.append(torch.zeros_like(lower).clamp(lower, upper))
    else:
        # Stationary points: act'(z) = -linear_coef / act_coef, where act' is in (0, peak].
        peak = 0.25 if kind == "sigmoid" else 1.0
        ratio = -linear_coef / act_coef
        inside = (ratio > 0) & (ratio <= peak)
        ratio = torch.where(inside, ratio, torch.full_like(ratio, peak / 2))
        if kind == "sigmoid":
            root = torch.sqrt((1 - 4 * ratio).clamp_min(0))
            roots = [torch.logit((1 - root) / 2), torch.logit((1 + root) / 2)]
        else:
            root = torch.sqrt((1 - ratio).clamp_min(0))
            roots = [torch.atanh(-root.clamp_max(1 - 1e-7)), torch.atanh(root.clamp_max(1 - 1e-7))]
        for z in roots:
            candidates.append(torch.where(inside, z, lower).clamp(lower, upper))

    points = torch.stack(candidates)
    values = linear_coef * points + act_coef * act(points)
    best = values.argmax(dim=0, keepdim=True)
    return values.gather(0, best)[0], points.gather(0, best)[0]


# The compiled kernels replace these three once they exist; until then the references serve.
interval_linear = reference_interval_linear
activation_relaxation = reference_activation_relaxation
dual_activation_max = reference_dual_activation_max
