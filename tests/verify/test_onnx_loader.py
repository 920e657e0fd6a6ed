"""load_onnx against onnx.reference on the benchmark networks and on small graphs built here."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from torch import nn

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402
from onnx.reference import ReferenceEvaluator  # noqa: E402

from deepkern.verify import ElementwiseAffine, Reshape  # noqa: E402
from deepkern.verify.onnx_loader import OnnxImportError, load_onnx  # noqa: E402
from tests.verify.shared_data import SHARED, needs_data  # noqa: E402


def _assert_matches_reference(path, samples=4, low=-1.0, high=1.0, seed=0):
    """Runs the loaded network on a batch and onnx.reference on each sample alone."""
    network, input_shape = load_onnx(str(path))
    model = onnx.load(str(path))
    constants = {i.name for i in model.graph.initializer}
    graph_input = next(i for i in model.graph.input if i.name not in constants)
    onnx_shape = [d.dim_value or 1 for d in graph_input.type.tensor_type.shape.dim]
    reference = ReferenceEvaluator(model)

    x = np.random.default_rng(seed).uniform(low, high, size=(samples, *input_shape))
    x = x.astype(np.float32)
    with torch.no_grad():
        ours = network(torch.from_numpy(x)).numpy()
    assert ours.ndim == 2 and ours.shape[0] == samples
    for sample, row in zip(x, ours):
        expected = reference.run(None, {graph_input.name: sample.reshape(onnx_shape)})[0]
        np.testing.assert_allclose(row, expected.reshape(-1), rtol=1e-5, atol=1e-5)
    return network, input_shape


def _kinds(network):
    return [type(layer).__name__ for layer in network]


# ---------------------------------------------------------------------------------------------
# The benchmark networks


ACAS = ["Flatten"] + ["Linear", "ReLU"] * 6 + ["Linear"]
MNIST = ["Flatten", "Linear", "ReLU", "Linear", "ReLU", "Linear"]
ERAN = ["ElementwiseAffine", "Flatten"] + ["Linear", "Sigmoid"] * 6 + ["Linear"]


@needs_data
# onnx.reference's Sigmoid overflows in exp for large pre-activations (its result is right).
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize(
    ("name", "input_shape", "outputs", "kinds"),
    [
        ("acasxu/ACASXU_run2a_1_1_batch_2000.onnx", (1, 1, 5), 5, ACAS),
        ("acasxu/ACASXU_run2a_1_2_batch_2000.onnx", (1, 1, 5), 5, None),
        ("acasxu/ACASXU_run2a_1_9_batch_2000.onnx", (1, 1, 5), 5, None),
        ("acasxu/ACASXU_run2a_2_1_batch_2000.onnx", (1, 1, 5), 5, None),
        ("mnistfc/mnist-net_256x2.onnx", (784, 1), 10, MNIST),
        ("eran/ffnnSIGMOID__Point_6x200.onnx", (1, 28, 28), 10, ERAN),
        ("test/test_nano.onnx", (1,), 1, ["Linear", "ReLU"]),
        ("test/test_tiny.onnx", (1,), 1, ["Linear", "ReLU", "Linear"]),
        ("test/test_small.onnx", (1,), 1, ["Linear", "ReLU", "Linear", "ReLU", "Linear"]),
    ],
)  # fmt: skip
def test_benchmark_networks_match_reference(name, input_shape, outputs, kinds):
    path = os.path.join(SHARED, name)
    if not os.path.exists(path):
        pytest.skip(f"{name} absent")
    low = 0.0 if "mnist" in name or "eran" in name else -1.0
    network, shape = _assert_matches_reference(path, samples=4, low=low)
    assert shape == input_shape
    assert network(torch.zeros(2, *shape)).shape == (2, outputs)
    assert all(p.dtype == torch.float32 for p in network.parameters())
    assert not any(p.requires_grad for p in network.parameters())
    if kinds is not None:
        assert _kinds(network) == kinds


@needs_data
def test_test_nano_is_half_relu():
    path = os.path.join(SHARED, "test", "test_nano.onnx")
    if not os.path.exists(path):
        pytest.skip("test_nano absent")
    network, _ = load_onnx(path)
    x = torch.tensor([[-2.0], [0.0], [3.0]])
    torch.testing.assert_close(network(x), torch.relu(0.5 * x))


# ---------------------------------------------------------------------------------------------
# Small graphs built with onnx.helper


def _tensor(name, array):
    return numpy_helper.from_array(np.asarray(array, dtype=np.float32), name)


# Opset 15: onnx.reference runs BatchNormalization of opsets 9 to 13 with batch statistics.
def _save(tmp_path, nodes, input_shape, initializers=(), output="y", opset=15, inputs=None):
    graph = helper.make_graph(
        nodes,
        "g",
        inputs or [helper.make_tensor_value_info("x", TensorProto.FLOAT, input_shape)],
        [helper.make_tensor_value_info(output, TensorProto.FLOAT, None)],
        initializer=list(initializers),
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    path = tmp_path / "model.onnx"
    onnx.save(model, str(path))
    return path


RNG = np.random.default_rng(7)


def _random(*shape):
    return RNG.standard_normal(shape).astype(np.float32)


def test_matmul_data_first_with_bias_folds_into_one_linear(tmp_path):
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["h"]),
        helper.make_node("Add", ["h", "b"], ["z"]),
        helper.make_node("Relu", ["z"], ["y"]),
    ]
    path = _save(tmp_path, nodes, [1, 3], [_tensor("W", _random(3, 4)), _tensor("b", _random(4))])
    network, shape = _assert_matches_reference(path)
    assert shape == (3,)
    assert _kinds(network) == ["Linear", "ReLU"]


def test_matmul_weight_first_on_a_vector_and_on_a_column(tmp_path):
    nodes = [
        helper.make_node("MatMul", ["W", "x"], ["h"]),
        helper.make_node("Add", ["b", "h"], ["y"]),
    ]
    path = _save(tmp_path, nodes, [3], [_tensor("W", _random(2, 3)), _tensor("b", _random(2))])
    network, shape = _assert_matches_reference(path)
    assert shape == (3,) and _kinds(network) == ["Linear"]

    column = _save(tmp_path, nodes[:1] + [helper.make_node("Relu", ["h"], ["y"])], [3, 1],
                   [_tensor("W", _random(2, 3))])  # fmt: skip
    network, shape = _assert_matches_reference(column)
    assert shape == (3, 1)
    assert network(torch.ones(5, 3, 1)).shape == (5, 2)


def test_the_two_matmul_orders_differ(tmp_path):
    weight = _random(3, 3)
    for order in (["x", "W"], ["W", "x"]):
        path = _save(tmp_path, [helper.make_node("MatMul", order, ["y"])], [3],
                     [_tensor("W", weight)])  # fmt: skip
        network, _ = _assert_matches_reference(path)
        expected = weight.T if order[0] == "x" else weight
        torch.testing.assert_close(network[0].weight, torch.from_numpy(expected))


@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize("bias_shape", [(), (4,), (1, 4)])
def test_gemm_alpha_beta_transposes_and_bias_shapes(tmp_path, trans_b, bias_shape):
    weight = _random(4, 3) if trans_b else _random(3, 4)
    gemm = helper.make_node(
        "Gemm", ["x", "B", "C"], ["y"], alpha=0.5, beta=-2.0, transA=0, transB=trans_b
    )
    path = _save(
        tmp_path, [gemm], [1, 3], [_tensor("B", weight), _tensor("C", _random(*bias_shape))]
    )
    network, _ = _assert_matches_reference(path)
    assert _kinds(network) == ["Linear"]


@pytest.mark.parametrize("first", ["Sub", "Gemm"])
def test_shifts_that_cancel_in_float32_are_not_folded_together(tmp_path, first):
    # In float32 (x - 1e7) + 1e7 and (x + 1e7) - 1e7 round x to an integer; one folded shift
    # of 0 would give x itself, and a verifier would reason about a different network.
    if first == "Sub":
        step = helper.make_node("Sub", ["x", "c"], ["h"])
        constants = [_tensor("c", np.array([1e7], dtype=np.float32))]
    else:
        step = helper.make_node("Gemm", ["x", "W", "c"], ["h"], transB=1)
        constants = [
            _tensor("W", np.eye(3, dtype=np.float32)),
            _tensor("c", np.full(3, -1e7, dtype=np.float32)),
        ]
    nodes = [step, helper.make_node("Add", ["h", "d"], ["y"])]
    constants.append(_tensor("d", np.array([1e7], dtype=np.float32)))
    path = _save(tmp_path, nodes, [1, 3], constants)
    network, _ = _assert_matches_reference(path, low=0.1, high=0.4)
    assert len(network) == 2
    with torch.no_grad():
        out = network(torch.full((1, 3), 0.3))
    assert torch.equal(out, torch.zeros(1, 3))


def test_gemm_with_a_symbolic_batch_dimension(tmp_path):
    gemm = helper.make_node("Gemm", ["x", "B"], ["y"], transB=1)
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3])]
    path = _save(tmp_path, [gemm], None, [_tensor("B", _random(2, 3))], inputs=inputs)
    network, shape = _assert_matches_reference(path)
    assert shape == (3,)


def test_conv_with_padding_strides_dilations_groups_and_folded_batch_norm(tmp_path):
    nodes = [
        helper.make_node("Conv", ["x", "W"], ["c"], pads=[1, 2, 1, 2], strides=[2, 1],
                         dilations=[1, 2], group=2),
        helper.make_node("BatchNormalization", ["c", "s", "o", "m", "v"], ["n"], epsilon=1e-3),
        helper.make_node("Relu", ["n"], ["r"]),
        helper.make_node("Flatten", ["r"], ["f"]),
        helper.make_node("Gemm", ["f", "G"], ["y"], transB=1),
    ]  # fmt: skip
    constants = [
        _tensor("W", _random(4, 1, 3, 3)),
        _tensor("s", _random(4)),
        _tensor("o", _random(4)),
        _tensor("m", _random(4)),
        _tensor("v", np.abs(_random(4)) + 0.1),
        _tensor("G", _random(3, 4 * 3 * 6)),
    ]
    path = _save(tmp_path, nodes, [1, 2, 5, 6], constants)
    network, shape = _assert_matches_reference(path)
    assert shape == (2, 5, 6)
    assert _kinds(network) == ["Conv2d", "ReLU", "Flatten", "Linear"]
    assert network[0].groups == 2 and network[0].padding == (1, 2)


def test_same_padding_and_batch_norm_without_a_layer_before(tmp_path):
    nodes = [
        helper.make_node("BatchNormalization", ["x", "s", "o", "m", "v"], ["n"]),
        helper.make_node("Conv", ["n", "W"], ["c"], auto_pad="SAME_UPPER"),
        helper.make_node("Tanh", ["c"], ["y"]),
    ]
    constants = [
        _tensor("s", _random(2)),
        _tensor("o", _random(2)),
        _tensor("m", _random(2)),
        _tensor("v", np.abs(_random(2)) + 0.1),
        _tensor("W", _random(3, 2, 3, 3)),
    ]
    path = _save(tmp_path, nodes, [1, 2, 4, 4], constants)
    network, _ = _assert_matches_reference(path)
    assert _kinds(network) == ["ElementwiseAffine", "Conv2d", "Tanh", "Flatten"]
    assert network[0].scale.shape == (2, 1, 1)


def test_elementwise_constants_in_both_orders_merge_until_two_shifts_meet(tmp_path):
    nodes = [
        helper.make_node("Sub", ["x", "a"], ["t1"]),
        helper.make_node("Div", ["t1", "d"], ["t2"]),
        helper.make_node("Sub", ["c", "t2"], ["t3"]),
        helper.make_node("Mul", ["m", "t3"], ["t4"]),
        helper.make_node("Add", ["t4", "p"], ["t5"]),
        helper.make_node("Sigmoid", ["t5"], ["y"]),
    ]
    constants = [
        _tensor("a", _random(1, 3, 1)),
        _tensor("d", np.full((1,), 0.3)),
        _tensor("c", 1.5),
        _tensor("m", _random(4)),
        _tensor("p", _random(3, 4)),
    ]
    path = _save(tmp_path, nodes, [1, 3, 4], constants)
    network, _ = _assert_matches_reference(path)
    # Sub-Div, then c - t2 with Mul, then Add: scales fold, shifts each start a step.
    assert _kinds(network) == ["ElementwiseAffine"] * 3 + ["Sigmoid", "Flatten"]


def test_constant_nodes_and_constant_subgraphs_are_folded(tmp_path):
    # The reshape target comes from Shape -> Gather -> Concat, the weight from Constant nodes
    # combined by Transpose and Mul, as exporters write them.
    weight = _random(4, 6)
    nodes = [
        helper.make_node("Constant", [], ["w0"], value=_tensor("w0v", weight)),
        helper.make_node("Constant", [], ["two"], value_float=2.0),
        helper.make_node("Transpose", ["w0"], ["w1"]),
        helper.make_node("Mul", ["w1", "two"], ["w2"]),
        helper.make_node("Shape", ["x"], ["shape"]),
        helper.make_node("Gather", ["shape", "zero"], ["batch"], axis=0),
        helper.make_node("Concat", ["batch", "minus_one"], ["target"], axis=0),
        helper.make_node("Reshape", ["x", "target"], ["flat"]),
        helper.make_node("MatMul", ["flat", "w2"], ["y"]),
    ]
    constants = [
        numpy_helper.from_array(np.array([0], dtype=np.int64), "zero"),
        numpy_helper.from_array(np.array([-1], dtype=np.int64), "minus_one"),
    ]
    path = _save(tmp_path, nodes, [1, 2, 3], constants)
    network, shape = _assert_matches_reference(path)
    assert shape == (2, 3)
    assert _kinds(network) == ["Flatten", "Linear"]
    torch.testing.assert_close(network[1].weight, torch.from_numpy(2 * weight))


def test_reshape_to_an_image_and_flatten_back(tmp_path):
    nodes = [
        helper.make_node("Reshape", ["x", "s"], ["image"]),
        helper.make_node("Conv", ["image", "W"], ["c"]),
        helper.make_node("Flatten", ["c"], ["y"], axis=1),
    ]
    constants = [
        numpy_helper.from_array(np.array([1, 1, 4, 4], dtype=np.int64), "s"),
        _tensor("W", _random(2, 1, 2, 2)),
    ]
    path = _save(tmp_path, nodes, [1, 16], constants)
    network, _ = _assert_matches_reference(path)
    assert _kinds(network) == ["Reshape", "Conv2d", "Flatten"]
    assert network[0].shape == (1, 4, 4)
    assert isinstance(network[0], Reshape)


@pytest.mark.parametrize("opset", [11, 15])
def test_squeeze_and_unsqueeze(tmp_path, opset):
    if opset < 13:
        nodes = [
            helper.make_node("Squeeze", ["x"], ["s"], axes=[2]),
            helper.make_node("MatMul", ["s", "W"], ["m"]),
            helper.make_node("Unsqueeze", ["m"], ["y"], axes=[-1]),
        ]
        constants = [_tensor("W", _random(4, 2))]
    else:
        nodes = [
            helper.make_node("Squeeze", ["x", "a"], ["s"]),
            helper.make_node("MatMul", ["s", "W"], ["m"]),
            helper.make_node("Unsqueeze", ["m", "b"], ["y"]),
        ]
        constants = [
            _tensor("W", _random(4, 2)),
            numpy_helper.from_array(np.array([2], dtype=np.int64), "a"),
            numpy_helper.from_array(np.array([-1], dtype=np.int64), "b"),
        ]
    path = _save(tmp_path, nodes, [1, 4, 1], constants, opset=opset)
    network, shape = _assert_matches_reference(path)
    assert shape == (4, 1)
    assert _kinds(network) == ["Flatten", "Linear", "Reshape", "Flatten"]


def test_loading_leaves_the_global_generator_alone(tmp_path):
    nodes = [helper.make_node("Conv", ["x", "W"], ["c"]), helper.make_node("Flatten", ["c"], ["f"]),
             helper.make_node("Gemm", ["f", "G"], ["y"])]  # fmt: skip
    path = _save(tmp_path, nodes, [1, 1, 3, 3], [_tensor("W", _random(2, 1, 2, 2)),
                                                 _tensor("G", _random(8, 2))])  # fmt: skip
    state = torch.get_rng_state()
    load_onnx(str(path))
    assert torch.equal(torch.get_rng_state(), state)


def test_float64_networks_stay_float64(tmp_path):
    node = helper.make_node("MatMul", ["x", "W"], ["y"])
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.DOUBLE, [1, 2])],
        [helper.make_tensor_value_info("y", TensorProto.DOUBLE, None)],
        initializer=[numpy_helper.from_array(np.eye(2), "W")],
    )
    path = tmp_path / "double.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)]), str(path))
    network, _ = load_onnx(str(path))
    assert network[0].weight.dtype == torch.float64


# ---------------------------------------------------------------------------------------------
# Errors name the node and its operator


def _error(tmp_path, nodes, input_shape=(1, 3), constants=(), **kwargs) -> str:
    path = _save(tmp_path, nodes, list(input_shape), constants, **kwargs)
    with pytest.raises(OnnxImportError) as raised:
        load_onnx(str(path))
    return str(raised.value)


def test_branching_graph_is_refused(tmp_path):
    nodes = [
        helper.make_node("Relu", ["x"], ["r"], name="relu"),
        helper.make_node("Add", ["x", "r"], ["y"], name="residual"),
    ]
    message = _error(tmp_path, nodes)
    assert "'residual' (Add)" in message and "chain" in message


def test_reading_one_tensor_twice_is_refused(tmp_path):
    nodes = [
        helper.make_node("Relu", ["x"], ["a"], name="first"),
        helper.make_node("Sigmoid", ["x"], ["b"], name="second"),
        helper.make_node("Concat", ["a", "b"], ["y"], name="join", axis=1),
    ]
    message = _error(tmp_path, nodes)
    assert "'second' (Sigmoid)" in message and "another node also reads" in message


def test_two_data_inputs_are_refused(tmp_path):
    inputs = [
        helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3]),
        helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, 3]),
    ]
    message = _error(tmp_path, [helper.make_node("Add", ["x", "z"], ["y"])], inputs=inputs)
    assert "one data input" in message and "'x'" in message and "'z'" in message


def test_weights_and_inputs_in_another_float_type_are_refused(tmp_path):
    weight = numpy_helper.from_array(_random(3, 2).astype(np.float16), "W")
    message = _error(tmp_path, [helper.make_node("MatMul", ["x", "W"], ["y"])], constants=[weight])
    assert "initializer 'W' is float16, the input is float32" in message
    half = [helper.make_tensor_value_info("x", TensorProto.FLOAT16, [1, 3])]
    message = _error(tmp_path, [helper.make_node("Relu", ["x"], ["y"])], inputs=half)
    assert "must hold float or double, got float16" in message


def test_unsupported_operator_is_refused(tmp_path):
    message = _error(tmp_path, [helper.make_node("Softmax", ["x"], ["y"], name="probs")])
    assert "'probs' (Softmax)" in message and "not supported" in message


def test_unnamed_node_is_described_by_its_output(tmp_path):
    message = _error(tmp_path, [helper.make_node("LeakyRelu", ["x"], ["y"])])
    assert "node #0 (LeakyRelu, output 'y')" in message


@pytest.mark.parametrize(
    ("node", "constants", "input_shape", "expected"),
    [
        (helper.make_node("Conv", ["x", "W"], ["y"], name="c", pads=[0, 0, 1, 1]),
         [_tensor("W", np.ones((1, 1, 2, 2)))], (1, 1, 4, 4), "asymmetric padding"),
        (helper.make_node("Conv", ["x", "W"], ["y"], name="c"),
         [_tensor("W", np.ones((1, 1, 2)))], (1, 1, 4), "2-D convolutions"),
        (helper.make_node("Div", ["c", "x"], ["y"], name="d"),
         [_tensor("c", 1.0)], (1, 3), "divides a constant by the data"),
        (helper.make_node("Div", ["x", "c"], ["y"], name="d"),
         [_tensor("c", [1.0, 0.0, 2.0])], (1, 3), "divides by zero"),
        (helper.make_node("Gemm", ["x", "B"], ["y"], name="g", transA=1),
         [_tensor("B", np.ones((3, 2)))], (1, 3), "transA"),
        (helper.make_node("MatMul", ["x", "W"], ["y"], name="m"),
         [_tensor("W", np.ones((4, 2)))], (1, 3), "[4]"),
        (helper.make_node("MatMul", ["W", "x"], ["y"], name="m"),
         [_tensor("W", np.ones((2, 1)))], (1, 3), "without a batch"),
        (helper.make_node("Add", ["x", "c"], ["y"], name="a"),
         [_tensor("c", np.ones((2, 3)))], (1, 3), "change the data's shape"),
        (helper.make_node("Relu", ["x"], ["y"], name="r", alpha=0.1),
         [], (1, 3), "attribute 'alpha'"),
        (helper.make_node("BatchNormalization", ["x", "s", "s", "s", "s"], ["y"], name="b",
                          training_mode=1),
         [_tensor("s", np.ones(3))], (1, 3), "training_mode"),
        (helper.make_node("Reshape", ["x", "s"], ["y"], name="r"),
         [numpy_helper.from_array(np.array([1, 4], dtype=np.int64), "s")], (1, 3),
         "cannot reshape"),
    ],
)  # fmt: skip
def test_unsupported_attributes_and_shapes_are_refused(
    tmp_path, node, constants, input_shape, expected
):
    message = _error(tmp_path, [node], input_shape, constants)
    assert f"({node.op_type})" in message and f"'{node.name}'" in message
    assert expected in message


def test_weight_that_depends_on_the_data_is_refused(tmp_path):
    nodes = [
        helper.make_node("Relu", ["x"], ["w"], name="r"),
        helper.make_node("MatMul", ["x", "w"], ["y"], name="m"),
    ]
    assert "(MatMul)" in _error(tmp_path, nodes)


def test_output_independent_of_the_input_is_refused(tmp_path):
    nodes = [helper.make_node("Constant", [], ["y"], value_float=1.0)]
    assert "does not depend on the input" in _error(tmp_path, nodes)


def test_a_file_that_is_not_onnx(tmp_path):
    path = tmp_path / "broken.onnx"
    path.write_bytes(b"\x00\xffnot a protobuf at all\x12")
    with pytest.raises(OnnxImportError, match="not an ONNX model"):
        load_onnx(str(path))
    with pytest.raises(OSError):
        load_onnx(str(tmp_path / "missing.onnx"))
    # An empty file parses as an empty model.
    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    with pytest.raises(OnnxImportError, match="empty.onnx: not an ONNX model"):
        load_onnx(str(empty))


def test_loaded_layers_are_the_verifiable_set(tmp_path):
    allowed = (nn.Linear, nn.Conv2d, nn.Flatten, Reshape, ElementwiseAffine, nn.ReLU,
               nn.Sigmoid, nn.Tanh)  # fmt: skip
    nodes = [
        helper.make_node("Sub", ["x", "a"], ["t"]),
        helper.make_node("Dropout", ["t"], ["u"]),
        helper.make_node("Identity", ["u"], ["v"]),
        helper.make_node("Tanh", ["v"], ["y"]),
    ]
    path = _save(tmp_path, nodes, [1, 3], [_tensor("a", _random(3))])
    network, _ = _assert_matches_reference(path)
    assert all(isinstance(layer, allowed) for layer in network)
