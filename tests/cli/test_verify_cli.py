"""``deepkern verify``: arguments, files, result files and tables, and end-to-end answers."""

from __future__ import annotations

import os
import sys
import types
from dataclasses import dataclass, field

import numpy as np
import pytest

from deepkern.cli import main
from deepkern.verify.results import read_result, read_results_csv
from tests.verify.shared_data import SHARED

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402


def _relu_network(path, scale=1.0):
    """y = relu(scale * x) on one input, written as ONNX."""
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "W"], ["h"]),
            helper.make_node("Relu", ["h"], ["y"]),
        ],
        "relu",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1])],
        initializer=[numpy_helper.from_array(np.array([[scale]], dtype=np.float32), "W")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    onnx.save(model, str(path))
    return str(path)


def _property(path, at_least, low=-1.0, high=1.0):
    """Counterexamples: x in [low, high] with y >= at_least."""
    path.write_text(
        "(declare-const X_0 Real)\n(declare-const Y_0 Real)\n"
        f"(assert (>= X_0 {low}))\n(assert (<= X_0 {high}))\n(assert (>= Y_0 {at_least}))\n"
    )
    return str(path)


# ---------------------------------------------------------------------------------------------
# Arguments and files (no verification runs)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([], "give NET.onnx and SPEC.vnnlib, or --instances"),
        (["only.onnx"], "give NET.onnx and SPEC.vnnlib"),
        (["a.onnx", "b.vnnlib", "--instances", "i.csv"], "give no NET.onnx"),
        (["--instances", "i.csv", "--result", "r.txt"], "give no NET.onnx"),
        (["a.onnx", "b.vnnlib", "--results", "r.csv"], "go with --instances"),
        (["a.onnx", "b.vnnlib", "--timeout", "0"], "--timeout must be a positive"),
        (["a.onnx", "b.vnnlib", "--timeout", "nan"], "--timeout must be a positive"),
        (["--instances", "i.csv", "--timeout-scale", "-2"], "--timeout-scale must be positive"),
        (["absent.onnx", "b.vnnlib"], "network absent.onnx: no such file"),
    ],
)
def test_argument_errors(argv, message, capsys):
    assert main(["verify", *argv]) == 2
    assert message in capsys.readouterr().err


def test_unknown_method_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as raised:
        main(["verify", "a.onnx", "b.vnnlib", "--method", "exact"])
    assert raised.value.code == 2
    assert "invalid choice: 'exact'" in capsys.readouterr().err


def test_missing_property_and_result_folder(tmp_path, capsys):
    network = _relu_network(tmp_path / "relu.onnx")
    assert main(["verify", network, str(tmp_path / "absent.vnnlib")]) == 2
    assert "property" in capsys.readouterr().err
    spec = _property(tmp_path / "p.vnnlib", 100)
    result = str(tmp_path / "no" / "such" / "result.txt")
    assert main(["verify", network, spec, "--result", result]) == 2
    assert "does not exist" in capsys.readouterr().err
    # A folder where a file belongs is refused before anything runs.
    assert main(["verify", network, spec, "--result", str(tmp_path)]) == 2
    assert "is a folder" in capsys.readouterr().err
    # The run's own inputs are never overwritten, and an empty name is not a file name.
    assert main(["verify", network, spec, "--result", spec]) == 2
    assert "is an input of the run" in capsys.readouterr().err
    assert main(["verify", network, spec, "--result", ""]) == 2
    assert "--result needs a file name" in capsys.readouterr().err


def test_instance_list_is_not_its_own_results_table(tmp_path, capsys):
    listing = tmp_path / "instances.csv"
    listing.write_text("a.onnx,b.vnnlib,5\n")
    assert main(["verify", "--instances", str(listing), "--results", str(listing)]) == 2
    assert "is an input of the run" in capsys.readouterr().err
    assert listing.read_text() == "a.onnx,b.vnnlib,5\n"


def test_a_property_that_is_not_text(tmp_path, capsys):
    network = _relu_network(tmp_path / "relu.onnx")
    spec = tmp_path / "binary.vnnlib"
    spec.write_bytes(b"(declare-const X_0 Real)\n\xff\xfe\x00")
    assert main(["verify", network, str(spec)]) == 2
    assert "binary.vnnlib: not a text file" in capsys.readouterr().err


def test_instance_list_that_does_not_exist(tmp_path, capsys):
    assert main(["verify", "--instances", str(tmp_path / "absent.csv")]) == 2
    assert "absent.csv" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# The command's plumbing, with a solver that answers from a table


