"""RLE loss and RealNVP flow: the formula on hand-worked cases, variants, parameters, bad input."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from deepkern.nn import RealNVP, RLELoss

LOG2 = math.log(2.0)
LOG2PI = math.log(2.0 * math.pi)


def _identity_(flow: RealNVP) -> RealNVP:
    """Zero the last linear layer of every coupling MLP: s = t = 0, the flow is the identity."""
    with torch.no_grad():
        for net in list(flow.scale_nets) + list(flow.shift_nets):
            net[4].weight.zero_()
            net[4].bias.zero_()
    return flow


def _loss(**kwargs) -> RLELoss:
    torch.manual_seed(0)
    return RLELoss(**kwargs).double()


# One keypoint: mu = (0, 0), sigma = (1, 2), label (1, -2), so the normalised residual is
# r = (1, -1), |r|^2 = 2 and sum log sigma = log 2.
MU = torch.tensor([[[0.0, 0.0]]], dtype=torch.float64)
SIGMA = torch.tensor([[[1.0, 2.0]]], dtype=torch.float64)
TARGET = torch.tensor([[[1.0, -2.0]]], dtype=torch.float64)


# ---------------------------------------------------------------------------------------------
# The formula on hand-worked cases


def test_identity_flow_laplace_closed_form():
    loss_fn = _loss(base="laplace")
    _identity_(loss_fn.flow)
    # -log Q: |1| + |-1| + 2 log 2; -log G (standard normal in 2-D): 2 / 2 + log 2 pi.
    expected = (2.0 + 2 * LOG2) + (1.0 + LOG2PI) + LOG2
    assert loss_fn(MU, SIGMA, TARGET).item() == pytest.approx(expected, abs=1e-12)

    # The same number from torch.distributions: Laplace(mu, sigma) NLL of the label, plus
    # the Gaussian log-density of the residual that the identity flow contributes.
    laplace = torch.distributions.Laplace(MU, SIGMA).log_prob(TARGET).sum()
    normal = torch.distributions.Normal(0.0, 1.0).log_prob(torch.tensor([1.0, -1.0])).sum()
    assert loss_fn(MU, SIGMA, TARGET).item() == pytest.approx(-(laplace + normal).item())


def test_identity_flow_gaussian_closed_form():
    loss_fn = _loss(base="gaussian")
    _identity_(loss_fn.flow)
    expected = (1.0 + LOG2PI) + (1.0 + LOG2PI) + LOG2
    assert loss_fn(MU, SIGMA, TARGET).item() == pytest.approx(expected, abs=1e-12)


def test_terms_add_up_and_flow_term_is_the_flow_density():
    loss_fn = _loss()
    generator = torch.Generator().manual_seed(1)
    mu = torch.randn(3, 4, 2, generator=generator, dtype=torch.float64)
    sigma = torch.rand(3, 4, 2, generator=generator, dtype=torch.float64) + 0.1
    target = torch.randn(3, 4, 2, generator=generator, dtype=torch.float64)
    parts = loss_fn.terms(mu, sigma, target)
    r = (target - mu) / sigma
    torch.testing.assert_close(parts["base"], (r.abs() + LOG2).sum(-1))
    torch.testing.assert_close(parts["log_scale"], sigma.log().sum(-1))
    torch.testing.assert_close(parts["flow"], -loss_fn.flow.log_prob(r.reshape(-1, 2)).view(3, 4))
    total = parts["base"] + parts["flow"] + parts["log_scale"]
    torch.testing.assert_close(loss_fn(mu, sigma, target), total.mean())


def test_official_variant_adds_exactly_the_duplicated_terms():
    generator = torch.Generator().manual_seed(2)
    mu = torch.randn(5, 3, 2, generator=generator, dtype=torch.float64)
    sigma = torch.rand(5, 3, 2, generator=generator, dtype=torch.float64) + 0.2
    target = torch.randn(5, 3, 2, generator=generator, dtype=torch.float64)
    paper = _loss(variant="paper", reduction="none")
    official = _loss(variant="official", reduction="none")
    official.load_state_dict(paper.state_dict())
    parts = paper.terms(mu, sigma, target)
    difference = official(mu, sigma, target) - paper(mu, sigma, target)
    torch.testing.assert_close(difference, parts["log_scale"] + parts["flow"])


def test_official_variant_in_three_dimensions_counts_the_flow_term_three_times():
    generator = torch.Generator().manual_seed(3)
    mu, target = torch.zeros(2, 1, 3, dtype=torch.float64), torch.ones(2, 1, 3).double()
    sigma = torch.rand(2, 1, 3, generator=generator, dtype=torch.float64) + 0.5
    paper = _loss(dim=3, reduction="none")
    official = _loss(dim=3, variant="official", reduction="none")
    official.load_state_dict(paper.state_dict())
    parts = paper.terms(mu, sigma, target)
    torch.testing.assert_close(
        official(mu, sigma, target) - paper(mu, sigma, target),
        parts["log_scale"] + 2 * parts["flow"],
    )


def test_direct_likelihood_estimation_drops_the_base():
    loss_fn = _loss(residual=False)
    _identity_(loss_fn.flow)
    assert loss_fn(MU, SIGMA, TARGET).item() == pytest.approx(1.0 + LOG2PI + LOG2, abs=1e-12)


def test_target_weight_zero_removes_a_keypoint():
    loss_fn = _loss()
    generator = torch.Generator().manual_seed(4)
    mu = torch.randn(2, 3, 2, generator=generator, dtype=torch.float64, requires_grad=True)
    sigma = torch.rand(2, 3, 2, generator=generator, dtype=torch.float64) + 0.3
    target = torch.randn(2, 3, 2, generator=generator, dtype=torch.float64)
    weight = torch.tensor([[1.0, 0.0, 1.0], [1.0, 1.0, 0.0]], dtype=torch.float64)

    loss = loss_fn(mu, sigma, target, weight)
    per_keypoint = loss_fn.terms(mu, sigma, target)
    kept = (per_keypoint["base"] + per_keypoint["flow"] + per_keypoint["log_scale"])[weight > 0]
    torch.testing.assert_close(loss, kept.mean())

    # Moving an invisible keypoint's label changes nothing, and its prediction gets no gradient.
    moved = target.clone()
    moved[0, 1] += 100.0
    torch.testing.assert_close(loss_fn(mu, sigma, moved, weight), loss)
    loss.backward()
    assert torch.equal(mu.grad[0, 1], torch.zeros(2, dtype=torch.float64))
    assert mu.grad[0, 0].abs().sum() > 0


def test_all_invisible_batch_gives_zero():
    loss_fn = _loss()
    weight = torch.zeros(1, 1, dtype=torch.float64)
    assert loss_fn(MU, SIGMA, TARGET, weight).item() == 0.0


def test_reductions():
    generator = torch.Generator().manual_seed(5)
    mu = torch.randn(4, 2, 2, generator=generator, dtype=torch.float64)
    sigma = torch.rand(4, 2, 2, generator=generator, dtype=torch.float64) + 0.3
    target = torch.randn(4, 2, 2, generator=generator, dtype=torch.float64)
    weight = torch.rand(4, 2, generator=generator, dtype=torch.float64)
    none = _loss(reduction="none")(mu, sigma, target, weight)
    assert none.shape == (4, 2)
    torch.testing.assert_close(_loss(reduction="sum")(mu, sigma, target, weight), none.sum())
    torch.testing.assert_close(
        _loss(reduction="mean")(mu, sigma, target, weight), none.sum() / weight.sum()
    )


def test_gradients_reach_flow_mu_and_sigma():
    loss_fn = RLELoss()
    generator = torch.Generator().manual_seed(6)
    mu = torch.randn(8, 5, 2, generator=generator, requires_grad=True)
    raw_sigma = torch.randn(8, 5, 2, generator=generator, requires_grad=True)
    target = torch.randn(8, 5, 2, generator=generator)
    loss_fn(mu, raw_sigma.sigmoid(), target).backward()
    assert mu.grad.abs().sum() > 0 and raw_sigma.grad.abs().sum() > 0
    for name, p in loss_fn.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert sum(p.grad.abs().sum() for p in loss_fn.parameters()) > 0


def test_gradcheck_in_float64():
    loss_fn = _loss()
    generator = torch.Generator().manual_seed(7)
    mu = torch.randn(2, 2, 2, generator=generator, dtype=torch.float64, requires_grad=True)
    sigma = (torch.rand(2, 2, 2, generator=generator, dtype=torch.float64) + 0.5).requires_grad_()
    # Labels away from mu: the Laplace term has a kink at r = 0.
    target = mu.detach() + 0.5
    assert torch.autograd.gradcheck(lambda m, s: loss_fn(m, s, target), (mu, sigma))


# ---------------------------------------------------------------------------------------------
# Parameters seen by an optimiser


def test_flow_parameters_are_registered():
    loss_fn = RLELoss()
    params = list(loss_fn.parameters())
    assert params
    # The published sizes: 6 coupling layers, each with a scale and a shift MLP
    # 2 -> 64 -> 64 -> 2.
    per_mlp = (2 * 64 + 64) + (64 * 64 + 64) + (64 * 2 + 2)
    assert sum(p.numel() for p in params) == 6 * 2 * per_mlp
    assert len(loss_fn.flow.masks) == 6

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.head = nn.Linear(3, 4)
            self.loss = loss_fn

    model = Model()
    owned = {id(p) for p in model.parameters()}
    assert all(id(p) in owned for p in params)
    # An optimiser built from model.parameters() moves the flow.
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    before = [p.detach().clone() for p in params]
    x = torch.randn(6, 3)
    out = model.head(x).view(6, 1, 4)
    model.loss(out[..., :2], out[..., 2:].sigmoid(), torch.zeros(6, 1, 2)).backward()
    optimizer.step()
    assert any(not torch.equal(a, b) for a, b in zip(before, params))


# ---------------------------------------------------------------------------------------------
# The flow


@pytest.mark.parametrize("dim", [2, 3])
def test_flow_inverse_and_log_det_match_autograd_jacobian(dim):
    torch.manual_seed(8)
    flow = RealNVP(dim=dim, num_pairs=2, hidden=8).double()
    # Larger last layers than the default initialisation, so that the map is far from identity.
    with torch.no_grad():
        for net in list(flow.scale_nets) + list(flow.shift_nets):
            net[4].weight.mul_(5.0)
    x = torch.randn(6, dim, dtype=torch.float64)
    z, log_det = flow(x)
    torch.testing.assert_close(flow.inverse(z), x)
    assert not torch.allclose(z, x)
    for i in range(len(x)):
        jacobian = torch.autograd.functional.jacobian(lambda v: flow(v[None])[0][0], x[i])
        torch.testing.assert_close(log_det[i], torch.linalg.slogdet(jacobian)[1])


def test_flow_density_integrates_to_one():
    torch.manual_seed(9)
    flow = RealNVP(hidden=16).double()
    side = torch.linspace(-9.0, 9.0, 361, dtype=torch.float64)
    grid = torch.cartesian_prod(side, side)
    step = (side[1] - side[0]).item()
    with torch.no_grad():
        mass = flow.log_prob(grid).exp().sum().item() * step * step
    assert mass == pytest.approx(1.0, abs=5e-3)


# ---------------------------------------------------------------------------------------------
# Bad input


def test_bad_inputs_raise_value_errors_naming_the_argument():
    loss_fn = RLELoss()
    mu, sigma, target = torch.zeros(2, 3, 2), torch.ones(2, 3, 2), torch.zeros(2, 3, 2)
    with pytest.raises(ValueError, match="sigma must be > 0"):
        loss_fn(mu, torch.zeros(2, 3, 2), target)
    with pytest.raises(ValueError, match="sigma must be > 0"):
        loss_fn(mu, -sigma, target)
    with pytest.raises(ValueError, match="sigma must have"):
        loss_fn(mu, torch.ones(2, 3, 1), target)
    with pytest.raises(ValueError, match="target must have"):
        loss_fn(mu, sigma, torch.zeros(2, 4, 2))
    with pytest.raises(ValueError, match="mu must be"):
        loss_fn(torch.zeros(2, 3, 3), torch.ones(2, 3, 3), torch.zeros(2, 3, 3))
    with pytest.raises(ValueError, match="target_weight must be"):
        loss_fn(mu, sigma, target, torch.ones(2, 3, 2))
    with pytest.raises(ValueError, match="target_weight must be >= 0"):
        loss_fn(mu, sigma, target, -torch.ones(2, 3))
    with pytest.raises(ValueError, match="target must be floating"):
        loss_fn(mu, sigma, torch.zeros(2, 3, 2, dtype=torch.int64))
    with pytest.raises(ValueError, match="base"):
        RLELoss(base="cauchy")
    with pytest.raises(ValueError, match="variant"):
        RLELoss(variant="mmpose")
    with pytest.raises(ValueError, match="reduction"):
        RLELoss(reduction="max")
    with pytest.raises(ValueError, match="dim"):
        RealNVP(dim=1)
    with pytest.raises(ValueError, match="x must be"):
        RealNVP()(torch.zeros(3, 3))


def test_residual_samples_follow_base_times_flow():
    # Identity flow (standard normal G) times the unit Gaussian base: a normal density with
    # variance 1/2 per coordinate.
    loss_fn = _loss(base="gaussian")
    _identity_(loss_fn.flow)
    samples, weights = loss_fn.sample_residuals(100_000, torch.Generator().manual_seed(0))
    assert samples.shape == (100_000, 2) and weights.sum().item() == pytest.approx(1.0)
    variance = (weights[:, None] * samples**2).sum(0)
    torch.testing.assert_close(
        variance, torch.full((2,), 0.5, dtype=torch.float64), atol=0.01, rtol=0
    )
    # Without the base the samples are the flow's own, equally weighted.
    flow_only = _loss(residual=False)
    _, equal = flow_only.sample_residuals(10, torch.Generator().manual_seed(0))
    torch.testing.assert_close(equal, torch.full((10,), 0.1, dtype=torch.float64))
