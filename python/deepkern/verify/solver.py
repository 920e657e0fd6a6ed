"""A complete verifier: search for counterexamples, then branch and bound until an answer.

``verify`` decides whether some input in a specification's regions drives the network's outputs
into one of the region's disjuncts (``C y <= d``, every row). It returns ``"sat"`` with a
counterexample, ``"unsat"`` when no such input exists, or ``"timeout"``.

Search. A falsifier samples the box and runs projected gradient descent (signed steps, many
restarts at once) on each disjunct's margin ``max over rows of (C y - d)``. Its points are
rounded to numbers the network can receive (float32 for a float32 network), and each is judged
by running the network as it is: its rounding can meet a threshold that exact arithmetic
misses, so a point is a counterexample when the network's own outputs have a margin at or
below zero.

Proof. A box is cleared for a disjunct when some row's lower bound of ``C y`` exceeds its ``d``
(by a slack of 1e-9 (1 + |d|)); a region is cleared when every disjunct is. A child's bound is
the larger of its own and its parent's (both hold on it). Branch and bound splits what the
bounds cannot clear:

- few inputs (at most 32, e.g. ACAS Xu's 5): input splitting, depth first. Boxes are bounded by
  CROWN in batches of up to 2048; every box is halved along each dimension in turn, both
  halves bounded, and the dimension whose worse half bounds best (among those within four
  halvings of the widest, relative to the region) is split (its halves keep
  those bounds: one that clears is done, the other starts from its bound). The corner that
  minimises the bound's linear function and the box's center are tried as counterexamples on
  every box, and every eighth batch the worst boxes get a PGD attack. These networks run on
  one thread: their layers are too narrow to share.
- many inputs (e.g. MNIST's 784): ReLU splitting. A subproblem fixes some unstable ReLUs active
  (pre-activation >= 0) or inactive (<= 0); bounds come from ``method``: by default alpha-CROWN
  with a Lagrange multiplier per split constraint (beta-CROWN), 20 steps that resume from the
  parent's slopes and multipliers. Pre-activation bounds are the parent's, tightened again
  only after the layer of the new split. The neuron split is the unstable one whose relaxation
  costs the bound most (the BaBSR intercept score: the backward coefficient's magnitude times
  the chord's offset ``-u l / (u - l)``). The 64 subproblems with the lowest bounds go first.
  Every subproblem's bound points at a corner of the box (the minimiser of its linear lower
  bound), which is tried as a counterexample; the worst subproblems get PGD from there. Where
  every ReLU is fixed the network is affine, and a linear program finds the subproblem's worst
  point exactly; its duals, as the bound's multipliers, prove the subproblem when the program
  says it is clear (the bound, not the program's floating point answer, decides).

Before any splitting, the root bound's corners seed a second gradient attack: around the
center of a box the network can be flat (no gradient, so PGD from random points stalls), while
the bound's corner sits where the outputs change.

Floating point. The network runs in float32, the bounds in float64. An ``"unsat"`` verdict must
hold for the float32 network as it computes, whatever order its kernels sum in, so:

1. The proof box is widened to the float32 numbers nearest outside the region's bounds, so
   every float32 input the network can receive from the region lies in it.
2. The bounds are those of the network as it computes: ``PreparedNetwork.rounding_unit`` is set
   to 2^-24, and every layer's output is widened, per box, by a bound on the error float32
   adds there: ``gamma(n + 1) (|W| |h| + |b|)`` for an affine map of fan-in n, with
   ``gamma(k) = k u / (1 - k u)`` (Higham's bound for any summation order, with or without
   fused multiply-add) and ``|h|`` from the box's bounds on the computed input; nothing for
   ReLU; four units in the last place for sigmoid and tanh. The widening enters the
   pre-activation bounds and, through the backward coefficients, the final bound (``-|a|``
   times the error at each layer), so it costs the proof only what the network's own
   sensitivity makes of it, not a product of ``|W|`` over the layers.
3. The float64 arithmetic of the bounds themselves is covered by ten times the same model with
   ``u = 2^-53``.

Counterexamples are checked the other way round: the network itself, on the float32 point run
alone (batch of one), must meet the disjunct exactly (float64 comparison of its outputs).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace
from itertools import combinations

import torch
from torch import Tensor, nn

from deepkern.verify.bounds import (
    METHODS,
    OptimisedVariables,
    PreparedNetwork,
    affine_rows,
    compute_bounds,
    prepare_network,
)
from deepkern.verify.spec import Specification

__all__ = ["VerifyResult", "verify", "VERDICTS"]

VERDICTS = ("sat", "unsat", "timeout", "unknown")

# Input splitting works while the inputs are few; past this, splitting ReLUs wins.
_INPUT_SPLIT_MAX_INPUTS = 32
# Boxes of few inputs are cheap to split: plain CROWN (every pre-activation bounded by a
# backward pass) beats optimised slopes per second on ACAS Xu.
_INPUT_SPLIT_PASS = "backward"
_INPUT_SPLIT_METHOD = "crown"
_INPUT_SPLIT_STEPS = 0
# Input splitting bounds both halves along every dimension before it chooses one (ACAS Xu 1_2
# property 1: 99 boxes instead of 355); the flag lets tests compare the two choices.
_LOOK_AHEAD = True
# Input splitting tries the cheap split choice first, for at most this long (see
# _staged_input_split).
_STAGED = True
_FIRST_STAGE_SECONDS = 10.0
_NARROW_GAIN = 2.0
# Optimisation steps per ReLU-splitting subproblem (alpha); each resumes from its parent's.
_RELU_SPLIT_STEPS = 20
# How often a subproblem with every ReLU fixed may come back unproven before "unknown".
_FIXED_RETRIES = 25
# The cost per unit of broken split constraint in the linear program of a subproblem whose
# ReLUs are all fixed: above the multipliers a feasible subproblem needs, so its optimum is
# exact, and large enough that an empty subproblem's optimum clears it.
_ELASTIC_PENALTY = 1e4
# Memory for what open ReLU-splitting subproblems inherit (bounds, slopes, multipliers).
_STORED_BYTES_LIMIT = 2 << 30


@dataclass
class VerifyResult:
    """The answer of :func:`verify`.

    Attributes:
        verdict: ``"sat"`` (a counterexample exists), ``"unsat"`` (the property holds),
            ``"timeout"`` or ``"unknown"`` (the bounds cannot decide and nothing is left to
            split).
        counterexample: ``(x, y)``, float64 Tensor[inputs] and Tensor[outputs], for ``"sat"``:
            ``x`` is a float32 number in the region and ``y`` the network's output on it.
        seconds: wall-clock time spent.
        bound: the best proven lower bound of the violation margin (``max over rows of C y - d``
            minus the floating-point margin, minimised over the region and disjuncts): positive
            means proved. None when nothing was bounded.
        details: counts and timings of the search (falsifier restarts, domains, method, ...).
    """

    verdict: str
    counterexample: tuple[Tensor, Tensor] | None
    seconds: float
    bound: float | None
    details: dict = field(default_factory=dict)


class _Counterexample(Exception):
    def __init__(self, x: Tensor, y: Tensor):
        super().__init__("counterexample")
        self.x, self.y = x, y


class _Timeout(Exception):
    pass


class _Unknown(Exception):
    pass


# ---------------------------------------------------------------------------------------------
# Floating point


def _enclosure(lower: Tensor, upper: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """The smallest box of ``dtype`` numbers (as float64) that holds every number of [lower,
    upper] rounded to ``dtype``."""
    lo = lower.to(dtype)
    hi = upper.to(dtype)
    below = lo.to(torch.float64) > lower
    lo = torch.where(below, torch.nextafter(lo, torch.full_like(lo, -math.inf)), lo)
    above = hi.to(torch.float64) < upper
    hi = torch.where(above, torch.nextafter(hi, torch.full_like(hi, math.inf)), hi)
    return lo.to(torch.float64), hi.to(torch.float64)


def _activate(kind: str, x: Tensor) -> Tensor:
    if kind == "relu":
        return torch.relu(x)
    return torch.sigmoid(x) if kind == "sigmoid" else torch.tanh(x)


# ---------------------------------------------------------------------------------------------
# The problem: one region, its disjuncts as padded row blocks


class _Problem:
    def __init__(self, network, net, region, deadline, generator, details, run_dtype):
        self.network, self.net = network, net
        self.deadline, self.generator, self.details = deadline, generator, details
        self.run_dtype = run_dtype
        self.lower, self.upper = region.lower.to(torch.float64), region.upper.to(torch.float64)
        if run_dtype != torch.float64:
            self.proof_lower, self.proof_upper = _enclosure(self.lower, self.upper, run_dtype)
        else:
            self.proof_lower, self.proof_upper = self.lower, self.upper

        # A conjunction of several rows gains the means of its subsets of rows (of all rows
        # past five): where no single row's bound clears a box, a mean's may (if the mean of
        # C y - d is positive, some row is), and a mean never raises a maximum over rows.
        # Disjuncts are then padded to the same number of rows by repeating their first row.
        extended = []
        for disjunct in region.disjuncts:
            c = disjunct.coefficients.to(torch.float64)
            d = disjunct.bounds.to(torch.float64).reshape(-1)
            count = c.shape[0]
            subsets = (
                [s for size in range(2, count + 1) for s in combinations(range(count), size)]
                if count <= 5
                else [tuple(range(count))]
            )
            for subset in subsets if count > 1 else []:
                pick = list(subset)
                c = torch.cat([c, c[pick].mean(0, keepdim=True)])
                d = torch.cat([d, d[pick].mean(0, keepdim=True)])
            extended.append((c, d))
        rows = max(c.shape[0] for c, _ in extended)
        coefficients, bounds = [], []
        for c, d in extended:
            pad = rows - c.shape[0]
            coefficients.append(torch.cat([c, c[:1].expand(pad, -1)]))
            bounds.append(torch.cat([d, d[:1].expand(pad)]))
        self.coefficients = torch.stack(coefficients)  # [J, R, outputs]
        self.thresholds = torch.stack(bounds)  # [J, R]

        # The bounds cover the network as it computes (its rounding model); a row is cleared
        # when its lower bound of C y beats d by more than a slack for float64's own rounding.
        # Unit roundoff: 2^-24 for float32, 2^-53 for float64, 2^-11 and 2^-8 for the halves.
        unit = torch.finfo(run_dtype).eps / 2
        self.net = replace(net, rounding_unit=unit)
        self.margins = 1e-9 * (1 + self.thresholds.abs())
        self.clear_at = self.thresholds + self.margins

    def check_time(self) -> None:
        if time.perf_counter() > self.deadline:
            raise _Timeout

    def violation(self, y: Tensor, disjunct: Tensor) -> Tensor:
        """max over rows of C y - d for outputs y [N, outputs] against disjuncts [N]."""
        c, d = self.coefficients[disjunct], self.thresholds[disjunct]
        return ((c @ y.unsqueeze(-1)).squeeze(-1) - d).amax(-1)

    def representable(self, x: Tensor) -> Tensor:
        """The points [N, n] rounded to numbers the network can receive (its own dtype), moved
        one step back into the region where rounding left it; float64."""
        point = x.detach().to(self.run_dtype)
        wide = point.to(torch.float64)
        point = torch.where(
            wide < self.lower, torch.nextafter(point, torch.full_like(point, math.inf)), point
        )
        wide = point.to(torch.float64)
        point = torch.where(
            wide > self.upper, torch.nextafter(point, torch.full_like(point, -math.inf)), point
        )
        return point.to(torch.float64)

    def confirm(self, x: Tensor, disjunct: Tensor) -> None:
        """Raises _Counterexample for the first candidate that the network as it runs confirms."""
        if x.shape[0] == 0:
            return
        wide = self.representable(x)
        point = wide.to(self.run_dtype)
        inside = ((wide >= self.lower) & (wide <= self.upper)).all(-1)
        with torch.no_grad():
            shaped = point.reshape(-1, *self.net.input_shape)
            y = self.network(shaped).to(torch.float64).reshape(point.shape[0], -1)
        c, d = self.coefficients[disjunct], self.thresholds[disjunct]
        meets = ((c @ y.unsqueeze(-1)).squeeze(-1) <= d).all(-1) & inside
        # Float32 results depend on the batch size (different kernels sum differently): the
        # reported point is confirmed alone, as a user would run it.
        for index in meets.nonzero().squeeze(-1)[:16].tolist():
            with torch.no_grad():
                alone = self.network(point[index : index + 1].reshape(1, *self.net.input_shape))
            alone = alone.to(torch.float64).reshape(-1)
            if bool((c[index] @ alone <= d[index]).all()):
                raise _Counterexample(wide[index].clone(), alone)

    # -----------------------------------------------------------------------------------------
    # Falsifier

    def attack(self, lower, upper, disjunct, restarts: int, steps: int, seeds=None) -> None:
        """Random points and PGD in each box [N, n] on its disjunct [N]; raises on success.
        ``seeds`` [N, n], when given, replace the first restart of each box: a bound's
        minimising corner is a far better start than chance where the network is flat around
        the box's center (gradients vanish there, and PGD from random points stalls)."""
        count = lower.shape[0]
        width = (upper - lower).unsqueeze(1)
        start = torch.rand(count, restarts, lower.shape[1], generator=self.generator)
        x = lower.unsqueeze(1) + width * start
        if seeds is not None:
            x[:, 0] = torch.minimum(torch.maximum(seeds, lower), upper)
        x = x.reshape(count * restarts, -1)
        box_lo = lower.repeat_interleave(restarts, 0)
        box_hi = upper.repeat_interleave(restarts, 0)
        target = disjunct.repeat_interleave(restarts, 0)
        width = (box_hi - box_lo).clamp_min(0)
        for step in range(steps + 1):
            # The points are judged as the network receives them: a counterexample may be one
            # float32 number that no float64 step lands on.
            x = self.representable(x).requires_grad_(True)
            score = self.violation(self.net.forward(x), target)
            # Judged by the network as it runs, not by the float64 forward: its rounding can
            # meet a threshold that exact arithmetic misses.
            self.confirm(x.detach(), target)
            if step == steps:
                break
            (gradient,) = torch.autograd.grad(score.sum(), x)
            size = 0.5 * width * (1 - step / steps) ** 2 + 1e-3 * width
            with torch.no_grad():
                x = torch.minimum(torch.maximum(x - size * gradient.sign(), box_lo), box_hi)
            self.check_time()
        self.details["attack_points"] = self.details.get("attack_points", 0) + x.shape[0]


