"""Depth-scaling study: path statistics on known paths, the network, training, resume, command."""

from __future__ import annotations

import argparse
import json
import math
import os

import pytest
import torch
import torch.nn.functional as F

from deepkern.models import scaling as sc

DEPTHS = [8, 16, 32, 64, 128, 256, 512]


def _smooth_path(depth: int) -> torch.Tensor:
    """A_k = F(k / L) for a fixed smooth matrix function F: [L, 3, 3]."""
    t = (torch.arange(depth, dtype=torch.float64) + 0.5) / depth
    weights = torch.arange(1.0, 10.0, dtype=torch.float64).reshape(3, 3)
    return torch.sin(2 * math.pi * t[:, None, None] * weights / 9) + weights / 9


def _brownian_path(depth: int, seed: int) -> torch.Tensor:
    """A Brownian matrix path sampled at t = k / L: increments N(0, 1 / L), [L, 4, 4]."""
    generator = torch.Generator().manual_seed(seed)
    steps = torch.randn(depth, 4, 4, generator=generator, dtype=torch.float64) / math.sqrt(depth)
    return steps.cumsum(0)


def _iid_path(depth: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(depth, 4, 4, generator=generator, dtype=torch.float64)


# ---------------------------------------------------------------------------------------------
# Path statistics


def test_path_metrics_by_hand():
    # Scalar path 0, 3, 4, 4: norms 0, 3, 4, 4 and increments 3, 1, 0.
    m = sc.path_metrics(torch.tensor([[0.0], [3.0], [4.0], [4.0]]))
    expected = {"max_norm": 4.0, "rss": 41**0.5, "max_increment": 3.0, "median_increment": 1.0}
    assert m == pytest.approx({**expected, "quadratic_variation": 10.0})
    # Frobenius norms of matrices, and a single layer has no increments.
    m = sc.path_metrics(torch.tensor([[[3.0, 0.0], [0.0, 4.0]]]))
    expected = {"max_norm": 5.0, "rss": 5.0, "max_increment": 0.0, "median_increment": 0.0}
    assert m == pytest.approx({**expected, "quadratic_variation": 0.0})


def test_path_metrics_rejects_bad_paths():
    with pytest.raises(ValueError, match="at least one layer"):
        sc.path_metrics(torch.zeros(0, 2))
    with pytest.raises(ValueError, match="floating point"):
        sc.path_metrics(torch.zeros(3, 2, dtype=torch.int64))


def test_smooth_path_is_ode_like():
    metrics = [sc.path_metrics(_smooth_path(d)) for d in DEPTHS]
    qv = [m["quadratic_variation"] for m in metrics]
    increments = [m["median_increment"] for m in metrics]
    # Increments ~ C / L and QV ~ C' / L: from L = 32 on, where the grid resolves the
    # curve, doubling L halves both.
    for a, b in zip(increments[2:], increments[3:]):
        assert b / a == pytest.approx(0.5, rel=0.05)
    for a, b in zip(qv[2:], qv[3:]):
        assert b / a == pytest.approx(0.5, rel=0.05)
    fit = sc.scaling_summary(DEPTHS, metrics)
    assert fit["beta"] == pytest.approx(0.0, abs=0.02)
    assert fit["relative_median_increment_exponent"] == pytest.approx(1.0, abs=0.05)
    assert fit["relative_max_increment_exponent"] == pytest.approx(1.0, abs=0.05)
    assert fit["relative_qv_exponent"] == pytest.approx(1.0, abs=0.08)  # (L - 1) / L^2
    assert fit["regime"] == "smooth (ODE-like)"


def test_brownian_path_is_sde_like():
    # Five independent paths per depth: the exponents of their mean statistics.
    metrics = []
    for depth in DEPTHS:
        runs = [sc.path_metrics(_brownian_path(depth, seed)) for seed in range(5)]
        metrics.append({k: sum(r[k] for r in runs) / len(runs) for k in runs[0]})
    qv = [m["quadratic_variation"] for m in metrics]
    # E sum_k ||B_{k+1} - B_k||^2 = (L - 1) * 16 / L: of order one at every depth.
    for depth, value in zip(DEPTHS, qv):
        assert value == pytest.approx(16 * (depth - 1) / depth, rel=0.15)
    fit = sc.scaling_summary(DEPTHS, metrics)
    assert fit["qv_exponent"] == pytest.approx(0.0, abs=0.05)
    assert fit["median_increment_exponent"] == pytest.approx(0.5, abs=0.05)
    # The largest of L increments carries a slowly growing log factor, hence a bit below 1/2.
    assert 0.35 < fit["max_increment_exponent"] < 0.5
    assert fit["regime"] == "rough (SDE-like)"


def test_iid_path_is_neither():
    metrics = [sc.path_metrics(_iid_path(d, seed=d)) for d in DEPTHS]
    fit = sc.scaling_summary(DEPTHS, metrics)
    assert fit["qv_exponent"] == pytest.approx(-1.0, abs=0.05)  # QV grows like L
    assert fit["median_increment_exponent"] == pytest.approx(0.0, abs=0.05)
    assert fit["regime"] == "neither"


def test_smooth_path_with_jumps_is_neither():
    # Three jumps of fixed size: the typical increment shrinks like 1/L, the largest does
    # not, and the quadratic variation stays at the sum of the squared jumps.
    def jumpy(depth):
        t = (torch.arange(depth, dtype=torch.float64) + 0.5) / depth
        steps = sum((t > c).double() for c in (0.2, 0.5, 0.7))
        return _smooth_path(depth) + steps[:, None, None]

    fit = sc.scaling_summary(DEPTHS, [sc.path_metrics(jumpy(d)) for d in DEPTHS])
    assert fit["median_increment_exponent"] == pytest.approx(1.0, abs=0.1)
    assert fit["max_increment_exponent"] == pytest.approx(0.0, abs=0.05)
    assert fit["qv_exponent"] == pytest.approx(0.0, abs=0.05)
    assert fit["regime"] == "neither"


def test_scale_is_removed_before_judging():
    # A Brownian path shrunk as a whole by L^-1/2 has raw increments ~ 1/L, as a smooth path
    # would; judged on L^beta A it stays rough.
    metrics = [sc.path_metrics(_brownian_path(d, seed=1) / math.sqrt(d)) for d in DEPTHS]
    fit = sc.scaling_summary(DEPTHS, metrics)
    assert fit["beta"] == pytest.approx(0.5, abs=0.15)
    assert fit["qv_exponent"] == pytest.approx(1.0, abs=0.15)
    assert fit["regime"] == "rough (SDE-like)"


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0, 1.7])
def test_fit_recovers_beta(beta):
    generator = torch.Generator().manual_seed(3)
    noise = torch.exp(0.05 * torch.randn(len(DEPTHS), generator=generator, dtype=torch.float64))
    norms = [2.5 * d**-beta * float(e) for d, e in zip(DEPTHS, noise)]
    exponent, r2 = sc.fit_power_law(DEPTHS, norms)
    assert exponent == pytest.approx(beta, abs=0.03)
    assert r2 > (0.95 if beta > 0 else -math.inf)
    exact, exact_r2 = sc.fit_power_law(DEPTHS, [3.0 * d**-beta for d in DEPTHS])
    assert exact == pytest.approx(beta, abs=1e-12)
    assert exact_r2 == pytest.approx(1.0)


