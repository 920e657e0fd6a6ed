"""Pointer Networks: masks keep every output valid, greedy and beam search agree with the
likelihood, a small model learns optimal tours, checkpoints, DDP, the command, bad input."""

import argparse
import json
import os

import pytest
import torch

from deepkern.data import geometry as g
from deepkern.models import ptrnet as P
from tests.distributed import run_two_ranks


def _model(task, hidden=16, scale=0.08, seed=0):
    return P.PointerNetwork(task, hidden, scale, torch.Generator().manual_seed(seed))


def _config(**overrides):
    settings = dict(
        task="tsp",
        n=5,
        train_size=64,
        test_size=0,
        steps=6,
        batch_size=8,
        hidden=16,
        progress=False,
        log_every=2,
    )
    settings.update(overrides)
    return P.TrainConfig(**settings)


def _assert_valid(task, n, output):
    if task == "tsp":
        assert output[0] == 0 and sorted(output) == list(range(n))
    elif task == "hull":
        assert len(output) >= 3 and len(set(output)) == len(output)
        assert output[0] == min(output) and all(0 <= i < n for i in output)
    else:
        assert 1 <= len(output) <= P.max_triangles(n)
        assert all(0 <= a < b < c < n for a, b, c in output)
        assert len(set(output)) == len(output)


# ---------------------------------------------------------------------------------------------
# Shapes, masks, decoding


def test_shapes_and_teacher_forced_likelihood():
    data = P.make_data("hull", 6, 8, seed=1)
    model = _model("hull")
    ll = model(data.points.float(), data.targets)
    assert ll.shape == (6,) and torch.all(ll < 0) and torch.all(torch.isfinite(ll))
    ll.sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    sequences, greedy_ll = model.greedy(data.points.float())
    assert sequences.shape[0] == 6 and sequences.shape[1] <= P.max_steps("hull", 8)
    # The likelihood of the greedy output under teacher forcing is greedy's own score.
    torch.testing.assert_close(model(data.points.float(), sequences), greedy_ll)


def test_data_is_seeded():
    a, b = P.make_data("tsp", 4, 6, seed=1), P.make_data("tsp", 4, 6, seed=1)
    assert torch.equal(a.points, b.points) and torch.equal(a.targets, b.targets)
    assert not torch.equal(a.points, P.make_data("tsp", 4, 6, seed=2).points)
    assert torch.equal(a.optimal_lengths, g.held_karp(a.points)[0])


def test_targets_round_trip_through_the_encoding():
    for task in P.TASKS:
        data = P.make_data(task, 5, 7, seed=2)
        assert P.outputs_from_sequences(task, data.targets) == [
            [tuple(t) for t in label] if task == "delaunay" else label for label in data.labels
        ]
        assert data.targets.shape[1] <= P.max_steps(task, 7)


@pytest.mark.parametrize("task", P.TASKS)
@pytest.mark.parametrize("n", [3, 4, 7])
def test_masks_make_every_decoded_output_valid(task, n):
    points = g.uniform_points(12, n, seed=n).float()
    # Large random weights make the unconstrained choices wild: the masks alone keep order.
    for scale in (0.08, 3.0):
        model = _model(task, scale=scale, seed=n)
        for beam in (1, 3):
            sequences, ll = P.decode(model, points, beam)
            assert torch.all(torch.isfinite(ll))
            for output in P.outputs_from_sequences(task, sequences):
                _assert_valid(task, n, output)


def test_delaunay_masks_never_dead_end():
    # Random weights with n = 4 exhaust the triangles of some first vertices early: every
    # decode must still finish with finite likelihood and distinct triangles.
    points = g.uniform_points(64, 4, seed=0).float()
    model = _model("delaunay", scale=5.0, seed=3)
    sequences, ll = model.beam_search(points, beam=4)
    assert torch.all(torch.isfinite(ll))
    for output in P.outputs_from_sequences("delaunay", sequences):
        _assert_valid("delaunay", 4, output)


