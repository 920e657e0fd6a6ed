"""Drop-in modules built on the deepkern ops."""

from deepkern.nn.momentum import MomentumNet, NondeterministicResidualError

__all__ = ["MomentumNet", "NondeterministicResidualError"]
