"""Parameter prediction for unseen deep architectures (Knyazev, Drozdzal, Taylor and
Romero-Soriano, 2021): the graph hypernetwork GHN-2.

A network is read as its computational graph (:mod:`deepkern.data.compgraph`): one node per
parameterised layer or parameter-free operation, real edges where data flows, virtual edges
between nodes a few real edges apart. GHN-2 turns the graph into all the network's parameters
in one forward pass:

1. Node embeddings: an embedding of the node's type plus a shape encoder, the sum of four
   embeddings of the predicted parameter's dimensions (out and in channels in log2 bins, height
   and width by value).
2. A gated graph network sweeps the DAG forward in topological order, then backward. A node
   receives ``sum_real MLP(h_u) + sum_virtual MLP_sp(h_u) / length`` from the nodes it depends
   on (its successors on the way back) and updates its state with a GRU.
3. Layer normalisation of the node states.
4. Decoders: a convolutional decoder turns a node's state into a tensor of the largest shape
   ``(max_out, max_in, k, k)``, tiled along channels and centre-cropped or tiled in space to
   the parameter's shape; small heads give biases and normalisation parameters.
5. Parameter normalisation: weights are scaled by ``sqrt(gain / fan_in)`` (gain 2 for
   convolutions, which DeepNets-1M follows with ReLU, 1 otherwise), the scales of
   normalisation layers are ``2 sigmoid(raw)`` and biases ``tanh(raw)``.

The sweep runs level-synchronously (``sweep="level"``): the nodes of one level, across all the
graphs of a meta-batch, are updated in one step, with their messages gathered over a CSR of
incoming edges by :func:`deepkern.ops.graph.gather_reduce`. The node-by-node sweep
(``sweep="node"``) is the plain reference: the same arithmetic, one node at a time.

Predicted parameters stay differentiable: :func:`functional_forward` runs a network with them
through :func:`torch.func.functional_call`, which is how :func:`train` trains the GHN on
scikit-learn's digits. ``deepkern ghn predict`` and ``deepkern reproduce ghn`` are the commands.
"""

from __future__ import annotations

import argparse
import bisect
import logging
import math
import os
import pickle
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from deepkern.data.compgraph import NODE_TYPES, ComputationalGraph
from deepkern.models.training import (
    batches_of,
    data_parallel,
    progress_bar,
    rank_and_world,
    save_atomic,
    save_on_first_rank,
    warmup_cosine,
)
from deepkern.ops import graph as graph_ops

__all__ = [
    "GHN2",
    "SweepPlan",
    "plan_sweep",
    "tile_to_shape",
    "parameter_kind",
    "functional_parameters",
    "functional_forward",
    "load_parameters",
    "meta_batch_loss",
    "TrainConfig",
    "train",
    "save_ghn",
    "load_ghn",
    "recalibrate_batch_norm",
    "accuracy",
    "train_with_sgd",
    "add_predict_arguments",
    "run_predict",
    "add_reproduce_arguments",
    "run_reproduce",
]

logger = logging.getLogger("deepkern.models.ghn")

SWEEPS = ("level", "node")

# Node types whose parameter is a normalisation layer's scale or shift.
_NORM_TYPES = frozenset({"bn", "ln"})

# Gain of the fan-in scaling per node type: convolutions of DeepNets-1M sit after a ReLU (He's
# factor 2); attention, positional encodings and linear layers keep unit gain.
_WEIGHT_GAIN = {"conv": 2.0, "sep_conv": 2.0, "dil_conv": 2.0}

# Shape encoder bins: channel counts by rounded log2 (1 .. 2^14), spatial sizes by value.
_CHANNEL_BINS = 16
_SPATIAL_BINS = 16


def parameter_kind(node_type: str, name: str) -> str:
    """Which head predicts a node's parameter: ``"weight"``, ``"norm_scale"`` or ``"bias"``.

    Bias nodes and every parameter named ``...bias`` are biases (tanh); the scale of a norm node
    (``...weight`` of a ``bn`` or ``ln`` node) is a norm scale (2 sigmoid); everything else is
    a weight tensor from the convolutional decoder.
    """
    if node_type == "bias" or name.rsplit(".", 1)[-1] == "bias":
        return "bias"
    if node_type in _NORM_TYPES:
        return "norm_scale"
    return "weight"


# ---------------------------------------------------------------------------------------------
# The level-synchronous schedule


@dataclass
class _Level:
    """One level of one sweep direction: nodes ``start .. end`` of that direction's order."""

    start: int
    end: int
    rowptr: Tensor  # [end - start + 1] over this level's incoming edges
    col: Tensor  # [edges] rows of the message window, 2 * source offset + is_virtual
    weight: Tensor  # [edges] 1 for real edges, 1 / length for virtual ones
    window: int = 0  # the first earlier level this one reads from; its messages start at row 0

    @property
    def has_edges(self) -> bool:
        return self.col.numel() > 0


@dataclass
class SweepPlan:
    """A meta-batch of graphs, concatenated and ordered for the level-synchronous sweep.

    Nodes are numbered graph by graph (``node_offsets``); the sweep works in *level order*,
    nodes sorted by level (stable, so graph by graph within a level). ``position[v]`` is node
    v's place in that order. The backward sweep walks the levels in reverse with the edges
    transposed; it keeps the within-level order, so its levels are the same slices in reverse.

    Attributes:
        graphs: the graphs, in batch order.
        node_offsets (list[int], G + 1): first node of each graph in the batch numbering.
        node_types (Tensor[V] int64), shapes (Tensor[V, 4] int64): concatenated node features.
        position (Tensor[V] int64): level-order position of each node.
        forward_to_backward (Tensor[V] int64): backward-sweep position of the node at each
            level-order position (the inverse permutation is ``backward_to_forward``).
        forward, backward (list[_Level]): the levels of each sweep, in the order they run.
        sources, targets, lengths (Tensor[E] int64): the batch's edges (batch numbering).
    """

    graphs: list[ComputationalGraph]
    node_offsets: list[int]
    node_types: Tensor
    shapes: Tensor
    position: Tensor
    forward_to_backward: Tensor
    backward_to_forward: Tensor
    forward: list[_Level]
    backward: list[_Level]
    sources: Tensor
    targets: Tensor
    lengths: Tensor

    @property
    def num_nodes(self) -> int:
        return int(self.node_types.numel())