@pytest.mark.parametrize("task", P.TASKS)
def test_beam_of_one_is_greedy(task):
    points = g.uniform_points(10, 6, seed=4).float()
    model = _model(task, scale=0.5)
    greedy, greedy_ll = model.greedy(points)
    beam, beam_ll = model.beam_search(points, beam=1)
    assert torch.equal(greedy, beam)
    torch.testing.assert_close(greedy_ll, beam_ll)


@pytest.mark.parametrize("task", P.TASKS)
def test_beam_search_is_never_less_likely_than_greedy(task):
    points = g.uniform_points(24, 7, seed=5).float()
    model = _model(task, scale=0.5, seed=1)
    _, greedy_ll = model.greedy(points)
    better = 0
    for beam in (2, 4):
        sequences, ll = P.decode(model, points, beam)
        assert torch.all(ll >= greedy_ll - 1e-5)
        # The reported score is the sequence's likelihood.
        torch.testing.assert_close(model(points, sequences), ll, atol=1e-5, rtol=1e-5)
        better += int((ll > greedy_ll + 1e-6).sum())
    assert better > 0  # beam search does find more likely outputs


def test_invalid_targets_are_refused():
    data = P.make_data("tsp", 2, 5, seed=0)
    model = _model("tsp")
    reversed_start = data.targets.flip(1)  # ends at city 0 instead of starting there
    with pytest.raises(ValueError, match="not valid canonical tsp outputs"):
        model(data.points.float(), reversed_start)
    with pytest.raises(ValueError, match="pointer positions in 0..5"):
        model(data.points.float(), data.targets + 3)
    with pytest.raises(ValueError, match="at least 3 points"):
        model(torch.rand(2, 2, 2), torch.zeros(2, 2, dtype=torch.long))


# ---------------------------------------------------------------------------------------------
# Metrics


def test_metrics_on_known_answers():
    data = P.make_data("hull", 20, 8, seed=6)
    perfect = P.hull_metrics(data.points, data.labels, data.labels)
    assert perfect["accuracy"] == 1 and perfect["area_coverage"] == pytest.approx(1)
    # Dropping one hull vertex: never exact, area below the hull's, still simple.
    dropped = [label[:-1] for label in data.labels]
    partial = P.hull_metrics(data.points, dropped, data.labels)
    assert partial["accuracy"] == 0 and partial["invalid"] == 0
    assert 0 < partial["area_coverage"] < 1
    square = torch.tensor([[[0.0, 0.0], [1.0, 0.0], [1.0, 1.0], [0.0, 1.0]]])
    bow_tie = P.hull_metrics(square, [[0, 2, 1, 3]], [[0, 1, 2, 3]])
    assert bow_tie["invalid"] == 1 and bow_tie["invalid_fraction"] == 1

    truth = [[(0, 1, 2), (1, 2, 3)], [(0, 1, 3)]]
    predicted = [[(2, 1, 0), (1, 2, 4)], [(0, 1, 3)]]
    metrics = P.delaunay_metrics(predicted, truth)
    assert metrics == {"accuracy": 0.5, "triangle_coverage": 0.75}

    tsp = P.make_data("tsp", 10, 6, seed=7)
    assert P.tsp_metrics(tsp.points, tsp.labels, tsp.optimal_lengths)["gap"] == pytest.approx(0)
    identity = [list(range(6))] * 10
    worse = P.tsp_metrics(tsp.points, identity, tsp.optimal_lengths)
    assert worse["tour_length"] >= worse["optimal_length"] and worse["gap"] >= 0


# ---------------------------------------------------------------------------------------------
# Training


