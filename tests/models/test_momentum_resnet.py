"""Momentum ResNets: shapes, conversion, exact reversible gradients, training, resume, DDP."""

from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from deepkern.models import momentum_resnet as mr
from deepkern.models import resnet as rn
from deepkern.nn import MomentumNet
from tests.distributed import run_two_ranks

# (plain constructor, momentum constructor, blocks per stage, block type)
ARCHITECTURES = {
    "resnet18": (rn.resnet18, mr.momentum_resnet18, (2, 2, 2, 2), rn.BasicBlock),
    "resnet34": (rn.resnet34, mr.momentum_resnet34, (3, 4, 6, 3), rn.BasicBlock),
    "resnet50": (rn.resnet50, mr.momentum_resnet50, (3, 4, 6, 3), rn.Bottleneck),
    "resnet101": (rn.resnet101, mr.momentum_resnet101, (3, 4, 23, 3), rn.Bottleneck),
}


def _generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _momentum_stages(model: nn.Module) -> list[MomentumNet]:
    return [m for m in model.modules() if isinstance(m, MomentumNet)]


# ---------------------------------------------------------------------------------------------
# Shapes


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
@pytest.mark.parametrize("size, channels", [(8, 1), (32, 3)])
def test_shapes(arch, size, channels):
    plain_fn, momentum_fn, _, _ = ARCHITECTURES[arch]
    x = torch.randn(2, channels, size, size, generator=_generator(1))
    plain = plain_fn(num_classes=7, in_channels=channels, width=2, generator=_generator())
    momentum = momentum_fn(num_classes=7, in_channels=channels, width=2, generator=_generator())
    with torch.no_grad():
        assert plain.eval()(x).shape == (2, 7)
        assert momentum.eval()(x).shape == (2, 7)


def test_momentum_resnet_backward_reaches_every_parameter():
    model = mr.momentum_resnet18(num_classes=5, in_channels=3, width=2, generator=_generator())
    x = torch.randn(4, 3, 32, 32, generator=_generator(1))
    F.cross_entropy(model(x), torch.tensor([0, 1, 2, 3])).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_small_resnet_depth():
    model = rn.small_resnet(8, width=4)
    assert [len(stage) for stage in model.stages()] == [4, 4]
    momentum = mr.small_momentum_resnet(8, width=4)
    assert sum(len(m.functions) for m in _momentum_stages(momentum)) == 7
    with pytest.raises(ValueError, match="even"):
        rn.small_resnet(7)


# ---------------------------------------------------------------------------------------------
# Conversion


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_conversion_structure(arch):
    plain_fn, _, layers, block_type = ARCHITECTURES[arch]
    model = plain_fn(num_classes=3, in_channels=1, width=2, generator=_generator())
    blocks = [list(stage) for stage in model.stages()]
    params_before = {id(p) for p in model.parameters()}

    converted = mr.to_momentum(model, gamma=0.8, memory="backprop", exact=False)
    assert converted is model
    for i, (stage, count, original) in enumerate(zip(model.stages(), layers, blocks)):
        # With the 3x3 stem at full width, a BasicBlock network's first stage keeps the
        # shape in every block; every other stage starts with a downsampling block.
        keeps_first = i == 0 and block_type is rn.BasicBlock
        expected = [MomentumNet] if keeps_first else [block_type, MomentumNet]
        assert [type(child) for child in stage] == expected
        momentum = stage[-1]
        assert len(momentum.functions) == (count if keeps_first else count - 1)
        assert (momentum.gamma, momentum.memory, momentum.exact) == (0.8, "backprop", False)
        if not keeps_first:
            assert stage[0] is original[0]
        # The residual functions are the original blocks' own modules.
        identity_blocks = [block for block in original if block.downsample is None]
        assert len(identity_blocks) == len(momentum.functions)
        for branch, block in zip(momentum.functions, identity_blocks):
            assert branch.conv1 is block.conv1 and branch.bn2 is block.bn2
            if block_type is rn.Bottleneck:
                assert branch.conv3 is block.conv3 and branch.bn3 is block.bn3
    assert {id(p) for p in model.parameters()} == params_before


