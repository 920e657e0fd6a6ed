"""Computational graphs of neural networks, the input of a graph hypernetwork.

A graph's nodes are the parameterised modules and parameter-free operations of one network, in
a topological order (every edge goes from a lower to a higher index). Real edges carry data;
virtual edges join nodes whose shortest real path has length 2 to 50 and let a message skip
the nodes in between. ``levels`` are the depths used by the level-synchronous sweep: the length
of the longest real path from an input node, so all nodes of one level can be updated together.

:func:`graph_of` reads a network's graph by tracing it with ``torch.fx`` (each node predicts
exactly one parameter; biases are nodes of their own), and :func:`batch_graphs` joins several
graphs into one disjoint graph for a batched hypernetwork.
"""

from __future__ import annotations

import operator
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.fx
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "MAX_SHORTEST_PATH",
    "NODE_TYPES",
    "ComputationalGraph",
    "GraphBatch",
    "batch_graphs",
    "graph_of",
]

# The fifteen node types of DeepNets-1M, in a fixed order (their indices are the node features).
NODE_TYPES = (
    "max_pool",
    "avg_pool",
    "sep_conv",
    "dil_conv",
    "conv",
    "msa",
    "cse",
    "sum",
    "concat",
    "input",
    "bias",
    "bn",
    "ln",
    "pos_enc",
    "glob_avg",
)

# Virtual edges join nodes at most this many real edges apart.
MAX_SHORTEST_PATH = 50


@dataclass
class ComputationalGraph:
    """One network's graph.

    node_types  int64 [N]      index into NODE_TYPES
    shapes      int64 [N, 4]   the predicted parameter's shape as (out, in, height, width),
                               1 for missing trailing dimensions, zeros for nodes without one
    edges       int64 [2, E]   (source, target), source < target
    edge_lengths int64 [E]     1 for real edges, the shortest-path length for virtual ones
    levels      int64 [N]      longest real path from an input node
    param_names list[str | None] the parameter each node predicts (a name in the module's
                               ``named_parameters()``), None for parameter-free nodes
    """

    node_types: Tensor
    shapes: Tensor
    edges: Tensor
    edge_lengths: Tensor
    levels: Tensor
    param_names: list[str | None]

    @property
    def num_nodes(self) -> int:
        return int(self.node_types.numel())


# How graph_of reads a network: the module is traced symbolically with torch.fx. Modules that
# own parameters, and the pooling modules, stay whole ("leaf" modules) and become one node per
# parameter; the adds, concatenations and means between them become sum, concat and glob_avg
# nodes. Parameter-free operations that are not node types (activations, reshapes, dropout,
# indexing) are skipped: an edge runs from the node before them to the node after them.
# Tracing rather than forward hooks, since hooks see modules only and miss the adds and
# concatenations that give a network its shape.

# Modules a network may hold that are skipped like the functions below.
_SKIPPED_MODULES = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.ELU,
    nn.GELU,
    nn.SiLU,
    nn.Sigmoid,
    nn.Tanh,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.Softmax,
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Flatten,
    nn.Unflatten,
    nn.Identity,
)

_MAX_POOLS = (nn.MaxPool1d, nn.MaxPool2d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d)
_AVG_POOLS = (nn.AvgPool1d, nn.AvgPool2d)
_ADAPTIVE_AVG_POOLS = (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d)
_NORMS = {nn.BatchNorm1d: "bn", nn.BatchNorm2d: "bn", nn.LayerNorm: "ln"}
_HANDLED_MODULES = (
    nn.Conv1d,
    nn.Conv2d,
    nn.Linear,
    nn.MultiheadAttention,
    *_NORMS,
    *_MAX_POOLS,
    *_AVG_POOLS,
    *_ADAPTIVE_AVG_POOLS,
)

