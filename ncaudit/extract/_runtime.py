"""Where and how the network runs: precision (autocast, from :mod:`ncaudit.models`), cores available."""

from __future__ import annotations

import os

from ncaudit.models import PRECISIONS, autocast_context, resolve_precision

STORE_DTYPES = ("float32", "float16")

__all__ = ["PRECISIONS", "STORE_DTYPES", "autocast_context", "available_cores", "resolve_precision"]


def available_cores() -> int:
    """CPU cores this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1
