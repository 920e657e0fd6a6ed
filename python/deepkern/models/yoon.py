"""GNN inference in graphical models (Yoon, Liao, Xiong, Zhang, Fetaya, Urtasun, Zemel and
Pitkow, 2018): graph neural networks trained to output the marginals of binary MRFs.

Two recurrent message-passing networks read a binary pairwise MRF
(:mod:`deepkern.data.graphical_models`: spins +-1, couplings J, biases b) and predict each
node's marginal:

- :class:`NodeGNN`: a hidden state per variable. Each step, every directed edge i -> j sends
  ``MLP(h_i, h_j, J_ij, b_i, b_j)``; a node sums what it receives and updates its state with
  a GRU; an MLP reads the marginal out of the final state.
- :class:`MessageGNN`: a hidden state per directed edge, as loopy BP keeps one message per
  direction. Message i -> j listens to the messages k -> i entering its source, except the
  reverse one j -> i (non-backtracking, the BP rule: :func:`message_adjacency`); it sums
  ``MLP(h_{k->i}, h_{i->j}, features of i -> j)`` over them and updates with a GRU. A node's
  marginal is read out of the sum of its incoming messages.

Both share their weights across steps, so they run on graphs of any size. They are trained
on n = 9 by the KL divergence from the exact marginals, and compared with loopy belief
propagation (:func:`deepkern.ops.graph.reference_loopy_bp`, or the compiled ``loopy_bp``
when the extension provides it) on n = 9, on n = 16 and on families held out of training:
``deepkern reproduce yoon``.
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

from deepkern.data.graphical_models import (
    FAMILIES,
    LOOPY_FAMILIES,
    MAX_EXACT_NODES,
    MIN_NODES,
    MRFBatch,
    sample_mrfs,
)
from deepkern.models.training import (
    SilentBar,
    data_parallel,
    environment,
    process_group,
    progress_bar,
    rank_and_world,
    save_on_first_rank,
    settings_from_arguments,
    write_json,
)

__all__ = [
    "NodeGNN",
    "MessageGNN",
    "message_adjacency",
    "marginal_errors",
    "bp_marginals",
    "TrainConfig",
    "train",
    "predict",
    "evaluate",
    "build_model",
    "kl_loss",
    "add_reproduce_arguments",
    "run_reproduce",
]

logger = logging.getLogger("deepkern.models.yoon")

MODELS = ("node", "message")


# ---------------------------------------------------------------------------------------------
# Features, adjacency and belief propagation


def _edge_features(batch: MRFBatch, dtype: torch.dtype) -> Tensor:
    """Tensor[E, 3]: (J_e, b_src, b_dst) of each directed edge."""
    return torch.stack(
        [batch.edge_coupling, batch.bias[batch.src], batch.bias[batch.dst]], dim=1
    ).to(dtype)


def message_adjacency(src: Tensor, dst: Tensor, reverse: Tensor) -> tuple[Tensor, Tensor]:
    """The non-backtracking neighbourhood of directed edges.

    Edge e = (i -> j) receives from every edge e' = (k -> i) that enters its source, except
    its own reverse (j -> i): the edges whose messages BP combines to update the message e.

    Args:
        src, dst, reverse (Tensor[E], int64): directed edges and each one's opposite.

    Returns:
        (from_edge, to_edge), two Tensor[P] int64: the pairs e' -> e, grouped by ``to_edge``
        in increasing order, and by ``from_edge`` in increasing order within a group.

    Example:
        On the path 0 - 1 - 2 with edges 0: 0->1, 1: 1->0, 2: 1->2, 3: 2->1 the only pairs
        are 0 -> 2 (0->1 feeds 1->2) and 3 -> 1 (2->1 feeds 1->0).
    """
    edges = src.numel()
    nodes = int(torch.maximum(src.max(), dst.max())) + 1 if edges else 0
    order = torch.argsort(dst, stable=True)  # incoming edges, grouped by their head
    indegree = torch.bincount(dst, minlength=nodes)
    rowptr = torch.cat([indegree.new_zeros(1), indegree.cumsum(0)])

    counts = indegree[src]
    to_edge = torch.repeat_interleave(torch.arange(edges, device=src.device), counts)
    first = torch.repeat_interleave(rowptr[src], counts)
    group_start = torch.repeat_interleave(counts.cumsum(0) - counts, counts)
    offset = torch.arange(to_edge.numel(), device=src.device) - group_start
    from_edge = order[first + offset]
    keep = from_edge != reverse[to_edge]
    return from_edge[keep], to_edge[keep]


def _run_bp(
    batch: MRFBatch, damping: float = 0.5, max_iters: int = 200, tol: float = 1e-6
) -> tuple[Tensor, Tensor, Tensor]:
    """Loopy sum-product BP on the batch; the compiled kernel when there is one."""
    from deepkern.ops import graph

    loopy_bp = getattr(graph, "loopy_bp", graph.reference_loopy_bp)
    result = loopy_bp(
        batch.unary(),
        batch.pairwise(),
        batch.src,
        batch.dst,
        batch.reverse,
        batch.node_graph,
        batch.num_graphs,
        mode="sum",
        damping=damping,
        tol=tol,
        max_iters=max_iters,
    )
    return result.log_marginals.exp(), result.iterations, result.converged


def bp_marginals(
    batch: MRFBatch, damping: float = 0.5, max_iters: int = 200, tol: float = 1e-6
) -> dict:
    """Marginals of loopy BP (flooding schedule, log domain).

    Args:
        batch: the models.
        damping (float in [0, 1)): share of the old message kept at each update.
        max_iters (int >= 0): iteration cap.
        tol (float >= 0): convergence threshold on the largest change of a log-message.

    Returns:
        dict with ``marginals`` (Tensor[V, 2]), ``iterations`` (Tensor[G]) and ``converged``
        (Tensor[G] bool).
    """
    marginals, iterations, converged = _run_bp(batch, damping, max_iters, tol)
    return {"marginals": marginals, "iterations": iterations, "converged": converged}


def marginal_errors(predicted: Tensor, exact: Tensor) -> tuple[Tensor, Tensor]:
    """Per-node KL(exact || predicted) and absolute error of p(x = +1).

    Args:
        predicted, exact (Tensor[V, 2]): marginals (rows sum to 1).

    Returns:
        (kl, mae), two Tensor[V] in float64. Predicted probabilities are clamped at 1e-12 so
        that a confident wrong answer gives a large, finite KL.
    """
    exact, predicted = exact.double(), predicted.double()
    kl = (torch.xlogy(exact, exact) - exact * predicted.clamp_min(1e-12).log()).sum(1)
    return kl, (predicted[:, 1] - exact[:, 1]).abs()


# ---------------------------------------------------------------------------------------------
# Networks


def _mlp(inputs: int, hidden: int, outputs: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(inputs, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
        nn.Linear(hidden, outputs),
    )  # fmt: skip


class NodeGNN(nn.Module):
    """Node-based GNN: one hidden state per variable, sum aggregation, GRU update.

    Args:
        hidden (int >= 1): size of the node states and of the MLPs' hidden layers.
        steps (int >= 1): message-passing steps (weights shared across steps).

    Shapes:
        forward(batch: MRFBatch) -> Tensor[V, 2], log-marginals of the spins -1 and +1.
    """

    def __init__(self, hidden: int = 64, steps: int = 10):
        super().__init__()
        if hidden < 1 or steps < 1:
            raise ValueError(f"hidden and steps must be at least 1, got {hidden}, {steps}")
        self.hidden, self.steps = hidden, steps
        self.encode = nn.Linear(1, hidden)
        self.message = _mlp(2 * hidden + 3, hidden, hidden)
        self.update = nn.GRUCell(hidden + 1, hidden)
        self.readout = _mlp(hidden + 1, hidden, 2)

    def forward(self, batch: MRFBatch) -> Tensor:
        dtype = self.encode.weight.dtype
        bias = batch.bias.to(dtype)[:, None]
        edge = _edge_features(batch, dtype)
        state = torch.tanh(self.encode(bias))
        for _ in range(self.steps):
            sent = self.message(torch.cat([state[batch.src], state[batch.dst], edge], dim=1))
            received = state.new_zeros(state.shape).index_add_(0, batch.dst, sent)
            state = self.update(torch.cat([received, bias], dim=1), state)
        return torch.log_softmax(self.readout(torch.cat([state, bias], dim=1)), dim=1)


class MessageGNN(nn.Module):
    """Message-based GNN: one hidden state per directed edge, non-backtracking aggregation.

    Args:
        hidden (int >= 1): size of the message states and of the MLPs' hidden layers.
        steps (int >= 1): message-passing steps (weights shared across steps).

    Shapes:
        forward(batch: MRFBatch) -> Tensor[V, 2], log-marginals of the spins -1 and +1.
    """

    def __init__(self, hidden: int = 64, steps: int = 10):
        super().__init__()
        if hidden < 1 or steps < 1:
            raise ValueError(f"hidden and steps must be at least 1, got {hidden}, {steps}")
        self.hidden, self.steps = hidden, steps
        self.encode = nn.Linear(3, hidden)
        self.message = _mlp(2 * hidden + 3, hidden, hidden)
        self.update = nn.GRUCell(hidden + 3, hidden)
        self.readout = _mlp(hidden + 1, hidden, 2)

    def forward(self, batch: MRFBatch) -> Tensor:
        dtype = self.encode.weight.dtype
        edge = _edge_features(batch, dtype)
        from_edge, to_edge = message_adjacency(batch.src, batch.dst, batch.reverse)
        state = torch.tanh(self.encode(edge))
        for _ in range(self.steps):
            inputs = torch.cat([state[from_edge], state[to_edge], edge[to_edge]], dim=1)
            received = state.new_zeros(state.shape).index_add_(0, to_edge, self.message(inputs))
            state = self.update(torch.cat([received, edge], dim=1), state)
        incoming = state.new_zeros(batch.num_nodes, self.hidden).index_add_(0, batch.dst, state)
        bias = batch.bias.to(dtype)[:, None]
        return torch.log_softmax(self.readout(torch.cat([incoming, bias], dim=1)), dim=1)


def build_model(kind: str, hidden: int = 64, steps: int = 10) -> nn.Module:
    """A :class:`NodeGNN` (``kind="node"``) or a :class:`MessageGNN` (``"message"``)."""
    if kind not in MODELS:
        raise ValueError(f"kind must be one of {MODELS}, got {kind!r}")
    return (NodeGNN if kind == "node" else MessageGNN)(hidden, steps)


# ---------------------------------------------------------------------------------------------
# Training


@dataclass
class TrainConfig:
    """Settings of :func:`train`.

    Attributes:
        epochs: passes over the training graphs.
        lr: learning rate of Adam, decayed by a cosine to a tenth of it over the run.
        batch_size: graphs per step and process.
        grad_clip: largest gradient norm (the recurrent steps can amplify gradients).
        seed: seeds the order of the graphs; the same seed and data give the same run.
        device: where to train ("cpu", "cuda", "cuda:1", ...).
        checkpoint: file written (atomically) after every epoch; None writes none.
        resume: continue from ``checkpoint`` when that file exists.
        progress: show a tqdm progress bar (on the first process only).
    """

    epochs: int = 30
    lr: float = 2e-3
    batch_size: int = 32
    grad_clip: float = 1.0
    seed: int = 0
    device: str = "cpu"
    checkpoint: str | None = None
    resume: bool = False
    progress: bool = True

    def __post_init__(self):
        if not isinstance(self.epochs, int) or self.epochs < 0:
            raise ValueError(f"epochs must be a nonnegative integer, got {self.epochs!r}")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {self.batch_size!r}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be positive and finite, got {self.lr}")
        if not (self.grad_clip > 0 and math.isfinite(self.grad_clip)):
            raise ValueError(f"grad_clip must be positive and finite, got {self.grad_clip}")
        if self.seed < 0:
            raise ValueError(f"seed must be nonnegative, got {self.seed}")
        if self.resume and not self.checkpoint:
            raise ValueError("resume needs a checkpoint path")
        try:
            torch.device(self.device)
        except RuntimeError as error:
            raise ValueError(f"device: {error}") from error


def kl_loss(log_predicted: Tensor, exact: Tensor) -> Tensor:
    """Mean over nodes of KL(exact || predicted), the training loss."""
    exact = exact.to(log_predicted.dtype)
    return (torch.xlogy(exact, exact) - exact * log_predicted).sum(1).mean()


def _epoch_order(count: int, seed: int, epoch: int) -> list[int]:
    # The order depends on the seed and the epoch alone, so a resumed run repeats it.
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(count, generator=generator).tolist()


def _load_checkpoint(path: str, model, optimizer, device) -> tuple[int, list]:
    state = torch.load(path, map_location=device, weights_only=True)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    logger.info("resumed from %s after epoch %d", path, state["epoch"])
    return int(state["epoch"]), list(state["history"])


def train(
    model: nn.Module,
    config: TrainConfig,
    train_data: MRFBatch,
    test_data: MRFBatch | None = None,
    name: str = "train",
) -> dict:
    """Fit a GNN's marginals to the exact ones by the KL divergence, with Adam.

    When ``torch.distributed`` is initialised the model is wrapped in DistributedDataParallel
    and each process takes its share of every epoch's batches (graph order from the seed and
    the epoch); the first process writes the checkpoint and shows the bar, and the returned
    training loss covers all processes.

    Args:
        model: a :class:`NodeGNN` or :class:`MessageGNN`; trained in place, moved to
            ``config.device``.
        config: the settings.
        train_data: the training models, with exact marginals.
        test_data: models to evaluate after every epoch (with exact marginals), or None.
        name: label of the progress bar and of the log messages.

    Returns:
        dict with ``train_loss`` and ``test_kl`` of the last epoch (None without test data),
        ``epochs``, ``start_epoch`` (above 0 after a resume), ``seconds`` and ``history``.

    Raises:
        ValueError: data without exact marginals, or a loss that is not finite.
    """
    for label, data in (("train_data", train_data), ("test_data", test_data)):
        if data is not None and (not isinstance(data, MRFBatch) or data.marginals is None):
            raise ValueError(f"{label} must be an MRFBatch with exact marginals")
    device = torch.device(config.device)
    rank, world = rank_and_world()
    model.to(device)
    net = data_parallel(model, device, world)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)

    count = train_data.num_graphs
    batches_per_epoch = math.ceil(count / config.batch_size)
    steps_per_epoch = math.ceil(batches_per_epoch / world)
    start_epoch, history = 0, []
    if config.resume and os.path.exists(config.checkpoint):
        start_epoch, history = _load_checkpoint(config.checkpoint, model, optimizer, device)

    started = time.perf_counter()
    remaining = max(0, config.epochs - start_epoch) * steps_per_epoch
    bar = progress_bar(remaining, name, config.progress and rank == 0)
    try:
        for epoch in range(start_epoch, config.epochs):
            record = _train_epoch(
                net, optimizer, config, epoch=epoch, data=train_data, bar=bar, name=name
            )
            if test_data is not None:
                record["test_kl"] = evaluate(model, test_data)["kl"]
            history.append(record)
            logger.info(
                "%s epoch %d/%d: train KL %.5f, test KL %s",
                name, epoch + 1, config.epochs, record["train_loss"], record.get("test_kl"),
            )  # fmt: skip
            if config.checkpoint:
                state = {
                    "epoch": epoch + 1,
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
        "test_kl": last.get("test_kl"),
        "epochs": config.epochs,
        "start_epoch": start_epoch,
        "seconds": time.perf_counter() - started,
        "history": history,
    }


def _train_epoch(net, optimizer, config, *, epoch, data, bar, name) -> dict:
    """One pass over this process's share of the batches; returns the mean training KL."""
    device = torch.device(config.device)
    rank, world = rank_and_world()
    order = _epoch_order(data.num_graphs, config.seed, epoch)
    batches = [order[i : i + config.batch_size] for i in range(0, len(order), config.batch_size)]
    # Every process takes the same number of steps, so that DDP's all-reduces pair up.
    steps = math.ceil(len(batches) / world)
    mine = [batches[(step * world + rank) % len(batches)] for step in range(steps)]
    total_steps = max(1, config.epochs * steps)
    bar.set_description(f"{name} epoch {epoch + 1}/{config.epochs}")

    net.train()
    sums = torch.zeros(2, dtype=torch.float64, device=device)  # loss * nodes, nodes
    for i, graphs in enumerate(mine):
        progress = (epoch * steps + i) / total_steps
        for group in optimizer.param_groups:
            group["lr"] = config.lr * (0.55 + 0.45 * math.cos(math.pi * progress))
        batch = data.select(graphs).to(device)
        loss = kl_loss(net(batch), batch.marginals)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), config.grad_clip)
        optimizer.step()
        with torch.no_grad():
            sums[0] += loss.detach().double() * batch.num_nodes
            sums[1] += batch.num_nodes
        bar.update(1)
        if i % 10 == 0 and not isinstance(bar, SilentBar):
            bar.set_postfix(kl=f"{loss.item():.4f}")

    if world > 1:
        dist.all_reduce(sums)
    loss_sum, nodes = sums.tolist()
    if not math.isfinite(loss_sum):
        raise ValueError(
            f"{name}: the training loss is not finite in epoch {epoch + 1}; lower the "
            f"learning rate (now {config.lr})"
        )
    return {"epoch": epoch + 1, "train_loss": loss_sum / max(nodes, 1.0)}