@dataclass
class _Result:
    verdict: str
    counterexample: tuple | None
    seconds: float
    bound: float | None
    details: dict = field(default_factory=dict)


@pytest.fixture
def scripted_solver(monkeypatch):
    """Stands in for deepkern.verify.solver: answers 'sat' at the box's upper corner when the
    network reaches the property's threshold there, else 'unsat', and records each call."""
    calls = []

    def verify(network, spec, *, timeout, method="alpha", seed=0, input_shape=None):
        calls.append(
            {"spec": spec, "timeout": timeout, "method": method, "seed": seed, "shape": input_shape}
        )
        region = spec.regions[0]
        x = region.upper
        y = network(x.float().reshape(1, -1)).double()[0]
        disjunct = region.disjuncts[0]
        if bool((disjunct.coefficients @ y <= disjunct.bounds).all()):
            return _Result("sat", (x, y), 0.01, None)
        return _Result("unsat", None, 0.01, 0.25)

    module = types.ModuleType("deepkern.verify.solver")
    module.verify = verify
    monkeypatch.setitem(sys.modules, "deepkern.verify.solver", module)
    return calls


def test_one_instance_prints_and_writes_the_result(tmp_path, capsys, scripted_solver):
    network = _relu_network(tmp_path / "relu.onnx")
    spec = _property(tmp_path / "p.vnnlib", 0.5)
    result = tmp_path / "result.txt"
    argv = [network, spec, "--timeout", "7", "--method", "dual", "--seed", "3"]
    assert main(["verify", *argv, "--result", str(result)]) == 0

    out = capsys.readouterr().out
    assert out.startswith("sat (")
    assert "counterexample: x = [1]" in out
    verdict, (x, y) = read_result(str(result))
    assert verdict == "sat" and x.tolist() == [1.0] and y.tolist() == [1.0]
    (call,) = scripted_solver
    assert call["method"] == "dual" and call["seed"] == 3
    assert 0 < call["timeout"] <= 7
    assert call["spec"].inputs == 1 and call["spec"].outputs == 1 and call["shape"] == (1,)


def test_unsat_instance_prints_its_bound(tmp_path, capsys, scripted_solver):
    network = _relu_network(tmp_path / "relu.onnx")
    spec = _property(tmp_path / "p.vnnlib", 100)
    result = tmp_path / "result.txt"
    assert main(["verify", network, spec, "--result", str(result)]) == 0
    assert capsys.readouterr().out.startswith("unsat (")
    assert result.read_text() == "unsat\n"


def test_bad_files_name_what_is_wrong(tmp_path, capsys, scripted_solver):
    network = _relu_network(tmp_path / "relu.onnx")
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"\x08\x01\xff\xff garbage")
    spec = _property(tmp_path / "p.vnnlib", 1)
    assert main(["verify", str(broken), spec]) == 2
    assert "not an ONNX model" in capsys.readouterr().err

    two_inputs = tmp_path / "two.vnnlib"
    two_inputs.write_text("(declare-const X_0 Real)\n(declare-const X_1 Real)\n")
    assert main(["verify", network, str(two_inputs)]) == 2
    assert "two.vnnlib:2: X_1 is declared, but the network has 1 inputs" in (
        capsys.readouterr().err
    )


def test_instance_list_runs_each_line_and_reports_problems(tmp_path, capsys, scripted_solver):
    _relu_network(tmp_path / "relu.onnx")
    (tmp_path / "broken.onnx").write_bytes(b"\x08\x01\xff\xff garbage")
    (tmp_path / "specs").mkdir()
    _property(tmp_path / "specs" / "sat.vnnlib", 0.5)
    _property(tmp_path / "unsat.vnnlib", 100)
    listing = tmp_path / "instances.csv"
    listing.write_text(
        "relu.onnx,specs/sat.vnnlib,10\n"
        "nets/relu.onnx,specs/mnist/unsat.vnnlib,20\n"  # found beside the CSV
        "absent.onnx,unsat.vnnlib,5\n"
        "broken.onnx,unsat.vnnlib,5\n"
    )
    table = tmp_path / "results.csv"
    argv = ["--instances", str(listing), "--results", str(table), "--timeout-scale", "0.5"]
    assert main(["verify", *argv]) == 1

    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("[1/4] relu.onnx sat.vnnlib: sat (")
    assert lines[1].startswith("[2/4] relu.onnx unsat.vnnlib: unsat (")
    assert lines[2].startswith("[3/4] absent.onnx unsat.vnnlib: error (") and "missing" in lines[2]
    assert "not an ONNX model" in lines[3]
    assert lines[4] == "1 sat, 1 unsat, 2 error"

    rows = read_results_csv(str(table))
    assert [row.verdict for row in rows] == ["sat", "unsat", "error", "error"]
    assert rows[1].bound == 0.25 and rows[0].bound is None
    assert rows[2].note.startswith("missing file") and os.path.isabs(rows[0].onnx)
    # Listed 10 and 20 seconds, scaled by 0.5.
    assert scripted_solver[0]["timeout"] <= 5 and scripted_solver[1]["timeout"] <= 10


