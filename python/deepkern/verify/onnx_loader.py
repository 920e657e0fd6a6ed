"""Reads an ONNX network into the layer set a verifier works on.

The graph must be one chain from its single data input to its single output: every node on
the way takes the data from the node before it, and everything else it reads is constant
(initializers, ``Constant`` nodes, and any node whose inputs are all constant, which is
evaluated once here). Affine steps fold into their neighbours where that is exact (the ``Add``
after a ``MatMul`` becomes the bias of one ``nn.Linear``, a batch norm after a convolution
becomes part of that convolution), so the network holds few layers.

ONNX files carry a batch of one. A tensor whose first dimension is 1 (of rank 2 or more) is read
as a batch of one sample of the remaining shape; any other tensor is one sample as it is (the
1-D networks of the VNN-COMP test set). The returned network takes ``[B, *input_shape]``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from deepkern.verify.network import ElementwiseAffine, Reshape


class OnnxImportError(ValueError):
    """The ONNX file holds something this loader cannot turn into a verifiable network."""


@dataclass(frozen=True)
class _Layout:
    """Where a data tensor stands: its ONNX shape and the shape of one sample in it."""

    shape: tuple[int, ...]

    @property
    def batched(self) -> bool:
        return len(self.shape) >= 2 and self.shape[0] == 1

    @property
    def sample(self) -> tuple[int, ...]:
        return self.shape[1:] if self.batched else self.shape


def load_onnx(path: str) -> tuple[nn.Sequential, tuple[int, ...]]:
    """Loads an ONNX network as an ``nn.Sequential`` of verifiable layers.

    Supported operators: ``Gemm``, ``MatMul`` (weight on either side), ``Add``, ``Sub``,
    ``Mul``, ``Div`` by a constant, ``Conv`` (2-D, symmetric padding), ``BatchNormalization``
    (inference), ``Flatten``, ``Reshape``, ``Squeeze``, ``Unsqueeze``, ``Relu``, ``Sigmoid``,
    ``Tanh``, ``Identity``, ``Dropout`` (inference), ``Shape`` of the data, ``Constant``, and
    any operator at all whose inputs are constant (it is evaluated with ``onnx.reference``).

    Args:
        path: the ``.onnx`` file.

    Returns:
        ``(network, input_shape)``: the network maps ``[B, *input_shape]`` to ``[B, outputs]``
        in the data type of the ONNX input (float32 or float64), in eval mode and without
        gradients on its weights; ``input_shape`` is the shape of one sample.

    Raises:
        OnnxImportError: the file is not an ONNX model, or the graph branches, has several data
            inputs or outputs, or uses an operator or attribute outside the list above (the
            message names the node and its operator).
        OSError: the file cannot be read.

    Example:
        >>> network, input_shape = load_onnx("ACASXU_run2a_1_1_batch_2000.onnx")
        >>> network(torch.zeros(1, *input_shape)).shape
        torch.Size([1, 5])
    """
    import onnx
    from google.protobuf.message import DecodeError

    try:
        model = onnx.load(path)
    except DecodeError as error:
        raise OnnxImportError(f"{path}: not an ONNX model ({error})") from error
    # An empty or foreign file can parse as an empty model; say so rather than "no input".
    if not model.graph.node and not model.graph.input:
        raise OnnxImportError(f"{path}: not an ONNX model (no graph)")
    try:
        return _GraphReader(model).read()
    except OnnxImportError as error:
        raise OnnxImportError(f"{path}: {error}") from error


class _GraphReader:
    """Walks one graph in topological order and builds the layers of its data path."""

    def __init__(self, model):
        self.graph = model.graph
        self.opset = next(
            (entry.version for entry in model.opset_import if entry.domain in ("", "ai.onnx")), 1
        )
        self.constants: dict[str, np.ndarray] = {}
        self.layouts: dict[str, _Layout] = {}
        self.layers = _LayerList()

    def read(self) -> tuple[nn.Sequential, tuple[int, ...]]:
        from onnx import numpy_helper

        for initializer in self.graph.initializer:
            self.constants[initializer.name] = numpy_helper.to_array(initializer)
        input_name, dtype = self._data_input()
        # ONNX arithmetic takes both operands in one type; a weight in another type makes an
        # invalid model (the checker refuses it) that no verdict should be given for.
        expected = np.float32 if dtype == torch.float32 else np.float64
        for name, value in self.constants.items():
            if np.issubdtype(value.dtype, np.floating) and value.dtype != expected:
                raise OnnxImportError(
                    f"initializer {name!r} is {value.dtype}, the input is {np.dtype(expected)}"
                )
        output_name = self._single_output()
        input_sample = self.layouts[input_name].sample

        current = input_name
        for index, node in self._nodes_leading_to(output_name):
            current = self._visit(index, node, current)
        if output_name in self.constants:
            raise OnnxImportError(f"the output {output_name!r} does not depend on the input")

        # The network returns [B, outputs] whatever shape the last tensor had.
        if len(self.layouts[current].sample) != 1:
            self.layers.append(nn.Flatten())
        network = nn.Sequential(*self.layers.modules).to(dtype).eval()
        network.requires_grad_(False)
        return network, input_sample

    # -- graph structure ------------------------------------------------------------------

    def _data_input(self) -> tuple[str, torch.dtype]:
        from onnx import TensorProto

        inputs = [i for i in self.graph.input if i.name not in self.constants]
        if len(inputs) != 1:
            names = ", ".join(repr(i.name) for i in inputs) or "none"
            raise OnnxImportError(f"expected exactly one data input, found {names}")
        data = inputs[0]
        dtypes = {TensorProto.FLOAT: torch.float32, TensorProto.DOUBLE: torch.float64}
        elem_type = data.type.tensor_type.elem_type
        if elem_type not in dtypes:
            raise OnnxImportError(
                f"input {data.name!r} must hold float or double, got "
                f"{TensorProto.DataType.Name(elem_type).lower()}"
            )

        # A symbolic or zero first dimension is the batch; every other one must be known.
        dims = list(data.type.tensor_type.shape.dim)
        shape = []
        for axis, dim in enumerate(dims):
            size = dim.dim_value if dim.HasField("dim_value") else 0
            if size <= 0 and axis == 0 and len(dims) >= 2:
                size = 1
            if size <= 0:
                raise OnnxImportError(
                    f"input {data.name!r} has an unknown size in dimension {axis}"
                )
            shape.append(size)
        self.layouts[data.name] = _Layout(tuple(shape))
        return data.name, dtypes[elem_type]

    def _single_output(self) -> str:
        if len(self.graph.output) != 1:
            names = ", ".join(repr(o.name) for o in self.graph.output)
            raise OnnxImportError(f"expected exactly one output, found {names}")
        return self.graph.output[0].name

    def _nodes_leading_to(self, output_name: str) -> list[tuple[int, object]]:
        """The nodes the output depends on, in an order where producers come first."""
        producer = {}
        for index, node in enumerate(self.graph.node):
            for name in node.output:
                if name:
                    producer[name] = index

        needed: set[int] = set()
        pending = [output_name]
        while pending:
            name = pending.pop()
            index = producer.get(name)
            if index is None or index in needed:
                continue
            needed.add(index)
            pending.extend(n for n in self.graph.node[index].input if n)

        # Kahn's algorithm over the needed nodes; stable in file order.
        known = set(self.constants) | set(self.layouts)
        ordered, remaining = [], sorted(needed)
        while remaining:
            ready = [
                i for i in remaining if all(n in known or not n for n in self.graph.node[i].input)
            ]
            if not ready:
                index = remaining[0]
                node = self.graph.node[index]
                missing = [n for n in node.input if n and n not in known]
                raise OnnxImportError(
                    f"{_describe(node, index)} reads {missing[0]!r}, which no node produces "
                    "(or the graph has a cycle)"
                )
            for index in ready:
                ordered.append((index, self.graph.node[index]))
                known.update(n for n in self.graph.node[index].output if n)
            remaining = [i for i in remaining if i not in ready]
        if output_name not in known:
            raise OnnxImportError(f"no node produces the output {output_name!r}")
        return ordered

    # -- one node ---------------------------------------------------------------------------

    def _visit(self, index: int, node, current: str) -> str:
        """Handles one node; returns the name of the data tensor after it."""
        where = _describe(node, index)
        inputs = [n for n in node.input if n]

        if node.op_type == "Constant" or all(n in self.constants for n in inputs):
            self._fold(node, where)
            return current
        if node.op_type == "Shape":
            self._shape_of_data(node, where)
            return current

        data = [n for n in inputs if n not in self.constants]
        if len(data) > 1:
            raise OnnxImportError(f"{where} combines two data tensors; the graph must be a chain")
        if data[0] != current:
            raise OnnxImportError(
                f"{where} reads {data[0]!r}, which another node also reads; "
                "the graph must be a chain"
            )
        handler = _HANDLERS.get(node.op_type)
        if handler is None:
            raise OnnxImportError(f"{where}: operator {node.op_type} is not supported")

        layout = self.layouts[current]
        out_shape, natural_sample = handler(self, node, where, layout)
        out_layout = _Layout(tuple(int(s) for s in out_shape))
        if natural_sample != out_layout.sample:
            self.layers.append(_reshape_to(out_layout.sample))
        for extra in node.output[1:]:
            if extra and self._is_read(extra):
                raise OnnxImportError(f"{where}: its output {extra!r} is used; only one may be")
        self.layouts[node.output[0]] = out_layout
        return node.output[0]

    def _fold(self, node, where: str) -> None:
        """Evaluates a node whose inputs are all known constants."""
        from onnx import helper
        from onnx.reference import ReferenceEvaluator

        if node.op_type == "Constant":
            if len(node.attribute) != 1:
                raise OnnxImportError(f"{where} must have exactly one value attribute")
            attribute = node.attribute[0]
            value = helper.get_attribute_value(attribute)
            if attribute.name == "value":
                from onnx import numpy_helper

                value = numpy_helper.to_array(value)
            elif attribute.name not in _CONSTANT_TYPES:
                raise OnnxImportError(f"{where}: attribute {attribute.name!r} is not supported")
            else:
                value = np.asarray(value, dtype=_CONSTANT_TYPES[attribute.name])
            self.constants[node.output[0]] = value
            return
        try:
            evaluator = ReferenceEvaluator(node, opsets={"": self.opset})
            feeds = {n: self.constants[n] for n in node.input if n}
            results = evaluator.run(None, feeds)
        except Exception as error:  # onnx.reference raises many types for unsupported nodes
            message = f"{where}: cannot evaluate it on its constant inputs ({error})"
            raise OnnxImportError(message) from error
        for name, value in zip(node.output, results):
            if name:
                self.constants[name] = np.asarray(value)

    def _shape_of_data(self, node, where: str) -> None:
        data = node.input[0]
        if data not in self.layouts:
            raise OnnxImportError(f"{where} reads {data!r}, which is not a tensor of the graph")
        shape = np.array(self.layouts[data].shape, dtype=np.int64)
        start = _attribute(node, "start", 0)
        end = _attribute(node, "end", len(shape))
        self.constants[node.output[0]] = shape[start:end]

    def _is_read(self, name: str) -> bool:
        return any(name in node.input for node in self.graph.node) or any(
            name == output.name for output in self.graph.output
        )

    def constant(self, node, position: int, where: str, what: str) -> np.ndarray:
        name = node.input[position] if position < len(node.input) else ""
        if not name:
            raise OnnxImportError(f"{where} needs its {what} (input {position})")
        if name not in self.constants:
            raise OnnxImportError(f"{where}: its {what} {name!r} must be constant")
        return self.constants[name]


# The element types of Constant's plain attributes, as ONNX defines them.
_CONSTANT_TYPES = {
    "value_float": np.float32,
    "value_floats": np.float32,
    "value_int": np.int64,
    "value_ints": np.int64,
}


def _describe(node, index: int) -> str:
    if node.name:
        return f"node {node.name!r} ({node.op_type})"
    return f"node #{index} ({node.op_type}, output {node.output[0]!r})"


def _attribute(node, name: str, default):
    from onnx import helper

    for attribute in node.attribute:
        if attribute.name == name:
            value = helper.get_attribute_value(attribute)
            return value.decode() if isinstance(value, bytes) else value
    return default


def _reshape_to(sample: tuple[int, ...]) -> nn.Module:
    return nn.Flatten() if len(sample) == 1 else Reshape(sample)


def _check_attributes(node, where: str, allowed: set[str]) -> None:
    for attribute in node.attribute:
        if attribute.name not in allowed:
            raise OnnxImportError(f"{where}: attribute {attribute.name!r} is not supported")


# -- the layers, with exact folding of affine steps into their neighbours --------------------


class _LayerList:
    """Modules in float64 while they are built (folding then rounds once, at the end)."""

    def __init__(self):
        self.modules: list[nn.Module] = []

    def append(self, module: nn.Module) -> None:
        self.modules.append(module.double())

    def affine(self, scale: np.ndarray, shift: np.ndarray, sample: tuple[int, ...]) -> None:
        """Appends ``x * scale + shift`` (both broadcast against one sample), folded into the
        layer before when that layer is affine.

        Two constant shifts are never folded into one: in float32, ``(x - c) + c`` is not x
        when c is large, and the sum of the shifts would hide that cancellation from the
        rounding model of the bounds, which measures each layer's error by the magnitudes of
        its own weights and shift."""
        scale = torch.tensor(np.asarray(scale, dtype=np.float64))
        shift = torch.tensor(np.asarray(shift, dtype=np.float64))
        if bool((scale == 1).all()) and bool((shift == 0).all()):
            return
        last = self.modules[-1] if self.modules else None
        if last is not None and bool((shift != 0).any()) and _has_shift(last):
            self.modules.append(ElementwiseAffine(scale, shift))
            return

        if isinstance(last, ElementwiseAffine):
            last.shift = last.shift * scale + shift
            last.scale = last.scale * scale
            return
        if isinstance(last, nn.Linear) and len(sample) == 1:
            scale = scale.expand(sample)
            with torch.no_grad():
                last.weight.mul_(scale[:, None])
                last.bias.mul_(scale).add_(shift.expand(sample))
            return
        if isinstance(last, nn.Conv2d) and _per_channel(scale) and _per_channel(shift):
            channels = sample[0]
            scale = scale.reshape(-1).expand(channels)
            with torch.no_grad():
                last.weight.mul_(scale[:, None, None, None])
                last.bias.mul_(scale).add_(shift.reshape(-1).expand(channels))
            return
        self.modules.append(ElementwiseAffine(scale, shift))


def _has_shift(module: nn.Module) -> bool:
    if isinstance(module, ElementwiseAffine):
        return bool((module.shift != 0).any())
    if isinstance(module, (nn.Linear, nn.Conv2d)):
        return module.bias is not None and bool((module.bias != 0).any())
    return False


def _per_channel(values: torch.Tensor) -> bool:
    """Whether values broadcast against ``[C, H, W]`` vary along the channel axis alone."""
    return values.dim() <= 3 and all(s == 1 for s in values.shape[-2:])


def _sample_constant(value: np.ndarray, layout: _Layout, where: str) -> np.ndarray:
    """A constant broadcast against a data tensor, rewritten to broadcast against one sample."""
    value = np.asarray(value, dtype=np.float64)
    if np.broadcast_shapes(value.shape, layout.shape) != layout.shape:
        raise OnnxImportError(
            f"{where}: a constant of shape {list(value.shape)} would change the data's shape "
            f"{list(layout.shape)}"
        )
    value = value.reshape((1,) * (len(layout.shape) - value.ndim) + value.shape)
    return value[0] if layout.batched else value


# -- one handler per operator: (reader, node, where, layout) -> (out shape, natural sample) ---


def _activation(module_type):
    def handle(reader, node, where, layout):
        _check_attributes(node, where, set())
        reader.layers.append(module_type())
        return layout.shape, layout.sample

    return handle


def _identity(reader, node, where, layout):
    if node.op_type == "Dropout":
        _check_attributes(node, where, {"ratio", "seed", "is_test"})
        if len(node.input) >= 3 and node.input[2]:
            if bool(np.asarray(reader.constant(node, 2, where, "training_mode")).item()):
                raise OnnxImportError(f"{where}: training_mode must be false")
    return layout.shape, layout.sample


def _elementwise(reader, node, where, layout):
    _check_attributes(node, where, set())
    data_first = node.input[0] not in reader.constants
    value = reader.constant(node, 1 if data_first else 0, where, "constant operand")
    value = _sample_constant(value, layout, where)
    one, zero = np.ones_like(value), np.zeros_like(value)

    op = node.op_type
    if op == "Add":
        scale, shift = one, value
    elif op == "Sub":
        scale, shift = (one, -value) if data_first else (-one, value)
    elif op == "Mul":
        scale, shift = value, zero
    elif not data_first:
        raise OnnxImportError(f"{where} divides a constant by the data, which is not affine")
    elif (value == 0).any():
        raise OnnxImportError(f"{where} divides by zero")
    else:
        scale, shift = 1.0 / value, zero
    reader.layers.affine(scale, shift, layout.sample)
    return layout.shape, layout.sample


def _linear(reader, weight: np.ndarray) -> nn.Linear:
    """``nn.Linear`` with ``weight [out, in]`` and a zero bias (a later Add folds into it)."""
    out_features, in_features = weight.shape
    # skip_init: no random initialisation (it would draw from the global generator).
    layer = nn.utils.skip_init(nn.Linear, in_features, out_features, dtype=torch.float64)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor(np.asarray(weight, dtype=np.float64)))
        layer.bias.zero_()
    return layer


def _matmul(reader, node, where, layout):
    _check_attributes(node, where, set())
    data_first = node.input[0] not in reader.constants
    weight = np.asarray(reader.constant(node, 1 if data_first else 0, where, "weight"))
    if weight.ndim != 2:
        raise OnnxImportError(f"{where}: the weight must be a matrix, got shape {weight.shape}")

    if data_first:
        # x [..., n] @ W [n, m]: a Linear with weight W^T on a 1-D sample.
        if layout.sample != (weight.shape[0],):
            raise OnnxImportError(
                f"{where}: x @ W needs one sample of shape [{weight.shape[0]}], "
                f"got {list(layout.sample)}"
            )
        reader.layers.append(_linear(reader, weight.T))
        return layout.shape[:-1] + (weight.shape[1],), (weight.shape[1],)

    # W [m, n] @ x: x is a vector [n] or a column [n, 1] of one sample.
    rows, columns = weight.shape
    if layout.batched or layout.sample not in ((columns,), (columns, 1)):
        raise OnnxImportError(
            f"{where}: W @ x needs x of shape [{columns}] or [{columns}, 1] without a batch "
            f"dimension, got {list(layout.shape)}"
        )
    if len(layout.sample) == 2:
        reader.layers.append(nn.Flatten())
    reader.layers.append(_linear(reader, weight))
    return (rows,) + layout.shape[1:], (rows,)


def _gemm(reader, node, where, layout):
    _check_attributes(node, where, {"alpha", "beta", "transA", "transB"})
    if node.input[0] in reader.constants:
        raise OnnxImportError(f"{where}: the data must be the first operand A")
    if _attribute(node, "transA", 0):
        raise OnnxImportError(f"{where}: transA=1 on the data would transpose the batch")
    alpha = float(_attribute(node, "alpha", 1.0))
    beta = float(_attribute(node, "beta", 1.0))

    weight = np.asarray(reader.constant(node, 1, where, "weight B"), dtype=np.float64)
    if weight.ndim != 2:
        raise OnnxImportError(f"{where}: B must be a matrix, got shape {weight.shape}")
    if not _attribute(node, "transB", 0):
        weight = weight.T
    out_features, in_features = weight.shape
    if layout.shape != (1, in_features):
        raise OnnxImportError(
            f"{where}: A must have shape [1, {in_features}], got {list(layout.shape)}"
        )
    reader.layers.append(_linear(reader, alpha * weight))

    if len(node.input) >= 3 and node.input[2]:
        bias = np.asarray(reader.constant(node, 2, where, "bias C"), dtype=np.float64)
        try:
            bias = np.broadcast_to(bias, (1, out_features))[0]
        except ValueError as error:
            raise OnnxImportError(
                f"{where}: C of shape {list(bias.shape)} does not broadcast to [1, {out_features}]"
            ) from error
        reader.layers.affine(np.ones(1), beta * bias, (out_features,))
    return (1, out_features), (out_features,)


def _conv(reader, node, where, layout):
    _check_attributes(
        node, where, {"auto_pad", "dilations", "group", "kernel_shape", "pads", "strides"}
    )
    weight = np.asarray(reader.constant(node, 1, where, "weight W"), dtype=np.float64)
    if weight.ndim != 4 or len(layout.shape) != 4 or not layout.batched:
        raise OnnxImportError(
            f"{where}: only 2-D convolutions of one sample [1, C, H, W] are supported, "
            f"got data {list(layout.shape)} and weight {list(weight.shape)}"
        )
    _, channels, height, width = layout.shape
    out_channels, group_channels, kernel_h, kernel_w = weight.shape
    group = int(_attribute(node, "group", 1))
    if group_channels * group != channels:
        raise OnnxImportError(
            f"{where}: weight {list(weight.shape)} with group={group} does not fit "
            f"{channels} input channels"
        )
    kernel_shape = list(_attribute(node, "kernel_shape", [kernel_h, kernel_w]))
    if kernel_shape != [kernel_h, kernel_w]:
        raise OnnxImportError(f"{where}: kernel_shape {kernel_shape} differs from the weight")
    strides = list(_attribute(node, "strides", [1, 1]))
    dilations = list(_attribute(node, "dilations", [1, 1]))
    pads = _conv_pads(node, where, (height, width), (kernel_h, kernel_w), strides, dilations)

    layer = nn.utils.skip_init(
        nn.Conv2d,
        channels,
        out_channels,
        (kernel_h, kernel_w),
        stride=tuple(strides),
        padding=tuple(pads),
        dilation=tuple(dilations),
        groups=group,
        dtype=torch.float64,
    )
    with torch.no_grad():
        layer.weight.copy_(torch.tensor(weight))
        layer.bias.zero_()
        if len(node.input) >= 3 and node.input[2]:
            bias = np.asarray(reader.constant(node, 2, where, "bias B"), dtype=np.float64)
            if bias.shape != (out_channels,):
                raise OnnxImportError(f"{where}: bias must have shape [{out_channels}]")
            layer.bias.copy_(torch.tensor(bias))
    reader.layers.append(layer)

    out = [
        (size + 2 * pad - dilation * (kernel - 1) - 1) // stride + 1
        for size, pad, dilation, kernel, stride in zip(
            (height, width), pads, dilations, (kernel_h, kernel_w), strides
        )
    ]
    if min(out) < 1:
        raise OnnxImportError(f"{where}: the output would be empty ({out})")
    sample = (out_channels, out[0], out[1])
    return (1,) + sample, sample


def _conv_pads(node, where, sizes, kernels, strides, dilations) -> list[int]:
    """Symmetric padding per spatial axis (nn.Conv2d pads both sides alike)."""
    auto_pad = _attribute(node, "auto_pad", "NOTSET")
    if auto_pad in ("NOTSET", ""):
        pads = list(_attribute(node, "pads", [0, 0, 0, 0]))
    elif auto_pad == "VALID":
        pads = [0, 0, 0, 0]
    elif auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        totals = [
            max((math.ceil(size / stride) - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)
            for size, kernel, stride, dilation in zip(sizes, kernels, strides, dilations)
        ]
        small = [total // 2 for total in totals]
        large = [total - total // 2 for total in totals]
        pads = small + large if auto_pad == "SAME_UPPER" else large + small
    else:
        raise OnnxImportError(f"{where}: auto_pad {auto_pad!r} is not supported")
    if pads[:2] != pads[2:]:
        raise OnnxImportError(f"{where}: asymmetric padding {pads} is not supported")
    return pads[:2]


def _batch_norm(reader, node, where, layout):
    _check_attributes(node, where, {"epsilon", "momentum", "training_mode", "spatial"})
    if _attribute(node, "training_mode", 0):
        raise OnnxImportError(f"{where}: training_mode must be 0")
    if not _attribute(node, "spatial", 1):
        raise OnnxImportError(f"{where}: spatial=0 is not supported")
    if len(layout.shape) < 2:
        raise OnnxImportError(f"{where}: the data needs a channel axis, got {list(layout.shape)}")
    channels = layout.shape[1]
    parts = []
    for position, what in enumerate(("scale", "bias B", "mean", "variance"), start=1):
        part = np.asarray(reader.constant(node, position, where, what), dtype=np.float64)
        if part.shape != (channels,):
            raise OnnxImportError(f"{where}: {what} must have shape [{channels}]")
        parts.append(part)
    gamma, beta, mean, variance = parts
    epsilon = float(_attribute(node, "epsilon", 1e-5))

    # y = (x - mean) / sqrt(variance + epsilon) * gamma + beta, per channel (axis 1).
    scale = gamma / np.sqrt(variance + epsilon)
    shift = beta - mean * scale
    channel_shape = (1, channels) + (1,) * (len(layout.shape) - 2)
    reader.layers.affine(
        _sample_constant(scale.reshape(channel_shape), layout, where),
        _sample_constant(shift.reshape(channel_shape), layout, where),
        layout.sample,
    )
    return layout.shape, layout.sample


def _flatten(reader, node, where, layout):
    _check_attributes(node, where, {"axis"})
    rank = len(layout.shape)
    axis = int(_attribute(node, "axis", 1))
    if not -rank <= axis <= rank:
        raise OnnxImportError(f"{where}: axis {axis} is out of range for rank {rank}")
    axis = axis + rank if axis < 0 else axis
    outer = math.prod(layout.shape[:axis])
    return (outer, math.prod(layout.shape[axis:])), layout.sample


def _reshape(reader, node, where, layout):
    _check_attributes(node, where, {"allowzero", "shape"})
    if reader.opset < 5:
        target = list(_attribute(node, "shape", []))
    else:
        target = [int(s) for s in np.asarray(reader.constant(node, 1, where, "shape"))]
    allow_zero = bool(_attribute(node, "allowzero", 0))
    shape = [
        layout.shape[axis] if size == 0 and not allow_zero and axis < len(layout.shape) else size
        for axis, size in enumerate(target)
    ]
    total = math.prod(layout.shape)
    if shape.count(-1) > 1:
        raise OnnxImportError(f"{where}: shape {target} has more than one -1")
    if -1 in shape:
        known = math.prod(s for s in shape if s != -1)
        if known == 0 or total % known:
            raise OnnxImportError(f"{where}: cannot reshape {list(layout.shape)} to {target}")
        shape[shape.index(-1)] = total // known
    if math.prod(shape) != total or min(shape, default=1) < 0:
        raise OnnxImportError(f"{where}: cannot reshape {list(layout.shape)} to {target}")
    return tuple(shape), layout.sample


def _squeeze_axes(reader, node, where, layout) -> list[int]:
    """The axes of Squeeze or Unsqueeze: an attribute before opset 13, an input from it on."""
    _check_attributes(node, where, {"axes"})
    if reader.opset < 13:
        axes = _attribute(node, "axes", None)
    elif len(node.input) >= 2 and node.input[1]:
        axes = reader.constant(node, 1, where, "axes")
    else:
        axes = None
    return None if axes is None else [int(a) for a in np.asarray(axes).reshape(-1)]


def _squeeze(reader, node, where, layout):
    axes = _squeeze_axes(reader, node, where, layout)
    rank = len(layout.shape)
    if axes is None:
        axes = [axis for axis, size in enumerate(layout.shape) if size == 1]
    axes = {axis + rank if axis < 0 else axis for axis in axes}
    if any(not 0 <= axis < rank or layout.shape[axis] != 1 for axis in axes):
        raise OnnxImportError(
            f"{where}: cannot squeeze axes {sorted(axes)} of {list(layout.shape)}"
        )
    shape = tuple(size for axis, size in enumerate(layout.shape) if axis not in axes)
    return shape, layout.sample


def _unsqueeze(reader, node, where, layout):
    axes = _squeeze_axes(reader, node, where, layout)
    if axes is None:
        raise OnnxImportError(f"{where} needs axes")
    rank = len(layout.shape) + len(axes)
    axes = [axis + rank if axis < 0 else axis for axis in axes]
    if len(axes) != len(set(axes)) or any(not 0 <= axis < rank for axis in axes):
        raise OnnxImportError(f"{where}: cannot insert axes {sorted(axes)}")
    sizes = iter(layout.shape)
    shape = tuple(1 if axis in axes else next(sizes) for axis in range(rank))
    return shape, layout.sample


_HANDLERS = {
    "Relu": _activation(nn.ReLU),
    "Sigmoid": _activation(nn.Sigmoid),
    "Tanh": _activation(nn.Tanh),
    "Identity": _identity,
    "Dropout": _identity,
    "Add": _elementwise,
    "Sub": _elementwise,
    "Mul": _elementwise,
    "Div": _elementwise,
    "MatMul": _matmul,
    "Gemm": _gemm,
    "Conv": _conv,
    "BatchNormalization": _batch_norm,
    "Flatten": _flatten,
    "Reshape": _reshape,
    "Squeeze": _squeeze,
    "Unsqueeze": _unsqueeze,
}

__all__ = ["OnnxImportError", "load_onnx"]
