"""Specifications: input regions and output conditions that describe counterexamples."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor


@dataclass
class Disjunct:
    """A conjunction of linear inequalities on the outputs: ``coefficients @ y <= bounds``,
    with ``coefficients [k, outputs]`` and ``bounds [k]`` (float64)."""

    coefficients: Tensor
    bounds: Tensor


@dataclass
class Region:
    """An input box (``lower`` and ``upper``, float64, shaped like one flattened input) and
    the output conditions, any one of which makes an input in the box a counterexample."""

    lower: Tensor
    upper: Tensor
    disjuncts: list[Disjunct] = field(default_factory=list)


@dataclass
class Specification:
    """Counterexamples are inputs in any region that meet any of that region's disjuncts."""

    regions: list[Region]
    inputs: int
    outputs: int
