#!/usr/bin/env python
"""Top-1/top-5 of a checkpoint, an exported file or any network on a validation split, measured
as training measures `val_top1` (same preprocessing, precision, layout and averaging).

    python tools/evaluate.py --checkpoint runs/.../checkpoints/best.pt [--weights model|ema] \
        [RECIPE] [--section.key=value ...] [--json OUT.json] [--points POINTS.csv [--label L]]
    python tools/evaluate.py --file model.pt RECIPE ...          (TorchScript or torch.export)
    python tools/evaluate.py --factory mypkg.pruned:build RECIPE ...

The data and evaluation settings are the recipe's or, for a checkpoint without a recipe, those
the checkpoint was trained with; `--section.key=value` overrides any of them, e.g.
`--data.path=/data/imagenet`, `--data.val_res=256 --data.val_resize=292` (another test
resolution), `--aug.test_flip=true`, `--train.precision=fp32`, `--train.device=cpu`,
`--data.val_batch_size=500`, `--data.num_workers=8`. Keys that do not concern evaluation are
accepted and ignored. A checkpoint's images are labelled in its own class order.

Outputs: the result on stdout (with the checkpoint's recorded top-1 when the settings are those
it was recorded with); `--json` writes the record (settings, counts, conditions); `--points`
adds a row to a points CSV that `tools/compare.py --points` reads (created with a header when
missing; labels must stay unique). Outputs are checked before anything is evaluated.

Exit status: 0 evaluated; 2 a user error (bad option, recipe, data, checkpoint or output), one
line on stderr; 130 interrupted (Ctrl-C or SIGTERM); 141 instead of 0 when stdout was closed early
(`| head -1`), the outputs written all the same.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import json
import math
import os
import sys
from pathlib import Path
from typing import Any

from fasttrain.cli import (ArgumentParser, check_output, not_stdout, printable_paths,
                           same_file, sigterm_as_interrupt, stdout_may_close, user_path)
from fasttrain.errors import UserError

# compare's points CSV columns (fasttrain.compare.points.USER_COLUMNS), in a readable order
POINT_COLUMNS = ("label", "top1", "macs", "params", "kind", "model", "width", "resolution",
                 "base_top1", "base_macs", "note")


def _label(text: str) -> str:
    """argparse type: a --points row label, not empty (an unset shell variable)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("empty label")
    return text


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description="Evaluate a checkpoint, an exported file or any network on "
                                   "a validation split, as training measures val_top1.",
                       epilog="Any --section.key=value overrides a data or evaluation setting, "
                              "e.g. --data.val_res=256 --data.val_resize=292")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", metavar="PATH", type=user_path,
                     help="a fasttrain checkpoint (best.pt, last.pt, or tools/prune.py's output)")
    src.add_argument("--file", metavar="PATH", type=user_path,
                     help="an exported TorchScript (.pt) or torch.export (.pt2) file")
    src.add_argument("--factory", metavar="MODULE:FUNCTION",
                     help="a function returning the network (an nn.Module with its weights), "
                          "imported from the current directory or the installed packages")
    p.add_argument("recipe", nargs="?", type=user_path,
                   help="recipe whose data and evaluation settings to use (required for --file "
                        "and --factory; a checkpoint's own settings otherwise)")
    p.add_argument("--weights", choices=("model", "ema"), default="model",
                   help="a checkpoint's trained weights (val_top1) or their EMA (val_top1_ema)")
    p.add_argument("--json", metavar="OUT.json", type=user_path, help="write the result record")
    p.add_argument("--points", metavar="POINTS.csv", type=user_path,
                   help="add the result as a row of a tools/compare.py --points CSV")
    p.add_argument("--label", type=_label,
                   help="the --points row's label (default: the run folder, file or factory)")
    p.add_argument("--kind", choices=("thin", "pruned", "other"),
                   help="the --points row's kind (default: thin for a ThinResNet, pruned for a "
                        "network with explicit channels, other otherwise)")
    return p


