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
  best one per box and row is kept.
- ``"dual"``: the Lagrangian dual of Dvijotham et al. (2018), given CROWN's pre-activation
  bounds (:func:`deepkern.verify.dual.dual_bound`).

All arithmetic runs in float64 by default, whatever the network's dtype: the weights of a
float32 network are exactly representable in float64, and float64 rounding (unit roundoff
1.1e-16) is eight orders of magnitude below the float32 evaluation error that a verifier must
cover anyway, so the bounds of the float64 network are, for these small networks, the true
bounds up to a rounding error the solver's safety margin absorbs.

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

__all__ = ["METHODS", "BoundResult", "PreparedNetwork", "compute_bounds", "prepare_network"]

METHODS = ("ibp", "crown", "alpha", "dual")

_ACTIVATION_KINDS = {nn.ReLU: "relu", nn.Sigmoid: "sigmoid", nn.Tanh: "tanh"}


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
    """

    lower: Tensor
    upper: Tensor | None
    intermediate: list[tuple[Tensor, Tensor]]
    input_coefficients: Tensor | None = None
    activation_coefficients: list[Tensor] = field(default_factory=list)


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
    """

    network: nn.Sequential
    input_shape: tuple[int, ...]
    layers: list
    activation_units: list[int]
    activation_kinds: list[str]
    outputs: int
    dtype: torch.dtype

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

    Elementwise affine layers with one value per feature fix it; a leading convolution asks for
    square images with its input channels; anything else reads flat vectors.
    """
    for module in network:
        if isinstance(module, ElementwiseAffine):
            for tensor in (module.scale, module.shift):
                if tensor.numel() == inputs and tensor.dim() > 1:
                    shape = list(tensor.shape)
                    while len(shape) > 1 and shape[0] == 1:
                        shape.pop(0)
                    return tuple(shape)
            continue
        if isinstance(module, nn.Conv2d):
            side = math.isqrt(inputs // max(module.in_channels, 1))
            if module.in_channels * side * side != inputs:
                raise ValueError(
                    f"network: cannot tell the image shape of {inputs} inputs for a Conv2d with "
                    f"{module.in_channels} channels; pass input_shape"
                )
            return (module.in_channels, side, side)
        break
    return (inputs,)


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
    """Per activation layer: the lines enclosing it, for the current pre-activation bounds."""

    def __init__(self, kinds: list[str], bounds: list[tuple[Tensor, Tensor]]):
        self.kinds, self.bounds = kinds, bounds
        self.cache: dict[int, tuple[Tensor, ...]] = {}

    def lines(self, index: int, slope: Tensor | None) -> tuple[Tensor, ...]:
        lo, hi = self.bounds[index]
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
) -> tuple[Tensor, Tensor]:
    """Carries coefficients ``a`` [b, S, m] on the output of ``net.layers[stop - 1]`` back to the
    input, relaxing every activation for a lower bound. Returns (input coefficients, offset)."""
    offset = a.new_zeros(a.shape[:-1])
    for layer in reversed(net.layers[:stop]):
        if isinstance(layer, _Activation):
            slope = slopes.get(layer.index) if slopes else None
            lower_slope, lower_bias, upper_slope, upper_bias = relaxations.lines(layer.index, slope)
            if record is not None:
                record[layer.index] = a
            positive, negative = a.clamp(min=0), a.clamp(max=0)
            offset = offset + (positive * lower_bias + negative * upper_bias).sum(-1)
            a = positive * lower_slope + negative * upper_slope
        else:
            a, shift = layer.backward(a)
            offset = offset + shift
    return a, offset


def _ibp(net: PreparedNetwork, lower: Tensor, upper: Tensor, splits, intermediate):
    bounds: list[tuple[Tensor, Tensor]] = []
    lo, hi = lower, upper
    for layer in net.layers:
        if isinstance(layer, _Activation):
            given = intermediate[layer.index] if intermediate is not None else None
            lo, hi = _intersect(lo, hi, given, _split(splits, layer.index))
            bounds.append((lo, hi))
            safe_hi = torch.maximum(hi, lo)
            lo, hi = _apply_activation(layer.kind, lo), _apply_activation(layer.kind, safe_hi)
        else:
            lo, hi = layer.interval(lo, hi)
    return bounds, (lo, hi)


def _split(splits, index: int):
    if splits is None or index >= len(splits):
        return None
    return splits[index]


def _crown_intermediate(net, lower, upper, splits, intermediate):
    """Pre-activation bounds of every activation layer: IBP from the previous layer's bounds,
    intersected with a backward (CROWN) pass started at the layer, the splits and any given
    bounds."""
    bounds: list[tuple[Tensor, Tensor]] = []
    relaxations = _Relaxations(net.activation_kinds, bounds)
    lo, hi = lower, upper
    for position, layer in enumerate(net.layers):
        if not isinstance(layer, _Activation):
            lo, hi = layer.interval(lo, hi)
            continue
        given = intermediate[layer.index] if intermediate is not None else None
        if given is None:
            units = net.activation_units[layer.index]
            eye = torch.eye(units, dtype=lower.dtype, device=lower.device)
            # Lower bounds of z and of -z in one pass: each picks its own relaxation lines.
            both = torch.cat([eye, -eye]).unsqueeze(0)
            a, offset = _backward(net, position, both, relaxations)
            crown = _concretize(a, offset, lower, upper)
            crown_lo, crown_hi = crown[:, :units], -crown[:, units:]
            lo, hi = torch.maximum(lo, crown_lo), torch.minimum(hi, crown_hi)
        lo, hi = _intersect(lo, hi, given, _split(splits, layer.index))
        bounds.append((lo, hi))
        safe_hi = torch.maximum(hi, lo)
        lo, hi = _apply_activation(layer.kind, lo), _apply_activation(layer.kind, safe_hi)
    return bounds


def _final_pass(net, lower, upper, spec, relaxations, slopes=None, record=None):
    a, offset = _backward(net, len(net.layers), spec, relaxations, slopes, record)
    return _concretize(a, offset, lower, upper), a


def _optimise_slopes(net, lower, upper, spec, relaxations, steps: int):
    """alpha-CROWN: projected Adam on the unstable ReLUs' lower slopes, per box and row."""
    batch, rows = lower.shape[0], spec.shape[1]
    slopes: dict[int, Tensor] = {}
    for index, kind in enumerate(net.activation_kinds):
        if kind != "relu":
            continue
        lo, hi = relaxations.bounds[index]
        initial = (hi > -lo).to(lower.dtype).unsqueeze(1).expand(batch, rows, -1)
        slopes[index] = initial.clone().requires_grad_(True)

    record: list = [None] * len(net.activation_units)
    best, best_a = _final_pass(net, lower, upper, spec, relaxations, None, record)
    best, best_a, best_record = best.detach(), best_a.detach(), list(record)
    if not slopes or steps <= 0:
        return best, best_a, best_record
    optimiser = torch.optim.Adam(list(slopes.values()), lr=0.1)
    for _ in range(steps):
        record = [None] * len(net.activation_units)
        bound, a = _final_pass(net, lower, upper, spec, relaxations, slopes, record)
        improved = bound.detach() > best
        best = torch.where(improved, bound.detach(), best)
        best_a = torch.where(improved.unsqueeze(-1), a.detach(), best_a)
        best_record = [
            torch.where(improved.unsqueeze(-1), new.detach(), old) if new is not None else old
            for new, old in zip(record, best_record)
        ]
        optimiser.zero_grad()
        (-bound.sum()).backward()
        optimiser.step()
        with torch.no_grad():
            for slope in slopes.values():
                slope.clamp_(0, 1)
    # The last step's slopes are valid too.
    with torch.no_grad():
        bound, a = _final_pass(net, lower, upper, spec, relaxations, slopes)
        improved = bound > best
        best = torch.where(improved, bound, best)
        best_a = torch.where(improved.unsqueeze(-1), a, best_a)
    return best, best_a, best_record


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
        steps: optimisation steps for ``"alpha"`` (default 20) and ``"dual"`` (default 100).
        intermediate: optional pre-activation bounds per activation layer (entries may be None)
            to use instead of computing them, e.g. a parent's bounds in branch and bound.
        input_shape: one sample's shape, when the network needs more than flat vectors and
            cannot tell (see :func:`infer_input_shape`).
        upper_bound: also compute ``upper`` (doubles the rows of the final pass).

    Returns:
        BoundResult: float64 bounds (the arithmetic's dtype).

    Raises:
        ValueError: an unknown method, a network outside the verifiable set, or shapes that do
            not fit.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
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
    for name, given in (("splits", splits), ("intermediate", intermediate)):
        if given is not None and len(given) != len(net.activation_units):
            raise ValueError(
                f"{name} must have one entry per activation layer "
                f"({len(net.activation_units)}), got {len(given)}"
            )

    with torch.no_grad():
        if method == "ibp":
            bounds, (out_lo, out_hi) = _ibp(net, lower, upper, splits, intermediate)
            center, radius = (out_hi + out_lo) / 2, (out_hi - out_lo) / 2
            mid = (spec @ center.unsqueeze(-1)).squeeze(-1)
            spread = (spec.abs() @ radius.unsqueeze(-1)).squeeze(-1)
            result = BoundResult(mid - spread, mid + spread if upper_bound else None, bounds)
            return _mark_empty(result)
        bounds = _crown_intermediate(net, lower, upper, splits, intermediate)

    rows = spec.shape[1]
    stacked = torch.cat([spec, -spec], dim=1) if upper_bound else spec
    stacked = stacked.expand(batch, -1, -1)
    relaxations = _Relaxations(net.activation_kinds, bounds)
    if method == "dual":
        from deepkern.verify.dual import dual_bound

        both = dual_bound(
            net.network,
            lower,
            upper,
            stacked,
            bounds,
            steps=100 if steps is None else steps,
        ).to(net.dtype)
        result = BoundResult(both[:, :rows], -both[:, rows:] if upper_bound else None, bounds)
        return _mark_empty(result)

    record: list = [None] * len(net.activation_units)
    if method == "crown":
        with torch.no_grad():
            both, a = _final_pass(net, lower, upper, stacked, relaxations, None, record)
    else:
        both, a, record = _optimise_slopes(
            net, lower, upper, stacked, relaxations, 20 if steps is None else steps
        )
    result = BoundResult(
        both[:, :rows],
        -both[:, rows:] if upper_bound else None,
        bounds,
        a[:, :rows],
        [r[:, :rows] if r is not None else None for r in record],
    )
    return _mark_empty(result)


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
