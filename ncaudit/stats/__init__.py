"""Streaming accumulators over feature batches, in the style of a torchmetrics ``Metric``.

Each has ``update`` per batch, ``merge`` of two states (shards, files, processes), ``compute`` into a frozen result
and ``reset``; none does I/O or distributed communication. :class:`ClassStatistics` (pass 1: counts, class means,
Sigma_W, Sigma_T, per-class variances, float64-accurate), :class:`SampleDecisions` (pass 2: per-sample decisions)
and :class:`LeastSquaresResidual` (refinement of the least-squares classifier); :class:`FeatureMean` (the mean of
out-of-distribution features, NC5).
"""

from ncaudit.stats._decisions import Decisions, SampleDecisions
from ncaudit.stats._gemm import full_precision_matmul, gemm_dtype_for
from ncaudit.stats._mean import FeatureMean
from ncaudit.stats._residual import LeastSquaresResidual, Residual
from ncaudit.stats._statistics import ClassStatistics, Statistics

__all__ = ["ClassStatistics", "Decisions", "FeatureMean", "LeastSquaresResidual", "Residual", "SampleDecisions",
           "Statistics", "full_precision_matmul", "gemm_dtype_for"]
