"""Binary pairwise Markov random fields on small graphs, with exact marginals.

The model is an Ising model with spins ``x_i in {-1, +1}``:

    p(x) = exp( sum_i b_i x_i + sum_{(i, j) in E} J_ij x_i x_j ) / Z,

that is ``p(x) ~ exp(b.x + x.J.x)`` with the coupling matrix ``J`` holding each edge's
coupling once (upper triangle). A symmetric ``J`` in ``x.J.x`` would count every coupling
twice; here it is counted once. Couplings and biases are drawn independently,

    J_ij ~ N(0, coupling_std^2), coupling_std = 1 by default,
    b_i  ~ N(0, bias_std^2),     bias_std = 0.25 by default,

the ensemble of Yoon et al., "Inference in probabilistic graphical models by graph neural
networks" (2018), as we read it: standard normal couplings and biases of standard deviation
1/4. The arguments are standard deviations, never variances.

Graph structures come from the families of that paper (:data:`FAMILIES`), each built with
exactly ``n`` nodes (:func:`family_graph`). :func:`sample_mrfs` draws a batch of models;
:class:`MRFBatch` holds it in the layout of :func:`deepkern.ops.graph.reference_loopy_bp`
(directed edges with ``reverse``, ``unary [V, 2]``, ``pairwise [E, 2, 2]``, ``node_graph``),
state 0 standing for the spin -1 and state 1 for +1. :func:`exact_marginals` enumerates all
``2^n`` states, vectorised over states and over graphs of the same size, for n up to 20.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "FAMILIES",
    "LOOPY_FAMILIES",
    "MIN_NODES",
    "MAX_EXACT_NODES",
    "MRFBatch",
    "family_graph",
    "sample_mrfs",
    "exact_marginals",
]

FAMILIES = (
    "star",
    "random_tree",
    "path",
    "cycle",
    "ladder",
    "grid",
    "circular_ladder",
    "barbell",
    "lollipop",
    "wheel",
    "bipartite",
    "tripartite",
    "complete",
)
# Families whose graphs hold a cycle (for every n at which they are built, n >= MIN_NODES).
LOOPY_FAMILIES = tuple(f for f in FAMILIES if f not in ("star", "random_tree", "path"))
# Below 6 nodes a lollipop's clique is one edge and a barbell has no room for two triangles.
MIN_NODES = 6
MAX_EXACT_NODES = 20


def _networkx():
    try:
        import networkx
    except ImportError as error:
        raise ImportError("graph families need networkx: pip install deepkern[models]") from error
    return networkx


def _with_pendant(graph, n: int):
    """Add one node hanging off the last node when a family of even order meets an odd n."""
    if graph.number_of_nodes() < n:
        graph.add_edge(graph.number_of_nodes() - 1, graph.number_of_nodes())
    return graph


def _random_tree(n: int, generator: torch.Generator):
    nx = _networkx()
    if n <= 2:
        return nx.path_graph(n)
    # A uniform labelled tree: the decoding of a uniform Pruefer sequence.
    sequence = torch.randint(0, n, (n - 2,), generator=generator).tolist()
    return nx.from_prufer_sequence(sequence)


def family_graph(
    family: str, n: int, generator: torch.Generator | None = None
) -> list[tuple[int, int]]:
    """The undirected edges ``(u, v)``, ``u < v``, of a graph of the family on nodes 0..n-1.

    Families and how each is fitted to exactly ``n`` nodes:

    - ``star``: one centre, n - 1 leaves (n - 1 edges).
    - ``random_tree``: uniform labelled tree from a Pruefer sequence drawn from ``generator``.
    - ``path``, ``cycle``, ``wheel`` (hub plus a cycle of n - 1), ``complete``.
    - ``ladder`` and ``circular_ladder``: two rails of n // 2 rungs; for odd n one more node
      hangs off the last one.
    - ``grid``: ``r = isqrt(n)`` rows of ``c = ceil(n / r)`` nodes filled row by row, the
      last row possibly short (3x3 for 9, 4x4 for 16, 3x4 for 12, 2x4 less one for 7).
    - ``barbell``: two cliques of m = max(3, n // 3) joined by a path of n - 2m nodes.
    - ``lollipop``: a clique of n // 2 and a path of the other n - n // 2 nodes.
    - ``bipartite`` and ``tripartite``: complete multipartite graphs with parts as equal as
      possible (4 + 5 and 3 + 3 + 3 for n = 9).

    Args:
        family: one of :data:`FAMILIES`.
        n (int >= 6): number of nodes.
        generator: the random source of ``random_tree`` (the others are fixed); None uses a
            generator seeded 0.

    Returns:
        Sorted list of edges, each once, ``u < v``.

    Raises:
        ValueError: unknown family, or n < 6.
    """
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    if not isinstance(n, int) or n < MIN_NODES:
        raise ValueError(f"n must be an integer of at least {MIN_NODES}, got {n!r}")
    nx = _networkx()
    if family == "star":
        graph = nx.star_graph(n - 1)
    elif family == "random_tree":
        graph = _random_tree(n, generator or torch.Generator().manual_seed(0))
    elif family == "path":
        graph = nx.path_graph(n)
    elif family == "cycle":
        graph = nx.cycle_graph(n)
    elif family == "ladder":
        graph = _with_pendant(nx.ladder_graph(n // 2), n)
    elif family == "grid":
        rows = math.isqrt(n)
        lattice = nx.grid_2d_graph(rows, -(-n // rows))
        kept = sorted(lattice.nodes())[:n]  # row by row: only the last row can be short
        graph = nx.convert_node_labels_to_integers(lattice.subgraph(kept), ordering="sorted")
    elif family == "circular_ladder":
        graph = _with_pendant(nx.circular_ladder_graph(n // 2), n)
    elif family == "barbell":
        clique = max(3, n // 3)
        graph = nx.barbell_graph(clique, n - 2 * clique)
    elif family == "lollipop":
        graph = nx.lollipop_graph(n // 2, n - n // 2)
    elif family == "wheel":
        graph = nx.wheel_graph(n)
    elif family in ("bipartite", "tripartite"):
        parts = 2 if family == "bipartite" else 3
        sizes = [n // parts + (i < n % parts) for i in range(parts)]
        graph = nx.complete_multipartite_graph(*sizes)
    else:
        graph = nx.complete_graph(n)
    assert graph.number_of_nodes() == n, (family, n, graph.number_of_nodes())
    return sorted((min(u, v), max(u, v)) for u, v in graph.edges())


@dataclass
class MRFBatch:
    """A batch of binary pairwise MRFs, nodes numbered graph by graph.

    Attributes:
        sizes (Tensor[G], int64): nodes of each graph.
        families (list[str]): the family of each graph.
        node_graph (Tensor[V], int64): graph of each node.
        bias (Tensor[V]): b_i.
        edges (Tensor[2, U], int64): undirected edges (u < v), global node numbers.
        coupling (Tensor[U]): J_uv of each undirected edge.
        src, dst, reverse (Tensor[E], int64): directed edges, E = 2U: edge 2k is u -> v of
            undirected edge k, edge 2k + 1 is v -> u, so ``reverse = arange(E) ^ 1``.
        marginals (Tensor[V, 2] or None): exact p(x_i = -1), p(x_i = +1), when computed.
    """

    sizes: Tensor
    families: list[str]
    node_graph: Tensor
    bias: Tensor
    edges: Tensor
    coupling: Tensor
    src: Tensor
    dst: Tensor
    reverse: Tensor
    marginals: Tensor | None = None

    @property
    def num_graphs(self) -> int:
        return int(self.sizes.numel())

    @property
    def num_nodes(self) -> int:
        return int(self.node_graph.numel())

    @property
    def edge_coupling(self) -> Tensor:
        """Tensor[E]: J of each directed edge."""
        return self.coupling.repeat_interleave(2)

    def unary(self) -> Tensor:
        """Tensor[V, 2]: log-potentials ``(-b_i, +b_i)`` of the spins -1 and +1."""
        return torch.stack([-self.bias, self.bias], dim=1)

    def pairwise(self) -> Tensor:
        """Tensor[E, 2, 2]: ``pairwise[e, a, c] = J_e s_a s_c``, spins s = (-1, +1).

        The matrix is symmetric, so each direction's entry is its reverse's transpose.
        """
        spins = torch.tensor([-1.0, 1.0], dtype=self.coupling.dtype, device=self.coupling.device)
        return self.edge_coupling[:, None, None] * torch.outer(spins, spins)

    def to(self, device: str | torch.device) -> MRFBatch:
        """The batch with every tensor on ``device``."""
        fields = {name: getattr(self, name) for name in self.__dataclass_fields__}
        for name, value in fields.items():
            if isinstance(value, Tensor):
                fields[name] = value.to(device)
        return MRFBatch(**fields)

    def select(self, graphs: Tensor | list[int]) -> MRFBatch:
        """The sub-batch of the given graphs, in the given order, renumbered."""
        graphs = torch.as_tensor(graphs, dtype=torch.int64)
        offsets = torch.cat([self.sizes.new_zeros(1), self.sizes.cumsum(0)])
        edge_offsets = torch.cat([self.sizes.new_zeros(1), self._edges_per_graph().cumsum(0)])
        nodes, edges, biases, couplings, marginals = [], [], [], [], []
        base = 0
        for g in graphs.tolist():
            lo, hi = int(offsets[g]), int(offsets[g + 1])
            elo, ehi = int(edge_offsets[g]), int(edge_offsets[g + 1])
            nodes.append(hi - lo)
            edges.append(self.edges[:, elo:ehi] - lo + base)
            biases.append(self.bias[lo:hi])
            couplings.append(self.coupling[elo:ehi])
            if self.marginals is not None:
                marginals.append(self.marginals[lo:hi])
            base += hi - lo
        batch = _assemble(
            nodes,
            [self.families[g] for g in graphs.tolist()],
            torch.cat(edges, dim=1) if edges else self.edges[:, :0],
            torch.cat(biases) if biases else self.bias[:0],
            torch.cat(couplings) if couplings else self.coupling[:0],
        )
        if self.marginals is not None:
            batch.marginals = torch.cat(marginals) if marginals else self.marginals[:0]
        return batch

    def _edges_per_graph(self) -> Tensor:
        return torch.bincount(self.node_graph[self.edges[0]], minlength=self.num_graphs)


def _assemble(
    sizes: list[int], families: list[str], edges: Tensor, bias: Tensor, coupling: Tensor
) -> MRFBatch:
    sizes_t = torch.tensor(sizes, dtype=torch.int64)
    node_graph = torch.repeat_interleave(torch.arange(len(sizes)), sizes_t)
    src = torch.stack([edges[0], edges[1]], dim=1).reshape(-1)
    dst = torch.stack([edges[1], edges[0]], dim=1).reshape(-1)
    reverse = torch.arange(src.numel()) ^ 1
    return MRFBatch(sizes_t, families, node_graph, bias, edges, coupling, src, dst, reverse)


def sample_mrfs(
    families: str | list[str] | tuple[str, ...],
    n: int,
    count: int,
    generator: torch.Generator,
    coupling_std: float = 1.0,
    bias_std: float = 0.25,
    dtype: torch.dtype = torch.float64,
    with_marginals: bool = True,
) -> MRFBatch:
    """Draw ``count`` models of each family on ``n`` nodes.

    For every graph, its structure comes first (:func:`family_graph`), then its couplings
    ``J ~ N(0, coupling_std^2)`` in edge order, then its biases ``b ~ N(0, bias_std^2)``, all
    from ``generator``: the same generator state gives the same batch.

    Args:
        families: a family or several; the batch holds ``count`` graphs of each, family by
            family.
        n (int in [6, 20] with marginals, >= 6 without): nodes per graph.
        count (int >= 0): graphs per family.
        generator: the random source.
        coupling_std, bias_std (float >= 0): standard deviations (not variances).
        dtype: floating dtype of couplings, biases and marginals.
        with_marginals: also compute the exact marginals (:func:`exact_marginals`).

    Returns:
        :class:`MRFBatch`.

    Raises:
        ValueError: an unknown family, a bad n or count, or a negative standard deviation.
    """
    families = [families] if isinstance(families, str) else list(families)
    for family in families:
        if family not in FAMILIES:
            raise ValueError(f"families must be drawn from {FAMILIES}, got {family!r}")
    if not isinstance(count, int) or count < 0:
        raise ValueError(f"count must be a nonnegative integer, got {count!r}")
    if coupling_std < 0 or bias_std < 0:
        raise ValueError(
            f"coupling_std and bias_std must be nonnegative, got {coupling_std}, {bias_std}"
        )
    if with_marginals and isinstance(n, int) and n > MAX_EXACT_NODES:
        raise ValueError(f"n must be at most {MAX_EXACT_NODES} for exact marginals, got {n}")

    sizes, names, edges, biases, couplings = [], [], [], [], []
    base = 0
    for family in families:
        for _ in range(count):
            graph_edges = torch.tensor(family_graph(family, n, generator), dtype=torch.int64)
            coupling = coupling_std * torch.randn(
                len(graph_edges), generator=generator, dtype=dtype
            )
            bias = bias_std * torch.randn(n, generator=generator, dtype=dtype)
            sizes.append(n)
            names.append(family)
            edges.append(graph_edges.T + base)
            couplings.append(coupling)
            biases.append(bias)
            base += n
    batch = _assemble(
        sizes,
        names,
        torch.cat(edges, dim=1) if edges else torch.zeros(2, 0, dtype=torch.int64),
        torch.cat(biases) if biases else torch.zeros(0, dtype=dtype),
        torch.cat(couplings) if couplings else torch.zeros(0, dtype=dtype),
    )
    if with_marginals:
        batch.marginals = exact_marginals(batch)
    return batch


def _spin_table(n: int, start: int, stop: int, dtype: torch.dtype, device) -> Tensor:
    """Tensor[stop - start, n]: spins of the states start..stop-1 (bit i of the index is x_i)."""
    index = torch.arange(start, stop, device=device)
    bits = (index[:, None] >> torch.arange(n, device=device)) & 1
    return (2 * bits - 1).to(dtype)


def exact_marginals(batch: MRFBatch, max_elements: int = 1 << 22) -> Tensor:
    """Exact marginals by enumerating every state of every graph.

    Graphs of the same size are processed together: the energies of a chunk of states for
    all those graphs come from two matrix products (biases times spins, couplings times the
    spin products of the node pairs that carry an edge in any of those graphs), and the
    normaliser and the mass of each node's +1 state are accumulated chunk by chunk, rescaled
    by a running maximum of the energy, so memory stays near ``max_elements`` numbers
    whatever n is. Cost: ``O(2^n (n + pairs))`` per graph, about a second for a path of 20
    nodes on one CPU thread.

    Args:
        batch: the models; the number of nodes of each graph must be at most 20.
        max_elements (int > 0): bound on the elements of the largest temporary tensor.

    Returns:
        Tensor[V, 2] in the dtype of ``batch.bias``: p(x_i = -1) and p(x_i = +1).

    Raises:
        ValueError: a graph with more than 20 nodes.
    """
    if batch.num_graphs and int(batch.sizes.max()) > MAX_EXACT_NODES:
        raise ValueError(
            f"exact_marginals enumerates 2^n states: n must be at most {MAX_EXACT_NODES}, "
            f"got a graph of {int(batch.sizes.max())} nodes"
        )
    dtype, device = batch.bias.dtype, batch.bias.device
    plus = batch.bias.new_zeros(batch.num_nodes)
    offsets = torch.cat([batch.sizes.new_zeros(1), batch.sizes.cumsum(0)]).tolist()
    edge_graph = batch.node_graph[batch.edges[0]]

    for n in sorted(set(batch.sizes.tolist())):
        graphs = (batch.sizes == n).nonzero().flatten()
        starts = torch.tensor([offsets[g] for g in graphs.tolist()], device=device)
        # Couplings of these graphs over the node pairs that hold an edge in any of them (all
        # pairs i < j at worst): x.J.x counts each edge once.
        local = torch.full((batch.num_graphs,), -1, dtype=torch.int64, device=device)
        local[graphs] = torch.arange(graphs.numel(), device=device)
        keep = local[edge_graph] >= 0
        which = local[edge_graph[keep]]
        u = batch.edges[0, keep] - starts[which]
        v = batch.edges[1, keep] - starts[which]
        pairs, column = torch.unique(u * n + v, return_inverse=True)
        pair_i, pair_j = pairs // n, pairs % n
        couplings = torch.zeros(graphs.numel(), pairs.numel(), dtype=dtype, device=device)
        couplings.index_put_((which, column), batch.coupling[keep], accumulate=True)
        node_index = starts[:, None] + torch.arange(n, device=device)
        bias = batch.bias[node_index]  # [graphs, n]

        # Running sums of exp(energy - top) over states, rescaled when the top energy rises.
        top = torch.full((graphs.numel(), 1), -math.inf, dtype=dtype, device=device)
        mass = torch.zeros(graphs.numel(), 1, dtype=dtype, device=device)
        mass_up = torch.zeros(graphs.numel(), n, dtype=dtype, device=device)
        states = 1 << n
        per_state = max(1, graphs.numel() + pair_i.numel())
        chunk = max(1, min(states, max_elements // per_state))
        for start in range(0, states, chunk):
            spins = _spin_table(n, start, min(states, start + chunk), dtype, device)
            products = spins[:, pair_i] * spins[:, pair_j]  # [states, pairs]
            energy = bias @ spins.T + couplings @ products.T  # [graphs, states]
            new_top = torch.maximum(top, energy.amax(dim=1, keepdim=True))
            rescale = torch.exp(top - new_top)
            weights = torch.exp(energy - new_top)
            mass = mass * rescale + weights.sum(dim=1, keepdim=True)
            mass_up = mass_up * rescale + weights @ (spins > 0).to(dtype)
            top = new_top
        plus[node_index.flatten()] = (mass_up / mass).flatten()
    return torch.stack([1.0 - plus, plus], dim=1)
