"""Rich progress bars with a rate, shared by long-running library functions.

Library code may draw progress bars (and only that); everything else a user reads is printed by
the CLI. Bars go to stderr and disappear when output is not a terminal.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from typing import Iterator

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    SpinnerColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text


class RateColumn(ProgressColumn):
    """Speed in the task's own unit ("samples/s") and, when a sample rate is set on the task as
    `fields['rate']`, as a real-time factor ("0.85x real time")."""

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        if not speed:
            return Text("", style="progress.data.speed")
        unit = task.fields.get("unit", "it")
        text = f"{_human(speed)} {unit}/s"
        if task.fields.get("rate"):
            text += f"  {speed / task.fields['rate']:.2f}x real time"
        return Text(text, style="progress.data.speed")


def _human(v: float) -> str:
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if v >= div:
            return f"{v / div:.1f}{suffix}"
    return f"{v:.1f}"


_stderr = Console(stderr=True)


@contextmanager
def progress_bar(enabled: bool = True, extra: str = "",
                 endless: bool = False) -> Iterator[Progress]:
    """A rich Progress with description, bar, count, rate (and real-time factor), elapsed and ETA.
    `extra` is a format string over task fields (e.g. "loss {task.fields[loss]:.3f}").
    `endless`: work with no known end (training until Ctrl-C): a pulsing bar, the rate and the
    elapsed time, no count of a total and no ETA."""
    columns: list[ProgressColumn | str] = [SpinnerColumn(), TextColumn("{task.description}"),
                                          BarColumn()]
    if not endless:
        columns.append(MofNCompleteColumn())
    columns.append(RateColumn())
    if extra:
        columns.append(TextColumn(extra))
    columns.append(TimeElapsedColumn())
    if not endless:
        columns += [TextColumn("eta"), TimeRemainingColumn()]
    disable = not enabled or not sys.stderr.isatty()
    with Progress(*columns, console=_stderr, disable=disable, transient=False) as p:
        yield p
