#!/usr/bin/env python
"""Train a model from a recipe.

    python tools/train.py RECIPE [--section.key=value ...] [--dry-run] [--resume PATH|auto]
    torchrun --nproc_per_node=N tools/train.py RECIPE ...
    python tools/train.py --keys [RECIPE [--section.key=value ...]]   # every key, then exit

User errors (bad recipe, override, data path or checkpoint) exit with status 2 and one line on
stderr; Ctrl-C exits 130 and SIGTERM 143, with one line; success exits 0.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import signal
import sys
import threading
import time

from fasttrain.config import describe, load
from fasttrain.cli import ArgumentParser, drop_output, nonempty, printable_paths, user_path
from fasttrain.errors import RankError, UserError

# gloo's words when the other end of a collective has died (NCCL waits for its watchdog).
PEER_GONE = ("Connection closed by peer", "Connection reset by peer")


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description="Train a ThinResNet from a recipe.",
                       epilog="Any --section.key=value overrides a recipe value, e.g. --optim.lr=0.2")
    p.add_argument("recipe", nargs="?", type=user_path, help="recipe YAML file (recipes/*.yaml)")
    p.add_argument("--dry-run", action="store_true",
                   help="validate, build data and model, print config and counts, then exit")
    p.add_argument("--resume", metavar="PATH|auto", type=nonempty,
                   help="continue from a checkpoint, a run directory, or the latest run (auto)")
    p.add_argument("--keys", action="store_true",
                   help="list every config key with its value (the recipe's and the overrides', "
                        "else the default), type, bounds and help, then exit")
    return p


def main(argv: list[str] | None = None) -> int:
    printable_paths()
    _said[0] = entered[0] = False
    if threading.current_thread() is not threading.main_thread():  # no signals there
        return _main(argv)
    previous = signal.signal(signal.SIGTERM, _terminate)
    previous_int = signal.getsignal(signal.SIGINT)
    status: int | None = None
    try:
        try:
            status = _main(argv)
        finally:
            # Leaving: the outcome is decided and said. A SIGTERM or a Ctrl-C now (torchrun
            # stopping the ranks left after one failed, or forwarding a Ctrl-C to a rank that
            # has finished) must not add a traceback to that one line.
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            signal.signal(signal.SIGINT, signal.SIG_IGN)
    except KeyboardInterrupt as e:  # arrived outside _main's own handling: a decided outcome
        # stands; one not yet said is said as _main's handler says it (once: a second Ctrl-C
        # right after _main's own line must not repeat it)
        terminated = isinstance(e, Terminated)
        if status is None and not _said[0]:
            _interrupted(terminated)
        if status is None:
            status = 143 if terminated else 130
    finally:  # whatever left _main (SystemExit from argparse too): the caller's handlers back
        signal.signal(signal.SIGTERM, previous)
        signal.signal(signal.SIGINT, previous_int)
    return 143 if status is None else status


def _parse(parser: argparse.ArgumentParser, argv: list[str] | None, rank: int, world: int
           ) -> tuple[argparse.Namespace, list[str]]:
    """The command line; under torchrun its errors (the same on every rank) are said by rank 0
    alone, as the config's are: the others, quiet, wait for torchrun to stop them."""
    if rank == 0 or world == 1:
        args, overrides = parser.parse_known_args(argv)
        if args.recipe is None and not args.keys:
            parser.error("the following arguments are required: recipe")
        return args, overrides
    said = io.StringIO()
    try:
        with contextlib.redirect_stderr(said), contextlib.redirect_stdout(io.StringIO()):
            return _parse(parser, argv, 0, 1)
    except SystemExit as e:
        if e.code:  # an error, not --help
            line = said.getvalue().strip().splitlines()[-1:] or ["error: bad command line"]
            _after_rank_0(rank, line[0].removeprefix("error: "))
        raise


