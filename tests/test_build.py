"""The native build: setup.py always builds the CPU library, and the CUDA one wherever nvcc and a
CUDA torch are present. Outside test_bn_relu.py, whose op tests skip when the library is not
loaded: here a missing library fails."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
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
        # From what the build recorded: torch expands names (Hopper, Ampere) and "+PTX".
        for sm in ("sm_" + code for code in info.get("cuda_sm") or ()):
            assert sm.encode() in blob, f"{sm} missing from {_ext.library_path('_C_cuda')}"


@pytest.mark.parametrize("env, message", [
    ({"FASTTRAIN_CUDA": "1", "TORCH_CUDA_ARCH_LIST": "7.x"},
     "TORCH_CUDA_ARCH_LIST='7.x': Unknown CUDA arch (7.x)"),
    ({"FASTTRAIN_CUDA": "1", "TORCH_CUDA_ARCH_LIST": ""}, "TORCH_CUDA_ARCH_LIST is empty"),
    ({"FASTTRAIN_CUDA": "1", "TORCH_CUDA_ARCH_LIST": "8.0;"},
     "TORCH_CUDA_ARCH_LIST='8.0;': an empty entry"),
    ({"FASTTRAIN_CUDA": "1", "TORCH_CUDA_ARCH_LIST": "8.0  9.0"},
     "TORCH_CUDA_ARCH_LIST='8.0  9.0': an empty entry"),
    ({"FASTTRAIN_CUDA": "1", "CUDA_HOME": "/nonexistent"},
     "no nvcc under CUDA_HOME=/nonexistent/bin (it overrides PATH)"),
    # an nvcc that is not executable was a PermissionError traceback
    ({"FASTTRAIN_CUDA": "1", "CUDA_HOME": "{tmp}/cuda"},
     "cannot run `{tmp}/cuda/bin/nvcc --version`: Permission denied"),
])
def test_build_settings_that_cannot_work_fail_in_one_line_before_compiling(tmp_path, env,
                                                                           message):
    if env.get("CUDA_HOME") is None and shutil.which("nvcc") is None:
        pytest.skip("needs nvcc on PATH")
    if torch.version.cuda is None:
        pytest.skip("needs a CUDA build of torch")
    env = {k: v.replace("{tmp}", str(tmp_path)) for k, v in env.items()}
    message = message.replace("{tmp}", str(tmp_path))
    (tmp_path / "cuda" / "bin").mkdir(parents=True)
    (tmp_path / "cuda" / "bin" / "nvcc").write_text("not a program")  # mode 644
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


def _setup_copy(tmp_path: Path, env: dict) -> subprocess.CompletedProcess:
    """`setup.py --version` in a copy of setup.py and csrc/ (what runs before any compile)."""
    for name in ("setup.py", "csrc"):
        src = ROOT / name
        (shutil.copytree if src.is_dir() else shutil.copy)(src, tmp_path / name)
    return subprocess.run([sys.executable, "setup.py", "--version"], cwd=tmp_path,
                          env={**os.environ, **env}, capture_output=True, text=True, timeout=120)


def _setup_functions(root: Path) -> dict:
    """setup.py's definitions (not its setup() call), as if the file lived in `root`."""
    text = (ROOT / "setup.py").read_text().split("ext_modules, cmdclass = extensions()")[0]
    namespace = {"__file__": str(root / "setup.py"), "__name__": "setup_under_test"}
    exec(compile(text, str(ROOT / "setup.py"), "exec"), namespace)
    return namespace


