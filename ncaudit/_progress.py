"""Progress display on stderr (rich), shared by the commands; off when stderr is not a terminal or when asked."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


class RichProgress:
    """A :class:`~ncaudit.audit.ProgressTracker` drawing one rich bar per task on ``console`` (stderr)."""

    def __init__(self, console: Console, enabled: bool | None = None) -> None:
        self.console = console
        self.enabled = console.is_terminal if enabled is None else enabled

    @contextlib.contextmanager
    def task(self, description: str, total: int, unit: str = "rows") -> Iterator[Callable[[int], None]]:
        if not self.enabled:
            yield lambda n: None
            return
        columns = (
            TextColumn("[progress.description]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn(unit), TaskProgressColumn(), TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
        )
        with Progress(*columns, console=self.console, transient=False) as bar:
            task_id = bar.add_task(description, total=total)
            try:
                yield lambda n: bar.advance(task_id, n)
            except BaseException:
                bar.remove_task(task_id)  # an error message follows: leave no half-drawn bar above it
                raise
