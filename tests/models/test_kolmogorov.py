"""The deep Kolmogorov solver: closed forms against the sde kernels' Monte Carlo, the
Euler-Maruyama ResNet against sde.simulate, training, checkpoints, the commands, bad input."""

import argparse
import dataclasses
import json
import math
import os

import pytest
import torch

from deepkern.models import kolmogorov as kol
from deepkern.ops import sde
from tests.distributed import run_two_ranks

F64 = torch.float64
# Five standard errors: a correct closed form fails one such check with probability below 1e-6.
Z = 5.0


def _points(n, d, low=0.0, high=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return low + (high - low) * torch.rand(n, d, generator=g, dtype=F64)


def _sigmas(d):
    g = torch.Generator().manual_seed(1)
    lower = torch.tril(0.3 * torch.randn(d, d, generator=g, dtype=F64)) + torch.eye(d, dtype=F64)
    return {
        "scalar": torch.tensor(0.7, dtype=F64),
        "diagonal": 0.3 + torch.rand(d, generator=g, dtype=F64),
        "lower-triangular": lower,
    }


def _assert_within(estimate, se, exact):
    z = ((estimate - exact) / se).abs().max()
    assert z < Z, f"{float(z):.2f} standard errors apart"


# ---------------------------------------------------------------------------------------------
# Closed forms against Monte Carlo


@pytest.mark.parametrize("kind", ["scalar", "diagonal", "lower-triangular"])
def test_heat_closed_form_matches_monte_carlo(kind):
    sigma = _sigmas(4)[kind]
    x = _points(16, 4)
    # Zero drift: Euler-Maruyama is exact for any step count; three steps check that too.
    out = sde.monte_carlo(x, sigma, h=0.5, steps=3, paths=20000, seed=11)
    _assert_within(out[:, 0], out[:, 2], kol.heat_solution(x, sigma, T=1.5))


def test_heat_problem_is_the_paper_setting():
    problem = kol.make_problem("heat", 7, F64)
    x = _points(5, 7)
    torch.testing.assert_close(problem.solution(x), (x * x).sum(1) + 2 * 7)
    assert (problem.low, problem.high, problem.T) == (0.0, 1.0, 1.0)


@pytest.mark.parametrize("kind", ["scalar", "diagonal"])
def test_gaussian_heat_closed_form_matches_monte_carlo(kind):
    d, scale = 3, 2.0
    sigma = _sigmas(d)[kind]
    x = _points(12, d, -1.0, 1.0)
    paths = 20000
    x_T = sde.simulate(x.repeat_interleave(paths, 0), sigma, h=0.4, steps=2, seed=5)
    values = torch.exp(-(x_T * x_T).sum(1) / scale).reshape(-1, paths)
    exact = kol.gaussian_heat_solution(x, sigma, T=0.8, scale=scale)
    _assert_within(values.mean(1), values.std(1) / math.sqrt(paths), exact)


def test_gaussian_heat_problem_reference_matches_its_monte_carlo():
    problem = kol.make_problem("heat-gaussian", 4, F64)
    x = problem.sample(12, torch.Generator().manual_seed(2))
    mean, se = problem.monte_carlo(x, 20000, seed=3)
    _assert_within(mean, se, problem.solution(x))
    with pytest.raises(ValueError, match="diagonal"):
        kol.gaussian_heat_solution(x, torch.eye(4, dtype=F64), 1.0, 1.0)


def test_ornstein_uhlenbeck_chain_matches_monte_carlo():
    problem = kol.make_problem("ou", 3, F64, sde_steps=8)
    x = problem.sample(12, torch.Generator().manual_seed(4))
    mean, se = problem.monte_carlo(x, 20000, seed=6)
    # The chain's own expectation is exact for the simulated paths: a tight check.
    _assert_within(mean, se, problem.discrete_solution(x))


def test_ornstein_uhlenbeck_chain_converges_to_the_sde():
    problem = kol.make_problem("ou", 3, F64)
    x = problem.sample(8, torch.Generator().manual_seed(5))
    theta = -torch.diagonal(problem.drift.matrix)
    level = problem.drift.bias / theta
    exact = problem.solution(x)
    gaps = [
        (kol.ornstein_uhlenbeck_solution(x, theta, level, problem.sigma, 1.0, n) - exact).abs()
        for n in (50, 100, 200)
    ]
    # Euler-Maruyama's weak error is first order in h: halving h halves the gap.
    for coarse, fine in zip(gaps[:-1], gaps[1:]):
        ratio = coarse / fine
        assert ((ratio > 1.8) & (ratio < 2.2)).all(), ratio
    assert (gaps[-1] / exact).max() < 5e-3


def _black_scholes_call(x, sigma, drift, rate, strike, T):
    d1 = (torch.log(x / strike) + (drift + sigma**2 / 2) * T) / (sigma * math.sqrt(T))
    d2 = d1 - sigma * math.sqrt(T)
    cdf = torch.special.ndtr
    return math.exp(-rate * T) * (x * math.exp(drift * T) * cdf(d1) - strike * cdf(d2))


@pytest.mark.parametrize("sigma", [0.105, 0.6])
def test_max_call_quadrature_is_black_scholes_in_one_dimension(sigma):
    x = torch.linspace(60, 140, 9, dtype=F64)[:, None]
    drift, rate, T = -0.05, 0.05, 1.0
    mean = torch.log(x) + (drift - sigma**2 / 2) * T
    std = torch.tensor([sigma * math.sqrt(T)], dtype=F64)
    price = kol.max_call_solution(mean, std, 100.0, math.exp(-rate * T))
    exact = _black_scholes_call(x[:, 0], sigma, drift, rate, 100.0, T)
    torch.testing.assert_close(price, exact, rtol=1e-12, atol=1e-12)


def test_max_call_problem_matches_monte_carlo_and_the_discounted_payoff():
    problem = kol.make_problem("max-call", 6, F64)
    x = problem.sample(10, torch.Generator().manual_seed(6))
    mean, se = problem.monte_carlo(x, 20000, seed=7)  # the fused max_call functional
    _assert_within(mean, se, problem.solution(x))
    # The same expectation from stored paths and the payoff written in PyTorch.
    paths = 20000
    labels = problem.labels(x.repeat_interleave(paths, 0), seed=8).reshape(-1, paths)
    _assert_within(labels.mean(1), labels.std(1) / math.sqrt(paths), problem.solution(x))


def test_max_call_problem_in_float32_agrees_with_float64():
    x = _points(6, 20, 90.0, 110.0)
    u64 = kol.make_problem("max-call", 20, F64).solution(x)
    u32 = kol.make_problem("max-call", 20, torch.float32).solution(x.float())
    assert u32.dtype == torch.float32
    torch.testing.assert_close(u32.double(), u64, rtol=1e-6, atol=0)


def test_sine_drift_reference_has_a_standard_error_and_agrees_with_stored_paths():
    problem = kol.make_problem("sine-drift", 3, F64, sde_steps=16)
    assert problem.solution is None and problem.drift.kind == 2
    x = problem.sample(8, torch.Generator().manual_seed(9))
    fused, fused_se = problem.monte_carlo(x, 8192, seed=10)
    u, se, kind = problem.reference(x, 8192, seed=10)
    assert kind.startswith("Monte Carlo") and (se > 0).all()
    torch.testing.assert_close(u, fused)
    stored, stored_se = dataclasses.replace(problem, functional=None).monte_carlo(x, 8192, seed=12)
    _assert_within(fused - stored, torch.sqrt(fused_se**2 + stored_se**2), 0.0)
    # The problem is the same in every run.
    again = kol.make_problem("sine-drift", 3, F64, sde_steps=16)
    assert torch.equal(again.drift.matrix, problem.drift.matrix)


# ---------------------------------------------------------------------------------------------
# The Euler-Maruyama ResNet


def _drifts(d):
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g, dtype=F64)  # noqa: E731
    return {
        "zero": sde.Drift.zero(),
        "linear": sde.Drift.linear(0.3 * r(d, d), r(d)),
        "mlp-sine": sde.Drift.mlp(r(6, d), r(6), 0.3 * r(d, 6), r(d), "sine"),
    }


