"""parse_vnnlib on the benchmark properties and on small files written here."""

from __future__ import annotations

import math
import os

import pytest
import torch

from deepkern.verify.solver import verify
from deepkern.verify.vnnlib import VnnlibError, parse_vnnlib
from tests.verify.shared_data import SHARED, needs_data


def _shared(name):
    path = os.path.join(SHARED, name)
    if not os.path.exists(path):
        pytest.skip(f"{name} absent")
    return path


def _tensor(values):
    return torch.tensor(values, dtype=torch.float64)


# ---------------------------------------------------------------------------------------------
# The benchmark properties


@needs_data
def test_acasxu_prop_1_box_and_output_row():
    spec = parse_vnnlib(_shared("acasxu/prop_1.vnnlib"), 5, 5)
    assert (spec.inputs, spec.outputs) == (5, 5) and len(spec.regions) == 1
    region = spec.regions[0]
    torch.testing.assert_close(region.lower, _tensor([0.6, -0.5, -0.5, 0.45, -0.5]))
    torch.testing.assert_close(region.upper, _tensor([0.679857769, 0.5, 0.5, 0.5, -0.45]))
    (disjunct,) = region.disjuncts
    # Unsafe iff Y_0 >= 3.991125645861615, that is -Y_0 <= -3.991125645861615.
    torch.testing.assert_close(disjunct.coefficients, _tensor([[-1.0, 0, 0, 0, 0]]))
    torch.testing.assert_close(disjunct.bounds, _tensor([-3.991125645861615]))


@needs_data
def test_acasxu_prop_2_to_4_output_rows():
    prop_2 = parse_vnnlib(_shared("acasxu/prop_2.vnnlib"), 5, 5).regions[0].disjuncts[0]
    expected = torch.zeros(4, 5, dtype=torch.float64)
    expected[:, 0] = -1.0
    expected[range(4), range(1, 5)] = 1.0
    # Y_i <= Y_0 for every i: Y_0 is maximal.
    torch.testing.assert_close(prop_2.coefficients, expected)
    torch.testing.assert_close(prop_2.bounds, torch.zeros(4, dtype=torch.float64))
    for name in ("prop_3", "prop_4"):
        disjunct = parse_vnnlib(_shared(f"acasxu/{name}.vnnlib"), 5, 5).regions[0].disjuncts[0]
        torch.testing.assert_close(disjunct.coefficients, -expected)


@needs_data
@pytest.mark.parametrize(
    ("name", "label", "eps"),
    [
        ("mnistfc/prop_0_0.03.vnnlib", 8, 0.03),
        ("mnistfc/prop_0_0.05.vnnlib", 8, 0.05),
        ("mnistfc/prop_7_0.03.vnnlib", 9, 0.03),
        ("eran/mnist_spec_idx_56_eps_0.01200.vnnlib", 4, 0.012),
    ],
)
def test_mnist_boxes_and_nine_disjuncts(name, label, eps):
    spec = parse_vnnlib(_shared(name), 784, 10)
    (region,) = spec.regions
    assert region.lower.shape == region.upper.shape == (784,)
    assert region.lower.dtype == torch.float64
    assert bool((region.lower >= 0).all()) and bool((region.upper <= 1).all())
    width = region.upper - region.lower
    assert bool((width <= 2 * eps + 1e-6).all())
    # Pixels away from 0 and 1 get the whole 2 eps; the others are clipped.
    assert abs(width.max().item() - 2 * eps) < 1e-6
    assert len(region.disjuncts) == 9
    others = []
    for disjunct in region.disjuncts:
        # One row each: Y_label - Y_k <= 0, for every other class k.
        assert disjunct.coefficients.shape == (1, 10)
        assert disjunct.coefficients[0, label] == 1.0
        assert disjunct.bounds.tolist() == [0.0]
        (other,) = (disjunct.coefficients[0] == -1.0).nonzero()[0].tolist()
        others.append(other)
    assert sorted(others) == [k for k in range(10) if k != label]


@needs_data
@pytest.mark.parametrize("name", ["test_nano", "test_tiny", "test_small"])
def test_vnncomp_test_properties(name):
    region = parse_vnnlib(_shared(f"test/{name}.vnnlib"), 1, 1).regions[0]
    torch.testing.assert_close(region.lower, _tensor([-1.0]))
    torch.testing.assert_close(region.upper, _tensor([1.0]))
    (disjunct,) = region.disjuncts
    if name == "test_nano":  # Y_0 <= -1
        expected = (_tensor([[1.0]]), _tensor([-1.0]))
    else:  # Y_0 >= 100
        expected = (_tensor([[-1.0]]), _tensor([-100.0]))
    torch.testing.assert_close((disjunct.coefficients, disjunct.bounds), expected)


# ---------------------------------------------------------------------------------------------
# Small files


DECLARE_2_2 = """
(declare-const X_0 Real)
(declare-const X_1 Real) ; a comment after a command
(declare-const Y_0 Real)
(declare-const Y_1 Real)
"""