def test_a_small_model_learns_optimal_tours_of_a_small_set():
    config = P.TrainConfig(
        task="tsp",
        n=5,
        train_size=8,
        test_size=0,
        steps=150,
        batch_size=8,
        hidden=32,
        lr=3e-2,
        progress=False,
        log_every=50,
    )
    data = config.make_train_data()
    model = config.make_model()
    metrics = P.train(model, config, data)
    assert metrics["history"][-1]["loss"] < 0.1 * metrics["history"][0]["loss"]
    evaluation = P.evaluate(model, data, beam=1)
    assert evaluation["optimal_found"] == 1.0
    assert evaluation["tour_length"] == pytest.approx(evaluation["optimal_length"])
    tour, length = P.solve_tsp(data.points[0], model, beam=2, rescale=False)
    assert tour == data.labels[0]
    assert length == pytest.approx(float(data.optimal_lengths[0]))
    # Coordinates in other units are mapped into the unit square first; the length comes
    # back in those units.
    points = data.points[1]
    shifted = points - points.min(dim=0).values
    unit_tour, _ = P.solve_tsp(shifted / shifted.max(), model, rescale=False)
    tour, length = P.solve_tsp(100 * points + 7, model)
    assert tour == unit_tour
    assert length == pytest.approx(100 * float(g.tour_length(points, tour)))


def test_resume_continues_exactly(tmp_path, monkeypatch):
    settings = dict(task="hull", n=6, steps=8, checkpoint_every=4)
    straight = _config(**settings)
    model_a = straight.make_model()
    full = P.train(model_a, straight)

    class Crash(Exception):
        pass

    indices = P._batch_indices

    def crash_at_step_six(config, size, rank, step):
        if step == 5:
            raise Crash
        return indices(config, size, rank, step)

    path = str(tmp_path / "run.pt")
    monkeypatch.setattr(P, "_batch_indices", crash_at_step_six)
    with pytest.raises(Crash):
        config = _config(**settings, checkpoint=path)
        P.train(config.make_model(), config)
    monkeypatch.setattr(P, "_batch_indices", indices)
    assert torch.load(path, weights_only=True)["step"] == 4

    resumed_config = _config(**settings, checkpoint=path, resume=True)
    model_b = _model("hull", seed=99)  # a fresh process; its own start does not matter
    resumed = P.train(model_b, resumed_config)
    assert resumed["start_step"] == 4
    for (name, a), (_, b) in zip(model_a.state_dict().items(), model_b.state_dict().items()):
        assert torch.equal(a, b), name
    assert resumed["history"] == full["history"]
    assert os.listdir(tmp_path) == ["run.pt"]

    with pytest.raises(ValueError, match="hidden"):
        config = _config(**settings, hidden=8, checkpoint=path, resume=True)
        P.train(config.make_model(), config)


@pytest.mark.parametrize(
    "field, value",
    [
        ("task", "sorting"),
        ("n", 2),
        ("train_size", 0),
        ("test_size", -1),
        ("steps", 1.5),
        ("batch_size", 0),
        ("hidden", True),
        ("beam", 0),
        ("optimizer", "rmsprop"),
        ("lr", float("nan")),
        ("grad_clip", -1.0),
        ("init_scale", 0.0),
        ("solver", "concorde"),
        ("checkpoint_every", 0),
        ("log_every", 0),
    ],
)
def test_bad_config_values_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        P.TrainConfig(**{field: value})


def test_other_bad_input():
    with pytest.raises(ValueError, match="resume needs a checkpoint"):
        P.TrainConfig(resume=True)
    with pytest.raises(ValueError, match="n must be <= 16"):
        P.TrainConfig(n=20, solver="exact")
    with pytest.raises(ValueError, match="the model is for task 'hull'"):
        P.train(_model("hull"), _config())
    with pytest.raises(ValueError, match="task must be one of"):
        P.PointerNetwork("sort")
    with pytest.raises(ValueError, match="solve_tsp needs a model trained for tsp"):
        P.solve_tsp(torch.rand(5, 2), _model("hull"))
    with pytest.raises(ValueError, match="beam must be"):
        P.decode(_model("tsp"), torch.rand(1, 5, 2), beam=0)
    with pytest.raises(ValueError, match="shape"):
        P.solve_tsp(torch.rand(5, 3), _model("tsp"))


def test_a_non_finite_loss_says_so():
    config = _config(steps=4)
    data = config.make_train_data()
    data.points[:, 0] = float("nan")
    with pytest.raises(ValueError, match="not finite"):
        P.train(config.make_model(), config, data)


