"""Measures of a generator's samples in the feature space of a classifier we train.

There is no pretrained Inception network here (nothing is downloaded), so the features come
from a small convolutional classifier trained on the same labelled images
(:class:`FeatureClassifier`, :func:`train_classifier`). In its penultimate feature space:

- :func:`frechet_distance`: the Frechet distance between the Gaussians fitted to two sets of
  features (the FID recipe with our classifier in place of Inception), in closed form;
- :func:`precision_recall`: improved precision and recall (Kynkaanniemi, Karras, Laine,
  Lehtinen and Aila, 2019), with k-nearest-neighbour balls as the estimate of each manifold;
- :func:`mode_coverage`: the class histogram of generated samples as the classifier labels
  them, the number of classes covered and the KL divergence from the uniform histogram;
- :func:`evaluate_samples` runs all three; :func:`write_image_grid` saves samples as a PNG.

Numbers from different classifiers are not comparable with each other, nor with published FID
values: compare models only under one classifier, at one sample size.
"""

from __future__ import annotations

import logging
import math
import os
import struct
import zlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from deepkern.models.training import progress_bar

__all__ = [
    "FeatureClassifier",
    "ClassifierConfig",
    "train_classifier",
    "classifier_features",
    "gaussian_statistics",
    "frechet_distance",
    "frechet_distance_of_features",
    "precision_recall",
    "mode_coverage",
    "evaluate_samples",
    "write_image_grid",
]

logger = logging.getLogger("deepkern.models.gan_metrics")


# ---------------------------------------------------------------------------------------------
# The classifier whose features the measures use


