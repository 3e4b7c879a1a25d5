#!/usr/bin/env python
"""Fused BatchNorm+ReLU against eager and torch.compile'd BatchNorm2d + ReLU, on ResNet-50 shapes.

    bash tools/env.sh python benchmarks/bench_bn_relu.py                 # GPU: batch 256
    bash tools/env.sh python benchmarks/bench_bn_relu.py --device cpu    # CPU: batch 8

What it measures, for every distinct input shape of a norm+ReLU layer in thin_resnet50 at each
`--widths` (1.0 = ResNet-50, 0.5 = its uniformly halved ThinResNet), in `--dtype` (default bf16)
activations with fp32 parameters (the autocast situation) and `--layout` (default channels_last):

- train: y = relu(bn(x)) with batch statistics and the running-statistics update, then the
  gradients of x, weight and bias (torch.autograd.grad, so nothing accumulates);
- eval: the forward with running statistics, under no_grad;

for three implementations: `fused` (fasttrain.ops.bn_relu.BatchNormReLU2d), `eager`
(nn.BatchNorm2d + nn.ReLU(inplace=True)) and `compiled` (torch.compile of that eager module;
static shapes on CUDA, one dynamic-shape compile on CPU, see --compile-dynamic).

Reported per row: median and min per-step wall time over --repeats timed runs of --iters steps
each (on GPU: CUDA events around replays of the step captured in a CUDA graph, --timing graph, or
around steps launched from Python, --timing launched; on CPU as many steps as last ~25 ms), after
--warmup steps
(compilation included); achieved bandwidth = the bytes
a two-pass BatchNorm must move (train: 3 tensor passes forward + 5 backward; eval: 2) divided
by the time, next to a device-to-device copy of the same tensor timed in the same run; the bytes
saved for backward (saved-tensor hooks, unique storages) and on CUDA the peak memory of one train
step above its inputs. A network-weighted total (each shape times its count in the network) sums
up each width. The model section counts the activation bytes a whole thin_resnet50 forward saves
for backward with native and with fused norm+ReLU layers.

Writes benchmarks/results/bn_relu-<device>-<dtype>-<layout>-b<batch>.json (device: h100, cpu2t
for 2 CPU threads, ...; other widths than 1.0 and 0.5 add theirs, `-w0.25`) with the
conditions (device, driver, torch, CUDA, commit, date, settings, CPU load) and prints a table.
Timing is never asserted. Ctrl-C or SIGTERM (a time limit) writes the rows measured so far
("interrupted": true, the summary of complete widths only), exit 130.
"""
from __future__ import annotations

import datetime
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from _args import (check_out, device as device_arg, fail, partial_out,  # noqa: E402
                   settings_suffix, subset_suffix, write_json)
from fasttrain.cli import (ArgumentParser, finite_float, first_repeat, int_at_least,  # noqa: E402
                           sigterm_as_interrupt)
from fasttrain.config import MAX_BATCH, MAX_WIDTH  # noqa: E402
from fasttrain.measure.env import cpu_name as cpu_model  # noqa: E402
from fasttrain.measure.env import git_commit, nvidia_driver  # noqa: E402
from fasttrain.measure.timing import cuda_graph_replay  # noqa: E402
from fasttrain.models import create_model  # noqa: E402
from fasttrain.models.layers import NORM_ACT_LAYERS  # noqa: E402
from fasttrain.ops import _ext  # noqa: E402
from fasttrain.ops.bn_relu import BatchNormReLU2d  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
IMPLS = ("fused", "eager", "compiled")
TRAIN_PASSES, EVAL_PASSES = 8, 2  # tensor-sized reads + writes a two-pass BN+ReLU needs
_positive, _non_negative = int_at_least(1), int_at_least(0)
# The bound of the config's model.width; a width too thin for one channel is refused by the model.
_width = finite_float(lambda v: 0 < v <= MAX_WIDTH, f"a width in (0, {MAX_WIDTH}]")


# ---- conditions ----------------------------------------------------------------------------------

