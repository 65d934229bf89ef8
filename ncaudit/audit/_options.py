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
    device : ``cpu``, ``cuda`` or ``auto`` (the report of a cache on the CPU runs in NumPy, without torch).
    ridge : lambda >= 0 of the least-squares classifier.
    rcond : relative eigenvalue cut-off of Sigma_T^dagger (default p * eps).
    allow_partial : read the written rows of an incomplete cache.
    allow_external : also read the files a cache's external links, external storage and virtual datasets reach
        (other than its own shards); the result's ``source["files"]`` names every file read.
    drop_empty_classes : leave out classes without samples (and their classifier rows).
    normalize : audit h / ||h|| and w_c / ||w_c|| with b = 0.
    layers : also audit the cache's ``/layers`` (None: none; empty: all; else these names).
    means_from : a training cache of the same network: NCC accuracy, NC4 and CDNV against its class means
        (test-set collapse, Hui et al. 2022; Galanti et al. 2022) instead of the audited set's own.
    metrics : the metric keys to compute (``METRIC_KEYS``, any case; a string may list several separated by
        commas); None (the default) computes every metric. Only the passes and closed forms they need run (see
        :mod:`ncaudit.audit._plan`): ``["nc1"]`` reads the samples once and skips the decisions and the least
        squares. Keys not asked for are absent from ``AuditResult.metrics``; ``details["computed"]`` lists the keys
        asked for.
    per_class : with ``metrics``, also the per-class values of the chosen sample-level metrics (per-class NC1 takes
        the second pass); without ``metrics`` every per-class value is computed anyway.
    """

    batch_size: int = 4096
    device: str = "cpu"
    ridge: float = 0.0
    rcond: float | None = None
    allow_partial: bool = False
    allow_external: bool = False
    drop_empty_classes: bool = False
    normalize: bool = False
    layers: Sequence[str] | None = None
    means_from: str | Path | None = None
    metrics: Sequence[str] | None = None
    per_class: bool = False
