"""One progress bar (rich) for long work: the HTML report, featurising many records, retrainings.

Drawn on rich's shared console, where SB3's own progress bar draws too: a bar opened inside a
training run with ``progress_bar=True`` nests under it (rich < 14 refuses a second live display:
the bar then stays quiet). Shown only when that console is a terminal (or when asked), and removed
when the work is done.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager


@contextmanager
def progress_bar(description: str, total: int, enabled: bool | None = None) -> Iterator[Callable[..., None]]:
    """Yields ``advance(steps=1, note="")``; ``enabled=None``: show it when the console is a terminal."""
    from rich import get_console

    console = get_console()
    show = console.is_terminal if enabled is None else enabled
    if not show:
        yield lambda steps=1, note="": None
        return
    from rich.errors import LiveError
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    bar = Progress(*columns, console=console, transient=True)
    try:
        bar.start()
    except LiveError:  # rich < 14 and another live display (e.g. SB3's progress bar): stay quiet
        yield lambda steps=1, note="": None
        return
    task = bar.add_task(description, total=total)

    def advance(steps: int = 1, note: str = "") -> None:
        bar.update(task, advance=steps, description=f"{description} {note}".rstrip())

    try:
        yield advance
    finally:
        bar.stop()


__all__ = ["progress_bar"]
