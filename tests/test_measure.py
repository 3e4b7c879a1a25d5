"""fasttrain.measure and tools/benchmark.py: latency statistics on a fake clock, training steps,
result rows and files, out-of-memory handling, model sources and the command line.

No test asserts a timing: clocks are fake wherever a number is checked.
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import math
import os
import random
import re
import statistics
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from fasttrain.measure import (conditions, measure_latency, measure_throughput, percentile,
                               summarize, time_calls)
from fasttrain.measure import bench, sources

from conftest import load_tool

ROOT = Path(__file__).resolve().parents[1]


benchmark_tool = load_tool("benchmark")

CONTRACT_FIELDS = ["model", "width", "batch_size", "resolution", "precision", "mode", "params",
                   "macs", "latency_ms_p50", "latency_ms_p90", "latency_ms_p99", "images_per_s",
                   "device_name", "torch_version", "commit"]
TICK = 2.0 ** -10  # a clock tick that float arithmetic (sums, x1000) represents exactly


class FakeClock:
    """Returns cumulative times so that consecutive start/stop pairs measure `durations`."""

    def __init__(self, durations: list[float]) -> None:
        self.readings, t = [], 0.0
        for d in durations:
            self.readings += [t, t + d]
            t += d + 7 * TICK  # time between calls must not count
        self.calls = 0

    def __call__(self) -> float:
        self.calls += 1
        return self.readings[self.calls - 1]


# --------------------------------------------------------------------------- statistics

def test_percentile_interpolates_between_ranks():
    assert percentile([4, 1, 3, 2], 0) == 1
    assert percentile([4, 1, 3, 2], 100) == 4
    assert percentile([4, 1, 3, 2], 50) == 2.5
    assert percentile([10], 99) == 10
    values = [random.Random(0).random() for _ in range(37)]
    import numpy as np
    for q in (1, 50, 90, 99):
        assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)), abs=1e-15)
    with pytest.raises(ValueError):
        percentile([], 50)
    with pytest.raises(ValueError):
        percentile([1.0], 101)


def test_latency_statistics_on_a_fake_clock_are_exact():
    ticks = list(range(101))  # 0..100 ticks: percentile positions fall exactly on values
    random.Random(1).shuffle(ticks)
    clock = FakeClock([k * TICK for k in ticks])
    calls = []
    stats = measure_latency(lambda: calls.append(torch.is_inference_mode_enabled()), 4,
                            iters=101, warmup=5, clock=clock)
    assert len(calls) == 106 and all(calls)  # warm-up ran, everything under inference_mode
    assert clock.calls == 2 * 101  # warm-up calls are never timed
    ms = TICK * 1e3
    assert stats.n == 101 and stats.batch_size == 4
    assert stats.p50_ms == 50 * ms
    assert stats.p90_ms == 90 * ms
    assert stats.p99_ms == 99 * ms
    assert stats.min_ms == 0 and stats.max_ms == 100 * ms
    assert stats.mean_ms == 50 * ms
    assert stats.std_ms == pytest.approx(statistics.stdev(k * ms for k in ticks), rel=1e-14)
    assert stats.images_per_s == pytest.approx(4 / (50 * ms / 1e3), rel=1e-14)


def test_summarize_edge_cases_and_row_names():
    one = summarize([0.002], batch_size=8)
    assert one.std_ms == 0 and one.p99_ms == pytest.approx(2.0) and one.images_per_s == \
        pytest.approx(4000)
    row = one.as_row("latency")
    assert set(row) == {"latency_n", "images_per_s", "latency_ms_mean", "latency_ms_std",
                        "latency_ms_min", "latency_ms_p50", "latency_ms_p90", "latency_ms_p99",
                        "latency_ms_max"}
    with pytest.raises(ValueError):
        summarize([], 1)
    with pytest.raises(ValueError):
        time_calls(lambda: None, iters=0, warmup=0)


def test_training_throughput_runs_full_steps():
    from fasttrain.models import create_model

    model = create_model("cifar_resnet20", width=0.25, zero_init_residual=False)
    before = [p.detach().clone() for p in model.parameters()]
    clock = FakeClock([3 * TICK, 5 * TICK])
    stats = measure_throughput(model, batch_size=4, resolution=8, num_classes=10, iters=2,
                               warmup=1, device="cpu", precision="fp32", channels_last=True,
                               clock=clock)
    assert stats.n == 2 and stats.mean_ms == 4 * TICK * 1e3
    assert stats.images_per_s == pytest.approx(4 / (4 * TICK))
    changed = [not torch.equal(a, b) for a, b in zip(before, model.parameters())]
    assert all(changed)  # forward, backward and the optimizer step reached every parameter
    with pytest.raises(ValueError, match="cudagraphs"):
        measure_throughput(model, batch_size=2, resolution=8, num_classes=10, iters=1, warmup=0,
                           device="cpu", mode="cudagraphs")


def test_conditions_name_the_machine_and_software():
    c = conditions("cpu")
    assert c["device"] == "cpu" and c["device_name"] and c["threads"] >= 1
    assert c["torch_version"] == str(torch.__version__)
    assert c["commit"] and c["date"].endswith("+00:00")
    assert {"driver", "cuda_version", "python_version"} <= set(c)


# --------------------------------------------------------------------------- runner and files

class OomAbove(nn.Module):
    """Raises torch.OutOfMemoryError for batches larger than `limit`, as a full device does."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit
        self.fc = nn.Linear(3, 5)

    def forward(self, x):
        if x.shape[0] > self.limit:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return self.fc(x.mean((2, 3)))


def test_out_of_memory_is_recorded_and_the_sweep_continues():
    bm = sources.BenchModel("oom", None, "test", OomAbove(4), 8, 5, None, OomAbove(4))
    cond = bench.Conditions(device="cpu", iters=2, warmup=1)
    rows = bench.run([bm], cond, [2, 8, 4], clock=FakeClock([TICK] * 4))
    assert [r["status"] for r in rows] == ["ok", "oom", "ok"]
    assert "out of memory" in rows[1]["error"] and rows[1]["latency_ms_p50"] is None
    assert rows[1]["params"] == 20 and rows[2]["latency_ms_p50"] == TICK * 1e3
    other = RuntimeError("a bug, not memory")
    assert not bench.is_oom(other) and bench.is_oom(RuntimeError("CUDA error: out of memory"))


class FailsAt(nn.Module):
    """Fails for one batch size with an error that is not out of memory (a model that cannot
    run at some size)."""

    def __init__(self, bad: int) -> None:
        super().__init__()
        self.bad = bad
        self.fc = nn.Linear(3, 5)

    def forward(self, x):
        if x.shape[0] == self.bad:
            raise RuntimeError("Kernel size can't be greater than actual input size\nmore text")
        return self.fc(x.mean((2, 3)))


@pytest.mark.parametrize("train", [False, True])
def test_other_failures_are_error_rows_and_the_sweep_continues(train):
    bm = sources.BenchModel("bad", None, "test", FailsAt(4), 8, 5, None, None)
    cond = bench.Conditions(device="cpu", iters=1, warmup=0, train=train)
    rows = bench.run([bm], cond, [2, 4, 1])
    assert [r["status"] for r in rows] == ["ok", "error", "ok"]
    assert rows[1]["error"] == "RuntimeError: Kernel size can't be greater than actual input size"
    assert rows[1]["images_per_s"] is None and rows[2]["images_per_s"] > 0


def test_warmup_is_raised_to_what_compilation_needs(monkeypatch):
    scripted = torch.jit.script(nn.Linear(3, 3))
    plain = nn.Linear(3, 3)
    assert bench.warmup_calls(0, "eager", plain) == 0
    assert bench.warmup_calls(0, "cudagraphs", plain) == 0  # capture warms up before timing
    assert bench.warmup_calls(0, "compile", plain) == 1
    assert bench.warmup_calls(0, "compile-cudagraphs", plain) == 2
    assert bench.warmup_calls(1, "torchscript", plain) == 2
    assert bench.warmup_calls(0, "eager", scripted) == 2  # an exported TorchScript file
    assert bench.warmup_calls(10, "compile", plain) == 10

    seen = []
    real_latency = bench.measure_latency

    def spy_latency(fn, bs, **kw):
        seen.append(kw["warmup"])
        return real_latency(fn, bs, **kw)

    monkeypatch.setattr(bench, "measure_latency", spy_latency)
    bm = sources.from_registry("cifar_resnet20", [0.25])
    cond = bench.Conditions(device="cpu", mode="torchscript", resolution=8, iters=1, warmup=0)
    (row,) = bench.run(bm, cond, [2])
    assert seen == [2] and row["warmup"] == 2  # the row says what ran

    def fake_throughput(model, **kw):  # no torch.compile here: only the warm-up is checked
        seen.append(kw["warmup"])
        return summarize([TICK], kw["batch_size"])

    monkeypatch.setattr(bench, "measure_throughput", fake_throughput)
    cond = bench.Conditions(device="cpu", mode="compile", resolution=8, iters=1, warmup=0,
                            train=True)
    (row,) = bench.run(bm, cond, [2])
    assert seen == [2, 1] and row["warmup"] == 1


