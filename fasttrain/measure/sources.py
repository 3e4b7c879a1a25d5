"""What a benchmark measures: registered models, fasttrain checkpoints, exported files, or any
`package.module:factory` returning an `nn.Module` (so a network pruned by another tool is measured
the same way as a ThinResNet).
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.machinery
import os
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import UserError


class SourceError(UserError, ValueError):
    """The model to benchmark cannot be found or built."""


# TorchScript's interpreter puts its own words first, the script traceback next and the
# reason ("RuntimeError: Given groups=1, ...") last.
_TORCHSCRIPT_FAILED = "The following operation failed in the TorchScript interpreter"


def first_line(e: BaseException) -> str:
    """`Type: first line of the message` (the type alone when there is no message); for an
    error raised in the TorchScript interpreter, the reason its message ends with."""
    text = str(e).strip()
    lines = text.splitlines()
    if len(lines) > 1 and lines[0].startswith(_TORCHSCRIPT_FAILED):
        reason = lines[-1].strip()
        return reason if ": " in reason else f"{type(e).__name__}: {reason}"
    return f"{type(e).__name__}: {lines[0]}" if text else type(e).__name__


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
        norm_act: the norm+ReLU implementation ("native", "fused", or "folded" for an export
            whose BatchNorm was folded; a factory's module: "fused" when it holds fasttrain's
            fused layers, else "native"); None for an exported file of unknown origin.
        count_model: the module params and MACs are counted on: the model itself, or, for an
            exported fasttrain file, the architecture rebuilt from its metadata with BatchNorm
            unfolded (so the file counts like the network that was trained, and fvcore need not
            hook a ScriptModule); None = MACs unknown, params counted on `model`.
        compiled: True for TorchScript / torch.export files: only eager and cudagraphs modes.
        fixed_resolution: the only input size the model accepts (a torch.export file's
            specialised height and width); None = any.
        in_chans: input channels (a factory's first convolution's; else 3).
        details: what else tells this network apart in a result row (`channel_divisor` of a
            registry model, the `weights` of a checkpoint), copied into each row.
        classes: the class names in label order, where the checkpoint or the exported file
            holds them; None = unknown.
        meta: the fasttrain metadata of a checkpoint or exported file (`model_config`, the
            `pruning` its network comes from, ...); empty for other sources.
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
    fixed_resolution: int | None = None
    in_chans: int = 3
    details: dict[str, Any] = field(default_factory=dict)
    classes: list[str] | None = None
    meta: dict[str, Any] = field(default_factory=dict)


def from_registry(name: str, widths: list[float], *, channel_divisor: int = 1,
                  num_classes: int | None = None, norm_act: str = "native",
                  shortcut: str = "A") -> list[BenchModel]:
    """One BenchModel per width of the registered model `name` (random weights); `shortcut`:
    CIFAR ResNets' (A or B; a B network's rows are named `<model> (shortcut B)`)."""
    from ..export import model_from_name

    out = []
    for w in widths:
        model, meta = model_from_name(name, w, channel_divisor=channel_divisor,
                                      num_classes=num_classes, norm_act=norm_act,
                                      shortcut=shortcut)
        out.append(BenchModel(_identity(meta)[0], w, "registry", model, meta["input_size"][1],
                              meta["num_classes"], norm_act, model,
                              details={"channel_divisor": channel_divisor}))
    return out


def from_checkpoint(path: str | Path, norm_act: str | None = None,
                    weights: str = "model", state: dict[str, Any] | None = None) -> BenchModel:
    """The trained model of a fasttrain checkpoint (`fasttrain.export.model_from_checkpoint`;
    `weights` "model" or "ema"; `state`: the checkpoint, when the caller has loaded it).

    Raises:
        UserError: the file is not a usable checkpoint (an exported TorchScript file is named
            as such, with a pointer to --file).
    """
    from ..export import model_from_checkpoint

    from ..engine.checkpoint import EXPORT_NOT_CHECKPOINT, TORCHSCRIPT_NOT_CHECKPOINT

    try:
        model, meta = model_from_checkpoint(path, norm_act=norm_act, weights=weights,
                                            state=state)
    except UserError as e:
        if TORCHSCRIPT_NOT_CHECKPOINT not in str(e) and EXPORT_NOT_CHECKPOINT not in str(e):
            raise
        raise SourceError(f"{e} (use --file)") from None
    name, width = _identity(meta)
    return BenchModel(name, width, str(path), model, meta["input_size"][1],
                      meta["num_classes"], meta["norm_act"], model,
                      details={"weights": weights}, classes=meta.get("classes"), meta=meta)


def _identity(meta: dict) -> tuple[str, float | None]:
    """Row name and width of a fasttrain model: a CIFAR ResNet with option-B shortcuts is named
    `<model> (shortcut B)` (another architecture than option A, at the same width); a network
    with an explicit channel spec (a pruned one) is not at any uniform width, so it is named
    `<model> (pruned)` (`(pruned, shortcut B)`), width None."""
    shortcut_b = meta["model"].startswith("cifar_") and meta.get("shortcut") == "B"
    if (meta.get("model_config") or {}).get("channels"):
        return f"{meta['model']} (pruned{', shortcut B' if shortcut_b else ''})", None
    return f"{meta['model']}{' (shortcut B)' if shortcut_b else ''}", meta.get("width")


def from_file(path: str | Path) -> BenchModel:
    """An exported TorchScript (.pt) or torch.export (.pt2) file; metadata names the model.

    Params and MACs of a file whose metadata names a fasttrain model are counted on that
    architecture rebuilt with BatchNorm unfolded, so an exported network counts like its
    checkpoint. A torch.export file runs at its exported input size only (`fixed_resolution`).

    Raises:
        SourceError / ExportError: an ONNX file, a missing file or one that does not load.
    """
    from ..export import CHECKPOINT_NOT_EXPORT, load_exported, model_from_metadata

    if Path(path).suffix.lower() == ".onnx":
        raise SourceError(f"{path}: ONNX files run in onnxruntime, not torch; use the "
                          f"TorchScript or torch.export file instead")
    try:
        module, meta = load_exported(path)
    except UserError as e:
        if CHECKPOINT_NOT_EXPORT not in str(e):
            raise
        raise SourceError(f"{e} (use --checkpoint)") from None
    script = isinstance(module, torch.jit.ScriptModule)
    count_model = None
    if meta.get("model"):
        try:
            # Folding changes what is counted (params of BN, fvcore's BN FLOPs), not the network.
            count_model = model_from_metadata({**meta, "bn_folded": 0})
        except (KeyError, ValueError, UserError) as e:
            warnings.warn(f"{path}: MACs not counted: cannot rebuild {meta['model']!r} from the "
                          f"file's metadata ({first_line(e)})", stacklevel=2)
    elif not script:  # torch.export's GraphModule: fvcore traces it; ScriptModules refuse hooks
        count_model = module
    else:
        warnings.warn(f"{path}: MACs not counted: the file has no fasttrain metadata",
                      stacklevel=2)
    in_chans, fixed = (None, None) if script else _exported_input(path, module, meta)
    resolution = fixed or meta.get("input_size", [3, 224, 224])[1]
    name, width = _identity(meta) if meta.get("model") else (Path(path).name, None)
    # A folded file has no norm layers left, and an unfolded one holds the native math (the
    # exporter replaces fused layers): its training's norm_act (say fused) does not run.
    norm_act = ("folded" if meta.get("bn_folded") else
                "native" if meta.get("norm_act") else None)
    return BenchModel(name, width, str(path), module,
                      resolution, meta.get("num_classes"), norm_act, count_model,
                      compiled=True, fixed_resolution=fixed, classes=meta.get("classes"),
                      meta=meta, in_chans=in_chans or 3)


def _exported_input(path: str | Path, module: nn.Module, meta: dict
                    ) -> tuple[int | None, int | None]:
    """(channels, square size) a torch.export module was specialised to: its input
    placeholder's shape (what the module's guards check), else the metadata's input_size; None
    for what is dynamic or unknown. The channels matter for a file not made by fasttrain (a
    1-channel network was fed 3 channels and failed its guard).

    Raises:
        SourceError: a fixed non-square input size (the benchmark's inputs are square).
    """
    graph = getattr(module, "graph", None)
    inputs = [n for n in graph.nodes if n.op == "placeholder"] if graph is not None else []
    shape = getattr(inputs[0].meta.get("val"), "shape", None) if inputs else None
    if shape is not None and len(shape) == 4:
        c, h, w = shape[1], shape[2], shape[3]
        chans = int(c) if isinstance(c, int) else None
        if isinstance(h, int) and isinstance(w, int):
            if h != w:
                raise SourceError(f"{path}: exported for {h}x{w} inputs only; the benchmark "
                                  f"and evaluation run square inputs")
            return chans, int(h)
        return chans, None
    size = meta.get("input_size")
    return (int(size[0]), int(size[1])) if size else (None, None)


# Source files of the modules from_factory imported: (mtime_ns, size) when imported.
_IMPORTED: dict[str, tuple[int, int]] = {}


def _stamp(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size


def _user_folders() -> list[str]:
    """Where the user's own modules are: the current directory first (as `python -m` has it;
    a notebook that changed directory imports the new folder's), then the folder `tools/env.sh`
    was run from (`FASTTRAIN_CALLER_DIR`: env.sh runs the command from the clone, so
    `--factory mynet:build` beside the user's shell was not found)."""
    cwd = os.getcwd()
    caller = os.environ.get("FASTTRAIN_CALLER_DIR")
    return [cwd, caller] if caller and os.path.realpath(caller) != os.path.realpath(cwd) \
        else [cwd]


@contextlib.contextmanager
def _current_directory_first():
    """The user's folders (`_user_folders`) first on sys.path for the duration only: the
    caller's sys.path is as it was afterwards."""
    folders = _user_folders()
    sys.path[:0] = folders
    try:
        yield
    finally:
        for folder in folders:
            sys.path.remove(folder)  # the first occurrence: the one inserted


def _import_as_now(mod_name: str):
    """The module `mod_name` as a new process would import it now: a module imported earlier
    in this process from another folder (a notebook that changed directory) is imported from
    where the search path finds it now, and one whose source file changed since this function
    imported it (edited between two benchmarks) is reloaded. Written here because importlib
    caches a module by name for the life of the process, whatever happened to its file."""
    top = mod_name.partition(".")[0]
    loaded = sys.modules.get(top)
    if loaded is not None and getattr(loaded, "__file__", None):
        importlib.invalidate_caches()
        found = importlib.machinery.PathFinder.find_spec(top, sys.path)
        here = [os.path.realpath(f) + os.sep for f in _user_folders()]
        origin = os.path.realpath(found.origin) if found and found.origin else None
        # only the user's own files, in the user's folders: an installed package is never
        # imported twice
        if (origin is not None and origin.startswith(tuple(here))
                and origin != os.path.realpath(loaded.__file__)):
            for name in [n for n in sys.modules if n == top or n.startswith(top + ".")]:
                del sys.modules[name]
    module = sys.modules.get(mod_name)
    where = getattr(module, "__file__", None)
    if module is not None and where in _IMPORTED and _IMPORTED[where] != _stamp(where):
        module = importlib.reload(module)
    else:
        module = importlib.import_module(mod_name)
    where = getattr(module, "__file__", None)
    if where:
        _IMPORTED[where] = _stamp(where)
    return module


def factory_file(spec: str | None) -> str | None:
    """The source file `from_factory(spec)` would import the module from (the current
    directory first), found without importing anything; None when there is none (no spec, a
    module not found, a built-in). Outputs are checked against it: `--json facs.py` for
    `--factory facs:build` replaced the user's code with the rows."""
    mod_name = (spec or "").partition(":")[0]
    if not mod_name:
        return None
    found = None
    with _current_directory_first():
        path = list(sys.path)
        for part in mod_name.split("."):
            try:
                found = importlib.machinery.PathFinder.find_spec(part, path)
            except (ImportError, ValueError):
                return None
            if found is None:
                return None
            path = list(found.submodule_search_locations or [])
    return found.origin if found.has_location and found.origin else None


def from_factory(spec: str) -> BenchModel:
    """`package.module:function` → `function()`, which must return an nn.Module.

    The module is imported from `sys.path` with the current directory first (as `python -m`
    does), so a factory file next to the user's shell works without installing it; sys.path is
    restored afterwards. In a long-lived process (a notebook) the module is what a new process
    would import: from the current directory's file after a change of directory, and reloaded
    after its source file changed.

    Raises:
        SourceError: a malformed spec, or a module or function that fails (import error,
            syntax error, an exception raised at import or by the call, not a module).
    """
    mod_name, sep, fn_name = spec.partition(":")
    if not sep or not mod_name or not fn_name:
        raise SourceError(f"factory {spec!r} must look like package.module:function")
    with _current_directory_first():
        try:
            module = _import_as_now(mod_name)
        except ImportError as e:
            raise SourceError(f"factory {spec!r}: cannot import {mod_name!r} ({e})") from None
        except Exception as e:  # the user's code: a syntax error, or anything it raises
            raise SourceError(f"factory {spec!r}: importing {mod_name!r} failed "
                              f"({first_line(e)})") from None
        fn = getattr(module, fn_name, None)
        if not callable(fn):
            raise SourceError(f"factory {spec!r}: {mod_name!r} has no callable {fn_name!r}")
        try:  # (a factory may import its folder's modules when called)
            model = fn()
        except Exception as e:
            raise SourceError(f"factory {spec!r}: calling it failed ({first_line(e)})"
                              ) from None
    if not isinstance(model, nn.Module):
        raise SourceError(f"factory {spec!r} returned {type(model).__name__}, not an nn.Module")
    lazy = next((type(m).__name__ for m in model.modules()
                 if isinstance(m, nn.modules.lazy.LazyModuleMixin)
                 and m.has_uninitialized_params()), None)
    if lazy is not None:  # neither counted nor timed: numel() of its weight raises
        raise SourceError(f"factory {spec!r}: its {lazy} has no parameters yet (a lazy layer "
                          f"sizes them at its first forward, from the input's size); run one "
                          f"forward pass at the benchmark's resolution in the factory")
    # The spec names a module relative to the current directory: the file it was imported
    # from tells two `nets:build` of different folders apart in a saved record.
    where = getattr(module, "__file__", None)
    source = f"{spec} ({Path(where).resolve()})" if where else spec
    # What its norm layers run, as for fasttrain models: compare.py refuses to mix latency rows
    # of different norm_act, and a plain module's BatchNorm is the native one.
    from ..ops.bn_relu import BatchNormReLU2d as FusedBNReLU

    norm_act = "fused" if any(isinstance(m, FusedBNReLU) for m in model.modules()) else "native"
    # A torch.compile'd module: fvcore cannot trace the compiled function, its module it can.
    count_model = getattr(model, "_orig_mod", model)
    # A network for grey or multispectral images says so in its first convolution.
    first_conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    in_chans = first_conv.in_channels if first_conv is not None else 3
    return BenchModel(spec, None, source, model.eval(), 224, None, norm_act, count_model,
                      in_chans=in_chans)
