"""The benchmark framework: the momentum family end to end at tiny sizes, and the helpers."""

import json
import math
import time

import pytest
import torch

from deepkern import bench
from deepkern.bench import common
from deepkern.bench import momentum as momentum_bench


def test_cli_momentum_quick_writes_every_variant(tmp_path):
    from deepkern import cli

    path = tmp_path / "b.json"
    assert cli.main(["bench", "momentum", "--quick", "--json", str(path)]) == 0

    payload = json.loads(path.read_text())
    assert payload["family"] == "momentum"
    env = payload["env"]
    assert env["torch_threads"] >= 1
    assert "loadavg_start" in env and "loadavg_end" in env

    expected = set(momentum_bench.VARIANTS)
    if not momentum_bench.momentumnet_available():
        expected.discard("momentumnet")
    rows = payload["rows"]
    cases = {(row["net"], row["depth"]) for row in rows}
    assert cases == {(net, depth) for net in ("mlp", "conv") for depth in (4, 8)}
    for net, depth in cases:
        variants = {r["variant"] for r in rows if r["net"] == net and r["depth"] == depth}
        assert variants == expected

    for row in rows:
        assert "error" not in row, row
        assert math.isfinite(row["time_s"]) and row["time_s"] > 0
        assert row["peak_bytes"] >= 0 and row["saved_bytes"] >= 0
        assert row["param_bytes"] > 0
        if row["variant"] in momentum_bench.MUST_AGREE:
            assert max(row["grad_error"], row["out_error"]) <= row["tolerance"]
            assert row["grad_error"] < 1e-4
        if row["variant"] == "autograd":
            assert row["time_ratio"] == 1.0 and row["peak_ratio"] == 1.0

    summary = {(s["net"], s["variant"]) for s in payload["summary"]}
    assert summary == {(net, variant) for net in ("mlp", "conv") for variant in expected}


def test_disagreeing_variant_fails_its_row(monkeypatch, capsys, tmp_path):
    build = momentum_bench.build_variant

    class Shifted(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, x):
            return self.model(x) * 1.01

    def shifted(variant, functions, gamma):
        model = build(variant, functions, gamma)
        return Shifted(model) if variant == "checkpoint" else model

    monkeypatch.setattr(momentum_bench, "build_variant", shifted)
    path = tmp_path / "b.json"
    argv = ["momentum", "--quick", "--nets", "mlp", "--depths", "2", "--json", str(path)]
    assert bench.main([*argv, "--variants", "checkpoint", "exact"]) == 1
    assert "AgreementError: differs from plain autograd" in capsys.readouterr().out

    rows = {row["variant"]: row for row in json.loads(path.read_text())["rows"]}
    assert rows["checkpoint"]["error"].startswith("AgreementError")
    assert "time_s" not in rows["checkpoint"]
    assert "error" not in rows["exact"] and rows["exact"]["time_s"] > 0


def test_time_call_reports_a_median():
    x = torch.randn(64)
    timing = common.time_call(lambda: x.sum(), min_run_time=0.01)
    assert 0 < timing.median < 0.1
    assert timing.calls >= 1 and timing.iqr >= 0


def test_time_calls_interleaves_and_keeps_ratios():
    visits = []

    def napper(name, seconds):
        def nap():
            visits.append(name)
            time.sleep(seconds)

        return nap

    timings = common.time_calls(
        {"short": napper("short", 0.002), "long": napper("long", 0.006)},
        min_run_time=0.06,
        rounds=3,
    )
    # Sleeping is little disturbed by load, so the ratio holds loosely even on a busy machine.
    assert 2.0 < timings["long"].median / timings["short"].median < 4.5
    # Both are visited in every round: "short" comes back after "long" has run.
    first_long = visits.index("long")
    assert "short" in visits[first_long:]
    assert timings["short"].calls >= 3 and timings["long"].calls >= 3


def test_comparison_table_and_json(tmp_path):
    rows = [
        common.comparison_row("small", 0.002, 0.004, 0.001),
        common.comparison_row("large", 1.5, 3.0, None),
    ]
    assert rows[0]["reference_ratio"] == pytest.approx(2.0)
    assert rows[0]["outside_ratio"] == pytest.approx(0.5)
    assert rows[1]["outside_ratio"] is None

    text = common.format_table(rows, common.comparison_columns("other"))
    lines = text.splitlines()
    assert lines[0].split() == ["case", "ours", "reference", "ref/ours", "other", "other/ours"]
    assert set(lines[1].replace(" ", "")) == {"-"}
    assert lines[2].split() == ["small", "2", "ms", "4", "ms", "2.00x", "1", "ms", "0.50x"]
    assert lines[3].split() == ["large", "1.5", "s", "3", "s", "2.00x", "-", "-"]
    # Every line has its columns at the same offsets.
    assert len({len(line) for line in lines[:3]}) == 1

    report = common.Report("demo", common.comparison_columns(), rows, env={"torch": "x"})
    report.rows.append({"case": "diverged", "ours_s": float("nan")})
    path = tmp_path / "out" / "r.json"
    common.write_json(path, report)
    payload = json.loads(path.read_text())
    assert payload["rows"][2]["ours_s"] is None
    assert payload["rows"][0]["ours_s"] == 0.002
    assert "loadavg at start" in common.format_report(report)


def test_ratio_handles_missing_and_non_finite():
    assert common.ratio(3.0, 2.0) == 1.5
    assert common.ratio(None, 2.0) is None
    assert common.ratio(1.0, 0.0) is None
    assert common.ratio(math.inf, 1.0) is None


def test_baseline_first_keeps_the_reference(tmp_path):
    # The baseline zeroes gradient buffers in place; the reference must not be among them.
    path = tmp_path / "b.json"
    argv = ["momentum", "--quick", "--nets", "mlp", "--depths", "3", "--json", str(path)]
    assert bench.main([*argv, "--variants", "autograd", "exact"]) == 0
    rows = {row["variant"]: row for row in json.loads(path.read_text())["rows"]}
    assert rows["exact"]["grad_error"] < 1e-5


def test_sde_benchmark_runs_and_writes_json(tmp_path):
    import json

    from deepkern import cli

    path = tmp_path / "sde.json"
    code = cli.main(["bench", "sde", "--quick", "--no-torchsde", "--json", str(path)])
    assert code == 0
    payload = json.loads(path.read_text())
    assert payload["family"] == "sde" and len(payload["rows"]) == 3
    for row in payload["rows"]:
        assert row["ours_s"] > 0 and row["reference_s"] > 0 and row["peak_bytes"] > 0
    assert payload["summary"][0]["kernel_normals_per_s"] > 0
