"""The public ops, one module per kernel family."""

from deepkern.ops import graph as graph
from deepkern.ops import momentum as momentum
from deepkern.ops import sde as sde
from deepkern.ops import verify as verify

__all__ = ["graph", "momentum", "sde", "verify"]
