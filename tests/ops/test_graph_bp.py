"""The loopy BP op: exact inference on trees (enumeration), agreement with the plain-PyTorch
reference on loopy batches (iteration counts and convergence flags included), thread-count
independence, degenerate batches, extreme potentials, and bad input."""

import itertools
import math

import pytest
import torch

from deepkern.ops import graph
from tests.conftest import DEVICES

F64 = torch.float64
# Message and marginal tolerance against the reference, per dtype.
ATOL = {torch.float32: 2e-5, F64: 1e-12}
TOL = {torch.float32: 1e-4, F64: 1e-10}


# ---------------------------------------------------------------------------------------------
# Graphs


def tree(n: int, g: torch.Generator) -> tuple[int, list[tuple[int, int]]]:
    parents = [int(torch.randint(0, i, (1,), generator=g)) for i in range(1, n)]
    return n, [(p, i) for i, p in enumerate(parents, start=1)]


def cycle(n: int) -> tuple[int, list[tuple[int, int]]]:
    return n, [(i, (i + 1) % n) for i in range(n)]


def grid(rows: int, cols: int) -> tuple[int, list[tuple[int, int]]]:
    edges = [(r * cols + c, r * cols + c + 1) for r in range(rows) for c in range(cols - 1)]
    edges += [(r * cols + c, (r + 1) * cols + c) for r in range(rows - 1) for c in range(cols)]
    return rows * cols, edges


def complete(n: int) -> tuple[int, list[tuple[int, int]]]:
    return n, list(itertools.combinations(range(n), 2))