def _check_graph(g: ComputationalGraph, index: int) -> None:
    """Refuse a graph the sweep would silently get wrong."""
    n = g.num_nodes
    where = f"graph {index}"
    if g.node_types.dim() != 1 or g.node_types.dtype != torch.int64:
        raise ValueError(f"{where}: node_types must be a 1-D int64 tensor")
    if n and (int(g.node_types.min()) < 0 or int(g.node_types.max()) >= len(NODE_TYPES)):
        raise ValueError(f"{where}: node_types must index NODE_TYPES (0 .. {len(NODE_TYPES) - 1})")
    if tuple(g.shapes.shape) != (n, 4):
        raise ValueError(f"{where}: shapes must be [{n}, 4], got {tuple(g.shapes.shape)}")
    if g.edges.dim() != 2 or g.edges.shape[0] != 2:
        raise ValueError(f"{where}: edges must be [2, E], got {tuple(g.edges.shape)}")
    if g.edge_lengths.shape != (g.edges.shape[1],):
        raise ValueError(f"{where}: edge_lengths must hold one length per edge")
    if g.levels.shape != (n,):
        raise ValueError(f"{where}: levels must hold one level per node")
    if len(g.param_names) != n:
        raise ValueError(f"{where}: param_names must hold one entry per node")
    if g.edges.numel():
        src, dst = g.edges
        if int(g.edges.min()) < 0 or int(g.edges.max()) >= n:
            raise ValueError(f"{where}: edges must join nodes in [0, {n})")
        if bool((src >= dst).any()):
            raise ValueError(f"{where}: every edge must go from a lower to a higher node index")
        if bool((g.levels[dst] <= g.levels[src]).any()):
            raise ValueError(f"{where}: levels must grow along every edge")
        if bool((g.edge_lengths < 1).any()):
            raise ValueError(f"{where}: edge_lengths must be at least 1")


def _levels_of(
    rows: Tensor, cols: Tensor, weights: Tensor, sizes: list[int], num_nodes: int
) -> list[_Level]:
    """Cut one direction's CSR (rows in that direction's order) into per-level slices."""
    order = torch.argsort(rows * (2 * num_nodes + 2) + cols, stable=True)
    rows, cols, weights = rows[order], cols[order], weights[order]
    counts = torch.bincount(rows, minlength=num_nodes)
    rowptr = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
    starts = [0]
    for size in sizes:
        starts.append(starts[-1] + size)
    levels = []
    for start, end in zip(starts[:-1], starts[1:]):
        first, last = int(rowptr[start]), int(rowptr[end])
        col = cols[first:last]
        # A level reads only from the window of levels its earliest source lies in and after
        # (virtual edges reach back at most MAX_SHORTEST_PATH levels), so the table it gathers
        # from, and autograd keeps, is that window rather than every level so far.
        window = 0
        if col.numel():
            window = bisect.bisect_right(starts, int(col.min()) // 2) - 1
        levels.append(
            _Level(
                start=start,
                end=end,
                rowptr=rowptr[start : end + 1] - first,
                col=col - 2 * starts[window],
                weight=weights[first:last],
                window=window,
            )
        )
    return levels


def plan_sweep(graphs: Sequence[ComputationalGraph], virtual_edges: bool = True) -> SweepPlan:
    """Concatenate ``graphs`` and precompute the level-synchronous schedule of both sweeps.

    Args:
        graphs: one or more computational graphs (a meta-batch).
        virtual_edges: keep the virtual edges (length > 1); False sends messages over real
            edges only.

    Returns:
        A :class:`SweepPlan`; reuse it for every forward pass over the same graphs.

    Raises:
        ValueError: no graphs, or a graph whose fields disagree (edges that do not go from a
            lower to a higher index or level, wrong shapes); the message names the graph.
    """
    graphs = list(graphs)
    if not graphs:
        raise ValueError("graphs must hold at least one computational graph")
    for i, g in enumerate(graphs):
        _check_graph(g, i)

    offsets = [0]
    for g in graphs:
        offsets.append(offsets[-1] + g.num_nodes)
    num_nodes = offsets[-1]
    levels = torch.cat([g.levels for g in graphs]).long()
    sources = torch.cat([g.edges[0] + off for g, off in zip(graphs, offsets)]).long()
    targets = torch.cat([g.edges[1] + off for g, off in zip(graphs, offsets)]).long()
    lengths = torch.cat([g.edge_lengths for g in graphs]).long()
    if not virtual_edges:
        real = lengths == 1
        sources, targets, lengths = sources[real], targets[real], lengths[real]

    # Level order: by level, and by batch index within a level.
    order = torch.argsort(levels, stable=True)
    position = torch.empty_like(order)
    position[order] = torch.arange(num_nodes)
    sizes = [int(c) for c in torch.bincount(levels) if int(c) > 0]
    virtual = (lengths > 1).long()
    weight = 1.0 / lengths.double()

    # Forward sweep: a target reads the messages of its sources, which sit in earlier levels,
    # so in the prefix of the message table built so far.
    forward = _levels_of(
        position[targets], 2 * position[sources] + virtual, weight, sizes, num_nodes
    )

    # Backward sweep: levels in reverse, each level keeping its internal order.
    starts = torch.tensor([0, *sizes]).cumsum(0)
    level_index = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    within = torch.arange(num_nodes) - starts[level_index]
    reverse_starts = torch.tensor([0, *sizes[::-1]]).cumsum(0)
    forward_to_backward = reverse_starts[len(sizes) - 1 - level_index] + within
    back_position = torch.empty_like(position)
    back_position[order] = forward_to_backward
    backward = _levels_of(
        back_position[sources], 2 * back_position[targets] + virtual, weight, sizes[::-1],
        num_nodes,
    )  # fmt: skip

    return SweepPlan(
        graphs=graphs,
        node_offsets=offsets,
        node_types=torch.cat([g.node_types for g in graphs]).long(),
        shapes=torch.cat([g.shapes for g in graphs]).long(),
        position=position,
        forward_to_backward=forward_to_backward,
        backward_to_forward=torch.argsort(forward_to_backward),
        forward=forward,
        backward=backward,
        sources=sources,
        targets=targets,
        lengths=lengths,
    )


# ---------------------------------------------------------------------------------------------
# Parameter shapes


def tile_to_shape(raw: Tensor, shape: Sequence[int]) -> Tensor:
    """Fit a decoded tensor ``raw [O, I, k, k]`` to a parameter shape ``(o, i, h, w)``.

    Channels are tiled (repeated) and then sliced, so a wider layer reuses the decoded block;
    space is centre-cropped when the kernel is no larger than ``k``, tiled otherwise.

    Example:
        >>> tile_to_shape(torch.arange(4.0).view(2, 2, 1, 1), (3, 1, 1, 1)).flatten().tolist()
        [0.0, 2.0, 0.0]
    """
    o, i, h, w = (int(s) for s in shape)
    big_o, big_i, kh, kw = raw.shape
    reps_o, reps_i = math.ceil(o / big_o), math.ceil(i / big_i)
    out = raw.repeat(reps_o, reps_i, 1, 1)[:o, :i] if reps_o * reps_i > 1 else raw[:o, :i]
    if h <= kh and w <= kw:
        top, left = (kh - h) // 2, (kw - w) // 2
        return out[:, :, top : top + h, left : left + w]
    return out.repeat(1, 1, math.ceil(h / kh), math.ceil(w / kw))[:, :, :h, :w]


# ---------------------------------------------------------------------------------------------
# The hypernetwork


class ShapeEncoder(nn.Module):
    """Embeds a parameter shape ``(out, in, height, width)``: four embeddings, concatenated.

    Channel counts go to bins by rounded log2 (bin 0 for a node without a parameter), spatial
    sizes by value (sizes above 15 share the last bin).
    """

    def __init__(self, hidden: int):
        super().__init__()
        if hidden % 4:
            raise ValueError(f"hidden must be divisible by 4 for the shape encoder, got {hidden}")
        quarter = hidden // 4
        self.channels = nn.ModuleList(nn.Embedding(_CHANNEL_BINS, quarter) for _ in range(2))
        self.spatial = nn.ModuleList(nn.Embedding(_SPATIAL_BINS, quarter) for _ in range(2))

    def forward(self, shapes: Tensor) -> Tensor:
        shapes = shapes.long()
        log2 = torch.log2(shapes[:, :2].clamp(min=1).double()).round().long()
        channel_bins = torch.where(shapes[:, :2] > 0, 1 + log2.clamp(max=_CHANNEL_BINS - 2), 0)
        spatial_bins = shapes[:, 2:].clamp(min=0, max=_SPATIAL_BINS - 1)
        parts = [emb(channel_bins[:, j]) for j, emb in enumerate(self.channels)]
        parts += [emb(spatial_bins[:, j]) for j, emb in enumerate(self.spatial)]
        return torch.cat(parts, dim=1)


def _mlp(width: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, width))


