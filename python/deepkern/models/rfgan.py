"""GANs with representative features (RFGAN; Bang and Shim, "Improved Training of Generative
Adversarial Networks Using Representative Features", ICML 2018), on DCGAN networks.

An autoencoder is first trained to reconstruct the real images; its encoder is then frozen.
The encoder's output for an image, the representative feature, is joined (concatenated) to
the discriminator's last feature map, flattened, and the decision layer sees both. The
encoder never changes during GAN training, but gradients flow through it into the generator:
the generator is pushed towards images whose representative features look real as well. The
paper argues that, since the autoencoder minimises a forward KL divergence while the GAN
minimises a reverse one, training with both improves sample diversity and quality.

What we follow and where we choose. The method fixes the frozen, pretrained autoencoder and
the joining of its feature to the discriminator's last feature map; the rest follows DCGAN,
and the points that are our own choices say so (where the paper's training details differ,
these are DCGAN's):

- Networks: DCGAN (Radford, Metz and Chintala, 2016): strided convolutions, no pooling, batch
  norm in both networks except the generator's output and the discriminator's input layer,
  ReLU in the generator with tanh output, LeakyReLU(0.2) in the discriminator, weights from
  N(0, 0.02). The final 4x4 convolution of DCGAN's discriminator is written as a linear layer
  on the flattened 4x4 feature map (the same function), so that the representative feature
  can be concatenated to it.
- Autoencoder: the encoder is the discriminator's convolutional stack followed by a linear
  layer to ``code_dim`` features; the decoder mirrors the generator. Trained with mean squared
  error and Adam (our choice), then frozen: ``requires_grad`` off, eval mode kept (its batch
  norm uses its running statistics, and they never change).
- Loss and steps: the standard GAN loss with the non-saturating generator loss, one
  discriminator step then one generator step per batch, Adam with lr 2e-4 and beta1 0.5:
  DCGAN's settings, taken for RFGAN as well. Only the
  discriminator's own parameters (not the encoder) are updated in its step; only the
  generator's in its step.
- Sampling for evaluation: the generator normalises each batch of samples with the batch's
  statistics, as in training (our choice; see :func:`sample`).

This module holds the networks (:class:`Generator`, :class:`Discriminator`, :class:`Encoder`,
:class:`Decoder`, :class:`Autoencoder`), :func:`pretrain_autoencoder`, the GAN training
function :func:`train` with :class:`GANConfig` (seeded, checkpointed, resumable, data
parallel under ``torch.distributed``), the single steps :func:`discriminator_step` and
:func:`generator_step`, :func:`sample`, and ``deepkern reproduce rfgan``. The measures live in
:mod:`deepkern.models.gan_metrics`.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import math
import os
import statistics
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from deepkern.models import gan_metrics
from deepkern.models.training import (
    SilentBar,
    batches_of,
    data_parallel,
    environment,
    process_group,
    progress_bar,
    rank_and_world,
    save_on_first_rank,
    write_json,
)

__all__ = [
    "Generator",
    "Discriminator",
    "Encoder",
    "Decoder",
    "Autoencoder",
    "AutoencoderConfig",
    "pretrain_autoencoder",
    "GANConfig",
    "make_optimizers",
    "discriminator_step",
    "generator_step",
    "train",
    "sample",
    "add_reproduce_arguments",
    "run_reproduce",
]

logger = logging.getLogger("deepkern.models.rfgan")

LEAKY_SLOPE = 0.2


# ---------------------------------------------------------------------------------------------
# Networks


def _upsamplings(image_size: int) -> int:
    """Stride-2 layers between a 4x4 map and the image; the side must be a power of two."""
    if not isinstance(image_size, int) or image_size < 8 or image_size & (image_size - 1):
        raise ValueError(
            f"image_size must be a power of two >= 8 (16, 32, ...), got {image_size!r}"
        )
    return int(math.log2(image_size)) - 2


def _check_positive(**values) -> None:
    for name, value in values.items():
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _dcgan_init(module: nn.Module, generator: torch.Generator | None) -> None:
    """DCGAN's initialisation: weights from N(0, 0.02), batch-norm scales from N(1, 0.02)."""
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
                m.weight.normal_(0.0, 0.02, generator=generator)
                if m.bias is not None:
                    m.bias.zero_()
            elif isinstance(m, nn.BatchNorm2d):
                m.weight.normal_(1.0, 0.02, generator=generator)
                m.bias.zero_()


