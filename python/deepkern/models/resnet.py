"""ResNets for small images: the plain networks that Momentum ResNets are built from.

The stem is the one used for 32x32 images (a 3x3 convolution, no max-pool), so the networks
also run on 8x8 inputs. Blocks use torchvision's attribute names (``conv1``, ``bn1``, ``relu``,
``conv2``, ``bn2``, ``conv3``, ``bn3``, ``downsample``), so that code which reads a block's
parts, such as :func:`deepkern.models.momentum_resnet.to_momentum`, works on torchvision's
ResNets too.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

__all__ = [
    "BasicBlock",
    "Bottleneck",
    "ResNet",
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "small_resnet",
]


def _conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)


def _conv1x1(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a skip connection: ``relu(x + bn2(conv2(relu(bn1(conv1(x))))))``.

    Args:
        in_channels: channels of the input.
        planes: channels of both convolutions and of the output.
        stride: stride of the first convolution.
        downsample: the skip path when the shape changes, or None for the identity.

    Shapes:
        forward(x: Tensor[N, in_channels, H, W]) -> Tensor[N, planes, H / stride, W / stride]
    """

    expansion = 1

    def __init__(
        self, in_channels: int, planes: int, stride: int = 1, downsample: nn.Module | None = None
    ):
        super().__init__()
        self.conv1 = _conv3x3(in_channels, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        skip = x if self.downsample is None else self.downsample(x)
        return self.relu(out + skip)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3, 1x1 expand (by 4), with a skip connection.

    Args:
        in_channels: channels of the input.
        planes: channels of the inner convolutions; the output has ``4 * planes``.
        stride: stride of the 3x3 convolution.
        downsample: the skip path when the shape changes, or None for the identity.

    Shapes:
        forward(x: Tensor[N, in_channels, H, W]) -> Tensor[N, 4 planes, H / stride, W / stride]
    """

    expansion = 4

    def __init__(
        self, in_channels: int, planes: int, stride: int = 1, downsample: nn.Module | None = None
    ):
        super().__init__()
        self.conv1 = _conv1x1(in_channels, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = _conv1x1(planes, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        skip = x if self.downsample is None else self.downsample(x)
        return self.relu(out + skip)


class ResNet(nn.Module):
    """A ResNet for small images: 3x3 stem, stages ``layer1 ... layerS``, average pool, linear.

    Stage ``i`` (from 0) has ``width * 2**i`` planes and, except the first, halves the spatial
    size in its first block. The first block of a stage gets a 1x1 convolution on its skip
    path when the shape changes; every other block has the identity as its skip path.

    Args:
        block: BasicBlock or Bottleneck.
        layers: blocks per stage, for example ``(2, 2, 2, 2)`` for ResNet-18.
        num_classes: outputs of the final linear layer.
        in_channels: channels of the input images (1 for grey digits, 3 for colour).
        width: planes of the first stage (64 in the published networks; smaller for CPU runs).
        zero_init_residual: start the last BatchNorm of every block at zero, so that each
            block starts as the identity.
        generator: the random source of the initial weights; None uses PyTorch's global one.

    Shapes:
        forward(x: Tensor[N, in_channels, H, W], floating point) -> Tensor[N, num_classes]

    Raises:
        ValueError: empty ``layers``, a stage without blocks, or a non-positive size.

    Example:
        >>> net = ResNet(BasicBlock, (2, 2, 2, 2), num_classes=10, in_channels=1, width=8)
        >>> net(torch.randn(4, 1, 8, 8)).shape
        torch.Size([4, 10])
    """

    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        layers: Sequence[int],
        num_classes: int = 10,
        in_channels: int = 3,
        width: int = 64,
        zero_init_residual: bool = False,
        generator: torch.Generator | None = None,
    ):
        super().__init__()
        if len(layers) == 0 or any(int(n) < 1 for n in layers):
            raise ValueError(f"layers must be a non-empty list of positive counts, got {layers}")
        for name, value in (("num_classes", num_classes), ("in_channels", in_channels)):
            if value < 1:
                raise ValueError(f"{name} must be positive, got {value}")
        if width < 1:
            raise ValueError(f"width must be positive, got {width}")

        self.num_stages = len(layers)
        self.conv1 = _conv3x3(in_channels, width)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        channels = width
        for i, count in enumerate(layers):
            stage, channels = self._make_stage(block, channels, width * 2**i, int(count), i)
            self.add_module(f"layer{i + 1}", stage)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)
        self._initialise(zero_init_residual, generator)

    @staticmethod
    def _make_stage(block, in_channels: int, planes: int, count: int, index: int):
        stride = 1 if index == 0 else 2
        out_channels = planes * block.expansion
        downsample = None
        if stride != 1 or in_channels != out_channels:
            downsample = nn.Sequential(
                _conv1x1(in_channels, out_channels, stride), nn.BatchNorm2d(out_channels)
            )
        blocks = [block(in_channels, planes, stride, downsample)]
        blocks += [block(out_channels, planes) for _ in range(count - 1)]
        return nn.Sequential(*blocks), out_channels

    @torch.no_grad()
    def _initialise(self, zero_init_residual: bool, generator: torch.Generator | None):
        # He initialisation for the convolutions, as in the published networks; the linear
        # layer keeps PyTorch's uniform rule, redrawn here so that one generator sets it all.
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(
                    module.weight, mode="fan_out", nonlinearity="relu", generator=generator
                )
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Linear):
                bound = 1.0 / module.in_features**0.5
                nn.init.uniform_(module.weight, -bound, bound, generator=generator)
                nn.init.uniform_(module.bias, -bound, bound, generator=generator)
        if zero_init_residual:
            for module in self.modules():
                if isinstance(module, Bottleneck):
                    nn.init.zeros_(module.bn3.weight)
                elif isinstance(module, BasicBlock):
                    nn.init.zeros_(module.bn2.weight)

    def stages(self) -> list[nn.Sequential]:
        """The stages ``layer1 ... layerS``, in order."""
        return [getattr(self, f"layer{i + 1}") for i in range(self.num_stages)]

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        for stage in self.stages():
            x = stage(x)
        return self.fc(torch.flatten(self.avgpool(x), 1))


def _make(block, layers, num_classes, in_channels, width, generator, **kwargs) -> ResNet:
    return ResNet(block, layers, num_classes, in_channels, width, generator=generator, **kwargs)


def resnet18(
    num_classes: int = 10,
    in_channels: int = 3,
    width: int = 64,
    generator: torch.Generator | None = None,
    **kwargs,
) -> ResNet:
    """ResNet-18 for small images: BasicBlock, stages of 2, 2, 2, 2 blocks.

    Args:
        num_classes, in_channels, width, generator, kwargs: as for :class:`ResNet`.

    Shapes:
        Tensor[N, in_channels, H, W] -> Tensor[N, num_classes]; H, W >= 1 (8 and 32 are usual).
    """
    return _make(BasicBlock, (2, 2, 2, 2), num_classes, in_channels, width, generator, **kwargs)


def resnet34(
    num_classes: int = 10,
    in_channels: int = 3,
    width: int = 64,
    generator: torch.Generator | None = None,
    **kwargs,
) -> ResNet:
    """ResNet-34 for small images: BasicBlock, stages of 3, 4, 6, 3 blocks.

    Args:
        num_classes, in_channels, width, generator, kwargs: as for :class:`ResNet`.

    Shapes:
        Tensor[N, in_channels, H, W] -> Tensor[N, num_classes]
    """
    return _make(BasicBlock, (3, 4, 6, 3), num_classes, in_channels, width, generator, **kwargs)


def resnet50(
    num_classes: int = 10,
    in_channels: int = 3,
    width: int = 64,
    generator: torch.Generator | None = None,
    **kwargs,
) -> ResNet:
    """ResNet-50 for small images: Bottleneck, stages of 3, 4, 6, 3 blocks.

    Args:
        num_classes, in_channels, width, generator, kwargs: as for :class:`ResNet`.

    Shapes:
        Tensor[N, in_channels, H, W] -> Tensor[N, num_classes]
    """
    return _make(Bottleneck, (3, 4, 6, 3), num_classes, in_channels, width, generator, **kwargs)


def resnet101(
    num_classes: int = 10,
    in_channels: int = 3,
    width: int = 64,
    generator: torch.Generator | None = None,
    **kwargs,
) -> ResNet:
    """ResNet-101 for small images: Bottleneck, stages of 3, 4, 23, 3 blocks.

    Args:
        num_classes, in_channels, width, generator, kwargs: as for :class:`ResNet`.

    Shapes:
        Tensor[N, in_channels, H, W] -> Tensor[N, num_classes]
    """
    return _make(Bottleneck, (3, 4, 23, 3), num_classes, in_channels, width, generator, **kwargs)


def small_resnet(
    depth: int,
    num_classes: int = 10,
    in_channels: int = 1,
    width: int = 16,
    generator: torch.Generator | None = None,
    **kwargs,
) -> ResNet:
    """A ResNet whose depth is one number: two stages of ``depth / 2`` BasicBlocks each.

    The first stage keeps the stem's size and width, so all its blocks have the identity as
    skip path; the second doubles the width and halves the size in its first block. This is
    the network the demo grows from 8 to 128 blocks.

    Args:
        depth (even int >= 2): residual blocks in all (each has two convolutions).
        num_classes, in_channels, width, generator, kwargs: as for :class:`ResNet`.

    Shapes:
        Tensor[N, in_channels, H, W] -> Tensor[N, num_classes]

    Raises:
        ValueError: depth odd or below 2.
    """
    if not isinstance(depth, int) or depth < 2 or depth % 2:
        raise ValueError(f"depth must be an even integer >= 2, got {depth!r}")
    layers = (depth // 2, depth // 2)
    return _make(BasicBlock, layers, num_classes, in_channels, width, generator, **kwargs)