def test_a_build_without_cuda_or_jpeg_removes_their_earlier_libraries(tmp_path, capsys):
    """A library left by an earlier build was loaded as if current: CUDA kernels from other
    sources ran, and is_stale() (which hashes what _C was built from) could not tell. Removed
    only after an in-place build succeeded: not by metadata commands (`--version`, egg_info,
    sdist), out-of-place wheel builds, or a build that fails (the working libraries stay)."""
    suffix = ".cpython-311-x86_64-linux-gnu.so"
    stale = [tmp_path / "fasttrain" / "ops" / f"_C_cuda{suffix}",
             tmp_path / "fasttrain" / "data" / f"_jpeg{suffix}"]
    for path in stale:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"old")
    result = _setup_copy(tmp_path, {"FASTTRAIN_CUDA": "0", "FASTTRAIN_JPEG": "0"})
    assert result.returncode == 0 and all(p.exists() for p in stale), result.stderr

    class Base:
        inplace, fails = True, False

        def run(self):
            if self.fails:
                raise RuntimeError("compile error")

    build = _setup_functions(tmp_path)["build_ext_removing_stale"](
        Base, [("fasttrain/ops/_C_cuda*.so", "FASTTRAIN_CUDA=0"),
               ("fasttrain/data/_jpeg*.so", "FASTTRAIN_JPEG=0")])
    out_of_place, failing = build(), build()
    out_of_place.inplace = False
    out_of_place.run()
    failing.fails = True
    with pytest.raises(RuntimeError):
        failing.run()
    assert all(p.exists() for p in stale)
    build().run()
    assert not any(p.exists() for p in stale)
    assert f"removing fasttrain/ops/_C_cuda{suffix}: not built this time (FASTTRAIN_CUDA=0)" \
        in capsys.readouterr().err


def test_a_compiler_without_openmp_builds_the_cpu_library_single_threaded(tmp_path,
                                                                          monkeypatch, capsys):
    """Apple clang has no -fopenmp: `pip install --no-build-isolation -e .` failed on macOS
    ("clang: error: unsupported option '-fopenmp'") where _C builds fine without it."""
    real = shutil.which("c++")
    if real is None:
        pytest.skip("needs a C++ compiler named c++")
    clang = tmp_path / "clang++"  # Apple clang's answer to the flag, else the real compiler
    clang.write_text('#!/bin/sh\nfor a in "$@"; do if [ "$a" = -fopenmp ]; then\n'
                     '  echo "clang: error: unsupported option \'-fopenmp\'" >&2; exit 1\n'
                     f'fi; done\nexec {real} "$@"\n')
    clang.chmod(0o755)
    monkeypatch.setenv("FASTTRAIN_CUDA", "0")
    monkeypatch.setenv("FASTTRAIN_JPEG", "0")
    extensions = _setup_functions(tmp_path)["extensions"]
    flags = {}
    for cxx in (real, str(clang)):
        monkeypatch.setenv("CXX", cxx)  # the C++ compiler torch's build runs
        (cpu,), _ = extensions()
        flags[cxx] = cpu.extra_compile_args["cxx"], cpu.extra_link_args
    assert flags == {real: (["-O3", "-fopenmp"], ["-fopenmp"]), str(clang): (["-O3"], [])}
    assert (f"CPU library  fasttrain/ops/_C: yes, WITHOUT OpenMP ({clang} cannot build with "
            f"-fopenmp (clang: error: unsupported option '-fopenmp'): at::parallel_for runs on "
            f"one thread)") in capsys.readouterr().err


