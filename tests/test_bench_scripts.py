"""The benchmark scripts refuse bad arguments before measuring anything: one line on stderr that
names the option, exit status 2, no data set generated, no result file written; a result that
cannot be written at the end still reaches stdout.

Every case fails in argument parsing or the pre-checks. Each script's first step of real work
(generating a set, timing a shape, starting torchrun) is replaced by one that raises, so a
regression fails fast here instead of running a measurement."""
import importlib.util
import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
WRITERS = ["bench_bn_relu", "bench_cifar_aug", "bench_loaders", "bench_native_resize",
           "bench_quickstart"]
# The first step of real work in each script's main.
FIRST_WORK = {"bench_bn_relu": "bench_shape", "bench_cifar_aug": "make_set",
              "bench_loaders": "make_bench_set", "bench_native_resize": "make_bench_set",
              "bench_quickstart": "run_once", "profile_bn_relu": "step_fn"}
_modules: dict = {}
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")


def load_bench(name: str):
    """Import benchmarks/<name>.py as a module, once (the scripts are not a package)."""
    if name not in _modules:
        spec = importlib.util.spec_from_file_location(f"_bench_{name}",
                                                      ROOT / "benchmarks" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        _modules[name] = module
    return _modules[name]


class Measured(Exception):
    """Raised by the stand-in for a script's first step of real work."""


@pytest.fixture
def bench(monkeypatch, tmp_path):
    """(module, data folder) with $FASTTRAIN_DATA in tmp_path and the first work step refused."""
    data = tmp_path / "data"
    monkeypatch.setenv("FASTTRAIN_DATA", str(data))

    def get(name: str):
        module = load_bench(name)

        def refuse(*args, **kwargs):
            raise Measured(f"{name}: {FIRST_WORK[name]} was reached")

        monkeypatch.setattr(module, FIRST_WORK[name], refuse)
        return module, data

    return get


def assert_refused(module, argv, capsys, *named: str) -> str:
    capsys.readouterr()  # what importing printed
    with pytest.raises(SystemExit) as exc:
        module.main(argv)
    captured = capsys.readouterr()
    assert exc.value.code == 2, captured.err
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    for text in named:
        assert text in lines[0]
    return lines[0]


def case(script: str, argv: list[str], named: list[str], marks=()):
    """One bad command line; `named`: what its error line must contain (option, value)."""
    return pytest.param(script, argv, named, marks=marks, id=f"{script} {' '.join(argv)}")


CASES = [
    # bench_bn_relu: 0 stays meaningful where the help documents it (--iters, --model-batch,
    # --threads); --batch and --repeats have no 0 = default any more.
    case("bench_bn_relu", ["--iters", "-5"], ["--iters", "-5"]),
    case("bench_bn_relu", ["--warmup", "-1"], ["--warmup", "-1"]),
    # the compiled rows timed torch.compile itself (31,771 ms a step, 1,233x "speed-up")
    case("bench_bn_relu", ["--warmup", "0"], ["--warmup", "expected an integer >= 1, got 0"]),
    case("bench_bn_relu", ["--batch", "0"], ["--batch", "0"]),
    case("bench_bn_relu", ["--batch", "-4"], ["--batch", "-4"]),
    case("bench_bn_relu", ["--repeats", "0"], ["--repeats", "0"]),
    case("bench_bn_relu", ["--model-batch", "-1"], ["--model-batch", "-1"]),
    case("bench_bn_relu", ["--threads", "-1"], ["--threads", "-1"]),
    case("bench_bn_relu", ["--widths", "0"], ["--widths", "'0'"]),
    case("bench_bn_relu", ["--widths", "nan"], ["--widths", "nan"]),
    case("bench_bn_relu", ["--widths", "17"], ["--widths", "17"]),
    case("bench_bn_relu", ["--widths", "1", "0.001"], ["--widths", "0.001"]),
    case("bench_bn_relu", ["--device", "bogus"], ["--device", "bogus"]),
    case("bench_bn_relu", ["--device", "meta"], ["--device", "meta"]),
    case("bench_bn_relu", ["--device", "cuda"], ["--device", "no CUDA device"],
         marks=no_cuda),
    case("profile_bn_relu", ["--shapes", "1,2,3"], ["--shapes", "1,2,3"]),
    case("profile_bn_relu", ["--shapes", "1,0,3,3"], ["--shapes", "1,0,3,3"]),
    case("profile_bn_relu", ["--iters", "0"], ["--iters", "0"]),
    case("profile_bn_relu", ["--shapes", "2,4,3,3"], ["CUDA"], marks=no_cuda),
    case("bench_cifar_aug", ["--workers", "0"], ["--workers", "0"]),
    case("bench_cifar_aug", ["--workers", "-1"], ["--workers", "-1"]),
    case("bench_cifar_aug", ["--rounds", "0"], ["--rounds", "0"]),
    case("bench_cifar_aug", ["--epochs", "0"], ["--epochs", "0"]),
    case("bench_cifar_aug", ["--images", "0"], ["--images", "0"]),
    case("bench_cifar_aug", ["--images", "-5"], ["--images", "-5"]),
    case("bench_cifar_aug", ["--batch-size", "0"], ["--batch-size", "0"]),
    case("bench_cifar_aug", ["--images", "129"], ["--images 129", "--batch-size 128"]),
    case("bench_cifar_aug", ["--device", "bogus"], ["--device", "bogus"]),
    case("bench_cifar_aug", ["--device", "cuda"], ["--device", "no CUDA device"],
         marks=no_cuda),
    case("bench_loaders", ["--backends", "bogus"], ["--backends", "'bogus'"]),
    case("bench_loaders", ["--backends", ""], ["--backends", "''"]),
    case("bench_loaders", ["--workers", "0"], ["--workers", "0"]),
    case("bench_loaders", ["--rounds", "0"], ["--rounds", "0"]),
    case("bench_loaders", ["--rounds", "-1"], ["--rounds", "-1"]),
    case("bench_loaders", ["--epochs", "0"], ["--epochs", "0"]),
    case("bench_loaders", ["--images", "0"], ["--images", "0"]),
    case("bench_loaders", ["--images", "-5"], ["--images", "-5"]),
    case("bench_loaders", ["--images", "20"], ["--images 20", "--batch-size 64"]),
    case("bench_native_resize", ["--backends", "torch,x"], ["--backends", "'x'"]),
    case("bench_native_resize", ["--workers", "0"], ["--workers", "0"]),
    case("bench_native_resize", ["--workers", "-1"], ["--workers", "-1"]),
    case("bench_native_resize", ["--rounds", "0"], ["--rounds", "0"]),
    case("bench_native_resize", ["--images", "0"], ["--images", "0"]),
    case("bench_native_resize", ["--images", "63"], ["--images", "63"]),
    case("bench_quickstart", ["--repeats", "0"], ["--repeats", "0"]),
    case("bench_quickstart", ["--repeats", "-1"], ["--repeats", "-1"]),
    case("bench_quickstart", ["--backends", "bogus"], ["--backends", "bogus"]),
    case("bench_quickstart", ["--backends", ""], ["--backends", "''"]),
    case("bench_quickstart", ["--backends", "torch,"], ["--backends", "'torch,'"]),
    # the same rows twice under one name (a result file with duplicate backends or widths)
    case("bench_loaders", ["--backends", "torch,pil,torch"], ["--backends", "'torch' is given "
                                                               "twice"]),
    case("bench_loaders", ["--backends", "torch,,pil"], ["--backends", "empty item"]),
    case("bench_native_resize", ["--backends", "dali,dali"], ["--backends", "'dali' is given"]),
    case("bench_quickstart", ["--backends", "torch,torch"], ["--backends", "'torch' is given"]),
    case("bench_bn_relu", ["--widths", "0.5", "1", "0.50"], ["--widths", "0.5 is given twice"]),
    # sizes a typo makes absurd: a traceback after the data set was made, or an allocation's
    *[case(script, ["--workers", "2000"], ["--workers", "<= 1024, got 2000"])
      for script in ("bench_cifar_aug", "bench_loaders", "bench_native_resize")],
    case("bench_bn_relu", ["--batch", str(10**8)], ["--batch", f"<= 16777216, got {10**8}"]),
    case("bench_bn_relu", ["--model-batch", str(10**8)], ["--model-batch", "<= 16777216"]),
    case("bench_bn_relu", ["--threads", "5000"], ["--threads", "<= 4096, got 5000"]),
]


@pytest.mark.parametrize("script, argv, named", CASES)
def test_bad_argument_is_one_line_before_any_work(bench, tmp_path, capsys, script, argv, named):
    module, data = bench(script)
    out = tmp_path / "results" / "r.json"
    extra = ["--out", str(out)] if script in WRITERS else []
    assert_refused(module, [*argv, *extra], capsys, *named)
    assert not data.exists() or not any(data.iterdir())
    assert not (tmp_path / "results").exists()  # refused before the result folder is made


@pytest.mark.parametrize("script, argv, name", [
    ("bench_loaders", ["--workers", "2"], "loaders-cpu-2w.json"),
    ("bench_loaders", ["--workers", "2", "--backends", "torch,pil"],
     "loaders-cpu-2w-torch+pil.json"),
    ("bench_native_resize", ["--workers", "2", "--backends", "dali,torch"],
     "native-resize-cpu-2w.json"),
    ("bench_native_resize", ["--workers", "2", "--backends", "dali"],
     "native-resize-cpu-2w-dali.json"),
    ("bench_quickstart", [], "quickstart-cpu-{cores}c.json"),
    ("bench_quickstart", ["--backends", "ffcv,dali,resident,torch"],
     "quickstart-cpu-{cores}c.json"),
    ("bench_quickstart", ["--backends", "resident"], "quickstart-cpu-{cores}c-resident.json"),
    ("bench_bn_relu", ["--device", "cpu", "--threads", "1", "--batch", "8"],
     "bn_relu-cpu1t-bf16-nhwc-b8.json"),
    ("bench_bn_relu", ["--device", "cpu", "--threads", "1", "--batch", "8", "--widths", "0.5"],
     "bn_relu-cpu1t-bf16-nhwc-b8-w0.5.json"),
    # a smoke run of other sizes replaced the committed full run's file too
    ("bench_cifar_aug", ["--workers", "2", "--images", "50", "--batch-size", "5", "--rounds", "1"],
     "cifar-aug-cpu-2w-images50-batch-size5-rounds1.json"),
    ("bench_loaders", ["--workers", "2", "--rounds", "1"], "loaders-cpu-2w-rounds1.json"),
    ("bench_native_resize", ["--workers", "2", "--images", "64"],
     "native-resize-cpu-2w-images64.json"),
    ("bench_quickstart", ["--repeats", "1"], "quickstart-cpu-{cores}c-repeats1.json"),
    ("bench_bn_relu", ["--device", "cpu", "--threads", "1", "--batch", "8", "--repeats", "1",
                       "--iters", "2"], "bn_relu-cpu1t-bf16-nhwc-b8-iters2-repeats1.json"),
])
def test_a_run_of_some_rows_never_takes_the_full_runs_default_file(bench, monkeypatch, script,
                                                                   argv, name):
    """`--backends torch` (or `--widths 0.5`) without --out replaced the committed result file
    of the full run, which the README's tables come from, with a one-row file."""
    from fasttrain.measure.env import usable_cores

    module, _ = bench(script)
    chosen = []

    def record(out, default):
        chosen.append(default)
        raise Measured("check_out reached")

    monkeypatch.setattr(module, "check_out", record)
    with pytest.raises(Measured):
        module.main(argv)
    assert chosen[0].name == name.format(cores=usable_cores())
    assert chosen[0].parent == ROOT / "benchmarks" / "results"


def test_an_interrupted_bn_relu_run_keeps_an_earlier_complete_result(tmp_path, monkeypatch,
                                                                     capsys):
    """Ctrl-C after 5 s replaced the committed 96-row result with a 0-row file: the rows of a
    cut run now go beside a complete one (and still replace an earlier cut run's)."""
    module = load_bench("bench_bn_relu")
    out = tmp_path / "r.json"
    whole = json.dumps({"rows": [1] * 96, "interrupted": False})
    out.write_text(whole)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(module, "bench_shape", interrupted)
    argv = ["--device", "cpu", "--threads", "1", "--widths", "0.0625", "--out", str(out)]
    assert module.main(argv) == 130
    assert out.read_text() == whole
    cut = tmp_path / "r-interrupted.json"
    assert json.loads(cut.read_text())["interrupted"] is True
    out.write_text(cut.read_text())  # an earlier cut run is replaced as before
    cut.unlink()
    assert module.main(argv) == 130
    assert json.loads(out.read_text())["interrupted"] is True and not cut.exists()


def test_loaders_needing_the_region_decoder_are_refused_without_it(bench, tmp_path, capsys,
                                                                    monkeypatch):
    """Without the region decoder "torch" decoded whole images silently: its row timed what
    "torch-whole" times (the GPU checklist built without it)."""
    from fasttrain.data import jpeg

    module, data = bench("bench_loaders")
    monkeypatch.setattr(jpeg, "AVAILABLE", False)
    monkeypatch.setattr(jpeg, "LOAD_ERROR", "not built")
    out = ["--out", str(tmp_path / "results" / "r.json")]
    line = assert_refused(module, ["--backends", "decode,pil,torch,torch-whole,ffcv-rn18,"
                                   "ffcv-rn18-whole", *out], capsys, "--backends torch,ffcv-rn18")
    assert "region JPEG decoder is not built (not built)" in line
    with pytest.raises(Measured):  # whole-image backends need no region decoder
        module.main(["--backends", "decode,pil,torch-whole,ffcv-rn18-whole", *out])


def test_bn_relu_interrupted_writes_the_rows_measured(bench, tmp_path, monkeypatch, capsys):
    """A time limit (the GPU checklist's `timeout`: SIGTERM, mapped to KeyboardInterrupt) lost
    every shape already timed; the summary covers complete widths only."""
    module, _ = bench("bench_bn_relu")
    calls = []

    def timed(shape, count, width, *args):
        if width == 0.25:
            raise KeyboardInterrupt
        calls.append(shape)
        return [{"width": width, "shape": list(shape), "count": count, "mode": mode, "impl": i,
                 "ms_median": 1.0, "bytes": 1e6, "copy_gbps": 100.0, "gbps": 1.0,
                 "frac_of_copy": 0.01, "saved_bytes": 0}
                for mode in ("train", "eval") for i in module.IMPLS]

    monkeypatch.setattr(module, "bench_shape", timed)
    out = tmp_path / "r.json"
    assert module.main(["--device", "cpu", "--widths", "0.5", "0.25", "--out", str(out)]) == 130
    result = json.loads(out.read_text())
    assert result["interrupted"] is True and len(result["rows"]) == 6 * len(calls) > 0
    assert {s["width"] for s in result["summary"]} == {0.5}
    assert "interrupted: writing the" in capsys.readouterr().err


@pytest.mark.parametrize("script", WRITERS)
@pytest.mark.parametrize("where", ["folder", "below a file"])
def test_unwritable_out_is_refused_before_any_work(bench, tmp_path, capsys, script, where):
    module, data = bench(script)
    (tmp_path / "file").write_text("kept\n")
    out = tmp_path if where == "folder" else tmp_path / "file" / "r.json"
    device = ["--device", "cpu"] if script in ("bench_bn_relu", "bench_cifar_aug") else []
    line = assert_refused(module, [*device, "--out", str(out)], capsys, f"--out {out}")
    assert ("is a folder" if where == "folder" else "not a folder") in line
    assert (tmp_path / "file").read_text() == "kept\n"
    assert not data.exists() or not any(data.iterdir())


def test_check_out_creates_the_folder_and_leaves_no_file(tmp_path):
    args = load_bench("_args")
    out = tmp_path / "a" / "b" / "r.json"
    assert args.check_out(out, tmp_path / "default.json") == out
    assert out.parent.is_dir() and list(out.parent.iterdir()) == []
    assert args.check_out(None, out) == out  # the default when --out is not given


def test_write_json_replaces_the_file_whole(tmp_path):
    args = load_bench("_args")
    out = tmp_path / "r.json"
    out.write_text("old\n")
    args.write_json(out, {"rows": [1, 2]})
    assert json.loads(out.read_text()) == {"rows": [1, 2]}
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]  # no temporary file left


