#!/usr/bin/env python
"""Check an image data set before a long run.

    python tools/check_data.py DIR [--workers N]

Decodes every image under DIR (ImageNet layout DIR/{train,val}/CLASS/*, or DIR/CLASS/*; a
CIFAR-10 folder is read as training reads its batch files) in parallel with a progress bar
(on stderr, when it is a terminal), then prints the class counts per split and every problem
found: undecodable, empty or truncated files, empty class folders.
Files without an image extension are listed as ignored (the loaders never read them); JPEGs that
libjpeg decodes past damage with a warning are listed as warnings, not problems (the loaders
read them, damaged pixels and all). Exit
status: 0 clean, 1 problems found, 2 bad arguments, 141 clean but stdout closed before the
report was printed (`| head`).
"""
from __future__ import annotations

import sys
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn
from rich.table import Table

from fasttrain.data.check import scan
from fasttrain.cli import (ArgumentParser, print_table, printable_paths, stdout_may_close,
                           user_path)
from fasttrain.errors import UserError, one_line



@stdout_may_close
def main(argv: list[str] | None = None) -> int:
    printable_paths()
    p = ArgumentParser(description="Scan an image data set for unreadable files and class "
                                   "counts.")
    p.add_argument("root", type=lambda text: Path(user_path(text)), help="data set directory")
    p.add_argument("--workers", type=int, default=0, help="decoding processes (0 = all cores)")
    args = p.parse_args(argv)
    console = Console(highlight=False, soft_wrap=True)
    # The bar on stderr, as evaluate's: `check_data.py DIR > report.txt` shows it while the
    # report goes to the file.
    progress = Console(stderr=True)
    try:
        with Progress("scanning", BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                      console=progress, transient=True,
                      disable=not progress.is_terminal) as bar:
            task = bar.add_task("scan", total=None)
            report = scan(args.root, args.workers,
                          lambda done, total: bar.update(task, completed=done, total=total))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted; nothing was checked to the end", file=sys.stderr)
        return 130
    # Folder names are data, not rich markup: "[red]b" is a class name.
    table = Table(title=escape(f"{report.root}: {report.images} image files"))
    table.add_column("split")
    table.add_column("classes", justify="right")
    table.add_column("images", justify="right")
    table.add_column("smallest class", justify="right")
    table.add_column("largest class", justify="right")
    for split, counts in report.class_counts.items():
        values = list(counts.values()) or [0]
        table.add_row(escape(split), str(len(counts)), str(sum(values)),
                      escape(f"{min(values)} ({min(counts, key=counts.get) if counts else '-'})"),
                      escape(f"{max(values)} ({max(counts, key=counts.get) if counts else '-'})"))
    print_table(console, table)  # in a pipe or a log: one line per split, whatever COLUMNS says
    for path in report.ignored:
        console.print(f"ignored (not an image extension): {one_line(path)}", markup=False)
    for path, warning in report.warnings:
        console.print(f"warning: {one_line(path)}: libjpeg warns while decoding it ({warning}); "
                      f"its pixels may be damaged", markup=False)
    for path, problem in report.problems:
        console.print(f"problem: {one_line(path)}: {one_line(problem)}", markup=False)
    console.print(f"{len(report.problems)} problem(s), {len(report.warnings)} warning(s), "
                  f"{len(report.ignored)} ignored file(s)")
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
