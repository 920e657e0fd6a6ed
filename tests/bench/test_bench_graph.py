"""The graph benchmark family end to end at tiny sizes."""

import json
import math

from deepkern import cli
from deepkern.bench import graph as graph_bench


def test_graph_benchmark_quick_runs_every_variant_and_writes_json(tmp_path):
    path = tmp_path / "graph.json"
    assert cli.main(["bench", "graph", "--quick", "--json", str(path)]) == 0

    payload = json.loads(path.read_text())
    assert payload["family"] == "graph"
    rows = payload["rows"]
    # Three cases (one of them gathering from node features), three reductions, two modes.
    assert len(rows) == 3 * 3 * 2
    assert sum(row["case"].startswith("gather") for row in rows) == 3 * 2
    assert {row["reduce"] for row in rows} == {"sum", "mean", "max"}
    for row in rows:
        assert "error" not in row, row
        assert math.isfinite(row["ours_s"]) and row["ours_s"] > 0
        assert row["scatter_reduce_s"] > 0 and row["torch.segment_reduce_s"] > 0
        # index_add has no max; torch_scatter is optional.
        assert (row.get("index_add_s") is None) == (row["reduce"] == "max")
        assert (row.get("torch_scatter_s") is not None) == graph_bench.torch_scatter_available()
        assert row["best_ratio"] > 0 and row["best_other"] in graph_bench.VARIANTS


def test_a_disagreeing_variant_fails_its_rows(monkeypatch, tmp_path):
    variants = graph_bench._variants

    def shifted(values, rowptr, reduce):
        found = variants(values, rowptr, reduce)
        plain = found["scatter_reduce"]
        found["scatter_reduce"] = lambda v: plain(v) + 0.5
        return found

    monkeypatch.setattr(graph_bench, "_variants", shifted)
    path = tmp_path / "graph.json"
    argv = ["bench", "graph", "--quick", "--reductions", "sum", "--json", str(path)]
    assert cli.main(argv) == 1
    rows = json.loads(path.read_text())["rows"]
    assert rows and all(row["error"].startswith("AgreementError: scatter_reduce") for row in rows)
