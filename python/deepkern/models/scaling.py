"""Depth scaling of trained ResNet weights (Cohen, Cont, Rossier and Xu, ICML 2021).

The networks are fully connected residual networks with an input embedding and a linear
readout::

    h_0 = E x + e
    h_{k+1} = h_k + delta sigma(A_k h_k + b_k),    k = 0, ..., L - 1,    delta = L^(-a)
    y = R h_L + r

with sigma = tanh or ReLU and ``a = delta_exponent`` (1 by default, the neural ODE scaling).
Trained at depths L = 8, 16, ..., 512, the weights A_0, ..., A_{L-1} are read as a path over
the layer index t = k / L, and the study asks how that path behaves as L grows:

- smooth (ODE-like): after removing the overall scale L^(-beta), the path tends to a smooth
  function of t: typical increments shrink like 1/L and the quadratic variation
  ``sum_k ||A_{k+1} - A_k||^2`` tends to zero;
- rough (SDE-like): the path looks like a Brownian path: typical increments shrink like
  L^(-1/2) and the quadratic variation stays of order one;
- neither: for example weights that are independent from layer to layer (increments that do
  not shrink, quadratic variation growing like L), or a path with jumps.

The regime is read from power laws fitted across depths to the median increment and the
quadratic variation (:func:`classify_regime`); the largest increment is reported beside
them. Every setting is trained from two initialisations: ``standard`` (PyTorch's default,
independent from layer to layer) and ``smooth`` (a smooth function of t), since a trained
path inherits much of its shape from where it started. SGD moves the residual weights with a
learning rate multiplied by 1 / delta, so that every depth learns at the same pace.

This module holds the path statistics (:func:`path_metrics`, :func:`fit_power_law`,
:func:`classify_regime`, :func:`scaling_summary`), the network (:class:`ScalingResNet`), a
synthetic data set whose targets come from an ODE flow (:func:`ode_flow_data`), training
(:func:`train` with :class:`TrainConfig`, checkpointed and resumable), the whole study
(:func:`run_study` with :class:`StudyConfig`), its plots, and the ``deepkern reproduce
scaling`` command (:func:`add_reproduce_arguments`, :func:`run_reproduce`).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from deepkern.models.training import environment, progress_bar, save_atomic, write_json

__all__ = [
    "ACTIVATIONS",
    "INITS",
    "REGIMES",
    "UNDETERMINED",
    "TrainingDiverged",
    "TASKS",
    "PAPER_FINDINGS",
    "path_metrics",
    "fit_power_law",
    "classify_regime",
    "scaling_summary",
    "ScalingResNet",
    "ode_flow_data",
    "load_task",
    "TrainConfig",
    "train",
    "evaluate",
    "StudyConfig",
    "run_study",
    "plot_weight_paths",
    "plot_scaling",
    "add_reproduce_arguments",
    "run_reproduce",
]

logger = logging.getLogger("deepkern.models.scaling")
logger.addHandler(logging.NullHandler())

ACTIVATIONS = {"tanh": torch.tanh, "relu": torch.relu}
INITS = ("standard", "smooth")
TASKS = ("ode_flow", "digits")

# What Cohen et al. (2021) state in their abstract; the specific exponents of their figures
# are not repeated here, since the command prints only what it can stand behind.
PAPER_FINDINGS = (
    "a neural ODE limit presumes weights that tend to a smooth function of k/L; weights "
    "trained by SGD scale with depth in other ways",
    "which limit appears (an ODE unlike the neural ODE, an SDE, or none) varies with the "
    "architecture, the smoothness of the activation among others",
    "the scaling exponent beta is read from a log-log regression of weight norms against L",
)

REGIMES = ("smooth (ODE-like)", "rough (SDE-like)", "neither")
UNDETERMINED = "undetermined"


# ---------------------------------------------------------------------------------------------
# Path statistics


def path_metrics(path: Tensor) -> dict[str, float]:
    """Size and roughness of a sequence of weights read as a path over the layer index.

    Norms are Frobenius norms of each element of the sequence (of each ``A_k``).

    Args:
        path (Tensor[L, ...], floating point): the weights of layers 0, ..., L - 1, for
            example ``A`` of shape [L, d, d]; L >= 1.

    Returns:
        dict of Python floats, computed in float64:

        - ``max_norm``: max_k ||A_k||;
        - ``rss``: the root sum of squares sqrt(sum_k ||A_k||^2);
        - ``max_increment``: max_k ||A_{k+1} - A_k||;
        - ``median_increment``: the median of the L - 1 increments ||A_{k+1} - A_k||, the
          typical one, which a few steep spots of an otherwise smooth path do not move;
        - ``quadratic_variation``: sum_k ||A_{k+1} - A_k||^2.

        The increments are 0 when L = 1. Synchronises with the device once.

    Raises:
        ValueError: an empty sequence or a non-floating dtype.

    Example:
        >>> t = torch.arange(64) / 64
        >>> path_metrics(torch.sin(t))["quadratic_variation"] < 0.02
        True
    """
    if path.dim() < 1 or path.shape[0] < 1:
        raise ValueError(f"path must hold at least one layer, got shape {tuple(path.shape)}")
    if not path.is_floating_point():
        raise ValueError(f"path must be floating point, got {path.dtype}")
    flat = path.detach().reshape(path.shape[0], -1).double()
    norms = flat.norm(dim=1)
    steps = (flat[1:] - flat[:-1]).norm(dim=1)
    if len(steps) == 0:
        steps = norms.new_zeros(1)
    values = torch.stack(
        [
            norms.max(),
            norms.square().sum().sqrt(),
            steps.max(),
            steps.quantile(0.5),
            steps.square().sum(),
        ]
    ).tolist()
    return dict(zip(_METRICS, values))


_METRICS = ("max_norm", "rss", "max_increment", "median_increment", "quadratic_variation")


def fit_power_law(depths: Sequence[float], values: Sequence[float]) -> tuple[float, float]:
    """Least-squares fit of ``log value = c - exponent log L``: value ~ L^(-exponent).

    Args:
        depths: the depths L (positive), at least two distinct ones.
        values: the measured quantity at each depth (positive).

    Returns:
        (exponent, r2): the decay exponent (positive when the value shrinks with depth) and
        the coefficient of determination of the fit in log-log coordinates (1.0 when the
        values lie exactly on a power law). (nan, nan) when a value is not positive and
        finite or fewer than two distinct depths are given.

    Raises:
        ValueError: ``depths`` and ``values`` differ in length.

    Example:
        >>> fit_power_law([8, 16, 32], [1 / 8, 1 / 16, 1 / 32])[0]
        1.0
    """
    if len(depths) != len(values):
        raise ValueError(f"depths and values differ in length: {len(depths)} and {len(values)}")
    if len(set(depths)) < 2 or not all(v > 0 and math.isfinite(v) for v in values):
        return math.nan, math.nan
    x = [math.log(d) for d in depths]
    y = [math.log(v) for v in values]
    x_mean, y_mean = sum(x) / len(x), sum(y) / len(y)
    sxx = sum((a - x_mean) ** 2 for a in x)
    sxy = sum((a - x_mean) * (b - y_mean) for a, b in zip(x, y))
    slope = sxy / sxx
    residual = sum((b - y_mean - slope * (a - x_mean)) ** 2 for a, b in zip(x, y))
    total = sum((b - y_mean) ** 2 for b in y)
    r2 = 1.0 - residual / total if total > 0 else 1.0
    return -slope, r2


def classify_regime(increment_exponent: float, qv_exponent: float) -> str:
    """The regime that the decay exponents of a rescaled weight path point to.

    The exponents are those of ``L^beta A`` (the path with its overall scale removed): the
    typical increment ~ L^(-increment_exponent) and the quadratic variation
    ~ L^(-qv_exponent). Reference points: a smooth path gives (1, 1), a Brownian path
    (1/2, 0), a path independent from layer to layer (0, -1), and a smooth path with a few
    jumps (1, 0). The boundaries sit halfway between these, and both exponents must agree:

    - smooth (ODE-like): increment exponent >= 3/4 and quadratic variation exponent >= 1/2;
    - rough (SDE-like): increment exponent in [1/4, 3/4) and |qv exponent| < 1/2;
    - neither: anything else, jumps and layer-independent noise included.

    Args:
        increment_exponent: decay exponent of the typical (median) increment.
        qv_exponent: decay exponent of the quadratic variation.

    Returns:
        One of :data:`REGIMES`, or :data:`UNDETERMINED` when an exponent is nan (too few
        depths to fit).

    Example:
        >>> classify_regime(0.5, 0.0)
        'rough (SDE-like)'
    """
    if not (math.isfinite(increment_exponent) and math.isfinite(qv_exponent)):
        return UNDETERMINED
    if increment_exponent >= 0.75 and qv_exponent >= 0.5:
        return REGIMES[0]
    if 0.25 <= increment_exponent < 0.75 and -0.5 < qv_exponent < 0.5:
        return REGIMES[1]
    return REGIMES[2]


def scaling_summary(depths: Sequence[int], metrics: Sequence[dict[str, float]]) -> dict:
    """Fitted exponents and regime of weight paths measured at several depths.

    beta comes from the maximum norm, max_k ||A_k|| ~ L^(-beta). The increment and quadratic
    variation exponents are fitted on the raw weights and then shifted by beta and 2 beta, so
    that the regime is judged on ``L^beta A``: a path that only shrinks as a whole keeps its
    shape and must not look smoother for it. The regime reads the median increment and the
    quadratic variation; the largest increment is reported beside them, but one steep spot
    that deeper nets have not yet resolved would decide it alone.

    Args:
        depths: the depths L, one per entry of ``metrics``.
        metrics: :func:`path_metrics` of the weights at each depth.

    Returns:
        dict with ``beta`` and ``beta_r2`` (fit of the maximum norm), the decay exponents
        ``rss_exponent``, ``max_increment_exponent``, ``median_increment_exponent`` and
        ``qv_exponent`` of the raw weights with their ``_r2``, the ``relative_`` increment
        and quadratic variation exponents of ``L^beta A``, and ``regime``
        (:func:`classify_regime`).
    """
    beta, beta_r2 = fit_power_law(depths, [m["max_norm"] for m in metrics])
    summary = {"beta": beta, "beta_r2": beta_r2}
    for key, name in (
        ("rss", "rss"),
        ("max_increment", "max_increment"),
        ("median_increment", "median_increment"),
        ("quadratic_variation", "qv"),
    ):
        exponent, r2 = fit_power_law(depths, [m[key] for m in metrics])
        summary[f"{name}_exponent"], summary[f"{name}_r2"] = exponent, r2
    summary["relative_max_increment_exponent"] = summary["max_increment_exponent"] - beta
    summary["relative_median_increment_exponent"] = summary["median_increment_exponent"] - beta
    summary["relative_qv_exponent"] = summary["qv_exponent"] - 2 * beta
    summary["regime"] = classify_regime(
        summary["relative_median_increment_exponent"], summary["relative_qv_exponent"]
    )
    return summary


# ---------------------------------------------------------------------------------------------
# The network


class ScalingResNet(nn.Module):
    """Fully connected ResNet with embedding and readout, its residual weights kept as paths.

    Computes ``h_0 = E x + e``, ``h_{k+1} = h_k + delta sigma(A_k h_k + b_k)`` for
    k = 0, ..., L - 1, and ``R h_L + r``. The residual weights are stored as one tensor per
    kind, ``A`` [L, d, d] and ``b`` [L, d], so that they can be read as paths over the layer
    index.

    Args:
        in_features: size of the inputs x.
        out_features: size of the outputs (classes for classification).
        width: size d of the hidden state.
        depth: number L of residual layers (>= 1).
        activation: "tanh" or "relu".
        delta_exponent: a in delta = L^(-a); 1 is the neural ODE scaling, 0 a plain ResNet.
        init: "standard" draws every A_k and b_k independently from PyTorch's default for a
            Linear layer, U(-1/sqrt(d), 1/sqrt(d)); "smooth" makes every entry a random
            combination of cos(m pi t), m = 0, 1, 2, at t_k = (k + 1/2) / L, of about the same
            size: a discretised smooth function of t, as a neural ODE presumes.
        generator: source of the initial weights; None uses torch's global generator.

    Shapes:
        forward(x: Tensor[N, in_features]) -> Tensor[N, out_features].
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        width: int,
        depth: int,
        activation: str = "tanh",
        delta_exponent: float = 1.0,
        init: str = "standard",
        generator: torch.Generator | None = None,
    ):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
        if init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {init!r}")
        if min(in_features, out_features, width, depth) < 1:
            raise ValueError(
                "in_features, out_features, width and depth must be positive, got "
                f"{in_features}, {out_features}, {width} and {depth}"
            )
        self.depth, self.width = depth, width
        self.activation, self.delta_exponent, self.init = activation, delta_exponent, init
        self.delta = float(depth) ** -delta_exponent

        self.embed = nn.Linear(in_features, width)
        self.readout = nn.Linear(width, out_features)
        for layer in (self.embed, self.readout):
            bound = 1.0 / math.sqrt(layer.in_features)
            with torch.no_grad():
                layer.weight.copy_(_uniform(layer.weight.shape, bound, generator))
                layer.bias.copy_(_uniform(layer.bias.shape, bound, generator))

        bound = 1.0 / math.sqrt(width)
        if init == "standard":
            A = _uniform((depth, width, width), bound, generator)
            b = _uniform((depth, width), bound, generator)
        else:
            t = (torch.arange(depth, dtype=torch.float64) + 0.5) / depth
            basis = torch.stack([torch.cos(m * math.pi * t) for m in range(3)]).float()
            # Three coefficients of variance bound^2 / 6 give entries of variance about
            # bound^2 / 3, that of the standard draw, so both start at the same size.
            scale = bound / math.sqrt(2.0)
            A = torch.einsum("mk,mij->kij", basis, _uniform((3, width, width), scale, generator))
            b = torch.einsum("mk,mi->ki", basis, _uniform((3, width), scale, generator))
        self.A = nn.Parameter(A)
        self.b = nn.Parameter(b)

    def residual_parameters(self) -> list[nn.Parameter]:
        """The parameters multiplied by delta in the forward: ``[A, b]``."""
        return [self.A, self.b]

    def forward(self, x: Tensor) -> Tensor:
        """Apply the network.

        Args:
            x (Tensor[N, in_features], dtype of the parameters, float32 by default): inputs.

        Returns:
            Tensor[N, out_features]: outputs (logits for classification).
        """
        act = ACTIVATIONS[self.activation]
        h = self.embed(x)
        # unbind once: indexing A[k] inside the loop would make autograd write a full-size
        # zero gradient per layer, quadratic in depth.
        for A_k, b_k in zip(self.A.unbind(0), self.b.unbind(0)):
            h = h + self.delta * act(F.linear(h, A_k, b_k))
        return self.readout(h)

    def extra_repr(self) -> str:
        return (
            f"depth={self.depth}, width={self.width}, activation={self.activation!r}, "
            f"delta=L^-{self.delta_exponent:g}, init={self.init!r}"
        )


