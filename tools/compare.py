#!/usr/bin/env python
"""Put ThinResNets next to structured pruning: published results, thin and pruned runs, latency.

    python tools/compare.py [--benchmark resnet50-imagenet|resnet56-cifar10] \
        [--runs RUN_DIR ...] [--points POINTS.csv ...] [--latency RESULTS.json ...] \
        [--batch-size N] [--out DIR] [--name NAME] [--tolerance 0.05]

Inputs (fasttrain.compare): a benchmark's published pruning results (package data); fasttrain
run directories (last complete epoch's validation top-1; params and conv+fc MACs of the model their
config.yaml describes, at the validation resolution; a run fine-tuned from a tools/prune.py
checkpoint is a "pruned" point whose baseline is the network it was pruned from); CSV files of
points trained elsewhere (columns label, top1, macs [, kind, params, base_top1, base_macs,
model, width, resolution, note]; plotted as "user-provided"); and tools/benchmark.py result
files, whose p50 latency is attached to the points of the same architecture (params, MACs,
resolution).

Outputs under --out (default benchmarks/results/compare): top-1 vs MACs (log x), vs params, vs
measured latency (when any), and Δ top-1 vs MAC reduction relative to each point's own baseline,
each as PNG and SVG; a markdown and a CSV table giving every point, the thin Pareto curve's top-1
at its MACs (interpolated in log MACs) and the margin thin - point; the table in the terminal.

User errors (unknown benchmark, missing run directory, malformed CSV row, a --name that is not a
plain file-name stem, an --out that cannot be written, checked first) exit 2 with one line on stderr naming the file, line and column.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fasttrain.cli import (ArgumentParser, check_output, finite_float, int_at_least,
                           new_folders_removed_on_error, nonempty_value, print_table,
                           printable, printable_paths, stdout_may_close, user_path)
from fasttrain.errors import UserError

ROOT = Path(__file__).resolve().parents[1]


_positive_int = int_at_least(1)
_fraction = finite_float(lambda v: 0 <= v < 1, "a fraction in [0, 1)")


def _name(text: str) -> str:
    from fasttrain.compare.literature import CompareError
    from fasttrain.compare.report import check_name

    try:
        return check_name(text)
    except CompareError as e:  # argparse: refused before any point is gathered or counted
        raise argparse.ArgumentTypeError(str(e)) from None


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description="Compare ThinResNets with structured pruning at equal MACs: "
                                   "plots (PNG+SVG) and a margin table.")
    p.add_argument("--benchmark", metavar="NAME", type=nonempty_value,
                   help="add the published results of resnet50-imagenet or resnet56-cifar10")
    p.add_argument("--runs", nargs="+", action="extend", default=[], metavar="RUN_DIR",
                   type=user_path,
                   help="fasttrain run directories (thin, or fine-tuned from tools/prune.py); "
                        "may be repeated")
    p.add_argument("--points", nargs="+", action="extend", default=[], metavar="CSV",
                   type=user_path,
                   help="CSV files of points trained elsewhere (plotted as user-provided); may "
                        "be repeated")
    p.add_argument("--latency", nargs="+", action="extend", default=[], metavar="RESULTS",
                   type=user_path,
                   help="tools/benchmark.py result files (.json or .csv); may be repeated")
    p.add_argument("--batch-size", type=_positive_int, default=None,
                   help="latency at this batch size (default: the smallest in the files)")
    p.add_argument("--out", type=user_path,
                   default=str(ROOT / "benchmarks" / "results" / "compare"),
                   metavar="DIR", help="where the plots and tables go")
    p.add_argument("--name", type=_name, default=None,
                   help="file name prefix, without a folder (default: the benchmark, or "
                        "'compare')")
    p.add_argument("--tolerance", type=_fraction, default=0.05,
                   help="a point up to this fraction outside the thin curve's MAC range takes "
                        "the curve's end value (default 0.05)")
    return p


def _terminal_table(c):
    from rich.table import Table
    from rich.text import Text

    from fasttrain.compare.report import display_rows, title

    heading = title(c)
    header, cells = display_rows(c)
    # as stdout can print them: − is - and Δ delta on an ASCII stream
    t = Table(title=Text(printable(f"{heading}: thin − point > 0 means the thin network is more "
                                   f"accurate at equal MACs")))
    for i, h in enumerate(header):
        t.add_column(printable(h), justify="left" if i < 3 else "right")
    for row in cells:  # labels are data, not markup: "[run-name]" tells duplicates apart
        t.add_row(*(Text(printable(cell)) for cell in row))
    return t


@stdout_may_close
def main(argv: list[str] | None = None) -> int:
    printable_paths()
    args = build_parser().parse_args(argv)
    try:
        with new_folders_removed_on_error(args.out, folder=True):
            # Before the points are gathered: counting runs' MACs and reading files takes a
            # while.
            check_output(args.out, f"--out {args.out}", folder=True)
            from fasttrain.compare import report
            from fasttrain.compare.literature import get_benchmark

            if args.benchmark:  # its name names the files: an unknown one is that error
                get_benchmark(args.benchmark)
            name = args.name or args.benchmark or "compare"
            # Each file too: one that is a symbolic link (replaced by a plain file, the link's
            # target untouched), a folder, or an input of this comparison.
            for path in report.output_files(args.out, name):
                check_output(path, f"--out {args.out}: {path.name}",
                             inputs=args.points + args.latency)

            c = report.build_comparison(args.benchmark, runs=args.runs, points_csv=args.points,
                                        latency=args.latency, batch_size=args.batch_size,
                                        tolerance=args.tolerance)
            written = report.write_outputs(c, args.out, args.name)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from rich.console import Console

    table = _terminal_table(c)
    console = Console()  # lines unwrapped (soft_wrap); print_table sizes the table itself
    for w in c.warnings:
        console.print(printable(f"warning: {w}"), style="yellow", highlight=False, markup=False,
                      soft_wrap=True)
    print_table(console, table)
    if c.latency:
        console.print(printable(f"latency: {c.latency.describe()}"), highlight=False,
                      markup=False, soft_wrap=True)
    for path in written:
        console.print(f"wrote {path}", highlight=False, markup=False, soft_wrap=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