@stdout_may_close
def main(argv: list[str] | None = None) -> int:
    printable_paths()
    parser = build_parser()
    args, overrides = parser.parse_known_args(argv)
    unknown = [o for o in overrides if not o.startswith("--") or "." not in o.split("=")[0]]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    spaced = [o for o in overrides if "=" not in o]
    if spaced:  # `--train.threads 1`: the 1 would be taken for the recipe
        parser.error(f"override {spaced[0]!r}: expected --section.key=value")
    if args.json and args.points and same_file(args.json, args.points):
        parser.error("--json and --points name the same file")
    if args.weights == "ema" and not args.checkpoint:
        parser.error("--weights ema: only a checkpoint holds EMA weights")
    if (args.label or args.kind) and not args.points:
        parser.error(f"{'--label' if args.label else '--kind'} names the --points row: "
                     f"give --points")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        if int(os.environ.get("RANK", "0")) == 0:  # one line, not one per rank
            print("error: tools/evaluate.py runs in one process; start it with python, not "
                  "torchrun", file=sys.stderr)
        return 2
    try:
        not_stdout(args.json, f"--json {args.json}")
        not_stdout(args.points, f"--points {args.points}")
        state, cfg, classes = _settings(args, overrides)
        if args.json:
            check_output(args.json, f"--json {args.json}",
                         inputs=_inputs(args))
        label = _check_points(args, args.points) if args.points else None
        source = _source(args, state)
        if classes is None and args.file and source.classes:  # an export's label order
            classes = _checked_classes(source.classes, args.file)
        if args.points and source.count_model is None:
            raise UserError(f"--points {args.points}: the network's MACs cannot be counted (a "
                            f"TorchScript file without fasttrain metadata); the row needs them")
        from fasttrain.measure.accuracy import measure_accuracy

        _say_start(source, cfg, args.weights)
        if args.file:
            for line in _preprocessing_differences(source.meta, cfg, args.file):
                print(line, file=sys.stderr)
        try:
            record = _measure_with_progress(measure_accuracy, source, cfg, classes)
        except UserError as e:
            if "no CUDA device" in str(e) and not any(o.startswith("--train.device")
                                                      for o in overrides):
                raise UserError(f"{e} (--train.device=cpu evaluates on the CPU)") from None
            raise
        if state is not None:
            record["recorded"] = _recorded(state, args.weights, cfg)
        _show(record)
        _write(args, record, source, label)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted; nothing written", file=sys.stderr)
        return 130
    return 0


def _measure_with_progress(measure, source, cfg, classes):
    """`measure` with a progress bar on a terminal (gone when done; none in pipes and logs)."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    console = Console(stderr=True)
    with Progress("evaluating", BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  console=console, transient=True, disable=not console.is_terminal) as bar:
        task = bar.add_task("evaluate", total=None)
        return measure(source, cfg, classes,
                       progress=lambda done, total: bar.update(task, completed=done,
                                                               total=total))


def _settings(args, overrides: list[str]):
    """(checkpoint or None, Config, class order or None): the recipe's settings, or the
    checkpoint's stored ones, with the overrides."""
    from fasttrain.config import ConfigError, load, load_mapping

    state = None
    if args.checkpoint:
        from fasttrain.engine import checkpoint as ckpt

        state = ckpt.load(Path(args.checkpoint).expanduser())
    if args.recipe:
        return state, load(args.recipe, overrides), _classes(state, args)
    if state is None:
        raise UserError(f"{'--file' if args.file else '--factory'}: give the recipe the "
                        f"network was trained with (its data section: dataset, path, val_res, "
                        f"val_resize, mean, std)")
    stored = state.get("config")
    if not isinstance(stored, dict):
        raise ConfigError(f"{args.checkpoint}: no stored config; give a recipe")
    origin = f"{args.checkpoint} (stored config)"
    try:
        cfg = load_mapping(stored, origin, overrides)
    except ConfigError as e:
        if not str(e).startswith(origin):  # an override's error
            raise
        # e.g. a key an older or newer version had: the recipe the run used gives the settings
        raise ConfigError(f"{e}; give the run's recipe (its config.yaml) to evaluate with "
                          f"that instead") from None
    return state, cfg, _classes(state, args)


def _classes(state, args) -> list[str] | None:
    classes = state.get("classes") if state is not None else None
    return _checked_classes(classes, args.checkpoint) if classes is not None else None


def _checked_classes(classes, where: str) -> list[str] | None:
    if not (isinstance(classes, list) and all(isinstance(c, str) for c in classes)):
        raise UserError(f"{where}: malformed 'classes' entry")
    return classes or None


