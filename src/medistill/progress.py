"""Progress bars for long work (rich), switched off cleanly for tests and non-interactive runs."""

from __future__ import annotations

import sys
from contextlib import contextmanager
from typing import Iterator

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class Bar:
    """A handle on one task of a progress display; a no-op when disabled."""

    def __init__(self, progress: Progress | None, task_id: int | None) -> None:
        self._progress = progress
        self._task_id = task_id

    def advance(self, steps: int = 1, **fields: object) -> None:
        if self._progress is not None and self._task_id is not None:
            self._progress.update(self._task_id, advance=steps, **_status(fields))

    def set(self, **fields: object) -> None:
        if self._progress is not None and self._task_id is not None:
            self._progress.update(self._task_id, **_status(fields))


def _status(fields: dict[str, object]) -> dict[str, object]:
    if not fields:
        return {}
    text = "  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in fields.items())
    return {"status": text}


@contextmanager
def progress_bar(total: int, description: str, enabled: bool = True) -> Iterator[Bar]:
    """A progress bar on stderr with M/N, elapsed and remaining time and a status text."""
    if not enabled:
        yield Bar(None, None)
        return
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[status]}"),
    )
    from rich.console import Console

    with Progress(*columns, console=Console(file=sys.stderr), transient=False) as progress:
        yield Bar(progress, progress.add_task(description, total=total, status=""))