def conditions(device: torch.device, args) -> dict:
    cond = {"device": device.type, "cpu_model": cpu_model(), "cpu_cores": os.cpu_count(),
            "cpu_threads": torch.get_num_threads(),
            "load_average_1_5_15min_at_end": [round(v, 2) for v in os.getloadavg()],
            "torch": torch.__version__, "cuda": torch.version.cuda,
            "python": platform.python_version(),
            "commit": git_commit(), "date": datetime.date.today().isoformat(),
            "dtype": args.dtype, "param_dtype": "fp32", "layout": args.layout,
            "batch": args.batch, "widths": args.widths, "warmup": args.warmup, "iters": args.iters,
            "repeats": args.repeats, "compile_dynamic": args.compile_dynamic,
            "timing": args.timing if device.type == "cuda" else "launched",
            "fasttrain_build": _ext.BUILD_INFO, "has_ext": _ext.HAS_EXT,
            "has_cuda_ext": _ext.HAS_CUDA_EXT}
    if device.type == "cuda":
        cond.update(device_name=torch.cuda.get_device_name(device), driver=nvidia_driver(),
                    cudnn=torch.backends.cudnn.version())
    else:
        cond["device_name"] = cpu_model()
    return cond


def device_tag(device: torch.device) -> str:
    if device.type == "cpu":
        return "cpu"
    name = torch.cuda.get_device_name(device).lower()
    for tag in ("h200", "h100", "a100", "l40s", "l4", "a10g", "v100", "b200"):
        if tag in name:
            return tag
    return "cuda"


# ---- shapes --------------------------------------------------------------------------------------

def norm_act_shapes(width: float, batch: int) -> list[tuple[tuple[int, ...], int]]:
    """(input shape, occurrences) of thin_resnet50's norm+ReLU layers, in network order."""
    with torch.device("meta"):  # no weights allocated: instant even at width 16
        model = create_model("thin_resnet50", width=width,
                             norm_act_layer=NORM_ACT_LAYERS["native"])
    counts: dict[tuple[int, ...], int] = {}

    def hook(_module, inputs):
        shape = (batch, *inputs[0].shape[1:])
        counts[shape] = counts.get(shape, 0) + 1

    for m in model.modules():
        if type(m) is NORM_ACT_LAYERS["native"]:
            m.register_forward_pre_hook(hook)
    with torch.no_grad():
        model(torch.empty(1, 3, 224, 224, device="meta"))
    return list(counts.items())


# ---- measurement ---------------------------------------------------------------------------------

class Timer:
    """Per-step wall time (ms) of `fn`: `repeats` timed runs of `iters` steps each, after `warmup`
    steps. iters=0 picks, per call, the step count that makes a run last about `target_ms`
    (small shapes on a CPU otherwise time the scheduler).

    `graphs` (CUDA): the step is captured once in a CUDA graph and the replays are timed, so the
    number is the kernels' and not the host's (Python, dispatch and launches of one layer take
    longer than its kernels at most ResNet shapes; in training a compiled network replayed as CUDA
    graphs has no such cost either). A step that cannot be captured is timed as launched."""

    def __init__(self, device: torch.device, warmup: int, iters: int, repeats: int,
                 target_ms: float = 25.0, graphs: bool = False) -> None:
        self.device, self.warmup, self.iters, self.repeats = device, warmup, iters, repeats
        self.target_ms, self.graphs = target_ms, graphs


    def _run(self, fn, iters: int) -> float:
        if self.device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(iters):
                fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / iters
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        return (time.perf_counter() - t0) * 1e3 / iters

    def __call__(self, fn) -> tuple[list[float], int, str]:
        """(per-step times of each repeat, steps per repeat, "graph" | "launched")."""
        for _ in range(self.warmup):
            fn()
        timing = "launched"
        if self.graphs and self.device.type == "cuda":
            try:
                fn, timing = cuda_graph_replay(fn, self.device), "graph"
            except RuntimeError as e:
                print(f"  graph capture failed ({str(e).splitlines()[0][:100]}): timing launches",
                      file=sys.stderr)
        iters = self.iters
        if iters == 0:
            iters = max(1, min(1000, round(self.target_ms / max(self._run(fn, 1), 1e-3))))
        return [self._run(fn, iters) for _ in range(self.repeats)], iters, timing


def saved_bytes(fn) -> int:
    """Bytes of the unique storages autograd saves for backward while `fn` runs."""
    seen: dict[int, int] = {}

    def pack(t):
        if t.device.type != "meta":
            s = t.untyped_storage()
            seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return sum(seen.values())


def _bn_relu_train(x, weight, bias, running_mean, running_var):
    return F.relu(F.batch_norm(x, running_mean, running_var, weight, bias, True, 0.1, 1e-5))


def _bn_relu_eval(x, weight, bias, running_mean, running_var):
    return F.relu(F.batch_norm(x, running_mean, running_var, weight, bias, False, 0.1, 1e-5))