_ADD_FUNCTIONS = {operator.add, operator.iadd, torch.add}
_CAT_FUNCTIONS = {torch.cat, torch.concat}
_MEAN_FUNCTIONS = {torch.mean}
_POOL_FUNCTIONS = {
    F.max_pool1d: "max_pool",
    F.max_pool2d: "max_pool",
    F.adaptive_max_pool1d: "max_pool",
    F.adaptive_max_pool2d: "max_pool",
    F.avg_pool1d: "avg_pool",
    F.avg_pool2d: "avg_pool",
}
_ADAPTIVE_AVG_FUNCTIONS = {F.adaptive_avg_pool1d, F.adaptive_avg_pool2d}
_SKIPPED_FUNCTIONS = {
    F.relu,
    torch.relu,
    F.relu6,
    F.leaky_relu,
    F.elu,
    F.gelu,
    F.silu,
    F.hardswish,
    F.hardsigmoid,
    torch.sigmoid,
    F.sigmoid,
    torch.tanh,
    F.softmax,
    torch.softmax,
    F.dropout,
    F.pad,
    torch.flatten,
    torch.reshape,
    torch.permute,
    torch.transpose,
    torch.squeeze,
    torch.unsqueeze,
    torch.mul,
    operator.mul,
    operator.imul,
    operator.truediv,
    operator.sub,
    operator.neg,
    operator.getitem,
    getattr,
}
_ADD_METHODS = {"add", "add_"}
_SKIPPED_METHODS = {
    "relu",
    "relu_",
    "sigmoid",
    "tanh",
    "softmax",
    "view",
    "view_as",
    "reshape",
    "flatten",
    "unflatten",
    "permute",
    "transpose",
    "t",
    "contiguous",
    "size",
    "dim",
    "squeeze",
    "unsqueeze",
    "expand",
    "expand_as",
    "mul",
    "mul_",
    "div",
    "div_",
    "clone",
    "float",
    "to",
    "type_as",
}


def _node_type_attribute(module: nn.Module) -> str | None:
    # A module class may declare the node type it is (a squeeze-excitation block is "cse", a
    # learned positional embedding "pos_enc"); its parameters then become a chain of nodes.
    node_type = getattr(type(module), "graph_node_type", None)
    return node_type if node_type in NODE_TYPES else None


class _LeafTracer(torch.fx.Tracer):
    """Keeps parameterised modules, pools and skipped modules whole; traces into the rest."""

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        if _node_type_attribute(module) is not None:
            return True
        if isinstance(module, (*_HANDLED_MODULES, *_SKIPPED_MODULES)):
            return True
        if isinstance(module, (nn.Sequential, nn.ModuleList, nn.ModuleDict)):
            return False
        # Any other built-in module stays whole too, so that the error can name it.
        return type(module).__module__.startswith("torch.nn")


def _padded_shape(param: Tensor, name: str) -> tuple[int, int, int, int]:
    if param.dim() > 4:
        raise ValueError(
            f"graph_of: parameter '{name}' has {param.dim()} dimensions; at most 4 are supported"
        )
    return tuple(param.shape) + (1,) * (4 - param.dim())


def _fx_inputs(value) -> list[torch.fx.Node]:
    """The fx nodes among a call's (possibly nested) arguments."""
    found: list[torch.fx.Node] = []
    torch.fx.node.map_arg(value, found.append)
    return found


def _all_ones(size) -> bool:
    sizes = size if isinstance(size, (tuple, list)) else (size,)
    return all(s == 1 for s in sizes)


