"""Auditing Neural Collapse: the passes, every metric, the result and its JSON, trajectories and threshold checks.

:func:`audit_cache` computes the report of one cache (``ncaudit report``; :func:`audit` is the same function);
:func:`audit_features` (arrays in memory), :func:`audit_model` (a network over a data loader) and
:class:`AuditAccumulator` (batches pushed from a training loop) compute the same report without a cache.
:class:`AuditResult` holds it and :func:`result_to_json` gives its JSON (schema ``ncaudit.report/1``).
:func:`build_rows` lines several results up as a trajectory (one row per checkpoint, splits side by side);
:func:`parse_checks` and :func:`evaluate` are the ``--fail-if`` thresholds.
"""

from ncaudit.audit._accumulator import AuditAccumulator
from ncaudit.audit._api import audit_features, audit_model
from ncaudit.audit._audit import audit, audit_cache, audit_source
from ncaudit.audit._checks import Check, evaluate, parse_checks
from ncaudit.audit._options import AuditOptions, ProgressTracker
from ncaudit.audit._result import (
    METRIC_KEYS,
    REPORT_SCHEMA,
    AuditResult,
    json_safe,
    result_from_json,
    result_to_json,
)
from ncaudit.audit._source import ArraySource, BatchSource
from ncaudit.audit._trajectory import TrajectoryRow, build_rows, gate_last_row

__all__ = ["METRIC_KEYS", "REPORT_SCHEMA", "ArraySource", "AuditAccumulator", "AuditOptions", "AuditResult",
           "BatchSource", "Check", "ProgressTracker", "TrajectoryRow", "audit", "audit_cache", "audit_features",
           "audit_model", "audit_source", "build_rows", "evaluate", "gate_last_row", "json_safe", "parse_checks",
           "result_from_json", "result_to_json"]
