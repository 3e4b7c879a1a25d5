"""Benchmark runner: models × batch sizes under one set of conditions → result rows and files.

A row is a flat dict: what was measured (model, width, batch, resolution, precision, layout,
mode), the model's size (params; conv+fc MACs and fvcore's total, per image), the result
(latency or training-step statistics, images/s, peak memory) and the conditions (device name,
driver, torch/CUDA versions, git commit, date; see `fasttrain.measure.env`). A batch size that
runs out of memory gives a row with `status: "oom"`, one that fails otherwise (a model that
cannot run at that size, a compiler error) a row with `status: "error"`; either way the row's
`error` holds the one-line reason and the sweep goes on.

Files are named by their conditions, e.g. `latency-cpu2t-fp32-nhwc-eager-224px.json` (timm's
`benchmark-infer-amp-nhwc-...` convention), so results taken under different conditions never
mix; saving appends rows to the file of the same name.
"""
from __future__ import annotations

import contextlib
import copy
import csv
import gc
import json
import math
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from torch import nn

from ..engine.checkpoint import folder_locked, write_atomic
from ..errors import UserError
from ..export import quiet_jit
from .env import conditions
from .macs import count_macs, count_params
from .sources import BenchModel, first_line
from .throughput import (COMPILE_MODES, CUDA_ONLY_MODES, autocast_context, compile_fresh,
                         measure_throughput)
from .timing import LatencyStats, cuda_graph_replay, measure_latency

PRECISIONS = ("fp32", "bf16", "fp16")
LAYOUTS = ("channels_last", "contiguous")
MODES = ("eager", "compile", "torchscript", "cudagraphs", "compile-cudagraphs")
"""eager; compile: torch.compile(model, dynamic=False), recompiled per batch size;
torchscript: torch.jit.script (trace when scripting fails); cudagraphs: the eager forward captured
in a CUDA graph and replayed (CUDA only); compile-cudagraphs: torch.compile's "reduce-overhead"
mode, the compiled kernels replayed as CUDA graphs (CUDA only). Warm-up, compilation and capture
are never timed."""

MIN_WARMUP = {"compile": 1, "compile-cudagraphs": 2, "torchscript": 2}
"""Untimed calls a mode needs before its calls run what will be measured: torch.compile compiles
on the first call; CUDA graph trees (compile-cudagraphs) warm up on the first call and record on
the second; TorchScript's profiling executor profiles the first call and optimises the graph on
the second. cudagraphs needs none: its capture, after warm-up runs of its own, happens before."""


def warmup_calls(requested: int, mode: str, model: nn.Module) -> int:
    """The untimed calls a row runs: `requested`, raised to MIN_WARMUP of `mode` (and to
    TorchScript's for a ScriptModule run eagerly, torch.compile's for a compiled module), so
    compilation never reaches the timing."""
    need = MIN_WARMUP.get(mode, 0)
    if mode == "eager" and isinstance(model, torch.jit.ScriptModule):
        need = MIN_WARMUP["torchscript"]
    if mode == "eager" and _holds_compiled(model):
        need = MIN_WARMUP["compile"]  # a factory's torch.compile'd module compiles at first call
    return max(requested, need)


def _holds_compiled(model: nn.Module) -> bool:
    """Whether `model` is, or holds, a torch.compile'd module (a factory's)."""
    from torch._dynamo.eval_frame import OptimizedModule

    return any(isinstance(m, OptimizedModule) for m in model.modules())


class BenchError(UserError, ValueError):
    """The requested benchmark conditions are impossible (e.g. CUDA graphs on a CPU)."""