def _upsampling_stack(image_size: int, channels: int, width: int) -> tuple[nn.Sequential, int]:
    """From a 4x4 map of ``width * 2^(n-1)`` channels to the image: n transposed convolutions."""
    layers: list[nn.Module] = []
    c = width * 2 ** (_upsamplings(image_size) - 1)
    top = c
    for _ in range(_upsamplings(image_size) - 1):
        layers += [
            nn.ConvTranspose2d(c, c // 2, 4, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(c // 2),
            nn.ReLU(),
        ]
        c //= 2
    layers += [nn.ConvTranspose2d(c, channels, 4, stride=2, padding=1), nn.Tanh()]
    return nn.Sequential(*layers), top


def _downsampling_stack(image_size: int, channels: int, width: int) -> tuple[nn.Sequential, int]:
    """From the image to a 4x4 map: strided convolutions, no batch norm on the first one."""
    layers: list[nn.Module] = [
        nn.Conv2d(channels, width, 4, stride=2, padding=1),
        nn.LeakyReLU(LEAKY_SLOPE),
    ]
    c = width
    for _ in range(_upsamplings(image_size) - 1):
        layers += [
            nn.Conv2d(c, 2 * c, 4, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(2 * c),
            nn.LeakyReLU(LEAKY_SLOPE),
        ]
        c *= 2
    return nn.Sequential(*layers), c


class Generator(nn.Module):
    """DCGAN generator: noise to a 4x4 map, then stride-2 transposed convolutions to the image.

    For 32x32 images and width w: z -> 4w x 4 x 4 -> 2w x 8 x 8 -> w x 16 x 16 -> C x 32 x 32;
    for 16x16: z -> 2w x 4 x 4 -> w x 8 x 8 -> C x 16 x 16. Batch norm and ReLU after every
    layer but the last, which ends in tanh.

    Args:
        image_size (power of two >= 8): side of the images.
        channels: channels of the images (1 grey, 3 colour).
        latent_dim: size of the noise vector.
        width: channels of the layer before the output.
        generator: the random source of the initial weights (DCGAN's N(0, 0.02)).

    Shapes:
        forward(z: Tensor[N, latent_dim]) -> Tensor[N, channels, image_size, image_size] in
        (-1, 1).
    """

    def __init__(
        self,
        image_size: int = 32,
        channels: int = 1,
        latent_dim: int = 100,
        width: int = 64,
        generator: torch.Generator | None = None,
    ):
        super().__init__()
        _check_positive(channels=channels, latent_dim=latent_dim, width=width)
        self.image_size, self.channels, self.latent_dim = image_size, channels, latent_dim
        body, top = _upsampling_stack(image_size, channels, width)
        self.project = nn.Sequential(
            nn.ConvTranspose2d(latent_dim, top, 4, stride=1, padding=0, bias=False),
            nn.BatchNorm2d(top),
            nn.ReLU(),
        )
        self.body = body
        _dcgan_init(self, generator)

    def forward(self, z: Tensor) -> Tensor:
        if z.dim() != 2 or z.shape[1] != self.latent_dim:
            raise ValueError(f"z must be [N, {self.latent_dim}], got {tuple(z.shape)}")
        return self.body(self.project(z[:, :, None, None]))


class Encoder(nn.Module):
    """The autoencoder's encoder: the discriminator's convolutional stack, then a linear layer.

    Args:
        image_size, channels, width: as for :class:`Discriminator`.
        code_dim: size of the code (the representative feature).
        generator: the random source of the initial weights.

    Shapes:
        forward(x: Tensor[N, channels, image_size, image_size]) -> Tensor[N, code_dim]
    """

    def __init__(
        self,
        image_size: int = 32,
        channels: int = 1,
        width: int = 64,
        code_dim: int = 128,
        generator: torch.Generator | None = None,
    ):
        super().__init__()
        _check_positive(channels=channels, width=width, code_dim=code_dim)
        self.image_size, self.channels, self.code_dim = image_size, channels, code_dim
        self.features, c = _downsampling_stack(image_size, channels, width)
        self.code = nn.Linear(c * 16, code_dim)
        _dcgan_init(self, generator)

    def forward(self, x: Tensor) -> Tensor:
        return self.code(self.features(x).flatten(1))


class Decoder(nn.Module):
    """The autoencoder's decoder: a linear layer to a 4x4 map, then the generator's layers.

    Shapes:
        forward(code: Tensor[N, code_dim]) -> Tensor[N, channels, image_size, image_size]
    """

    def __init__(
        self,
        image_size: int = 32,
        channels: int = 1,
        width: int = 64,
        code_dim: int = 128,
        generator: torch.Generator | None = None,
    ):
        super().__init__()
        _check_positive(channels=channels, width=width, code_dim=code_dim)
        self.body, top = _upsampling_stack(image_size, channels, width)
        self.top = top
        self.project = nn.Linear(code_dim, top * 16)
        self.norm = nn.Sequential(nn.BatchNorm2d(top), nn.ReLU())
        _dcgan_init(self, generator)

    def forward(self, code: Tensor) -> Tensor:
        return self.body(self.norm(self.project(code).view(-1, self.top, 4, 4)))


class Autoencoder(nn.Module):
    """Encoder and decoder; ``forward`` reconstructs. Train it with :func:`pretrain_autoencoder`."""

    def __init__(self, encoder: Encoder, decoder: Decoder):
        super().__init__()
        self.encoder, self.decoder = encoder, decoder

    def forward(self, x: Tensor) -> Tensor:
        return self.decoder(self.encoder(x))


class Discriminator(nn.Module):
    """DCGAN discriminator, plain or with a representative feature (RFGAN).

    The convolutional stack maps the image to a 4x4 feature map (``width * 2^(n-1)``
    channels). Without an encoder, the decision is a linear layer on that map, flattened
    (DCGAN's final 4x4 convolution). With an encoder, the encoder's output for the same image
    is concatenated to the flattened map and the decision layer sees both: the only change
    RFGAN makes to the network. The encoder is frozen here: its parameters stop requiring
    gradients and it stays in eval mode whatever mode the discriminator is put in. Gradients
    still flow through it to the input, so the generator feels it.

    Args:
        image_size (power of two >= 8), channels, width: the networks' sizes.
        encoder: a pretrained :class:`Encoder` for the same images, or None for plain DCGAN.
        generator: the random source of the initial weights. The convolutional stack is drawn
            first, so a plain and an RFGAN discriminator drawn from the same seed share it.

    Shapes:
        forward(x: Tensor[N, channels, image_size, image_size]) -> logits Tensor[N]
        joined_features(x) -> Tensor[N, feature_dim + code_dim]
    """

    def __init__(
        self,
        image_size: int = 32,
        channels: int = 1,
        width: int = 64,
        encoder: Encoder | None = None,
        generator: torch.Generator | None = None,
    ):
        super().__init__()
        _check_positive(channels=channels, width=width)
        self.image_size, self.channels = image_size, channels
        self.features, c = _downsampling_stack(image_size, channels, width)
        self.feature_dim = c * 16
        _dcgan_init(self.features, generator)
        if encoder is not None:
            if (encoder.image_size, encoder.channels) != (image_size, channels):
                raise ValueError(
                    f"encoder is for {encoder.channels}x{encoder.image_size}x"
                    f"{encoder.image_size} images, the discriminator for "
                    f"{channels}x{image_size}x{image_size}"
                )
            encoder.requires_grad_(False)
            encoder.eval()
        self.encoder = encoder
        self.code_dim = encoder.code_dim if encoder is not None else 0
        self.decision = nn.Linear(self.feature_dim + self.code_dim, 1)
        _dcgan_init(self.decision, generator)

    @property
    def representative(self) -> bool:
        """Whether this is an RFGAN discriminator (has a representative-feature encoder)."""
        return self.encoder is not None

    def train(self, mode: bool = True) -> Discriminator:
        super().train(mode)
        if self.encoder is not None:
            self.encoder.eval()  # frozen: its batch norm keeps its running statistics
        return self

    def joined_features(self, x: Tensor) -> Tensor:
        features = self.features(x).flatten(1)
        if self.encoder is None:
            return features
        return torch.cat([features, self.encoder(x)], dim=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.decision(self.joined_features(x)).squeeze(1)


# ---------------------------------------------------------------------------------------------
# Autoencoder pretraining


@dataclass
class AutoencoderConfig:
    """Settings of :func:`pretrain_autoencoder`.

    Attributes:
        epochs: passes over the images.
        lr: learning rate of Adam.
        batch_size: images per step.
        seed: seeds the order of the images.
        device: where to train.
        progress: show a tqdm progress bar.
    """

    epochs: int = 10
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
        if not isinstance(self.batch_size, int) or self.batch_size < 2:
            raise ValueError(f"batch_size must be an integer >= 2, got {self.batch_size!r}")


def _check_images(images: Tensor, name: str = "images") -> Tensor:
    if not isinstance(images, Tensor) or images.dim() != 4 or not images.is_floating_point():
        shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"{name} must be a floating-point tensor [N, C, H, W], got {shape}")
    if images.shape[0] < 2:
        raise ValueError(f"{name} must hold at least 2 images, got {images.shape[0]}")
    return images


def pretrain_autoencoder(
    autoencoder: Autoencoder, config: AutoencoderConfig, images: Tensor
) -> dict:
    """Train the autoencoder to reconstruct ``images`` (mean squared error, Adam).

    Every process of a distributed run trains the same autoencoder on all the images (same
    seed, same order), so their encoders agree without communication; it is small.

    Args:
        autoencoder: trained in place, moved to ``config.device``, left in eval mode.
        config: the settings.
        images (Tensor[N, C, H, W]): the real images, in the generator's range [-1, 1].

    Returns:
        dict with ``reconstruction_mse`` (last epoch), ``history`` (one value per epoch) and
        ``seconds``.

    Raises:
        ValueError: malformed images, or a loss that is not finite.
    """
    images = _check_images(images)
    device = torch.device(config.device)
    autoencoder.to(device).train()
    optimizer = torch.optim.Adam(autoencoder.parameters(), lr=config.lr)
    order_rng = torch.Generator().manual_seed(config.seed)
    steps = len(batches_of(list(range(len(images))), config.batch_size))
    bar = progress_bar(config.epochs * steps, "autoencoder", config.progress, leave=False)
    history = []
    started = time.perf_counter()
    try:
        for epoch in range(config.epochs):
            order = torch.randperm(len(images), generator=order_rng).tolist()
            total, count = 0.0, 0
            for batch in batches_of(order, config.batch_size):
                x = images[torch.tensor(batch)].to(device)
                loss = F.mse_loss(autoencoder(x), x)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                total += float(loss.detach()) * len(batch)
                count += len(batch)
                bar.update(1)
            mse = total / max(count, 1)
            if not math.isfinite(mse):
                raise ValueError(
                    f"the autoencoder's loss is not finite in epoch {epoch + 1}; lower lr "
                    f"(now {config.lr})"
                )
            history.append(mse)
            logger.info("autoencoder epoch %d/%d: mse %.5f", epoch + 1, config.epochs, mse)
    finally:
        bar.close()
    autoencoder.eval()
    return {
        "reconstruction_mse": history[-1] if history else None,
        "history": history,
        "seconds": time.perf_counter() - started,
    }


# ---------------------------------------------------------------------------------------------
# GAN training


@dataclass
class GANConfig:
    """Settings of :func:`train` (defaults: DCGAN's).

    Attributes:
        epochs: passes over the real images.
        batch_size: real images (and as many generated ones) per step and process.
        lr: learning rate of both Adam optimisers.
        beta1, beta2: Adam's moment decay rates.
        d_steps: discriminator steps before each generator step (each on the same real
            batch, with fresh noise).
        seed: seeds the order of the images and the noise; the same seed and data give the
            same run.
        device: where to train, for example "cpu", "cuda" or "cuda:1".
        checkpoint: file written (atomically) after every epoch; None writes none.
        resume: continue from ``checkpoint`` when that file exists.
        progress: show a tqdm progress bar (on the first process only).
    """

    epochs: int = 25
    batch_size: int = 64
    lr: float = 2e-4
    beta1: float = 0.5
    beta2: float = 0.999
    d_steps: int = 1
    seed: int = 0
    device: str = "cpu"
    checkpoint: str | None = None
    resume: bool = False
    progress: bool = True

    def __post_init__(self):
        if not isinstance(self.epochs, int) or self.epochs < 0:
            raise ValueError(f"epochs must be an integer >= 0, got {self.epochs!r}")
        if not isinstance(self.batch_size, int) or self.batch_size < 2:
            raise ValueError(f"batch_size must be an integer >= 2, got {self.batch_size!r}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be positive and finite, got {self.lr!r}")
        for name in ("beta1", "beta2"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"{name} must lie in [0, 1), got {value!r}")
        if not isinstance(self.d_steps, int) or self.d_steps < 1:
            raise ValueError(f"d_steps must be a positive integer, got {self.d_steps!r}")
        if self.resume and not self.checkpoint:
            raise ValueError("resume needs a checkpoint path")


def make_optimizers(
    generator: Generator, discriminator: Discriminator, config: GANConfig
) -> tuple[torch.optim.Optimizer, torch.optim.Optimizer]:
    """Adam for the generator and Adam for the discriminator's trainable parameters.

    The frozen encoder of an RFGAN discriminator is left out: nothing can update it.
    """
    betas = (config.beta1, config.beta2)
    trainable = [p for p in discriminator.parameters() if p.requires_grad]
    return (
        torch.optim.Adam(generator.parameters(), lr=config.lr, betas=betas),
        torch.optim.Adam(trainable, lr=config.lr, betas=betas),
    )


@contextlib.contextmanager
def _no_parameter_gradients(module: nn.Module):
    """Gradients flow through ``module`` to its input, but none is kept for its parameters."""
    flags = [(p, p.requires_grad) for p in module.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def discriminator_step(
    generator: nn.Module,
    discriminator: nn.Module,
    optimizer: torch.optim.Optimizer,
    real: Tensor,
    noise: Tensor,
) -> dict:
    """One discriminator step: raise its logits on ``real``, lower them on ``generator(noise)``.

    Loss ``-log D(x) - log(1 - D(G(z)))`` (binary cross-entropy on logits), real and generated
    batches passed separately (batch norm sees one kind at a time, as in DCGAN) and their
    gradients summed. The generator runs without gradients; only the parameters held by
    ``optimizer`` move.

    Args:
        generator: the generator (plain module; its batch-norm statistics move).
        discriminator: the discriminator, or its DistributedDataParallel wrapper.
        optimizer: the discriminator's optimiser.
        real (Tensor[N, C, H, W]): real images.
        noise (Tensor[M, latent_dim]): noise for the generated batch.

    Returns:
        dict of tensors: ``loss``, ``real_score`` and ``fake_score`` (mean sigmoid outputs).
    """
    with torch.no_grad():
        fake = generator(noise)
    optimizer.zero_grad(set_to_none=True)
    real_logits = discriminator(real)
    real_loss = F.binary_cross_entropy_with_logits(real_logits, torch.ones_like(real_logits))
    real_loss.backward()
    fake_logits = discriminator(fake)
    fake_loss = F.binary_cross_entropy_with_logits(fake_logits, torch.zeros_like(fake_logits))
    fake_loss.backward()
    optimizer.step()
    return {
        "loss": (real_loss + fake_loss).detach(),
        "real_score": torch.sigmoid(real_logits.detach()).mean(),
        "fake_score": torch.sigmoid(fake_logits.detach()).mean(),
    }


def generator_step(
    generator: nn.Module,
    discriminator: nn.Module,
    optimizer: torch.optim.Optimizer,
    noise: Tensor,
) -> dict:
    """One generator step with the non-saturating loss ``-log D(G(z))``.

    The gradient passes through the discriminator (and through an RFGAN discriminator's
    frozen encoder) to the generated images; the discriminator's parameters receive none and
    do not move. Its batch norm, in training mode, normalises the generated batch with the
    batch's own statistics (as in DCGAN) and updates its running statistics, which training
    never reads.

    Args:
        generator: the generator, or its DistributedDataParallel wrapper.
        discriminator: the discriminator (plain module).
        optimizer: the generator's optimiser.
        noise (Tensor[M, latent_dim]): noise.

    Returns:
        dict of tensors: ``loss`` and ``fake_score`` (mean sigmoid output).
    """
    optimizer.zero_grad(set_to_none=True)
    with _no_parameter_gradients(discriminator):
        logits = discriminator(generator(noise))
        loss = F.binary_cross_entropy_with_logits(logits, torch.ones_like(logits))
        loss.backward()
    optimizer.step()
    return {"loss": loss.detach(), "fake_score": torch.sigmoid(logits.detach()).mean()}


def _noise_generator(config: GANConfig, epoch: int, rank: int) -> torch.Generator:
    # One stream per seed, epoch and process: reproducible, and resumable at epoch edges.
    return torch.Generator().manual_seed((config.seed * 1_000_003 + epoch) * 4099 + rank)


def _load_checkpoint(path, generator, discriminator, optimizers, config, device) -> tuple:
    state = torch.load(path, map_location=device, weights_only=True)
    try:
        generator.load_state_dict(state["generator"])
        discriminator.load_state_dict(state["discriminator"])
        optimizers[0].load_state_dict(state["optimizer_g"])
        optimizers[1].load_state_dict(state["optimizer_d"])
    except (RuntimeError, KeyError, ValueError) as error:
        raise ValueError(f"checkpoint {path} does not fit these networks: {error}") from error
    if state.get("epochs") != config.epochs:
        logger.warning(
            "checkpoint %s was written for %s epochs, training for %s",
            path,
            state.get("epochs"),
            config.epochs,
        )
    logger.info("resumed from %s after epoch %d", path, state["epoch"])
    return int(state["epoch"]), list(state["history"])


def train(
    generator: Generator,
    discriminator: Discriminator,
    config: GANConfig,
    images: Tensor,
    name: str = "gan",
) -> dict:
    """Train a DCGAN, or an RFGAN when the discriminator holds a frozen encoder.

    Each batch: ``config.d_steps`` calls of :func:`discriminator_step`, then one of
    :func:`generator_step`, with as many generated images as real ones. The order of the
    images and the noise come from ``config.seed``, the epoch and the process alone, so a run
    that resumes from a checkpoint continues exactly as the uninterrupted run would have.
    When ``torch.distributed`` is initialised, both networks are wrapped in
    DistributedDataParallel and each process trains on its own shard of every epoch; the
    batch-norm statistics of the first process are copied to the others after every epoch,
    so that all processes end with the same networks. The first process writes the checkpoint
    and shows the progress bar.

    Args:
        generator: trained in place, moved to ``config.device``.
        discriminator: trained in place (its encoder, if any, stays frozen).
        config: the settings.
        images (Tensor[N, C, H, W]): real images in [-1, 1].
        name: label of the progress bar and of the log messages.

    Returns:
        dict with the last epoch's ``d_loss``, ``g_loss``, ``real_score`` and ``fake_score``
        (mean sigmoid outputs of the discriminator), ``epochs``, ``start_epoch`` (above 0
        after a resume), ``seconds`` (this call) and ``history``, one dict per epoch.

    Raises:
        ValueError: malformed images, images that do not fit the networks, a checkpoint that
            does not fit them, or a loss that is not finite.
    """
    images = _check_images(images)
    expected = (discriminator.channels, discriminator.image_size, discriminator.image_size)
    made = (generator.channels, generator.image_size, generator.image_size)
    if tuple(images.shape[1:]) != expected or made != expected:
        raise ValueError(
            f"images are {tuple(images.shape[1:])}, the discriminator takes {expected} and the "
            f"generator makes {generator.channels}x{generator.image_size}x{generator.image_size}"
        )
    device = torch.device(config.device)
    rank, world = rank_and_world()
    generator.to(device).train()
    discriminator.to(device).train()
    g_net = data_parallel(generator, device, world)
    d_net = data_parallel(discriminator, device, world)
    optimizers = make_optimizers(generator, discriminator, config)

    from torch.utils.data import DistributedSampler, TensorDataset

    sampler = DistributedSampler(
        TensorDataset(images), num_replicas=world, rank=rank, seed=config.seed
    )
    steps_per_epoch = len(batches_of(list(range(len(sampler))), config.batch_size))

    start_epoch, history = 0, []
    if config.resume and os.path.exists(config.checkpoint):
        start_epoch, history = _load_checkpoint(
            config.checkpoint, generator, discriminator, optimizers, config, device
        )
    elif config.resume:
        logger.info("%s: no checkpoint at %s yet, starting from epoch 1", name, config.checkpoint)

    started = time.perf_counter()
    remaining = max(0, config.epochs - start_epoch)
    bar = progress_bar(remaining * steps_per_epoch, name, config.progress and rank == 0)
    try:
        for epoch in range(start_epoch, config.epochs):
            record = _train_epoch(
                (generator, discriminator),
                (g_net, d_net),
                optimizers,
                sampler,
                config,
                epoch=epoch,
                images=images,
                bar=bar,
                name=name,
            )
            if world > 1:
                for module in (generator, discriminator):
                    for buffer in module.buffers():
                        dist.broadcast(buffer, src=0)
            history.append(record)
            logger.info(
                "%s epoch %d/%d: d loss %.4f, g loss %.4f, D(x) %.3f, D(G(z)) %.3f",
                name,
                epoch + 1,
                config.epochs,
                record["d_loss"],
                record["g_loss"],
                record["real_score"],
                record["fake_score"],
            )
            if config.checkpoint:
                state = {
                    "epoch": epoch + 1,
                    "epochs": config.epochs,
                    "generator": generator.state_dict(),
                    "discriminator": discriminator.state_dict(),
                    "optimizer_g": optimizers[0].state_dict(),
                    "optimizer_d": optimizers[1].state_dict(),
                    "history": history,
                }
                save_on_first_rank(state, config.checkpoint, rank, world)
    finally:
        bar.close()

    last = history[-1] if history else {}
    return {
        "d_loss": last.get("d_loss"),
        "g_loss": last.get("g_loss"),
        "real_score": last.get("real_score"),
        "fake_score": last.get("fake_score"),
        "epochs": config.epochs,
        "start_epoch": start_epoch,
        "seconds": time.perf_counter() - started,
        "history": history,
    }


def _train_epoch(modules, nets, optimizers, sampler, config, *, epoch, images, bar, name) -> dict:
    """One pass over this process's shard; returns the epoch's mean losses and scores."""
    generator, discriminator = modules
    g_net, d_net = nets
    optimizer_g, optimizer_d = optimizers
    device = torch.device(config.device)
    rank, world = rank_and_world()
    sampler.set_epoch(epoch)
    noise_rng = _noise_generator(config, epoch, rank)
    bar.set_description(f"{name} epoch {epoch + 1}/{config.epochs}")

    started = time.perf_counter()
    sums = torch.zeros(5, dtype=torch.float64, device=device)  # d, g, D(x), D(G(z)), steps
    for i, batch in enumerate(batches_of(list(sampler), config.batch_size)):
        real = images[torch.tensor(batch)].to(device)
        for _ in range(config.d_steps):
            noise = torch.randn(len(batch), generator.latent_dim, generator=noise_rng)
            d = discriminator_step(generator, d_net, optimizer_d, real, noise.to(device))
        noise = torch.randn(len(batch), generator.latent_dim, generator=noise_rng)
        g = generator_step(g_net, discriminator, optimizer_g, noise.to(device))
        with torch.no_grad():
            sums += torch.stack(
                [d["loss"], g["loss"], d["real_score"], d["fake_score"], torch.ones_like(g["loss"])]
            ).double()
        bar.update(1)
        # Reading a loss synchronises with the device; every tenth step is enough to watch.
        if i % 10 == 0 and not isinstance(bar, SilentBar):
            bar.set_postfix(d=f"{float(d['loss']):.3f}", g=f"{float(g['loss']):.3f}")

    if world > 1:
        dist.all_reduce(sums)
    d_loss, g_loss, real_score, fake_score, steps = sums.tolist()
    if not (math.isfinite(d_loss) and math.isfinite(g_loss)):
        raise ValueError(
            f"{name}: a loss is not finite in epoch {epoch + 1}; lower the learning rate "
            f"(now {config.lr})"
        )
    steps = max(steps, 1.0)
    return {
        "epoch": epoch + 1,
        "d_loss": d_loss / steps,
        "g_loss": g_loss / steps,
        "real_score": real_score / steps,
        "fake_score": fake_score / steps,
        "seconds": time.perf_counter() - started,
    }


@torch.no_grad()
def sample(generator: Generator, count: int, seed: int, batch_size: int = 256) -> Tensor:
    """``count`` images from the generator, from seeded noise, on the CPU.

    The generator runs as in training, its batch norm normalising each batch of
    ``batch_size`` samples with the batch's own statistics (as DCGAN generates); its running
    statistics are left as they were. The running statistics trail a generator that still
    changes fast, and samples drawn with them (eval mode) came out visibly worse on the
    photo patches.

    Args:
        generator: the generator; its train/eval mode and buffers are restored afterwards.
        count (int >= 0): how many images.
        seed: the seed of the noise.
        batch_size (int >= 2): images per forward pass, the batch whose statistics are used.

    Returns:
        Tensor[count, channels, image_size, image_size] float32 in (-1, 1).
    """
    if not isinstance(count, int) or count < 0:
        raise ValueError(f"count must be an integer >= 0, got {count!r}")
    if not isinstance(batch_size, int) or batch_size < 2:
        raise ValueError(f"batch_size must be an integer >= 2, got {batch_size!r}")
    noise_rng = torch.Generator().manual_seed(seed)
    noise = torch.randn(count, generator.latent_dim, generator=noise_rng)
    device = next(generator.parameters()).device
    was_training = generator.training
    buffers = [(b, b.clone()) for b in generator.buffers()]
    generator.train()
    try:
        # A last batch of one would be normalised by its own statistics alone: join it to the
        # batch before.
        chunks = list(noise.split(batch_size))
        if len(chunks) > 1 and len(chunks[-1]) == 1:
            chunks[-2:] = [torch.cat(chunks[-2:])]
        images = [generator(z.to(device)).float().cpu() for z in chunks if len(z) > 0]
    finally:
        for buffer, saved in buffers:
            buffer.copy_(saved)
        generator.train(was_training)
    if not images:
        return torch.zeros(0, generator.channels, generator.image_size, generator.image_size)
    return torch.cat(images)


# ---------------------------------------------------------------------------------------------
# The command: deepkern reproduce rfgan

# The paper measures inception scores (and other measures) of RFGAN against DCGAN-based GANs
# on CIFAR-10, STL-10, CelebA and LSUN, and reports RFGAN ahead of the baselines it extends.
# NOTE: its figures are not quoted, since they could not be verified against the paper's text;
# the claim is printed in words.
PAPER_CLAIM = (
    "paper (Bang and Shim 2018; CIFAR-10, STL-10, CelebA, LSUN at 32-64 px): RFGAN reported "
    "ahead of its DCGAN baseline in inception score and diversity; figures not quoted here"
)

DATASETS = ("digits", "photos")
# GAN epochs at CPU size: the colour patches need about 40 (1240 steps) before the generator
# recovers from the discriminator's early lead; the digits look like digits after 20.
_EPOCHS = {"digits": 20, "photos": 40}


@dataclass
class _Settings:
    """What one comparison trains and measures."""

    datasets: tuple[str, ...] = DATASETS
    size: int = 16
    width: int = 16
    latent_dim: int = 32
    code_dim: int = 32
    epochs: int | None = None  # None: each data set's own default (_EPOCHS)
    batch_size: int = 64
    lr: float = 2e-4
    beta1: float = 0.5
    d_steps: int = 1
    ae_epochs: int = 10
    ae_lr: float = 1e-3
    classifier_epochs: int = 6
    classifier_width: int = 16
    seeds: tuple[int, ...] = (0, 1, 2)
    k: int = 3
    train_limit: int | None = None
    device: str = "cpu"
    checkpoint_dir: str | None = None
    resume: bool = False


_DEFAULTS = _Settings()
_FULL = _Settings(
    size=32,
    width=64,
    latent_dim=100,
    code_dim=128,
    epochs=100,
    ae_epochs=30,
    classifier_epochs=15,
    classifier_width=32,
    seeds=(0, 1, 2, 3, 4),
    device="cuda",
)
_QUICK = _Settings(
    datasets=("digits",),
    width=4,
    latent_dim=8,
    code_dim=8,
    epochs=1,
    ae_epochs=1,
    classifier_epochs=1,
    classifier_width=4,
    seeds=(0, 1),
    train_limit=128,
)


def add_reproduce_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``deepkern reproduce rfgan``.

    The default trains both GANs on 16x16 digits (20 epochs) and photo patches (40 epochs)
    over three seeds on a CPU in a few minutes; ``--full`` gives 32x32 images, DCGAN's width
    64, 100 epochs and five seeds on a GPU; ``--quick`` runs in seconds. Under ``torchrun``
    the GAN training is data parallel.
    """
    parser.description = (
        "GANs with representative features (RFGAN) against DCGAN of the same size, over "
        "several seeds, on scikit-learn's digits and on patches of its two sample photographs: "
        "Frechet distance, precision, recall and mode coverage in the feature space of a "
        "classifier trained on the same data. --full: 32x32, width 64, 100 epochs, 5 seeds, "
        "on cuda."
    )
    parser.add_argument("--quick", action="store_true", help="a run of seconds (for tests)")
    parser.add_argument("--full", action="store_true", help="the larger settings, for a GPU")
    parser.add_argument("--datasets", nargs="+", choices=DATASETS, help="default: both")
    parser.add_argument("--size", type=int, help="image side, a power of two (default 16)")
    parser.add_argument("--width", type=int, help="base channels of both networks (default 16)")
    parser.add_argument("--latent-dim", type=int, help="noise size (default 32)")
    parser.add_argument("--code-dim", type=int, help="representative feature size (default 32)")
    parser.add_argument(
        "--epochs", type=int, help="GAN epochs (default 20 for digits, 40 for photo patches)"
    )
    parser.add_argument("--batch-size", type=int, help="images per step (default 64)")
    parser.add_argument("--lr", type=float, help="Adam learning rate (default 2e-4)")
    parser.add_argument("--d-steps", type=int, help="D steps per G step (default 1)")
    parser.add_argument("--ae-epochs", type=int, help="autoencoder epochs (default 10)")
    parser.add_argument("--classifier-epochs", type=int, help="classifier epochs (default 6)")
    parser.add_argument("--seeds", type=int, nargs="+", help="seeds (default 0 1 2)")
    parser.add_argument("--k", type=int, help="neighbour of precision and recall (default 3)")
    parser.add_argument(
        "--train-limit", type=int, help="use a seeded choice of N training and N test images"
    )
    parser.add_argument("--device", help="cpu, cuda or cuda:N (default cpu; cuda with --full)")
    parser.add_argument("--threads", type=int, help="CPU threads of PyTorch")
    parser.add_argument("--checkpoint-dir", help="write one checkpoint per GAN here each epoch")
    parser.add_argument("--resume", action="store_true", help="continue from the checkpoints")
    parser.add_argument("--out", help="write results.json and PNG grids of samples here")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")


def _resolve(args: argparse.Namespace) -> _Settings:
    if getattr(args, "quick", False) and getattr(args, "full", False):
        raise ValueError("--quick and --full exclude each other")
    base = (
        _QUICK
        if getattr(args, "quick", False)
        else _FULL
        if getattr(args, "full", False)
        else _DEFAULTS
    )
    updates = {}
    for field in dataclasses.fields(_Settings):
        value = getattr(args, field.name, None)
        if value is not None and value is not False:
            updates[field.name] = tuple(value) if isinstance(value, list) else value
    settings = dataclasses.replace(base, **updates)

    minimum = {"epochs": 0, "ae_epochs": 0, "classifier_epochs": 0, "batch_size": 2}
    for name in ("width", "latent_dim", "code_dim", "d_steps", "k", *minimum):
        value, least = getattr(settings, name), minimum.get(name, 1)
        if value is not None and value < least:
            flag = "--" + name.replace("_", "-")
            raise ValueError(f"{flag} must be at least {least}, got {value}")
    try:
        _upsamplings(settings.size)
    except ValueError:
        raise ValueError(
            f"--size must be a power of two from 8 to 64, got {settings.size}"
        ) from None
    if settings.size > 64:
        raise ValueError(f"--size must be a power of two from 8 to 64, got {settings.size}")
    if not settings.seeds or any(s < 0 for s in settings.seeds):
        raise ValueError(f"--seeds must be non-negative integers, got {settings.seeds}")
    if not (settings.lr > 0 and math.isfinite(settings.lr)):
        raise ValueError(f"--lr must be positive and finite, got {settings.lr}")
    if settings.train_limit is not None and settings.train_limit < 2 * settings.k + 2:
        raise ValueError(
            f"--train-limit must be at least {2 * settings.k + 2}, got {settings.train_limit}"
        )
    if settings.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {settings.device}: no CUDA device is available")
    threads = getattr(args, "threads", None)
    if threads is not None:
        if threads < 1:
            raise ValueError(f"--threads must be positive, got {threads}")
        torch.set_num_threads(threads)
    return settings


def _load(dataset: str, settings: _Settings) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    from deepkern.data.images import load_digits_split, load_photo_patches

    if dataset == "digits":
        data = load_digits_split(0, size=settings.size, scaling="symmetric")
    else:
        data = load_photo_patches(0, size=settings.size)
    x_train, y_train, x_test, y_test = data
    if settings.train_limit is not None:
        # A seeded choice rather than the first images: the photo patches come ordered by class.
        choose = torch.Generator().manual_seed(0)
        keep = torch.randperm(len(x_train), generator=choose)[: settings.train_limit]
        x_train, y_train = x_train[keep], y_train[keep]
        keep = torch.randperm(len(x_test), generator=choose)[: settings.train_limit]
        x_test, y_test = x_test[keep], y_test[keep]
    return x_train, y_train, x_test, y_test


def _build(
    kind: str, seed: int, settings: _Settings, channels: int, images: Tensor, progress: bool
):
    """A generator and a discriminator (with a pretrained, frozen encoder for RFGAN).

    Both kinds start from the same generator and the same convolutional discriminator weights
    for one seed; they differ only in the representative feature.
    """
    g_seed = torch.Generator().manual_seed(seed)
    generator = Generator(settings.size, channels, settings.latent_dim, settings.width, g_seed)
    encoder, autoencoder_metrics = None, None
    if kind == "rfgan":
        ae_seed = torch.Generator().manual_seed(10_000 + seed)
        encoder = Encoder(settings.size, channels, settings.width, settings.code_dim, ae_seed)
        decoder = Decoder(settings.size, channels, settings.width, settings.code_dim, ae_seed)
        config = AutoencoderConfig(
            epochs=settings.ae_epochs,
            lr=settings.ae_lr,
            batch_size=settings.batch_size,
            seed=seed,
            device=settings.device,
            progress=progress,
        )
        autoencoder_metrics = pretrain_autoencoder(Autoencoder(encoder, decoder), config, images)
    d_seed = torch.Generator().manual_seed(20_000 + seed)
    discriminator = Discriminator(settings.size, channels, settings.width, encoder, d_seed)
    return generator, discriminator, autoencoder_metrics


def _spread(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def run_reproduce(args: argparse.Namespace) -> int:
    """``deepkern reproduce rfgan``: RFGAN against DCGAN over seeds, one table.

    Returns:
        0 on success.
    """
    settings = _resolve(args)
    with process_group(settings):
        return _reproduce(args, settings)


def _reproduce(args: argparse.Namespace, settings: _Settings) -> int:
    rank, _ = rank_and_world()
    progress = not getattr(args, "no_progress", False)
    out = getattr(args, "out", None)
    started = time.perf_counter()
    report: dict = {"settings": dataclasses.asdict(settings), "datasets": {}}

    for dataset in settings.datasets:
        x_train, y_train, x_test, y_test = _load(dataset, settings)
        channels = x_train.shape[1]
        num_classes = int(max(y_train.max(), y_test.max())) + 1
        classifier = gan_metrics.FeatureClassifier(
            channels,
            num_classes,
            width=settings.classifier_width,
            generator=torch.Generator().manual_seed(0),
        )
        classifier_metrics = gan_metrics.train_classifier(
            classifier,
            gan_metrics.ClassifierConfig(
                epochs=settings.classifier_epochs, device=settings.device, progress=progress
            ),
            (x_train, y_train),
            (x_test, y_test),
        )
        reference_features, _ = gan_metrics.classifier_features(classifier, x_train)
        count = len(x_test)
        epochs = settings.epochs if settings.epochs is not None else _EPOCHS[dataset]
        entry: dict = {
            "images": {"train": len(x_train), "test": len(x_test), "channels": channels},
            "epochs": epochs,
            "classifier": classifier_metrics,
            "samples_per_measure": count,
            "real_test": gan_metrics.evaluate_samples(
                classifier, x_train, x_test, settings.k, reference_features
            ),
            "runs": {"dcgan": [], "rfgan": []},
        }
        for seed in settings.seeds:
            for kind in ("dcgan", "rfgan"):
                generator, discriminator, ae_metrics = _build(
                    kind, seed, settings, channels, x_train, progress
                )
                checkpoint = None
                if settings.checkpoint_dir:
                    checkpoint = os.path.join(
                        settings.checkpoint_dir, f"{dataset}-{kind}-{seed}.pt"
                    )
                config = GANConfig(
                    epochs=epochs,
                    batch_size=settings.batch_size,
                    lr=settings.lr,
                    beta1=settings.beta1,
                    d_steps=settings.d_steps,
                    seed=seed,
                    device=settings.device,
                    checkpoint=checkpoint,
                    resume=settings.resume and checkpoint is not None,
                    progress=progress,
                )
                training = train(
                    generator, discriminator, config, x_train, f"{kind} {dataset} {seed}"
                )
                if rank != 0:
                    continue
                samples = sample(generator, count, seed=1_000 + seed)
                measures = gan_metrics.evaluate_samples(
                    classifier, x_train, samples, settings.k, reference_features
                )
                entry["runs"][kind].append(
                    {
                        "seed": seed,
                        "measures": measures,
                        "training": training,
                        "autoencoder": ae_metrics,
                    }
                )
                if out and seed == settings.seeds[0]:
                    gan_metrics.write_image_grid(
                        os.path.join(out, f"{dataset}_{kind}.png"), samples[:64]
                    )
        if out and rank == 0:
            # The images are ordered by class for the photo patches: show a seeded choice.
            shown = torch.randperm(len(x_train), generator=torch.Generator().manual_seed(0))[:64]
            gan_metrics.write_image_grid(os.path.join(out, f"{dataset}_real.png"), x_train[shown])
        report["datasets"][dataset] = entry

    if rank != 0:
        return 0
    report["seconds"] = time.perf_counter() - started
    report["environment"] = environment(settings.device)
    report["paper"] = PAPER_CLAIM
    print(_table(report, settings))
    if out:
        os.makedirs(out, exist_ok=True)
        path = os.path.join(out, "results.json")
        write_json(path, report)
        print(f"\nwrote {path} and PNG grids of samples ({report['seconds']:.0f} s)")
    return 0


_COLUMNS = (
    ("fd", "FD", "{:.2f}"),
    ("precision", "precision", "{:.3f}"),
    ("recall", "recall", "{:.3f}"),
    ("covered", "modes", "{:.1f}"),
    ("kl_uniform", "KL(hist|unif)", "{:.3f}"),
)


def _table(report: dict, settings: _Settings) -> str:
    seeds = len(settings.seeds)
    lines = [
        f"RFGAN against DCGAN of the same size ({settings.size}x{settings.size}, width "
        f"{settings.width}), {seeds} seed(s): mean ± standard deviation over seeds.",
        "Measured against the training images in the feature space of a classifier trained on "
        f"them; FD lower is better, precision and recall (k = {settings.k}) higher, modes: "
        "classes holding >= 10 % of a uniform share, KL of the class histogram from uniform.",
    ]
    header = f"{'data':<8} | {'model':<16} | " + " | ".join(
        f"{title:>15}" for _, title, _ in _COLUMNS
    )
    lines += [header, "-" * len(header)]
    for dataset, entry in report["datasets"].items():
        real = entry["real_test"]
        cells = [f"{fmt.format(real[key]):>15}" for key, _, fmt in _COLUMNS]
        lines.append(f"{dataset:<8} | {'real (held out)':<16} | " + " | ".join(cells))
        for kind, label in (("dcgan", "DCGAN"), ("rfgan", "RFGAN")):
            runs = entry["runs"][kind]
            cells = []
            for key, _, fmt in _COLUMNS:
                mean, spread = _spread([float(r["measures"][key]) for r in runs])
                cells.append(f"{fmt.format(mean) + ' ± ' + fmt.format(spread):>15}")
            lines.append(f"{dataset:<8} | {label:<16} | " + " | ".join(cells))
        accuracy = entry["classifier"]["test_accuracy"]
        lines.append(
            f"{'':<8}   {entry['epochs']} GAN epochs; classifier test accuracy "
            f"{100 * accuracy:.1f} % on {entry['images']['test']} held-out images; "
            f"{entry['samples_per_measure']} samples per measure"
        )
    lines.append(PAPER_CLAIM)
    return "\n".join(lines)
