"""RLE keypoint models: metrics on hand cases, training, resume, DDP, the reproduce command."""

from __future__ import annotations

import argparse
import json
import math
import os

import pytest
import torch

from deepkern.data.keypoints import make_stick_figures
from deepkern.models import rle
from tests.distributed import run_two_ranks

# ---------------------------------------------------------------------------------------------
# Metrics on hand-worked cases


def test_pck_hand_case():
    target = torch.zeros(2, 3, 2)
    pred = torch.tensor(
        [
            [[0.9, 0.0], [0.0, 1.1], [3.0, 4.0]],  # distances 0.9, 1.1, 5
            [[0.6, 0.8], [2.0, 0.0], [0.0, 0.0]],  # distances 1, 2, 0 (the last invisible)
        ]
    )
    visible = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    scale = torch.tensor([10.0, 20.0])
    # Thresholds 1 and 2 pixels: hits 0.9 (yes), 1.1 (no), 5 (no); 1 (yes), 2 (yes).
    assert rle.pck(pred, target, visible, scale, alpha=0.1) == pytest.approx(3 / 5)
    # Thresholds 3 and 6 pixels: only the distance 5 of the first image misses.
    assert rle.pck(pred, target, visible, scale, alpha=0.3) == pytest.approx(4 / 5)
    assert rle.pck(pred, target, visible, scale, alpha=0.5) == pytest.approx(1.0)
    assert math.isnan(rle.pck(pred, target, torch.zeros(2, 3), scale))


def test_oks_hand_case():
    target = torch.zeros(2, 2, 2)
    pred = torch.tensor([[[1.0, 0.0], [0.0, 0.0]], [[0.0, 2.0], [5.0, 5.0]]])
    visible = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    scale = torch.tensor([2.0, 4.0])
    sigmas = (0.25, 0.1)  # k = 0.5 and 0.2
    similarity = rle.oks(pred, target, visible, scale, sigmas)
    # Image 0: exp(-1 / (2 * 4 * 0.25)) and exp(0) averaged; image 1: exp(-4 / (2 * 16 * 0.25)).
    expected = torch.tensor([(math.exp(-0.5) + 1.0) / 2, math.exp(-0.5)], dtype=torch.float64)
    torch.testing.assert_close(similarity, expected)
    assert torch.isnan(rle.oks(pred, target, torch.zeros(2, 2), scale, sigmas)).all()


def test_oks_ap_hand_case():
    similarity = torch.tensor([0.92, 0.4, 0.92, 0.4], dtype=torch.float64)
    # Ranked hit, miss, hit, miss. Thresholds 0.50 ... 0.90 (nine of them): recall 1/4, 1/4,
    # 1/2, 1/2 and monotone precision 1, 2/3, 2/3, 1/2: the 26 recall levels 0 ... 0.25 read
    # 1, the 25 levels 0.26 ... 0.50 read 2/3, the rest 0. At 0.95 nothing is a hit.
    per_threshold = (26 + 25 * 2 / 3) / 101
    good = rle.oks_ap(similarity, torch.tensor([4.0, 3.0, 2.0, 1.0]))
    assert good["ap"] == pytest.approx(9 * per_threshold / 10)
    assert good["ap50"] == pytest.approx(per_threshold)
    assert good["ap75"] == pytest.approx(per_threshold)
    assert good["ar"] == pytest.approx(9 * 0.5 / 10)

    # Misses ranked first: monotone precision 1/2 at every recall level up to 1/2.
    bad = rle.oks_ap(similarity, torch.tensor([1.0, 4.0, 2.0, 3.0]))
    assert bad["ap"] == pytest.approx(9 * (51 * 0.5 / 101) / 10)
    assert bad["ar"] == good["ar"]

    # Equal scores keep the image order; NaN images are left out; perfect predictions give 1.
    tied = rle.oks_ap(similarity, torch.ones(4))
    assert tied["ap"] == pytest.approx(good["ap"])
    perfect = rle.oks_ap(torch.tensor([1.0, float("nan"), 1.0]), torch.rand(3))
    assert perfect["ap"] == pytest.approx(1.0) and perfect["ar"] == pytest.approx(1.0)