@pytest.mark.parametrize("drift_kind", ["zero", "linear", "mlp-sine"])
@pytest.mark.parametrize("sigma_kind", ["scalar", "diagonal", "lower-triangular"])
def test_em_resnet_reproduces_simulate(drift_kind, sigma_kind):
    d = 3
    drift, sigma = _drifts(d)[drift_kind], _sigmas(d)[sigma_kind]
    x0 = _points(5, d, -1.0, 1.0)
    net = kol.EulerMaruyamaResNet(sigma, drift, h=0.05, steps=12)
    for kwargs in ({}, {"first_step": 7}, {"antithetic": True}):
        ours = net(x0, seed=21, **kwargs)
        theirs = sde.simulate(x0, sigma, drift, h=0.05, steps=12, seed=21, **kwargs)
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-12)
    saved = net(x0, seed=21, save_every=4)
    expected = sde.simulate(x0, sigma, drift, h=0.05, steps=12, seed=21, save_every=4)
    assert saved.shape == (5, 4, d)
    torch.testing.assert_close(saved, expected, rtol=0, atol=1e-12)


def test_em_resnet_gradients_match_the_kernel_replay():
    d = 3
    drift, sigma = _drifts(d)["mlp-sine"], _sigmas(d)["diagonal"]
    x0 = _points(4, d).requires_grad_(True)
    net = kol.EulerMaruyamaResNet(sigma, drift, h=0.1, steps=9)
    weights = torch.linspace(0.5, 1.5, d, dtype=F64)
    ours = torch.autograd.grad((net(x0, seed=3) * weights).sum(), [x0, *net.parameters()])

    live = [p.detach().clone().requires_grad_(True) for p in drift.parameters()]
    kernel_drift = sde.Drift.mlp(*live, "sine")
    x_T = sde.simulate(x0, sigma, kernel_drift, h=0.1, steps=9, seed=3)
    theirs = torch.autograd.grad((x_T * weights).sum(), [x0, *live])
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_em_resnet_average_is_the_solution():
    heat = kol.make_problem("heat", 3, F64, sde_steps=4)
    x = heat.sample(6, torch.Generator().manual_seed(1))
    mean, se = kol.EulerMaruyamaResNet.from_problem(heat).expectation(x, heat.payoff, 4000, 2)
    _assert_within(mean, se, heat.solution(x))

    ou = kol.make_problem("ou", 2, F64, sde_steps=10)
    net = kol.EulerMaruyamaResNet.from_problem(ou)
    mean, se = net.expectation(ou.state(x[:, :2]), ou.payoff, 4000, 3)
    _assert_within(mean, se, ou.discrete_solution(x[:, :2]))


