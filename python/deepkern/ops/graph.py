"""Batched message passing on many small graphs: CSR segment reductions, fused gather-reduce,
and batched log-domain loopy belief propagation.

Conventions. A batch of graphs is one big graph whose nodes are numbered graph by graph.
Segment ops take CSR row pointers ``rowptr [N + 1]`` (int64, nondecreasing, ``rowptr[0] == 0``,
``rowptr[N]`` = number of rows of the values): segment i is rows ``rowptr[i] .. rowptr[i+1]``.
Empty segments give 0 (and argument -1 for max and min). Reductions are deterministic: each
output is reduced by one thread in row order, never with floating-point atomics.

Belief propagation works on directed edges: every undirected edge {u, v} appears twice, as
u -> v and v -> u, and ``reverse[e]`` names the opposite direction of edge e. The model is a
pairwise discrete Markov random field with S states per node,

    p(x) ~ exp( sum_v unary[v, x_v] + sum_{u < v} pairwise[e_uv, x_u, x_v] ),

where each undirected edge's log-potential is given once per direction, transposed:
``pairwise[reverse[e]] == pairwise[e].T``.

This module holds the public ops (their compiled kernels come from ``deepkern._C``), and the
plain-PyTorch references that tests and benchmarks compare the kernels against.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "REDUCTIONS",
    "segment_reduce",
    "gather_reduce",
    "reference_segment_reduce",
    "reference_gather_reduce",
    "reference_loopy_bp",
    "loopy_bp",
    "BPResult",
    "BP_MODES",
]

BP_MODES = {"sum": 0, "max": 1}

REDUCTIONS = ("sum", "mean", "max", "min")


# ---------------------------------------------------------------------------------------------
# Segment reductions and gather-reduce
#
# Public ops (compiled kernels; same arguments as the references below):
#   segment_reduce(values [R, *F], rowptr [N + 1], reduce) -> Tensor [N, *F]
#   gather_reduce(x [V, *F], rowptr [N + 1], col [E], weight [E] or None, reduce) -> [N, *F]


def _check_rowptr(rowptr: Tensor, rows: int, name: str = "rowptr") -> None:
    if rowptr.dtype != torch.int64 or rowptr.dim() != 1 or rowptr.numel() < 1:
        raise ValueError(f"{name} must be a 1-D int64 tensor of N + 1 row pointers")
    if int(rowptr[0]) != 0 or int(rowptr[-1]) != rows:
        raise ValueError(f"{name} must start at 0 and end at {rows}, the number of rows")
    if bool((rowptr[1:] < rowptr[:-1]).any()):
        raise ValueError(f"{name} must be nondecreasing")


def reference_segment_reduce(values: Tensor, rowptr: Tensor, reduce: str = "sum") -> Tensor:
    """out[i] = reduce(values[rowptr[i]:rowptr[i+1]]) in plain PyTorch; 0 for empty segments."""
    if reduce not in REDUCTIONS:
        raise ValueError(f"reduce must be one of {REDUCTIONS}, got {reduce!r}")
    _check_rowptr(rowptr, values.shape[0])
    segments = rowptr.numel() - 1
    out = values.new_zeros((segments, *values.shape[1:]))
    for i in range(segments):
        rows = values[int(rowptr[i]) : int(rowptr[i + 1])]
        if rows.shape[0] == 0:
            continue
        if reduce == "sum":
            out[i] = rows.sum(0)
        elif reduce == "mean":
            out[i] = rows.mean(0)
        elif reduce == "max":
            out[i] = rows.amax(0)
        else:
            out[i] = rows.amin(0)
    return out


def reference_gather_reduce(
    x: Tensor, rowptr: Tensor, col: Tensor, weight: Tensor | None = None, reduce: str = "sum"
) -> Tensor:
    """out[i] = reduce over edges e of row i of weight[e] * x[col[e]] (weight 1 when None)."""
    if col.dtype != torch.int64 or col.dim() != 1:
        raise ValueError("col must be a 1-D int64 tensor of column indices")
    if col.numel() and (int(col.min()) < 0 or int(col.max()) >= x.shape[0]):
        raise ValueError(f"col indices must lie in [0, {x.shape[0]})")
    messages = x[col]
    if weight is not None:
        if weight.shape != col.shape:
            raise ValueError(
                f"weight must have shape {tuple(col.shape)}, got {tuple(weight.shape)}"
            )
        messages = messages * weight.reshape(-1, *([1] * (x.dim() - 1)))
    return reference_segment_reduce(messages, rowptr, reduce)


def _reduce_code(reduce: str) -> int:
    if reduce not in REDUCTIONS:
        raise ValueError(f"reduce must be one of {REDUCTIONS}, got {reduce!r}")
    return REDUCTIONS.index(reduce)


def segment_reduce(values: Tensor, rowptr: Tensor, reduce: str = "sum") -> Tensor:
    """Reduce each segment of rows: ``out[i] = reduce(values[rowptr[i]:rowptr[i+1]])``.

    Args:
        values (Tensor[R, *F], float32 or float64; float16 and bfloat16 on CUDA): the rows.
        rowptr (Tensor[N + 1], int64, same device): CSR row pointers, starting at 0,
            nondecreasing, ending at R.
        reduce: "sum", "mean", "max" or "min".

    Returns:
        Tensor[N, *F]: the reductions; 0 for empty segments. The mean divides by the row count.

    Raises:
        ValueError: unknown ``reduce``.
        RuntimeError: wrong dtypes, shapes or devices, or row pointers that do not start at 0,
            decrease somewhere or do not end at R (the message names the argument and entry).

    Differentiable in ``values``. Max and min send the gradient to the first row holding the
    extreme (ties go to the lower row) and propagate NaN. Deterministic: every output element
    is reduced in row order by one thread, without atomics. Checking ``rowptr`` reads it: one
    host synchronisation on CUDA. float16 and bfloat16 accumulate in float32.

    Example:
        >>> values = torch.tensor([[1.0], [2.0], [5.0]])
        >>> segment_reduce(values, torch.tensor([0, 2, 2, 3]), "max")
        tensor([[2.],
                [0.],
                [5.]])
    """
    return torch.ops.deepkern.segment_reduce(values, rowptr, _reduce_code(reduce))[0]


def gather_reduce(
    x: Tensor, rowptr: Tensor, col: Tensor, weight: Tensor | None = None, reduce: str = "sum"
) -> Tensor:
    """Fused gather and segment reduction: ``out[i] = reduce_e weight[e] * x[col[e]]``.

    The edges of row i are ``rowptr[i] .. rowptr[i+1]``; the per-edge messages
    ``weight[e] * x[col[e]]`` are never stored. With ``col`` the sources of edges sorted by
    destination, this is one round of message passing.

    Args:
        x (Tensor[V, *F], float32 or float64; float16 and bfloat16 on CUDA): node features.
        rowptr (Tensor[N + 1], int64): CSR row pointers over the E edges.
        col (Tensor[E], int64): column (source row of x) of each edge, in [0, V).
        weight (Tensor[E] or None, dtype of x): edge weights; None means 1.
        reduce: "sum", "mean" (divides by the edge count, not the weight sum), "max" or "min".

    Returns:
        Tensor[N, *F]; 0 for rows without edges.

    Raises:
        ValueError: unknown ``reduce``.
        RuntimeError: bad dtypes, shapes or devices, row pointers that are not valid CSR
            pointers over E edges, or column indices outside [0, V).

    Differentiable in ``x`` and ``weight``. The gradient of ``x`` is summed over a transposed
    (column-sorted) edge list, one thread per element of x, so it is deterministic too. Checking
    ``rowptr`` and ``col`` reads them: one host synchronisation on CUDA per call, forward and
    backward.

    Example:
        >>> x = torch.tensor([[1.0], [10.0]])
        >>> gather_reduce(x, torch.tensor([0, 2, 3]), torch.tensor([0, 1, 1]),
        ...               torch.tensor([1.0, 2.0, 3.0]))
        tensor([[21.],
                [30.]])
    """
    return torch.ops.deepkern.gather_reduce(x, rowptr, col, weight, _reduce_code(reduce))[0]


def _fake_arg(out: Tensor, reduce: int) -> Tensor:
    if reduce in (2, 3):
        return out.new_empty(out.shape, dtype=torch.int64)
    return out.new_empty((0,), dtype=torch.int64)


def _check_fake_index(t: Tensor, name: str, like: Tensor) -> None:
    torch._check(
        t.dtype == torch.int64 and t.dim() == 1, lambda: f"{name} must be a 1-D int64 tensor"
    )
    torch._check(t.device == like.device, lambda: f"{name} must be on the device of {like.device}")


@torch.library.register_fake("deepkern::segment_reduce")
def _fake_segment_reduce(values, rowptr, reduce):
    torch._check(0 <= reduce <= 3, lambda: f"reduce must be 0, 1, 2 or 3, got {reduce}")
    torch._check(values.dim() >= 1, lambda: "values must have at least one dimension")
    _check_fake_index(rowptr, "rowptr", values)
    torch._check(rowptr.shape[0] >= 1, lambda: "rowptr must hold N + 1 >= 1 pointers")
    out = values.new_empty((rowptr.shape[0] - 1, *values.shape[1:]))
    return out, _fake_arg(out, reduce)


@torch.library.register_fake("deepkern::segment_reduce_backward")
def _fake_segment_reduce_backward(grad_out, rowptr, arg, reduce, rows):
    _check_fake_index(rowptr, "rowptr", grad_out)
    torch._check(rows >= 0, lambda: f"rows must be nonnegative, got {rows}")
    return grad_out.new_empty((rows, *grad_out.shape[1:]))


@torch.library.register_fake("deepkern::gather_reduce")
def _fake_gather_reduce(x, rowptr, col, weight, reduce):
    torch._check(0 <= reduce <= 3, lambda: f"reduce must be 0, 1, 2 or 3, got {reduce}")
    torch._check(x.dim() >= 1, lambda: "x must have at least one dimension")
    _check_fake_index(rowptr, "rowptr", x)
    _check_fake_index(col, "col", x)
    if weight is not None:
        torch._check(weight.shape == col.shape, lambda: "weight must have the shape of col")
    out = x.new_empty((rowptr.shape[0] - 1, *x.shape[1:]))
    return out, _fake_arg(out, reduce)


@torch.library.register_fake("deepkern::gather_reduce_backward")
def _fake_gather_reduce_backward(
    grad_out, x, rowptr, col, weight, arg, reduce, x_grad, weight_grad
):
    _check_fake_index(rowptr, "rowptr", x)
    _check_fake_index(col, "col", x)
    grad_x = x.new_empty(x.shape) if x_grad else x.new_empty((0,))
    grad_weight = x.new_empty(col.shape) if weight_grad else x.new_empty((0,))
    return grad_x, grad_weight


def _segment_setup(ctx, inputs, output):
    values, rowptr, reduce = inputs
    ctx.reduce = reduce
    ctx.rows = values.shape[0]
    ctx.save_for_backward(rowptr, output[1])


def _segment_backward(ctx, grad_out, grad_arg):
    rowptr, arg = ctx.saved_tensors
    grad_values = torch.ops.deepkern.segment_reduce_backward(
        grad_out, rowptr, arg, ctx.reduce, ctx.rows
    )
    return grad_values, None, None


def _gather_setup(ctx, inputs, output):
    x, rowptr, col, weight, reduce = inputs
    ctx.reduce = reduce
    ctx.save_for_backward(x, rowptr, col, weight, output[1])


def _gather_backward(ctx, grad_out, grad_arg):
    x, rowptr, col, weight, arg = ctx.saved_tensors
    x_grad, weight_grad = ctx.needs_input_grad[0], ctx.needs_input_grad[3]
    grad_x, grad_weight = torch.ops.deepkern.gather_reduce_backward(
        grad_out, x, rowptr, col, weight, arg, ctx.reduce, x_grad, weight_grad
    )
    return (grad_x if x_grad else None), None, None, (grad_weight if weight_grad else None), None


# The backward ops are linear in grad_out; their own gradients make double backward work
# (gradient penalties, Hessian-vector products). Max and min hold the arg fixed.


def _pick_at_arg(source: Tensor, arg: Tensor, rows: Tensor | None = None) -> Tensor:
    """source[index, f] at index = arg[i, f] (rows[arg] when given), 0 where arg is -1."""
    valid = arg >= 0
    if source.shape[0] == 0 or arg.numel() == 0 or (rows is not None and rows.numel() == 0):
        return source.new_zeros(arg.shape)  # then every arg is -1
    index = arg.clamp(min=0)
    if rows is not None:
        index = rows[index]
    return torch.where(valid, source.gather(0, index), 0)


def _per_edge(edge_values: Tensor, like: Tensor) -> Tensor:
    """A per-edge tensor [E] broadcast to [E, *like.shape[1:]] (a view)."""
    return edge_values.view(-1, *([1] * (like.dim() - 1))).expand(-1, *like.shape[1:])


def _segment_backward_setup(ctx, inputs, output):
    grad_out, rowptr, arg, reduce, rows = inputs
    ctx.reduce = reduce
    ctx.save_for_backward(rowptr, arg)


def _segment_double_backward(ctx, grad_grad_values):
    rowptr, arg = ctx.saved_tensors
    if ctx.reduce in (2, 3):
        grad = _pick_at_arg(grad_grad_values, arg)
    else:
        grad = torch.ops.deepkern.segment_reduce(grad_grad_values, rowptr, ctx.reduce)[0]
    return grad, None, None, None, None


def _gather_backward_setup(ctx, inputs, output):
    grad_out, x, rowptr, col, weight, arg, reduce, _, _ = inputs
    ctx.reduce = reduce
    ctx.save_for_backward(grad_out, x, rowptr, col, weight, arg)


def _gather_double_backward(ctx, grad_grad_x, grad_grad_weight):
    grad_out, x, rowptr, col, weight, arg = ctx.saved_tensors
    reduce = ctx.reduce
    # Outputs that were not asked for are empty; their incoming gradients carry nothing.
    if grad_grad_x is not None and grad_grad_x.shape != x.shape:
        grad_grad_x = None
    if grad_grad_weight is not None and grad_grad_weight.shape != col.shape:
        grad_grad_weight = None

    # grad_x = sum over edges into v of weight[e] G_e and grad_weight[e] = <G_e, x[col e]>,
    # with G_e the gradient out[row e] sends to edge e, linear in grad_out.
    grad_grad_out = grad_out.new_zeros(grad_out.shape)
    if reduce in (2, 3):
        if grad_grad_x is not None:
            picked = _pick_at_arg(grad_grad_x, arg, col)
            if weight is not None:
                picked = picked * _pick_at_arg(_per_edge(weight, arg), arg)
            grad_grad_out = grad_grad_out + picked
        if grad_grad_weight is not None:
            scale = _pick_at_arg(_per_edge(grad_grad_weight, arg), arg)
            grad_grad_out = grad_grad_out + scale * _pick_at_arg(x, arg, col)
    else:
        if grad_grad_x is not None:
            grad_grad_out = grad_grad_out + gather_reduce(
                grad_grad_x, rowptr, col, weight, REDUCTIONS[reduce]
            )
        if grad_grad_weight is not None:
            grad_grad_out = grad_grad_out + gather_reduce(
                x, rowptr, col, grad_grad_weight, REDUCTIONS[reduce]
            )

    grad_x = grad_weight = None
    if grad_grad_weight is not None and ctx.needs_input_grad[1]:
        grad_x = torch.ops.deepkern.gather_reduce_backward(
            grad_out, x, rowptr, col, grad_grad_weight, arg, reduce, True, False
        )[0]
    if grad_grad_x is not None and weight is not None and ctx.needs_input_grad[4]:
        grad_weight = torch.ops.deepkern.gather_reduce_backward(
            grad_out, grad_grad_x, rowptr, col, weight, arg, reduce, False, True
        )[1]
    return grad_grad_out, grad_x, None, None, grad_weight, None, None, None, None


torch.library.register_autograd(
    "deepkern::segment_reduce", _segment_backward, setup_context=_segment_setup
)
torch.library.register_autograd(
    "deepkern::gather_reduce", _gather_backward, setup_context=_gather_setup
)
torch.library.register_autograd(
    "deepkern::segment_reduce_backward",
    _segment_double_backward,
    setup_context=_segment_backward_setup,
)
torch.library.register_autograd(
    "deepkern::gather_reduce_backward",
    _gather_double_backward,
    setup_context=_gather_backward_setup,
)


# ---------------------------------------------------------------------------------------------
# Loopy belief propagation
#
# Public op (compiled kernel; same arguments and result as the reference below):
#   loopy_bp(unary, pairwise, src, dst, reverse, node_graph, num_graphs, mode="sum",
#            damping=0.0, tol=1e-6, max_iters=100) -> BPResult


class BPResult(tuple):
    """(log_marginals [V, S], log_messages [E, S], iterations [G] int64, converged [G] bool).

    Log-marginals and log-messages are normalised: logsumexp over states is 0 for sum-product,
    and the maximum over states is 0 for max-product (then they are max-marginals).
    """

    __slots__ = ()

    def __new__(cls, log_marginals, log_messages, iterations, converged):
        return super().__new__(cls, (log_marginals, log_messages, iterations, converged))

    log_marginals = property(lambda self: self[0])
    log_messages = property(lambda self: self[1])
    iterations = property(lambda self: self[2])
    converged = property(lambda self: self[3])


def _normalise(log_values: Tensor, mode: str) -> Tensor:
    if mode == "sum":
        return log_values - torch.logsumexp(log_values, dim=-1, keepdim=True)
    return log_values - log_values.amax(dim=-1, keepdim=True)


def reference_loopy_bp(
    unary: Tensor,
    pairwise: Tensor,
    src: Tensor,
    dst: Tensor,
    reverse: Tensor,
    node_graph: Tensor,
    num_graphs: int,
    mode: str = "sum",
    damping: float = 0.0,
    tol: float = 1e-6,
    max_iters: int = 100,
) -> BPResult:
    """Loopy BP in the log domain, flooding schedule, in plain PyTorch.

    Args:
        unary (Tensor[V, S], float32 or float64): log node potentials.
        pairwise (Tensor[E, S, S]): pairwise[e, a, b] is the log-potential of x_src = a, x_dst = b.
        src, dst, reverse (Tensor[E], int64): directed edges and each one's opposite.
        node_graph (Tensor[V], int64): graph of each node, in [0, num_graphs).
        mode: "sum" (sum-product: marginals) or "max" (max-product: max-marginals).
        damping (float in [0, 1)): new message = damping * old + (1 - damping) * update, in the
            log domain, between normalised messages, and normalised again (a convex combination
            of normalised log-messages is not normalised itself).
        tol (float >= 0): a graph has converged when no message of it changed by more than tol
            (max absolute difference of normalised log-messages) in an iteration; its messages
            are then frozen while the other graphs go on.
        max_iters (int >= 0): iteration cap per graph.

    Messages start uniform (log 1/S, or 0 for max-product). One iteration updates every message
    of every unconverged graph from the previous iteration's messages:

        m'[e](b) = reduce_a ( unary[src e](a) + pairwise[e](a, b)
                              + sum_{e' : dst e' = src e, e' != reverse e} m[e'](a) ),

    reduce = logsumexp (sum-product) or max (max-product), then normalised and, when damping
    is on, damped and normalised again.
    """
    if mode not in ("sum", "max"):
        raise ValueError(f"mode must be 'sum' or 'max', got {mode!r}")
    if not 0.0 <= damping < 1.0:
        raise ValueError(f"damping must lie in [0, 1), got {damping}")
    if tol < 0 or max_iters < 0:
        raise ValueError("tol and max_iters must be nonnegative")
    nodes, states = unary.shape
    edges = src.numel()
    if pairwise.shape != (edges, states, states):
        raise ValueError(
            f"pairwise must have shape {(edges, states, states)}, got {tuple(pairwise.shape)}"
        )

    reduce_states = torch.logsumexp if mode == "sum" else (lambda t, dim: t.amax(dim=dim))
    start = -torch.log(torch.tensor(float(states), dtype=unary.dtype)) if mode == "sum" else 0.0
    messages = unary.new_full((edges, states), float(start))
    edge_graph = node_graph[dst]
    active = torch.ones(num_graphs, dtype=torch.bool, device=unary.device)
    iterations = torch.zeros(num_graphs, dtype=torch.int64, device=unary.device)
    converged = torch.zeros(num_graphs, dtype=torch.bool, device=unary.device)

    for _ in range(max_iters):
        if not bool(active.any()):
            break
        incoming = unary.new_zeros((nodes, states)).index_add_(0, dst, messages)
        cavity = unary[src] + incoming[src] - messages[reverse]  # [E, S] over the source state
        update = reduce_states(cavity.unsqueeze(-1) + pairwise, dim=1)  # [E, S] over dst state
        update = _normalise(update, mode)
        if damping > 0.0:
            update = _normalise(damping * messages + (1.0 - damping) * update, mode)
        change = (update - messages).abs().amax(dim=1)
        graph_change = unary.new_zeros(num_graphs).scatter_reduce_(
            0, edge_graph, change, reduce="amax", include_self=True
        )
        moving = active[edge_graph]
        messages = torch.where(moving.unsqueeze(1), update, messages)
        iterations += active.long()
        newly = active & (graph_change <= tol)
        converged |= newly
        active &= ~newly

    incoming = unary.new_zeros((nodes, states)).index_add_(0, dst, messages)
    log_marginals = _normalise(unary + incoming, mode)
    return BPResult(log_marginals, messages, iterations, converged)


def loopy_bp(
    unary: Tensor,
    pairwise: Tensor,
    src: Tensor,
    dst: Tensor,
    reverse: Tensor,
    node_graph: Tensor,
    num_graphs: int,
    mode: str = "sum",
    damping: float = 0.0,
    tol: float = 1e-6,
    max_iters: int = 100,
) -> BPResult:
    """Batched loopy BP in the log domain: the compiled kernel of :func:`reference_loopy_bp`.

    Same arguments, semantics and result as the reference (flooding schedule, normalised
    messages, damping, per-graph convergence with frozen messages and per-graph iteration
    counts). Graphs are independent: each one iterates to its own convergence on one CPU thread
    or one CUDA warp, so results do not depend on the thread count, and nodes and edges may come
    in any order (the kernel sorts them by graph itself).

    Args:
        unary (Tensor[V, S], float32 or float64): log node potentials, finite, 1 <= S <= 32.
        pairwise (Tensor[E, S, S], dtype of unary): log edge potentials, finite, with
            ``pairwise[reverse[e]] == pairwise[e].T``. A forbidden state or pair takes a large
            negative finite value (say -1e4), not -inf.
        src, dst, reverse (Tensor[E], int64): directed edges without self-loops, each undirected
            edge in both directions, ``reverse`` pairing them (an involution with
            ``src[reverse[e]] == dst[e]``).
        node_graph (Tensor[V], int64): graph of each node, in [0, num_graphs); an edge joins two
            nodes of the same graph.
        num_graphs (int >= 0): number of graphs; a graph without nodes or edges converges after
            one iteration.
        mode: "sum" (marginals) or "max" (max-marginals).
        damping (float in [0, 1)), tol (float >= 0), max_iters (int >= 0): as in the reference.

    Returns:
        BPResult: log_marginals [V, S], log_messages [E, S], iterations [G] int64 and
        converged [G] bool, on the device of the inputs.

    Raises:
        ValueError: on an unknown mode, or inputs that require grad: the op is not
            differentiable.
        RuntimeError: on any other bad input, naming the argument. Checking the index and
            potential values reads them back, two host synchronisations on CUDA.

    Example:
        >>> unary = torch.tensor([[1.0, 0.0], [0.0, 0.0]])  # one edge 0 - 1 preferring equal
        >>> pairwise = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]] * 2)
        >>> e = torch.tensor
        >>> loopy_bp(unary, pairwise, e([0, 1]), e([1, 0]), e([1, 0]), e([0, 0]), 1).iterations
        tensor([2])
    """
    if mode not in BP_MODES:
        raise ValueError(f"mode must be one of {sorted(BP_MODES)}, got {mode!r}")
    if unary.requires_grad or pairwise.requires_grad:
        raise ValueError(
            "loopy_bp is not differentiable: unary and pairwise must not require grad "
            "(detach them, or differentiate reference_loopy_bp)"
        )
    result = torch.ops.deepkern.loopy_bp(
        unary,
        pairwise,
        src,
        dst,
        reverse,
        node_graph,
        int(num_graphs),
        BP_MODES[mode],
        float(damping),
        float(tol),
        int(max_iters),
    )
    return BPResult(*result)


@torch.library.register_fake("deepkern::loopy_bp")
def _fake_loopy_bp(
    unary, pairwise, src, dst, reverse, node_graph, num_graphs, mode, damping, tol, max_iters
):
    for name, t in (("pairwise", pairwise), ("src", src), ("dst", dst), ("reverse", reverse)):
        torch._check(
            t.device == unary.device,
            lambda name=name, t=t: f"{name} must be on the device of unary, got {t.device}",
        )
    torch._check(node_graph.device == unary.device, lambda: "node_graph must be on unary's device")
    torch._check(unary.dim() == 2, lambda: "unary must have shape [nodes, states]")
    torch._check(src.dim() == 1, lambda: "src must be 1-D")
    torch._check(num_graphs >= 0, lambda: f"num_graphs must be non-negative, got {num_graphs}")
    return (
        unary.new_empty(unary.shape),
        unary.new_empty((src.shape[0], unary.shape[1])),
        src.new_empty((num_graphs,), dtype=torch.int64),
        src.new_empty((num_graphs,), dtype=torch.bool),
    )
