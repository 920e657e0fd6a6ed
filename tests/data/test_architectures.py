"""DeepNets-1M-style architectures: sampling ranges, seeded splits, filters, built networks."""

from __future__ import annotations

import copy
import json
import random

import pytest
import torch
from torch import nn

from deepkern.data import architectures as A
from deepkern.data.compgraph import NODE_TYPES, graph_of
from deepkern.data.images import load_digits_split

# A valid two-step genotype that each filter test breaks in one way.
_BASE = {
    "normal": [["sep_conv_3x3", 0], ["skip_connect", 1], ["conv_3x3", 1], ["max_pool_3x3", 2]],
    "normal_concat": [2, 3],
    "reduce": [["max_pool_3x3", 0], ["avg_pool_3x3", 1], ["skip_connect", 2], ["dil_conv_3x3", 1]],
    "reduce_concat": [2, 3],
    "cells": 5,
    "channels": 8,
    "channel_multiplier": 1,
    "stem": "simple",
    "stem_kernel": 3,
    "stem_pool": False,
    "preprocess": True,
    "norm": "bn",
    "head": "glob_avg",
    "fc_layers": 1,
    "fc_dim": 16,
}


def _with(**changes):
    genotype = copy.deepcopy(_BASE)
    genotype.update(changes)
    return genotype


def _steps(genotype) -> int:
    return len(genotype["normal"]) // 2


def test_base_genotype_is_kept_and_builds():
    assert A.rejection_reason(_BASE) is None
    net = A.build_network(_BASE, num_classes=10, in_channels=1, image_size=8)
    assert net(torch.randn(3, 1, 8, 8)).shape == (3, 10)


@pytest.mark.parametrize("split", A.SPLITS)
def test_sampling_is_deterministic_per_seed(split):
    first = A.architectures(split, 3, seed=5)
    assert first == A.architectures(split, 3, seed=5)
    assert first != A.architectures(split, 3, seed=6)
    assert A.sample_architecture(11, split) == A.sample_architecture(random.Random(11), split)


def test_splits_are_disjoint_from_train():
    def fingerprints(genotypes):
        return {A._fingerprint(g) for g in genotypes}

    train = A.architectures("train", 40, seed=0)
    assert all(A.membership(g) == "train" for g in train)
    train_prints = fingerprints(train)
    for split in ("val", "test", "wide", "deep", "dense", "bn_free"):
        nets = A.architectures(split, 6, seed=0)
        assert not fingerprints(nets) & train_prints
        assert all(A.membership(g) == ("val" if split == "val" else "eval") for g in nets)
    assert not fingerprints(A.architectures("val", 6)) & fingerprints(A.architectures("test", 6))
    # Wide networks are the test networks with four times the channels.
    test, wide = A.architectures("test", 4, seed=3), A.architectures("wide", 4, seed=3)
    assert [dict(g, channels=4 * g["channels"]) for g in test] == wide


@pytest.mark.parametrize("split", A.SPLITS)
def test_sampled_ranges_hold(split):
    rng = random.Random(f"ranges:{split}")
    for _ in range(300):
        g = A.sample_architecture(rng, split)
        A.validate_genotype(g)
        steps = _steps(g)
        assert len(g["reduce"]) == 2 * steps
        deep_from = 18 if split == "deep" else 10  # beyond this many cells, fewer steps
        if split == "deep":
            assert 10 <= g["cells"] <= 36
        else:
            assert 4 <= g["cells"] <= 18
        if split == "dense":
            assert 2 <= steps <= 10 and (g["cells"] <= deep_from or steps <= 6)
        else:
            assert 1 <= steps <= 4 and (g["cells"] <= deep_from or steps <= 2)
        assert g["channels"] == (128 if split == "wide" else 32)
        assert g["channel_multiplier"] in (1, 2) and g["stem_kernel"] in (3, 5, 7)
        assert g["stem"] in ("simple", "imagenet") and g["fc_layers"] in (1, 2)
        assert not g["stem_pool"] or g["stem"] == "simple"
        assert g["head"] == "glob_avg" or not any(op == "msa" for op, _ in g["normal"])
        if split == "bn_free":
            assert g["norm"] is None
        elif g["norm"] is None:
            # Only the smallest networks of a split go without batch norm.
            assert g["cells"] <= (11 if split == "deep" else 5)
            assert steps <= (6 if split == "dense" else 2)
        if steps == 1:
            assert all(op != "none" for op, _ in g["normal"] + g["reduce"])
        # Every node reaches the output: the last always, the others directly or as the
        # input of a later node.
        for kind in ("normal", "reduce"):
            concat = g[f"{kind}_concat"]
            read = {state for op, state in g[kind] if op != "none"}
            assert steps + 1 in concat
            assert all(s in concat or s in read for s in range(2, steps + 2))
        assert json.loads(json.dumps(g)) == g


@pytest.mark.parametrize("split", A.SPLITS)
def test_filtered_architectures_pass_the_filters(split):
    for g in A.architectures(split, 4, seed=1):
        assert A.rejection_reason(g, max_params=None) is None
        limit = 10**8 if split in ("deep", "dense") else 10**7
        assert split == "wide" or A.count_parameters(g) <= limit


def _check_graph(net: nn.Module, x: torch.Tensor, genotype) -> list[str]:
    graph = graph_of(net, x)
    names = [n for n in graph.param_names if n is not None]
    assert sorted(names) == sorted(name for name, _ in net.named_parameters())
    assert bool((graph.edges[0] < graph.edges[1]).all())
    types = [NODE_TYPES[t] for t in graph.node_types]
    assert types.count("input") == 1 and types[0] == "input"
    ops = [op for op, _ in genotype["normal"] + genotype["reduce"]]
    for op, node_type in (("msa", "msa"), ("msa", "pos_enc"), ("cse", "cse")):
        assert (op in ops) == (node_type in types)
    assert ("bn" in types) == (genotype["norm"] == "bn")
    return types


