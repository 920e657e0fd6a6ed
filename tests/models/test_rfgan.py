"""RFGAN and DCGAN: networks, the frozen encoder, single steps, measures, resume, DDP, CLI."""

from __future__ import annotations

import json
import math
import os
import struct
import zlib

import numpy as np
import pytest
import torch

from deepkern.cli import main
from deepkern.models import gan_metrics as gm
from deepkern.models import rfgan as rf
from tests.distributed import run_two_ranks


def _generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _images(n: int, channels: int = 1, size: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, channels, size, size, generator=_generator(seed)) * 2 - 1


def _rfgan_discriminator(size=16, channels=1, width=4, code_dim=6, seed=0) -> rf.Discriminator:
    encoder = rf.Encoder(size, channels, width, code_dim, generator=_generator(seed + 1))
    return rf.Discriminator(size, channels, width, encoder, generator=_generator(seed))


def _snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: t.detach().clone() for name, t in module.state_dict().items()}


def _changed(before: dict, module: torch.nn.Module, names=None) -> list[str]:
    after = module.state_dict()
    names = names if names is not None else before
    return [n for n in names if not torch.equal(before[n], after[n])]


# ---------------------------------------------------------------------------------------------
# Networks


@pytest.mark.parametrize("size, channels", [(16, 1), (32, 3)])
def test_network_shapes(size, channels):
    width, latent = 4, 8
    generator = rf.Generator(size, channels, latent, width, generator=_generator())
    z = torch.randn(5, latent, generator=_generator(1))
    images = generator(z)
    assert images.shape == (5, channels, size, size)
    assert images.abs().max() < 1  # tanh output

    # The last feature map is 4x4 with width * 2^(n - 1) channels, n = log2(size) - 2.
    top = width * 2 ** (int(math.log2(size)) - 3)
    plain = rf.Discriminator(size, channels, width, generator=_generator())
    assert plain.feature_dim == top * 16
    assert plain.features(images).shape == (5, top, 4, 4)
    assert plain(images).shape == (5,)
    assert not plain.representative

    rfgan = _rfgan_discriminator(size, channels, width, code_dim=6)
    assert rfgan.representative and rfgan.decision.in_features == top * 16 + 6
    assert rfgan(images).shape == (5,)

    autoencoder = rf.Autoencoder(
        rf.Encoder(size, channels, width, 6), rf.Decoder(size, channels, width, 6)
    )
    assert autoencoder.encoder(images).shape == (5, 6)
    assert autoencoder(images).shape == images.shape


def test_representative_feature_is_joined_to_the_last_feature_map():
    discriminator = _rfgan_discriminator(code_dim=6).eval()
    x = _images(3)
    joined = discriminator.joined_features(x)
    assert joined.shape == (3, discriminator.feature_dim + 6)
    torch.testing.assert_close(
        joined[:, : discriminator.feature_dim], discriminator.features(x).flatten(1)
    )
    torch.testing.assert_close(joined[:, discriminator.feature_dim :], discriminator.encoder(x))
    expected = joined @ discriminator.decision.weight[0] + discriminator.decision.bias
    torch.testing.assert_close(discriminator(x), expected)


def test_plain_and_rfgan_discriminators_share_their_convolutions_for_one_seed():
    plain = rf.Discriminator(16, 1, 4, generator=_generator(7))
    rfgan = _rfgan_discriminator(seed=7)
    for (name, a), (_, b) in zip(
        plain.features.state_dict().items(), rfgan.features.state_dict().items()
    ):
        assert torch.equal(a, b), name


def test_network_arguments_are_checked():
    with pytest.raises(ValueError, match="image_size must be a power of two"):
        rf.Generator(24)
    with pytest.raises(ValueError, match="image_size"):
        rf.Discriminator(4)
    with pytest.raises(ValueError, match="latent_dim"):
        rf.Generator(16, latent_dim=0)
    with pytest.raises(ValueError, match="encoder is for 1x32x32"):
        rf.Discriminator(16, 1, 4, rf.Encoder(32, 1, 4, 4))
    with pytest.raises(ValueError, match=r"z must be \[N, 8\]"):
        rf.Generator(16, 1, 8, 4)(torch.zeros(2, 9))


