"""CPNGNNs: the port-ordered layer, permutation behaviour, feasible decoding, exact optima,
training, resume, DDP and the reproduce command."""

from __future__ import annotations

import itertools
import json
import os
import random

import networkx as nx
import pytest
import torch

from deepkern import cli
from deepkern.data import graphs as G
from deepkern.models import cpngnn as cp
from tests.distributed import run_two_ranks


def _generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _small_graphs(count: int, seed: int = 0, max_nodes: int = 9):
    """Random small graphs, with isolated nodes and several components among them."""
    rng = random.Random(seed)
    graphs = []
    for k in range(count):
        n = rng.randint(1, max_nodes)
        graph = nx.gnp_random_graph(n, rng.uniform(0.1, 0.6), seed=seed * 1000 + k)
        graphs.append(G.from_networkx(graph, _generator(k)))
    return graphs


def _relabelled(graph: G.PortGraph, permutation: torch.Tensor) -> G.PortGraph:
    """Node v becomes permutation[v]; every port stays on the same edge."""
    return G.PortGraph(
        graph.num_nodes,
        permutation[graph.src],
        permutation[graph.dst],
        graph.port_at_src.clone(),
        graph.port_at_dst.clone(),
    )


# ---------------------------------------------------------------------------------------------
# The layer


def test_layer_concatenates_in_port_order_with_padding():
    # Edges in this order give ports: 0: [1 -> (1, back 1), 2 -> (2, back 1)];
    # 1: [1 -> (0, back 1)]; 2: [1 -> (0, back 2), 2 -> (3, back 1)]; 3: [1 -> (2, back 2)].
    graph = G.port_numbering(4, [(0, 1), (0, 2), (2, 3)])
    layer = cp.CPNGNNLayer(1, 2, max_degree=3)
    h = torch.tensor([[10.0], [20.0], [30.0], [40.0]])
    pad = [0.0] * 4
    expected = torch.tensor(
        [
            [10.0, 20.0, 1, 0, 0, 30.0, 1, 0, 0, *pad],
            [20.0, 10.0, 1, 0, 0, *pad, *pad],
            [30.0, 10.0, 0, 1, 0, 40.0, 1, 0, 0, *pad],
            [40.0, 30.0, 0, 1, 0, *pad, *pad],
        ]
    )
    assert torch.equal(layer.concatenate(h, graph), expected)
    out = layer(h, graph)
    torch.testing.assert_close(out, torch.relu(layer.linear(expected)))

    # Swapping node 0's ports swaps its two neighbour blocks and nothing else of node 0.
    swapped = G.port_numbering(4, [(0, 2), (0, 1), (2, 3)])
    row = layer.concatenate(h, swapped)[0]
    assert row.tolist() == [10.0, 30.0, 1, 0, 0, 20.0, 1, 0, 0, *pad]


def test_layer_refuses_degrees_above_its_slots_and_bad_shapes():
    star = G.port_numbering(4, [(0, 1), (0, 2), (0, 3)])
    with pytest.raises(ValueError, match="degree 3, above the layer's max_degree 2"):
        cp.CPNGNNLayer(1, 2, max_degree=2)(torch.ones(4, 1), star)
    with pytest.raises(ValueError, match="h must have shape"):
        cp.CPNGNNLayer(2, 2, max_degree=3)(torch.ones(4, 1), star)
    with pytest.raises(ValueError, match="max_degree"):
        cp.CPNGNNLayer(1, 2, max_degree=0)


def test_relabelling_nodes_permutes_the_outputs():
    graph = G.from_networkx(nx.gnp_random_graph(12, 0.3, seed=3), _generator(1))
    permutation = torch.randperm(12, generator=_generator(2))
    relabelled = _relabelled(graph, permutation)
    colour = G.weak_two_colouring(graph)
    for kind in cp.KINDS:
        model = cp.NodeSelector(kind, 8, 3, graph.max_degree(), True, generator=_generator())
        out = model(graph, colour)
        moved_colour = torch.empty_like(colour)
        moved_colour[permutation] = colour
        moved = model(relabelled, moved_colour)
        torch.testing.assert_close(moved[permutation], out, rtol=1e-5, atol=1e-6)


def test_gin_ignores_ports_and_cpngnn_reads_them():
    graph = G.from_networkx(nx.gnp_random_graph(15, 0.3, seed=4), _generator(0))
    others = [G.renumber_ports(graph, _generator(seed)) for seed in range(1, 4)]
    gin = cp.NodeSelector("gin", 8, 3, graph.max_degree(), generator=_generator())
    cpn = cp.NodeSelector("cpngnn", 8, 3, graph.max_degree(), generator=_generator())
    with torch.no_grad():
        for other in others:
            torch.testing.assert_close(gin(other), gin(graph), rtol=1e-5, atol=1e-6)
        assert any(not torch.allclose(cpn(other), cpn(graph), atol=1e-6) for other in others)