@torch.no_grad()
def predict(model: nn.Module, data: MRFBatch, batch_size: int = 256) -> Tensor:
    """Tensor[V, 2]: the model's marginals, ``batch_size`` graphs per forward pass."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    parts = []
    for start in range(0, data.num_graphs, batch_size):
        graphs = list(range(start, min(data.num_graphs, start + batch_size)))
        parts.append(model(data.select(graphs).to(device)).exp().cpu())
    model.train(was_training)
    return torch.cat(parts) if parts else data.bias.new_zeros(0, 2)


def evaluate(model: nn.Module, data: MRFBatch) -> dict:
    """Mean per-node KL(exact || model) and mean absolute error of p(x = +1).

    Raises:
        ValueError: ``data`` without exact marginals.
    """
    if data.marginals is None:
        raise ValueError("data must hold exact marginals (sample_mrfs(..., with_marginals=True))")
    kl, mae = marginal_errors(predict(model, data), data.marginals)
    return {"kl": float(kl.mean()), "mae": float(mae.mean())}


# ---------------------------------------------------------------------------------------------
# deepkern reproduce yoon

HELD_OUT_FAMILIES = ("barbell", "wheel", "tripartite")
TREE_FAMILIES = tuple(f for f in FAMILIES if f not in LOOPY_FAMILIES)
MODEL_LABELS = {"bp": "BP", "node": "node-GNN", "message": "msg-GNN"}


@dataclass
class _Settings:
    """What ``deepkern reproduce yoon`` trains and measures."""

    train_n: int = 9
    test_sizes: tuple[int, ...] = (9, 16)
    held_out: tuple[str, ...] = HELD_OUT_FAMILIES
    train_per_family: int = 100
    test_per_family: int = 20
    hidden: int = 32
    steps: int = 10
    epochs: int = 12
    batch_size: int = 25
    lr: float = 3e-3
    bp_damping: float = 0.5
    bp_iters: int = 200
    seed: int = 0
    device: str = "cpu"
    threads: int | None = 1
    models: tuple[str, ...] = MODELS
    checkpoint_dir: str | None = None
    resume: bool = False


_DEFAULTS = _Settings()
_QUICK = _Settings(
    train_n=6, test_sizes=(6, 8), train_per_family=3, test_per_family=2, hidden=8, steps=3,
    epochs=2, batch_size=8, threads=None,
)  # fmt: skip
_FULL = _Settings(
    train_per_family=1000, test_per_family=100, hidden=64, steps=10, epochs=100,
    batch_size=64, lr=1e-3, threads=None,
)  # fmt: skip


def add_reproduce_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``deepkern reproduce yoon``.

    By default both GNNs train on 1000 models of 9 nodes (100 of each training family) and
    are tested with loopy BP on 20 models per family at n = 9 and n = 16, on one CPU thread in
    minutes. ``--full`` trains on 10000 models with wider networks for 100 epochs (a GPU when
    there is one); ``--quick`` runs in seconds.
    """
    parser.description = (
        "GNNs against loopy belief propagation for the marginals of binary MRFs (Yoon et al. "
        "2018): KL divergence and mean absolute error against exact marginals per graph "
        "family, trained on n = 9, tested on n = 9, on n = 16 and on held-out families."
    )
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="a run of seconds (for tests)")
    size.add_argument("--full", action="store_true", help="the larger run, for a GPU")
    d = _DEFAULTS
    parser.add_argument("--train-n", type=int, help=f"nodes of training graphs ({d.train_n})")
    parser.add_argument(
        "--test-sizes", type=int, nargs="+", help="nodes of test graphs (default 9 16)"
    )
    parser.add_argument(
        "--held-out",
        nargs="*",
        choices=FAMILIES,
        help="families kept out of training (default " + " ".join(d.held_out) + ")",
    )
    parser.add_argument("--train-per-family", type=int, help="training graphs per family (100)")
    parser.add_argument("--test-per-family", type=int, help="test graphs per family and size (20)")
    parser.add_argument("--hidden", type=int, help=f"state size of the GNNs ({d.hidden})")
    parser.add_argument("--steps", type=int, help=f"message-passing steps ({d.steps})")
    parser.add_argument("--epochs", type=int, help=f"training epochs ({d.epochs})")
    parser.add_argument("--batch-size", type=int, help=f"graphs per step ({d.batch_size})")
    parser.add_argument("--lr", type=float, help=f"learning rate of Adam ({d.lr})")
    parser.add_argument("--bp-damping", type=float, help=f"damping of BP ({d.bp_damping})")
    parser.add_argument("--bp-iters", type=int, help=f"iteration cap of BP ({d.bp_iters})")
    parser.add_argument("--models", nargs="+", choices=MODELS, help="GNNs to train (both)")
    parser.add_argument("--seed", type=int, help="seed of data and training (default 0)")
    parser.add_argument("--device", help="cpu, cuda or cuda:N (default cpu)")
    parser.add_argument("--threads", type=int, help="CPU threads of PyTorch (default 1)")
    parser.add_argument("--checkpoint-dir", help="write node.pt and message.pt here each epoch")
    parser.add_argument("--resume", action="store_true", help="continue from the checkpoints")
    parser.add_argument("--out", help="write yoon.json (settings, table, training) here")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")