def _uniform(shape: Sequence[int], bound: float, generator: torch.Generator | None) -> Tensor:
    return (torch.rand(tuple(shape), generator=generator) * 2.0 - 1.0) * bound


# ---------------------------------------------------------------------------------------------
# Data


def ode_flow_data(
    samples: int,
    dim: int = 4,
    hidden: int = 16,
    time: float = 1.0,
    steps: int = 200,
    seed: int = 0,
) -> tuple[Tensor, Tensor]:
    """Regression pairs (x, phi(x)) where phi is the time-``time`` flow of a fixed ODE.

    The generator, all from one seeded ``torch.Generator``:

    - a vector field f(x) = W2 tanh(W1 x + b1) with W1 [hidden, dim] ~ N(0, 4 / dim),
      b1 [hidden] ~ N(0, 1/4) and W2 [dim, hidden] ~ N(0, 4 / hidden), strong enough that the
      flow is far from linear over unit time;
    - inputs x ~ N(0, I_dim);
    - targets phi(x), the solution at ``time`` of dx/dt = f(x) started at x, by ``steps``
      explicit Euler steps in float64 with deepkern's fused ``sde`` kernel at zero diffusion.
      The targets are this Euler solution; at the defaults it lies about 5e-3 from the exact
      flow on average (3e-2 at most, in 2000 samples).

    Args:
        samples: number of pairs.
        dim: dimension of x and of the targets.
        hidden: width of the vector field's hidden layer.
        time: length of the flow.
        steps: Euler steps.
        seed: seed of the field and of the inputs.

    Returns:
        (x, y): Tensor[samples, dim] float32 each.

    Raises:
        ValueError: a size that is not positive.
    """
    from deepkern.ops import sde

    if min(samples, dim, hidden, steps) < 1 or not time > 0:
        raise ValueError(
            "samples, dim, hidden, steps and time must be positive, got "
            f"{samples}, {dim}, {hidden}, {steps} and {time}"
        )
    generator = torch.Generator().manual_seed(seed)
    f64 = torch.float64
    W1 = torch.randn(hidden, dim, generator=generator, dtype=f64) * (2.0 / math.sqrt(dim))
    b1 = torch.randn(hidden, generator=generator, dtype=f64) * 0.5
    W2 = torch.randn(dim, hidden, generator=generator, dtype=f64) * (2.0 / math.sqrt(hidden))
    b2 = torch.zeros(dim, dtype=f64)
    x = torch.randn(samples, dim, generator=generator, dtype=f64)
    drift = sde.Drift.mlp(W1, b1, W2, b2, "tanh")
    # Zero diffusion: the Euler-Maruyama kernel is then the plain Euler scheme of the ODE,
    # and the seed of its normals does not matter.
    y = sde.simulate(x, torch.zeros((), dtype=f64), drift, h=time / steps, steps=steps, seed=0)
    return x.float(), y.float()