def batch(graphs, states, dtype=F64, scale=1.0, seed=0, shuffle=False, device="cpu"):
    """The op's arguments for a list of (nodes, undirected edges): edge k is 2k (u -> v) and
    2k + 1 (v -> u). With shuffle, nodes and edges are permuted so that graphs interleave."""
    g = torch.Generator().manual_seed(seed)
    src, dst, node_graph, offset = [], [], [], 0
    for index, (n, edges) in enumerate(graphs):
        for u, v in edges:
            src += [offset + u, offset + v]
            dst += [offset + v, offset + u]
        node_graph += [index] * n
        offset += n
    src, dst = torch.tensor(src, dtype=torch.long), torch.tensor(dst, dtype=torch.long)
    node_graph = torch.tensor(node_graph, dtype=torch.long)
    E = src.numel()
    reverse = torch.arange(E) ^ 1
    unary = torch.randn(offset, states, generator=g, dtype=F64) * scale
    half = torch.randn(E // 2, states, states, generator=g, dtype=F64) * scale
    pairwise = torch.stack([half, half.transpose(1, 2)], 1).reshape(E, states, states)
    if shuffle:
        node_perm = torch.randperm(offset, generator=g)  # new id of each old node
        unary = unary[torch.argsort(node_perm)]
        node_graph = node_graph[torch.argsort(node_perm)]
        src, dst = node_perm[src], node_perm[dst]
        edge_perm = torch.randperm(E, generator=g)  # new position of each old edge
        old_at = torch.argsort(edge_perm)
        src, dst, pairwise = src[old_at], dst[old_at], pairwise[old_at]
        reverse = edge_perm[reverse[old_at]]
    to = dict(device=device)
    return (
        unary.to(dtype=dtype, **to),
        pairwise.to(dtype=dtype, **to),
        src.to(**to),
        dst.to(**to),
        reverse.to(**to),
        node_graph.to(**to),
        len(graphs),
    )


def exact_log_marginals(unary, pairwise, src, dst, mode):
    """Log (max-)marginals of one small graph by enumerating every assignment, in float64."""
    nodes, states = unary.shape
    assignments = torch.tensor(list(itertools.product(range(states), repeat=nodes)))
    score = unary.double()[torch.arange(nodes), assignments].sum(1)
    for e in range(0, src.numel(), 2):
        u, v = int(src[e]), int(dst[e])
        score = score + pairwise.double()[e][assignments[:, u], assignments[:, v]]
    out = torch.empty(nodes, states, dtype=F64)
    for v in range(nodes):
        for s in range(states):
            chosen = score[assignments[:, v] == s]
            out[v, s] = torch.logsumexp(chosen, 0) if mode == "sum" else chosen.max()
    if mode == "sum":
        return out - torch.logsumexp(out, 1, keepdim=True)
    return out - out.amax(1, keepdim=True)


def assert_same_result(got, want, dtype, exact_counts=True):
    torch.testing.assert_close(got.log_marginals, want.log_marginals, atol=ATOL[dtype], rtol=0)
    torch.testing.assert_close(got.log_messages, want.log_messages, atol=ATOL[dtype], rtol=0)
    if exact_counts:
        assert torch.equal(got.iterations, want.iterations)
        assert torch.equal(got.converged, want.converged)


# ---------------------------------------------------------------------------------------------
# Exactness on trees


@pytest.mark.parametrize("mode", ["sum", "max"])
@pytest.mark.parametrize("states", [2, 3])
def test_trees_give_exact_marginals(mode, states):
    g = torch.Generator().manual_seed(states)
    sizes = [1, 2, 5, 8] if states == 3 else [3, 7, 10, 10]
    trees = [tree(n, g) for n in sizes]
    args = batch(trees, states, scale=1.5, seed=7, shuffle=True)
    result = graph.loopy_bp(*args, mode=mode, tol=1e-12, max_iters=50)
    assert bool(result.converged.all())

    unary, pairwise, src, dst, reverse, node_graph, _ = args
    for index in range(len(trees)):
        nodes = (node_graph == index).nonzero().flatten()
        local = torch.full((unary.shape[0],), -1, dtype=torch.long)
        local[nodes] = torch.arange(nodes.numel())
        keep = (node_graph[src] == index).nonzero().flatten()
        # Pairs (e, reverse e) in order, so that enumeration reads each undirected edge once.
        forward = keep[src[keep] < dst[keep]]
        order = torch.stack([forward, reverse[forward]], 1).flatten()
        want = exact_log_marginals(
            unary[nodes], pairwise[order], local[src[order]], local[dst[order]], mode
        )
        torch.testing.assert_close(result.log_marginals[nodes], want, atol=1e-10, rtol=0)
        # BP on a tree converges once messages have crossed it: diameter + 1 sweeps at most.
        assert int(result.iterations[index]) <= nodes.numel() + 1


# ---------------------------------------------------------------------------------------------
# Agreement with the reference


LOOPY = [cycle(5), grid(3, 4), complete(5), cycle(12), grid(4, 4), complete(4), (2, [(0, 1)])]


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("mode", ["sum", "max"])
@pytest.mark.parametrize("damping", [0.0, 0.4])
def test_loopy_batches_match_the_reference(dtype, mode, damping):
    for states, seed in ((2, 1), (3, 2), (5, 3)):
        args = batch(LOOPY, states, dtype, seed=seed, shuffle=seed == 2)
        options = dict(mode=mode, damping=damping, tol=TOL[dtype], max_iters=60)
        got = graph.loopy_bp(*args, **options)
        want = graph.reference_loopy_bp(*args, **options)
        assert_same_result(got, want, dtype)
        assert got.iterations.min() >= 2
        if mode == "max":  # the same operations in the same order: the same bits
            assert torch.equal(got.log_messages, want.log_messages)


def test_graphs_stop_on_their_own_and_hit_the_cap():
    # A frustrated complete graph (neighbours prefer different states) settles slowly, a weakly
    # coupled chain fast: under a cap of 20 iterations the first runs out and the second stops.
    args = list(batch([complete(5), grid(1, 6)], 2, scale=0.1, seed=4))
    args[1][:20] = torch.tensor([[0.0, -1.0], [-1.0, 0.0]], dtype=F64)
    got = graph.loopy_bp(*args, tol=1e-9, max_iters=20)
    want = graph.reference_loopy_bp(*args, tol=1e-9, max_iters=20)
    assert_same_result(got, want, F64)
    assert got.converged.tolist() == [False, True]
    assert got.iterations[0] == 20 and got.iterations[1] < 20
    # The converged chain's messages stayed frozen while the complete graph went on.
    unary, pairwise, src, dst, reverse, _, _ = args
    chain = (unary[5:], pairwise[20:], src[20:] - 5, dst[20:] - 5, reverse[20:] - 20)
    alone = graph.loopy_bp(*chain, torch.zeros(6, dtype=torch.long), 1, tol=1e-9, max_iters=20)
    assert torch.equal(alone.log_messages, got.log_messages[20:])
    assert torch.equal(alone.iterations, got.iterations[1:])


@pytest.mark.parametrize("states", [1, 7, 17])
def test_uncommon_state_counts(states):
    args = batch([grid(2, 3), cycle(4)], states, seed=5)
    got = graph.loopy_bp(*args, tol=1e-10)
    assert_same_result(got, graph.reference_loopy_bp(*args, tol=1e-10), F64)
    if states == 1:
        assert torch.equal(got.log_marginals, torch.zeros(10, 1, dtype=F64))


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_extreme_potentials_stay_exact(dtype):
    # Log-potentials spanning more than the exponent range take the max-shifted path.
    scale = 60.0 if dtype == torch.float32 else 500.0
    args = batch([grid(3, 3), complete(4)], 3, dtype, scale=scale, seed=6)
    got = graph.loopy_bp(*args, tol=TOL[dtype], max_iters=30)
    want = graph.reference_loopy_bp(*args, tol=TOL[dtype], max_iters=30)
    atol = scale * torch.finfo(dtype).eps * 8
    torch.testing.assert_close(got.log_messages, want.log_messages, atol=atol, rtol=0)
    assert bool(torch.isfinite(got.log_marginals).all())


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("damping", [0.0, 0.3])
def test_two_state_extreme_potentials_stay_exact(dtype, damping):
    # Two states take their own path; potentials this wide send many of its messages back to
    # the generic max-shifted update.
    scale = 60.0 if dtype == torch.float32 else 500.0
    args = batch([grid(3, 3), complete(4), cycle(5)], 2, dtype, scale=scale, seed=13)
    options = dict(damping=damping, tol=TOL[dtype], max_iters=30)
    got = graph.loopy_bp(*args, **options)
    want = graph.reference_loopy_bp(*args, **options)
    atol = scale * torch.finfo(dtype).eps * 8
    torch.testing.assert_close(got.log_messages, want.log_messages, atol=atol, rtol=0)
    torch.testing.assert_close(got.log_marginals, want.log_marginals, atol=atol, rtol=0)


@pytest.mark.parametrize("damping", [0.0, 0.5])
def test_two_states_agree_with_the_generic_path(damping):
    # A third state that no assignment can take (unary -1e4, beyond the float64 exponent range
    # once exponentiated) leaves the marginals of the first two unchanged, and sends the same
    # problem through the generic sum-product update. Messages differ only in normalisation, so
    # their differences between the two states must agree.
    graphs = [grid(4, 5), complete(5), cycle(7)]
    two = batch(graphs, 2, seed=14, shuffle=True)
    unary, pairwise = two[0], two[1]
    three_unary = torch.cat([unary, torch.full_like(unary[:, :1], -1e4)], 1)
    three_pairwise = torch.zeros(pairwise.shape[0], 3, 3, dtype=F64)
    three_pairwise[:, :2, :2] = pairwise
    three = (three_unary, three_pairwise, *two[2:])
    options = dict(damping=damping, tol=0.0, max_iters=25)
    got = graph.loopy_bp(*two, **options)
    want = graph.loopy_bp(*three, **options)
    assert got.iterations.tolist() == want.iterations.tolist() == [25] * len(graphs)
    torch.testing.assert_close(got.log_marginals, want.log_marginals[:, :2], atol=1e-12, rtol=0)
    got_gap = got.log_messages[:, 0] - got.log_messages[:, 1]
    want_gap = want.log_messages[:, 0] - want.log_messages[:, 1]
    torch.testing.assert_close(got_gap, want_gap, atol=1e-12, rtol=0)


@pytest.mark.parametrize("states", [2, 3])
def test_results_do_not_depend_on_the_thread_count(states):
    args = batch([grid(5, 5)] * 40 + [complete(6)] * 40, states, seed=8, shuffle=True)
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    one = graph.loopy_bp(*args, damping=0.2, tol=1e-9)
    torch.set_num_threads(2)
    two = graph.loopy_bp(*args, damping=0.2, tol=1e-9)
    torch.set_num_threads(previous)
    for a, b in zip(one, two):
        assert torch.equal(a, b)


def test_non_contiguous_inputs():
    unary, pairwise, src, dst, reverse, node_graph, G = batch([grid(3, 3)], 2, seed=9)
    got = graph.loopy_bp(
        unary.t().contiguous().t(),
        pairwise.transpose(1, 2).contiguous().transpose(1, 2),
        torch.stack([src, dst])[0],
        torch.stack([src, dst])[1],
        reverse,
        node_graph,
        G,
    )
    want = graph.loopy_bp(unary, pairwise, src, dst, reverse, node_graph, G)
    for a, b in zip(got, want):
        assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------
# Degenerate batches


def test_empty_batch_isolated_nodes_and_graphs_without_edges():
    empty = batch([], 2)
    result = graph.loopy_bp(*empty)
    assert result.log_marginals.shape == (0, 2) and result.log_messages.shape == (0, 2)
    assert result.iterations.shape == (0,) and result.converged.shape == (0,)

    # Graph 0: an edge and an isolated node; graph 1: two isolated nodes; graph 2: no nodes.
    args = list(batch([(3, [(0, 1)]), (2, []), (0, [])], 2, seed=10))
    got = graph.loopy_bp(*args)
    want = graph.reference_loopy_bp(*args)
    assert_same_result(got, want, F64)
    assert got.iterations.tolist() == [2, 1, 1] and got.converged.all()
    unary = args[0]
    lonely = torch.log_softmax(unary[2:], dim=1)  # no neighbours: the unary alone
    torch.testing.assert_close(got.log_marginals[2:], lonely, atol=1e-15, rtol=0)

    stopped = graph.loopy_bp(*args, max_iters=0)
    assert stopped.iterations.tolist() == [0, 0, 0] and not stopped.converged.any()
    torch.testing.assert_close(stopped.log_messages, torch.full((2, 2), -math.log(2), dtype=F64))


# ---------------------------------------------------------------------------------------------
# Bad input


def _bad(index, value):
    args = list(batch([cycle(4), grid(2, 2)], 2, seed=11))
    args[index] = value(args[index]) if callable(value) else value
    return args


def _swap_reverse(r):
    r = r.clone()
    r[[0, 1]] = r[[1, 0]]
    return r


@pytest.mark.parametrize(
    "args,options,message",
    [
        (_bad(0, lambda u: u.float()), {}, "pairwise must have the dtype of unary"),
        (_bad(0, lambda u: u.long()), {}, "unary must be float32 or float64"),
        (_bad(0, lambda u: u[:, :1]), {}, "pairwise must have shape \\[16, 1, 1\\]"),
        (_bad(0, lambda u: u[0]), {}, "unary must have shape \\[nodes, states\\]"),
        (_bad(0, torch.zeros(8, 33, dtype=F64)), {}, "between 1 and 32 states"),
        (_bad(1, lambda p: p[:-1]), {}, "pairwise must have shape \\[16, 2, 2\\]"),
        (_bad(2, lambda s: s.int()), {}, "src must have dtype Long"),
        (_bad(3, lambda d: d[:-1]), {}, "dst must have shape \\[16\\]"),
        (_bad(4, lambda r: r.view(2, 8)), {}, "reverse must have shape \\[16\\]"),
        (_bad(5, lambda n: n[:-1]), {}, "node_graph must have shape \\[8\\]"),
        (_bad(2, lambda s: s + 8), {}, "src must lie in \\[0, 8\\)"),
        (_bad(3, lambda d: -d), {}, "dst must lie in \\[0, 8\\)"),
        (_bad(4, lambda r: r + 1), {}, "reverse must lie in \\[0, 16\\)"),
        (_bad(5, lambda n: n * 2), {}, "node_graph must lie in \\[0, num_graphs = 2\\)"),
        (_bad(6, -1), {}, "num_graphs must be non-negative"),
        (_bad(4, _swap_reverse), {}, "src\\[reverse\\[e\\]\\] == dst\\[e\\]"),
        (_bad(4, lambda r: r.roll(2)), {}, "reverse must be an involution"),
        (_bad(3, lambda d: d.where(d != 1, 0)), {}, "no self-loops"),
        (_bad(5, lambda n: torch.tensor([0, 0, 1, 1, 1, 1, 1, 1])), {}, "same graph"),
        (_bad(1, lambda p: p + torch.arange(16.0)[:, None, None]), {}, "pairwise\\[e\\] transp"),
        (_bad(0, lambda u: u.index_fill(0, torch.tensor([1]), -torch.inf)), {}, "unary must be fi"),
        (_bad(1, lambda p: p * torch.nan), {}, "pairwise must be finite"),
        (_bad(0, lambda u: u), dict(damping=-0.1), "damping must lie in \\[0, 1\\)"),
        (_bad(0, lambda u: u), dict(damping=1.0), "damping must lie in \\[0, 1\\)"),
        (_bad(0, lambda u: u), dict(damping=float("nan")), "damping must lie in \\[0, 1\\)"),
        (_bad(0, lambda u: u), dict(tol=-1e-3), "tol must be non-negative"),
        (_bad(0, lambda u: u), dict(tol=float("nan")), "tol must be non-negative"),
        (_bad(0, lambda u: u), dict(max_iters=-1), "max_iters must be non-negative"),
    ],
)
def test_bad_input_is_refused_naming_the_argument(args, options, message):
    with pytest.raises(RuntimeError, match=message):
        graph.loopy_bp(*args, **options)


def test_bad_mode_gradients_and_devices_are_refused():
    args = batch([cycle(3)], 2)
    with pytest.raises(ValueError, match="mode must be one of \\['max', 'sum'\\]"):
        graph.loopy_bp(*args, mode="mean")
    with pytest.raises(ValueError, match="not differentiable"):
        graph.loopy_bp(args[0].requires_grad_(), *args[1:])
    moved = list(batch([cycle(3)], 2))
    moved[2] = moved[2].to("meta")
    with pytest.raises(RuntimeError, match="src must be on the device of unary"):
        graph.loopy_bp(*moved)
    with pytest.raises(RuntimeError, match="mode must be 0 \\(sum-product\\) or 1"):
        torch.ops.deepkern.loopy_bp(*batch([cycle(3)], 2), 2, 0.0, 1e-6, 10)


# ---------------------------------------------------------------------------------------------
# Op registration and CUDA


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    args = batch([cycle(3)], 2, device=device)
    for mode in (0, 1):
        torch.library.opcheck(torch.ops.deepkern.loopy_bp, (*args, mode, 0.2, 1e-8, 20))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("mode", ["sum", "max"])
def test_cuda_matches_the_reference(dtype, mode):
    graphs = LOOPY * 3 + [grid(10, 10), (3, []), (0, [])]
    for states in (2, 5):
        cpu_args = batch(graphs, states, dtype, seed=12, shuffle=True)
        cuda_args = batch(graphs, states, dtype, seed=12, shuffle=True, device="cuda")
        options = dict(mode=mode, damping=0.3, tol=TOL[dtype], max_iters=80)
        got = graph.loopy_bp(*cuda_args, **options)
        want = graph.reference_loopy_bp(*cpu_args, **options)
        assert_same_result(type(got)(*(t.cpu() for t in got)), want, dtype)