def test_fit_without_enough_information_is_nan():
    assert all(math.isnan(v) for v in sc.fit_power_law([8, 8], [1.0, 2.0]))
    assert all(math.isnan(v) for v in sc.fit_power_law([8, 16], [1.0, 0.0]))
    with pytest.raises(ValueError, match="differ in length"):
        sc.fit_power_law([8, 16], [1.0])


@pytest.mark.parametrize(
    ("increment", "qv", "regime"),
    [
        (1.0, 1.0, "smooth (ODE-like)"),
        (0.5, 0.0, "rough (SDE-like)"),
        (0.0, -1.0, "neither"),
        (0.0, 0.0, "neither"),  # a few jumps: increments do not shrink, QV stays
        (0.6, 0.9, "neither"),  # the two exponents disagree
        (math.nan, 1.0, "undetermined"),
    ],
)
def test_classify_regime(increment, qv, regime):
    assert sc.classify_regime(increment, qv) == regime


# ---------------------------------------------------------------------------------------------
# The network and its data


@pytest.mark.parametrize("activation", ["tanh", "relu"])
@pytest.mark.parametrize("delta_exponent", [1.0, 0.5])
def test_forward_matches_the_recursion(activation, delta_exponent):
    generator = torch.Generator().manual_seed(0)
    net = sc.ScalingResNet(5, 3, 6, 7, activation, delta_exponent, "standard", generator)
    x = torch.randn(4, 5, generator=generator)
    act = torch.tanh if activation == "tanh" else torch.relu
    h = x @ net.embed.weight.T + net.embed.bias
    for k in range(7):
        h = h + 7.0**-delta_exponent * act(h @ net.A[k].T + net.b[k])
    expected = h @ net.readout.weight.T + net.readout.bias
    out = net(x)
    assert out.shape == (4, 3)
    torch.testing.assert_close(out, expected)
    assert net.delta == pytest.approx(7.0**-delta_exponent)