def test_training_rows_handle_oom_too():
    bm = sources.BenchModel("oom", None, "test", OomAbove(2), 8, None, None, None)
    rows = bench.run([bm], bench.Conditions(device="cpu", iters=1, warmup=0, train=True), [1, 3])
    assert [r["status"] for r in rows] == ["ok", "oom"]
    assert rows[0]["kind"] == "train" and rows[0]["step_ms_mean"] > 0
    assert rows[0]["macs"] is None  # no model to count: said, not guessed


@pytest.mark.parametrize("norm_act", ["native", "fused"])
def test_training_rows_with_each_norm_act(norm_act):
    from fasttrain.models import NORM_ACT_LAYERS

    if norm_act not in NORM_ACT_LAYERS:
        pytest.skip(f"no {norm_act} norm_act in this build")
    bm = sources.from_registry("cifar_resnet20", [0.25], norm_act=norm_act)
    cond = bench.Conditions(device="cpu", resolution=8, iters=1, warmup=1, train=True)
    (row,) = bench.run(bm, cond, [2], clock=FakeClock([TICK]))
    assert row["status"] == "ok" and row["norm_act"] == norm_act
    assert row["images_per_s"] == pytest.approx(2 / TICK)


def test_impossible_conditions_are_user_errors():
    for cond in (bench.Conditions(mode="cudagraphs"), bench.Conditions(precision="fp8"),
                 bench.Conditions(mode="torchscript", train=True)):
        with pytest.raises(bench.BenchError):
            cond.check()


def test_results_files_are_named_by_conditions_and_appended(tmp_path, monkeypatch):
    bm = sources.from_registry("cifar_resnet20", [0.25, 0.5])
    cond = bench.Conditions(device="cpu", resolution=16, iters=2, warmup=0)
    rows = bench.run(bm, cond, [1], clock=FakeClock([TICK, 2 * TICK, 3 * TICK, 4 * TICK]))
    threads = torch.get_num_threads()
    assert bench.results_stem(rows) == f"latency-cpu{threads}t-fp32-nhwc-eager-16px"
    # a BN-folded export counts like its network: its latency must not land in the same file
    folded = [{**r, "norm_act": "folded"} for r in rows]
    assert bench.results_stem(folded) == f"latency-cpu{threads}t-fp32-nhwc-eager-16px-folded"
    assert bench.results_stem([{**r, "kind": "train", "norm_act": "fused"} for r in rows]) == \
        f"train-cpu{threads}t-fp32-nhwc-eager-16px"
    json_path, csv_path = bench.append_results(rows, tmp_path)
    bench.append_results(rows[:1], tmp_path)
    saved = json.loads(json_path.read_text())
    assert len(saved) == 3 and saved[0]["macs"] < saved[1]["macs"]
    lines = csv_path.read_text().splitlines()
    assert len(lines) == 4 and lines[0].startswith("kind,model,width,source,batch_size")
    png = bench.plot_vs_macs(rows, tmp_path / "plot.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # A full disk while replacing the plot truncated the earlier one (written in place).
    before = png.read_bytes()

    def fills_the_disk(fig, fname, **kwargs):
        with (open(fname, "wb") if isinstance(fname, (str, os.PathLike)) else
              contextlib.nullcontext(fname)) as f:
            f.write(b"\x89PNG partial")
        raise OSError(28, "No space left on device")
    from matplotlib.figure import Figure
    monkeypatch.setattr(Figure, "savefig", fills_the_disk)
    with pytest.raises(bench.BenchError, match=rf"^{re.escape(str(png))}: cannot write "
                                               rf"\(No space left on device\)$"):
        bench.plot_vs_macs(rows, png)
    assert png.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_torchscript_mode_scripts_or_traces(precision):
    # the default models cannot be scripted (super() in BatchNormReLU2d): they are traced, and
    # under autocast the trace must not meet autocast's cached weight casts
    bm = sources.from_registry("cifar_resnet20", [0.25])
    cond = bench.Conditions(device="cpu", mode="torchscript", resolution=8, iters=1, warmup=1,
                            precision=precision)
    (row,) = bench.run(bm, cond, [2])
    assert row["status"] == "ok" and row["mode"] == "torchscript", row.get("error")


# --------------------------------------------------------------------------- sources

def test_factory_source_imports_from_the_working_directory(tmp_path, monkeypatch):
    (tmp_path / "my_pruned_net.py").write_text(textwrap.dedent("""
        from torch import nn
        def build():
            return nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                 nn.Linear(4, 7))
        def not_a_module():
            return 3
    """))
    monkeypatch.chdir(tmp_path)
    bm = sources.from_factory("my_pruned_net:build")
    assert bm.name == "my_pruned_net:build" and bm.width is None
    rows = bench.run([bm], bench.Conditions(resolution=10, iters=1, warmup=0), [1])
    assert rows[0]["macs"] == 3 * 4 * 9 * 64 + 4 * 7  # 8x8 conv outputs, then the fc
    for bad in ("my_pruned_net", "no_such_module_xyz:f", "my_pruned_net:missing",
                "my_pruned_net:not_a_module"):
        with pytest.raises(sources.SourceError):
            sources.from_factory(bad)


def test_a_factory_beside_the_shell_that_ran_env_sh_is_found(tmp_path, monkeypatch):
    """tools/env.sh runs the command from the clone: `--factory mynet:build` from the user's
    folder was "No module named 'mynet'" (env.sh passes that folder as FASTTRAIN_CALLER_DIR)."""
    user, clone = tmp_path / "user", tmp_path / "clone"
    user.mkdir()
    clone.mkdir()
    (user / "net_beside_shell.py").write_text("from torch import nn\n"
                                             "def build():\n    return nn.Linear(3, 2)\n")
    monkeypatch.chdir(clone)
    monkeypatch.setenv("FASTTRAIN_CALLER_DIR", str(user))
    path = list(sys.path)
    assert sources.factory_file("net_beside_shell:build") == str(user / "net_beside_shell.py")
    assert isinstance(sources.from_factory("net_beside_shell:build").model, torch.nn.Linear)
    assert sys.path == path
    # the current directory first (a notebook that changed directory imports the new folder's)
    (clone / "net_beside_shell.py").write_text("from torch import nn\n"
                                              "def build():\n    return nn.Conv2d(3, 2, 1)\n")
    assert sources.factory_file("net_beside_shell:build") == str(clone / "net_beside_shell.py")
    (clone / "net_beside_shell.py").unlink()
    monkeypatch.delenv("FASTTRAIN_CALLER_DIR")  # without env.sh: the current directory only
    sys.modules.pop("net_beside_shell", None)
    with pytest.raises(sources.SourceError, match="No module named 'net_beside_shell'"):
        sources.from_factory("net_beside_shell:build")


def test_factory_failures_are_one_line_source_errors(tmp_path, monkeypatch):
    (tmp_path / "fac_needs_arg.py").write_text("def build(width):\n    return None\n")
    (tmp_path / "fac_syntax.py").write_text("def build(:\n")
    (tmp_path / "fac_raises.py").write_text("raise ValueError('no GPU here\\nsecond line')\n")
    # a lazy layer's weight has no size until a forward: counting it was a ValueError traceback
    (tmp_path / "fac_lazy.py").write_text("from torch import nn\ndef build():\n    return "
                                          "nn.Sequential(nn.Conv2d(3, 4, 7), nn.Flatten(), "
                                          "nn.LazyLinear(2))\n")
    monkeypatch.chdir(tmp_path)
    for spec, message in [
            ("fac_lazy:build", "its LazyLinear has no parameters yet (a lazy layer sizes them "
                               "at its first forward"),
            ("fac_needs_arg:build", "calling it failed (TypeError: build() missing 1 required"),
            ("fac_syntax:build", "importing 'fac_syntax' failed (SyntaxError: "),
            ("fac_raises:build", "importing 'fac_raises' failed (ValueError: no GPU here)"),
            ("no_such_module_xyz:f", "cannot import 'no_such_module_xyz'")]:
        with pytest.raises(sources.SourceError, match=None) as info:
            sources.from_factory(spec)
        assert message in str(info.value) and "\n" not in str(info.value), info.value


def test_factory_rows_name_their_file_norm_act_and_input_channels(tmp_path, monkeypatch):
    """A factory's plain BatchNorm is the native one (compare sets its latency beside thin
    networks'); two `nets:build` of different folders stay apart; a grey-image network gets
    one input channel; a torch.compile'd module is warmed up and counted on its module."""
    for folder, width in (("a", 4), ("b", 6)):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "nets.py").write_text(textwrap.dedent(f"""
            import torch
            from torch import nn
            from fasttrain.export import model_from_name
            def build():
                return nn.Sequential(nn.Conv2d(3, {width}, 3), nn.BatchNorm2d({width}),
                                     nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                     nn.Linear({width}, 5))
            def grey():
                return nn.Sequential(nn.Conv2d(1, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                     nn.Linear(4, 5))
            def fused():
                return model_from_name("cifar_resnet20", 0.25, norm_act="fused")[0]
            def compiled():
                return torch.compile(build())
        """))
    rows = []
    path_before = list(sys.path)
    for folder in ("a", "b"):
        monkeypatch.chdir(tmp_path / folder)  # a notebook changing folder: the module anew
        bm = sources.from_factory("nets:build")
        assert sys.path == path_before
        assert (bm.norm_act, bm.in_chans) == ("native", 3)
        assert bm.source == f"nets:build ({tmp_path / folder / 'nets.py'})"
        rows += bench.run([bm], bench.Conditions(resolution=8, iters=1, warmup=0), [1])
    assert [r["params"] for r in rows] == [3 * 4 * 9 + 4 + 8 + 4 * 5 + 5,
                                           3 * 6 * 9 + 6 + 12 + 6 * 5 + 5]
    assert rows[0]["source"] != rows[1]["source"]
    grey = sources.from_factory("nets:grey")
    (row,) = bench.run([grey], bench.Conditions(resolution=8, iters=1, warmup=0), [2])
    assert row["status"] == "ok" and row["macs"] == 1 * 4 * 9 * 36 + 4 * 5, row["error"]
    (row,) = bench.run([grey], bench.Conditions(resolution=8, iters=1, warmup=0, train=True),
                       [2])
    assert row["status"] == "ok", row["error"]
    assert sources.from_factory("nets:fused").norm_act == "fused"
    compiled = sources.from_factory("nets:compiled")
    assert bench.warmup_calls(0, "eager", compiled.model) == 1
    assert compiled.count_model is compiled.model._orig_mod
    # its time is torch.compile's: recorded as compile, kept apart from eager rows by compare
    cond = bench.Conditions(resolution=8, iters=1, warmup=0)
    assert bench.row_mode(compiled, cond) == "compile"
    wrapped = dataclasses.replace(compiled, model=nn.Sequential(nn.Identity(), compiled.model))
    assert bench.row_mode(wrapped, cond) == "compile"
    assert bench.warmup_calls(0, "eager", wrapped.model) == 1
    # edited between two calls (a notebook): the new file's network, not the cached module's
    nets = tmp_path / "b" / "nets.py"
    nets.write_text(nets.read_text().replace("nn.Linear(6, 5)", "nn.Linear(6, 7)"))
    os.utime(nets, ns=(nets.stat().st_atime_ns, nets.stat().st_mtime_ns + 10**9))
    assert sources.from_factory("nets:build").model[-1].out_features == 7
    sys.modules.pop("nets", None)