def test_failed_write_prints_the_result_and_keeps_the_old_file(tmp_path, monkeypatch, capsys):
    args = load_bench("_args")
    out = tmp_path / "r.json"
    out.write_text("old\n")

    def full_disk(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(args.os, "replace", full_disk)
    with pytest.raises(SystemExit) as exc:
        args.write_json(out, {"rows": [1, 2]})
    captured = capsys.readouterr()
    assert exc.value.code == 2
    assert json.loads(captured.out) == {"rows": [1, 2]}  # the measurement survives on stdout
    (line,) = captured.err.splitlines()
    assert line.startswith("error: ") and str(out) in line and "No space left" in line
    assert out.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]


TORCHRUN_STDERR = """\
[rank0]: some warning
error: /nowhere/digits/train: directory not found
E1130 08:00:00.000 elastic/multiprocessing/api.py:869] failed (exitcode: 2)
Traceback (most recent call last):
  File "torch/distributed/run.py", line 1, in <module>
torch.distributed.elastic.multiprocessing.errors.ChildFailedError:
""" + "x" * 3000 + "\n"


def test_quickstart_shows_train_errors_not_torchrun_traceback(tmp_path, monkeypatch, capsys):
    module = load_bench("bench_quickstart")

    def fake_run(cmd):
        assert "torch.distributed.run" in cmd
        return subprocess.CompletedProcess(cmd, 1, "", TORCHRUN_STDERR)

    monkeypatch.setattr(module, "run_stopping_on_interrupt", fake_run)
    out = tmp_path / "r.json"
    line = assert_refused(module, ["--repeats", "1", "--backends", "torch", "--out", str(out)],
                          capsys, "--data.backend=torch failed", "/nowhere/digits/train")
    assert "Traceback" not in line and "xxx" not in line
    assert not out.exists()


