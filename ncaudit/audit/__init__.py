"""Auditing feature caches: the passes, every metric, the result and its JSON, trajectories and threshold checks.

:func:`audit` computes the report of one cache (``ncaudit report``); :class:`AuditResult` holds it and
:func:`result_to_json` gives its JSON (schema ``ncaudit.report/1``). :func:`build_rows` lines several results up as a
trajectory (one row per checkpoint, splits side by side), :func:`audit_trajectory` audits caches into one (checked to
be one run's, test splits optionally against the training means); :func:`parse_checks` and :func:`evaluate` are the
``--fail-if`` thresholds.
"""

from ncaudit.audit._audit import audit
from ncaudit.audit._checks import Check, evaluate, parse_checks
from ncaudit.audit._means_from import MEANS_FROM_METRICS
from ncaudit.audit._options import AuditOptions, ProgressTracker
from ncaudit.audit._result import (
    METRIC_KEYS,
    REPORT_SCHEMA,
    AuditResult,
    json_safe,
    result_to_json,
)
from ncaudit.audit._trajectory import (
    TRAIN_SPLITS,
    TrajectoryRow,
    audit_trajectory,
    build_rows,
    check_caches,
    gate_last_row,
    training_pairs,
)

__all__ = ["MEANS_FROM_METRICS", "METRIC_KEYS", "REPORT_SCHEMA", "TRAIN_SPLITS", "AuditOptions", "AuditResult",
           "Check", "ProgressTracker", "TrajectoryRow", "audit", "audit_trajectory", "build_rows", "check_caches",
           "evaluate", "gate_last_row", "json_safe", "parse_checks", "result_to_json", "training_pairs"]