def test_the_cuda_library_links_against_the_toolkit_of_a_wrapper_nvcc(tmp_path):
    """A wrapper script /usr/local/bin/nvcc (exec-ing the toolkit's nvcc) made torch guess
    CUDA_HOME=/usr/local when torch.utils.cpp_extension was imported before setup.py set
    CUDA_HOME (the OpenMP probe did): the link then failed with "cannot find -lcudart"."""
    real = shutil.which("nvcc")
    if real is None or torch.version.cuda is None:
        pytest.skip("needs nvcc on PATH and a CUDA build of torch")
    bin_dir = tmp_path / "wrapper" / "bin"  # torch's guess would be tmp_path/wrapper
    bin_dir.mkdir(parents=True)
    (bin_dir / "nvcc").write_text(f'#!/bin/sh\nexec {real} "$@"\n')
    (bin_dir / "nvcc").chmod(0o755)
    script = ("import sys\n"
              "text = open(sys.argv[1]).read().split('ext_modules, cmdclass = extensions()')[0]\n"
              "ns = {'__file__': sys.argv[2], '__name__': 'setup_under_test'}\n"
              "exec(compile(text, sys.argv[1], 'exec'), ns)\n"
              "ns['extensions']()\n"  # then the toolkit torch's build links against:
              "import torch.utils.cpp_extension as ext\nprint(ext.CUDA_HOME)\n")
    env = {k: v for k, v in os.environ.items() if k not in ("CUDA_HOME", "CUDA_PATH")}
    env.update(PATH=f"{bin_dir}{os.pathsep}{env['PATH']}", FASTTRAIN_CUDA="1",
               FASTTRAIN_JPEG="0")
    result = subprocess.run([sys.executable, "-c", script, str(ROOT / "setup.py"),
                             str(tmp_path / "setup.py")], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    home = Path(result.stdout.strip().splitlines()[-1])
    assert (home / "include" / "cuda_runtime.h").exists(), (home, result.stderr)
    assert home != tmp_path / "wrapper"


def test_a_leftover_cuda_library_is_not_loaded():
    assert "left from an earlier build: this build skipped CUDA (FASTTRAIN_CUDA=0)" in \
        _ext.cuda_skip_reason({"cuda": False, "cuda_reason": "FASTTRAIN_CUDA=0"}, "13.0")
    assert "is not a CUDA build" in _ext.cuda_skip_reason({"cuda": True}, None)
    assert _ext.cuda_skip_reason({"cuda": True}, "13.0") is None


def test_the_build_records_its_cubins_and_ptx(tmp_path):
    if shutil.which("nvcc") is None or torch.version.cuda is None:
        pytest.skip("needs nvcc and a CUDA build of torch")
    result = _setup_copy(tmp_path, {"FASTTRAIN_CUDA": "1",
                                    "TORCH_CUDA_ARCH_LIST": "8.0;9.0+PTX;9.0a"})
    assert result.returncode == 0, result.stderr
    header = (tmp_path / "build" / "generated" / "fasttrain_build_info.h").read_text()
    info = json.loads(json.loads(header.split("FASTTRAIN_BUILD_INFO ", 1)[1]))
    assert (info["cuda_sm"], info["cuda_ptx"]) == (["80", "90", "90a"], ["90"])


@pytest.mark.parametrize("sm, ptx, capability, runs", [
    (["80", "90"], [], (8, 0), True),
    (["80", "90"], [], (8, 6), True),  # a cubin runs on later minors of its major
    (["80", "90"], [], (7, 5), False),
    (["80", "90"], [], (12, 0), False),  # no cubin of that major, no PTX to JIT-compile
    (["80", "90"], ["90"], (12, 0), True),
    (["80", "90"], ["90"], (8, 9), True),
    (["90a"], [], (9, 0), True),
    (["90a"], [], (10, 0), False),  # arch-specific: that GPU only
    (None, None, (7, 5), True),  # an older build that did not record its targets
])
def test_cuda_kernels_are_used_only_on_gpus_the_build_has_code_for(monkeypatch, sm, ptx,
                                                                   capability, runs):
    """Without the check the first fused op on, say, a T4 or an RTX 50xx failed with "no kernel
    image is available for execution on the device" instead of falling back."""
    monkeypatch.setattr(_ext, "BUILD_INFO", {**_ext.BUILD_INFO, "cuda_sm": sm, "cuda_ptx": ptx})
    monkeypatch.setattr(_ext, "HAS_CUDA_EXT", True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: capability)
    _ext.cuda_arch_problem.cache_clear()
    try:
        gpu = torch.device("cuda", 0)
        assert _ext.supports(gpu) is runs
        reason = _ext.unavailable_reason(gpu)
        if not runs:
            assert reason.startswith("the CUDA library has no code for this GPU (compute "
                                     f"capability {capability[0]}.{capability[1]}; built for ")
            assert f"TORCH_CUDA_ARCH_LIST={capability[0]}.{capability[1]}" in reason
    finally:
        _ext.cuda_arch_problem.cache_clear()


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


def test_env_sh_names_the_commands_it_lacks_before_any_work(tmp_path):
    """Without flock (macOS) env.sh printed `flock: command not found`, then a false "waiting
    for another set-up" line, then died with status 127."""
    bin_dir = tmp_path / "bin"  # every command on a Debian PATH but flock
    bin_dir.mkdir()
    for folder in ("/usr/local/bin", "/usr/bin", "/bin"):
        for tool in Path(folder).glob("*") if Path(folder).is_dir() else ():
            if tool.name != "flock" and not (bin_dir / tool.name).exists():
                (bin_dir / tool.name).symlink_to(tool)
    (tmp_path / "cache").mkdir()
    result = subprocess.run([shutil.which("bash") or "/bin/bash", str(ROOT / "tools" / "env.sh"),
                             "true"], cwd=tmp_path, capture_output=True, text=True, timeout=60,
                            env={**os.environ, "PATH": str(bin_dir),
                                 "FASTTRAIN_CACHE": str(tmp_path / "cache")})
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        "[env] error: not found: flock. tools/env.sh targets Linux (Debian/Ubuntu: GNU "
        "coreutils, util-linux); elsewhere install torch, then fasttrain as README's "
        "'Environment' says"]
    assert not any((tmp_path / "cache").iterdir())  # no lock file, no venv


