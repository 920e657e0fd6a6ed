"""Keypoint-regression data that needs no download.

- :func:`make_stick_figures` and :func:`stick_figure_split`: rendered 2-D stick figures with a
  head, a torso and four two-segment limbs at random joint angles, size and position, drawn as
  anti-aliased lines on small grey images. Random occluding patches hide some keypoints
  (their visibility, used as target weight, is 0), and the training labels carry heavy-tailed
  annotation noise (Student-t, plus a few outliers) while the test labels are exact.
- :func:`digit_localisation_split`: scikit-learn's handwritten digits (real scans) pasted at a
  random size and place on a larger canvas; the label is the 2-D centre of mass of the ink.

Coordinates are in pixels, ``(x, y)`` with ``x`` to the right and ``y`` down, the centre of
pixel ``[row i, column j]`` at ``(j, i)``. Every set carries a per-example ``scale``, the size
that the keypoint metrics measure errors against (see :class:`KeypointData`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "KEYPOINT_NAMES",
    "LIMBS",
    "OKS_SIGMAS",
    "KeypointData",
    "make_stick_figures",
    "stick_figure_split",
    "digit_localisation_split",
    "student_t",
]

KEYPOINT_NAMES = (
    "head",
    "neck",
    "pelvis",
    "left_elbow",
    "left_hand",
    "right_elbow",
    "right_hand",
    "left_knee",
    "left_foot",
    "right_knee",
    "right_foot",
)
# Segments between keypoints, by index into KEYPOINT_NAMES.
LIMBS = ((0, 1), (1, 2), (1, 3), (3, 4), (1, 5), (5, 6), (2, 7), (7, 8), (2, 9), (9, 10))
# Left limbs are drawn bright, right limbs dim, the head and torso in between, so that the
# two sides of a figure can be told apart (as colour does in photographs).
_LIMB_INTENSITY = (0.8, 0.8, 1.0, 1.0, 0.5, 0.5, 1.0, 1.0, 0.5, 0.5)

# Per-keypoint constants of the OKS (COCO's sigma_i, so that k_i = 2 sigma_i), taken from COCO's
# constants for the nearest body part: nose for the head, shoulders for the neck, hips for the
# pelvis, then elbows, wrists, knees and ankles.
OKS_SIGMAS = (0.026, 0.079, 0.107, 0.072, 0.062, 0.072, 0.062, 0.087, 0.089, 0.087, 0.089)


@dataclass
class KeypointData:
    """A keypoint-regression set.

    Attributes:
        images (Tensor[N, 1, S, S], float32): grey images, about in [0, 1].
        keypoints (Tensor[N, K, 2], float32): the labels ``(x, y)`` in pixels; noisy in a
            training set made with annotation noise.
        clean (Tensor[N, K, 2], float32): the true positions (equal to ``keypoints`` without
            annotation noise).
        visible (Tensor[N, K], float32): 1 for a visible keypoint, 0 for an occluded one; the
            target weight of the losses and the visibility flag of the metrics.
        scale (Tensor[N], float32): the size of the figure in pixels, the larger side of the
            tight box around its true keypoints (stick figures) or the side of the pasted
            digit; PCK thresholds are fractions of it and the OKS area is its square.
        oks_sigmas (tuple of K floats): the OKS per-keypoint constants.
    """

    images: Tensor
    keypoints: Tensor
    clean: Tensor
    visible: Tensor
    scale: Tensor
    oks_sigmas: tuple[float, ...]

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def num_keypoints(self) -> int:
        return self.keypoints.shape[1]

    @property
    def size(self) -> int:
        return self.images.shape[-1]

    def subset(self, index: Tensor | slice) -> KeypointData:
        """The examples at ``index`` (a slice or an index tensor)."""
        return KeypointData(
            self.images[index],
            self.keypoints[index],
            self.clean[index],
            self.visible[index],
            self.scale[index],
            self.oks_sigmas,
        )


def student_t(shape: tuple[int, ...], df: int, generator: torch.Generator) -> Tensor:
    """Student-t samples with ``df`` (a positive integer) degrees of freedom, seeded.

    Drawn as ``z / sqrt(chi2 / df)`` with ``z`` standard normal and ``chi2`` the sum of ``df``
    squared standard normals, so that only ``torch.randn`` with the generator is used.
    """
    if int(df) != df or df < 1:
        raise ValueError(f"df must be a positive integer, got {df}")
    z = torch.randn(shape, generator=generator, dtype=torch.float64)
    chi2 = torch.randn((*shape, int(df)), generator=generator, dtype=torch.float64).pow(2).sum(-1)
    return z / torch.sqrt(chi2 / df)


def _uniform(n: int, low: float, high: float, generator: torch.Generator) -> Tensor:
    return low + (high - low) * torch.rand(n, generator=generator, dtype=torch.float64)


def _direction(angle: Tensor, side: float) -> Tensor:
    """Unit vectors at ``angle`` radians from straight down, turned toward ``side`` (-1: left)."""
    return torch.stack([side * torch.sin(angle), torch.cos(angle)], dim=-1)


def _pose(n: int, generator: torch.Generator) -> Tensor:
    """Keypoints of ``n`` figures with a unit torso, neck at the origin: Tensor[n, 11, 2]."""
    deg = math.pi / 180.0
    points = torch.zeros(n, len(KEYPOINT_NAMES), 2, dtype=torch.float64)
    torso = _uniform(n, -25 * deg, 25 * deg, generator)
    points[:, 2] = _direction(torso, 1.0)
    head_tilt = torso + _uniform(n, -20 * deg, 20 * deg, generator)
    points[:, 0] = -0.4 * _direction(head_tilt, 1.0)

    # Each limb: (root, middle, end, side, first angle range, bend range, lengths).
    limbs = (
        (1, 3, 4, -1.0, (10, 170), (-70, 70), (0.55, 0.5)),
        (1, 5, 6, 1.0, (10, 170), (-70, 70), (0.55, 0.5)),
        (2, 7, 8, -1.0, (0, 50), (-45, 45), (0.6, 0.55)),
        (2, 9, 10, 1.0, (0, 50), (-45, 45), (0.6, 0.55)),
    )
    for root, middle, end, side, (lo, hi), (bend_lo, bend_hi), (upper, lower) in limbs:
        first = _uniform(n, lo * deg, hi * deg, generator)
        second = first + _uniform(n, bend_lo * deg, bend_hi * deg, generator)
        upper_len = upper * _uniform(n, 0.85, 1.15, generator)
        lower_len = lower * _uniform(n, 0.85, 1.15, generator)
        points[:, middle] = points[:, root] + upper_len[:, None] * _direction(first, side)
        points[:, end] = points[:, middle] + lower_len[:, None] * _direction(second, side)
    return points


def _segment_distance(grid: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """Distance from every pixel centre to each segment: grid [P, 2], a and b [N, L, 2]."""
    ab = b - a
    ap = grid[None, None] - a[:, :, None]
    length2 = (ab * ab).sum(-1, keepdim=True).clamp_min(1e-12)
    t = ((ap * ab[:, :, None]).sum(-1) / length2).clamp(0.0, 1.0)
    nearest = a[:, :, None] + t[..., None] * ab[:, :, None]
    return (grid[None, None] - nearest).norm(dim=-1)


def _render(points: Tensor, thickness: Tensor, head_radius: Tensor, size: int) -> Tensor:
    """Anti-aliased figures: Tensor[N, size, size] in [0, 1]."""
    coords = torch.arange(size, dtype=torch.float64)
    ys, xs = torch.meshgrid(coords, coords, indexing="ij")
    grid = torch.stack([xs.reshape(-1), ys.reshape(-1)], dim=-1)
    limbs = torch.tensor(LIMBS)
    intensity = torch.tensor(_LIMB_INTENSITY, dtype=torch.float64)
    images = []
    # Chunks keep the [chunk, limbs, pixels] distance tensor small.
    for start in range(0, len(points), 256):
        p = points[start : start + 256]
        distance = _segment_distance(grid, p[:, limbs[:, 0]], p[:, limbs[:, 1]])
        half = thickness[start : start + 256, None, None] / 2
        ink = (half + 0.5 - distance).clamp(0.0, 1.0) * intensity[None, :, None]
        head = (p[:, None, 0] - grid[None]).norm(dim=-1)
        radius = head_radius[start : start + 256, None]
        head_ink = 0.8 * (radius + 0.5 - head).clamp(0.0, 1.0)
        image = torch.maximum(ink.amax(dim=1), head_ink)
        images.append(image.reshape(-1, size, size))
    return torch.cat(images) if images else torch.zeros(0, size, size, dtype=torch.float64)


def _annotation_noise(
    clean: Tensor,
    scale: Tensor,
    size: int,
    noise_scale: float,
    noise_df: int,
    outlier_fraction: float,
    generator: torch.Generator,
) -> Tensor:
    """Labels = truth + noise_scale * scale * Student-t(noise_df) per coordinate; a share
    ``outlier_fraction`` of the keypoints are instead labelled at a uniform place in the image.
    """
    noise = student_t(tuple(clean.shape), noise_df, generator)
    labels = clean + noise_scale * scale[:, None, None] * noise
    outlier = torch.rand(clean.shape[:2], generator=generator) < outlier_fraction
    anywhere = torch.rand(clean.shape, generator=generator, dtype=torch.float64) * (size - 1)
    return torch.where(outlier[..., None], anywhere, labels)


def _check_common(n: int, size: int, noise_scale: float, outlier_fraction: float) -> None:
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if size < 8:
        raise ValueError(f"size must be >= 8 pixels, got {size}")
    if not (noise_scale >= 0 and math.isfinite(noise_scale)):
        raise ValueError(f"noise_scale must be finite and >= 0, got {noise_scale}")
    if not 0.0 <= outlier_fraction <= 1.0:
        raise ValueError(f"outlier_fraction must be in [0, 1], got {outlier_fraction}")


def make_stick_figures(
    n: int,
    size: int = 32,
    seed: int = 0,
    occlusion: float = 0.5,
    noise_scale: float = 0.0,
    noise_df: int = 3,
    outlier_fraction: float = 0.0,
    pixel_noise: float = 0.05,
) -> KeypointData:
    """``n`` rendered stick figures with 11 keypoints (:data:`KEYPOINT_NAMES`), seeded.

    A figure has a unit torso tilted up to 25 degrees from upright, a head, two arms from the
    neck and two legs from the pelvis, each of two segments at random angles (arms 10-170
    degrees from straight down, elbows bent up to 70 degrees; legs 0-50 degrees, knees up to
    45), segment lengths within 15% of their nominal ratio. The figure is scaled so that its
    torso is 18-27% of the image side, placed uniformly where it fits, and drawn with lines
    1.2-2 pixels thick (left limbs bright, right limbs dim) over Gaussian pixel noise.

    With probability ``occlusion`` an image gets one occluding patch of uniform random texture,
    its side 25-45% of the image, placed uniformly; keypoints under it are invisible
    (``visible`` 0).

    Annotation noise: each label coordinate is the true one plus ``noise_scale * scale * t``
    with ``t`` Student-t with ``noise_df`` degrees of freedom (heavy tailed: with 3, the
    median of ``|t|`` is 0.765 and its variance 3); then a share ``outlier_fraction`` of
    keypoints get a label uniform over the image instead. ``clean`` keeps the truth.

    Args:
        n (int >= 0): number of figures.
        size (int >= 8): image side in pixels.
        seed: the seed; the same arguments give the same data.
        occlusion (float in [0, 1]): probability of an occluding patch per image.
        noise_scale (float >= 0): annotation noise scale as a fraction of the figure size.
        noise_df (int >= 1): degrees of freedom of the Student-t noise.
        outlier_fraction (float in [0, 1]): share of labels replaced by uniform ones.
        pixel_noise (float >= 0): standard deviation of the Gaussian pixel noise.

    Returns:
        a :class:`KeypointData` with K = 11 and the OKS constants :data:`OKS_SIGMAS`.

    Raises:
        ValueError: an argument out of its range.

    Example:
        >>> data = make_stick_figures(4, size=32, seed=0)
        >>> data.images.shape, data.keypoints.shape
        (torch.Size([4, 1, 32, 32]), torch.Size([4, 11, 2]))
    """
    _check_common(n, size, noise_scale, outlier_fraction)
    if not 0.0 <= occlusion <= 1.0:
        raise ValueError(f"occlusion must be in [0, 1], got {occlusion}")
    if pixel_noise < 0:
        raise ValueError(f"pixel_noise must be >= 0, got {pixel_noise}")
    generator = torch.Generator().manual_seed(seed)

    # Pose in torso units, then scale and place the figure where it fits.
    points = _pose(n, generator)
    torso_pixels = _uniform(n, 0.18, 0.27, generator) * size
    points = points * torso_pixels[:, None, None]
    low, high = points.amin(dim=1), points.amax(dim=1)
    margin = 1.5
    room = (size - 1 - 2 * margin) - (high - low)
    offset = margin - low + room.clamp_min(0.0) * torch.rand(n, 2, generator=generator).double()
    # A figure larger than the image (none at the default sizes) is centred.
    centred = (size - 1) / 2 - (high + low) / 2
    offset = torch.where(room < 0, centred, offset)
    clean = points + offset[:, None]
    scale = (high - low).amax(dim=1)

    thickness = _uniform(n, 1.2, 2.0, generator)
    head_radius = 0.16 * torso_pixels
    images = _render(clean, thickness, head_radius, size)
    images = images + pixel_noise * torch.randn(images.shape, generator=generator).double()

    # Occluders: a square of random texture; keypoints under it are invisible.
    visible = torch.ones(n, len(KEYPOINT_NAMES), dtype=torch.float64)
    occluded = torch.rand(n, generator=generator) < occlusion
    side = (_uniform(n, 0.25, 0.45, generator) * size).round()
    corner = torch.rand(n, 2, generator=generator).double() * (size - side[:, None])
    corner = corner.round()
    texture = torch.rand(n, size, size, generator=generator).double()
    coords = torch.arange(size, dtype=torch.float64)
    inside_x = (coords[None] >= corner[:, :1]) & (coords[None] < corner[:, :1] + side[:, None])
    inside_y = (coords[None] >= corner[:, 1:]) & (coords[None] < corner[:, 1:] + side[:, None])
    patch = inside_y[:, :, None] & inside_x[:, None, :] & occluded[:, None, None]
    images = torch.where(patch, texture, images)
    # A keypoint is hidden when the pixel it lies in is covered.
    pixel = clean.round().clamp(0, size - 1).long()
    under = patch[torch.arange(n)[:, None], pixel[..., 1], pixel[..., 0]]
    visible = torch.where(under, 0.0, visible)

    # Drawn even without noise (then the labels are exactly the truth), so that the images of
    # a seed do not depend on the noise settings.
    labels = _annotation_noise(
        clean, scale, size, noise_scale, noise_df, outlier_fraction, generator
    )
    return KeypointData(
        images=images[:, None].float(),
        keypoints=labels.float(),
        clean=clean.float(),
        visible=visible.float(),
        scale=scale.float(),
        oks_sigmas=OKS_SIGMAS,
    )


def stick_figure_split(
    n_train: int,
    n_test: int,
    size: int = 32,
    seed: int = 0,
    occlusion: float = 0.5,
    noise_scale: float = 0.04,
    noise_df: int = 3,
    outlier_fraction: float = 0.02,
    noisy_test_labels: bool = False,
) -> tuple[KeypointData, KeypointData]:
    """A training set with noisy labels and a test set with exact ones.

    Both sets come from :func:`make_stick_figures` with the same occlusion and independent
    seeds derived from ``seed``; only the training labels carry the annotation noise, unless
    ``noisy_test_labels`` asks for the same noise on the test labels (the test images and
    ``clean`` do not change; a likelihood model's scales can then be judged against labels
    of the kind it was trained on).

    Returns:
        (train, test) :class:`KeypointData`.
    """
    train = make_stick_figures(
        n_train,
        size,
        seed=2 * seed,
        occlusion=occlusion,
        noise_scale=noise_scale,
        noise_df=noise_df,
        outlier_fraction=outlier_fraction,
    )
    test = make_stick_figures(
        n_test,
        size,
        seed=2 * seed + 1,
        occlusion=occlusion,
        noise_scale=noise_scale if noisy_test_labels else 0.0,
        noise_df=noise_df,
        outlier_fraction=outlier_fraction if noisy_test_labels else 0.0,
    )
    return train, test


def digit_localisation_split(
    seed: int = 0,
    size: int = 32,
    min_side: int = 12,
    max_side: int = 24,
    test_fraction: float = 0.2,
    noise_scale: float = 0.04,
    noise_df: int = 3,
    outlier_fraction: float = 0.02,
    pixel_noise: float = 0.05,
    noisy_test_labels: bool = False,
) -> tuple[KeypointData, KeypointData]:
    """Locate the ink of a real handwritten digit: scikit-learn's 1797 digit scans.

    Each 8x8 scan (scaled to [0, 1]) is resized with bilinear interpolation to a random side
    in ``[min_side, max_side]`` pixels and pasted at a random place on a ``size`` x ``size``
    canvas with Gaussian pixel noise. The label (K = 1) is the centre of mass of the pasted
    ink; ``scale`` is the pasted side. The training labels get the annotation noise of
    :func:`make_stick_figures` (``noise_scale`` times the side, Student-t, outliers), the test
    labels are exact unless ``noisy_test_labels`` (``clean`` stays exact either way). The
    split is seeded and shuffled; every keypoint is visible. The OKS constant is 0.079 (COCO's
    shoulder value, a mid-range body part).

    Returns:
        (train, test) :class:`KeypointData`, 1438 and 359 examples with the defaults.

    Raises:
        ImportError: scikit-learn is not installed.
        ValueError: sides that do not fit the canvas, or a bad fraction or noise setting.
    """
    _check_common(1, size, noise_scale, outlier_fraction)
    if not 1 <= min_side <= max_side <= size:
        raise ValueError(
            f"min_side and max_side must satisfy 1 <= min_side <= max_side <= size ({size}), "
            f"got {min_side} and {max_side}"
        )
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    try:
        from sklearn.datasets import load_digits
    except ImportError as error:
        raise ImportError(
            "the digits task needs scikit-learn: pip install deepkern[models]"
        ) from error

    generator = torch.Generator().manual_seed(seed)
    scans = torch.tensor(load_digits().images, dtype=torch.float64) / 16.0
    n = len(scans)
    sides = torch.randint(min_side, max_side + 1, (n,), generator=generator)
    canvas = pixel_noise * torch.randn(n, size, size, generator=generator, dtype=torch.float64)
    clean = torch.zeros(n, 1, 2, dtype=torch.float64)
    coords = torch.arange(size, dtype=torch.float64)
    for i in range(n):
        side = int(sides[i])
        digit = F.interpolate(
            scans[i][None, None], size=(side, side), mode="bilinear", align_corners=False
        )[0, 0].clamp_min(0.0)
        x0, y0 = (torch.randint(0, size - side + 1, (2,), generator=generator)).tolist()
        canvas[i, y0 : y0 + side, x0 : x0 + side] += digit
        mass = digit.sum().clamp_min(1e-12)
        clean[i, 0, 0] = (digit.sum(0) * coords[x0 : x0 + side]).sum() / mass
        clean[i, 0, 1] = (digit.sum(1) * coords[y0 : y0 + side]).sum() / mass
    scale = sides.double()

    # Drawn even without noise, so that the split of a seed does not depend on the noise.
    labels = _annotation_noise(
        clean, scale, size, noise_scale, noise_df, outlier_fraction, generator
    )
    order = torch.randperm(n, generator=generator)
    n_test = int(round(test_fraction * n))
    test_index, train_index = order[:n_test], order[n_test:]
    data = KeypointData(
        images=canvas[:, None].float(),
        keypoints=labels.float(),
        clean=clean.float(),
        visible=torch.ones(n, 1),
        scale=scale.float(),
        oks_sigmas=(0.079,),
    )
    train = data.subset(train_index)
    test = data.subset(test_index)
    if not noisy_test_labels:
        test.keypoints = test.clean.clone()
    return train, test
