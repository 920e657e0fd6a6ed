"""Keypoint data: determinism, shapes, occlusion flags, the annotation noise distribution."""

from __future__ import annotations

import pytest
import torch

from deepkern.data import keypoints as kp

# Quantiles of |t| for Student-t with 3 degrees of freedom (t.ppf(0.75), t.ppf(0.95) and
# t.ppf(0.975) of the t_3 distribution).
T3_ABS_MEDIAN, T3_ABS_Q90, T3_ABS_Q95 = 0.76489, 2.35336, 3.18245


def test_same_seed_same_data_and_other_seed_other_data():
    a = kp.make_stick_figures(16, seed=3, noise_scale=0.05, outlier_fraction=0.1)
    b = kp.make_stick_figures(16, seed=3, noise_scale=0.05, outlier_fraction=0.1)
    c = kp.make_stick_figures(16, seed=4, noise_scale=0.05, outlier_fraction=0.1)
    for field in ("images", "keypoints", "clean", "visible", "scale"):
        assert torch.equal(getattr(a, field), getattr(b, field)), field
    assert not torch.equal(a.images, c.images)


@pytest.mark.parametrize("size", [32, 48])
def test_shapes_ranges_and_scale(size):
    data = kp.make_stick_figures(24, size=size, seed=0)
    k = len(kp.KEYPOINT_NAMES)
    assert data.images.shape == (24, 1, size, size) and data.images.dtype == torch.float32
    assert data.keypoints.shape == (24, k, 2) and data.visible.shape == (24, k)
    assert len(data) == 24 and data.num_keypoints == k == len(data.oks_sigmas)
    # Without annotation noise the labels are the truth, and the figures lie in the image.
    assert torch.equal(data.keypoints, data.clean)
    assert data.clean.min() >= -0.5 and data.clean.max() <= size - 0.5
    # scale is the larger side of the tight box around the true keypoints.
    side = (data.clean.amax(1) - data.clean.amin(1)).amax(1)
    torch.testing.assert_close(data.scale, side)
    # Ink lies along the figure: the pixel under each visible keypoint is bright.
    pixel = data.clean.round().long().clamp(0, size - 1)
    under = data.images[torch.arange(24)[:, None], 0, pixel[..., 1], pixel[..., 0]]
    assert under[data.visible > 0].mean() > 0.4


def test_occlusion_flags_mark_exactly_the_covered_keypoints():
    # The same seed draws the same figures and the same patches whatever the occlusion rate,
    # so the pixels that differ between the two sets are the patches.
    bare = kp.make_stick_figures(40, seed=5, occlusion=0.0, pixel_noise=0.0)
    covered = kp.make_stick_figures(40, seed=5, occlusion=1.0, pixel_noise=0.0)
    assert torch.equal(bare.clean, covered.clean)
    assert bare.visible.min() == 1.0
    assert (covered.visible == 0).any()
    for i in range(40):
        changed = (covered.images[i, 0] != bare.images[i, 0]).nonzero()
        (top, left), (bottom, right) = changed.amin(0), changed.amax(0)
        pixel = covered.clean[i].round().long()
        inside = (
            (pixel[:, 0] >= left)
            & (pixel[:, 0] <= right)
            & (pixel[:, 1] >= top)
            & (pixel[:, 1] <= bottom)
        )
        assert torch.equal(covered.visible[i] == 0, inside), i


def test_occlusion_rate():
    data = kp.make_stick_figures(200, seed=6, occlusion=0.5)
    bare = kp.make_stick_figures(200, seed=6, occlusion=0.0)
    occluded = (data.images != bare.images).flatten(1).float().mean(1) > 0.05
    assert 0.38 < occluded.float().mean() < 0.62


