"""Export: a trained (or registered) model → BatchNorm folded → TorchScript, torch.export or
ONNX, each checked against the eager model before it counts as done.

- `fold_bn` folds every BatchNorm2d that directly follows a Conv2d (whose output feeds nothing
  else) into that conv's weight and bias. A norm+ReLU layer (any `NORM_ACT_LAYERS` choice:
  native `BatchNormReLU2d` or the fused kernel) becomes a plain ReLU, a `BatchNorm2d` an
  identity; anything else (option-A shortcuts, pooling, the fc) is untouched.
  The pairs are found on a torch.fx trace, i.e. by data flow, not by module names, and the
  module tree keeps its names, so the folded network scripts like the original.
- `export_model` writes one format, then `check_parity` runs the file back (TorchScript and
  torch.export through torch, ONNX through onnxruntime) against the *unfolded* eager model in eval
  mode on random inputs at two batch sizes and raises `ParityError` above tolerance.
- Every file carries `fasttrain.json` metadata (model name, width, classes, input size,
  normalisation mean/std, training commit, how it was exported): TorchScript and torch.export in
  their extra files, ONNX in `metadata_props`. A TorchScript file needs only plain torch to load:
        extra = {"fasttrain.json": ""}
        model = torch.jit.load(path, _extra_files=extra)
        meta = json.loads(extra["fasttrain.json"])
"""
from __future__ import annotations

import collections
import contextlib
import copy
import dataclasses
import datetime
import io
import json
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import fx, nn

from .errors import CheckpointError, UserError, first_problem
from .models import NORM_ACT_LAYERS

META_KEY = "fasttrain.json"
FORMATS = {"torchscript": ".pt", "export": ".pt2", "onnx": ".onnx"}
ONNX_OPSET = 18
"""ONNX opset of exported files: fixed, so a file does not change with the torch version's
exporter default."""
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


class ParityError(RuntimeError):
    """The exported model's outputs differ from the eager model's beyond tolerance."""


class ExportError(UserError, RuntimeError):
    """The model cannot be exported as asked (a missing optional package, an unknown format)."""


# --------------------------------------------------------------------------- models and metadata

def default_resolution(name: str) -> int:
    return 32 if name.startswith("cifar_") else 224


def make_metadata(model_config: dict[str, Any], *, resolution: int,
                  mean: list[float] | None = None, std: list[float] | None = None,
                  training_commit: str = "unknown") -> dict[str, Any]:
    """The metadata every export carries: the model's identity at the top level (model, width,
    channel_divisor, num_classes, shortcut, norm_act), the full `model_config` (the fields of
    `fasttrain.config.ModelConfig`, num_classes resolved) so `model_from_metadata` rebuilds the
    architecture, and what preprocessing expects: `input_size` [3, H, W] (NCHW, RGB) and
    `(x/255 - mean) / std`."""
    mc = dict(model_config)
    # A pruned network (explicit channels) is at no uniform width: its source's would mislead.
    return {"model": mc["name"], "width": None if mc.get("channels") else mc["width"],
            "channel_divisor": mc.get("channel_divisor", 1), "num_classes": mc["num_classes"],
            "shortcut": mc.get("shortcut") if mc["name"].startswith("cifar_") else None,
            "norm_act": mc.get("norm_act", "native"), "model_config": mc,
            "input_size": [3, resolution, resolution],
            "mean": list(mean or IMAGENET_MEAN), "std": list(std or IMAGENET_STD),
            "training_commit": training_commit}


def _build(model_config: dict[str, Any]) -> nn.Module:
    """`fasttrain.engine.build_model` on a ModelConfig dict (unknown keys ignored: a newer
    fasttrain may have written them); num_classes must be resolved (> 0)."""
    from .config import ModelConfig
    from .engine.loop import build_model

    known = {f.name for f in dataclasses.fields(ModelConfig)}
    cfg = ModelConfig(**{k: v for k, v in model_config.items() if k in known})
    if cfg.norm_act not in NORM_ACT_LAYERS:
        raise UserError(f"unknown norm_act {cfg.norm_act!r}; available: "
                        f"{', '.join(sorted(NORM_ACT_LAYERS))}")
    return build_model(cfg, cfg.num_classes)


def model_from_metadata(meta: dict[str, Any]) -> nn.Module:
    """The (randomly initialised, eval-mode) architecture `meta` describes; BatchNorm folded
    when the metadata says the file was folded, so it counts like the exported network."""
    mc = meta.get("model_config") or {k: meta[k] for k in
                                       ("width", "channel_divisor", "num_classes", "shortcut",
                                        "norm_act") if meta.get(k) is not None}
    model = _build({"name": meta["model"], **mc}).eval()
    if meta.get("bn_folded"):
        model = fold_bn(model)[0]
    return model


