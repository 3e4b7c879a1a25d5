#!/usr/bin/env python
"""Export a trained or registered model for inference, with BatchNorm folded, and check it.

    python tools/export.py (--checkpoint PATH | --model NAME [--width W]) \
        [--format torchscript|export|onnx] --out FILE [--resolution R] [--no-fold] \
        [--atol 1e-4] [--rtol 1e-4] [--parity-batch-sizes 1,3]

Pipeline (fasttrain.export): rebuild the model (a checkpoint's config and weights, or a registered
model with random weights), fold every BatchNorm into its convolution (BatchNorm+ReLU becomes
ReLU), write TorchScript (.pt; torch.jit.script, trace as fallback), a torch.export program (.pt2)
or ONNX (.onnx, opset 18, checked with onnxruntime), load the file back and compare it with the
eager, unfolded model on random inputs at two batch sizes. Metadata (model, width, classes, input
size, mean/std, training commit, export details) is stored in the file under "fasttrain.json".
The format defaults to the one --out's suffix names.

The file is written under a temporary name and renamed to --out only when the parity check
passes, so a failed export never replaces an earlier file; --out may not be the checkpoint.

Exit status: 0 when the parity check passes; 1 when the exported outputs differ beyond
`atol + rtol * max|eager output|` (one line on stderr; --out is left as it was and the failed
file is kept as <stem>.parity-failed<suffix> for inspection); 2 for user errors (one line on
stderr); 141 instead of 0 when stdout was closed early (`| head -1`), --out written all the same.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fasttrain.cli import (ArgumentParser, check_cifar_only, finite_float, int_at_least,
                          new_folders_removed_on_error, printable_paths, stdout_may_close,
                          user_path)
from fasttrain.config import MAX_CLASSES, MAX_RESOLUTION, MAX_WIDTH
from fasttrain.errors import UserError



def _batch_sizes(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected e.g. 1,3, got {text!r}") from None
    if len(set(values)) != 2 or len(values) != 2 or min(values) < 1 or max(values) > 4096:
        raise argparse.ArgumentTypeError(f"expected two different batch sizes in 1..4096, "
                                         f"got {text!r}")
    return values


_positive_int = int_at_least(1)
_tolerance = finite_float(lambda v: v >= 0, "a finite number >= 0")


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description="Fold BatchNorm and export a model to TorchScript, "
                                   "torch.export or ONNX; exits 0 only when the export matches "
                                   "the eager model.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", metavar="PATH", type=user_path,
                     help="a fasttrain checkpoint")
    src.add_argument("--model", metavar="NAME", help="a registered model (random weights)")
    p.add_argument("--width", type=float, default=None, help="--model: width multiplier (1.0)")
    p.add_argument("--channel-divisor", type=int_at_least(1, 512), default=1,
                   help="--model: channel divisor")
    p.add_argument("--num-classes", type=int_at_least(1, MAX_CLASSES), default=None,
                   help="--model: classifier outputs (default 1000, CIFAR models 10)")
    p.add_argument("--shortcut", choices=["A", "B"], default=None,
                   help="--model, CIFAR ResNets: A = parameter-free (default), B = 1x1 conv")
    p.add_argument("--weights", choices=["model", "ema"], default=None,
                   help="--checkpoint: the trained weights (model, default) or their moving "
                        "average (ema, in a train.ema run's checkpoints)")
    p.add_argument("--format", choices=["torchscript", "export", "onnx"], default=None,
                   help="default: from --out's suffix (.pt, .pt2, .onnx)")
    p.add_argument("--out", required=True, metavar="FILE", type=user_path,
                   help="the file to write")
    p.add_argument("--resolution", type=int_at_least(1, MAX_RESOLUTION), default=None,
                   help="input size stored in the metadata and used for the parity check "
                        "(default: the checkpoint's val_res; 224, CIFAR 32)")
    p.add_argument("--no-fold", action="store_true", help="keep BatchNorm layers")
    p.add_argument("--atol", type=_tolerance, default=1e-4, help="parity: absolute tolerance")
    p.add_argument("--rtol", type=_tolerance, default=1e-4,
                   help="parity: tolerance relative to the largest eager output")
    p.add_argument("--parity-batch-sizes", type=_batch_sizes, default=(1, 3), metavar="B1,B2")
    return p


def _format_named_by(ex, out: str) -> str | None:
    """The format --out's suffix names, or None for a suffix no format claims."""
    try:
        return ex.format_of(out)
    except UserError:
        return None


