"""Reinforcement learning for the capacitated VRP (Nazari, Oroojlooy, Snyder and Takac 2018).

A policy builds a solution one node at a time: from the depot, it points at the next customer
to serve (or back at the depot to refill), given where every node is, what each customer
still needs and what the vehicle still carries. This module holds:

- :class:`VRPEnv`: the batched environment on tensors. Its mask allows exactly the feasible
  moves: a customer with demand left that fits in the load (any load above zero with split
  delivery), and the depot unless the vehicle stands there already with work left.
- :class:`NazariPolicy`: the paper's policy: 1-D convolution embeddings of the static
  (coordinates) and dynamic (demand, load) features, an LSTM or GRU decoder fed with the last
  node's embedding, an attention over the nodes giving a context, and a pointer over the
  nodes. :class:`Critic` is its learned baseline.
- :class:`AttentionPolicy`: the attention model of Kool, van Hoof and Welling (2019): a
  transformer encoder over the nodes and a decoder that queries it with the graph, the last
  node and the load; trained with a greedy-rollout or a shared (POMO-style) baseline.
- :func:`rollout`, :func:`beam_search`, :func:`solve`: greedy, sampled and beam-search
  decoding; every returned solution passes :func:`deepkern.data.routing.check_solution`.
- :func:`train` with :class:`VRPTrainConfig`: REINFORCE, checkpoints and resume, DDP.
- ``deepkern reproduce vrp`` and ``deepkern route INSTANCE`` (:func:`run_reproduce`,
  :func:`run_route`).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import logging
import math
import os
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from deepkern.data.routing import (
    NAZARI_CAPACITY,
    InfeasibleSolutionError,
    VRPBatch,
    check_solution,
    generate_vrp,
    routes_from_sequence,
)
from deepkern.models.training import (
    SilentBar,
    data_parallel,
    environment,
    process_group,
    progress_bar,
    rank_and_world,
    save_atomic,
    write_json,
)

__all__ = [
    "VRPEnv",
    "NazariPolicy",
    "AttentionPolicy",
    "Critic",
    "build_policy",
    "load_policy",
    "rollout",
    "beam_search",
    "solve",
    "Solutions",
    "VRPTrainConfig",
    "train",
    "add_reproduce_arguments",
    "run_reproduce",
    "add_route_arguments",
    "run_route",
]

logger = logging.getLogger("deepkern.models.vrp")


# ---------------------------------------------------------------------------------------------
# Environment


class VRPEnv:
    """A batch of CVRP instances being solved, one move per :meth:`step`.

    Node 0 is the depot. The vehicle starts there full; visiting a customer delivers its
    whole remaining demand (with ``split``, as much of it as the load allows); visiting the
    depot refills the vehicle. An instance whose customers are all served and whose vehicle
    is back at the depot is done; it may only "move" to the depot from then on, which costs
    nothing and has probability one under any policy.

    Args:
        batch: the instances; every demand must fit in the capacity.
        split: allow split delivery.

    Attributes:
        locs (Tensor[B, N + 1, 2]), capacity (Tensor[B]), demand (Tensor[B, N + 1]: what is
        left), load (Tensor[B]: what the vehicle carries), current (Tensor[B], int64).
    """

    def __init__(self, batch: VRPBatch, split: bool = False):
        if len(batch) and bool((batch.demands.max(1).values > batch.capacity).any()):
            raise ValueError("a demand exceeds the vehicle capacity: no feasible solution")
        if len(batch) and bool((batch.demands[:, 0] != 0).any()):
            raise ValueError("the depot (node 0) must have demand 0")
        self.locs = batch.locs.float()
        self.capacity = batch.capacity.to(self.locs.device, torch.float32)
        self.demand = batch.demands.to(self.locs.device, torch.float32).clone()
        self.load = self.capacity.clone()
        self.current = torch.zeros(len(batch), dtype=torch.int64, device=self.locs.device)
        self.split = split

    @property
    def batch_size(self) -> int:
        return self.locs.shape[0]

    def max_steps(self) -> int:
        """A bound on the moves any policy needs (every visit serves a customer fully or
        empties the vehicle; every trip visits a customer)."""
        n = self.locs.shape[1] - 1
        if not self.split:
            return 2 * n + 1
        trips = (self.demand.sum(1) / self.capacity).ceil().max() if self.batch_size else 0
        return 2 * (n + int(trips)) + 1

    def done(self) -> Tensor:
        """Tensor[B] bool: every customer served and the vehicle back at the depot."""
        return (self.demand[:, 1:] <= 0).all(1) & (self.current == 0)

    def mask(self) -> Tensor:
        """Tensor[B, N + 1] bool: True where the move is allowed."""
        left = self.demand > 0
        if self.split:
            allowed = left & (self.load > 0)[:, None]
        else:
            allowed = left & (self.demand <= self.load[:, None])
        all_served = ~left[:, 1:].any(1)
        # The depot is open unless the vehicle stands there with work left: staying put
        # would loop forever.
        allowed[:, 0] = (self.current != 0) | all_served
        return allowed

    def step(self, action: Tensor) -> Tensor:
        """Move every vehicle to ``action`` (Tensor[B], int64); returns the amount delivered.

        Raises:
            InfeasibleSolutionError: a move the mask forbids.
        """
        allowed = self.mask().gather(1, action[:, None]).squeeze(1)
        if not bool(allowed.all()):
            bad = int((~allowed).nonzero()[0, 0])
            raise InfeasibleSolutionError(
                f"instance {bad}: the move to node {int(action[bad])} is not allowed"
            )
        wanted = self.demand.gather(1, action[:, None]).squeeze(1)
        delivered = torch.minimum(wanted, self.load) if self.split else wanted
        at_depot = action == 0
        delivered = torch.where(at_depot, torch.zeros_like(delivered), delivered)
        self.demand = self.demand.scatter_add(1, action[:, None], -delivered[:, None])
        self.load = torch.where(at_depot, self.capacity, self.load - delivered)
        self.current = action
        return delivered

    def select(self, index: Tensor) -> VRPEnv:
        """A new environment made of rows ``index`` of this one (beam search reorders)."""
        other = copy.copy(self)
        for name in ("locs", "capacity", "demand", "load", "current"):
            setattr(other, name, getattr(self, name).index_select(0, index))
        return other

    def features(self) -> tuple[Tensor, Tensor]:
        """Demand left and load as fractions of the capacity: Tensor[B, N + 1], Tensor[B]."""
        return self.demand / self.capacity[:, None], self.load / self.capacity


# ---------------------------------------------------------------------------------------------
# Policies


def _masked_log_softmax(logits: Tensor, mask: Tensor) -> Tensor:
    return torch.log_softmax(logits.masked_fill(~mask, float("-inf")), dim=-1)


class NazariPolicy(nn.Module):
    """The policy network of Nazari et al. (2018).

    Static features (x, y) and dynamic features (demand left / capacity, load / capacity)
    are embedded separately by 1-D convolutions of width one (a linear map shared by all
    nodes). A recurrent cell (LSTM or GRU) reads the static embedding of the node last
    visited. An attention over the nodes, scored by ``v_a . tanh(W_a [s_i; d_i; h])``,
    gives a context ``c = sum_i a_i [s_i; d_i]``, and the pointer scores every node by
    ``v_c . tanh(W_c [s_i; d_i; c])``; infeasible nodes are masked out.

    Args:
        hidden: embedding and hidden size (128 in the paper).
        cell: ``"lstm"`` (the paper's) or ``"gru"``.
        dropout: dropout on the recurrent output during training (0.1 in the paper).

    Decoding runs through :meth:`encode` and :meth:`decode_step`; :func:`rollout` and
    :func:`beam_search` drive them. ``forward`` runs a whole rollout (see :func:`rollout`).

    NOTE: on the CPU, this policy's log-probabilities can differ in the last bits between the
    first and later training runs in one process (the cause is not traced); a run resumed in
    a fresh process then follows the uninterrupted one closely rather than exactly. The
    attention model resumes exactly.
    """

    kind = "nazari"

    def __init__(self, hidden: int = 128, cell: str = "lstm", dropout: float = 0.1):
        super().__init__()
        if hidden < 1:
            raise ValueError(f"hidden must be at least 1, got {hidden}")
        if cell not in ("lstm", "gru"):
            raise ValueError(f"cell must be 'lstm' or 'gru', got {cell!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.args = {"hidden": hidden, "cell": cell, "dropout": dropout}
        self.hidden, self.cell_kind = hidden, cell
        # A width-one 1-D convolution over the nodes is a linear map shared by all nodes; it
        # is computed as one.
        self.static_embed = nn.Linear(2, hidden)
        self.dynamic_embed = nn.Linear(2, hidden)
        self.cell = nn.LSTMCell(hidden, hidden) if cell == "lstm" else nn.GRUCell(hidden, hidden)
        self.dropout = nn.Dropout(dropout)
        self.attn_nodes = nn.Linear(2 * hidden, hidden, bias=False)
        self.attn_query = nn.Linear(hidden, hidden)
        self.attn_v = nn.Parameter(torch.empty(hidden).uniform_(-0.1, 0.1))
        self.point_nodes = nn.Linear(2 * hidden, hidden, bias=False)
        self.point_context = nn.Linear(2 * hidden, hidden)
        self.point_v = nn.Parameter(torch.empty(hidden).uniform_(-0.1, 0.1))

    def encode(self, env: VRPEnv) -> dict:
        """What stays fixed over the decoding: static embeddings, the first recurrent state."""
        static = self.static_embed(env.locs)
        zeros = static.new_zeros(env.batch_size, self.hidden)
        state = {"static": static, "h": zeros}
        if self.cell_kind == "lstm":
            state["c"] = zeros
        return state

    def decode_step(self, state: dict, env: VRPEnv) -> tuple[Tensor, dict]:
        """Log-probabilities (Tensor[B, N + 1]) of the next node, and the next state."""
        static = state["static"]
        demand, load = env.features()
        dynamic_in = torch.stack([demand, load[:, None].expand_as(demand)], dim=-1)
        nodes = torch.cat([static, self.dynamic_embed(dynamic_in)], dim=-1)
        last = static.gather(1, env.current[:, None, None].expand(-1, 1, self.hidden))[:, 0]

        if self.cell_kind == "lstm":
            h, c = self.cell(last, (state["h"], state["c"]))
            new_state = {"static": static, "h": h, "c": c}
        else:
            h = self.cell(last, state["h"])
            new_state = {"static": static, "h": h}
        query = self.dropout(h)

        scores = torch.tanh(self.attn_nodes(nodes) + self.attn_query(query)[:, None]) @ self.attn_v
        context = (torch.softmax(scores, dim=1)[:, :, None] * nodes).sum(1)
        pointer = self.point_nodes(nodes) + self.point_context(context)[:, None]
        logits = torch.tanh(pointer) @ self.point_v
        return _masked_log_softmax(logits, env.mask()), new_state

    def forward(self, batch: VRPBatch, decode: str = "sample", split: bool = False, **kwargs):
        """A full rollout: see :func:`rollout` (the arguments are the same)."""
        return rollout(self, batch, decode=decode, split=split, **kwargs)


class AttentionPolicy(nn.Module):
    """The attention model of Kool, van Hoof and Welling (2019) for the CVRP.

    The encoder embeds the depot (x, y) and each customer (x, y, demand / capacity)
    linearly and runs ``layers`` transformer layers (multi-head self-attention and a feed
    forward layer, each with a skip connection; layer norm stands where the paper has batch
    norm). The decoder's query at each step is the mean node embedding plus a projection of
    the last node's embedding and the load left; a multi-head glimpse over the nodes that
    are still allowed refines it, and single-head compatibilities clipped by ``10 tanh``
    give the logits.

    Args:
        hidden: embedding size (128 in the paper).
        layers: encoder layers (3 in the paper).
        heads: attention heads (8 in the paper).
        clip: the tanh clipping of the logits (10 in the paper).
    """

    kind = "attention"
    static_state = True  # decode_step never changes the encoder's state

    def __init__(self, hidden: int = 128, layers: int = 3, heads: int = 8, clip: float = 10.0):
        super().__init__()
        if hidden < 1 or layers < 0 or heads < 1 or hidden % heads:
            raise ValueError(
                f"hidden must be a positive multiple of heads and layers >= 0, got "
                f"hidden={hidden}, heads={heads}, layers={layers}"
            )
        self.args = {"hidden": hidden, "layers": layers, "heads": heads, "clip": clip}
        self.hidden, self.heads, self.clip = hidden, heads, clip
        self.depot_embed = nn.Linear(2, hidden)
        self.node_embed = nn.Linear(3, hidden)
        self.encoder = nn.ModuleList(
            nn.TransformerEncoderLayer(
                hidden, heads, 4 * hidden, dropout=0.0, batch_first=True, norm_first=False
            )
            for _ in range(layers)
        )
        self.graph_query = nn.Linear(hidden, hidden, bias=False)
        self.step_query = nn.Linear(hidden + 1, hidden, bias=False)
        self.glimpse_kv = nn.Linear(hidden, 2 * hidden, bias=False)
        self.logit_key = nn.Linear(hidden, hidden, bias=False)
        self.glimpse_out = nn.Linear(hidden, hidden, bias=False)

    def encode(self, env: VRPEnv) -> dict:
        demand, _ = env.features()
        customers = torch.cat([env.locs[:, 1:], demand[:, 1:, None]], dim=-1)
        x = torch.cat([self.depot_embed(env.locs[:, :1]), self.node_embed(customers)], dim=1)
        for layer in self.encoder:
            x = layer(x)
        glimpse_key, glimpse_value = self.glimpse_kv(x).chunk(2, dim=-1)
        return {
            "nodes": x,
            "graph": self.graph_query(x.mean(1)),
            "glimpse_key": glimpse_key,
            "glimpse_value": glimpse_value,
            "logit_key": self.logit_key(x),
        }

    def _heads(self, x: Tensor) -> Tensor:
        # [B, M, H] -> [B, heads, M, H / heads]
        b, m, _ = x.shape
        return x.view(b, m, self.heads, -1).transpose(1, 2)

    def decode_step(self, state: dict, env: VRPEnv) -> tuple[Tensor, dict]:
        nodes = state["nodes"]
        _, load = env.features()
        last = nodes.gather(1, env.current[:, None, None].expand(-1, 1, self.hidden))[:, 0]
        query = state["graph"] + self.step_query(torch.cat([last, load[:, None]], dim=-1))
        mask = env.mask()

        q = self._heads(query[:, None])
        k, v = self._heads(state["glimpse_key"]), self._heads(state["glimpse_value"])
        compat = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
        compat = compat.masked_fill(~mask[:, None, None, :], float("-inf"))
        glimpse = (torch.softmax(compat, dim=-1) @ v).transpose(1, 2).reshape(-1, self.hidden)
        glimpse = self.glimpse_out(glimpse)

        logits = (state["logit_key"] @ glimpse[:, :, None])[:, :, 0] / math.sqrt(self.hidden)
        logits = self.clip * torch.tanh(logits)
        return _masked_log_softmax(logits, mask), state

    def forward(self, batch: VRPBatch, decode: str = "sample", split: bool = False, **kwargs):
        """A full rollout: see :func:`rollout`."""
        return rollout(self, batch, decode=decode, split=split, **kwargs)


class Critic(nn.Module):
    """The learned baseline of Nazari et al.: the expected tour length of an instance.

    Node features (x, y, demand / capacity) are embedded by a width-one convolution (a linear
    map shared by the nodes), pooled
    by an attention whose query is their mean, and read out by a two-layer MLP.
    NOTE: the paper's critic runs several attention glimpses; one glimpse is used here.
    """

    def __init__(self, hidden: int = 128):
        super().__init__()
        self.embed = nn.Linear(3, hidden)
        self.score = nn.Linear(2 * hidden, 1)
        self.head = nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 1))

    def forward(self, batch: VRPBatch) -> Tensor:
        """Tensor[B]: the predicted tour length of every instance."""
        ratio = batch.demands.float() / batch.capacity.float()[:, None]
        features = torch.cat([batch.locs.float(), ratio[:, :, None]], dim=-1)
        x = self.embed(features)
        mean = x.mean(1, keepdim=True).expand_as(x)
        weights = torch.softmax(self.score(torch.cat([x, mean], dim=-1)), dim=1)
        return self.head((weights * x).sum(1))[:, 0]


_POLICIES = {"nazari": NazariPolicy, "attention": AttentionPolicy}


def build_policy(kind: str, seed: int | None = None, **args) -> nn.Module:
    """A fresh policy: ``"nazari"`` or ``"attention"`` with its constructor arguments.

    Args:
        kind: the model.
        seed: seeds the initial weights without touching the global random state; None
            draws them from the global generator.
        args: the constructor's arguments.

    Example:
        >>> policy = build_policy("attention", seed=0, hidden=64, layers=2, heads=4)
    """
    if kind not in _POLICIES:
        raise ValueError(f"model must be one of {', '.join(_POLICIES)}, got {kind!r}")
    if seed is None:
        return _POLICIES[kind](**args)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _POLICIES[kind](**args)


# ---------------------------------------------------------------------------------------------
# Decoding


@dataclass
class Solutions:
    """Decoded solutions of a batch.

    Attributes:
        actions (Tensor[B, T], int64): nodes visited after leaving the depot; finished
            instances pad with the depot.
        delivered (Tensor[B, T]): the amount delivered at every move.
        log_prob (Tensor[B]): log-probability of the sequence under the policy (carries
            gradients from :func:`rollout` in training).
        cost (Tensor[B]): Euclidean tour length from the coordinates given.
    """

    actions: Tensor
    delivered: Tensor
    log_prob: Tensor
    cost: Tensor

    def routes(self, index: int) -> tuple[list[list[int]], list[list[float]]]:
        """Routes of instance ``index`` and the amounts delivered on them."""
        sequence = [0] + self.actions[index].tolist()
        amounts = [0.0] + self.delivered[index].tolist()
        routes = routes_from_sequence(sequence)
        deliveries, current = [], []
        for node, amount in zip(sequence[1:], amounts[1:]):
            if node == 0:
                if current:
                    deliveries.append(current)
                current = []
            else:
                current.append(amount)
        return routes, deliveries

    def check(self, batch: VRPBatch, split: bool) -> None:
        """Raise :class:`InfeasibleSolutionError` unless every solution is feasible."""
        for i in range(len(batch)):
            routes, deliveries = self.routes(i)
            capacity = float(batch.capacity[i])
            try:
                check_solution(routes, batch.demands[i], capacity, deliveries if split else None)
            except InfeasibleSolutionError as error:
                raise InfeasibleSolutionError(f"instance {i}: {error}") from error


def tour_cost(locs: Tensor, actions: Tensor) -> Tensor:
    """Tensor[B]: length of depot -> actions... -> depot under plain Euclidean distance."""
    index = actions[:, :, None].expand(-1, -1, 2)
    path = torch.cat([locs[:, :1], locs.gather(1, index), locs[:, :1]], dim=1)
    return (path[:, 1:] - path[:, :-1]).norm(dim=-1).sum(1)


def rollout(
    policy: nn.Module,
    batch: VRPBatch,
    decode: str = "greedy",
    split: bool = False,
    generator: torch.Generator | None = None,
) -> Solutions:
    """Decode a batch with ``policy``, greedily or by sampling.

    Args:
        policy: a :class:`NazariPolicy` or :class:`AttentionPolicy`.
        batch: the instances, on the policy's device.
        decode: ``"greedy"`` (the most likely node each step) or ``"sample"``.
        split: split delivery.
        generator: the random source of sampling (on the batch's device).

    Returns:
        :class:`Solutions`; gradients flow into ``log_prob`` unless under ``no_grad``.
    """
    if decode not in ("greedy", "sample"):
        raise ValueError(f"decode must be 'greedy' or 'sample', got {decode!r}")
    env = VRPEnv(batch, split)
    state = policy.encode(env)
    actions, delivered, log_probs = [], [], []
    for _ in range(env.max_steps()):
        if bool(env.done().all()):
            break
        log_p, state = policy.decode_step(state, env)
        if decode == "greedy":
            action = log_p.argmax(1)
        else:
            action = torch.multinomial(log_p.exp(), 1, generator=generator)[:, 0]
        log_probs.append(log_p.gather(1, action[:, None])[:, 0])
        delivered.append(env.step(action))
        actions.append(action)
    if not bool(env.done().all()):
        raise InfeasibleSolutionError(f"decoding did not finish in {env.max_steps()} moves")
    return _solutions(env, actions, delivered, log_probs)


def _solutions(env: VRPEnv, actions, delivered, log_probs) -> Solutions:
    b = env.batch_size
    actions_t = torch.stack(actions, 1) if actions else env.current.new_zeros(b, 0)
    delivered_t = torch.stack(delivered, 1) if delivered else env.load.new_zeros(b, 0)
    log_prob = torch.stack(log_probs, 1).sum(1) if log_probs else env.load.new_zeros(b)
    return Solutions(actions_t, delivered_t, log_prob, tour_cost(env.locs, actions_t))


@torch.no_grad()
def beam_search(policy: nn.Module, batch: VRPBatch, width: int, split: bool = False) -> Solutions:
    """Beam search: keep the ``width`` most likely partial solutions of every instance.

    Each step expands every beam by every allowed node and keeps the ``width`` most likely
    sequences per instance. Among the finished beams the shortest tour is returned (as in
    Nazari et al.). Width 1 is greedy decoding.

    Returns:
        :class:`Solutions` (no gradients), one per instance.
    """
    if width < 1:
        raise ValueError(f"width must be at least 1, got {width}")
    b, nodes = len(batch), batch.locs.shape[1]
    device = batch.locs.device
    expand = torch.arange(b, device=device).repeat_interleave(width)
    env = VRPEnv(batch, split).select(expand)
    state = {k: v.index_select(0, expand) for k, v in policy.encode(VRPEnv(batch, split)).items()}
    scores = torch.full((b, width), float("-inf"), device=device)
    scores[:, 0] = 0.0
    history = torch.zeros(b * width, 0, dtype=torch.int64, device=device)
    delivered = torch.zeros(b * width, 0, device=device)

    for _ in range(env.max_steps()):
        if bool(env.done().all()):
            break
        log_p, state = policy.decode_step(state, env)
        candidates = (scores.view(-1, 1) + log_p).view(b, width * nodes)
        top, index = candidates.topk(width, dim=1)
        parent, action = index // nodes, index % nodes
        # Fewer allowed sequences than beams: duplicate the best one as a dead (-inf) beam, so
        # that every beam's environment stays feasible.
        dead = ~torch.isfinite(top)
        parent = torch.where(dead, parent[:, :1], parent)
        action = torch.where(dead, action[:, :1], action)
        rows = (parent + torch.arange(b, device=device)[:, None] * width).view(-1)
        env = env.select(rows)
        # Beams only ever take parents of their own instance, so a state that holds nothing
        # but per-instance encodings (the attention model's) needs no reordering.
        if not getattr(policy, "static_state", False):
            state = {k: v.index_select(0, rows) for k, v in state.items()}
        step_delivered = env.step(action.view(-1))
        history = torch.cat([history.index_select(0, rows), action.view(-1, 1)], dim=1)
        delivered = torch.cat([delivered.index_select(0, rows), step_delivered[:, None]], 1)
        scores = top
    if not bool(env.done().all()):
        raise InfeasibleSolutionError(f"beam search did not finish in {env.max_steps()} moves")

    costs = tour_cost(env.locs, history).view(b, width)
    costs = costs.masked_fill(~torch.isfinite(scores), float("inf"))
    best = costs.argmin(1) + torch.arange(b, device=device) * width
    return Solutions(
        history.index_select(0, best),
        delivered.index_select(0, best),
        scores.view(-1).index_select(0, best),
        costs.view(-1).index_select(0, best),
    )


@torch.no_grad()
def solve(
    policy: nn.Module,
    batch: VRPBatch,
    decode: str = "greedy",
    split: bool = False,
    samples: int = 16,
    width: int = 10,
    seed: int = 0,
    chunk: int = 256,
) -> Solutions:
    """Solve instances with a trained policy, check every solution, and return them.

    Args:
        policy: the policy (put in eval mode for the call).
        batch: the instances (moved to the policy's device).
        decode: ``"greedy"``, ``"sample"`` (the shortest of ``samples`` sampled solutions
            per instance) or ``"beam"`` (beam search of ``width``).
        split: split delivery.
        samples, width: the decoding budget.
        seed: seeds the sampling.
        chunk: instances per forward pass (sampling multiplies it by ``samples``).

    Returns:
        :class:`Solutions` on the CPU, every one checked.

    Raises:
        InfeasibleSolutionError: never for a correct policy and environment; it guards the
            promise that an infeasible solution is never returned.
    """
    if decode not in ("greedy", "sample", "beam"):
        raise ValueError(f"decode must be 'greedy', 'sample' or 'beam', got {decode!r}")
    if samples < 1:
        raise ValueError(f"samples must be at least 1, got {samples}")
    device = next(policy.parameters()).device
    was_training = policy.training
    policy.eval()
    generator = torch.Generator(device=device).manual_seed(seed)
    parts = []
    try:
        step = max(1, chunk // (samples if decode == "sample" else 1))
        for start in range(0, len(batch), step):
            part = batch.slice(start, start + step).to(device)
            if decode == "greedy":
                parts.append(rollout(policy, part, "greedy", split))
            elif decode == "beam":
                parts.append(beam_search(policy, part, width, split))
            else:
                parts.append(_best_of_samples(policy, part, samples, split, generator))
    finally:
        policy.train(was_training)
    solutions = _concat(parts)
    solutions.check(batch, split)
    return solutions


def _best_of_samples(policy, batch: VRPBatch, samples: int, split: bool, generator) -> Solutions:
    b = len(batch)
    expand = torch.arange(b, device=batch.locs.device).repeat(samples)
    repeated = VRPBatch(batch.locs[expand], batch.demands[expand], batch.capacity[expand])
    sampled = rollout(policy, repeated, "sample", split, generator)
    best = sampled.cost.view(samples, b).argmin(0) * b + torch.arange(b, device=expand.device)
    return Solutions(
        sampled.actions[best], sampled.delivered[best], sampled.log_prob[best], sampled.cost[best]
    )


def _concat(parts: list[Solutions]) -> Solutions:
    length = max((p.actions.shape[1] for p in parts), default=0)

    def pad(x: Tensor) -> Tensor:
        return F.pad(x, (0, length - x.shape[1])).cpu()

    return Solutions(
        torch.cat([pad(p.actions) for p in parts])
        if parts
        else torch.zeros(0, 0, dtype=torch.int64),
        torch.cat([pad(p.delivered) for p in parts]) if parts else torch.zeros(0, 0),
        torch.cat([p.log_prob.cpu() for p in parts]) if parts else torch.zeros(0),
        torch.cat([p.cost.cpu() for p in parts]) if parts else torch.zeros(0),
    )


# ---------------------------------------------------------------------------------------------
# Training

_BASELINES = ("critic", "rollout", "shared")


@dataclass
class VRPTrainConfig:
    """Settings of :func:`train`.

    Attributes:
        model: ``"nazari"`` or ``"attention"``.
        hidden: embedding size of the policy (and of the critic).
        layers, heads: the attention model's encoder layers and heads.
        cell: the Nazari decoder's recurrent cell, ``"lstm"`` or ``"gru"``.
        num_customers: customers per training instance.
        capacity: vehicle capacity; None takes Nazari et al.'s for the size.
        split: split delivery.
        baseline: ``"critic"`` (a learned critic, Nazari et al.), ``"rollout"`` (greedy
            rollouts of a frozen copy of the policy, replaced when the policy beats it on the
            validation set; Kool et al.) or ``"shared"`` (the mean of ``shared_samples``
            sampled solutions of the same instance, as in POMO).
        shared_samples: solutions sampled per instance with the shared baseline.
        epochs, steps_per_epoch, batch_size: instances are fresh every step;
            ``batch_size`` is per process.
        lr: Adam learning rate of the policy (and of the critic).
        max_grad_norm: gradient clipping.
        val_size: validation instances (fixed), decoded greedily after every epoch.
        seed: seeds the initial weights, the instances and the sampling.
        device: where to train.
        checkpoint: file written after every epoch; None writes none.
        resume: continue from ``checkpoint`` when the file exists.
        progress: show a tqdm bar (first process only).
    """

    model: str = "nazari"
    hidden: int = 128
    layers: int = 3
    heads: int = 8
    cell: str = "lstm"
    num_customers: int = 10
    capacity: int | None = None
    split: bool = False
    baseline: str = "critic"
    shared_samples: int = 8
    epochs: int = 10
    steps_per_epoch: int = 100
    batch_size: int = 128
    lr: float = 1e-4
    max_grad_norm: float = 2.0
    val_size: int = 256
    seed: int = 0
    device: str = "cpu"
    checkpoint: str | None = None
    resume: bool = False
    progress: bool = True

    def __post_init__(self):
        if self.model not in _POLICIES:
            raise ValueError(f"model must be one of {', '.join(_POLICIES)}, got {self.model!r}")
        if self.baseline not in _BASELINES:
            raise ValueError(
                f"baseline must be one of {', '.join(_BASELINES)}, got {self.baseline!r}"
            )
        if self.cell not in ("lstm", "gru"):
            raise ValueError(f"cell must be 'lstm' or 'gru', got {self.cell!r}")
        for name in ("hidden", "heads", "num_customers", "steps_per_epoch", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("layers", "epochs", "val_size"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be at least 0, got {getattr(self, name)}")
        if self.model == "attention" and self.hidden % self.heads:
            raise ValueError(f"hidden ({self.hidden}) must be a multiple of heads ({self.heads})")
        if self.baseline == "shared" and self.shared_samples < 2:
            raise ValueError(f"shared_samples must be at least 2, got {self.shared_samples}")
        if self.capacity is None and self.num_customers not in NAZARI_CAPACITY:
            raise ValueError(
                f"capacity: no published capacity for num_customers={self.num_customers}; give one"
            )
        if self.capacity is not None and self.capacity < 9:
            raise ValueError(
                f"capacity must be at least 9 (the largest demand), got {self.capacity}"
            )
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be positive and finite, got {self.lr}")
        if not self.max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be positive, got {self.max_grad_norm}")
        if self.resume and not self.checkpoint:
            raise ValueError("resume needs a checkpoint path")

    def policy_args(self) -> dict:
        """The constructor arguments of the policy this config trains."""
        if self.model == "nazari":
            return {"hidden": self.hidden, "cell": self.cell, "dropout": 0.0}
        return {"hidden": self.hidden, "layers": self.layers, "heads": self.heads}


class _Learner(nn.Module):
    """Policy and critic under one module, so that DDP sees one forward per step."""

    def __init__(self, policy: nn.Module, critic: nn.Module | None):
        super().__init__()
        self.policy = policy
        self.critic = critic

    def forward(self, batch: VRPBatch, split: bool, generator: torch.Generator):
        solutions = rollout(self.policy, batch, "sample", split, generator)
        value = self.critic(batch) if self.critic is not None else None
        return solutions.cost, solutions.log_prob, value


def _seed_for(config: VRPTrainConfig, epoch: int, step: int, rank: int, stream: int) -> int:
    # One independent stream per (seed, epoch, step, process, purpose): a resumed run sees
    # the instances and samples the uninterrupted run would have seen.
    return (((config.seed * 1009 + epoch) * 100_003 + step) * 257 + rank) * 7 + stream


def _instances(config: VRPTrainConfig, count: int, seed: int) -> VRPBatch:
    return generate_vrp(config.num_customers, count, seed=seed, capacity=config.capacity)


@torch.no_grad()
def _greedy_costs(policy: nn.Module, batch: VRPBatch, split: bool) -> Tensor:
    was_training = policy.training
    policy.eval()
    try:
        return rollout(policy, batch, "greedy", split).cost
    finally:
        policy.train(was_training)


def train(policy: nn.Module, config: VRPTrainConfig, critic: nn.Module | None = None) -> dict:
    """Train a routing policy by REINFORCE on freshly generated instances.

    The loss of a step is ``mean((L - b) * log p)``, where ``L`` is the length of a sampled
    solution, ``log p`` its log-probability and ``b`` the baseline (see
    :class:`VRPTrainConfig`); the critic, if any, regresses ``L``. The instances and samples
    of every step come from the seed, epoch and step, so a resumed run continues exactly as
    the uninterrupted one would have. Under ``torch.distributed`` the policy (and critic) are
    wrapped in DistributedDataParallel and every process trains on its own instances; the
    first process writes the checkpoint, and the reported metrics cover all processes.

    Args:
        policy: from :func:`build_policy`; trained in place, moved to ``config.device``.
        config: the settings.
        critic: the critic for ``baseline="critic"``; a fresh :class:`Critic` if None.

    Returns:
        dict with ``val_cost`` (mean greedy tour length on the validation set after the last
        epoch), ``val_cost_start`` (before training or resuming), ``train_cost`` (the last
        epoch's mean sampled length), ``instances_per_second`` (training steps of this call),
        ``start_epoch``, ``seconds`` and ``history`` (one dict per epoch).

    Raises:
        ValueError: a loss that is not finite (lower the learning rate).
    """
    device = torch.device(config.device)
    rank, world = rank_and_world()
    policy.to(device)
    if config.baseline == "critic" and critic is None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            critic = Critic(config.hidden)
    if config.baseline != "critic":
        critic = None
    if critic is not None:
        critic.to(device)
    learner: nn.Module = _Learner(policy, critic)
    learner = data_parallel(learner, device, world)
    # Policy and critic are clipped apart: the critic's early errors are large, and one joint
    # norm would shrink the policy's step with them.
    clip_groups = [list(policy.parameters())] + ([list(critic.parameters())] if critic else [])
    optimizer = torch.optim.Adam([p for group in clip_groups for p in group], lr=config.lr)
    baseline_policy = copy.deepcopy(policy).eval() if config.baseline == "rollout" else None

    val = _instances(config, config.val_size, seed=config.seed * 7919 + 17).to(device)
    start_epoch, history = 0, []
    if config.resume and os.path.exists(config.checkpoint):
        state = torch.load(config.checkpoint, map_location=device, weights_only=True)
        policy.load_state_dict(state["policy"])
        optimizer.load_state_dict(state["optimizer"])
        if critic is not None:
            critic.load_state_dict(state["critic"])
        if baseline_policy is not None:
            baseline_policy.load_state_dict(state["baseline_policy"])
        start_epoch, history = int(state["epoch"]), list(state["history"])
        logger.info("resumed from %s after epoch %d", config.checkpoint, start_epoch)
    val_start = float(_greedy_costs(policy, val, config.split).mean()) if len(val) else None

    started = time.perf_counter()
    remaining = max(0, config.epochs - start_epoch) * config.steps_per_epoch
    bar = progress_bar(
        remaining, f"vrp{config.num_customers} {config.model}", config.progress and rank == 0
    )
    try:
        for epoch in range(start_epoch, config.epochs):
            record = _train_epoch(
                learner, optimizer, clip_groups, baseline_policy, config, epoch, bar
            )
            record["val_cost"] = (
                float(_greedy_costs(policy, val, config.split).mean()) if len(val) else None
            )
            if baseline_policy is not None and record["val_cost"] is not None:
                # Kool et al. replace the baseline after a paired t-test; here the policy
                # replaces it when its mean greedy length on the validation set is lower.
                baseline_cost = float(_greedy_costs(baseline_policy, val, config.split).mean())
                if record["val_cost"] < baseline_cost:
                    baseline_policy.load_state_dict(policy.state_dict())
            history.append(record)
            logger.info(
                "vrp%d %s epoch %d/%d: train length %.4f, validation length %s, %.0f inst/s",
                config.num_customers,
                config.model,
                epoch + 1,
                config.epochs,
                record["train_cost"],
                "n/a" if record["val_cost"] is None else f"{record['val_cost']:.4f}",
                record["instances_per_second"],
            )
            if config.checkpoint:
                if rank == 0:
                    save_atomic(
                        _checkpoint_state(
                            policy, critic, baseline_policy, optimizer, config, epoch + 1, history
                        ),
                        config.checkpoint,
                    )
                if world > 1:
                    dist.barrier()
    finally:
        bar.close()

    last = history[-1] if history else {}
    # Throughput over this call's epochs (validation excluded), steadier than one epoch's.
    this_call = history[start_epoch:]
    seconds = sum(h["seconds"] for h in this_call)
    instances = sum(h["instances_per_second"] * h["seconds"] for h in this_call)
    return {
        "val_cost": last.get("val_cost", val_start),
        "val_cost_start": val_start,
        "train_cost": last.get("train_cost"),
        "instances_per_second": instances / seconds if seconds > 0 else None,
        "start_epoch": start_epoch,
        "seconds": time.perf_counter() - started,
        "history": history,
    }


def _checkpoint_state(policy, critic, baseline_policy, optimizer, config, epoch, history) -> dict:
    state = {
        "epoch": epoch,
        "history": history,
        "model": config.model,
        "model_args": policy.args,
        "num_customers": config.num_customers,
        "capacity": config.capacity or NAZARI_CAPACITY.get(config.num_customers),
        "split": config.split,
        "policy": policy.state_dict(),
        "optimizer": optimizer.state_dict(),
    }
    if critic is not None:
        state["critic"] = critic.state_dict()
    if baseline_policy is not None:
        state["baseline_policy"] = baseline_policy.state_dict()
    return state


def _train_epoch(learner, optimizer, clip_groups, baseline_policy, config, epoch, bar) -> dict:
    rank, world = rank_and_world()
    device = torch.device(config.device)
    learner.train()
    sums = torch.zeros(2, dtype=torch.float64, device=device)  # length, instances
    started = time.perf_counter()
    for step in range(config.steps_per_epoch):
        batch = _instances(config, config.batch_size, _seed_for(config, epoch, step, rank, 0))
        if config.baseline == "shared":
            # Every instance appears shared_samples times; its samples share one baseline.
            batch = VRPBatch(
                batch.locs.repeat(config.shared_samples, 1, 1),
                batch.demands.repeat(config.shared_samples, 1),
                batch.capacity.repeat(config.shared_samples),
            )
        batch = batch.to(device)
        generator = torch.Generator(device=device)
        generator.manual_seed(_seed_for(config, epoch, step, rank, 1))

        cost, log_prob, value = learner(batch, config.split, generator)
        if config.baseline == "critic":
            baseline = value.detach()
        elif config.baseline == "rollout":
            baseline = _greedy_costs(baseline_policy, batch, config.split)
        else:
            baseline = cost.view(config.shared_samples, -1).mean(0).repeat(config.shared_samples)
        loss = ((cost - baseline).detach() * log_prob).mean()
        if value is not None:
            loss = loss + F.mse_loss(value, cost.detach())
        if not torch.isfinite(loss):
            raise ValueError(
                f"the training loss is not finite in epoch {epoch + 1}; lower the learning "
                f"rate (now {config.lr})"
            )

        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        for group in clip_groups:
            torch.nn.utils.clip_grad_norm_(group, config.max_grad_norm)
        optimizer.step()
        with torch.no_grad():
            sums += torch.stack([cost.detach().double().sum(), cost.new_tensor(len(cost)).double()])
        bar.update(1)
        if step % 10 == 0 and not isinstance(bar, SilentBar):
            bar.set_postfix(length=f"{float(cost.mean()):.3f}")

    seconds = time.perf_counter() - started
    if world > 1:
        dist.all_reduce(sums)
    total_length, count = sums.tolist()
    instances = count / (config.shared_samples if config.baseline == "shared" else 1)
    return {
        "epoch": epoch + 1,
        "train_cost": total_length / max(count, 1.0),
        "instances_per_second": instances / max(seconds, 1e-9),
        "seconds": seconds,
    }


def load_policy(path: str, device: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """A policy from a checkpoint that :func:`train` wrote.

    Returns:
        (policy in eval mode, the checkpoint's metadata: model, num_customers, capacity, split).

    Raises:
        ValueError: the file is not a routing policy checkpoint.
        OSError: the file cannot be read.
    """
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except OSError:
        raise
    except Exception as error:  # torch.load raises assorted types for files it cannot read
        raise ValueError(f"{path} is not a readable torch checkpoint ({error})") from error
    if not isinstance(state, dict) or "policy" not in state or "model" not in state:
        raise ValueError(f"{path} is not a routing policy checkpoint (no 'policy' or 'model')")
    policy = build_policy(state["model"], **state["model_args"]).to(device)
    policy.load_state_dict(state["policy"])
    meta = {k: state.get(k) for k in ("model", "num_customers", "capacity", "split", "epoch")}
    return policy.eval(), meta


# ---------------------------------------------------------------------------------------------
# Command: deepkern reproduce vrp

# Mean tour lengths on random instances, as published. Nazari et al. (2018), Table 2: their
# policy with greedy decoding and with beam search of width 10, and OR-Tools. Kool et al.
# (2019), Table 1: the attention model with greedy decoding, and the optimum (Gurobi).
PUBLISHED = {
    ("nazari", "greedy", 10): 4.84,
    ("nazari", "greedy", 20): 6.59,
    ("nazari", "beam", 20): 6.40,
    ("ortools", "", 20): 6.43,
    ("attention", "greedy", 20): 6.40,
    ("optimum", "", 20): 6.10,
}


# Learning rates at CPU size, per model: the recurrent policy learns faster at 3e-3 in a few
# hundred steps; the attention model is unstable there and takes 1e-3.
_CPU_LR = {"nazari": 3e-3, "attention": 1e-3}


@dataclass
class _Settings:
    """What ``deepkern reproduce vrp`` trains and evaluates.

    ``batch_size`` counts rollouts per step: the attention model's shared baseline samples
    ``shared_samples`` solutions of each of ``batch_size / shared_samples`` instances.
    """

    sizes: tuple[int, ...] = (10, 20)
    models: tuple[str, ...] = ("nazari", "attention")
    hidden: int = 64
    layers: int = 2
    heads: int = 4
    epochs: int = 10
    steps_per_epoch: int = 25
    batch_size: int = 128
    shared_samples: int = 4
    lr: float | None = None
    test_size: int = 128
    samples: int = 16
    width: int = 10
    solver_seconds: float = 0.1
    seed: int = 0
    device: str = "cpu"


_QUICK = _Settings(
    sizes=(10,),
    hidden=16,
    layers=1,
    heads=2,
    epochs=1,
    steps_per_epoch=2,
    batch_size=16,
    test_size=4,
    samples=2,
    width=2,
    solver_seconds=0.02,
)
_FULL = _Settings(
    sizes=(10, 20, 50, 100),
    hidden=128,
    layers=3,
    heads=8,
    epochs=100,
    steps_per_epoch=2500,
    batch_size=512,
    shared_samples=8,
    lr=1e-4,
    test_size=1000,
    samples=1280,
    width=10,
    solver_seconds=2.0,
    device="cuda",
)


def add_reproduce_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``deepkern reproduce vrp``."""
    parser.add_argument("--quick", action="store_true", help="a run of seconds (for tests)")
    parser.add_argument(
        "--full", action="store_true", help="the published sizes (VRP10 to VRP100), for a GPU"
    )
    parser.add_argument("--sizes", type=int, nargs="+", help="customers per instance")
    parser.add_argument(
        "--models", nargs="+", choices=list(_POLICIES), help="policies to train (default both)"
    )
    parser.add_argument("--hidden", type=int, help="embedding size")
    parser.add_argument("--epochs", type=int, help="training epochs per model and size")
    parser.add_argument("--steps-per-epoch", type=int, help="steps per epoch")
    parser.add_argument("--batch-size", type=int, help="instances per step")
    parser.add_argument(
        "--lr", type=float, help="learning rate (default 3e-3 Nazari, 1e-3 attention; 1e-4 full)"
    )
    parser.add_argument("--test-size", type=int, help="test instances per size")
    parser.add_argument("--samples", type=int, help="samples per instance for sampling")
    parser.add_argument("--width", type=int, help="beam width")
    parser.add_argument(
        "--solver-seconds", type=float, help="time limit of OR-Tools and PyVRP per instance"
    )
    parser.add_argument("--seed", type=int, help="seed of everything")
    parser.add_argument("--device", help="cpu, cuda or cuda:N")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="CPU threads of PyTorch (default 1: the tensors are small, and on a shared "
        "machine more threads wait on each other; 0 keeps PyTorch's own choice)",
    )
    parser.add_argument("--out", help="write results.json (and checkpoints) into this folder")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")


def _resolve(args: argparse.Namespace) -> _Settings:
    if getattr(args, "quick", False) and getattr(args, "full", False):
        raise ValueError("--quick and --full exclude each other")
    base = _QUICK if args.quick else _FULL if args.full else _Settings()
    updates = {}
    for field in dataclasses.fields(_Settings):
        value = getattr(args, field.name, None)
        if value is not None:
            updates[field.name] = tuple(value) if isinstance(value, list) else value
    settings = dataclasses.replace(base, **updates)
    for size in settings.sizes:
        if size not in NAZARI_CAPACITY:
            raise ValueError(f"--sizes: {size} is not one of {sorted(NAZARI_CAPACITY)}")
    for name in ("test_size", "samples", "width"):
        if getattr(settings, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1")
    if not settings.solver_seconds > 0:
        raise ValueError(f"--solver-seconds must be positive, got {settings.solver_seconds}")
    if settings.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {settings.device}: no CUDA device is available")
    threads = getattr(args, "threads", 0) or 0
    if threads < 0:
        raise ValueError(f"--threads must be 0 or positive, got {threads}")
    if threads:
        torch.set_num_threads(threads)
    return settings


def _baseline_costs(batch: VRPBatch, method: str, seconds: float, seed: int) -> list[float]:
    from deepkern.data.routing import distance_matrix, route_cost
    from deepkern.models import vrp_baselines

    costs = []
    for i in range(len(batch)):
        distances = distance_matrix(batch.locs[i].double().numpy(), "EXACT")
        demands, capacity = batch.demands[i].numpy(), int(batch.capacity[i])
        if method == "clarke_wright":
            routes = vrp_baselines.clarke_wright(distances, demands, capacity)
        elif method == "ortools":
            routes = vrp_baselines.solve_ortools(distances, demands, capacity, seconds, 1e4)
        else:
            routes = vrp_baselines.solve_pyvrp(distances, demands, capacity, seconds, 1e4, seed)
        costs.append(route_cost(distances, routes))
    return costs


def _available(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def run_reproduce(args: argparse.Namespace) -> int:
    """``deepkern reproduce vrp``: train both policies per size, compare with the baselines.

    Under torchrun every process trains (DDP); the first one evaluates and prints.
    """
    settings = _resolve(args)
    with process_group(settings):
        return _reproduce(args, settings)


def _reproduce(args: argparse.Namespace, settings: _Settings) -> int:
    rank, _ = rank_and_world()
    progress = not getattr(args, "no_progress", False)
    out = getattr(args, "out", None)
    results: dict = {"settings": dataclasses.asdict(settings), "rows": []}
    cells: dict[tuple[str, int], float] = {}

    for size in settings.sizes:
        test = generate_vrp(size, settings.test_size, seed=settings.seed + 1_000_000 + size)
        for model in settings.models:
            config = VRPTrainConfig(
                model=model,
                hidden=settings.hidden,
                layers=settings.layers,
                heads=settings.heads,
                num_customers=size,
                baseline="critic" if model == "nazari" else "shared",
                shared_samples=settings.shared_samples,
                epochs=settings.epochs,
                steps_per_epoch=settings.steps_per_epoch,
                batch_size=settings.batch_size
                if model == "nazari"
                else max(1, settings.batch_size // settings.shared_samples),
                lr=settings.lr or _CPU_LR[model],
                val_size=min(256, settings.test_size * 4),
                seed=settings.seed,
                device=settings.device,
                checkpoint=os.path.join(out, f"{model}_vrp{size}.pt") if out else None,
                progress=progress,
            )
            policy = build_policy(model, seed=settings.seed, **config.policy_args())
            metrics = train(policy, config)
            results["rows"].append(
                {
                    "size": size,
                    "model": model,
                    "train_seconds": metrics["seconds"],
                    "instances_per_second": metrics["instances_per_second"],
                }
            )
            if rank != 0:
                continue
            for decode in ("greedy", "sample", "beam"):
                solutions = solve(
                    policy,
                    test,
                    decode,
                    samples=settings.samples,
                    width=settings.width,
                    seed=settings.seed,
                )
                cells[(f"{model}:{decode}", size)] = float(solutions.cost.mean())
        if rank != 0:
            continue
        cells[("clarke_wright", size)] = float(
            np.mean(_baseline_costs(test, "clarke_wright", 0, 0))
        )
        for solver, module in (("ortools", "ortools"), ("pyvrp", "pyvrp")):
            if _available(module):
                costs = _baseline_costs(test, solver, settings.solver_seconds, settings.seed)
                cells[(solver, size)] = float(np.mean(costs))

    if rank != 0:
        return 0
    rows = _table_rows(settings, cells)
    results["table"] = rows
    results["environment"] = environment(settings.device)
    print(_format_table(settings, rows))
    missing = [name for name in ("ortools", "pyvrp") if not _available(name)]
    if missing:
        print(f"not installed, rows left empty: {', '.join(missing)}")
    for row in results["rows"]:
        print(
            f"trained {row['model']} on VRP{row['size']} in {row['train_seconds']:.0f} s "
            f"({row['instances_per_second']:.0f} instances/s)"
        )
    if out:
        os.makedirs(out, exist_ok=True)
        write_json(os.path.join(out, "results.json"), results)
        print(f"wrote {os.path.join(out, 'results.json')}")
    return 0


def _table_rows(settings: _Settings, cells: dict) -> list[dict]:
    methods = []
    for model, title in (("nazari", "Nazari et al."), ("attention", "attention model")):
        if model not in settings.models:
            continue
        methods += [
            (f"{model}:greedy", f"{title}, greedy", (model, "greedy")),
            (f"{model}:sample", f"{title}, best of {settings.samples} samples", (model, "sample")),
            (f"{model}:beam", f"{title}, beam {settings.width}", (model, "beam")),
        ]
    methods += [
        ("clarke_wright", "Clarke-Wright savings", ("clarke_wright", "")),
        ("ortools", f"OR-Tools ({settings.solver_seconds:g} s)", ("ortools", "")),
        ("pyvrp", f"PyVRP HGS ({settings.solver_seconds:g} s)", ("optimum", "")),
    ]
    rows = []
    for key, title, (paper_model, paper_decode) in methods:
        row = {"method": title}
        for size in settings.sizes:
            row[f"ours_{size}"] = cells.get((key, size))
            # Published beam results are for width 10 only.
            published_decode = paper_decode
            if paper_decode == "beam" and settings.width != 10:
                published_decode = "none"
            row[f"paper_{size}"] = PUBLISHED.get((paper_model, published_decode, size))
        rows.append(row)
    return rows


def _format_table(settings: _Settings, rows: list[dict]) -> str:
    header = ["method"]
    for size in settings.sizes:
        header += [f"VRP{size} ours", f"VRP{size} paper"]
    lines = [header]
    for row in rows:
        line = [row["method"]]
        for size in settings.sizes:
            for key in (f"ours_{size}", f"paper_{size}"):
                line.append("-" if row[key] is None else f"{row[key]:.2f}")
        lines.append(line)
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    text = [
        "  ".join(
            cell.ljust(w) if i == 0 else cell.rjust(w)
            for i, (cell, w) in enumerate(zip(line, widths))
        )
        for line in lines
    ]
    text.insert(1, "  ".join("-" * w for w in widths))
    note = (
        f"Mean tour length on {settings.test_size} random instances per size (papers: 1000 "
        "instances,\nmodels trained far longer). The PyVRP row's paper column is the optimum "
        "(Kool et al.)."
    )
    return "\n".join(text + [note])


# ---------------------------------------------------------------------------------------------
# Command: deepkern route INSTANCE


def add_route_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``deepkern route``."""
    parser.add_argument("instance", help="a TSPLIB .tsp or CVRPLIB .vrp file")
    parser.add_argument(
        "--checkpoint",
        help="a policy checkpoint written by training (deepkern reproduce vrp --out DIR); "
        "without one the instance is solved by Clarke-Wright savings",
    )
    parser.add_argument(
        "--decode",
        choices=("greedy", "sample", "beam"),
        default="greedy",
        help="how the policy decodes (default greedy)",
    )
    parser.add_argument("--samples", type=int, default=64, help="samples for --decode sample")
    parser.add_argument("--width", type=int, default=10, help="beam width for --decode beam")
    parser.add_argument("--seed", type=int, default=0, help="seed of sampling")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument(
        "--out", help="where to write the .sol file (default NAME.deepkern.sol here)"
    )


def instance_batch(instance) -> VRPBatch:
    """A :class:`RoutingInstance` as a batch of one for the policies.

    Coordinates are shifted and scaled by one factor into the unit square, where the policies
    were trained. The policies see demands and loads only as fractions of the capacity, so
    the instance's own demands and capacity keep their meaning at any scale; the mask works
    on them, so the solution is feasible for the instance itself. A TSP becomes a CVRP whose
    customers each demand 1 and whose single vehicle carries all of them: the policy then
    never returns to the depot before the end, giving one closed tour from node 0.
    """
    coords = np.asarray(instance.coords, dtype=np.float64)
    span = float((coords.max(0) - coords.min(0)).max()) or 1.0
    unit = (coords - coords.min(0)) / span
    if instance.kind == "tsp":
        demands = np.ones(len(coords), dtype=np.int64)
        demands[0] = 0
        capacity = int(demands.sum())
    else:
        demands, capacity = instance.demands, instance.capacity
    return VRPBatch(
        torch.tensor(unit, dtype=torch.float32)[None],
        torch.tensor(demands, dtype=torch.int64)[None],
        torch.tensor([capacity], dtype=torch.int64),
    )


def run_route(args: argparse.Namespace) -> int:
    """``deepkern route INSTANCE``: solve one file, write its ``.sol``, print its cost."""
    from deepkern.data.routing import find_known_solution, read_instance, write_solution
    from deepkern.models.vrp_baselines import clarke_wright

    if args.samples < 1 or args.width < 1:
        raise ValueError("--samples and --width must be at least 1")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device}: no CUDA device is available")
    instance = read_instance(args.instance)
    if instance.num_customers < 1:
        raise ValueError(f"{args.instance}: nothing to route, the instance has no customers")
    out = args.out or f"{instance.name}.deepkern.sol"
    if not os.path.isdir(os.path.dirname(os.path.abspath(out))):
        raise ValueError(f"--out {out}: the folder {os.path.dirname(out) or '.'} does not exist")
    started = time.perf_counter()
    notes = []
    if args.checkpoint:
        policy, meta = load_policy(args.checkpoint, args.device)
        if instance.num_customers > (meta.get("num_customers") or 0):
            notes.append(
                f"the policy was trained on {meta.get('num_customers')} customers, this instance "
                f"has {instance.num_customers}: it runs unchanged on the larger instance "
                "(coordinates scaled to the unit square, demands as fractions of the capacity), "
                "expect a larger gap"
            )
        batch = instance_batch(instance)
        solutions = solve(
            policy, batch, args.decode, samples=args.samples, width=args.width, seed=args.seed
        )
        routes, _ = solutions.routes(0)
        method = f"{meta['model']} policy, {args.decode}"
    else:
        routes = clarke_wright(instance.distances(), instance.demands, instance.capacity)
        method = "Clarke-Wright savings"
        notes.append("no --checkpoint given: solved with Clarke-Wright savings")
    if instance.kind == "tsp" and len(routes) > 1:
        routes = [[node for route in routes for node in route]]
    instance.check(routes)
    seconds = time.perf_counter() - started
    cost = instance.cost(routes)

    write_solution(out, routes, cost)
    print(
        f"{instance.name}: {instance.kind.upper()}, {instance.num_customers} customers, "
        f"{instance.edge_weight_type} distances"
    )
    print(f"{method}: cost {cost:g} ({len(routes)} routes, {seconds:.2f} s)")
    # A broken reference file next to the instance costs the comparison, not the answer.
    try:
        known = find_known_solution(args.instance)
        if known is not None:
            instance.check(known.routes)
    except ValueError as error:
        known = None
        notes.append(f"the known solution beside the instance was not used: {error}")
    if known is not None:
        best = instance.cost(known.routes)
        print(
            f"known optimum {best:g} ({os.path.basename(known.path)}): gap "
            f"{100 * (cost - best) / best:.2f} %"
        )
    for note in notes:
        print(f"note: {note}")
    print(f"wrote {out}")
    return 0