class CompiledBNReLU(nn.Module):
    """BatchNorm2d + ReLU as torch.compile'd functions of (x, parameters, buffers): a function,
    not a module, is compiled, so that one dynamic-shape graph serves every shape."""

    compiled: dict = {}

    def __init__(self, channels: int, dynamic: bool) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(channels)
        if not dynamic:
            torch._dynamo.reset()  # a static graph per shape; never the recompile limit
            type(self).compiled = {}
        for mode, fn in (("train", _bn_relu_train), ("eval", _bn_relu_eval)):
            if mode not in self.compiled:
                self.compiled[mode] = torch.compile(fn, dynamic=dynamic, fullgraph=True)

    def forward(self, x):
        fn = self.compiled["train" if self.training else "eval"]
        return fn(x, self.bn.weight, self.bn.bias, self.bn.running_mean, self.bn.running_var)


def make_impl(name: str, channels: int, device: torch.device, dynamic: bool) -> nn.Module:
    if name == "fused":
        return BatchNormReLU2d(channels).to(device)
    if name == "eager":
        return nn.Sequential(nn.BatchNorm2d(channels), nn.ReLU(inplace=True)).to(device)
    return CompiledBNReLU(channels, dynamic).to(device)


def bench_shape(shape, count, width, device, dtype, layout, timer, dynamic):
    C = shape[1]
    fmt = torch.channels_last if layout == "nhwc" else torch.contiguous_format
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(shape, device=device, generator=g).to(dtype).contiguous(memory_format=fmt)
    grad = torch.randn(shape, device=device, generator=g).to(dtype).contiguous(memory_format=fmt)
    nbytes = x.numel() * x.element_size()
    out = torch.empty_like(x)
    copy_ms = statistics.median(timer(lambda: out.copy_(x))[0])  # same timing as the rows
    copy_gbps = 2 * nbytes / copy_ms / 1e6
    rows = []
    for name in IMPLS:
        m = make_impl(name, C, device, dynamic)
        params = [p for p in m.parameters()]
        xr = x.detach().requires_grad_()

        def train_step():
            y = m(xr)
            return torch.autograd.grad(y, [xr, *params], grad)

        def eval_step():
            with torch.no_grad():
                return m(x)

        for mode in ("train", "eval"):
            m.train(mode == "train")
            step = train_step if mode == "train" else eval_step
            times, iters, timing = timer(step)
            med = statistics.median(times)
            passes = TRAIN_PASSES if mode == "train" else EVAL_PASSES
            row = {"width": width, "shape": list(shape), "count": count, "mode": mode, "impl": name,
                   "ms_median": med, "ms_min": min(times), "repeats": len(times),
                   "iters": iters, "timing": timing,
                   "bytes": passes * nbytes, "gbps": passes * nbytes / med / 1e6,
                   "copy_ms": copy_ms, "copy_gbps": copy_gbps}
            row["frac_of_copy"] = row["gbps"] / copy_gbps
            if mode == "train":
                row["saved_bytes"] = saved_bytes(lambda: m(xr))
                if device.type == "cuda":
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats(device)
                    base = torch.cuda.memory_allocated(device)
                    r = train_step()
                    torch.cuda.synchronize()
                    row["peak_bytes"] = torch.cuda.max_memory_allocated(device) - base
                    del r
            rows.append(row)
    return rows


def model_saved_bytes(width: float, batch: int, device, dtype, layout) -> dict:
    """Activation bytes a thin_resnet50 forward (autocast to `dtype`) saves, per norm_act."""
    result = {}
    for norm_act in ("native", "fused"):
        torch.manual_seed(0)
        model = create_model("thin_resnet50", width=width,
                             norm_act_layer=NORM_ACT_LAYERS[norm_act]).to(device)
        fmt = torch.channels_last if layout == "nhwc" else torch.contiguous_format
        model = model.to(memory_format=fmt).train()
        x = torch.randn(batch, 3, 224, 224, device=device).contiguous(memory_format=fmt)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            result[norm_act] = saved_bytes(lambda: model(x))
        del model
    return result


