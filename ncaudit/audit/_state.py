"""What the steps of an audit hand each other: the cache set-up, the classes selected with their statistics,
and the closed forms computed so far."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ncaudit import metrics
from ncaudit.cache import CacheInfo
from ncaudit.stats import Statistics


def _unit_rows(a: np.ndarray) -> np.ndarray:
    n = np.linalg.norm(a, axis=1, keepdims=True)
    return a / np.where(n > 0, n, 1.0)


def _to_tensor(x: np.ndarray) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(x))
    return t.to(torch.float32) if t.dtype == torch.float16 else t


@dataclass
class _Setup:
    """What the passes need to know about the cache before reading a row."""

    info: CacheInfo
    where: str
    layers: list[str]
    gemm: torch.dtype
    classifier: tuple[np.ndarray, np.ndarray | None] | None
    rows: range | None = None  # this rank's contiguous rows (None: all of them, one process)


@dataclass
class _Selection:
    """The classes audited (all, or those with samples), their statistics and the classifier rows kept."""

    keep: np.ndarray
    dropped: list[int]
    stats: Statistics
    layer_stats: dict[str, Statistics]
    layer_bases: dict[str, metrics.MeansBasis]
    weight: np.ndarray | None
    bias: np.ndarray | None
    remap: torch.Tensor


@dataclass
class _Closed:
    """The closed forms of the statistics: metrics so far, details, the Sigma_B basis, W_LS and its error estimate."""

    metrics: dict[str, float | None]
    details: dict[str, Any]
    basis: metrics.MeansBasis
    ls: metrics.LeastSquares | None = None
    estimate: float = 0.0