# ---------------------------------------------------------------------------------------------
# The frozen encoder and the single steps


def test_encoder_is_frozen_and_stays_in_eval_mode():
    discriminator = _rfgan_discriminator()
    assert all(not p.requires_grad for p in discriminator.encoder.parameters())
    discriminator.train()
    assert discriminator.training and not discriminator.encoder.training
    generator = rf.Generator(16, 1, 8, 4, generator=_generator())
    optimizer_g, optimizer_d = rf.make_optimizers(generator, discriminator, rf.GANConfig())
    held = {id(p) for group in optimizer_d.param_groups for p in group["params"]}
    assert held.isdisjoint(id(p) for p in discriminator.encoder.parameters())
    assert len(held) == sum(1 for p in discriminator.parameters() if p.requires_grad)


def _step_setup():
    generator = rf.Generator(16, 1, 8, 4, generator=_generator())
    discriminator = _rfgan_discriminator()
    optimizers = rf.make_optimizers(generator, discriminator, rf.GANConfig(lr=1e-2))
    real = _images(6)
    noise = torch.randn(6, 8, generator=_generator(3))
    return generator, discriminator, optimizers, real, noise


def test_discriminator_step_moves_only_the_discriminator():
    generator, discriminator, (optimizer_g, optimizer_d), real, noise = _step_setup()
    g_before, d_before = _snapshot(generator), _snapshot(discriminator)
    rf.discriminator_step(generator, discriminator, optimizer_d, real, noise)

    g_params = [n for n, _ in generator.named_parameters()]
    assert not _changed(g_before, generator, g_params)
    encoder_state = [n for n in d_before if n.startswith("encoder.")]
    assert encoder_state and not _changed(d_before, discriminator, encoder_state)
    own = [n for n, p in discriminator.named_parameters() if p.requires_grad]
    assert set(_changed(d_before, discriminator, own)) == set(own)


def test_generator_step_moves_only_the_generator():
    generator, discriminator, (optimizer_g, optimizer_d), real, noise = _step_setup()
    g_before, d_before = _snapshot(generator), _snapshot(discriminator)
    rf.generator_step(generator, discriminator, optimizer_g, noise)

    g_params = [n for n, _ in generator.named_parameters()]
    assert set(_changed(g_before, generator, g_params)) == set(g_params)
    d_params = [n for n, _ in discriminator.named_parameters()]
    assert not _changed(d_before, discriminator, d_params)
    assert all(p.grad is None for p in discriminator.parameters())
    encoder_state = [n for n in d_before if n.startswith("encoder.")]
    assert not _changed(d_before, discriminator, encoder_state)
    # The step leaves every flag as it found it: the encoder frozen, the rest trainable.
    assert all(p.requires_grad for n, p in discriminator.named_parameters() if "encoder" not in n)
    assert not any(p.requires_grad for p in discriminator.encoder.parameters())


def test_losses_at_an_undecided_discriminator():
    # Zero decision weights: D outputs logit 0, probability 1/2, for every image, so the
    # discriminator loss is 2 log 2 and the generator loss log 2.
    generator, discriminator, (optimizer_g, optimizer_d), real, noise = _step_setup()
    with torch.no_grad():
        discriminator.decision.weight.zero_()
        discriminator.decision.bias.zero_()
    d = rf.discriminator_step(generator, discriminator, optimizer_d, real, noise)
    assert float(d["loss"]) == pytest.approx(2 * math.log(2), abs=1e-6)
    assert float(d["real_score"]) == pytest.approx(0.5) and float(d["fake_score"]) == 0.5

    with torch.no_grad():
        discriminator.decision.weight.zero_()
        discriminator.decision.bias.zero_()
    g = rf.generator_step(generator, discriminator, optimizer_g, noise)
    assert float(g["loss"]) == pytest.approx(math.log(2), abs=1e-6)


