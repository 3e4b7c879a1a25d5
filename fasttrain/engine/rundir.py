"""Run directories: `<log.dir>/<name>/{config.yaml, metrics.jsonl, checkpoints/}`."""
from __future__ import annotations

import contextvars
import json
import os
import re
import time
from pathlib import Path

from ..errors import RunError
from .checkpoint import lock_folder


CHECKPOINTS = "checkpoints"
LAST, BEST = "last.pt", "best.pt"


def _holds_a_run(run: Path) -> bool:
    """Whether `run` already holds something a run wrote (checkpoints or metrics)."""
    return (any((run / CHECKPOINTS).glob("*.pt"))
            or (run / "metrics.jsonl").is_file() and (run / "metrics.jsonl").stat().st_size > 0)


def stopped_before_first_checkpoint(run: Path) -> bool:
    """Whether `run` holds only what a run killed while writing its first checkpoint leaves:
    no checkpoint file, metrics of epoch 1 at most (its line is written just before that
    checkpoint). Nothing to continue; `--resume auto` starts it again in place."""
    if any((run / CHECKPOINTS).glob("*.pt")):
        return False
    try:
        lines = (run / "metrics.jsonl").read_text().splitlines()
        return all(json.loads(line).get("epoch") == 1 for line in lines if line.strip())
    except FileNotFoundError:
        return True
    except (OSError, ValueError, AttributeError):  # unreadable, not JSON lines: not ours to drop
        return False


def check_name_free(log_dir: Path, name: str, restart: bool = False) -> None:
    """Refuse an explicit run name whose folder already holds checkpoints or metrics (nothing
    is written; `new_run_dir` and dry runs check with it). With `restart` (`--resume auto`), a
    run stopped before its first checkpoint is no refusal.

    Raises:
        RunError: the name is taken.
    """
    run = log_dir / name
    if restart and stopped_before_first_checkpoint(run):
        return
    if name and run.is_dir() and _holds_a_run(run):
        raise RunError(f"{run}: run directory already holds checkpoints or metrics; pass "
                       f"--resume auto to continue it or choose another --log.name")


def check_log_dir(log_dir: Path) -> None:
    """Refuse a `log.dir` that cannot hold folders (a file on its path), without writing.

    Raises:
        RunError: names the file in the way.
    """
    existing = log_dir
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise RunError(f"log.dir={log_dir}: {existing} is a file, not a folder")


def discard_unused_run_dir(run: Path) -> None:
    """Remove what a run wrote into `run` before anything of value: its config.yaml, an empty
    checkpoints/ and TensorBoard's event files, then the folder if nothing else is in it. A
    folder holding metrics or checkpoints is left alone, as is any file fasttrain did not
    write there: event files older than the run's config.yaml (which it writes before its
    event file: a `--log.name` folder's earlier ones, also when a torchrun restart discards
    the first attempt's folder) and whatever lies behind a symbolic link. An empty
    metrics.jsonl (a full disk at the first epoch's line) is nothing of value."""
    metrics = run / "metrics.jsonl"
    if any((run / CHECKPOINTS).glob("*")):
        return
    if metrics.is_symlink() or metrics.exists() and metrics.stat().st_size > 0:
        return
    metrics.unlink(missing_ok=True)
    config = run / "config.yaml"
    try:
        written = config.stat().st_mtime_ns
    except OSError:  # stopped before writing it: before any event file too
        written = None
    config.unlink(missing_ok=True)  # the run's: it writes it over any other
    board = run / "tensorboard"
    if written is not None and not board.is_symlink():
        for events in board.glob("events.out.tfevents.*"):
            if events.stat().st_mtime_ns >= written:
                events.unlink()
    for folder in (run / CHECKPOINTS, board, run):
        if folder.is_symlink():
            continue
        try:
            folder.rmdir()
        except OSError:  # missing, or holding files that are not the run's
            pass


def check_name_usable(log_dir: Path, name: str, restart: bool = False) -> None:
    """`check_name_free`, with a folder another training is writing named as such first (not
    "pass --resume auto", which would be refused for the same reason): an existing folder is
    locked for this call's `lock_owner` (`lock_run_dir`), and let go again on a refusal.

    Raises:
        RunError: the folder is being written, or the name is taken.
    """
    run = log_dir / name
    if not (name and run.is_dir()):
        check_name_free(log_dir, name, restart)
        return
    held = run.resolve() in _LOCKS
    lock_run_dir(run)
    try:
        check_name_free(log_dir, name, restart)
    except RunError:
        taken = None if held else _LOCKS.pop(run.resolve(), None)
        if taken is not None:  # none where the file system has no flock
            os.close(taken[0])
        raise


def new_run_dir(log_dir: Path, name: str, recipe_stem: str, restart: bool = False) -> Path:
    """A fresh run directory. An explicit `name` whose folder already holds checkpoints or
    metrics is refused, so a new run never overwrites (or appends to) an earlier one; with
    `restart`, one stopped before its first checkpoint is started again (its metrics dropped).

    Raises:
        RunError: the name is taken, or the folder cannot be created (names it and why).
    """
    try:
        if name:
            check_name_usable(log_dir, name, restart)
            run = log_dir / name
            run.mkdir(parents=True, exist_ok=True)
            lock_run_dir(run)
            check_name_free(log_dir, name, restart)  # again, now that no other run can start
            if restart and stopped_before_first_checkpoint(run):
                (run / "metrics.jsonl").unlink(missing_ok=True)
                for torn in (run / CHECKPOINTS).glob(".*.tmp-*"):  # the cut checkpoint write
                    torn.unlink(missing_ok=True)
        else:
            log_dir.mkdir(parents=True, exist_ok=True)
            stamp = time.strftime("%Y%m%d-%H%M%S")
            run, n = log_dir / f"{recipe_stem}-{stamp}", 1
            while True:  # mkdir claims the name: two runs started in the same second differ
                try:
                    run.mkdir()
                    break
                except FileExistsError:
                    run, n = log_dir / f"{recipe_stem}-{stamp}-{n}", n + 1
            lock_run_dir(run)
        (run / CHECKPOINTS).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RunError(f"{log_dir / name if name else log_dir}: cannot create the run directory "
                       f"(log.dir={log_dir}: {e.strerror or e})") from None
    return run


