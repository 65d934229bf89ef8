"""One progress count for all ranks: each rank's rows, reduced for rank 0's display."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Self

import torch
import torch.distributed as dist

from ncaudit.distributed._launch import is_active


# ---------------------------------------------------------------------------------------------------------------------
# Global progress
# ---------------------------------------------------------------------------------------------------------------------
class GlobalProgress:
    """Rows done by all ranks together, for one progress display (rank 0) with the global images/s.

    Each rank calls :meth:`advance` as it goes. With several ranks a background thread on every rank all-reduces
    (rows done, ranks finished) over a gloo group of its own every ``interval`` seconds until every rank has
    closed, so the collectives always match whatever each rank's pace, and never touch the main group. ``on_update``
    is called (from that thread) with each new global total. One process needs no thread: the total is its own.

    Parameters
    ----------
    initial
        Rows already done before this run (a resumed extraction), counted in :attr:`total`.
    interval
        Seconds between reductions.
    on_update
        Called with the global total after each reduction (e.g. ``lambda n: bar.update(task, completed=n)``).

    Notes
    -----
    Every rank must construct it at the same point (creating the gloo group is collective). :meth:`close` returns
    once every rank has closed: it acts as a barrier, after which :attr:`total` is the exact global count.
    """

    def __init__(self, initial: int = 0, *, interval: float = 0.5,
                 on_update: Callable[[int], None] | None = None) -> None:
        self.initial = initial
        self.interval = interval
        self.on_update = on_update
        self._local = 0
        self._global = 0
        self._closing = False
        self._error: BaseException | None = None
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._world = dist.get_world_size() if is_active() else 1
        if self._world > 1:
            self._group = dist.new_group(backend="gloo")
            self._thread = threading.Thread(target=self._run, name="ncaudit-progress", daemon=True)
            self._thread.start()

    def advance(self, n: int) -> None:
        """Count ``n`` more rows done by this rank."""
        self._local += n
        if self._world == 1 and self.on_update is not None:
            self.on_update(self.total)

    @property
    def local(self) -> int:
        """Rows this rank has done in this run."""
        return self._local

    @property
    def total(self) -> int:
        """Rows done by all ranks (as of the last reduction), plus ``initial``."""
        return self.initial + (self._global if self._world > 1 else self._local)

    def _run(self) -> None:
        try:
            while True:
                finished = self._closing  # read before the count: a rank that has closed reports its final count
                counts = torch.tensor([self._local, int(finished)], dtype=torch.int64)
                dist.all_reduce(counts, group=self._group)
                self._global = int(counts[0])
                if self.on_update is not None:
                    self.on_update(self.total)
                if int(counts[1]) == self._world:
                    return
                self._wake.wait(self.interval)
        except Exception as exc:  # noqa: BLE001 - any error (a peer died) is handed to close()
            self._error = exc

    def close(self) -> None:
        """Report this rank finished and wait for every rank (then :attr:`total` is final)."""
        self._closing = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
            if self._error is None:
                dist.destroy_process_group(self._group)
        if self._error is not None:
            raise RuntimeError(f"progress reduction failed: {self._error}") from self._error

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
