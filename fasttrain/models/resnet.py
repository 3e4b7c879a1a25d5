"""ResNets as data: one `ResNet` class for ImageNet (v1.5) and one `CifarResNet` class.

Width rule (arXiv 2309.12854, DESIGN.md §2): the base width (64 for ImageNet, 16 for CIFAR) becomes
`b = round(base * width)` (round half up), then rounded up to a multiple of `channel_divisor`.
The stem has `b` channels, stage i has `b * 2**i` and a bottleneck's output is 4x its stage width:
every layer is thinned by the same factor and the network stays dense.

Module names follow torchvision (`conv1`, `bn1`, `layer1..4`, `fc`, `downsample.0/1`) so that at
width 1.0 a torchvision state dict loads with `strict=True`.
"""
from __future__ import annotations

import math
from typing import Sequence, Type, Union

import torch
import torch.nn.functional as F
from torch import nn

from .layers import BatchNormReLU2d, NormLayer
from .regularize import DropPath, apply_blurpool


def base_channels(base: int, width: float, channel_divisor: int = 1) -> int:
    """Channels of the stem for `base * width`, rounded half up, then up to `channel_divisor`.

    Raises:
        ValueError: width or divisor is not positive, or the result has no channel.
    """
    if not width > 0:
        raise ValueError(f"width must be > 0, got {width}")
    if channel_divisor < 1:
        raise ValueError(f"channel_divisor must be >= 1, got {channel_divisor}")
    b = math.floor(base * width + 0.5)
    b = -(-b // channel_divisor) * channel_divisor
    if b < 1:
        raise ValueError(f"width {width} leaves no channel of base {base}")
    return b


def conv3x3(in_ch: int, out_ch: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)


def conv1x1(in_ch: int, out_ch: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convs; `bn2` is the block's last norm (zero-init target)."""

    expansion = 1

    def __init__(self, in_ch: int, planes: int, stride: int, downsample: nn.Module | None,
                 norm_layer: NormLayer, norm_act_layer: NormLayer, drop_path: float = 0.0
                 ) -> None:
        super().__init__()
        self.conv1 = conv3x3(in_ch, planes, stride)
        self.bn1 = norm_act_layer(planes)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = norm_layer(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def last_norm(self) -> nn.Module:
        return self.bn2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.bn1(self.conv1(x))
        out = self.bn2(self.conv2(out))
        return self.relu(self.drop_path(out) + identity)


class Bottleneck(nn.Module):
    """1x1 → 3x3 (strided, v1.5) → 1x1 with 4x expansion; `bn3` is the last norm."""

    expansion = 4

    def __init__(self, in_ch: int, planes: int, stride: int, downsample: nn.Module | None,
                 norm_layer: NormLayer, norm_act_layer: NormLayer, drop_path: float = 0.0
                 ) -> None:
        super().__init__()
        self.conv1 = conv1x1(in_ch, planes)
        self.bn1 = norm_act_layer(planes)
        self.conv2 = conv3x3(planes, planes, stride)
        self.bn2 = norm_act_layer(planes)
        self.conv3 = conv1x1(planes, planes * self.expansion)
        self.bn3 = norm_layer(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def last_norm(self) -> nn.Module:
        return self.bn3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.bn1(self.conv1(x))
        out = self.bn2(self.conv2(out))
        out = self.bn3(self.conv3(out))
        return self.relu(self.drop_path(out) + identity)


Block = Union[Type[BasicBlock], Type[Bottleneck]]


def drop_path_rates(rate: float, blocks: int) -> list[float]:
    """Per-block stochastic-depth rates rising linearly from 0 to `rate` (timm's rule)."""
    return [rate * i / max(1, blocks - 1) for i in range(blocks)]


def _init_weights(model: nn.Module, zero_init_residual: bool) -> None:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    if zero_init_residual:
        # Each residual block then starts as the identity (Goyal et al. 2017).
        for m in model.modules():
            if isinstance(m, (BasicBlock, Bottleneck)):
                nn.init.zeros_(m.last_norm().weight)


class ResNet(nn.Module):
    """ImageNet ResNet v1.5: 7x7/2 stem + maxpool, four stages, global pool, fc.

    Args:
        block: BasicBlock (ResNet-18/34) or Bottleneck (50/101/152).
        layers: blocks per stage.
        width: uniform width multiplier (1.0 = torchvision's network).
        channel_divisor: round the base width up to a multiple of this (1 = exact thinning).
        num_classes: classifier outputs.
        zero_init_residual: zero the last norm's weight of every block.
        norm_layer / norm_act_layer: factories `channels -> module` for a norm, and a norm
            followed by ReLU.
        in_chans: input channels.
        drop_path_rate: stochastic depth of the last block (linear from 0 over the blocks).
        blurpool: blur before every strided conv with >= 16 input channels.
    """

    def __init__(self, block: Block, layers: Sequence[int], width: float = 1.0,
                 channel_divisor: int = 1, num_classes: int = 1000,
                 zero_init_residual: bool = True, norm_layer: NormLayer = nn.BatchNorm2d,
                 norm_act_layer: NormLayer = BatchNormReLU2d, in_chans: int = 3,
                 drop_path_rate: float = 0.0, blurpool: bool = False) -> None:
        super().__init__()
        b = base_channels(64, width, channel_divisor)
        self.width, self.channel_divisor = width, channel_divisor
        self.conv1 = nn.Conv2d(in_chans, b, 7, stride=2, padding=3, bias=False)
        self.bn1 = norm_act_layer(b)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        in_ch = b
        rates = iter(drop_path_rates(drop_path_rate, sum(layers)))
        for i, n in enumerate(layers):
            planes = b * 2 ** i
            stride = 1 if i == 0 else 2
            downsample = None
            if stride != 1 or in_ch != planes * block.expansion:
                downsample = nn.Sequential(conv1x1(in_ch, planes * block.expansion, stride),
                                           norm_layer(planes * block.expansion))
            blocks = [block(in_ch, planes, stride, downsample, norm_layer, norm_act_layer,
                            next(rates))]
            in_ch = planes * block.expansion
            blocks += [block(in_ch, planes, 1, None, norm_layer, norm_act_layer, next(rates))
                       for _ in range(1, n)]
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.num_features = in_ch
        self.fc = nn.Linear(in_ch, num_classes)
        _init_weights(self, zero_init_residual)
        if blurpool:
            apply_blurpool(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class ShortcutA(nn.Module):
    """Parameter-free "option A" shortcut (He et al. 2016, CIFAR): subsample, zero-pad channels."""

    def __init__(self, in_ch: int, out_ch: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        self.pad_front = (out_ch - in_ch) // 2
        self.pad_back = out_ch - in_ch - self.pad_front

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, ::self.stride, ::self.stride]
        return F.pad(x, (0, 0, 0, 0, self.pad_front, self.pad_back))


class CifarResNet(nn.Module):
    """CIFAR ResNet-(6n+2): 3x3 stem, three stages of BasicBlocks at b, 2b, 4b channels.

    Args:
        depth: 20, 32, 44, 56, 110, ... (6n+2).
        shortcut: "A" (parameter-free, as the pruning literature uses) or "B" (1x1 conv + norm).
        Others as in `ResNet`; the base width is 16.
    """

    def __init__(self, depth: int, width: float = 1.0, channel_divisor: int = 1,
                 num_classes: int = 10, shortcut: str = "A", zero_init_residual: bool = True,
                 norm_layer: NormLayer = nn.BatchNorm2d,
                 norm_act_layer: NormLayer = BatchNormReLU2d, in_chans: int = 3,
                 drop_path_rate: float = 0.0, blurpool: bool = False) -> None:
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        if shortcut not in ("A", "B"):
            raise ValueError(f"shortcut must be 'A' or 'B', got {shortcut!r}")
        n = (depth - 2) // 6
        b = base_channels(16, width, channel_divisor)
        self.width, self.channel_divisor = width, channel_divisor
        self.conv1 = conv3x3(in_chans, b)
        self.bn1 = norm_act_layer(b)
        in_ch = b
        rates = iter(drop_path_rates(drop_path_rate, 3 * n))
        for i in range(3):
            planes, stride = b * 2 ** i, 1 if i == 0 else 2
            blocks = []
            for j in range(n):
                s = stride if j == 0 else 1
                downsample = None
                if s != 1 or in_ch != planes:
                    downsample = (ShortcutA(in_ch, planes, s) if shortcut == "A" else
                                  nn.Sequential(conv1x1(in_ch, planes, s), norm_layer(planes)))
                blocks.append(BasicBlock(in_ch, planes, s, downsample, norm_layer,
                                         norm_act_layer, next(rates)))
                in_ch = planes
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.num_features = in_ch
        self.fc = nn.Linear(in_ch, num_classes)
        _init_weights(self, zero_init_residual)
        if blurpool:
            apply_blurpool(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn1(self.conv1(x))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))