def _reference_forward(stem_and_head: nn.Module, blocks: list[list[nn.Module]], gamma, x):
    """The momentum recursion written out with the original blocks' modules."""
    net = stem_and_head
    x = net.relu(net.bn1(net.conv1(x)))
    for stage in blocks:
        v = None
        for block in stage:
            if block.downsample is not None:
                x, v = block(x), None
                continue
            f = block.bn2(block.conv2(block.relu(block.bn1(block.conv1(x)))))
            if hasattr(block, "conv3"):
                f = block.bn3(block.conv3(block.relu(f)))
            v = (1 - gamma) * f if v is None else gamma * v + (1 - gamma) * f
            x = x + v
    return net.fc(torch.flatten(net.avgpool(x), 1))


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_converted_network_computes_the_momentum_recursion(arch):
    plain_fn, _, _, _ = ARCHITECTURES[arch]
    model = plain_fn(num_classes=4, in_channels=1, width=2, generator=_generator()).double()
    blocks = [list(stage) for stage in model.stages()]
    x = torch.randn(3, 1, 8, 8, generator=_generator(2), dtype=torch.float64)
    backprop = mr.to_momentum(copy.deepcopy(model), gamma=0.75, memory="backprop").eval()
    exact = mr.to_momentum(copy.deepcopy(model), gamma=0.75, exact=True).eval()
    model.eval()
    with torch.no_grad():
        expected = _reference_forward(model, blocks, 0.75, x)
        torch.testing.assert_close(backprop(x), expected, rtol=1e-12, atol=1e-12)
        # Exact mode rounds the state to 32 fractional bits.
        torch.testing.assert_close(exact(x), expected, rtol=1e-6, atol=1e-6)


def test_reversible_exact_gradients_equal_backprop_gradients():
    base = rn.small_resnet(6, num_classes=4, in_channels=1, width=4, generator=_generator())
    base = base.double()
    backprop = mr.to_momentum(copy.deepcopy(base), memory="backprop")
    reversible = mr.to_momentum(copy.deepcopy(base), memory="reversible", exact=True)
    x = torch.randn(8, 1, 8, 8, generator=_generator(3), dtype=torch.float64)
    y = torch.arange(8) % 4
    for model in (backprop, reversible):
        F.cross_entropy(model(x), y).backward()

    pairs = zip(backprop.named_parameters(), reversible.named_parameters())
    for (name, p_backprop), (_, p_reversible) in pairs:
        error = (p_reversible.grad - p_backprop.grad).norm()
        assert error <= 1e-6 * p_backprop.grad.norm() + 1e-12, name
    # BatchNorm statistics move once per forward, not again when f is recomputed.
    for (name, b_backprop), (_, b_reversible) in zip(
        backprop.named_buffers(), reversible.named_buffers()
    ):
        torch.testing.assert_close(b_reversible, b_backprop, rtol=1e-6, atol=1e-9, msg=name)


class _NoLayers(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 1, 3)


def test_conversion_errors():
    with pytest.raises(ValueError, match="no stage layer1"):
        mr.to_momentum(_NoLayers())

    model = rn.resnet18(width=2)
    model.layer2 = nn.ModuleList(model.layer2)
    with pytest.raises(ValueError, match="layer2 must be an nn.Sequential"):
        mr.to_momentum(model)

    model = rn.resnet18(width=2)
    model.layer3[1] = nn.Identity()
    with pytest.raises(ValueError, match=r"layer3\[1\] \(Identity\).*lacks conv1"):
        mr.to_momentum(model)
    # A failed conversion leaves the network as it was.
    assert not _momentum_stages(model)

    model = rn.resnet18(width=2)
    model.layer4[0].downsample = None
    with pytest.raises(ValueError, match="no downsample path but changes the shape"):
        mr.to_momentum(model)

    model = mr.to_momentum(rn.resnet18(width=2))
    with pytest.raises(ValueError, match="converted already"):
        mr.to_momentum(model)


# ---------------------------------------------------------------------------------------------
# Data


def test_load_digits_split():
    from deepkern.data.images import load_digits_split

    x_train, y_train, x_test, y_test = load_digits_split(seed=0)
    assert x_train.shape == (1437, 1, 8, 8) and x_test.shape == (360, 1, 8, 8)
    assert y_train.dtype == torch.int64 and set(y_test.tolist()) == set(range(10))
    assert abs(float(x_train.mean())) < 1e-5 and abs(float(x_train.std()) - 1) < 1e-3
    # Stratified: every class keeps its share of the test set, within one image.
    counts = torch.bincount(y_test, minlength=10)
    assert int(counts.max() - counts.min()) <= 2
    again = load_digits_split(seed=0)
    assert torch.equal(again[0], x_train) and torch.equal(again[3], y_test)
    assert not torch.equal(load_digits_split(seed=1)[1], y_train)
    assert load_digits_split(seed=0, size=16)[0].shape == (1437, 1, 16, 16)
    with pytest.raises(ValueError, match="test_fraction"):
        load_digits_split(seed=0, test_fraction=1.0)


# ---------------------------------------------------------------------------------------------
# Training


@pytest.fixture(scope="module")
def digits():
    from deepkern.data.images import load_digits_split

    x_train, y_train, x_test, y_test = load_digits_split(seed=0)
    return x_train[:192], y_train[:192], x_test[:96], y_test[:96]


