"""What the benchmark scripts share beyond fasttrain.cli: the --device type, the one-line user
error, and the result file's check before measuring and its write after.

A benchmark runs for minutes, so everything a user can get wrong is refused before the first
measurement (and before any data set is generated), as one line and exit status 2."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Iterable, NoReturn, Sequence


def fail(message: str) -> NoReturn:
    """A user error found after parsing: one line on stderr, exit status 2 (as a usage error)."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def device(text: str):
    """argparse type: `cpu` or `cuda[:N]` naming a device this machine has, as a torch.device.
    The benchmarks time with CUDA events or the CPU clock, so no other device type can run."""
    import torch  # here: the scripts that do not take --device parse without importing torch

    try:
        dev = torch.device(text)
    except RuntimeError:
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"expected cpu or cuda[:N], got {text!r}")
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if not count:
            raise argparse.ArgumentTypeError(f"{text}: no CUDA device")
        if dev.index is not None and dev.index >= count:
            raise argparse.ArgumentTypeError(f"{text}: this machine has {count} CUDA device"
                                             f"{'s' * (count > 1)} (cuda:0-{count - 1})")
    return dev


def items(option: str, text: str, known: Iterable[str] | None = None) -> list[str]:
    """The items of a comma-separated list option, in order; an empty, repeated or (with
    `known`) unknown item is refused as one line naming the option (exit 2)."""
    names = text.split(",")
    if "" in names:
        fail(f"{option} {text!r}: an empty item (items are separated by single commas)")
    from fasttrain.cli import first_repeat

    repeated = first_repeat(names)
    if repeated is not None:  # the same rows measured twice, under one name
        fail(f"{option} {text!r}: {repeated!r} is given twice")
    if known is not None:
        unknown = [n for n in names if n not in known]
        if unknown:
            fail(f"{option}: unknown backend {unknown[0]!r} (known: {', '.join(sorted(known))})")
    return names


def subset_suffix(chosen: Sequence, default: Sequence) -> str:
    """The default result file's name suffix for a run of other rows than the default ones: ''
    for the default set (in any order), else "-" and the chosen items joined by "+". So a run of
    a few backends or widths never replaces the result file of the full run, which the README's
    tables come from."""
    if sorted(map(str, chosen)) == sorted(map(str, default)):
        return ""
    return "-" + "+".join(map(str, chosen))


def settings_suffix(args: argparse.Namespace, parser: argparse.ArgumentParser,
                    names: Sequence[str]) -> str:
    """The default result file's name suffix for a run whose sizes (`names`: argparse dests
    such as "images", "rounds") differ from the defaults: "-images50-rounds1"; '' with the
    defaults. So a smoke run never replaces the full run's file (a `--images 50 --rounds 1`
    run replaced the committed 20,000-image result the README's tables come from)."""
    return "".join(f"-{name.replace('_', '-')}{getattr(args, name)}" for name in names
                   if getattr(args, name) != parser.get_default(name))


def partial_out(path: Path) -> Path:
    """Where an interrupted run's rows go: `path` unless it holds a complete result (one
    without `"interrupted": true`), then `<stem>-interrupted.json` beside it, so a cut run
    keeps what it measured without replacing a whole one (a Ctrl-C after 5 s replaced a
    committed 96-row file with 0 rows)."""
    try:
        earlier = json.loads(path.read_text())
    except (OSError, ValueError):
        return path
    if isinstance(earlier, dict) and earlier.get("interrupted") is True:
        return path
    return path.with_name(f"{path.stem}-interrupted{path.suffix}")


def whole_rounds_kept(done: int, total: int, unit: str = "round") -> None:
    """After a Ctrl-C or SIGTERM (sigterm_as_interrupt) cut a run of `total` rounds with `done`
    complete: say so in one line on stderr and return, so the caller writes the complete rounds
    (to partial_out's file, marked `"interrupted": true`); with none complete, say that nothing
    is written and exit 130 (a partial round would compare backends measured at different
    moments of a drifting machine, so it is dropped, not reported)."""
    if not done:
        print(f"interrupted in the first {unit}: nothing written (an earlier result file is "
              f"kept)", file=sys.stderr)
        raise SystemExit(130)
    print(f"interrupted: writing the {done} complete {unit}{'s' * (done > 1)} of {total}",
          file=sys.stderr)


def check_out(out: Path | None, default: Path) -> Path:
    """The result file (`out`, or `default` when --out is not given), checked before measuring
    (fasttrain.cli.check_output: not a folder, its folder created, a file can be created
    there); refused as one line (exit 2)."""
    from fasttrain.cli import check_output
    from fasttrain.errors import UserError

    path = out if out is not None else default
    try:
        return check_output(path, f"--out {path}" if out is not None
                            else f"{path} (the default --out)")
    except UserError as e:
        fail(str(e))


def write_json(path: Path, result: dict) -> None:
    """Write `result` to `path` through a temporary file and a rename, so that a failed write
    leaves a previous result whole. If the write fails all the same (disk full, folder removed
    meanwhile), the JSON goes to stdout before the one-line error, so the measurement survives."""
    text = json.dumps(result, indent=2) + "\n"
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(text)
        os.replace(tmp, path)
    except OSError as e:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        sys.stdout.write(text)
        sys.stdout.flush()
        fail(f"{path}: cannot write the result ({e.strerror or e}); its JSON is printed above")