def load_task(
    task: str, seed: int, flow_samples: int = 1536, flow_test_fraction: float = 1 / 3
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Train and test sets of a task, as flat feature vectors.

    Args:
        task: "ode_flow" (:func:`ode_flow_data`, targets of dimension 4, mean squared error)
            or "digits" (scikit-learn's 8x8 digits flattened to 64 features, standardised, 10
            classes, cross-entropy).
        seed: seed of the data (the field and inputs, or the split).
        flow_samples: pairs generated for "ode_flow", split into train and test.
        flow_test_fraction: share of those pairs held out.

    Returns:
        (x_train, y_train, x_test, y_test): x as Tensor[N, F] float32; y as Tensor[N, 4]
        float32 for "ode_flow" and Tensor[N] int64 for "digits".

    Raises:
        ValueError: an unknown task.
    """
    if task == "ode_flow":
        x, y = ode_flow_data(flow_samples, seed=seed)
        n_test = max(1, int(round(flow_samples * flow_test_fraction)))
        return x[n_test:], y[n_test:], x[:n_test], y[:n_test]
    if task == "digits":
        from deepkern.data.images import load_digits_split

        x_train, y_train, x_test, y_test = load_digits_split(seed)
        return x_train.flatten(1), y_train, x_test.flatten(1), y_test
    raise ValueError(f"task must be one of {TASKS}, got {task!r}")


# ---------------------------------------------------------------------------------------------
# Training


@dataclass
class TrainConfig:
    """Settings of :func:`train`.

    Attributes:
        epochs: passes over the training set.
        batch_size: examples per step.
        lr: learning rate of SGD with momentum, constant.
        momentum: SGD momentum.
        weight_decay: L2 penalty of SGD.
        depth_scaled_lr: multiply the learning rate of ``A`` and ``b`` by 1 / delta. The
            forward multiplies each residual branch by delta, so its gradients carry delta
            too; without the factor a net of 512 layers would move its residual weights 512
            times less than one layer, and every depth would end near its initialisation.
        grad_clip: clip the gradient of the residual parameters where the root mean square
            over layers of its per-layer norms, after the depth scaling, passes this value:
            a threshold that means the same at every depth. None (the default) never clips.
        seed: seeds the order of the examples; the same seed and data give the same run.
        device: where to train, for example "cpu" or "cuda".
        checkpoint: file written atomically after every epoch; None writes none.
        resume: continue from ``checkpoint`` when that file exists.
        progress: show a tqdm bar over the epochs.
    """

    epochs: int = 20
    batch_size: int = 128
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 0.0
    depth_scaled_lr: bool = True
    grad_clip: float | None = None
    seed: int = 0
    device: str = "cpu"
    checkpoint: str | None = None
    resume: bool = False
    progress: bool = False

    def __post_init__(self):
        if self.epochs < 0:
            raise ValueError(f"epochs must be >= 0, got {self.epochs}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {self.batch_size}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be positive and finite, got {self.lr}")
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ValueError(f"grad_clip must be positive or None, got {self.grad_clip}")
        if self.resume and not self.checkpoint:
            raise ValueError("resume needs a checkpoint path")


class TrainingDiverged(ValueError):
    """The training loss stopped being finite."""


def _loss(outputs: Tensor, targets: Tensor) -> Tensor:
    # Integer targets are class labels; floating-point targets are regression values.
    if targets.dtype == torch.int64:
        return F.cross_entropy(outputs, targets)
    return F.mse_loss(outputs, targets)


@torch.no_grad()
def evaluate(model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 1024) -> dict:
    """Mean loss of ``model`` on (x, y), and accuracy when y holds class labels.

    Args:
        model: the network, on the device of ``x``.
        x (Tensor[N, F], floating point): inputs.
        y (Tensor[N] int64 labels, or Tensor[N, D] floating-point targets).
        batch_size: examples per forward pass.

    Returns:
        dict with ``loss`` (cross-entropy or mean squared error per element) and, for labels,
        ``accuracy`` in [0, 1]. Synchronises with the device.
    """
    total, correct = 0.0, 0
    for start in range(0, len(x), batch_size):
        out = model(x[start : start + batch_size])
        target = y[start : start + batch_size]
        total += float(_loss(out, target)) * len(target)
        if y.dtype == torch.int64:
            correct += int((out.argmax(1) == target).sum())
    result = {"loss": total / max(1, len(x))}
    if y.dtype == torch.int64:
        result["accuracy"] = correct / max(1, len(x))
    return result


def _optimizer(model: ScalingResNet, config: TrainConfig) -> torch.optim.Optimizer:
    residual = model.residual_parameters()
    residual_ids = {id(p) for p in residual}
    others = [p for p in model.parameters() if id(p) not in residual_ids]
    scale = 1.0 / model.delta if config.depth_scaled_lr else 1.0
    groups = [{"params": others, "lr": config.lr}, {"params": residual, "lr": config.lr * scale}]
    return torch.optim.SGD(
        groups, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay
    )


def train(
    model: ScalingResNet,
    config: TrainConfig,
    train_data: tuple[Tensor, Tensor],
    test_data: tuple[Tensor, Tensor] | None = None,
    name: str = "scaling",
) -> dict:
    """Train ``model`` with SGD, checkpointing after every epoch.

    Classification when the targets are int64 labels (cross-entropy), regression otherwise
    (mean squared error). The order of the examples in epoch e comes from a generator seeded
    with (seed, e), so a run resumed from its checkpoint continues exactly as the
    uninterrupted run would have.

    Args:
        model: the network; trained in place and moved to ``config.device``.
        config: the settings.
        train_data: (x [N, F], y [N] int64 or [N, D] float).
        test_data: the same for testing, or None.
        name: label of the progress bar and of the log lines.

    Returns:
        dict with ``initial_train_loss`` and ``train_loss`` (full training set, before and
        after), ``test_loss`` and ``test_accuracy`` (None without test data or labels),
        ``epochs``, ``steps``, ``seconds`` (this call), ``resumed_from_epoch`` and
        ``history`` (per epoch: ``epoch``, ``loss``, the mean training loss over its steps).

    Raises:
        ValueError: data of mismatched sizes.
        TrainingDiverged: a non-finite training loss (a ValueError; the step size is too large
            for this depth and width, or the forward overflows).
        ImportError: progress bars asked for without tqdm installed.
    """
    x_train, y_train = (t.to(config.device) for t in train_data)
    if len(x_train) != len(y_train) or len(x_train) == 0:
        raise ValueError(f"train_data holds {len(x_train)} inputs and {len(y_train)} targets")
    model.to(config.device)
    optimizer = _optimizer(model, config)
    started = time.perf_counter()

    start_epoch, history = 0, []
    if config.resume and os.path.exists(config.checkpoint):
        state = torch.load(config.checkpoint, map_location=config.device, weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start_epoch, history = int(state["epoch"]), list(state["history"])
        initial = float(state["initial_train_loss"])
        if int(state["epochs"]) != config.epochs:
            logger.warning(
                "%s: checkpoint %s was written for %d epochs, training for %d",
                name,
                config.checkpoint,
                int(state["epochs"]),
                config.epochs,
            )
        logger.info("%s: resumed from %s after epoch %d", name, config.checkpoint, start_epoch)
    else:
        initial = evaluate(model, x_train, y_train)["loss"]

    steps = 0
    bar = progress_bar(config.epochs - start_epoch, name, config.progress, leave=False)
    try:
        for epoch in range(start_epoch, config.epochs):
            order = torch.randperm(
                len(x_train), generator=torch.Generator().manual_seed(config.seed * 100003 + epoch)
            ).to(config.device)
            total = torch.zeros((), dtype=torch.float64, device=config.device)
            batches = 0
            for start in range(0, len(order), config.batch_size):
                index = order[start : start + config.batch_size]
                loss = _loss(model(x_train[index]), y_train[index])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if config.grad_clip is not None:
                    _clip_residual(model, config)
                optimizer.step()
                total += loss.detach().double()
                batches += 1
            steps += batches
            mean = float(total) / batches
            if not math.isfinite(mean):
                raise TrainingDiverged(
                    f"{name}: the training loss became {mean} in epoch {epoch + 1}; lower the "
                    "learning rate or the gradient clip"
                )
            history.append({"epoch": epoch + 1, "loss": mean})
            logger.debug("%s: epoch %d/%d loss %.5f", name, epoch + 1, config.epochs, mean)
            if config.checkpoint:
                state = {
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "epoch": epoch + 1,
                    "epochs": config.epochs,
                    "history": history,
                    "initial_train_loss": initial,
                }
                save_atomic(state, config.checkpoint)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{mean:.4f}")
    finally:
        if bar is not None:
            bar.close()

    result = {
        "initial_train_loss": initial,
        "train_loss": evaluate(model, x_train, y_train)["loss"],
        "test_loss": None,
        "test_accuracy": None,
        "epochs": config.epochs,
        "steps": steps,
        "seconds": time.perf_counter() - started,
        "resumed_from_epoch": start_epoch,
        "history": history,
    }
    if test_data is not None:
        x_test, y_test = (t.to(config.device) for t in test_data)
        measured = evaluate(model, x_test, y_test)
        result["test_loss"] = measured["loss"]
        result["test_accuracy"] = measured.get("accuracy")
    logger.info(
        "%s: train loss %.4f -> %.4f in %.1f s",
        name,
        result["initial_train_loss"],
        result["train_loss"],
        result["seconds"],
    )
    return result


def _clip_residual(model: ScalingResNet, config: TrainConfig) -> None:
    # The raw gradient of each layer carries the factor delta, and the total norm sums L
    # layers: dividing by delta and by sqrt(L) gives the root mean square per layer, whose
    # size does not depend on the depth, so one threshold suits every depth.
    scale = 1.0 / model.delta if config.depth_scaled_lr else 1.0
    limit = config.grad_clip * math.sqrt(model.depth) / scale
    torch.nn.utils.clip_grad_norm_(model.residual_parameters(), limit)


# ---------------------------------------------------------------------------------------------
# The study


@dataclass
class StudyConfig:
    """What :func:`run_study` trains and measures.

    Attributes:
        depths: the depths L (at least two distinct ones, each >= 2).
        tasks: data sets, from :data:`TASKS`.
        activations: from :data:`ACTIVATIONS`.
        inits: initialisations, from :data:`INITS`.
        width: size d of the hidden state.
        delta_exponent: a in delta = L^(-a).
        epochs, batch_size, lr, momentum, weight_decay, depth_scaled_lr, grad_clip: training,
            as in :class:`TrainConfig`.
        seed: seed of the data, of the initial weights and of the order of the examples.
        flow_samples: pairs of the ODE flow task (a third held out for testing).
        entries: the (row, column) entries of A_k drawn as paths.
        device: where to train.
        checkpoint_dir: one checkpoint per network here; None writes none.
        resume: continue from (or skip networks finished in) ``checkpoint_dir``.
        progress: a tqdm bar over the networks.
    """

    depths: tuple[int, ...] = (8, 16, 32, 64, 128, 256, 512)
    tasks: tuple[str, ...] = TASKS
    activations: tuple[str, ...] = ("tanh", "relu")
    inits: tuple[str, ...] = INITS
    width: int = 16
    delta_exponent: float = 1.0
    epochs: int = 20
    batch_size: int = 128
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 0.0
    depth_scaled_lr: bool = True
    grad_clip: float | None = None
    seed: int = 0
    flow_samples: int = 1536
    entries: tuple[tuple[int, int], ...] = ((0, 0), (0, 1), (1, 0))
    device: str = "cpu"
    checkpoint_dir: str | None = None
    resume: bool = False
    progress: bool = False

    def __post_init__(self):
        self.depths = tuple(int(d) for d in self.depths)
        self.entries = tuple((int(i), int(j)) for i, j in self.entries)
        if len(set(self.depths)) < 2 or min(self.depths) < 2:
            raise ValueError(f"depths must hold two distinct depths >= 2, got {self.depths}")
        for name, values, allowed in (
            ("tasks", self.tasks, TASKS),
            ("activations", self.activations, tuple(ACTIVATIONS)),
            ("inits", self.inits, INITS),
        ):
            if not values or any(v not in allowed for v in values):
                raise ValueError(f"{name} must be a non-empty subset of {allowed}, got {values}")
        if self.width < 2:
            raise ValueError(f"width must be >= 2, got {self.width}")
        if any(not (0 <= i < self.width and 0 <= j < self.width) for i, j in self.entries):
            raise ValueError(f"entries must lie inside a {self.width}x{self.width} matrix")
        if self.resume and not self.checkpoint_dir:
            raise ValueError("resume needs a checkpoint directory")
        self.train_config()  # checks the training settings now, before any network trains

    def train_config(self, checkpoint: str | None = None) -> TrainConfig:
        """The :class:`TrainConfig` of one network of the study."""
        return TrainConfig(
            epochs=self.epochs,
            batch_size=self.batch_size,
            lr=self.lr,
            momentum=self.momentum,
            weight_decay=self.weight_decay,
            depth_scaled_lr=self.depth_scaled_lr,
            grad_clip=self.grad_clip,
            seed=self.seed,
            device=self.device,
            checkpoint=checkpoint,
            resume=self.resume and checkpoint is not None,
            progress=False,
        )


def _setting_name(task: str, activation: str, init: str) -> str:
    return f"{task}/{activation}/{init}"


def run_study(config: StudyConfig) -> dict:
    """Train one network per setting and depth, measure its weight paths, fit the scaling.

    A setting is a (task, activation, init) triple. For each depth the network is built from
    the same seed, trained, and its ``A`` measured with :func:`path_metrics`, both as trained
    (``weights``) and as the change made by training (``update``, trained minus initial).

    Args:
        config: the study.

    Returns:
        dict with ``config`` (as a dict), ``settings`` (one dict per setting: ``task``,
        ``activation``, ``init``, ``name``, ``rows`` with per depth ``depth``, ``diverged``,
        ``weights``, ``update``, ``training`` (from :func:`train`) and ``paths`` (entry label
        -> list of A_k[i, j] over k), and ``fit`` with the :func:`scaling_summary` of
        ``weights`` and of ``update``), and ``seconds``. A depth whose training diverged
        keeps only ``depth``, ``diverged`` (True) and ``error``, and stays out of the fits.
    """
    started = time.perf_counter()
    data = {task: load_task(task, config.seed, config.flow_samples) for task in config.tasks}
    combos = [(t, a, i) for t in config.tasks for a in config.activations for i in config.inits]
    bar = progress_bar(
        len(combos) * len(config.depths), "scaling study", config.progress, leave=False
    )
    settings = []
    try:
        for task, activation, init in combos:
            name = _setting_name(task, activation, init)
            rows = []
            for depth in config.depths:
                try:
                    rows.append(_run_one(config, data[task], task, activation, init, depth))
                except TrainingDiverged as error:
                    # One diverged depth (a plain ResNet with ReLU blows up as it deepens)
                    # should not cost the rest of the study: it is kept out of the fits.
                    logger.warning("%s", error)
                    rows.append({"depth": depth, "diverged": True, "error": str(error)})
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(setting=name, depth=depth)
            done = [row for row in rows if not row["diverged"]]
            fit = {
                view: scaling_summary([row["depth"] for row in done], [row[view] for row in done])
                for view in ("weights", "update")
            }
            settings.append(
                {
                    "task": task,
                    "activation": activation,
                    "init": init,
                    "name": name,
                    "rows": rows,
                    "fit": fit,
                }
            )
            logger.info(
                "%s: beta %.3f, regime %s", name, fit["weights"]["beta"], fit["weights"]["regime"]
            )
    finally:
        if bar is not None:
            bar.close()
    return {
        "config": dataclasses.asdict(config),
        "settings": settings,
        "seconds": time.perf_counter() - started,
    }


def _run_one(config: StudyConfig, data, task: str, activation: str, init: str, depth: int):
    x_train, y_train, x_test, y_test = data
    out_features = int(y_train.max()) + 1 if y_train.dtype == torch.int64 else y_train.shape[1]
    model = ScalingResNet(
        x_train.shape[1],
        out_features,
        config.width,
        depth,
        activation,
        config.delta_exponent,
        init,
        torch.Generator().manual_seed(config.seed),
    )
    initial = model.A.detach().clone()
    checkpoint = None
    if config.checkpoint_dir:
        checkpoint = os.path.join(config.checkpoint_dir, f"{task}-{activation}-{init}-L{depth}.pt")
    name = f"{_setting_name(task, activation, init)} L={depth}"
    training = train(
        model, config.train_config(checkpoint), (x_train, y_train), (x_test, y_test), name
    )
    A = model.A.detach().cpu()
    return {
        "depth": depth,
        "diverged": False,
        "weights": path_metrics(A),
        "update": path_metrics(A - initial),
        "training": training,
        "paths": {f"A[{i},{j}]": A[:, i, j].tolist() for i, j in config.entries},
    }


# ---------------------------------------------------------------------------------------------
# Plots


def _figure(width: float, height: float):
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as error:
        raise ImportError("the plots need matplotlib: pip install deepkern[models]") from error
    # A Figure with its own Agg canvas: no pyplot, no global backend switch, no display.
    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def plot_weight_paths(results: dict, path: str) -> None:
    """Draw the chosen entries of A_k against k / L, one panel per setting and entry.

    Args:
        results: the output of :func:`run_study`.
        path: the PNG file to write.
    """
    settings = results["settings"]
    labels = [f"A[{i},{j}]" for i, j in results["config"]["entries"]]
    figure = _figure(3.6 * len(labels), 2.4 * len(settings))
    axes = figure.subplots(len(settings), len(labels), squeeze=False)
    colours = _colours(len(results["config"]["depths"]))
    for r, setting in enumerate(settings):
        for c, label in enumerate(labels):
            ax = axes[r][c]
            for colour, row in zip(colours, setting["rows"]):
                if row["diverged"]:
                    continue
                values = row["paths"][label]
                t = [(k + 0.5) / len(values) for k in range(len(values))]
                ax.plot(t, values, color=colour, linewidth=0.8, label=f"L={row['depth']}")
            ax.set_title(f"{setting['name']}: {label}", fontsize=9)
            ax.set_xlabel("k / L", fontsize=8)
            ax.tick_params(labelsize=7)
    for ax in axes.flat:
        if ax.get_legend_handles_labels()[0]:  # the first panel with a finished depth
            ax.legend(fontsize=6, ncol=2)
            break
    figure.savefig(path, dpi=110)


def plot_scaling(results: dict, path: str) -> None:
    """Log-log plots of the maximum norm, median increment and quadratic variation against L.

    Grey dashed lines mark the reference slopes: L^-1 and L^-1/2 for the increments (smooth
    and Brownian paths), L^-1, L^0 and L^1 for the quadratic variation (smooth, Brownian and
    layer-independent paths).

    Args:
        results: the output of :func:`run_study`.
        path: the PNG file to write.
    """
    figure = _figure(14, 4.2)
    axes = figure.subplots(1, 3)
    panels = (
        ("max_norm", "max_k ||A_k||", ()),
        ("median_increment", "median_k ||A_{k+1} - A_k||", (-1.0, -0.5)),
        ("quadratic_variation", "sum_k ||A_{k+1} - A_k||^2", (-1.0, 0.0, 1.0)),
    )
    colours = _colours(len(results["settings"]), "tab10")
    low, high = min(results["config"]["depths"]), max(results["config"]["depths"])
    for ax, (key, title, slopes) in zip(axes, panels):
        values = []
        for colour, setting in zip(colours, results["settings"]):
            rows = [row for row in setting["rows"] if not row["diverged"]]
            depths = [row["depth"] for row in rows]
            ys = [row["weights"][key] for row in rows]
            ax.loglog(depths, ys, marker="o", color=colour, label=setting["name"])
            values += [y for y in ys if y > 0]
        # Reference slopes drawn through the geometric middle of the plotted values.
        middle = math.exp(sum(map(math.log, values)) / len(values)) if values else 1.0
        centre = math.sqrt(low * high)
        for slope in slopes:
            ends = [middle * (d / centre) ** slope for d in (low, high)]
            ax.loglog([low, high], ends, "--", color="0.6", linewidth=0.8)
            ax.annotate(
                f"L^{slope:g}", (high, ends[1]), fontsize=7, color="0.4", ha="right", va="bottom"
            )
        ax.set_xlabel("depth L")
        ax.set_title(title, fontsize=10)
    axes[0].legend(fontsize=7)
    figure.savefig(path, dpi=110)


def _colours(n: int, name: str = "viridis") -> list:
    from matplotlib import colormaps

    cmap = colormaps[name]
    if name == "tab10":
        return [cmap(i % 10) for i in range(n)]
    return [cmap(i / max(1, n - 1) * 0.9) for i in range(n)]


# ---------------------------------------------------------------------------------------------
# The command

# CPU size: 8 settings x 7 depths, 56 networks, about 2.5 minutes on one core. Full size: a
# GPU run of 64 networks, not timed here.
_DEFAULTS = {
    "depths": (8, 16, 32, 64, 128, 256, 512),
    "width": 16,
    "epochs": 20,
    "batch_size": 128,
    "lr": 0.05,
    "flow_samples": 1536,
    "device": "cpu",
}
_FULL = {
    "depths": (8, 16, 32, 64, 128, 256, 512, 1024),
    "width": 64,
    "epochs": 100,
    "batch_size": 256,
    "lr": 0.05,
    "flow_samples": 12288,
    "device": "cuda",
}


def add_reproduce_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``deepkern reproduce scaling``.

    By default the study runs on a CPU in a few minutes: depths 8, 16, ..., 512, width 16,
    20 epochs, both tasks, tanh and ReLU, standard and smooth initialisation (8 settings, 56
    networks). ``--full`` selects the GPU size: depths 8, ..., 1024, width 64, 100 epochs,
    12288 flow pairs, batch 256, on cuda. Any option given explicitly overrides either size.
    """
    d, f = _DEFAULTS, _FULL
    parser.description = (
        "Depth scaling of trained ResNet weights (Cohen et al. 2021): train fully connected "
        "ResNets h_{k+1} = h_k + L^-a sigma(A_k h_k + b_k) at depths 8 ... 512 on an ODE-flow "
        "regression task and on scikit-learn's digits, measure the weights A_k as paths over "
        "k/L (maximum norm, root sum of squares, largest increment, quadratic variation), fit "
        "beta in max norm ~ L^-beta, and classify each setting as smooth (ODE-like), rough "
        "(SDE-like) or neither. Writes results.json, weights.png and scaling.png to --out."
    )
    parser.add_argument(
        "--full",
        action="store_true",
        help="GPU size: depths to 1024, width 64, 100 epochs, 12288 flow pairs, cuda",
    )
    parser.add_argument(
        "--depths",
        type=int,
        nargs="+",
        help="depths L (default " + " ".join(map(str, d["depths"])) + "; --full adds 1024)",
    )
    parser.add_argument("--tasks", nargs="+", choices=TASKS, help="data sets (default both)")
    parser.add_argument(
        "--activations", nargs="+", choices=sorted(ACTIVATIONS), help="default tanh and relu"
    )
    parser.add_argument("--inits", nargs="+", choices=INITS, help="default standard and smooth")
    parser.add_argument(
        "--width", type=int, help=f"hidden size (default {d['width']}, --full {f['width']})"
    )
    parser.add_argument(
        "--epochs", type=int, help=f"epochs (default {d['epochs']}, --full {f['epochs']})"
    )
    parser.add_argument(
        "--batch-size", type=int, help=f"examples per step (default {d['batch_size']})"
    )
    parser.add_argument("--lr", type=float, help=f"SGD learning rate (default {d['lr']})")
    parser.add_argument(
        "--delta-exponent",
        type=float,
        default=1.0,
        help="a in delta = L^-a (default 1, the neural ODE scaling; 0 is a plain ResNet)",
    )
    parser.add_argument(
        "--flow-samples", type=int, help=f"ODE-flow pairs (default {d['flow_samples']})"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of everything (default 0)")
    parser.add_argument("--device", help="cpu, cuda or cuda:N (default cpu; --full cuda)")
    parser.add_argument(
        "--threads", type=int, help="CPU threads of PyTorch (default 1: the matrices are small)"
    )
    parser.add_argument("--checkpoint-dir", help="one checkpoint per network, written each epoch")
    parser.add_argument("--resume", action="store_true", help="continue from the checkpoints")
    parser.add_argument(
        "--out", default="deepkern-out/scaling", help="folder for results.json and the plots"
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def _study_config(args: argparse.Namespace) -> StudyConfig:
    sizes = dict(_FULL if getattr(args, "full", False) else _DEFAULTS)
    for key in sizes:
        value = getattr(args, key, None)
        if value is not None:
            sizes[key] = tuple(value) if isinstance(value, list) else value
    if sizes["device"].startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {sizes['device']}: no CUDA device is available")
    threads = getattr(args, "threads", None)
    if threads is None and not sizes["device"].startswith("cuda"):
        # 16x16 matrices are too small to split across threads: measured on two busy cores,
        # a second thread made each training step about ten times slower.
        threads = 1
    if threads is not None:
        if threads < 1:
            raise ValueError(f"--threads must be positive, got {threads}")
        torch.set_num_threads(threads)
    optional = {}
    for key in ("tasks", "activations", "inits"):
        if getattr(args, key, None):
            optional[key] = tuple(getattr(args, key))
    return StudyConfig(
        **sizes,
        **optional,
        delta_exponent=getattr(args, "delta_exponent", 1.0),
        seed=getattr(args, "seed", 0),
        checkpoint_dir=getattr(args, "checkpoint_dir", None),
        resume=getattr(args, "resume", False),
        progress=not getattr(args, "no_progress", False),
    )


def _fmt(value: float | None, spec: str) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return format(value, spec)


def _power(decay: float) -> str:
    # Decay exponents are printed as the power of L they stand for: 0.5 reads L^-0.50.
    return f"L^{_fmt(-decay, '+.2f')}" if math.isfinite(decay) else "n/a"


def _results_table(results: dict) -> str:
    name_width = max(len(s["name"]) for s in results["settings"])
    header = (
        f"{'setting':<{name_width}} | {'L':>4} | {'max norm':>8} | {'RSS':>7} | "
        f"{'max incr':>8} | {'med incr':>8} | {'QV':>9} | {'test':>7} | {'beta':>6} | regime"
    )
    lines = [header, "-" * (len(header) + 12)]
    for setting in results["settings"]:
        fit = setting["fit"]["weights"]
        for row in setting["rows"]:
            if row["diverged"]:
                lines.append(
                    f"{setting['name']:<{name_width}} | {row['depth']:>4} | training diverged: "
                    "the loss stopped being finite; left out of the fit"
                )
                continue
            w, tr = row["weights"], row["training"]
            if tr["test_accuracy"] is not None:
                test = f"{100 * tr['test_accuracy']:.1f}%"
            else:
                test = _fmt(tr["test_loss"], ".4f")
            lines.append(
                f"{setting['name']:<{name_width}} | {row['depth']:>4} | {w['max_norm']:>8.3f} | "
                f"{w['rss']:>7.2f} | {w['max_increment']:>8.4f} | "
                f"{w['median_increment']:>8.4f} | {w['quadratic_variation']:>9.4g} | "
                f"{test:>7} | {_fmt(fit['beta'], '.3f'):>6} | {fit['regime']}"
            )
        update = setting["fit"]["update"]
        pad = " " * (name_width + 3)
        lines.append(
            f"{pad}evidence, L^beta A: beta {_fmt(fit['beta'], '.2f')} (R^2 "
            f"{_fmt(fit['beta_r2'], '.2f')}); median increment ~ "
            f"{_power(fit['relative_median_increment_exponent'])}, largest ~ "
            f"{_power(fit['relative_max_increment_exponent'])}, QV ~ "
            f"{_power(fit['relative_qv_exponent'])}"
        )
        lines.append(
            f"{pad}change made by training, A - A_init: {update['regime']}; median increment ~ "
            f"{_power(update['relative_median_increment_exponent'])}, QV ~ "
            f"{_power(update['relative_qv_exponent'])}"
        )
    lines.append(
        "test: accuracy for digits, mean squared error for ode_flow. The regime reads L^beta A: "
        "smooth: median increment ~ L^-1 and QV -> 0; rough: median increment ~ L^-1/2 and QV "
        "of order 1; boundaries halfway (3/4 and 1/4 for increments, +-1/2 for QV)."
    )
    return "\n".join(lines)


def _comparison(results: dict) -> str:
    settings = results["settings"]
    regimes = {
        r: [s["name"] for s in settings if s["fit"]["weights"]["regime"] == r] for r in REGIMES
    }
    by_activation = {}
    for s in settings:
        by_activation.setdefault(s["activation"], []).append(s["fit"]["weights"]["regime"])
    betas = [s["fit"]["weights"]["beta"] for s in settings]
    finite = [b for b in betas if math.isfinite(b)]
    ours = [
        f"smooth (ODE-like) in {len(regimes[REGIMES[0]])} of {len(settings)} settings",
        "; ".join(
            f"{act}: " + ", ".join(f"{regimes_.count(r)} {r.split(' ')[0]}" for r in REGIMES)
            for act, regimes_ in by_activation.items()
        ),
        "beta from " + (f"{min(finite):.2f} to {max(finite):.2f}" if finite else "n/a"),
    ]
    lines = ["Cohen et al. (2021), abstract and method, beside this run:"]
    for claim, mine in zip(PAPER_FINDINGS, ours):
        lines.append(f"  paper: {claim}")
        lines.append(f"  ours:  {mine}")
    return "\n".join(lines)


def run_reproduce(args: argparse.Namespace) -> int:
    """``deepkern reproduce scaling``: run the study, print the table, write JSON and plots.

    Returns:
        0 on success.
    """
    config = _study_config(args)
    os.makedirs(args.out, exist_ok=True)
    n_settings = len(config.tasks) * len(config.activations) * len(config.inits)
    print(
        f"{n_settings} settings x depths {', '.join(map(str, config.depths))}: width "
        f"{config.width}, delta = L^-{config.delta_exponent:g}, {config.epochs} epochs of SGD "
        f"(lr {config.lr}, residual lr x 1/delta) on {config.device}"
    )
    results = run_study(config)
    print(_results_table(results))
    print()
    print(_comparison(results))

    json_path = os.path.join(args.out, "results.json")
    weights_path = os.path.join(args.out, "weights.png")
    scaling_path = os.path.join(args.out, "scaling.png")
    results["paper"] = {
        "reference": "Cohen, Cont, Rossier and Xu, Scaling properties of deep residual "
        "networks, ICML 2021",
        "findings": list(PAPER_FINDINGS),
    }
    results["environment"] = environment(config.device)
    write_json(json_path, results, indent=1)
    plot_weight_paths(results, weights_path)
    plot_scaling(results, scaling_path)
    print(f"\nwrote {json_path}, {weights_path} and {scaling_path} ({results['seconds']:.0f} s)")
    return 0