# The lock file descriptors this process holds, by run folder, with the training that took
# each (a `train` call: `lock_owner`); a lock is per process, so one process's trainings
# (notebook threads) must tell theirs apart themselves.
_LOCKS: dict[Path, tuple[int, object]] = {}
lock_owner: contextvars.ContextVar[object] = contextvars.ContextVar("run_lock_owner",
                                                                     default=None)


def lock_run_dir(run: Path) -> None:
    """Hold an exclusive lock on `run` (`checkpoint.lock_folder`) until `release_run_dirs`:
    two trainings writing one run directory interleave their metrics and checkpoints.

    Raises:
        RunError: another process holds it, or another training of this process (another
            `lock_owner`, e.g. a `train` call in another thread).
    """
    key = run.resolve()
    if key in _LOCKS:
        if _LOCKS[key][1] is lock_owner.get():
            return
        raise RunError(f"{run}: another training in this process is writing this run "
                       f"directory; wait for it to end or choose another --log.name")
    try:
        fd = lock_folder(run, wait=False)
    except BlockingIOError:
        raise RunError(f"{run}: another training process is writing this run directory; "
                       f"wait for it to end or choose another --log.name") from None
    if fd is not None:
        _LOCKS[key] = (fd, lock_owner.get())


def release_run_dirs() -> None:
    """Drop the locks `lock_run_dir` took for the current `lock_owner` (the end of a `train`
    call in a longer process); other trainings' stay held."""
    owner = lock_owner.get()
    for key in [k for k, (_, o) in _LOCKS.items() if o is owner]:
        os.close(_LOCKS.pop(key)[0])


def _start(run: Path, recipe_stem: str) -> tuple[str, int] | None:
    """(date-time, n) of a run named as `new_run_dir` names the runs of `recipe_stem`
    (`<stem>-<date>-<time>[-n]`): sorts in the order the runs started; None for other names."""
    match = re.fullmatch(rf"{re.escape(recipe_stem)}-(\d{{8}}-\d{{6}})(?:-(\d+))?", run.name)
    return (match.group(1), int(match.group(2) or 0)) if match else None


def is_run_of(run: Path, recipe_stem: str) -> bool:
    """Whether `run` is named as `new_run_dir` names the runs of `recipe_stem` (so the runs of
    `quickstart-small.yaml` are not taken for those of `quickstart.yaml`)."""
    return _start(run, recipe_stem) is not None


def checkpoint_file(resume: str) -> Path:
    """The checkpoint file an explicit `--resume PATH` names (a run folder: its last.pt)."""
    path = Path(resume).expanduser()
    return path / CHECKPOINTS / LAST if path.is_dir() else path


def find_resume(resume: str, log_dir: Path, name: str, recipe_stem: str) -> Path | None:
    """The checkpoint that `--resume` names.

    `PATH` is a checkpoint file or a run directory (its checkpoints/last.pt). `auto` is
    `log.dir/log.name`'s last checkpoint when a name is set, else that of the newest
    `log.dir/<recipe stem>-<date>-<time>` run (by its start time); None (start fresh) when that
    run has no checkpoint yet or there is no run.
    """
    if resume != "auto":
        path = checkpoint_file(resume)
        if not path.is_file():
            raise RunError(f"--resume {resume}: no checkpoint at {path}")
        return path
    if name:
        last = log_dir / name / CHECKPOINTS / LAST
        if (not last.is_file() and _holds_a_run(log_dir / name)
                and not stopped_before_first_checkpoint(log_dir / name)):
            # Starting fresh there would be refused (new_run_dir): say why now, in one line.
            raise RunError(f"--resume auto: {log_dir / name} holds a run (checkpoints or "
                           f"metrics) but no {CHECKPOINTS}/{LAST}; continue one of its "
                           f"checkpoints with --resume PATH, or choose another --log.name")
        return last if last.is_file() else None
    # The newest run by its name (when it started), not the newest checkpoint: a run stopped
    # before its first checkpoint must not hand `auto` to an older, perhaps finished, run that
    # would then be trained further.
    runs = sorted((p for p in log_dir.glob(f"{recipe_stem}-*") if is_run_of(p, recipe_stem)),
                  key=lambda run: _start(run, recipe_stem))
    if not runs:
        return None
    last = runs[-1] / CHECKPOINTS / LAST
    return last if last.is_file() else None


def run_dir_of(checkpoint: Path) -> Path | None:
    """The run directory a checkpoint belongs to (`<run>/checkpoints/x.pt` → `<run>`); None for
    a file outside a run's checkpoints/ folder (its folder is not a run to write into)."""
    parent = checkpoint.resolve().parent
    return parent.parent if parent.name == CHECKPOINTS else None