def _append_many(directory: str, tag: str) -> None:
    for i in range(60):
        # "error": a measured row must carry what the plot reads (read_record checks it)
        row = {"kind": "latency", "status": "error", "tag": tag, "i": i}
        bench.append_results([row], directory, stem="rec")


def test_two_benchmarks_saving_at_once_keep_every_row(tmp_path):
    """Each read the record and wrote it back with its own rows: 266 of 400 rows survived."""
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    writers = [ctx.Process(target=_append_many, args=(str(tmp_path), tag)) for tag in "ab"]
    for w in writers:
        w.start()
    for w in writers:
        w.join(120)
        assert w.exitcode == 0
    rows = json.loads((tmp_path / "rec.json").read_text())
    assert sorted((r["tag"], r["i"]) for r in rows) == [(t, i) for t in "ab" for i in range(60)]
    assert len((tmp_path / "rec.csv").read_text().splitlines()) == 121
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rec.csv", "rec.json"]


def test_a_file_that_is_no_torch_export_program_is_one_line(tmp_path, capfd):
    """torch.export.load logged its first attempt's traceback (18 lines) before the error."""
    path = tmp_path / "ck.pt2"
    torch.save({"model": {"w": torch.ones(2)}}, path)
    assert benchmark_tool.main(["--file", str(path), "--device", "cpu"]) == 2
    err = capfd.readouterr().err
    assert err.count("\n") == 1 and "a torch.save file" in err, err


