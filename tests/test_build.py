"""The native build: setup.py always builds the CPU library, and the CUDA one wherever nvcc and a
CUDA torch are present. Outside test_bn_relu.py, whose op tests skip when the library is not
loaded: here a missing library fails."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fasttrain.ops import _ext

ROOT = Path(__file__).resolve().parents[1]


def test_build_records_what_it_built():
    """The libraries are built from the current sources, and the CUDA one whenever nvcc and a
    CUDA torch are present (so a CUDA compile error fails CI instead of silently skipping)."""
    assert _ext.HAS_EXT, f"the fused-op library is not loaded: {_ext.LOAD_ERRORS}"
    info = _ext.BUILD_INFO
    assert info, f"no build info: {_ext.LOAD_ERRORS}"
    assert not _ext.is_stale(), ("csrc/ changed since the library was built: rebuild with "
                                 "`pip install --no-build-isolation -e .`")
    if info.get("cuda_reason") == "FASTTRAIN_CUDA=0":
        pytest.skip("built with FASTTRAIN_CUDA=0")
    if shutil.which("nvcc") and torch.version.cuda:
        assert info["cuda"], f"nvcc and a CUDA torch are present but: {info['cuda_reason']}"
    if info["cuda"]:
        assert _ext.HAS_CUDA_EXT, _ext.LOAD_ERRORS
        assert info["arch_list"]
        # Each requested architecture has device code in the library (sm_XX in the fatbinary).
        blob = _ext.library_path("_C_cuda").read_bytes()
        for arch in info["arch_list"].replace(" ", ";").split(";"):
            sm = "sm_" + arch.split("+")[0].replace(".", "")
            assert sm.encode() in blob, f"{sm} missing from {_ext.library_path('_C_cuda')}"


@pytest.mark.parametrize("env, message", [
    ({"FASTTRAIN_CUDA": "1", "TORCH_CUDA_ARCH_LIST": "7.x"},
     "TORCH_CUDA_ARCH_LIST='7.x': Unknown CUDA arch (7.x)"),
    ({"FASTTRAIN_CUDA": "1", "TORCH_CUDA_ARCH_LIST": ""}, "TORCH_CUDA_ARCH_LIST is empty"),
    ({"FASTTRAIN_CUDA": "1", "CUDA_HOME": "/nonexistent"},
     "no nvcc under CUDA_HOME=/nonexistent/bin (it overrides PATH)"),
])
def test_build_settings_that_cannot_work_fail_in_one_line_before_compiling(tmp_path, env,
                                                                           message):
    if env.get("CUDA_HOME") is None and shutil.which("nvcc") is None:
        pytest.skip("needs nvcc on PATH")
    if torch.version.cuda is None:
        pytest.skip("needs a CUDA build of torch")
    for name in ("setup.py", "csrc"):  # a copy: nothing is written next to the real sources
        src = ROOT / name
        (shutil.copytree if src.is_dir() else shutil.copy)(src, tmp_path / name)
    result = subprocess.run([sys.executable, "setup.py", "--version"], cwd=tmp_path,
                            env={**os.environ, **env}, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode != 0
    errors = [l for l in result.stderr.splitlines() if l.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: fasttrain build: "), result.stderr
    assert message in errors[0] and "Traceback" not in result.stderr


def _env_sh(tmp_path: Path, python: str) -> subprocess.CompletedProcess:
    """tools/env.sh with an empty cache under tmp_path (relative, from tmp_path) and PYTHON set:
    what happens before any venv is made."""
    env = {**os.environ, "FASTTRAIN_CACHE": "cache", "PYTHON": python}
    return subprocess.run(["bash", str(ROOT / "tools" / "env.sh"), "true"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=60)


@pytest.mark.skipif(shutil.which("flock") is None, reason="env.sh needs flock (util-linux)")
def test_env_sh_refuses_an_unusable_python_and_clears_interrupted_venvs(tmp_path):
    """Before: an old Python failed deep in pip (no matching matplotlib), a missing one fell
    back to python3 silently, a relative cache left the command outside the venv, and an
    interrupted venv of other requirements stayed forever (~6 GB)."""
    (tmp_path / "cache" / "venv-0123456789abcdef" / "lib").mkdir(parents=True)  # no .complete
    (tmp_path / "cache" / "venv-fedcba9876543210").mkdir()
    (tmp_path / "cache" / "venv-fedcba9876543210" / ".complete").touch()  # a finished one: kept
    result = _env_sh(tmp_path, "no-such-python")
    assert result.returncode == 1
    assert result.stderr.splitlines()[-1] == \
        "[env] error: PYTHON=no-such-python: not a working Python interpreter"
    assert f"[env] removing {tmp_path}/cache/venv-0123456789abcdef (an interrupted set-up)" \
        in result.stderr  # the relative cache was made absolute
    assert [p.name for p in (tmp_path / "cache").glob("venv-*")] == ["venv-fedcba9876543210"]
    old = tmp_path / "python3.10"
    old.write_text('#!/bin/sh\ncase "$2" in *print*) echo 3.10;; *exit*) exit 1;; esac\n')
    old.chmod(0o755)
    result = _env_sh(tmp_path, str(old))
    assert result.returncode == 1
    assert result.stderr.splitlines()[-1] == (
        f"[env] error: {old} is Python 3.10; fasttrain needs 3.11 or newer (set "
        f"PYTHON=python3.11)")