# ---------------------------------------------------------------------------------------------
# Branch and bound


def _row_scores(problem: _Problem, lower_rows: Tensor, disjunct: Tensor) -> Tensor:
    """Per domain: max over rows of (lower bound - d - margin); > 0 means cleared."""
    return (lower_rows - problem.clear_at[disjunct]).amax(-1)


def _bound_corners(coefficients: Tensor, lower: Tensor, upper: Tensor, rows: Tensor) -> Tensor:
    """Per box, the corner that minimises the linear lower bound (input ``coefficients``
    [N, R, n]) of row ``rows`` [N]: where the relaxation is tight, the network's worst point
    is near it."""
    a = coefficients[torch.arange(rows.shape[0]), rows]
    return torch.where(a > 0, lower, upper)


def _input_split(problem: _Problem, disjuncts: Tensor, batch: int, look_ahead: bool) -> float:
    """Input-splitting branch and bound over all disjuncts; returns the proven bound."""
    net = problem.net
    count = disjuncts.shape[0]
    lower = problem.proof_lower.expand(count, -1).clone()
    upper = problem.proof_upper.expand(count, -1).clone()
    parents = torch.full((count,), -math.inf, dtype=torch.float64)
    proven = math.inf
    domains = rounds = 0
    while lower.shape[0]:
        problem.check_time()
        take = min(batch, lower.shape[0])
        lo, hi, dj, parent_score = lower[-take:], upper[-take:], disjuncts[-take:], parents[-take:]
        lower, upper, disjuncts = lower[:-take], upper[:-take], disjuncts[:-take]
        parents = parents[:-take]
        domains += take
        problem.details["domains"] = problem.details.get("domains", 0) + take

        result = compute_bounds(
            net,
            lo,
            hi,
            problem.coefficients[dj],
            _INPUT_SPLIT_METHOD,
            steps=_INPUT_SPLIT_STEPS,
            upper_bound=False,
            intermediate_pass=_INPUT_SPLIT_PASS,
        )
        score = torch.maximum(_row_scores(problem, result.lower, dj), parent_score)
        cleared = score > 0
        if bool(cleared.any()):
            proven = min(proven, float(score[cleared].min()))
        keep = ~cleared
        if not bool(keep.any()):
            continue
        lo, hi, dj, score = lo[keep], hi[keep], dj[keep], score[keep]
        rows = result.lower[keep] - problem.clear_at[dj]
        a = result.input_coefficients[keep]

        # The row nearest to clearing decides; its bound's minimiser is a candidate.
        best_row = rows.argmax(-1)
        a_best = a[torch.arange(a.shape[0]), best_row]
        corner = torch.where(a_best > 0, lo, hi)
        center = (lo + hi) / 2
        candidates = problem.representable(torch.cat([corner, center]))
        problem.confirm(candidates, torch.cat([dj, dj]))

        # Boxes too thin to split further in float64 cannot be decided here.
        width = hi - lo
        widest = width.amax(-1)
        stuck = widest <= 1e-12 * (1 + torch.maximum(lo.abs(), hi.abs()).amax(-1))
        if bool(stuck.any()):
            problem.attack(lo[stuck], hi[stuck], dj[stuck], restarts=8, steps=20)
            raise _Unknown

        if look_ahead:
            choice, left_score, right_score = _look_ahead(problem, lo, hi, dj, score, batch)
            left_score = torch.maximum(left_score, score)
            right_score = torch.maximum(right_score, score)
        else:
            # The linear function's guess: the widest dimension weighted by its coefficient.
            choice = (a_best.abs() * width).argmax(-1)
            zero_coefficient = (a_best.abs() * width).amax(-1) <= 0
            choice = torch.where(zero_coefficient, width.argmax(-1), choice)
            left_score = right_score = score
        rows_index = torch.arange(lo.shape[0])
        middle = center[rows_index, choice]
        left_hi = hi.clone()
        left_hi[rows_index, choice] = middle
        right_lo = lo.clone()
        right_lo[rows_index, choice] = middle
        # Halves the look-ahead already cleared need no second bound.
        halves_score = torch.cat([left_score, right_score])
        cleared = halves_score > 0
        if bool(cleared.any()):
            proven = min(proven, float(halves_score[cleared].min()))
        open_half = ~cleared
        lower = torch.cat([lower, torch.cat([lo, right_lo])[open_half]])
        upper = torch.cat([upper, torch.cat([left_hi, hi])[open_half]])
        disjuncts = torch.cat([disjuncts, torch.cat([dj, dj])[open_half]])
        parents = torch.cat([parents, halves_score[open_half]])

        # The most hopeless boxes get a gradient attack now and then.
        rounds += 1
        if rounds % 8 == 0:
            worst = score.argsort()[: max(1, min(64, score.shape[0]))]
            problem.attack(lo[worst], hi[worst], dj[worst], restarts=4, steps=15)
    return proven