def test_scale_calibration_against_base_and_reference():
    generator = torch.Generator().manual_seed(0)
    target = torch.randn(4000, 1, 2, generator=generator)
    pred, visible = torch.zeros_like(target), torch.ones(4000, 1)
    calibrated = rle.scale_calibration(pred, torch.ones_like(target), target, visible, "gaussian")
    assert calibrated["ece"] < 0.02
    for share, level in zip(calibrated["within"], calibrated["nominal"]):
        assert share == pytest.approx(level, abs=0.02)
    # Scales twice too large: about 95% of the residuals fall inside the 68% interval.
    wide = rle.scale_calibration(pred, 2 * torch.ones_like(target), target, visible, "gaussian")
    assert wide["within"][0] == pytest.approx(0.954, abs=0.02) and wide["ece"] > 0.15
    # Gaussian reference samples with equal weights agree with the Gaussian base.
    samples = torch.randn(50000, 2, generator=generator)
    reference = (samples, torch.full((50000,), 1 / 50000))
    ref = rle.scale_calibration(pred, torch.ones_like(target), target, visible, reference=reference)
    assert ref["ece"] < 0.02
    # Unit-Laplace residuals are calibrated against the Laplace base.
    u = torch.rand(4000, 1, 2, generator=generator) - 0.5
    laplace = -torch.sign(u) * torch.log1p(-2 * u.abs())
    ok = rle.scale_calibration(pred, torch.ones_like(u), laplace, visible, "laplace")
    assert ok["ece"] < 0.02


def test_heatmap_decoding_and_target_round_trip():
    point = torch.tensor([[[5.3, 7.0]]])
    maps = rle._gaussian_heatmaps(point, 16, 1.0)
    decoded, maxima = rle._decode_heatmaps(maps)
    torch.testing.assert_close(decoded, torch.tensor([[[5.25, 7.0]]]))
    assert maxima.item() == pytest.approx(math.exp(-0.09 / 2), rel=1e-5)


# ---------------------------------------------------------------------------------------------
# Models and training


def _data(n: int = 48, seed: int = 0):
    return make_stick_figures(n, size=32, seed=seed, noise_scale=0.04)


@pytest.mark.parametrize("method", rle.METHODS)
def test_forward_shapes_and_loss(method):
    data = _data(4)
    model = rle.KeypointModel(method, 11, 32, width=4)
    out = model(data.images, data.keypoints, data.visible)
    assert out["keypoints"].shape == (4, 11, 2) and out["score"].shape == (4,)
    assert out["loss"].dim() == 0 and torch.isfinite(out["loss"])
    assert (out["sigma"] is not None) == (method == "rle")
    if method == "rle":
        assert (out["sigma"] > 0).all()
        flow = {id(p) for p in model.rle.flow.parameters()}
        assert flow and flow <= {id(p) for p in model.parameters()}


def test_model_errors():
    with pytest.raises(ValueError, match="method"):
        rle.KeypointModel("l3", 11)
    model = rle.KeypointModel("l1", 11, 32, width=4)
    with pytest.raises(ValueError, match="images"):
        model(torch.zeros(2, 1, 16, 16))
    with pytest.raises(ValueError, match="target must be"):
        model(torch.zeros(2, 1, 32, 32), torch.zeros(2, 10, 2))
    with pytest.raises(ValueError, match="target_weight"):
        model(torch.zeros(2, 1, 32, 32), torch.zeros(2, 11, 2), torch.ones(2, 11, 2))
    with pytest.raises(ValueError, match="epochs"):
        rle.TrainConfig(epochs=-1)
    with pytest.raises(ValueError, match="lr"):
        rle.TrainConfig(lr=0.0)
    with pytest.raises(ValueError, match="resume"):
        rle.TrainConfig(resume=True)
    with pytest.raises(ValueError, match="train_data"):
        rle.train(rle.KeypointModel("l1", 3, 32, width=4), rle.TrainConfig(), _data(4))
    with pytest.raises(ValueError, match="scale must be > 0"):
        rle.pck(torch.zeros(1, 1, 2), torch.zeros(1, 1, 2), torch.ones(1, 1), torch.zeros(1))


def _tiny_config(**kwargs) -> rle.TrainConfig:
    settings = {"epochs": 4, "batch_size": 16, "lr": 3e-3, "progress": False}
    settings.update(kwargs)
    return rle.TrainConfig(**settings)


@pytest.mark.parametrize("method", ["l1", "heatmap", "rle"])
def test_training_lowers_the_loss(method):
    train_data, test_data = _data(64), _data(16, seed=1)
    model = rle.KeypointModel(method, 11, 32, width=4)
    result = rle.train(model, _tiny_config(), train_data, test_data)
    losses = [record["train_loss"] for record in result["history"]]
    assert losses[-1] < losses[0]
    test = result["test"]
    assert 0.0 <= test["pck_0.1"] <= 1.0 and 0.0 <= test["ap"] <= 1.0
    assert (test["calibration"] is not None) == (method == "rle")


