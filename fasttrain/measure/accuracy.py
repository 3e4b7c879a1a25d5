"""Top-1 and top-5 of any network on a data set's validation split, measured as training
measures them: the same validation pipeline (`fasttrain.data.build_val_loader`), precision,
layout and averaging (`fasttrain.engine.evaluate`), so a checkpoint's number equals its run's
`val_top1`, and a network trained or pruned elsewhere is scored on exactly the images and
preprocessing the thin networks were.
"""
from __future__ import annotations

import math
import time
from typing import Any, Callable

import torch

from ..config import Config
from ..errors import UserError
from .sources import BenchModel, first_line


class AccuracyError(UserError, ValueError):
    """The network cannot be evaluated on this data (outputs, input size)."""


def output_count(model: torch.nn.Module, resolution: int, device: torch.device,
                 channels_last: bool, autocast) -> int:
    """Logits per image of `model` (eval mode), from one forward pass of a blank image.

    Raises:
        AccuracyError: the model fails on a (1, 3, resolution, resolution) input or does not
            return (1, classes) logits.
    """
    probe = torch.zeros(1, 3, resolution, resolution, device=device)
    if channels_last:
        probe = probe.contiguous(memory_format=torch.channels_last)
    try:
        with torch.inference_mode(), autocast:
            logits = model(probe)
    except Exception as e:  # the user's network: any error its forward raises
        raise AccuracyError(f"the model fails on a {resolution}x{resolution} image "
                            f"({first_line(e)})") from None
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or logits.shape[0] != 1:
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise AccuracyError(f"the model must return (batch, classes) logits, got {shape} for "
                            f"one image")
    return int(logits.shape[1])


class _FixedMode(torch.nn.Module):
    """Runs a module whose train/eval mode cannot be set (torch.export's, whose `eval()` raises
    NotImplementedError; its mode was fixed at export): `train()`/`eval()` stop here."""

    def __init__(self, module) -> None:
        super().__init__()
        self.__dict__["module"] = module  # not a submodule: eval() does not reach it

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x)


class _Reporting:
    """The validation loader, calling `progress(images so far, images in the set)` after each
    batch; everything else is the loader's."""

    def __init__(self, loader, progress: Callable[[int, int], None], total: int) -> None:
        self.loader, self.progress, self.total = loader, progress, total

    def __iter__(self):
        done = 0
        for images, labels in self.loader:
            yield images, labels
            done += len(labels)
            self.progress(done, self.total)

    def __getattr__(self, name: str):
        return getattr(self.loader, name)


def measure_accuracy(source: BenchModel, cfg: Config, classes: list[str] | None = None,
                     progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Evaluate `source.model` on the validation split `cfg.data` names, under `cfg.train`'s
    device, precision and layout and with `cfg.aug.test_flip`; one process. `source.model` is
    moved to that device and layout and left in eval mode; torch's thread count
    (`train.threads`) is restored on return.

    Args:
        classes: the label order the model was trained with (a checkpoint's); None = the order
            training on `cfg.data` gives (`build_val_loader`).
        progress: called after each batch with (images evaluated, images in the split).

    Returns:
        A result record: `val_top1`, `val_top5` (%), `val_loss`, `images` (evaluated; files that
        cannot be decoded are skipped, counted in `skipped`, the first named in
        `first_skipped`), `classes` (in the label order), `val_classes` (those with validation
        images), `notes` (what may make the number mean something else), `seconds`,
        `images_per_s`, params and conv+fc MACs at `val_res` (None when the network cannot be
        counted), the data and evaluation settings, and the conditions (device, versions,
        commit).

    Raises:
        UserError: bad data (DatasetError), a device that is not there (ConfigError), a model
            whose outputs do not cover the classes or whose input size is not `val_res`.
    """
    from ..engine.distributed import resolve_device

    device = resolve_device(cfg.train.device, 0)
    threads = torch.get_num_threads()
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    try:
        return _measure(source, cfg, classes, progress, device)
    finally:
        torch.set_num_threads(threads)


def _measure(source: BenchModel, cfg: Config, classes: list[str] | None,
             progress: Callable[[int, int], None] | None, device: torch.device
             ) -> dict[str, Any]:
    from ..data import build_val_loader
    from ..engine import evaluate
    from ..engine.precision import resolve_precision
    from .env import conditions
    from .macs import count_macs, count_params

    data, train = cfg.data, cfg.train
    if source.fixed_resolution and source.fixed_resolution != data.val_res:
        raise AccuracyError(f"{source.source}: a torch.export file runs at "
                            f"{source.fixed_resolution}x{source.fixed_resolution} only, "
                            f"data.val_res is {data.val_res}")
    precision = resolve_precision(train.precision)
    given_order = classes is not None
    loader, classes, root = build_val_loader(data, classes=classes, device=device,
                                             channels_last=train.channels_last,
                                             dtype=precision.autocast_dtype or torch.float32)
    model = source.model.to(device)
    if train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if source.fixed_resolution:  # torch.export's module: its mode is fixed, eval() raises
        model = _FixedMode(model)
    outputs = output_count(model, data.val_res, device, train.channels_last,
                           precision.autocast(device))
    if outputs < len(classes):
        raise AccuracyError(f"the model has {outputs} outputs, the data at {root} has "
                            f"{len(classes)} classes")
    notes = []
    if not given_order and outputs != len(classes):
        notes.append(f"the model has {outputs} outputs and no class names: labels follow the "
                     f"{len(classes)} sorted class folders, so a model trained on other "
                     f"classes is scored with misnumbered labels")
    start = time.perf_counter()
    batches = (_Reporting(loader, progress, len(loader.loader.dataset)) if progress
               else loader)
    metrics = evaluate(model, batches, precision, device, flip=cfg.aug.test_flip)
    seconds = time.perf_counter() - start
    if not math.isfinite(metrics["val_loss"]):
        notes.append("the loss is not finite: images whose logits are NaN or inf count as "
                     "misses (NaN/inf weights or BatchNorm statistics: a diverged run?)")
    images = len(loader.loader.dataset) - len(loader.skipped)
    present = len(set(loader.loader.dataset.targets))  # classes with validation images
    counted = source.count_model
    macs = count_macs(counted, data.val_res).conv_fc if counted is not None else None
    first_skipped = next(iter(loader.skipped.items()), None)
    return {
        "kind": "accuracy", "name": source.name, "width": source.width,
        "source": source.source, **source.details, "norm_act": source.norm_act,
        "dataset": data.dataset, "data_root": str(root), "split": "val",
        "classes": len(classes), "val_classes": present, "model_outputs": outputs,
        "images": images, "notes": notes,
        "skipped": len(loader.skipped),
        "first_skipped": ": ".join(first_skipped) if first_skipped else None,
        "val_res": data.val_res, "val_resize": data.val_resize, "mean": list(data.mean),
        "std": list(data.std), "test_flip": cfg.aug.test_flip,
        "batch_size": data.val_batch_size or data.batch_size, "precision": train.precision,
        "layout": "channels_last" if train.channels_last else "contiguous",
        "val_top1": metrics["val_top1"], "val_top5": metrics["val_top5"],
        "val_loss": metrics["val_loss"], "seconds": seconds,
        "images_per_s": images / seconds if seconds > 0 else None,
        "params": count_params(counted if counted is not None else source.model),
        "macs": macs, **conditions(device),
    }
