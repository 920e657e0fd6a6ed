"""Computational graphs of neural networks, the input of a graph hypernetwork.

A graph's nodes are the parameterised modules and parameter-free operations of one network, in
a topological order (every edge goes from a lower to a higher index). Real edges carry data;
virtual edges join nodes whose shortest real path has length 2 to 50 and let a message skip
the nodes in between. ``levels`` are the depths used by the level-synchronous sweep: the length
of the longest real path from an input node, so all nodes of one level can be updated together.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

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