def model_from_name(name: str, width: float, *, channel_divisor: int = 1,
                    num_classes: int | None = None, resolution: int | None = None,
                    shortcut: str = "A", norm_act: str = "native"
                    ) -> tuple[nn.Module, dict[str, Any]]:
    """A registered model (random weights, eval mode) and its metadata.

    Args:
        num_classes: default 1000 (CIFAR models: 10).
        resolution: default 224 (CIFAR models: 32).
        Others: as `fasttrain.config.ModelConfig`.

    Raises:
        UserError: unknown model name or norm_act, or an invalid width/divisor.
    """
    if num_classes is None:
        num_classes = 10 if name.startswith("cifar_") else 1000
    mc = {"name": name, "width": width, "channel_divisor": channel_divisor,
          "num_classes": num_classes, "shortcut": shortcut, "norm_act": norm_act}
    from .config import ModelConfig, model_bound_exceeded

    if problem := model_bound_exceeded(mc):  # width 100 for 1.0 built hundreds of GB first
        raise UserError(problem)
    model = _build(mc)

    full = {**dataclasses.asdict(ModelConfig()), **mc}
    return model.eval(), make_metadata(full, resolution=resolution or default_resolution(name))


WEIGHTS = ("model", "ema")
"""Which weights of a checkpoint to use: the trained model's, or their exponential moving
average (saved with `train.ema`)."""


