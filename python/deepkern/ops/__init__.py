"""The public ops, one module per kernel family."""

from deepkern.ops import momentum as momentum

__all__ = ["momentum"]
