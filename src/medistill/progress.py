"""Progress of long work on stderr: a rich bar on a terminal, plain periodic lines in a log file.

A log (CI, nohup, a Ray worker) cannot show a live bar; there a line with steps done, elapsed
and remaining time is written every `$MEDISTILL_PROGRESS_SECONDS` (default 30) seconds, so the
log shows the work moving before it ends.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from medistill.markdown import PrintableStream, printable, unguarded

INTERVAL_ENV = "MEDISTILL_PROGRESS_SECONDS"
DEFAULT_INTERVAL = 30.0


class Bar:
    """A handle on one piece of long work; this base class shows nothing (progress disabled)."""

    def advance(self, steps: int = 1, **fields: object) -> None:
        """Count `steps` more steps done; `fields` (e.g. loss=0.3) are shown as the status."""

    def set(self, **fields: object) -> None:
        """Update the status without counting a step."""


class RichBar(Bar):
    """One task of a rich progress display (a terminal)."""

    def __init__(self, progress: Progress, task_id: TaskID) -> None:
        self._progress = progress
        self._task_id = task_id

    def advance(self, steps: int = 1, **fields: object) -> None:
        self._progress.update(self._task_id, advance=steps, **_rich_status(fields))

    def set(self, **fields: object) -> None:
        self._progress.update(self._task_id, **_rich_status(fields))


class PlainBar(Bar):
    """Plain lines for a log: one at the start, one every `interval` seconds of progress, one at the end."""

    def __init__(self, total: int, description: str, interval: float) -> None:
        self.total, self.description, self.interval = total, description, interval
        self.done = 0
        self.status = ""
        self.start = self.last = time.monotonic()
        self._write(f"{description}: started, {total} steps")

    def advance(self, steps: int = 1, **fields: object) -> None:
        self.done += steps
        self.set(**fields)
        if time.monotonic() - self.last >= self.interval and self.done < self.total:
            self.report()

    def set(self, **fields: object) -> None:
        if fields:
            self.status = status_text(fields)

    def report(self) -> None:
        elapsed = time.monotonic() - self.start
        share = self.done / self.total if self.total else 1.0
        remaining = f", about {_clock(elapsed / share - elapsed)} left" if 0 < share < 1 else ""
        self._write(
            f"{self.description}: {self.done}/{self.total} ({share:.0%}), {_clock(elapsed)} elapsed{remaining}"
            + (f"  {self.status}" if self.status else "")
        )
        self.last = time.monotonic()

    def finish(self) -> None:
        elapsed = time.monotonic() - self.start
        self._write(
            f"{self.description}: {self.done}/{self.total} done in {_clock(elapsed)}"
            + (f"  {self.status}" if self.status else "")
        )

    @staticmethod
    def _write(line: str) -> None:
        print(f"medistill: {printable(line)}", file=sys.stderr, flush=True)


def status_text(fields: dict[str, object]) -> str:
    """`loss 0.3012  acc 0.8` from fields."""
    return "  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in fields.items())


def _rich_status(fields: dict[str, object]) -> dict[str, Any]:
    return {"status": escape(printable(status_text(fields)))} if fields else {}


def _clock(seconds: float) -> str:
    return str(timedelta(seconds=round(seconds)))


def plain_interval() -> float:
    """Seconds between plain progress lines (from $MEDISTILL_PROGRESS_SECONDS)."""
    try:
        return max(0.0, float(os.environ.get(INTERVAL_ENV, DEFAULT_INTERVAL)))
    except ValueError:
        return DEFAULT_INTERVAL


@contextmanager
def progress_bar(total: int, description: str, enabled: bool = True) -> Iterator[Bar]:
    """Progress of `total` steps on stderr: a bar on a terminal, periodic plain lines otherwise."""
    if not enabled:
        yield Bar()
        return
    # A live bar writes cursor controls of its own, so it goes to the terminal under the command line's guard
    # (markdown.PrintableStream); everything it shows passes through `printable` first, and what others print
    # while it runs (rich redirects stdout and stderr through the bar) is guarded again.
    guarded = isinstance(sys.stderr, PrintableStream)
    console = Console(file=unguarded(sys.stderr))
    if not console.is_terminal:
        bar = PlainBar(total, description, plain_interval())
        yield bar
        bar.finish()
        return
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[status]}"),
    )
    with Progress(*columns, console=console, transient=False) as progress:
        if guarded:  # rich puts the streams back as they were when the bar ends
            sys.stdout, sys.stderr = PrintableStream(sys.stdout), PrintableStream(sys.stderr)
        yield RichBar(progress, progress.add_task(escape(printable(description)), total=total, status=""))