def test_em_resnet_explicit_noise_and_errors():
    net = kol.EulerMaruyamaResNet(torch.tensor(1.0, dtype=F64), h=0.1, steps=3)
    x0 = torch.zeros(2, 2, dtype=F64)
    z = torch.ones(3, 2, 2, dtype=F64)
    torch.testing.assert_close(net(x0, noise=z), 3 * math.sqrt(0.1) * z[0])
    with pytest.raises(ValueError, match="noise must have shape"):
        net(x0, noise=torch.ones(2, 2, 2, dtype=F64))
    with pytest.raises(ValueError, match="seed"):
        net(x0)
    with pytest.raises(ValueError, match="multiple of save_every"):
        net(x0, seed=1, save_every=2)
    with pytest.raises(ValueError, match="steps"):
        kol.EulerMaruyamaResNet(torch.tensor(1.0), h=0.1, steps=-1)
    with pytest.raises(ValueError, match="h must be positive"):
        kol.EulerMaruyamaResNet(torch.tensor(1.0), h=0.0, steps=2)


# ---------------------------------------------------------------------------------------------
# Networks


@pytest.mark.parametrize("dim", [1, 10, 100])
def test_networks_shapes_and_parameter_budget(dim):
    plain = kol.build_network("plain", dim)
    resnet = kol.build_network("resnet", dim)
    assert plain.width == dim + 100
    budget = kol.count_parameters(plain)
    assert budget == kol._plain_parameters(dim, dim + 100)
    assert kol.count_parameters(resnet) == kol._resnet_parameters(dim, resnet.width, 3)
    assert 0.97 * budget <= kol.count_parameters(resnet) <= budget
    x = torch.rand(8, dim)
    assert plain(x).shape == resnet(x).shape == (8,)


