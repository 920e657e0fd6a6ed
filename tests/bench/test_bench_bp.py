"""The bp benchmark family end to end at tiny sizes, and its random graphs."""

import json
import math

import torch

from deepkern.bench import bp as bp_bench


def test_cli_bp_quick_writes_every_case(tmp_path):
    from deepkern import cli

    path = tmp_path / "b.json"
    assert cli.main(["bench", "bp", "--quick", "--json", str(path)]) == 0
    payload = json.loads(path.read_text())
    assert payload["family"] == "bp"
    rows = payload["rows"]
    assert [row["case"] for row in rows] == [
        "40 x grid 9 sum",
        "20 x grid 16 max",
        "20 x random 12 sum",
    ]
    for row in rows:
        assert "error" not in row, row
        assert math.isfinite(row["ours_s"]) and row["ours_s"] > 0
        assert row["reference_ratio"] > 0
        assert 1 <= row["mean_iterations"] <= row["max_iterations"] <= bp_bench.MAX_ITERS
    # A 3 x 3 grid has 12 undirected edges: 24 directed ones per graph.
    assert rows[0]["edges"] == 40 * 24


def test_random_graphs_are_valid_batches():
    g = torch.Generator().manual_seed(1)
    args, edges_per_graph = bp_bench.make_batch("random", 30, 12, g, "cpu")
    unary, pairwise, src, dst, reverse, node_graph, graphs = args
    assert int(edges_per_graph.sum()) == src.numel()
    assert bool((node_graph[src] == node_graph[dst]).all()) and bool((src != dst).all())
    assert torch.equal(torch.bincount(node_graph[dst], minlength=graphs), edges_per_graph)
    # Each undirected edge once: no pair repeats.
    pairs = torch.stack([src, dst], 1)
    assert torch.unique(pairs, dim=0).shape[0] == pairs.shape[0]
    assert torch.equal(pairwise[reverse], pairwise.transpose(1, 2))