def test_resume_continues_exactly(tmp_path, monkeypatch):
    data = _data(48)
    straight = rle.KeypointModel("rle", 11, 32, width=4)
    full = rle.train(straight, _tiny_config(epochs=2), data)

    # Crash in the second epoch, after the first one's checkpoint is written.
    class Crash(Exception):
        pass

    train_epoch = rle._train_epoch

    def crash_in_second_epoch(*args):
        if args[4] == 1:
            raise Crash
        return train_epoch(*args)

    path = str(tmp_path / "rle.pt")
    interrupted = rle.KeypointModel("rle", 11, 32, width=4)
    monkeypatch.setattr(rle, "_train_epoch", crash_in_second_epoch)
    with pytest.raises(Crash):
        rle.train(interrupted, _tiny_config(epochs=2, checkpoint=path), data)
    monkeypatch.setattr(rle, "_train_epoch", train_epoch)
    assert torch.load(path, weights_only=True)["epoch"] == 1

    # A fresh process builds the model anew; its initial weights do not matter.
    resumed = rle.KeypointModel("rle", 11, 32, width=4, seed=99)
    result = rle.train(resumed, _tiny_config(epochs=2, checkpoint=path, resume=True), data)
    assert result["start_epoch"] == 1
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    assert [h["train_loss"] for h in result["history"]] == [
        h["train_loss"] for h in full["history"]
    ]
    # Atomic writes leave no temporary files behind.
    assert os.listdir(tmp_path) == ["rle.pt"]


# ---------------------------------------------------------------------------------------------
# Data parallel training on two CPU processes


def _train_on_rank() -> dict:
    model = rle.KeypointModel("rle", 11, 32, width=4)
    metrics = rle.train(model, _tiny_config(epochs=1, batch_size=8), _data(32))
    params = {name: p.detach().clone() for name, p in model.named_parameters()}
    return {"params": params, "loss": metrics["train_loss"]}


@pytest.mark.slow
def test_ddp_gloo_two_processes(tmp_path):
    results = run_two_ranks(_train_on_rank, tmp_path)
    initial = dict(rle.KeypointModel("rle", 11, 32, width=4).named_parameters())
    flow_changed = 0
    for name, p0 in results[0]["params"].items():
        assert torch.equal(p0, results[1]["params"][name]), name
        flow_changed += name.startswith("rle.flow") and not torch.equal(p0, initial[name])
    # The flow's parameters are reduced across processes like the network's.
    assert flow_changed > 0
    assert results[0]["loss"] == results[1]["loss"]


# ---------------------------------------------------------------------------------------------
# The reproduce command


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    rle.add_reproduce_arguments(parser)
    return parser.parse_args(argv)


def test_reproduce_quick_prints_the_table(tmp_path, capsys):
    argv = ["--quick", "--no-progress", "--out", str(tmp_path)]
    assert rle.run_reproduce(_parse(argv)) == 0
    printed = capsys.readouterr().out
    for text in ("paper: COCO val, ResNet-50", "52.8", "70.6", "stick figures", "digits"):
        assert text in printed
    for label in ("L1", "L2", "heatmap", "RLE"):
        assert f"| {label}" in printed
    report = json.loads((tmp_path / "rle.json").read_text())
    assert set(report["results"]) == {"figures", "digits"}
    rle_test = report["results"]["figures"]["rle"]["test"]
    assert rle_test["calibration"] is not None and rle_test["calibration_truth"] is not None
    assert report["results"]["figures"]["l1"]["test"]["calibration"] is None
    assert "preview_images" not in report["results"]["figures"]
    for name in ("figures.png", "digits.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_reproduce_settings():
    full = rle._resolve(_parse(["--full", "--epochs", "3", "--tasks", "digits"]))
    assert (full.size, full.n_train, full.width, full.epochs) == (64, 50000, 64, 3)
    assert full.tasks == ("digits",)
    quick = rle._resolve(_parse(["--quick", "--variant", "official"]))
    assert quick.variant == "official" and quick.epochs == 1
    with pytest.raises(ValueError, match="--epochs"):
        rle.run_reproduce(_parse(["--quick", "--epochs", "-1"]))
    with pytest.raises(ValueError, match="--occlusion"):
        rle.run_reproduce(_parse(["--quick", "--occlusion", "2"]))
    with pytest.raises(SystemExit):
        _parse(["--quick", "--full"])
