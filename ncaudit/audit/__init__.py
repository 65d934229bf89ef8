"""Auditing feature caches: the passes, every metric, the result and its JSON, trajectories and threshold checks.

:func:`audit` computes the report of one cache (``ncaudit report``); :class:`AuditResult` holds it and
:func:`result_to_json` gives its JSON (schema ``ncaudit.report/1``).
"""

from ncaudit.audit._audit import audit
from ncaudit.audit._options import AuditOptions, ProgressTracker
from ncaudit.audit._result import METRIC_KEYS, REPORT_SCHEMA, AuditResult, json_safe, result_to_json

__all__ = ["AuditOptions", "AuditResult", "METRIC_KEYS", "ProgressTracker", "REPORT_SCHEMA", "audit", "json_safe",
           "result_to_json"]
