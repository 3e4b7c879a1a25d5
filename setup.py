"""fasttrain: fast training and honest measurement of uniformly thin ResNets.

Besides the Python package this builds the `fasttrain` operator libraries (csrc/), placed next to
fasttrain/ops/ and loaded by fasttrain/ops/_ext.py:

- fasttrain/ops/_C       schemas + CPU kernels: always built (needs torch at build time);
                         multithreaded with OpenMP where the C++ compiler takes -fopenmp
                         (Apple clang does not: then single-threaded);
- fasttrain/ops/_C_cuda  CUDA kernels: built when `nvcc` and a CUDA build of torch are present;
- fasttrain/data/_jpeg   region JPEG decoding (plain C, ctypes API): built when libjpeg-turbo's
                         development files are present (Debian: libjpeg62-turbo-dev).

Environment:
  FASTTRAIN_CUDA=1|0      force the CUDA library on (an error if it cannot be built) or off;
                          unset: build it when possible.
  TORCH_CUDA_ARCH_LIST    GPU architectures to compile for (default "8.0;9.0+PTX": A100, H100
                          and, JIT-compiled from PTX, newer GPUs). Set explicitly because
                          without a GPU torch cannot guess it.
  CUDA_HOME               toolkit root; unset: the root of the `nvcc` found on PATH.
  FASTTRAIN_JPEG=1|0      force the region JPEG decoder on (an error without libjpeg-turbo's
                          headers) or off; unset: build it when possible.

Build with the installed torch (`pip install --no-build-isolation -e .`, as tools/env.sh does):
the libraries link against that torch's C++ ABI. Without torch only the package metadata is
produced (sdist, egg_info).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).resolve().parent
CSRC = ROOT / "csrc"
GENERATED = ROOT / "build" / "generated"
DEFAULT_ARCH_LIST = "8.0;9.0+PTX"
SOURCE_SUFFIXES = (".h", ".cuh", ".c", ".cpp", ".cu")


def say(msg: str) -> None:
    print(f"[fasttrain build] {msg}", file=sys.stderr, flush=True)


def fail(msg: str) -> None:
    raise SystemExit(f"error: fasttrain build: {msg}")


def sources_sha256(csrc: Path) -> str:
    """Hash of every C++/CUDA source under csrc/ (fasttrain/ops/_ext.py computes the same)."""
    h = hashlib.sha256()
    for p in sorted(csrc.rglob("*")):
        if p.is_file() and p.suffix in SOURCE_SUFFIXES:
            h.update(p.relative_to(csrc).as_posix().encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()


def cuda_home_setting() -> str | None:
    """`CUDA_HOME=...` (or `CUDA_PATH=...`) as set, for messages; None when neither is set."""
    for key in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(key):
            return f"{key}={os.environ[key]}"
    return None


def find_nvcc() -> str | None:
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home:
        nvcc = Path(home) / "bin" / "nvcc"
        return str(nvcc) if nvcc.exists() else None
    return shutil.which("nvcc")


def check_arch_list(value: str) -> dict[str, list[str]]:
    """TORCH_CUDA_ARCH_LIST, checked by torch's own parser now (names like 'Hopper', '9.0a',
    '8.6+PTX'), so a bad entry is one line before anything compiles: torch itself fails deep
    in the build, after the CPU libraries, and an empty value is an IndexError there.

    Returns what the library will hold, from the nvcc flags torch derives: {"sm": cubins,
    "ptx": PTX versions}, e.g. {"sm": ["80", "90"], "ptx": ["90"]} for '8.0;9.0+PTX'. The
    loader compares them with the GPU (fasttrain/ops/_ext.py)."""
    if not value.replace(";", " ").strip():
        fail(f"TORCH_CUDA_ARCH_LIST is empty; unset it for the default {DEFAULT_ARCH_LIST!r} or "
             f"name architectures such as '9.0'")
    if "" in value.replace(";", " ").split(" "):  # torch: "Unknown CUDA arch ()", no value
        fail(f"TORCH_CUDA_ARCH_LIST={value!r}: an empty entry (a doubled, leading or trailing "
             f"separator); separate architectures by one ';' or space, e.g. '8.0;9.0'")
    from torch.utils.cpp_extension import _get_cuda_arch_flags

    try:
        flags = _get_cuda_arch_flags()
    except (ValueError, IndexError) as e:
        reason = str(e) if isinstance(e, ValueError) else "'native' needs a visible GPU"
        fail(f"TORCH_CUDA_ARCH_LIST={value!r}: {reason}")
    codes = [c for f in flags for m in re.finditer(r"code=\[?([\w,]+)", f)
             for c in m.group(1).split(",")]
    return {"sm": sorted({c[3:] for c in codes if c.startswith("sm_")}),
            "ptx": sorted({c[8:] for c in codes if c.startswith("compute_")})}


def remove_stale(pattern: str, why: str) -> None:
    """Deletes a library an earlier build left that this build does not make: the loader would
    otherwise load kernels built from other sources (no hash of its own to tell)."""
    for path in ROOT.glob(pattern):
        say(f"removing {path.relative_to(ROOT)}: not built this time ({why})")
        path.unlink()


def build_ext_removing_stale(base: type, stale: list[tuple[str, str]]) -> type:
    """`base` (torch's BuildExtension) that, once an in-place build (editable install, `develop`,
    `build_ext --inplace`) has succeeded, deletes the libraries it skipped: only then are the
    source tree's libraries this build's, and a failed build keeps the working ones."""

    class BuildExt(base):
        def run(self) -> None:
            super().run()
            if self.inplace or getattr(self, "editable_mode", False):
                for pattern, why in stale:
                    remove_stale(pattern, why)

    return BuildExt


def nvcc_release(nvcc: str) -> str:
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
    except OSError as e:  # not executable, a folder, a broken interpreter line
        fail(f"cannot run `{nvcc} --version`: {e.strerror}")
    m = re.search(r"release (\d+\.\d+)", out)
    if not m:
        fail(f"cannot read the CUDA release from `{nvcc} --version`")
    return m.group(1)


def toolkit_root(nvcc: str) -> Path:
    """The toolkit `nvcc` belongs to. torch's own guess may pick a root without libcudart."""
    root = Path(os.path.realpath(nvcc)).parent.parent
    if (root / "include" / "cuda_runtime.h").exists():
        return root
    # A wrapper script (e.g. /usr/local/bin/nvcc exec-ing the real one): nvcc reports its TOP.
    out = subprocess.run([nvcc, "--dryrun", "-E", "fasttrain_probe.cu"], capture_output=True,
                         text=True)
    m = re.search(r"^#\$ TOP=(.+)$", out.stdout + out.stderr, re.MULTILINE)
    if m and (Path(m.group(1)) / "include" / "cuda_runtime.h").exists():
        return Path(os.path.realpath(m.group(1)))
    fail(f"cannot find the CUDA toolkit of {nvcc} (no include/cuda_runtime.h); set CUDA_HOME")


