"""Graphs for port-numbered GNNs: generators, port numberings, weak 2-colourings, checkers.

A graph here is simple and undirected, on nodes ``0 .. n-1``, held as a :class:`PortGraph`:
both directions of every edge, each with its port numbers. Everything runs in time linear in
the number of nodes and edges.

Port numbering (the model of distributed computing that Sato, Yamada and Kashima 2019 build
their CPNGNN on): every node ``v`` numbers its ``deg(v)`` incident edges with the ports
``1 .. deg(v)``, one port per edge. Write ``p(v, i) = (u, j)`` when port ``i`` of ``v`` holds
the edge to ``u`` and that same edge is port ``j`` of ``u``. The numbering is *consistent* when
``p`` is an involution on the set of ports: ``p(v, i) = (u, j)`` implies ``p(u, j) = (v, i)``,
so an edge is one pair of ports, read the same from both ends. For every directed edge
``v -> u`` a :class:`PortGraph` stores ``port_at_src``, the port ``i`` of ``v`` that leads to
``u``, and ``port_at_dst``, the port ``j`` of ``u`` that leads back to ``v``; the reverse edge
``u -> v`` stores the same pair swapped. The paper's ``p_tail(v, i)`` is ``u`` and its
``p_n(v, i)`` is ``j``.

Weak 2-colouring: colours 0 and 1 such that every node with at least one neighbour has a
neighbour of the other colour (isolated nodes may take either colour).

The social networks are the ones networkx ships; nothing is downloaded.
"""

from __future__ import annotations

import collections
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "PortGraph",
    "port_numbering",
    "from_networkx",
    "to_networkx",
    "renumber_ports",
    "weak_two_colouring",
    "is_weak_two_colouring",
    "is_dominating_set",
    "is_vertex_cover",
    "random_regular_graph",
    "random_bounded_degree_graph",
    "degree_preserving_randomisation",
    "social_networks",
    "GraphBatch",
    "collate",
]


def _networkx():
    try:
        import networkx
    except ImportError as error:
        raise ImportError("graphs need networkx: pip install deepkern[models]") from error
    return networkx


@dataclass
class PortGraph:
    """A simple undirected graph with a consistent port numbering.

    Attributes:
        num_nodes: n.
        src (Tensor[2m], int64): tail ``v`` of every directed edge; both directions of each of
            the m undirected edges appear, edge ``k`` and edge ``k + m`` being reverses.
        dst (Tensor[2m], int64): head ``u`` of every directed edge.
        port_at_src (Tensor[2m], int64): the port of ``v`` that holds the edge (1-based).
        port_at_dst (Tensor[2m], int64): the port of ``u`` that holds the edge (1-based).
    """

    num_nodes: int
    src: Tensor
    dst: Tensor
    port_at_src: Tensor
    port_at_dst: Tensor

    @property
    def num_edges(self) -> int:
        """Undirected edges m."""
        return self.src.numel() // 2

    def degrees(self) -> Tensor:
        """Tensor[n] int64: the degree of every node."""
        return torch.bincount(self.src, minlength=self.num_nodes)

    def max_degree(self) -> int:
        """Delta, the largest degree (0 for a graph without edges)."""
        return int(self.degrees().max()) if self.num_nodes and self.src.numel() else 0

    def edges(self) -> list[tuple[int, int]]:
        """The m undirected edges as pairs, in storage order."""
        m = self.num_edges
        return list(zip(self.src[:m].tolist(), self.dst[:m].tolist()))

    def port_table(self, max_degree: int | None = None) -> tuple[Tensor, Tensor]:
        """The ports as tables: ``neighbour[v, i-1] = u`` and ``back_port[v, i-1] = j``.

        Args:
            max_degree: columns of the tables (default the graph's own Delta); ports past a
                node's degree hold -1 and 0.

        Returns:
            (neighbour Tensor[n, D] int64, back_port Tensor[n, D] int64).
        """
        width = self.max_degree() if max_degree is None else max_degree
        if width < self.max_degree():
            raise ValueError(f"max_degree {width} is below the graph's {self.max_degree()}")
        neighbour = torch.full((self.num_nodes, width), -1, dtype=torch.int64)
        back_port = torch.zeros((self.num_nodes, width), dtype=torch.int64)
        neighbour[self.src, self.port_at_src - 1] = self.dst
        back_port[self.src, self.port_at_src - 1] = self.port_at_dst
        return neighbour, back_port