def _tiny_config(**kwargs) -> mr.TrainConfig:
    settings = dict(epochs=2, lr=0.05, batch_size=32, progress=False, seed=3)
    settings.update(kwargs)
    return mr.TrainConfig(**settings)


def test_training_reduces_the_loss(digits):
    x_train, y_train, x_test, y_test = digits
    model = mr.small_momentum_resnet(4, width=4, generator=_generator())
    before = mr.evaluate(model, x_train, y_train)["loss"]
    metrics = mr.train(model, _tiny_config(epochs=3), (x_train, y_train), (x_test, y_test))
    after = mr.evaluate(model, x_train, y_train)["loss"]
    assert after < before
    assert len(metrics["history"]) == 3 and metrics["start_epoch"] == 0
    assert 0.0 <= metrics["test_accuracy"] <= 1.0


def test_augment_shifts_and_flips_reproducibly():
    x = torch.arange(2 * 3 * 16 * 16, dtype=torch.float32).reshape(2, 3, 16, 16) + 1
    first = mr._augment(x, _generator(4))
    assert first.shape == x.shape
    assert torch.equal(first, mr._augment(x, _generator(4)))
    # Every pixel is a pixel of the same image and channel, or zero padding.
    for n in range(2):
        for c in range(3):
            values = set(first[n, c].flatten().tolist()) - {0.0}
            assert values <= set(x[n, c].flatten().tolist())
    assert not torch.equal(first, x) or not torch.equal(mr._augment(x, _generator(5)), x)


def test_resume_continues_exactly(digits, tmp_path, monkeypatch):
    x_train, y_train, x_test, y_test = digits
    data = ((x_train, y_train), (x_test, y_test))
    straight = mr.small_momentum_resnet(4, width=4, generator=_generator())
    full = mr.train(straight, _tiny_config(checkpoint=str(tmp_path / "a.pt")), *data)

    # Crash at the start of the second epoch, after the first one's checkpoint is written.
    class Crash(Exception):
        pass

    train_epoch = mr._train_epoch

    def crash_in_second_epoch(*args, **kwargs):
        if kwargs["epoch"] == 1:
            raise Crash
        return train_epoch(*args, **kwargs)

    path = str(tmp_path / "b.pt")
    interrupted = mr.small_momentum_resnet(4, width=4, generator=_generator())
    monkeypatch.setattr(mr, "_train_epoch", crash_in_second_epoch)
    with pytest.raises(Crash):
        mr.train(interrupted, _tiny_config(checkpoint=path), *data)
    monkeypatch.setattr(mr, "_train_epoch", train_epoch)
    assert torch.load(path, weights_only=True)["epoch"] == 1

    # A fresh process would build the model anew; its initial weights do not matter.
    resumed_model = mr.small_momentum_resnet(4, width=4, generator=_generator(99))
    resumed = mr.train(resumed_model, _tiny_config(checkpoint=path, resume=True), *data)
    assert resumed["start_epoch"] == 1
    for (name, a), (_, b) in zip(straight.state_dict().items(), resumed_model.state_dict().items()):
        assert torch.equal(a, b), name
    losses = [h["train_loss"] for h in resumed["history"]]
    assert losses == [h["train_loss"] for h in full["history"]]
    # Atomic writes leave no temporary files behind.
    assert sorted(os.listdir(tmp_path)) == ["a.pt", "b.pt"]


# ---------------------------------------------------------------------------------------------
# Data parallel training on two CPU processes


def _train_on_rank() -> dict:
    generator = _generator(7)
    x = torch.randn(64, 1, 8, 8, generator=generator)
    y = torch.randint(0, 4, (64,), generator=generator)
    model = mr.small_momentum_resnet(4, num_classes=4, width=4, generator=_generator())
    metrics = mr.train(model, _tiny_config(epochs=1, batch_size=8), (x, y))
    params = {name: p.detach().clone() for name, p in model.named_parameters()}
    return {"params": params, "metrics": metrics}


def test_ddp_gloo_two_processes(tmp_path):
    results = run_two_ranks(_train_on_rank, tmp_path)
    initial = dict(
        mr.small_momentum_resnet(
            4, num_classes=4, width=4, generator=_generator()
        ).named_parameters()
    )
    changed = 0
    for name, p0 in results[0]["params"].items():
        assert torch.equal(p0, results[1]["params"][name]), name
        changed += not torch.equal(p0, initial[name].detach())
    assert changed > 0
    # Each process trained on its own half: 32 examples in 4 steps of 8; metrics cover both.
    assert results[0]["metrics"]["train_loss"] == results[1]["metrics"]["train_loss"]