def _fake_project(tmp_path: Path, name: str = "repo") -> tuple[Path, Path]:
    """A copy of tools/env.sh in a project of fake native libraries, and a cache whose finished
    venv's python runs `-m pip install` as a stand-in build (it logs FASTTRAIN_JPEG, fails when
    told to, takes 3 s when `slow` exists, exiting 1 on SIGINT as pip does, and logs OVERLAP
    when another build of it runs) and anything else with this interpreter."""
    repo = tmp_path / name
    (repo / "tools").mkdir(parents=True)
    shutil.copy(ROOT / "tools" / "env.sh", repo / "tools" / "env.sh")
    shutil.copy(ROOT / "requirements.txt", repo / "requirements.txt")
    (repo / "setup.py").write_text("# fake\n")
    (repo / "csrc").mkdir()
    (repo / "csrc" / "op.cpp").write_text("// fake\n")
    for lib in ("fasttrain/ops/_C.x.so", "fasttrain/ops/_C_cuda.x.so", "fasttrain/data/_jpeg.x.so"):
        (repo / lib).parent.mkdir(parents=True, exist_ok=True)
        (repo / lib).touch()
    import hashlib

    key = hashlib.sha256((repo / "requirements.txt").read_bytes()).hexdigest()[:16]
    venv = tmp_path / "cache" / f"venv-{key}"
    (venv / "bin").mkdir(parents=True)
    (venv / ".complete").touch()
    python = venv / "bin" / "python"
    python.write_text(f'#!/bin/sh\nif [ "$1 $2 $3" = "-m pip install" ]; then\n'
                      f'  [ ! -e "{tmp_path}/building" ] || echo OVERLAP >> "{tmp_path}/builds"\n'
                      f'  touch "{tmp_path}/building"\n'
                      f'  echo "FASTTRAIN_JPEG=$FASTTRAIN_JPEG" >> "{tmp_path}/builds"\n'
                      f'  echo "[fasttrain build] CPU library  fasttrain/ops/_C: yes"\n'
                      f'  trap \'rm -f "{tmp_path}/building"; exit 1\' INT\n'
                      f'  [ ! -e "{tmp_path}/slow" ] || sleep 3\n'
                      f'  rm -f "{tmp_path}/building"\n'
                      f'  [ ! -e "{tmp_path}/fail" ] || exit 1\n  exit 0\nfi\n'
                      f'exec {sys.executable} "$@"\n')
    python.chmod(0o755)
    return repo, tmp_path / "builds"


