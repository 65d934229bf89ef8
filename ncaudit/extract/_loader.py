"""The DataLoader over a slice of rows: its workers (count, signals, errors) and the progress bar."""

from __future__ import annotations

import contextlib
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from ncaudit.distributed import DistContext, launch_env
from ncaudit.errors import InputError
from ncaudit.extract._runtime import available_cores


def _unwrap_worker_error(exc: BaseException) -> InputError:
    """An InputError re-raised from a DataLoader worker carries the worker's traceback; keep its last line."""
    text = str(exc).strip().splitlines()
    last = text[-1] if text else type(exc).__name__
    prefix = "ncaudit.errors.InputError: "
    return InputError(last.removeprefix(prefix))


# ---------------------------------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------------------------------
def _loader(dataset: Any, indices: range, batch_size: int, workers: int, pin: bool) -> torch.utils.data.DataLoader:
    subset = torch.utils.data.Subset(dataset, indices)
    kwargs: dict[str, Any] = {}
    if workers > 0:
        kwargs.update(prefetch_factor=4, persistent_workers=False, worker_init_fn=_quiet_worker)
    return torch.utils.data.DataLoader(subset, batch_size=batch_size, shuffle=False, num_workers=workers,
                                       pin_memory=pin, drop_last=False, **kwargs)


def _quiet_worker(_: int) -> None:
    """DataLoader worker set-up: end quietly when the parent is gone or on SIGTERM.

    A worker whose parent was killed finds the parent's sockets reset while it hands over a batch; Python's
    ``resource_sharer`` thread then prints a ConnectionResetError traceback through ``sys.excepthook``. Those
    connection errors are dropped here (any other error is still printed), and SIGTERM ends the worker as Ctrl-C does
    (torch's worker loop exits quietly on KeyboardInterrupt).
    """
    previous = sys.excepthook

    def hook(kind: type[BaseException], value: BaseException, tb: Any) -> None:
        if not issubclass(kind, (ConnectionError, EOFError)):
            previous(kind, value, tb)

    sys.excepthook = hook
    signal.signal(signal.SIGTERM, _raise_interrupt)


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def _worker_died(exc: RuntimeError, out: Path) -> InputError | None:
    """A DataLoader worker that was killed (out of memory, a signal) as a one-line error, else None."""
    text = str(exc).strip().splitlines()
    if not text or "DataLoader worker" not in text[0]:
        return None
    return InputError(f"{text[0].rstrip('. ')}; it was killed (out of memory? fewer --workers or a smaller "
                      f"--batch-size help). {out} keeps the rows written so far: rerun with --resume")


def _progress(enabled: bool, total: int, done: int) -> Any:
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        ProgressColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )
    from rich.text import Text

    class _Rate(ProgressColumn):
        def render(self, task: Any) -> Text:
            speed = task.finished_speed or task.speed
            return Text(f"{speed:,.0f} img/s" if speed else "-- img/s")

    return Progress(TextColumn("extract"), BarColumn(), MofNCompleteColumn(), _Rate(), TimeElapsedColumn(),
                    TextColumn("ETA"), TimeRemainingColumn(), console=Console(stderr=True), disable=not enabled,
                    transient=False)


@contextlib.contextmanager
def _worker_errors(out: Path) -> Iterator[None]:
    """Raise a DataLoader worker's InputError as its own one-line message, a killed worker as an InputError."""
    try:
        yield
    except InputError as exc:
        raise _unwrap_worker_error(exc) from None
    except RuntimeError as exc:
        raise _worker_died(exc, out) or exc from None


def _workers(workers: int | None, group: DistContext | None) -> int:
    """DataLoader workers: as asked, else the cores available shared among the ranks on this node."""
    if workers is not None:
        return workers
    local = launch_env().local_world_size if group is not None and group.distributed else 1
    return max(1, available_cores() // max(1, local))