def test_a_factory_with_fused_layers_and_no_kernels_says_what_to_do(tmp_path, monkeypatch,
                                                                     capsys):
    from fasttrain.ops import _ext

    (tmp_path / "fusednets.py").write_text(
        "from fasttrain.export import model_from_name\n"
        "def build():\n    return model_from_name('cifar_resnet20', 0.25, norm_act='fused')[0]\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(_ext, "supports", lambda device: False)
    assert benchmark_tool.main(["--factory", "fusednets:build", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --factory fusednets:build (its module holds fused "
                          "BatchNorm+ReLU layers): the fused kernels are unavailable on cpu")
    assert err.rstrip().endswith("or have the factory build norm_act='native' layers"), err
    sys.modules.pop("fusednets", None)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny cifar_resnet20 (width 0.25) exported at 16 px, BatchNorm folded: TorchScript and
    torch.export files."""
    from fasttrain import export as ex

    out = tmp_path_factory.mktemp("exported")
    model, meta = ex.model_from_name("cifar_resnet20", 0.25, resolution=16)
    _, written = ex.export_model(model, meta, "torchscript", out / "net.pt")
    assert written["bn_folded"] > 0
    ex.export_model(model, meta, "export", out / "net.pt2")
    return out


def test_exported_files_count_like_the_trained_network(exported):
    cond = bench.Conditions(device="cpu", resolution=16, iters=1, warmup=0)
    (reg,) = bench.run(sources.from_registry("cifar_resnet20", [0.25]), cond, [1])
    for name in ("net.pt", "net.pt2"):
        (row,) = bench.run([sources.from_file(exported / name)], cond, [1])
        assert row["status"] == "ok" and row["norm_act"] == "folded"
        assert (row["params"], row["macs"], row["macs_fvcore_total"]) == \
            (reg["params"], reg["macs"], reg["macs_fvcore_total"]), name


def test_the_plot_draws_two_sources_of_one_width_as_two_lines(exported, tmp_path, monkeypatch):
    """A checkpoint's (here an exported file's) row beside the registry's sweep of its model
    joined the sweep's line, which then doubled back between two points both labelled w0.25."""
    from matplotlib.axes import Axes

    cond = bench.Conditions(device="cpu", resolution=16, iters=1, warmup=0)
    file = sources.from_file(exported / "net.pt2")
    rows = bench.run([*sources.from_registry("cifar_resnet20", [0.25, 0.5]), file], cond, [1])
    assert [r["width"] for r in rows] == [0.25, 0.5, 0.25]
    lines = []
    real_plot = Axes.plot
    monkeypatch.setattr(Axes, "plot", lambda self, xs, ys, **k: lines.append(
        (len(xs), k["label"])) or real_plot(self, xs, ys, **k))
    bench.plot_vs_macs(rows, tmp_path / "p.png")
    assert sorted(lines) == [(1, f"cifar_resnet20 ({rows[2]['source']}), batch 1"),
                             (2, f"cifar_resnet20 ({rows[0]['source']}), batch 1")]
    lines.clear()  # a sweep of one source stays one line, its source unsaid
    labels = []
    real_annotate = Axes.annotate
    monkeypatch.setattr(Axes, "annotate", lambda self, text, xy, **k: labels.append(
        (text, k.get("ha"))) or real_annotate(self, text, xy, **k))
    bench.plot_vs_macs(rows[:2], tmp_path / "p.png")
    assert lines == [(2, "cifar_resnet20, batch 1")]
    # the widest network's label towards the middle: it ran into the right frame
    assert labels == [("w0.25", "left"), ("w0.5", "right")]


def test_a_torchscript_files_rows_say_torchscript_and_compare_keeps_them_apart(
        exported, tmp_path, monkeypatch):
    """Its eager rows ran TorchScript's executor: recorded as eager, compare set a TorchScript
    file's latency (0.27 ms) against an eager checkpoint's (0.64 ms) of the same network (rows
    of different modes it refuses: test_compare.py::test_latency_is_matched_by_architecture)."""
    cond = bench.Conditions(device="cpu", resolution=16, iters=1, warmup=0)
    script, program = (sources.from_file(exported / name) for name in ("net.pt", "net.pt2"))
    (reg,) = sources.from_registry("cifar_resnet20", [0.25])
    rows = bench.run([reg, script, program], cond, [1])
    assert [r["mode"] for r in rows] == ["eager", "torchscript", "eager"]
    assert bench.results_stem(rows) == bench.planned_results_stem([reg, script, program], cond)
    assert "-eager-torchscript-" in bench.results_stem(rows)
    # the table's and the plot's titles name both modes (they said the first row's)
    from matplotlib.figure import Figure

    assert ", fp32, channels_last, eager/torchscript, torch " in \
        benchmark_tool._table(rows, train=False).title
    titles = []
    monkeypatch.setattr(Figure, "suptitle", lambda self, text, **k: titles.append(text))
    bench.plot_vs_macs(rows, tmp_path / "mixed.png")
    assert "fp32, channels_last, eager/torchscript, 16 px" in titles[0], titles
    ts = bench.Conditions(device="cpu", resolution=16, iters=1, warmup=0, mode="torchscript")
    (row,) = bench.run([script], ts, [1])  # the file as it is, beside scripted checkpoints
    assert (row["status"], row["mode"]) == ("ok", "torchscript"), row["error"]
    with pytest.raises(bench.BenchError, match=r"net\.pt2: an exported file runs in eager or "
                                               r"cudagraphs inference mode only, not "
                                               r"torchscript"):
        ts.check([program])
    with pytest.raises(bench.BenchError, match=r"net\.pt: an exported file runs in eager, "
                                               r"torchscript or cudagraphs inference mode only"):
        bench.Conditions(device="cpu", mode="compile").check([script])


def test_a_module_holding_a_scripted_part_is_recorded_as_torchscript(exported):
    # a factory wrapping a scripted backbone (normalisation in front) said "eager": compare
    # would set its TorchScript-executor time against eager rows
    (reg,) = sources.from_registry("cifar_resnet20", [0.25])
    script = torch.jit.load(exported / "net.pt")
    cond = bench.Conditions(device="cpu", resolution=16, iters=1, warmup=0)
    for part, mode in ((script, "torchscript"), (torch.jit.trace(nn.Conv2d(3, 3, 1),
                                                                 torch.randn(1, 3, 4, 4)),
                                                 "torchscript"), (nn.Conv2d(3, 3, 1), "eager")):
        wrapper = nn.Sequential(nn.Identity(), part)
        bm = dataclasses.replace(reg, model=wrapper, count_model=None)
        assert bench.row_mode(bm, cond) == mode
    (row,) = bench.run([dataclasses.replace(reg, model=nn.Sequential(nn.Identity(), script),
                                            count_model=None)], cond, [1])
    assert (row["status"], row["mode"]) == ("ok", "torchscript"), row["error"]


def test_a_torch_export_file_runs_at_its_exported_size_only(exported):
    bm = sources.from_file(exported / "net.pt2")
    assert bm.fixed_resolution == 16 and bm.resolution == 16
    bench.Conditions(device="cpu", resolution=16).check([bm])
    with pytest.raises(bench.BenchError, match=r"net\.pt2: exported for 16 px inputs only, "
                                               r"not --resolution 32"):
        bench.Conditions(device="cpu", resolution=32).check([bm])
    assert sources.from_file(exported / "net.pt").fixed_resolution is None  # any size


def test_a_torch_export_file_of_another_input_runs_at_its_own_shape(tmp_path):
    """A 1-channel network exported by its own code was fed 3 channels and failed its guard;
    a non-square one failed too, after falling back to 224 px."""
    gray = nn.Sequential(nn.Conv2d(1, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(4, 10)).eval()
    batch = torch.export.Dim("batch")
    program = torch.export.export(gray, (torch.randn(2, 1, 28, 28),),
                                  dynamic_shapes=({0: batch},))
    torch.export.save(program, tmp_path / "gray.pt2")
    bm = sources.from_file(tmp_path / "gray.pt2")
    assert (bm.in_chans, bm.fixed_resolution) == (1, 28)
    rows = bench.run([bm], bench.Conditions(device="cpu", iters=2, warmup=1), [3])
    assert [r["status"] for r in rows] == ["ok"], rows[0]["error"]
    wide = torch.export.export(gray, (torch.randn(2, 1, 28, 40),), dynamic_shapes=({0: batch},))
    torch.export.save(wide, tmp_path / "wide.pt2")
    with pytest.raises(sources.SourceError, match=r"wide\.pt2: exported for 28x40 inputs only; "
                                                  r"the benchmark and evaluation run square"):
        sources.from_file(tmp_path / "wide.pt2")


def test_a_torchscript_failure_is_named_by_its_reason():
    """The interpreter's message starts with its own words and ends with the reason: the row
    said only "The following operation failed in the TorchScript interpreter."."""
    gray = torch.jit.script(nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten()))
    with pytest.raises(RuntimeError) as e:
        gray(torch.randn(1, 3, 8, 8))
    assert sources.first_line(e.value).startswith("RuntimeError: Given groups=1, weight of "
                                                  "size [4, 1, 3, 3], expected input")
    assert sources.first_line(ValueError("a\nb")) == "ValueError: a"


def test_file_and_checkpoint_sources_say_what_is_wrong(exported, tmp_path, capsys):
    from fasttrain.errors import UserError

    with pytest.raises(sources.SourceError, match=r"TorchScript archive.*use --file"):
        sources.from_checkpoint(exported / "net.pt")
    torch.save({"model": {}}, tmp_path / "last.pt")  # and the other way round
    with pytest.raises(sources.SourceError, match=r"last.pt: a torch.save file \(a training "
                                                  r"checkpoint\?\), not an exported model "
                                                  r"\(use --checkpoint\)$"):
        sources.from_file(tmp_path / "last.pt")
    # the other export format under a suffix: torch said "corrupted" or "see the warnings above"
    import shutil

    shutil.copy(exported / "net.pt2", tmp_path / "program.pt")
    shutil.copy(exported / "net.pt", tmp_path / "script.pt2")
    with pytest.raises(UserError, match=r"program\.pt: a torch\.export program, not a "
                                        r"TorchScript file; name it program\.pt2$"):
        sources.from_file(tmp_path / "program.pt")
    with pytest.raises(UserError, match=r"script\.pt2: a TorchScript archive, not a "
                                        r"torch\.export program; name it script\.pt$"):
        sources.from_file(tmp_path / "script.pt2")
    # a model saved whole is no checkpoint either: --checkpoint refused it in turn
    from fasttrain.models import create_model

    torch.save(create_model("cifar_resnet20", width=0.25), tmp_path / "whole.pt")
    with pytest.raises(UserError, match=r"whole\.pt: cannot load checkpoint \(refused by "
                                        r"weights-only loading: .*CifarResNet.* through "
                                        r"--factory, a function of yours that loads it\)$"):
        sources.from_file(tmp_path / "whole.pt")
    plain = tmp_path / "plain.pt"
    torch.jit.script(nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten())).save(str(plain))
    with pytest.warns(UserWarning, match="MACs not counted: the file has no fasttrain metadata"):
        bm = sources.from_file(plain)
    assert bm.count_model is None
    # --plot of models without MACs: refused before measuring (it failed after every row)
    with pytest.warns(UserWarning, match="MACs not counted"):
        assert benchmark_tool.main(["--file", str(plain), "--device", "cpu", "--resolution",
                                    "8", "--plot", str(tmp_path / "p.png")]) == 2
    assert not (tmp_path / "p.png").exists()
    assert capsys.readouterr().err.splitlines() == [
        f"error: --plot {tmp_path / 'p.png'}: no model here has a MAC count to plot against "
        f"(plain.pt: a file without fasttrain metadata); leave --plot out"]
    import copy
    import warnings

    # bench.run moves a deep copy, whose parameters torch then calls non-leaf in a warning
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        bench.prepare_inference(copy.deepcopy(bm.model), batch_size=1, resolution=8,
                                device="cpu", precision="fp32", channels_last=True,
                                mode="eager")
    assert [str(w.message) for w in caught] == []


def test_checkpoint_source_uses_the_checkpoint_config(tmp_path):
    from fasttrain.config import Config
    from fasttrain.models import create_model

    cfg = Config()
    cfg.model.name, cfg.model.width, cfg.model.num_classes = "cifar_resnet20", 0.25, 0
    cfg.data.val_res = 24
    model = create_model("cifar_resnet20", width=0.25, num_classes=7)
    path = tmp_path / "last.pt"
    torch.save({"model": model.state_dict(), "config": cfg.to_dict()}, path)
    bm = sources.from_checkpoint(path)
    assert (bm.name, bm.width, bm.resolution, bm.num_classes) == ("cifar_resnet20", 0.25, 24, 7)
    assert torch.equal(bm.model.fc.weight, model.fc.weight)


# --------------------------------------------------------------------------- command line

@pytest.mark.slow
def test_cli_contract_end_to_end(tmp_path):
    out = tmp_path / "OUT.json"
    # One intra-op thread: on a shared CI machine, two spinning OpenMP threads competing with
    # other jobs make each call wait for the scheduler (seen here: 5 ms calls taking 500 ms).
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, str(ROOT / "tools" / "benchmark.py"), "--model",
                          "thin_resnet18", "--width", "0.25", "--device", "cpu", "--batch-size",
                          "1,8", "--resolution", "64", "--iters", "20", "--json", str(out)],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    rows = json.loads(out.read_text())
    assert [r["batch_size"] for r in rows] == [1, 8]
    for r in rows:
        assert all(r.get(k) is not None for k in CONTRACT_FIELDS), r
        assert (r["model"], r["width"], r["resolution"], r["precision"], r["mode"]) == \
            ("thin_resnet18", 0.25, 64, "fp32", "eager")
        assert r["macs"] == 11_187_200 and r["params"] == 831_096
        assert r["latency_ms_p50"] <= r["latency_ms_p90"] <= r["latency_ms_p99"]
        assert math.isfinite(r["images_per_s"]) and r["latency_n"] == 20
    assert "thin_resnet18" in res.stdout