class _Builder:
    """Turns a traced fx graph into the nodes and real edges of a computational graph."""

    def __init__(self, module: nn.Module):
        self.module = module
        self.params = dict(module.named_parameters())
        self.node_types: list[int] = []
        self.shapes: list[tuple[int, int, int, int]] = []
        self.param_names: list[str | None] = []
        self.edges: set[tuple[int, int]] = set()
        # Graph nodes whose output an fx value carries (empty for constants and buffers).
        self.producers: dict[torch.fx.Node, tuple[int, ...]] = {}
        # fx values that are a bare parameter read with get_attr, by parameter name.
        self.free_params: dict[torch.fx.Node, str] = {}

    def add(self, node_type: str, sources, param_name: str | None = None) -> int:
        index = len(self.node_types)
        if param_name is None:
            shape = (0, 0, 0, 0)
        else:
            if param_name in self.param_names:
                raise ValueError(
                    f"graph_of: parameter '{param_name}' is used more than once; "
                    "networks that call a parameterised module twice are not supported"
                )
            shape = _padded_shape(self.params[param_name], param_name)
        self.node_types.append(NODE_TYPES.index(node_type))
        self.shapes.append(shape)
        self.param_names.append(param_name)
        self.edges.update((source, index) for source in sources)
        return index

    def add_layer(self, node_type: str, sources, prefix: str, weight: str) -> tuple[int, ...]:
        """A weight node, then a bias node when the layer has a bias."""
        node = self.add(node_type, sources, self._param(prefix, weight))
        bias_name = self._param(prefix, "bias", required=False)
        if bias_name is not None:
            node = self.add("bias", (node,), bias_name)
        return (node,)

    def _param(self, prefix: str, local: str, required: bool = True) -> str | None:
        name = f"{prefix}.{local}" if prefix else local
        owner = self.module.get_submodule(prefix) if prefix else self.module
        param = getattr(owner, local, None)
        if param is None and not required:
            return None
        if name not in self.params:
            raise ValueError(
                f"graph_of: parameter '{name}' is not among the module's named_parameters() "
                "(shared or frozen into a buffer?); every parameter needs a name of its own"
            )
        return name

    def sources_of(self, fx_node: torch.fx.Node, inputs: list[torch.fx.Node]) -> tuple[int, ...]:
        for value in inputs:
            if value in self.free_params:
                raise ValueError(
                    f"graph_of: parameter '{self.free_params[value]}' is read directly by "
                    f"'{fx_node.name}'; a parameter outside a module is supported "
                    "only as a learned positional embedding added to the input"
                )
        merged: dict[int, None] = {}
        for value in inputs:
            merged.update(dict.fromkeys(self.producers[value]))
        return tuple(merged)

    def visit(self, fx_node: torch.fx.Node) -> None:
        if fx_node.op == "placeholder":
            self.producers[fx_node] = (self.add("input", ()),)
        elif fx_node.op == "get_attr":
            if fx_node.target in self.params:
                self.free_params[fx_node] = fx_node.target
            self.producers[fx_node] = ()
        elif fx_node.op == "call_module":
            self.producers[fx_node] = self.visit_module(fx_node)
        elif fx_node.op in ("call_function", "call_method"):
            self.producers[fx_node] = self.visit_function(fx_node)

    def visit_module(self, fx_node: torch.fx.Node) -> tuple[int, ...]:
        prefix = fx_node.target
        module = self.module.get_submodule(prefix)
        if isinstance(module, nn.MultiheadAttention):
            # Only query, key and value carry data; masks shape the attention, not the graph.
            query_key_value = list(fx_node.args[:3]) + [
                fx_node.kwargs[k] for k in ("query", "key", "value") if k in fx_node.kwargs
            ]
            return self.attention(module, prefix, self.sources_of(fx_node, query_key_value))
        sources = self.sources_of(fx_node, _fx_inputs((fx_node.args, fx_node.kwargs)))

        declared = _node_type_attribute(module)
        if declared is not None:
            return self.chain(declared, sources, prefix, module)
        if isinstance(module, (nn.Conv1d, nn.Conv2d)):
            return self.add_layer(_conv_type(module), sources, prefix, "weight")
        if isinstance(module, nn.Linear):
            return self.add_layer("conv", sources, prefix, "weight")
        if type(module) in _NORMS:
            if getattr(module, "weight", None) is None:
                return (self.add(_NORMS[type(module)], sources),)
            return self.add_layer(_NORMS[type(module)], sources, prefix, "weight")
        if isinstance(module, _MAX_POOLS):
            return (self.add("max_pool", sources),)
        if isinstance(module, _AVG_POOLS):
            return (self.add("avg_pool", sources),)
        if isinstance(module, _ADAPTIVE_AVG_POOLS):
            pooled = "glob_avg" if _all_ones(module.output_size) else "avg_pool"
            return (self.add(pooled, sources),)
        if isinstance(module, _SKIPPED_MODULES):
            return sources
        raise ValueError(
            f"graph_of: unsupported module {type(module).__name__} at '{prefix}'; "
            f"supported: {', '.join(sorted(m.__name__ for m in _HANDLED_MODULES))}, "
            "modules with a graph_node_type, and parameter-free activations and reshapes"
        )

    def attention(
        self, module: nn.MultiheadAttention, prefix: str, sources: tuple[int, ...]
    ) -> tuple[int, ...]:
        """The msa node predicts the packed query/key/value projection; the output projection
        is a linear layer like any other (a conv node and its bias)."""
        if not module._qkv_same_embed_dim or module.bias_k is not None:
            raise ValueError(
                f"graph_of: MultiheadAttention at '{prefix}' has separate key/value sizes or "
                "add_bias_kv; only the packed projection (kdim = vdim = embed_dim) is supported"
            )
        node = self.add("msa", sources, self._param(prefix, "in_proj_weight"))
        if module.in_proj_bias is not None:
            node = self.add("bias", (node,), self._param(prefix, "in_proj_bias"))
        return self.add_layer("conv", (node,), f"{prefix}.out_proj", "weight")

    def chain(
        self, node_type: str, sources: tuple[int, ...], prefix: str, module: nn.Module
    ) -> tuple[int, ...]:
        """One node per parameter of a declared module, in registration order; a 1-D
        parameter called ``bias`` becomes a bias node."""
        nodes = sources
        for local, param in module.named_parameters():
            kind = "bias" if local.rsplit(".", 1)[-1] == "bias" and param.dim() == 1 else node_type
            nodes = (self.add(kind, nodes, self._param(prefix, local)),)
        if nodes == sources:
            nodes = (self.add(node_type, sources),)
        return nodes

    def visit_function(self, fx_node: torch.fx.Node) -> tuple[int, ...]:
        target = fx_node.target
        is_method = fx_node.op == "call_method"
        inputs = _fx_inputs((fx_node.args, fx_node.kwargs))
        if (is_method and target in _ADD_METHODS) or (not is_method and target in _ADD_FUNCTIONS):
            operands = [*fx_node.args[:2], fx_node.kwargs.get("other")]
            return self.addition(fx_node, [a for a in operands if a in self.producers])
        if not is_method and target in _CAT_FUNCTIONS:
            parts = _fx_inputs(fx_node.args[0] if fx_node.args else fx_node.kwargs["tensors"])
            sources = self.sources_of(fx_node, parts)
            return (self.add("concat", sources),) if len(parts) > 1 else sources

        sources = self.sources_of(fx_node, inputs)
        if (is_method and target == "mean") or (not is_method and target in _MEAN_FUNCTIONS):
            return (self.add("glob_avg", sources),)
        if not is_method and target in _POOL_FUNCTIONS:
            return (self.add(_POOL_FUNCTIONS[target], sources),)
        if not is_method and target in _ADAPTIVE_AVG_FUNCTIONS:
            size = fx_node.args[1] if len(fx_node.args) > 1 else fx_node.kwargs["output_size"]
            return (self.add("glob_avg" if _all_ones(size) else "avg_pool", sources),)
        if (is_method and target in _SKIPPED_METHODS) or (
            not is_method and target in _SKIPPED_FUNCTIONS
        ):
            return sources
        name = f"Tensor.{target}" if is_method else getattr(target, "__name__", str(target))
        raise ValueError(
            f"graph_of: unsupported operation {name} at '{fx_node.name}'; it is neither "
            "a node type nor a parameter-free operation known to pass data through unchanged"
        )

    def addition(self, fx_node: torch.fx.Node, operands: list[torch.fx.Node]):
        params = [a for a in operands if a in self.free_params]
        flows = [a for a in operands if a not in self.free_params]
        if params:
            if len(params) != 1 or len(flows) != 1:
                return self.sources_of(fx_node, operands)  # raises, naming the parameter
            sources = self.sources_of(fx_node, flows)
            return (self.add("pos_enc", sources, self.free_params[params[0]]),)
        carrying = [a for a in flows if self.producers[a]]
        sources = self.sources_of(fx_node, flows)
        # Adding a constant or a buffer changes no data flow; two live inputs make a sum node.
        return (self.add("sum", sources),) if len(carrying) > 1 else sources