def _resolve(args: argparse.Namespace) -> _Settings:
    settings = settings_from_arguments(args, _DEFAULTS, _QUICK, _FULL)
    _check_settings(settings)
    return settings


def _check_settings(settings: _Settings) -> None:
    """Refuse settings that cannot run, before any work is done."""
    lows = {"train_per_family": 1, "test_per_family": 1, "hidden": 1, "steps": 1}
    lows.update({"epochs": 0, "batch_size": 1, "bp_iters": 0, "seed": 0})
    for name, low in lows.items():
        value = getattr(settings, name)
        if value < low:
            raise ValueError(f"--{name.replace('_', '-')} must be at least {low}, got {value}")
    for n in (settings.train_n, *settings.test_sizes):
        if not MIN_NODES <= n <= MAX_EXACT_NODES:
            raise ValueError(
                f"--train-n and --test-sizes must lie in [{MIN_NODES}, {MAX_EXACT_NODES}] "
                f"(the smallest size of every family, the largest for exact marginals), got {n}"
            )
    if not settings.test_sizes:
        raise ValueError("--test-sizes needs at least one size")
    if len(set(settings.held_out)) == len(FAMILIES):
        raise ValueError("--held-out must leave at least one family to train on")
    if not 0.0 <= settings.bp_damping < 1.0:
        raise ValueError(f"--bp-damping must lie in [0, 1), got {settings.bp_damping}")
    if not (settings.lr > 0 and math.isfinite(settings.lr)):
        raise ValueError(f"--lr must be positive and finite, got {settings.lr}")
    if settings.threads is not None and settings.threads < 1:
        raise ValueError(f"--threads must be at least 1, got {settings.threads}")
    try:
        device = torch.device(settings.device)
    except RuntimeError as error:
        raise ValueError(f"--device: {error}") from error
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {settings.device}: no CUDA device is available")