def test_init_output_sets_the_output_mean_and_spread():
    net = kol.PlainNet(4, width=8, generator=torch.Generator().manual_seed(0))
    net.init_output(150.0, 2.5)
    with torch.no_grad():
        out = net(torch.rand(512, 4))
    torch.testing.assert_close(float(out.mean()), 150.0, rtol=1e-5, atol=0)
    torch.testing.assert_close(float(out.std(correction=0)), 2.5, rtol=1e-3, atol=0)


def test_output_statistics_see_through_label_noise():
    problem = kol.make_problem("heat", 20, F64)
    mean, spread = kol.output_statistics(problem, 1024, 64, seed=0)
    # u = |x|^2 + 40 on [0, 1]^20: mean 20/3 + 40, variance 20 (1/5 - 1/9) = 1.78, while the
    # labels spread by about 15.
    assert abs(mean - (20 / 3 + 40)) < 0.3
    assert 0.7 * math.sqrt(1.78) < spread < 1.3 * math.sqrt(1.78)


# ---------------------------------------------------------------------------------------------
# Training, checkpoints


def _config(**kwargs):
    settings = dict(
        problem="heat",
        dim=3,
        steps=150,
        batch_size=128,
        lr=3e-3,
        progress=False,
        log_every=25,
        eval_points=1024,
        seed=1,
    )
    settings.update(kwargs)
    return kol.TrainConfig(**settings)


@pytest.mark.parametrize("network", ["plain", "resnet"])
def test_short_training_beats_a_constant(network):
    config = _config(network=network)
    model = config.make_network()
    metrics = kol.train(model, config)
    evaluation = metrics["evaluation"]
    assert evaluation["reference"] == "closed form"
    assert evaluation["rel_l1"] < 0.5 * evaluation["constant_rel_l1"]
    assert evaluation["rel_l1"] <= evaluation["rel_l2"] <= evaluation["rel_linf"]
    assert [h["step"] for h in metrics["history"]] == [25, 50, 75, 100, 125, 150]
    assert metrics["start_step"] == 0 and metrics["parameters"] == kol.count_parameters(model)
    assert metrics["history"][-1]["lr"] == pytest.approx(3e-5)  # after both decays


def test_training_with_a_monte_carlo_reference_reports_its_standard_error():
    config = _config(
        problem="sine-drift", dim=2, steps=40, sde_steps=4, eval_points=32, reference_paths=256
    )
    evaluation = kol.train(config.make_network(), config)["evaluation"]
    assert evaluation["reference"] == "Monte Carlo, 256 paths per point"
    assert 0 < evaluation["reference_rel_se_mean"] <= evaluation["reference_rel_se_max"] < 0.1


def test_resume_continues_exactly(tmp_path, monkeypatch):
    settings = dict(steps=12, lr_decay_at=(0.5,), log_every=2, checkpoint_every=4, eval_points=0)
    straight = _config(**settings)
    model_a = straight.make_network()
    full = kol.train(model_a, straight)

    class Crash(Exception):
        pass

    batch = kol._batch

    def crash_at_step_seven(problem, config, rank, step):
        if step == 6:
            raise Crash
        return batch(problem, config, rank, step)

    path = str(tmp_path / "run.pt")
    monkeypatch.setattr(kol, "_batch", crash_at_step_seven)
    with pytest.raises(Crash):
        kol.train(
            _config(**settings, checkpoint=path).make_network(),
            _config(**settings, checkpoint=path),
        )
    monkeypatch.setattr(kol, "_batch", batch)
    assert torch.load(path, weights_only=True)["step"] == 4

    # A fresh process builds the network anew; its initial weights do not matter.
    resumed_config = _config(**settings, checkpoint=path, resume=True)
    model_b = kol.build_network("plain", 3, generator=torch.Generator().manual_seed(99))
    resumed = kol.train(model_b, resumed_config)
    assert resumed["start_step"] == 4
    for (name, a), (_, b) in zip(model_a.state_dict().items(), model_b.state_dict().items()):
        assert torch.equal(a, b), name
    assert resumed["history"] == full["history"]
    assert os.listdir(tmp_path) == ["run.pt"]  # the atomic writes left no temporary file

    with pytest.raises(ValueError, match="problem"):
        kol.train(
            kol.build_network("plain", 3),
            _config(**settings, problem="ou", checkpoint=path, resume=True),
        )