def test_zero_residual_weights_leave_embedding_and_readout():
    net = sc.ScalingResNet(5, 3, 6, 16, "tanh")
    with torch.no_grad():
        net.A.zero_()
        net.b.zero_()
    x = torch.randn(4, 5)
    torch.testing.assert_close(net(x), net.readout(net.embed(x)))


def test_initialisations_are_seeded_and_shaped():
    def build(init, seed):
        return sc.ScalingResNet(3, 2, 8, 64, "relu", init=init, generator=_gen(seed))

    a, b = build("standard", 0), build("standard", 0)
    assert torch.equal(a.A, b.A) and torch.equal(a.b, b.b)
    assert not torch.equal(a.A, build("standard", 1).A)
    assert a.A.shape == (64, 8, 8) and a.b.shape == (64, 8)
    assert a.A.abs().max() <= 1 / math.sqrt(8)
    # The smooth initialisation is a smooth path, the standard one is not.
    smooth = sc.path_metrics(build("smooth", 0).A)
    standard = sc.path_metrics(a.A)
    assert smooth["quadratic_variation"] < 0.01 * standard["quadratic_variation"]
    assert smooth["max_norm"] == pytest.approx(standard["max_norm"], rel=0.5)


def test_network_rejects_bad_settings():
    with pytest.raises(ValueError, match="activation"):
        sc.ScalingResNet(3, 2, 4, 8, "gelu")
    with pytest.raises(ValueError, match="init"):
        sc.ScalingResNet(3, 2, 4, 8, init="orthogonal")
    with pytest.raises(ValueError, match="positive"):
        sc.ScalingResNet(3, 2, 4, 0)


def test_ode_flow_data_is_seeded_euler_flow():
    x, y = sc.ode_flow_data(64, dim=3, hidden=5, steps=50, seed=4)
    x2, y2 = sc.ode_flow_data(64, dim=3, hidden=5, steps=50, seed=4)
    assert x.shape == y.shape == (64, 3) and x.dtype == y.dtype == torch.float32
    assert torch.equal(x, x2) and torch.equal(y, y2)
    assert not torch.equal(x, sc.ode_flow_data(64, dim=3, hidden=5, steps=50, seed=5)[0])

    # The same field by the documented recipe, stepped by a plain Euler loop in float64.
    g = torch.Generator().manual_seed(4)
    W1 = torch.randn(5, 3, generator=g, dtype=torch.float64) * (2 / math.sqrt(3))
    b1 = torch.randn(5, generator=g, dtype=torch.float64) * 0.5
    W2 = torch.randn(3, 5, generator=g, dtype=torch.float64) * (2 / math.sqrt(5))
    state = torch.randn(64, 3, generator=g, dtype=torch.float64)
    for _ in range(50):
        state = state + (1 / 50) * torch.tanh(state @ W1.T + b1) @ W2.T
    torch.testing.assert_close(y, state.float())
    with pytest.raises(ValueError, match="positive"):
        sc.ode_flow_data(0)


def test_load_task_shapes():
    x_train, y_train, x_test, y_test = sc.load_task("ode_flow", seed=0, flow_samples=90)
    assert (x_train.shape, x_test.shape, y_train.shape) == ((60, 4), (30, 4), (60, 4))
    x_train, y_train, x_test, y_test = sc.load_task("digits", seed=0)
    assert x_train.shape == (1437, 64) and y_train.dtype == torch.int64 and len(x_test) == 360
    with pytest.raises(ValueError, match="task"):
        sc.load_task("cifar", seed=0)


