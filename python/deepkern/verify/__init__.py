"""Verification of neural networks against input-output specifications.

A network to verify is a ``torch.nn.Sequential`` whose children are, in any order:
``nn.Linear``, ``nn.Conv2d``, ``nn.Flatten``, :class:`Reshape`, :class:`ElementwiseAffine`
(input normalisation and batch norm that could not be folded), ``nn.ReLU``, ``nn.Sigmoid`` and
``nn.Tanh``. The network takes a batch ``[B, *input_shape]`` and returns ``[B, outputs]``.

A specification (see :mod:`deepkern.verify.spec`) describes the counterexamples: it is
satisfiable (``sat``) when some input in one of its regions makes the outputs meet one of the
region's disjuncts, each a conjunction of linear inequalities ``C y <= d``; it is ``unsat``
(the property holds) when no such input exists.
"""

from deepkern.verify.network import ElementwiseAffine, Reshape
from deepkern.verify.spec import Disjunct, Region, Specification

__all__ = ["Disjunct", "ElementwiseAffine", "Region", "Reshape", "Specification"]