# ---------------------------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize("dim", [0, -3, 2.5, True, "4", None])
def test_bad_dimensions_are_refused(dim):
    with pytest.raises(ValueError, match="dim must be a positive integer"):
        kol.make_problem("heat", dim)
    with pytest.raises(ValueError, match="dim must be a positive integer"):
        kol.TrainConfig(dim=dim)


def test_bad_input_gives_clear_errors():
    with pytest.raises(ValueError, match="unknown problem 'wave'; choose one of heat, "):
        kol.make_problem("wave", 3)
    with pytest.raises(ValueError, match="unknown problem"):
        kol.TrainConfig(problem="wave")
    assert kol.make_problem("max_call", 2).name == "max-call"
    with pytest.raises(ValueError, match="batch_size must be an integer >= 2"):
        kol.TrainConfig(batch_size=1)
    with pytest.raises(ValueError, match="sde_steps"):
        kol.make_problem("ou", 2, sde_steps=0)
    with pytest.raises(ValueError, match="dtype"):
        kol.make_problem("heat", 2, dtype=torch.float16)
    with pytest.raises(ValueError, match="lr must be positive"):
        kol.TrainConfig(lr=float("nan"))
    with pytest.raises(ValueError, match="lr_decay_at"):
        kol.TrainConfig(lr_decay_at=(1.5,))
    with pytest.raises(ValueError, match="network must be"):
        kol.TrainConfig(network="transformer")
    with pytest.raises(ValueError, match="resume needs a checkpoint"):
        kol.TrainConfig(resume=True)
    with pytest.raises(ValueError, match="network must be"):
        kol.build_network("mlp", 3)
    config = kol.TrainConfig(dim=3, steps=1, progress=False, eval_points=0)
    with pytest.raises(ValueError, match="inputs of dimension 4, not 3"):
        kol.train(kol.build_network("plain", 4), config)
    with pytest.raises(ValueError, match="the problem has dimension 5"):
        kol.train(kol.build_network("plain", 3), config, kol.make_problem("heat", 5))


def test_a_diverging_run_says_so():
    config = _config(steps=6, log_every=3, lr=1e30, eval_points=0)
    with pytest.raises(ValueError, match="not finite"):
        kol.train(config.make_network(), config)


# ---------------------------------------------------------------------------------------------
# Commands


def _parse(add_arguments, argv):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(argv)


