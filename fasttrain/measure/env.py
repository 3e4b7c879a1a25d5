"""The conditions a measurement was taken under: device, driver, versions, commit, date.

Every benchmark row and every exported file carries these fields, so a number can always be traced
back to the machine, the software and the code that produced it (DESIGN.md §5).
"""
from __future__ import annotations

import ctypes
import datetime
import functools
import os
import platform
import subprocess
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
"""The fasttrain checkout (the git repository whose commit is recorded)."""


NOT_CODE = ("benchmarks/results", "docs", "*.md")
"""Tracked paths whose edits do not make a commit `-dirty` (results and documentation)."""


def git_commit(root: Path = ROOT) -> str:
    """Short commit of `root`, with `-dirty` when tracked code differs; "unknown" when `root`
    is not the top of a git checkout (outside git, or an installed copy inside another
    repository).
    Result files and documentation do not count: `--save` appends to tracked result files, and
    those edits must not mark the next measurement as made with changed code.

    `FASTTRAIN_COMMIT` overrides it: a GPU host receives a copy of the tree without `.git`, so
    `benchmarks/gpu_checklist.sh` passes the commit it was started from.

    Asked anew at every call (~10 ms): a process that lives on (a notebook) while the code is
    edited or committed wrote the first answer into every later checkpoint and result."""
    if os.environ.get("FASTTRAIN_COMMIT"):
        return os.environ["FASTTRAIN_COMMIT"]
    try:
        # An installed copy (site-packages, perhaps in a venv inside the user's own repository)
        # is no checkout: git would answer with the enclosing repository's commit.
        top = subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=root,
                             capture_output=True, text=True, timeout=10)
        if top.returncode != 0 or Path(top.stdout.strip()).resolve() != Path(root).resolve():
            return "unknown"
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root,
                             capture_output=True, text=True, timeout=10)
        if out.returncode != 0:
            return "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--",
                                ".", *(f":(exclude){p}" for p in NOT_CODE)], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() + ("-dirty" if dirty else "")


def usable_cores() -> int:
    """The cores this process may run on: its affinity mask (taskset, cgroup cpusets, Slurm)
    where the platform has one (Linux), else every core (macOS has no such call)."""
    affinity = getattr(os, "sched_getaffinity", None)
    if affinity is not None:
        return len(affinity(0))
    return os.cpu_count() or 1


@functools.lru_cache(maxsize=None)
def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@functools.lru_cache(maxsize=None)
def nvidia_driver() -> str | None:
    """The NVIDIA driver version (e.g. "550.54.15") from nvidia-smi, else None."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    lines = out.stdout.strip().splitlines()
    return lines[0].strip() if out.returncode == 0 and lines else None


def cuda_driver_api_version() -> str | None:
    """The CUDA driver API version (e.g. "cuda-driver-api-13.0") from libcuda's
    cuDriverGetVersion, else None. torch has no public call for it (torch._C's private one is
    gone), hence ctypes."""
    try:
        libcuda = ctypes.CDLL("libcuda.so.1")
        version = ctypes.c_int()
        if libcuda.cuDriverGetVersion(ctypes.byref(version)) != 0:
            return None
    except (OSError, AttributeError):
        return None
    return f"cuda-driver-api-{version.value // 1000}.{version.value % 1000 // 10}"


def device_name(device: torch.device) -> str:
    """Marketing name of a CUDA device, or the CPU model."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_name()


def conditions(device: torch.device | str) -> dict[str, object]:
    """Machine and software fields of a result row.

    Returns:
        device, device_name, driver (NVIDIA driver version; None on CPU), threads (CPU intra-op
        threads), torch_version, cuda_version (of the torch build; None for CPU builds),
        cudnn_version, python_version, commit (fasttrain's git commit), date (UTC, ISO 8601),
        load_avg_1m (the host's 1-minute load average, the benchmark's own threads included:
        well above `threads` means other work competed for the CPU; None where unknown).
    """
    device = torch.device(device)
    driver = None
    if device.type == "cuda":
        driver = nvidia_driver()
        if driver is None:  # no nvidia-smi: fall back to the CUDA driver API version
            driver = cuda_driver_api_version()
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    return {
        "device": device.type,
        "device_name": device_name(device),
        "driver": driver,
        "threads": torch.get_num_threads(),
        "torch_version": str(torch.__version__),
        "cuda_version": torch.version.cuda,
        "cudnn_version": cudnn,
        "python_version": platform.python_version(),
        "commit": git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "load_avg_1m": _load_avg(),
    }


def _load_avg() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except (OSError, AttributeError):  # not on every platform
        return None
