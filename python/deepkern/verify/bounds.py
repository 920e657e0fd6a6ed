"""Bounds on linear functions of a network's outputs over boxes of inputs.

``compute_bounds`` answers, for each input box and each row ``c`` of a coefficient matrix, a
number that ``c @ network(x)`` never goes below (and, when asked, never above) for any ``x``
in the box. Four methods trade tightness for time:

- ``"ibp"``: interval bound propagation, one interval per neuron, layer by layer.
- ``"crown"``: backward linear relaxation. Each activation is enclosed between two lines
  (:func:`deepkern.ops.verify.activation_relaxation`); the spec's coefficients travel backwards
  through the network, taking the lower line where their coefficient is positive and the
  upper line where it is negative, until they reach the input box, where the linear function
  is minimised in closed form. The pre-activation bounds every relaxation needs come from the
  same backward pass started at each activation layer, intersected with IBP's.
- ``"alpha"``: CROWN with the lower slopes of unstable ReLUs (any value in [0, 1] gives a valid
  line) trained by projected Adam to raise the final bound. Every iterate is a valid bound; the
  best one per box and row is kept. Under splits, the split constraints also get Lagrange
  multipliers, trained alongside (beta-CROWN), and the search can resume from given values.
- ``"dual"``: the Lagrangian dual of Dvijotham et al. (2018), given CROWN's pre-activation
  bounds (:func:`deepkern.verify.dual.dual_bound`), starting from the multipliers that
  alpha-CROWN's slopes imply, so at least as tight as alpha before its first step.

All arithmetic runs in float64 by default, whatever the network's dtype: the weights of a
float32 network are exactly representable in float64, and float64 rounding (unit roundoff
1.1e-16) sits eight orders of magnitude below float32's, so the bounds are, to a few units of
1e-16 relative, those of the exact network. To bound the network as float32 computes it,
set ``PreparedNetwork.rounding_unit`` (see :mod:`deepkern.verify.solver`, which does).

Internally every tensor stays flat, ``[..., features]``: ``Flatten`` and ``Reshape`` only change
how later convolutions see the features (row-major, as ``torch`` lays them out).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from deepkern.ops import verify as verify_ops
from deepkern.verify.network import ElementwiseAffine, Reshape

__all__ = [
    "METHODS",
    "BoundResult",
    "OptimisedVariables",
    "PreparedNetwork",
    "affine_rows",
    "compute_bounds",
    "prepare_network",
]

METHODS = ("ibp", "crown", "alpha", "dual")

_ACTIVATION_KINDS = {nn.ReLU: "relu", nn.Sigmoid: "sigmoid", nn.Tanh: "tanh"}
# alpha-CROWN steps that find the dual's starting slopes.
_DUAL_ALPHA_STEPS = 20


@dataclass
class BoundResult:
    """Bounds of ``coefficients @ network(x)`` over each box.

    Attributes:
        lower: Tensor[B, S], a valid lower bound per box and row (``+inf`` for a box that
            the splits make empty).
        upper: Tensor[B, S] or None, a valid upper bound.
        intermediate: one ``(lo, hi)`` pair of Tensor[B, units] per activation layer: bounds
            of that layer's pre-activations over the box (splits applied).
        input_coefficients: Tensor[B, S, n] or None: for CROWN and alpha, the linear function of
            the input that lower-bounds each row; its magnitude times the box width says which
            input dimension costs the bound most.
        activation_coefficients: per activation layer, Tensor[B, S, units] or None: the
            backward coefficients that met the activation's relaxation in the final pass.
        variables: for alpha, the slopes and multipliers of each box's and row's best bound
            (rows as in the final pass: the spec's, then its negation when upper bounds are
            asked for), to resume from with ``compute_bounds(..., start=variables)``.
    """

    lower: Tensor
    upper: Tensor | None
    intermediate: list[tuple[Tensor, Tensor]]
    input_coefficients: Tensor | None = None
    activation_coefficients: list[Tensor] = field(default_factory=list)
    variables: OptimisedVariables | None = None


@dataclass
class OptimisedVariables:
    """What alpha optimises, per box and final-pass row.

    Attributes:
        slopes: activation layer index -> Tensor[B, S, units] in [0, 1], the lower slopes of
            its ReLUs (used where a ReLU is unstable).
        multipliers: activation layer index -> (above, below), Tensor[B, S, units] >= 0, the
            Lagrange multipliers of the split constraints ``z >= lo`` and ``z <= hi`` (used
            where the layer's split sets that side; results hold zero elsewhere).
    """

    slopes: dict[int, Tensor] = field(default_factory=dict)
    multipliers: dict[int, tuple[Tensor, Tensor]] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# The network as a list of flat layers


class _Affine:
    """``x @ weight.T + bias`` (nn.Linear)."""

    def __init__(self, weight: Tensor, bias: Tensor | None):
        self.weight = weight
        self.bias = bias if bias is not None else weight.new_zeros(weight.shape[0])

    def forward(self, x: Tensor) -> Tensor:
        return x @ self.weight.T + self.bias

    def interval(self, lo: Tensor, hi: Tensor) -> tuple[Tensor, Tensor]:
        return verify_ops.interval_linear(lo, hi, self.weight, self.bias)

    def backward(self, a: Tensor) -> tuple[Tensor, Tensor]:
        return a @ self.weight, a @ self.bias

    def bound_linear(self, low: Tensor, high: Tensor) -> tuple[Tensor, Tensor]:
        """Images of lower and upper linear functions (features last), bias left out."""
        positive, negative = self.weight.clamp(min=0).T, self.weight.clamp(max=0).T
        return low @ positive + high @ negative, high @ positive + low @ negative

    def offset(self) -> Tensor:
        return self.bias


class _Conv:
    """nn.Conv2d on flat features: ``in_shape`` ``(C, H, W)`` in, ``out_shape`` out."""

    def __init__(self, module: nn.Conv2d, in_shape: tuple[int, ...], dtype: torch.dtype):
        if module.padding_mode != "zeros" or isinstance(module.padding, str):
            raise ValueError(
                "network: Conv2d needs zero padding given as numbers, got "
                f"padding={module.padding!r}, padding_mode={module.padding_mode!r}"
            )
        if len(in_shape) != 3 or in_shape[0] != module.in_channels:
            raise ValueError(
                f"network: Conv2d expects {module.in_channels} input channels as [C, H, W], "
                f"got features shaped {tuple(in_shape)}"
            )
        self.weight = module.weight.detach().to(dtype)
        bias = module.bias
        out_channels = module.out_channels
        self.bias = (
            bias.detach().to(dtype) if bias is not None else self.weight.new_zeros(out_channels)
        )
        self.stride, self.padding = module.stride, module.padding
        self.dilation, self.groups = module.dilation, module.groups
        self.in_shape = tuple(in_shape)
        probe = F.conv2d(
            torch.zeros(1, *in_shape, dtype=dtype),
            self.weight,
            None,
            self.stride,
            self.padding,
            self.dilation,
            self.groups,
        )
        self.out_shape = tuple(probe.shape[1:])
        # conv_transpose2d can land on several input sizes; output_padding picks ours.
        self.output_padding = tuple(
            in_shape[1 + i]
            - (
                (self.out_shape[1 + i] - 1) * self.stride[i]
                - 2 * self.padding[i]
                + self.dilation[i] * (self.weight.shape[2 + i] - 1)
                + 1
            )
            for i in range(2)
        )

    def _conv(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        lead = x.shape[:-1]
        out = F.conv2d(
            x.reshape(-1, *self.in_shape),
            weight,
            bias,
            self.stride,
            self.padding,
            self.dilation,
            self.groups,
        )
        return out.reshape(*lead, -1)

    def forward(self, x: Tensor) -> Tensor:
        return self._conv(x, self.weight, self.bias)

    def interval(self, lo: Tensor, hi: Tensor) -> tuple[Tensor, Tensor]:
        center = self._conv((hi + lo) / 2, self.weight, self.bias)
        radius = self._conv((hi - lo) / 2, self.weight.abs(), None)
        return center - radius, center + radius

    def backward(self, a: Tensor) -> tuple[Tensor, Tensor]:
        lead = a.shape[:-1]
        grid = a.reshape(-1, *self.out_shape)
        back = F.conv_transpose2d(
            grid,
            self.weight,
            None,
            self.stride,
            self.padding,
            self.output_padding,
            self.groups,
            self.dilation,
        )
        offset = grid.sum(dim=(2, 3)) @ self.bias
        return back.reshape(*lead, -1), offset.reshape(lead)

    def bound_linear(self, low: Tensor, high: Tensor) -> tuple[Tensor, Tensor]:
        positive, negative = self.weight.clamp(min=0), self.weight.clamp(max=0)
        return (
            self._conv(low, positive, None) + self._conv(high, negative, None),
            self._conv(high, positive, None) + self._conv(low, negative, None),
        )

    def offset(self) -> Tensor:
        return self.bias.repeat_interleave(self.out_shape[1] * self.out_shape[2])


class _Scale:
    """``x * scale + shift`` elementwise (ElementwiseAffine), both flat ``[features]``."""

    def __init__(self, scale: Tensor, shift: Tensor):
        self.scale, self.shift = scale, shift

    def forward(self, x: Tensor) -> Tensor:
        return x * self.scale + self.shift

    def interval(self, lo: Tensor, hi: Tensor) -> tuple[Tensor, Tensor]:
        center = (hi + lo) / 2 * self.scale + self.shift
        radius = (hi - lo) / 2 * self.scale.abs()
        return center - radius, center + radius

    def backward(self, a: Tensor) -> tuple[Tensor, Tensor]:
        return a * self.scale, a @ self.shift

    def bound_linear(self, low: Tensor, high: Tensor) -> tuple[Tensor, Tensor]:
        positive, negative = self.scale.clamp(min=0), self.scale.clamp(max=0)
        return low * positive + high * negative, high * positive + low * negative

    def offset(self) -> Tensor:
        return self.shift


class _Activation:
    def __init__(self, kind: str, index: int):
        self.kind, self.index = kind, index


@dataclass
class PreparedNetwork:
    """A verifiable network flattened into float64 layers, ready for repeated bound calls.

    Attributes:
        network: the original ``nn.Sequential``.
        input_shape: the shape of one input sample.
        layers: flat layers (affine maps and activations) in order.
        activation_units: neurons per activation layer.
        outputs: number of outputs.
        rounding_unit: None (bounds of the exact network), or the unit roundoff of the
            arithmetic the network runs in (2^-24 for float32): every layer's output is then
            widened, per box, by a bound on the error that arithmetic adds there (see
            :func:`_layer_noise`), so the bounds hold for the network as it computes.
    """

    network: nn.Sequential
    input_shape: tuple[int, ...]
    layers: list
    activation_units: list[int]
    activation_kinds: list[str]
    outputs: int
    dtype: torch.dtype
    rounding_unit: float | None = None

    @property
    def inputs(self) -> int:
        return math.prod(self.input_shape)

    def forward(self, x: Tensor) -> Tensor:
        """The network on flat inputs ``[..., inputs]`` in this network's dtype."""
        for layer in self.layers:
            if isinstance(layer, _Activation):
                x = _apply_activation(layer.kind, x)
            else:
                x = layer.forward(x)
        return x


def _apply_activation(kind: str, x: Tensor) -> Tensor:
    if kind == "relu":
        return torch.relu(x)
    return torch.sigmoid(x) if kind == "sigmoid" else torch.tanh(x)


def infer_input_shape(network: nn.Sequential, inputs: int) -> tuple[int, ...]:
    """The sample shape a network with ``inputs`` features expects.

    Candidates come from the first layers (a flat vector, the shape of a per-feature affine
    layer with or without its leading ones, square images for a leading convolution); the
    first one the network maps to flat outputs wins.
    """
    candidates: list[tuple[int, ...]] = [(inputs,)]
    for module in network:
        if isinstance(module, ElementwiseAffine):
            for tensor in (module.scale, module.shift):
                if tensor.numel() == inputs and tensor.dim() > 1:
                    shape = list(tensor.shape)
                    while shape:
                        candidates.insert(0, tuple(shape))
                        if shape[0] != 1:
                            break
                        shape.pop(0)
                elif tensor.dim() > 1:
                    # Broadcast constants (one value, or one per channel) need as many
                    # dimensions as they have; any such shape computes the same.
                    channels = tensor.shape[-3] if tensor.dim() >= 3 else 1
                    if inputs % channels == 0:
                        side = math.isqrt(inputs // channels)
                        if channels * side * side == inputs:
                            candidates.append((channels, side, side))
                        ones = (1,) * max(tensor.dim() - 3, 0)
                        candidates.append((*ones, channels, inputs // channels, 1)[-tensor.dim() :])
                        candidates.append((1,) * (tensor.dim() - 1) + (inputs,))
            continue
        if isinstance(module, nn.Conv2d):
            side = math.isqrt(inputs // max(module.in_channels, 1))
            candidates.insert(0, (module.in_channels, side, side))
        break
    probe_dtype = next((p.dtype for p in network.parameters()), torch.float32)
    for shape in candidates:
        if math.prod(shape) != inputs:
            continue
        try:
            with torch.no_grad():
                out = network(torch.zeros(2, *shape, dtype=probe_dtype))
        except RuntimeError:
            continue
        if out.dim() == 2 and out.shape[0] == 2:
            return shape
    raise ValueError(
        f"network: cannot tell the shape of a sample with {inputs} features; pass input_shape"
    )


def prepare_network(
    network: nn.Sequential,
    input_shape: tuple[int, ...] | None = None,
    *,
    inputs: int | None = None,
    dtype: torch.dtype = torch.float64,
) -> PreparedNetwork:
    """Flattens ``network`` into float64 (or ``dtype``) layers for :func:`compute_bounds`.

    Args:
        network: an ``nn.Sequential`` of the verifiable layers (see :mod:`deepkern.verify`).
        input_shape: the shape of one sample; inferred from ``inputs`` when None.
        inputs: the number of input features (used when ``input_shape`` is None).
        dtype: the arithmetic's dtype (float64 unless you know why not).

    Raises:
        ValueError: a layer outside the verifiable set, or shapes that do not fit.
    """
    if isinstance(network, PreparedNetwork):
        return network
    if not isinstance(network, nn.Sequential):
        raise ValueError(f"network must be an nn.Sequential, got {type(network).__name__}")
    if input_shape is None:
        if inputs is None:
            raise ValueError("prepare_network needs input_shape or inputs")
        input_shape = infer_input_shape(network, inputs)
    input_shape = tuple(int(s) for s in input_shape)

    shape = input_shape
    layers: list = []
    units: list[int] = []
    kinds: list[str] = []
    for position, module in enumerate(network):
        features = math.prod(shape)
        if isinstance(module, nn.Linear):
            if features != module.in_features:
                raise ValueError(
                    f"network[{position}]: Linear expects {module.in_features} features, "
                    f"gets {features}"
                )
            bias = module.bias.detach().to(dtype) if module.bias is not None else None
            layers.append(_Affine(module.weight.detach().to(dtype), bias))
            shape = (module.out_features,)
        elif isinstance(module, nn.Conv2d):
            conv = _Conv(module, shape, dtype)
            layers.append(conv)
            shape = conv.out_shape
        elif isinstance(module, ElementwiseAffine):
            sample = torch.zeros(shape, dtype=dtype)
            try:
                scale = (sample + module.scale.to(dtype)).reshape(-1)
                shift = (sample + module.shift.to(dtype)).reshape(-1)
            except RuntimeError as error:
                raise ValueError(
                    f"network[{position}]: ElementwiseAffine does not broadcast to {shape}"
                ) from error
            if scale.numel() != features:
                raise ValueError(
                    f"network[{position}]: ElementwiseAffine broadcasts {shape} to "
                    f"{scale.numel()} features"
                )
            layers.append(_Scale(scale, shift))
        elif isinstance(module, nn.Flatten):
            if module.start_dim not in (1, -len(shape) - 1) or module.end_dim != -1:
                raise ValueError(f"network[{position}]: only Flatten(1, -1) is supported")
            shape = (features,)
        elif isinstance(module, Reshape):
            if math.prod(module.shape) != features:
                raise ValueError(
                    f"network[{position}]: Reshape to {module.shape} from {features} features"
                )
            shape = module.shape
        elif type(module) in _ACTIVATION_KINDS:
            kind = _ACTIVATION_KINDS[type(module)]
            layers.append(_Activation(kind, len(units)))
            units.append(features)
            kinds.append(kind)
        else:
            raise ValueError(
                f"network[{position}]: {type(module).__name__} is not a verifiable layer"
            )
    if len(shape) != 1:
        raise ValueError(f"network must end in flat outputs, ends in shape {shape}")
    return PreparedNetwork(network, input_shape, layers, units, kinds, shape[0], dtype)


# ---------------------------------------------------------------------------------------------
# Bound methods


def _intersect(lo: Tensor, hi: Tensor, *others) -> tuple[Tensor, Tensor]:
    for other in others:
        if other is None:
            continue
        other_lo, other_hi = other
        if other_lo is not None:
            lo = torch.maximum(lo, other_lo.to(lo.dtype))
        if other_hi is not None:
            hi = torch.minimum(hi, other_hi.to(hi.dtype))
    return lo, hi


def _concretize(a: Tensor, offset: Tensor, lower: Tensor, upper: Tensor) -> Tensor:
    """min over the box of ``a @ x + offset``: a [b, S, n], boxes [B, n] -> [B, S]."""
    center = ((upper + lower) / 2).unsqueeze(-1)
    radius = ((upper - lower) / 2).unsqueeze(-1)
    return (a @ center - a.abs() @ radius).squeeze(-1) + offset


class _Relaxations:
    """Per activation layer: the lines enclosing it, for the current pre-activation bounds,
    and the split constraints (see :func:`_split_constraints`) that multipliers may enforce."""

    def __init__(
        self, kinds: list[str], bounds: list[tuple[Tensor, Tensor]], noise=None, constraints=None
    ):
        self.kinds, self.bounds, self.noise = kinds, bounds, noise
        self.constraints = constraints or {}
        self.cache: dict[int, tuple[Tensor, ...]] = {}

    def lines(self, index: int, slope: Tensor | None) -> tuple[Tensor, ...]:
        lo, hi = self.bounds[index]
        # Splits can make an interval empty (lo > hi); such boxes are reported as +inf at the
        # end, and until then the lines of the point lo keep the arithmetic finite.
        hi = torch.maximum(hi, lo)
        if slope is not None and self.kinds[index] == "relu":
            lo, hi = lo.unsqueeze(1).expand_as(slope), hi.unsqueeze(1).expand_as(slope)
            return verify_ops.activation_relaxation(lo, hi, "relu", slope)
        if index not in self.cache:
            lines = verify_ops.activation_relaxation(lo, hi, self.kinds[index])
            self.cache[index] = tuple(t.unsqueeze(1) for t in lines)
        return self.cache[index]


def _backward(
    net: PreparedNetwork,
    stop: int,
    a: Tensor,
    relaxations: _Relaxations,
    slopes: dict[int, Tensor] | None = None,
    record: list | None = None,
    multipliers: dict[int, tuple[Tensor, Tensor]] | None = None,
) -> tuple[Tensor, Tensor]:
    """Carries coefficients ``a`` [b, S, m] on the output of ``net.layers[stop - 1]`` back to the
    input, relaxing every activation for a lower bound. Returns (input coefficients, offset).

    ``multipliers`` maps an activation layer to (above, below), Tensor[b, S, units] >= 0, the
    Lagrange multipliers of its split constraints ``z >= s_lo`` and ``z <= s_hi``: on the
    subdomain both ``above (z - s_lo)`` and ``below (s_hi - z)`` are nonnegative, so
    subtracting them from the function being bounded keeps every lower bound valid, and moves
    the constraints' information onto earlier layers and the input box."""
    offset = a.new_zeros(a.shape[:-1])
    for position in reversed(range(stop)):
        layer = net.layers[position]
        noise = relaxations.noise[position] if relaxations.noise else None
        if noise is not None:
            # Whatever the error's sign, a lower bound pays |a| times its size.
            offset = offset - (a.abs() @ noise.unsqueeze(-1)).squeeze(-1)
        if isinstance(layer, _Activation):
            slope = slopes.get(layer.index) if slopes else None
            lower_slope, lower_bias, upper_slope, upper_bias = relaxations.lines(layer.index, slope)
            if record is not None:
                record[layer.index] = a
            # Positive coefficients take the lower line, negative ones the upper line; written
            # as the upper line plus a correction on the positive part, with the offsets as
            # matrix-vector products, to spare passes over `a` (memory-bound on CPUs).
            positive = a.clamp(min=0)
            offset = offset + _row_dot(a, upper_bias) + _row_dot(positive, lower_bias - upper_bias)
            a = torch.addcmul(a * upper_slope, positive, lower_slope - upper_slope)
            if multipliers and layer.index in multipliers:
                above, below = multipliers[layer.index]
                constraint = relaxations.constraints[layer.index]
                a = a - above * constraint.above + below * constraint.below
                offset = offset + _row_dot(above, constraint.above_at)
                offset = offset - _row_dot(below, constraint.below_at)
        else:
            a, shift = layer.backward(a)
            offset = offset + shift
    return a, offset


@dataclass
class _SplitConstraint:
    """One layer's split constraints as Tensor[B, 1, units]: ``above`` is 1 where the split
    says ``z >= above_at``, ``below`` is 1 where it says ``z <= below_at`` (0 elsewhere; the
    values are 0 where there is no constraint)."""

    above: Tensor
    above_at: Tensor
    below: Tensor
    below_at: Tensor


def _split_constraints(net: PreparedNetwork, splits, batch: int) -> dict[int, _SplitConstraint]:
    """The finite split bounds of every activation layer, for Lagrange multipliers."""
    constraints = {}
    for index, units in enumerate(net.activation_units):
        entry = _split(splits, index)
        if entry is None:
            continue
        parts = []
        for value, sign in ((entry[0], -1), (entry[1], 1)):
            if value is None:
                value = torch.full((units,), sign * math.inf, dtype=net.dtype)
            value = value.to(net.dtype).expand(batch, units).unsqueeze(1)
            present = torch.isfinite(value)
            parts += [present.to(net.dtype), torch.where(present, value, 0.0)]
        if bool(parts[0].any() or parts[2].any()):
            constraints[index] = _SplitConstraint(*parts)
    return constraints


def _row_dot(a: Tensor, v: Tensor) -> Tensor:
    """(a * v).sum(-1) for a [b, R, m] and v [b, 1 or R, m]; one row of v goes through a
    matrix-vector product, which reads ``a`` once and writes no temporary."""
    if v.shape[-2] == 1:
        return (a @ v.transpose(-1, -2)).squeeze(-1)
    return (a * v).sum(-1)


def _ibp(net: PreparedNetwork, lower: Tensor, upper: Tensor, splits, intermediate):
    bounds: list[tuple[Tensor, Tensor]] = []
    noise: list[Tensor | None] = []
    lo, hi = lower, upper
    for layer in net.layers:
        fresh = _layer_noise(net, layer, lo, hi)
        if isinstance(layer, _Activation):
            given = intermediate[layer.index] if intermediate is not None else None
            lo, hi = _intersect(lo, hi, given, _split(splits, layer.index))
            bounds.append((lo, hi))
            safe_hi = torch.maximum(hi, lo)
            lo, hi = _apply_activation(layer.kind, lo), _apply_activation(layer.kind, safe_hi)
        else:
            lo, hi = layer.interval(lo, hi)
        lo, hi = _widen(lo, hi, fresh)
        noise.append(fresh)
    return bounds, (lo, hi), noise


def _gamma(count: int, unit: float) -> float:
    # Past k u >= 1 (e.g. a long dot product in bfloat16) the model bounds nothing.
    if count * unit >= 1:
        return math.inf
    return count * unit / (1 - count * unit)


def _layer_noise(net: PreparedNetwork, layer, in_lo: Tensor, in_hi: Tensor) -> Tensor | None:
    """A bound [B, features] on the error that computing ``layer`` adds to its output, for
    inputs in [in_lo, in_hi] (bounds of computed values), with ``net.rounding_unit``.

    A dot product of length k computed with unit roundoff u, in any order, with or without
    fused multiply-add, is off by at most gamma(k) times the dot product of the magnitudes,
    gamma(k) = k u / (1 - k u); the bias adds one more rounding. ReLU is exact; sigmoid and tanh
    are taken to be within four units in the last place of a value at most 1. The float64
    arithmetic of the bounds themselves is covered by ten times the same model with 2^-53."""
    unit = net.rounding_unit
    if unit is None:
        return None

    def growth(count: int) -> float:
        return _gamma(count, unit) + 10 * _gamma(count, 2.0**-53)

    if isinstance(layer, _Activation):
        if layer.kind == "relu":
            return None
        return torch.full_like(in_lo, growth(4))
    magnitude = torch.maximum(in_lo.abs(), in_hi.abs())
    if isinstance(layer, _Affine):
        weight = layer.weight.abs()
        return growth(weight.shape[1] + 1) * (magnitude @ weight.T + layer.bias.abs())
    if isinstance(layer, _Conv):
        size = layer._conv(magnitude, layer.weight.abs(), layer.bias.abs())
        return growth(layer.weight[0].numel() + 1) * size
    return growth(2) * (layer.scale.abs() * magnitude + layer.shift.abs())


def _widen(lo: Tensor, hi: Tensor, noise: Tensor | None) -> tuple[Tensor, Tensor]:
    if noise is None:
        return lo, hi
    return lo - noise, hi + noise


def _split(splits, index: int):
    if splits is None or index >= len(splits):
        return None
    return splits[index]


def _crown_intermediate(net, lower, upper, splits, intermediate, refresh=None):
    """Pre-activation bounds of every activation layer: IBP from the previous layer's bounds,
    intersected with a backward (CROWN) pass started at the layer, the splits and any given
    bounds. Given bounds skip the backward pass, except on the boxes ``refresh`` names."""
    bounds: list[tuple[Tensor, Tensor]] = []
    noise: list[Tensor | None] = []
    relaxations = _Relaxations(net.activation_kinds, bounds, noise)
    lo, hi = lower, upper
    for position, layer in enumerate(net.layers):
        fresh = _layer_noise(net, layer, lo, hi)
        noise.append(fresh)
        if not isinstance(layer, _Activation):
            lo, hi = _widen(*layer.interval(lo, hi), fresh)
            continue
        given = intermediate[layer.index] if intermediate is not None else None
        lo, hi = _intersect(lo, hi, given, _split(splits, layer.index))
        if not _interval_is_exact(net, position):
            boxes = None if given is None else _split(refresh, layer.index)
            if given is None or boxes is not None and bool(boxes.any()):
                lo, hi = _tighten_boxes(
                    net, position, layer, lo, hi, lower, upper, relaxations, boxes
                )
                lo, hi = _intersect(lo, hi, _split(splits, layer.index))
        bounds.append((lo, hi))
        safe_hi = torch.maximum(hi, lo)
        lo, hi = _apply_activation(layer.kind, lo), _apply_activation(layer.kind, safe_hi)
        lo, hi = _widen(lo, hi, fresh)
    return bounds, noise


def _forward_intermediate(net, lower, upper, splits, intermediate):
    """Pre-activation bounds by forward linear relaxation: every neuron carries a lower and an
    upper linear function of the input, Tensor[B, n + 1, units] (row n the constant), pushed
    through the layers and concretised over the box at each activation, then intersected with
    IBP, the splits and any given bounds. Cheap when the input has few features (the cost
    grows with n, not with the width of later layers), looser than the backward pass on deep
    networks. Needs nondecreasing relaxation lines, which monotone activations have."""
    batch, inputs = lower.shape
    identity = torch.eye(inputs + 1, inputs, dtype=lower.dtype, device=lower.device)
    low = high = identity.unsqueeze(0).expand(batch, -1, -1)
    lo, hi = lower, upper
    center = ((upper + lower) / 2).unsqueeze(1)
    radius = ((upper - lower) / 2).unsqueeze(1)
    bounds: list[tuple[Tensor, Tensor]] = []
    noise: list[Tensor | None] = []
    for layer in net.layers:
        fresh = _layer_noise(net, layer, lo, hi)
        noise.append(fresh)
        if isinstance(layer, _Activation):
            lo_line = (center @ low[:, :inputs] - radius @ low[:, :inputs].abs()).squeeze(1)
            hi_line = (center @ high[:, :inputs] + radius @ high[:, :inputs].abs()).squeeze(1)
            lo = torch.maximum(lo, lo_line + low[:, inputs])
            hi = torch.minimum(hi, hi_line + high[:, inputs])
            given = intermediate[layer.index] if intermediate is not None else None
            lo, hi = _intersect(lo, hi, given, _split(splits, layer.index))
            bounds.append((lo, hi))
            lower_slope, lower_bias, upper_slope, upper_bias = verify_ops.activation_relaxation(
                lo, torch.maximum(hi, lo), layer.kind
            )
            if bool((lower_slope < 0).any() or (upper_slope < 0).any()):
                raise ValueError("forward bounds need nondecreasing activation relaxations")
            low = low * lower_slope.unsqueeze(1)
            high = high * upper_slope.unsqueeze(1)
            low = torch.cat([low[:, :inputs], low[:, inputs:] + lower_bias.unsqueeze(1)], 1)
            high = torch.cat([high[:, :inputs], high[:, inputs:] + upper_bias.unsqueeze(1)], 1)
            safe_hi = torch.maximum(hi, lo)
            lo, hi = _apply_activation(layer.kind, lo), _apply_activation(layer.kind, safe_hi)
        else:
            low, high = layer.bound_linear(low, high)
            shift = layer.offset()
            low = torch.cat([low[:, :inputs], low[:, inputs:] + shift], 1)
            high = torch.cat([high[:, :inputs], high[:, inputs:] + shift], 1)
            lo, hi = layer.interval(lo, hi)
        if fresh is not None:
            lo, hi = lo - fresh, hi + fresh
            low = torch.cat([low[:, :inputs], low[:, inputs:] - fresh.unsqueeze(1)], 1)
            high = torch.cat([high[:, :inputs], high[:, inputs:] + fresh.unsqueeze(1)], 1)
    return bounds, noise


def _interval_is_exact(net: PreparedNetwork, position: int) -> bool:
    """Interval arithmetic is exact through elementwise maps and one affine map from the box."""
    general = 0
    for layer in net.layers[:position]:
        if isinstance(layer, _Activation):
            return False
        general += not isinstance(layer, _Scale)
    return general <= 1


def _tighten_boxes(net, position, layer, lo, hi, lower, upper, relaxations, boxes):
    """:func:`_tighten` on the boxes ``boxes`` (Tensor[B] of bools; None for all)."""
    if boxes is None:
        return _tighten(net, position, layer, lo, hi, lower, upper, relaxations, True)
    pick = boxes.nonzero().squeeze(-1)
    some = _Relaxations(
        net.activation_kinds,
        [(b_lo[pick], b_hi[pick]) for b_lo, b_hi in relaxations.bounds],
        [n[pick] if n is not None else None for n in relaxations.noise],
    )
    new_lo, new_hi = _tighten(
        net, position, layer, lo[pick], hi[pick], lower[pick], upper[pick], some, True
    )
    return lo.index_copy(0, pick, new_lo), hi.index_copy(0, pick, new_hi)


def _tighten(net, position, layer, lo, hi, lower, upper, relaxations, every_neuron=False):
    """CROWN bounds for the pre-activations of the activation at ``position``, intersected with
    (lo, hi). ``every_neuron=False`` bounds only each box's unstable ReLUs (a stable neuron's
    relaxation is exact whatever its bounds), but the stable neurons' tighter bounds feed
    the interval arithmetic of the next layer, which on ACAS Xu makes the difference between
    1.4 thousand and over 17 thousand boxes for one property; so by default every neuron is
    bounded."""
    units = net.activation_units[layer.index]
    batch = lo.shape[0]
    if layer.kind == "relu" and not every_neuron:
        wanted = (lo < 0) & (hi > 0)
    else:
        wanted = torch.ones_like(lo, dtype=torch.bool)
    count = int(wanted.sum(-1).max()) if batch else 0
    if count == 0:
        return lo, hi
    # Each box's wanted neurons first; rows past a box's own count are blanks (zero rows).
    order = torch.argsort(wanted.to(torch.int8), dim=-1, descending=True, stable=True)
    picked = order[:, :count]
    valid = torch.gather(wanted, 1, picked)
    rows = F.one_hot(picked, units).to(lower.dtype) * valid.unsqueeze(-1).to(lower.dtype)
    # Lower bounds of z and of -z in one pass: each picks its own relaxation lines.
    a, offset = _backward(net, position, torch.cat([rows, -rows], dim=1), relaxations)
    crown = _concretize(a, offset, lower, upper)
    crown_lo = torch.where(valid, crown[:, :count], -math.inf)
    crown_hi = torch.where(valid, -crown[:, count:], math.inf)
    lo = lo.scatter_reduce(1, picked, crown_lo, "amax")
    hi = hi.scatter_reduce(1, picked, crown_hi, "amin")
    return lo, hi


def _final_pass(net, lower, upper, spec, relaxations, slopes=None, record=None, multipliers=None):
    a, offset = _backward(net, len(net.layers), spec, relaxations, slopes, record, multipliers)
    return _concretize(a, offset, lower, upper), a


def _optimise_slopes(net, lower, upper, spec, relaxations, steps: int, start=None):
    """alpha-CROWN: projected Adam on the unstable ReLUs' lower slopes, per box and row; with
    split constraints, on their Lagrange multipliers too (beta-CROWN, Wang et al. 2021).
    ``start`` (OptimisedVariables) replaces the initial values it has. Returns the best bound,
    its input coefficients, the activation coefficients and the variables that gave it."""
    batch, rows = lower.shape[0], spec.shape[1]
    given = start if start is not None else OptimisedVariables()
    slopes: dict[int, Tensor] = {}
    for index, kind in enumerate(net.activation_kinds):
        if kind != "relu":
            continue
        if index in given.slopes:
            initial = given.slopes[index].to(lower.dtype).clamp(0, 1)
        else:
            lo, hi = relaxations.bounds[index]
            initial = (hi > -lo).to(lower.dtype).unsqueeze(1)
        slopes[index] = initial.expand(batch, rows, -1).clone().requires_grad_(True)
    # Zero multipliers give plain CROWN's bound.
    multipliers: dict[int, tuple[Tensor, Tensor]] = {}
    for index, constraint in relaxations.constraints.items():
        shape = (batch, rows, constraint.above.shape[-1])
        pair = given.multipliers.get(index, (lower.new_zeros(shape), lower.new_zeros(shape)))
        multipliers[index] = tuple(
            m.to(lower.dtype).clamp(min=0).expand(shape).clone().requires_grad_(True) for m in pair
        )

    def snapshot() -> OptimisedVariables:
        return OptimisedVariables(
            {i: t.detach().clone() for i, t in slopes.items()},
            {i: (a.detach().clone(), b.detach().clone()) for i, (a, b) in multipliers.items()},
        )

    if not (slopes or multipliers) or steps <= 0:
        record: list = [None] * len(net.activation_units)
        with torch.no_grad():
            bound, a = _final_pass(
                net, lower, upper, spec, relaxations, slopes, record, multipliers
            )
        return bound, a, record, snapshot()
    best = None
    groups = [{"params": list(slopes.values()), "lr": 0.1}]
    if multipliers:
        groups.append({"params": [m for pair in multipliers.values() for m in pair], "lr": 0.05})
    optimiser = torch.optim.Adam(groups)
    for step in range(steps + 1):
        record = [None] * len(net.activation_units)
        bound, a = _final_pass(net, lower, upper, spec, relaxations, slopes, record, multipliers)
        if best is None:
            best, best_a, best_variables = bound.detach(), a.detach(), snapshot()
            best_record = [r.detach() if r is not None else None for r in record]
        improved = bound.detach() > best
        best = torch.where(improved, bound.detach(), best)
        best_a = torch.where(improved.unsqueeze(-1), a.detach(), best_a)
        best_record = [
            torch.where(improved.unsqueeze(-1), new.detach(), old) if new is not None else old
            for new, old in zip(record, best_record)
        ]
        keep = improved.unsqueeze(-1)
        for index, slope in slopes.items():
            kept = best_variables.slopes[index]
            best_variables.slopes[index] = torch.where(keep, slope.detach(), kept)
        for index, (above, below) in multipliers.items():
            kept_above, kept_below = best_variables.multipliers[index]
            best_variables.multipliers[index] = (
                torch.where(keep, above.detach(), kept_above),
                torch.where(keep, below.detach(), kept_below),
            )
        # The last values are judged above too; no step follows them.
        if step == steps:
            break
        optimiser.zero_grad()
        (-bound.sum()).backward()
        optimiser.step()
        with torch.no_grad():
            for slope in slopes.values():
                slope.clamp_(0, 1)
            for pair in multipliers.values():
                for multiplier in pair:
                    multiplier.clamp_(min=0)
    # Multipliers of sides without a constraint never move; report them as zero.
    for index, (above, below) in best_variables.multipliers.items():
        constraint = relaxations.constraints[index]
        best_variables.multipliers[index] = (above * constraint.above, below * constraint.below)
    return best, best_a, best_record, best_variables


def affine_rows(
    net: PreparedNetwork, intermediate: list, rows: Tensor, layer: int | None = None
) -> tuple[Tensor, Tensor]:
    """Rows of the outputs (``layer=None``) or of activation layer ``layer``'s pre-activations
    as affine functions of the input, through the relaxations that ``intermediate`` (one
    ``(lo, hi)`` pair of Tensor[units] per activation layer) gives. Where every activation up
    to there is fixed (each interval on one side of the ReLU kink), these are the network's
    own maps on that subdomain, up to outward rounding of the lines; rounding of the network's
    arithmetic is left out.

    Args:
        rows: Tensor[k, m], coefficients on the m values.

    Returns:
        (Tensor[k, n], Tensor[k]): input coefficients and offsets.
    """
    bounds = [(lo.reshape(1, -1), hi.reshape(1, -1)) for lo, hi in intermediate]
    relaxations = _Relaxations(net.activation_kinds, bounds)
    stop = len(net.layers)
    if layer is not None:
        stop = next(
            position
            for position, item in enumerate(net.layers)
            if isinstance(item, _Activation) and item.index == layer
        )
    with torch.no_grad():
        a, offset = _backward(net, stop, rows.to(net.dtype).unsqueeze(0), relaxations)
    return a[0], offset[0]


def _check_box(name_lower: str, lower: Tensor, upper: Tensor, inputs: int) -> None:
    if not isinstance(lower, Tensor) or not isinstance(upper, Tensor):
        raise ValueError("lower and upper must be tensors")
    if lower.dim() != 2 or lower.shape != upper.shape or lower.shape[1] != inputs:
        raise ValueError(
            f"{name_lower} and upper must both be [B, {inputs}], got {tuple(lower.shape)} and "
            f"{tuple(upper.shape)}"
        )
    if bool((lower > upper).any()):
        raise ValueError("lower must not exceed upper anywhere")
    if not bool(torch.isfinite(lower).all() and torch.isfinite(upper).all()):
        raise ValueError("lower and upper must be finite")


def compute_bounds(
    network: nn.Sequential | PreparedNetwork,
    lower: Tensor,
    upper: Tensor,
    coefficients: Tensor,
    method: str = "crown",
    *,
    splits: list | None = None,
    steps: int | None = None,
    intermediate: list | None = None,
    input_shape: tuple[int, ...] | None = None,
    upper_bound: bool = True,
    intermediate_pass: str = "backward",
    start: OptimisedVariables | None = None,
    refresh: list | None = None,
) -> BoundResult:
    """Bounds of ``coefficients @ network(x)`` for every ``x`` in each box.

    Args:
        network: a verifiable ``nn.Sequential`` or a :class:`PreparedNetwork` (prepare once
            when calling many times).
        lower, upper: Tensor[B, n]: the boxes, flat (n = number of input features).
        coefficients: Tensor[B, S, outputs] or Tensor[S, outputs]: the rows to bound.
        method: ``"ibp"``, ``"crown"``, ``"alpha"`` or ``"dual"``.
        splits: optional, one entry per activation layer (None for none) of ``(lo, hi)``
            Tensor[B, units] (either may be None) intersected with the pre-activation bounds.
            For ReLU branch and bound: active -> ``lo = 0``; inactive -> ``hi = 0``.
        steps: optimisation steps for ``"alpha"`` (default 20) and ``"dual"`` (default 100;
            any steps at all start with 20 of alpha's, 0 is the dual at CROWN's multipliers).
        intermediate: optional pre-activation bounds per activation layer (entries may be None)
            to use instead of computing them, e.g. a parent's bounds in branch and bound.
        refresh: optional, per activation layer, None or Tensor[B] of bools: the boxes whose
            given ``intermediate`` bounds are tightened by a backward pass all the same (in
            branch and bound, those whose splits changed an earlier layer).
        input_shape: one sample's shape, when the network needs more than flat vectors and
            cannot tell (see :func:`infer_input_shape`).
        upper_bound: also compute ``upper`` (doubles the rows of the final pass).
        intermediate_pass: how CROWN, alpha and dual get pre-activation bounds: ``"backward"``
            (a backward pass from every activation layer; tight) or ``"forward"`` (forward
            linear relaxation; far cheaper when the input has few features, looser).
        start: for ``"alpha"``, slopes and multipliers to start from, shaped as the
            ``variables`` of an earlier result (missing entries start as usual).

    Returns:
        BoundResult: float64 bounds (the arithmetic's dtype).

    Raises:
        ValueError: an unknown method, a network outside the verifiable set, or shapes that do
            not fit.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if intermediate_pass not in ("backward", "forward"):
        raise ValueError(
            f"intermediate_pass must be 'backward' or 'forward', got {intermediate_pass!r}"
        )
    if isinstance(network, PreparedNetwork):
        net = network
    else:
        inputs = lower.shape[-1] if isinstance(lower, Tensor) and lower.dim() == 2 else None
        net = prepare_network(network, input_shape, inputs=inputs)
    _check_box("lower", lower, upper, net.inputs)
    lower, upper = lower.to(net.dtype), upper.to(net.dtype)
    batch = lower.shape[0]
    if not isinstance(coefficients, Tensor) or coefficients.dim() not in (2, 3):
        raise ValueError("coefficients must be a tensor [S, outputs] or [B, S, outputs]")
    if coefficients.shape[-1] != net.outputs:
        raise ValueError(
            f"coefficients must have {net.outputs} columns (the outputs), got "
            f"{coefficients.shape[-1]}"
        )
    if coefficients.dim() == 3 and coefficients.shape[0] != batch:
        raise ValueError(
            f"coefficients [B, S, outputs] must have B = {batch}, got {coefficients.shape[0]}"
        )
    spec = coefficients.to(net.dtype)
    spec = spec.unsqueeze(0) if spec.dim() == 2 else spec
    if not bool(torch.isfinite(spec).all()):
        raise ValueError("coefficients must be finite")
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 0):
        raise ValueError(f"steps must be a whole number >= 0, got {steps!r}")
    _check_start(start, batch, spec.shape[1] * (2 if upper_bound else 1), net)
    _check_layer_arguments(net, batch, splits, intermediate, refresh)

    with torch.no_grad():
        if method == "ibp":
            bounds, (out_lo, out_hi), _ = _ibp(net, lower, upper, splits, intermediate)
            center, radius = (out_hi + out_lo) / 2, (out_hi - out_lo) / 2
            mid = (spec @ center.unsqueeze(-1)).squeeze(-1)
            spread = (spec.abs() @ radius.unsqueeze(-1)).squeeze(-1)
            result = BoundResult(mid - spread, mid + spread if upper_bound else None, bounds)
            return _mark_empty(result)
        if intermediate_pass == "forward":
            bounds, noise = _forward_intermediate(net, lower, upper, splits, intermediate)
        else:
            bounds, noise = _crown_intermediate(net, lower, upper, splits, intermediate, refresh)

    rows = spec.shape[1]
    stacked = torch.cat([spec, -spec], dim=1) if upper_bound else spec
    stacked = stacked.expand(batch, -1, -1)
    constraints = _split_constraints(net, splits, batch) if method == "alpha" else None
    relaxations = _Relaxations(net.activation_kinds, bounds, noise, constraints)
    if method == "dual":
        from deepkern.verify.dual import dual_bound

        # The dual starts from alpha-CROWN's slopes, so it is at least alpha's bound; with no
        # steps at all it is the dual at CROWN's multipliers.
        dual_steps = 100 if steps is None else steps
        alpha_steps = _DUAL_ALPHA_STEPS if dual_steps > 0 else 0
        _, _, _, variables = _optimise_slopes(net, lower, upper, stacked, relaxations, alpha_steps)
        slopes = [variables.slopes.get(index) for index in range(len(net.activation_units))]
        both = dual_bound(
            net.network,
            lower,
            upper,
            stacked,
            bounds,
            steps=dual_steps,
            input_shape=net.input_shape,
            relu_slopes=slopes,
        ).to(net.dtype)
        if net.rounding_unit is not None:
            error = _loose_error(net, noise).unsqueeze(-1)
            both = both - (stacked.abs() @ error).squeeze(-1)
        result = BoundResult(both[:, :rows], -both[:, rows:] if upper_bound else None, bounds)
        return _mark_empty(result)

    record: list = [None] * len(net.activation_units)
    if method == "crown":
        with torch.no_grad():
            both, a = _final_pass(net, lower, upper, stacked, relaxations, None, record)
    else:
        both, a, record, variables = _optimise_slopes(
            net, lower, upper, stacked, relaxations, 20 if steps is None else steps, start
        )
    result = BoundResult(
        both[:, :rows],
        -both[:, rows:] if upper_bound else None,
        bounds,
        a[:, :rows],
        [r[:, :rows] if r is not None else None for r in record],
        variables if method == "alpha" else None,
    )
    return _mark_empty(result)


def _check_layer_arguments(net: PreparedNetwork, batch: int, splits, intermediate, refresh):
    """splits and intermediate: per activation layer None or a (lo, hi) pair of None or
    Tensor[B or 1, units] without NaN; refresh: per layer None or a bool Tensor[B]."""
    layers = len(net.activation_units)
    for name, given in (("splits", splits), ("intermediate", intermediate), ("refresh", refresh)):
        if given is None:
            continue
        if not isinstance(given, (list, tuple)) or len(given) != layers:
            count = len(given) if isinstance(given, (list, tuple)) else type(given).__name__
            raise ValueError(
                f"{name} must be a list with one entry per activation layer ({layers}), got {count}"
            )
        for index, entry in enumerate(given):
            if entry is None:
                continue
            units = net.activation_units[index]
            if name == "refresh":
                if not (
                    isinstance(entry, Tensor)
                    and entry.dtype == torch.bool
                    and tuple(entry.shape) == (batch,)
                ):
                    raise ValueError(f"refresh[{index}] must be a bool tensor [{batch}] or None")
                continue
            if not isinstance(entry, (list, tuple)) or len(entry) != 2:
                raise ValueError(f"{name}[{index}] must be a (lo, hi) pair or None")
            for side, bound in zip(("lo", "hi"), entry):
                if bound is None:
                    continue
                if not isinstance(bound, Tensor) or tuple(bound.shape) not in (
                    (batch, units),
                    (1, units),
                    (units,),
                ):
                    shape = tuple(bound.shape) if isinstance(bound, Tensor) else type(bound)
                    raise ValueError(
                        f"{name}[{index}] {side} must be a tensor [{batch}, {units}], got {shape}"
                    )
                if bool(torch.isnan(bound).any()):
                    raise ValueError(f"{name}[{index}] {side} must not hold NaN")
                # Only the outer infinity (no bound) makes sense on each side.
                wrong = math.inf if side == "lo" else -math.inf
                if bool((bound == wrong).any()):
                    raise ValueError(f"{name}[{index}] {side} must not hold {wrong}")


def _check_start(start, batch: int, rows: int, net: PreparedNetwork) -> None:
    if start is None:
        return
    if not isinstance(start, OptimisedVariables):
        raise ValueError(f"start must be OptimisedVariables, got {type(start).__name__}")
    named = [(f"start.slopes[{i}]", t) for i, t in start.slopes.items()]
    named += [
        (f"start.multipliers[{i}][{side}]", t)
        for i, pair in start.multipliers.items()
        for side, t in enumerate(pair)
    ]
    for name, tensor in named:
        index = int(name.split("[")[1].split("]")[0])
        units = net.activation_units[index] if 0 <= index < len(net.activation_units) else None
        if units is None:
            raise ValueError(f"{name}: no activation layer {index}")
        if not isinstance(tensor, Tensor) or tuple(tensor.shape) != (batch, rows, units):
            shape = tuple(tensor.shape) if isinstance(tensor, Tensor) else type(tensor).__name__
            raise ValueError(f"{name} must be [{batch}, {rows}, {units}], got {shape}")
        if not bool(torch.isfinite(tensor).all()):
            raise ValueError(f"{name} must be finite")


def _loose_error(net: PreparedNetwork, noise: list) -> Tensor:
    """A bound [B, outputs] on |computed - exact| outputs that needs no cooperation from the
    bound method: each layer's fresh error carried forward through |W| and the activations'
    Lipschitz constants. Loose (it compounds |W| layer by layer); the dual bound pays it."""
    error = None
    for layer, fresh in zip(net.layers, noise):
        if error is not None:
            if isinstance(layer, _Activation):
                error = error * (0.25 if layer.kind == "sigmoid" else 1.0)
            elif isinstance(layer, _Affine):
                error = error @ layer.weight.abs().T
            elif isinstance(layer, _Conv):
                error = layer._conv(error, layer.weight.abs(), None)
            else:
                error = error * layer.scale.abs()
        if fresh is not None:
            error = fresh if error is None else error + fresh
    if error is None:
        return torch.zeros(1, net.outputs, dtype=net.dtype)
    return error


def _mark_empty(result: BoundResult) -> BoundResult:
    """Boxes whose splits leave no point (some lo > hi) get the bounds +inf and -inf."""
    if not result.intermediate:
        return result
    empty = torch.zeros_like(result.lower[:, 0], dtype=torch.bool)
    for lo, hi in result.intermediate:
        # Rounding can cross bounds that meet (a point box); only a clear gap means empty.
        slack = 1e-9 * (1 + lo.abs() + hi.abs())
        empty |= (lo > hi + slack).any(dim=-1)
    if bool(empty.any()):
        infinity = torch.full_like(result.lower, math.inf)
        result.lower = torch.where(empty.unsqueeze(-1), infinity, result.lower)
        if result.upper is not None:
            result.upper = torch.where(empty.unsqueeze(-1), -infinity, result.upper)
    return result