def _mapping(path: Path, value: Any, where: str) -> dict[str, Any]:
    """`value` when it is a mapping, {} when absent; a crafted or damaged file is one line."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise CheckpointError(f"{path}: malformed checkpoint: {where} is of type "
                              f"{type(value).__name__}, not a mapping")
    return value


def _ema_state(path: Path, state: dict[str, Any]) -> dict[str, Any]:
    """The model state dict inside the checkpoint's EMA (an `AveragedModel`: keys under
    `module.`, plus its update count)."""
    ema = state.get("ema")
    if not isinstance(ema, dict):
        pruning = state.get("pruning")
        if isinstance(pruning, dict):  # tools/prune.py keeps one set of weights
            # records written before --weights existed lack the key: those pruned the model
            source = pruning.get("source_weights") or "model"
            raise CheckpointError(f"{path}: a pruned checkpoint holds one set of weights (here "
                                  f"pruned from its source's {source} weights), no EMA; use the "
                                  f"model's weights")
        raise CheckpointError(f"{path}: no EMA weights in this checkpoint (trained without "
                              f"train.ema); use the model's weights")
    from .engine.checkpoint import strip_wrapper_prefixes

    # An EMA of a compiled or DDP model may carry their prefixes under its own `module.`.
    return strip_wrapper_prefixes({k.removeprefix("module."): v for k, v in ema.items()
                                   if k != "n_averaged"})


def model_from_checkpoint(path: str | Path, norm_act: str | None = None,
                          weights: str = "model", state: dict[str, Any] | None = None
                          ) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model of a fasttrain checkpoint (its `config['model']`), load its weights
    (`weights_only=True`) and return it in eval mode with its metadata; input size, mean and std
    come from the checkpoint's `config['data']` (validation crop), the training commit from its
    `versions['commit']` ("unknown" when absent); `weights` says which weights were loaded.

    Args:
        norm_act: override the checkpoint's `model.norm_act` (same state dict either way).
        weights: "model" (the trained weights, what `val_top1` measured) or "ema" (their
            moving average, what `val_top1_ema` measured; needs a `train.ema` run).
        state: the checkpoint at `path`, when the caller has loaded it already.

    Raises:
        CheckpointError: unreadable file, no model config, malformed entries, no EMA weights
            for weights="ema", or weights that do not fit.
    """
    from .engine import checkpoint as ckpt

    if weights not in WEIGHTS:
        raise UserError(f"weights={weights!r}: choose from {', '.join(WEIGHTS)}")
    if norm_act is not None and norm_act not in NORM_ACT_LAYERS:
        raise UserError(f"norm_act {norm_act!r}: choose from "
                        f"{', '.join(sorted(NORM_ACT_LAYERS))}")
    path = Path(path).expanduser()  # "~/runs/...": as model.init_from and --resume read it
    if state is None:
        state = ckpt.load(path)
    cfg = state.get("config")
    if not isinstance(cfg, dict) or not isinstance(cfg.get("model"), dict):
        raise CheckpointError(f"{path}: checkpoint has no model config ('config'['model'])")
    model_state = _mapping(path, state["model"], "'model'")
    if weights == "ema":
        model_state = _ema_state(path, state)
    mc = dict(cfg["model"])
    if norm_act is not None:
        mc["norm_act"] = norm_act
    if not mc.get("num_classes"):  # 0 = "the data set's": the classifier's shape says how many
        fc = model_state.get("fc.weight")
        if fc is None:
            raise CheckpointError(f"{path}: model.num_classes is 0 and there is no fc.weight")
        mc["num_classes"] = int(fc.shape[0])
    try:
        model = _build(mc)
        model.load_state_dict(model_state)
    except (UserError, RuntimeError, KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: checkpoint does not fit its model config "
                              f"({first_problem(e)})") from None
    data = _mapping(path, cfg.get("data"), "'config'['data']")
    versions = _mapping(path, state.get("versions"), "'versions'")
    train_state = _mapping(path, state.get("train_state"), "'train_state'")
    try:
        resolution = int(data.get("val_res") or default_resolution(mc["name"]))
        resize = int(data.get("val_resize") or 0)  # shorter side before the center crop
        from .config import MAX_RESOLUTION

        # the config's own bounds: a crafted 10**9 overflowed torch's storage size (traceback)
        if not (1 <= resolution <= MAX_RESOLUTION and 0 <= resize <= MAX_RESOLUTION):
            raise ValueError(f"val_res {resolution}, val_resize {resize}")
        mean, std = data.get("mean"), data.get("std")
        for name, values in (("mean", mean), ("std", std)):
            if values is not None:
                numbers = [float(v) for v in values]  # a str or a list of words: TypeError...
                if numbers and len(numbers) != 3:  # empty = the ImageNet default
                    raise ValueError(f"{name} has {len(numbers)} values, not 3")
                # NaN would reach the metadata JSON, which strict parsers refuse; std 0 divides
                if not all(math.isfinite(v) for v in numbers) or \
                        (name == "std" and not all(v > 0 for v in numbers)):
                    raise ValueError(f"{name} {numbers}")
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: malformed checkpoint: 'config'['data'] ({e})") from None
    meta = make_metadata(mc, resolution=resolution, mean=mean, std=std,
                         training_commit=str(versions.get("commit", "unknown")))
    meta["checkpoint_epoch"] = train_state.get("epoch")  # complete epochs
    # A checkpoint written inside an epoch (train.max_steps, train.checkpoint_every) has the
    # epoch count of the one before it: the optimizer step tells the two apart.
    meta["checkpoint_step"] = train_state.get("step")
    if train_state.get("epoch_step"):
        meta["checkpoint_epoch_step"] = train_state["epoch_step"]
    meta["weights"] = weights
    classes = state.get("classes")  # label order of the training data (absent in old files)
    # A model may have more outputs than its data had classes (model.num_classes set above the
    # data's): the names are those of its first outputs, and without them an evaluation of the
    # file could not tell its label order from the folders' (it warned of misnumbered labels).
    if isinstance(classes, list) and 0 < len(classes) <= mc["num_classes"] and \
            all(isinstance(c, str) for c in classes):
        meta["classes"] = classes
    if resize:
        meta["resize"] = resize
    aug = cfg.get("aug")
    if isinstance(aug, dict) and isinstance(aug.get("test_flip"), bool):
        # whether the top-1 its training recorded averaged each image with its mirror
        meta["test_flip"] = aug["test_flip"]
    pruning = state.get("pruning")
    if isinstance(pruning, dict):  # "weights" alone would hide a network pruned from EMA weights
        meta["pruning"] = {k: pruning[k] for k in ckpt.PRUNING_SUMMARY if k in pruning}
    elif isinstance(state.get("pruned_from"), dict):  # trained on from a pruned checkpoint
        meta["pruning"] = state["pruned_from"]
    return model.eval(), meta


# --------------------------------------------------------------------------- BatchNorm folding