def _look_ahead(problem, lo, hi, dj, parent, batch: int) -> tuple[Tensor, Tensor, Tensor]:
    """Bounds both halves of every box [N, n] along every dimension and picks, per box, the
    dimension whose worse half has the best bound. Returns (dimension [N], the left and the
    right half's score [N]); the search keeps the halves' bounds, so none is computed twice.
    At most ``batch`` halves are bounded at once."""
    count, inputs = lo.shape
    problem.details["look_ahead_boxes"] = (
        problem.details.get("look_ahead_boxes", 0) + 2 * inputs * count
    )
    center = (lo + hi) / 2
    scores = []
    for dim in range(inputs):
        left_hi = hi.clone()
        left_hi[:, dim] = center[:, dim]
        right_lo = lo.clone()
        right_lo[:, dim] = center[:, dim]
        halves_lo, halves_hi = torch.cat([lo, right_lo]), torch.cat([left_hi, hi])
        targets = torch.cat([dj, dj])
        for first in range(0, 2 * count, batch):
            part = slice(first, first + batch)
            result = compute_bounds(
                problem.net,
                halves_lo[part],
                halves_hi[part],
                problem.coefficients[targets[part]],
                _INPUT_SPLIT_METHOD,
                steps=_INPUT_SPLIT_STEPS,
                upper_bound=False,
                intermediate_pass=_INPUT_SPLIT_PASS,
            )
            scores.append(_row_scores(problem, result.lower, targets[part]))
            problem.check_time()
    halves = torch.cat(scores).reshape(inputs, 2, count)
    # A dimension competes only while it is within four halvings of the box's widest (relative
    # to the region): otherwise a split that helps the bound a little every time would halve
    # one dimension forever and leave the others whole.
    # A narrow dimension still wins when its split gains at least twice what the best of the
    # others gains and closes at least half of the box's deficit: some properties are decided
    # along one input alone and need long thin boxes, while small steady gains along one
    # dimension must not starve the others.
    relative = ((hi - lo) / (problem.proof_upper - problem.proof_lower).clamp_min(1e-300)).T
    narrow = relative < relative.amax(0, keepdim=True) / 16
    gain = halves.amin(1) - parent.unsqueeze(0)
    best_wide = gain.masked_fill(narrow, -math.inf).amax(0, keepdim=True)
    outshines = (gain > _NARROW_GAIN * best_wide.clamp_min(0)) & (
        gain > 0.5 * parent.abs().unsqueeze(0)
    )
    choice = gain.masked_fill(narrow & ~outshines, -math.inf).argmax(0)
    index = torch.arange(count)
    return choice, halves[choice, 0, index], halves[choice, 1, index]


