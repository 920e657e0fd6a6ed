"""The verify_ops benchmark family end to end at tiny sizes."""

import json
import math

from deepkern import cli
from deepkern.bench import verify_ops
from deepkern.ops import verify


def test_verify_ops_benchmark_quick_runs_every_case_and_writes_json(tmp_path):
    path = tmp_path / "verify_ops.json"
    assert (
        cli.main(["bench", "verify_ops", "--quick", "--neurons", "300", "--json", str(path)]) == 0
    )

    rows = json.loads(path.read_text())["rows"]
    # Three activations for each elementwise op, one dense layer.
    assert [row["case"].split()[0] for row in rows] == ["relaxation"] * 3 + ["dual"] * 3 + [
        "interval"
    ]
    for row in rows:
        assert "error" not in row, row
        assert math.isfinite(row["ours_s"]) and row["ours_s"] > 0 and row["reference_s"] > 0
        assert row["reference_ratio"] > 0 and row["ns_per_item"] > 0


def test_a_disagreeing_kernel_fails_its_row(monkeypatch, tmp_path):
    def shifted(lower, upper, linear, act, kind):
        value, argmax = verify.dual_activation_max(lower, upper, linear, act, kind)
        return value + 0.5, argmax

    monkeypatch.setattr(verify_ops.verify, "reference_dual_activation_max", shifted)
    assert cli.main(["bench", "verify_ops", "--quick", "--neurons", "50", "--ops", "dual"]) == 1
