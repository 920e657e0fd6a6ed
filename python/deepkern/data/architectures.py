"""DeepNets-1M-style architectures: a seeded generator of diverse networks and their builder.

A network is a stem, a stack of cells and a classification head. Every cell is a DARTS-like
cell: it reads the outputs of the two cells before it (states 0 and 1), and each of its
``steps`` nodes sums two operations applied to earlier states; the cell's output concatenates
some of its nodes along channels. Reduction cells, at a third and two thirds of the depth, halve
the spatial size (their operations on states 0 and 1 have stride 2) and double the channels.

A genotype is plain data (a dict of lists, strings, numbers and booleans, so ``json.dumps``
writes it) with these keys:

    normal, reduce      lists of [operation, state] pairs, two per step: step i reads states
                        0 .. i + 1 (0 and 1 are the cell inputs, 2 + j is step j's output)
    normal_concat, reduce_concat   the states the cell output concatenates
    cells               the number of cells
    channels            channels of the first cells (doubled at each reduction)
    channel_multiplier  the stem writes channels * channel_multiplier channels
    stem                "simple" (one convolution) or "imagenet" (two stride-2 convolutions)
    stem_kernel         kernel size of the stem's first convolution (3, 5 or 7)
    stem_pool           a 3x3 stride-2 max-pool after the simple stem
    preprocess          a 1x1 convolution on both cell inputs even when their shapes match
    norm                "bn" for batch norm after convolutions, None for none
    head                "glob_avg" (global average pooling) or "flatten" (a VGG-style head)
    fc_layers           linear layers in the head, the classifier included (1 or 2)
    fc_dim              width of the hidden linear layer

The sampling ranges follow the DeepNets-1M generator (Knyazev et al. 2021): 4 to 18 cells, 1 to
4 steps per cell (at most 2 in networks deeper than a threshold drawn from 7 to 10 cells), 32
channels, and filters that drop networks with more than 10^7 parameters (counted on 32x32 RGB
images with 10 classes), without a trainable operation, with a squeeze-excitation but no
convolution, with two squeeze-excitations or two large dense convolutions in one cell, or with a
node that no path from the cell inputs reaches. Out-of-distribution splits change one range:

    wide      the test architectures with 4 times the channels (128)
    deep      10 to 36 cells (steps at most 2 beyond 18 cells), up to 10^8 parameters
    dense     2 to 10 steps per cell (at most 6 beyond the depth threshold), up to 10^8
    bn_free   no batch norm anywhere

Split membership is a hash of the architecture (the genotype without its channel count): train
takes 8 of 10 hash buckets, val one, and every other split the last, so no architecture of an
evaluation split is a training architecture, whatever the seeds.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "PRIMITIVES",
    "SPLITS",
    "ChannelSE",
    "GeneratedNetwork",
    "PositionalEmbedding",
    "architectures",
    "build_network",
    "count_parameters",
    "membership",
    "rejection_reason",
    "sample_architecture",
    "validate_genotype",
]

SPLITS = ("train", "val", "test", "wide", "deep", "dense", "bn_free")

# The DARTS operations extended as in DeepNets-1M. "none" is the absent edge.
PRIMITIVES = (
    "none",
    "max_pool_3x3",
    "avg_pool_3x3",
    "skip_connect",
    "sep_conv_3x3",
    "sep_conv_5x5",
    "dil_conv_3x3",
    "dil_conv_5x5",
    "conv_1x1",
    "conv_7x1_1x7",
    "conv_3x3",
    "conv_5x5",
    "conv_7x7",
    "msa",
    "cse",
)
# Operations without parameters: the only ones a "pooling-only" reduction cell may use.
_PARAMETER_FREE = ("none", "max_pool_3x3", "avg_pool_3x3", "skip_connect")
_LARGE_DENSE_CONVS = ("conv_5x5", "conv_7x7")

# The generator's ranges, per split.
_MIN_CELLS, _MAX_CELLS = 4, 18
_DEEP_MIN_CELLS, _DEEP_MAX_CELLS = 10, 36
_DEPTH_THRESHOLDS = (7, 8, 9, 10)  # beyond this many cells a network counts as deep
_MIN_STEPS, _SHALLOW_MAX_STEPS, _DEEP_MAX_STEPS = 1, 4, 2
_DENSE_MIN_STEPS, _DENSE_SHALLOW_MAX_STEPS, _DENSE_DEEP_MAX_STEPS = 2, 10, 6
_CHANNELS, _WIDE_FACTOR, _FC_DIM = 32, 4, 256
_MAX_PARAMS, _LARGE_MAX_PARAMS = 10**7, 10**8

# Hash buckets of the split membership: train owns the first eight.
_BUCKETS = 10
_TRAIN_BUCKETS = range(8)
_VAL_BUCKET = 8
_EVAL_BUCKET = 9


def _max_params(split: str) -> int:
    return _LARGE_MAX_PARAMS if split in ("deep", "dense") else _MAX_PARAMS


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


def _sample_cell(
    rng: random.Random, steps: int, allow_none: bool, only_pool: bool
) -> list[list[Any]]:
    choices = [p for p in PRIMITIVES if allow_none or p != "none"]
    if only_pool:
        choices = [p for p in choices if p in _PARAMETER_FREE]
    cell = []
    for step in range(steps):
        for state in sorted(rng.sample(range(step + 2), 2)):
            cell.append([rng.choice(choices), state])
    return cell


def _sample_concat(rng: random.Random, cells: Sequence[list[list[Any]]], steps: int, drop: bool):
    # A node that no later node reads must reach the output, or its operations would hang
    # loose; a node that others read may be left out of the concatenation (with probability
    # one half when dropping is on), since its features reach the output through them.
    read = {state for cell in cells for op, state in cell if op != "none"}
    return [
        2 + step
        for step in range(steps)
        if not drop or (2 + step) not in read or step == steps - 1 or rng.random() < 0.5
    ]


def sample_architecture(rng: random.Random | int, split: str = "train") -> dict[str, Any]:
    """Draw one genotype from a split's distribution (before filters and membership).

    Args:
        rng: a ``random.Random`` (advanced in place) or an int seed.
        split: one of :data:`SPLITS`; it sets the ranges (see the module docstring).

    Returns:
        A genotype (a JSON-serialisable dict). It may still fail :func:`rejection_reason`
        or belong to another split's hash bucket; :func:`architectures` applies both.

    Raises:
        ValueError: an unknown split.

    Example:
        >>> genotype = sample_architecture(0, "train")
        >>> _MIN_CELLS <= genotype["cells"] <= _MAX_CELLS
        True
    """
    _check_split(split)
    if isinstance(rng, int) and not isinstance(rng, bool):
        rng = random.Random(rng)
    if not isinstance(rng, random.Random):
        raise ValueError(f"rng must be a random.Random or an int seed, got {type(rng).__name__}")

    min_cells, max_cells = (
        (_DEEP_MIN_CELLS, _DEEP_MAX_CELLS) if split == "deep" else (_MIN_CELLS, _MAX_CELLS)
    )
    cells = rng.randint(min_cells, max_cells)
    threshold = _DEEP_MIN_CELLS + 8 if split == "deep" else rng.choice(_DEPTH_THRESHOLDS)
    is_deep = cells > threshold
    if split == "dense":
        min_steps = _DENSE_MIN_STEPS
        max_steps = _DENSE_DEEP_MAX_STEPS if is_deep else _DENSE_SHALLOW_MAX_STEPS
    else:
        min_steps = _MIN_STEPS
        max_steps = _DEEP_MAX_STEPS if is_deep else _SHALLOW_MAX_STEPS
    steps = rng.randint(min_steps, max_steps)

    only_pool = rng.random() < 0.5  # reduction cells without parameters, as in the DARTS cell
    drop_concat = steps > 1 and rng.random() < 0.5
    normal = _sample_cell(rng, steps, allow_none=steps > 1, only_pool=False)
    reduce = _sample_cell(rng, steps, allow_none=steps > 1, only_pool=only_pool)
    normal_concat = _sample_concat(rng, [normal], steps, drop_concat)
    reduce_concat = _sample_concat(rng, [reduce], steps, drop_concat)

    has_msa = any(op == "msa" for op, _ in normal + reduce)
    multiplier = rng.choice((1, 2))
    # 1x1 convolutions on the cell inputs are needed when shapes differ; shallow single-step
    # networks sometimes go without them, transformer-like ones mostly do.
    preprocess = steps > 1 or multiplier > 1 or rng.random() < (0.2 if has_msa else 1.0)
    head = "glob_avg" if has_msa or is_deep or rng.random() < 0.9 else "flatten"
    if split == "bn_free":
        norm = None
    elif cells <= min_cells + 1 and steps <= (
        _DENSE_DEEP_MAX_STEPS if split == "dense" else _DEEP_MAX_STEPS
    ):
        # Only the smallest networks of a split may go without batch norm.
        norm = rng.choice(("bn", None))
    else:
        norm = "bn"
    stem = rng.choice(("simple", "imagenet"))
    stem_kernel = rng.choice((3, 5, 7))
    stem_pool = stem == "simple" and rng.random() < 0.5
    fc_layers = rng.choice((1, 2))

    return {
        "normal": normal,
        "normal_concat": normal_concat,
        "reduce": reduce,
        "reduce_concat": reduce_concat,
        "cells": cells,
        "channels": _CHANNELS * (_WIDE_FACTOR if split == "wide" else 1),
        "channel_multiplier": multiplier,
        "stem": stem,
        "stem_kernel": stem_kernel,
        "stem_pool": stem_pool,
        "preprocess": preprocess,
        "norm": norm,
        "head": head,
        "fc_layers": fc_layers,
        "fc_dim": _FC_DIM,
    }


def _fingerprint(genotype: dict[str, Any]) -> str:
    # The architecture without its width: a wide network is a test network made wider.
    shape = {key: value for key, value in genotype.items() if key != "channels"}
    return hashlib.sha256(json.dumps(shape, sort_keys=True).encode()).hexdigest()


def membership(genotype: dict[str, Any]) -> str:
    """The split family an architecture belongs to: "train", "val" or "eval".

    "eval" architectures make up test, wide, deep, dense and bn_free; none is ever a training
    or validation architecture.
    """
    bucket = int(_fingerprint(genotype), 16) % _BUCKETS
    if bucket in _TRAIN_BUCKETS:
        return "train"
    return "val" if bucket == _VAL_BUCKET else "eval"


def _split_family(split: str) -> str:
    return split if split in ("train", "val") else "eval"


def validate_genotype(genotype: dict[str, Any]) -> None:
    """Check that a genotype is well formed (keys, types, operation names, state indices).

    Raises:
        ValueError: naming the first key that is missing or malformed.
    """
    if not isinstance(genotype, dict):
        raise ValueError(f"genotype must be a dict, got {type(genotype).__name__}")
    required = ("normal", "normal_concat", "reduce", "reduce_concat", "cells", "channels")
    for key in required:
        if key not in genotype:
            raise ValueError(f"genotype lacks the key {key!r}")
    for kind in ("normal", "reduce"):
        cell = genotype[kind]
        if not isinstance(cell, list) or len(cell) == 0 or len(cell) % 2:
            raise ValueError(f"genotype[{kind!r}] must be a non-empty list of pairs, two a step")
        for index, pair in enumerate(cell):
            if not (isinstance(pair, (list, tuple)) and len(pair) == 2):
                raise ValueError(f"genotype[{kind!r}][{index}] must be [operation, state]")
            op, state = pair
            if op not in PRIMITIVES:
                raise ValueError(f"genotype[{kind!r}][{index}] has unknown operation {op!r}")
            if not isinstance(state, int) or not 0 <= state < index // 2 + 2:
                raise ValueError(
                    f"genotype[{kind!r}][{index}] reads state {state!r}; step {index // 2} "
                    f"may read states 0 .. {index // 2 + 1}"
                )
        concat = genotype[f"{kind}_concat"]
        states = range(2, len(cell) // 2 + 2)
        if not concat or any(not isinstance(s, int) or s not in states for s in concat):
            raise ValueError(
                f"genotype[{kind + '_concat'!r}] must list node states in {list(states)}, "
                f"got {concat!r}"
            )
    for key, low in (("cells", 3), ("channels", 1)):
        if not isinstance(genotype[key], int) or genotype[key] < low:
            raise ValueError(
                f"genotype[{key!r}] must be an integer >= {low}, got {genotype[key]!r}"
            )
    if genotype.get("stem", "simple") not in ("simple", "imagenet"):
        raise ValueError(
            f"genotype['stem'] must be 'simple' or 'imagenet', got {genotype['stem']!r}"
        )
    if genotype.get("head", "glob_avg") not in ("glob_avg", "flatten"):
        raise ValueError(
            f"genotype['head'] must be 'glob_avg' or 'flatten', got {genotype['head']!r}"
        )
    if genotype.get("norm", "bn") not in ("bn", None):
        raise ValueError(f"genotype['norm'] must be 'bn' or None, got {genotype['norm']!r}")
    if genotype.get("stem_kernel", 3) % 2 != 1:
        raise ValueError(f"genotype['stem_kernel'] must be odd, got {genotype['stem_kernel']!r}")
    if genotype.get("fc_layers", 1) not in (1, 2):
        raise ValueError(f"genotype['fc_layers'] must be 1 or 2, got {genotype['fc_layers']!r}")


def _dead_or_loose_nodes(cell: list[list[Any]], concat: Sequence[int]) -> list[int]:
    """Nodes that no path from the cell inputs reaches, and nodes whose output goes nowhere."""
    steps = len(cell) // 2
    live = [True, True]
    for step in range(steps):
        pairs = cell[2 * step : 2 * step + 2]
        live.append(any(op != "none" and live[state] for op, state in pairs))
    used = set(concat)
    for step in reversed(range(steps)):
        if 2 + step in used:
            used.update(state for op, state in cell[2 * step : 2 * step + 2] if op != "none")
    return [2 + s for s in range(steps) if not live[2 + s] or 2 + s not in used]


def rejection_reason(genotype: dict[str, Any], max_params: int | None = _MAX_PARAMS) -> str | None:
    """Why the generator drops a genotype, or None when it keeps it.

    The filters: a node that no path from the cell inputs reaches (a cell whose "none" edges
    cut it) or whose output reaches nothing; no trainable operation; a squeeze-excitation
    without a convolution in the network; two squeeze-excitations, or two 5x5/7x7 dense
    convolutions, in one cell; more than ``max_params`` parameters (on 32x32 RGB images, 10
    classes; None skips this count, the slow part).

    Raises:
        ValueError: a malformed genotype (see :func:`validate_genotype`).
    """
    validate_genotype(genotype)
    for kind in ("normal", "reduce"):
        broken = _dead_or_loose_nodes(genotype[kind], genotype[f"{kind}_concat"])
        if broken:
            return f"{kind} cell: nodes {broken} are cut off from the cell input or output"

    ops = [op for op, _ in genotype["normal"] + genotype["reduce"]]
    has_conv = any("conv" in op for op in ops)
    if not (has_conv or "msa" in ops or "cse" in ops):
        return "no trainable operation"
    if "cse" in ops and not has_conv:
        return "squeeze-excitation without a convolution"
    for kind in ("normal", "reduce"):
        kind_ops = [op for op, _ in genotype[kind]]
        if kind_ops.count("cse") > 1:
            return f"{kind} cell: more than one squeeze-excitation"
        if sum(op in _LARGE_DENSE_CONVS for op in kind_ops) > 1:
            return f"{kind} cell: more than one 5x5/7x7 dense convolution"

    if max_params is not None:
        params = count_parameters(genotype)
        if params > max_params:
            return f"{params} parameters, more than {max_params}"
    return None


def architectures(split: str, count: int, seed: int = 0) -> list[dict[str, Any]]:
    """``count`` valid genotypes of a split, the same for the same (split, seed).

    Genotypes are drawn with :func:`sample_architecture` from a generator seeded by the split
    and the seed, and kept when they belong to the split's hash bucket (:func:`membership`) and
    pass :func:`rejection_reason`. The wide split is the test split's architectures, made wider.

    Args:
        split: one of :data:`SPLITS`.
        count: how many genotypes (>= 0).
        seed: the generator's seed.

    Raises:
        ValueError: an unknown split or a negative count.

    Example:
        >>> nets = architectures("val", 2, seed=0)
        >>> [membership(g) for g in nets]
        ['val', 'val']
    """
    _check_split(split)
    if not isinstance(count, int) or count < 0:
        raise ValueError(f"count must be a non-negative integer, got {count!r}")
    if split == "wide":
        return [
            dict(g, channels=g["channels"] * _WIDE_FACTOR)
            for g in architectures("test", count, seed)
        ]

    rng = random.Random(f"deepnets:{split}:{seed}")
    family = _split_family(split)
    found: list[dict[str, Any]] = []
    while len(found) < count:
        genotype = sample_architecture(rng, split)
        if membership(genotype) != family:
            continue
        if rejection_reason(genotype, _max_params(split)) is None:
            found.append(genotype)
    return found


# --- Building a network from a genotype ------------------------------------------------------


class ChannelSE(nn.Module):
    """Squeeze-excitation: channels rescaled by a gate computed from their global averages.

    Shapes:
        forward(x: Tensor[N, C, H, W]) -> Tensor[N, C, H, W]
    """

    graph_node_type = "cse"

    def __init__(self, channels: int, reduction: int = 4):
        super().__init__()
        hidden = max(1, channels // reduction)
        self.squeeze = nn.Conv2d(channels, hidden, 1)
        self.excite = nn.Conv2d(hidden, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        pooled = x.mean(dim=(2, 3), keepdim=True)
        return x * torch.sigmoid(self.excite(torch.relu(self.squeeze(pooled))))


class PositionalEmbedding(nn.Module):
    """A learned embedding added to every token: ``x + weight``.

    Shapes:
        forward(x: Tensor[N, tokens, dim]) -> Tensor[N, tokens, dim]
    """

    graph_node_type = "pos_enc"

    def __init__(self, tokens: int, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1, tokens, dim))
        nn.init.normal_(self.weight, std=0.02)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.weight


class _SelfAttention(nn.Module):
    """A transformer layer on the pixels of a feature map: positional embedding, multi-head
    self-attention and an MLP, each with layer norm and a residual connection."""

    def __init__(self, channels: int, height: int, width: int):
        super().__init__()
        self.height, self.width = height, width
        heads = next(h for h in (4, 2, 1) if channels % h == 0)
        self.pos = PositionalEmbedding(height * width, channels)
        self.norm1 = nn.LayerNorm(channels)
        self.attn = nn.MultiheadAttention(channels, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(channels)
        self.mlp = nn.Sequential(
            nn.Linear(channels, 2 * channels), nn.GELU(), nn.Linear(2 * channels, channels)
        )

    def forward(self, x: Tensor) -> Tensor:
        tokens = self.pos(x.flatten(2).transpose(1, 2))
        h = self.norm1(tokens)
        tokens = tokens + self.attn(h, h, h, need_weights=False)[0]
        tokens = tokens + self.mlp(self.norm2(tokens))
        return tokens.transpose(1, 2).unflatten(2, (self.height, self.width))


def _norm(channels: int, norm: str | None) -> list[nn.Module]:
    return [nn.BatchNorm2d(channels)] if norm == "bn" else []


def _conv(c_in, c_out, kernel, stride=1, padding=0, dilation=1, groups=1, norm=None):
    return nn.Conv2d(c_in, c_out, kernel, stride, padding, dilation, groups, bias=norm is None)


def _operation(name: str, channels: int, stride: int, norm: str | None, size: int) -> nn.Module:
    """One DARTS operation on ``channels`` channels; ``size`` is the input's height/width."""
    c = channels
    if name == "max_pool_3x3":
        return nn.MaxPool2d(3, stride, 1)
    if name == "avg_pool_3x3":
        return nn.AvgPool2d(3, stride, 1, count_include_pad=False)
    if name == "skip_connect":
        if stride == 1:
            return nn.Identity()
        return nn.Sequential(nn.ReLU(), _conv(c, c, 1, stride, norm=norm), *_norm(c, norm))
    if name.startswith("sep_conv"):
        k = int(name[-1])
        # Two depthwise-pointwise pairs, as in DARTS; only the first one strides.
        return nn.Sequential(
            nn.ReLU(),
            _conv(c, c, k, stride, k // 2, groups=c, norm=norm),
            _conv(c, c, 1, norm=norm),
            *_norm(c, norm),
            nn.ReLU(),
            _conv(c, c, k, 1, k // 2, groups=c, norm=norm),
            _conv(c, c, 1, norm=norm),
            *_norm(c, norm),
        )
    if name.startswith("dil_conv"):
        k = int(name[-1])
        return nn.Sequential(
            nn.ReLU(),
            _conv(c, c, k, stride, k - 1, dilation=2, groups=c, norm=norm),
            _conv(c, c, 1, norm=norm),
            *_norm(c, norm),
        )
    if name == "conv_7x1_1x7":
        return nn.Sequential(
            nn.ReLU(),
            _conv(c, c, (1, 7), (1, stride), (0, 3), norm=norm),
            _conv(c, c, (7, 1), (stride, 1), (3, 0), norm=norm),
            *_norm(c, norm),
        )
    if name.startswith("conv_"):
        k = int(name[-1])
        return nn.Sequential(nn.ReLU(), _conv(c, c, k, stride, k // 2, norm=norm), *_norm(c, norm))
    # msa and cse keep the spatial size; a reduction edge pools first.
    pool = [nn.AvgPool2d(3, stride, 1, count_include_pad=False)] if stride > 1 else []
    size = _reduced(size) if stride > 1 else size
    if name == "msa":
        return nn.Sequential(*pool, _SelfAttention(c, size, size))
    if name == "cse":
        return nn.Sequential(*pool, ChannelSE(c))
    raise ValueError(f"unknown operation {name!r}")


def _reduced(size: int) -> int:
    # Every stride-2 layer here (3x3 padding 1, dilated with matching padding, 1x1) maps
    # size s to floor((s - 1) / 2) + 1.
    return (size - 1) // 2 + 1


class _Cell(nn.Module):
    def __init__(
        self,
        pairs: list[list[Any]],
        concat: Sequence[int],
        c_prev_prev: int,
        c_prev: int,
        channels: int,
        reduction: bool,
        prev_reduction: bool,
        preprocess: bool,
        norm: str | None,
        size: int,
    ):
        super().__init__()
        self.pairs = [(op, state) for op, state in pairs]
        self.concat = list(concat)
        self.pre0 = self._preprocess(
            c_prev_prev, channels, 2 if prev_reduction else 1, preprocess, norm
        )
        self.pre1 = self._preprocess(c_prev, channels, 1, preprocess, norm)
        self.ops = nn.ModuleList()
        for op, state in self.pairs:
            # In a reduction cell only the edges from the cell inputs stride; the nodes' outputs
            # already have the reduced size.
            stride = 2 if reduction and state < 2 else 1
            op_size = _reduced(size) if reduction and state >= 2 else size
            # An absent edge gets a placeholder so that indices line up; forward skips it.
            self.ops.append(
                nn.Identity() if op == "none" else _operation(op, channels, stride, norm, op_size)
            )
        self.reduction = reduction

    @staticmethod
    def _preprocess(c_in, c_out, stride, always, norm) -> nn.Module:
        if not always and c_in == c_out and stride == 1:
            return nn.Identity()
        return nn.Sequential(
            nn.ReLU(), _conv(c_in, c_out, 1, stride, norm=norm), *_norm(c_out, norm)
        )

    def forward(self, s0: Tensor, s1: Tensor) -> Tensor:
        states = [self.pre0(s0), self.pre1(s1)]
        for step in range(len(self.pairs) // 2):
            outputs = [
                self.ops[i](states[self.pairs[i][1]])
                for i in (2 * step, 2 * step + 1)
                if self.pairs[i][0] != "none"
            ]
            states.append(outputs[0] + outputs[1] if len(outputs) == 2 else outputs[0])
        if len(self.concat) == 1:
            return states[self.concat[0]]
        return torch.cat([states[i] for i in self.concat], dim=1)


class GeneratedNetwork(nn.Module):
    """A network realised from a genotype: stem, cells, head (see the module docstring).

    Shapes:
        forward(x: Tensor[N, in_channels, image_size, image_size]) -> Tensor[N, num_classes]
    """

    def __init__(
        self,
        genotype: dict[str, Any],
        num_classes: int,
        in_channels: int,
        image_size: int,
        channels: int,
    ):
        super().__init__()
        norm = genotype.get("norm", "bn")
        stem_channels = channels * genotype.get("channel_multiplier", 1)
        kernel = genotype.get("stem_kernel", 3)
        size = image_size
        if genotype.get("stem", "simple") == "imagenet":
            half = max(1, stem_channels // 2)
            self.stem = nn.Sequential(
                _conv(in_channels, half, kernel, 2, kernel // 2, norm=norm),
                *_norm(half, norm),
                nn.ReLU(),
                _conv(half, stem_channels, 3, 2, 1, norm=norm),
                *_norm(stem_channels, norm),
            )
            size = _reduced(_reduced(size))
        else:
            pool = [nn.MaxPool2d(3, 2, 1)] if genotype.get("stem_pool", False) else []
            self.stem = nn.Sequential(
                _conv(in_channels, stem_channels, kernel, 1, kernel // 2, norm=norm),
                *_norm(stem_channels, norm),
                *pool,
            )
            size = _reduced(size) if pool else size

        cells = genotype["cells"]
        reductions = {cells // 3, 2 * cells // 3}
        c_prev_prev, c_prev, c = stem_channels, stem_channels, channels
        prev_reduction = False
        self.cells = nn.ModuleList()
        for index in range(cells):
            reduction = index in reductions
            if reduction:
                c *= 2
            kind = "reduce" if reduction else "normal"
            cell = _Cell(
                genotype[kind],
                genotype[f"{kind}_concat"],
                c_prev_prev,
                c_prev,
                c,
                reduction,
                prev_reduction,
                genotype.get("preprocess", True),
                norm,
                size,
            )
            self.cells.append(cell)
            size = _reduced(size) if reduction else size
            c_prev_prev, c_prev = c_prev, c * len(genotype[f"{kind}_concat"])
            prev_reduction = reduction

        glob_avg = genotype.get("head", "glob_avg") == "glob_avg"
        features = c_prev if glob_avg else c_prev * size * size
        head: list[nn.Module] = [nn.ReLU()]
        head += [nn.AdaptiveAvgPool2d(1), nn.Flatten()] if glob_avg else [nn.Flatten()]
        if genotype.get("fc_layers", 1) == 2:
            hidden = genotype.get("fc_dim", _FC_DIM)
            head += [nn.Linear(features, hidden), nn.ReLU()]
            features = hidden
        head.append(nn.Linear(features, num_classes))
        self.head = nn.Sequential(*head)

    def forward(self, x: Tensor) -> Tensor:
        s0 = s1 = self.stem(x)
        for cell in self.cells:
            s0, s1 = s1, cell(s0, s1)
        return self.head(s1)


def build_network(
    genotype: dict[str, Any],
    num_classes: int = 10,
    in_channels: int = 1,
    image_size: int = 16,
    channels: int | None = None,
) -> GeneratedNetwork:
    """Realise a genotype as a network, with PyTorch's default initialisation.

    Args:
        genotype: from :func:`sample_architecture` or :func:`architectures`.
        num_classes: outputs of the classifier.
        in_channels: channels of the input images (1 for scikit-learn's grey digits).
        image_size: height and width of the input images (the digits are 8x8, often
            upsampled to 16 or 32); it sizes positional embeddings and a flattening head.
        channels: overrides ``genotype["channels"]`` (smaller networks for CPU runs).

    Returns:
        A :class:`GeneratedNetwork`; :func:`deepkern.data.compgraph.graph_of` reads it.

    Raises:
        ValueError: a malformed genotype or a non-positive size.

    Example:
        >>> net = build_network(architectures("train", 1)[0], 10, 1, 16, channels=8)
        >>> net(torch.randn(2, 1, 16, 16)).shape
        torch.Size([2, 10])
    """
    validate_genotype(genotype)
    for kind in ("normal", "reduce"):
        broken = _dead_or_loose_nodes(genotype[kind], genotype[f"{kind}_concat"])
        if broken:
            raise ValueError(
                f"genotype[{kind!r}]: nodes {broken} are cut off from the cell input or output"
            )
    width = genotype["channels"] if channels is None else channels
    for name, value in (
        ("num_classes", num_classes),
        ("in_channels", in_channels),
        ("image_size", image_size),
        ("channels", width),
    ):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return GeneratedNetwork(genotype, num_classes, in_channels, image_size, width)


def count_parameters(genotype: dict[str, Any]) -> int:
    """Parameters of the genotype's network on 32x32 RGB images with 10 classes (the size
    the DeepNets-1M filter uses); built on the meta device, so no memory is touched."""
    with torch.device("meta"):
        net = build_network(genotype, num_classes=10, in_channels=3, image_size=32)
    return sum(p.numel() for p in net.parameters())