def test_cli_save_plot_csv_and_factory(tmp_path, monkeypatch, capsys):
    (tmp_path / "oom_factory_mod.py").write_text(textwrap.dedent("""
        import torch
        from torch import nn
        class Net(nn.Module):
            def __init__(self):
                super().__init__()
                self.conv = nn.Conv2d(3, 8, 3)
            def forward(self, x):
                if x.shape[0] >= 4:
                    raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
                return self.conv(x).mean((2, 3))
        def build():
            return Net()
    """))
    monkeypatch.chdir(tmp_path)
    results = tmp_path / "results"
    argv = ["--factory", "oom_factory_mod:build", "--device", "cpu", "--batch-size", "1,4,2",
            "--resolution", "12", "--iters", "2", "--warmup", "1", "--csv", "rows.csv",
            "--save", "--results-dir", str(results), "--plot"]
    assert benchmark_tool.main(argv) == 0
    (json_file,) = results.glob("latency-*-fp32-nhwc-eager-12px.json")
    rows = json.loads(json_file.read_text())
    assert [r["status"] for r in rows] == ["ok", "oom", "ok"]
    assert json_file.with_suffix(".png").is_file() and json_file.with_suffix(".csv").is_file()
    assert len((tmp_path / "rows.csv").read_text().splitlines()) == 4
    assert "OOM" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["--model", "thin_resnet5"], "did you mean 'thin_resnet50'"),
    (["--factory", "x:y", "--width", "0.5"], "--width applies to --model only"),
    (["--model", "thin_resnet18", "--device", "cpu", "--mode", "cudagraphs"], "cudagraphs"),
    (["--model", "thin_resnet18", "--device", "cpu", "--mode", "compile-cudagraphs", "--train"],
     "compile-cudagraphs needs --device cuda"),
    (["--model", "thin_resnet18", "--batch-size", "1,x"], "--batch-size"),
    (["--model", "thin_resnet18", "--plot"], "--plot needs a PNG path"),
    (["--checkpoint", "/no/such/ckpt.pt"], "checkpoint not found"),
    (["--file", "/no/such/model.pt"], "file not found"),
    (["--file", "/tmp"], "/tmp: a directory, not an exported file"),
    (["--model", "thin_resnet18", "--width", "0"], "positive"),
    (["--model", ""], "--model '': no model name given"),
    (["--model", ","], "--model ',': no model name given"),
    (["--checkpoint", ""], "--checkpoint: empty path"),
    (["--file", ""], "--file: empty path"),
    (["--factory", ""], "--factory: empty spec"),
    # libgomp segfaulted at 100000 threads
    (["--model", "thin_resnet18", "--threads", "100000"], "expected an integer <= 4096"),
    (["--model", "thin_resnet18", "--width", "inf"], "expected finite positive values"),
    (["--model", "thin_resnet18", "--width", "0.5,-inf"], "expected finite positive values"),
    (["--model", "thin_resnet18", "--width", "nan"], "expected finite positive values"),
    (["--checkpoint", "c.pt", "--num-classes", "5", "--channel-divisor", "8"],
     "--num-classes and --channel-divisor apply to --model only"),
    (["--file", "x.pt", "--num-classes", "3"], "--num-classes applies to --model only"),
    (["--checkpoint", "c.pt", "--shortcut", "B"], "--shortcut applies to --model only"),
    (["--model", "cifar_resnet20,thin_resnet18", "--shortcut", "A"],
     "--shortcut applies to CIFAR ResNets (cifar_*) only, not thin_resnet18"),
    (["--file", "x.pt", "--norm-act", "fused"], "--norm-act applies to --model and --checkpoint"),
    (["--factory", "m:f", "--norm-act", "native"], "--norm-act applies to --model and"),
])
def test_cli_user_errors_exit_2_with_one_line(argv, message, capsys):
    try:
        code = benchmark_tool.main(argv + ["--iters", "1"])
    except SystemExit as e:  # argparse errors
        code = e.code
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err


def test_a_sweep_gives_the_callers_cudnn_benchmark_setting_back(monkeypatch):
    # CUDA rows measure with cuDNN's algorithm search on, as training does; a notebook's later
    # deterministic work kept it on (a setting is only a flag: no GPU needed to check it)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    with bench.cudnn_benchmark_for(torch.device("cuda")):
        assert torch.backends.cudnn.benchmark
    assert not torch.backends.cudnn.benchmark
    with pytest.raises(KeyboardInterrupt), bench.cudnn_benchmark_for(torch.device("cuda")):
        raise KeyboardInterrupt
    assert not torch.backends.cudnn.benchmark
    with bench.cudnn_benchmark_for(torch.device("cpu")):
        assert not torch.backends.cudnn.benchmark


@pytest.mark.cuda
def test_a_cuda_sweep_measures_with_cudnn_benchmark_and_restores_it(monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    cond = bench.Conditions(device="cuda", resolution=32, iters=2, warmup=1)
    (row,) = bench.run(sources.from_registry("cifar_resnet20", [0.25]), cond, [2])
    assert row["status"] == "ok" and row["cudnn_benchmark"] is True, row
    assert not torch.backends.cudnn.benchmark


@pytest.mark.cuda
@pytest.mark.parametrize("mode", ["eager", "cudagraphs", "compile-cudagraphs"])
def test_a_latency_rows_peak_memory_is_its_own(mode):
    """The sweep moved each model to the GPU in place and kept it there (and compiled rows kept
    the previous compile's CUDA-graph pool): a narrower network measured after a wider one
    reported a larger peak than the wider one."""
    cond = bench.Conditions(device="cuda", resolution=32, iters=2, warmup=1, mode=mode)
    wide, narrow = sources.from_registry("cifar_resnet20", [4.0, 0.25])
    (alone,) = bench.run([narrow], cond, [1])
    rows = bench.run([wide, narrow], cond, [1])
    assert [r["status"] for r in rows] == ["ok", "ok"], rows
    assert rows[1]["peak_mem_mib"] < rows[0]["peak_mem_mib"], rows
    assert rows[1]["peak_mem_mib"] == pytest.approx(alone["peak_mem_mib"], rel=0.2, abs=2)


@pytest.mark.cuda
def test_cuda_graph_replay_reruns_the_captured_work():
    """Warm-up runs execute, the capture only records, and each replay redoes the recorded work
    on the tensors' current contents without calling Python."""
    from fasttrain.measure.timing import cuda_graph_replay

    x0 = torch.randn(1000, device="cuda")
    x, out = x0.clone(), torch.zeros_like(x0)
    calls = []

    def fn():
        calls.append(1)
        out.add_(x)

    replay = cuda_graph_replay(fn, "cuda", warmup=2)
    torch.cuda.synchronize()
    assert len(calls) == 3  # 2 warm-up runs + the capture
    torch.testing.assert_close(out, 2 * x0)
    x.fill_(1.0)
    replay()
    replay()
    torch.cuda.synchronize()
    assert len(calls) == 3
    torch.testing.assert_close(out, 2 * x0 + 2)


TINY = ["--model", "cifar_resnet20", "--width", "0.25", "--resolution", "16", "--device", "cpu",
        "--iters", "1", "--warmup", "0"]


@pytest.mark.parametrize("taken, flag, inside", [
    ("folder", "--json", ""),            # an existing folder where the file goes
    ("folder", "--csv", ""),
    ("folder", "--plot", ""),
    ("file", "--json", "rows.json"),     # its folder would have to replace a file
    ("file", "--csv", "a/rows.csv"),
    ("file", "--results-dir", ""),       # --save's folder is a file
])
def test_cli_refuses_unwritable_outputs_before_measuring(taken, flag, inside, tmp_path,
                                                         monkeypatch, capsys):
    if taken == "folder":
        (tmp_path / "taken").mkdir()
    else:
        (tmp_path / "taken").write_text("x")
    path = tmp_path / "taken" / inside if inside else tmp_path / "taken"
    monkeypatch.setattr(bench, "run", lambda *a, **k: pytest.fail("measured before the check"))
    extra = ["--save"] if flag == "--results-dir" else []
    assert benchmark_tool.main(TINY + [flag, str(path)] + extra) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {flag} {path}: ") and err.count("\n") == 1, err


@pytest.mark.parametrize("source", ["--file", "--checkpoint"])
@pytest.mark.parametrize("flag", ["--json", "--csv"])
def test_cli_refuses_an_output_that_is_the_measured_file(source, flag, tmp_path, monkeypatch,
                                                         capsys):
    # `--file m.pt --json m.pt` replaced the export with the results
    measured = tmp_path / "m.pt"
    measured.write_bytes(b"the network")
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path / "sub")
    monkeypatch.setattr(bench, "run", lambda *a, **k: pytest.fail("measured before the check"))
    assert benchmark_tool.main([source, str(measured), "--device", "cpu", flag, "../m.pt"]) == 2
    assert capsys.readouterr().err == (f"error: {flag} ../m.pt: is the input {measured}; name "
                                       f"another file to write\n")
    assert measured.read_bytes() == b"the network"


@pytest.mark.parametrize("flag", ["--json", "--csv"])
def test_cli_refuses_an_output_that_is_the_factorys_module(flag, tmp_path, monkeypatch, capsys):
    """`--factory facs:build --json facs.py` replaced the user's code with the rows."""
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "__init__.py").write_text("")
    code = "import torch\ndef build():\n    return torch.nn.Conv2d(3, 4, 3)\n"
    (tmp_path / "facs.py").write_text(code)
    (tmp_path / "pkg" / "nets.py").write_text(code)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(bench, "run", lambda *a, **k: pytest.fail("measured before the check"))
    for spec, module in (("facs:build", "facs.py"), ("pkg.nets:build", "pkg/nets.py")):
        assert benchmark_tool.main(["--factory", spec, "--device", "cpu", flag, module]) == 2
        assert capsys.readouterr().err == (f"error: {flag} {module}: is the input "
                                           f"{tmp_path / module}; name another file to write\n")
        assert (tmp_path / module).read_text() == code
    assert sources.factory_file("not_a_module_here:build") is None


