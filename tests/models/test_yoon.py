"""GNN inference in graphical models: shapes, non-backtracking adjacency, training, resume,
DDP, the reproduce command and bad settings."""

import os

import pytest
import torch

from deepkern import cli
from deepkern.data import graphical_models as gm
from deepkern.models import yoon
from tests.distributed import run_two_ranks


def _data(seed=0, n=6, count=4, families=("cycle", "grid", "complete", "star")):
    return gm.sample_mrfs(list(families), n, count, torch.Generator().manual_seed(seed))


def _model(kind="node", seed=0):
    torch.manual_seed(seed)
    return yoon.build_model(kind, hidden=8, steps=3)


def _config(**kwargs):
    base = dict(epochs=3, lr=1e-2, batch_size=4, progress=False)
    base.update(kwargs)
    return yoon.TrainConfig(**base)


@pytest.mark.parametrize("kind", yoon.MODELS)
def test_shapes_and_normalised_outputs(kind):
    batch, smaller = _data(), _data(n=7, count=1)
    model = _model(kind)
    for data in (batch, smaller):
        out = model(data)
        assert out.shape == (data.num_nodes, 2) and out.dtype == torch.float32
        assert torch.allclose(out.exp().sum(1), torch.ones(data.num_nodes), atol=1e-6)
    # Graphs do not talk to each other: a graph's output does not depend on its batch.
    alone = model(batch.select([3]))
    assert torch.allclose(alone, model(batch)[batch.node_graph == 3], atol=1e-6)


@pytest.mark.parametrize("kind", yoon.MODELS)
def test_outputs_follow_a_relabelling_of_the_nodes(kind):
    batch = _data(count=1, families=("lollipop",))
    permutation = torch.randperm(6, generator=torch.Generator().manual_seed(3))
    inverse = torch.argsort(permutation)  # new label of old node i is inverse[i]
    edges = inverse[batch.edges]
    edges = torch.stack([edges.min(0).values, edges.max(0).values])
    relabelled = gm._assemble([6], batch.families, edges, batch.bias[permutation], batch.coupling)
    model = _model(kind)
    assert torch.allclose(model(relabelled), model(batch)[permutation], atol=1e-5)


def _pairs(src, dst, reverse):
    from_edge, to_edge = yoon.message_adjacency(
        torch.tensor(src), torch.tensor(dst), torch.tensor(reverse)
    )
    return sorted(zip(from_edge.tolist(), to_edge.tolist()))


def test_message_adjacency_on_hand_cases():
    # Path 0 - 1 - 2: edges 0: 0->1, 1: 1->0, 2: 1->2, 3: 2->1.
    assert _pairs([0, 1, 1, 2], [1, 0, 2, 1], [1, 0, 3, 2]) == [(0, 2), (3, 1)]
    # Triangle: each message has exactly one non-backtracking predecessor, k -> i for i -> j.
    src, dst = [0, 1, 1, 2, 2, 0], [1, 0, 2, 1, 0, 2]
    pairs = _pairs(src, dst, [1, 0, 3, 2, 5, 4])
    assert len(pairs) == 6
    for a, b in pairs:
        assert dst[a] == src[b] and src[a] != dst[b]
    # Star with centre 0 and leaves 1 ... 5: leaf -> centre messages listen to nobody, the
    # centre -> leaf ones to the four other leaves.
    batch = gm.sample_mrfs("star", 6, 1, torch.Generator().manual_seed(0), with_marginals=False)
    from_edge, to_edge = yoon.message_adjacency(batch.src, batch.dst, batch.reverse)
    counts = torch.bincount(to_edge, minlength=10)
    assert torch.equal(counts, torch.where(batch.src == 0, 4, 0))
    assert bool((batch.src[from_edge] != 0).all())


def test_message_adjacency_against_brute_force():
    batch = _data(families=gm.FAMILIES, count=1)
    from_edge, to_edge = yoon.message_adjacency(batch.src, batch.dst, batch.reverse)
    src, dst = batch.src.tolist(), batch.dst.tolist()
    expected = [
        (a, b)
        for b in range(len(src))
        for a in range(len(src))
        if dst[a] == src[b] and src[a] != dst[b]
    ]
    assert list(zip(from_edge.tolist(), to_edge.tolist())) == expected


def test_bp_baseline_is_exact_on_trees_and_reports_convergence():
    trees = _data(families=("star", "path", "random_tree"), n=8)
    result = yoon.bp_marginals(trees, damping=0.0, tol=1e-12)
    assert bool(result["converged"].all())
    kl, mae = yoon.marginal_errors(result["marginals"], trees.marginals)
    assert float(kl.max()) < 1e-10 and float(mae.max()) < 1e-8


def test_marginal_errors_by_hand():
    exact = torch.tensor([[0.5, 0.5], [0.2, 0.8]])
    predicted = torch.tensor([[0.25, 0.75], [0.2, 0.8]])
    kl, mae = yoon.marginal_errors(predicted, exact)
    expected = 0.5 * torch.log(torch.tensor(2.0)) + 0.5 * torch.log(torch.tensor(2.0 / 3.0))
    assert torch.allclose(kl, torch.tensor([expected.item(), 0.0], dtype=torch.float64))
    assert torch.allclose(mae, torch.tensor([0.25, 0.0], dtype=torch.float64))