def test_annotation_noise_is_student_t_with_the_documented_scale():
    noise_scale = 0.1
    data = kp.make_stick_figures(600, seed=7, noise_scale=noise_scale, noise_df=3)
    t = ((data.keypoints - data.clean) / (noise_scale * data.scale[:, None, None])).reshape(-1)
    t = t.abs().double()
    assert t.median().item() == pytest.approx(T3_ABS_MEDIAN, rel=0.05)
    assert t.quantile(0.9).item() == pytest.approx(T3_ABS_Q90, rel=0.06)
    assert t.quantile(0.95).item() == pytest.approx(T3_ABS_Q95, rel=0.08)


def test_student_t_sampler_moments():
    t = kp.student_t((200_000,), 5, torch.Generator().manual_seed(0))
    assert t.mean().item() == pytest.approx(0.0, abs=0.02)
    # The variance of t_5 is 5 / 3.
    assert t.var().item() == pytest.approx(5 / 3, rel=0.05)
    with pytest.raises(ValueError, match="df"):
        kp.student_t((3,), 2.5, torch.Generator())


def test_outliers_are_uniform_over_the_image():
    data = kp.make_stick_figures(300, size=32, seed=8, outlier_fraction=1.0)
    labels = data.keypoints.reshape(-1)
    assert labels.min() >= 0 and labels.max() <= 31
    assert labels.mean().item() == pytest.approx(15.5, abs=0.5)


def test_split_has_noisy_training_labels_and_exact_test_labels():
    train, test = kp.stick_figure_split(50, 20, seed=1)
    assert len(train) == 50 and len(test) == 20
    assert not torch.equal(train.keypoints, train.clean)
    assert torch.equal(test.keypoints, test.clean)
    sub = train.subset(slice(0, 5))
    assert len(sub) == 5 and torch.equal(sub.images, train.images[:5])
    # Noisy test labels on request: the same images and truth, other labels.
    _, noisy = kp.stick_figure_split(50, 20, seed=1, noisy_test_labels=True)
    assert torch.equal(noisy.images, test.images) and torch.equal(noisy.clean, test.clean)
    assert not torch.equal(noisy.keypoints, noisy.clean)


def test_digit_localisation_labels_are_the_ink_centre_of_mass():
    train, test = kp.digit_localisation_split(seed=0, pixel_noise=0.0)
    assert (len(train), len(test)) == (1438, 359)
    assert train.images.shape[1:] == (1, 32, 32) and train.num_keypoints == 1
    assert torch.equal(test.keypoints, test.clean)
    assert not torch.equal(train.keypoints, train.clean)
    # Without pixel noise the canvas holds only the digit: its centre of mass is the label.
    image = test.images[:, 0].double()
    coords = torch.arange(32, dtype=torch.float64)
    mass = image.sum(dim=(1, 2))
    x = (image.sum(1) * coords).sum(1) / mass
    y = (image.sum(2) * coords).sum(1) / mass
    torch.testing.assert_close(torch.stack([x, y], -1).float(), test.clean[:, 0], atol=1e-4, rtol=0)
    assert test.scale.min() >= 12 and test.scale.max() <= 24
    # The noise settings change the labels only, never the split or the images.
    _, exact = kp.digit_localisation_split(seed=0, pixel_noise=0.0, noise_scale=0.0)
    assert torch.equal(exact.images, test.images)


def test_bad_arguments():
    with pytest.raises(ValueError, match="n must be"):
        kp.make_stick_figures(-1)
    with pytest.raises(ValueError, match="size must be"):
        kp.make_stick_figures(2, size=4)
    with pytest.raises(ValueError, match="occlusion"):
        kp.make_stick_figures(2, occlusion=1.5)
    with pytest.raises(ValueError, match="noise_scale"):
        kp.make_stick_figures(2, noise_scale=-0.1)
    with pytest.raises(ValueError, match="outlier_fraction"):
        kp.make_stick_figures(2, outlier_fraction=2.0)
    with pytest.raises(ValueError, match="min_side"):
        kp.digit_localisation_split(min_side=20, max_side=10)
    with pytest.raises(ValueError, match="test_fraction"):
        kp.digit_localisation_split(test_fraction=1.0)