def _parse(tmp_path, body, inputs=2, outputs=2, header=DECLARE_2_2):
    path = tmp_path / "spec.vnnlib"
    path.write_text(header + body)
    return parse_vnnlib(str(path), inputs, outputs)


def _error(tmp_path, body, line, match, **kwargs):
    with pytest.raises(VnnlibError, match=match) as raised:
        _parse(tmp_path, body, **kwargs)
    assert f"spec.vnnlib:{line}:" in str(raised.value)


BOX = "(assert (<= X_0 1))\n(assert (>= X_0 -1))\n(assert (<= X_1 2.5e-1))\n(assert (>= X_1 0))\n"


def test_linear_output_terms(tmp_path):
    body = BOX + "(assert (<= (+ Y_0 (* 2 Y_1) -3) (- Y_1 0.5)))\n(assert (> (* -1 Y_0) 4))\n"
    (region,) = _parse(tmp_path, body).regions
    torch.testing.assert_close(region.upper, _tensor([1.0, 0.25]))
    (disjunct,) = region.disjuncts
    # Y_0 + 2 Y_1 - 3 - Y_1 + 0.5 <= 0 and 4 + Y_0 <= 0 (the strict > one double step inside).
    torch.testing.assert_close(disjunct.coefficients, _tensor([[1.0, 1.0], [1.0, 0.0]]))
    torch.testing.assert_close(disjunct.bounds, _tensor([2.5, -4.0]))


def test_strict_comparisons_exclude_their_bound(tmp_path):
    body = "(assert (> X_0 0))\n(assert (< X_0 1))\n(assert (<= 0 X_1 1))\n(assert (< Y_0 Y_1))\n"
    (region,) = _parse(tmp_path, body).regions
    assert region.lower[0].item() > 0 and region.upper[0].item() == math.nextafter(1.0, 0.0)
    assert region.lower[1].item() == 0 and region.upper[1].item() == 1
    (disjunct,) = region.disjuncts
    # Y_0 - Y_1 < 0 is Y_0 - Y_1 <= the largest double below zero.
    torch.testing.assert_close(disjunct.coefficients, _tensor([[1.0, -1.0]]))
    assert disjunct.bounds.item() == -math.ulp(0.0)


def test_a_point_on_a_strict_boundary_is_no_counterexample(tmp_path):
    # y = x on [0, 1]: no input gives y < 0, though x = 0 gives y <= 0.
    path = tmp_path / "strict.vnnlib"
    path.write_text(
        "(declare-const X_0 Real)\n(declare-const Y_0 Real)\n"
        "(assert (>= X_0 0))\n(assert (<= X_0 1))\n(assert (< Y_0 0))\n"
    )
    network = torch.nn.Linear(1, 1)
    with torch.no_grad():
        network.weight.fill_(1.0)
        network.bias.zero_()
    result = verify(torch.nn.Sequential(network), parse_vnnlib(str(path), 1, 1), timeout=10)
    assert result.verdict != "sat", result.counterexample


@pytest.mark.parametrize("outputs_condition", ["", "(assert (<= 0 1))\n"])
def test_a_box_without_output_conditions_is_all_counterexamples(tmp_path, outputs_condition):
    path = tmp_path / "box.vnnlib"
    path.write_text(
        "(declare-const X_0 Real)\n(declare-const Y_0 Real)\n"
        "(assert (>= X_0 0))\n(assert (<= X_0 1))\n" + outputs_condition
    )
    spec = parse_vnnlib(str(path), 1, 1)
    (disjunct,) = spec.regions[0].disjuncts
    torch.testing.assert_close(disjunct.coefficients, _tensor([[0.0]]))
    network = torch.nn.Sequential(torch.nn.Linear(1, 1))
    result = verify(network, spec, timeout=10)
    assert result.verdict == "sat"
    assert 0 <= result.counterexample[0].item() <= 1


def test_equality_chains_and_scaled_inputs(tmp_path):
    body = (
        "(assert (<= -1 X_0 1))\n(assert (<= (* 3 X_1) 1))\n(assert (>= (* 2 X_1) -1))\n"
        "(assert (= Y_0 (/ Y_1 4)))\n"
    )
    (region,) = _parse(tmp_path, body).regions
    torch.testing.assert_close(region.lower, _tensor([-1.0, -0.5]))
    # 1/3 is not a double: the bound is rounded outward, never inward.
    assert region.upper[1].item() >= 1 / 3 and region.upper[1].item() - 1 / 3 < 1e-15
    (disjunct,) = region.disjuncts
    torch.testing.assert_close(disjunct.coefficients, _tensor([[1.0, -0.25], [-1.0, 0.25]]))


