"""Fused operators with pure-PyTorch twins.

`fasttrain.ops.bn_relu` (the module) holds the fused BatchNorm+ReLU: the `bn_relu` function,
the `BatchNormReLU2d` module and the references. `HAS_EXT` / `HAS_CUDA_EXT` say whether the
compiled CPU / CUDA kernels are loaded; without them the ops fall back to PyTorch with one warning.
"""
from ._ext import HAS_CUDA_EXT, HAS_EXT
from .bn_relu import BatchNormReLU2d

__all__ = ["BatchNormReLU2d", "HAS_CUDA_EXT", "HAS_EXT"]
