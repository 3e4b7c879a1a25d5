"""Progress reporting on the main rank: a rich live bar on a terminal, plain lines otherwise
(CI logs, a long epoch's step at most once a minute), and a final summary table."""
from __future__ import annotations

import sys
import time
from typing import Any

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                           TimeElapsedColumn, TimeRemainingColumn)
from rich.table import Table

from ..cli import drop_output


def format_epoch(m: dict[str, Any], epochs: int) -> str:
    """One line per epoch: the metrics line's main numbers, the EMA's top-1 with train.ema,
    and how many steps an epoch cut by train.max_steps trained."""
    ema = f"  val_top1_ema {m['val_top1_ema']:.2f}" if "val_top1_ema" in m else ""
    cut = f"  (cut after {m['epoch_step']} steps)" if m.get("epoch_step") else ""
    return (f"epoch {m['epoch']}/{epochs}  train_loss {m['train_loss']:.4f}  "
            f"val_loss {m['val_loss']:.4f}  val_top1 {m['val_top1']:.2f}{ema}  "
            f"val_top5 {m['val_top5']:.2f}  lr {m['lr']:.4g}  "
            f"{m['epoch_time_s']:.1f}s ({m['train_images_per_s']:.0f} img/s){cut}")


class _LogConsole(Console):
    """A console whose closed output (a killed `tee`, `| head`, `| grep -m1`) drops the rest
    of what it would print instead of ending the training: rich's default raises
    SystemExit(1), which stopped a run mid-epoch without a word."""

    def on_broken_pipe(self) -> None:
        self.quiet = True
        drop_output(self.file)  # later writes, print()'s too, go nowhere


class Reporter:
    """Reports training progress; every method is a no-op off the main rank."""

    # Plain output (a log) gets a step line at most this often: an ImageNet epoch is minutes
    # long, and a log silent until its end looks like a hung job.
    plain_every_s = 60.0

    def __init__(self, mode: str, enabled: bool) -> None:
        self.enabled = enabled
        self.console = _LogConsole(file=sys.stdout, highlight=False, soft_wrap=True)
        if not self.console.is_terminal:
            # Logs and CI: no terminal width to respect, and truncated paths help nobody.
            self.console.width = 200
        self.live = enabled and (mode == "rich" or (mode == "auto" and self.console.is_terminal))
        self._bar: Progress | None = None
        self._task = None
        self._epoch = (0, 0, 0)  # (epoch, epochs, steps) of the epoch running
        self._last_line = time.monotonic()

    def print(self, text: str) -> None:
        if self.enabled:
            self.console.print(text, markup=False)

    def start_epoch(self, epoch: int, epochs: int, steps: int) -> None:
        self._epoch = (epoch, epochs, steps)
        self._last_line = time.monotonic()
        if not self.live:
            return
        self._bar = Progress(TextColumn(f"epoch {epoch}/{epochs}"), BarColumn(),
                             MofNCompleteColumn(), TextColumn("{task.fields[status]}"),
                             TimeElapsedColumn(), TimeRemainingColumn(),
                             console=self.console, transient=True)
        self._task = self._bar.add_task("train", total=steps, status="")
        self._bar.start()

    def due(self) -> bool:
        """Whether `update` would show something now (the caller's values cost a device sync):
        always under a live bar; in plain output once `plain_every_s` has passed since the
        epoch's start or its last step line."""
        if self.live:
            return True
        return self.enabled and time.monotonic() - self._last_line >= self.plain_every_s

    def update(self, steps_done: int, loss: float, lr: float) -> None:
        """`loss`: the main rank's mean over the last step's micro-batches; `lr`: the rate
        that step used (as in the metrics line)."""
        if self._bar is not None:
            self._bar.update(self._task, completed=steps_done,
                             status=f"loss {loss:.4f} lr {lr:.4g}")
        elif self.enabled and not self.live:
            self._last_line = time.monotonic()
            epoch, epochs, steps = self._epoch
            self.print(f"epoch {epoch}/{epochs}  step {steps_done}/{steps}  loss {loss:.4f}  "
                       f"lr {lr:.4g}")

    def phase(self, text: str) -> None:
        if self._bar is not None:
            self._bar.update(self._task, status=text)

    def close(self) -> None:
        """Stop a running bar (its refresh thread, the hidden cursor); for a training ended
        by an error or a signal inside an epoch."""
        if self._bar is not None:
            self._bar.stop()
            self._bar = None

    def end_epoch(self, metrics: dict[str, Any], epochs: int) -> None:
        self.close()
        self.print(format_epoch(metrics, epochs))

    def summary(self, rows: list[tuple[str, str]], title: str) -> None:
        if not self.enabled:
            return
        table = Table(title=title, show_header=False)
        table.add_column("", style="bold")
        table.add_column("", overflow="fold")  # a long run directory stays whole, if wrapped
        for key, value in rows:
            table.add_row(key, value)
        self.console.print(table)