@dataclass(frozen=True)
class Conditions:
    """What every row of one benchmark run shares.

    Attributes:
        device: "cpu" or "cuda" (or "cuda:N").
        precision: "fp32" | "bf16" | "fp16": autocast dtype (fp32 = none).
        layout: "channels_last" | "contiguous": memory format of the model and the input.
        mode: one of MODES (inference) or `fasttrain.measure.throughput.TRAIN_MODES` (training).
        resolution: input size; None = each model's own (its metadata or 224 / 32 for CIFAR).
        iters / warmup: timed and untimed calls per row (warm-up raised where a mode needs
            more to finish compiling; see `warmup_calls`).
        train: measure training throughput instead of inference latency.
    """

    device: str = "cpu"
    precision: str = "fp32"
    layout: str = "channels_last"
    mode: str = "eager"
    resolution: int | None = None
    iters: int = 100
    warmup: int = 10
    train: bool = False

    def check(self, models: Iterable[BenchModel] = ()) -> None:
        """Raise BenchError for impossible combinations, before any work starts."""
        dev = torch.device(self.device)
        if self.precision not in PRECISIONS:
            raise BenchError(f"precision must be one of {', '.join(PRECISIONS)}, "
                             f"got {self.precision!r}")
        if self.layout not in LAYOUTS:
            raise BenchError(f"layout must be one of {', '.join(LAYOUTS)}, got {self.layout!r}")
        if self.mode not in MODES:
            raise BenchError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise BenchError("device cuda requested but CUDA is not available here")
        if self.mode in CUDA_ONLY_MODES and dev.type != "cuda":
            raise BenchError(f"mode {self.mode} needs --device cuda")
        if self.train and self.mode == "torchscript":
            raise BenchError("training throughput runs eager, compile or cudagraphs, "
                             "not torchscript")
        if self.train and self.mode == "cudagraphs" and self.precision == "fp16":
            raise BenchError("cudagraphs training cannot capture fp16's GradScaler; use bf16")
        if self.iters < 1 or self.warmup < 0:
            raise BenchError(f"iters must be >= 1 and warmup >= 0, got {self.iters}, "
                             f"{self.warmup}")
        for m in models:
            scripted = isinstance(m.model, torch.jit.ScriptModule)
            if m.compiled and (self.train or self.mode == "compile"
                               or (self.mode == "torchscript" and not scripted)):
                what = "training" if self.train else self.mode
                modes = "eager, torchscript" if scripted else "eager"
                raise BenchError(f"{m.source}: an exported file runs in {modes} or cudagraphs "
                                 f"inference mode only, not {what}")
            if (m.fixed_resolution is not None and self.resolution is not None
                    and self.resolution != m.fixed_resolution):
                raise BenchError(f"{m.source}: exported for {m.fixed_resolution} px inputs only, "
                                 f"not --resolution {self.resolution}")


def row_mode(bm: BenchModel, cond: Conditions) -> str:
    """The mode a row of `bm` records: a TorchScript module (a .pt file from tools/export.py, or
    a factory's scripted model) measured "eager" runs under TorchScript's executor and is
    recorded as torchscript, so that compare never sets its latency against eager rows. So is
    a module holding a scripted or traced part (a factory's wrapper around a scripted
    backbone): its time is not an eager network's either. Likewise a factory's torch.compile'd
    module (or one holding such a part) is recorded as compile."""
    if cond.mode == "eager" and any(isinstance(m, torch.jit.ScriptModule)
                                    for m in bm.model.modules()):
        return "torchscript"
    if cond.mode == "eager" and _holds_compiled(bm.model):
        return "compile"
    return cond.mode


def is_oom(e: BaseException) -> bool:
    """True for a device or host out-of-memory error."""
    if isinstance(e, torch.OutOfMemoryError):
        return True
    msg = str(e)
    return isinstance(e, RuntimeError) and ("out of memory" in msg
                                            or "can't allocate memory" in msg)


