#!/usr/bin/env python
"""Write a data set as FFCV files for `data.backend=ffcv`.

    python tools/write_ffcv.py RECIPE [--section.key=value ...] [options]
    python tools/write_ffcv.py --dataset=imagefolder --path=/data/imagenet [--out=DIR] [options]

Reads the data set a recipe names (data.dataset, data.path, data.ffcv_dir) or the one given by
--dataset/--path, and writes OUT/train.beton and OUT/val.beton (OUT = --out, else data.ffcv_dir,
else <dataset root>/ffcv: where the loader looks), each with a JSON sidecar recording how it was
written. ffcv-imagenet's ImageNet setting is the default: --write-mode=proportion
--max-resolution=512 --compress-probability=0.5 --jpeg-quality=90. Each file is written under a
temporary name and renamed when complete, so an interrupted write leaves nothing the loader
would read (nor the output folder, when it made it). FFCV's progress bar is drawn only when
stderr is a terminal. Unreadable images are skipped and listed. Exit status: 0 written, 2 bad
arguments or data (one line on stderr), 141 written but stdout closed before the summary
(`| head -1`).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

from fasttrain.cli import (ArgumentParser, new_folders_removed_on_error, nonempty,
                           printable_paths, sigterm_as_interrupt, stdout_may_close, user_path)
from fasttrain.config import load
from fasttrain.errors import UserError, one_line


def build_parser() -> ArgumentParser:
    p = ArgumentParser(description="Write train.beton and val.beton (FFCV) for a data set.",
                       epilog="Any --section.key=value overrides a recipe value, e.g. "
                              "--data.path=/data/imagenet")
    p.add_argument("recipe", nargs="?", type=user_path,
                   help="recipe YAML file (reads data.dataset, data.path, data.ffcv_dir)")
    p.add_argument("--dataset", help="digits | imagefolder | cifar10 (same as --data.dataset)")
    p.add_argument("--path", help="dataset root (same as --data.path)")
    p.add_argument("--out", type=nonempty,
                   help="output folder (default: data.ffcv_dir, else <dataset root>/ffcv)")
    p.add_argument("--write-mode", default="proportion",
                   help="proportion (JPEG with --compress-probability, else raw pixels), jpg, "
                        "raw, or smart (JPEG when the raw pixels exceed --smart-threshold "
                        "bytes) (default: %(default)s)")
    p.add_argument("--max-resolution", type=int, default=512,
                   help="shrink images whose longest side is larger; 0 = keep sizes "
                        "(default: %(default)s)")
    p.add_argument("--jpeg-quality", type=int, default=90, help="1..100 (default: %(default)s)")
    p.add_argument("--compress-probability", type=float, default=0.5,
                   help="proportion mode: fraction stored as JPEG (default: %(default)s)")
    p.add_argument("--smart-threshold", type=int, default=256 * 256 * 3,
                   help="smart mode: bytes of raw pixels above which JPEG is used "
                        "(default: %(default)s)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace files written with other settings (refused without it)")
    p.add_argument("--num-workers", type=int, default=0,
                   help="writer processes; 0 = one per core (default: %(default)s)")
    return p


@stdout_may_close
def main(argv: list[str] | None = None) -> int:
    printable_paths()
    args, overrides = build_parser().parse_known_args(argv)
    if args.recipe is None and args.dataset is None:
        print("error: give a recipe or --dataset (digits | imagefolder | cifar10)",
              file=sys.stderr)
        return 2
    for key in ("dataset", "path"):
        given = getattr(args, key)
        if given is not None and any(o.partition("=")[0] == f"--data.{key}" for o in overrides):
            # appended last, the option silently won over the override
            print(f"error: --{key} and --data.{key} both given; keep one", file=sys.stderr)
            return 2
        if given is not None:
            overrides.append(f"--data.{key}={given}")
    if not sys.stderr.isatty():
        # FFCV's writer always draws a tqdm bar: in a log, frames joined by \r, one line as
        # long as the write (ImageNet: hours). tqdm reads TQDM_* when it is first imported,
        # which is below (torch imports it).
        os.environ.setdefault("TQDM_DISABLE", "1")
    try:
        cfg = load(args.recipe, overrides)
        from fasttrain.data.ffcv_loader import beton_dir, write_beton  # imports torch

        out = Path(args.out).expanduser() if args.out is not None else beton_dir(cfg.data)
        with new_folders_removed_on_error(out, folder=True):  # Ctrl-C leaves no empty folder
            results = write_beton(cfg.data, out, write_mode=args.write_mode,
                                  max_resolution=args.max_resolution,
                                  jpeg_quality=args.jpeg_quality,
                                  compress_probability=args.compress_probability,
                                  smart_threshold=args.smart_threshold,
                                  num_workers=args.num_workers, overwrite=args.overwrite)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted; no file was replaced (earlier files are kept)",
              file=sys.stderr)
        return 130
    for r in results:
        size = r.path.stat().st_size / 2**20
        print(f"wrote {r.path}: {r.images - len(r.skipped)} images, {size:.1f} MiB, "
              f"{r.seconds:.1f} s" + (f", {len(r.skipped)} unreadable (skipped)"
                                      if r.skipped else ""))
        for path, reason in r.skipped:
            print(f"skipped unreadable file {one_line(path)}: {one_line(reason)}")
    out = results[0].path.parent
    hint = "" if out == beton_dir(cfg.data) else f" --data.ffcv_dir={out}"
    print(f"train with: --data.backend=ffcv{hint}")
    return 0


if __name__ == "__main__":
    sigterm_as_interrupt()  # a time limit or preemption removes the partial files as Ctrl-C does
    sys.exit(main())
