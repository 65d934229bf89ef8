"""Auditing Neural Collapse: the passes, every metric, the result and its JSON, trajectories, comparisons and checks.

:func:`audit_cache` computes the report of one cache (``ncaudit report``; :func:`audit` is the same function);
:func:`audit_features` (arrays in memory), :func:`audit_model` (a network over a data loader) and
:class:`AuditAccumulator` (batches pushed from a training loop) compute the same report without a cache.
:class:`AuditResult` holds it and :func:`result_to_json` gives its JSON (schema ``ncaudit.report/1``);
:func:`load_result` reads a saved report back (or audits a cache) as a baseline. :func:`build_rows` lines several
results up as a trajectory (one row per checkpoint, splits side by side), :func:`audit_trajectory` audits caches into
one (checked to be one run's, test splits optionally against the training means); :func:`compare` puts two results
side by side with each metric's direction (:data:`DIRECTIONS`); :func:`parse_checks` and :func:`evaluate` are the
``--fail-if`` thresholds, absolute or relative to a baseline.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ncaudit._lazy import lazy_attributes
from ncaudit.audit._audit import audit, audit_cache, audit_source
from ncaudit.audit._baseline import (
    baseline_info,
    check_comparable,
    load_result,
    read_report,
    require_baseline_metrics,
    result_from_json,
)
from ncaudit.audit._checks import Check, evaluate, metric_names, parse_checks, require_baseline
from ncaudit.audit._compare import COMPARE_SCHEMA, Comparison, MetricChange, compare, comparison_to_json, gate
from ncaudit.audit._directions import DIRECTIONS, verdict
from ncaudit.audit._means_from import MEANS_FROM_METRICS
from ncaudit.audit._options import AuditOptions, ProgressTracker
from ncaudit.audit._plan import Plan, make_plan, resolve_metrics, with_checks
from ncaudit.audit._result import METRIC_KEYS, REPORT_SCHEMA, AuditResult, json_safe, result_to_json
from ncaudit.audit._source import ArraySource, BatchSource
from ncaudit.audit._trajectory import (
    TRAIN_SPLITS,
    TrajectoryRow,
    audit_trajectory,
    build_rows,
    check_caches,
    gate_last_row,
    training_pairs,
)

if TYPE_CHECKING:
    from ncaudit.audit._accumulator import AuditAccumulator
    from ncaudit.audit._api import audit_features, audit_model

#: The names that need torch (the in-memory and training-loop API), imported on first access: the report of a
#: cache on the CPU runs without torch.
_TORCH = {"AuditAccumulator": "_accumulator", "audit_features": "_api", "audit_model": "_api"}

__all__ = ["COMPARE_SCHEMA", "DIRECTIONS", "MEANS_FROM_METRICS", "METRIC_KEYS", "REPORT_SCHEMA", "TRAIN_SPLITS",
           "ArraySource", "AuditAccumulator", "AuditOptions", "AuditResult", "BatchSource", "Check", "Comparison",
           "MetricChange", "Plan", "ProgressTracker", "TrajectoryRow", "audit", "audit_cache", "audit_features",
           "audit_model", "audit_source", "audit_trajectory", "baseline_info", "build_rows", "check_caches",
           "check_comparable", "compare", "comparison_to_json", "evaluate", "gate", "gate_last_row", "json_safe",
           "load_result", "make_plan", "metric_names", "parse_checks", "read_report", "require_baseline",
           "require_baseline_metrics", "resolve_metrics", "result_from_json", "result_to_json", "training_pairs", "verdict", "with_checks"]

__getattr__ = lazy_attributes(__name__, _TORCH)