def prepare_inference(model: nn.Module, *, batch_size: int, resolution: int,
                      device: torch.device | str, precision: str = "fp32",
                      channels_last: bool = True, mode: str = "eager", in_chans: int = 3
                      ) -> Callable[[], Any]:
    """A zero-argument function running one forward pass of a random `batch_size` batch.

    The model is moved to `device` (and channels-last) in place and set to eval mode; the input
    is created once on the device. Call the result under `torch.inference_mode()`.
    """
    device = torch.device(device)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    with warnings.catch_warnings():
        # Module._apply reads every parameter's .grad, and a deep-copied ScriptModule's
        # parameters are not leaves: torch warns about a read that changes nothing (three
        # lines per file benchmarked).
        warnings.filterwarnings("ignore", message="The .grad attribute of a Tensor that is not")
        model = model.to(device)
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
    with contextlib.suppress(NotImplementedError):  # torch.export modules refuse eval()
        model.eval()
    x = torch.randn(batch_size, in_chans, resolution, resolution, device=device
                    ).contiguous(memory_format=fmt)
    # No cache of cast weights where a graph is captured or traced: a CUDA graph would keep the
    # capture's copies, and torch.jit.trace refuses to embed them (they require grad).
    autocast = autocast_context(device, precision,
                                cache_enabled=mode not in ("cudagraphs", "torchscript"))
    if mode == "eager":
        net = model
    elif mode in COMPILE_MODES:
        net = compile_fresh(model, mode)
    elif mode == "torchscript":
        net = model if isinstance(model, torch.jit.ScriptModule) else _script(model, x, autocast)
    elif mode == "cudagraphs":
        return _graphed(model, x, autocast, device)
    else:
        raise BenchError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")

    def forward() -> Any:
        with autocast():
            return net(x)

    return forward


def _script(model: nn.Module, x: torch.Tensor, autocast) -> torch.jit.ScriptModule:
    with quiet_jit():
        try:
            return torch.jit.script(model)
        except Exception:  # e.g. super() in BatchNormReLU2d.forward: trace instead
            with torch.no_grad(), autocast():
                return torch.jit.trace(model, x)


def _graphed(model: nn.Module, x: torch.Tensor, autocast, device: torch.device):
    def forward() -> None:
        with torch.inference_mode(), autocast():
            model(x)

    return cuda_graph_replay(forward, device)


def _metric_keys(prefix: str) -> list[str]:
    return list(LatencyStats(0, 0, *([0.0] * 8)).as_row(prefix))


def _num_outputs(model: nn.Module, resolution: int, in_chans: int = 3) -> int:
    with torch.no_grad():
        out = model.eval()(torch.zeros(1, in_chans, resolution, resolution))
    return int(out.shape[-1])


def run(models: list[BenchModel], cond: Conditions, batch_sizes: list[int], *,
        clock: Callable[[], float] | None = None,
        on_row: Callable[[dict[str, Any]], None] | None = None) -> list[dict[str, Any]]:
    """Measure every model at every batch size under `cond`; one row each (see module doc).

    A batch size that fails gives a row with `status` "oom" (out of memory) or "error"
    (anything else), the reason in `error`, and the sweep goes on. A row's `warmup` is the
    number of untimed calls that ran (`warmup_calls`).

    Args:
        clock: inject a clock (seconds) instead of CUDA events / perf_counter (tests).
        on_row: called with each row as soon as it is measured (progress display).

    Raises:
        BenchError: impossible conditions (checked before anything runs).
    """
    cond.check(models)
    device = torch.device(cond.device)
    with cudnn_benchmark_for(device):
        return _measure_rows(models, cond, batch_sizes, device, clock, on_row)


@contextlib.contextmanager
def cudnn_benchmark_for(device: torch.device):
    """cuDNN's algorithm search on for a CUDA device, as training runs outside deterministic
    mode; the caller's setting back afterwards (a notebook's later deterministic work)."""
    before = torch.backends.cudnn.benchmark
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = before


