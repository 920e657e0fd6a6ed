"""Residual log-likelihood estimation (RLE, Li et al., ICCV 2021): a RealNVP flow and the loss.

A regression head predicts, for every keypoint, a mean ``mu`` and a scale ``sigma`` per
coordinate. RLE models the density of the label ``y`` given the image as a density of the
normalised residual ``r = (y - mu) / sigma``::

    P(y | image) = Q(r) * G(r) / prod_d sigma_d        (up to a normalising constant)

where ``Q`` is a fixed base density (a unit Laplace or a unit Gaussian per coordinate) and ``G``
is the density of a RealNVP flow, the learned residual correction. The flow is trained on the
normalised residuals together with the regression network, by the negative log-likelihood::

    loss = -sum_d log Q(r_d) - log G(r) + sum_d log sigma_d        ("paper" variant)

At test time only ``mu`` (and ``sigma`` as an uncertainty) are used; the flow costs nothing.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

__all__ = ["RealNVP", "RLELoss"]

_LOG_2PI = math.log(2.0 * math.pi)


def _coupling_net(dim: int, hidden: int, bounded: bool) -> nn.Sequential:
    layers: list[nn.Module] = [
        nn.Linear(dim, hidden),
        nn.LeakyReLU(),
        nn.Linear(hidden, hidden),
        nn.LeakyReLU(),
        nn.Linear(hidden, dim),
    ]
    if bounded:
        # The log-scale goes through tanh so that one layer scales by at most e in either way.
        layers.append(nn.Tanh())
    return nn.Sequential(*layers)


class RealNVP(nn.Module):
    """A RealNVP flow of affine coupling layers with a standard normal base.

    Layer ``i`` keeps the coordinates where ``mask_i`` is 1 and moves the others by an affine
    map whose log-scale ``s`` and shift ``t`` are small MLPs of the kept ones::

        z = m * x + (1 - m) * (x - t(m * x)) * exp(-s(m * x))

    Masks alternate between the two halves of the coordinates. The published RLE setting is
    the default: dimension 2 (one keypoint), 3 pairs of layers (6 in all), MLPs of two hidden
    layers of width 64 with LeakyReLU, tanh on the log-scale.

    Args:
        dim (int >= 2): the dimension of the data.
        num_pairs (int >= 1): pairs of coupling layers (each pair moves every coordinate once).
        hidden (int >= 1): width of the hidden layers of the scale and shift MLPs.

    Shapes:
        forward(x: Tensor[N, dim]) -> (z: Tensor[N, dim], log_det: Tensor[N]), the map from
        data to the base and ``log |det dz/dx|``; :meth:`inverse` maps back;
        :meth:`log_prob` gives ``log G(x)``, Tensor[N].

    Raises:
        ValueError: dim below 2, num_pairs or hidden below 1.

    Example:
        >>> flow = RealNVP()
        >>> flow.log_prob(torch.zeros(5, 2)).shape
        torch.Size([5])
    """

    def __init__(self, dim: int = 2, num_pairs: int = 3, hidden: int = 64):
        super().__init__()
        if dim < 2:
            raise ValueError(f"dim must be >= 2 (coupling layers split the coordinates), got {dim}")
        if num_pairs < 1:
            raise ValueError(f"num_pairs must be >= 1, got {num_pairs}")
        if hidden < 1:
            raise ValueError(f"hidden must be >= 1, got {hidden}")
        self.dim = dim
        half = torch.zeros(dim)
        half[dim // 2 :] = 1.0
        masks = torch.stack([half, 1.0 - half] * num_pairs)
        self.register_buffer("masks", masks)
        self.scale_nets = nn.ModuleList(
            _coupling_net(dim, hidden, bounded=True) for _ in range(len(masks))
        )
        self.shift_nets = nn.ModuleList(
            _coupling_net(dim, hidden, bounded=False) for _ in range(len(masks))
        )

    def _check(self, x: Tensor, name: str) -> None:
        if x.dim() != 2 or x.shape[1] != self.dim:
            raise ValueError(f"{name} must be [N, {self.dim}], got {tuple(x.shape)}")

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        self._check(x, "x")
        z = x
        log_det = x.new_zeros(x.shape[0])
        for mask, scale_net, shift_net in zip(self.masks, self.scale_nets, self.shift_nets):
            kept = z * mask
            s = scale_net(kept) * (1.0 - mask)
            t = shift_net(kept) * (1.0 - mask)
            z = kept + (1.0 - mask) * (z - t) * torch.exp(-s)
            log_det = log_det - s.sum(dim=1)
        return z, log_det

    def inverse(self, z: Tensor) -> Tensor:
        """The map from the base back to the data: ``forward(inverse(z))[0] == z``."""
        self._check(z, "z")
        x = z
        layers = list(zip(self.masks, self.scale_nets, self.shift_nets))
        for mask, scale_net, shift_net in reversed(layers):
            kept = x * mask
            s = scale_net(kept) * (1.0 - mask)
            t = shift_net(kept) * (1.0 - mask)
            x = kept + (1.0 - mask) * (x * torch.exp(s) + t)
        return x

    def log_prob(self, x: Tensor) -> Tensor:
        """``log G(x)``: the standard normal log-density of ``z`` plus ``log |det dz/dx|``."""
        z, log_det = self(x)
        return -0.5 * (z * z).sum(dim=1) - 0.5 * self.dim * _LOG_2PI + log_det


def _base_neg_log_prob(r: Tensor, base: str) -> Tensor:
    """``-log Q(r)`` per coordinate for the unit Laplace or unit Gaussian base."""
    if base == "laplace":
        return r.abs() + math.log(2.0)
    return 0.5 * r * r + 0.5 * _LOG_2PI


class RLELoss(nn.Module):
    """The RLE negative log-likelihood, a drop-in loss for regression with a predicted scale.

    For every keypoint ``k`` with label ``y`` in ``D`` coordinates, prediction ``mu`` and
    scale ``sigma > 0``, and the normalised residual ``r = (y - mu) / sigma`` (label minus
    prediction, as in the paper), the loss is the negative log of the paper's density
    ``Q(r) G(r) / prod_d sigma_d``::

        nll_k = sum_d -log Q(r_d)  +  -log G(r)  +  sum_d log sigma_d

    with ``Q`` the unit Laplace (``Q(u) = exp(-|u|) / 2``, so that ``sigma`` is the Laplace
    scale) or the unit Gaussian (``sigma`` is the standard deviation), and ``G`` the density of
    the RealNVP flow (:class:`RealNVP`, the published sizes by default). The product ``Q G`` is
    not normalised; as in the paper its normalising constant is left out.

    We follow the paper's equation (``variant="paper"``). The official implementation, and the
    toolbox most people train RLE with, add the flow term ``log sigma - log G`` to each of the
    ``D`` coordinates of a keypoint and the base term (which holds ``log sigma`` again) on top:
    per keypoint they count ``sum_d log sigma_d`` twice and ``-log G(r)`` ``D`` times (twice
    for 2-D keypoints). ``variant="official"`` reproduces that count::

        official_k = paper_k + sum_d log sigma_d + (D - 1) * (-log G(r))

    Only the count of terms changes between the variants; the base stays the unit Laplace or
    Gaussian above (the official code writes its Laplace term as ``|r| / sqrt(2)`` plus
    ``log sqrt(2 pi)``, a Laplace of scale ``sqrt(2)`` with another constant, which we do not
    reproduce).

    The flow's parameters are registered submodules: a model that owns this loss as a
    submodule hands them to its optimiser with ``model.parameters()``.

    Args:
        dim (int >= 2): coordinates per keypoint, the flow's dimension.
        base ("laplace" or "gaussian"): the fixed base density ``Q``.
        variant ("paper" or "official"): which count of the terms, see above.
        residual (bool): True for RLE; False drops ``Q`` (direct likelihood estimation with
            the flow alone, the paper's ablation).
        reduction ("mean", "sum" or "none"): "mean" divides the weighted sum by the sum of the
            target weights (so a batch whose keypoints are all invisible gives 0), "sum"
            returns the weighted sum, "none" the weighted loss per keypoint.
        num_pairs, hidden: sizes of the flow (see :class:`RealNVP`).
        check_values (bool): check that ``sigma`` is positive and the weights non-negative
            (one synchronisation with the device per call).

    Shapes:
        forward(mu, sigma, target: Tensor[..., K, dim], target_weight: Tensor[..., K] or None)
        -> Tensor[] (mean, sum) or Tensor[..., K] (none). Floating point, all on one device.

    Raises:
        ValueError: a bad option, shapes that disagree (the message names the argument), a
            last dimension other than ``dim``, ``sigma <= 0`` or a negative weight.

    Example:
        >>> loss_fn = RLELoss()
        >>> mu = torch.zeros(4, 17, 2, requires_grad=True)
        >>> sigma = torch.full((4, 17, 2), 0.1)
        >>> loss = loss_fn(mu, sigma, torch.randn(4, 17, 2) * 0.1)
        >>> loss.backward()
    """

    def __init__(
        self,
        dim: int = 2,
        base: str = "laplace",
        variant: str = "paper",
        residual: bool = True,
        reduction: str = "mean",
        num_pairs: int = 3,
        hidden: int = 64,
        check_values: bool = True,
    ):
        super().__init__()
        if base not in ("laplace", "gaussian"):
            raise ValueError(f"base must be 'laplace' or 'gaussian', got {base!r}")
        if variant not in ("paper", "official"):
            raise ValueError(f"variant must be 'paper' or 'official', got {variant!r}")
        if reduction not in ("mean", "sum", "none"):
            raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
        self.base = base
        self.variant = variant
        self.residual = residual
        self.reduction = reduction
        self.check_values = check_values
        self.flow = RealNVP(dim, num_pairs, hidden)

    @property
    def dim(self) -> int:
        return self.flow.dim

    def _check(self, mu: Tensor, sigma: Tensor, target: Tensor, weight: Tensor | None) -> None:
        if mu.dim() < 2 or mu.shape[-1] != self.dim:
            raise ValueError(f"mu must be [..., K, {self.dim}], got {tuple(mu.shape)}")
        for name, value in (("sigma", sigma), ("target", target)):
            if value.shape != mu.shape:
                raise ValueError(
                    f"{name} must have mu's shape {tuple(mu.shape)}, got {tuple(value.shape)}"
                )
        for name, value in (("mu", mu), ("sigma", sigma), ("target", target)):
            if not value.is_floating_point():
                raise ValueError(f"{name} must be floating point, got {value.dtype}")
        if weight is not None and weight.shape != mu.shape[:-1]:
            raise ValueError(
                f"target_weight must be [..., K] = {tuple(mu.shape[:-1])}, "
                f"got {tuple(weight.shape)}"
            )
        if self.check_values:
            if bool((sigma <= 0).any()):
                raise ValueError("sigma must be > 0 everywhere")
            if weight is not None and bool((weight < 0).any()):
                raise ValueError("target_weight must be >= 0")

    def terms(self, mu: Tensor, sigma: Tensor, target: Tensor) -> dict[str, Tensor]:
        """The three terms of the paper's loss per keypoint, unweighted, Tensor[..., K] each.

        Returns:
            dict with ``base`` (``sum_d -log Q(r_d)``, zero when ``residual`` is False),
            ``flow`` (``-log G(r)``) and ``log_scale`` (``sum_d log sigma_d``).
        """
        self._check(mu, sigma, target, None)
        residual = (target - mu) / sigma
        flat = residual.reshape(-1, self.dim)
        flow = -self.flow.log_prob(flat).reshape(residual.shape[:-1])
        if self.residual:
            base = _base_neg_log_prob(residual, self.base).sum(dim=-1)
        else:
            base = torch.zeros_like(flow)
        return {"base": base, "flow": flow, "log_scale": torch.log(sigma).sum(dim=-1)}

    @torch.no_grad()
    def sample_residuals(self, n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """Weighted samples of the learned residual density ``Q(r) G(r) / normaliser``.

        Draws ``r`` from the flow (``inverse`` of standard normal samples) and weights each by
        ``Q(r)``, normalised to sum to 1 (plain flow samples, equal weights, when ``residual``
        is False). With these the calibration of a model can be judged against the density it
        learned rather than against the base alone.

        Returns:
            (samples Tensor[n, dim], weights Tensor[n]) on the flow's device and dtype.
        """
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        masks = self.flow.masks
        z = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        r = self.flow.inverse(z.to(device=masks.device, dtype=masks.dtype))
        if self.residual:
            log_w = -_base_neg_log_prob(r.double(), self.base).sum(dim=-1)
        else:
            log_w = torch.zeros(n, dtype=torch.float64, device=r.device)
        weights = torch.softmax(log_w, dim=0)
        return r, weights.to(r.dtype)

    def forward(
        self, mu: Tensor, sigma: Tensor, target: Tensor, target_weight: Tensor | None = None
    ) -> Tensor:
        self._check(mu, sigma, target, target_weight)
        parts = self.terms(mu, sigma, target)
        per_keypoint = parts["base"] + parts["flow"] + parts["log_scale"]
        if self.variant == "official":
            per_keypoint = per_keypoint + parts["log_scale"] + (self.dim - 1) * parts["flow"]

        if target_weight is None:
            target_weight = torch.ones_like(per_keypoint)
        weighted = per_keypoint * target_weight.to(per_keypoint.dtype)
        if self.reduction == "none":
            return weighted
        if self.reduction == "sum":
            return weighted.sum()
        # An all-invisible batch gives 0 (and zero gradients) instead of 0 / 0.
        return weighted.sum() / target_weight.sum().clamp_min(1e-12).to(weighted.dtype)
