"""Data: datasets and the `build_loaders` interface every backend implements."""
from .datasets import DatasetError, build_digits, default_root, load_cifar10, write_cifar10
from .loader import (EpochSampler, Loaders, ShardSampler, build_loaders, build_val_loader,
                     sample_seed)

__all__ = ["DatasetError", "EpochSampler", "Loaders", "ShardSampler", "build_digits",
           "build_loaders", "build_val_loader", "default_root", "load_cifar10", "sample_seed",
           "write_cifar10"]
