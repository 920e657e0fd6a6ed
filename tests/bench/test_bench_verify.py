"""The verify benchmark family end to end at tiny sizes."""

import json
import math

from deepkern import cli
from deepkern.bench import verify as verify_bench


def test_verify_benchmark_quick_times_every_method_and_writes_json(tmp_path):
    path = tmp_path / "verify.json"
    assert cli.main(["bench", "verify", "--quick", "--json", str(path)]) == 0

    payload = json.loads(path.read_text())
    assert payload["family"] == "verify"
    rows = payload["rows"]
    cases = {(row["case"], row["method"]) for row in rows}
    assert cases == {
        (f"{net} x{boxes}", method)
        for net in ("acasxu", "mnist")
        for boxes in (1, 4)
        for method in verify_bench.METHODS
    }
    for row in rows:
        assert "error" not in row, row
        assert math.isfinite(row["ours_s"]) and row["ours_s"] > 0
        assert row["reference_ratio"] > 0 and math.isfinite(row["bound"])
        assert row["specs"] == (4 if row["case"].startswith("acasxu") else 9)
        assert (row.get("outside_s") is not None) == (
            verify_bench.auto_lirpa_available() and row["method"] != "dual"
        )
    # The tighter methods never give a lower mean bound than IBP on the same boxes.
    for case in {row["case"] for row in rows}:
        bound = {row["method"]: row["bound"] for row in rows if row["case"] == case}
        assert bound["crown"] >= bound["ibp"] - 1e-9
        assert bound["alpha"] >= bound["crown"] - 1e-9 and bound["dual"] >= bound["crown"] - 1e-9


def test_ops_that_disagree_with_their_reference_fail_the_rows(monkeypatch, tmp_path):
    from deepkern.ops import verify as verify_ops

    plain = verify_ops.interval_linear

    def shifted(lower, upper, weight, bias):
        lo, hi = plain(lower, upper, weight, bias)
        return lo - 0.5, hi + 0.5

    monkeypatch.setattr(verify_ops, "interval_linear", shifted)
    path = tmp_path / "verify.json"
    argv = ["bench", "verify", "--quick", "--networks", "acasxu", "--methods", "ibp"]
    assert cli.main([*argv, "--boxes", "2", "--json", str(path)]) == 1
    rows = json.loads(path.read_text())["rows"]
    assert len(rows) == 1 and rows[0]["error"].startswith("AgreementError")


def test_bad_options_are_refused(capsys):
    assert cli.main(["bench", "verify", "--quick", "--dual-steps", "-1"]) != 0
    assert "--dual-steps must be 0 or positive, got -1" in capsys.readouterr().err
    assert cli.main(["bench", "verify", "--quick", "--boxes", "0"]) != 0
    assert "--boxes must be positive" in capsys.readouterr().err
