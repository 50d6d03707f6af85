"""postctl's progress (postctl/progress.py): bars on a terminal, a plain line every few seconds
anywhere else, and standard output left to the job's result."""

from __future__ import annotations

import asyncio
import io

import pytest

from postctl.progress import Progress, watch


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_without_a_terminal_a_plain_line_every_interval_and_one_at_the_end() -> None:
    out, clock = io.StringIO(), Clock()
    with Progress(stream=out, tty=False, interval=5.0, clock=clock) as progress:
        task = progress.task("commands sent", total=1000)
        for _ in range(10):  # 10 seconds, 100 a second
            clock.now += 1.0
            task.advance(100)
    lines = out.getvalue().splitlines()
    # At 5 s and at 10 s (the interval), then the end: not a line per update.
    assert lines == [
        "commands sent: 500 of 1,000 (50%), 100.0/s, about 5s left",
        "commands sent: 1,000 of 1,000 (100%), 100.0/s, about 0s left",
        "commands sent: 1,000 of 1,000 (100%), 100.0/s, done in 10s",
    ]
    assert "\x1b[" not in out.getvalue()  # no terminal codes in a log


def test_without_a_total_the_count_and_rate_only() -> None:
    out, clock = io.StringIO(), Clock()
    with Progress(stream=out, tty=False, interval=1.0, clock=clock) as progress:
        task = progress.task("events", unit="B")
        clock.now += 2.0
        task.update(3 * 1024 * 1024)
    assert out.getvalue().splitlines()[0] == "events: 3.0 MiB, 1.5 MiB/s"


def test_on_a_terminal_a_rich_bar_with_count_rate_and_time_left() -> None:
    out = io.StringIO()
    with Progress(stream=out, tty=True) as progress:
        task = progress.task("events replayed", total=200)
        task.update(50)
    shown = out.getvalue()
    assert "events replayed" in shown
    assert "200/200" in shown  # finished on exit: the count of the total
    assert "/s" in shown  # the rate
    assert "\x1b[" in shown  # drawn for a terminal


def test_a_failed_job_is_not_shown_as_done() -> None:
    out, clock = io.StringIO(), Clock()
    with (
        pytest.raises(RuntimeError),
        Progress(stream=out, tty=False, interval=5.0, clock=clock) as progress,
    ):
        task = progress.task("load", total=10)
        task.advance(3)
        raise RuntimeError("boom")
    assert "done in" not in out.getvalue()


async def test_watch_polls_a_counter_the_job_keeps() -> None:
    out = io.StringIO()
    counts = {"messages": 0}
    with Progress(stream=out, tty=False, interval=0.0) as progress:
        task = progress.task("events", total=3)
        watching = asyncio.create_task(watch(task, lambda: counts["messages"], every=0.01))
        for n in range(1, 4):
            counts["messages"] = n
            await asyncio.sleep(0.03)
        watching.cancel()
        await asyncio.gather(watching, return_exceptions=True)
    assert task.done == 3
    assert "events: 3 of 3 (100%)" in out.getvalue()