def test_disjunction_over_input_boxes_gives_regions(tmp_path):
    body = """
(assert (or
    (and (>= X_0 0) (<= X_0 1) (>= X_1 0) (<= X_1 1) (<= Y_0 Y_1))
    (and (>= X_0 0) (<= X_0 1) (>= X_1 0) (<= X_1 1) (<= Y_1 -2))
    (and (>= X_0 2) (<= X_0 3) (>= X_1 0) (<= X_1 1) (>= Y_0 5))
))
"""
    spec = _parse(tmp_path, body)
    assert len(spec.regions) == 2
    first, second = spec.regions
    assert len(first.disjuncts) == 2 and len(second.disjuncts) == 1
    torch.testing.assert_close(second.lower, _tensor([2.0, 0.0]))
    torch.testing.assert_close(second.disjuncts[0].coefficients, _tensor([[-1.0, 0.0]]))
    torch.testing.assert_close(second.disjuncts[0].bounds, _tensor([-5.0]))


def test_and_of_ors_multiplies_out(tmp_path):
    body = BOX + "(assert (and (or (<= Y_0 0) (<= Y_1 0)) (or (>= Y_0 1) (>= Y_1 1))))\n"
    (region,) = _parse(tmp_path, body).regions
    assert len(region.disjuncts) == 4
    assert all(d.coefficients.shape == (2, 2) for d in region.disjuncts)


def test_no_output_constraint_and_constant_atoms(tmp_path):
    (region,) = _parse(tmp_path, BOX + "(assert (<= 1 2))\n").regions
    (disjunct,) = region.disjuncts
    # Nothing asked of the outputs: the one row 0 y <= 0, met everywhere.
    torch.testing.assert_close(
        (disjunct.coefficients, disjunct.bounds), (_tensor([[0.0, 0.0]]), _tensor([0.0]))
    )
    # A false constant comparison removes its case.
    body = BOX + "(assert (or (and (<= 2 1) (<= Y_0 0)) (<= Y_1 0)))\n"
    (region,) = _parse(tmp_path, body).regions
    assert len(region.disjuncts) == 1
    torch.testing.assert_close(region.disjuncts[0].coefficients, _tensor([[0.0, 1.0]]))


def test_repeated_bounds_intersect_and_empty_cases_drop(tmp_path):
    body = BOX + "(assert (<= X_0 0.5))\n(assert (or (>= X_1 5) (>= Y_0 1)))\n"
    (region,) = _parse(tmp_path, body).regions
    assert region.upper[0].item() == 0.5
    assert len(region.disjuncts) == 1  # X_1 >= 5 leaves that case's box empty
    _error(tmp_path, BOX + "(assert (>= X_1 5))\n", 10, "every input region")


@pytest.mark.parametrize(
    ("body", "line", "match"),
    [
        ("(assert (<= X_0 1))\n(assert (>= X_0 0))\n(assert (<= X_1 1))\n", 6, "X_1 has no lower"),
        (BOX + "(assert (<= X_0 (+ Y_0 1)))\n", 10, "mixing inputs and outputs"),
        (BOX + "(assert (<= (+ X_0 X_1) 1))\n", 10, "several inputs"),
        (BOX + "(assert (<= (* Y_0 Y_1) 1))\n", 10, "not linear"),
        (BOX + "(assert (<= Y_2 1))\n", 10, "'Y_2' is not a declared"),
        (BOX + "(assert (not (<= Y_0 1)))\n", 10, "unsupported operator 'not'"),
        (BOX + "(assert (<= Y_0 1)\n", 10, "never closed"),
        (BOX + "(assert (<= Y_0 1)))\n", 10, "without a matching"),
        (BOX + "(assert (<= Y_0 1) (<= Y_1 1))\n", 10, "exactly one formula"),
        (BOX + "(assert (<= Y_0))\n", 10, "at least two terms"),
        (BOX + "(assert (<= Y_0 abc))\n", 10, "'abc' is not a declared"),
        (BOX + "(assert (<= (/ Y_0 0) 1))\n", 10, "non-zero constant"),
        (BOX + "(push 1)\n", 10, "unsupported command 'push'"),
        (BOX + "(declare-const Y_0 Real)\n", 10, "declared twice"),
        (BOX + "(declare-const Z Real)\n", 10, "X_<i> or Y_<j>"),
        (BOX + "(declare-const X_7 Real)\n", 10, "network has 2 inputs"),
        (BOX + "(declare-const Y_9 Int)\n", 10, "must be declared Real"),
        (BOX + "(assert (<= Y_0 1))\n(assert)\n", 11, "exactly one formula"),
    ],
)
def test_malformed_files_name_the_line(tmp_path, body, line, match):
    _error(tmp_path, body, line, match)


def test_declarations_must_match_the_network(tmp_path):
    _error(tmp_path, BOX, 9, "declares 2 X_ variables, the network has 3", inputs=3)
    header = "(declare-const X_0 Real)\n(declare-const X_1 Real)\n(declare-const Y_0 Real)\n"
    _error(tmp_path, BOX, 7, "declares 1 Y_ variables", header=header)


def test_missing_file_and_bad_counts(tmp_path):
    with pytest.raises(OSError):
        parse_vnnlib(str(tmp_path / "absent.vnnlib"), 1, 1)
    with pytest.raises(ValueError, match="positive"):
        parse_vnnlib(str(tmp_path / "absent.vnnlib"), 0, 1)
