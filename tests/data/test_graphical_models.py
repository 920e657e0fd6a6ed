"""Binary MRFs: family structures, seeded sampling, the spread of J and b, exact marginals."""

import itertools
import math

import networkx as nx
import pytest
import torch

from deepkern.data import graphical_models as gm
from deepkern.ops.graph import reference_loopy_bp


def _graph(family: str, n: int, seed: int = 0) -> nx.Graph:
    graph = nx.Graph()
    graph.add_nodes_from(range(n))
    graph.add_edges_from(gm.family_graph(family, n, torch.Generator().manual_seed(seed)))
    return graph


# Edge counts in closed form (n even and odd: 9 and 16 are the sizes of the experiments).
EDGE_COUNTS = {
    "star": lambda n: n - 1,
    "random_tree": lambda n: n - 1,
    "path": lambda n: n - 1,
    "cycle": lambda n: n,
    "ladder": lambda n: 3 * (n // 2) - 2 + n % 2,
    "circular_ladder": lambda n: 3 * (n // 2) + n % 2,
    "barbell": lambda n: 2 * math.comb(max(3, n // 3), 2) + n - 2 * max(3, n // 3) + 1,
    "lollipop": lambda n: math.comb(n // 2, 2) + n - n // 2,
    "wheel": lambda n: 2 * (n - 1),
    "bipartite": lambda n: (n // 2) * (n - n // 2),
    "complete": lambda n: math.comb(n, 2),
}


@pytest.mark.parametrize("n", [6, 7, 9, 16, 20])
@pytest.mark.parametrize("family", gm.FAMILIES)
def test_family_structure(family, n):
    graph = _graph(family, n)
    edges = gm.family_graph(family, n)
    assert graph.number_of_nodes() == n and nx.is_connected(graph)
    assert all(u < v for u, v in edges) and len(set(edges)) == len(edges) == len(sorted(edges))
    if family in EDGE_COUNTS:
        assert graph.number_of_edges() == EDGE_COUNTS[family](n)
    assert nx.is_tree(graph) == (family not in gm.LOOPY_FAMILIES)
    degrees = sorted(d for _, d in graph.degree())
    if family == "star":
        assert degrees == [1] * (n - 1) + [n - 1]
    elif family == "path":
        assert degrees == [1, 1] + [2] * (n - 2)
    elif family == "cycle":
        assert degrees == [2] * n
    elif family == "wheel":
        assert degrees == [3] * (n - 1) + [n - 1]
    elif family == "complete":
        assert degrees == [n - 1] * n
    elif family in ("bipartite", "tripartite"):
        parts = 2 if family == "bipartite" else 3
        colouring = nx.coloring.greedy_color(graph, strategy="largest_first")
        assert len(set(colouring.values())) == parts
        assert graph.number_of_edges() == (n * n - sum(c * c for c in _parts(n, parts))) // 2
    elif family == "circular_ladder" and n % 2 == 0:
        assert degrees == [3] * n


def _parts(n, parts):
    return [n // parts + (i < n % parts) for i in range(parts)]


def test_grid_degrees():
    # 3 x 3: four corners of degree 2, four sides of degree 3, one centre of degree 4.
    assert sorted(d for _, d in _graph("grid", 9).degree()) == [2] * 4 + [3] * 4 + [4]
    assert _graph("grid", 16).number_of_edges() == 24
    assert nx.is_isomorphic(_graph("grid", 16), nx.grid_2d_graph(4, 4))
    assert nx.is_isomorphic(_graph("grid", 12), nx.grid_2d_graph(3, 4))
    # 7 nodes: a 2 x 4 lattice less its last corner.
    assert sorted(d for _, d in _graph("grid", 7).degree()) == [1, 2, 2, 2, 3, 3, 3]


def test_random_trees_vary_with_the_generator():
    trees = {tuple(gm.family_graph("random_tree", 9, torch.Generator().manual_seed(s)))
             for s in range(10)}  # fmt: skip
    assert len(trees) > 5


def test_sampling_is_seeded():
    def draw(seed):
        return gm.sample_mrfs(list(gm.FAMILIES), 6, 2, torch.Generator().manual_seed(seed))

    a, b, c = draw(3), draw(3), draw(4)
    for name in ("bias", "coupling", "edges", "src", "dst", "marginals"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert not torch.equal(a.coupling, c.coupling)
    assert a.families == [f for f in gm.FAMILIES for _ in range(2)]


@pytest.mark.parametrize("coupling_std, bias_std", [(1.0, 0.25), (0.5, 2.0)])
def test_empirical_spread_matches_the_documented_std(coupling_std, bias_std):
    batch = gm.sample_mrfs(
        "complete", 12, 100, torch.Generator().manual_seed(0),
        coupling_std=coupling_std, bias_std=bias_std, with_marginals=False,
    )  # fmt: skip
    for values, std in ((batch.coupling, coupling_std), (batch.bias, bias_std)):
        count = values.numel()
        assert count >= 1200
        # The sample std of N normals has standard error std / sqrt(2 (N - 1)), its mean
        # std / sqrt(N): 5 standard errors are far below the gap between std and std^2.
        assert abs(values.std().item() - std) < 5 * std / math.sqrt(2 * (count - 1))
        assert abs(values.mean().item()) < 5 * std / math.sqrt(count)
        if std != 1.0:  # at std 1 a variance and a standard deviation coincide
            assert abs(std**2 - std) > 10 * std / math.sqrt(2 * (count - 1))


def test_bp_layout():
    batch = gm.sample_mrfs(["cycle", "star"], 6, 1, torch.Generator().manual_seed(0))
    assert batch.num_graphs == 2 and batch.num_nodes == 12
    assert torch.equal(batch.node_graph, torch.tensor([0] * 6 + [1] * 6))
    assert torch.equal(batch.src[batch.reverse], batch.dst)
    assert torch.equal(batch.dst[batch.reverse], batch.src)
    pairwise = batch.pairwise()
    assert torch.equal(pairwise[batch.reverse], pairwise.transpose(1, 2))
    j = batch.coupling[0].item()
    assert pairwise[0].tolist() == [[j, -j], [-j, j]]
    assert torch.equal(batch.unary(), torch.stack([-batch.bias, batch.bias], 1))


def _brute_force(batch, graph):
    """p(x_i = +1) by summing over every state with Python loops."""
    offset = int(batch.sizes[:graph].sum())
    n = int(batch.sizes[graph])
    b = batch.bias[offset : offset + n].tolist()
    keep = batch.node_graph[batch.edges[0]] == graph
    edges = (batch.edges[:, keep] - offset).T.tolist()
    couplings = batch.coupling[keep].tolist()
    z, up = 0.0, [0.0] * n
    for x in itertools.product((-1, 1), repeat=n):
        energy = sum(bi * xi for bi, xi in zip(b, x))
        energy += sum(j * x[u] * x[v] for (u, v), j in zip(edges, couplings))
        weight = math.exp(energy)
        z += weight
        for i in range(n):
            up[i] += weight * (x[i] > 0)
    return [u / z for u in up]


def test_exact_marginals_against_brute_force():
    rng = torch.Generator().manual_seed(1)
    small = gm.sample_mrfs(["complete", "wheel", "random_tree"], 6, 2, rng, coupling_std=1.5)
    other = gm.sample_mrfs(["grid", "lollipop"], 6, 1, rng, bias_std=1.0)
    # A batch of mixed sizes, grouped inside by size.
    joined = _concat(small.select([0, 1]), other)
    tiny_chunks = gm.exact_marginals(joined, max_elements=64)
    assert torch.allclose(tiny_chunks, gm.exact_marginals(joined), atol=1e-13)
    for graph in range(joined.num_graphs):
        nodes = joined.node_graph == graph
        expected = torch.tensor(_brute_force(joined, graph), dtype=torch.float64)
        assert torch.allclose(tiny_chunks[nodes, 1], expected, atol=1e-12)
    assert torch.allclose(tiny_chunks.sum(1), torch.ones(joined.num_nodes, dtype=torch.float64))
    for graph in range(small.num_graphs):
        expected = torch.tensor(_brute_force(small, graph), dtype=torch.float64)
        assert torch.allclose(small.marginals[small.node_graph == graph, 1], expected)


def _concat(a, b):
    from deepkern.data.graphical_models import _assemble

    edges = torch.cat([a.edges, b.edges + a.num_nodes], dim=1)
    sizes = a.sizes.tolist() + b.sizes.tolist()
    joined = _assemble(
        sizes, a.families + b.families, edges,
        torch.cat([a.bias, b.bias]), torch.cat([a.coupling, b.coupling]),
    )  # fmt: skip
    return joined


def test_exact_marginals_equal_bp_on_trees():
    batch = gm.sample_mrfs(["star", "random_tree", "path"], 12, 3, torch.Generator().manual_seed(2))
    result = reference_loopy_bp(
        batch.unary(), batch.pairwise(), batch.src, batch.dst, batch.reverse,
        batch.node_graph, batch.num_graphs, tol=1e-12, max_iters=100,
    )  # fmt: skip
    assert bool(result.converged.all())
    assert torch.allclose(result.log_marginals.exp(), batch.marginals, atol=1e-10)


def test_zero_couplings_give_independent_spins():
    batch = gm.sample_mrfs("complete", 8, 2, torch.Generator().manual_seed(0), coupling_std=0.0)
    expected = torch.sigmoid(2 * batch.bias)  # p(+1) = e^b / (e^b + e^-b)
    assert torch.allclose(batch.marginals[:, 1], expected, atol=1e-12)


def test_select_keeps_graphs():
    batch = gm.sample_mrfs(["cycle", "wheel", "star"], 6, 1, torch.Generator().manual_seed(0))
    picked = batch.select([2, 0])
    assert picked.families == ["star", "cycle"]
    assert torch.equal(picked.bias, torch.cat([batch.bias[12:18], batch.bias[0:6]]))
    assert torch.allclose(picked.marginals, gm.exact_marginals(picked))


def test_bad_inputs():
    rng = torch.Generator().manual_seed(0)
    with pytest.raises(ValueError, match="family"):
        gm.family_graph("hexagon", 9)
    with pytest.raises(ValueError, match="at least 6"):
        gm.family_graph("lollipop", 5)
    with pytest.raises(ValueError, match="families"):
        gm.sample_mrfs(["cycle", "torus"], 9, 1, rng)
    with pytest.raises(ValueError, match="coupling_std"):
        gm.sample_mrfs("cycle", 9, 1, rng, coupling_std=-1.0)
    with pytest.raises(ValueError, match="count"):
        gm.sample_mrfs("cycle", 9, -1, rng)
    with pytest.raises(ValueError, match="at most 20"):
        gm.sample_mrfs("cycle", 21, 1, rng)
    big = gm.sample_mrfs("cycle", 21, 1, rng, with_marginals=False)
    with pytest.raises(ValueError, match="at most 20"):
        gm.exact_marginals(big)


def test_exact_marginals_at_twenty_nodes_equal_bp_on_a_path():
    batch = gm.sample_mrfs("path", 20, 1, torch.Generator().manual_seed(5), coupling_std=2.0)
    result = reference_loopy_bp(
        batch.unary(), batch.pairwise(), batch.src, batch.dst, batch.reverse,
        batch.node_graph, 1, tol=1e-13, max_iters=100,
    )  # fmt: skip
    assert torch.allclose(result.log_marginals.exp(), batch.marginals, atol=1e-10)