def _source(args, state):
    from fasttrain.measure import sources

    if args.checkpoint:
        return sources.from_checkpoint(Path(args.checkpoint).expanduser(),
                                       weights=args.weights, state=state)
    if args.file:
        return sources.from_file(Path(args.file).expanduser())
    return sources.from_factory(args.factory)


def _say_start(source, cfg, weights: str) -> None:
    d = cfg.data
    what = (source.source if source.source.startswith(source.name)  # a factory's spec
            else f"{source.name} ({source.source})")
    print(f"evaluating {what}{', EMA weights' if weights == 'ema' else ''} on {d.dataset} val "
          f"at {d.val_res}px (shorter side {d.val_resize}), {cfg.train.precision}"
          f"{', flip averaged' if cfg.aug.test_flip else ''}", flush=True)


def _preprocessing_differences(meta: dict, cfg, path: str) -> list[str]:
    """Warnings where the recipe preprocesses otherwise than the exported file's metadata says
    its network expects (input size, resize, mean, std): the recipe decides, and a wrong one
    gave a low top-1 without a word."""
    d = cfg.data
    size = (meta.get("input_size") or [None, None])[1]
    expected = {"data.val_res": size, "data.val_resize": meta.get("resize"),
                "data.mean": meta.get("mean"), "data.std": meta.get("std")}
    used = {"data.val_res": d.val_res, "data.val_resize": d.val_resize,
            "data.mean": list(d.mean), "data.std": list(d.std)}

    def differs(a, b) -> bool:
        if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
            return any(abs(float(x) - float(y)) > 1e-6 for x, y in zip(a, b))
        return a != b

    lines = [f"warning: {path} was exported for {key}={expected[key]}, this evaluation uses "
             f"{used[key]} (the recipe's): its top-1 may not be the network's"
             for key in expected
             if expected[key] is not None and differs(expected[key], used[key])]
    if isinstance(meta.get("test_flip"), bool) and meta["test_flip"] != cfg.aug.test_flip:
        lines.append(f"note: {path}'s training validated with aug.test_flip="
                     f"{str(meta['test_flip']).lower()}, this evaluation uses "
                     f"{str(cfg.aug.test_flip).lower()}: its top-1 is not comparable with the "
                     f"recorded one")
    return lines


# What decides a validation number (the batch size, workers and layout do not change it).
RECORDED_SETTINGS = (("data", ("dataset", "path", "val_res", "val_resize", "mean", "std")),
                     ("aug", ("test_flip",)), ("train", ("precision",)))


def _recorded(state, weights: str, cfg) -> dict | None:
    """The checkpoint's own top-1 and what sets this evaluation apart from the one that
    recorded it (`differences`; none: the same measurement)."""
    from fasttrain.data.datasets import dataset_root

    metrics = state.get("metrics") or {}
    key = "val_top1" if weights == "model" else "val_top1_ema"
    if not isinstance(metrics.get(key), (int, float)):
        return None
    stored = state.get("config") or {}
    now = cfg.to_dict()
    differences = [f"{section}.{k}" for section, keys in RECORDED_SETTINGS for k in keys
                   if (stored.get(section) or {}).get(k, now[section][k]) != now[section][k]
                   and (section, k) != ("data", "path")]
    # as resolved folders (here and now: a relative path or the default root read where the
    # training ran may have meant another folder)
    stored_data = dataclasses.replace(cfg.data, path=(stored.get("data") or {}).get("path", ""))
    if dataset_root(stored_data).resolve() != dataset_root(cfg.data).resolve():
        differences.insert(0, "data.path")
    if (stored.get("data") or {}).get("backend") == "ffcv":
        # its .beton files may hold re-encoded or shrunk images; these are the originals
        differences.append("ffcv's stored images")
    epoch_step, ts = metrics.get("epoch_step"), state.get("train_state") or {}
    if (epoch_step is None and ts.get("epoch_step")
            and metrics.get("epoch") == ts.get("epoch", 0) + 1):
        # a cut epoch's line from before metrics carried its step (the state did); a
        # checkpoint_every checkpoint holds the previous complete epoch's line instead
        epoch_step = ts["epoch_step"]
    return {"val_top1": metrics[key], "epoch": metrics.get("epoch"),
            "epoch_step": epoch_step, "differences": differences,
            "same_settings": not differences}