def test_cli_output_names_too_long_and_list_repeats_are_one_line_before_measuring(
        tmp_path, monkeypatch, capsys):
    """A name over the file system's limit was a traceback; one just under it passed the check
    and failed after the sweep (its temporary name is longer). `--batch-size 1,,2` ran as 1,2
    and `1,1` measured each row twice."""
    monkeypatch.setattr(bench, "run", lambda *a, **k: pytest.fail("measured before the check"))
    for path, why in ((tmp_path / f"{'a' * 300}.json", "File name too long"),
                      (tmp_path / "new" / f"{'b' * 250}.json",
                       "file name too long (255 bytes; it is written under a temporary name 16 "
                       "bytes longer, over this folder's limit)")):
        assert benchmark_tool.main(TINY + ["--json", str(path)]) == 2
        assert capsys.readouterr().err == f"error: --json {path}: {why}\n"
    assert not (tmp_path / "new").exists()
    for args, why in ((["--batch-size", "1,,2"], "argument --batch-size: an empty item in "
                                                 "'1,,2'"),
                      (["--batch-size", "1,1"], "argument --batch-size: 1 given twice in '1,1'"),
                      (["--width", "0.25,0.5,0.25"], "argument --width: 0.25 given twice"),
                      (["--model", "cifar_resnet20,cifar_resnet20"],
                       "--model 'cifar_resnet20,cifar_resnet20': cifar_resnet20 given twice"),
                      # an "error" row (exit 1) after the sweep began; export had the bound
                      (["--resolution", "1000000000"],
                       "argument --resolution: expected an integer <= 8192, got 1000000000")):
        given = {args[0]}
        base = [a for i, a in enumerate(TINY) if a not in given
                and (i == 0 or TINY[i - 1] not in given)]
        with contextlib.suppress(SystemExit):
            assert benchmark_tool.main(base + args) == 2
        assert capsys.readouterr().err.startswith(f"error: {why}")


def test_cli_leaves_no_output_folder_after_an_error_found_before_measuring(tmp_path, capsys):
    """A bad model name or an unreadable checkpoint left the outputs' new folders behind."""
    text = tmp_path / "text.pt"
    text.write_text("not a checkpoint")
    for source in (["--model", "bogus_model"], ["--checkpoint", str(text)]):
        assert benchmark_tool.main(source + ["--device", "cpu", "--json",
                                             str(tmp_path / "a" / "b" / "x.json"), "--save",
                                             "--results-dir", str(tmp_path / "r" / "s")]) == 2
        assert capsys.readouterr().err.count("\n") == 1
        assert sorted(p.name for p in tmp_path.iterdir()) == ["text.pt"]


def test_a_source_path_that_is_not_utf8_is_written_escaped_to_the_csv(tmp_path, capsys):
    """The CSV (and --save's CSV twin) failed with UnicodeEncodeError after the measurement."""
    net = torch.jit.script(nn.Conv2d(3, 4, 3))
    name = Path(os.fsdecode(bytes(tmp_path) + b"/bad\xff.pt"))
    net.save(str(tmp_path / "good.pt"))
    os.rename(tmp_path / "good.pt", name)
    rows = tmp_path / "rows.csv"
    with pytest.warns(UserWarning, match="MACs not counted"):
        assert benchmark_tool.main(["--file", str(name), "--device", "cpu", "--resolution", "8",
                                    "--iters", "1", "--warmup", "0", "--csv", str(rows)]) == 0
    assert "bad\\udcff.pt" in rows.read_text()


def test_cli_creates_output_folders_and_keeps_results_when_one_write_fails(tmp_path, monkeypatch,
                                                                           capsys):
    out = tmp_path / "new" / "deeper"
    assert benchmark_tool.main(TINY + ["--json", str(out / "rows.json"),
                                       "--csv", str(out / "rows.csv")]) == 0
    assert len(json.loads((out / "rows.json").read_text())) == 1
    assert len((out / "rows.csv").read_text().splitlines()) == 2
    capsys.readouterr()

    real_run = bench.run

    def run_then_take_the_path(*a, **k):  # the JSON path turns into a folder while measuring
        rows = real_run(*a, **k)
        (tmp_path / "late.json").mkdir()
        return rows

    monkeypatch.setattr(bench, "run", run_then_take_the_path)
    code = benchmark_tool.main(TINY + ["--json", str(tmp_path / "late.json"),
                                       "--csv", str(tmp_path / "kept.csv")])
    captured = capsys.readouterr()
    assert code == 2
    assert captured.err.startswith(f"error: --json: {tmp_path / 'late.json'}: cannot write")
    assert captured.err.count("\n") == 1, captured.err
    assert "cifar_resnet20" in captured.out  # the table came first
    assert len((tmp_path / "kept.csv").read_text().splitlines()) == 2  # the other output too


def test_cli_error_rows_are_written_and_exit_1(tmp_path, monkeypatch, capsys):
    (tmp_path / "small_input_net.py").write_text(textwrap.dedent("""
        import torch
        from torch import nn
        class Net(nn.Module):
            def __init__(self):
                super().__init__()
                self.conv = nn.Conv2d(3, 8, 7)  # unpadded: needs inputs of 7 px or more
            def forward(self, x):
                return self.conv(x).mean((2, 3))
        def build():
            return Net()
    """))
    monkeypatch.chdir(tmp_path)
    argv = ["--factory", "small_input_net:build", "--device", "cpu", "--batch-size", "1,2",
            "--resolution", "4", "--iters", "1", "--warmup", "0", "--json", "rows.json"]
    with pytest.warns(UserWarning, match="MACs not counted"):  # fvcore's trace fails the same way
        assert benchmark_tool.main(argv) == 1
    captured = capsys.readouterr()
    rows = json.loads((tmp_path / "rows.json").read_text())
    assert [r["status"] for r in rows] == ["error", "error"]
    assert rows[0]["error"].startswith("RuntimeError: ") and "Kernel size" in rows[0]["error"]
    assert "ERROR" in captured.out
    assert captured.err.startswith("error: 2 of 2 rows failed") and \
        captured.err.count("\n") == 1, captured.err


def test_table_shows_the_size_of_small_models():
    from rich.console import Console

    bm = sources.from_registry("cifar_resnet20", [0.25])
    rows = bench.run(bm, bench.Conditions(device="cpu", resolution=16, iters=1, warmup=0), [1],
                     clock=FakeClock([TICK]))
    console = Console(width=200, record=True, file=io.StringIO())
    console.print(benchmark_tool._table(rows, train=False))
    text = console.export_text()
    assert f"{rows[0]['params'] / 1e6:.3g}" in text and f"{rows[0]['macs'] / 1e9:.3g}" in text
    assert not re.search(r"\b0\.000\b", text)  # what ".3f" printed for both


def test_cuda_driver_version_without_nvidia_smi(monkeypatch):
    """The fallback read a torch._C function that no supported torch has (an AttributeError on
    a GPU host without nvidia-smi); it asks libcuda now, and says None without it."""
    import ctypes

    from fasttrain.measure import env as measure_env

    class FakeLibcuda:
        def cuDriverGetVersion(self, out):  # noqa: N802  libcuda's name
            ctypes.cast(out, ctypes.POINTER(ctypes.c_int)).contents.value = 13020
            return 0

    monkeypatch.setattr(ctypes, "CDLL", lambda name: FakeLibcuda())
    assert measure_env.cuda_driver_api_version() == "cuda-driver-api-13.2"

    def missing(name):
        raise OSError(f"{name}: cannot open shared object file")
    monkeypatch.setattr(ctypes, "CDLL", missing)
    assert measure_env.cuda_driver_api_version() is None


def test_a_failed_save_leaves_the_record_whole(tmp_path, monkeypatch, capsys):
    argv = TINY + ["--batch-size", "1,2", "--save", "--results-dir", str(tmp_path)]
    assert benchmark_tool.main(argv) == 0
    (record,) = tmp_path.glob("*.json")
    before = record.read_text()

    def disk_full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    assert benchmark_tool.main(argv) == 2
    err = capsys.readouterr().err
    assert "No space left on device" in err and err.count("\n") == 1, err
    assert record.read_text() == before and len(json.loads(before)) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [record.name, record.with_suffix(".csv").name])  # no temporary file left