def _conv_type(conv: nn.Conv1d | nn.Conv2d) -> str:
    # DARTS-style separable and dilated convolutions are a grouped (depthwise) convolution
    # followed by a 1x1 one; the grouped part carries the name, the 1x1 part is a plain conv.
    dilation = conv.dilation if isinstance(conv.dilation, tuple) else (conv.dilation,)
    if any(d > 1 for d in dilation):
        return "dil_conv"
    if conv.groups > 1:
        return "sep_conv"
    return "conv"


def _levels_and_virtual_edges(
    num_nodes: int, real_edges: set[tuple[int, int]]
) -> tuple[Tensor, Tensor, Tensor]:
    successors: list[list[int]] = [[] for _ in range(num_nodes)]
    predecessors: list[list[int]] = [[] for _ in range(num_nodes)]
    for source, target in sorted(real_edges):
        successors[source].append(target)
        predecessors[target].append(source)

    # Sources precede targets, so one pass in index order sees every predecessor's level.
    levels = [0] * num_nodes
    for node in range(num_nodes):
        if predecessors[node]:
            levels[node] = 1 + max(levels[p] for p in predecessors[node])

    # Breadth-first search from every node, cut at MAX_SHORTEST_PATH steps.
    lengths: dict[tuple[int, int], int] = {}
    for start in range(num_nodes):
        distance = {start: 0}
        frontier = deque([start])
        while frontier:
            node = frontier.popleft()
            if distance[node] == MAX_SHORTEST_PATH:
                continue
            for nxt in successors[node]:
                if nxt not in distance:
                    distance[nxt] = distance[node] + 1
                    frontier.append(nxt)
        for node, length in distance.items():
            if length >= 1:
                lengths[(start, node)] = length

    ordered = sorted(lengths, key=lambda edge: (edge[1], edge[0]))
    edges = torch.tensor(ordered, dtype=torch.int64).reshape(-1, 2).t().contiguous()
    edge_lengths = torch.tensor([lengths[e] for e in ordered], dtype=torch.int64)
    return edges, edge_lengths, torch.tensor(levels, dtype=torch.int64)


