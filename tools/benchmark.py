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
status "oom", one that fails for another reason as status "error" (the reason in the row's
"error" field), and the sweep continues.

Output: a table on stdout; --json/--csv write this run's rows; --save appends them to
benchmarks/results/<kind>-<device>-<precision>-<layout>-<mode>-<res>px.{json,csv}; --plot draws
latency (or images/s) against MACs (PNG; next to the saved results when no path is given).
Output paths are checked before anything is measured; folders are created.

Exit status: 0 when every row is "ok" or "oom"; 1 when some row has status "error" (all outputs
are still written; one line on stderr says how many); 141 (instead of 0) when stdout was closed
before everything was printed (`| head -3`), the outputs still written; 2 for a user error (bad
option, model or file, impossible conditions, an output that cannot be written), with one line
on stderr. When an output cannot be written the table and the other outputs are written first.
"""
from __future__ import annotations

import argparse
import contextlib
import math
import os
import signal
import sys
import threading
from pathlib import Path

from fasttrain.cli import (ArgumentParser, check_cifar_only, check_output, first_repeat,
                           int_at_least, new_folders_removed_on_error, nonempty_value, not_stdout,
                           print_table, printable, printable_paths, sigterm_as_interrupt,
                           stdout_may_close, user_path)
from fasttrain.config import MAX_BATCH, MAX_RESOLUTION, MAX_WIDTH
from fasttrain.errors import UserError

ROOT = Path(__file__).resolve().parents[1]



def _list_of(kind, most: float = math.inf):
    def parse(text: str):
        items = text.split(",")
        try:
            values = [kind(v) for v in items if v.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list of {kind.__name__}"
                                             f", got {text!r}") from None
        # `1,,2` ran as 1,2 and `1,1` measured the same rows twice (and --save kept both)
        if values and len(values) < len(items):
            raise argparse.ArgumentTypeError(f"an empty item in {text!r}")
        twice = first_repeat(values)
        if twice is not None:
            raise argparse.ArgumentTypeError(f"{twice:g} given twice in {text!r}")
        if not values or not all(math.isfinite(v) and v > 0 for v in values):
            raise argparse.ArgumentTypeError(f"expected finite positive values, got {text!r}")
        if any(v > most for v in values):
            shown = f"{most:g}" if isinstance(most, float) else str(most)
            raise argparse.ArgumentTypeError(f"expected values <= {shown}, got {text!r}")
        return values
    parse.__name__ = f"list of {kind.__name__}"
    return parse


_positive = int_at_least(1)
# A typo's 10**30 calls ran until killed; ten million already take hours on a real network.
MAX_ITERS = 10_000_000


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description="Benchmark latency or training throughput of ThinResNets "
                                   "(or any module) under recorded conditions.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", metavar="NAME[,NAME...]",
                     help="registered models (thin_resnet50, ...), each at every --width")
    src.add_argument("--checkpoint", metavar="PATH", type=user_path,
                     help="a fasttrain checkpoint (last.pt / best.pt)")
    src.add_argument("--file", metavar="PATH", type=user_path,
                     help="an exported TorchScript (.pt) or torch.export (.pt2) file")
    src.add_argument("--factory", metavar="MODULE:FUNCTION",
                     help="a function returning an nn.Module, imported from the current "
                          "directory or PYTHONPATH")
    p.add_argument("--width", type=_list_of(float, most=MAX_WIDTH), default=None,
                   help="--model: width multipliers to sweep, e.g. 0.25,0.5,1.0 (default 1.0)")
    p.add_argument("--channel-divisor", type=_positive, default=1,
                   help="--model: round the base width up to a multiple of this")
    p.add_argument("--num-classes", type=_positive, default=None,
                   help="--model: classifier outputs (default 1000, CIFAR models 10)")
    p.add_argument("--shortcut", choices=["A", "B"], default=None,
                   help="--model, CIFAR ResNets: A = parameter-free (default), B = 1x1 conv")
    p.add_argument("--weights", choices=["model", "ema"], default=None,
                   help="--checkpoint: the trained weights (model, default) or their moving "
                        "average (ema); the same network, so the numbers differ by noise only")
    p.add_argument("--norm-act", default=None, type=nonempty_value,
                   help="norm+ReLU implementation for --model/--checkpoint (default: native, or "
                        "the checkpoint's); a fused one when fasttrain provides it")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="auto = cuda when available")
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32")
    p.add_argument("--layout", choices=["channels_last", "contiguous"], default="channels_last")
    p.add_argument("--mode", choices=["eager", "compile", "torchscript", "cudagraphs",
                                      "compile-cudagraphs"],
                   default="eager")
    p.add_argument("--batch-size", type=_list_of(int, most=MAX_BATCH), default=[1],
                   help="e.g. 1,8,64")
    p.add_argument("--resolution", type=int_at_least(1, MAX_RESOLUTION), default=None,
                   help="input size (default: the model's: 224, CIFAR 32, checkpoint val_res)")
    p.add_argument("--threads", type=int_at_least(1, 4096), default=None,
                   help="CPU intra-op threads")
    p.add_argument("--iters", type=int_at_least(1, MAX_ITERS), default=100,
                   help="timed calls per row")
    p.add_argument("--warmup", type=int_at_least(0, MAX_ITERS), default=10,
                   help="untimed calls per row; raised to what compilation needs (compile 1, "
                        "compile-cudagraphs 2, torchscript or a TorchScript file 2), the row "
                        "records the number run")
    p.add_argument("--train", action="store_true",
                   help="measure training steps (forward, backward, SGD) instead of inference")
    p.add_argument("--json", metavar="PATH", type=user_path, help="write this run's rows as JSON")
    p.add_argument("--csv", metavar="PATH", type=user_path, help="write this run's rows as CSV")
    p.add_argument("--save", action="store_true",
                   help="append the rows under --results-dir, in files named by the conditions")
    p.add_argument("--results-dir", metavar="DIR", type=user_path,
                   default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--plot", metavar="PNG", nargs="?", const="", type=os.path.expanduser,
                   help="plot latency (or images/s) vs MACs; without PNG: next to --save's files")
    return p


def _model_names(args) -> list[str]:
    return [n.strip() for n in args.model.split(",") if n.strip()]


def _check_sources(args) -> None:
    """Refuse an empty source and options the chosen source would ignore."""
    if args.model is not None:
        names = [n.strip() for n in args.model.split(",")]
        if not any(names):
            raise UserError(f"--model {args.model!r}: no model name given")
        if "" in names:
            raise UserError(f"--model {args.model!r}: an empty name")
        twice = first_repeat(names)
        if twice is not None:
            raise UserError(f"--model {args.model!r}: {twice} given twice")
    for flag, value in (("--checkpoint", args.checkpoint), ("--file", args.file),
                        ("--factory", args.factory)):
        if value is not None and not value.strip():
            raise UserError(f"{flag}: empty {'spec' if flag == '--factory' else 'path'}")
    if args.model is None:
        given = [flag for flag, set_ in (("--width", args.width is not None),
                                         ("--num-classes", args.num_classes is not None),
                                         ("--channel-divisor", args.channel_divisor != 1),
                                         ("--shortcut", args.shortcut is not None))
                 if set_]
        if given:
            raise UserError(f"{' and '.join(given)} appl{'ies' if len(given) == 1 else 'y'} to "
                            f"--model only (other sources bring their own architecture)")
    elif args.shortcut is not None:
        check_cifar_only("--shortcut", _model_names(args))
    if args.norm_act is not None and (args.file is not None or args.factory is not None):
        raise UserError("--norm-act applies to --model and --checkpoint only")
    if args.weights is not None and args.checkpoint is None:
        raise UserError("--weights applies to --checkpoint only")


def _check_output(args, flag: str, path: str, folder: bool = False) -> None:
    """Refuse, before anything is measured, an output that cannot be written (or would replace
    the --checkpoint/--file measured or the --factory's module), so that a sweep's results are
    not lost at the end."""
    if not path.strip():
        raise UserError(f"{flag}: empty path")
    from fasttrain.measure.sources import factory_file

    check_output(path, f"{flag} {path}", folder=folder,
                 inputs=(args.checkpoint, args.file, factory_file(args.factory)))


def _check_outputs(args) -> None:
    if args.plot == "" and not args.save:
        raise UserError("--plot needs a PNG path unless --save is given")
    if args.json is not None:
        _check_output(args, "--json", args.json)
    if args.csv is not None:
        _check_output(args, "--csv", args.csv)
    if args.plot:
        from fasttrain.measure.bench import PLOT_SUFFIXES

        if Path(args.plot).suffix.lower() not in PLOT_SUFFIXES:
            raise UserError(f"--plot {args.plot}: the file name must end in "
                            f"{', '.join(PLOT_SUFFIXES)}")
        _check_output(args, "--plot", args.plot)
    if args.save or args.plot == "":
        _check_output(args, "--results-dir", args.results_dir, folder=True)


def _check_saved_record(args, models, cond) -> None:
    """Before measuring: `--save`'s record must be readable (a sweep must not end in "move it
    away first" and lose its rows), and no two outputs may be the same file (`--json` onto the
    record would replace the saved rows with this run's)."""
    from fasttrain.measure import bench

    outputs = {"--json": args.json, "--csv": args.csv, "--plot": args.plot or None}
    if args.save or args.plot == "":
        stem = Path(args.results_dir) / bench.planned_results_stem(models, cond)
        if args.save:
            from fasttrain.measure.env import conditions

            saved = bench.read_record(stem.with_suffix(".json"))
            bench.check_record_machine(stem.with_suffix(".json"), saved,
                                       conditions(cond.device))
            outputs.update({"--save": stem.with_suffix(".json"),
                            "--save (csv)": stem.with_suffix(".csv")})
        if args.plot == "":
            outputs["--plot"] = stem.with_suffix(".png")
    seen: dict[Path, str] = {}
    for flag, path in outputs.items():
        if path is None:
            continue
        key = Path(path).resolve()
        if key in seen:
            raise UserError(f"{flag} {path}: the same file as {seen[key]}'s output")
        seen[key] = flag


def _load_models(args):
    """The BenchModels of the chosen source; never an empty list."""
    from fasttrain.measure import sources

    if args.model is not None:
        return [bm for name in _model_names(args)
                for bm in sources.from_registry(name, args.width or [1.0],
                                                channel_divisor=args.channel_divisor,
                                                num_classes=args.num_classes,
                                                norm_act=args.norm_act or "native",
                                                shortcut=args.shortcut or "A")]
    if args.checkpoint is not None:
        return [sources.from_checkpoint(args.checkpoint, norm_act=args.norm_act,
                                        weights=args.weights or "model")]
    if args.file is not None:
        return [sources.from_file(args.file)]
    return [sources.from_factory(args.factory)]


def _table(rows, train: bool):
    from rich.table import Table

    from fasttrain.measure.bench import distinct

    # rows of one call may differ in mode (a TorchScript file among eager rows, `row_mode`)
    t = Table(title=printable(f"{'training throughput' if train else 'inference latency'}: "
                              f"{rows[0]['device_name']}, {distinct(rows, 'precision')}, "
                              f"{distinct(rows, 'layout')}, {distinct(rows, 'mode')}, torch "
                              f"{rows[0]['torch_version']}, commit {rows[0]['commit']}"))
    cols = ["model", "width", "batch", "res", "params (M)", "MACs (G)"]
    cols += (["step ms mean", "step ms p50", "img/s", "peak MiB"] if train else
             ["p50 ms", "p90 ms", "p99 ms", "mean ± std ms", "img/s"])
    for c in cols:
        t.add_column(printable(c), justify="left" if c == "model" else "right")

    def f(v, spec):
        return "-" if v is None else format(v, spec)

    def add_row(*cells):  # as stdout can print them: ± is +/- on an ASCII stream
        t.add_row(*map(printable, cells))

    for r in rows:
        head = [r["model"], f(r["width"], "g"), str(r["batch_size"]), str(r["resolution"]),
                # significant digits, not decimals: a CIFAR net's 0.0173 M params is not 0.000
                f(r["params"] / 1e6, ".3g"), f(r["macs"] and r["macs"] / 1e9, ".3g")]
        if r["status"] != "ok":
            add_row(*head, r["status"].upper(), *[""] * (len(cols) - len(head) - 1))
        elif train:
            add_row(*head, f(r["step_ms_mean"], ".2f"), f(r["step_ms_p50"], ".2f"),
                    f(r["images_per_s"], ".1f"), f(r["peak_mem_mib"], ".0f"))
        else:
            add_row(*head, f(r["latency_ms_p50"], ".2f"), f(r["latency_ms_p90"], ".2f"),
                    f(r["latency_ms_p99"], ".2f"),
                    f"{r['latency_ms_mean']:.2f} ± {r['latency_ms_std']:.2f}",
                    f(r["images_per_s"], ".1f"))
    return t


def _progress(console, r) -> None:
    # A pruned model is described by its channel spec and has no width.
    width = "" if r["width"] is None else f" w{r['width']}"
    text = f"{r['model']}{width} batch {r['batch_size']}: {r['status']}"
    if r["status"] != "ok":
        text += f" ({r['error']})"
    console.print(text, style="dim", highlight=False, markup=False)


def _write_outputs(rows, args, console) -> list[str]:
    """Write every requested output; one that fails does not stop the others. Returns the
    failures, one line each."""
    from fasttrain.measure import bench

    def plot():
        if args.plot:
            return [bench.plot_vs_macs(rows, args.plot)]
        # next to --save's record: the plot of the record (this run's rows and the earlier
        # ones), as the record's CSV twin is
        stem = Path(args.results_dir) / bench.results_stem(rows)
        shown = bench.read_record(stem.with_suffix(".json")) if args.save else rows
        return [bench.plot_vs_macs(shown, stem.with_suffix(".png"))]

    outputs = []
    if args.json is not None:
        outputs.append(("--json", lambda: [bench.write_json(rows, args.json)]))
    if args.csv is not None:
        outputs.append(("--csv", lambda: [bench.write_csv(rows, args.csv)]))
    if args.save:
        outputs.append(("--save", lambda: bench.append_results(rows, args.results_dir)))
    if args.plot is not None:
        outputs.append(("--plot", plot))
    failures = []
    for flag, write in outputs:
        try:
            for path in write():
                console.print(f"wrote {path}", highlight=False)
        except UserError as e:
            failures.append(f"{flag}: {e}")
    return failures


@stdout_may_close
def main(argv: list[str] | None = None) -> int:
    import torch

    threads = torch.get_num_threads()
    try:
        return _main(argv)
    finally:  # --threads is this measurement's: a notebook's later work runs as before
        torch.set_num_threads(threads)


def _main(argv: list[str] | None) -> int:
    printable_paths()
    args = build_parser().parse_args(argv)
    rows: list[dict] = []  # filled as rows are measured, so that an interrupt keeps them
    try:
        for flag, path in (("--json", args.json), ("--csv", args.csv), ("--plot", args.plot)):
            not_stdout(path, f"{flag} {path}")
        _check_sources(args)
        # The output checks create the outputs' folders: a user error found before measuring
        # (a bad model name, an unreadable checkpoint) leaves none of them behind.
        setup = contextlib.ExitStack()
        for path, folder in ((args.json, False), (args.csv, False), (args.plot or None, False),
                             (args.results_dir if args.save or args.plot == "" else None,
                              True)):
            if path:
                setup.enter_context(new_folders_removed_on_error(path, folder=folder))
        with setup:
            models, cond = _prepare(args)
        from rich.console import Console

        from fasttrain.measure import bench

        console = Console()
        if not console.is_terminal:  # pipes and CI get 80 columns by default: too narrow
            console = Console(width=150)

        def on_row(row):
            rows.append(row)
            _progress(console, row)

        bench.run(models, cond, args.batch_size, on_row=on_row)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        # The rows measured so far are kept: written like a finished run's, then one line.
        return _finish(rows, args, console if rows else None, interrupted=True)
    return _finish(rows, args, console, interrupted=False)


def _prepare(args):
    """Everything checked before measuring: the outputs, the conditions, the models (built),
    the saved record. Returns (models, conditions)."""
    import torch

    from fasttrain.measure import bench

    _check_outputs(args)
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
    if any(bm.norm_act == "fused" for bm in models):
        from fasttrain.ops import _ext

        dev = torch.device(device)
        if not _ext.supports(dev):  # the rows would say fused and time the fallback
            which = "--norm-act fused" if args.norm_act else "a model with norm_act fused"
            instead = ("have the factory build norm_act='native' layers" if args.factory
                       else "measure with --norm-act native")
            if args.factory:
                which = (f"--factory {args.factory} (its module holds fused "
                         f"BatchNorm+ReLU layers)")
            raise UserError(f"{which}: the fused kernels are unavailable on {device} "
                            f"({_ext.unavailable_reason(dev)}); build them (pip install -e .) "
                            f"or {instead}")
    if args.plot and all(bm.count_model is None for bm in models):
        # the plot's x axis: it failed only once every row was measured
        raise UserError(f"--plot {args.plot}: no model here has a MAC count to plot against "
                        f"({', '.join(bm.name for bm in models)}: a file without fasttrain "
                        f"metadata); leave --plot out")
    _check_saved_record(args, models, cond)
    return models, cond


def _finish(rows, args, console, interrupted: bool) -> int:
    """Show the table and write the outputs with Ctrl-C and SIGTERM held until they are
    written: an interrupt arriving then (a second Ctrl-C, a time limit as a finished sweep
    writes) is one line after the files, not a traceback instead of them."""
    held: list[int] = []
    previous = {s: signal.signal(s, lambda signum, frame: held.append(signum))
                for s in (signal.SIGINT, signal.SIGTERM)
                if threading.current_thread() is threading.main_thread()}  # none elsewhere
    failures: list[str] = []
    try:
        if rows:
            print_table(console, _table(rows, args.train))  # first: the numbers are shown
            failures = _write_outputs(rows, args, console)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    interrupted = interrupted or bool(held)
    if failures:
        print(f"error: {'; '.join(failures)}", file=sys.stderr)
    if interrupted:
        print(f"error: interrupted; {len(rows)} row{'' if len(rows) == 1 else 's'} measured "
              f"{'and written' if rows else ''}".rstrip(), file=sys.stderr)
        return 130
    failed = [r for r in rows if r["status"] == "error"]
    if failed:
        print(f"error: {len(failed)} of {len(rows)} rows failed (status \"error\"; first: "
              f"{failed[0]['model']} batch {failed[0]['batch_size']}: {failed[0]['error']})",
              file=sys.stderr)
    return 2 if failures else 1 if failed else 0


if __name__ == "__main__":
    sigterm_as_interrupt()  # a time limit keeps the rows measured so far
    sys.exit(main())
