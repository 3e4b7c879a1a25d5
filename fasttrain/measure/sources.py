"""What a benchmark measures: registered models, fasttrain checkpoints, exported files, or any
`package.module:factory` returning an `nn.Module` (so a network pruned by another tool is measured
the same way as a ThinResNet).
"""
from __future__ import annotations

import importlib
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import UserError


class SourceError(UserError, ValueError):
    """The model to benchmark cannot be found or built."""


@dataclass
class BenchModel:
    """One network to measure.

    Attributes:
        name: model name (registry name, the factory spec, or the exported file's model).
        width: width multiplier, None when unknown (factories).
        source: "registry", or the checkpoint / file path, or the factory spec.
        model: the module to run (eval mode).
        resolution: its natural input size (used when the benchmark does not set one).
        num_classes: classifier outputs (labels of the training-throughput batch); None = unknown.
        norm_act: the norm+ReLU implementation, None when not a fasttrain model.
        count_model: the module fvcore counts (the model itself, or, for TorchScript files that
            fvcore cannot hook, the architecture rebuilt from the file's metadata); None = skip.
        compiled: True for TorchScript / torch.export files: only eager and cudagraphs modes.
    """

    name: str
    width: float | None
    source: str
    model: nn.Module
    resolution: int
    num_classes: int | None
    norm_act: str | None
    count_model: nn.Module | None
    compiled: bool = False


def from_registry(name: str, widths: list[float], *, channel_divisor: int = 1,
                  num_classes: int | None = None, norm_act: str = "native"
                  ) -> list[BenchModel]:
    """One BenchModel per width of the registered model `name` (random weights)."""
    from ..export import model_from_name

    out = []
    for w in widths:
        model, meta = model_from_name(name, w, channel_divisor=channel_divisor,
                                      num_classes=num_classes, norm_act=norm_act)
        out.append(BenchModel(name, w, "registry", model, meta["input_size"][1],
                              meta["num_classes"], norm_act, model))
    return out


def from_checkpoint(path: str | Path, norm_act: str | None = None) -> BenchModel:
    """The trained model of a fasttrain checkpoint (`fasttrain.export.model_from_checkpoint`)."""
    from ..export import model_from_checkpoint

    model, meta = model_from_checkpoint(path, norm_act=norm_act)
    name, width = _identity(meta)
    return BenchModel(name, width, str(path), model, meta["input_size"][1],
                      meta["num_classes"], meta["norm_act"], model)


def _identity(meta: dict) -> tuple[str, float | None]:
    """Row name and width of a fasttrain model: a network with an explicit channel spec (a
    pruned one) is not at any uniform width, so it is named `<model> (pruned)`, width None."""
    if (meta.get("model_config") or {}).get("channels"):
        return f"{meta['model']} (pruned)", None
    return meta["model"], meta.get("width")


def from_file(path: str | Path) -> BenchModel:
    """An exported TorchScript (.pt) or torch.export (.pt2) file; metadata names the model."""
    from ..export import load_exported, model_from_metadata

    if Path(path).suffix.lower() == ".onnx":
        raise SourceError(f"{path}: ONNX files run in onnxruntime, not torch; benchmark the "
                          f"TorchScript or torch.export file instead")
    module, meta = load_exported(path)
    count_model = None
    if meta.get("model"):
        try:
            count_model = model_from_metadata(meta)
        except (KeyError, ValueError):
            count_model = None
    elif not isinstance(module, torch.jit.ScriptModule):  # torch.export's GraphModule: fvcore
        count_model = module                                # traces it; ScriptModules refuse hooks
    resolution = meta.get("input_size", [3, 224, 224])[1]
    name, width = _identity(meta) if meta.get("model") else (Path(path).name, None)
    return BenchModel(name, width, str(path), module,
                      resolution, meta.get("num_classes"), meta.get("norm_act"), count_model,
                      compiled=True)


def from_factory(spec: str) -> BenchModel:
    """`package.module:function` → `function()`, which must return an nn.Module.

    The module is imported from `sys.path` with the current directory first (as `python -m`
    does), so a factory file next to the user's shell works without installing it.
    """
    mod_name, sep, fn_name = spec.partition(":")
    if not sep or not mod_name or not fn_name:
        raise SourceError(f"factory {spec!r} must look like package.module:function")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(mod_name)
    except ImportError as e:
        raise SourceError(f"factory {spec!r}: cannot import {mod_name!r} ({e})") from None
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise SourceError(f"factory {spec!r}: {mod_name!r} has no callable {fn_name!r}")
    model = fn()
    if not isinstance(model, nn.Module):
        raise SourceError(f"factory {spec!r} returned {type(model).__name__}, not an nn.Module")
    return BenchModel(spec, None, spec, model.eval(), 224, None, None, model)