@pytest.mark.skipif(shutil.which("flock") is None, reason="env.sh needs flock (util-linux)")
def test_env_sh_rebuilds_for_any_missing_library_or_interrupted_build(tmp_path):
    """Before: a missing CUDA library (or a build interrupted after the old record matched)
    was not rebuilt, FASTTRAIN_JPEG=0 was overridden, the build summary was never shown, and a
    relative FASTTRAIN_CACHE/FASTTRAIN_DATA reached the command (run from the clone) as given."""
    repo, builds = _fake_project(tmp_path)
    (tmp_path / "work").mkdir()

    def env_sh(*extra: str, **env_vars: str) -> subprocess.CompletedProcess:
        env = {k: v for k, v in os.environ.items() if k != "FASTTRAIN_JPEG"}
        env.update({"FASTTRAIN_CACHE": "../cache", "FASTTRAIN_DATA": "mydata", **env_vars})
        return subprocess.run(["bash", str(repo / "tools" / "env.sh"), "python", "-c",
                               "import os; print(os.environ['FASTTRAIN_CACHE'], "
                               "os.environ['FASTTRAIN_DATA'], os.getcwd(), "
                               "os.environ['FASTTRAIN_CALLER_DIR'])", *extra],
                              cwd=tmp_path / "work", env=env, capture_output=True, text=True,
                              timeout=60)

    def built() -> int:
        return len(builds.read_text().splitlines()) if builds.exists() else 0

    first = env_sh()
    assert first.returncode == 0, first.stderr
    assert first.stdout.split() == [str(tmp_path / "cache"), str(tmp_path / "work" / "mydata"),
                                    str(repo), str(tmp_path / "work")]
    assert "[env] [fasttrain build] CPU library  fasttrain/ops/_C: yes" in first.stderr
    assert built() == 1 and builds.read_text() == "FASTTRAIN_JPEG=1\n"
    assert env_sh().returncode == 0 and built() == 1  # up to date: nothing rebuilt
    # a quoted ~ (FASTTRAIN_CACHE='~/cache') made a folder named ~ in the current one
    tilde = env_sh(FASTTRAIN_CACHE="~/cache", FASTTRAIN_DATA="~/mydata", HOME=str(tmp_path))
    assert tilde.stdout.split()[:2] == [str(tmp_path / "cache"), str(tmp_path / "mydata")]
    assert not (tmp_path / "work" / "~").exists() and built() == 1
    # run from another clone's root: its libraries are not this clone's (an unquoted glob
    # matched them there and found this clone's "missing": a rebuild at every call)
    (tmp_path / "work" / "fasttrain" / "ops").mkdir(parents=True)
    (tmp_path / "work" / "fasttrain" / "ops" / "_C.cpython-310-x86_64-linux-gnu.so").touch()
    assert env_sh().returncode == 0 and built() == 1
    (repo / "fasttrain/ops/_C_cuda.x.so").unlink()  # a library the last build left
    assert env_sh().returncode == 0 and built() == 2
    # another compiler (one without -fopenmp builds _C single-threaded) was not a rebuild
    assert env_sh(CXX="g++").returncode == 0 and built() == 3
    (tmp_path / "fail").touch()  # an interrupted build
    failed = env_sh(FASTTRAIN_JPEG="0")
    assert failed.returncode == 1 and "editable install failed" in failed.stderr
    assert builds.read_text().splitlines()[-1] == "FASTTRAIN_JPEG=0"
    (tmp_path / "fail").unlink()
    assert env_sh().returncode == 0 and built() == 5  # the old record did not survive