def test_generator_feels_the_representative_feature_through_the_frozen_encoder():
    generator, discriminator, (optimizer_g, _), _, noise = _step_setup()
    with torch.no_grad():
        # The decision sees only the representative feature: every gradient that reaches
        # the generator has passed through the frozen encoder.
        discriminator.decision.weight[:, : discriminator.feature_dim] = 0
    optimizer_g.zero_grad()
    logits = discriminator(generator(noise))
    torch.nn.functional.binary_cross_entropy_with_logits(logits, torch.ones_like(logits)).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in generator.parameters())
    assert all(p.grad is None for p in discriminator.encoder.parameters())


# ---------------------------------------------------------------------------------------------
# Training


def _tiny_config(**kwargs) -> rf.GANConfig:
    settings = dict(epochs=2, batch_size=16, progress=False, seed=3)
    settings.update(kwargs)
    return rf.GANConfig(**settings)


def _tiny_pair(seed: int = 0, encoder: rf.Encoder | None = None):
    generator = rf.Generator(16, 1, 8, 4, generator=_generator(seed))
    return generator, rf.Discriminator(16, 1, 4, encoder, generator=_generator(seed + 50))


@pytest.fixture(scope="module")
def digits():
    from deepkern.data.images import load_digits_split

    x_train, y_train, x_test, y_test = load_digits_split(0, size=16, scaling="symmetric")
    return x_train[:96], y_train[:96], x_test[:64], y_test[:64]


def test_pretrained_encoder_stays_frozen_through_gan_training(digits):
    x = digits[0]
    encoder = rf.Encoder(16, 1, 4, 6, generator=_generator(1))
    autoencoder = rf.Autoencoder(encoder, rf.Decoder(16, 1, 4, 6, generator=_generator(2)))
    pretrained = rf.pretrain_autoencoder(
        autoencoder, rf.AutoencoderConfig(epochs=3, batch_size=16, progress=False), x
    )
    assert pretrained["history"][-1] < pretrained["history"][0]

    generator, discriminator = _tiny_pair(encoder=encoder)
    before = _snapshot(encoder)
    d_before = _snapshot(discriminator)
    metrics = rf.train(generator, discriminator, _tiny_config(), x)
    assert not _changed(before, encoder)  # parameters and batch-norm statistics alike
    assert all(not p.requires_grad for p in encoder.parameters())
    assert _changed(d_before, discriminator, ["decision.weight", "features.0.weight"])
    assert len(metrics["history"]) == 2
    assert all(
        math.isfinite(h["d_loss"]) and math.isfinite(h["g_loss"]) for h in metrics["history"]
    )


def test_sample_is_seeded_and_in_range():
    generator = rf.Generator(16, 1, 8, 4, generator=_generator())
    buffers = _snapshot(generator)
    a, b = rf.sample(generator, 5, seed=1), rf.sample(generator, 5, seed=1)
    assert torch.equal(a, b) and a.shape == (5, 1, 16, 16) and a.abs().max() < 1
    assert not torch.equal(a, rf.sample(generator, 5, seed=2))
    assert generator.training and not _changed(buffers, generator)  # mode and statistics kept
    generator.eval()
    assert rf.sample(generator, 0, seed=1).shape == (0, 1, 16, 16) and not generator.training

    # Batch statistics over each batch: the first 4 samples in batches of 4 are those of a
    # call for 4 samples; a last batch of one joins the batch before.
    torch.testing.assert_close(
        rf.sample(generator, 9, seed=3, batch_size=4)[:4], rf.sample(generator, 4, seed=3)
    )
    nine = rf.sample(generator, 9, seed=3, batch_size=4)
    assert nine.shape == (9, 1, 16, 16)
    with pytest.raises(ValueError, match="batch_size"):
        rf.sample(generator, 3, seed=0, batch_size=1)