def _measure_rows(models: list[BenchModel], cond: Conditions, batch_sizes: list[int],
                  device: torch.device, clock: Callable[[], float] | None,
                  on_row: Callable[[dict[str, Any]], None] | None) -> list[dict[str, Any]]:
    channels_last = cond.layout == "channels_last"
    kind = "train" if cond.train else "latency"
    prefix = "step" if cond.train else "latency"
    rows = []
    for bm in models:
        resolution = cond.resolution or bm.resolution
        params = count_params(bm.count_model if bm.count_model is not None else bm.model)
        macs = None
        if bm.count_model is not None:
            try:
                macs = count_macs(bm.count_model, resolution, in_chans=bm.in_chans)
            except Exception as e:  # fvcore cannot trace every model; the row says so (None)
                warnings.warn(f"{bm.name}: MACs not counted ({first_line(e)})")
        num_classes = bm.num_classes
        warmup = warmup_calls(cond.warmup, cond.mode, bm.model)
        for bs in batch_sizes:
            row: dict[str, Any] = {
                "kind": kind, "model": bm.name, "width": bm.width, "source": bm.source,
                "batch_size": bs, "resolution": resolution, "precision": cond.precision,
                "layout": cond.layout, "mode": row_mode(bm, cond), "norm_act": bm.norm_act,
                "params": params, "macs": macs.conv_fc if macs else None,
                "macs_fvcore_total": macs.total if macs else None,
                "num_classes": num_classes, **bm.details,
                "status": "ok", "error": None, "iters": cond.iters, "warmup": warmup}
            if device.type == "cuda":
                # (the committed rows written before this field existed ran with it off)
                row["cudnn_benchmark"] = torch.backends.cudnn.benchmark
                # The previous row's copy of the model, input and graphs are gone: the peak is
                # this row's alone (models measured earlier no longer sit on the device, and the
                # CUDA-graph trees' pool of the previous compile is released first).
                if cond.mode in COMPILE_MODES:
                    torch.compiler.reset()
                gc.collect()
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
            failure = None
            try:
                if cond.train:
                    if num_classes is None:  # inside the try: a forward that fails is this row's
                        num_classes = _num_outputs(bm.model, resolution, bm.in_chans)
                    stats = measure_throughput(
                        copy.deepcopy(bm.model), batch_size=bs, resolution=resolution,
                        num_classes=num_classes, iters=cond.iters, warmup=warmup,
                        device=device, precision=cond.precision, channels_last=channels_last,
                        mode=cond.mode, in_chans=bm.in_chans, clock=clock)
                else:
                    # A copy, as for training: prepare_inference moves its model to the device
                    # in place, and bm.model would stay there for every later row's peak memory.
                    fn = prepare_inference(copy.deepcopy(bm.model), batch_size=bs,
                                           resolution=resolution,
                                           device=device, precision=cond.precision,
                                           channels_last=channels_last, mode=cond.mode,
                                           in_chans=bm.in_chans)
                    stats = measure_latency(fn, bs, iters=cond.iters, warmup=warmup,
                                            device=device, clock=clock)
                    del fn
                row.update(stats.as_row(prefix))
            except Exception as e:  # one row fails, not the sweep: the row keeps the reason
                failure = ("oom" if is_oom(e) else "error"), first_line(e)
            if failure is not None:
                # Outside the except block: the traceback (and the tensors its frames hold) is
                # gone, so the memory can really be returned before the next batch size.
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                row.update({k: None for k in _metric_keys(prefix)})
                row.update(status=failure[0], error=failure[1])
            row["peak_mem_mib"] = (torch.cuda.max_memory_allocated(device) / 2**20
                                   if device.type == "cuda" else None)
            row.update(conditions(device))
            rows.append(row)
            if on_row is not None:
                on_row(row)
    return rows


# --------------------------------------------------------------------------- files

def distinct(rows: list[dict[str, Any]], key: str, sep: str = "/") -> str:
    """The values of `key` in `rows`, each once in first-seen order, joined by `sep`: what a
    title says of rows that may differ there (a TorchScript file's torchscript rows among eager
    ones)."""
    return sep.join(dict.fromkeys(str(row.get(key)) for row in rows))


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def results_stem(rows: list[dict[str, Any]]) -> str:
    """File name (no suffix) from the conditions the rows share, e.g.
    `latency-cpu2t-fp32-nhwc-eager-224px`, `train-nvidia-h100-80gb-hbm3-bf16-nhwc-compile-224px`."""
    if not rows:
        raise ValueError("no rows")
    r = rows[0]
    dev = f"cpu{r['threads']}t" if r["device"] == "cpu" else _slug(r["device_name"])
    layout = "nhwc" if r["layout"] == "channels_last" else "nchw"
    res = sorted({row["resolution"] for row in rows})
    res_part = f"{res[0]}px" if len(res) == 1 else "multires"
    # Latency of fused or BN-folded networks goes to files of its own: compare matches latency
    # rows by params and MACs, which those share with the native network. Training rows of
    # both stay together (the README tables set them side by side).
    norms = sorted({str(row.get("norm_act")) for row in rows} - {"native", "None"})
    norm_part = "".join(f"-{n}" for n in norms) if r["kind"] == "latency" else ""
    # A TorchScript file's rows are torchscript among a sweep's eager ones (`row_mode`)
    mode_part = "-".join(sorted({row["mode"] for row in rows}))
    return f"{r['kind']}-{dev}-{r['precision']}-{layout}-{mode_part}-{res_part}{norm_part}"