class _Tracer(fx.Tracer):
    """fx tracer that keeps every BatchNorm2d (and subclasses such as BatchNormReLU2d) a leaf."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return (isinstance(m, (nn.BatchNorm2d, *_FOLDABLE_CONVS))
                or super().is_leaf_module(m, qualname))


def _is_norm_relu(m: nn.Module) -> bool:
    # Every `model.norm_act` choice is BatchNorm followed by ReLU (native, fused kernel, ...).
    return isinstance(m, tuple(t for t in NORM_ACT_LAYERS.values() if isinstance(t, type)))


def _foldable_norm(bn: nn.Module) -> bool:
    # Only the semantics we know: plain BN, or BN followed by ReLU. Other subclasses may do more.
    known = type(bn) is nn.BatchNorm2d or (isinstance(bn, nn.BatchNorm2d) and _is_norm_relu(bn))
    return known and bn.track_running_stats and bn.running_mean is not None


@torch.no_grad()
def _fold_into(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
    # In float64, then back: folding must not add rounding error of its own.
    w = conv.weight.double()
    b = conv.bias.double() if conv.bias is not None else torch.zeros_like(bn.running_mean,
                                                                         dtype=torch.float64)
    scale = torch.rsqrt(bn.running_var.double() + bn.eps)
    shift = -bn.running_mean.double() * scale
    if bn.affine:
        scale = scale * bn.weight.double()
        shift = shift * bn.weight.double() + bn.bias.double()
    conv.weight = nn.Parameter((w * scale.view(-1, 1, 1, 1)).to(conv.weight.dtype))
    conv.bias = nn.Parameter((b * scale + shift).to(conv.weight.dtype))


def _foldable_convs() -> tuple[type, ...]:
    from .models.regularize import BlurPoolConv2d  # conv(blur(x)): linear in the conv's weights

    return (nn.Conv2d, BlurPoolConv2d)


_FOLDABLE_CONVS = _foldable_convs()


def fold_bn(model: nn.Module) -> tuple[nn.Module, int]:
    """Fold BatchNorm into the preceding convolution, for inference.

    Returns:
        A folded deep copy in eval mode (equal to `model.eval()` up to float rounding) and the
        number of folded norms. The input model is not modified.

    Raises:
        ExportError: the model cannot be traced by torch.fx (data-dependent control flow).
    """
    model = copy.deepcopy(model).eval()
    try:
        graph = _Tracer().trace(model)
    except Exception as e:  # fx raises many types for untraceable code; all mean the same here
        raise ExportError(f"cannot trace {type(model).__name__} with torch.fx to fold "
                          f"BatchNorm ({type(e).__name__}: {str(e).splitlines()[0]})") from None
    modules = dict(model.named_modules())
    # A module called twice shares weights between two places: folding one use breaks the other.
    calls = collections.Counter(n.target for n in graph.nodes if n.op == "call_module")
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or not _foldable_norm(modules[node.target]):
            continue
        src = node.args[0] if len(node.args) == 1 and not node.kwargs else None
        if not (isinstance(src, fx.Node) and src.op == "call_module"
                and type(modules[src.target]) in _FOLDABLE_CONVS and len(src.users) == 1
                and calls[src.target] == 1 and calls[node.target] == 1):
            continue
        pairs.append((src.target, node.target))
    for conv_name, bn_name in pairs:
        bn = modules[bn_name]
        _fold_into(modules[conv_name], bn)
        parent_name, _, child = bn_name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, nn.ReLU(inplace=True) if _is_norm_relu(bn) else nn.Identity())
    return model, len(pairs)


def with_plain_norm_act(model: nn.Module) -> nn.Module:
    """`model` with every norm+ReLU layer that is not the native one (e.g. the fused kernel's,
    which calls a `torch.ops.fasttrain` op that a plain-torch reader of a torch.export or ONNX
    file does not have) replaced in place by the native `BatchNormReLU2d` with the same state;
    the same math. Layers left by `fold_bn` (unfoldable norms, or all of them with `--no-fold`)
    are what this touches. Expects a CPU model (the exporter's copy)."""
    native = NORM_ACT_LAYERS["native"]
    for name, m in list(model.named_modules()):
        if not (_is_norm_relu(m) and type(m) is not native):
            continue
        plain = native(m.num_features, eps=m.eps, momentum=m.momentum, affine=m.affine,
                       track_running_stats=m.track_running_stats)
        plain.load_state_dict(m.state_dict())
        plain.train(m.training)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, plain)
    return model


# --------------------------------------------------------------------------- writers and readers

@contextlib.contextmanager
def quiet_jit():
    """torch >= 2.10 deprecates torch.jit.*; TorchScript is still what plain-torch loading
    needs, so its deprecation warnings are silenced inside this block."""
    with warnings.catch_warnings():
        # any category: a FutureWarning on torch 2.14, a DeprecationWarning on 2.11
        warnings.filterwarnings("ignore", message=r".*torch\.jit\.")
        yield


