"""Drop-in modules built on the deepkern ops."""

from deepkern.nn.momentum import MomentumNet, NondeterministicResidualError
from deepkern.nn.rle import RealNVP, RLELoss

__all__ = ["MomentumNet", "NondeterministicResidualError", "RealNVP", "RLELoss"]
