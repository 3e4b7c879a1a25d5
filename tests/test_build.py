"""The native build: setup.py always builds the CPU library, and the CUDA one wherever nvcc and a
CUDA torch are present. Outside test_bn_relu.py, whose op tests skip when the library is not
loaded: here a missing library fails."""
from __future__ import annotations

import shutil

import pytest
import torch

from fasttrain.ops import _ext


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
