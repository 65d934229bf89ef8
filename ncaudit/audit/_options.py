"""What an audit is asked to do (:class:`AuditOptions`) and what it reports progress to."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol


class ProgressTracker(Protocol):
    """What the audit needs of a progress display: a task with a total, advanced by a number of rows."""

    def task(self, description: str, total: int) -> contextlib.AbstractContextManager[Callable[[int], None]]: ...


class _NoProgress:
    @contextlib.contextmanager
    def task(self, description: str, total: int) -> Iterator[Callable[[int], None]]:
        yield lambda n: None


@dataclass(frozen=True)
class AuditOptions:
    """Options of an audit (the ``report`` command's flags).

    Attributes
    ----------
    batch_size : rows per streamed batch (results do not depend on it).
    device : ``cpu``, ``cuda`` or ``auto``.
    ridge : lambda >= 0 of the least-squares classifier.
    rcond : relative eigenvalue cut-off of Sigma_T^dagger (default p * eps).
    allow_partial : read the written rows of an incomplete cache.
    drop_empty_classes : leave out classes without samples (and their classifier rows).
    normalize : audit h / ||h|| and w_c / ||w_c|| with b = 0.
    layers : also audit the cache's ``/layers`` (None: none; empty: all; else these names).
    means_from : a training cache of the same network: NCC accuracy, NC4 and CDNV against its class means
        (test-set collapse, Hui et al. 2022; Galanti et al. 2022) instead of the audited set's own.
    """

    batch_size: int = 4096
    device: str = "cpu"
    ridge: float = 0.0
    rcond: float | None = None
    allow_partial: bool = False
    drop_empty_classes: bool = False
    normalize: bool = False
    layers: Sequence[str] | None = None
    means_from: str | Path | None = None
