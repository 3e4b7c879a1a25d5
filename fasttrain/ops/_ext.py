"""Loads fasttrain's compiled operator libraries; importing this module never raises.

`setup.py` builds `_C` (operator schemas + CPU kernels) always and `_C_cuda` (CUDA kernels) when
nvcc and a CUDA torch were present. After import:

- `HAS_EXT`: `torch.ops.fasttrain` exists with CPU kernels;
- `HAS_CUDA_EXT`: the CUDA kernels are registered too (they need a GPU only to run);
- `BUILD_INFO`: what setup.py decided (`cuda`, `cuda_reason`, `arch_list`, `torch`,
  `sources_sha256`), read from the library itself; `{}` without one;
- `LOAD_ERRORS`: library name -> why it did not load (missing file, ABI mismatch, ...).

Callers fall back to the pure-PyTorch reference where a library is missing (fasttrain.ops.bn_relu).
"""
from __future__ import annotations

import ctypes
import hashlib
import importlib.machinery
import json
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
CSRC = HERE.parents[1] / "csrc"  # present in a source checkout (editable install)
SOURCE_SUFFIXES = (".h", ".cuh", ".c", ".cpp", ".cu")

HAS_EXT = False
HAS_CUDA_EXT = False
BUILD_INFO: dict = {}
LOAD_ERRORS: dict[str, str] = {}


def library_path(name: str) -> Path | None:
    """The built library `fasttrain/ops/<name>.<python extension suffix>`, or None."""
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = HERE / f"{name}{suffix}"
        if path.is_file():
            return path
    return None


def sources_sha256(csrc: Path = CSRC) -> str | None:
    """Hash of the C++/CUDA sources, computed as setup.py does; None outside a source checkout."""
    if not csrc.is_dir():
        return None
    h = hashlib.sha256()
    for p in sorted(csrc.rglob("*")):
        if p.is_file() and p.suffix in SOURCE_SUFFIXES:
            h.update(p.relative_to(csrc).as_posix().encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()


def _load(name: str) -> Path | None:
    path = library_path(name)
    if path is None:
        LOAD_ERRORS[name] = (f"fasttrain/ops/{name}*.so is not built; build it with "
                             f"`pip install --no-build-isolation -e .` (tools/env.sh does)")
        return None
    try:
        torch.ops.load_library(str(path))
    except (OSError, RuntimeError) as e:  # e.g. built against another torch: undefined symbols
        LOAD_ERRORS[name] = f"{path.name} did not load: {e}"
        return None
    return path


def _init() -> None:
    global HAS_EXT, HAS_CUDA_EXT, BUILD_INFO
    path = _load("_C")
    if path is None:
        return
    HAS_EXT = True
    try:
        fn = ctypes.CDLL(str(path)).fasttrain_build_info
        fn.restype = ctypes.c_char_p
        BUILD_INFO = json.loads(fn().decode())
    except (OSError, AttributeError, ValueError) as e:
        LOAD_ERRORS["build_info"] = str(e)
    if torch.version.cuda is None:
        if library_path("_C_cuda") is not None:
            LOAD_ERRORS["_C_cuda"] = f"torch {torch.__version__} is not a CUDA build"
        return
    HAS_CUDA_EXT = _load("_C_cuda") is not None


_init()


def is_stale() -> bool:
    """True when csrc/ changed since the loaded library was built (source checkouts only)."""
    current = sources_sha256()
    return bool(HAS_EXT and current and current != BUILD_INFO.get("sources_sha256"))


def supports(device: torch.device) -> bool:
    """Whether the compiled kernels cover tensors on `device`."""
    if device.type == "cpu":
        return HAS_EXT
    if device.type == "cuda":
        return HAS_CUDA_EXT
    return False


def unavailable_reason(device: torch.device) -> str:
    """One line saying why `supports(device)` is False."""
    if device.type not in ("cpu", "cuda"):
        return f"no fasttrain kernels for device type {device.type!r}"
    name = "_C" if device.type == "cpu" or not HAS_EXT else "_C_cuda"
    if name == "_C_cuda" and BUILD_INFO.get("cuda") is False:
        return f"the CUDA library was not built ({BUILD_INFO.get('cuda_reason')})"
    return LOAD_ERRORS.get(name, f"fasttrain/ops/{name} is not loaded")
