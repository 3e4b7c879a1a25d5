"""ThinResNet models: uniformly thinned ImageNet and CIFAR ResNets."""
from __future__ import annotations

from .layers import NORM_ACT_LAYERS, BatchNormReLU2d, SyncBatchNormReLU2d, convert_sync_batchnorm
from .registry import create_model, list_models, register_model
from .resnet import BasicBlock, Bottleneck, CifarResNet, ResNet, base_channels


@register_model
def thin_resnet18(**kw) -> ResNet:
    return ResNet(BasicBlock, [2, 2, 2, 2], **kw)


@register_model
def thin_resnet34(**kw) -> ResNet:
    return ResNet(BasicBlock, [3, 4, 6, 3], **kw)


@register_model
def thin_resnet50(**kw) -> ResNet:
    return ResNet(Bottleneck, [3, 4, 6, 3], **kw)


@register_model
def thin_resnet101(**kw) -> ResNet:
    return ResNet(Bottleneck, [3, 4, 23, 3], **kw)


@register_model
def thin_resnet152(**kw) -> ResNet:
    return ResNet(Bottleneck, [3, 8, 36, 3], **kw)


@register_model
def cifar_resnet20(**kw) -> CifarResNet:
    return CifarResNet(20, **kw)


@register_model
def cifar_resnet32(**kw) -> CifarResNet:
    return CifarResNet(32, **kw)


@register_model
def cifar_resnet44(**kw) -> CifarResNet:
    return CifarResNet(44, **kw)


@register_model
def cifar_resnet56(**kw) -> CifarResNet:
    return CifarResNet(56, **kw)


@register_model
def cifar_resnet110(**kw) -> CifarResNet:
    return CifarResNet(110, **kw)


__all__ = ["BasicBlock", "BatchNormReLU2d", "Bottleneck", "CifarResNet", "NORM_ACT_LAYERS",
           "ResNet", "SyncBatchNormReLU2d", "base_channels", "convert_sync_batchnorm",
           "create_model", "list_models", "register_model"]