def decide_cuda(torch) -> tuple[bool, str, str | None]:
    """(build the CUDA library?, why, nvcc path); a clear error where the request cannot be met."""
    flag = os.environ.get("FASTTRAIN_CUDA", "")
    if flag not in ("", "0", "1"):
        fail(f"FASTTRAIN_CUDA must be 0, 1 or unset, got {flag!r}")
    if flag == "0":
        return False, "FASTTRAIN_CUDA=0", None
    nvcc = find_nvcc()
    if torch.version.cuda is None or nvcc is None:
        home = cuda_home_setting()
        missing = ("a CUDA build of torch" if torch.version.cuda is None
                   else f"nvcc under {home}/bin (it overrides PATH)" if home
                   else "nvcc (PATH or CUDA_HOME)")
        if flag == "1":
            fail(f"FASTTRAIN_CUDA=1 but there is no {missing}; torch {torch.__version__}")
        return False, f"no {missing}", None
    release = nvcc_release(nvcc)
    if release.split(".")[0] != torch.version.cuda.split(".")[0]:
        fail(f"{nvcc} is CUDA {release} but torch {torch.__version__} was built with CUDA "
             f"{torch.version.cuda}: install a matching toolkit or point CUDA_HOME at one, or set "
             f"FASTTRAIN_CUDA=0 to build the CPU library only")
    why = "FASTTRAIN_CUDA=1" if flag == "1" else "nvcc and a CUDA torch found"
    return True, f"{why} (nvcc {release} at {nvcc})", nvcc