def _split_tensors(net: PreparedNetwork, decisions: list[Tensor]) -> list:
    splits = []
    for index, kind in enumerate(net.activation_kinds):
        if kind != "relu":
            splits.append(None)
            continue
        state = decisions[index]
        zero = torch.zeros(state.shape, dtype=net.dtype)
        lo = torch.where(state > 0, zero, torch.full_like(zero, -math.inf))
        hi = torch.where(state < 0, zero, torch.full_like(zero, math.inf))
        splits.append((lo, hi))
    return splits


def _select(tree, index):
    """The rows ``index`` of every tensor in a nest of lists, tuples and dicts."""
    if isinstance(tree, Tensor):
        return tree[index]
    if isinstance(tree, dict):
        return {key: _select(value, index) for key, value in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(_select(value, index) for value in tree)
    return tree


def _concat(trees: list):
    """Joins nests of the same structure along their first dimension."""
    first = trees[0]
    if isinstance(first, Tensor):
        return torch.cat(trees)
    if isinstance(first, dict):
        return {key: _concat([tree[key] for tree in trees]) for key in first}
    if isinstance(first, (list, tuple)):
        return type(first)(_concat(list(parts)) for parts in zip(*trees))
    return first


def _relu_split(
    problem: _Problem, disjuncts: Tensor, method: str, batch: int, root_bounds=None
) -> float:
    """ReLU-splitting branch and bound, lowest bounds first; returns the proven bound.

    Every open subproblem carries what its parent learnt: its pre-activation bounds (valid
    for the child too; only layers after the new split are tightened again) and, for alpha,
    its best slopes and split multipliers, from which the child's optimisation resumes, so a
    deep subproblem has had the steps of all its ancestors."""
    net = problem.net
    relu_layers = [i for i, k in enumerate(net.activation_kinds) if k == "relu"]
    count, rows = disjuncts.shape[0], problem.coefficients.shape[1]
    # The root's pre-activation bounds (one box, [1, units] per layer; CROWN's unless given)
    # are every subproblem's starting point.
    if root_bounds is None:
        box = problem.proof_lower.reshape(1, -1), problem.proof_upper.reshape(1, -1)
        root_bounds = compute_bounds(
            net, *box, problem.coefficients[:1], "crown", upper_bound=False
        ).intermediate
    layers = len(net.activation_units)
    domains = {
        "disjunct": disjuncts,
        "priority": torch.full((count,), -math.inf, dtype=torch.float64),
        "decisions": [torch.zeros(count, u, dtype=torch.int8) for u in net.activation_units],
        # The activation layer of the latest split: bounds of later layers need tightening.
        "last_split": torch.full((count,), layers, dtype=torch.long),
        # How often the subproblem came back with every ReLU fixed.
        "stalls": torch.zeros(count, dtype=torch.long),
        "bounds": [(lo.expand(count, -1), hi.expand(count, -1)) for lo, hi in root_bounds],
    }
    if method == "alpha":
        domains["slopes"] = {}
        domains["multipliers"] = {}
        for index in relu_layers:
            lo, hi = root_bounds[index]
            shape = (count, rows, lo.shape[-1])
            domains["slopes"][index] = (hi > -lo).float().unsqueeze(1).expand(shape)
            domains["multipliers"][index] = torch.zeros(shape)
    proven = math.inf
    rounds = undecided = 0
    remember = True
    steps = _RELU_SPLIT_STEPS if method == "alpha" else None
    while domains["disjunct"].shape[0]:
        problem.check_time()
        order = domains["priority"].argsort()
        taken = _select(domains, order[:batch])
        domains = _select(domains, order[batch:])
        dj, parent_score = taken["disjunct"], taken["priority"]
        chosen = taken["decisions"]
        size = dj.shape[0]
        problem.details["domains"] = problem.details.get("domains", 0) + size

        lo = problem.proof_lower.expand(size, -1)
        hi = problem.proof_upper.expand(size, -1)
        start = None
        refresh = [taken["last_split"] < index for index in range(layers)]
        if taken.get("slopes") is not None:
            start = OptimisedVariables(
                {i: s.double() for i, s in taken["slopes"].items()},
                {i: (m.double(), m.double()) for i, m in taken["multipliers"].items()},
            )
        result = compute_bounds(
            net,
            lo,
            hi,
            problem.coefficients[dj],
            method,
            splits=_split_tensors(net, chosen),
            steps=steps,
            upper_bound=False,
            intermediate=taken["bounds"],
            refresh=refresh,
            start=start,
        )
        # A parent's bound holds on its children too (splits need not tighten a bound).
        own = _row_scores(problem, result.lower, dj)
        score = torch.maximum(own, parent_score)
        cleared = score > 0
        if bool(cleared.any()):
            proven = min(proven, float(score[cleared].min()))
        keep = ~cleared
        if not bool(keep.any()):
            continue
        dj, score = dj[keep], score[keep]
        chosen = [d[keep] for d in chosen]
        best_row = (result.lower[keep] - problem.clear_at[dj]).argmax(-1)

        # Where a subdomain's relaxation is tight, its bound's minimising corner is close to
        # a counterexample if there is one: every corner is tried, the worst few attacked.
        if result.input_coefficients is not None:
            corners = _bound_corners(result.input_coefficients[keep], lo[keep], hi[keep], best_row)
            problem.confirm(corners, dj)
            rounds += 1
            if rounds % 8 == 0:
                worst = score.argsort()[:16]
                problem.attack(
                    lo[keep][worst], hi[keep][worst], dj[worst], 2, 20, seeds=corners[worst]
                )

        layer, unit = _branching_choice(result, keep, best_row, chosen, relu_layers)
        # Subproblems with every ReLU fixed cannot be split; the network is affine on each,
        # so their bound approaches the exact minimum as their multipliers train on. They go
        # back to the queue as they are (a few times at most), after a linear program has
        # looked for a counterexample in them.
        fixed = layer < 0
        stalls = taken["stalls"][keep] + fixed.long()
        exact_multipliers, exact_clears = _search_fixed(problem, result, keep, fixed, chosen, dj)
        done = torch.zeros_like(fixed)
        for position, cleared_by in exact_clears.items():
            done[position] = True
            proven = min(proven, cleared_by)
        # One that will not clear is set aside, and the search goes on without it: another
        # subproblem may still hold a counterexample.
        given_up = (stalls > _FIXED_RETRIES) & ~done
        undecided += int(given_up.sum())
        done |= given_up

        # Both children of every kept subproblem: first all active, then all inactive.
        parents = {
            "disjunct": dj,
            "priority": score,
            "decisions": chosen,
            "last_split": torch.where(fixed, layers, layer),
            "stalls": stalls,
            "bounds": None,
        }
        if remember:
            parents["bounds"] = [(b_lo[keep], b_hi[keep]) for b_lo, b_hi in result.intermediate]
        if "slopes" in domains:
            parents["slopes"] = parents["multipliers"] = None
        if method == "alpha" and remember:
            variables = result.variables
            parents["slopes"] = {i: s[keep].float() for i, s in variables.slopes.items()}
            parents["multipliers"] = {
                i: (variables.multipliers[i][0] + variables.multipliers[i][1])[keep].float()
                if i in variables.multipliers
                else taken["multipliers"][i][keep]
                for i in relu_layers
            }
            # A fixed subproblem resumes from the linear program's duals.
            for position, found in exact_multipliers.items():
                for index, values in found.items():
                    parents["multipliers"][index][position] = values.float()
        children = []
        for side in (1, -1):
            child = dict(parents, decisions=[d.clone() for d in chosen])
            rows_index = torch.arange(dj.shape[0])
            for index in relu_layers:
                here = layer == index
                child["decisions"][index][rows_index[here], unit[here]] = side
            # A fixed subproblem goes back once, not as two equal children.
            children.append(_select(child, ~done) if side > 0 else _select(child, ~fixed))
        domains = _concat([domains, *children])
        # What the parents pass on costs memory per subproblem; past a limit, the queue
        # forgets it and every subproblem starts afresh (slower, and bounded memory).
        if remember and _stored_bytes(domains) > _STORED_BYTES_LIMIT:
            remember = False
            domains["bounds"] = None
            if "slopes" in domains:
                domains["slopes"] = domains["multipliers"] = None
            problem.details["parents_forgotten_at"] = problem.details["domains"]
    if undecided:
        problem.details["undecided_subproblems"] = undecided
        raise _Unknown
    return proven


def _stored_bytes(tree) -> int:
    if isinstance(tree, Tensor):
        return tree.numel() * tree.element_size()
    if isinstance(tree, dict):
        return sum(_stored_bytes(value) for value in tree.values())
    if isinstance(tree, (list, tuple)):
        return sum(_stored_bytes(value) for value in tree)
    return 0


def _search_fixed(problem, result, keep, fixed, chosen, dj) -> tuple[dict, dict]:
    """Runs :func:`_search_affine_piece` on (at most four of) the kept subproblems marked
    ``fixed``, and bounds each program's weighted row with its multipliers. Returns, by
    position among the kept ones, the multipliers to resume from and the bounds (row score)
    of the subproblems that this clears. A network with sigmoid or tanh layers is not affine
    on any subproblem, and is left alone."""
    found_by_position, cleared = {}, {}
    if any(kind != "relu" for kind in problem.net.activation_kinds):
        return found_by_position, cleared
    net = problem.net
    for position in fixed.nonzero().squeeze(-1)[:4].tolist():
        row = keep.nonzero().squeeze(-1)[position]
        own = [(b_lo[row], b_hi[row]) for b_lo, b_hi in result.intermediate]
        decisions = [d[position] for d in chosen]
        disjunct = int(dj[position])
        found = _search_affine_piece(problem, own, decisions, disjunct)
        if found is None:
            continue
        multipliers, weights = found
        found_by_position[position] = multipliers
        # If the weighted mean of C y - d is positive, some row of the conjunction is.
        weighted = weights @ problem.coefficients[disjunct]
        threshold = weights @ problem.clear_at[disjunct]
        units = net.activation_units
        start = OptimisedVariables(
            {},
            {i: (m.reshape(1, 1, -1), m.reshape(1, 1, -1)) for i, m in multipliers.items()},
        )
        bound = compute_bounds(
            net,
            problem.proof_lower.reshape(1, -1),
            problem.proof_upper.reshape(1, -1),
            weighted.reshape(1, 1, -1),
            "alpha",
            splits=_split_tensors(net, [d.reshape(1, -1) for d in decisions]),
            steps=0,
            upper_bound=False,
            intermediate=[(lo.reshape(1, u), hi.reshape(1, u)) for (lo, hi), u in zip(own, units)],
            start=start,
        )
        score = float(bound.lower) - float(threshold)
        if score > 0:
            cleared[position] = score
    return found_by_position, cleared


def _search_affine_piece(
    problem: _Problem, intermediate: list, decisions: list, disjunct: int
) -> tuple[dict[int, Tensor], Tensor] | None:
    """Looks for a counterexample in a subproblem on which the network is affine (every ReLU
    fixed by its bounds or a split): the point of the box and the split constraints that
    minimises the largest ``C y - d`` solves a linear program (HiGHS through SciPy, skipped
    when SciPy is missing). Raises _Counterexample when the network confirms it.

    The program is elastic: the split constraints may be broken by ``s >= 0`` at a cost of
    ``_ELASTIC_PENALTY s``, so it always has a solution, and where the subproblem is empty
    (bounds alone could not tell) its optimum is large. Returns its dual values of the split
    constraints, per activation layer Tensor[units] (zero off the splits), scaled to one unit
    of objective, and the weights of the rows (summing to one): as multipliers of the bound of
    the rows so weighted, they bring it to the program's optimum (so an empty subproblem is
    cleared), and the bound, unlike the program's floating point answer, is rigorous. None
    when the program fails."""
    try:
        from scipy.optimize import linprog
    except ImportError:
        return None
    net = problem.net
    inputs = net.inputs
    c, d = problem.coefficients[disjunct], problem.thresholds[disjunct]
    out_a, out_offset = affine_rows(net, intermediate, c)
    # Variables x, t, s. C y(x) - d <= t for every row; splits broken by at most s;
    # minimise t + penalty s.
    no_slack = torch.zeros(c.shape[0], 1, dtype=out_a.dtype)
    rows = [torch.cat([out_a, -torch.ones(c.shape[0], 1, dtype=out_a.dtype), no_slack], 1)]
    limits = [d - out_offset]
    placed = []
    for index, state in enumerate(decisions):
        split = state.nonzero().squeeze(-1)
        if split.numel() == 0:
            continue
        units = torch.eye(net.activation_units[index], dtype=net.dtype)[split]
        z_a, z_offset = affine_rows(net, intermediate, units, layer=index)
        sign = state[split].to(net.dtype).unsqueeze(-1)
        # Active (sign 1): z >= -s, i.e. -z_a x - s <= z_offset; inactive: z_a x - s <= -z_offset.
        t_and_s = torch.tensor([[0.0, -1.0]], dtype=z_a.dtype).expand(split.numel(), 2)
        rows.append(torch.cat([-sign * z_a, t_and_s], 1))
        limits.append(sign.squeeze(-1) * z_offset)
        placed.append((index, split))
    cost = [0.0] * inputs + [1.0, _ELASTIC_PENALTY]
    box = list(zip(problem.proof_lower.tolist(), problem.proof_upper.tolist()))
    box += [(None, None), (0, None)]
    solution = linprog(
        cost,
        A_ub=torch.cat(rows).numpy(),
        b_ub=torch.cat(limits).numpy(),
        bounds=box,
        method="highs",
    )
    problem.details["linear_programs"] = problem.details.get("linear_programs", 0) + 1
    if solution.status != 0:
        return None
    point = torch.as_tensor(solution.x[:inputs], dtype=torch.float64).unsqueeze(0)
    problem.confirm(point, torch.tensor([disjunct]))

    # Duals of "<=" rows are <= 0 when minimising; the output rows' duals sum to one in
    # exact arithmetic, and dividing by their sum keeps that scale in floating point.
    duals = -torch.as_tensor(solution.ineqlin.marginals, dtype=torch.float64).clamp(max=0)
    weight = float(duals[: c.shape[0]].sum())
    if not weight > 0:
        return None
    multipliers = {}
    start = c.shape[0]
    for index, split in placed:
        values = torch.zeros(net.activation_units[index], dtype=torch.float64)
        values[split] = duals[start : start + split.numel()] / weight
        multipliers[index] = values
        start += split.numel()
    return multipliers, duals[: c.shape[0]] / weight


def _branching_choice(result, keep, best_row, chosen, relu_layers) -> tuple[Tensor, Tensor]:
    """Per kept subproblem, the (layer, unit) of the unstable, unsplit ReLU with the highest
    BaBSR intercept score: the backward coefficient's magnitude (where it takes the upper
    line) times the chord's offset ``-u l / (u - l)``; IBP has no backward coefficients, and
    its score is the offset alone. Layer -1 where none is left."""
    count = best_row.shape[0]
    best_score = torch.full((count,), -1.0, dtype=torch.float64)
    best_layer = torch.full((count,), -1, dtype=torch.long)
    best_unit = torch.zeros(count, dtype=torch.long)
    records = result.activation_coefficients or [None] * len(result.intermediate)
    for index in relu_layers:
        low, high = result.intermediate[index]
        low, high = low[keep], high[keep]
        unstable = (low < 0) & (high > 0) & (chosen[index] == 0)
        offset = -high * low / (high - low).clamp_min(1e-30)
        if records[index] is not None:
            weight = records[index][keep][torch.arange(count), best_row].clamp(max=0).abs()
        else:
            weight = torch.ones_like(offset)
        layer_score = torch.where(unstable, weight * offset + 1e-6 * (high - low), -1.0)
        value, unit = layer_score.max(-1)
        better = (value > best_score) & (value >= 0)
        best_score = torch.where(better, value, best_score)
        best_layer = torch.where(better, torch.full_like(best_layer, index), best_layer)
        best_unit = torch.where(better, unit, best_unit)
    return best_layer, best_unit


# ---------------------------------------------------------------------------------------------
# Entry point


def _check_spec(spec: Specification, net: PreparedNetwork) -> None:
    if not isinstance(spec, Specification):
        raise ValueError(f"spec must be a Specification, got {type(spec).__name__}")
    if spec.inputs != net.inputs or spec.outputs != net.outputs:
        raise ValueError(
            f"spec has {spec.inputs} inputs and {spec.outputs} outputs; the network has "
            f"{net.inputs} and {net.outputs}"
        )
    for number, region in enumerate(spec.regions):
        if region.lower.shape != (net.inputs,) or region.upper.shape != (net.inputs,):
            raise ValueError(f"spec region {number}: lower and upper must be [{net.inputs}]")
        if not bool(torch.isfinite(region.lower).all() and torch.isfinite(region.upper).all()):
            raise ValueError(f"spec region {number}: every input needs finite bounds")
        for j, disjunct in enumerate(region.disjuncts):
            c = disjunct.coefficients
            if c.dim() != 2 or c.shape[1] != net.outputs or c.shape[0] < 1:
                raise ValueError(
                    f"spec region {number} disjunct {j}: coefficients must be [k >= 1, "
                    f"{net.outputs}], got {tuple(c.shape)}"
                )
            if disjunct.bounds.numel() != c.shape[0]:
                raise ValueError(
                    f"spec region {number} disjunct {j}: bounds must have {c.shape[0]} values"
                )


def verify(
    network: nn.Sequential,
    spec: Specification,
    *,
    timeout: float,
    method: str = "alpha",
    seed: int = 0,
    input_shape: tuple[int, ...] | None = None,
) -> VerifyResult:
    """Decides whether ``spec`` has a counterexample on ``network``.

    Args:
        network: a verifiable ``nn.Sequential`` (see :mod:`deepkern.verify`); it is run as it
            is (its own dtype) to confirm counterexamples.
        spec: the specification; its boxes are flat, ``spec.inputs`` features.
        timeout: seconds of wall-clock time (> 0).
        method: the bound for the first pass and for ReLU splitting: ``"ibp"``, ``"crown"``,
            ``"alpha"`` or ``"dual"``. Input splitting uses CROWN, whose boxes are cheap.
        seed: seeds the falsifier's random points.
        input_shape: one sample's shape when the network needs more than flat vectors and
            cannot tell.

    Returns:
        VerifyResult.

    Raises:
        ValueError: a bad network, spec, method or timeout.
    """
    start = time.perf_counter()
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if not (isinstance(timeout, (int, float)) and timeout > 0):
        raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
    if not isinstance(spec, Specification):
        raise ValueError(f"spec must be a Specification, got {type(spec).__name__}")
    run_dtype = _run_dtype(network)
    try:
        net = prepare_network(network, input_shape, inputs=spec.inputs)
    except ValueError as error:
        raise ValueError(
            f"spec has {spec.inputs} inputs the network cannot take: {error}"
        ) from error
    _check_spec(spec, net)

    # A network with few inputs has layers too narrow for several threads to share: their
    # hand-offs cost more than the work, and on a busy machine a thread that waits for a
    # descheduled partner stalls every operation (ACAS Xu: one property took 0.9 s on one
    # thread and 8 s on two under a load of two). The caller's setting comes back at the end.
    threads = torch.get_num_threads()
    if net.inputs <= _INPUT_SPLIT_MAX_INPUTS:
        torch.set_num_threads(1)
    try:
        return _verify(network, net, spec, method, run_dtype, start, timeout, seed)
    finally:
        torch.set_num_threads(threads)


def _run_dtype(network: nn.Module) -> torch.dtype:
    """The one floating-point type the network computes in: float32 or float64. The rounding
    model covers those; half types overflow it on any real layer width (k u >= 1)."""
    if not isinstance(network, nn.Module):
        return torch.float32  # prepare_network names what is wrong with it
    dtypes = {t.dtype for t in (*network.parameters(), *network.buffers()) if t.is_floating_point()}
    if not dtypes:
        return torch.float32
    if len(dtypes) > 1 or not dtypes <= {torch.float32, torch.float64}:
        names = ", ".join(sorted(str(d).removeprefix("torch.") for d in dtypes))
        raise ValueError(
            f"network must compute in float32 or float64 throughout, has {names} "
            "(convert it with network.float())"
        )
    return dtypes.pop()


def _verify(network, net, spec, method, run_dtype, start, timeout, seed) -> VerifyResult:
    generator = torch.Generator().manual_seed(seed)
    details: dict = {"method": method}
    deadline = start + timeout
    bound = math.inf

    def finish(verdict, counterexample=None):
        seconds = time.perf_counter() - start
        final = None if bound == math.inf or verdict == "sat" else bound
        return VerifyResult(verdict, counterexample, seconds, final, details)

    try:
        problems = [
            _Problem(network, net, region, deadline, generator, details, run_dtype)
            for region in spec.regions
            if region.disjuncts
        ]
        # Falsify every region first: a counterexample anywhere ends the search.
        for problem in problems:
            every = torch.arange(problem.coefficients.shape[0])
            restarts = 64 if net.inputs <= _INPUT_SPLIT_MAX_INPUTS else 16
            problem.attack(
                problem.lower.expand(every.shape[0], -1),
                problem.upper.expand(every.shape[0], -1),
                every,
                restarts=restarts,
                steps=50,
            )
        details["falsifier_seconds"] = time.perf_counter() - start

        for problem in problems:
            bound = min(bound, _prove(problem, method))
    except _Counterexample as found:
        details["counterexample_after"] = time.perf_counter() - start
        return finish("sat", (found.x, found.y))
    except _Timeout:
        return finish("timeout")
    except _Unknown:
        return finish("unknown")
    return finish("unsat")


def _staged_input_split(problem: _Problem, disjuncts: Tensor) -> float:
    """Input splitting, first with the cheap split choice for a quarter of the remaining time,
    then with the look-ahead: neither choice wins on every property (some need the even
    halving of the cheap rule, others long thin boxes that only the look-ahead finds)."""
    if not (_LOOK_AHEAD and _STAGED):
        return _input_split(problem, disjuncts, batch=2048, look_ahead=_LOOK_AHEAD)
    deadline = problem.deadline
    remaining = deadline - time.perf_counter()
    problem.deadline = time.perf_counter() + min(_FIRST_STAGE_SECONDS, remaining / 4)
    try:
        return _input_split(problem, disjuncts, batch=2048, look_ahead=False)
    except _Timeout:
        problem.deadline = deadline
        problem.check_time()
        problem.details["first_stage_domains"] = problem.details.get("domains", 0)
        return _input_split(problem, disjuncts, batch=2048, look_ahead=True)
    finally:
        problem.deadline = deadline


def _prove(problem: _Problem, method: str) -> float:
    """Proves one region or raises; returns the proven bound."""
    net = problem.net
    every = torch.arange(problem.coefficients.shape[0])
    count = every.shape[0]
    lo = problem.proof_lower.expand(count, -1)
    hi = problem.proof_upper.expand(count, -1)
    first = compute_bounds(net, lo, hi, problem.coefficients, method, upper_bound=False)
    score = _row_scores(problem, first.lower, every)
    problem.details["root_bound"] = float(score.min())
    open_disjuncts = every[score <= 0]
    proven = float(score[score > 0].min()) if bool((score > 0).any()) else math.inf
    if open_disjuncts.shape[0] == 0:
        return proven
    # A second attack, from the corners that alpha-CROWN's bounds point at (optimised slopes
    # point nearer the worst inputs than CROWN's, and IBP and the dual give no corners).
    seeds = first
    if method != "alpha":
        seeds = compute_bounds(net, lo, hi, problem.coefficients, "alpha", upper_bound=False)
    if seeds.input_coefficients is not None:
        still = score <= 0
        best_row = (seeds.lower - problem.clear_at[every]).argmax(-1)[still]
        corners = _bound_corners(seeds.input_coefficients[still], lo[still], hi[still], best_row)
        seeded = torch.cat([corners, (corners + lo[still]) / 2, (corners + hi[still]) / 2])
        problem.attack(
            lo[still].repeat(3, 1),
            hi[still].repeat(3, 1),
            open_disjuncts.repeat(3),
            restarts=4,
            steps=50,
            seeds=seeded,
        )
    has_relu = "relu" in net.activation_kinds
    if net.inputs <= _INPUT_SPLIT_MAX_INPUTS or not has_relu:
        problem.details["strategy"] = "input split"
        found = _staged_input_split(problem, open_disjuncts)
    else:
        problem.details["strategy"] = "relu split"
        # The dual bound takes the CROWN family's place inside the search (see _prove's caller).
        # The first pass's pre-activation bounds serve the search, unless IBP's (looser).
        root_bounds = None
        if method != "ibp":
            root_bounds = [(lo[:1], hi[:1]) for lo, hi in first.intermediate]
        search_method = "alpha" if method == "dual" else method
        found = _relu_split(problem, open_disjuncts, search_method, 64, root_bounds)
    return min(proven, found)
