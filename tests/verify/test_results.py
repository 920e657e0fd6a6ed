"""VNN-COMP result files, instance lists and result tables, written and read back."""

from __future__ import annotations

import pytest
import torch

from deepkern.verify.results import (
    InstanceResult,
    ResultFormatError,
    format_result,
    read_instances,
    read_result,
    read_results_csv,
    write_result,
    write_results_csv,
)


def test_sat_result_round_trips_every_bit(tmp_path):
    x = torch.tensor([0.1, -2.0, 1e-300, 3.0], dtype=torch.float64)
    y = torch.tensor([1 / 3, -7.25], dtype=torch.float32)
    path = tmp_path / "result.txt"
    write_result(str(path), "sat", (x, y))
    text = path.read_text()
    assert text.startswith("sat\n((X_0 0.1)\n (X_1 -2.0)\n")
    assert text.rstrip().endswith("(Y_1 -7.25))")
    verdict, (x_read, y_read) = read_result(str(path))
    assert verdict == "sat"
    assert torch.equal(x_read, x) and torch.equal(y_read, y.double())


@pytest.mark.parametrize("verdict", ["unsat", "timeout", "unknown", "error"])
def test_other_verdicts_are_one_line(tmp_path, verdict):
    path = tmp_path / "result.txt"
    write_result(str(path), verdict)
    assert path.read_text() == verdict + "\n"
    assert read_result(str(path)) == (verdict, None)


def test_vnncomp_2021_words_and_loose_layout_are_read(tmp_path):
    path = tmp_path / "old.txt"
    path.write_text("\nviolated\n(\n(X_0 1)\n(Y_0 -1e-3)\n)\n")
    verdict, (x, y) = read_result(str(path))
    assert verdict == "sat" and x.tolist() == [1.0] and y.tolist() == [-0.001]
    path.write_text("holds\n")
    assert read_result(str(path)) == ("unsat", None)


def test_format_result_refuses_inconsistent_input():
    with pytest.raises(ValueError, match="verdict must be one of"):
        format_result("proved")
    with pytest.raises(ValueError, match="only with it"):
        format_result("sat")
    with pytest.raises(ValueError, match="only with it"):
        format_result("unsat", (torch.zeros(1), torch.zeros(1)))
    with pytest.raises(ValueError, match="finite"):
        format_result("sat", (torch.tensor([float("nan")]), torch.zeros(1)))


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("", "empty"),
        ("maybe\n", ":1: unknown verdict"),
        ("unsat\n((X_0 1))\n", ":2: unexpected text"),
        ("sat\n", "expected one list"),
        ("sat\n((X_0 1)\n (Y_0))\n", ":3: expected \\(NAME VALUE\\)"),
        ("sat\n((X_0 1)\n (Z_0 1))\n", ":3: 'Z_0' is not"),
        ("sat\n((X_0 one)\n (Y_0 1))\n", ":2: 'one' is not a number"),
        ("sat\n((X_1 1)\n (Y_0 1))\n", "numbered 0, 1, 2"),
        ("sat\n((X_0 1)\n (X_0 2)\n (Y_0 1))\n", ":3: X_0 2 is not allowed"),
        ("sat\n((X_0 1)\n (Y_0 1)\n", "never closed"),
    ],
)
def test_malformed_result_files(tmp_path, text, match):
    path = tmp_path / "result.txt"
    path.write_text(text)
    with pytest.raises(ResultFormatError, match=match):
        read_result(str(path))


def test_instance_list_paths_and_missing_files(tmp_path):
    (tmp_path / "net.onnx").write_bytes(b"")
    (tmp_path / "specs").mkdir()
    (tmp_path / "specs" / "a.vnnlib").write_text("")
    (tmp_path / "b.vnnlib").write_text("")
    csv_path = tmp_path / "instances.csv"
    csv_path.write_text(
        "net.onnx,specs/a.vnnlib,60\n"
        "\n"
        "nets/net.onnx, specs/mnist/b.vnnlib ,12.5\n"  # sub-folders that are not there
        "absent.onnx,specs/a.vnnlib,1\n"
    )
    first, second, third = read_instances(str(csv_path))
    assert first.onnx == str(tmp_path / "net.onnx")
    assert first.vnnlib == str(tmp_path / "specs" / "a.vnnlib")
    assert (first.timeout, first.line, first.problem) == (60.0, 1, None)
    assert second.onnx == str(tmp_path / "net.onnx")
    assert second.vnnlib == str(tmp_path / "b.vnnlib")
    assert (second.timeout, second.line, second.problem) == (12.5, 3, None)
    assert third.problem == f"missing file {tmp_path / 'absent.onnx'}"


@pytest.mark.parametrize(
    ("line", "match"),
    [("a.onnx,b.vnnlib\n", "got 2 fields"), ("a.onnx,b.vnnlib,-1\n", "positive number")],
)
def test_malformed_instance_lists(tmp_path, line, match):
    path = tmp_path / "instances.csv"
    path.write_text("a.onnx,b.vnnlib,5\n" + line)
    with pytest.raises(ResultFormatError, match=f"instances.csv:2: .*{match}"):
        read_instances(str(path))


@pytest.mark.parametrize("content", [b"\x00\x01binary,,\n", b"\xff\xfe\xfa,a,1\n"])
def test_an_instance_list_that_is_not_text(tmp_path, content):
    path = tmp_path / "instances.csv"
    path.write_bytes(content)
    with pytest.raises(ResultFormatError, match="instances.csv: not a text CSV"):
        read_instances(str(path))


def test_result_table_round_trips(tmp_path):
    rows = [
        InstanceResult("n.onnx", "p.vnnlib", "unsat", 1.23456, 0.5),
        InstanceResult("n,2.onnx", "q.vnnlib", "error", 0.0, None, 'missing "file", really'),
    ]
    path = tmp_path / "results.csv"
    write_results_csv(str(path), rows)
    assert path.read_text().splitlines()[0] == "onnx,vnnlib,verdict,seconds,bound,note"
    read = read_results_csv(str(path))
    assert read[0] == InstanceResult("n.onnx", "p.vnnlib", "unsat", 1.235, 0.5)
    assert read[1] == rows[1]
    with pytest.raises(ValueError, match="verdict"):
        write_results_csv(str(path), [InstanceResult("a", "b", "done", 1.0)])