def _after_rank_0(rank: int, error: str) -> None:
    """An error every rank meets alike, on a rank other than 0: rank 0 says it. Exiting first
    would make torchrun stop rank 0 (SIGTERM) before it printed: give it time, and let
    torchrun's SIGTERM, once rank 0 has exited, end this rank quietly. Still alive after that,
    this rank met the error alone (rank 0 waits in a collective): say it."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    time.sleep(10)
    _say(f"error: [rank {rank}] {error}")


def _main(argv: list[str] | None) -> int:
    parser = build_parser()
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    args, overrides = _parse(parser, argv, rank, world)
    try:
        # An ImageNet recipe names no data.path (each user has their own): listing its keys
        # must not need one.
        cfg = load(args.recipe, overrides, require_data_path=not args.keys)
        if args.keys:
            try:
                print("\n".join(describe(cfg)), flush=True)
            except BrokenPipeError:  # `--keys | head`: the reader took what it wanted
                drop_output(sys.stdout)
            return 0
        from fasttrain.engine import train  # imports torch: after the recipe is known good

        entered[0] = True
        train(cfg, recipe=args.recipe, resume=args.resume, dry_run=args.dry_run)
    except UserError as e:
        # Under torchrun, an error every rank raises alike is said once (by rank 0); one found
        # in a rank's own share of the data by the rank that found it.
        if isinstance(e, RankError) and world > 1:
            _say(f"error: [rank {rank}] {e}")
        elif rank == 0:
            _say(f"error: {e}")
        elif world > 1:  # most such errors every rank finds alike
            _after_rank_0(rank, str(e))
        return 2
    except RuntimeError as e:
        if world > 1 and any(words in str(e) for words in PEER_GONE):
            _say(f"error: [rank {rank}] stopped: another rank failed first (its error is in "
                 f"the lines above, in torchrun's report, or in another node's log)")
            return 1
        if "DataLoader worker" in str(e) and ("killed by signal" in str(e)
                                               or "exited unexpectedly" in str(e)):
            # e.g. the kernel's out-of-memory killer: torch's words, without 40 lines of stack
            _say(f"error: {str(e).strip().splitlines()[0]} (out of memory? fewer "
                 f"data.num_workers); checkpoints already written are intact; continue from "
                 f"the last one with --resume auto")
            return 1
        raise
    except KeyboardInterrupt as e:
        # A second signal (torchrun forwards a Ctrl-C the ranks also got from the terminal,
        # then sends SIGTERM) may have replaced train()'s exception while it cleaned up: the
        # first one, which says what to continue, is in the chain.
        first = e
        while first is not None and not hasattr(first, "fasttrain_resume"):
            first = first.__context__
        if first is not None:
            e = first
        terminated = isinstance(e, Terminated)
        if args.dry_run:  # it writes nothing: no checkpoint to speak of
            if rank == 0:
                _say(f"{'terminated' if terminated else 'interrupted'}: dry run stopped, "
                     f"nothing written")
        elif first is None and not entered[0]:
            # before train() was called (importing torch): it named checkpoints that a new
            # run does not have
            if rank == 0:
                _say(f"{'terminated' if terminated else 'interrupted'}: before training "
                     f"started, nothing written"
                     + (f"; run it again with --resume {args.resume}" if args.resume
                        else ""))
        else:
            _interrupted(terminated, e.fasttrain_resume if first is not None else None)
        return 143 if terminated else 130  # the shell's statuses for SIGTERM and SIGINT
    return 0


_said = [False]  # whether this main() call has said its outcome line (main() resets it)
entered = [False]  # whether this main() call has called train() (main() resets it)


def _say(line: str) -> None:
    """Print the run's one outcome line on stderr."""
    _said[0] = True
    print(line, file=sys.stderr)


def _interrupted(terminated: bool, resume: str | None = None) -> None:
    """The one line of a Ctrl-C or a SIGTERM. `resume`: the run folder to continue (from
    train()'s KeyboardInterrupt), "" when nothing was checkpointed, None when unknown."""
    if int(os.environ.get("RANK", "0")) != 0:
        return
    what = "terminated" if terminated else "interrupted"
    left = (int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0"))
            - int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")))
    # torchrun stops the ranks left when one dies, then restarts them if it may
    restart = terminated and left > 0
    if resume == "":
        _say(f"{what}: before the first checkpoint, nothing to continue"
             + (f"; torchrun starts the run again if it restarts the job ({left} "
                f"restart{'s' * (left != 1)} left)" if restart else ""))
        return
    how = f"--resume {resume}" if resume else "--resume auto (or --resume RUN_DIR)"
    then = (f"torchrun continues from the last one if it restarts the job ({left} "
            f"restart{'s' * (left != 1)} left), else continue" if restart else "continue")
    _say(f"{what}: checkpoints already written are intact; {then} from the last one with "
         f"{how}")


class Terminated(KeyboardInterrupt):
    """SIGTERM (docker stop, Slurm and Kubernetes preemption), handled as Ctrl-C is: a
    checkpoint being written is abandoned whole (its temporary file removed) and one line is
    printed, instead of an unannounced exit that left the temporary file behind."""


def _terminate(signum, frame):
    raise Terminated()


if __name__ == "__main__":
    code = main()
    # the process is leaving with its one line said: no late signal adds a traceback
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    sys.exit(code)
