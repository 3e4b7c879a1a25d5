"""ResNets as data: one `ResNet` class for ImageNet (v1.5) and one `CifarResNet` class.

Width rule (arXiv 2309.12854, DESIGN.md §2): the base width (64 for ImageNet, 16 for CIFAR) becomes
`b = round(base * width)` (round half up), then rounded up to a multiple of `channel_divisor`.
The stem has `b` channels, stage i has `b * 2**i` and a bottleneck's output is 4x its stage width:
every layer is thinned by the same factor and the network stays dense.

Module names follow torchvision (`conv1`, `bn1`, `layer1..4`, `fc`, `downsample.0/1`) so that at
width 1.0 a torchvision state dict loads with `strict=True`.

Channel specification: every layer's width can also be given explicitly as data, for networks
whose channel counts are not uniform (a structurally pruned ResNet, `fasttrain.compare.prune`):

    {"stem": 8,                                   # stem conv output
     "stages": [{"out": 8,                        # the stage's residual stream (block outputs)
                 "blocks": [[5], [3], [8]]},      # per block: inner conv outputs (BasicBlock: 1,
                ...]}                             #   Bottleneck: 2, conv1 then conv2)

`uniform_channels` writes the width rule in this form; the models build from it either way, so a
model without an explicit spec is exactly the uniform one (same modules, same state dict), and
`channels_of(model)` reads the spec back from a built (or pruned in place) model.
"""
from __future__ import annotations

import math
from typing import Any, Sequence, Type, Union

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
    if not (width > 0 and math.isfinite(width)):
        raise ValueError(f"width must be a finite number > 0, got {width}")
    if channel_divisor < 1:
        raise ValueError(f"channel_divisor must be >= 1, got {channel_divisor}")
    b = math.floor(base * width + 0.5)
    b = -(-b // channel_divisor) * channel_divisor
    if b < 1:
        raise ValueError(f"width {width} leaves no channel of base {base}")
    return b


ChannelSpec = dict
"""{"stem": int, "stages": [{"out": int, "blocks": [[int, ...], ...]}, ...]} (see module doc)."""


def uniform_channels(b: int, layers: Sequence[int], expansion: int) -> ChannelSpec:
    """The width rule as a channel spec: stem `b`, stage i `b * 2**i` inside each block and
    `b * 2**i * expansion` on its residual stream."""
    inner = 1 if expansion == 1 else 2
    return {"stem": b, "stages": [{"out": b * 2 ** i * expansion,
                                   "blocks": [[b * 2 ** i] * inner for _ in range(n)]}
                                  for i, n in enumerate(layers)]}


def check_channels(spec: object, layers: Sequence[int], expansion: int) -> ChannelSpec:
    """Validate a channel spec against a depth (`layers`, blocks per stage) and block type.

    Returns:
        A normalised copy (plain dicts, lists and ints; JSON/YAML-able).

    Raises:
        ValueError: the first problem, naming its place in the spec (e.g. `stages[1].blocks[0]`).
    """
    inner = 1 if expansion == 1 else 2

    def count(value: object, where: str) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"channels: {where} must be a positive integer, got {value!r}")
        return value

    if not isinstance(spec, dict) or set(spec) != {"stem", "stages"}:
        raise ValueError(f"channels must be a mapping with keys 'stem' and 'stages', got {spec!r}")
    stages = spec["stages"]
    _check_list(stages, len(layers), "stages", "stages")
    out = {"stem": count(spec["stem"], "stem"), "stages": []}
    for i, (stage, n) in enumerate(zip(stages, layers)):
        if not isinstance(stage, dict) or set(stage) != {"out", "blocks"}:
            raise ValueError(f"channels: stages[{i}] must be a mapping with keys 'out' and "
                             f"'blocks', got {stage!r}")
        blocks = stage["blocks"]
        _check_list(blocks, n, f"stages[{i}].blocks", "blocks (a list of channel counts each)")
        checked = []
        for j, widths in enumerate(blocks):
            where = f"stages[{i}].blocks[{j}]"
            if not isinstance(widths, list) or len(widths) != inner:
                raise ValueError(f"channels: {where} must be a list of {inner} channel count"
                                 f"{'s' if inner > 1 else ''}, got {widths!r}")
            checked.append([count(w, where) for w in widths])
        out["stages"].append({"out": count(stage["out"], f"stages[{i}].out"), "blocks": checked})
    return out


def _check_list(value: object, n: int, where: str, what: str) -> None:
    """`value` is a list of `n` items; the error says which of the two it is not ("must list 3
    blocks, got 3" read as a contradiction when the 3 was an integer, not a list)."""
    if not isinstance(value, list):
        raise ValueError(f"channels: {where} must be a list of {n} {what}, got "
                         f"{type(value).__name__} {value!r}")
    if len(value) != n:
        raise ValueError(f"channels: {where} must list {n} {what}, got {len(value)}: {value!r}")