def _cut_in_round(module, monkeypatch, tmp_path, script: str, cut_round: int) -> list[str]:
    """Replace `script`'s measuring with a stand-in giving 100 img/s (or a quickstart run)
    that raises KeyboardInterrupt (Ctrl-C, or SIGTERM as sigterm_as_interrupt maps it) in the
    second measurement of round `cut_round` (1-based); the argv of a 3-round run of it."""
    calls = []

    def rate(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2 * cut_round:  # the second measurement of that round
            raise KeyboardInterrupt
        return 100.0

    if script == "bench_cifar_aug":
        monkeypatch.setattr(module, "make_set", lambda root, images: tmp_path / "set")
        monkeypatch.setattr(module, "measure", rate)
        return ["--workers", "1", "--images", "1000", "--rounds", "3"]
    if script == "bench_loaders":
        def fake_set(root, images):
            (tmp_path / "set" / "train" / "c0").mkdir(parents=True, exist_ok=True)
            (tmp_path / "set" / "train" / "c0" / "a.jpg").write_bytes(b"x" * 1000)
            return tmp_path / "set"

        monkeypatch.setattr(module, "make_bench_set", fake_set)
        monkeypatch.setattr(module, "pil_loader", rate)
        monkeypatch.setattr(module, "decode_limit", rate)
        return ["--workers", "1", "--backends", "pil,decode", "--rounds", "3"]
    import fasttrain.data

    monkeypatch.setattr(fasttrain.data, "build_digits", lambda root: root)
    monkeypatch.setattr(module, "run_once", lambda log_dir, backend: {
        "wall_s": rate(), "train_time_s": 1.0, "final_val_top1": 99.0, "best_val_top1": 99.0,
        "first_epoch_at_target": 3})
    return ["--backends", "torch,resident", "--repeats", "3"]


ROUND_SCRIPTS = ["bench_cifar_aug", "bench_loaders", "bench_quickstart"]


def main_not_interrupted(module, argv):
    """module.main(argv), with a KeyboardInterrupt escaping it made a test failure (pytest
    would take it for the user's Ctrl-C and end the whole session)."""
    try:
        return module.main(argv)
    except KeyboardInterrupt:
        pytest.fail("the KeyboardInterrupt escaped main()")


@pytest.mark.parametrize("script", ROUND_SCRIPTS)
def test_an_interrupted_run_writes_its_complete_rounds_beside_a_complete_result(
        script, tmp_path, monkeypatch, capsys):
    """Ctrl-C or a time limit (SIGTERM) in these scripts lost every round measured, with a
    traceback; now the complete rounds are written (marked interrupted, exit 130) beside an
    earlier complete result, which stays; the cut round is dropped."""
    module = load_bench(script)
    monkeypatch.setenv("FASTTRAIN_DATA", str(tmp_path / "data"))
    argv = _cut_in_round(module, monkeypatch, tmp_path, script, cut_round=2)
    out = tmp_path / "r.json"
    whole = json.dumps({"rows": [1, 2], "interrupted": False})
    out.write_text(whole)
    assert main_not_interrupted(module, [*argv, "--out", str(out)]) == 130
    assert out.read_text() == whole
    result = json.loads((tmp_path / "r-interrupted.json").read_text())
    assert result["interrupted"] is True
    assert result.get("rounds", result.get("repeats")) == 1
    if script == "bench_quickstart":
        assert [len(b["runs"]) for b in result["backends"].values()] == [1, 1]
    else:
        assert [len(r["images_per_s_rounds"]) for r in result["rows"]] == [1, 1 + (
            script == "bench_loaders")]  # the decode limit brackets pil: before and after
    assert "interrupted: writing the 1 complete" in capsys.readouterr().err


@pytest.mark.parametrize("script", ROUND_SCRIPTS)
def test_an_interrupt_in_the_first_round_writes_nothing(script, tmp_path, monkeypatch, capsys):
    module = load_bench(script)
    monkeypatch.setenv("FASTTRAIN_DATA", str(tmp_path / "data"))
    argv = _cut_in_round(module, monkeypatch, tmp_path, script, cut_round=1)
    out = tmp_path / "r.json"
    with pytest.raises(SystemExit) as exc:
        main_not_interrupted(module, [*argv, "--out", str(out)])
    assert exc.value.code == 130
    assert not out.exists() and not (tmp_path / "r-interrupted.json").exists()
    err = capsys.readouterr().err.splitlines()
    assert err[-1].startswith("interrupted in the first ") and "nothing written" in err[-1]


CHILD = """\
import pathlib, signal, sys, time
def stop(*args):
    pathlib.Path(sys.argv[1]).write_text("stopped")
    sys.exit(0)
signal.signal(signal.SIGTERM, stop if sys.argv[2] == "stops" else signal.SIG_IGN)
print("ready", flush=True)
time.sleep(60)
"""


@pytest.mark.parametrize("child", ["stops", "ignores"])
def test_quickstart_interrupt_stops_the_run_it_started(child, tmp_path, monkeypatch):
    """subprocess.run answered Ctrl-C/SIGTERM by killing torchrun at once, which could not stop
    its training worker: it trained on alone after the benchmark had ended. Now the child gets
    SIGTERM (torchrun passes it to its workers) and a grace period, then is killed."""
    module = load_bench("bench_quickstart")
    marker = tmp_path / "marker"
    real_communicate = subprocess.Popen.communicate
    started = []

    def interrupted_communicate(self, *args, **kwargs):
        if not started:  # the first wait: the child has set its handler, then Ctrl-C comes
            started.append(self)
            assert self.stdout.readline() == "ready\n"
            raise KeyboardInterrupt
        return real_communicate(self, *args, **kwargs)

    monkeypatch.setattr(subprocess.Popen, "communicate", interrupted_communicate)
    with pytest.raises(KeyboardInterrupt):
        module.run_stopping_on_interrupt(
            [sys.executable, "-c", CHILD, str(marker), child], grace_s=1.0)
    (process,) = started
    assert process.returncode == (0 if child == "stops" else -signal.SIGKILL)
    assert marker.exists() == (child == "stops")


def test_gpu_checklist_cuda_step_options_exist_in_the_pinned_pytest(tmp_path):
    """The checklist's `pytest -m cuda` command, collected (not run) by this venv's pytest: an
    option no installed plugin defines (`-n` without pytest-xdist) made the step fail at once
    on a GPU host, testing nothing."""
    import sys

    script = (ROOT / "benchmarks" / "gpu_checklist.sh").read_text().splitlines()
    start = next(i for i, line in enumerate(script) if " step pytest-cuda " in line)
    end = next(i for i in range(start, len(script)) if not script[i].endswith("\\"))
    command = "\n".join(script[start:end + 1]).replace("benchmarks/results/", f"{tmp_path}/")
    xdist = subprocess.run([sys.executable, "-c", "import xdist"]).returncode == 0
    # the plugins as the script names them: it loads them explicitly (autoload off)
    shell = (f'step() {{ shift 2; "$@" --collect-only tests/test_bn_relu.py; }}\n'
             f'PY={sys.executable}; XDIST="{"-p xdist.plugin -n 2" if xdist else ""}"; '
             f'TIMEOUT="-p pytest_timeout --timeout 90"; GPU_SLUG=test\n{command}')
    done = subprocess.run(["bash", "-c", shell], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode in (0, 5), done.stderr[-2000:]  # 5: every test deselected
    assert "cuda" in done.stdout


class _Available(torch.utils.data.Dataset):
    """One sample: `resize.AVAILABLE` as the worker process that loads it sees it."""

    def __len__(self) -> int:
        return 1

    def __getitem__(self, index: int) -> bool:
        from fasttrain.data import resize
        return resize.AVAILABLE


def test_the_torch_ops_arm_switches_the_c_resize_off_in_spawned_workers(monkeypatch):
    """bench_loaders' torch-ops row (and bench_native_resize's torch's-ops arm) switched the C
    resize off in the parent only: spawned workers (macOS, Linux from Python 3.14) used it."""
    from types import SimpleNamespace
    bench = load_bench("bench_loaders")

    class Train:  # the torch backend's loader, its dataset replaced by the probe
        def __init__(self) -> None:
            self.loader = torch.utils.data.DataLoader(
                _Available(), batch_size=None, num_workers=1, persistent_workers=True,
                multiprocessing_context="spawn")
            self.seen: list[bool] = []

        def set_epoch(self, epoch: int) -> None:
            pass

        def __iter__(self):
            for available in self.loader:
                self.seen.append(available)
                yield torch.zeros(1), None

    train = Train()
    monkeypatch.setattr(bench, "build_loaders", lambda *a, **k: SimpleNamespace(train=train))
    cfg = SimpleNamespace(data=SimpleNamespace(batch_size=1), aug=None)
    with bench.native_resize(False):
        bench.fasttrain_loader(cfg, epochs=1)
    assert train.seen == [False, False]  # warm-up and timed epoch