def parity_failed_path(out: str | Path) -> Path:
    """Where `export_model` keeps a file that failed its parity check: `<stem>.parity-failed
    <suffix>` next to `out` (replacing an earlier failed one)."""
    out = Path(out)
    return out.with_name(f"{out.stem}.parity-failed{out.suffix}")


def to_torchscript(model: nn.Module, example: torch.Tensor, path: str | Path,
                   meta: dict[str, Any]) -> str:
    """Write `model` as TorchScript with `meta` in `_extra_files`; `torch.jit.script` first, then
    `torch.jit.trace` on `example` when scripting fails. Returns "script" or "trace"."""
    with quiet_jit():
        try:
            sm, method = torch.jit.script(model), "script"
        except Exception as e:  # TorchScript's frontend raises several types for unsupported code
            warnings.warn(f"torch.jit.script failed ({type(e).__name__}); tracing instead")
            with torch.no_grad():
                sm, method = torch.jit.trace(model, example), "trace"
        meta = {**meta, "torchscript_method": method}
        buffer = io.BytesIO()
        torch.jit.save(sm, buffer, _extra_files={META_KEY: json.dumps(meta)})
    _write_bytes(path, buffer)
    return method


def _write_bytes(path: str | Path, buffer: io.BytesIO) -> None:
    """Write a serialised model with Python's file I/O: torch's C++ writer reports a failed
    open as a RuntimeError and a failed write (disk full) by aborting the process, where an
    OSError here becomes one line."""
    with open(path, "wb") as f:
        f.write(buffer.getbuffer())
        f.flush()
        os.fsync(f.fileno())


def to_export(model: nn.Module, example: torch.Tensor, path: str | Path,
              meta: dict[str, Any]) -> None:
    """Write `model` as a torch.export program (.pt2) with a dynamic batch dimension and `meta`
    in its extra files."""
    batch = torch.export.Dim("batch", min=1)
    ep = torch.export.export(model, (example,), dynamic_shapes=({0: batch},))
    buffer = io.BytesIO()
    torch.export.save(ep, buffer, extra_files={META_KEY: json.dumps(meta)})
    _write_bytes(path, buffer)