class FeatureClassifier(nn.Module):
    """A small convolutional classifier whose penultimate layer serves as feature space.

    Three 3x3 convolutions with ReLU (the last two followed by 2x2 max pooling), an average
    pool to 2x2, a linear layer to ``feature_dim`` features with ReLU, and a linear decision
    layer. It accepts any image side of at least 4.

    Args:
        in_channels: channels of the images.
        num_classes: classes of the decision layer.
        width: channels of the first convolution (the others have twice as many).
        feature_dim: size of the feature space.
        generator: the random source of the initial weights.

    Shapes:
        forward(x: Tensor[N, in_channels, H, W]) -> logits Tensor[N, num_classes]
        features(x) -> Tensor[N, feature_dim]
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 10,
        width: int = 32,
        feature_dim: int = 64,
        generator: torch.Generator | None = None,
    ):
        super().__init__()
        for name, value in (
            ("in_channels", in_channels),
            ("num_classes", num_classes),
            ("width", width),
            ("feature_dim", feature_dim),
        ):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        self.num_classes = num_classes
        self.feature_dim = feature_dim
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.AdaptiveAvgPool2d(2),
            nn.Flatten(),
            nn.Linear(8 * width, feature_dim),
            nn.ReLU(),
        )
        self.head = nn.Linear(feature_dim, num_classes)
        if generator is not None:
            with torch.no_grad():
                for module in self.modules():
                    if isinstance(module, (nn.Conv2d, nn.Linear)):
                        fan_in = module.weight[0].numel()
                        bound = math.sqrt(6.0 / fan_in)  # He uniform, for ReLU layers
                        module.weight.uniform_(-bound, bound, generator=generator)
                        module.bias.zero_()

    def features(self, x: Tensor) -> Tensor:
        return self.body(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x))


@dataclass
class ClassifierConfig:
    """Settings of :func:`train_classifier`.

    Attributes:
        epochs: passes over the training images.
        lr: learning rate of Adam.
        batch_size: images per step.
        seed: seeds the order of the images.
        device: where to train.
        progress: show a tqdm progress bar.
    """

    epochs: int = 8
    lr: float = 1e-3
    batch_size: int = 64
    seed: int = 0
    device: str = "cpu"
    progress: bool = True

    def __post_init__(self):
        if not isinstance(self.epochs, int) or self.epochs < 0:
            raise ValueError(f"epochs must be an integer >= 0, got {self.epochs!r}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be positive and finite, got {self.lr!r}")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {self.batch_size!r}")


def train_classifier(
    model: FeatureClassifier,
    config: ClassifierConfig,
    train_data: tuple[Tensor, Tensor],
    test_data: tuple[Tensor, Tensor] | None = None,
) -> dict:
    """Train the feature classifier with Adam and cross-entropy; report its test accuracy.

    Every process of a distributed run trains the same classifier on all the images (it is
    small), so that all of them measure in the same feature space.

    Args:
        model: the classifier; trained in place, moved to ``config.device``, left in eval mode.
        config: the settings.
        train_data: (images Tensor[N, C, H, W] floating point, labels Tensor[N] int64).
        test_data: the same for held-out images, or None.

    Returns:
        dict with ``train_loss`` (last epoch), ``test_accuracy`` (a fraction, None without
        test data) and ``epochs``.

    Raises:
        ValueError: images and labels of different lengths, labels out of range, or a loss
            that is not finite.
    """
    x, y = train_data
    if x.dim() != 4 or y.shape != (x.shape[0],):
        raise ValueError(
            f"train_data must be images [N, C, H, W] and labels [N], got {tuple(x.shape)} "
            f"and {tuple(y.shape)}"
        )
    if len(y) and (int(y.min()) < 0 or int(y.max()) >= model.num_classes):
        raise ValueError(f"labels must lie in [0, {model.num_classes}), got {y.min()}..{y.max()}")
    device = torch.device(config.device)
    model.to(device).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    order_rng = torch.Generator().manual_seed(config.seed)
    steps = math.ceil(len(x) / config.batch_size)
    bar = progress_bar(config.epochs * steps, "feature classifier", config.progress, leave=False)
    loss_sum, count = 0.0, 0
    try:
        for _ in range(config.epochs):
            loss_sum, count = 0.0, 0
            order = torch.randperm(len(x), generator=order_rng)
            for start in range(0, len(x), config.batch_size):
                index = order[start : start + config.batch_size]
                xb, yb = x[index].to(device), y[index].to(device)
                loss = F.cross_entropy(model(xb), yb)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                loss_sum += float(loss.detach()) * len(index)
                count += len(index)
                bar.update(1)
    finally:
        bar.close()
    train_loss = loss_sum / max(count, 1)
    if not math.isfinite(train_loss):
        raise ValueError(f"the feature classifier's loss is not finite; lower lr ({config.lr})")

    model.eval()
    accuracy = None
    if test_data is not None:
        with torch.no_grad():
            predictions = torch.cat(
                [model(chunk.to(device)).argmax(1).cpu() for chunk in test_data[0].split(256)]
            )
        accuracy = float((predictions == test_data[1]).double().mean())
    logger.info("feature classifier: train loss %.4f, test accuracy %s", train_loss, accuracy)
    return {"train_loss": train_loss, "test_accuracy": accuracy, "epochs": config.epochs}


@torch.no_grad()
def classifier_features(
    model: FeatureClassifier, images: Tensor, batch_size: int = 256
) -> tuple[Tensor, Tensor]:
    """Penultimate features and predicted classes of ``images``, in eval mode, on the CPU.

    Returns:
        (features Tensor[N, feature_dim] float64, predicted labels Tensor[N] int64).
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    features, labels = [], []
    for chunk in images.split(batch_size):
        f = model.features(chunk.to(device))
        features.append(f.double().cpu())
        labels.append(model.head(f).argmax(1).cpu())
    model.train(was_training)
    if not features:
        return torch.zeros(0, model.feature_dim, dtype=torch.float64), torch.zeros(0).long()
    return torch.cat(features), torch.cat(labels)


# ---------------------------------------------------------------------------------------------
# Frechet distance