def _train_families(settings: _Settings) -> list[str]:
    return [f for f in FAMILIES if f not in settings.held_out]


def _make_data(settings: _Settings) -> tuple[MRFBatch, dict[int, MRFBatch]]:
    train_rng = torch.Generator().manual_seed(1_000 + settings.seed)
    train_data = sample_mrfs(
        _train_families(settings), settings.train_n, settings.train_per_family, train_rng
    )
    tests = {}
    for n in settings.test_sizes:
        test_rng = torch.Generator().manual_seed(2_000 + 100 * settings.seed + n)
        tests[n] = sample_mrfs(list(FAMILIES), n, settings.test_per_family, test_rng)
    return train_data, tests


def _train_models(settings: _Settings, train_data: MRFBatch, progress: bool) -> dict:
    results = {}
    for kind in settings.models:
        torch.manual_seed(settings.seed)  # the initial weights
        model = build_model(kind, settings.hidden, settings.steps)
        checkpoint = None
        if settings.checkpoint_dir:
            checkpoint = os.path.join(settings.checkpoint_dir, f"{kind}.pt")
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
        metrics = train(model, config, train_data, name=MODEL_LABELS[kind])
        results[kind] = {"model": model, "training": metrics}
    return results


def _score(settings: _Settings, tests: dict[int, MRFBatch], trained: dict) -> list[dict]:
    """One row per (family, size): mean KL and MAE of BP and of each GNN."""
    rows = []
    for n, data in tests.items():
        bp = bp_marginals(data, settings.bp_damping, settings.bp_iters)
        predictions = {"bp": bp["marginals"]}
        for kind, entry in trained.items():
            predictions[kind] = predict(entry["model"], data)
        errors = {k: marginal_errors(p, data.marginals) for k, p in predictions.items()}
        node_family = [data.families[g] for g in data.node_graph.tolist()]
        for family in FAMILIES:
            nodes = torch.tensor([f == family for f in node_family])
            graphs = torch.tensor([f == family for f in data.families])
            row = {
                "family": family,
                "n": n,
                "held_out": family in settings.held_out,
                "loopy": family in LOOPY_FAMILIES,
                "bp_converged": float(bp["converged"][graphs].double().mean()),
            }
            for kind, (kl, mae) in errors.items():
                row[f"{kind}_kl"] = float(kl[nodes].mean())
                row[f"{kind}_mae"] = float(mae[nodes].mean())
            rows.append(row)
    return rows


