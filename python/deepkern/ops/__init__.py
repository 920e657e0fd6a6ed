"""The public ops, one module per kernel family."""

from deepkern.ops import momentum as momentum
from deepkern.ops import sde as sde

__all__ = ["momentum", "sde"]