def test_resume_continues_exactly(digits, tmp_path, monkeypatch):
    x = digits[0]
    straight_g, straight_d = _tiny_pair()
    full = rf.train(straight_g, straight_d, _tiny_config(checkpoint=str(tmp_path / "a.pt")), x)

    class Crash(Exception):
        pass

    train_epoch = rf._train_epoch

    def crash_in_second_epoch(*args, **kwargs):
        if kwargs["epoch"] == 1:
            raise Crash
        return train_epoch(*args, **kwargs)

    path = str(tmp_path / "b.pt")
    monkeypatch.setattr(rf, "_train_epoch", crash_in_second_epoch)
    with pytest.raises(Crash):
        rf.train(*_tiny_pair(), _tiny_config(checkpoint=path), x)
    monkeypatch.setattr(rf, "_train_epoch", train_epoch)
    assert torch.load(path, weights_only=True)["epoch"] == 1

    # A fresh process builds the networks anew; their initial weights do not matter.
    resumed_g, resumed_d = _tiny_pair(seed=99)
    resumed = rf.train(resumed_g, resumed_d, _tiny_config(checkpoint=path, resume=True), x)
    assert resumed["start_epoch"] == 1
    for straight, again in ((straight_g, resumed_g), (straight_d, resumed_d)):
        for (name, a), (_, b) in zip(straight.state_dict().items(), again.state_dict().items()):
            assert torch.equal(a, b), name
    assert [h["g_loss"] for h in resumed["history"]] == [h["g_loss"] for h in full["history"]]
    assert sorted(os.listdir(tmp_path)) == ["a.pt", "b.pt"]

    # A checkpoint of a plain DCGAN does not fit an RFGAN discriminator.
    g, d = _tiny_pair(encoder=rf.Encoder(16, 1, 4, 6))
    with pytest.raises(ValueError, match="does not fit these networks"):
        rf.train(g, d, _tiny_config(checkpoint=path, resume=True), x)


def test_bad_settings_name_the_field(digits):
    for kwargs, field in (
        ({"lr": -1.0}, "lr"),
        ({"batch_size": 1}, "batch_size"),
        ({"d_steps": 0}, "d_steps"),
        ({"beta1": 1.0}, "beta1"),
        ({"epochs": -1}, "epochs"),
        ({"resume": True}, "resume"),
    ):
        with pytest.raises(ValueError, match=field):
            rf.GANConfig(**kwargs)
    with pytest.raises(ValueError, match="lr"):
        rf.AutoencoderConfig(lr=math.inf)
    with pytest.raises(ValueError, match="batch_size"):
        gm.ClassifierConfig(batch_size=0)
    generator, discriminator = _tiny_pair()
    with pytest.raises(ValueError, match="images"):
        rf.train(generator, discriminator, _tiny_config(), torch.zeros(8, 3, 16, 16))
    colour = rf.Generator(16, 3, 8, 4)
    with pytest.raises(ValueError, match="the generator makes 3x16x16"):
        rf.train(colour, discriminator, _tiny_config(), torch.zeros(8, 1, 16, 16))
    with pytest.raises(ValueError, match="images must be a floating-point tensor"):
        rf.train(generator, discriminator, _tiny_config(), torch.zeros(8, 16, 16))


# ---------------------------------------------------------------------------------------------
# Data parallel training on two CPU processes


def _train_on_rank() -> dict:
    x = _images(64, seed=7)
    encoder = rf.Encoder(16, 1, 4, 6, generator=_generator(1))
    generator, discriminator = _tiny_pair(encoder=encoder)
    metrics = rf.train(generator, discriminator, _tiny_config(epochs=1, batch_size=8), x)
    states = {"g": generator.state_dict(), "d": discriminator.state_dict()}
    return {"states": states, "metrics": metrics}