class GHN2(nn.Module):
    """The graph hypernetwork GHN-2.

    Args:
        hidden (int, divisible by 4): size of node embeddings and states.
        max_shape ((max_out, max_in, k, k)): the largest block the decoder predicts; larger
            parameters tile it.
        decoder_hidden (int or None): channels of the decoder's convolutions (default
            ``2 * hidden``).
        rounds (int >= 1): forward-and-backward sweeps of the gated graph network.
        virtual_edges (bool): send messages over virtual edges too (GHN-2); False gives the
            real-edge gated GNN of GHN-1.

    Shapes:
        forward(graphs or plan, sweep="level") -> list (one per graph) of dict parameter name
        -> Tensor[o, i, h, w], the graph's ``shapes`` row of the node predicting it. Reshape to
        the module's own shapes with :func:`functional_parameters`.

    Example:
        >>> ghn = GHN2(hidden=32, max_shape=(16, 16, 3, 3))
        >>> params = ghn(graphs)[0]                                  # doctest: +SKIP
    """

    def __init__(
        self,
        hidden: int = 32,
        max_shape: Sequence[int] = (32, 32, 3, 3),
        decoder_hidden: int | None = None,
        rounds: int = 1,
        virtual_edges: bool = True,
    ):
        super().__init__()
        if hidden < 4 or hidden % 4:
            raise ValueError(f"hidden must be a positive multiple of 4, got {hidden}")
        max_shape = tuple(int(s) for s in max_shape)
        if len(max_shape) != 4 or min(max_shape) < 1 or max_shape[2] != max_shape[3]:
            raise ValueError(
                f"max_shape must be (out, in, k, k) with positive sizes, got {max_shape}"
            )
        if rounds < 1:
            raise ValueError(f"rounds must be at least 1, got {rounds}")
        decoder_hidden = decoder_hidden or 2 * hidden
        self.hidden, self.max_shape, self.rounds = hidden, max_shape, rounds
        self.virtual_edges = virtual_edges
        self.config = {
            "hidden": hidden,
            "max_shape": list(max_shape),
            "decoder_hidden": decoder_hidden,
            "rounds": rounds,
            "virtual_edges": virtual_edges,
        }

        self.node_embedding = nn.Embedding(len(NODE_TYPES), hidden)
        self.shape_encoder = ShapeEncoder(hidden)
        self.message = _mlp(hidden)
        self.virtual_message = _mlp(hidden)
        self.update = nn.GRUCell(hidden, hidden)
        self.norm = nn.LayerNorm(hidden)

        out_channels, in_channels, k, _ = max_shape
        self.decoder_fc = nn.Linear(hidden, decoder_hidden * k * k)
        self.decoder_conv = nn.Sequential(
            nn.ReLU(),
            nn.Conv2d(decoder_hidden, decoder_hidden, 1),
            nn.ReLU(),
            nn.Conv2d(decoder_hidden, out_channels * in_channels, 1),
        )
        self.bias_head = nn.Sequential(
            nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, out_channels)
        )
        self.scale_head = nn.Sequential(
            nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, out_channels)
        )

    # -- node states --------------------------------------------------------------------------

    def embed(self, plan: SweepPlan) -> Tensor:
        """Tensor[V, hidden]: type embedding plus shape encoding of every node (batch order)."""
        device = self.node_embedding.weight.device
        types, shapes = plan.node_types.to(device), plan.shapes.to(device)
        return self.node_embedding(types) + self.shape_encoder(shapes)

    def propagate(self, plan: SweepPlan, states: Tensor, sweep: str = "level") -> Tensor:
        """The gated graph network: ``rounds`` forward-and-backward sweeps, batch order in and
        out. ``sweep`` is ``"level"`` (level-synchronous) or ``"node"`` (the reference)."""
        if sweep not in SWEEPS:
            raise ValueError(f"sweep must be one of {SWEEPS}, got {sweep!r}")
        if sweep == "node":
            return self._propagate_node_by_node(plan, states)
        device = states.device
        position = plan.position.to(device)
        to_backward = plan.backward_to_forward.to(device)
        to_forward = plan.forward_to_backward.to(device)
        in_order = states[torch.argsort(position)]
        for _ in range(self.rounds):
            in_order = self._sweep_levels(in_order, plan.forward)
            in_order = self._sweep_levels(in_order[to_backward], plan.backward)[to_forward]
        return in_order[position]

    def _sweep_levels(self, states: Tensor, levels: list[_Level]) -> Tensor:
        """One direction, level by level, ``states`` in that direction's order. A level reads
        the messages of the levels before it from a table that grows by one chunk per level."""
        device, dtype = states.device, states.dtype
        chunks: list[Tensor] = []  # each level's messages, [n, 2, hidden]: real, virtual
        updated: list[Tensor] = []
        for index, level in enumerate(levels):
            previous = states[level.start : level.end]
            if level.has_edges:
                table = torch.cat(chunks[level.window :]).reshape(-1, self.hidden)
                received = graph_ops.gather_reduce(
                    table,
                    level.rowptr.to(device),
                    level.col.to(device),
                    level.weight.to(device=device, dtype=dtype),
                    "sum",
                )
            else:
                received = previous.new_zeros(previous.shape)
            new = self.update(received, previous)
            updated.append(new)
            if index + 1 < len(levels):
                chunks.append(torch.stack([self.message(new), self.virtual_message(new)], dim=1))
        return torch.cat(updated)

    def _propagate_node_by_node(self, plan: SweepPlan, states: Tensor) -> Tensor:
        """The reference sweep: every node in topological order, one GRU call each."""
        sources, targets = plan.sources.tolist(), plan.targets.tolist()
        lengths = plan.lengths.tolist()
        incoming: list[list[tuple[int, int]]] = [[] for _ in range(plan.num_nodes)]
        outgoing: list[list[tuple[int, int]]] = [[] for _ in range(plan.num_nodes)]
        for s, t, length in zip(sources, targets, lengths):
            incoming[t].append((s, length))
            outgoing[s].append((t, length))

        h = list(states.unbind(0))
        for _ in range(self.rounds):
            for order, neighbours in (
                (range(plan.num_nodes), incoming),
                (range(plan.num_nodes - 1, -1, -1), outgoing),
            ):
                sent: dict[int, tuple[Tensor, Tensor]] = {}
                for v in order:
                    received = torch.zeros_like(h[v])
                    for u, length in neighbours[v]:
                        real, virtual = sent[u]
                        received = received + (real if length == 1 else virtual / length)
                    h[v] = self.update(received[None], h[v][None])[0]
                    sent[v] = (self.message(h[v]), self.virtual_message(h[v]))
        return torch.stack(h)

    # -- decoding -----------------------------------------------------------------------------

    def decode(self, plan: SweepPlan, states: Tensor) -> list[dict[str, Tensor]]:
        """Predicted parameters of every graph from the normalised node states."""
        types = [NODE_TYPES[t] for t in plan.node_types.tolist()]
        names = [name for g in plan.graphs for name in g.param_names]
        shapes = plan.shapes.tolist()
        kinds = [None if n is None else parameter_kind(t, n) for t, n in zip(types, names)]
        by_kind = {kind: [v for v, k in enumerate(kinds) if k == kind] for kind in
                   ("weight", "bias", "norm_scale")}  # fmt: skip

        decoded: dict[int, Tensor] = {}
        out_channels, in_channels, k, _ = self.max_shape
        weights = by_kind["weight"]
        if weights:
            index = torch.tensor(weights, device=states.device)
            blocks = self.decoder_fc(states[index]).view(len(weights), -1, k, k)
            blocks = self.decoder_conv(blocks).view(len(weights), out_channels, in_channels, k, k)
            for v, block in zip(weights, blocks.unbind(0)):
                shape = shapes[v]
                fan_in = max(1, shape[1] * shape[2] * shape[3])
                gain = _WEIGHT_GAIN.get(types[v], 1.0)
                decoded[v] = tile_to_shape(block, shape) * math.sqrt(gain / fan_in)
        for kind, head, squash in (
            ("bias", self.bias_head, torch.tanh),
            ("norm_scale", self.scale_head, lambda x: 2.0 * torch.sigmoid(x)),
        ):
            nodes = by_kind[kind]
            if not nodes:
                continue
            vectors = squash(head(states[torch.tensor(nodes, device=states.device)]))
            for v, vector in zip(nodes, vectors.unbind(0)):
                decoded[v] = tile_to_shape(vector.view(-1, 1, 1, 1), shapes[v])

        results = []
        for g, (first, last) in enumerate(zip(plan.node_offsets[:-1], plan.node_offsets[1:])):
            params = {}
            for v in range(first, last):
                if names[v] is not None:
                    if names[v] in params:
                        raise ValueError(f"graph {g}: parameter {names[v]!r} has two nodes")
                    params[names[v]] = decoded[v]
            results.append(params)
        return results

    def forward(
        self, graphs: Sequence[ComputationalGraph] | SweepPlan, sweep: str = "level"
    ) -> list[dict[str, Tensor]]:
        plan = graphs if isinstance(graphs, SweepPlan) else plan_sweep(graphs, self.virtual_edges)
        states = self.propagate(plan, self.embed(plan), sweep)
        return self.decode(plan, self.norm(states))


