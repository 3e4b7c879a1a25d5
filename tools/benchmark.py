#!/usr/bin/env python
"""Measure inference latency or training throughput of models under stated conditions.

    python tools/benchmark.py --model thin_resnet18,thin_resnet50 --width 0.25,0.5,0.75,1.0 \
        --batch-size 1,8 [--device cuda|cpu] [--precision fp32|bf16|fp16] \
        [--layout channels_last|contiguous] [--mode eager|compile|torchscript|cudagraphs|compile-cudagraphs] \
        [--resolution 224] [--threads N] [--iters 100] [--warmup 10] [--train] \
        [--json OUT.json] [--csv OUT.csv] [--save] [--plot [PNG]]
    python tools/benchmark.py --checkpoint runs/.../checkpoints/best.pt ...
    python tools/benchmark.py --file model.pt ...          (TorchScript .pt or torch.export .pt2)
    python tools/benchmark.py --factory mypkg.pruned:build ...   (any function returning a module)

What it measures (fasttrain.measure): per row, inference latency of one batch (warm-up excluded,
inference_mode, CUDA events or a synchronised clock; n, mean, std, p50/p90/p99, images/s) or, with
--train, full training steps on device-resident synthetic data (images/s, peak memory). Every row
also holds params, conv+fc MACs and fvcore's total, and the conditions (device name, driver,
torch/CUDA versions, git commit, date). A batch size that runs out of memory is recorded as
status "oom" and the sweep continues.

Output: a table on stdout; --json/--csv write this run's rows; --save appends them to
benchmarks/results/<kind>-<device>-<precision>-<layout>-<mode>-<res>px.{json,csv}; --plot draws
latency (or images/s) against MACs (PNG; next to the saved results when no path is given).
User errors exit with status 2 and one line on stderr.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fasttrain.cli import ArgumentParser
from fasttrain.errors import UserError

ROOT = Path(__file__).resolve().parents[1]



def _list_of(kind):
    def parse(text: str):
        try:
            values = [kind(v) for v in text.split(",") if v.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list of {kind.__name__}"
                                             f", got {text!r}") from None
        if not values or any(v <= 0 for v in values):
            raise argparse.ArgumentTypeError(f"expected positive values, got {text!r}")
        return values
    parse.__name__ = f"list of {kind.__name__}"
    return parse


def _int_at_least(minimum: int):
    """argparse type: an integer >= `minimum`."""
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if v < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {v}")
        return v
    return parse


_positive, _non_negative = _int_at_least(1), _int_at_least(0)


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description="Benchmark latency or training throughput of ThinResNets "
                                   "(or any module) under recorded conditions.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", metavar="NAME[,NAME...]",
                     help="registered models (thin_resnet50, ...), each at every --width")
    src.add_argument("--checkpoint", metavar="PATH",
                     help="a fasttrain checkpoint (last.pt / best.pt)")
    src.add_argument("--file", metavar="PATH",
                     help="an exported TorchScript (.pt) or torch.export (.pt2) file")
    src.add_argument("--factory", metavar="MODULE:FUNCTION",
                     help="a function returning an nn.Module, imported from the current "
                          "directory or PYTHONPATH")
    p.add_argument("--width", type=_list_of(float), default=None,
                   help="--model: width multipliers to sweep, e.g. 0.25,0.5,1.0 (default 1.0)")
    p.add_argument("--channel-divisor", type=_positive, default=1,
                   help="--model: round the base width up to a multiple of this")
    p.add_argument("--num-classes", type=_positive, default=None,
                   help="--model: classifier outputs (default 1000, CIFAR models 10)")
    p.add_argument("--norm-act", default=None,
                   help="norm+ReLU implementation for --model/--checkpoint (default: native, or "
                        "the checkpoint's); a fused one when fasttrain provides it")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="auto = cuda when available")
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32")
    p.add_argument("--layout", choices=["channels_last", "contiguous"], default="channels_last")
    p.add_argument("--mode", choices=["eager", "compile", "torchscript", "cudagraphs",
                                      "compile-cudagraphs"],
                   default="eager")
    p.add_argument("--batch-size", type=_list_of(int), default=[1], help="e.g. 1,8,64")
    p.add_argument("--resolution", type=_positive, default=None,
                   help="input size (default: the model's: 224, CIFAR 32, checkpoint val_res)")
    p.add_argument("--threads", type=_positive, default=None, help="CPU intra-op threads")
    p.add_argument("--iters", type=_positive, default=100, help="timed calls per row")
    p.add_argument("--warmup", type=_non_negative, default=10, help="untimed calls per row")
    p.add_argument("--train", action="store_true",
                   help="measure training steps (forward, backward, SGD) instead of inference")
    p.add_argument("--json", metavar="PATH", help="write this run's rows as JSON")
    p.add_argument("--csv", metavar="PATH", help="write this run's rows as CSV")
    p.add_argument("--save", action="store_true",
                   help="append the rows under --results-dir, in files named by the conditions")
    p.add_argument("--results-dir", metavar="DIR", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--plot", metavar="PNG", nargs="?", const="",
                   help="plot latency (or images/s) vs MACs; without PNG: next to --save's files")
    return p


def _load_models(args):
    from fasttrain.measure import sources

    if args.width is not None and not args.model:
        raise UserError("--width applies to --model only")
    if args.model:
        return [bm for name in args.model.split(",") if name.strip()
                for bm in sources.from_registry(name.strip(), args.width or [1.0],
                                                channel_divisor=args.channel_divisor,
                                                num_classes=args.num_classes,
                                                norm_act=args.norm_act or "native")]
    if args.checkpoint:
        return [sources.from_checkpoint(args.checkpoint, norm_act=args.norm_act)]
    if args.file:
        return [sources.from_file(args.file)]
    return [sources.from_factory(args.factory)]


def _table(rows, train: bool):
    from rich.table import Table

    t = Table(title=f"{'training throughput' if train else 'inference latency'}: "
                    f"{rows[0]['device_name']}, {rows[0]['precision']}, {rows[0]['layout']}, "
                    f"{rows[0]['mode']}, torch {rows[0]['torch_version']}, "
                    f"commit {rows[0]['commit']}")
    cols = ["model", "width", "batch", "res", "params (M)", "MACs (G)"]
    cols += (["step ms mean", "step ms p50", "img/s", "peak MiB"] if train else
             ["p50 ms", "p90 ms", "p99 ms", "mean ± std ms", "img/s"])
    for c in cols:
        t.add_column(c, justify="left" if c == "model" else "right")

    def f(v, spec):
        return "-" if v is None else format(v, spec)

    for r in rows:
        head = [r["model"], f(r["width"], "g"), str(r["batch_size"]), str(r["resolution"]),
                f(r["params"] / 1e6, ".3f"), f(r["macs"] and r["macs"] / 1e9, ".3f")]
        if r["status"] != "ok":
            t.add_row(*head, r["status"].upper(), *[""] * (len(cols) - len(head) - 1))
        elif train:
            t.add_row(*head, f(r["step_ms_mean"], ".2f"), f(r["step_ms_p50"], ".2f"),
                      f(r["images_per_s"], ".1f"), f(r["peak_mem_mib"], ".0f"))
        else:
            t.add_row(*head, f(r["latency_ms_p50"], ".2f"), f(r["latency_ms_p90"], ".2f"),
                      f(r["latency_ms_p99"], ".2f"),
                      f"{r['latency_ms_mean']:.2f} ± {r['latency_ms_std']:.2f}",
                      f(r["images_per_s"], ".1f"))
    return t


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.plot == "" and not args.save:
            raise UserError("--plot needs a PNG path unless --save is given")
        import torch
        from rich.console import Console

        from fasttrain.measure import bench

        if args.threads:
            torch.set_num_threads(args.threads)
        device = args.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        cond = bench.Conditions(device=device, precision=args.precision, layout=args.layout,
                                mode=args.mode, resolution=args.resolution, iters=args.iters,
                                warmup=args.warmup, train=args.train)
        cond.check()  # before building models: impossible conditions fail fast
        models = _load_models(args)
        console = Console()
        if not console.is_terminal:  # pipes and CI get 80 columns by default: too narrow
            console = Console(width=150)
        rows = bench.run(models, cond, args.batch_size,
                         on_row=lambda r: console.print(
                             f"{r['model']} w{r['width']} batch {r['batch_size']}: {r['status']}",
                             style="dim", highlight=False, markup=False))
        console.print(_table(rows, args.train))
        if args.json:
            bench.write_json(rows, args.json)
        if args.csv:
            bench.write_csv(rows, args.csv)
        saved = []
        if args.save:
            saved = list(bench.append_results(rows, args.results_dir))
        if args.plot is not None:
            png = (Path(args.plot) if args.plot else
                   Path(args.results_dir) / f"{bench.results_stem(rows)}.png")
            saved.append(bench.plot_vs_macs(rows, png))
        for path in saved:
            console.print(f"wrote {path}", highlight=False)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