def graph_of(module: nn.Module, example_input: Tensor) -> ComputationalGraph:
    """The computational graph of a network, as a graph hypernetwork reads it.

    The module is traced with ``torch.fx``. Node types:

    - ``conv``: ``nn.Conv1d``/``nn.Conv2d`` and ``nn.Linear`` (a linear layer is a 1x1
      convolution); ``sep_conv`` for grouped (depthwise) convolutions, ``dil_conv`` for dilated
      ones. ``bn``: BatchNorm1d/2d; ``ln``: LayerNorm.
    - ``msa``: ``nn.MultiheadAttention``'s packed query/key/value projection; its output
      projection follows as a ``conv`` node.
    - ``cse``, ``pos_enc``: modules whose class sets ``graph_node_type`` to that name (one node
      per parameter, in registration order); a bare parameter added to the data (``x +
      self.pos_embedding``) is a ``pos_enc`` node too.
    - ``max_pool``, ``avg_pool``; ``glob_avg`` for adaptive average pooling to size 1 and for
      ``mean``; ``sum`` for an add of two live values; ``concat`` for ``torch.cat``;
      ``input`` for each argument of ``forward``.
    - ``bias``: every bias (of convolutions, linear layers, norms and attention) is a node of its
      own after its layer's node, so each node predicts exactly one parameter.

    Activations, reshapes, dropout and indexing are skipped: edges pass through them.

    Args:
        module: the network. Its ``forward`` must be traceable (no control flow on tensor
            values); a module called twice (shared parameters) is not supported.
        example_input (Tensor[B, ...]): a batch the network accepts; the traced graph is run on
            it once, in eval mode and without gradients, to check the trace.

    Returns:
        The graph: nodes in a topological order, edges sorted by target then source, real edges
        of length 1 and virtual edges for shortest real paths of length 2 to MAX_SHORTEST_PATH.
        Every trainable parameter is named by exactly one node.

    Raises:
        ValueError: an unsupported module or operation (named, with its place in the network),
            a forward that cannot be traced or fails on ``example_input``, or a trainable
            parameter that no node predicts.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
        >>> graph = graph_of(net, torch.randn(2, 1, 8, 8))
        >>> [NODE_TYPES[t] for t in graph.node_types]
        ['input', 'conv', 'bias', 'bn', 'bias']
    """
    if not isinstance(module, nn.Module):
        raise ValueError(f"module must be an nn.Module, got {type(module).__name__}")
    if not isinstance(example_input, Tensor):
        raise ValueError(f"example_input must be a Tensor, got {type(example_input).__name__}")

    try:
        fx_graph = _LeafTracer().trace(module)
    except Exception as error:
        raise ValueError(
            f"graph_of: torch.fx cannot trace {type(module).__name__}.forward: {error}"
        ) from error
    _check_trace_runs(module, fx_graph, example_input)

    builder = _Builder(module)
    for fx_node in fx_graph.nodes:
        builder.visit(fx_node)

    covered = {name for name in builder.param_names if name is not None}
    missing = [n for n, p in module.named_parameters() if p.requires_grad and n not in covered]
    if missing:
        raise ValueError(
            f"graph_of: no node predicts the trainable parameters {missing[:5]}"
            f"{' ...' if len(missing) > 5 else ''}; they are not used by a supported layer"
        )

    edges, edge_lengths, levels = _levels_and_virtual_edges(len(builder.node_types), builder.edges)
    return ComputationalGraph(
        node_types=torch.tensor(builder.node_types, dtype=torch.int64),
        shapes=torch.tensor(builder.shapes, dtype=torch.int64).reshape(-1, 4),
        edges=edges,
        edge_lengths=edge_lengths,
        levels=levels,
        param_names=builder.param_names,
    )