def test_kolmogorov_command_writes_results_and_plot(tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["--problem", "ou", "--dim", "2", "--steps", "30", "--batch-size", "64"]
    argv += ["--sde-steps", "10", "--eval-points", "256", "--no-progress", "--out", str(out)]
    args = _parse(kol.add_kolmogorov_arguments, argv)
    assert kol.run_kolmogorov(args) == 0
    printed = capsys.readouterr().out
    assert "relative L1" in printed and "Euler-Maruyama chain itself" in printed
    report = json.loads((out / "results.json").read_text())
    evaluation = report["training"]["evaluation"]
    assert evaluation["points"] == 256 and evaluation["discretisation_rel_l1"] > 0
    assert report["settings"]["problem"] == "ou" and report["problem"]["dim"] == 2
    assert (out / "prediction.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_kolmogorov_command_rejects_bad_arguments(tmp_path):
    args = _parse(kol.add_kolmogorov_arguments, ["--problem", "wave", "--out", str(tmp_path)])
    with pytest.raises(ValueError, match="unknown problem"):
        kol.run_kolmogorov(args)
    args = _parse(kol.add_kolmogorov_arguments, ["--dim", "0", "--out", str(tmp_path)])
    with pytest.raises(ValueError, match="dim must be a positive integer"):
        kol.run_kolmogorov(args)


def test_reproduce_command_prints_the_comparison(tmp_path, capsys):
    out = tmp_path / "reproduce.json"
    argv = ["--quick", "--cases", "heat:2", "max-call:2", "--no-progress", "--out", str(out)]
    assert kol.run_reproduce(_parse(kol.add_reproduce_arguments, argv)) == 0
    printed = capsys.readouterr().out
    assert "heat d=2" in printed and "max-call d=2" in printed and "published L1" in printed
    rows = json.loads(out.read_text())["rows"]
    assert [(r["problem"], r["dim"]) for r in rows] == [("heat", 2), ("max-call", 2)]
    assert all(r["evaluation"]["rel_l1"] < r["evaluation"]["constant_rel_l1"] for r in rows)
    with pytest.raises(ValueError, match="PROBLEM:DIM"):
        kol.run_reproduce(_parse(kol.add_reproduce_arguments, ["--quick", "--cases", "heat"]))
    with pytest.raises(SystemExit):  # the sizes exclude each other
        _parse(kol.add_reproduce_arguments, ["--quick", "--full"])


def test_reproduce_full_size_takes_overrides(tmp_path, capsys):
    argv = ["--full", "--cases", "heat:2", "--steps", "3", "--batch-size", "16"]
    argv += ["--eval-points", "8", "--no-progress", "--checkpoint-dir", str(tmp_path)]
    assert kol.run_reproduce(_parse(kol.add_reproduce_arguments, argv)) == 0
    assert "3 x 16" in capsys.readouterr().out
    assert torch.load(tmp_path / "heat-2.pt", weights_only=True)["step"] == 3


def test_published_figures_are_for_the_paper_settings():
    for (problem, dim), figure in kol.PUBLISHED.items():
        assert problem in kol.PROBLEMS and dim >= 1
        assert 0 < figure["rel_l1"] <= figure["rel_l2"] <= figure["rel_linf"]
        assert figure["steps"] > 0 and figure["batch_size"] > 0 and figure["source"]


# ---------------------------------------------------------------------------------------------
# Data parallel training on two CPU processes


def _train_on_rank() -> dict:
    config = _config(steps=4, batch_size=32, eval_points=0, log_every=2)
    model = config.make_network()
    metrics = kol.train(model, config)
    params = {name: p.detach().clone() for name, p in model.named_parameters()}
    return {"params": params, "metrics": metrics}


def test_ddp_gloo_two_processes(tmp_path):
    results = run_two_ranks(_train_on_rank, tmp_path)
    assert results[0]["metrics"]["world_size"] == 2
    initial = dict(_config().make_network().named_parameters())
    changed = 0
    for name, p0 in results[0]["params"].items():
        assert torch.equal(p0, results[1]["params"][name]), name
        changed += not torch.equal(p0, initial[name].detach())
    assert changed > 0


# ---------------------------------------------------------------------------------------------
# CUDA (skipped without a device)


@pytest.mark.cuda
def test_cuda_training_references_and_em_resnet():
    problem = kol.make_problem("max-call", 5, F64, device="cuda")
    x = problem.sample(64, torch.Generator().manual_seed(0))
    assert x.is_cuda and problem.labels(x, seed=1).is_cuda
    cpu = kol.make_problem("max-call", 5, F64)
    torch.testing.assert_close(problem.solution(x).cpu(), cpu.solution(x.cpu()))

    sigma = _sigmas(3)["lower-triangular"].cuda()
    drift = _drifts(3)["mlp-sine"]
    drift = sde.Drift.mlp(*(p.cuda() for p in drift.parameters()), "sine")
    x0 = _points(5, 3).cuda()
    net = kol.EulerMaruyamaResNet(sigma, drift, h=0.05, steps=6).cuda()
    expected = sde.simulate(x0, sigma, drift, h=0.05, steps=6, seed=4)
    torch.testing.assert_close(net(x0, seed=4), expected, rtol=0, atol=1e-12)

    config = _config(device="cuda", steps=20, eval_points=256)
    metrics = kol.train(config.make_network(), config)
    assert math.isfinite(metrics["evaluation"]["rel_l1"])