def to_onnx(model: nn.Module, example: torch.Tensor, path: str | Path, meta: dict[str, Any],
            opset: int = ONNX_OPSET, keep_batchnorm: bool = False) -> None:
    """Write `model` as ONNX (`opset`, dynamo exporter, weights inside the file, input "images"
    with a dynamic batch, output "logits") with `meta` in `metadata_props`. `keep_batchnorm`:
    the graph keeps its BatchNormalization nodes (`--no-fold`), which the exporter's own
    optimizer fuses into the convolutions; constants are still folded.

    Raises:
        ExportError: onnx or onnxscript is not installed.
    """
    try:
        import onnx
        import onnxscript  # noqa: F401  (the dynamo exporter needs it; fail with a clear line)
    except ImportError as e:
        raise ExportError(f"ONNX export needs the onnx and onnxscript packages ({e})") from None
    batch = torch.export.Dim("batch", min=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter warns about its own internals
        torch.onnx.export(model, (example,), str(path), dynamo=True, opset_version=opset,
                          input_names=["images"], output_names=["logits"],
                          dynamic_shapes=({0: batch},), external_data=False, verbose=False,
                          optimize=not keep_batchnorm)
    proto = onnx.load(str(path))
    if keep_batchnorm:
        # The exporter's optimizer is constant folding plus rewrite rules, one of which fuses
        # BatchNorm into the preceding Conv: only the folding (public API), or the graph is
        # left with ~200 shape and cast nodes around each layer.
        from onnxscript import ir, optimizer

        graph = ir.serde.deserialize_model(proto)
        optimizer.fold_constants(graph)
        optimizer.remove_unused_nodes(graph)
        proto = ir.serde.serialize_model(graph)
    entry = proto.metadata_props.add()
    entry.key, entry.value = META_KEY, json.dumps({**meta, "onnx_opset": opset})
    onnx.save(proto, str(path))


def format_of(path: str | Path) -> str:
    """Export format from a file suffix (.pt/.ts TorchScript, .pt2 torch.export, .onnx ONNX)."""
    suffix = Path(path).suffix.lower()
    if suffix in (".pt", ".ts", ".torchscript"):
        return "torchscript"
    for fmt, ext in FORMATS.items():
        if suffix == ext:
            return fmt
    raise ExportError(f"{path}: unknown export format (suffix {suffix or 'none'!r}; "
                      f"expected .pt, .pt2 or .onnx)")


CHECKPOINT_NOT_EXPORT = "a torch.save file (a training checkpoint?), not an exported model"


def _is_torch_save_archive(path: Path) -> bool:
    """A torch.save zip (`<name>/data.pkl`, no TorchScript `code/` or torch.export model)."""
    from .engine.checkpoint import zip_names

    names = zip_names(path)
    return (any(n.endswith("/data.pkl") for n in names)
            and not any("/code/" in n or "/models/" in n for n in names))


@contextlib.contextmanager
def _weights_only_loads():
    """Every torch.load inside restricted to tensors and plain containers, as
    TORCH_FORCE_WEIGHTS_ONLY_LOAD makes it (read at each call): torch.export.load unpickles
    an archive's weights and constants marked `use_pickle`, and its sample inputs when they
    are not plain, with weights_only=False, so a crafted .pt2 ran code on loading. Its
    opposite, TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD, is lifted meanwhile (torch refuses both)."""
    keys = ("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")
    before = {key: os.environ.get(key) for key in keys}
    os.environ[keys[0]] = "1"
    os.environ.pop(keys[1], None)
    try:
        yield
    finally:
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _refuse_pickled_objects(path: Path) -> None:
    """Refuse a .pt2 holding Python objects torch.export.load unpickles with plain pickle
    (constants whose `path_name` starts with `opaque_obj_`; no restricted loading applies):
    fasttrain's exports have none. Both the archive's members and its constants configs are
    read, since torch goes by the config's name, which may hold a folder."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            pickled = [n for n in names if "opaque_obj_" in n.partition("/data/constants/")[2]]
            for name in names:
                if "/data/constants/" not in name or not name.endswith("_constants_config.json"):
                    continue
                try:
                    entries = (json.loads(archive.read(name)).get("config") or {}).values()
                except (OSError, ValueError, AttributeError, zipfile.BadZipFile):
                    continue  # a damaged config: torch's loading says what is wrong with it
                pickled += [str(e.get("path_name")) for e in entries if isinstance(e, dict)
                            and str(e.get("path_name", "")).startswith("opaque_obj_")]
    except (OSError, zipfile.BadZipFile):
        return  # no zip: torch's loading says what it is
    if pickled:
        raise ExportError(f"{path}: holds pickled Python objects ({pickled[0]}), which loading "
                          f"would run; refused (a network exported from fasttrain has none)")


def load_exported(path: str | Path, fmt: str | None = None
                  ) -> tuple[Callable[[torch.Tensor], torch.Tensor], dict[str, Any]]:
    """Load an exported file: a function images → logits (CPU tensors for ONNX) and its
    metadata ({} when the file has none). TorchScript and torch.export return the module itself.

    Raises:
        ExportError: missing file, unknown format or a file that does not load.
    """
    path = Path(path)
    if not path.is_file():
        raise ExportError(f"{path}: " + ("a directory, not an exported file" if path.is_dir()
                                         else "file not found"))
    fmt = fmt or format_of(path)
    if fmt not in FORMATS:  # every other name was loaded as ONNX
        raise ExportError(f"unknown export format {fmt!r}; choose from {', '.join(FORMATS)}")
    try:
        if fmt == "torchscript":
            extra = {META_KEY: ""}
            # An open file: torch's C++ loader takes no name that is not UTF-8.
            with quiet_jit(), open(path, "rb") as f:
                module = torch.jit.load(f, map_location="cpu", _extra_files=extra)
            return module, json.loads(extra[META_KEY] or "{}")
        if fmt == "export":
            extra = {META_KEY: ""}
            # An open file, not its name: torch logs a warning for a name not ending in .pt2
            # (upper case, the temporary name of another suffix) although the file loads.
            # A file that is no torch.export archive (a checkpoint, a TorchScript file, a
            # damaged one): torch logs the traceback of its first attempt as a warning before
            # raising; the error below says it in one line.
            import logging

            export_log = logging.getLogger("torch.export")
            level = export_log.level
            _refuse_pickled_objects(path)
            export_log.setLevel(logging.ERROR)  # after the refusal: it raises, leaving it set
            try:
                with open(path, "rb") as f, _weights_only_loads():
                    ep = torch.export.load(f, extra_files=extra)
            finally:
                export_log.setLevel(level)
            return ep.module(), json.loads(extra[META_KEY] or "{}")
    except ExportError:
        raise
    except Exception as e:  # torch raises RuntimeError, zipfile.BadZipFile, KeyError, ... here
        from .engine.checkpoint import damaged_zip

        damage = damaged_zip(path)
        if damage:  # torch: "[Errno 22] Invalid argument", "istream reader failed", ...
            raise ExportError(f"{path}: cannot load {fmt} file ({damage}; copy it again or "
                              f"export it again)") from None
        if _is_torch_save_archive(path):
            from .engine.checkpoint import load as load_checkpoint

            try:  # weights-only: a model pickled whole is refused at its class, unrun
                load_checkpoint(path, mmap=True)
            except CheckpointError as refused:
                if "--factory" in str(refused):  # not a checkpoint either: say what works
                    raise ExportError(str(refused)) from None
            raise ExportError(f"{path}: {CHECKPOINT_NOT_EXPORT}") from None
        from .engine.checkpoint import _is_torch_export_archive, zip_names

        # the other format under this one's suffix: torch's own message ("checkpoint file is
        # corrupted", "check the warnings above") sent the user looking for damage
        if fmt == "torchscript" and _is_torch_export_archive(path):
            raise ExportError(f"{path}: a torch.export program, not a TorchScript file; name it "
                              f"{path.stem}.pt2") from None
        if fmt == "export" and any("/code/" in n for n in zip_names(path)):
            raise ExportError(f"{path}: a TorchScript archive, not a torch.export program; name "
                              f"it {path.stem}.pt") from None
        if "Weights only load failed" in str(e):
            raise ExportError(f"{path}: holds pickled objects that are not plain tensors "
                              f"(loading them could run code); refused") from None
        import zipfile

        if not zipfile.is_zipfile(path):  # torch said "istream reader failed: getting the ..."
            kind = {"torchscript": "TorchScript", "export": "torch.export"}.get(fmt, fmt)
            what = "an empty file" if path.stat().st_size == 0 else "not a zip archive"
            raise ExportError(f"{path}: not a {kind} file ({what}; those files are zip "
                              f"archives)") from None
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ExportError(f"{path}: cannot load {fmt} file ({type(e).__name__}: {first})"
                          ) from None
    try:
        import onnx
        import onnxruntime as ort
    except ImportError as e:
        raise ExportError(f"checking an ONNX file needs onnx and onnxruntime ({e})") from None
    try:
        with open(path, "rb") as f:  # bytes: onnxruntime takes no name that is not UTF-8
            raw = f.read()
        proto = onnx.load_from_string(raw)
        meta = next((json.loads(p.value) for p in proto.metadata_props if p.key == META_KEY), {})
        session = ort.InferenceSession(raw, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnx's DecodeError, onnxruntime's Fail/InvalidGraph, ...
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ExportError(f"{path}: cannot load onnx file ({type(e).__name__}: {first})"
                          ) from None
    name = session.get_inputs()[0].name

    def run(x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(session.run(None, {name: x.detach().cpu().numpy()})[0])

    return run, meta


# --------------------------------------------------------------------------- parity

@dataclass(frozen=True)
class Parity:
    """Largest differences between exported and eager outputs over all checked batch sizes.

    `max_rel` is `max_abs / max|eager|` (relative to the output's scale: element-wise ratios blow
    up at logits near zero). `ok` means `max_abs <= atol + rtol * max|eager|`.
    """

    max_abs: float
    max_rel: float
    batch_sizes: tuple[int, ...]
    atol: float
    rtol: float
    ok: bool


@torch.no_grad()
def check_parity(reference: nn.Module, exported: Callable[[torch.Tensor], torch.Tensor],
                 input_size: list[int] | tuple[int, ...], *, batch_sizes=(1, 3),
                 atol: float = 1e-4, rtol: float = 1e-4, seed: int = 0) -> Parity:
    """Compare `exported` against `reference` on standard-normal fp32 CPU inputs of shape
    `(b, *input_size)` for each b in `batch_sizes`. `reference` must take such inputs (an fp32
    module on the CPU, as export_model passes it); it is put in eval mode and left so."""
    reference = reference.eval()
    gen = torch.Generator().manual_seed(seed)
    max_abs, scale = 0.0, 0.0
    for b in batch_sizes:
        x = torch.randn(b, *input_size, generator=gen)
        want = reference(x.clone()).float()
        got = exported(x.clone()).float()
        if got.shape != want.shape:
            raise ParityError(f"exported output shape {tuple(got.shape)} != eager "
                              f"{tuple(want.shape)} at batch {b}")
        if not torch.isfinite(got).all():
            raise ParityError(f"exported output has non-finite values at batch {b}")
        max_abs = max(max_abs, (got - want).abs().max().item())
        scale = max(scale, want.abs().max().item())
    max_rel = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else math.inf)
    return Parity(max_abs, max_rel, tuple(batch_sizes), atol, rtol,
                  ok=max_abs <= atol + rtol * scale)


# --------------------------------------------------------------------------- the pipeline

def export_model(model: nn.Module, meta: dict[str, Any], fmt: str, out: str | Path, *,
                 fold: bool = True, batch_sizes=(1, 3), atol: float = 1e-4,
                 rtol: float = 1e-4) -> tuple[Parity, dict[str, Any]]:
    """Fold (optional), write `out` in `fmt`, load it back and check parity with `model`.

    Args:
        model: the eager reference (not modified).
        meta: metadata from `model_from_name` / `model_from_checkpoint` / `make_metadata`;
            `input_size` sets the parity inputs. Export fields are added: format, bn_folded,
            export_commit, torch_version, date (and torchscript_method or onnx_opset).
        fmt: "torchscript" | "export" | "onnx".

    Returns:
        The parity result and the metadata written.

    Raises:
        ParityError: the file's outputs differ beyond `atol + rtol * max|eager|`; `out` is
            left as it was and the failed file is kept as `<stem>.parity-failed<suffix>` next
            to it, for inspection.
        ExportError: unknown format, a missing optional package, a bad tolerance, or `out`
            cannot be written.

    `out` is replaced atomically, and only when the parity check passes.
    """
    from .measure.env import git_commit

    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r}; choose from {', '.join(FORMATS)}")
    for name, tol in (("atol", atol), ("rtol", rtol)):
        if not (math.isfinite(tol) and tol >= 0):
            raise ExportError(f"--{name} must be a finite number >= 0, got {tol}")
    reference = copy.deepcopy(model).float().cpu().eval()
    # (a copy without folding: the native layers put in place of fused ones must be checked
    # against the fused network, not against themselves)
    net, n_folded = fold_bn(reference) if fold else (copy.deepcopy(reference), 0)
    net = with_plain_norm_act(net)
    meta = {**meta, "format": fmt, "bn_folded": n_folded, "export_commit": git_commit(),
            "torch_version": str(torch.__version__),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    # Batch 2 for the example: torch.export specialises a dimension it first sees as 1.
    example = torch.randn(2, *meta["input_size"])
    with torch.no_grad():
        # A diverged run's NaN weights failed the parity check, blamed on the export.
        if not torch.isfinite(reference(example.clone())).all():
            raise ExportError("the model's own output is not finite (NaN or inf weights or "
                              "BatchNorm statistics: a diverged run?); nothing was exported")
    out = Path(out)
    if out.is_dir():
        raise ExportError(f"{out}: is a directory; --out names the file to write")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ExportError(f"{out.parent}: cannot create the output folder "
                          f"({e.strerror or e})") from None
    # Written under a temporary name (same folder, same suffix: torch.export wants .pt2) and
    # renamed only once the parity check passed, so a failed export never replaces a good file.
    tmp = out.with_name(f".{out.stem}.tmp-{os.getpid()}{out.suffix}")
    try:
        try:
            if fmt == "torchscript":
                meta["torchscript_method"] = to_torchscript(net, example, tmp, meta)
            elif fmt == "export":
                to_export(net, example, tmp, meta)
            else:
                to_onnx(net, example, tmp, meta, keep_batchnorm=not fold)
                meta["onnx_opset"] = ONNX_OPSET
        except OSError as e:
            raise ExportError(f"{out}: cannot write ({e.strerror or e})") from None
        exported, _ = load_exported(tmp, fmt)
        try:
            parity = check_parity(reference, exported, meta["input_size"],
                                  batch_sizes=batch_sizes, atol=atol, rtol=rtol)
        except ParityError as e:  # another shape, non-finite outputs: kept for inspection too
            failed = parity_failed_path(out)
            os.replace(tmp, failed)
            raise ParityError(f"{out}: {e}; written as {failed} for inspection, {out} left as "
                              f"it was") from None
        if not parity.ok:
            failed = parity_failed_path(out)
            os.replace(tmp, failed)
            raise ParityError(f"{out}: {fmt} output differs from eager: max abs "
                              f"{parity.max_abs:.3g}, max rel {parity.max_rel:.3g} > atol "
                              f"{atol:g} + rtol {rtol:g} (batch sizes "
                              f"{', '.join(map(str, batch_sizes))}); written as {failed} for "
                              f"inspection, {out} left as it was")
        os.replace(tmp, out)
    finally:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:  # a read-only folder (EROFS even for a missing file): nothing to remove
            pass
    return parity, meta
