"""Run directories: `<log.dir>/<name>/{config.yaml, metrics.jsonl, checkpoints/}`."""
from __future__ import annotations

import time
from pathlib import Path

from ..errors import RunError


CHECKPOINTS = "checkpoints"
LAST, BEST = "last.pt", "best.pt"


def new_run_dir(log_dir: Path, name: str, recipe_stem: str) -> Path:
    """A fresh run directory. An explicit `name` that already holds checkpoints is refused, so a
    new run never overwrites one that could be resumed."""
    if name:
        run = log_dir / name
        if (run / CHECKPOINTS / LAST).exists():
            raise RunError(f"{run}: run directory already holds checkpoints; pass --resume auto "
                           f"to continue it or choose another --log.name")
    else:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        run = log_dir / f"{recipe_stem}-{stamp}"
        n = 1
        while run.exists():
            run = log_dir / f"{recipe_stem}-{stamp}-{n}"
            n += 1
    (run / CHECKPOINTS).mkdir(parents=True, exist_ok=True)
    return run


def find_resume(resume: str, log_dir: Path, name: str, recipe_stem: str) -> Path | None:
    """The checkpoint that `--resume` names.

    `PATH` is a checkpoint file or a run directory (its checkpoints/last.pt). `auto` is
    `log.dir/log.name`'s last checkpoint when a name is set, else the newest
    `log.dir/<recipe stem>-*` run that has one; None (start fresh) when there is none.
    """
    if resume != "auto":
        path = Path(resume)
        if path.is_dir():
            path = path / CHECKPOINTS / LAST
        if not path.is_file():
            raise RunError(f"--resume {resume}: no checkpoint at {path}")
        return path
    if name:
        candidates = [log_dir / name / CHECKPOINTS / LAST]
    else:
        candidates = sorted(log_dir.glob(f"{recipe_stem}-*/{CHECKPOINTS}/{LAST}"),
                            key=lambda p: p.stat().st_mtime)
    candidates = [c for c in candidates if c.is_file()]
    return candidates[-1] if candidates else None


def run_dir_of(checkpoint: Path) -> Path:
    """The run directory a checkpoint belongs to (`<run>/checkpoints/x.pt` → `<run>`)."""
    parent = checkpoint.resolve().parent
    return parent.parent if parent.name == CHECKPOINTS else parent