def _check_edges(num_nodes: int, edges: Sequence[tuple[int, int]]) -> None:
    if num_nodes < 0:
        raise ValueError(f"num_nodes must be >= 0, got {num_nodes}")
    seen = set()
    for u, v in edges:
        if not (0 <= u < num_nodes and 0 <= v < num_nodes):
            raise ValueError(f"edge ({u}, {v}) names a node outside 0..{num_nodes - 1}")
        if u == v:
            raise ValueError(f"edge ({u}, {v}) is a self-loop; graphs must be simple")
        key = (min(u, v), max(u, v))
        if key in seen:
            raise ValueError(f"edge ({u}, {v}) appears twice; graphs must be simple")
        seen.add(key)


def port_numbering(
    num_nodes: int,
    edges: Iterable[tuple[int, int]],
    generator: torch.Generator | None = None,
) -> PortGraph:
    """A consistent port numbering of a simple undirected graph, in O(n + m) time.

    The edges are visited once (in the given order, or in a random order drawn from
    ``generator``); each edge takes the next free port at both of its ends. Each edge is one
    pair of ports, so the numbering is consistent by construction.

    Args:
        num_nodes: n; nodes without edges are isolated.
        edges: the m undirected edges as pairs ``(u, v)`` of distinct nodes in ``0 .. n-1``.
        generator: when given, the order of the edges (hence every node's ports) is random.

    Returns:
        the :class:`PortGraph`.

    Raises:
        ValueError: a node out of range, a self-loop or a repeated edge.

    Example:
        >>> g = port_numbering(3, [(0, 1), (0, 2)])
        >>> g.port_at_src.tolist(), g.port_at_dst.tolist()
        ([1, 2, 1, 1], [1, 1, 1, 2])
    """
    edges = [(int(u), int(v)) for u, v in edges]
    _check_edges(num_nodes, edges)
    if generator is not None and edges:
        order = torch.randperm(len(edges), generator=generator).tolist()
        edges = [edges[k] for k in order]

    next_port = [1] * num_nodes
    ports_u, ports_v = [], []
    for u, v in edges:
        ports_u.append(next_port[u])
        ports_v.append(next_port[v])
        next_port[u] += 1
        next_port[v] += 1

    tails = [u for u, _ in edges]
    heads = [v for _, v in edges]
    return PortGraph(
        num_nodes=num_nodes,
        src=torch.tensor(tails + heads, dtype=torch.int64),
        dst=torch.tensor(heads + tails, dtype=torch.int64),
        port_at_src=torch.tensor(ports_u + ports_v, dtype=torch.int64),
        port_at_dst=torch.tensor(ports_v + ports_u, dtype=torch.int64),
    )


def renumber_ports(graph: PortGraph, generator: torch.Generator) -> PortGraph:
    """The same graph under a fresh random consistent port numbering."""
    return port_numbering(graph.num_nodes, graph.edges(), generator)


def from_networkx(graph, generator: torch.Generator | None = None) -> PortGraph:
    """A networkx graph as a :class:`PortGraph`; nodes are relabelled ``0 .. n-1`` in order.

    Self-loops are dropped (they play no part in dominating sets or vertex covers of the
    simple graph); directed graphs and multigraphs are refused.
    """
    if graph.is_directed() or graph.is_multigraph():
        raise ValueError("the graph must be a simple undirected networkx.Graph")
    index = {node: k for k, node in enumerate(graph.nodes())}
    edges = [(index[u], index[v]) for u, v in graph.edges() if u != v]
    return port_numbering(len(index), edges, generator)


def to_networkx(graph: PortGraph):
    """The graph as a networkx.Graph on nodes ``0 .. n-1`` (ports are not kept)."""
    nx = _networkx()
    result = nx.Graph()
    result.add_nodes_from(range(graph.num_nodes))
    result.add_edges_from(graph.edges())
    return result


def _adjacency(graph: PortGraph) -> list[list[int]]:
    neighbours: list[list[int]] = [[] for _ in range(graph.num_nodes)]
    for v, u in zip(graph.src.tolist(), graph.dst.tolist()):
        neighbours[v].append(u)
    return neighbours


