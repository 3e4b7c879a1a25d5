import importlib.util
import io
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT.parent / "shared" / "reference"


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: takes more than a few seconds (still run in CI)")
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU (skipped without one)")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="no CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _cpu_unless_marked_cuda(request, monkeypatch):
    """Tests not marked `cuda` check what CI checks, the CPU behaviour, on a GPU host too:
    `auto` devices resolve to the CPU in this process and in the processes a test starts (a
    two-rank gloo test otherwise gave rank 1 no GPU on a one-GPU host, and bit-identity
    checks ran on CUDA with TF32 and torch.compile)."""
    if "cuda" in request.keywords or not torch.cuda.is_available():
        return
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.fixture(scope="session")
def data_root(tmp_path_factory) -> Path:
    """A session-wide data directory holding the built-in digits (built once)."""
    from fasttrain.data import build_digits

    root = tmp_path_factory.mktemp("data")
    build_digits(root / "digits")
    return root


@pytest.fixture
def run_tool(data_root, tmp_path):
    """Run a tools/ script in a subprocess with the test data directory; returns the result."""

    def run(script: str, *args: str, timeout: float = 300, extra_env=None):
        env = {**os.environ, "FASTTRAIN_DATA": str(data_root), **(extra_env or {})}
        return subprocess.run([sys.executable, str(ROOT / "tools" / script), *args],
                              cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=timeout)

    return run


def load_tool(name: str):
    """Import tools/<name>.py as a module (the tools are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(f"_tool_{name}", ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_code_running_checkpoint(path: Path, marker: Path) -> Path:
    """A pickle shaped like a checkpoint whose unpickling would create `marker` (a hostile file:
    loading it must be refused)."""

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path.write_bytes(pickle.dumps({"model": Evil()}, protocol=2))
    return path


class ReaderGone(io.StringIO):
    """A stdout whose reader has gone (`| head`): every write raises BrokenPipeError."""

    def write(self, text):
        raise BrokenPipeError(32, "Broken pipe")
