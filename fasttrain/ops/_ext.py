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
import functools
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
                             f"`pip install --no-build-isolation -e .` in a checkout (tools/env.sh"
                             f" does), or install with --no-build-isolation")
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
    skip = cuda_skip_reason(BUILD_INFO, torch.version.cuda)
    if skip is not None:
        if library_path("_C_cuda") is not None:
            LOAD_ERRORS["_C_cuda"] = skip
        return
    HAS_CUDA_EXT = _load("_C_cuda") is not None


def cuda_skip_reason(build_info: dict, torch_cuda: str | None) -> str | None:
    """Why not to load `_C_cuda` even if the file is there, or None to load it."""
    if torch_cuda is None:
        return f"torch {torch.__version__} is not a CUDA build"
    if build_info.get("cuda") is False:  # the file is left from an earlier build
        return (f"left from an earlier build: this build skipped CUDA "
                f"({build_info.get('cuda_reason')})")
    return None


_init()


def is_stale() -> bool:
    """True when csrc/ changed since the loaded library was built (source checkouts only)."""
    current = sources_sha256()
    return bool(HAS_EXT and current and current != BUILD_INFO.get("sources_sha256"))


def _capability(code: str) -> tuple[int, int]:
    """(major, minor) of an architecture code such as "80", "90a" or "100f"."""
    digits = code.rstrip("af")
    return int(digits[:-1]), int(digits[-1])


def _cubin_runs(code: str, major: int, minor: int) -> bool:
    """Whether a cubin for sm_<code> runs on a GPU of that capability: same major and a minor
    at least the cubin's; an arch-specific ("a") one on its own only."""
    want = _capability(code)
    if code.endswith("a"):
        return want == (major, minor)
    return want[0] == major and want[1] <= minor


def _ptx_runs(code: str, major: int, minor: int) -> bool:
    """Whether PTX for compute_<code> JIT-compiles for that capability: any later GPU."""
    want = _capability(code)
    return want == (major, minor) if code.endswith("a") else want <= (major, minor)


@functools.lru_cache(maxsize=None)
def cuda_arch_problem(index: int) -> str | None:
    """Why the CUDA library has no code for GPU `index`, or None when it has (or when an older
    build did not record its targets). Without this the first kernel launch on, say, an sm_75
    or sm_120 GPU fails with "no kernel image is available" instead of falling back."""
    sm, ptx = BUILD_INFO.get("cuda_sm"), BUILD_INFO.get("cuda_ptx")
    if sm is None and ptx is None:
        return None
    major, minor = torch.cuda.get_device_capability(index)
    if any(_cubin_runs(c, major, minor) for c in sm or ()) or \
            any(_ptx_runs(c, major, minor) for c in ptx or ()):
        return None
    built = ", ".join([f"sm_{c}" for c in sm or ()] + [f"PTX {c}" for c in ptx or ()])
    return (f"the CUDA library has no code for this GPU (compute capability {major}.{minor}; "
            f"built for {built}): rebuild with TORCH_CUDA_ARCH_LIST={major}.{minor}")


@torch.compiler.assume_constant_result  # a Python fact of the build, not traced into graphs
def _cuda_arch_ok(index: int) -> bool:
    return cuda_arch_problem(index) is None


def _cuda_index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def supports(device: torch.device) -> bool:
    """Whether the compiled kernels cover tensors on `device` (for CUDA: this GPU's
    architecture too)."""
    if device.type == "cpu":
        return HAS_EXT
    if device.type == "cuda":
        return HAS_CUDA_EXT and _cuda_arch_ok(_cuda_index(device))
    return False


def unavailable_reason(device: torch.device) -> str:
    """One line saying why `supports(device)` is False."""
    if device.type not in ("cpu", "cuda"):
        return f"no fasttrain kernels for device type {device.type!r}"
    name = "_C" if device.type == "cpu" or not HAS_EXT else "_C_cuda"
    if name == "_C_cuda" and BUILD_INFO.get("cuda") is False:
        return f"the CUDA library was not built ({BUILD_INFO.get('cuda_reason')})"
    if name == "_C_cuda" and HAS_CUDA_EXT:
        problem = cuda_arch_problem(_cuda_index(device))
        if problem:
            return problem
    return LOAD_ERRORS.get(name, f"fasttrain/ops/{name} is not loaded")