def decide_jpeg() -> tuple[bool, str]:
    """(build fasttrain/data/_jpeg?, why): compiles and links a probe that calls libjpeg-turbo's
    partial-decoding functions (libjpeg-turbo >= 1.5), so a plain IJG libjpeg is refused too."""
    flag = os.environ.get("FASTTRAIN_JPEG", "")
    if flag not in ("", "0", "1"):
        fail(f"FASTTRAIN_JPEG must be 0, 1 or unset, got {flag!r}")
    if flag == "0":
        return False, "FASTTRAIN_JPEG=0"
    import sysconfig
    import tempfile
    cc = (sysconfig.get_config_var("CC") or "cc").split()
    probe = ("#include <stdio.h>\n#include <jpeglib.h>\nint main(void) {\n"
             "  struct jpeg_decompress_struct c; JDIMENSION x = 0, w = 0;\n"
             "  jpeg_crop_scanline(&c, &x, &w); jpeg_skip_scanlines(&c, 0); return 0; }\n")
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "probe.c"
        src.write_text(probe)
        try:
            result = subprocess.run(cc + [str(src), "-o", str(Path(tmp) / "probe"), "-ljpeg"],
                                    capture_output=True, text=True)
            ok, detail = result.returncode == 0, (result.stderr.strip().splitlines() or [""])[0]
        except OSError as e:
            ok, detail = False, str(e)
    if ok:
        return True, "libjpeg-turbo headers and library found"
    why = f"no libjpeg-turbo >= 1.5 development files (Debian: libjpeg62-turbo-dev): {detail}"
    if flag == "1":
        fail(f"FASTTRAIN_JPEG=1 but {why}")
    return False, why


def decide_openmp() -> tuple[bool, str]:
    """(compile and link fasttrain/ops/_C with -fopenmp?, why): builds a probe with the flag,
    with the C++ compiler torch's build runs (CXX, else c++). Apple clang has no -fopenmp
    ("unsupported option"), which failed the whole install on macOS; without the flag
    at::parallel_for's OpenMP pragma is never compiled in and its loop runs in the calling thread,
    same results (the CPU kernels merge their chunks in a fixed order), one core."""
    import shlex
    import tempfile
    from torch.utils.cpp_extension import get_cxx_compiler
    cxx = shlex.split(get_cxx_compiler())
    probe = ("int main() {\n  int s = 0;\n#pragma omp parallel for reduction(+ : s)\n"
             "  for (int i = 0; i < 4; ++i) s += i;\n  return s != 6;\n}\n")
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "probe.cpp"
        src.write_text(probe)
        try:
            result = subprocess.run(cxx + ["-fopenmp", str(src), "-o", str(Path(tmp) / "probe")],
                                    capture_output=True, text=True)
            ok, detail = result.returncode == 0, (result.stderr.strip().splitlines() or [""])[0]
        except OSError as e:  # no such compiler: the build itself will say so
            ok, detail = False, str(e)
    if ok:
        return True, f"{shlex.join(cxx)} accepts -fopenmp"
    return False, (f"{shlex.join(cxx)} cannot build with -fopenmp ({detail}): at::parallel_for "
                   f"runs on one thread")


def write_build_info(info: dict) -> None:
    """build/generated/fasttrain_build_info.h: the build's decisions, compiled into _C."""
    GENERATED.mkdir(parents=True, exist_ok=True)
    text = ("// Generated by setup.py; do not edit.\n#pragma once\n#define FASTTRAIN_BUILD_INFO "
            + json.dumps(json.dumps(info, sort_keys=True)) + "\n")
    path = GENERATED / "fasttrain_build_info.h"
    if not path.exists() or path.read_text() != text:  # unchanged: no needless recompile
        path.write_text(text)


