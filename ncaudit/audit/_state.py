"""What the steps of an audit hand each other: the source's set-up, the classes selected with their statistics,
and the closed forms computed so far."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from ncaudit import metrics
from ncaudit.audit._source import SourceInfo
from ncaudit.stats import Statistics

if TYPE_CHECKING:
    import torch

    from ncaudit.distributed import DistContext


def _unit_rows(a: np.ndarray) -> np.ndarray:
    n = np.linalg.norm(a, axis=1, keepdims=True)
    return a / np.where(n > 0, n, 1.0)


def _to_tensor(x: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Features as a tensor where they are (no copy of a float32 / float64 batch); half precision widened to float32,
    which is exact."""
    import torch

    t = x if isinstance(x, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(x))
    return t.to(torch.float32) if t.dtype in (torch.float16, torch.bfloat16) else t


def _labels(y: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Labels as an int64 tensor where they are."""
    import torch

    t = y if isinstance(y, torch.Tensor) else torch.from_numpy(np.asarray(y))
    return t.to(torch.int64)


@dataclass
class _Setup:
    """What the passes need to know about the source before reading a row."""

    info: SourceInfo
    where: str
    layers: list[str]
    gemm: str  # the decision GEMM's dtype: "float32" or "float64"
    classifier: tuple[np.ndarray, np.ndarray | None] | None
    rows: range | None = None  # this rank's contiguous rows of a cache (None: all of them, or a live source)
    merge: bool = False  # merge the passes' states across the ranks of the default process group
    deferred: bool = False  # check labels and finiteness on the device, once per pass (live sources)
    group: DistContext | None = None


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
    remap: np.ndarray  # (C_all,) int64: a class's index among those kept, -1 for a class dropped


@dataclass
class _Closed:
    """The closed forms of the statistics: metrics so far, details, the Sigma_B basis (None when no chosen metric
    reads it), W_LS (None when no least-squares metric is chosen) and its error estimate."""

    metrics: dict[str, float | None]
    details: dict[str, Any]
    basis: metrics.MeansBasis | None
    ls: metrics.LeastSquares | None = None
    estimate: float = 0.0