def planned_results_stem(models: list[BenchModel], cond: Conditions) -> str:
    """The `results_stem` of the rows `run(models, cond, ...)` will return, known before anything
    is measured (so that `--save`'s record can be checked first)."""
    row = {"kind": "train" if cond.train else "latency", "precision": cond.precision,
           "layout": cond.layout, **conditions(cond.device)}
    return results_stem([{**row, "mode": row_mode(bm, cond), "norm_act": bm.norm_act,
                          "resolution": cond.resolution or bm.resolution} for bm in models])


PLOT_SUFFIXES = (".png", ".pdf", ".svg")
"""File types `plot_vs_macs` writes (matplotlib's Agg, PDF and SVG backends)."""


def _fieldnames(rows: list[dict[str, Any]]) -> list[str]:
    names: dict[str, None] = {}
    for row in rows:
        names.update(dict.fromkeys(row))
    return list(names)


@contextlib.contextmanager
def _writing(path: Path):
    """Create `path`'s folder; an OSError inside becomes a one-line BenchError naming `path`."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise BenchError(f"{path}: cannot create its folder {path.parent} "
                         f"({e.strerror or e})") from None
    try:
        yield
    except OSError as e:
        raise BenchError(f"{path}: cannot write ({e.strerror or e})") from None


def write_json(rows: list[dict[str, Any]], path: str | Path) -> Path:
    """A JSON list with one row per line (appended rows give small diffs); folders created; an
    existing file is replaced only once the new one is complete.

    Raises:
        BenchError: the file cannot be written.
    """
    path = Path(path)
    body = ",\n".join(json.dumps(r) for r in rows)
    with _writing(path):
        write_atomic(path, lambda f: f.write(f"[\n{body}\n]\n" if rows else "[]\n"),
                     mode="w")
    return path


def write_csv(rows: list[dict[str, Any]], path: str | Path) -> Path:
    """CSV with the union of the rows' fields as the header; missing values are empty; folders
    created.

    Raises:
        BenchError: the file cannot be written.
    """
    path = Path(path)
    # A source path that is not UTF-8 holds surrogates (`bad\udcff.pt`), which a UTF-8 file
    # cannot: written escaped, as the tools print it (JSON escapes them itself).
    shown = [{k: v.encode("utf-8", "backslashreplace").decode("utf-8") if isinstance(v, str)
              else v for k, v in row.items()} for row in rows]

    def write(f):
        writer = csv.DictWriter(f, fieldnames=_fieldnames(rows), restval="")
        writer.writeheader()
        writer.writerows(shown)

    with _writing(path):
        write_atomic(path, write, mode="w")
    return path


STATUSES = ("ok", "oom", "error")  # of a row: measured, out of memory, failed otherwise
# Every measured row the tool writes has these (and its metric), which the plot reads.
_MEASURED_KEYS = ("kind", "model", "batch_size", "resolution", "device", "device_name",
                  "threads", "commit")


def read_record(json_path: str | Path) -> list[dict[str, Any]]:
    """The rows saved in `json_path` ([] when it does not exist).

    Raises:
        BenchError: it cannot be read or is not a JSON list of rows (a measured row missing
            what the plot reads included), or it does not exist but its `.csv` twin does.
    """
    json_path = Path(json_path)
    csv_path = json_path.with_suffix(".csv")
    if not json_path.exists() and csv_path.exists():
        # the CSV is rewritten from the record: its rows would be dropped without a word
        raise BenchError(f"{csv_path}: exists without its record {json_path.name} (the CSV is "
                         f"written from it, its rows would be lost); move it away first")
    try:
        old = json.loads(json_path.read_text()) if json_path.exists() else []
    except (OSError, ValueError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise BenchError(f"{json_path}: cannot read the saved rows ({first_line(e)}); move it "
                         f"away first") from None
    if not isinstance(old, list) or not all(isinstance(r, dict) for r in old):
        raise BenchError(f"{json_path}: not a list of result rows; move it away first")
    # every row the tool writes has a status: one without (a hand edit) failed the plot with a
    # KeyError after the new rows were saved
    bad = next((i for i, r in enumerate(old, 1) if r.get("status") not in STATUSES), None)
    if bad is not None:
        raise BenchError(f"{json_path}: row {bad} has no status {' / '.join(STATUSES)} (edited "
                         f"by hand?); fix or move it away first")
    for i, r in enumerate(old, 1):  # what the plot reads of a measured row (a KeyError after
        if r["status"] != "ok":    # the new rows were saved)
            continue
        metric = "images_per_s" if r.get("kind") == "train" else "latency_ms_p50"
        missing = next((k for k in (*_MEASURED_KEYS, metric) if k not in r), None)
        if missing is not None:
            raise BenchError(f"{json_path}: row {i} has no {missing!r} (edited by hand?); fix "
                             f"or move it away first")
    return old


def check_record_machine(json_path: str | Path, saved: list[dict[str, Any]],
                         here: dict[str, Any]) -> None:
    """Refuse to add rows measured under `here` (a row's conditions) to the record `saved`
    read from `json_path` when its rows were measured on another device: a CPU record is named
    by its thread count only, and two machines' rows in one record would read as one sweep.
    (Not the torch version: a GPU host's torch moving on must not make every `--save` of the
    GPU checklist fail; each row records its own.)

    Raises:
        BenchError: naming both machines.
    """
    ours = here.get("device_name")
    other = next((r for r in saved if r.get("device_name") != ours), None)
    if other is not None:
        raise BenchError(f"{json_path}: its rows were measured on {other.get('device_name')}, "
                         f"this run is on {ours}; give --results-dir another folder so the two "
                         f"never mix")


def append_results(rows: list[dict[str, Any]], directory: str | Path,
                   stem: str | None = None) -> tuple[Path, Path]:
    """Append `rows` to `directory/<stem>.json` (the record) and rewrite the `.csv` twin from it.

    Returns:
        The JSON and CSV paths.

    Raises:
        BenchError: the existing record is not a JSON list of rows, or a file cannot be
            read or written.
    """
    directory = Path(directory)
    stem = stem or results_stem(rows)
    json_path, csv_path = directory / f"{stem}.json", directory / f"{stem}.csv"
    # Two benchmarks saving at once each read the record and wrote it back with their own rows
    # only: the folder's lock (flock on the folder itself, no file left) makes it one at a time.
    with folder_locked(directory):
        all_rows = read_record(json_path) + rows
        write_json(all_rows, json_path)
        write_csv(all_rows, csv_path)
    return json_path, csv_path


# What makes two rows a measurement of the same thing (the plot keeps the later), with the
# value a row written before the field existed meant (the classes show in params already).
_SAME_MEASUREMENT = {"kind": None, "model": None, "width": None, "source": None,
                     "batch_size": None, "resolution": None, "norm_act": None,
                     "channel_divisor": 1, "weights": "model", "params": None, "macs": None}


def plotted_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows `plot_vs_macs` draws: successful ones with a MAC count, the last of each
    measurement of one network under one setting (`_SAME_MEASUREMENT`), in first-seen order."""
    newest: dict[tuple, dict[str, Any]] = {}
    for r in rows:
        if r["status"] == "ok" and r.get("macs"):
            key = tuple(str(r.get(k) if r.get(k) is not None else default)
                        for k, default in _SAME_MEASUREMENT.items())
            newest[key] = r
    return list(newest.values())


def plot_vs_macs(rows: list[dict[str, Any]], path: str | Path) -> Path:
    """PNG of p50 latency (inference rows) or images/s (training rows) against conv+fc MACs,
    one line per model and batch size, points labelled by width. Rows without MACs or with a
    failed status are left out; of rows measuring one network under one setting again (a
    record appended to), the last is plotted, and the title names every commit plotted.

    Raises:
        BenchError: no row can be plotted, or the file cannot be written (folders are created).
    """
    from matplotlib.figure import Figure  # Agg canvas, no pyplot state, no display needed

    ok = plotted_rows(rows)
    if not ok:
        raise BenchError("nothing to plot: no successful row with a MAC count")
    train = ok[0]["kind"] == "train"
    metric, label = (("images_per_s", "training images/s") if train else
                     ("latency_ms_p50", "p50 latency per batch (ms)"))
    fig = Figure(figsize=(7.5, 4.8))
    ax = fig.subplots()
    # Rows of no width (factories, pruned networks) by source too: two factories `nets:build`
    # of different folders share a model name; a width sweep is one line whatever its sources,
    # unless two sources measured one width (a checkpoint beside the registry's network of its
    # width): then each source is a line of its own, not one line doubling back on itself.
    widths_of: dict[tuple[str, int, float], set[str]] = {}
    for r in ok:
        if r.get("width") is not None:
            widths_of.setdefault((r["model"], r["batch_size"], r["width"]), set()).add(
                str(r.get("source")))
    split = {(model, bs) for (model, bs, _), sources in widths_of.items() if len(sources) > 1}
    groups: dict[tuple[str, str, int], list[dict[str, Any]]] = {}
    for r in ok:
        by_source = r.get("width") is None or (r["model"], r["batch_size"]) in split
        source = str(r.get("source")) if by_source else ""
        groups.setdefault((r["model"], source, r["batch_size"]), []).append(r)
    names = [(model, bs) for model, _, bs in groups]
    lo = min(r["macs"] for r in ok) / 1e9
    span = math.log(max(r["macs"] for r in ok) / 1e9 / lo) or 1.0
    for (model, source, bs), group in sorted(groups.items()):
        group.sort(key=lambda r: r["macs"])
        xs = [r["macs"] / 1e9 for r in group]
        ys = [r[metric] for r in group]
        shared = names.count((model, bs)) > 1
        ax.plot(xs, ys, marker="o",
                label=f"{model}{f' ({source})' if shared else ''}, batch {bs}")
        for r, x, y in zip(group, xs, ys):
            if r.get("width") is not None:
                # towards the middle: the widest network's label ran into the frame
                right = math.log(x / lo) > 0.6 * span
                ax.annotate(f"w{r['width']:g}", (x, y), textcoords="offset points",
                            xytext=(-4 if right else 4, -10), ha="right" if right else "left",
                            fontsize=7)
    from matplotlib.ticker import LogLocator, NullFormatter, StrMethodFormatter

    ax.set_xscale("log")
    ax.set_yscale("log")
    for axis in (ax.xaxis, ax.yaxis):  # plain 0.2 / 0.5 / 1 / 2 labels (set after the scale)
        axis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        axis.set_major_formatter(StrMethodFormatter("{x:g}"))
        axis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("conv+fc MACs per image (G, fvcore, BatchNorm excluded)")
    ax.set_ylabel(label)
    r = ok[0]
    res = sorted({row["resolution"] for row in ok})
    loads = [row["load_avg_1m"] for row in ok if row.get("load_avg_1m") is not None]
    load = f", load avg {min(loads):g}-{max(loads):g}" if loads else ""
    threads = f"{r['threads']} thread{'s' if r['threads'] != 1 else ''}"
    commits = list(dict.fromkeys(str(row["commit"]) for row in ok))
    commit = f"commit{'s' * (len(commits) > 1)} {', '.join(commits)}"
    ax.set_title(f"{r['device_name']} ({threads}{load}), {commit}"
                 if r["device"] == "cpu" else f"{r['device_name']}, {commit}", fontsize=9)
    fig.suptitle(f"{'training throughput' if train else 'inference latency'} vs MACs: "
                 f"{distinct(ok, 'precision')}, {distinct(ok, 'layout')}, {distinct(ok, 'mode')}, "
                 f"{'/'.join(map(str, res))} px, torch "
                 f"{distinct(ok, 'torch_version', sep=', ')}",
                 fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    with _writing(path):
        try:
            # A temporary file renamed over the plot: a full disk truncated the earlier one.
            write_atomic(path, lambda f: fig.savefig(f, format=path.suffix[1:] or None,
                                                     dpi=110))
        except ValueError as e:  # a suffix matplotlib has no writer for
            raise BenchError(f"{path}: cannot write ({first_line(e)})") from None
    return path