@pytest.mark.slow
def test_ddp_gloo_two_processes(tmp_path):
    results = run_two_ranks(_train_on_rank, tmp_path)
    initial_g, initial_d = _tiny_pair(encoder=rf.Encoder(16, 1, 4, 6, generator=_generator(1)))
    initial = {"g": initial_g.state_dict(), "d": initial_d.state_dict()}
    for net in ("g", "d"):
        changed = 0
        for name, value in results[0]["states"][net].items():
            # Parameters and batch-norm statistics agree across the processes.
            assert torch.equal(value, results[1]["states"][net][name]), (net, name)
            changed += not torch.equal(value, initial[net][name])
        assert changed > 0
    for name, value in results[0]["states"]["d"].items():
        if name.startswith("encoder."):
            assert torch.equal(value, initial["d"][name]), name
    assert results[0]["metrics"]["g_loss"] == results[1]["metrics"]["g_loss"]


# ---------------------------------------------------------------------------------------------
# Measures


def test_frechet_distance_of_gaussians_matches_the_closed_form():
    # One dimension: (m1 - m2)^2 + (s1 - s2)^2 for standard deviations s1, s2.
    fd = gm.frechet_distance(
        torch.tensor([1.0]), torch.tensor([[4.0]]), torch.tensor([-2.0]), torch.tensor([[9.0]])
    )
    assert fd == pytest.approx(9.0 + 1.0, abs=1e-12)

    # Commuting (diagonal) covariances: the sum of (sqrt(a_i) - sqrt(b_i))^2.
    a, b = torch.tensor([1.0, 4.0, 0.25]), torch.tensor([9.0, 1.0, 0.0])
    mean1, mean2 = torch.tensor([0.0, 1.0, 2.0]), torch.tensor([1.0, 1.0, 0.0])
    expected = 1.0 + 4.0 + float((a.sqrt() - b.sqrt()).square().sum())
    assert gm.frechet_distance(mean1, torch.diag(a), mean2, torch.diag(b)) == pytest.approx(
        expected, abs=1e-12
    )

    # General covariances against scipy's matrix square root.
    scipy_linalg = pytest.importorskip("scipy.linalg")
    g = _generator(5)
    m1, m2 = (
        torch.randn(6, 6, generator=g, dtype=torch.float64),
        torch.randn(6, 6, generator=g, dtype=torch.float64),
    )
    cov1, cov2 = m1 @ m1.T, m2 @ m2.T + 0.1 * torch.eye(6, dtype=torch.float64)
    mu1, mu2 = torch.randn(6, generator=g, dtype=torch.float64), torch.zeros(6, dtype=torch.float64)
    root = scipy_linalg.sqrtm(cov1.numpy() @ cov2.numpy()).real
    reference = float((mu1 - mu2).square().sum() + cov1.trace() + cov2.trace() - 2 * np.trace(root))
    assert gm.frechet_distance(mu1, cov1, mu2, cov2) == pytest.approx(reference, rel=1e-9)
    assert gm.frechet_distance(mu1, cov1, mu1, cov1) == pytest.approx(0.0, abs=1e-9)

    with pytest.raises(ValueError, match="covariances"):
        gm.frechet_distance(mu1, cov1, mu2[:3], cov2)


def test_frechet_distance_of_samples():
    g = _generator(11)
    x = torch.randn(20000, 3, generator=g, dtype=torch.float64)
    y = torch.randn(20000, 3, generator=g, dtype=torch.float64) * torch.tensor([1.0, 2.0, 3.0]) + 1
    # N(0, I) against N(1, diag(1, 4, 9)): 3 + (0 + 1 + 4).
    assert gm.frechet_distance_of_features(x, y) == pytest.approx(8.0, rel=0.03)
    # Two halves of one sample are close, compared with either half against a shifted set.
    within = gm.frechet_distance_of_features(x[:10000], x[10000:])
    assert within < 0.01 and gm.frechet_distance_of_features(x[:10000], y) > 7