def extensions() -> tuple[list, dict]:
    try:
        import torch
    except ImportError:
        say("torch is not importable: building no operator library (metadata only)")
        return [], {}
    cuda, why, nvcc = decide_cuda(torch)
    jpeg, jpeg_why = decide_jpeg()
    arch_list, targets, stale = None, None, []
    if cuda:
        os.environ.setdefault("CUDA_HOME", str(toolkit_root(nvcc)))
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCH_LIST)
        arch_list = os.environ["TORCH_CUDA_ARCH_LIST"]
        targets = check_arch_list(arch_list)
    else:
        stale.append(("fasttrain/ops/_C_cuda*.so", why))
    if not jpeg:
        stale.append(("fasttrain/data/_jpeg*.so", jpeg_why))
    # Imported only now: torch.utils.cpp_extension reads CUDA_HOME at import time (importing it
    # earlier linked against the toolkit torch guessed: /usr/local for a wrapper
    # /usr/local/bin/nvcc, "cannot find -lcudart"). Whatever imports it runs after this line.
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
    openmp, openmp_why = decide_openmp()

    write_build_info({"cuda": cuda, "cuda_reason": why, "arch_list": arch_list,
                      "cuda_sm": targets and targets["sm"], "cuda_ptx": targets and targets["ptx"],
                      "jpeg": jpeg, "openmp": openmp,
                      "torch": torch.__version__, "torch_cuda": torch.version.cuda,
                      "sources_sha256": sources_sha256(CSRC)})
    headers = [str(p.relative_to(ROOT)) for p in sorted(CSRC.rglob("*.h"))]
    openmp_flag = ["-fopenmp"] if openmp else []
    exts = [CppExtension(
        "fasttrain.ops._C", ["csrc/fasttrain.cpp", "csrc/cpu/bn_relu_cpu.cpp",
                             "csrc/cpu/resize_u8.cpp"],
        include_dirs=[str(CSRC), str(GENERATED)],
        depends=headers + [str(GENERATED / "fasttrain_build_info.h")],
        # at::parallel_for is OpenMP in inline headers: without -fopenmp it runs serially.
        extra_compile_args={"cxx": ["-O3", *openmp_flag]}, extra_link_args=openmp_flag)]
    if jpeg:
        from setuptools import Extension
        exts.append(Extension("fasttrain.data._jpeg", ["csrc/jpeg/jpeg_region.c"],
                              libraries=["jpeg"], extra_compile_args=["-O2"]))
    if cuda:
        exts.append(CUDAExtension(
            "fasttrain.ops._C_cuda", ["csrc/cuda/bn_relu_cuda.cu"],
            include_dirs=[str(CSRC)], depends=headers,
            extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "-lineinfo"]}))
    bar = "=" * 78
    say(bar)
    say(f"torch {torch.__version__} (CUDA {torch.version.cuda})")
    say(f"CPU library  fasttrain/ops/_C: yes, {'with' if openmp else 'WITHOUT'} OpenMP "
        f"({openmp_why})")
    say(f"JPEG library fasttrain/data/_jpeg: {'yes' if jpeg else 'NO'} ({jpeg_why})")
    if cuda:
        say(f"CUDA library fasttrain/ops/_C_cuda: yes, {why}")
        say(f"             TORCH_CUDA_ARCH_LIST={arch_list}, CUDA_HOME={os.environ['CUDA_HOME']}")
    else:
        say(f"CUDA library fasttrain/ops/_C_cuda: NO ({why})")
    say(bar)
    return exts, {"build_ext": build_ext_removing_stale(BuildExtension, stale)}


ext_modules, cmdclass = extensions()

setup(
    name="fasttrain",
    version="0.1.0",
    description="Train and measure ThinResNets (arXiv 2309.12854) fast",
    packages=find_packages(include=["fasttrain", "fasttrain.*"]),
    package_data={"fasttrain.compare": ["data/*.csv"]},
    python_requires=">=3.11",
    install_requires=[
        "torch>=2.11",
        "torchvision>=0.26",
        "fvcore",
        "rich",
        "PyYAML",
        "matplotlib",
        "scikit-learn",
    ],
    extras_require={
        "test": ["pytest", "pytest-timeout"],
        # FFCV builds from source against Debian's libopencv-dev, libturbojpeg0-dev, pkg-config
        # (tools/env.sh installs them); 1.0.2 is the last release.
        "ffcv": ["ffcv==1.0.2", "numba", "opencv-python", "pillow"],
        "dali": ["nvidia-dali-cuda130"],
        "prune": ["torch-pruning>=1.6"],
        "tensorboard": ["tensorboard"],  # log.tensorboard: true
        "onnx": ["onnx", "onnxscript", "onnxruntime"],  # tools/export.py --format onnx
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
