"""The one progress display of the long commands (``eval``, ``sanity``, ``demo``'s evaluation).

A bar per task with its elapsed time and an ETA. The ETA comes from a predicted finish time that the
caller sets in the task's ``deadline`` field (``time.monotonic()`` seconds; e.g. the cost estimate at
the start, then re-calibrated from the finished batches), else from the task's average speed since it
started (rich's own column uses a 30-second window, which swings wildly on minutes-long batches).
"""

from __future__ import annotations

import time
from typing import Any

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
)
from rich.text import Text


def eta_seconds(task: Task, now: float | None = None) -> float | None:
    """Seconds left for ``task``: its ``deadline`` field when set, else its average speed; None if unknown."""
    now = time.monotonic() if now is None else now
    deadline = task.fields.get("deadline")
    if deadline is not None:
        return max(deadline - now, 0.0)
    elapsed = now - task.start_time if task.start_time is not None else None
    if task.total is None or not task.completed or not elapsed:
        return None
    return elapsed * (task.total - task.completed) / task.completed


class EtaColumn(ProgressColumn):
    """``ETA 0:03:12`` from ``eta_seconds``; ``ETA -:--:--`` while unknown, ``late 0:00:40`` past a
    deadline (the estimate was short: said, not hidden as 0:00:00), nothing for an open-ended counter."""

    max_refresh = 0.5

    def render(self, task: Task) -> Text:
        if task.finished or (task.total is None and task.fields.get("deadline") is None):
            return Text("")
        left = eta_seconds(task)
        if left is None:
            return Text("ETA -:--:--", style="progress.remaining")
        deadline = task.fields.get("deadline")
        if deadline is not None and left == 0.0:
            return Text(f"late {_clock(time.monotonic() - deadline)}", style="yellow")
        return Text(f"ETA {_clock(left)}", style="progress.remaining")


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


def progress_bar(console: Any) -> Progress:
    """The progress display of every long evaluation (``eval``, ``sanity``): description, bar, count, times."""
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(bar_width=24),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        EtaColumn(),
        console=console,
        transient=False,
    )