def test_outputs_are_checked_against_the_saved_record_before_measuring(tmp_path, monkeypatch,
                                                                       capsys):
    argv = TINY + ["--save", "--results-dir", str(tmp_path)]
    assert benchmark_tool.main(argv) == 0
    (record,) = tmp_path.glob("*.json")
    capsys.readouterr()
    monkeypatch.setattr(bench, "run", lambda *a, **k: pytest.fail("measured before the check"))
    # --json onto the record would have replaced the saved rows with this run's
    assert benchmark_tool.main(argv + ["--json", str(record)]) == 2
    err = capsys.readouterr().err
    assert err == f"error: --save {record}: the same file as --json's output\n", err
    assert benchmark_tool.main(TINY + ["--json", str(tmp_path / "a.json"),
                                       "--csv", str(tmp_path / "a.json")]) == 2
    assert "--csv" in capsys.readouterr().err
    record.write_text('{"a": 1}\n')  # a damaged record: found now, not after the sweep
    assert benchmark_tool.main(argv) == 2
    err = capsys.readouterr().err
    assert err == f"error: {record}: not a list of result rows; move it away first\n", err
    # a row without its status (edited by hand) failed the plot with a KeyError after saving
    record.write_text('[{"model": "x", "status": "ok"}, {"model": "y"}]\n')
    assert benchmark_tool.main(argv + ["--plot"]) == 2
    err = capsys.readouterr().err
    assert err == (f"error: {record}: row 2 has no status ok / oom / error (edited by hand?); "
                   f"fix or move it away first\n"), err
    # a measured row without a key the plot reads: the same KeyError traceback, exit 1
    record.unlink()
    record.with_suffix(".csv").unlink()
    monkeypatch.undo()
    assert benchmark_tool.main(argv) == 0
    for key in ("model", "batch_size", "latency_ms_p50"):
        rows = json.loads(record.read_text())
        rows[0].pop(key)
        record.write_text(json.dumps(rows))
        assert benchmark_tool.main(argv + ["--plot"]) == 2
        err = capsys.readouterr().err
        assert err == (f"error: {record}: row 1 has no {key!r} (edited by hand?); fix or move "
                       f"it away first\n"), err
        record.unlink()
        record.with_suffix(".csv").unlink()
        assert benchmark_tool.main(argv) == 0
    capsys.readouterr()
    # the CSV alone (its record moved away): rewritten from this run's rows, the others lost
    record.unlink()
    table = record.with_suffix(".csv")
    before = table.read_text()
    assert benchmark_tool.main(argv) == 2
    err = capsys.readouterr().err
    assert err == (f"error: {table}: exists without its record {record.name} (the CSV is "
                   f"written from it, its rows would be lost); move it away first\n"), err
    assert table.read_text() == before and not record.exists()


def test_save_keeps_other_machines_rows_out_and_plots_the_whole_record(tmp_path, monkeypatch,
                                                                        capsys):
    """A CPU record is named by its thread count only: another machine's (or torch's) rows
    appended to it read as one sweep; refused before measuring. A bare --plot next to the
    record plots the record, not only this run's rows (it replaced the saved plot)."""
    argv = TINY + ["--save", "--results-dir", str(tmp_path), "--plot"]
    assert benchmark_tool.main(argv) == 0
    (record,) = tmp_path.glob("*.json")
    first = len(json.loads(record.read_text()))
    plotted = []
    real_plot = bench.plot_vs_macs
    monkeypatch.setattr(bench, "plot_vs_macs",
                        lambda rows, path: plotted.append(len(rows)) or real_plot(rows, path))
    assert benchmark_tool.main(argv) == 0
    saved = json.loads(record.read_text())
    assert plotted == [len(saved)] == [2 * first]
    # a network measured again is one point, its latest row (it zigzagged as two), also
    # against rows written before the newer fields existed
    assert bench.plotted_rows(saved) == saved[first:]
    older = [{k: v for k, v in r.items() if k not in ("channel_divisor", "weights",
                                                      "num_classes")} for r in saved[:first]]
    assert bench.plotted_rows([*older, *saved[first:]]) == saved[first:]
    other_width = {**saved[0], "width": 0.5, "macs": saved[0]["macs"] * 4}
    assert bench.plotted_rows([*saved, other_width]) == [*saved[first:], other_width]
    # the titles name every commit and torch drawn, as a record appended to mixes them
    from matplotlib.figure import Figure

    titles = []
    monkeypatch.setattr(Figure, "suptitle", lambda self, text, **k: titles.append(text))
    newer = {**other_width, "torch_version": "9.9", "commit": "abc1234"}
    bench.plot_vs_macs([*saved, newer], tmp_path / "mixed.png")
    assert titles[0].endswith(f"torch {saved[0]['torch_version']}, 9.9")
    # what tells two registry networks of one name and width apart is in the row
    assert {(r["channel_divisor"], r["num_classes"]) for r in saved} == {(1, 10)}
    for row in saved:
        row["device_name"] = "Another CPU (not this machine)"
    record.write_text(json.dumps(saved))
    capsys.readouterr()
    monkeypatch.setattr(bench, "run", lambda *a, **k: pytest.fail("measured before the check"))
    assert benchmark_tool.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {record}: its rows were measured on Another CPU (not this "
                          f"machine), this run is on ")
    assert err.endswith("; give --results-dir another folder so the two never mix\n")
    assert json.loads(record.read_text()) == saved


@pytest.mark.parametrize("argv, message", [
    (["--width", "0.5,17"], "expected values <= 16, got '0.5,17'"),
    (["--plot", "curve.xyz"], "--plot curve.xyz: the file name must end in .png, .pdf, .svg"),
    (["--plot", "curve"], "--plot curve: the file name must end in"),
    # a typo's 10**30: a TypeError row and exit 1, or calls until killed; "" ran as native
    (["--batch-size", str(10**30)], f"expected values <= 16777216, got '{10**30}'"),
    (["--iters", str(10**30)], f"--iters: expected an integer <= 10000000, got {10**30}"),
    (["--warmup", str(10**30)], f"--warmup: expected an integer <= 10000000, got {10**30}"),
    (["--norm-act="], "argument --norm-act: empty value"),
])
def test_cli_refuses_huge_sizes_and_plot_names_it_cannot_write(argv, message, monkeypatch,
                                                               capsys):
    monkeypatch.setattr(bench, "run", lambda *a, **k: pytest.fail("measured before the check"))
    try:
        code = benchmark_tool.main(TINY + argv)
    except SystemExit as e:  # argparse errors
        code = e.code
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and message in err, err


def test_an_interrupted_sweep_writes_the_rows_measured(tmp_path, monkeypatch, capsys):
    real_run = bench.run

    def interrupted_after_one_row(models, cond, batch_sizes, on_row=None, **kwargs):
        def row_then_ctrl_c(row):
            on_row(row)
            raise KeyboardInterrupt

        return real_run(models, cond, batch_sizes, on_row=row_then_ctrl_c, **kwargs)

    monkeypatch.setattr(bench, "run", interrupted_after_one_row)
    out = tmp_path / "rows.json"
    assert benchmark_tool.main(TINY + ["--batch-size", "1,2", "--json", str(out)]) == 130
    captured = capsys.readouterr()
    assert [r["batch_size"] for r in json.loads(out.read_text())] == [1]
    assert captured.err == "error: interrupted; 1 row measured and written\n", captured.err


def test_path_options_expand_a_leading_tilde(monkeypatch):
    """The shell leaves `~` as typed after `=`: `--plot=~/b.png` wrote into a folder "~"."""
    monkeypatch.setenv("HOME", "/home/someone")
    args = benchmark_tool.build_parser().parse_args(
        ["--model", "cifar_resnet20", "--plot=~/b.png", "--json=~/b.json", "--csv=~/b.csv",
         "--results-dir=~/res"])
    assert (args.plot, args.json, args.csv, args.results_dir) == (
        "/home/someone/b.png", "/home/someone/b.json", "/home/someone/b.csv", "/home/someone/res")
    assert benchmark_tool.build_parser().parse_args(["--model", "x", "--plot"]).plot == ""


def test_an_interrupt_while_the_outputs_are_written_waits_for_them(tmp_path, monkeypatch,
                                                                    capsys):
    """A Ctrl-C (or a time limit's SIGTERM) as a finished sweep wrote its files was a traceback,
    and the files not yet written (--save's record, the plot) were lost."""
    import signal

    real_write = benchmark_tool._write_outputs

    def interrupted_while_writing(rows, args, console):
        os.kill(os.getpid(), signal.SIGINT)  # (SIGTERM is held alike)
        return real_write(rows, args, console)

    monkeypatch.setattr(benchmark_tool, "_write_outputs", interrupted_while_writing)
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    out, csv_out = tmp_path / "rows.json", tmp_path / "rows.csv"
    try:
        code = benchmark_tool.main(TINY + ["--batch-size", "1,2", "--json", str(out), "--csv",
                                           str(csv_out)])
    except KeyboardInterrupt:
        pytest.fail("the interrupt escaped while the outputs were written")
    assert code == 130
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == handlers
    assert [r["batch_size"] for r in json.loads(out.read_text())] == [1, 2]
    assert csv_out.read_text().count("\n") == 3
    assert capsys.readouterr().err == "error: interrupted; 2 rows measured and written\n"


def test_a_benchmark_called_in_a_process_leaves_its_thread_count_and_asks_git_anew(
        tmp_path, monkeypatch):
    """In a notebook, `benchmark.main([... '--threads', '1'])` left torch at one thread for
    all later work (and the next benchmark without --threads measured, and recorded, one
    thread); git_commit answered its first answer for the life of the process, so edits or
    commits since were missing from every later checkpoint and result."""
    from fasttrain.measure.env import git_commit

    monkeypatch.setattr(torch, "get_num_threads", lambda: 3)  # what the notebook had
    seen = []
    monkeypatch.setattr(torch, "set_num_threads", seen.append)
    assert benchmark_tool.main([*TINY, "--threads", "1", "--json", str(tmp_path / "r.json")]) == 0
    assert seen[0] == 1 and seen[-1] == 3
    monkeypatch.setenv("FASTTRAIN_COMMIT", "abc1234")
    assert git_commit() == "abc1234"
    monkeypatch.setenv("FASTTRAIN_COMMIT", "def5678")
    assert git_commit() == "def5678"