def test_precision_recall_hand_cases():
    real = torch.tensor([[0.0], [1.0], [2.0], [3.0]])
    # k = 1: every real ball has radius 1, covering [-1, 4]. Fakes at 0.5 and 3.5 are inside,
    # 10 is outside; the fake balls (radii 3, 3, 6.5) cover every real point.
    fake = torch.tensor([[0.5], [3.5], [10.0]])
    precision, recall = gm.precision_recall(real, fake, k=1)
    assert precision == pytest.approx(2 / 3) and recall == 1.0

    # A collapsed generator: fakes on top of one another at 0 (radius 0 balls) are realistic
    # (precision 1) but cover only the real point at 0 (recall 1/4).
    collapsed = torch.zeros(5, 1)
    assert gm.precision_recall(real, collapsed, k=2) == (1.0, 0.25)

    # Two dimensions, k = 2: real square of side 1, radius of each corner 1 (two neighbours
    # at distance 1). A fake at the centre is inside; one at (3, 3) is not.
    square = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    fakes = torch.tensor([[0.5, 0.5], [3.0, 3.0], [0.5, 0.6]])
    assert gm.precision_recall(square, fakes, k=2)[0] == pytest.approx(2 / 3)

    with pytest.raises(ValueError, match="more than k"):
        gm.precision_recall(real, fake, k=3)
    with pytest.raises(ValueError, match="k must be"):
        gm.precision_recall(real, fake, k=0)


def test_mode_coverage_on_a_known_histogram():
    # 10 classes, 100 samples: 50 in class 0, 45 in class 1, 4 in class 2, 1 in class 3.
    labels = torch.tensor([0] * 50 + [1] * 45 + [2] * 4 + [3] * 1)
    coverage = gm.mode_coverage(labels, 10)
    assert coverage["histogram"][:4] == [0.5, 0.45, 0.04, 0.01]
    # A class is covered from 10 % of its uniform share (1 %) on: classes 0-3.
    assert coverage["covered"] == 4
    expected = sum(p * math.log(10 * p) for p in (0.5, 0.45, 0.04, 0.01))
    assert coverage["kl_uniform"] == pytest.approx(expected)
    assert gm.mode_coverage(labels, 10, min_share=0.5)["covered"] == 2

    even = gm.mode_coverage(torch.arange(10).repeat(3), 10)
    assert even["covered"] == 10 and even["kl_uniform"] == pytest.approx(0.0, abs=1e-12)
    one = gm.mode_coverage(torch.full((7,), 3), 10)
    assert one["covered"] == 1 and one["kl_uniform"] == pytest.approx(math.log(10))
    with pytest.raises(ValueError, match="labels must lie"):
        gm.mode_coverage(torch.tensor([10]), 10)


def test_classifier_features_and_evaluation(digits):
    x_train, y_train, x_test, y_test = digits
    classifier = gm.FeatureClassifier(1, 10, width=4, feature_dim=16, generator=_generator())
    result = gm.train_classifier(
        classifier,
        gm.ClassifierConfig(epochs=2, progress=False),
        (x_train, y_train),
        (x_test, y_test),
    )
    assert 0.0 <= result["test_accuracy"] <= 1.0 and not classifier.training
    features, labels = gm.classifier_features(classifier, x_test)
    assert features.shape == (64, 16) and features.dtype == torch.float64 and labels.shape == (64,)
    same = gm.evaluate_samples(classifier, x_train, x_train)
    assert same["fd"] == pytest.approx(0.0, abs=1e-6) and same["precision"] == same["recall"] == 1.0

    # Two halves of the real digits are far closer to each other than to uniform noise.
    halves = gm.evaluate_samples(classifier, x_train[:48], x_train[48:])
    noise = gm.evaluate_samples(classifier, x_train[:48], _images(48, seed=4))
    assert halves["fd"] < 0.2 * noise["fd"]
    assert halves["precision"] > noise["precision"] and halves["recall"] > noise["recall"]