def _csr(graph: PortGraph) -> tuple[list[int], list[int]]:
    """Compressed rows by counting sort, O(n + m): the neighbours of v are
    ``columns[pointers[v] : pointers[v + 1]]``. Flat lists keep Python's garbage collector
    from rescanning one list object per node, which made a list of lists superlinear."""
    n = graph.num_nodes
    tails, heads = graph.src.tolist(), graph.dst.tolist()
    pointers = [0] * (n + 1)
    for v in tails:
        pointers[v + 1] += 1
    for v in range(n):
        pointers[v + 1] += pointers[v]
    free = pointers[:n]
    columns = [0] * len(tails)
    for v, u in zip(tails, heads):
        columns[free[v]] = u
        free[v] += 1
    return pointers, columns


def weak_two_colouring(graph: PortGraph) -> Tensor:
    """A weak 2-colouring in O(n + m) time: BFS depth parity in a spanning forest.

    Each BFS tree's root has all its neighbours at depth 1 (the other parity), and every other
    node's BFS parent sits one level up, so every node with a neighbour gets one of the other
    colour.

    Returns:
        Tensor[n] int64 of colours 0 and 1.
    """
    pointers, columns = _csr(graph)
    colour = [-1] * graph.num_nodes
    for root in range(graph.num_nodes):
        if colour[root] >= 0:
            continue
        colour[root] = 0
        queue = collections.deque([root])
        while queue:
            v = queue.popleft()
            for k in range(pointers[v], pointers[v + 1]):
                u = columns[k]
                if colour[u] < 0:
                    colour[u] = 1 - colour[v]
                    queue.append(u)
    return torch.tensor(colour, dtype=torch.int64)


def is_weak_two_colouring(graph: PortGraph, colour: Tensor) -> bool:
    """Whether every non-isolated node has a neighbour of the other colour (colours 0/1)."""
    colour = torch.as_tensor(colour, dtype=torch.int64)
    if colour.shape != (graph.num_nodes,) or bool(((colour != 0) & (colour != 1)).any()):
        return False
    differs = (colour[graph.src] != colour[graph.dst]).to(torch.int64)
    has_other = torch.zeros(graph.num_nodes, dtype=torch.int64).index_add_(0, graph.src, differs)
    return bool(((has_other > 0) | (graph.degrees() == 0)).all())


def _as_mask(graph: PortGraph, chosen) -> Tensor:
    chosen = torch.as_tensor(chosen)
    if chosen.dtype != torch.bool:
        raise ValueError(f"chosen must be a bool mask, got {chosen.dtype}")
    if chosen.shape != (graph.num_nodes,):
        raise ValueError(f"chosen must have shape ({graph.num_nodes},), got {tuple(chosen.shape)}")
    return chosen


def is_dominating_set(graph: PortGraph, chosen) -> bool:
    """Whether every node is chosen or has a chosen neighbour (``chosen``: bool Tensor[n])."""
    chosen = _as_mask(graph, chosen)
    covered = chosen.clone()
    covered[graph.src[chosen[graph.dst]]] = True
    return bool(covered.all())


def is_vertex_cover(graph: PortGraph, chosen) -> bool:
    """Whether every edge has a chosen end (``chosen``: bool Tensor[n])."""
    chosen = _as_mask(graph, chosen)
    return bool((chosen[graph.src] | chosen[graph.dst]).all())


# ---------------------------------------------------------------------------------------------
# Generators


def random_regular_graph(num_nodes: int, degree: int, seed: int) -> PortGraph:
    """A uniform random ``degree``-regular graph (networkx's generator), random ports.

    Raises:
        ValueError: ``num_nodes * degree`` odd or ``degree >= num_nodes``.
    """
    nx = _networkx()
    if degree >= num_nodes or (num_nodes * degree) % 2:
        raise ValueError(
            f"no {degree}-regular graph on {num_nodes} nodes: need degree < num_nodes and "
            "num_nodes * degree even"
        )
    graph = nx.random_regular_graph(degree, num_nodes, seed=seed)
    return from_networkx(graph, torch.Generator().manual_seed(seed))