def test_gin_matches_the_parameter_budget():
    for max_degree, hidden, layers, colouring in [
        (3, 32, 3, False),
        (6, 16, 2, True),
        (36, 32, 3, True),
    ]:
        count = {
            kind: sum(
                p.numel()
                for p in cp.NodeSelector(kind, hidden, layers, max_degree, colouring).parameters()
            )
            for kind in cp.KINDS
        }
        assert abs(count["gin"] - count["cpngnn"]) <= 0.02 * count["cpngnn"], count


def test_model_configuration_errors():
    with pytest.raises(ValueError, match="kind"):
        cp.NodeSelector("gcn")
    with pytest.raises(ValueError, match="hidden"):
        cp.NodeSelector(hidden=0)
    with pytest.raises(ValueError, match="layers"):
        cp.NodeSelector(layers=0)
    graph = G.port_numbering(2, [(0, 1)])
    with pytest.raises(ValueError, match="colour"):
        cp.NodeSelector(colouring=True)(graph)


# ---------------------------------------------------------------------------------------------
# Decoding, exact and greedy solutions


def _brute_force(problem: str, graph: G.PortGraph) -> int:
    n = graph.num_nodes
    for size in range(n + 1):
        for nodes in itertools.combinations(range(n), size):
            chosen = torch.zeros(n, dtype=torch.bool)
            chosen[list(nodes)] = True
            if cp.is_feasible(problem, graph, chosen):
                return size
    raise AssertionError("the full node set is always feasible")


def _is_minimal(problem: str, graph: G.PortGraph, chosen: torch.Tensor) -> bool:
    for v in torch.nonzero(chosen).flatten().tolist():
        smaller = chosen.clone()
        smaller[v] = False
        if cp.is_feasible(problem, graph, smaller):
            return False
    return True


@pytest.mark.parametrize("problem", cp.PROBLEMS)
def test_decoding_is_feasible_and_minimal_even_untrained(problem):
    graphs = _small_graphs(40, seed=5, max_nodes=14)
    for k, graph in enumerate(graphs):
        model = cp.NodeSelector(
            cp.KINDS[k % 2], 4, 2, max(1, graph.max_degree()), k % 3 == 0, generator=_generator(k)
        )
        score_sets = [
            cp.solve(model, problem, graph),
            cp.decode(problem, graph, torch.zeros(graph.num_nodes)),
            cp.decode(problem, graph, torch.ones(graph.num_nodes)),
            cp.decode(problem, graph, torch.rand(graph.num_nodes, generator=_generator(k))),
        ]
        for chosen in score_sets:
            assert chosen.dtype == torch.bool and chosen.shape == (graph.num_nodes,)
            assert cp.is_feasible(problem, graph, chosen)
            assert _is_minimal(problem, graph, chosen)


def test_decoding_prefers_high_scores():
    star = G.port_numbering(5, [(0, 1), (0, 2), (0, 3), (0, 4)])
    centre = torch.tensor([0.9, 0.1, 0.1, 0.1, 0.1])
    leaves = torch.tensor([0.0, 0.9, 0.9, 0.9, 0.9])
    assert cp.decode("mvc", star, centre).tolist() == [True] + [False] * 4
    assert cp.decode("mvc", star, leaves).tolist() == [False] + [True] * 4
    # All nodes above the threshold: pruning keeps the centre, which scores highest.
    assert cp.decode("mds", star, torch.tensor([0.99, 0.6, 0.6, 0.6, 0.6])).sum() == 1
    with pytest.raises(ValueError, match="scores must have shape"):
        cp.decode("mds", star, torch.zeros(4))
    with pytest.raises(ValueError, match="problem"):
        cp.decode("tsp", star, torch.zeros(5))


@pytest.mark.parametrize("problem", cp.PROBLEMS)
def test_integer_program_matches_brute_force(problem):
    for graph in _small_graphs(25, seed=7, max_nodes=9):
        chosen, optimal = cp.exact_solution(problem, graph, time_limit=10.0)
        assert optimal and cp.is_feasible(problem, graph, chosen)
        assert int(chosen.sum()) == _brute_force(problem, graph)


def test_known_optima_and_greedy():
    petersen = G.from_networkx(nx.petersen_graph())
    assert int(cp.exact_solution("mds", petersen)[0].sum()) == 3
    assert int(cp.exact_solution("mvc", petersen)[0].sum()) == 6
    for problem in cp.PROBLEMS:
        greedy = cp.greedy_solution(problem, petersen)
        assert cp.is_feasible(problem, petersen, greedy)
    empty = G.port_numbering(0, [])
    assert cp.exact_solution("mds", empty)[0].shape == (0,)