def summarize(rows: list[dict]) -> list[dict]:
    """Network-weighted totals per (width, mode): sum of count * median time, per impl."""
    out = []
    for width in sorted({r["width"] for r in rows}, reverse=True):
        for mode in ("train", "eval"):
            tot = {i: sum(r["count"] * r["ms_median"] for r in rows
                          if r["width"] == width and r["mode"] == mode and r["impl"] == i)
                   for i in IMPLS}
            byt = sum(r["count"] * r["bytes"] for r in rows
                      if r["width"] == width and r["mode"] == mode and r["impl"] == "fused")
            copy = sum(r["count"] * r["bytes"] / r["copy_gbps"] / 1e6 for r in rows
                       if r["width"] == width and r["mode"] == mode and r["impl"] == "fused")
            out.append({"width": width, "mode": mode, **{f"{i}_ms": tot[i] for i in IMPLS},
                        "fused_gbps": byt / tot["fused"] / 1e6, "copy_equiv_ms": copy,
                        "fused_frac_of_copy": copy / tot["fused"],
                        "speedup_vs_eager": tot["eager"] / tot["fused"],
                        "speedup_vs_compiled": tot["compiled"] / tot["fused"]})
    return out


def print_table(rows, summary, model_saved) -> None:
    hdr = (f"{'w':>4} {'shape (N,C,H,W)':>20} {'n':>2} {'mode':>5} | {'fused ms':>9} "
           f"{'eager ms':>9} {'comp. ms':>9} | {'fused GB/s':>10} {'copy GB/s':>9} {'%copy':>6} | "
           f"{'saved MB f/e/c':>16}")
    print(hdr)
    print("-" * len(hdr))
    key = lambda r: (r["width"], tuple(r["shape"]), r["mode"])  # noqa: E731
    by = {}
    for r in rows:
        by.setdefault(key(r), {})[r["impl"]] = r
    for (w, shape, mode), d in by.items():
        f, e, c = d["fused"], d["eager"], d["compiled"]
        saved = (f"{f['saved_bytes'] / 2**20:5.1f}/{e['saved_bytes'] / 2**20:4.1f}/"
                 f"{c['saved_bytes'] / 2**20:4.1f}" if mode == "train" else "")
        print(f"{w:>4} {str(shape):>20} {f['count']:>2} {mode:>5} | {f['ms_median']:9.3f} "
              f"{e['ms_median']:9.3f} {c['ms_median']:9.3f} | {f['gbps']:10.1f} "
              f"{f['copy_gbps']:9.1f} {100 * f['frac_of_copy']:5.1f}% | {saved:>16}")
    print()
    for s in summary:
        print(f"w{s['width']} {s['mode']:>5} network total: fused {s['fused_ms']:.2f} ms, eager "
              f"{s['eager_ms']:.2f} ms ({s['speedup_vs_eager']:.2f}x), compiled "
              f"{s['compiled_ms']:.2f} ms ({s['speedup_vs_compiled']:.2f}x); fused at "
              f"{100 * s['fused_frac_of_copy']:.1f}% of copy bandwidth")
    for w, d in model_saved.items():
        print(f"thin_resnet50 w{w} forward saves: native {d['native'] / 2**20:.1f} MB, fused "
              f"{d['fused'] / 2**20:.1f} MB")


DEFAULT_WIDTHS = [1.0, 0.5]


