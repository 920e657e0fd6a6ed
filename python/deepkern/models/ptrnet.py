"""Pointer Networks (Vinyals, Fortunato and Jaitly, NeurIPS 2015) for planar convex hulls,
Delaunay triangulations and the travelling salesman problem.

A Pointer Network reads a set of points with an LSTM encoder and writes its answer with an
LSTM decoder whose output at each step is a pointer: a softmax over the input positions,
scored by additive attention ``u_j = v . tanh(W1 e_j + W2 d_i)`` between every encoder state
e_j and the decoder state d_i. Position 0 of the input is a learned "end" token, so outputs of
any length can stop.

This module holds:

- :class:`PointerNetwork`: the model, teacher-forced log-likelihood (``forward``), greedy
  decoding and beam search (:meth:`PointerNetwork.greedy`, :meth:`PointerNetwork.beam_search`),
  all restricted to valid outputs by masks (:class:`Constraints`): a TSP tour visits every city
  once starting at city 0; a hull is a cycle of at least three distinct points starting at its
  smallest index, then the end token; a triangulation is a list of distinct increasing index
  triples, then the end token.
- :func:`make_data` (points and exact labels from :mod:`deepkern.data.geometry`),
  :func:`evaluate` with the paper's metrics (hull accuracy and area coverage, Delaunay
  accuracy and triangle coverage, mean tour length beside the optimum), :func:`solve_tsp`.
- :func:`train` with :class:`TrainConfig`: seeded, checkpointed, resumable, data parallel
  under ``torch.distributed``.
- ``deepkern reproduce ptrnet`` (:func:`add_reproduce_arguments`, :func:`run_reproduce`).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import logging
import math
import os
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn

from deepkern.data import geometry
from deepkern.models.training import (
    data_parallel,
    environment,
    progress_bar,
    rank_and_world,
    save_atomic,
    write_json,
)

__all__ = [
    "PUBLISHED",
    "TASKS",
    "Constraints",
    "PointerNetwork",
    "TrainConfig",
    "decode",
    "evaluate",
    "make_data",
    "solve_tsp",
    "train",
]

logger = logging.getLogger("deepkern")

TASKS = ("hull", "delaunay", "tsp")
END = 0  # pointer position of the end token; point i sits at position i + 1


def _check_task(task) -> str:
    if task not in TASKS:
        raise ValueError(f"task must be one of {', '.join(TASKS)}, got {task!r}")
    return task


def _check_count(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def max_triangles(n: int) -> int:
    """At most 2n - 5 triangles triangulate n >= 3 points (exactly 2n - 2 - hull size)."""
    return max(1, 2 * n - 5)


def max_steps(task: str, n: int) -> int:
    """Decoder steps that fit the longest valid output for ``n`` points, end token included."""
    if task == "tsp":
        return n
    if task == "hull":
        return n + 1
    return 3 * max_triangles(n) + 1


# ---------------------------------------------------------------------------------------------
# Masks: which pointers keep the output valid


class Constraints:
    """The state of a batch of partial outputs and the mask of pointers that keep each valid.

    Every tensor is batch-first, so beam search reorders the state with one ``index_select``.
    An output that is complete (end token, or all n cities of a tour) may only repeat the end
    token, whose log-probability is then 0: padding costs nothing in the likelihood.

    Args:
        task: "hull", "delaunay" or "tsp".
        batch: outputs tracked.
        n: points per instance (n >= 3).
        device: where the state lives.
    """

    def __init__(self, task: str, batch: int, n: int, device):
        self.task = _check_task(task)
        self.n = n
        positions = torch.arange(n + 1, device=device)
        self.state = {
            "visited": torch.zeros(batch, n + 1, dtype=torch.bool, device=device),
            "count": torch.zeros(batch, dtype=torch.long, device=device),
            "done": torch.zeros(batch, dtype=torch.bool, device=device),
            "first": torch.zeros(batch, dtype=torch.long, device=device),
        }
        if task == "delaunay":
            self.state["pending"] = torch.zeros(batch, 2, dtype=torch.long, device=device)
            # third[b, i, j]: the third vertices k > j still free after i < j; pairs[b, i]: the
            # j > i with a free third vertex. They keep every partial triangle completable.
            upper = positions[None, :] > positions[:, None]
            third = torch.where(upper, n - positions[None, :], 0)
            third[0] = 0
            self.state["third"] = third.expand(batch, n + 1, n + 1).clone()
            self.state["pairs"] = (self.state["third"] > 0).sum(-1)
            self.state["used"] = torch.zeros(
                batch, n + 1, n + 1, n + 1, dtype=torch.bool, device=device
            )
        self.positions = positions

    def reorder(self, index: Tensor) -> None:
        """Keep the outputs at ``index`` (LongTensor[batch']), for beam search."""
        self.state = {k: v.index_select(0, index) for k, v in self.state.items()}

    def allowed(self) -> Tensor:
        """BoolTensor[batch, n + 1]: the pointers each output may take next."""
        s, n, pos = self.state, self.n, self.positions
        batch = s["count"].shape[0]
        end = torch.zeros(batch, n + 1, dtype=torch.bool, device=pos.device)
        end[:, END] = True
        points = (pos > 0)[None, :] & ~s["visited"]
        if self.task == "tsp":
            # Tours start at city 0 (position 1): rotations are one tour.
            start = (pos == 1)[None, :].expand(batch, -1)
            mask = torch.where((s["count"] == 0)[:, None], start, points)
        elif self.task == "hull":
            # The canonical cycle starts at its smallest index: later points are larger, and
            # the first leaves at least two larger points for a triangle.
            first = (pos > 0) & (pos <= n - 2)
            later = points & (pos[None, :] > s["first"][:, None])
            mask = torch.where((s["count"] == 0)[:, None], first[None, :], later)
            mask = mask | (end & (s["count"] >= 3)[:, None])
        else:
            mask = self._delaunay_allowed(end)
        return torch.where(s["done"][:, None], end, mask)

    def _delaunay_allowed(self, end: Tensor) -> Tensor:
        s, n, pos = self.state, self.n, self.positions
        batch = s["count"].shape[0]
        rows = torch.arange(batch, device=pos.device)
        phase = s["count"] % 3
        a, b = s["pending"][:, 0], s["pending"][:, 1]
        room = (s["count"] // 3) < max_triangles(n)
        open_a = (s["pairs"] > 0) & room[:, None]
        open_a[:, END] = False
        open_b = (s["third"][rows, a] > 0) & (pos[None, :] > a[:, None])
        open_c = ~s["used"][rows, a, b] & (pos[None, :] > b[:, None])
        start = open_a | (end & (s["count"] >= 3)[:, None])
        mask = torch.where((phase == 1)[:, None], open_b, start)
        return torch.where((phase == 2)[:, None], open_c, mask)

    def update(self, choice: Tensor) -> None:
        """Record the pointers ``choice`` (LongTensor[batch]) taken by each output."""
        s = self.state
        rows = torch.arange(choice.shape[0], device=choice.device)
        active = ~s["done"]
        is_point = active & (choice != END)
        s["first"] = torch.where(active & (s["count"] == 0), choice, s["first"])
        if self.task == "delaunay":
            self._delaunay_update(choice, rows, is_point)
        else:
            s["visited"][rows, choice] |= is_point
        s["count"] = s["count"] + is_point.long()
        finished = active & (choice == END)
        if self.task == "tsp":
            finished = finished | (s["count"] >= self.n)
        s["done"] = s["done"] | finished

    def _delaunay_update(self, choice: Tensor, rows: Tensor, is_point: Tensor) -> None:
        s = self.state
        phase = s["count"] % 3
        a, b = s["pending"][:, 0].clone(), s["pending"][:, 1].clone()
        s["pending"][:, 0] = torch.where(is_point & (phase == 0), choice, a)
        s["pending"][:, 1] = torch.where(is_point & (phase == 1), choice, b)
        closes = is_point & (phase == 2)
        s["used"][rows, a, b, choice] |= closes
        s["third"][rows, a, b] -= closes.long()
        s["pairs"][rows, a] -= (closes & (s["third"][rows, a, b] == 0)).long()


# ---------------------------------------------------------------------------------------------
# The model


class PointerNetwork(nn.Module):
    """LSTM encoder, LSTM decoder, and a pointer made of additive attention over the inputs.

    The encoder reads the learned end token and then the points (each embedded by a linear
    map of its coordinates); the decoder starts from the encoder's final state and a learned
    start input, and its input at each later step is the embedding of the point (or end token)
    it pointed at before. The pointer distribution over positions 0..n is
    ``softmax_j(v . tanh(W1 e_j + W2 d_i))`` with the invalid positions masked out
    (:class:`Constraints`), so every likelihood here is that of the constrained decoder.

    Args:
        task: "hull", "delaunay" or "tsp" (picks the masks).
        hidden: LSTM and attention width (the paper: 256 or 512).
        init_scale: weights start uniform in [-init_scale, init_scale] (the paper: 0.08),
            except the coordinate embedding (see the note in the constructor).
        generator: draws the initial weights.

    Shapes:
        points Tensor[B, n, 2] -> encoder states Tensor[B, n + 1, hidden].
    """

    def __init__(
        self,
        task: str,
        hidden: int = 128,
        init_scale: float = 0.08,
        generator: torch.Generator | None = None,
    ):
        super().__init__()
        self.task = _check_task(task)
        _check_count("hidden", hidden, 1)
        if not (init_scale > 0 and math.isfinite(init_scale)):
            raise ValueError(f"init_scale must be positive and finite, got {init_scale}")
        self.hidden = hidden
        self.embed = nn.Linear(2, hidden)
        self.end_input = nn.Parameter(torch.empty(hidden))
        self.start_input = nn.Parameter(torch.empty(hidden))
        self.encoder = nn.LSTM(hidden, hidden, batch_first=True)
        self.decoder = nn.LSTMCell(hidden, hidden)
        self.w_enc = nn.Linear(hidden, hidden, bias=False)
        self.w_dec = nn.Linear(hidden, hidden, bias=False)
        self.v = nn.Linear(hidden, 1, bias=False)
        with torch.no_grad():
            for p in self.parameters():
                p.uniform_(-init_scale, init_scale, generator=generator)
            # The coordinate embedding starts at its fan-in scale, U(-1/sqrt(2), 1/sqrt(2)):
            # from U(-0.08, 0.08) the points reach the LSTM as a signal of about 0.05, and
            # Adam sat on a plateau (TSP5 loss 0.52 per token after 1500 steps, tours no
            # better than random) where this start learns within a few hundred steps.
            bound = 1 / math.sqrt(2)
            self.embed.weight.uniform_(-bound, bound, generator=generator)
            self.embed.bias.uniform_(-bound, bound, generator=generator)

    def _encode(self, points: Tensor):
        if points.dim() != 3 or points.shape[-1] != 2:
            raise ValueError(f"points must have shape [B, n, 2], got {tuple(points.shape)}")
        if points.shape[1] < 3:
            raise ValueError(f"each instance needs at least 3 points, got {points.shape[1]}")
        batch = points.shape[0]
        inputs = torch.cat(
            [self.end_input.expand(batch, 1, -1), self.embed(points.to(self.end_input.dtype))],
            dim=1,
        )
        states, (h, c) = self.encoder(inputs)
        return inputs, self.w_enc(states), (h[0], c[0])

    def _pointer(self, keys: Tensor, state: Tensor, allowed: Tensor) -> Tensor:
        scores = self.v(torch.tanh(keys + self.w_dec(state)[:, None, :])).squeeze(-1)
        scores = scores.masked_fill(~allowed, -math.inf)
        # A row with nothing allowed cannot occur under the masks; keep it finite regardless.
        return torch.log_softmax(scores, dim=-1).nan_to_num(nan=-math.inf)

    def forward(self, points: Tensor, targets: Tensor) -> Tensor:
        """Teacher-forced log-likelihood of the target outputs.

        Args:
            points (Tensor[B, n, 2]): the inputs.
            targets (LongTensor[B, T]): pointer positions (0 = end, i + 1 = point i), padded
                with 0 after the end; from :func:`encode_targets`.

        Returns:
            Tensor[B]: sum over steps of log p(target_t | targets_<t, points). Minus its sum
            over the batch divided by the output tokens is the paper's cross-entropy loss.

        Raises:
            ValueError: a target that the masks forbid (not a canonical label).
        """
        inputs, keys, state = self._encode(points)
        batch, n = points.shape[0], points.shape[1]
        if targets.dim() != 2 or targets.shape[0] != batch or targets.dtype != torch.long:
            raise ValueError(
                f"targets must be a LongTensor [{batch}, T], got {targets.dtype} "
                f"{tuple(targets.shape)}"
            )
        if targets.numel() and not 0 <= int(targets.min()) <= int(targets.max()) <= n:
            raise ValueError(f"targets must be pointer positions in 0..{n}")
        constraints = Constraints(self.task, batch, n, points.device)
        rows = torch.arange(batch, device=points.device)
        step_input = self.start_input.expand(batch, -1)
        total = torch.zeros(batch, dtype=keys.dtype, device=keys.device)
        forbidden = torch.zeros(batch, dtype=torch.bool, device=keys.device)
        for t in range(targets.shape[1]):
            state = self.decoder(step_input, state)
            allowed = constraints.allowed()
            log_p = self._pointer(keys, state[0], allowed)
            choice = targets[:, t]
            forbidden |= ~allowed[rows, choice]
            total = total + log_p[rows, choice]
            constraints.update(choice)
            step_input = inputs[rows, choice]
        # One check at the end: a host synchronisation per sequence, not per step.
        if bool(forbidden.any()):
            rows_bad = torch.nonzero(forbidden).flatten().tolist()[:5]
            raise ValueError(
                f"targets of rows {rows_bad} are not valid canonical {self.task} outputs "
                "(see encode_targets)"
            )
        return total

    @torch.no_grad()
    def greedy(self, points: Tensor, steps: int | None = None) -> tuple[Tensor, Tensor]:
        """The most likely pointer at every step, among the valid ones.

        Returns:
            (sequences LongTensor[B, T], log_likelihood Tensor[B]); sequences in pointer
            positions, padded with 0 (see :func:`outputs_from_sequences`).
        """
        inputs, keys, state = self._encode(points)
        batch, n = points.shape[0], points.shape[1]
        steps = steps or max_steps(self.task, n)
        constraints = Constraints(self.task, batch, n, points.device)
        rows = torch.arange(batch, device=points.device)
        step_input = self.start_input.expand(batch, -1)
        total = torch.zeros(batch, dtype=keys.dtype, device=keys.device)
        chosen = []
        for _ in range(steps):
            state = self.decoder(step_input, state)
            log_p = self._pointer(keys, state[0], constraints.allowed())
            best, choice = log_p.max(dim=-1)
            total += best
            chosen.append(choice)
            constraints.update(choice)
            step_input = inputs[rows, choice]
            if bool(constraints.state["done"].all()):
                break
        return torch.stack(chosen, dim=1), total

    @torch.no_grad()
    def beam_search(
        self, points: Tensor, beam: int, steps: int | None = None
    ) -> tuple[Tensor, Tensor]:
        """Beam search over valid outputs: keeps the ``beam`` most likely partial outputs per
        instance and returns the most likely complete one.

        Returns:
            (sequences LongTensor[B, T], log_likelihood Tensor[B]) as for :meth:`greedy`.
        """
        _check_count("beam", beam, 1)
        inputs, keys, state = self._encode(points)
        batch, n = points.shape[0], points.shape[1]
        width = n + 1
        steps = steps or max_steps(self.task, n)
        expand = torch.arange(batch, device=points.device).repeat_interleave(beam)
        inputs, keys = inputs[expand], keys[expand]
        state = (state[0][expand], state[1][expand])
        constraints = Constraints(self.task, batch * beam, n, points.device)
        score = torch.full((batch, beam), -math.inf, dtype=keys.dtype, device=keys.device)
        score[:, 0] = 0.0
        rows = torch.arange(batch * beam, device=points.device)
        offsets = (torch.arange(batch, device=points.device) * beam)[:, None]
        step_input = self.start_input.expand(batch * beam, -1)
        history = torch.zeros(batch * beam, 0, dtype=torch.long, device=points.device)
        for _ in range(steps):
            state = self.decoder(step_input, state)
            log_p = self._pointer(keys, state[0], constraints.allowed())
            candidates = (score.reshape(-1, 1) + log_p).reshape(batch, beam * width)
            score, flat = candidates.topk(beam, dim=-1)
            parent = (offsets + flat // width).reshape(-1)
            choice = (flat % width).reshape(-1)
            state = (state[0][parent], state[1][parent])
            constraints.reorder(parent)
            constraints.update(choice)
            history = torch.cat([history[parent], choice[:, None]], dim=1)
            step_input = inputs[rows, choice]
            if bool(constraints.state["done"].all()):
                break
        best = score.argmax(dim=-1)
        pick = offsets.squeeze(1) + best
        return history[pick], score[torch.arange(batch), best]


def decode(model: PointerNetwork, points: Tensor, beam: int = 1) -> tuple[Tensor, Tensor]:
    """Greedy decoding (``beam`` 1) or beam search, as pointer sequences and log-likelihoods.

    With ``beam`` > 1 the greedy output is kept as one more candidate: beam search may prune
    the greedy path on its way, and this way its answer is never less likely than greedy's.
    """
    _check_count("beam", beam, 1)
    greedy_seq, greedy_ll = model.greedy(points)
    if beam == 1:
        return greedy_seq, greedy_ll
    beam_seq, beam_ll = model.beam_search(points, beam)
    length = max(greedy_seq.shape[1], beam_seq.shape[1])
    greedy_seq = nn.functional.pad(greedy_seq, (0, length - greedy_seq.shape[1]))
    beam_seq = nn.functional.pad(beam_seq, (0, length - beam_seq.shape[1]))
    take_beam = beam_ll >= greedy_ll
    return (
        torch.where(take_beam[:, None], beam_seq, greedy_seq),
        torch.where(take_beam, beam_ll, greedy_ll),
    )


# ---------------------------------------------------------------------------------------------
# Labels, outputs and data


def encode_targets(task: str, labels: list, n: int) -> Tensor:
    """Labels (hull index lists, triangle lists or tours) as pointer sequences, LongTensor[B, T]
    padded with the end token: point i becomes position i + 1; hulls and triangulations end
    with the end token, tours have exactly n steps."""
    _check_task(task)
    sequences = []
    for label in labels:
        if task == "delaunay":
            flat = [i + 1 for triangle in label for i in triangle] + [END]
        elif task == "hull":
            flat = [i + 1 for i in label] + [END]
        else:
            flat = [i + 1 for i in label]
        sequences.append(flat)
    length = max((len(s) for s in sequences), default=max_steps(task, n))
    out = torch.zeros(len(sequences), length, dtype=torch.long)
    for row, flat in enumerate(sequences):
        out[row, : len(flat)] = torch.tensor(flat, dtype=torch.long)
    return out


def outputs_from_sequences(task: str, sequences: Tensor) -> list:
    """Pointer sequences back to outputs: hull index lists, triangle lists or tours."""
    _check_task(task)
    outputs = []
    for row in sequences.tolist():
        points = []
        for position in row:
            if position == END:
                break
            points.append(position - 1)
        if task == "delaunay":
            outputs.append([tuple(points[i : i + 3]) for i in range(0, len(points) - 2, 3)])
        else:
            outputs.append(points)
    return outputs


def output_tokens(targets: Tensor, task: str) -> int:
    """Tokens of the targets that carry a loss: every step up to and including the end."""
    if task == "tsp":
        return targets.numel()
    ends = (targets == END).long().argmax(dim=1)
    return int((ends + 1).sum())


@dataclass
class GeometryData:
    """Point sets and their labels: points Tensor[N, n, 2] float64, targets LongTensor[N, T]
    (:func:`encode_targets`), labels (python lists), and for TSP the lengths of the label
    tours and the solver behind them ("held-karp" is exact; "lkh" and "local" are not)."""

    task: str
    points: Tensor
    targets: Tensor
    labels: list
    optimal_lengths: Tensor | None = None
    tsp_solver: str | None = None


def make_data(task: str, count: int, n: int, seed: int, solver: str = "auto") -> GeometryData:
    """Uniform point sets with exact labels (TSP: Held-Karp up to 12 cities).

    Args:
        task: "hull", "delaunay" or "tsp".
        count: instances.
        n: points per instance (n >= 3; hull needs n >= 3, TSP labels above 12 cities come
            from :func:`deepkern.data.geometry.heuristic_tours` unless ``solver`` is "exact").
        seed: seeds the points.
        solver: for TSP, "auto", "exact" (Held-Karp, n <= 16) or "heuristic".

    Returns:
        :class:`GeometryData`.
    """
    _check_task(task)
    _check_count("count", count, 1)
    _check_count("n", n, 3)
    if solver not in ("auto", "exact", "heuristic"):
        raise ValueError(f"solver must be 'auto', 'exact' or 'heuristic', got {solver!r}")
    points = geometry.uniform_points(count, n, seed)
    optimal, tsp_solver = None, None
    if task == "hull":
        labels = [geometry.convex_hull(p) for p in points]
    elif task == "delaunay":
        labels = [geometry.delaunay_triangles(p) for p in points]
    else:
        if solver == "exact" or (solver == "auto" and n <= 12):
            tsp_solver = "held-karp"
            optimal, tours = geometry.held_karp(points)
        else:
            tsp_solver = "lkh" if importlib.util.find_spec("elkai") else "local"
            optimal, tours = geometry.heuristic_tours(points, method=tsp_solver)
        labels = tours.tolist()
    targets = encode_targets(task, labels, n)
    return GeometryData(task, points, targets, labels, optimal, tsp_solver)


# ---------------------------------------------------------------------------------------------
# Metrics (as the paper defines them)


def hull_metrics(points: Tensor, predicted: list, true: list) -> dict:
    """Accuracy (the predicted cycle equals the true hull, both in canonical form) and area
    coverage (area of the predicted polygon over the true hull's area; a polygon that is not
    simple counts as a failure and is left out of the mean, and the failures are counted)."""
    exact, coverage, failures = 0, [], 0
    for p, pred, truth in zip(points, predicted, true):
        exact += list(pred) == list(truth)
        if geometry.is_simple_polygon(p, pred):
            coverage.append(geometry.polygon_area(p, pred) / geometry.polygon_area(p, truth))
        else:
            failures += 1
    count = len(true)
    return {
        "accuracy": exact / count,
        "area_coverage": sum(coverage) / len(coverage) if coverage else float("nan"),
        "invalid": failures,
        "invalid_fraction": failures / count,
        "instances": count,
    }


def delaunay_metrics(predicted: list, true: list) -> dict:
    """Accuracy (the predicted triangle set equals the true one) and triangle coverage (the
    fraction of the true triangles that were predicted, averaged over instances)."""
    exact, coverage = 0, 0.0
    for pred, truth in zip(predicted, true):
        pred_set = {tuple(sorted(t)) for t in pred}
        truth_set = {tuple(t) for t in truth}
        exact += pred_set == truth_set
        coverage += len(pred_set & truth_set) / len(truth_set)
    return {"accuracy": exact / len(true), "triangle_coverage": coverage / len(true)}


def tsp_metrics(points: Tensor, predicted: list, optimal_lengths: Tensor | None) -> dict:
    """Mean tour length of the predicted tours beside the mean optimal one."""
    lengths = geometry.tour_length(points.double(), torch.tensor(predicted))
    result = {"tour_length": float(lengths.mean())}
    if optimal_lengths is not None:
        result["optimal_length"] = float(optimal_lengths.mean())
        result["gap"] = float((lengths / optimal_lengths).mean() - 1)
        result["optimal_found"] = float((lengths <= optimal_lengths + 1e-9).double().mean())
    return result


@torch.no_grad()
def evaluate(model: PointerNetwork, data: GeometryData, beam: int = 1, batch_size: int = 256):
    """The paper's metrics for ``model`` on ``data`` (decoded with :func:`decode`).

    Returns:
        dict: hull: accuracy, area_coverage, invalid, invalid_fraction; delaunay: accuracy,
        triangle_coverage; tsp: tour_length, optimal_length, gap, optimal_found. Always n,
        instances, beam.
    """
    _check_count("batch_size", batch_size, 1)
    if data.task != model.task:
        raise ValueError(f"the model is for {model.task}, the data for {data.task}")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    outputs = []
    for i in range(0, len(data.points), batch_size):
        sequences, _ = decode(model, data.points[i : i + batch_size].to(device), beam)
        outputs += outputs_from_sequences(data.task, sequences.cpu())
    model.train(was_training)
    if data.task == "hull":
        metrics = hull_metrics(data.points, outputs, data.labels)
    elif data.task == "delaunay":
        metrics = delaunay_metrics(outputs, data.labels)
    else:
        metrics = tsp_metrics(data.points, outputs, data.optimal_lengths)
        metrics["reference"] = data.tsp_solver
    metrics.update(n=data.points.shape[1], instances=len(data.points), beam=beam)
    return metrics


def solve_tsp(
    points, model: PointerNetwork, beam: int = 1, rescale: bool = True
) -> tuple[list[int], float]:
    """A tour of ``points`` by a TSP-trained Pointer Network.

    Args:
        points (Tensor[n, 2] or array): n >= 3 cities in any units.
        model: a :class:`PointerNetwork` for "tsp".
        beam: beam width (1 is greedy).
        rescale: first map the points into the unit square (shift, then one common scale, so
            the tour's shape is kept), where the model was trained.

    Returns:
        (tour in canonical form, its length in the points' own units).
    """
    if model.task != "tsp":
        raise ValueError(f"solve_tsp needs a model trained for tsp, got one for {model.task}")
    points = torch.as_tensor(points, dtype=torch.float64)
    if points.dim() != 2 or points.shape[1] != 2 or points.shape[0] < 3:
        raise ValueError(f"points must have shape [n >= 3, 2], got {tuple(points.shape)}")
    if not bool(torch.isfinite(points).all()):
        raise ValueError("points must be finite")
    scaled = points
    if rescale:
        shifted = points - points.min(dim=0).values
        scaled = shifted / shifted.max().clamp_min(torch.finfo(torch.float64).tiny)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    sequences, _ = decode(model, scaled[None].to(device), beam)
    model.train(was_training)
    tour = geometry.canonical_tour(outputs_from_sequences("tsp", sequences.cpu())[0])
    return tour, float(geometry.tour_length(points, tour))


# ---------------------------------------------------------------------------------------------
# Training


@dataclass
class TrainConfig:
    """Settings of :func:`train`.

    Attributes:
        task: "hull", "delaunay" or "tsp".
        n: points per training instance.
        train_size: training instances, drawn once from ``seed`` (the paper: 1,000,000).
        test_size: test instances for the final evaluation (0 skips it), from another seed.
        steps: optimiser steps; step k of process r takes ``batch_size`` instances drawn with
            replacement by a generator seeded by (seed, r, k), so a resumed run sees exactly
            what the uninterrupted one would have.
        batch_size: instances per step and process (the paper: 128).
        hidden: LSTM width (the paper: 256 or 512).
        optimizer: "adam", or "sgd" as in the paper (learning rate 1.0).
        lr: the learning rate.
        grad_clip: L2 norm the gradient is clipped to (the paper: 2.0); 0 turns it off.
        init_scale: weights start uniform in [-init_scale, init_scale] (the paper: 0.08).
        beam: beam width of the final evaluation (1 is greedy).
        solver: TSP labels: "auto" (Held-Karp up to 12 cities, then LKH), "exact", "heuristic".
        seed: seeds data, weights (:meth:`make_model`) and batches.
        device: where to train.
        checkpoint: file written atomically every ``checkpoint_every`` steps and at the end.
        checkpoint_every: steps between checkpoints.
        resume: continue from ``checkpoint`` when that file exists.
        progress: show a tqdm bar (first process only).
        log_every: steps between loss records.
    """

    task: str = "tsp"
    n: int = 5
    train_size: int = 10_000
    test_size: int = 1000
    steps: int = 1000
    batch_size: int = 128
    hidden: int = 128
    optimizer: str = "adam"
    lr: float = 1e-3
    grad_clip: float = 2.0
    init_scale: float = 0.08
    beam: int = 1
    solver: str = "auto"
    seed: int = 0
    device: str = "cpu"
    checkpoint: str | None = None
    checkpoint_every: int = 500
    resume: bool = False
    progress: bool = True
    log_every: int = 100

    def __post_init__(self):
        _check_task(self.task)
        _check_count("n", self.n, 3)
        _check_count("train_size", self.train_size, 1)
        _check_count("test_size", self.test_size, 0)
        _check_count("steps", self.steps, 0)
        _check_count("batch_size", self.batch_size, 1)
        _check_count("hidden", self.hidden, 1)
        _check_count("beam", self.beam, 1)
        _check_count("checkpoint_every", self.checkpoint_every, 1)
        _check_count("log_every", self.log_every, 1)
        if self.optimizer not in ("adam", "sgd"):
            raise ValueError(f"optimizer must be 'adam' or 'sgd', got {self.optimizer!r}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be positive and finite, got {self.lr}")
        if not (self.grad_clip >= 0 and math.isfinite(self.grad_clip)):
            raise ValueError(f"grad_clip must be >= 0 and finite, got {self.grad_clip}")
        if not (self.init_scale > 0 and math.isfinite(self.init_scale)):
            raise ValueError(f"init_scale must be positive and finite, got {self.init_scale}")
        if self.solver not in ("auto", "exact", "heuristic"):
            raise ValueError(f"solver must be 'auto', 'exact' or 'heuristic', got {self.solver!r}")
        if self.task == "tsp" and self.solver == "exact" and self.n > 16:
            raise ValueError(f"n must be <= 16 for exact TSP labels, got {self.n}")
        if self.resume and not self.checkpoint:
            raise ValueError("resume needs a checkpoint path")

    def make_model(self) -> PointerNetwork:
        """The network these settings describe, its initial weights drawn from ``seed``."""
        generator = torch.Generator().manual_seed(_derived_seed(self.seed, 1))
        return PointerNetwork(self.task, self.hidden, self.init_scale, generator)

    def make_train_data(self) -> GeometryData:
        return make_data(
            self.task, self.train_size, self.n, _derived_seed(self.seed, 2), self.solver
        )

    def make_test_data(self) -> GeometryData | None:
        if not self.test_size:
            return None
        return make_data(
            self.task, self.test_size, self.n, _derived_seed(self.seed, 3), self.solver
        )


def _derived_seed(*parts: int) -> int:
    """A 63-bit seed from a tuple of integers (a SplitMix64-style mix of the parts)."""
    mask = (1 << 64) - 1
    state = 0x9E3779B97F4A7C15
    for part in parts:
        state = (state ^ (int(part) & mask)) * 0xBF58476D1CE4E5B9 & mask
        state ^= state >> 31
        state = (state + 0x9E3779B97F4A7C15) * 0x94D049BB133111EB & mask
        state ^= state >> 29
    return state >> 1


def _batch_indices(config: TrainConfig, size: int, rank: int, step: int) -> Tensor:
    generator = torch.Generator().manual_seed(_derived_seed(config.seed, 4, rank, step))
    return torch.randint(size, (config.batch_size,), generator=generator)


def _make_optimizer(model: nn.Module, config: TrainConfig):
    if config.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=config.lr)
    return torch.optim.Adam(model.parameters(), lr=config.lr)


_ARCHITECTURE_KEYS = ("task", "n", "hidden", "train_size", "seed", "optimizer")


def _load_checkpoint(path: str, model, optimizer, config: TrainConfig, device):
    state = torch.load(path, map_location=device, weights_only=True)
    saved = state.get("config", {})
    for key in _ARCHITECTURE_KEYS:
        if key in saved and saved[key] != getattr(config, key):
            raise ValueError(
                f"checkpoint {path} was written for {key}={saved[key]!r}, but the settings say "
                f"{key}={getattr(config, key)!r}"
            )
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    logger.info("resumed from %s after step %d", path, state["step"])
    return int(state["step"]), list(state["history"])


def train(
    model: PointerNetwork,
    config: TrainConfig,
    data: GeometryData | None = None,
    test_data: GeometryData | None = None,
) -> dict:
    """Train ``model`` by teacher forcing: minimise the cross-entropy of the exact labels.

    Each step takes a batch of training instances, runs the decoder on the true previous
    pointers, and takes an optimiser step on the mean negative log-likelihood per output token
    (gradient norm clipped to ``grad_clip``). Under ``torch.distributed`` the model is wrapped
    in DistributedDataParallel and each process draws its own batch; the first process writes
    checkpoints, shows the bar and evaluates.

    Args:
        model: a :class:`PointerNetwork` for ``config.task``; trained in place.
        config: the settings.
        data: training data; built from ``config`` when None.
        test_data: evaluation data; built from ``config`` when None (``test_size`` 0: none).

    Returns:
        dict with task, n, parameters, steps, start_step, batch_size, world_size, final_loss,
        seconds (training only), history (step, mean loss per token, lr) and evaluation
        (:func:`evaluate`, or None).

    Raises:
        ValueError: a model for another task, a checkpoint written for other settings, or a
            loss that is not finite.

    Example:
        >>> config = TrainConfig(task="tsp", n=5, steps=300, progress=False)
        >>> metrics = train(config.make_model(), config)
        >>> metrics["evaluation"]["tour_length"], metrics["evaluation"]["optimal_length"]
    """
    if model.task != config.task:
        raise ValueError(f"the model is for task {model.task!r}, the settings for {config.task!r}")
    device = torch.device(config.device)
    model.to(device)
    rank, world = rank_and_world()
    data = data or config.make_train_data()
    if data.task != config.task or data.points.shape[1] != config.n:
        raise ValueError(
            f"the training data is {data.task} with n={data.points.shape[1]}, the settings "
            f"say {config.task} with n={config.n}"
        )
    points = data.points.float()

    optimizer = _make_optimizer(model, config)
    start_step, history = 0, []
    if config.resume and os.path.exists(config.checkpoint):
        start_step, history = _load_checkpoint(config.checkpoint, model, optimizer, config, device)

    net = data_parallel(model, device, world)

    started = time.perf_counter()
    bar = progress_bar(
        max(0, config.steps - start_step),
        f"{config.task} n={config.n}",
        config.progress and rank == 0,
    )
    net.train()
    window, window_start = 0.0, start_step
    try:
        for step in range(start_step, config.steps):
            index = _batch_indices(config, len(points), rank, step)
            targets = data.targets[index]
            ends = _trim(targets, config.task)
            log_likelihood = net(points[index].to(device), ends.to(device))
            loss = -log_likelihood.sum() / output_tokens(ends, config.task)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if config.grad_clip > 0:
                nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            optimizer.step()
            window += float(loss.detach())
            bar.update(1)

            done = step + 1
            if done % config.log_every == 0 or done == config.steps:
                mean_loss = window / (done - window_start)
                if not math.isfinite(mean_loss):
                    raise ValueError(
                        f"the training loss is not finite at step {done}; lower the learning "
                        f"rate (now {config.lr})"
                    )
                history.append({"step": done, "loss": mean_loss, "lr": config.lr})
                bar.set_postfix(loss=f"{mean_loss:.4f}")
                logger.info("%s n=%d step %d: loss %.5f", config.task, config.n, done, mean_loss)
                window, window_start = 0.0, done
            if config.checkpoint and (done % config.checkpoint_every == 0 or done == config.steps):
                if rank == 0:
                    save_atomic(
                        {
                            "step": done,
                            "model": model.state_dict(),
                            "optimizer": optimizer.state_dict(),
                            "history": history,
                            "config": dataclasses.asdict(config),
                        },
                        config.checkpoint,
                    )
                if world > 1:
                    dist.barrier()
    finally:
        bar.close()
    seconds = time.perf_counter() - started

    evaluation = None
    if rank == 0 and config.test_size:
        test_data = test_data or config.make_test_data()
        evaluation = evaluate(model, test_data, config.beam)
        logger.info("%s n=%d evaluation: %s", config.task, config.n, evaluation)
    return {
        "task": config.task,
        "n": config.n,
        "parameters": sum(p.numel() for p in model.parameters()),
        "steps": config.steps,
        "start_step": start_step,
        "batch_size": config.batch_size,
        "world_size": world,
        "final_loss": history[-1]["loss"] if history else None,
        "seconds": seconds,
        "history": history,
        "evaluation": evaluation,
    }


def _trim(targets: Tensor, task: str) -> Tensor:
    """Drop the columns after the batch's longest output: they are padding only."""
    if task == "tsp":
        return targets
    ends = (targets == END).long().argmax(dim=1)
    return targets[:, : int(ends.max()) + 1]


# ---------------------------------------------------------------------------------------------
# deepkern reproduce ptrnet


# The paper's figures (Vinyals, Fortunato and Jaitly 2015): Table 1 (convex hull, trained and
# tested at n = 50), Table 2 (TSP mean tour lengths; the Pointer Network trained on n = 5 to
# 20 with optimal or near-optimal labels), and the Delaunay figures stated in the text.
PUBLISHED = {
    ("hull", 50): {"accuracy": 0.726, "area_coverage": 0.999},
    ("delaunay", 5): {"accuracy": 0.807, "triangle_coverage": 0.930},
    ("tsp", 5): {"optimal_length": 2.12, "tour_length": 2.12},
    ("tsp", 10): {"optimal_length": 2.87, "tour_length": 2.88},
    ("tsp", 20): {"optimal_length": 3.83, "tour_length": 3.88},
}


@dataclass
class _Case:
    task: str
    n: int
    paper_n: int
    train_size: int
    steps: int


@dataclass
class _Size:
    cases: tuple[_Case, ...]
    hidden: int
    batch_size: int
    test_size: int
    optimizer: str
    lr: float
    beam: int


_SIZES = {
    "quick": _Size(
        cases=(_Case("hull", 6, 50, 256, 30), _Case("tsp", 5, 5, 256, 30)),
        hidden=32,
        batch_size=32,
        test_size=64,
        optimizer="adam",
        lr=1e-3,
        beam=2,
    ),
    # Adam at 3e-3 reaches in 1000 steps what 1e-3 reaches in 1500 (measured on hull n = 10,
    # TSP n = 10 and Delaunay n = 5); Delaunay learns slowest and gets the most steps.
    "default": _Size(
        cases=(
            _Case("hull", 10, 50, 20_000, 1000),
            _Case("delaunay", 5, 5, 20_000, 1200),
            _Case("tsp", 5, 5, 20_000, 600),
            _Case("tsp", 10, 10, 20_000, 1000),
        ),
        hidden=128,
        batch_size=128,
        test_size=1000,
        optimizer="adam",
        lr=3e-3,
        beam=2,
    ),
    # The paper's settings: one LSTM layer of 512 units, SGD at learning rate 1.0, batches of
    # 128, gradient norm clipped to 2.0, weights from U(-0.08, 0.08), 1M training examples.
    # The number of passes is not stated; 200,000 steps are 25.6 passes over 1M examples.
    "full": _Size(
        cases=(
            _Case("hull", 50, 50, 1_000_000, 200_000),
            _Case("delaunay", 5, 5, 1_000_000, 200_000),
            _Case("tsp", 5, 5, 1_000_000, 200_000),
            _Case("tsp", 10, 10, 1_000_000, 200_000),
            _Case("tsp", 20, 20, 1_000_000, 200_000),
        ),
        hidden=512,
        batch_size=128,
        test_size=10_000,
        optimizer="sgd",
        lr=1.0,
        beam=2,
    ),
}


def add_reproduce_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``deepkern reproduce ptrnet``.

    By default: hull n = 10, Delaunay n = 5, TSP n = 5 and 10, a 128-unit network trained for
    600 to 1200 Adam steps of 128 instances each, a few minutes in all on two CPU cores.
    ``--full`` uses the paper's sizes (hull n = 50, TSP up to 20, 512 units, SGD, 1M
    examples; hours on a GPU)::

        deepkern reproduce ptrnet --full --device cuda --checkpoint-dir runs/ptrnet
    """
    parser.description = (
        "Pointer Networks on convex hulls, Delaunay triangulations and the TSP: our metrics "
        "beside the paper's, with the problem size of each noted. Default: a CPU-sized run of "
        "a few minutes. --full: the paper's sizes (for a GPU)."
    )
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--full", action="store_true", help="the paper's sizes (GPU)")
    size.add_argument("--quick", action="store_true", help="a run of seconds (for tests)")
    parser.add_argument(
        "--tasks", nargs="+", metavar="TASK:N", help="cases to run, e.g. tsp:5 hull:10"
    )
    parser.add_argument("--steps", type=int, help="training steps per case")
    parser.add_argument("--train-size", type=int, help="training instances per case")
    parser.add_argument("--test-size", type=int, help="test instances per case")
    parser.add_argument("--hidden", type=int, help="LSTM width")
    parser.add_argument("--batch-size", type=int, help="instances per step")
    parser.add_argument("--beam", type=int, help="beam width at evaluation (1: greedy)")
    parser.add_argument("--seed", type=int, default=0, help="seed of data and weights")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    parser.add_argument("--threads", type=int, help="CPU threads for torch")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--checkpoint-dir", help="write one checkpoint per case here")
    parser.add_argument("--resume", action="store_true", help="continue from the checkpoints")
    parser.add_argument("--out", help="also write the results as JSON to this file")


def _paper_n(task: str, n: int) -> int:
    """The paper's problem size to print beside ours: the same n when the paper has it, else
    the one size it reports for that task (hull 50, Delaunay 5)."""
    sizes = [m for t, m in PUBLISHED if t == task]
    return n if n in sizes or len(sizes) != 1 else sizes[0]


def _parse_cases(specs, default: tuple[_Case, ...]) -> tuple[_Case, ...]:
    if not specs:
        return default
    cases = []
    for spec in specs:
        task, _, n = spec.partition(":")
        try:
            n = int(n)
        except ValueError:
            raise ValueError(f"a case is TASK:N, for example tsp:5; got {spec!r}") from None
        _check_task(task)
        _check_count("N", n, 3)
        cases.append(_Case(task, n, _paper_n(task, n), default[0].train_size, default[0].steps))
    return tuple(cases)


def run_reproduce(args: argparse.Namespace) -> int:
    """``deepkern reproduce ptrnet``: train each case, print ours beside the paper's.

    Returns:
        0 on success.
    """
    if args.threads is not None:
        _check_count("--threads", args.threads, 1)
        torch.set_num_threads(args.threads)
    size = _SIZES["full" if args.full else "quick" if args.quick else "default"]
    cases = _parse_cases(args.tasks, size.cases)
    rows = []
    started = time.perf_counter()
    for case in cases:
        checkpoint = None
        if args.checkpoint_dir:
            checkpoint = os.path.join(args.checkpoint_dir, f"{case.task}-{case.n}.pt")
        config = TrainConfig(
            task=case.task,
            n=case.n,
            train_size=args.train_size if args.train_size is not None else case.train_size,
            test_size=args.test_size if args.test_size is not None else size.test_size,
            steps=args.steps if args.steps is not None else case.steps,
            batch_size=args.batch_size if args.batch_size is not None else size.batch_size,
            hidden=args.hidden if args.hidden is not None else size.hidden,
            optimizer=size.optimizer,
            lr=size.lr,
            beam=args.beam if args.beam is not None else size.beam,
            seed=args.seed,
            device=args.device,
            checkpoint=checkpoint,
            resume=bool(args.resume and checkpoint),
            progress=not args.no_progress,
        )
        if config.test_size < 1:
            raise ValueError(f"--test-size must be positive, got {config.test_size}")
        case_started = time.perf_counter()
        metrics = train(config.make_model(), config)
        metrics["case_seconds"] = time.perf_counter() - case_started
        metrics["paper_n"] = case.paper_n
        rows.append(metrics)
    total = time.perf_counter() - started

    print(reproduce_table(rows))
    print(
        "hull accuracy: exact match of the canonical cycle; area: predicted polygon area / "
        "true hull area over the simple polygons (non-simple ones are counted as failures). "
        "Delaunay coverage: fraction of the true triangles predicted. TSP: mean tour length "
        "on uniform points in the unit square; 'optimal' is Held-Karp on our test set, "
        "'lkh' LKH-3 (elkai) and 'local' 2-opt with Or-opt."
    )
    print(f"total {total:.0f} s")
    if args.out:
        report = {
            "rows": rows,
            "published": {f"{t}:{n}": v for (t, n), v in PUBLISHED.items()},
            "seconds": total,
            "environment": environment(args.device),
        }
        write_json(args.out, report)
    return 0


_METRICS = {
    "hull": (("accuracy", "accuracy", True), ("area_coverage", "area coverage", True)),
    "delaunay": (
        ("accuracy", "accuracy", True),
        ("triangle_coverage", "triangle coverage", True),
    ),
    "tsp": (("optimal_length", "optimal tour", False), ("tour_length", "Ptr-Net tour", False)),
}


def _format(value, percent: bool) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{100 * value:.1f} %" if percent else f"{value:.3f}"


def reproduce_table(rows: list[dict]) -> str:
    """One line per metric and case: ours (with our n) beside the paper's (with its n)."""
    header = (
        f"{'task':<9} | {'metric':<20} | {'ours':>8} | {'n':>3} | {'paper':>8} | "
        f"{'n':>3} | {'beam':>4} | {'test':>6} | {'steps':>7}"
    )
    lines = [header, "-" * len(header)]
    for row in rows:
        evaluation = row["evaluation"]
        published = PUBLISHED.get((row["task"], row["paper_n"]), {})
        for key, name, percent in _METRICS[row["task"]]:
            theirs = published.get(key)
            if key == "optimal_length" and evaluation.get("reference") != "held-karp":
                name = f"{evaluation.get('reference')} tour (not exact)"
            lines.append(
                f"{row['task']:<9} | {name:<20} | {_format(evaluation.get(key), percent):>8} | "
                f"{row['n']:>3} | {_format(theirs, percent):>8} | "
                f"{row['paper_n'] if theirs is not None else '-':>3} | "
                f"{evaluation['beam']:>4} | {evaluation['instances']:>6} | {row['steps']:>7}"
            )
        if row["task"] == "hull" and evaluation["invalid"]:
            lines.append(
                f"{'':<9} | {'not simple':<20} | {evaluation['invalid']:>8} | {row['n']:>3} |"
            )
    return "\n".join(lines)