def channels_of(model: nn.Module) -> ChannelSpec:
    """The channel spec of a built `ResNet` or `CifarResNet`, read from its layers (so a network
    pruned in place by another tool is described as data)."""
    stages = []
    i = 1
    while hasattr(model, f"layer{i}"):
        blocks = list(model.get_submodule(f"layer{i}"))
        widths = [[b.conv1.out_channels] + ([b.conv2.out_channels]
                                            if isinstance(b, Bottleneck) else [])
                  for b in blocks]
        stages.append({"out": blocks[-1].last_norm().num_features, "blocks": widths})
        i += 1
    return {"stem": model.conv1.out_channels, "stages": stages}


def conv3x3(in_ch: int, out_ch: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)


def conv1x1(in_ch: int, out_ch: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convs (`in_ch` → `widths[0]` → `out_ch`); `bn2` is the block's last norm
    (zero-init target)."""

    expansion = 1

    def __init__(self, in_ch: int, widths: Sequence[int], out_ch: int, stride: int,
                 downsample: nn.Module | None, norm_layer: NormLayer, norm_act_layer: NormLayer,
                 drop_path: float = 0.0) -> None:
        super().__init__()
        (mid,) = widths
        self.conv1 = conv3x3(in_ch, mid, stride)
        self.bn1 = norm_act_layer(mid)
        self.conv2 = conv3x3(mid, out_ch)
        self.bn2 = norm_layer(out_ch)
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
    """1x1 → 3x3 (strided, v1.5) → 1x1 (`in_ch` → `widths[0]` → `widths[1]` → `out_ch`; the
    uniform rule has 4x expansion); `bn3` is the last norm."""

    expansion = 4

    def __init__(self, in_ch: int, widths: Sequence[int], out_ch: int, stride: int,
                 downsample: nn.Module | None, norm_layer: NormLayer, norm_act_layer: NormLayer,
                 drop_path: float = 0.0) -> None:
        super().__init__()
        mid1, mid2 = widths
        self.conv1 = conv1x1(in_ch, mid1)
        self.bn1 = norm_act_layer(mid1)
        self.conv2 = conv3x3(mid1, mid2, stride)
        self.bn2 = norm_act_layer(mid2)
        self.conv3 = conv1x1(mid2, out_ch)
        self.bn3 = norm_layer(out_ch)
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


def check_model_args(width: Any, channel_divisor: Any, num_classes: Any, in_chans: Any,
                     drop_path_rate: Any, zero_init_residual: Any = True,
                     blurpool: Any = False) -> None:
    """The constructor arguments both ResNet classes share, checked where a caller (a hub user,
    `create_model`) can pass anything: a ValueError naming the argument and the value, instead
    of a TypeError or a negative tensor size from deep inside torch, or a silent no-op."""
    def number(name: str, value: Any) -> None:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{name} must be a number, got {value!r}")

    def integer(name: str, value: Any) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")

    def flag(name: str, value: Any) -> None:  # "no" is true to Python: it did the opposite
        if not isinstance(value, bool):
            raise ValueError(f"{name} must be True or False, got {value!r}")

    number("width", width)
    integer("channel_divisor", channel_divisor)
    flag("zero_init_residual", zero_init_residual)
    flag("blurpool", blurpool)
    integer("num_classes", num_classes)
    integer("in_chans", in_chans)
    number("drop_path_rate", drop_path_rate)
    if not 0 <= drop_path_rate < 1:  # 1 drops every block; above, bernoulli fails at forward
        raise ValueError(f"drop_path_rate must be in [0, 1), got {drop_path_rate!r}")


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
        channels: explicit channel spec (module doc; e.g. a pruned network's); None = the width
            rule from `width` and `channel_divisor`, which are then not used for the layers.

    Raises:
        ValueError: a bad width or channel spec.
    """

    def __init__(self, block: Block, layers: Sequence[int], width: float = 1.0,
                 channel_divisor: int = 1, num_classes: int = 1000,
                 zero_init_residual: bool = True, norm_layer: NormLayer = nn.BatchNorm2d,
                 norm_act_layer: NormLayer = BatchNormReLU2d, in_chans: int = 3,
                 drop_path_rate: float = 0.0, blurpool: bool = False,
                 channels: ChannelSpec | None = None) -> None:
        super().__init__()
        check_model_args(width, channel_divisor, num_classes, in_chans, drop_path_rate,
                         zero_init_residual, blurpool)
        if channels is None:
            channels = uniform_channels(base_channels(64, width, channel_divisor), layers,
                                        block.expansion)
        spec = check_channels(channels, layers, block.expansion)
        self.width, self.channel_divisor = width, channel_divisor
        b = spec["stem"]
        self.conv1 = nn.Conv2d(in_chans, b, 7, stride=2, padding=3, bias=False)
        self.bn1 = norm_act_layer(b)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        in_ch = b
        rates = iter(drop_path_rates(drop_path_rate, sum(layers)))
        for i, stage in enumerate(spec["stages"]):
            out, stride = stage["out"], 1 if i == 0 else 2
            blocks = []
            for j, widths in enumerate(stage["blocks"]):
                s = stride if j == 0 else 1
                downsample = None
                # A bottleneck stage always opens with a projection (as in the uniform network,
                # whatever a pruned spec's counts), so specs map one-to-one onto state dicts.
                if j == 0 and (s != 1 or in_ch != out or block.expansion != 1):
                    downsample = nn.Sequential(conv1x1(in_ch, out, s), norm_layer(out))
                elif in_ch != out:
                    raise ValueError(f"channels: stages[{i}].blocks[{j}] has an identity "
                                     f"shortcut, so its input ({in_ch}) and the stage's out "
                                     f"({out}) must be equal")
                blocks.append(block(in_ch, widths, out, s, downsample, norm_layer,
                                    norm_act_layer, next(rates)))
                in_ch = out
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
        self.avgpool = GlobalAvgPool2d()
        self.num_features = in_ch
        self.fc = nn.Linear(in_ch, num_classes)
        _init_weights(self, zero_init_residual)
        if blurpool:
            apply_blurpool(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class GlobalAvgPool2d(nn.AdaptiveAvgPool2d):
    """The classifier's global average pooling: `AdaptiveAvgPool2d(1)` (logits bit-identical
    to torchvision's ResNets), except on CUDA under `torch.use_deterministic_algorithms`,
    where torch has no deterministic backward for adaptive pooling and raises at the first
    backward pass: there the mean over H and W, the same average, whose backward is a
    broadcast."""

    def __init__(self) -> None:
        super().__init__(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (scripted or traced with torch.fx for an export: inference, never differentiated)
        if not torch.jit.is_scripting():
            if not _fx_symbolic_tracing() and _deterministic_cuda(x):
                return x.mean((2, 3), keepdim=True)
        return F.adaptive_avg_pool2d(x, 1)


def _deterministic_cuda(x: torch.Tensor) -> bool:
    return x.is_cuda and torch.are_deterministic_algorithms_enabled()


# torch.fx.symbolic_trace (BatchNorm folding) cannot branch on a proxy's device. torch 2.14
# has a test for symbolic tracing alone; its is_fx_tracing, the older name, also answers true
# under torch.export (and warns about it there).
_fx_symbolic_tracing = getattr(torch.fx._symbolic_trace, "is_fx_symbolic_tracing",
                               torch.fx._symbolic_trace.is_fx_tracing)


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
        channels: explicit channel spec (module doc); with shortcut "A" each stage's out must be
            >= its input (the shortcut zero-pads channels).
        Others as in `ResNet`; the base width is 16.
    """

    def __init__(self, depth: int, width: float = 1.0, channel_divisor: int = 1,
                 num_classes: int = 10, shortcut: str = "A", zero_init_residual: bool = True,
                 norm_layer: NormLayer = nn.BatchNorm2d,
                 norm_act_layer: NormLayer = BatchNormReLU2d, in_chans: int = 3,
                 drop_path_rate: float = 0.0, blurpool: bool = False,
                 channels: ChannelSpec | None = None) -> None:
        super().__init__()
        check_model_args(width, channel_divisor, num_classes, in_chans, drop_path_rate,
                         zero_init_residual, blurpool)
        if (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        if shortcut not in ("A", "B"):
            raise ValueError(f"shortcut must be 'A' or 'B', got {shortcut!r}")
        n = (depth - 2) // 6
        if channels is None:
            channels = uniform_channels(base_channels(16, width, channel_divisor), [n] * 3, 1)
        spec = check_channels(channels, [n] * 3, 1)
        self.width, self.channel_divisor = width, channel_divisor
        b = spec["stem"]
        self.conv1 = conv3x3(in_chans, b)
        self.bn1 = norm_act_layer(b)
        in_ch = b
        rates = iter(drop_path_rates(drop_path_rate, 3 * n))
        for i, stage in enumerate(spec["stages"]):
            planes, stride = stage["out"], 1 if i == 0 else 2
            blocks = []
            for j, widths in enumerate(stage["blocks"]):
                s = stride if j == 0 else 1
                downsample = None
                if s != 1 or in_ch != planes:
                    if j > 0:
                        raise ValueError(f"channels: stages[{i}].blocks[{j}] has an identity "
                                         f"shortcut, so its input ({in_ch}) and the stage's out "
                                         f"({planes}) must be equal")
                    if shortcut == "A" and planes < in_ch:
                        raise ValueError(f"channels: stages[{i}].out ({planes}) must be >= its "
                                         f"input ({in_ch}): shortcut A zero-pads channels")
                    downsample = (ShortcutA(in_ch, planes, s) if shortcut == "A" else
                                  nn.Sequential(conv1x1(in_ch, planes, s), norm_layer(planes)))
                blocks.append(BasicBlock(in_ch, widths, planes, s, downsample, norm_layer,
                                         norm_act_layer, next(rates)))
                in_ch = planes
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
        self.avgpool = GlobalAvgPool2d()
        self.num_features = in_ch
        self.fc = nn.Linear(in_ch, num_classes)
        _init_weights(self, zero_init_residual)
        if blurpool:
            apply_blurpool(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn1(self.conv1(x))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))