# ---------------------------------------------------------------------------------------------
# The command


def _parse(argv):
    parser = argparse.ArgumentParser()
    P.add_reproduce_arguments(parser)
    return parser.parse_args(argv)


def test_reproduce_quick_prints_the_table(tmp_path, capsys):
    out = tmp_path / "ptrnet.json"
    assert P.run_reproduce(_parse(["--quick", "--no-progress", "--out", str(out)])) == 0
    printed = capsys.readouterr().out
    for text in ("area coverage", "72.6 %", "99.9 %", "optimal tour", "Ptr-Net tour", "2.120"):
        assert text in printed
    rows = json.loads(out.read_text())["rows"]
    assert [(r["task"], r["n"], r["paper_n"]) for r in rows] == [("hull", 6, 50), ("tsp", 5, 5)]
    tsp = rows[1]["evaluation"]
    assert tsp["tour_length"] >= tsp["optimal_length"] - 1e-9


def test_reproduce_takes_cases_and_refuses_bad_ones(tmp_path, capsys):
    argv = ["--quick", "--tasks", "delaunay:4", "tsp:7", "--steps", "2", "--test-size", "4"]
    argv += ["--no-progress", "--checkpoint-dir", str(tmp_path)]
    assert P.run_reproduce(_parse(argv)) == 0
    printed = capsys.readouterr().out
    assert "triangle coverage" in printed and "93.0 %" in printed
    assert torch.load(tmp_path / "tsp-7.pt", weights_only=True)["step"] == 2
    with pytest.raises(ValueError, match="TASK:N"):
        P.run_reproduce(_parse(["--quick", "--tasks", "tsp"]))
    with pytest.raises(ValueError, match="task must be one of"):
        P.run_reproduce(_parse(["--quick", "--tasks", "sort:5"]))
    with pytest.raises(SystemExit):
        _parse(["--quick", "--full"])


def test_published_figures():
    assert P.PUBLISHED[("tsp", 5)] == {"optimal_length": 2.12, "tour_length": 2.12}
    assert P.PUBLISHED[("hull", 50)]["accuracy"] == 0.726
    for (task, n), figures in P.PUBLISHED.items():
        assert task in P.TASKS and n >= 5 and figures


# ---------------------------------------------------------------------------------------------
# Data parallel training on two CPU processes


def _train_on_rank() -> dict:
    config = _config(steps=3, batch_size=4)
    model = config.make_model()
    metrics = P.train(model, config)
    params = {name: p.detach().clone() for name, p in model.named_parameters()}
    return {"params": params, "metrics": metrics}


def test_ddp_gloo_two_processes(tmp_path):
    results = run_two_ranks(_train_on_rank, tmp_path)
    assert results[0]["metrics"]["world_size"] == 2
    initial = dict(_config().make_model().named_parameters())
    changed = 0
    for name, p0 in results[0]["params"].items():
        assert torch.equal(p0, results[1]["params"][name]), name
        changed += not torch.equal(p0, initial[name].detach())
    assert changed > 0


def test_reproduce_full_size_takes_overrides(tmp_path, capsys):
    # The paper's settings (SGD at 1.0, near-optimal TSP20 labels from LKH or local search),
    # shrunk by the overrides.
    argv = ["--full", "--tasks", "tsp:20", "--steps", "2", "--train-size", "6"]
    argv += ["--test-size", "3", "--hidden", "8", "--batch-size", "2", "--no-progress"]
    argv += ["--out", str(tmp_path / "full.json")]
    assert P.run_reproduce(_parse(argv)) == 0
    assert "3.880" in capsys.readouterr().out
    row = json.loads((tmp_path / "full.json").read_text())["rows"][0]
    assert (row["n"], row["paper_n"], row["steps"], row["batch_size"]) == (20, 20, 2, 2)
    evaluation = row["evaluation"]
    assert evaluation["beam"] == 2 and evaluation["tour_length"] >= evaluation["optimal_length"]