# ---------------------------------------------------------------------------------------------
# Running a network with predicted parameters


def functional_parameters(module: nn.Module, predicted: dict[str, Tensor]) -> dict[str, Tensor]:
    """The predicted tensors reshaped to ``module``'s parameters, ready for functional_call.

    Raises:
        ValueError: a parameter of the module without a prediction, a prediction for a name the
            module does not have, or a prediction whose size differs from the parameter's.
    """
    own = dict(module.named_parameters())
    missing = sorted(set(own) - set(predicted))
    if missing:
        raise ValueError(f"predicted parameters miss {len(missing)} of the module's: {missing[:5]}")
    unknown = sorted(set(predicted) - set(own))
    if unknown:
        raise ValueError(f"predicted parameters name what the module lacks: {unknown[:5]}")
    out = {}
    for name, param in own.items():
        tensor = predicted[name]
        if tensor.numel() != param.numel():
            raise ValueError(
                f"prediction for {name} has {tensor.numel()} elements, the parameter "
                f"{tuple(param.shape)} has {param.numel()}"
            )
        out[name] = tensor.reshape(param.shape)
    return out


def functional_forward(module: nn.Module, predicted: dict[str, Tensor], *inputs: Tensor) -> Tensor:
    """``module(*inputs)`` with the predicted parameters in place of its own, differentiably
    (through :func:`torch.func.functional_call`; buffers such as batch-norm statistics stay the
    module's)."""
    return torch.func.functional_call(module, functional_parameters(module, predicted), inputs)


@torch.no_grad()
def load_parameters(module: nn.Module, predicted: dict[str, Tensor]) -> nn.Module:
    """Copy the predicted parameters into ``module`` (detached) and return it."""
    for name, tensor in functional_parameters(module, predicted).items():
        module.get_parameter(name).copy_(tensor)
    return module


# ---------------------------------------------------------------------------------------------
# Training


@dataclass
class TrainConfig:
    """How :func:`train` fits a GHN.

    Attributes:
        epochs: passes over the training architectures.
        meta_batch: architectures per step; each sees the same batch of images.
        batch_size: images per step.
        lr, weight_decay: of AdamW.
        grad_clip: the largest gradient norm of a step.
        warmup_fraction: share of the steps with a linear warm-up before the cosine decay.
        seed: architecture order and image order come from it (and the epoch).
        device: where the GHN and the networks run.
        checkpoint: path written atomically after every epoch, or None.
        resume: continue from ``checkpoint`` when it exists.
        progress: show a tqdm bar.
    """

    epochs: int = 10
    meta_batch: int = 8
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 1e-5
    grad_clip: float = 5.0
    warmup_fraction: float = 0.05
    seed: int = 0
    device: str = "cpu"
    checkpoint: str | None = None
    resume: bool = False
    progress: bool = True

    def __post_init__(self):
        for name in ("epochs", "meta_batch", "batch_size", "seed"):
            value, low = getattr(self, name), 0 if name in ("epochs", "seed") else 1
            if not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        for name in ("lr", "grad_clip"):
            value = getattr(self, name)
            if not (value > 0 and math.isfinite(value)):
                raise ValueError(f"{name} must be positive and finite, got {value}")
        if not 0.0 <= self.warmup_fraction < 1.0:
            raise ValueError(f"warmup_fraction must lie in [0, 1), got {self.warmup_fraction}")
        if self.resume and not self.checkpoint:
            raise ValueError("resume needs a checkpoint path")
        try:
            torch.device(self.device)
        except RuntimeError as error:
            raise ValueError(f"device: {error}") from error


def _order(count: int, seed: int, epoch: int, salt: int) -> list[int]:
    # Depends on the seed, the epoch and what is ordered alone, so a resumed run repeats it.
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch * 7 + salt)
    return torch.randperm(count, generator=generator).tolist()