def gaussian_statistics(features: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and unbiased covariance of ``features`` (Tensor[N, D], N >= 2), in float64."""
    if features.dim() != 2 or features.shape[0] < 2:
        raise ValueError(f"features must be [N, D] with N >= 2, got shape {tuple(features.shape)}")
    f = features.double()
    mean = f.mean(0)
    centred = f - mean
    return mean, centred.T @ centred / (f.shape[0] - 1)


def _psd_sqrt(matrix: Tensor) -> Tensor:
    eigenvalues, eigenvectors = torch.linalg.eigh(matrix)
    return (eigenvectors * eigenvalues.clamp_min(0).sqrt()) @ eigenvectors.T


def frechet_distance(mean1: Tensor, cov1: Tensor, mean2: Tensor, cov2: Tensor) -> float:
    """Frechet (2-Wasserstein squared) distance between N(mean1, cov1) and N(mean2, cov2).

    ``|mean1 - mean2|^2 + tr(cov1) + tr(cov2) - 2 tr((cov1 cov2)^(1/2))``. The trace of the
    matrix square root is computed as ``tr((S1^(1/2) cov2 S1^(1/2))^(1/2))`` with
    ``S1^(1/2)`` the symmetric square root of cov1: the two matrices are similar, and the
    second one is symmetric positive semi-definite, so a symmetric eigendecomposition gives
    it without the complex round-off of a general matrix square root. Computed in float64;
    eigenvalues that round-off leaves slightly negative count as zero.

    Args:
        mean1, mean2 (Tensor[D]): the means.
        cov1, cov2 (Tensor[D, D]): symmetric positive semi-definite covariances.

    Returns:
        the distance, a float >= 0 (up to round-off).

    Raises:
        ValueError: shapes that disagree.

    Example:
        >>> frechet_distance(torch.zeros(1), torch.eye(1), torch.ones(1), 4 * torch.eye(1))
        2.0
    """
    d = mean1.shape[-1] if mean1.dim() == 1 else -1
    shapes = [tuple(t.shape) for t in (mean1, cov1, mean2, cov2)]
    if d < 0 or shapes != [(d,), (d, d), (d,), (d, d)]:
        raise ValueError(f"means must be [D] and covariances [D, D], got shapes {shapes}")
    mean1, cov1, mean2, cov2 = (t.double().cpu() for t in (mean1, cov1, mean2, cov2))
    root1 = _psd_sqrt(cov1)
    middle = root1 @ cov2 @ root1
    middle = 0.5 * (middle + middle.T)  # symmetric up to round-off; make it exactly so
    trace_root = torch.linalg.eigvalsh(middle).clamp_min(0).sqrt().sum()
    distance = (mean1 - mean2).square().sum() + cov1.trace() + cov2.trace() - 2 * trace_root
    return float(distance)


def frechet_distance_of_features(features1: Tensor, features2: Tensor) -> float:
    """:func:`frechet_distance` between Gaussians fitted to two sets of features [N, D]."""
    if features1.dim() != 2 or features2.dim() != 2 or features1.shape[1] != features2.shape[1]:
        raise ValueError(
            f"features must be [N, D] with one D, got {tuple(features1.shape)} and "
            f"{tuple(features2.shape)}"
        )
    return frechet_distance(*gaussian_statistics(features1), *gaussian_statistics(features2))


# ---------------------------------------------------------------------------------------------
# Precision and recall


def _kth_neighbour_radii(features: Tensor, k: int, batch_size: int) -> Tensor:
    radii = []
    for chunk in features.split(batch_size):
        distances = torch.cdist(chunk, features)
        # The smallest distance is the point to itself (zero); the k-th neighbour is next.
        radii.append(distances.kthvalue(k + 1, dim=1).values)
    return torch.cat(radii)


def _share_inside(points: Tensor, centres: Tensor, radii: Tensor, batch_size: int) -> float:
    inside = 0
    for chunk in points.split(batch_size):
        distances = torch.cdist(chunk, centres)
        inside += int((distances <= radii[None, :]).any(dim=1).sum())
    return inside / max(len(points), 1)


def precision_recall(
    real: Tensor, fake: Tensor, k: int = 3, batch_size: int = 1024
) -> tuple[float, float]:
    """Improved precision and recall of Kynkaanniemi et al. (2019) between two feature sets.

    Each set's manifold is estimated as the union of balls around its points, each ball's
    radius the distance from its point to that point's k-th nearest neighbour in the same set
    (the point itself not counted). Precision is the share of fake points inside the real
    manifold (are the samples realistic?); recall the share of real points inside the fake
    manifold (is all of the data covered?). The paper uses k = 3; a point on a ball's surface
    counts as inside.

    Args:
        real (Tensor[N, D]) and fake (Tensor[M, D]): features, N and M greater than k.
        k (int >= 1): the neighbour that sets each radius.
        batch_size: rows of the distance matrix held at once.

    Returns:
        (precision, recall), fractions in [0, 1].

    Raises:
        ValueError: feature sets of different widths, or too few points for k.

    Example:
        >>> real = torch.tensor([[0.0], [1.0], [2.0]])
        >>> precision_recall(real, torch.tensor([[0.5], [5.0]]), k=1)
        (0.5, 1.0)

        The fake outlier at 5 is outside the real manifold (precision 1/2), but it also widens
        the fake balls to radius 4.5, which then hold every real point: the estimate is
        sensitive to outliers, as the paper notes.
    """
    if real.dim() != 2 or fake.dim() != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(
            f"real and fake must be [N, D] with one D, got {tuple(real.shape)} and "
            f"{tuple(fake.shape)}"
        )
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    if len(real) <= k or len(fake) <= k:
        raise ValueError(
            f"both sets need more than k = {k} points, got {len(real)} and {len(fake)}"
        )
    real, fake = real.double(), fake.double()
    real_radii = _kth_neighbour_radii(real, k, batch_size)
    fake_radii = _kth_neighbour_radii(fake, k, batch_size)
    precision = _share_inside(fake, real, real_radii, batch_size)
    recall = _share_inside(real, fake, fake_radii, batch_size)
    return precision, recall


# ---------------------------------------------------------------------------------------------
# Mode coverage


def mode_coverage(labels: Tensor, num_classes: int, min_share: float = 0.1) -> dict:
    """How the predicted classes of generated samples spread over the classes.

    A class counts as covered when it receives at least ``min_share`` of its uniform share
    of the samples (with the default 0.1 and ten classes: at least 1 % of them). The KL
    divergence ``sum_c p_c log(p_c K)`` of the histogram p from the uniform histogram over K
    classes is 0 for a perfectly even spread and log K when every sample falls in one class.
    Both suit data whose classes are (nearly) balanced, as the digits and the photo patches
    are.

    Args:
        labels (Tensor[N], int64): the class of each sample, in [0, num_classes).
        num_classes (int >= 1): K.
        min_share (float in [0, 1]): the part of the uniform share that covers a class.

    Returns:
        dict with ``histogram`` (list of K fractions), ``covered`` (int) and ``kl_uniform``
        (float, in nats).

    Raises:
        ValueError: no labels, labels out of range, or arguments out of range.

    Example:
        >>> mode_coverage(torch.tensor([0, 0, 1, 1]), 4)["covered"]
        2
    """
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
    if not 0.0 <= min_share <= 1.0:
        raise ValueError(f"min_share must lie in [0, 1], got {min_share!r}")
    if labels.dim() != 1 or len(labels) == 0:
        raise ValueError(f"labels must be a non-empty [N] tensor, got shape {tuple(labels.shape)}")
    if int(labels.min()) < 0 or int(labels.max()) >= num_classes:
        raise ValueError(
            f"labels must lie in [0, {num_classes}), got {labels.min()}..{labels.max()}"
        )
    counts = torch.bincount(labels.long().cpu(), minlength=num_classes).double()
    histogram = counts / counts.sum()
    covered = int((histogram >= min_share / num_classes).sum())
    nonzero = histogram[histogram > 0]
    kl = float((nonzero * (nonzero * num_classes).log()).sum())
    return {"histogram": histogram.tolist(), "covered": covered, "kl_uniform": max(kl, 0.0)}


def evaluate_samples(
    classifier: FeatureClassifier,
    reference: Tensor,
    samples: Tensor,
    k: int = 3,
    reference_features: Tensor | None = None,
) -> dict:
    """Frechet distance, precision, recall and mode coverage of ``samples`` against ``reference``.

    Args:
        classifier: the trained feature classifier.
        reference (Tensor[N, C, H, W]): real images (for example the training images).
        samples (Tensor[M, C, H, W]): generated (or held-out real) images.
        k: the neighbour of :func:`precision_recall`.
        reference_features: the reference's features if already computed (saves time).

    Returns:
        dict with ``fd``, ``precision``, ``recall``, ``covered``, ``kl_uniform`` and
        ``histogram``.
    """
    if reference_features is None:
        reference_features, _ = classifier_features(classifier, reference)
    sample_features, sample_labels = classifier_features(classifier, samples)
    precision, recall = precision_recall(reference_features, sample_features, k=k)
    coverage = mode_coverage(sample_labels, classifier.num_classes)
    return {
        "fd": frechet_distance_of_features(reference_features, sample_features),
        "precision": precision,
        "recall": recall,
        "covered": coverage["covered"],
        "kl_uniform": coverage["kl_uniform"],
        "histogram": coverage["histogram"],
    }


# ---------------------------------------------------------------------------------------------
# Image grids


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    body = kind + data
    return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body) & 0xFFFFFFFF)


def write_image_grid(
    path: str | os.PathLike, images: Tensor, columns: int = 8, padding: int = 1, scale: int = 2
) -> None:
    """Save images with values in [-1, 1] as one PNG grid (8-bit grey or RGB), no dependency.

    Args:
        path: the PNG file; its folder is created when missing.
        images (Tensor[N, C, H, W], C = 1 or 3): values in [-1, 1] (clamped).
        columns: images per row.
        padding: pixels of white between images.
        scale: each pixel becomes scale x scale pixels (small images are easier to see).

    Raises:
        ValueError: no images, a channel count other than 1 or 3, or columns, padding or scale
            out of range.
    """
    if images.dim() != 4 or images.shape[0] == 0 or images.shape[1] not in (1, 3):
        raise ValueError(f"images must be [N, 1 or 3, H, W] with N >= 1, got {tuple(images.shape)}")
    if columns < 1 or padding < 0 or scale < 1:
        raise ValueError(
            f"columns and scale must be >= 1 and padding >= 0, got {columns}, {scale}, {padding}"
        )
    n, channels, height, width = images.shape
    rows = math.ceil(n / columns)
    cols = min(columns, n)
    pixels = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    pixels = pixels.repeat_interleave(scale, 2).repeat_interleave(scale, 3)
    h, w = height * scale, width * scale
    grid = torch.full(
        (channels, rows * (h + padding) + padding, cols * (w + padding) + padding),
        255,
        dtype=torch.uint8,
    )
    for i in range(n):
        top = padding + (i // columns) * (h + padding)
        left = padding + (i % columns) * (w + padding)
        grid[:, top : top + h, left : left + w] = pixels[i]

    # PNG: each row starts with filter byte 0 (none), then the pixels, channels interleaved.
    rows_bytes = grid.permute(1, 2, 0).reshape(grid.shape[1], -1)
    raw = torch.cat([torch.zeros(grid.shape[1], 1, dtype=torch.uint8), rows_bytes], 1)
    colour_type = 0 if channels == 1 else 2
    header = struct.pack(">IIBBBBB", grid.shape[2], grid.shape[1], 8, colour_type, 0, 0, 0)
    png = (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", zlib.compress(raw.numpy().tobytes(), 6))
        + _png_chunk(b"IEND", b"")
    )
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    with open(path, "wb") as file:
        file.write(png)
