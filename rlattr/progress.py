"""One progress bar (rich) for long work: the HTML report, featurising many records, retrainings.

Shown on stderr, only when it is a terminal (or when asked), and removed when the work is done.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager


@contextmanager
def progress_bar(description: str, total: int, enabled: bool | None = None) -> Iterator[Callable[..., None]]:
    """Yields ``advance(steps=1, note="")``; ``enabled=None``: show it when stderr is a terminal."""
    show = sys.stderr.isatty() if enabled is None else enabled
    if not show:
        yield lambda steps=1, note="": None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(description, total=total)

        def advance(steps: int = 1, note: str = "") -> None:
            bar.update(task, advance=steps, description=f"{description} {note}".rstrip())

        yield advance


__all__ = ["progress_bar"]