def meta_batch_loss(
    ghn: nn.Module, nets: Sequence[nn.Module], plan: SweepPlan, images: Tensor, labels: Tensor
) -> Tensor:
    """Mean cross-entropy of the networks of a meta-batch, each run with the parameters the
    GHN predicts for it on the same images. Differentiable in the GHN's parameters."""
    predictions = ghn(plan)
    losses = [
        nn.functional.cross_entropy(functional_forward(net, params, images), labels)
        for net, params in zip(nets, predictions)
    ]
    return torch.stack(losses).mean()


def train(
    ghn: GHN2,
    config: TrainConfig,
    nets: Sequence[nn.Module],
    graphs: Sequence[ComputationalGraph],
    images: Tensor,
    labels: Tensor,
    name: str = "GHN-2",
) -> dict:
    """Train a GHN to predict the parameters of ``nets`` from their graphs.

    Each step takes ``meta_batch`` architectures and a batch of images; the loss is the mean
    cross-entropy of the networks run with the predicted parameters (batch norm in training
    mode). AdamW with warm-up and cosine decay, gradient clipping. Under ``torch.distributed``
    the GHN is wrapped in DistributedDataParallel and each process takes its share of every
    epoch's meta-batches; the first process writes the checkpoint.

    Args:
        ghn: the hypernetwork; trained in place, moved to ``config.device``.
        config: the settings.
        nets, graphs: the training architectures as modules and their computational graphs.
        images (Tensor[N, C, H, W]), labels (Tensor[N] int64): the training images.
        name: label of the progress bar and log lines.

    Returns:
        dict with ``train_loss`` of the last epoch, ``epochs``, ``start_epoch``, ``seconds``
        and ``history`` (one record per epoch).

    Raises:
        ValueError: no architectures, nets and graphs of different lengths, images and labels
            that disagree, or a loss that is not finite.
    """
    if not nets or len(nets) != len(graphs):
        raise ValueError(
            f"nets and graphs must be non-empty and of equal length, got {len(nets)} and "
            f"{len(graphs)}"
        )
    if images.shape[0] != labels.shape[0] or images.shape[0] < 2:
        raise ValueError("images and labels must hold the same number (at least 2) of examples")
    device = torch.device(config.device)
    rank, world = rank_and_world()
    ghn.to(device)
    for net in nets:
        net.to(device).train()
    images, labels = images.to(device), labels.to(device)
    model = data_parallel(ghn, device, world)
    optimizer = torch.optim.AdamW(ghn.parameters(), lr=config.lr, weight_decay=config.weight_decay)

    per_epoch = math.ceil(math.ceil(len(nets) / config.meta_batch) / world)
    start_epoch, history = 0, []
    if config.resume and config.checkpoint and os.path.exists(config.checkpoint):
        state = torch.load(config.checkpoint, map_location=device, weights_only=True)
        ghn.load_state_dict(state["ghn"])
        optimizer.load_state_dict(state["optimizer"])
        start_epoch, history = int(state["epoch"]), list(state["history"])
        logger.info("resumed %s from %s after epoch %d", name, config.checkpoint, start_epoch)

    started = time.perf_counter()
    total_steps = max(1, config.epochs * per_epoch)
    bar = progress_bar(
        (config.epochs - start_epoch) * per_epoch, name, config.progress and rank == 0
    )
    try:
        for epoch in range(start_epoch, config.epochs):
            order = _order(len(nets), config.seed, epoch, salt=1)
            batches = [
                order[i : i + config.meta_batch] for i in range(0, len(order), config.meta_batch)
            ]
            mine = [batches[(s * world + rank) % len(batches)] for s in range(per_epoch)]
            image_order = torch.tensor(_order(images.shape[0], config.seed, epoch, salt=2))
            sums = torch.zeros(2, dtype=torch.float64, device=device)
            for step, chosen in enumerate(mine):
                lr = warmup_cosine(
                    config.lr, config.warmup_fraction, epoch * per_epoch + step, total_steps
                )
                for group in optimizer.param_groups:
                    group["lr"] = lr
                first = (step * config.batch_size) % images.shape[0]
                pick = image_order[first : first + config.batch_size].to(device)
                if pick.numel() < 2:
                    pick = image_order[: config.batch_size].to(device)
                plan = plan_sweep([graphs[i] for i in chosen], ghn.virtual_edges)
                loss = meta_batch_loss(
                    model, [nets[i] for i in chosen], plan, images[pick], labels[pick]
                )
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(ghn.parameters(), config.grad_clip)
                optimizer.step()
                sums += torch.tensor(
                    [float(loss.detach()), 1.0], dtype=torch.float64, device=device
                )
                bar.update(1)
                bar.set_postfix(loss=f"{float(loss.detach()):.3f}")
            if world > 1:
                torch.distributed.all_reduce(sums)
            mean_loss = float(sums[0] / sums[1].clamp(min=1))
            if not math.isfinite(mean_loss):
                raise ValueError(
                    f"{name}: the training loss is not finite in epoch {epoch + 1}; lower the "
                    f"learning rate (now {config.lr})"
                )
            history.append({"epoch": epoch + 1, "train_loss": mean_loss})
            logger.info("%s epoch %d/%d: loss %.4f", name, epoch + 1, config.epochs, mean_loss)
            if config.checkpoint:
                state = {
                    "epoch": epoch + 1,
                    "ghn": ghn.state_dict(),
                    "ghn_config": ghn.config,
                    "optimizer": optimizer.state_dict(),
                    "history": history,
                }
                save_on_first_rank(state, config.checkpoint, rank, world)
    finally:
        bar.close()
    return {
        "train_loss": history[-1]["train_loss"] if history else None,
        "epochs": config.epochs,
        "start_epoch": start_epoch,
        "seconds": time.perf_counter() - started,
        "history": history,
    }


def save_ghn(ghn: GHN2, path: str) -> None:
    """Write the GHN's weights and constructor settings atomically (a file :func:`load_ghn`
    reads, as do the checkpoints :func:`train` writes)."""
    save_atomic({"ghn": ghn.state_dict(), "ghn_config": ghn.config}, path)


