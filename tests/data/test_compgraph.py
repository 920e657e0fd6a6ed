"""Computational graphs: graph_of on hand-built networks, ResNets and a transformer block;
batch_graphs."""

from __future__ import annotations

import networkx as nx
import pytest
import torch
from torch import nn

from deepkern.data.compgraph import (
    MAX_SHORTEST_PATH,
    NODE_TYPES,
    ComputationalGraph,
    batch_graphs,
    graph_of,
)
from deepkern.models.resnet import resnet18, resnet50


def _types(graph: ComputationalGraph) -> list[str]:
    return [NODE_TYPES[t] for t in graph.node_types]


def _real_edges(graph: ComputationalGraph) -> list[tuple[int, int]]:
    real = graph.edges[:, graph.edge_lengths == 1]
    return sorted(map(tuple, real.t().tolist()))


class _Branches(nn.Module):
    """Every kind of node a convolutional cell has: conv, bn, sep/dil conv, sum, concat, pools."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.sep = nn.Conv2d(4, 4, 3, padding=1, groups=4, bias=False)
        self.dil = nn.Conv2d(4, 4, 3, padding=2, dilation=2, bias=False)
        self.pool = nn.MaxPool2d(2)
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        x = torch.relu(self.bn(self.stem(x)))
        merged = torch.cat([self.sep(x) + self.dil(x), x], dim=1)
        return self.fc(self.gap(self.pool(merged)).flatten(1))


class _TransformerBlock(nn.Module):
    """A vision-transformer-style network: patch embedding, positional embedding, one block."""

    def __init__(self, dim: int = 16, heads: int = 2, patch: int = 2, image: int = 8):
        super().__init__()
        self.patch = nn.Conv2d(1, dim, patch, stride=patch)
        self.pos_embedding = nn.Parameter(torch.zeros(1, (image // patch) ** 2, dim))
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(
            nn.Linear(dim, 2 * dim), nn.GELU(), nn.Dropout(0.1), nn.Linear(2 * dim, dim)
        )
        self.head = nn.Linear(dim, 10)

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = x + self.pos_embedding
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        x = x + self.mlp(self.norm2(x))
        return self.head(x.mean(dim=1))


class _SqueezeExcitation(nn.Module):
    graph_node_type = "cse"

    def __init__(self, channels: int):
        super().__init__()
        self.squeeze = nn.Conv2d(channels, channels // 2, 1)
        self.excite = nn.Conv2d(channels // 2, channels, 1)

    def forward(self, x):
        gate = torch.sigmoid(self.excite(torch.relu(self.squeeze(x.mean((2, 3), keepdim=True)))))
        return x * gate


def _check_invariants(graph: ComputationalGraph, module: nn.Module) -> None:
    n = graph.num_nodes
    assert graph.node_types.shape == (n,) and graph.shapes.shape == (n, 4)
    assert graph.levels.shape == (n,) and len(graph.param_names) == n
    assert graph.edges.shape == (2, graph.edge_lengths.numel())
    # Edges follow the topological order; it makes the graph acyclic.
    assert bool((graph.edges[0] < graph.edges[1]).all())
    # Sorted by target, then source, without duplicates.
    keys = (graph.edges[1] * n + graph.edges[0]).tolist()
    assert keys == sorted(set(keys))

    # Every trainable parameter is predicted by exactly one node, with its shape.
    named = [p for p in graph.param_names if p is not None]
    params = dict(module.named_parameters())
    assert sorted(named) == sorted(params)
    for node, name in enumerate(graph.param_names):
        if name is None:
            assert graph.shapes[node].tolist() == [0, 0, 0, 0]
        else:
            shape = list(params[name].shape)
            assert graph.shapes[node].tolist() == shape + [1] * (4 - len(shape))

    # Levels: longest real path from a node without predecessors.
    real = nx.DiGraph(_real_edges(graph))
    real.add_nodes_from(range(n))
    for node in nx.topological_sort(real):
        preds = list(real.predecessors(node))
        expected = 1 + max(int(graph.levels[p]) for p in preds) if preds else 0
        assert int(graph.levels[node]) == expected

    # Virtual edges: exactly the pairs at shortest real distance 2 .. MAX_SHORTEST_PATH.
    distances = dict(nx.all_pairs_shortest_path_length(real, cutoff=MAX_SHORTEST_PATH))
    expected_edges = {(s, t): d for s, row in distances.items() for t, d in row.items() if d >= 1}
    got = dict(zip(map(tuple, graph.edges.t().tolist()), graph.edge_lengths.tolist()))
    assert got == expected_edges


def test_hand_net_nodes_edges_and_levels():
    net = _Branches()
    graph = graph_of(net, torch.randn(2, 1, 8, 8))
    assert _types(graph) == [
        "input",
        "conv",
        "bn",
        "bias",
        "sep_conv",
        "dil_conv",
        "sum",
        "concat",
        "max_pool",
        "glob_avg",
        "conv",
        "bias",
    ]
    assert _real_edges(graph) == [
        (0, 1),
        (1, 2),
        (2, 3),
        (3, 4),
        (3, 5),
        (3, 7),
        (4, 6),
        (5, 6),
        (6, 7),
        (7, 8),
        (8, 9),
        (9, 10),
        (10, 11),
    ]
    assert graph.levels.tolist() == [0, 1, 2, 3, 4, 4, 5, 6, 7, 8, 9, 10]
    assert graph.param_names[1] == "stem.weight" and graph.param_names[3] == "bn.bias"
    assert graph.shapes[10].tolist() == [3, 8, 1, 1]  # a linear layer is a 1x1 convolution
    _check_invariants(graph, net)


def test_transformer_block():
    net = _TransformerBlock()
    graph = graph_of(net, torch.randn(2, 1, 8, 8))
    assert _types(graph) == [
        "input",
        "conv",
        "bias",
        "pos_enc",
        "ln",
        "bias",
        "msa",
        "bias",
        "conv",
        "bias",
        "sum",
        "ln",
        "bias",
        "conv",
        "bias",
        "conv",
        "bias",
        "sum",
        "glob_avg",
        "conv",
        "bias",
    ]
    names = graph.param_names
    assert names[3] == "pos_embedding" and names[6] == "attn.in_proj_weight"
    assert names[8] == "attn.out_proj.weight"
    assert graph.shapes[6].tolist() == [48, 16, 1, 1]
    # The residual adds join the block's input to its branch's output.
    assert (3, 10) in _real_edges(graph) and (9, 10) in _real_edges(graph)
    assert (10, 17) in _real_edges(graph) and (16, 17) in _real_edges(graph)
    _check_invariants(graph, net)


def test_declared_node_type_module_becomes_a_chain():
    net = nn.Sequential(nn.Conv2d(1, 4, 1), _SqueezeExcitation(4))
    graph = graph_of(net, torch.randn(1, 1, 4, 4))
    assert _types(graph) == ["input", "conv", "bias", "cse", "bias", "cse", "bias"]
    assert graph.param_names[3] == "1.squeeze.weight"
    _check_invariants(graph, net)


@pytest.mark.parametrize("factory", [resnet18, resnet50])
def test_resnets(factory):
    net = factory(num_classes=10, in_channels=3, width=8)
    graph = graph_of(net, torch.randn(2, 3, 8, 8))
    types = _types(graph)
    convs = sum(isinstance(m, (nn.Conv2d, nn.Linear)) for m in net.modules())
    norms = sum(isinstance(m, nn.BatchNorm2d) for m in net.modules())
    blocks = sum(len(stage) for stage in net.stages())
    assert types.count("conv") == convs and types.count("bn") == norms
    assert types.count("bias") == norms + 1  # every norm's bias and the classifier's
    assert types.count("sum") == blocks and types.count("glob_avg") == 1
    assert graph.num_nodes == 2 + convs + 2 * norms + 1 + blocks
    _check_invariants(graph, net)


def test_module_state_is_kept():
    net = resnet18(width=4)
    net.train()
    net.layer1.eval()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    graph_of(net, torch.randn(2, 3, 8, 8))
    assert net.training and not net.layer1.training and net.layer2.training
    after = net.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


class _MatMul(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return torch.matmul(self.fc(x), x.t())


class _Branching(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return self.fc(x) if x.sum() > 0 else x


class _Shared(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return self.fc(self.fc(x))


class _ParamProduct(nn.Module):
    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(4))

    def forward(self, x):
        return x * self.scale


@pytest.mark.parametrize(
    ("net", "example", "message"),
    [
        (nn.Sequential(nn.Conv2d(1, 4, 1), nn.GroupNorm(2, 4)), (1, 1, 4, 4), "GroupNorm at '1'"),
        (nn.Sequential(nn.Conv3d(1, 2, 1)), (1, 1, 2, 2, 2), "Conv3d"),
        (_MatMul(), (3, 4), "matmul"),
        (_Branching(), (3, 4), "cannot trace"),
        (_Shared(), (3, 4), "more than once"),
        (_ParamProduct(), (3, 4), "'scale'"),
        (nn.Sequential(nn.Linear(4, 2)), (3, 5), "fails on example_input"),
        (nn.MultiheadAttention(4, 2, kdim=3, vdim=3), None, "kdim"),
    ],
)
def test_unsupported_networks_raise_naming_the_cause(net, example, message):
    if isinstance(net, nn.MultiheadAttention):

        class _Attention(nn.Module):
            def __init__(self):
                super().__init__()
                self.attn = net

            def forward(self, x):
                return self.attn(x, x[..., :3], x[..., :3])[0]

        net, example = _Attention(), (2, 5, 4)
    with pytest.raises(ValueError, match=message):
        graph_of(net, torch.randn(*example))


def test_bad_arguments():
    with pytest.raises(ValueError, match="module must be an nn.Module"):
        graph_of(lambda x: x, torch.randn(1))
    with pytest.raises(ValueError, match="example_input must be a Tensor"):
        graph_of(nn.Linear(2, 2), [1.0, 2.0])


def test_batch_graphs_offsets_and_slices():
    graphs = [
        graph_of(_Branches(), torch.randn(1, 1, 8, 8)),
        graph_of(nn.Sequential(nn.Linear(3, 2)), torch.randn(1, 3)),
        graph_of(_TransformerBlock(), torch.randn(1, 1, 8, 8)),
    ]
    batch = batch_graphs(graphs)
    assert batch.num_graphs == 3 and batch.num_nodes == sum(g.num_nodes for g in graphs)
    assert batch.graph_index.bincount().tolist() == [g.num_nodes for g in graphs]
    for b, graph in enumerate(graphs):
        nodes = slice(int(batch.node_ptr[b]), int(batch.node_ptr[b + 1]))
        edges = slice(int(batch.edge_ptr[b]), int(batch.edge_ptr[b + 1]))
        assert torch.equal(batch.node_types[nodes], graph.node_types)
        assert torch.equal(batch.shapes[nodes], graph.shapes)
        assert torch.equal(batch.levels[nodes], graph.levels)
        assert torch.equal(batch.edges[:, edges] - batch.node_ptr[b], graph.edges)
        assert torch.equal(batch.edge_lengths[edges], graph.edge_lengths)
        assert batch.param_names[b] == graph.param_names
    # The batch stays sorted by target, then source.
    keys = (batch.edges[1] * batch.num_nodes + batch.edges[0]).tolist()
    assert keys == sorted(keys)


def test_batch_graphs_rejects_bad_input():
    with pytest.raises(ValueError, match="at least one"):
        batch_graphs([])
    with pytest.raises(ValueError, match=r"graphs\[0\] must be a ComputationalGraph"):
        batch_graphs(["graph"])