# ---------------------------------------------------------------------------------------------
# Training and checkpoints


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _flow(n: int = 192):
    x, y = sc.ode_flow_data(n, seed=0)
    return (x[: n // 2], y[: n // 2]), (x[n // 2 :], y[n // 2 :])


def test_training_reduces_the_loss():
    train_data, test_data = _flow()
    net = sc.ScalingResNet(4, 4, 8, 16, "tanh", generator=_gen())
    before = sc.evaluate(net, *test_data)["loss"]
    config = sc.TrainConfig(epochs=15, batch_size=32, lr=0.05)
    result = sc.train(net, config, train_data, test_data)
    assert result["train_loss"] < 0.5 * result["initial_train_loss"]
    assert result["test_loss"] < 0.6 * before
    assert result["test_accuracy"] is None
    assert result["steps"] == 15 * 3 and len(result["history"]) == 15


def test_training_a_classifier_reports_accuracy():
    generator = _gen(1)
    x = torch.randn(120, 6, generator=generator)
    y = (x[:, 0] > 0).long()
    net = sc.ScalingResNet(6, 2, 8, 8, "relu", generator=_gen())
    result = sc.train(net, sc.TrainConfig(epochs=10, batch_size=30), (x, y), (x, y))
    assert result["test_accuracy"] > 0.9
    assert result["train_loss"] < result["initial_train_loss"]


def test_checkpoint_resume_continues_exactly(tmp_path):
    train_data, _ = _flow(96)
    path = str(tmp_path / "net.pt")

    straight = sc.ScalingResNet(4, 4, 6, 8, "tanh", generator=_gen())
    sc.train(straight, sc.TrainConfig(epochs=3, batch_size=16), train_data)

    first = sc.ScalingResNet(4, 4, 6, 8, "tanh", generator=_gen())
    sc.train(first, sc.TrainConfig(epochs=2, batch_size=16, checkpoint=path), train_data)
    state = torch.load(path, weights_only=True)
    assert state["epoch"] == 2 and len(state["history"]) == 2
    assert [p.name for p in tmp_path.iterdir()] == ["net.pt"]  # no temporary file left

    # A fresh network resumes from the file and ends where the uninterrupted run ended.
    resumed = sc.ScalingResNet(4, 4, 6, 8, "tanh", generator=_gen(9))
    config = sc.TrainConfig(epochs=3, batch_size=16, checkpoint=path, resume=True)
    result = sc.train(resumed, config, train_data)
    assert result["resumed_from_epoch"] == 2 and result["steps"] == 3
    assert len(result["history"]) == 3
    for a, b in zip(straight.parameters(), resumed.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert torch.load(path, weights_only=True)["epoch"] == 3


def test_train_config_checks():
    with pytest.raises(ValueError, match="resume needs"):
        sc.TrainConfig(resume=True)
    with pytest.raises(ValueError, match="lr"):
        sc.TrainConfig(lr=0.0)
    with pytest.raises(ValueError, match="depths"):
        sc.StudyConfig(depths=(8,))
    with pytest.raises(ValueError, match="tasks"):
        sc.StudyConfig(tasks=("mnist",))
    with pytest.raises(ValueError, match="entries"):
        sc.StudyConfig(width=2, entries=((2, 0),))


def test_depth_scaled_learning_rate():
    net = sc.ScalingResNet(3, 2, 4, 64, generator=_gen())
    groups = sc._optimizer(net, sc.TrainConfig(lr=0.1)).param_groups
    assert [g["lr"] for g in groups] == pytest.approx([0.1, 6.4])
    groups = sc._optimizer(net, sc.TrainConfig(lr=0.1, depth_scaled_lr=False)).param_groups
    assert [g["lr"] for g in groups] == pytest.approx([0.1, 0.1])


# ---------------------------------------------------------------------------------------------
# The study and the command


def test_study_resumes_finished_networks(tmp_path):
    config = sc.StudyConfig(
        depths=(2, 4),
        tasks=("ode_flow",),
        activations=("tanh",),
        inits=("smooth",),
        width=4,
        epochs=1,
        flow_samples=48,
        checkpoint_dir=str(tmp_path),
    )
    first = sc.run_study(config)
    assert sorted(os.listdir(tmp_path)) == [
        "ode_flow-tanh-smooth-L2.pt",
        "ode_flow-tanh-smooth-L4.pt",
    ]
    again = sc.run_study(sc.StudyConfig(**{**vars(config), "resume": True}))
    rows, rows_again = first["settings"][0]["rows"], again["settings"][0]["rows"]
    for row, row_again in zip(rows, rows_again):
        assert row_again["training"]["steps"] == 0  # finished networks are only measured
        assert row_again["weights"] == pytest.approx(row["weights"])
        assert row_again["update"] == pytest.approx(row["update"])


def test_diverged_depths_stay_out_of_the_fit(tmp_path):
    # A plain ResNet (delta = 1) with ReLU and a huge step: every depth blows up.
    config = sc.StudyConfig(
        depths=(2, 4),
        tasks=("ode_flow",),
        activations=("relu",),
        inits=("standard",),
        width=4,
        epochs=2,
        lr=1e6,
        delta_exponent=0.0,
        flow_samples=48,
    )
    with pytest.raises(sc.TrainingDiverged, match="became"):
        net = sc.ScalingResNet(4, 4, 4, 4, "relu", 0.0, generator=_gen())
        sc.train(net, config.train_config(), sc.ode_flow_data(32))
    results = sc.run_study(config)
    rows = results["settings"][0]["rows"]
    assert [row["diverged"] for row in rows] == [True, True]
    assert results["settings"][0]["fit"]["weights"]["regime"] == sc.UNDETERMINED
    assert "training diverged" in sc._results_table(results)
    sc.plot_weight_paths(results, str(tmp_path / "w.png"))
    sc.plot_scaling(results, str(tmp_path / "s.png"))


def test_reproduce_at_tiny_size(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    sc.add_reproduce_arguments(parser)
    out = tmp_path / "out"
    args = parser.parse_args(
        ["--depths", "2", "4", "--width", "4", "--epochs", "1", "--flow-samples", "48"]
        + ["--activations", "tanh", "relu", "--inits", "standard", "smooth"]
        + ["--out", str(out), "--no-progress", "--checkpoint-dir", str(tmp_path / "ck")]
    )
    assert sc.run_reproduce(args) == 0

    printed = capsys.readouterr().out
    assert "regime" in printed and "Cohen et al. (2021)" in printed
    for name in ("ode_flow/tanh/standard", "digits/relu/smooth"):
        assert name in printed
    assert sorted(os.listdir(out)) == ["results.json", "scaling.png", "weights.png"]
    with open(out / "results.json") as file:
        results = json.load(file)
    assert len(results["settings"]) == 8
    setting = results["settings"][0]
    assert [row["depth"] for row in setting["rows"]] == [2, 4]
    assert setting["fit"]["weights"]["regime"] in sc.REGIMES
    assert set(setting["rows"][0]["weights"]) == {
        "max_norm",
        "rss",
        "max_increment",
        "median_increment",
        "quadratic_variation",
    }
    assert len(setting["rows"][1]["paths"]["A[0,1]"]) == 4
    assert results["paper"]["findings"] == list(sc.PAPER_FINDINGS)
    assert len(os.listdir(tmp_path / "ck")) == 16


def test_reproduce_rejects_a_missing_gpu(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    parser = argparse.ArgumentParser()
    sc.add_reproduce_arguments(parser)
    with pytest.raises(ValueError, match="no CUDA device"):
        sc.run_reproduce(parser.parse_args(["--full", "--out", str(tmp_path)]))


def test_loss_matches_the_task():
    logits, labels = torch.randn(5, 3), torch.tensor([0, 2, 1, 1, 0])
    torch.testing.assert_close(sc._loss(logits, labels), F.cross_entropy(logits, labels))
    torch.testing.assert_close(sc._loss(logits, logits + 1), torch.tensor(1.0))


@pytest.mark.parametrize("depth", [8, 128])
def test_clip_bounds_the_per_layer_rms_at_every_depth(depth):
    net = sc.ScalingResNet(3, 2, 4, depth, generator=_gen())
    x, y = torch.randn(16, 3, generator=_gen(1)), torch.randn(16, 2, generator=_gen(2))
    sc._loss(net(x), y).backward()
    config = sc.TrainConfig(grad_clip=1e-3)
    sc._clip_residual(net, config)
    squares = sum(p.grad.square().sum() for p in net.residual_parameters())
    rms = float(squares.sqrt()) / net.delta / math.sqrt(depth)
    assert rms == pytest.approx(1e-3, rel=1e-4)
