"""The layers a verifiable network is made of, beyond the ones ``torch.nn`` already has."""

from __future__ import annotations

from torch import Tensor, nn


class ElementwiseAffine(nn.Module):
    """``y = x * scale + shift``, with ``scale`` and ``shift`` broadcast against one sample
    (shape ``input_shape`` or broadcastable to it, e.g. ``[C, 1, 1]`` for batch norm)."""

    def __init__(self, scale: Tensor, shift: Tensor):
        super().__init__()
        self.register_buffer("scale", scale.detach().clone())
        self.register_buffer("shift", shift.detach().clone())

    def forward(self, x: Tensor) -> Tensor:
        return x * self.scale + self.shift


class Reshape(nn.Module):
    """Reshapes every sample to ``shape`` (the batch dimension stays in front)."""

    def __init__(self, shape: tuple[int, ...]):
        super().__init__()
        self.shape = tuple(int(s) for s in shape)

    def forward(self, x: Tensor) -> Tensor:
        return x.reshape(x.shape[0], *self.shape)

    def extra_repr(self) -> str:
        return f"shape={self.shape}"


__all__ = ["ElementwiseAffine", "Reshape"]
