"""Graphs for port-numbered GNNs: port numbering, weak 2-colouring, checkers, generators."""

from __future__ import annotations

import random

import networkx as nx
import pytest
import torch

from deepkern.data import graphs as G


def _random_graphs(count: int, seed: int = 0):
    """Random simple graphs of many shapes, isolated nodes and several components included."""
    rng = random.Random(seed)
    for k in range(count):
        n = rng.randint(0, 25)
        shape = k % 5
        if shape == 0:
            graph = nx.gnp_random_graph(n, rng.uniform(0.0, 0.4), seed=k)
        elif shape == 1:
            graph = nx.disjoint_union(
                nx.random_labeled_tree(max(1, n // 2), seed=k), nx.empty_graph(3)
            )
        elif shape == 2:
            graph = nx.disjoint_union(nx.cycle_graph(max(3, n // 3)), nx.complete_graph(4))
        elif shape == 3:
            graph = nx.complete_bipartite_graph(1 + n % 4, 2 + n % 5)
        else:
            graph = nx.disjoint_union(nx.star_graph(max(1, n // 4)), nx.path_graph(max(1, n // 2)))
        yield G.from_networkx(graph, torch.Generator().manual_seed(k))


def _check_consistent(graph: G.PortGraph) -> None:
    m = graph.num_edges
    assert graph.src.numel() == 2 * m
    # Edge k and edge k + m are the two directions of one edge, with the port pair swapped.
    assert torch.equal(graph.src[:m], graph.dst[m:]) and torch.equal(graph.dst[:m], graph.src[m:])
    assert torch.equal(graph.port_at_src[:m], graph.port_at_dst[m:])
    assert torch.equal(graph.port_at_dst[:m], graph.port_at_src[m:])
    # Each node's ports are exactly 1 .. deg(v): all in range and no (node, port) pair twice.
    degrees = graph.degrees()
    assert bool((graph.port_at_src >= 1).all())
    assert bool((graph.port_at_src <= degrees[graph.src]).all())
    pairs = graph.src * (graph.max_degree() + 1) + graph.port_at_src
    assert torch.unique(pairs).numel() == 2 * m
    # p(p(v, i)) = (v, i) for every node v and port i.
    neighbour, back = graph.port_table()
    v, i = torch.nonzero(neighbour >= 0, as_tuple=True)
    u, j = neighbour[v, i], back[v, i]
    assert torch.equal(neighbour[u, j - 1], v) and torch.equal(back[u, j - 1], i + 1)


def test_port_numbering_by_hand():
    # Star centre 0 with edges to 1 and 2, then the edge 2-3.
    graph = G.port_numbering(5, [(0, 1), (0, 2), (2, 3)])
    neighbour, back = graph.port_table(max_degree=3)
    assert neighbour.tolist() == [[1, 2, -1], [0, -1, -1], [0, 3, -1], [2, -1, -1], [-1] * 3]
    assert back.tolist() == [[1, 1, 0], [1, 0, 0], [2, 1, 0], [2, 0, 0], [0, 0, 0]]
    assert graph.degrees().tolist() == [2, 1, 2, 1, 0]
    assert graph.max_degree() == 2
    _check_consistent(graph)
    with pytest.raises(ValueError, match="max_degree 1 is below"):
        graph.port_table(max_degree=1)


def test_port_numbering_is_consistent_on_random_graphs():
    for graph in _random_graphs(60):
        _check_consistent(graph)


def test_random_port_numberings_differ_and_repeat_with_the_seed():
    base = G.from_networkx(nx.gnp_random_graph(20, 0.3, seed=1))
    first = G.renumber_ports(base, torch.Generator().manual_seed(5))
    again = G.renumber_ports(base, torch.Generator().manual_seed(5))
    other = G.renumber_ports(base, torch.Generator().manual_seed(6))
    for graph in (first, other):
        _check_consistent(graph)
        assert sorted(map(sorted, graph.edges())) == sorted(map(sorted, base.edges()))
    assert torch.equal(first.port_table()[0], again.port_table()[0])
    assert not torch.equal(first.port_table()[0], other.port_table()[0])


def test_port_numbering_and_colouring_handle_a_hundred_thousand_edges():
    # A union of cycles of 50 nodes: m = n, every degree 2. (Linear running time is a property
    # of the construction; measuring it belongs in a benchmark, not in a timed test.)
    n = 100_000
    edges = [(v, v + 1 if (v + 1) % 50 else v - 49) for v in range(n)]
    graph = G.port_numbering(n, edges)
    _check_consistent(graph)
    assert G.is_weak_two_colouring(graph, G.weak_two_colouring(graph))


def test_port_numbering_rejects_bad_edges():
    with pytest.raises(ValueError, match="self-loop"):
        G.port_numbering(3, [(1, 1)])
    with pytest.raises(ValueError, match="appears twice"):
        G.port_numbering(3, [(0, 1), (1, 0)])
    with pytest.raises(ValueError, match="outside"):
        G.port_numbering(3, [(0, 3)])
    with pytest.raises(ValueError, match="num_nodes"):
        G.port_numbering(-1, [])
    with pytest.raises(ValueError, match="simple undirected"):
        G.from_networkx(nx.DiGraph([(0, 1)]))


def test_empty_and_edgeless_graphs():
    empty = G.port_numbering(0, [])
    assert empty.num_edges == 0 and empty.max_degree() == 0
    assert G.weak_two_colouring(empty).shape == (0,)
    edgeless = G.port_numbering(3, [])
    assert G.is_weak_two_colouring(edgeless, G.weak_two_colouring(edgeless))
    assert G.is_dominating_set(edgeless, torch.ones(3, dtype=torch.bool))
    assert not G.is_dominating_set(edgeless, torch.tensor([True, True, False]))
    assert G.is_vertex_cover(edgeless, torch.zeros(3, dtype=torch.bool))


def test_weak_two_colouring_on_many_random_graphs():
    count = 0
    for graph in _random_graphs(300, seed=1):
        colour = G.weak_two_colouring(graph)
        assert G.is_weak_two_colouring(graph, colour)
        count += 1
    assert count == 300


def test_weak_two_colouring_checker_by_hand():
    path = G.port_numbering(4, [(0, 1), (1, 2), (2, 3)])
    assert G.is_weak_two_colouring(path, torch.tensor([0, 1, 1, 0]))
    assert G.is_weak_two_colouring(path, torch.tensor([0, 1, 0, 1]))
    # Node 0's only neighbour has its colour.
    assert not G.is_weak_two_colouring(path, torch.tensor([0, 0, 1, 0]))
    assert not G.is_weak_two_colouring(path, torch.tensor([0, 1, 2, 0]))
    assert not G.is_weak_two_colouring(path, torch.tensor([0, 1, 0]))


def test_feasibility_checkers_by_hand():
    # The path 0-1-2-3 and an isolated node 4.
    graph = G.port_numbering(5, [(0, 1), (1, 2), (2, 3)])

    def mask(*nodes):
        chosen = torch.zeros(5, dtype=torch.bool)
        chosen[list(nodes)] = True
        return chosen

    assert G.is_dominating_set(graph, mask(1, 2, 4))
    assert G.is_dominating_set(graph, mask(0, 3, 4))
    assert not G.is_dominating_set(graph, mask(1, 2))  # the isolated node
    assert not G.is_dominating_set(graph, mask(1, 4))  # node 3
    assert G.is_vertex_cover(graph, mask(1, 2))
    assert G.is_vertex_cover(graph, mask(1, 3))
    assert not G.is_vertex_cover(graph, mask(0, 3))  # the edge 1-2
    with pytest.raises(ValueError, match="bool mask"):
        G.is_vertex_cover(graph, torch.zeros(5))
    with pytest.raises(ValueError, match="shape"):
        G.is_dominating_set(graph, torch.zeros(4, dtype=torch.bool))


def test_generators():
    for degree in (3, 4):
        regular = G.random_regular_graph(20, degree, seed=degree)
        assert regular.degrees().tolist() == [degree] * 20
        _check_consistent(regular)
    bounded = G.random_bounded_degree_graph(60, 3, 3.0, seed=1)
    assert bounded.max_degree() <= 3 and bounded.num_edges > 30
    _check_consistent(bounded)
    with pytest.raises(ValueError, match="regular"):
        G.random_regular_graph(5, 3, seed=0)

    karate = nx.karate_club_graph()
    randomised = G.degree_preserving_randomisation(karate, seed=2)
    assert sorted(randomised.degrees().tolist()) == sorted(d for _, d in karate.degree())
    assert sorted(map(sorted, randomised.edges())) != sorted(
        map(sorted, G.from_networkx(karate).edges())
    )


def test_social_networks():
    sizes = {name: len(graph) for name, graph in G.social_networks().items()}
    assert sizes == {"karate": 34, "lesmis": 77, "florentine": 15, "davis": 32}
    lesmis = G.from_networkx(G.social_networks()["lesmis"])
    assert lesmis.max_degree() == 36
    _check_consistent(lesmis)


def test_collate_keeps_ports_and_reverse_pairs():
    graphs = [
        G.port_numbering(3, [(0, 1), (1, 2)]),
        G.port_numbering(2, []),
        G.port_numbering(4, [(0, 3), (3, 1)]),
    ]
    batch = G.collate(graphs)
    assert batch.offsets.tolist() == [0, 3, 5, 9]
    assert batch.graph_index.tolist() == [0, 0, 0, 1, 1, 2, 2, 2, 2]
    assert batch.graph.edges() == [(0, 1), (1, 2), (5, 8), (8, 6)]
    _check_consistent(batch.graph)
    neighbour, back = batch.graph.port_table()
    assert neighbour[8].tolist() == [5, 6] and back[8].tolist() == [1, 1]
    parts = batch.split(torch.arange(9))
    assert [p.tolist() for p in parts] == [[0, 1, 2], [3, 4], [5, 6, 7, 8]]
