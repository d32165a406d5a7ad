"""What the offline commands show a person: one console on stdout (logs go to stderr) and progress bars."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

console = Console()


@contextmanager
def progress_bar(description: str, total: int | None, out: Console | None = None) -> Iterator[Callable[[int], None]]:
    """A rich progress bar; yields the callback the library functions take (`advance(n)`)."""
    columns = (SpinnerColumn(), TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=out or console) as progress:
        task = progress.add_task(description, total=total)
        yield lambda n: progress.advance(task, n)