@pytest.mark.skipif(shutil.which("flock") is None, reason="env.sh needs flock (util-linux)")
def test_env_sh_waits_for_an_orphaned_build_and_says_an_interrupt_is_one(tmp_path):
    """A set-up killed with -9 left its pip building: the rerun started a second build beside
    it (both writing the clone and the log; it failed). Ctrl-C during the build read as a
    failed install with its log. A clone path with [ ] was a glob: rebuilt at every call. A
    PYTHON printing nothing (/bin/true) passed as an interpreter."""
    import signal
    import time

    repo, builds = _fake_project(tmp_path, "clone[1]")
    env = {k: v for k, v in os.environ.items() if k != "FASTTRAIN_JPEG"}
    env["FASTTRAIN_CACHE"] = str(tmp_path / "cache")
    command = ["bash", str(repo / "tools" / "env.sh"), "true"]

    def run() -> subprocess.CompletedProcess:
        return subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)

    def start_slow_build() -> subprocess.Popen:
        (tmp_path / "slow").touch()
        setup = subprocess.Popen(command, env=env, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True, start_new_session=True)
        deadline = time.monotonic() + 30
        while not (tmp_path / "building").exists():
            assert time.monotonic() < deadline and setup.poll() is None
            time.sleep(0.05)
        return setup

    assert run().returncode == 0 and run().returncode == 0
    assert builds.read_text().splitlines() == ["FASTTRAIN_JPEG=1"]  # built once, then current
    (repo / "build" / ".fasttrain-native").unlink()
    setup = start_slow_build()
    setup.kill()  # the set-up alone, as kill -9 of its pid: its pip builds on
    setup.communicate()
    (tmp_path / "slow").unlink()
    again = run()
    assert again.returncode == 0, again.stderr
    assert "[env] waiting for an earlier build in" in again.stderr
    assert "OVERLAP" not in builds.read_text()
    (repo / "build" / ".fasttrain-native").unlink()
    setup = start_slow_build()
    os.killpg(setup.pid, signal.SIGINT)  # Ctrl-C: the whole foreground group
    _, err = setup.communicate(timeout=30)
    assert setup.returncode == 130
    assert err.splitlines()[-1] == ("[env] interrupted: the set-up did not finish; the next "
                                    "call completes it")
    assert "editable install failed" not in err
    (tmp_path / "slow").unlink()
    assert run().returncode == 0
    (tmp_path / "work").mkdir()
    assert _env_sh(tmp_path / "work", "/bin/true").stderr.splitlines()[-1] == \
        "[env] error: PYTHON=/bin/true: not a working Python interpreter"


@pytest.mark.skipif(not (ROOT / ".git").exists(), reason="needs the git checkout's file list")
def test_an_sdist_made_without_torch_holds_the_sources_and_the_tests(tmp_path):
    # `python -m build` makes the sdist in an isolated environment without torch, where
    # setup.py declares no extension (whose sources would have put csrc/ in): MANIFEST.in must.
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True,
                           check=True).stdout.split()
    tree = tmp_path / "tree"
    for name in files:
        (tree / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / name, tree / name)
    (tmp_path / "stub" / "torch").mkdir(parents=True)
    (tmp_path / "stub" / "torch" / "__init__.py").write_text("raise ImportError('no torch')\n")
    done = subprocess.run([sys.executable, "setup.py", "-q", "sdist", "-d", str(tmp_path)],
                          cwd=tree, env={**os.environ, "PYTHONPATH": str(tmp_path / "stub")},
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "metadata only" in done.stderr
    (archive,) = tmp_path.glob("fasttrain-*.tar.gz")
    with tarfile.open(archive) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    assert {n for n in files if n.startswith("csrc/")} <= names
    for needed in ("tests/conftest.py", "pytest.ini", "tools/train.py", "recipes/quickstart.yaml",
                   "hubconf.py", "requirements.txt", "tests/data/thinresnet_counts.csv"):
        assert needed in names, needed
    assert not any(n.endswith((".so", ".pyc")) for n in names)
