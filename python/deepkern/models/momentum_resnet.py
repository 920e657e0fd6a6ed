"""Momentum ResNets (Sander, Ablin, Blondel and Peyre, ICML 2021), built from plain ResNets.

A Momentum ResNet replaces the residual update ``x <- x + f(x)`` of a stage's identity blocks
by the momentum update::

    v <- gamma v + (1 - gamma) f(x)
    x <- x + v

which can be run backwards, so that training stores no activations inside those stages
(:class:`deepkern.nn.MomentumNet`, reversible memory, exact fixed-point recovery). The blocks
that change the shape (the first of each stage after the first) stay ordinary blocks.

This module holds:

- :func:`to_momentum`, the converter from any ResNet with stages ``layer1 ... layer4`` made
  of BasicBlock or Bottleneck blocks (ours or torchvision's), and the constructors
  ``momentum_resnet18`` ... ``momentum_resnet101`` and :func:`small_momentum_resnet`;
- :func:`train` with :class:`TrainConfig`: seeded, checkpointed, resumable, and data
  parallel across processes when ``torch.distributed`` is initialised;
- the ``deepkern demo`` and ``deepkern reproduce momentum`` commands (:func:`run_demo`,
  :func:`run_reproduce`), which train both networks on scikit-learn's digits and measure the
  memory of a training step against depth.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from deepkern.models.resnet import (
    ResNet,
    resnet18,
    resnet34,
    resnet50,
    resnet101,
    small_resnet,
)
from deepkern.models.training import (
    SilentBar,
    batches_of,
    data_parallel,
    environment,
    process_group,
    progress_bar,
    rank_and_world,
    save_on_first_rank,
    warmup_cosine,
    write_json,
)
from deepkern.nn import MomentumNet

__all__ = [
    "ResidualBranch",
    "to_momentum",
    "momentum_resnet18",
    "momentum_resnet34",
    "momentum_resnet50",
    "momentum_resnet101",
    "small_momentum_resnet",
    "TrainConfig",
    "train",
    "evaluate",
    "add_demo_arguments",
    "run_demo",
    "add_reproduce_arguments",
    "run_reproduce",
]

logger = logging.getLogger("deepkern.models.momentum_resnet")


# ---------------------------------------------------------------------------------------------
# Conversion


class ResidualBranch(nn.Module):
    """The residual branch of a ResNet block: the block without its skip path and final ReLU.

    The branch holds the block's own modules (no copies), so it shares their parameters and
    buffers. For a BasicBlock it computes ``bn2(conv2(relu(bn1(conv1(x)))))``; for a
    Bottleneck (a block with ``conv3``) ``bn3(conv3(relu(bn2(conv2(relu(bn1(conv1(x))))))))``.

    Args:
        block: a block with ``conv1``, ``bn1``, ``conv2``, ``bn2`` and optionally ``conv3``,
            ``bn3`` and ``relu`` (torchvision's names).

    Shapes:
        forward(x: Tensor[N, C, H, W]) -> Tensor[N, C', H', W'], the block's shapes.
    """

    def __init__(self, block: nn.Module):
        super().__init__()
        self.conv1, self.bn1 = block.conv1, block.bn1
        self.conv2, self.bn2 = block.conv2, block.bn2
        self.bottleneck = hasattr(block, "conv3")
        if self.bottleneck:
            self.conv3, self.bn3 = block.conv3, block.bn3
        relu = getattr(block, "relu", None)
        self.relu = relu if isinstance(relu, nn.Module) else nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.bottleneck:
            out = self.bn3(self.conv3(self.relu(out)))
        return out


_BLOCK_PARTS = ("conv1", "bn1", "conv2", "bn2")


def _check_block(block: nn.Module, where: str) -> bool:
    """Whether ``block`` has the identity as skip path; raise if it is no ResNet block."""
    if isinstance(block, MomentumNet):
        raise ValueError(f"{where} is already a MomentumNet: the network is converted already")
    missing = [
        part for part in _BLOCK_PARTS if not isinstance(getattr(block, part, None), nn.Module)
    ]
    if missing or not hasattr(block, "downsample"):
        missing += [] if hasattr(block, "downsample") else ["downsample"]
        raise ValueError(
            f"{where} ({type(block).__name__}) is not a BasicBlock- or Bottleneck-like block: "
            f"it lacks {', '.join(missing)}"
        )
    if hasattr(block, "conv3") != hasattr(block, "bn3"):
        raise ValueError(f"{where} ({type(block).__name__}) has only one of conv3 and bn3")
    if block.downsample is not None:
        return False

    # Without a downsample path the block must keep the shape; say so before MomentumNet
    # meets the mismatch in the middle of a forward pass.
    convs = [block.conv1, block.conv2] + ([block.conv3] if hasattr(block, "conv3") else [])
    strides = [getattr(conv, "stride", (1, 1)) for conv in convs]
    first_in = getattr(block.conv1, "in_channels", None)
    last_out = getattr(convs[-1], "out_channels", None)
    if any(s not in (1, (1, 1)) for s in strides) or first_in != last_out:
        raise ValueError(
            f"{where} ({type(block).__name__}) has no downsample path but changes the shape "
            f"(strides {strides}, channels {first_in} -> {last_out})"
        )
    return True


def _stage_names(resnet: nn.Module) -> list[str]:
    names = []
    while isinstance(getattr(resnet, f"layer{len(names) + 1}", None), nn.Module):
        names.append(f"layer{len(names) + 1}")
    return names


def to_momentum(
    resnet: nn.Module,
    gamma: float = 0.9,
    memory: str = "reversible",
    exact: bool = True,
    init_speed: float = 0.0,
) -> nn.Module:
    """Turn a ResNet into a Momentum ResNet, in place, keeping every parameter.

    In each stage ``layer1, layer2, ...`` every run of consecutive blocks whose skip path is
    the identity (``downsample`` is None) becomes one :class:`deepkern.nn.MomentumNet` whose
    residual functions are those blocks' residual branches (:class:`ResidualBranch`, sharing
    the blocks' modules). Blocks with a downsample path, the first block of a stage that
    changes width or size, stay as they are. The rest of the network (stem, pooling, head) is
    untouched.

    The momentum form has no place for the ReLU that a ResNet block applies after the skip
    addition: a converted stage computes ``x <- x + v`` with no ReLU after it. A converted
    network therefore computes a different function from the original one with the
    same weights; it is meant to be trained (or fine-tuned) as a Momentum ResNet.

    Works on :class:`deepkern.models.resnet.ResNet` and on torchvision's ResNets (any module
    with stages ``layer1 ...`` that are ``nn.Sequential`` of blocks named like torchvision's).

    Args:
        resnet: the network; modified in place (deep-copy it first to keep the original).
        gamma (float in (0, 1]): the momentum of every converted stage.
        memory ("reversible" or "backprop"): see :class:`deepkern.nn.MomentumNet`.
        exact (bool): bit-exact recovery of the activations in the reversible backward.
        init_speed (float): the initial velocity of each converted stage.

    Returns:
        ``resnet`` itself, its stages replaced by ``nn.Sequential`` of the kept blocks and the
        new MomentumNet stages, in the original order.

    Raises:
        ValueError: no stage ``layer1``, a stage that is not an ``nn.Sequential``, a block
            that is not BasicBlock- or Bottleneck-like, a block without downsample path that
            changes the shape, or a network that holds MomentumNet stages already.

    Example:
        >>> net = to_momentum(resnet18(num_classes=10, in_channels=1, width=8))
        >>> [type(m).__name__ for m in net.layer2]
        ['BasicBlock', 'MomentumNet']
    """
    names = _stage_names(resnet)
    if not names:
        raise ValueError(
            f"{type(resnet).__name__} has no stage layer1: to_momentum converts networks whose "
            "stages are attributes layer1, layer2, ... holding nn.Sequential of residual blocks"
        )

    # Check everything before changing anything, so that a failure leaves the network whole.
    plans = []
    for name in names:
        stage = getattr(resnet, name)
        if not isinstance(stage, nn.Sequential):
            raise ValueError(
                f"{name} must be an nn.Sequential of blocks, got {type(stage).__name__}"
            )
        plans.append([(b, _check_block(b, f"{name}[{i}]")) for i, b in enumerate(stage)])

    # Build every new stage before replacing any: MomentumNet checks gamma and memory.
    stages = []
    for plan in plans:
        children: list[nn.Module] = []
        run: list[nn.Module] = []
        for block, identity in plan + [(None, False)]:
            if identity:
                run.append(ResidualBranch(block))
                continue
            if run:
                children.append(
                    MomentumNet(run, gamma=gamma, init_speed=init_speed, memory=memory, exact=exact)
                )
                run = []
            if block is not None:
                children.append(block)
        stages.append(nn.Sequential(*children))
    for name, stage in zip(names, stages):
        setattr(resnet, name, stage)
    return resnet


def _momentum(build: Callable[..., ResNet], doc_name: str):
    def constructor(
        num_classes: int = 10,
        in_channels: int = 3,
        width: int = 64,
        gamma: float = 0.9,
        memory: str = "reversible",
        exact: bool = True,
        generator: torch.Generator | None = None,
        **kwargs,
    ) -> ResNet:
        plain = build(num_classes, in_channels, width, generator, **kwargs)
        return to_momentum(plain, gamma=gamma, memory=memory, exact=exact)

    constructor.__name__ = f"momentum_{build.__name__}"
    constructor.__qualname__ = constructor.__name__
    constructor.__doc__ = f"""Momentum {doc_name} for small images: {build.__name__}, converted.

    Args:
        num_classes: outputs of the final linear layer.
        in_channels: channels of the input images.
        width: planes of the first stage (64 in the published network).
        gamma, memory, exact: as for :func:`to_momentum`.
        generator: the random source of the initial weights.
        kwargs: passed to :class:`deepkern.models.resnet.ResNet`.

    Shapes:
        Tensor[N, in_channels, H, W] -> Tensor[N, num_classes]
    """
    return constructor


momentum_resnet18 = _momentum(resnet18, "ResNet-18")
momentum_resnet34 = _momentum(resnet34, "ResNet-34")
momentum_resnet50 = _momentum(resnet50, "ResNet-50")
momentum_resnet101 = _momentum(resnet101, "ResNet-101")


def small_momentum_resnet(
    depth: int,
    num_classes: int = 10,
    in_channels: int = 1,
    width: int = 16,
    gamma: float = 0.9,
    memory: str = "reversible",
    exact: bool = True,
    generator: torch.Generator | None = None,
    **kwargs,
) -> ResNet:
    """:func:`deepkern.models.resnet.small_resnet` converted: ``depth - 1`` momentum blocks.

    Args:
        depth (even int >= 2): residual blocks in all.
        num_classes, in_channels, width, generator, kwargs: as for ``small_resnet``.
        gamma, memory, exact: as for :func:`to_momentum`.

    Shapes:
        Tensor[N, in_channels, H, W] -> Tensor[N, num_classes]
    """
    plain = small_resnet(depth, num_classes, in_channels, width, generator, **kwargs)
    return to_momentum(plain, gamma=gamma, memory=memory, exact=exact)


# ---------------------------------------------------------------------------------------------
# Training


@dataclass
class TrainConfig:
    """Settings of :func:`train`.

    Attributes:
        epochs: passes over the training set.
        lr: peak learning rate of SGD with Nesterov momentum; it warms up linearly over the
            first ``warmup_fraction`` of the steps, then follows a cosine down to zero.
        batch_size: examples per step and process.
        weight_decay: L2 penalty of SGD.
        momentum: SGD momentum.
        warmup_fraction: share of the steps spent warming up the learning rate.
        augment: shift images by up to 1/8 of their size and flip them left-right (for
            natural images such as CIFAR-10; flips do not suit digits).
        seed: seeds the order of the examples (and the augmentation); the same seed and data
            give the same run.
        device: where to train, for example "cpu", "cuda" or "cuda:1".
        checkpoint: file written (atomically) after every epoch; None writes none.
        resume: continue from ``checkpoint`` when that file exists.
        progress: show a tqdm progress bar (on the first process only).
        eval_batch_size: examples per forward pass when evaluating.
    """

    epochs: int = 10
    lr: float = 0.05
    batch_size: int = 64
    weight_decay: float = 5e-4
    momentum: float = 0.9
    warmup_fraction: float = 0.05
    augment: bool = False
    seed: int = 0
    device: str = "cpu"
    checkpoint: str | None = None
    resume: bool = False
    progress: bool = True
    eval_batch_size: int = 256

    def __post_init__(self):
        if self.epochs < 0:
            raise ValueError(f"epochs must be >= 0, got {self.epochs}")
        if self.batch_size < 1 or self.eval_batch_size < 1:
            raise ValueError(
                f"batch sizes must be positive, got {self.batch_size} and {self.eval_batch_size}"
            )
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be positive and finite, got {self.lr}")
        if not 0.0 <= self.warmup_fraction < 1.0:
            raise ValueError(f"warmup_fraction must be in [0, 1), got {self.warmup_fraction}")
        if self.resume and not self.checkpoint:
            raise ValueError("resume needs a checkpoint path")


def _augment(x: Tensor, generator: torch.Generator) -> Tensor:
    """Random shifts (zero padding) by up to 1/8 of the size, and left-right flips."""
    n, _, h, w = x.shape
    pad = max(1, h // 8)
    padded = F.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator).to(x.device)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator).to(x.device)
    rows = dy[:, None] + torch.arange(h, device=x.device)
    cols = dx[:, None] + torch.arange(w, device=x.device)
    flip = (torch.rand(n, generator=generator) < 0.5).to(x.device)
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    batch = torch.arange(n, device=x.device)[:, None, None]
    # Advanced indexing puts the indexed dimensions first: (N, H, W, C) back to (N, C, H, W).
    return padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)


def _check_data(name: str, data) -> tuple[Tensor, Tensor]:
    if not (isinstance(data, (tuple, list)) and len(data) == 2):
        raise ValueError(f"{name} must be a pair (images, labels)")
    x, y = data
    if x.dim() != 4 or not x.is_floating_point():
        raise ValueError(
            f"{name} images must be floating point [N, C, H, W], got {x.dtype} {tuple(x.shape)}"
        )
    if y.dim() != 1 or y.shape[0] != x.shape[0] or y.dtype != torch.int64:
        raise ValueError(
            f"{name} labels must be int64 [{x.shape[0]}], got {y.dtype} {tuple(y.shape)}"
        )
    return x, y


@torch.no_grad()
def evaluate(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
) -> dict:
    """Mean cross-entropy and accuracy of ``model`` in eval mode.

    Args:
        model: a classifier; its train/eval mode is restored afterwards.
        x (Tensor[N, C, H, W], floating point): images.
        y (Tensor[N], int64): labels.
        batch_size: examples per forward pass.
        device: where to run.

    Returns:
        dict with ``loss`` and ``accuracy`` (a fraction in [0, 1]). Synchronises with the
        device once.
    """
    was_training = model.training
    model.eval()
    loss = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    for start in range(0, len(x), batch_size):
        xb = x[start : start + batch_size].to(device)
        yb = y[start : start + batch_size].to(device)
        logits = model(xb)
        loss += F.cross_entropy(logits, yb, reduction="sum").double()
        correct += (logits.argmax(1) == yb).sum()
    model.train(was_training)
    count = max(1, len(x))
    return {"loss": float(loss) / count, "accuracy": int(correct) / count}


def _load_checkpoint(path: str, model, optimizer, config, device) -> tuple[int, list]:
    state = torch.load(path, map_location=device, weights_only=True)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    if state.get("epochs") != config.epochs:
        logger.warning(
            "checkpoint %s was written for %s epochs, training for %s: the learning-rate "
            "schedule changes from here",
            path,
            state.get("epochs"),
            config.epochs,
        )
    logger.info("resumed from %s after epoch %d", path, state["epoch"])
    return int(state["epoch"]), list(state["history"])


def train(
    model: nn.Module,
    config: TrainConfig,
    train_data: tuple[Tensor, Tensor],
    test_data: tuple[Tensor, Tensor] | None = None,
    name: str = "train",
) -> dict:
    """Train a classifier with SGD and cross-entropy, and evaluate it after every epoch.

    The order of the examples comes from ``config.seed`` and the epoch alone, so a run that
    resumes from a checkpoint continues exactly as the uninterrupted run would have. When
    ``torch.distributed`` is initialised, the model is wrapped in DistributedDataParallel and
    each process trains on its own shard of every epoch (DistributedSampler); the first
    process writes the checkpoint and shows the progress bar, and the returned training
    metrics cover all processes.

    Args:
        model: the classifier; trained in place, moved to ``config.device``.
        config: the settings.
        train_data: (images Tensor[N, C, H, W] floating point, labels Tensor[N] int64).
        test_data: the same for the test set, or None.
        name: label of the progress bar and of the log messages.

    Returns:
        dict with ``train_loss``, ``train_accuracy``, ``test_loss`` and ``test_accuracy`` of
        the last epoch (test values None without test data; accuracies are fractions),
        ``epochs``, ``start_epoch`` (above 0 after a resume), ``seconds`` (this call) and
        ``history``, one dict of those values per epoch.

    Raises:
        ValueError: malformed data, or a loss that is not finite (lower the learning rate).
        ImportError: progress bars asked for without tqdm installed.

    Example:
        >>> x_train, y_train, x_test, y_test = load_digits_split(seed=0)
        >>> model = small_momentum_resnet(8, width=8)
        >>> metrics = train(model, TrainConfig(epochs=2), (x_train, y_train), (x_test, y_test))
    """
    x_train, y_train = _check_data("train_data", train_data)
    if test_data is not None:
        test_data = _check_data("test_data", test_data)
    device = torch.device(config.device)
    rank, world = rank_and_world()
    model.to(device)
    net = data_parallel(model, device, world)

    optimizer = torch.optim.SGD(
        model.parameters(),
        lr=config.lr,
        momentum=config.momentum,
        nesterov=config.momentum > 0,
        weight_decay=config.weight_decay,
    )
    from torch.utils.data import DistributedSampler, TensorDataset

    sampler = DistributedSampler(
        TensorDataset(x_train, y_train), num_replicas=world, rank=rank, seed=config.seed
    )
    steps_per_epoch = len(batches_of(list(range(len(sampler))), config.batch_size))

    start_epoch, history = 0, []
    if config.resume and os.path.exists(config.checkpoint):
        start_epoch, history = _load_checkpoint(config.checkpoint, model, optimizer, config, device)
    elif config.resume:
        logger.info("%s: no checkpoint at %s yet, starting from epoch 1", name, config.checkpoint)

    started = time.perf_counter()
    bar = progress_bar(
        (config.epochs - start_epoch) * steps_per_epoch if config.epochs > start_epoch else 0,
        name,
        config.progress and rank == 0,
    )
    try:
        for epoch in range(start_epoch, config.epochs):
            record = _train_epoch(
                net,
                optimizer,
                sampler,
                config,
                epoch=epoch,
                data=(x_train, y_train),
                bar=bar,
                name=name,
            )
            record["train_seconds"] = record.pop("seconds")
            if test_data is not None:
                scores = evaluate(model, *test_data, config.eval_batch_size, device)
                record["test_loss"], record["test_accuracy"] = scores["loss"], scores["accuracy"]
            else:
                record["test_loss"] = record["test_accuracy"] = None
            history.append(record)
            _log_epoch(name, record, config.epochs)
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

    last = history[-1] if history else {}
    return {
        "train_loss": last.get("train_loss"),
        "train_accuracy": last.get("train_accuracy"),
        "test_loss": last.get("test_loss"),
        "test_accuracy": last.get("test_accuracy"),
        "epochs": config.epochs,
        "start_epoch": start_epoch,
        "seconds": time.perf_counter() - started,
        "history": history,
    }


def _train_epoch(net, optimizer, sampler, config, *, epoch, data, bar, name) -> dict:
    """One pass over this process's shard; returns the epoch's training loss and accuracy."""
    x_train, y_train = data
    device = torch.device(config.device)
    _, world = rank_and_world()
    sampler.set_epoch(epoch)
    batches = batches_of(list(sampler), config.batch_size)
    steps_per_epoch = len(batches)
    total_steps = max(1, config.epochs * steps_per_epoch)
    augment_rng = None
    if config.augment:
        # One stream per seed, epoch and process: reproducible, and resumable at epoch edges.
        augment_rng = torch.Generator().manual_seed(
            (config.seed * 1_000_003 + epoch) * 4099 + sampler.rank
        )
    bar.set_description(f"{name} epoch {epoch + 1}/{config.epochs}")

    net.train()
    started = time.perf_counter()
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss, correct, count
    for i, batch in enumerate(batches):
        lr = warmup_cosine(
            config.lr, config.warmup_fraction, epoch * steps_per_epoch + i, total_steps
        )
        for group in optimizer.param_groups:
            group["lr"] = lr
        index = torch.tensor(batch)
        xb, yb = x_train[index].to(device), y_train[index].to(device)
        if augment_rng is not None:
            xb = _augment(xb, augment_rng)

        logits = net(xb)
        loss = F.cross_entropy(logits, yb)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

        with torch.no_grad():
            sums[0] += loss.detach().double() * len(batch)
            sums[1] += (logits.argmax(1) == yb).sum()
            sums[2] += len(batch)
        bar.update(1)
        # Reading the loss synchronises with the device; every tenth step is enough to watch.
        if i % 10 == 0 and not isinstance(bar, SilentBar):
            bar.set_postfix(loss=f"{loss.item():.3f}")

    if world > 1:
        dist.all_reduce(sums)
    loss_sum, correct, count = sums.tolist()
    if not math.isfinite(loss_sum):
        raise ValueError(
            f"{name}: the training loss is not finite in epoch {epoch + 1}; lower the "
            f"learning rate (now {config.lr})"
        )
    count = max(count, 1.0)
    return {
        "epoch": epoch + 1,
        "train_loss": loss_sum / count,
        "train_accuracy": correct / count,
        "seconds": time.perf_counter() - started,
    }


def _log_epoch(name: str, record: dict, epochs: int) -> None:
    test = record["test_accuracy"]
    logger.info(
        "%s epoch %d/%d: train loss %.4f, train accuracy %.2f%%, test accuracy %s, %.1f s",
        name,
        record["epoch"],
        epochs,
        record["train_loss"],
        100 * record["train_accuracy"],
        "n/a" if test is None else f"{100 * test:.2f}%",
        record["train_seconds"],
    )


# ---------------------------------------------------------------------------------------------
# Memory of one training step


def measure_step_memory(
    model: nn.Module, x: Tensor, y: Tensor, device: str = "cpu"
) -> dict[str, int]:
    """Bytes that one training step (forward, cross-entropy, backward) holds and allocates.

    One step runs first, unmeasured, so that one-time allocations do not count; gradients are
    cleared before the measured step, as an optimiser step with ``set_to_none`` leaves them.

    Args:
        model: a classifier in train mode; its BatchNorm statistics move twice.
        x (Tensor[N, C, H, W]): a batch of images.
        y (Tensor[N], int64): their labels.
        device: where to run.

    Returns:
        dict with ``saved_bytes`` (the most that autograd held for backward, parameters
        excluded) and ``peak_bytes`` (the peak allocation above the start).
    """
    from deepkern.bench.memory import measure_step

    model.to(device).train()
    x, y = x.to(device), y.to(device)

    def step():
        F.cross_entropy(model(x), y).backward()

    step()
    model.zero_grad(set_to_none=True)
    result = measure_step(step, device=device, exclude=list(model.parameters()))
    model.zero_grad(set_to_none=True)
    return {"saved_bytes": int(result.saved_bytes), "peak_bytes": int(result.peak_bytes)}


# ---------------------------------------------------------------------------------------------
# Commands: deepkern demo, deepkern reproduce momentum

# The paper's CIFAR-10 accuracy for Momentum ResNet-101 (mean and spread over runs, as quoted
# with the paper's results). The paper reports ResNet-101 at the same accuracy; only the
# Momentum figure is quoted here.
PAPER_CIFAR10_MOMENTUM_RESNET101 = (95.18, 0.06)

_ARCHITECTURES = {
    "resnet18": resnet18,
    "resnet34": resnet34,
    "resnet50": resnet50,
    "resnet101": resnet101,
}


@dataclass
class _Settings:
    """What one comparison run trains and measures."""

    arch: str = "small"
    depth: int = 16
    width: int = 16
    size: int | None = None
    epochs: int = 8
    batch_size: int = 64
    lr: float = 0.05
    weight_decay: float = 5e-4
    gamma: float = 0.9
    seed: int = 0
    device: str = "cpu"
    memory_depths: tuple[int, ...] = (8, 16, 32, 64)
    memory_batch: int = 64
    train_limit: int | None = None
    augment: bool = False
    data: str | None = None
    checkpoint_dir: str | None = None
    resume: bool = False

    @property
    def image_size(self) -> int | None:
        """The side the images are resized to: as given, 8 for the digits, None to keep."""
        return self.size if self.size is not None or self.data else 8


_DEMO_DEFAULTS = _Settings(depth=32, epochs=15, memory_depths=(8, 16, 32, 64, 128))
_DEMO_QUICK = _Settings(
    depth=4, width=4, epochs=1, memory_depths=(4, 16), memory_batch=16, train_limit=256
)
_REPRODUCE_DEFAULTS = _Settings(depth=32, epochs=10, memory_depths=())
_REPRODUCE_QUICK = _Settings(
    depth=16, width=4, epochs=1, memory_depths=(), memory_batch=16, train_limit=256
)


def _add_common_arguments(parser: argparse.ArgumentParser, defaults: _Settings) -> None:
    parser.add_argument(
        "--quick", action="store_true", help="a run of seconds with tiny networks (for tests)"
    )
    parser.add_argument(
        "--depth",
        type=int,
        help=f"residual blocks of the small network (even; default {defaults.depth})",
    )
    parser.add_argument(
        "--width", type=int, help=f"channels of the first stage (default {defaults.width})"
    )
    parser.add_argument(
        "--size", type=int, help="image side in pixels (default 8, the digits as scanned)"
    )
    parser.add_argument("--epochs", type=int, help=f"training epochs (default {defaults.epochs})")
    parser.add_argument(
        "--batch-size", type=int, help=f"examples per step (default {defaults.batch_size})"
    )
    parser.add_argument("--lr", type=float, help=f"peak learning rate (default {defaults.lr})")
    parser.add_argument(
        "--gamma", type=float, help=f"momentum of the Momentum ResNet (default {defaults.gamma})"
    )
    parser.add_argument("--seed", type=int, help=f"seed of everything (default {defaults.seed})")
    parser.add_argument("--device", help="cpu, cuda or cuda:N (default cpu)")
    parser.add_argument(
        "--threads", type=int, help="CPU threads of PyTorch (default: PyTorch's own choice)"
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")


def _resolve(args: argparse.Namespace, quick: _Settings, defaults: _Settings) -> _Settings:
    base = quick if getattr(args, "quick", False) else defaults
    updates = {}
    for field in dataclasses.fields(_Settings):
        value = getattr(args, field.name, None)
        if value is not None:
            updates[field.name] = tuple(value) if isinstance(value, list) else value
    settings = dataclasses.replace(base, **updates)
    if settings.arch == "small" and (settings.depth < 2 or settings.depth % 2):
        raise ValueError(f"--depth must be an even number >= 2, got {settings.depth}")
    if any(d < 2 or d % 2 for d in settings.memory_depths):
        raise ValueError(f"memory depths must be even numbers >= 2, got {settings.memory_depths}")
    if settings.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {settings.device}: no CUDA device is available")
    threads = getattr(args, "threads", None)
    if threads is not None:
        if threads < 1:
            raise ValueError(f"--threads must be positive, got {threads}")
        torch.set_num_threads(threads)
    return settings


def _load_data(settings: _Settings) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    from deepkern.data.images import load_digits_split, load_npz_split

    if settings.data:
        x_train, y_train, x_test, y_test = load_npz_split(settings.data, size=settings.image_size)
    else:
        x_train, y_train, x_test, y_test = load_digits_split(
            settings.seed, size=settings.image_size
        )
    if settings.train_limit is not None:
        x_train, y_train = x_train[: settings.train_limit], y_train[: settings.train_limit]
    return x_train, y_train, x_test, y_test


def _build_pair(settings: _Settings, depth: int, in_channels: int, num_classes: int):
    """A plain network and its momentum conversion, with the same initial weights."""
    generator = torch.Generator().manual_seed(settings.seed)
    if settings.arch == "small":
        plain = small_resnet(depth, num_classes, in_channels, settings.width, generator)
    else:
        plain = _ARCHITECTURES[settings.arch](num_classes, in_channels, settings.width, generator)
    momentum = to_momentum(copy.deepcopy(plain), gamma=settings.gamma, exact=True)
    return plain, momentum


def _model_name(settings: _Settings, depth: int) -> str:
    return f"depth {depth}" if settings.arch == "small" else settings.arch


def _train_pair(settings: _Settings, data, progress: bool) -> dict:
    x_train, y_train, x_test, y_test = data
    num_classes = int(max(y_train.max(), y_test.max())) + 1
    plain, momentum = _build_pair(settings, settings.depth, x_train.shape[1], num_classes)
    results = {}
    for kind, model in (("resnet", plain), ("momentum", momentum)):
        config = TrainConfig(
            epochs=settings.epochs,
            lr=settings.lr,
            batch_size=settings.batch_size,
            weight_decay=settings.weight_decay,
            augment=settings.augment,
            seed=settings.seed,
            device=settings.device,
            checkpoint=_checkpoint_path(settings, kind),
            resume=settings.resume and settings.checkpoint_dir is not None,
            progress=progress,
        )
        label = "ResNet" if kind == "resnet" else "Momentum ResNet"
        results[kind] = train(
            model,
            config,
            (x_train, y_train),
            (x_test, y_test),
            name=f"{label} {_model_name(settings, settings.depth)}",
        )
    return results


def _checkpoint_path(settings: _Settings, kind: str) -> str | None:
    if settings.checkpoint_dir is None:
        return None
    return os.path.join(settings.checkpoint_dir, f"{kind}.pt")


def _memory_sweep(settings: _Settings, depths: Sequence[int], data) -> list[dict]:
    x_train, y_train, _, y_test = data
    num_classes = int(max(y_train.max(), y_test.max())) + 1
    # A fixed batch: the first examples, repeated when the training set is smaller.
    index = torch.arange(settings.memory_batch) % len(x_train)
    xb, yb = x_train[index], y_train[index]
    rows = []
    for depth in depths:
        plain, momentum = _build_pair(settings, depth, x_train.shape[1], num_classes)
        row = {"depth": depth}
        for kind, model in (("resnet", plain), ("momentum", momentum)):
            measured = measure_step_memory(model, xb, yb, settings.device)
            row[f"{kind}_saved_bytes"] = measured["saved_bytes"]
            row[f"{kind}_peak_bytes"] = measured["peak_bytes"]
        rows.append(row)
    return rows


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f}"


def _ratio(a: int, b: int) -> str:
    return f"{a / b:.1f}x" if b > 0 else "n/a"


def _memory_table(rows: list[dict], batch: int) -> str:
    header = (
        f"{'depth':>5} | {'ResNet saved MiB':>16} | {'Momentum saved MiB':>18} | {'ratio':>6} | "
        f"{'ResNet peak MiB':>15} | {'Momentum peak MiB':>17} | {'ratio':>6}"
    )
    lines = [f"memory of one training step, batch {batch} (saved: held by autograd for backward)"]
    lines += [header, "-" * len(header)]
    for r in rows:
        lines.append(
            f"{r['depth']:>5} | {_mib(r['resnet_saved_bytes']):>16} | "
            f"{_mib(r['momentum_saved_bytes']):>18} | "
            f"{_ratio(r['resnet_saved_bytes'], r['momentum_saved_bytes']):>6} | "
            f"{_mib(r['resnet_peak_bytes']):>15} | {_mib(r['momentum_peak_bytes']):>17} | "
            f"{_ratio(r['resnet_peak_bytes'], r['momentum_peak_bytes']):>6}"
        )
    return "\n".join(lines)


def _write_plot(path: str, rows: list[dict], results: dict, settings: _Settings) -> None:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as error:
        raise ImportError(
            "the demo's plot needs matplotlib: pip install deepkern[models]"
        ) from error

    # A Figure with its own Agg canvas: no pyplot, no global backend switch, no display.
    figure = Figure(figsize=(10, 4), layout="constrained")
    FigureCanvasAgg(figure)
    memory_axes, accuracy_axes = figure.subplots(1, 2)
    depths = [r["depth"] for r in rows]
    for kind, label, colour in (("resnet", "ResNet", "C0"), ("momentum", "Momentum ResNet", "C1")):
        saved = [r[f"{kind}_saved_bytes"] / 2**20 for r in rows]
        peak = [r[f"{kind}_peak_bytes"] / 2**20 for r in rows]
        memory_axes.plot(depths, saved, "o-", color=colour, label=f"{label}, held for backward")
        memory_axes.plot(depths, peak, "s--", color=colour, alpha=0.6, label=f"{label}, peak")
        history = results[kind]["history"]
        accuracy_axes.plot(
            [h["epoch"] for h in history],
            [100 * h["test_accuracy"] for h in history],
            "o-",
            color=colour,
            label=label,
        )
    if len(depths) > 1:
        # Depths double from point to point: a log scale spaces them evenly.
        memory_axes.set_xscale("log", base=2)
    memory_axes.set_xticks(depths, [str(d) for d in depths])
    memory_axes.set_ylim(bottom=0)
    memory_axes.set_xlabel("residual blocks")
    memory_axes.set_ylabel("MiB in one training step")
    memory_axes.set_title(f"memory against depth, batch {settings.memory_batch}")
    memory_axes.legend(fontsize="small")
    accuracy_axes.xaxis.get_major_locator().set_params(integer=True)
    accuracy_axes.set_xlabel("epoch")
    accuracy_axes.set_ylabel("test accuracy (%)")
    accuracy_axes.set_title(f"digits, {settings.depth} blocks, width {settings.width}")
    accuracy_axes.legend(fontsize="small")
    figure.savefig(path, dpi=120)


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``deepkern demo``.

    The defaults train for about 3-5 minutes on two CPU cores; ``--quick`` runs in seconds.
    A larger run on a GPU, for example::

        deepkern demo --device cuda --depth 64 --width 64 --size 32 --epochs 30
    """
    d = _DEMO_DEFAULTS
    parser.description = (
        "Train a Momentum ResNet (reversible, exact backpropagation) beside the plain ResNet "
        "of the same depth on scikit-learn's handwritten digits, print both test accuracies, "
        "measure the memory of one training step against depth, and write results.json and "
        "memory.png. Numbers are measured in the run."
    )
    _add_common_arguments(parser, d)
    parser.add_argument(
        "--memory-depths",
        type=int,
        nargs="+",
        help="depths of the memory sweep (default " + " ".join(map(str, d.memory_depths)) + ")",
    )
    parser.add_argument(
        "--memory-batch", type=int, help=f"batch of the memory sweep (default {d.memory_batch})"
    )
    parser.add_argument(
        "--out", default="deepkern-out/demo", help="folder for results.json and memory.png"
    )


def _check_demo_settings(settings) -> None:
    """Refuse settings that cannot run, before any work is done."""
    for name in ("epochs", "batch_size", "memory_batch", "depth", "width"):
        value = getattr(settings, name, None)
        if value is not None and value < 1:
            flag = "--" + name.replace("_", "-")
            raise ValueError(f"{flag} must be at least 1, got {value}")
    if getattr(settings, "seed", 0) < 0:
        raise ValueError(f"--seed must be non-negative, got {settings.seed}")
    ops_gamma = getattr(settings, "gamma", 0.9)
    if not 0 < ops_gamma <= 1:
        raise ValueError(f"--gamma must lie in (0, 1], got {ops_gamma}")
    try:
        device = torch.device(settings.device)
    except RuntimeError as error:
        raise ValueError(f"--device: {error}") from error
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for, but this torch has no usable CUDA device")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device must be cpu, cuda or cuda:N, got {settings.device}")


def run_demo(args: argparse.Namespace) -> int:
    """``deepkern demo``: train both networks, measure memory against depth, write results.

    Returns:
        0 on success.
    """
    settings = _resolve(args, _DEMO_QUICK, _DEMO_DEFAULTS)
    _check_demo_settings(settings)
    progress = not getattr(args, "no_progress", False)
    os.makedirs(args.out, exist_ok=True)
    started = time.perf_counter()

    data = _load_data(settings)
    side = data[0].shape[-1]
    print(
        f"digits: {len(data[0])} training and {len(data[2])} test images of "
        f"{side}x{side}; networks of {settings.depth} residual blocks, "
        f"width {settings.width}, {settings.epochs} epochs on {settings.device}; the Momentum "
        f"ResNet has gamma {settings.gamma} and backpropagates reversibly, recovering every "
        "activation bit for bit"
    )
    results = _train_pair(settings, data, progress)
    print(_accuracy_table(settings, results))

    memory_started = time.perf_counter()
    rows = _memory_sweep(settings, settings.memory_depths, data)
    memory_seconds = time.perf_counter() - memory_started
    print()
    print(_memory_table(rows, settings.memory_batch))

    json_path = os.path.join(args.out, "results.json")
    png_path = os.path.join(args.out, "memory.png")
    report = {
        "settings": dataclasses.asdict(settings),
        "accuracy": {k: results[k]["test_accuracy"] for k in ("resnet", "momentum")},
        "training": results,
        "memory": rows,
        "seconds": {
            "resnet": results["resnet"]["seconds"],
            "momentum": results["momentum"]["seconds"],
            "memory": memory_seconds,
            "total": time.perf_counter() - started,
        },
        "environment": environment(settings.device),
    }
    write_json(json_path, report)
    _write_plot(png_path, rows, results, settings)
    print(f"\nwrote {json_path} and {png_path} ({report['seconds']['total']:.0f} s)")
    return 0


def _accuracy_table(settings: _Settings, results: dict) -> str:
    lines = [f"{'network':<26} | {'test accuracy':>13} | {'train loss':>10} | {'seconds':>7}"]
    lines.append("-" * len(lines[0]))
    for kind, label in (("resnet", "ResNet"), ("momentum", "Momentum ResNet")):
        r = results[kind]
        name = f"{label} ({_model_name(settings, settings.depth)})"
        lines.append(
            f"{name:<26} | {100 * r['test_accuracy']:>12.2f}% | {r['train_loss']:>10.4f} | "
            f"{r['seconds']:>7.1f}"
        )
    return "\n".join(lines)


def add_reproduce_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``deepkern reproduce momentum``.

    At CPU size (the default) both networks train on scikit-learn's digits. Full size, on a
    GPU, with CIFAR-10 saved once as an ``.npz`` file (see
    :func:`deepkern.data.images.load_npz_split`)::

        deepkern reproduce momentum --arch resnet101 --data cifar10.npz --width 64 \\
            --epochs 200 --batch-size 128 --lr 0.1 --augment --device cuda \\
            --checkpoint-dir runs/momentum --resume

    and across GPUs with ``torchrun --nproc-per-node 8 --no-python deepkern reproduce
    momentum ...`` (data parallel; ``--batch-size`` is per process).
    """
    d = _REPRODUCE_DEFAULTS
    parser.description = (
        "Momentum ResNets against ResNets: the paper's CIFAR-10 figure beside ours. By default "
        "both train on scikit-learn's digits on a CPU in minutes. Full size on a GPU: "
        "--arch resnet101 --data cifar10.npz --width 64 --epochs 200 --batch-size 128 "
        "--lr 0.1 --augment --device cuda --checkpoint-dir DIR --resume; under torchrun the "
        "training is data parallel."
    )
    _add_common_arguments(parser, d)
    parser.add_argument(
        "--arch",
        choices=["small", *_ARCHITECTURES],
        help="the network: small (--depth blocks) or a published ResNet (default small)",
    )
    parser.add_argument(
        "--data",
        help="an .npz image set (x_train, y_train, x_test, y_test) in place of the digits",
    )
    parser.add_argument(
        "--augment", action="store_true", default=None, help="random shifts and flips"
    )
    parser.add_argument("--checkpoint-dir", help="write resnet.pt and momentum.pt here each epoch")
    parser.add_argument("--resume", action="store_true", help="continue from the checkpoints")
    parser.add_argument("--out", help="also write the results as JSON to this file")


def run_reproduce(args: argparse.Namespace) -> int:
    """``deepkern reproduce momentum``: the paper's figure beside ours.

    Returns:
        0 on success.
    """
    settings = _resolve(args, _REPRODUCE_QUICK, _REPRODUCE_DEFAULTS)
    _check_demo_settings(settings)
    with process_group(settings):
        return _reproduce(args, settings)


def _reproduce(args: argparse.Namespace, settings: _Settings) -> int:
    rank, _ = rank_and_world()
    progress = not getattr(args, "no_progress", False)
    data = _load_data(settings)
    results = _train_pair(settings, data, progress)
    if rank != 0:
        return 0
    rows = _memory_sweep(
        dataclasses.replace(settings, memory_batch=settings.batch_size), [settings.depth], data
    )

    row = rows[0]
    ratio = row["resnet_saved_bytes"] / max(1, row["momentum_saved_bytes"])
    mean, spread = PAPER_CIFAR10_MOMENTUM_RESNET101
    what = "digits" if not settings.data else os.path.basename(settings.data)
    ours = f"ours ({what}, {_model_name(settings, settings.depth)})"
    paper = "paper (CIFAR-10, ResNet-101)"
    width = max(len(ours), len(paper))
    header = f"{'':<{width}} | {'ResNet':>9} | {'Momentum':>13} | {'memory ratio':>12}"
    print(header)
    print("-" * len(header))
    print(
        f"{paper:<{width}} | {'same (*)':>9} | {f'{mean:.2f} ± {spread:.2f}':>13} | "
        f"{'much smaller':>12}"
    )
    print(
        f"{ours:<{width}} | {100 * results['resnet']['test_accuracy']:>8.2f}% | "
        f"{100 * results['momentum']['test_accuracy']:>12.2f}% | {ratio:>11.1f}x"
    )
    print(
        "(*) the paper reports the same accuracy for ResNet-101 as for Momentum ResNet-101; "
        "memory ratio: bytes autograd holds for one training step, ResNet over Momentum "
        f"ResNet, batch {settings.batch_size}"
    )
    if getattr(args, "out", None):
        report = {
            "paper": {"dataset": "CIFAR-10", "arch": "resnet101", "momentum_accuracy": mean},
            "settings": dataclasses.asdict(settings),
            "accuracy": {k: results[k]["test_accuracy"] for k in ("resnet", "momentum")},
            "training": results,
            "memory": row,
            "environment": environment(settings.device),
        }
        write_json(args.out, report)
    return 0