def test_registry_models_take_the_cifar_shortcut_option(tmp_path):
    # option B is another architecture at the same width: its rows say so and count its 1x1
    # projections; before, only an option-B checkpoint could be measured
    rows = {}
    for shortcut in ("A", "B"):
        out = tmp_path / f"{shortcut}.json"
        assert benchmark_tool.main([*TINY, "--shortcut", shortcut, "--json", str(out)]) == 0
        [rows[shortcut]] = json.loads(out.read_text())
    assert (rows["A"]["model"], rows["B"]["model"]) == ("cifar_resnet20",
                                                        "cifar_resnet20 (shortcut B)")
    assert rows["B"]["params"] > rows["A"]["params"] and rows["B"]["macs"] > rows["A"]["macs"]
    from fasttrain.models import create_model

    option_b = create_model("cifar_resnet20", width=0.25, shortcut="B")
    assert rows["B"]["params"] == sum(p.numel() for p in option_b.parameters())


def test_sigterm_writes_the_rows_measured_like_ctrl_c(tmp_path):
    """`timeout` and batch schedulers stop a sweep with SIGTERM: the GPU checklist's time-limited
    steps lost every row already measured."""
    import signal

    out = tmp_path / "rows.json"
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "tools" / "benchmark.py"), *TINY[:-4], "--iters", "2000",
         "--warmup", "0", "--threads", "1", "--batch-size", "1,2,3,4,5,6,7,8", "--json", str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        for line in proc.stdout:  # a progress line per row measured
            if "batch 1: ok" in line:
                break
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    measured = [r["batch_size"] for r in json.loads(out.read_text())]
    assert measured[0] == 1 and len(measured) < 8, measured
    assert err.startswith("error: interrupted; ") and err.endswith(" measured and written\n"), err


def test_a_closed_stdout_still_writes_every_output_and_exits_141(tmp_path):
    """`benchmark ... --json a --csv b | head -3`: rich turned the broken pipe into a silent
    exit 1 (the status of a failed row) after writing a but not b."""
    read, write = os.pipe()
    os.close(read)  # the reader is gone before the first line: every write finds it closed
    try:
        res = subprocess.run([sys.executable, str(ROOT / "tools" / "benchmark.py"), *TINY,
                              "--batch-size", "1,2", "--json", str(tmp_path / "a.json"),
                              "--csv", str(tmp_path / "b.csv")],
                             stdout=write, stderr=subprocess.PIPE, text=True, timeout=300,
                             env={**os.environ, "PYTHONPATH": str(ROOT)})
    finally:
        os.close(write)
    assert res.returncode == 141, res.stderr
    assert res.stderr == ""
    assert [r["batch_size"] for r in json.loads((tmp_path / "a.json").read_text())] == [1, 2]
    assert (tmp_path / "b.csv").read_text().count("\n") == 3


def test_the_table_shows_every_number_whole_on_an_80_column_terminal(tmp_path, monkeypatch,
                                                                     capsys):
    """At 80 columns rich showed params, MACs and img/s as "…" (and model names as `cifar_…`
    at 100): a table too wide for the terminal is printed whole, its lines left to wrap."""
    monkeypatch.setenv("TTY_COMPATIBLE", "1")  # rich: a terminal (the tool asks rich)
    monkeypatch.setenv("COLUMNS", "80")
    out = tmp_path / "rows.json"
    assert benchmark_tool.main(TINY + ["--json", str(out)]) == 0
    printed = re.sub(r"\x1b\[[0-9;]*m", "", capsys.readouterr().out)
    row = json.loads(out.read_text())[0]
    for cell in (row["model"], f"{row['params'] / 1e6:.3g}", f"{row['macs'] / 1e9:.3g}",
                 f"{row['latency_ms_p50']:.2f}", f"{row['images_per_s']:.1f}",
                 f"{row['latency_ms_mean']:.2f} ± {row['latency_ms_std']:.2f}"):
        assert re.search(rf"│ +{re.escape(cell)} +│", printed), (cell, printed)
    assert "…" not in printed


def test_an_ascii_stdout_gets_ascii_stand_ins_and_an_aligned_table(monkeypatch):
    """PYTHONIOENCODING=ascii (or a Latin-1 locale): the cells printed `mean \\xb1 std`, rows
    wider than rich's ASCII frame."""
    stdout = io.TextIOWrapper(io.BytesIO(), encoding="ascii")
    monkeypatch.setattr(sys, "stdout", stdout)
    assert benchmark_tool.main(TINY + ["--batch-size", "1,2"]) == 0
    stdout.flush()
    printed = stdout.buffer.getvalue().decode("ascii")
    assert "mean +/- std ms" in printed and "\\x" not in printed, printed
    table = [line for line in printed.splitlines() if line[:1] in "+|"]
    assert len(table) >= 5 and len({len(line) for line in table}) == 1, printed


def test_a_dash_for_an_output_is_refused_before_measuring(tmp_path, monkeypatch, capsys):
    """`--json -` measured the sweep and wrote a file named `-`: stdout has the table."""
    monkeypatch.chdir(tmp_path)
    for flag in ("--json", "--csv", "--plot"):
        assert benchmark_tool.main(TINY + [flag, "-"]) == 2
        assert capsys.readouterr() == ("", f"error: {flag} -: writes a file, not stdout (where "
                                           f"the results are printed); name a file\n")
    assert list(tmp_path.iterdir()) == []


def test_fused_rows_are_refused_when_the_kernels_are_unavailable(monkeypatch, capsys):
    """Without the library the fused layers fall back to the reference math with a warning:
    the rows said norm_act fused and timed the fallback."""
    from fasttrain.ops import _ext

    monkeypatch.setattr(_ext, "supports", lambda device: False)
    monkeypatch.setattr(_ext, "unavailable_reason", lambda device: "the library was not built")
    assert benchmark_tool.main(TINY + ["--norm-act", "fused"]) == 2
    assert capsys.readouterr().err == (
        "error: --norm-act fused: the fused kernels are unavailable on cpu (the library was not "
        "built); build them (pip install -e .) or measure with --norm-act native\n")
    assert benchmark_tool.main(TINY + ["--norm-act", "native"]) == 0


def test_commit_is_dirty_for_code_changes_only(tmp_path, monkeypatch):
    from fasttrain.measure.env import git_commit

    monkeypatch.delenv("FASTTRAIN_COMMIT", raising=False)
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C", str(tmp_path)]
    (tmp_path / "benchmarks" / "results").mkdir(parents=True)
    for name in ("code.py", "README.md", "benchmarks/results/rows.json"):
        (tmp_path / name).write_text("0\n")
    subprocess.run(git + ["init", "-q"], check=True)
    subprocess.run(git + ["add", "."], check=True)
    subprocess.run(git + ["commit", "-qm", "x"], check=True)
    clean = git_commit(tmp_path)
    assert re.fullmatch(r"[0-9a-f]{7,}", clean), clean
    # --save appends to tracked result files; that is not a change of the measured code
    (tmp_path / "benchmarks/results/rows.json").write_text("1\n")
    (tmp_path / "README.md").write_text("1\n")
    assert git_commit(tmp_path) == clean
    (tmp_path / "code.py").write_text("1\n")
    assert git_commit(tmp_path) == clean + "-dirty"


def test_an_installed_copy_inside_another_repository_records_no_commit(tmp_path, monkeypatch):
    # pip install into a project's .venv: git, asked from site-packages, answers with the
    # enclosing project's commit, which is not fasttrain's
    from fasttrain.measure.env import git_commit

    monkeypatch.delenv("FASTTRAIN_COMMIT", raising=False)
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C", str(tmp_path)]
    site = tmp_path / ".venv" / "lib" / "site-packages"
    site.mkdir(parents=True)
    (tmp_path / "a.txt").write_text("x\n")
    subprocess.run(git + ["init", "-q"], check=True)
    subprocess.run(git + ["add", "a.txt"], check=True)
    subprocess.run(git + ["commit", "-qm", "user project"], check=True)
    assert git_commit(site) == "unknown"
    assert re.fullmatch(r"[0-9a-f]{7,}", git_commit(tmp_path))


def test_library_measurements_refuse_or_count_what_they_were_given():
    """count_macs of a module without parameters was a bare StopIteration; an unknown
    precision a bare KeyError: 'fp8'; a batch of 0 gave 0 images/s."""
    from fasttrain.measure import count_macs, measure_throughput

    assert count_macs(nn.AvgPool2d(2), 8).conv_fc == 0
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                        nn.Linear(4, 10))
    with pytest.raises(ValueError, match="^precision must be one of fp32, bf16, fp16, got "
                                         "'fp8'$"):
        measure_throughput(net, batch_size=2, resolution=8, num_classes=10, iters=1, warmup=0,
                           device="cpu", precision="fp8")
    with pytest.raises(ValueError, match="^batch_size must be >= 1, got 0$"):
        measure_throughput(net, batch_size=0, resolution=8, num_classes=10, iters=1, warmup=0,
                           device="cpu")