def test_ratio_bounds():
    assert cp.ratio_bound("mds", 3, False) == 4.0
    assert cp.ratio_bound("mds", 3, True) == 2.0
    assert cp.ratio_bound("mds", 0, True) == 1.0
    assert cp.ratio_bound("mvc", 7, True) == 2.0
    # Any feasible dominating set meets Delta + 1.
    for graph in _small_graphs(20, seed=9):
        everything = torch.ones(graph.num_nodes, dtype=torch.bool)
        assert cp.is_feasible("mds", graph, everything)
        optimum = int(cp.exact_solution("mds", graph)[0].sum())
        ratio = int(everything.sum()) / optimum
        assert ratio <= cp.ratio_bound("mds", graph.max_degree(), False)


# ---------------------------------------------------------------------------------------------
# Training


@pytest.fixture(scope="module")
def training_set():
    graphs = [G.random_bounded_degree_graph(12, 3, 3.0, seed=k) for k in range(24)]
    labels = [cp.exact_solution("mvc", g)[0] for g in graphs]
    return graphs, labels


def _config(**kwargs) -> cp.TrainConfig:
    settings = dict(problem="mvc", epochs=3, lr=1e-2, batch_size=8, progress=False, seed=2)
    settings.update(kwargs)
    return cp.TrainConfig(**settings)


def _loss(model, graphs, labels) -> float:
    union = G.collate(graphs).graph
    target = torch.cat(labels).float()
    colour = torch.cat([G.weak_two_colouring(g) for g in graphs]) if model.colouring else None
    with torch.no_grad():
        return float(
            torch.nn.functional.binary_cross_entropy_with_logits(model(union, colour), target)
        )


@pytest.mark.parametrize("kind", cp.KINDS)
def test_training_reduces_the_loss(training_set, kind):
    graphs, labels = training_set
    model = cp.NodeSelector(kind, 8, 2, 3, colouring=True, generator=_generator())
    before = _loss(model, graphs, labels)
    metrics = cp.train(model, _config(epochs=6), graphs, labels)
    assert _loss(model, graphs, labels) < before
    assert len(metrics["history"]) == 6 and metrics["start_epoch"] == 0


def test_training_checks_its_inputs(training_set):
    graphs, labels = training_set
    model = cp.NodeSelector("cpngnn", 4, 1, 2)
    with pytest.raises(ValueError, match="above max_degree 2"):
        cp.train(model, _config(), graphs, labels)
    with pytest.raises(ValueError, match="one label per graph"):
        cp.train(model, _config(), graphs, labels[:-1])
    with pytest.raises(ValueError, match="one label per graph"):
        cp.train(model, _config(), graphs)
    with pytest.raises(ValueError, match="empty"):
        cp.train(model, _config(), [], [])
    with pytest.raises(ValueError, match=r"labels\[0\]"):
        cp.train(model, _config(), graphs[:1], [labels[0].float()])


def test_relaxation_loss_by_hand():
    # One edge 0-1 and an isolated node 2, with p = (0.5, 0.25, 0.75).
    graph = G.port_numbering(3, [(0, 1)])
    p = torch.tensor([0.5, 0.25, 0.75], dtype=torch.float64)
    logits = torch.log(p / (1 - p))
    size = float(p.sum())
    both_absent = 0.5 * 0.75
    # Nodes 0 and 1 are undominated when both are absent; node 2 when it is absent.
    undominated = 2 * both_absent + 0.25
    expected = (size + 3.0 * undominated) / 3
    assert cp.relaxation_loss("mds", graph, logits, 3.0).item() == pytest.approx(expected)
    assert cp.relaxation_loss("mvc", graph, logits).item() == pytest.approx(
        (size + both_absent) / 3
    )


def test_relaxation_training_needs_no_labels(training_set):
    graphs, _ = training_set
    model = cp.NodeSelector("cpngnn", 8, 2, 3, colouring=True, generator=_generator())
    union = G.collate(graphs).graph
    colour = torch.cat([G.weak_two_colouring(g) for g in graphs])

    def loss() -> float:
        with torch.no_grad():
            return float(cp.relaxation_loss("mvc", union, model(union, colour)))

    before = loss()
    cp.train(model, _config(objective="relaxation", epochs=4), graphs)
    assert loss() < before
    for graph in graphs[:5]:
        assert cp.is_feasible("mvc", graph, cp.solve(model, "mvc", graph))


