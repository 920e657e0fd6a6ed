"""Keypoint regression with residual log-likelihood estimation (RLE, Li et al., ICCV 2021).

One small convolutional backbone, four ways to train it to locate keypoints:

- ``"l1"`` and ``"l2"``: direct regression of the coordinates with the L1 or L2 loss;
- ``"rle"``: direct regression of a mean and a scale per coordinate with
  :class:`deepkern.nn.RLELoss` (a RealNVP flow learns the density of the normalised residual);
- ``"heatmap"``: the standard heatmap baseline of the same backbone, a deconvolution head that
  predicts one Gaussian heatmap per keypoint, decoded by argmax with a quarter-pixel shift.

This module holds the networks (:class:`KeypointModel`), :func:`train` with
:class:`TrainConfig` (seeded, checkpointed, resumable, data parallel under
``torch.distributed``), the metrics (:func:`pck`, :func:`oks`, :func:`oks_ap`,
:func:`scale_calibration`, :func:`evaluate`) and ``deepkern reproduce rle``.

Metrics, defined once here:

- PCK@a: the share of visible keypoints predicted within ``a * scale`` of the truth, with
  ``scale`` the figure size of :class:`deepkern.data.keypoints.KeypointData` (the larger side
  of the tight box around the true keypoints).
- OKS: COCO's object keypoint similarity ``sum_i exp(-d_i^2 / (2 s^2 k_i^2)) / #visible``
  over the visible keypoints, with ``s^2`` the object area, here ``scale^2``, and
  ``k_i = 2 sigma_i`` (``KeypointData.oks_sigmas``).
- AP: COCO's average precision over the OKS thresholds 0.50, 0.55, ..., 0.95 for images with
  one figure and one prediction each: at a threshold a prediction is a true positive when its
  OKS reaches it; predictions are ranked by their confidence score; precision is interpolated
  at 101 recall points and averaged. AR is the recall (the share of images above the
  threshold) averaged over the same thresholds, which does not depend on the scores. Images
  with no visible keypoint are left out, as COCO leaves out figures without keypoints.
- Calibration of the predicted scales (RLE only): the normalised residuals
  ``r = (y - mu) / sigma`` of the visible test keypoints against the residual density the
  model learned (the base times the flow, normalised, from weighted samples): the shares of
  ``|r|`` inside the intervals of probability 68.3%, 95.4% and 99.7% (the "1, 2, 3 sigma"
  masses) next to those nominal shares, and the expected calibration error, the mean over the
  levels p = 0.05, 0.15, ..., 0.95 of ``|share of |r| inside the level-p interval - p|``.
  The same against the base density alone is reported too: the flow can absorb part of the
  scale (the paper leaves the product's normaliser out), so ``sigma`` need not be calibrated
  against the base by itself.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import os
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn

from deepkern.data.keypoints import KeypointData
from deepkern.models.training import (
    SilentBar,
    batches_of,
    data_parallel,
    environment,
    process_group,
    progress_bar,
    rank_and_world,
    save_on_first_rank,
    settings_from_arguments,
    warmup_cosine,
    write_json,
)
from deepkern.nn import RLELoss

__all__ = [
    "METHODS",
    "Backbone",
    "KeypointModel",
    "TrainConfig",
    "train",
    "evaluate",
    "pck",
    "oks",
    "oks_ap",
    "scale_calibration",
    "add_reproduce_arguments",
    "run_reproduce",
]

logger = logging.getLogger("deepkern.models.rle")

METHODS = ("l1", "l2", "heatmap", "rle")
OKS_THRESHOLDS = tuple(0.5 + 0.05 * i for i in range(10))


# ---------------------------------------------------------------------------------------------
# Networks


def _conv(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class Backbone(nn.Module):
    """Five 3x3 convolutions with BatchNorm and ReLU, down to a quarter of the image side.

    Widths ``w, w, 2w, 2w, 4w``; the first and third convolutions have stride 2.

    Shapes:
        forward(x: Tensor[N, C, S, S]) -> Tensor[N, 4w, S/4, S/4] (sides rounded up).
    """

    def __init__(self, in_channels: int = 1, width: int = 16):
        super().__init__()
        self.out_channels = 4 * width
        self.layers = nn.Sequential(
            _conv(in_channels, width, stride=2),
            _conv(width, width),
            _conv(width, 2 * width, stride=2),
            _conv(2 * width, 2 * width),
            _conv(2 * width, 4 * width),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)


def _gaussian_heatmaps(points: Tensor, side: int, radius: float) -> Tensor:
    """Unnormalised Gaussians (peak 1) at ``points`` [N, K, 2] in heatmap pixels."""
    coords = torch.arange(side, dtype=points.dtype, device=points.device)
    dx = coords[None, None, None, :] - points[..., 0, None, None]
    dy = coords[None, None, :, None] - points[..., 1, None, None]
    return torch.exp(-(dx * dx + dy * dy) / (2.0 * radius * radius))


def _decode_heatmaps(heatmaps: Tensor) -> tuple[Tensor, Tensor]:
    """Argmax of each map, moved a quarter pixel toward the higher neighbour (standard practice).

    Returns (points Tensor[N, K, 2] in heatmap pixels, maxima Tensor[N, K]).
    """
    n, k, h, w = heatmaps.shape
    flat = heatmaps.reshape(n, k, -1)
    maxima, index = flat.max(dim=-1)
    x, y = (index % w), (index // w)
    maps = heatmaps.reshape(n * k, h, w)
    xi, yi = x.reshape(-1), y.reshape(-1)
    rows = torch.arange(n * k, device=heatmaps.device)
    right = maps[rows, yi, (xi + 1).clamp(max=w - 1)]
    left = maps[rows, yi, (xi - 1).clamp(min=0)]
    down = maps[rows, (yi + 1).clamp(max=h - 1), xi]
    up = maps[rows, (yi - 1).clamp(min=0), xi]
    shift_x = 0.25 * torch.sign(right - left)
    shift_y = 0.25 * torch.sign(down - up)
    points = torch.stack([xi.to(heatmaps.dtype) + shift_x, yi.to(heatmaps.dtype) + shift_y], -1)
    return points.reshape(n, k, 2), maxima


class KeypointModel(nn.Module):
    """A backbone, a head for one method, and that method's training loss, in one module.

    Regression methods pool the backbone's features and predict, per keypoint, a mean in
    normalised coordinates ``u = (p + 0.5) / S - 0.5`` (``p`` in pixels, ``S`` the image side)
    and, for RLE, a scale ``sigma = sigmoid(.)`` in the same units (the official setting).
    The heatmap method doubles the side of the features with a transposed convolution (heatmaps
    at half the image side) and regresses Gaussian heatmaps of radius 1 heatmap pixel with the
    mean squared error.

    The loss lives inside the module (for RLE the flow's parameters are then part of
    ``parameters()``, of the optimiser and of DistributedDataParallel's gradient reduction).

    Args:
        method: one of :data:`METHODS`.
        num_keypoints (int >= 1): keypoints per image.
        image_size (int >= 8): the side S of the (square) images.
        width (int >= 1): the backbone width w.
        in_channels (int >= 1): image channels.
        seed: seeds the initial weights.
        rle_base, rle_variant: the base and the variant of :class:`deepkern.nn.RLELoss`.

    Shapes:
        forward(images: Tensor[N, C, S, S], target: Tensor[N, K, 2] pixels or None,
        target_weight: Tensor[N, K] or None) -> dict with ``keypoints`` (Tensor[N, K, 2],
        pixels), ``sigma`` (Tensor[N, K, 2] pixels, RLE only, else None), ``score``
        (Tensor[N], the confidence used to rank predictions: ``mean(1 - sigma)`` for RLE, the
        mean heatmap maximum for heatmaps, 1 for L1 and L2) and, when a target is given,
        ``loss`` (a scalar).

    Raises:
        ValueError: an unknown method or a size out of range.
    """

    def __init__(
        self,
        method: str,
        num_keypoints: int,
        image_size: int = 32,
        width: int = 16,
        in_channels: int = 1,
        seed: int = 0,
        rle_base: str = "laplace",
        rle_variant: str = "paper",
    ):
        super().__init__()
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        if num_keypoints < 1:
            raise ValueError(f"num_keypoints must be >= 1, got {num_keypoints}")
        if image_size < 8:
            raise ValueError(f"image_size must be >= 8, got {image_size}")
        if width < 1:
            raise ValueError(f"width must be >= 1, got {width}")
        self.method = method
        self.num_keypoints = num_keypoints
        self.image_size = image_size
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.backbone = Backbone(in_channels, width)
            channels = self.backbone.out_channels
            if method == "heatmap":
                self.head = nn.Sequential(
                    nn.ConvTranspose2d(channels, channels, 4, stride=2, padding=1, bias=False),
                    nn.BatchNorm2d(channels),
                    nn.ReLU(inplace=True),
                    nn.Conv2d(channels, num_keypoints, 1),
                )
            else:
                self.head = nn.Sequential(
                    nn.AdaptiveAvgPool2d(1),
                    nn.Flatten(),
                    nn.Linear(channels, 4 * channels),
                    nn.ReLU(inplace=True),
                )
                self.coord = nn.Linear(4 * channels, 2 * num_keypoints)
                self.sigma_logit = (
                    nn.Linear(4 * channels, 2 * num_keypoints) if method == "rle" else None
                )
            # sigma comes out of a sigmoid plus a floor, positive by construction: the value
            # check (a device synchronisation per step) is not needed.
            self.rle = (
                RLELoss(base=rle_base, variant=rle_variant, check_values=False)
                if method == "rle"
                else None
            )

    def _to_unit(self, pixels: Tensor) -> Tensor:
        return (pixels + 0.5) / self.image_size - 0.5

    def _to_pixels(self, unit: Tensor) -> Tensor:
        return (unit + 0.5) * self.image_size - 0.5

    def forward(
        self, images: Tensor, target: Tensor | None = None, target_weight: Tensor | None = None
    ) -> dict:
        if images.dim() != 4 or images.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(
                f"images must be [N, C, {self.image_size}, {self.image_size}], "
                f"got {tuple(images.shape)}"
            )
        n, k = images.shape[0], self.num_keypoints
        if target is not None and target.shape != (n, k, 2):
            raise ValueError(f"target must be [{n}, {k}, 2], got {tuple(target.shape)}")
        if target is not None and target_weight is None:
            target_weight = torch.ones(n, k, dtype=target.dtype, device=target.device)
        if target_weight is not None and target_weight.shape != (n, k):
            raise ValueError(f"target_weight must be [{n}, {k}], got {tuple(target_weight.shape)}")
        features = self.backbone(images)
        if self.method == "heatmap":
            return self._heatmap_forward(features, target, target_weight)

        hidden = self.head(features)
        mu = self.coord(hidden).view(n, k, 2)
        out = {"keypoints": self._to_pixels(mu), "sigma": None, "score": mu.new_ones(n)}
        sigma = None
        if self.sigma_logit is not None:
            # sigmoid keeps sigma in (0, 1) image sides; the small floor keeps 1 / sigma finite.
            sigma = torch.sigmoid(self.sigma_logit(hidden).view(n, k, 2)) + 1e-6
            out["sigma"] = sigma * self.image_size
            out["score"] = (1.0 - sigma).mean(dim=(1, 2))
        if target is None:
            return out

        unit_target = self._to_unit(target)
        weight = target_weight.to(mu.dtype)
        count = weight.sum().clamp_min(1.0)
        if self.method == "l1":
            loss = ((mu - unit_target).abs().sum(-1) * weight).sum() / count
        elif self.method == "l2":
            loss = ((mu - unit_target).pow(2).sum(-1) * weight).sum() / count
        else:
            loss = self.rle(mu, sigma, unit_target, weight)
        out["loss"] = loss
        return out

    def _heatmap_forward(self, features: Tensor, target, target_weight) -> dict:
        heatmaps = self.head(features)
        stride = self.image_size / heatmaps.shape[-1]
        points, maxima = _decode_heatmaps(heatmaps.detach())
        # Heatmap pixel j covers image pixels [j * stride, (j + 1) * stride).
        keypoints = (points + 0.5) * stride - 0.5
        out = {"keypoints": keypoints, "sigma": None, "score": maxima.mean(dim=1)}
        if target is None:
            return out
        goal = _gaussian_heatmaps((target + 0.5) / stride - 0.5, heatmaps.shape[-1], 1.0)
        weight = target_weight.to(heatmaps.dtype)[..., None, None]
        squared = (heatmaps - goal.to(heatmaps.dtype)).pow(2) * weight
        # Mean over pixels, then over the visible keypoints.
        per_keypoint = squared.mean(dim=(-2, -1))
        out["loss"] = per_keypoint.sum() / target_weight.sum().clamp_min(1.0)
        return out


# ---------------------------------------------------------------------------------------------
# Metrics


def _check_keypoints(pred: Tensor, target: Tensor, visible: Tensor, scale: Tensor) -> None:
    if pred.dim() != 3 or pred.shape[-1] != 2:
        raise ValueError(f"pred must be [N, K, 2], got {tuple(pred.shape)}")
    if target.shape != pred.shape:
        raise ValueError(f"target must be {tuple(pred.shape)}, got {tuple(target.shape)}")
    if visible.shape != pred.shape[:2]:
        raise ValueError(f"visible must be {tuple(pred.shape[:2])}, got {tuple(visible.shape)}")
    if scale.shape != pred.shape[:1]:
        raise ValueError(f"scale must be [{pred.shape[0]}], got {tuple(scale.shape)}")
    if bool((scale <= 0).any()):
        raise ValueError("scale must be > 0")


def pck(pred: Tensor, target: Tensor, visible: Tensor, scale: Tensor, alpha: float = 0.1) -> float:
    """Percentage of correct keypoints: visible keypoints within ``alpha * scale`` of the truth.

    Args:
        pred, target (Tensor[N, K, 2]): predicted and true positions (pixels).
        visible (Tensor[N, K]): > 0 for the keypoints that count.
        scale (Tensor[N], > 0): the figure sizes.
        alpha (float > 0): the threshold as a fraction of the figure size.

    Returns:
        the share in [0, 1]; NaN when no keypoint is visible.

    Example:
        >>> pck(torch.zeros(1, 2, 2), torch.tensor([[[0.5, 0.0], [3.0, 0.0]]]),
        ...     torch.ones(1, 2), torch.tensor([10.0]), alpha=0.1)
        0.5
    """
    _check_keypoints(pred, target, visible, scale)
    if not alpha > 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    distance = (pred - target).norm(dim=-1)
    correct = (distance <= alpha * scale[:, None]) & (visible > 0)
    count = int((visible > 0).sum())
    return float(correct.sum()) / count if count else float("nan")


def oks(
    pred: Tensor, target: Tensor, visible: Tensor, scale: Tensor, sigmas: tuple[float, ...]
) -> Tensor:
    """COCO's object keypoint similarity of each image's prediction, with area ``scale^2``.

    ``OKS = mean over visible i of exp(-d_i^2 / (2 scale^2 k_i^2))``, ``k_i = 2 sigmas[i]``.

    Returns:
        Tensor[N] float64 in [0, 1]; NaN for an image without visible keypoints.
    """
    _check_keypoints(pred, target, visible, scale)
    if len(sigmas) != pred.shape[1]:
        raise ValueError(f"sigmas must have {pred.shape[1]} entries, got {len(sigmas)}")
    k = 2.0 * torch.tensor(sigmas, dtype=torch.float64, device=pred.device)
    d2 = (pred.double() - target.double()).pow(2).sum(-1)
    area = scale.double().pow(2)[:, None]
    similarity = torch.exp(-d2 / (2.0 * area * k * k))
    mask = (visible > 0).double()
    count = mask.sum(dim=1)
    return torch.where(count > 0, (similarity * mask).sum(dim=1) / count.clamp_min(1.0), torch.nan)


def oks_ap(
    similarity: Tensor, scores: Tensor, thresholds: tuple[float, ...] = OKS_THRESHOLDS
) -> dict:
    """COCO-style AP and AR over OKS thresholds, one figure and one prediction per image.

    At each threshold the predictions are sorted by score (highest first, ties in image
    order); a prediction is a true positive when its OKS reaches the threshold. Precision is
    made monotone (the best precision at any higher recall) and read at the 101 recall levels
    0, 0.01, ..., 1 (0 past the highest recall reached), then averaged.

    Args:
        similarity (Tensor[N]): OKS per image; NaN entries (no visible keypoint) are left out.
        scores (Tensor[N]): the confidence of each prediction.
        thresholds: the OKS thresholds; COCO's 0.50:0.05:0.95 by default.

    Returns:
        dict with ``ap`` and ``ar`` (means over the thresholds), ``ap50`` and ``ap75``
        (when those thresholds are among them), fractions in [0, 1].
    """
    if similarity.shape != scores.shape or similarity.dim() != 1:
        raise ValueError(
            f"similarity and scores must be matching 1-D tensors, got "
            f"{tuple(similarity.shape)} and {tuple(scores.shape)}"
        )
    keep = ~torch.isnan(similarity)
    similarity, scores = similarity[keep].double().cpu(), scores[keep].double().cpu()
    n = len(similarity)
    if n == 0:
        return {"ap": float("nan"), "ar": float("nan"), "ap50": float("nan"), "ap75": float("nan")}
    order = torch.sort(-scores, stable=True).indices
    ranked = similarity[order]
    levels = torch.linspace(0.0, 1.0, 101, dtype=torch.float64)
    aps, ars = {}, {}
    for threshold in thresholds:
        hits = (ranked >= threshold - 1e-12).double()
        true_positives = hits.cumsum(0)
        recall = true_positives / n
        precision = true_positives / torch.arange(1, n + 1, dtype=torch.float64)
        # Monotone precision: the best precision at this recall or any higher one.
        precision = precision.flip(0).cummax(0).values.flip(0)
        index = torch.searchsorted(recall, levels, side="left")
        read = torch.where(index < n, precision[index.clamp(max=n - 1)], 0.0)
        aps[round(threshold, 2)] = float(read.mean())
        ars[round(threshold, 2)] = float(hits.mean())
    return {
        "ap": sum(aps.values()) / len(aps),
        "ar": sum(ars.values()) / len(ars),
        "ap50": aps.get(0.5, float("nan")),
        "ap75": aps.get(0.75, float("nan")),
    }


# The probability mass within 1, 2 and 3 standard deviations of a Gaussian: the nominal
# coverages of the "1, 2, 3 sigma" intervals, whatever the residual density.
NOMINAL_LEVELS = (0.6827, 0.9545, 0.9973)
_ECE_LEVELS = tuple(0.05 + 0.1 * i for i in range(10))


def _base_abs_quantile(p: Tensor, base: str) -> Tensor:
    """The p-quantile of |r| for r from the unit Laplace or the unit Gaussian."""
    if base == "laplace":
        return -torch.log1p(-p)
    return math.sqrt(2.0) * torch.special.erfinv(p)


def _weighted_abs_quantile(samples: Tensor, weights: Tensor, p: Tensor) -> Tensor:
    """The p-quantiles of |samples| per coordinate: samples [M, D], weights [M] -> [len(p), D]."""
    values, order = samples.abs().double().sort(dim=0)
    cumulative = weights.double()[order].cumsum(dim=0)
    cumulative = cumulative / cumulative[-1:]
    columns = []
    for d in range(samples.shape[1]):
        index = torch.searchsorted(cumulative[:, d].contiguous(), p.to(cumulative.device))
        columns.append(values[index.clamp(max=len(values) - 1), d])
    return torch.stack(columns, dim=1).cpu()


def scale_calibration(
    pred: Tensor,
    sigma: Tensor,
    target: Tensor,
    visible: Tensor,
    base: str = "laplace",
    reference: tuple[Tensor, Tensor] | None = None,
) -> dict:
    """How well predicted scales match the errors.

    With ``r = (target - pred) / sigma`` per coordinate of the visible keypoints, a calibrated
    model has ``|r|`` distributed as the residual density it assumes: the base alone (unit
    Laplace or unit Gaussian) when ``reference`` is None, or the density given by the weighted
    samples ``reference`` (for RLE, :meth:`deepkern.nn.RLELoss.sample_residuals`: the base
    times the flow, which is what the network's ``sigma`` was trained against).

    For each level ``p`` the interval ``|r_d| <= q_d(p)`` (``q_d`` the reference quantile of
    coordinate ``d``) should hold a share ``p`` of the residuals.

    Args:
        pred, sigma, target (Tensor[N, K, 2]): means, scales (> 0) and true positions.
        visible (Tensor[N, K]): > 0 for the keypoints that count.
        base ("laplace" or "gaussian"): the reference density when ``reference`` is None.
        reference: (samples Tensor[M, 2], weights Tensor[M]) of the reference density.

    Returns:
        dict with ``within`` (the shares inside the intervals of the nominal levels
        :data:`NOMINAL_LEVELS`, the "1, 2 and 3 sigma" masses), ``nominal`` (those levels)
        and ``ece``, the mean absolute gap between share and level over p = 0.05, 0.15, ...,
        0.95; NaN entries when no keypoint is visible.
    """
    if base not in ("laplace", "gaussian"):
        raise ValueError(f"base must be 'laplace' or 'gaussian', got {base!r}")
    if sigma.shape != pred.shape or target.shape != pred.shape:
        raise ValueError(
            f"pred, sigma and target must have one shape, got {tuple(pred.shape)}, "
            f"{tuple(sigma.shape)} and {tuple(target.shape)}"
        )
    if visible.shape != pred.shape[:-1]:
        raise ValueError(f"visible must be {tuple(pred.shape[:-1])}, got {tuple(visible.shape)}")
    if bool((sigma <= 0).any()):
        raise ValueError("sigma must be > 0")
    r = ((target - pred) / sigma).double()[visible > 0].abs().cpu()
    nominal = list(NOMINAL_LEVELS)
    if r.numel() == 0:
        nan = float("nan")
        return {"within": [nan] * 3, "nominal": nominal, "ece": nan}
    levels = torch.tensor(NOMINAL_LEVELS + _ECE_LEVELS, dtype=torch.float64)
    if reference is None:
        quantiles = _base_abs_quantile(levels, base)[:, None].expand(-1, r.shape[1])
    else:
        samples, weights = reference
        if samples.dim() != 2 or samples.shape[1] != r.shape[1]:
            raise ValueError(
                f"reference samples must be [M, {r.shape[1]}], got {tuple(samples.shape)}"
            )
        quantiles = _weighted_abs_quantile(samples, weights, levels)
    # shares[j] = share of all residual coordinates inside the level-j interval.
    shares = (r[None] <= quantiles[:, None, :]).double().mean(dim=(1, 2))
    count = len(NOMINAL_LEVELS)
    gaps = (shares[count:] - levels[count:]).abs()
    return {
        "within": [float(v) for v in shares[:count]],
        "nominal": nominal,
        "ece": float(gaps.mean()),
    }


@torch.no_grad()
def predict(
    model: KeypointModel, images: Tensor, batch_size: int = 256, device: str = "cpu"
) -> dict:
    """The model's predictions in eval mode, gathered on the CPU.

    Returns:
        dict with ``keypoints`` (Tensor[N, K, 2] pixels), ``sigma`` (Tensor[N, K, 2] pixels
        or None) and ``score`` (Tensor[N]).
    """
    was_training = model.training
    model.eval()
    parts: dict[str, list] = {"keypoints": [], "sigma": [], "score": []}
    for start in range(0, len(images), batch_size):
        out = model(images[start : start + batch_size].to(device))
        for key in parts:
            if out[key] is not None:
                parts[key].append(out[key].float().cpu())
    model.train(was_training)
    k = model.num_keypoints
    return {
        "keypoints": torch.cat(parts["keypoints"]) if parts["keypoints"] else torch.zeros(0, k, 2),
        "sigma": torch.cat(parts["sigma"]) if parts["sigma"] else None,
        "score": torch.cat(parts["score"]) if parts["score"] else torch.zeros(0),
    }


def evaluate(
    model: KeypointModel,
    data: KeypointData,
    batch_size: int = 256,
    device: str = "cpu",
    reference_samples: int = 20000,
) -> dict:
    """Keypoint metrics of ``model`` on ``data``.

    Positions are judged against the truth (``data.clean``). The predicted scales are judged
    against the labels (``data.keypoints``): a likelihood model's scale covers the annotation
    noise it was trained on, so on a test set with noisy labels of the same kind it should be
    calibrated, while against the exact positions it should cover too much.

    Returns:
        dict with ``pck_0.05`` and ``pck_0.1`` (PCK at 5% and 10% of the figure size),
        ``mean_error`` (mean distance in pixels over the visible keypoints), ``ap``, ``ar``,
        ``ap50``, ``ap75`` (see :func:`oks_ap`), ``calibration`` (:func:`scale_calibration`
        against the learned residual density, from ``reference_samples`` weighted samples of
        it, for the labels), ``calibration_truth`` (the same for the true positions) and
        ``calibration_base_only`` (the labels against the base density alone); all None for
        methods without a predicted scale. Fractions in [0, 1].
    """
    out = predict(model, data.images, batch_size, device)
    pred, truth, visible = out["keypoints"], data.clean, data.visible
    distance = (pred - truth).norm(dim=-1)
    mask = visible > 0
    similarity = oks(pred, truth, visible, data.scale, data.oks_sigmas)
    metrics = {
        "pck_0.05": pck(pred, truth, visible, data.scale, 0.05),
        "pck_0.1": pck(pred, truth, visible, data.scale, 0.1),
        "mean_error": float(distance[mask].mean()) if mask.any() else float("nan"),
        **oks_ap(similarity, out["score"]),
        "calibration": None,
        "calibration_truth": None,
        "calibration_base_only": None,
    }
    if out["sigma"] is not None and model.rle is not None:
        reference = model.rle.sample_residuals(reference_samples, torch.Generator().manual_seed(0))
        reference = (reference[0].cpu(), reference[1].cpu())
        sigma, base, labels = out["sigma"], model.rle.base, data.keypoints
        metrics["calibration"] = scale_calibration(pred, sigma, labels, visible, base, reference)
        metrics["calibration_truth"] = scale_calibration(
            pred, sigma, truth, visible, base, reference
        )
        metrics["calibration_base_only"] = scale_calibration(pred, sigma, labels, visible, base)
    return metrics


# ---------------------------------------------------------------------------------------------
# Training


@dataclass
class TrainConfig:
    """Settings of :func:`train`.

    Attributes:
        epochs: passes over the training set.
        lr: peak learning rate of AdamW; linear warm-up over ``warmup_fraction`` of the
            steps, then a cosine down to zero.
        batch_size: examples per step and process.
        weight_decay: AdamW's decoupled weight decay.
        warmup_fraction: share of the steps spent warming up.
        seed: seeds the order of the examples; the same seed and data give the same run.
        device: where to train ("cpu", "cuda", "cuda:1", ...).
        checkpoint: file written (atomically) after every epoch; None writes none.
        resume: continue from ``checkpoint`` when that file exists.
        progress: show a tqdm progress bar (on the first process only).
        eval_batch_size: examples per forward pass when evaluating.
    """

    epochs: int = 20
    lr: float = 2e-3
    batch_size: int = 64
    weight_decay: float = 1e-4
    warmup_fraction: float = 0.05
    seed: int = 0
    device: str = "cpu"
    checkpoint: str | None = None
    resume: bool = False
    progress: bool = True
    eval_batch_size: int = 256

    def __post_init__(self):
        if self.epochs < 0:
            raise ValueError(f"epochs must be >= 0, got {self.epochs}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.eval_batch_size < 1:
            raise ValueError(f"eval_batch_size must be >= 1, got {self.eval_batch_size}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be positive and finite, got {self.lr}")
        if not (self.weight_decay >= 0 and math.isfinite(self.weight_decay)):
            raise ValueError(f"weight_decay must be finite and >= 0, got {self.weight_decay}")
        if not 0.0 <= self.warmup_fraction < 1.0:
            raise ValueError(f"warmup_fraction must be in [0, 1), got {self.warmup_fraction}")
        if self.resume and not self.checkpoint:
            raise ValueError("resume needs a checkpoint path")


def _check_data(name: str, data: KeypointData, model: KeypointModel) -> None:
    if not isinstance(data, KeypointData):
        raise ValueError(f"{name} must be a KeypointData, got {type(data).__name__}")
    if data.num_keypoints != model.num_keypoints or data.size != model.image_size:
        raise ValueError(
            f"{name} has {data.num_keypoints} keypoints on {data.size}-pixel images; the model "
            f"expects {model.num_keypoints} on {model.image_size}-pixel images"
        )


def train(
    model: KeypointModel,
    config: TrainConfig,
    train_data: KeypointData,
    test_data: KeypointData | None = None,
    name: str = "train",
) -> dict:
    """Train a :class:`KeypointModel` with its own loss, then evaluate it on ``test_data``.

    The training labels are ``train_data.keypoints`` (noisy where the set was made so) with
    ``train_data.visible`` as target weight. The order of the examples comes from
    ``config.seed`` and the epoch alone, so a run that resumes from a checkpoint continues as
    the uninterrupted run would have. Under ``torch.distributed`` the model is wrapped in
    DistributedDataParallel and each process trains on its shard of every epoch; the first
    process writes the checkpoint and shows the progress bar.

    Args:
        model: the network with its loss; trained in place, moved to ``config.device``.
        config: the settings.
        train_data: the training set.
        test_data: the test set, evaluated once after the last epoch, or None.
        name: label of the progress bar and of the log messages.

    Returns:
        dict with ``train_loss`` (of the last epoch), ``test`` (:func:`evaluate`'s metrics or
        None), ``epochs``, ``start_epoch`` (above 0 after a resume), ``seconds`` and
        ``history`` (one dict per epoch: ``epoch``, ``train_loss``, ``seconds``).

    Raises:
        ValueError: data that does not fit the model, or a loss that is not finite.
        ImportError: progress bars asked for without tqdm installed.
    """
    _check_data("train_data", train_data, model)
    if test_data is not None:
        _check_data("test_data", test_data, model)
    device = torch.device(config.device)
    rank, world = rank_and_world()
    model.to(device)
    net = data_parallel(model, device, world)

    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.lr, weight_decay=config.weight_decay
    )
    from torch.utils.data import DistributedSampler

    sampler = DistributedSampler(
        range(len(train_data)), num_replicas=world, rank=rank, seed=config.seed
    )
    steps_per_epoch = len(batches_of(list(range(len(sampler))), config.batch_size))

    start_epoch, history = 0, []
    if config.resume and os.path.exists(config.checkpoint):
        state = torch.load(config.checkpoint, map_location=device, weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start_epoch, history = int(state["epoch"]), list(state["history"])
        if state.get("epochs") != config.epochs:
            logger.warning(
                "checkpoint %s was written for %s epochs, training for %s: the learning-rate "
                "schedule changes from here",
                config.checkpoint,
                state.get("epochs"),
                config.epochs,
            )
        logger.info("%s: resumed from %s after epoch %d", name, config.checkpoint, start_epoch)

    started = time.perf_counter()
    remaining = max(0, config.epochs - start_epoch)
    bar = progress_bar(remaining * steps_per_epoch, name, config.progress and rank == 0)
    try:
        for epoch in range(start_epoch, config.epochs):
            record = _train_epoch(net, optimizer, sampler, config, epoch, train_data, bar, name)
            history.append(record)
            logger.info(
                "%s epoch %d/%d: train loss %.4f, %.1f s",
                name,
                epoch + 1,
                config.epochs,
                record["train_loss"],
                record["seconds"],
            )
            if config.checkpoint:
                state = {
                    "epoch": epoch + 1,
                    "epochs": config.epochs,
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "history": history,
                }
                save_on_first_rank(state, config.checkpoint, rank, world)
    finally:
        bar.close()

    test = None
    if test_data is not None:
        test = evaluate(model, test_data, config.eval_batch_size, device)
        logger.info("%s: test PCK@0.1 %.4f, AP %.4f", name, test["pck_0.1"], test["ap"])
    return {
        "train_loss": history[-1]["train_loss"] if history else None,
        "test": test,
        "epochs": config.epochs,
        "start_epoch": start_epoch,
        "seconds": time.perf_counter() - started,
        "history": history,
    }


def _train_epoch(net, optimizer, sampler, config, epoch, data, bar, name) -> dict:
    """One pass over this process's shard; returns the epoch's mean training loss."""
    device = torch.device(config.device)
    _, world = rank_and_world()
    sampler.set_epoch(epoch)
    batches = batches_of(list(sampler), config.batch_size)
    total_steps = max(1, config.epochs * len(batches))
    bar.set_description(f"{name} epoch {epoch + 1}/{config.epochs}")

    net.train()
    started = time.perf_counter()
    sums = torch.zeros(2, dtype=torch.float64, device=device)  # loss, count
    for i, batch in enumerate(batches):
        lr = warmup_cosine(config.lr, config.warmup_fraction, epoch * len(batches) + i, total_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        index = torch.tensor(batch)
        images = data.images[index].to(device)
        target = data.keypoints[index].to(device)
        weight = data.visible[index].to(device)

        loss = net(images, target, weight)["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

        with torch.no_grad():
            sums[0] += loss.detach().double() * len(batch)
            sums[1] += len(batch)
        bar.update(1)
        # Reading the loss synchronises with the device; every tenth step is enough to watch.
        if i % 10 == 0 and not isinstance(bar, SilentBar):
            bar.set_postfix(loss=f"{loss.item():.4f}")

    if world > 1:
        dist.all_reduce(sums)
    loss_sum, count = sums.tolist()
    if not math.isfinite(loss_sum):
        raise ValueError(
            f"{name}: the training loss is not finite in epoch {epoch + 1}; lower the "
            f"learning rate (now {config.lr})"
        )
    return {
        "epoch": epoch + 1,
        "train_loss": loss_sum / max(count, 1.0),
        "seconds": time.perf_counter() - started,
    }


# ---------------------------------------------------------------------------------------------
# deepkern reproduce rle

# The paper's COCO val2017 figures for a ResNet-50 regression network: AP of direct regression
# and AP with RLE. A different data set and scale from ours; quoted for the size of the gain.
PAPER_COCO_RESNET50_AP = {"regression": 52.8, "rle": 70.6}

TASKS = ("figures", "digits")


@dataclass
class _Settings:
    """What ``deepkern reproduce rle`` trains and measures."""

    size: int = 32
    n_train: int = 4000
    n_test: int = 1000
    width: int = 16
    epochs: int = 10
    batch_size: int = 64
    lr: float = 2e-3
    seed: int = 0
    device: str = "cpu"
    tasks: tuple[str, ...] = TASKS
    methods: tuple[str, ...] = METHODS
    occlusion: float = 0.5
    noise_scale: float = 0.04
    base: str = "laplace"
    variant: str = "paper"
    checkpoint_dir: str | None = None
    resume: bool = False


_DEFAULTS = _Settings()
_QUICK = _Settings(n_train=96, n_test=48, width=4, epochs=1, batch_size=32)
_FULL = _Settings(size=64, n_train=50000, n_test=5000, width=64, epochs=60, batch_size=128)


def add_reproduce_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``deepkern reproduce rle``.

    By default every method (L1, L2, heatmap, RLE) trains on 4000 generated stick figures and
    on scikit-learn's digits on a CPU in minutes. ``--full`` gives larger settings for a GPU
    (64-pixel images, 50000 figures, width 64, 60 epochs, on CUDA when there is a device).
    """
    parser.description = (
        "RLE against L1, L2 and heatmap training of one backbone, on generated stick figures "
        "(occluded, with heavy-tailed label noise) and on scikit-learn's digits, beside the "
        "paper's COCO gain. --full for GPU-sized runs; under torchrun training is data parallel."
    )
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="a run of seconds (for tests)")
    size.add_argument("--full", action="store_true", help="larger settings for a GPU")
    parser.add_argument("--size", type=int, help="image side in pixels (default 32)")
    parser.add_argument("--n-train", type=int, help="training figures (default 4000)")
    parser.add_argument("--n-test", type=int, help="test figures (default 1000)")
    parser.add_argument("--width", type=int, help="backbone width (default 16)")
    parser.add_argument("--epochs", type=int, help="training epochs (default 10)")
    parser.add_argument("--batch-size", type=int, help="examples per step (default 64)")
    parser.add_argument("--lr", type=float, help="peak learning rate of AdamW (default 2e-3)")
    parser.add_argument("--seed", type=int, help="seed of data and training (default 0)")
    parser.add_argument("--device", help="cpu, cuda or cuda:N (default cpu)")
    parser.add_argument("--tasks", nargs="+", choices=TASKS, help="data sets (default both)")
    parser.add_argument("--methods", nargs="+", choices=METHODS, help="methods (default all)")
    parser.add_argument("--occlusion", type=float, help="occluder probability (default 0.5)")
    parser.add_argument(
        "--noise-scale", type=float, help="label noise scale, share of figure size (default 0.04)"
    )
    parser.add_argument("--base", choices=["laplace", "gaussian"], help="RLE base density")
    parser.add_argument(
        "--variant", choices=["paper", "official"], help="RLE loss terms (default paper)"
    )
    parser.add_argument("--threads", type=int, help="CPU threads of PyTorch")
    parser.add_argument("--checkpoint-dir", help="write one checkpoint per run here each epoch")
    parser.add_argument("--resume", action="store_true", help="continue from the checkpoints")
    parser.add_argument(
        "--out",
        help="write rle.json (results, settings) and a PNG of predictions per data set here",
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")


def _resolve(args: argparse.Namespace) -> _Settings:
    settings = settings_from_arguments(args, _DEFAULTS, _QUICK, _FULL)
    for name in ("size", "n_train", "n_test", "width", "epochs", "batch_size"):
        value = getattr(settings, name)
        low = {"size": 16, "n_train": 2, "n_test": 1, "epochs": 0}.get(name, 1)
        if value < low:
            raise ValueError(f"--{name.replace('_', '-')} must be >= {low}, got {value}")
    if not 0.0 <= settings.occlusion <= 1.0:
        raise ValueError(f"--occlusion must be in [0, 1], got {settings.occlusion}")
    if settings.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {settings.device}: no CUDA device is available")
    threads = getattr(args, "threads", None)
    if threads is not None:
        if threads < 1:
            raise ValueError(f"--threads must be positive, got {threads}")
        torch.set_num_threads(threads)
    return settings


def _load_task(task: str, settings: _Settings) -> tuple[KeypointData, KeypointData]:
    from deepkern.data.keypoints import digit_localisation_split, stick_figure_split

    if task == "figures":
        return stick_figure_split(
            settings.n_train,
            settings.n_test,
            settings.size,
            seed=settings.seed,
            occlusion=settings.occlusion,
            noise_scale=settings.noise_scale,
            noisy_test_labels=True,
        )
    train_data, test_data = digit_localisation_split(
        settings.seed,
        settings.size,
        min_side=round(settings.size * 3 / 8),
        max_side=round(settings.size * 3 / 4),
        noise_scale=settings.noise_scale,
        noisy_test_labels=True,
    )
    # The digits come as they are shipped; the sizes only shorten a run (as --quick does).
    return (
        train_data.subset(slice(0, settings.n_train)),
        test_data.subset(slice(0, settings.n_test)),
    )


def _run_all(settings: _Settings, progress: bool) -> dict:
    results: dict[str, dict] = {}
    for task in settings.tasks:
        train_data, test_data = _load_task(task, settings)
        results[task] = {"n_train": len(train_data), "n_test": len(test_data)}
        for method in settings.methods:
            model = KeypointModel(
                method,
                train_data.num_keypoints,
                settings.size,
                settings.width,
                seed=settings.seed,
                rle_base=settings.base,
                rle_variant=settings.variant,
            )
            checkpoint = None
            if settings.checkpoint_dir:
                checkpoint = os.path.join(settings.checkpoint_dir, f"{task}-{method}.pt")
            config = TrainConfig(
                epochs=settings.epochs,
                lr=settings.lr,
                batch_size=settings.batch_size,
                seed=settings.seed,
                device=settings.device,
                checkpoint=checkpoint,
                resume=settings.resume and checkpoint is not None,
                progress=progress,
            )
            results[task][method] = train(
                model, config, train_data, test_data, name=f"{task} {method}"
            )
            # A few test predictions, for the picture that --out draws.
            shown = predict(model, test_data.images[:_PREVIEW], device=settings.device)
            results[task][method]["preview"] = shown["keypoints"].tolist()
        results[task]["preview_truth"] = test_data.clean[:_PREVIEW].tolist()
        results[task]["preview_visible"] = test_data.visible[:_PREVIEW].tolist()
        results[task]["preview_images"] = test_data.images[:_PREVIEW, 0].tolist()
    return results


_PREVIEW = 6


def _write_preview(path: str, task: str, settings: _Settings, results: dict, images: list) -> None:
    """One row of test images per method: true keypoints green, predicted ones red."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as error:
        raise ImportError(
            "the prediction picture needs matplotlib: pip install deepkern[models]"
        ) from error
    # numpy arrays: matplotlib reads them without conversion warnings.
    images = torch.tensor(images).numpy()
    truth = torch.tensor(results[task]["preview_truth"]).numpy()
    visible = torch.tensor(results[task]["preview_visible"]).numpy() > 0
    methods = settings.methods
    figure = Figure(figsize=(1.6 * max(1, len(images)), 1.7 * len(methods)))
    FigureCanvasAgg(figure)
    for row, method in enumerate(methods):
        predicted = torch.tensor(results[task][method]["preview"]).numpy()
        for col in range(len(images)):
            axes = figure.add_subplot(len(methods), len(images), row * len(images) + col + 1)
            axes.imshow(images[col], cmap="gray", vmin=0.0, vmax=1.0)
            shown = visible[col]
            axes.scatter(truth[col, shown, 0], truth[col, shown, 1], s=6, c="lime")
            axes.scatter(predicted[col, shown, 0], predicted[col, shown, 1], s=6, c="red")
            axes.set_xticks([])
            axes.set_yticks([])
            if col == 0:
                axes.set_ylabel(_LABELS[method])
    figure.tight_layout()
    figure.savefig(path, dpi=100)


_LABELS = {"l1": "L1", "l2": "L2", "heatmap": "heatmap", "rle": "RLE"}


def _table(settings: _Settings, results: dict) -> str:
    header = (
        f"{'data':<30} | {'method':<7} | {'PCK@.05':>7} | {'PCK@.1':>6} | {'err px':>6} | "
        f"{'AP':>5} | {'AR':>5} | {'ECE':>5} | {'ECE*':>5} | {'in 68/95/99.7%':>14}"
    )
    lines = [header, "-" * len(header)]
    what = "paper: COCO val, ResNet-50"
    for method, key in (("regress", "regression"), ("RLE", "rle")):
        ap = f"{PAPER_COCO_RESNET50_AP[key]:.1f}"
        lines.append(
            f"{what:<30} | {method:<7} | {'':>7} | {'':>6} | {'':>6} | {ap:>5} | "
            f"{'':>5} | {'':>5} | {'':>5} | {'':>14}"
        )
    names = {"figures": "ours: stick figures", "digits": "ours: sklearn digits (real)"}
    for task in settings.tasks:
        for method in settings.methods:
            m = results[task][method]["test"]
            calibration = m["calibration"]
            ece, ece_truth, within = "-", "-", "-"
            if calibration is not None:
                ece = f"{100 * calibration['ece']:.1f}"
                ece_truth = f"{100 * m['calibration_truth']['ece']:.1f}"
                within = "/".join(f"{100 * v:.0f}" for v in calibration["within"])
            lines.append(
                f"{names[task]:<30} | {_LABELS[method]:<7} | {100 * m['pck_0.05']:>7.1f} | "
                f"{100 * m['pck_0.1']:>6.1f} | {m['mean_error']:>6.2f} | {100 * m['ap']:>5.1f} | "
                f"{100 * m['ar']:>5.1f} | {ece:>5} | {ece_truth:>5} | {within:>14}"
            )
    return "\n".join(lines)


def run_reproduce(args: argparse.Namespace) -> int:
    """``deepkern reproduce rle``: train every method on every task and print one table.

    Returns:
        0 on success.
    """
    settings = _resolve(args)
    with process_group(settings):
        rank, _ = rank_and_world()
        progress = not getattr(args, "no_progress", False)
        started = time.perf_counter()
        results = _run_all(settings, progress)
        if rank != 0:
            return 0
        # The preview images go into the pictures, not into the JSON file.
        images = {task: results[task].pop("preview_images") for task in settings.tasks}
        print(_table(settings, results))
        print(
            "PCK@a: share of visible keypoints within a x figure size; AP, AR: COCO-style over "
            "OKS 0.50:0.95, one figure per image, ranked by the method's confidence (L1 and L2 "
            "have none). Calibration of RLE's scales against the residual density it learned: "
            "ECE and the shares of test residuals inside its 68/95/99.7% intervals, for test "
            "labels noised like the training labels; ECE*: for the exact positions. "
            "Positions are scored against the exact ones. The paper's figures are on COCO, "
            "not on our data. "
            f"{time.perf_counter() - started:.0f} s in all."
        )
        if getattr(args, "out", None):
            os.makedirs(args.out, exist_ok=True)
            report = {
                "paper": {"dataset": "COCO val2017", "arch": "resnet50", **PAPER_COCO_RESNET50_AP},
                "settings": dataclasses.asdict(settings),
                "results": results,
                "environment": environment(settings.device),
            }
            write_json(os.path.join(args.out, "rle.json"), report)
            for task in settings.tasks:
                path = os.path.join(args.out, f"{task}.png")
                _write_preview(path, task, settings, results, images[task])
        return 0
