"""Streaming accumulators over feature batches, in the style of a torchmetrics ``Metric``.

Each has ``update`` per batch, ``merge`` of two states (shards, files, processes), ``compute`` into a frozen result
and ``reset``; none does I/O or distributed communication. :class:`ClassStatistics` (pass 1: counts, class means,
Sigma_W, Sigma_T, per-class variances, float64-accurate), :class:`SampleDecisions` (pass 2: per-sample decisions)
and :class:`LeastSquaresResidual` (refinement of the least-squares classifier); :class:`FeatureMean` (the mean of
out-of-distribution features, NC5). :class:`HostStatistics` and :class:`HostDecisions` are the first two in NumPy on
the host (the report of a cache on the CPU), with the same arithmetic and the same update / merge / compute.

The results (:class:`Statistics`, :class:`Decisions`, :class:`Residual`) and the host accumulators import no torch;
the torch accumulators are imported on first use, so that ``import ncaudit.stats`` does not load torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ncaudit._lazy import lazy_attributes
from ncaudit.stats._host import HostDecisions
from ncaudit.stats._host_statistics import HostStatistics
from ncaudit.stats._results import Decisions, Residual, Statistics

if TYPE_CHECKING:
    from ncaudit.stats._decisions import SampleDecisions
    from ncaudit.stats._gemm import full_precision_matmul, gemm_dtype_for
    from ncaudit.stats._mean import FeatureMean
    from ncaudit.stats._residual import LeastSquaresResidual
    from ncaudit.stats._statistics import ClassStatistics

#: The names that need torch, and their modules (imported on first access).
_TORCH = {"ClassStatistics": "_statistics", "SampleDecisions": "_decisions", "LeastSquaresResidual": "_residual",
          "FeatureMean": "_mean", "full_precision_matmul": "_gemm", "gemm_dtype_for": "_gemm"}

__all__ = ["ClassStatistics", "Decisions", "FeatureMean", "HostDecisions", "HostStatistics", "LeastSquaresResidual",
           "Residual", "SampleDecisions", "Statistics", "full_precision_matmul", "gemm_dtype_for"]

__getattr__ = lazy_attributes(__name__, _TORCH)