def _summaries(settings: _Settings, rows: list[dict]) -> list[dict]:
    """Means over groups of rows: trees, loopy seen families, held-out families, per size."""
    kinds = ["bp", *settings.models]
    groups = []
    for n in settings.test_sizes:
        for label, keep in (
            ("trees", lambda r: not r["loopy"]),
            ("loopy, trained", lambda r: r["loopy"] and not r["held_out"]),
            ("held out", lambda r: r["held_out"]),
        ):
            chosen = [r for r in rows if r["n"] == n and keep(r)]
            if not chosen:
                continue
            summary = {"group": label, "n": n, "families": len(chosen)}
            for kind in kinds:
                for metric in ("kl", "mae"):
                    values = [r[f"{kind}_{metric}"] for r in chosen]
                    summary[f"{kind}_{metric}"] = sum(values) / len(values)
            groups.append(summary)
    return groups


def _table(settings: _Settings, rows: list[dict], summaries: list[dict]) -> str:
    kinds = ["bp", *settings.models]
    labels = [MODEL_LABELS[k] for k in kinds]
    header = f"{'family':<20} {'n':>3}  " + "".join(f"{'KL ' + x:>13}" for x in labels)
    header += "".join(f"{'MAE ' + x:>13}" for x in labels) + f"{'BP conv':>9}"
    lines = [header, "-" * len(header)]

    def cells(record: dict) -> str:
        kl = "".join(f"{record[f'{k}_kl']:>13.4f}" for k in kinds)
        return kl + "".join(f"{record[f'{k}_mae']:>13.4f}" for k in kinds)

    for n in settings.test_sizes:
        for r in (r for r in rows if r["n"] == n):
            name = r["family"] + (" *" if r["held_out"] else "")
            lines.append(f"{name:<20} {n:>3}  {cells(r)}{100 * r['bp_converged']:>8.0f}%")
        lines.append("")
    for s in summaries:
        lines.append(f"{'mean ' + s['group']:<20} {s['n']:>3}  {cells(s)}")
    return "\n".join(lines)