@stdout_may_close
def main(argv: list[str] | None = None) -> int:
    printable_paths()
    args = build_parser().parse_args(argv)
    try:
        if args.width is not None and MAX_WIDTH < args.width < float("inf"):  # as model.width
            raise UserError(f"--width {args.width}: must be <= {MAX_WIDTH}")
        if args.checkpoint and (args.width is not None or args.num_classes is not None):
            raise UserError("--width and --num-classes apply to --model only (a checkpoint "
                            "names its own)")
        if args.checkpoint and (args.channel_divisor != 1 or args.shortcut is not None):
            flag = "--channel-divisor" if args.channel_divisor != 1 else "--shortcut"
            raise UserError(f"{flag} applies to --model only (a checkpoint names its own)")
        if args.model and args.shortcut is not None:
            check_cifar_only("--shortcut", [args.model])
        if args.model and args.weights:
            raise UserError("--weights applies to --checkpoint only (--model has random weights)")
        from fasttrain import export as ex

        fmt = args.format or ex.format_of(args.out)
        named = _format_named_by(ex, args.out)
        if named is not None and named != fmt:
            raise UserError(f"--format {fmt} does not match --out {args.out} (a {named} "
                            f"suffix); use {ex.FORMATS[fmt]} for {fmt}")
        from fasttrain.cli import check_output, same_file

        if args.checkpoint and same_file(args.checkpoint, args.out):
            raise UserError(f"--out {args.out} is the checkpoint itself; exporting over it "
                            f"would lose the trained weights")
        failed = ex.parity_failed_path(args.out)
        if args.checkpoint and same_file(args.checkpoint, failed):
            raise UserError(f"--out {args.out}: a failed export would be kept as {failed}, "
                            f"which is the checkpoint itself; choose another --out")
        if args.checkpoint:
            model, meta = ex.model_from_checkpoint(args.checkpoint,
                                                   weights=args.weights or "model")
            if args.resolution and args.resolution != meta["input_size"][1]:
                if meta.get("resize"):  # keep the training's crop ratio (e.g. 224/256)
                    meta["resize"] = round(meta["resize"] * args.resolution
                                           / meta["input_size"][1])
                meta["input_size"] = [3, args.resolution, args.resolution]
        else:
            model, meta = ex.model_from_name(args.model, 1.0 if args.width is None else args.width,
                                             channel_divisor=args.channel_divisor,
                                             num_classes=args.num_classes,
                                             resolution=args.resolution,
                                             shortcut=args.shortcut or "A")
        try:
            # A failed write leaves no folder it made; a parity failure's file keeps its own.
            with new_folders_removed_on_error(args.out):
                # a link, a device or a pipe would be replaced by the renamed file
                check_output(args.out, f"--out {args.out}", inputs=(args.checkpoint,))
                parity, meta = ex.export_model(model, meta, fmt, args.out,
                                               fold=not args.no_fold,
                                               batch_sizes=args.parity_batch_sizes,
                                               atol=args.atol, rtol=args.rtol)
        except ex.ParityError as e:
            print(f"error: parity check failed: {e}", file=sys.stderr)
            return 1
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    size_mb = Path(args.out).stat().st_size / 2**20
    extra = ""
    if fmt == "torchscript":
        extra = f", {meta['torchscript_method']}"
    elif fmt == "onnx":
        extra = f", opset {meta['onnx_opset']}"
    size = "x".join(map(str, meta["input_size"]))
    shape = ("pruned channels" if (meta.get("model_config") or {}).get("channels")
             else f"w{meta['width']:g}")
    shortcut_b = " (shortcut B)" if meta.get("shortcut") == "B" else ""  # CIFAR ResNets only
    print(f"wrote {args.out} ({fmt}{extra}, {size_mb:.2f} MiB): {meta['model']}{shortcut_b} "
          f"{shape}, {meta['num_classes']} classes, input {size}, "
          f"{meta['bn_folded']} BatchNorm folded")
    print(f"parity vs eager at batch {' and '.join(map(str, parity.batch_sizes))}: max abs "
          f"{parity.max_abs:.3g}, max rel {parity.max_rel:.3g} (atol {parity.atol:g}, "
          f"rtol {parity.rtol:g}): ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