def random_bounded_degree_graph(
    num_nodes: int, max_degree: int, mean_degree: float, seed: int
) -> PortGraph:
    """An Erdos-Renyi-like graph whose degrees never pass ``max_degree``, random ports.

    Candidate edges of G(n, p) with ``p = mean_degree / (n - 1)`` are offered in random order
    and kept while both ends have a free slot, so the mean degree lands a little below
    ``mean_degree`` when the cap binds. Isolated nodes and several components occur.
    """
    if max_degree < 0 or mean_degree < 0:
        raise ValueError("max_degree and mean_degree must be non-negative")
    rng = random.Random(seed)
    p = min(1.0, mean_degree / max(1, num_nodes - 1))
    candidates = [
        (u, v) for u in range(num_nodes) for v in range(u + 1, num_nodes) if rng.random() < p
    ]
    rng.shuffle(candidates)
    degree = [0] * num_nodes
    edges = []
    for u, v in candidates:
        if degree[u] < max_degree and degree[v] < max_degree:
            edges.append((u, v))
            degree[u] += 1
            degree[v] += 1
    return port_numbering(num_nodes, edges, torch.Generator().manual_seed(seed))


def degree_preserving_randomisation(graph, seed: int, swaps_per_edge: int = 10) -> PortGraph:
    """A random graph with the degree sequence of ``graph`` (networkx), random ports.

    Repeated double edge swaps (``a-b, c-d -> a-d, c-b``), the usual null model of a network:
    every degree stays, the wiring is randomised.
    """
    nx = _networkx()
    randomised = nx.Graph(graph)
    randomised.remove_edges_from(list(nx.selfloop_edges(randomised)))
    edges = randomised.number_of_edges()
    if edges >= 2 and len(randomised) >= 4:
        nx.double_edge_swap(
            randomised,
            nswap=swaps_per_edge * edges,
            max_tries=100 * swaps_per_edge * edges,
            seed=seed,
        )
    return from_networkx(randomised, torch.Generator().manual_seed(seed))


def social_networks() -> dict:
    """The four social networks networkx ships, as networkx graphs.

    Zachary's karate club (34 nodes), Les Miserables co-appearances (77), Padgett's Florentine
    families (15) and Davis's southern women (32, bipartite: women and events).
    """
    nx = _networkx()
    return {
        "karate": nx.karate_club_graph(),
        "lesmis": nx.les_miserables_graph(),
        "florentine": nx.florentine_families_graph(),
        "davis": nx.davis_southern_women_graph(),
    }


# ---------------------------------------------------------------------------------------------
# Batches


@dataclass
class GraphBatch:
    """Several graphs as one disjoint union (nodes renumbered consecutively).

    Attributes:
        graph: the union as one :class:`PortGraph` (ports unchanged).
        graph_index (Tensor[N], int64): which graph each node came from.
        offsets (Tensor[B + 1], int64): node ``k`` of graph ``b`` is node ``offsets[b] + k``.
    """

    graph: PortGraph
    graph_index: Tensor
    offsets: Tensor

    def split(self, values: Tensor) -> list[Tensor]:
        """Per-node ``values`` (Tensor[N, ...]) cut back into one tensor per graph."""
        sizes = (self.offsets[1:] - self.offsets[:-1]).tolist()
        return list(torch.split(values, sizes))


def collate(graphs: Sequence[PortGraph]) -> GraphBatch:
    """The disjoint union of ``graphs``: one graph with the nodes of each shifted along."""
    sizes = torch.tensor([g.num_nodes for g in graphs], dtype=torch.int64)
    offsets = torch.zeros(len(graphs) + 1, dtype=torch.int64)
    offsets[1:] = torch.cumsum(sizes, 0)
    shifts = [int(offsets[b]) for b in range(len(graphs))]

    def joined(name: str, shift: bool) -> Tensor:
        # All forward halves first, then all reverse halves: edge k and k + m stay reverses.
        parts = [[], []]
        for g, s in zip(graphs, shifts):
            values = getattr(g, name) + (s if shift else 0)
            parts[0].append(values[: g.num_edges])
            parts[1].append(values[g.num_edges :])
        return torch.cat(parts[0] + parts[1]) if graphs else torch.zeros(0, dtype=torch.int64)

    union = PortGraph(
        num_nodes=int(offsets[-1]),
        src=joined("src", True),
        dst=joined("dst", True),
        port_at_src=joined("port_at_src", False),
        port_at_dst=joined("port_at_dst", False),
    )
    graph_index = torch.repeat_interleave(torch.arange(len(graphs)), sizes)
    return GraphBatch(union, graph_index, offsets)
