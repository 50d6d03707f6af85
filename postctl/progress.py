"""Progress of postctl's long jobs, one module for all of them.

On a terminal: `rich` progress bars with the count, the rate and the time left. Anywhere else
(CI, a log file, a pipe): a plain line every `interval` seconds and one when a task ends, so a
log shows the job moving without a line per item. Progress goes to standard error: standard
output stays the job's result (`--json` and the like stay machine-readable).

    with Progress() as progress:
        task = progress.task("commands", total=1000)
        for ...:
            task.advance()
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import IO, Any

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.progress import Progress as RichProgress

__all__ = ["Progress", "Task", "console", "error"]


def _count(n: float, unit: str) -> str:
    if unit == "B":
        for scale, suffix in ((1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")):
            if n >= scale:
                return f"{n / scale:.1f} {suffix}"
        return f"{int(n)} B"
    return f"{int(n):,}" + (f" {unit}" if unit else "")


def _duration(value: float) -> str:
    seconds = round(value)
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


class Task:
    """One counted piece of a job: `advance(n)`, `update(done, total=...)`, `finish()`."""

    def __init__(
        self, progress: Progress, description: str, total: float | None, unit: str
    ) -> None:
        self.progress = progress
        self.description = description
        self.total = total
        self.unit = unit
        self.done = 0.0
        self.started = progress.clock()
        self.finished = False
        self._last_line = self.started
        self._rich_id: TaskID | None = None

    def advance(self, n: float = 1) -> None:
        self.update(self.done + n)

    def update(self, done: float, total: float | None = None) -> None:
        self.done = done
        if total is not None:
            self.total = total
        self.progress._changed(self)

    def finish(self) -> None:
        if not self.finished:
            if self.total is not None and self.done < self.total:
                self.done = self.total
            self.finished = True
            self.progress._changed(self)

    def rate(self) -> float:
        elapsed = self.progress.clock() - self.started
        return self.done / elapsed if elapsed > 0 else 0.0

    def line(self) -> str:
        """The plain line: count (of total, percent), rate, time left or taken."""
        count = _count(self.done, self.unit)
        if self.total:
            count += f" of {_count(self.total, self.unit)} ({100 * self.done / self.total:.0f}%)"
        rate = self.rate()
        rate_text = f"{_count(rate, self.unit)}/s" if self.unit == "B" else f"{rate:,.1f}/s"
        parts = [f"{self.description}: {count}", rate_text]
        elapsed = self.progress.clock() - self.started
        if self.finished:
            parts.append(f"done in {_duration(elapsed)}")
        elif self.total and rate > 0:
            parts.append(f"about {_duration(max(self.total - self.done, 0) / rate)} left")
        return ", ".join(parts)


class Progress:
    """The display of one job's tasks: bars on a terminal, plain lines elsewhere.

    `tty` is taken from standard output unless given (a test gives it); `interval` is the
    seconds between two plain lines of one task."""

    def __init__(
        self,
        *,
        stream: IO[str] | None = None,
        tty: bool | None = None,
        interval: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.tty = sys.stdout.isatty() if tty is None else tty
        self.interval = interval
        self.clock = clock
        self.tasks: list[Task] = []
        self._rich: RichProgress | None = None

    def __enter__(self) -> Progress:
        if self.tty:
            self._rich = RichProgress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[rate]}"),
                TimeElapsedColumn(),
                TextColumn("left"),
                TimeRemainingColumn(),
                console=Console(file=self.stream, force_terminal=True),
                transient=False,
            )
            self._rich.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        for task in self.tasks:
            if exc[0] is None:
                task.finish()
        if self._rich is not None:
            self._rich.stop()
            self._rich = None

    def task(self, description: str, total: float | None = None, unit: str = "") -> Task:
        task = Task(self, description, total, unit)
        self.tasks.append(task)
        if self._rich is not None:
            task._rich_id = self._rich.add_task(description, total=total, rate="")
        return task

    def _changed(self, task: Task) -> None:
        if self._rich is not None and task._rich_id is not None:
            rate = task.rate()
            self._rich.update(
                task._rich_id,
                completed=task.done,
                total=task.total,
                rate=f"{_count(rate, task.unit)}/s" if task.unit == "B" else f"{rate:,.1f}/s",
            )
            return
        now = self.clock()
        if task.finished or now - task._last_line >= self.interval:
            task._last_line = now
            print(task.line(), file=self.stream, flush=True)


def console(stderr: bool = False) -> Console:
    """A rich console for postctl's tables and messages: colours on a terminal, plain text
    elsewhere."""
    return Console(stderr=stderr, highlight=False)


def error(message: str) -> None:
    """An operator's error, on standard error, in red on a terminal."""
    console(stderr=True).print(f"[bold red]postctl:[/] {escape(message)}", soft_wrap=True)


async def watch(
    task: Task,
    done: Callable[[], float],
    total: Callable[[], float | None] | None = None,
    every: float = 0.5,
) -> None:
    """Poll `done()` (and `total()`) into `task` every `every` seconds until cancelled: for a
    job that keeps its own counts (a load run's commands sent, a rebuild's messages read)."""
    import asyncio

    try:
        while True:
            task.update(done(), total() if total is not None else None)
            await asyncio.sleep(every)
    finally:
        task.update(done(), total() if total is not None else None)