@pytest.mark.parametrize("split", A.SPLITS)
def test_every_sampled_network_runs_and_has_its_graph(split):
    torch.manual_seed(0)
    x = torch.randn(2, 1, 16, 16)
    for g in A.architectures(split, 3, seed=2):
        net = A.build_network(g, num_classes=10, in_channels=1, image_size=16, channels=4)
        out = net(x)
        assert out.shape == (2, 10) and bool(torch.isfinite(out).all())
        _check_graph(net, x, g)


def test_networks_on_real_digits():
    x_train, _, _, _ = load_digits_split(seed=0, size=16)
    batch = x_train[:16].float()
    for g in A.architectures("train", 3, seed=7) + [_with(normal=[["msa", 0], ["cse", 1]] * 2)]:
        net = A.build_network(g, num_classes=10, in_channels=1, image_size=16, channels=8)
        net.eval()
        with torch.no_grad():
            logits = net(batch)
        assert logits.shape == (16, 10) and bool(torch.isfinite(logits).all())


def test_every_operation_builds_in_normal_and_reduction_cells():
    for op in A.PRIMITIVES[1:]:
        g = _with(
            normal=[[op, 0], ["conv_1x1", 1]],
            normal_concat=[2],
            reduce=[[op, 1], [op, 0], [op, 2], ["skip_connect", 1]],
            reduce_concat=[3],
        )
        for norm, head in ((None, "flatten"), ("bn", "glob_avg")):
            g.update(norm=norm, head=head, stem="imagenet", fc_layers=2)
            net = A.build_network(g, num_classes=3, in_channels=1, image_size=16, channels=4)
            x = torch.randn(2, 1, 16, 16)
            assert net(x).shape == (2, 3)
            _check_graph(net, x, g)


@pytest.mark.parametrize(
    ("genotype", "reason"),
    [
        # Step 1 reads only through "none" edges: no path from the cell input reaches it.
        (_with(normal=[["conv_3x3", 0], ["conv_3x3", 1], ["none", 0], ["none", 2]]), "cut off"),
        # Step 0 is neither concatenated nor read: its output reaches nothing.
        (_with(normal_concat=[3], normal=[["conv_3x3", 0], ["conv_3x3", 1]] * 2), "cut off"),
        (_with(reduce_concat=[3], reduce=[["conv_3x3", 0], ["none", 1]] * 2), "cut off"),
        (
            _with(
                normal=[["max_pool_3x3", 0], ["skip_connect", 1]] * 2,
                reduce=[["avg_pool_3x3", 0], ["skip_connect", 1]] * 2,
            ),
            "no trainable operation",
        ),
        (
            _with(
                normal=[["cse", 0], ["skip_connect", 1]] * 2,
                reduce=[["avg_pool_3x3", 0], ["skip_connect", 1]] * 2,
            ),
            "squeeze-excitation without a convolution",
        ),
        (
            _with(normal=[["cse", 0], ["cse", 1], ["conv_3x3", 0], ["skip_connect", 2]]),
            "more than one squeeze",
        ),
        (
            _with(reduce=[["conv_7x7", 0], ["conv_5x5", 1], ["conv_3x3", 0], ["skip_connect", 2]]),
            "5x5/7x7",
        ),
    ],
)
def test_filters_reject_crafted_genotypes(genotype, reason):
    assert reason in A.rejection_reason(genotype)


def test_parameter_filter():
    params = A.count_parameters(_BASE)
    net = A.build_network(_BASE, num_classes=10, in_channels=3, image_size=32)
    assert params == sum(p.numel() for p in net.parameters())
    assert A.rejection_reason(_BASE, max_params=params) is None
    assert "parameters, more than" in A.rejection_reason(_BASE, max_params=params - 1)


@pytest.mark.parametrize(
    ("genotype", "message"),
    [
        (_with(normal=[["conv_9x9", 0], ["conv_3x3", 1]] * 2), "unknown operation 'conv_9x9'"),
        (_with(normal=[["conv_3x3", 0], ["conv_3x3", 2]] * 2), "reads state 2"),
        (_with(normal=[["conv_3x3", 0]]), "two a step"),
        (_with(reduce_concat=[1, 3]), "reduce_concat"),
        (_with(cells=2), r"\['cells'\] must be an integer >= 3"),
        (_with(norm="ln"), "'norm'"),
        ({"normal": []}, "lacks the key"),
        ("conv", "must be a dict"),
    ],
)
def test_malformed_genotypes_raise(genotype, message):
    with pytest.raises(ValueError, match=message):
        A.rejection_reason(genotype)
    with pytest.raises(ValueError, match=message):
        A.build_network(genotype)


def test_bad_arguments():
    with pytest.raises(ValueError, match="split must be one of"):
        A.architectures("imagenet", 1)
    with pytest.raises(ValueError, match="split must be one of"):
        A.sample_architecture(0, "tests")
    with pytest.raises(ValueError, match="count must be a non-negative integer"):
        A.architectures("train", -1)
    with pytest.raises(ValueError, match="rng must be"):
        A.sample_architecture("seed")
    with pytest.raises(ValueError, match="cut off"):
        A.build_network(_with(normal=[["none", 0], ["none", 1]] + _BASE["normal"][2:]))
    with pytest.raises(ValueError, match="image_size must be a positive integer"):
        A.build_network(_BASE, image_size=0)
    assert A.architectures("train", 0) == []