def load_ghn(path: str, map_location: str | torch.device = "cpu") -> GHN2:
    """A GHN from a file of :func:`save_ghn` or a training checkpoint.

    Raises:
        ValueError: a file that is not such a checkpoint (the message names the path).
    """
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except (RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as error:
        raise ValueError(f"{path}: not a readable GHN checkpoint ({error})") from error
    if not isinstance(state, dict) or "ghn" not in state or "ghn_config" not in state:
        raise ValueError(f"{path}: not a GHN checkpoint (expected the keys 'ghn' and 'ghn_config')")
    ghn = GHN2(**state["ghn_config"])
    ghn.load_state_dict(state["ghn"])
    return ghn


# ---------------------------------------------------------------------------------------------
# Evaluation


@torch.no_grad()
def recalibrate_batch_norm(net: nn.Module, images: Tensor, batch_size: int = 256) -> nn.Module:
    """Recompute the running statistics of every batch-norm layer from ``images``.

    Predicted and freshly drawn parameters come without statistics of their own; every column
    of the evaluation recomputes them the same way (a cumulative mean over the images), then
    evaluates in eval mode.
    """
    norms = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return net
    saved = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    net.train()
    for start in range(0, images.shape[0], batch_size):
        chunk = images[start : start + batch_size]
        if chunk.shape[0] > 1:
            net(chunk)
    for m, momentum in zip(norms, saved):
        m.momentum = momentum
    return net


@torch.no_grad()
def accuracy(net: nn.Module, images: Tensor, labels: Tensor, batch_size: int = 512) -> float:
    """Top-1 accuracy of ``net`` in eval mode."""
    net.eval()
    correct = 0
    for start in range(0, images.shape[0], batch_size):
        logits = net(images[start : start + batch_size])
        correct += int((logits.argmax(1) == labels[start : start + batch_size]).sum())
    return correct / max(1, images.shape[0])


def train_with_sgd(
    net: nn.Module,
    images: Tensor,
    labels: Tensor,
    epochs: int,
    lr: float = 0.05,
    batch_size: int = 64,
    seed: int = 0,
) -> nn.Module:
    """Train ``net`` in place with SGD (momentum 0.9, weight decay 5e-4, cosine schedule)."""
    optimizer = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    steps = max(1, epochs * math.ceil(images.shape[0] / batch_size))
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    net.train()
    for epoch in range(epochs):
        order = _order(images.shape[0], seed, epoch, salt=3)
        for batch in batches_of(order, batch_size):
            index = torch.tensor(batch, device=images.device)
            loss = nn.functional.cross_entropy(net(images[index]), labels[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    return net


# ---------------------------------------------------------------------------------------------
# deepkern ghn predict

ARCHITECTURES = ("resnet18", "resnet34", "resnet50", "resnet101")


def add_predict_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``deepkern ghn predict``."""
    parser.description = (
        "Predict all parameters of a named network with a GHN-2 in one forward pass and print "
        "the time it took (graph extraction and prediction separately)."
    )
    parser.add_argument("--arch", required=True, choices=ARCHITECTURES, help="the network")
    parser.add_argument(
        "--checkpoint", help="a trained GHN (deepkern reproduce ghn --out writes ghn.pt)"
    )
    parser.add_argument("--num-classes", type=int, default=10, help="outputs (default 10)")
    parser.add_argument("--in-channels", type=int, default=3, help="image channels (default 3)")
    parser.add_argument(
        "--resnet50-sgd", action="store_true", help="train ResNet-50 with SGD too (slow on a CPU)"
    )
    parser.add_argument("--image-size", type=int, default=32, help="image side (default 32)")
    parser.add_argument("--repeats", type=int, default=5, help="timed predictions (default 5)")
    parser.add_argument("--threads", type=int, help="CPU threads of PyTorch (default: torch's)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    parser.add_argument("--save", help="write the predicted state_dict here (torch.save)")


def run_predict(args: argparse.Namespace) -> int:
    """``deepkern ghn predict``: build the network, extract its graph, predict, time, print."""
    from deepkern.data.compgraph import graph_of
    from deepkern.models import resnet

    for name in ("num_classes", "in_channels", "image_size", "repeats"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1")
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be at least 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device}: no CUDA device is available")

    if args.checkpoint:
        model = load_ghn(args.checkpoint, map_location=device)
        source = args.checkpoint
    else:
        torch.manual_seed(0)
        model = GHN2()
        source = "no checkpoint: an untrained GHN-2 (timing only; pass --checkpoint)"
    model.to(device).eval()
    net = getattr(resnet, args.arch)(num_classes=args.num_classes, in_channels=args.in_channels)
    example = torch.randn(1, args.in_channels, args.image_size, args.image_size)

    started = time.perf_counter()
    graph = graph_of(net, example)
    extraction = time.perf_counter() - started
    seconds = []
    for _ in range(args.repeats):
        _synchronise(device)
        started = time.perf_counter()
        with torch.no_grad():
            predicted = model([graph])[0]
        _synchronise(device)
        seconds.append(time.perf_counter() - started)
    load_parameters(net, {k: v.cpu() for k, v in predicted.items()})

    count = sum(p.numel() for p in net.parameters())
    print(f"GHN-2: {source}")
    print(
        f"{args.arch}: {count:,} parameters in {len(predicted)} tensors; graph of "
        f"{graph.num_nodes} nodes, {graph.edges.shape[1]} edges "
        f"({int((graph.edge_lengths > 1).sum())} virtual), {int(graph.levels.max()) + 1} levels"
    )
    print(f"graph extraction: {extraction:.3f} s")
    print(
        f"prediction ({device}, {torch.get_num_threads()} threads): first {seconds[0]:.3f} s, "
        f"median of {len(seconds)} {sorted(seconds)[len(seconds) // 2]:.3f} s"
    )
    if args.save:
        save_atomic(net.state_dict(), args.save)
        print(f"wrote {args.save}")
    return 0


def _synchronise(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------------------------
# deepkern reproduce ghn

# The paper's headline on CIFAR-10 (abstract): all 24 million parameters of a ResNet-50
# predicted in one pass reach about 60 % accuracy with no training; chance is 10 %.
PAPER_RESNET50_PREDICTED = 60.0
TEST_SPLITS = ("test", "wide", "deep", "dense", "bn_free")


@dataclass
class _Settings:
    """What ``deepkern reproduce ghn`` trains and measures."""

    train_archs: int = 128
    test_archs: int = 8
    test_splits: tuple[str, ...] = ("test",)
    resnet50: bool = True
    resnet50_sgd: bool = False
    image_size: int = 8
    channels: int | None = 8
    max_nodes: int | None = 120
    hidden: int = 32
    max_shape: tuple[int, ...] = (16, 16, 3, 3)
    rounds: int = 1
    epochs: int = 25
    meta_batch: int = 4
    batch_size: int = 64
    lr: float = 5e-3
    sgd_epochs: int = 5
    sgd_lr: float = 0.05
    seed: int = 0
    device: str = "cpu"
    threads: int | None = 1
    checkpoint_dir: str | None = None
    resume: bool = False


_DEFAULTS = _Settings()
_QUICK = _Settings(
    train_archs=8, test_archs=2, resnet50=False, channels=4, hidden=8, max_shape=(8, 8, 3, 3),
    epochs=2, meta_batch=4, batch_size=32, sgd_epochs=2, threads=None,
)  # fmt: skip
_FULL = _Settings(
    train_archs=20_000, test_archs=100, test_splits=TEST_SPLITS, image_size=32, channels=None,
    max_nodes=None, hidden=64,
    max_shape=(64, 64, 3, 3), epochs=100, meta_batch=8, batch_size=64, lr=1e-3, sgd_epochs=50,
    resnet50_sgd=True, threads=None,
)  # fmt: skip


def add_reproduce_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``deepkern reproduce ghn``.

    By default a GHN-2 trains on 128 generated architectures (train split, 8 channels, graphs
    of at most 120 nodes) with scikit-learn's 8x8 digits for 25 epochs (800 steps) on one CPU
    thread, and is tested on 8 held-out architectures within the same limits: accuracy with
    predicted parameters against random initialisation, one epoch of SGD and five; and on
    ResNet-50 (predicted against random initialisation; ``--resnet50-sgd`` adds its SGD
    columns, slow on a CPU). ``--full`` trains on 20000 architectures of any size with digits
    upsampled to 32x32 and tests every split (a GPU when there is one); ``--quick`` runs in
    seconds.
    """
    parser.description = (
        "Parameter prediction for unseen architectures with GHN-2 (Knyazev et al. 2021): "
        "accuracy on held-out architectures and ResNet-50 with predicted parameters, beside "
        "random initialisation and SGD."
    )
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="a run of seconds (for tests)")
    size.add_argument("--full", action="store_true", help="the full-size run, for a GPU")
    d = _DEFAULTS
    parser.add_argument("--train-archs", type=int, help=f"training architectures ({d.train_archs})")
    parser.add_argument(
        "--test-archs", type=int, help=f"architectures per test split ({d.test_archs})"
    )
    parser.add_argument(
        "--test-splits", nargs="+", choices=TEST_SPLITS, help="splits to test (test)"
    )
    parser.add_argument(
        "--no-resnet50",
        dest="resnet50",
        action="store_const",
        const=False,
        default=None,
        help="skip ResNet-50",
    )
    parser.add_argument(
        "--resnet50-sgd", action="store_true", help="train ResNet-50 with SGD too (slow on a CPU)"
    )
    parser.add_argument("--image-size", type=int, help=f"side of the digits ({d.image_size})")
    parser.add_argument(
        "--channels", type=int, help=f"width of the generated networks ({d.channels})"
    )
    parser.add_argument(
        "--max-nodes", type=int, help=f"largest graph of a generated network ({d.max_nodes})"
    )
    parser.add_argument("--hidden", type=int, help=f"GHN state size ({d.hidden})")
    parser.add_argument(
        "--max-shape", type=int, nargs=4, help="decoder block out in k k (16 16 3 3)"
    )
    parser.add_argument("--rounds", type=int, help=f"forward-backward sweeps ({d.rounds})")
    parser.add_argument("--epochs", type=int, help=f"GHN training epochs ({d.epochs})")
    parser.add_argument("--meta-batch", type=int, help=f"architectures per step ({d.meta_batch})")
    parser.add_argument("--batch-size", type=int, help=f"images per step ({d.batch_size})")
    parser.add_argument("--lr", type=float, help=f"GHN learning rate ({d.lr})")
    parser.add_argument(
        "--sgd-epochs", type=int, help=f"epochs of the converged SGD column ({d.sgd_epochs})"
    )
    parser.add_argument(
        "--sgd-lr", type=float, help=f"learning rate of the SGD columns ({d.sgd_lr})"
    )
    parser.add_argument("--seed", type=int, help="seed of architectures and training (0)")
    parser.add_argument("--device", help="cpu, cuda or cuda:N (default cpu)")
    parser.add_argument("--threads", type=int, help="CPU threads of PyTorch (default 1)")
    parser.add_argument("--checkpoint-dir", help="write ghn.pt here after every epoch")
    parser.add_argument("--resume", action="store_true", help="continue from the checkpoint")
    parser.add_argument("--out", help="write ghn.json (settings, table, training) here")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def _check_settings(settings: _Settings) -> None:
    """Refuse settings that cannot run, before any work is done."""
    lows = {"train_archs": 1, "test_archs": 1, "image_size": 1, "hidden": 4, "rounds": 1}
    lows.update({"epochs": 0, "meta_batch": 1, "batch_size": 2, "sgd_epochs": 1, "seed": 0})
    for name, low in lows.items():
        value = getattr(settings, name)
        if value < low:
            raise ValueError(f"--{name.replace('_', '-')} must be at least {low}, got {value}")
    if settings.max_nodes is not None and settings.max_nodes < 2:
        raise ValueError(f"--max-nodes must be at least 2, got {settings.max_nodes}")
    if settings.hidden % 4:
        raise ValueError(f"--hidden must be a multiple of 4, got {settings.hidden}")
    if len(settings.max_shape) != 4 or min(settings.max_shape) < 1:
        raise ValueError(f"--max-shape needs four positive sizes, got {settings.max_shape}")
    if settings.max_shape[2] != settings.max_shape[3]:
        raise ValueError(f"--max-shape must have a square kernel, got {settings.max_shape}")
    for name in ("lr", "sgd_lr"):
        value = getattr(settings, name)
        if not (value > 0 and math.isfinite(value)):
            raise ValueError(f"--{name.replace('_', '-')} must be positive and finite, got {value}")
    if settings.threads is not None and settings.threads < 1:
        raise ValueError(f"--threads must be at least 1, got {settings.threads}")
    try:
        device = torch.device(settings.device)
    except RuntimeError as error:
        raise ValueError(f"--device: {error}") from error
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {settings.device}: no CUDA device is available")


def _architecture_pool(
    split: str,
    count: int,
    seed: int,
    image_size: int,
    channels: int | None = None,
    max_nodes: int | None = None,
):
    """Generated architectures of a split as (genotypes, networks, graphs).

    A genotype whose network cannot be built or read as a graph at this image size is passed
    over (logged), and so is one whose graph has more than ``max_nodes`` nodes; the next one is
    taken, so that the pool holds ``count`` networks. Genotypes are drawn in growing batches
    (the generator gives the same first genotypes for a larger count).

    Raises:
        ValueError: fewer than ``count`` such networks among ``64 * count`` genotypes.
    """
    from deepkern.data.architectures import architectures, build_network
    from deepkern.data.compgraph import graph_of

    genotypes, nets, graphs = [], [], []
    seen, drawn = 0, 2 * count
    while len(nets) < count and seen < 64 * count:
        batch = architectures(split, drawn, seed)
        for i in range(seen, len(batch)):
            genotype = batch[i]
            torch.manual_seed(seed * 100_003 + i)  # the network's random initialisation
            try:
                net = build_network(genotype, 10, 1, image_size, channels=channels)
                # Every parameter tensor is a node: a cheap lower bound before tracing.
                if max_nodes is not None and len(list(net.parameters())) > max_nodes:
                    continue
                graph = graph_of(net, torch.zeros(2, 1, image_size, image_size))
            except ValueError as error:
                logger.warning("%s architecture %d passed over: %s", split, i, error)
                continue
            if max_nodes is not None and graph.num_nodes > max_nodes:
                continue
            genotypes.append(genotype)
            nets.append(net)
            graphs.append(graph)
            if len(nets) == count:
                return genotypes, nets, graphs
        seen, drawn = len(batch), 2 * drawn
    limit = "" if max_nodes is None else f" of at most {max_nodes} nodes"
    raise ValueError(
        f"only {len(nets)} of {seen} {split} architectures build{limit} at image size "
        f"{image_size}; {count} were asked for"
    )


def _resnet50_pool(seed: int, image_size: int):
    from deepkern.data.compgraph import graph_of
    from deepkern.models.resnet import resnet50

    net = resnet50(num_classes=10, in_channels=1, generator=torch.Generator().manual_seed(seed))
    return [None], [net], [graph_of(net, torch.zeros(2, 1, image_size, image_size))]


def _evaluate_pool(ghn_model: GHN2, nets, graphs, data, settings: _Settings, sgd=True) -> dict:
    """Mean accuracy (percent) of the networks with predicted parameters, at random
    initialisation, after one epoch of SGD and after ``sgd_epochs`` of SGD."""
    import copy

    x_train, y_train, x_test, y_test = data
    calibration = x_train[:512]
    columns: dict[str, list[float]] = {"random": [], "predicted": [], "sgd1": [], "sgd": []}
    ghn_model.eval()
    for i, (net, graph) in enumerate(zip(nets, graphs)):
        with torch.no_grad():
            predicted = ghn_model([graph])[0]
        with_predicted = load_parameters(copy.deepcopy(net), predicted)
        recalibrate_batch_norm(with_predicted, calibration)
        columns["predicted"].append(accuracy(with_predicted, x_test, y_test))
        initial = recalibrate_batch_norm(copy.deepcopy(net), calibration)
        columns["random"].append(accuracy(initial, x_test, y_test))
        for key, epochs in (("sgd1", 1), ("sgd", settings.sgd_epochs)) if sgd else ():
            trained = train_with_sgd(
                copy.deepcopy(net),
                x_train,
                y_train,
                epochs,
                settings.sgd_lr,
                seed=settings.seed + i,
            )
            columns[key].append(accuracy(trained, x_test, y_test))
    means = {key: 100.0 * sum(v) / len(v) if v else None for key, v in columns.items()}
    return means | {"count": len(nets)}


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}%"


def _resolve(args: argparse.Namespace) -> _Settings:
    """The settings of a run: the size picked, command-line overrides, checked."""
    from deepkern.models.training import settings_from_arguments

    settings = settings_from_arguments(args, _DEFAULTS, _QUICK, _FULL)
    # settings_from_arguments passes over False values; --no-resnet50 is one.
    if getattr(args, "resnet50", None) is False:
        settings.resnet50 = False
    settings.max_shape = tuple(settings.max_shape)
    _check_settings(settings)
    return settings


def run_reproduce(args: argparse.Namespace) -> int:
    """``deepkern reproduce ghn``: train a GHN-2, test it on held-out architectures, print."""
    from deepkern.models.training import process_group

    settings = _resolve(args)
    if settings.threads is not None:
        torch.set_num_threads(settings.threads)
    with process_group(settings):
        return _reproduce(args, settings)


def _reproduce(args: argparse.Namespace, settings: _Settings) -> int:
    import dataclasses

    from deepkern.data.images import load_digits_split
    from deepkern.models.training import environment, write_json

    rank, _ = rank_and_world()
    started = time.perf_counter()
    device = torch.device(settings.device)
    data = load_digits_split(seed=settings.seed, size=settings.image_size)
    _, nets, graphs = _architecture_pool(
        "train",
        settings.train_archs,
        settings.seed,
        settings.image_size,
        settings.channels,
        settings.max_nodes,
    )
    if rank == 0:
        sizes = [sum(p.numel() for p in n.parameters()) for n in nets]
        nodes = [g.num_nodes for g in graphs]
        print(
            f"scikit-learn digits at {settings.image_size}x{settings.image_size} "
            f"({data[0].shape[0]} train, {data[2].shape[0]} test images); GHN-2 of "
            f"{settings.hidden} units trained on {len(nets)} generated architectures "
            f"({min(nodes)}-{max(nodes)} nodes, {min(sizes):,}-{max(sizes):,} parameters) for "
            f"{settings.epochs} epochs, meta-batch {settings.meta_batch}"
        )

    torch.manual_seed(settings.seed)
    model = GHN2(settings.hidden, settings.max_shape, rounds=settings.rounds)
    checkpoint = None
    if settings.checkpoint_dir:
        checkpoint = os.path.join(settings.checkpoint_dir, "ghn.pt")
    config = TrainConfig(
        epochs=settings.epochs,
        meta_batch=settings.meta_batch,
        batch_size=settings.batch_size,
        lr=settings.lr,
        seed=settings.seed,
        device=settings.device,
        checkpoint=checkpoint,
        resume=settings.resume and checkpoint is not None,
        progress=not getattr(args, "no_progress", False),
    )
    training = train(model, config, nets, graphs, data[0], data[1])
    if rank != 0:
        return 0
    model.to(device)
    data = tuple(t.to(device) for t in data)

    rows = []
    for split in settings.test_splits:
        _, test_nets, test_graphs = _architecture_pool(
            split,
            settings.test_archs,
            10_000 + settings.seed,
            settings.image_size,
            settings.channels,
            settings.max_nodes,
        )
        scores = _evaluate_pool(
            model, [n.to(device) for n in test_nets], test_graphs, data, settings
        )
        rows.append({"split": split, **scores})
    if settings.resnet50:
        _, r50, r50_graph = _resnet50_pool(settings.seed, settings.image_size)
        scores = _evaluate_pool(
            model, [r50[0].to(device)], r50_graph, data, settings, sgd=settings.resnet50_sgd
        )
        rows.append({"split": "ResNet-50", **scores})

    header = (
        f"{'architectures':<14} {'nets':>5} {'random init':>12} {'GHN-2':>8} "
        f"{'SGD 1 ep':>9} {f'SGD {settings.sgd_epochs} ep':>10} {'paper GHN-2':>12}"
    )
    print(header)
    print("-" * len(header))
    for row in rows:
        paper = f"~{PAPER_RESNET50_PREDICTED:.0f}" if row["split"] == "ResNet-50" else "-"
        print(
            f"{row['split']:<14} {row['count']:>5} {row['random']:>11.1f}% "
            f"{row['predicted']:>7.1f}% {_percent(row['sgd1']):>9} {_percent(row['sgd']):>10} "
            f"{paper:>12}"
        )
    print(
        "test accuracy in percent, mean over the architectures of each split, on digits; the "
        "paper's figure is CIFAR-10 (ResNet-50 with predicted parameters, no training). Every "
        "column recomputes batch-norm statistics on 512 training images before evaluating."
    )
    print(
        f"GHN-2 training: {training['seconds']:.0f} s, last epoch loss "
        f"{training['train_loss'] if training['train_loss'] is not None else float('nan'):.3f}"
    )
    print(
        "full size (a GPU): deepkern reproduce ghn --full  (20000 architectures, digits at "
        "32x32, GHN of 64 units, 100 epochs, every test split)"
    )
    seconds = time.perf_counter() - started
    print(f"({seconds:.0f} s)")
    if getattr(args, "out", None):
        os.makedirs(args.out, exist_ok=True)
        save_ghn(model, os.path.join(args.out, "ghn.pt"))
        report = {
            "settings": dataclasses.asdict(settings),
            "rows": rows,
            "training": training,
            "paper_resnet50_predicted": PAPER_RESNET50_PREDICTED,
            "seconds": seconds,
            "environment": environment(settings.device),
        }
        path = os.path.join(args.out, "ghn.json")
        write_json(path, report)
        print(f"wrote {path} and {os.path.join(args.out, 'ghn.pt')}")
    return 0