def _count(n: int) -> str:
    """A parameter or MAC count: 68,050; 25.557 M; 4,089.2 M."""
    if n < 1_000_000:
        return f"{n:,}"
    return f"{n / 1e6:,.3f} M" if n < 1e9 else f"{n / 1e6:,.1f} M"


def _show(record) -> None:
    n, present = record["images"], record["val_classes"]
    classes = (f"{present} classes" if present == record["classes"] else
               f"{present} of the model's {record['classes']} classes")
    print(f"top-1 {record['val_top1']:.2f} %  top-5 {record['val_top5']:.2f} %  loss "
          f"{record['val_loss']:.4f}  ({n:,} images of {classes}, "
          f"{record['seconds']:.1f} s, {record['images_per_s'] or 0:,.0f} img/s)")
    # exact counts below a million: a small network's "0.000 M params" said nothing
    macs = ("MACs not counted" if not record["macs"] else f"{_count(record['macs'])} MACs")
    print(f"{_count(record['params'])} params, {macs} at {record['val_res']}px; "
          f"data {record['data_root']}")
    if record["skipped"]:
        print(f"warning: {record['skipped']} unreadable file(s) skipped (first: "
              f"{record['first_skipped']}); tools/check_data.py lists them")
    for note in record["notes"]:
        print(f"warning: {note}")
    rec = record.get("recorded")
    if rec:
        when = f" after epoch {rec['epoch']}" if rec.get("epoch") is not None else ""
        if rec.get("epoch_step"):
            when = (f" after step {rec['epoch_step']} of epoch {rec['epoch']} (an epoch cut "
                    f"by train.max_steps)")
        if rec["same_settings"]:
            print(f"recorded in the checkpoint{when}: top-1 {rec['val_top1']:.2f} % "
                  f"(same settings)")
        else:
            print(f"recorded in the checkpoint{when}: top-1 {rec['val_top1']:.2f} %, measured "
                  f"differently ({', '.join(rec['differences'])})")


def _inputs(args) -> tuple:
    """The files this evaluation reads, which no output may replace (the factory's module
    too)."""
    from fasttrain.measure.sources import factory_file

    return args.checkpoint, args.file, args.recipe, factory_file(args.factory)


def _check_points(args, path: str) -> str:
    """The --points row's label, checked before anything runs: the file can be written, is a
    points CSV this tool can add to (a header of compare's columns), and has no row with that
    label."""
    check_output(path, f"--points {path}",
                 inputs=_inputs(args))
    # As compare reads it: stripped (" base" duplicated "base" there), one line (compare
    # refuses a cell spanning lines).
    label = (args.label or _default_label(args)).strip()
    if not label or "\n" in label or "\r" in label:
        raise UserError(f"--label {label!r}: a label is one non-empty line")
    header, labels = _read_points(Path(path))
    if header is not None:
        unknown = [c for c in header if c not in POINT_COLUMNS]
        if unknown or "label" not in header or "top1" not in header or "macs" not in header:
            raise UserError(f"--points {path}: not a points CSV (header {','.join(header)}; "
                            f"columns label, top1, macs required, known: "
                            f"{', '.join(POINT_COLUMNS)})")
        if label in labels:
            raise UserError(f"--points {path}: a row labelled {label!r} exists; give another "
                            f"--label")
    return label


def _read_points(path: Path) -> tuple[list[str] | None, set[str]]:
    if not path.exists() or path.stat().st_size == 0:
        return None, set()
    try:
        rows = list(csv.reader(io.StringIO(path.read_text(encoding="utf-8-sig"), newline="")))
    except (UnicodeDecodeError, csv.Error, OSError) as e:
        raise UserError(f"--points {path}: cannot read it as a UTF-8 CSV ({e})") from None
    if not rows:
        return None, set()
    # names as compare reads them: " top1" is no column there
    header = [c.removeprefix("\ufeff") for c in rows[0]]
    at = header.index("label") if "label" in header else None
    return header, {r[at].strip() for r in rows[1:] if at is not None and len(r) > at}


def _default_label(args) -> str:
    if args.checkpoint:
        path = Path(args.checkpoint).expanduser()
        run = path.parent.parent.name if path.parent.name == "checkpoints" else path.stem
        return run + (" (ema)" if args.weights == "ema" else "")
    if args.file:
        return Path(args.file).name
    return args.factory