@pytest.mark.parametrize(
    "field, value",
    [
        ("problem", "tsp"),
        ("objective", "rl"),
        ("penalty", 0.0),
        ("epochs", -1),
        ("lr", 0.0),
        ("batch_size", 0),
        ("seed", -2),
    ],
)
def test_bad_config_names_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        cp.TrainConfig(**{field: value})
    with pytest.raises(ValueError, match="checkpoint"):
        cp.TrainConfig(resume=True)


def test_resume_continues_exactly(training_set, tmp_path):
    graphs, labels = training_set
    straight = cp.NodeSelector("cpngnn", 8, 2, 3, generator=_generator())
    full = cp.train(straight, _config(), graphs, labels)

    # A run stopped after its first epoch leaves a checkpoint behind.
    path = str(tmp_path / "run.pt")
    stopped = cp.NodeSelector("cpngnn", 8, 2, 3, generator=_generator())
    cp.train(stopped, _config(epochs=1, checkpoint=path), graphs, labels)
    assert torch.load(path, weights_only=True)["epoch"] == 1

    # A fresh process builds the model anew; its initial weights do not matter.
    resumed_model = cp.NodeSelector("cpngnn", 8, 2, 3, generator=_generator(99))
    resumed = cp.train(resumed_model, _config(checkpoint=path, resume=True), graphs, labels)
    assert resumed["start_epoch"] == 1
    for (name, a), (_, b) in zip(straight.state_dict().items(), resumed_model.state_dict().items()):
        assert torch.equal(a, b), name
    assert [h["train_loss"] for h in resumed["history"]] == [
        h["train_loss"] for h in full["history"]
    ]
    assert os.listdir(tmp_path) == ["run.pt"]


def _train_on_rank() -> dict:
    graphs = [G.random_bounded_degree_graph(10, 3, 3.0, seed=k) for k in range(8)]
    labels = [cp.exact_solution("mds", g)[0] for g in graphs]
    model = cp.NodeSelector("cpngnn", 4, 2, 3, colouring=True, generator=_generator())
    metrics = cp.train(model, _config(problem="mds", epochs=1, batch_size=2), graphs, labels)
    params = {name: p.detach().clone() for name, p in model.named_parameters()}
    return {"params": params, "metrics": metrics}


def test_ddp_gloo_two_processes(tmp_path):
    results = run_two_ranks(_train_on_rank, tmp_path)
    initial = dict(
        cp.NodeSelector(
            "cpngnn", 4, 2, 3, colouring=True, generator=_generator()
        ).named_parameters()
    )
    changed = 0
    for name, p0 in results[0]["params"].items():
        assert torch.equal(p0, results[1]["params"][name]), name
        changed += not torch.equal(p0, initial[name].detach())
    assert changed > 0
    # Each process trained on its own 4 graphs in 2 steps; the epoch loss covers both.
    assert results[0]["metrics"]["train_loss"] == results[1]["metrics"]["train_loss"]


# ---------------------------------------------------------------------------------------------
# The reproduce command


def test_reproduce_quick_prints_the_table(tmp_path, capsys):
    code = cli.main(["reproduce", "cpngnn", "--quick", "--no-progress", "--out", str(tmp_path)])
    assert code == 0
    out = capsys.readouterr().out
    for text in ("CPNGNN+wc", "GIN+wc", "greedy", "3-regular", "florentine (n=15)", "4|2(wc)"):
        assert text in out, text
    table = [line for line in out.splitlines() if line.startswith(("mds ", "mvc "))]
    assert len(table) == 6
    assert "thresholded scores were feasible" in out
    report = json.loads((tmp_path / "cpngnn.json").read_text())
    assert len(report["results"]) == len(table)
    for line, row in zip(table, report["results"]):
        assert line.startswith(row["problem"]) and row["family"] in line
        # The holds column says whether any method had a graph above its proven bound.
        violations = sum(method["violations"] for method in row["methods"].values())
        assert line.rstrip().endswith("yes" if violations == 0 else "NO")
        for method in row["methods"].values():
            # Optima are exact: no feasible answer can beat them.
            assert all(ratio >= 1.0 for ratio in method["ratios"])
            assert len(method["ratios"]) == row["graphs"]
        # Every feasible dominating set meets Delta + 1, so that bound never fails.
        if row["problem"] == "mds":
            assert row["methods"]["CPNGNN"]["violations"] == 0


def test_reproduce_refuses_bad_settings(capsys):
    assert cli.main(["reproduce", "cpngnn", "--quick", "--degrees", "0"]) == 2
    assert "--degrees" in capsys.readouterr().err
    assert cli.main(["reproduce", "cpngnn", "--quick", "--epochs", "-1"]) == 2
    assert "--epochs" in capsys.readouterr().err