@pytest.mark.parametrize("kind", yoon.MODELS)
def test_training_lowers_the_loss(kind):
    data, test = _data(count=6), _data(seed=1, count=2)
    model = _model(kind)
    before = yoon.evaluate(model, test)["kl"]
    result = yoon.train(model, _config(epochs=6), data, test)
    losses = [h["train_loss"] for h in result["history"]]
    assert losses[-1] < 0.7 * losses[0]
    assert result["test_kl"] < before


def test_resume_continues_exactly(tmp_path, monkeypatch):
    data = _data()
    straight = _model("message")
    full = yoon.train(straight, _config(checkpoint=str(tmp_path / "a.pt")), data)

    class Crash(Exception):
        pass

    train_epoch = yoon._train_epoch

    def crash_in_second_epoch(*args, **kwargs):
        if kwargs["epoch"] == 1:
            raise Crash
        return train_epoch(*args, **kwargs)

    path = str(tmp_path / "b.pt")
    monkeypatch.setattr(yoon, "_train_epoch", crash_in_second_epoch)
    with pytest.raises(Crash):
        yoon.train(_model("message"), _config(checkpoint=path), data)
    monkeypatch.setattr(yoon, "_train_epoch", train_epoch)
    assert torch.load(path, weights_only=True)["epoch"] == 1

    resumed_model = _model("message", seed=99)  # its initial weights do not matter
    resumed = yoon.train(resumed_model, _config(checkpoint=path, resume=True), data)
    assert resumed["start_epoch"] == 1
    for (name, a), (_, b) in zip(straight.state_dict().items(), resumed_model.state_dict().items()):
        assert torch.equal(a, b), name
    assert [h["train_loss"] for h in resumed["history"]] == [
        h["train_loss"] for h in full["history"]
    ]
    assert sorted(os.listdir(tmp_path)) == ["a.pt", "b.pt"]


def _train_on_rank() -> dict:
    model = _model("node")
    metrics = yoon.train(model, _config(epochs=1), _data())
    params = {name: p.detach().clone() for name, p in model.named_parameters()}
    return {"params": params, "metrics": metrics}


def test_ddp_gloo_two_processes(tmp_path):
    results = run_two_ranks(_train_on_rank, tmp_path)
    initial = dict(_model("node").named_parameters())
    changed = 0
    for name, p0 in results[0]["params"].items():
        assert torch.equal(p0, results[1]["params"][name]), name
        changed += not torch.equal(p0, initial[name].detach())
    assert changed > 0
    # 16 graphs in batches of 4: each process took 2 of the 4 batches; the loss covers both.
    assert results[0]["metrics"]["train_loss"] == results[1]["metrics"]["train_loss"]


def test_reproduce_quick_prints_the_table(tmp_path, capsys):
    code = cli.main(["reproduce", "yoon", "--quick", "--no-progress", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 0
    assert "KL BP" in out and "KL node-GNN" in out and "MAE msg-GNN" in out
    for family in gm.FAMILIES:
        assert family in out
    assert "barbell *" in out and "GNNs beat BP" in out
    import json

    report = json.loads((tmp_path / "yoon.json").read_text())
    assert len(report["rows"]) == 2 * len(gm.FAMILIES)
    for row in report["rows"]:
        if not row["loopy"]:
            assert row["bp_kl"] < 1e-6  # BP is exact on trees


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"epochs": -1}, "epochs"),
        ({"lr": 0.0}, "lr"),
        ({"batch_size": 0}, "batch_size"),
        ({"grad_clip": float("nan")}, "grad_clip"),
        ({"seed": -2}, "seed"),
        ({"resume": True}, "resume"),
        ({"device": "gpu0"}, "device"),
    ],
)
def test_bad_config_raises(kwargs, field):
    with pytest.raises(ValueError, match=field):
        yoon.TrainConfig(**kwargs)


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="kind"):
        yoon.build_model("edge")
    with pytest.raises(ValueError, match="hidden"):
        yoon.NodeGNN(hidden=0)
    no_marginals = gm.sample_mrfs("cycle", 6, 2, torch.Generator(), with_marginals=False)
    with pytest.raises(ValueError, match="train_data"):
        yoon.train(_model(), _config(), no_marginals)
    with pytest.raises(ValueError, match="marginals"):
        yoon.evaluate(_model(), no_marginals)
    with pytest.raises(ValueError, match="batch_size"):
        yoon.predict(_model(), no_marginals, batch_size=0)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--hidden", "0"], "--hidden"),
        (["--test-sizes", "9", "24"], "--test-sizes"),
        (["--train-n", "5"], "--train-n"),
        (["--bp-damping", "1.0"], "--bp-damping"),
        (["--held-out", *gm.FAMILIES], "--held-out"),
    ],
)
def test_reproduce_refuses_bad_flags(flags, message, capsys):
    assert cli.main(["reproduce", "yoon", "--quick", "--no-progress", *flags]) == 2
    assert message in capsys.readouterr().err
