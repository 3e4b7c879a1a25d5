#!/usr/bin/env python
"""Prune a trained fasttrain checkpoint to a target MAC count (structured channel pruning).

    python tools/prune.py CHECKPOINT --out PRUNED.pt (--target-macs N | --target-width W) \
        [--importance l1|bn_scale] [--scope global|uniform] [--tolerance 0.05]

Needs Torch-Pruning: `pip install --no-build-isolation -e .[prune]`. What it does
(fasttrain.compare.prune): ranks the channels of every group of coupled channels
(Torch-Pruning's dependency graph keeps residual additions consistent) by L1 magnitude or
BatchNorm scale, removes them uniformly per group or by one global ranking, and bisects the
pruning ratio until the network's conv+fc MACs (fvcore, at the checkpoint's validation
resolution) are within the tolerance of the target. `--target-width W`
targets the MACs of the same model at uniform width W. The result is a physically smaller dense
network, written as a checkpoint whose model config carries its channel spec:

    python tools/train.py RECIPE --model.init_from=PRUNED.pt     # fine-tune with any recipe
    python tools/benchmark.py --checkpoint PRUNED.pt ...           # measure it
    python tools/export.py --checkpoint PRUNED.pt --out pruned.pt  # export it

User errors (unreadable checkpoint, unreachable target, Torch-Pruning missing, an --out that is
the checkpoint itself, a folder or not writable) exit 2 with one line on stderr; --out is
checked before the pruning starts.
"""
from __future__ import annotations

import argparse
import shlex
import sys

from fasttrain.cli import (ArgumentParser, finite_float, new_folders_removed_on_error,
                           print_table, printable_paths, stdout_may_close, user_path)
from fasttrain.errors import UserError


_positive = finite_float(lambda v: v > 0, "a finite number > 0")
# A fraction of the target: 1 would accept any network at all, up to twice the MACs.
_tolerance = finite_float(lambda v: 0 < v < 1, "a fraction > 0 and < 1 (0.05 = 5 %)")
# A count, written as 2.6e6 as often as 2600000; below 1 it would truncate to 0.
_mac_count_float = finite_float(lambda v: v >= 1, "a finite MAC count >= 1 (e.g. 2.6e6)")


def _mac_count(text: str) -> int:
    return int(_mac_count_float(text))


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description="Prune a fasttrain checkpoint to a target MAC count with "
                                   "Torch-Pruning; the result fine-tunes with "
                                   "--model.init_from=OUT.")
    p.add_argument("checkpoint", type=user_path, help="a fasttrain checkpoint (last.pt / best.pt)")
    p.add_argument("--out", required=True, type=user_path,
                   help="where to write the pruned checkpoint")
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--target-macs", type=_mac_count, metavar="N",
                        help="conv+fc MACs per image to reach, e.g. 2.6e6")
    target.add_argument("--target-width", type=_positive, metavar="W",
                        help="reach the MACs of the same model at uniform width W")
    p.add_argument("--weights", choices=["model", "ema"], default="model",
                   help="prune the trained weights (model) or their moving average (ema, in a "
                        "train.ema run's checkpoints)")
    p.add_argument("--importance", choices=["l1", "bn_scale"], default="l1",
                   help="channel importance: group L1 magnitude or BatchNorm |gamma|")
    p.add_argument("--scope", choices=["global", "uniform"], default="global",
                   help="one ranking over all channels, or the same fraction from every group")
    p.add_argument("--tolerance", type=_tolerance, default=0.05,
                   help="accepted relative distance from the target MACs (default 0.05)")
    return p


@stdout_may_close
def main(argv: list[str] | None = None) -> int:
    printable_paths()
    args = build_parser().parse_args(argv)
    try:
        from fasttrain.compare import prune

        prune.require_torch_pruning()  # before the slow part: a missing package fails fast
        with new_folders_removed_on_error(args.out):  # the output check makes --out's folder
            result = prune.prune_checkpoint(args.checkpoint, args.out,
                                            target_macs=args.target_macs,
                                            target_width=args.target_width,
                                            importance=args.importance, scope=args.scope,
                                            tolerance=args.tolerance, weights=args.weights)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from rich.console import Console
    from rich.table import Table

    t = Table()
    for c in ("", "params", "conv+fc MACs", "vs source"):
        t.add_column(c, justify="left" if not c else "right")
    t.add_row("source", f"{result.source_params:,}", f"{result.source_macs:,}", "")
    t.add_row("target", "", f"{result.target_macs:,}",
              f"{result.target_macs / result.source_macs:.3f}")
    t.add_row("pruned", f"{result.params:,}", f"{result.macs:,}",
              f"{result.macs / result.source_macs:.3f}")
    console = Console() if sys.stdout.isatty() else Console(width=150)
    console.print(f"pruned {args.checkpoint} ({args.importance} importance, {args.scope}) at "
                  f"{result.resolution} px", highlight=False, soft_wrap=True)
    print_table(console, t)
    stages = " / ".join(f"out {s['out']}, inner " + ",".join(
        "x".join(map(str, b)) for b in s["blocks"]) for s in result.channels["stages"])
    console.print(f"channels: stem {result.channels['stem']}; {stages}", highlight=False)
    console.print(f"ratio {result.ratio:.4f} after {len(result.search)} evaluations; MACs "
                  f"{result.error * 100:+.2f} % from the target (tolerance "
                  f"{args.tolerance * 100:.3g} %)",
                  highlight=False)
    console.print(f"wrote {args.out}; fine-tune with: python tools/train.py RECIPE "
                  f"{shlex.quote(f'--model.init_from={args.out}')}", highlight=False,
                  soft_wrap=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