def _read_png(path) -> tuple[int, int, int, np.ndarray]:
    data = open(path, "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height, depth, colour = struct.unpack(">IIBB", data[16:26])
    idat = data.index(b"IDAT")
    length = struct.unpack(">I", data[idat - 4 : idat])[0]
    raw = np.frombuffer(zlib.decompress(data[idat + 4 : idat + 4 + length]), dtype=np.uint8)
    channels = 1 if colour == 0 else 3
    rows = raw.reshape(height, 1 + width * channels)
    assert (rows[:, 0] == 0).all() and depth == 8
    return width, height, channels, rows[:, 1:].reshape(height, width, channels)


def test_image_grid_png(tmp_path):
    images = torch.tensor([-1.0, 1.0, 0.0]).view(3, 1, 1, 1).expand(3, 1, 2, 2)
    path = tmp_path / "grid" / "g.png"
    gm.write_image_grid(path, images, columns=2, padding=1, scale=1)
    width, height, channels, pixels = _read_png(path)
    # Two columns and two rows of 2x2 images with one pixel of padding around each.
    assert (width, height, channels) == (7, 7, 1)
    assert (pixels[1:3, 1:3] == 0).all() and (pixels[1:3, 4:6] == 255).all()
    assert (pixels[4:6, 1:3] == 128).all() and (pixels[4:6, 4:6] == 255).all()  # empty slot

    gm.write_image_grid(tmp_path / "c.png", _images(5, channels=3, size=4), columns=4, scale=2)
    assert _read_png(tmp_path / "c.png")[:3] == (4 * 9 + 1, 2 * 9 + 1, 3)
    with pytest.raises(ValueError, match="images must be"):
        gm.write_image_grid(tmp_path / "d.png", torch.zeros(2, 2, 4, 4))


# ---------------------------------------------------------------------------------------------
# Data


def test_image_sets_in_the_generator_range():
    from deepkern.data.images import load_digits_split, load_photo_patches

    x_train, _, x_test, _ = load_digits_split(0, size=16, scaling="symmetric")
    assert x_train.shape == (1437, 1, 16, 16)
    assert float(x_train.min()) == -1.0 and float(x_train.max()) <= 1.0
    with pytest.raises(ValueError, match="scaling"):
        load_digits_split(0, scaling="unit")

    x_train, y_train, x_test, y_test = load_photo_patches(
        0, size=8, train_per_region=5, test_per_region=3
    )
    assert x_train.shape == (40, 3, 8, 8) and x_test.shape == (24, 3, 8, 8)
    assert torch.equal(torch.bincount(y_train), torch.full((8,), 5))
    assert x_train.min() >= -1 and x_train.max() <= 1
    again = load_photo_patches(0, size=8, train_per_region=5, test_per_region=3)
    assert torch.equal(again[0], x_train)
    with pytest.raises(ValueError, match="size"):
        load_photo_patches(0, size=128)


# ---------------------------------------------------------------------------------------------
# The command


def test_reproduce_quick_prints_the_table(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["reproduce", "rfgan", "--quick", "--no-progress", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    for text in (
        "real (held out)",
        "DCGAN",
        "RFGAN",
        "FD",
        "precision",
        "recall",
        "paper (Bang and Shim 2018",
    ):
        assert text in printed
    report = json.loads((out / "results.json").read_text())
    runs = report["datasets"]["digits"]["runs"]
    assert [r["seed"] for r in runs["dcgan"]] == [0, 1] == [r["seed"] for r in runs["rfgan"]]
    assert all(r["autoencoder"] is not None for r in runs["rfgan"])
    assert all(r["autoencoder"] is None for r in runs["dcgan"])
    for name in ("digits_real.png", "digits_dcgan.png", "digits_rfgan.png"):
        assert _read_png(out / name)[2] == 1


def test_reproduce_rejects_bad_settings(capsys):
    assert main(["reproduce", "rfgan", "--quick", "--size", "12"]) == 2
    assert "--size must be a power of two" in capsys.readouterr().err
    assert main(["reproduce", "rfgan", "--quick", "--full"]) == 2
    assert "exclude each other" in capsys.readouterr().err
    assert main(["reproduce", "rfgan", "--quick", "--batch-size", "1"]) == 2
    assert "--batch-size" in capsys.readouterr().err