def _claims(settings: _Settings, summaries: list[dict]) -> list[tuple[str, str, str]]:
    """The paper's claims beside what this run measured."""
    out = []
    for s in summaries:
        if s["group"] == "trees":
            continue
        beats = [MODEL_LABELS[k] for k in settings.models if s[f"{k}_kl"] < s["bp_kl"]]
        where = f"{s['group']} families, n = {s['n']}"
        ours = ", ".join(beats) + " below BP" if beats else "no GNN below BP"
        out.append((f"GNNs beat BP in KL on {where}", "yes", ours))
    return out


def run_reproduce(args: argparse.Namespace) -> int:
    """``deepkern reproduce yoon``: train both GNNs, score them and BP per family, print.

    Returns:
        0 on success.
    """
    settings = _resolve(args)
    if settings.threads is not None:
        torch.set_num_threads(settings.threads)
    with process_group(settings):
        return _reproduce(args, settings)


def _reproduce(args: argparse.Namespace, settings: _Settings) -> int:
    rank, _ = rank_and_world()
    progress = not getattr(args, "no_progress", False)
    started = time.perf_counter()
    train_data, tests = _make_data(settings)
    if rank == 0:
        print(
            f"binary MRFs, spins +-1, J ~ N(0, 1), b ~ N(0, 0.25^2); training on "
            f"{train_data.num_graphs} graphs of {settings.train_n} nodes from "
            f"{len(_train_families(settings))} families; testing on "
            f"{settings.test_per_family} graphs per family at n = "
            + ", ".join(map(str, settings.test_sizes))
            + f"; GNNs of {settings.hidden} units, {settings.steps} steps"
        )
    trained = _train_models(settings, train_data, progress)
    if rank != 0:
        return 0
    rows = _score(settings, tests, trained)
    summaries = _summaries(settings, rows)
    print(_table(settings, rows, summaries))
    print(
        "KL: mean per node of KL(exact || approximate); MAE: mean |p(x=+1) error|; "
        f"* held out of training; BP: damping {settings.bp_damping}, at most "
        f"{settings.bp_iters} iterations, 'BP conv' the share of graphs on which it converged"
    )
    claims = _claims(settings, summaries)
    width = max(len(c[0]) for c in claims) if claims else 10
    print(f"\n{'claim':<{width}} | {'paper':>5} | ours")
    for claim, paper, ours in claims:
        print(f"{claim:<{width}} | {paper:>5} | {ours}")
    seconds = time.perf_counter() - started
    print(f"({seconds:.0f} s)")

    if getattr(args, "out", None):
        os.makedirs(args.out, exist_ok=True)
        report = {
            "settings": dataclasses.asdict(settings),
            "rows": rows,
            "summaries": summaries,
            "claims": claims,
            "training": {k: v["training"] for k, v in trained.items()},
            "seconds": seconds,
            "environment": environment(settings.device),
        }
        path = os.path.join(args.out, "yoon.json")
        write_json(path, report)
        print(f"wrote {path}")
    return 0