def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", type=device_arg,
                   default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda[:N]")
    p.add_argument("--batch", type=int_at_least(1, MAX_BATCH), default=None,
                   help="default: 256 on CUDA, 8 on CPU")
    p.add_argument("--widths", type=_width, nargs="+", default=DEFAULT_WIDTHS,
                   help="default: 1.0 0.5; other widths are written to a result file named "
                   "after them")
    p.add_argument("--dtype", choices=DTYPES, default="bf16")
    p.add_argument("--layout", choices=["nhwc", "nchw"], default="nhwc")
    # >= 1: torch.compile compiles in the first call, which --warmup 0 timed (31 s "steps")
    p.add_argument("--warmup", type=_positive, default=None,
                   help="untimed steps first, at least 1 (the compiled implementation compiles "
                        "in the first); default: 10 on CUDA, 2 on CPU")
    p.add_argument("--iters", type=_non_negative, default=None,
                   help="steps per timed run; 0 = about 25 ms worth (default: CUDA 20, CPU 0)")
    p.add_argument("--repeats", type=_positive, default=None, help="timed runs (CUDA 10, CPU 7)")
    p.add_argument("--compile-dynamic", choices=["auto", "yes", "no"], default="auto",
                   help="auto: static per shape on CUDA, one dynamic compile on CPU (compiling "
                        "every shape statically takes minutes there)")
    p.add_argument("--model-batch", type=int_at_least(0, MAX_BATCH), default=None,
                   help="batch of the whole-model saved-bytes count (default: --batch; 0 = skip)")
    p.add_argument("--threads", type=int_at_least(0, 4096), default=0,
                   help="CPU intra-op threads (0 = torch's default, one per core)")
    p.add_argument("--timing", choices=["graph", "launched"], default="graph",
                   help="CUDA: time replays of the step captured in a CUDA graph (the kernels' "
                        "time), or steps launched from Python (adds the host's time per layer)")
    p.add_argument("--out", type=Path, default=None, help="result JSON (default: by conditions)")
    args = p.parse_args(argv)
    sizes = settings_suffix(args, p, ["warmup", "iters", "repeats", "model_batch"])
    device = args.device
    cuda = device.type == "cuda"
    if cuda and device.index is not None:
        # events and graph captures go to the current device's streams: make it this one
        torch.cuda.set_device(device)
    args.batch = args.batch if args.batch is not None else (256 if cuda else 8)
    args.warmup = args.warmup if args.warmup is not None else (10 if cuda else 2)
    args.iters = args.iters if args.iters is not None else (20 if cuda else 0)
    args.repeats = args.repeats if args.repeats is not None else (10 if cuda else 7)
    dynamic = args.compile_dynamic == "yes" or (args.compile_dynamic == "auto" and not cuda)
    args.compile_dynamic = "dynamic" if dynamic else "static"
    model_batch = args.batch if args.model_batch is None else args.model_batch
    twice = first_repeat(args.widths)
    if twice is not None:  # the same shapes timed twice, one summary row per width
        fail(f"--widths: {twice:g} is given twice")
    shapes = {}
    for width in args.widths:  # on the meta device: instant, and refuses a width before timing
        try:
            shapes[width] = norm_act_shapes(width, args.batch)
        except ValueError as e:
            fail(f"--widths {width}: {e}")
    threads = args.threads or torch.get_num_threads()
    tag = device_tag(device) + (f"{threads}t" if device.type == "cpu" else "")
    out = check_out(args.out, ROOT / "benchmarks" / "results" /
                    f"bn_relu-{tag}-{args.dtype}-{args.layout}-b{args.batch}"
                    f"{'-launched' if cuda and args.timing == 'launched' else ''}"
                    f"{subset_suffix([f'w{w:g}' for w in args.widths], ['w1', 'w0.5'])}"
                    f"{sizes}.json")
    if args.threads:
        torch.set_num_threads(args.threads)
    if not _ext.supports(device):
        print(f"warning: fused kernels unavailable on {device} ({_ext.unavailable_reason(device)}):"
              f" 'fused' times the PyTorch fallback", file=sys.stderr)
    dtype = DTYPES[args.dtype]
    timer = Timer(device, args.warmup, args.iters, args.repeats, graphs=args.timing == "graph")

    rows: list[dict] = []
    done: list[float] = []  # widths with every shape measured: the only ones summarised
    try:
        for width in args.widths:
            for shape, count in shapes[width]:
                print(f"w{width} {shape} x{count} ...", file=sys.stderr, flush=True)
                rows += bench_shape(shape, count, width, device, dtype, args.layout, timer,
                                    dynamic)
            done.append(width)
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM from `timeout` (the GPU checklist's limit)
        print(f"interrupted: writing the {len(rows)} rows measured; summary of widths "
              f"{done or 'none'} only", file=sys.stderr)
    interrupted = done != list(args.widths)
    summary = summarize([r for r in rows if r["width"] in done])
    model_saved = ({str(w): model_saved_bytes(w, model_batch, device, dtype, args.layout)
                    for w in done} if model_batch and not interrupted else {})
    print_table(rows, summary, model_saved)

    result = {"benchmark": "bn_relu", "conditions": conditions(device, args),
              "bytes_model": f"train {TRAIN_PASSES} tensor passes (fwd: stats read, normalise "
                             f"read+write; bwd: sums read g+x, grad_x read g+x+write), eval "
                             f"{EVAL_PASSES}; copy moves 2",
              "rows": rows, "summary": summary, "interrupted": interrupted,
              "model_saved_bytes": {"model": "thin_resnet50", "batch": model_batch, **model_saved}}
    if interrupted:
        out = partial_out(out)
    write_json(out, result)
    print(f"\nwrote {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out}")
    return 130 if interrupted else 0


if __name__ == "__main__":
    sigterm_as_interrupt()  # a time limit keeps what was measured
    raise SystemExit(main())