def _check_trace_runs(module: nn.Module, fx_graph: torch.fx.Graph, example_input: Tensor):
    # Tracing succeeds on code that fails at run time (a wrong reshape, a channel mismatch),
    # so the traced graph runs once; eval mode keeps BatchNorm's running statistics unchanged.
    traced = torch.fx.GraphModule(module, fx_graph)
    modes = {m: m.training for m in module.modules()}
    module.eval()
    try:
        with torch.no_grad():
            traced(example_input)
    except Exception as error:
        raise ValueError(
            f"graph_of: {type(module).__name__} fails on example_input of shape "
            f"{tuple(example_input.shape)}: {error}"
        ) from error
    finally:
        for m, training in modes.items():
            m.training = training


@dataclass
class GraphBatch:
    """Several graphs as one disjoint graph, for a hypernetwork that reads them together.

    Nodes are concatenated graph by graph and edges are shifted by their graph's first node,
    so ``edges`` indexes the concatenated nodes; edges keep their per-graph order (sorted by
    target, then source, as :func:`graph_of` writes them), so the batch is sorted the same way.

    node_types   int64 [N]       index into NODE_TYPES
    shapes       int64 [N, 4]    as in ComputationalGraph
    edges        int64 [2, E]    (source, target) into the concatenated nodes
    edge_lengths int64 [E]       1 for real edges, the shortest-path length for virtual ones
    levels       int64 [N]       each graph's own levels (a batch sweep runs level by level)
    graph_index  int64 [N]       the graph each node belongs to
    node_ptr     int64 [B + 1]   graph b owns nodes node_ptr[b] : node_ptr[b + 1]
    edge_ptr     int64 [B + 1]   graph b owns edges edge_ptr[b] : edge_ptr[b + 1]
    param_names  list[list[str | None]]  each graph's param_names
    """

    node_types: Tensor
    shapes: Tensor
    edges: Tensor
    edge_lengths: Tensor
    levels: Tensor
    graph_index: Tensor
    node_ptr: Tensor
    edge_ptr: Tensor
    param_names: list[list[str | None]]

    @property
    def num_graphs(self) -> int:
        return len(self.param_names)

    @property
    def num_nodes(self) -> int:
        return int(self.node_types.numel())


def batch_graphs(graphs: Sequence[ComputationalGraph]) -> GraphBatch:
    """Concatenate graphs into one :class:`GraphBatch`.

    Args:
        graphs: at least one graph.

    Returns:
        The batch; graph ``b``'s node ``i`` is node ``node_ptr[b] + i`` of the batch.

    Raises:
        ValueError: an empty list, or an element that is not a ComputationalGraph.

    Example:
        >>> small = graph_of(nn.Sequential(nn.Linear(3, 2)), torch.randn(1, 3))
        >>> batch = batch_graphs([small, small])
        >>> batch.graph_index.tolist(), batch.edges.tolist()
        ([0, 0, 0, 1, 1, 1], [[0, 0, 1, 3, 3, 4], [1, 2, 2, 4, 5, 5]])
    """
    if len(graphs) == 0:
        raise ValueError("graphs must hold at least one ComputationalGraph, got an empty list")
    for index, graph in enumerate(graphs):
        if not isinstance(graph, ComputationalGraph):
            raise ValueError(
                f"graphs[{index}] must be a ComputationalGraph, got {type(graph).__name__}"
            )

    node_counts = torch.tensor([g.num_nodes for g in graphs], dtype=torch.int64)
    edge_counts = torch.tensor([g.edges.shape[1] for g in graphs], dtype=torch.int64)
    node_ptr = torch.cat([node_counts.new_zeros(1), node_counts.cumsum(0)])
    edge_ptr = torch.cat([edge_counts.new_zeros(1), edge_counts.cumsum(0)])

    # Each graph's edges move by the number of nodes in the graphs before it.
    shifted = [g.edges + node_ptr[b] for b, g in enumerate(graphs)]
    return GraphBatch(
        node_types=torch.cat([g.node_types for g in graphs]),
        shapes=torch.cat([g.shapes for g in graphs]),
        edges=torch.cat(shifted, dim=1),
        edge_lengths=torch.cat([g.edge_lengths for g in graphs]),
        levels=torch.cat([g.levels for g in graphs]),
        graph_index=torch.repeat_interleave(torch.arange(len(graphs)), node_counts),
        node_ptr=node_ptr,
        edge_ptr=edge_ptr,
        param_names=[list(g.param_names) for g in graphs],
    )