# ---------------------------------------------------------------------------------------------
# End to end, with the real solver


def _real_solver():
    try:
        from deepkern.verify import solver
    except ImportError:
        pytest.skip("deepkern.verify.solver is not available")
    return solver


@pytest.mark.parametrize("method", ["ibp", "crown", "alpha", "dual"])
def test_relu_on_the_unit_box_end_to_end(tmp_path, capsys, method):
    _real_solver()
    if method == "dual":
        pytest.importorskip("deepkern.verify.dual")
    network = _relu_network(tmp_path / "relu.onnx")
    result = tmp_path / "result.txt"

    # relu(x) <= 1 on [-1, 1]: y >= 100 has no counterexample.
    spec = _property(tmp_path / "unsat.vnnlib", 100)
    argv = ["verify", network, spec, "--method", method, "--timeout", "30"]
    assert main([*argv, "--result", str(result)]) == 0
    assert read_result(str(result)) == ("unsat", None)

    # y >= 0.5 holds for x in [0.5, 1].
    spec = _property(tmp_path / "sat.vnnlib", 0.5)
    argv = ["verify", network, spec, "--method", method, "--timeout", "30"]
    assert main([*argv, "--result", str(result)]) == 0
    verdict, (x, y) = read_result(str(result))
    assert verdict == "sat"
    assert -1.0 <= x.item() <= 1.0 and y.item() >= 0.5
    assert abs(y.item() - max(x.item(), 0.0)) < 1e-6
    capsys.readouterr()


def test_vnncomp_test_instances_end_to_end(tmp_path, capsys):
    _real_solver()
    shared = SHARED
    listing = os.path.join(shared, "test", "test_instances.csv")
    if not os.path.exists(listing):
        pytest.skip("shared verification data absent")
    table = tmp_path / "results.csv"
    # test_sat/test_unsat are listed but not copied: they are reported, the rest runs.
    assert main(["verify", "--instances", listing, "--results", str(table)]) == 1
    rows = {os.path.basename(row.onnx): row for row in read_results_csv(str(table))}
    # test_nano: relu(0.5 x) <= -1 is impossible; test_tiny and test_small: y >= 100 on [-1, 1]
    # is out of reach of their small weights.
    assert rows["test_nano.onnx"].verdict == "unsat"
    assert rows["test_tiny.onnx"].verdict == "unsat"
    assert rows["test_small.onnx"].verdict == "unsat"
    assert rows["test_sat.onnx"].verdict == "error"
    capsys.readouterr()


def test_acasxu_counterexample_holds_under_onnx_reference(tmp_path, capsys):
    # ACAS Xu network 1_9 violates property 4; the counterexample written to the result file
    # must lie in the box and break the property when onnx.reference runs the original file.
    _real_solver()
    from onnx.reference import ReferenceEvaluator

    from deepkern.verify.vnnlib import parse_vnnlib

    shared = SHARED
    network = os.path.join(shared, "acasxu", "ACASXU_run2a_1_9_batch_2000.onnx")
    prop = os.path.join(shared, "acasxu", "prop_4.vnnlib")
    if not (os.path.exists(network) and os.path.exists(prop)):
        pytest.skip("shared verification data absent")
    result = tmp_path / "result.txt"
    assert main(["verify", network, prop, "--timeout", "60", "--result", str(result)]) == 0
    verdict, (x, y) = read_result(str(result))
    assert verdict == "sat"

    x32 = x.numpy().astype(np.float32).reshape(1, 1, 1, 5)
    expected = ReferenceEvaluator(network).run(None, {"input": x32})[0].reshape(-1)
    np.testing.assert_allclose(y.numpy(), expected, rtol=1e-5, atol=1e-6)
    (region,) = parse_vnnlib(prop, 5, 5).regions
    assert bool((x >= region.lower).all()) and bool((x <= region.upper).all())
    (disjunct,) = region.disjuncts
    assert (
        disjunct.coefficients.numpy() @ expected.astype(np.float64) <= disjunct.bounds.numpy()
    ).all()
    capsys.readouterr()