def _point_row(args, record, source, label: str) -> dict:
    model_cfg = source.meta.get("model_config") or {}
    pruned = bool(model_cfg.get("channels")) or "(pruned)" in record["name"]
    kind = args.kind or ("pruned" if pruned else "thin" if record["width"] is not None
                         else "other")
    from fasttrain.compare.points import model_identity

    model = model_identity(model_cfg) or (record["name"].removesuffix(" (pruned)")
                                          if args.file else "")
    row = {"label": label, "top1": f"{record['val_top1']:.4f}", "macs": record["macs"] or "",
           "params": record["params"], "kind": kind, "model": model,
           "width": record["width"] if record["width"] is not None else "",
           "resolution": record["val_res"], "base_top1": "", "base_macs": "",
           "note": f"tools/evaluate.py {record['source']} ("
                   f"{'EMA weights, ' if record.get('weights') == 'ema' else ''}"
                   f"{record['precision']}{', flip' if record['test_flip'] else ''}, "
                   f"{record['commit']})"}
    lineage = source.meta.get("pruning")  # a checkpoint's or an exported file's
    if isinstance(lineage, dict) and kind == "pruned":
        from fasttrain.compare.points import base_macs_at

        base = lineage.get("source_val_top1")
        row["base_top1"] = f"{base:.4f}" if isinstance(base, (int, float)) else ""
        row["base_macs"] = base_macs_at(lineage, model_cfg, record["val_res"],
                                        record["macs"]) or ""
        if lineage.get("macs") not in (None, record["macs"]):
            row["note"] += "; base top-1 measured at the pruning's resolution, not this one"
    return row


def _finite(value):
    """`value` with every non-finite float (an overflowed loss) replaced by None."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def _write(args, record, source, label) -> None:
    from fasttrain.engine.checkpoint import folder_locked, write_atomic

    if args.json:
        # strict JSON: a diverged network's infinite loss is null
        text = json.dumps(_finite(record), indent=2, default=str, allow_nan=False) + "\n"
        try:
            write_atomic(Path(args.json), lambda f: f.write(text), mode="w")
        except OSError as e:
            raise UserError(f"--json {args.json}: cannot write ({e.strerror or e})") from None
        print(f"wrote {args.json}")
    if args.points:
        path = Path(args.points)
        # Evaluations run side by side (xargs -P over checkpoints) into one file: each reads it
        # and writes it back, so without the lock the last to finish dropped the others' rows.
        with folder_locked(path.parent):
            _add_point(args, path, _point_row(args, record, source, label))
        print(f"added {label!r} to {args.points}")


def _add_point(args, path: Path, row: dict[str, Any]) -> None:
    """Append `row` to the points CSV at `path` (made with a header if missing), atomically."""
    from fasttrain.engine.checkpoint import write_atomic

    header, labels = _read_points(path)
    if row["label"] in labels:  # checked before evaluating; another evaluation added it since
        raise UserError(f"--points {args.points}: a row labelled {row['label']!r} was added "
                        f"while this one ran; the file is as it was")
    if header is None:
        header, old = list(POINT_COLUMNS), ""
    else:
        # bytes as they are: a spreadsheet's byte-order mark and its CRLF line ends are kept
        # (a universal-newline read rewrote a Windows file as LF)
        old = path.read_bytes().decode("utf-8")
    ending = "\r\n" if "\r\n" in old else "\n"
    if old and not old.endswith("\n"):
        old += ending
    out = io.StringIO(newline="")
    writer = csv.writer(out, lineterminator=ending)
    missing = [c for c in POINT_COLUMNS if c not in header and row.get(c) not in (None, "")]
    if old and missing:
        # A file with fewer columns (label,top1,macs) lost the row's kind, params and
        # baseline: the header is extended, the rows padded with empty cells (read as absent).
        rows = list(csv.reader(io.StringIO(old, newline="")))
        header = header + missing
        writer.writerow(rows[0] + missing)
        for r in rows[1:]:
            writer.writerow(r + [""] * (len(header) - len(r)) if r else r)
        old = ""
    elif not old:
        writer.writerow(header)
    writer.writerow([row.get(c, "") for c in header])
    try:
        write_atomic(path, lambda f: f.write(old + out.getvalue()), mode="w")
    except OSError as e:
        raise UserError(f"--points {args.points}: cannot write ({e.strerror or e}); the "
                        f"file is as it was") from None


if __name__ == "__main__":
    sigterm_as_interrupt()
    sys.exit(main())
