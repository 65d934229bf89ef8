"""The JSON renderers: one report (schema ``ncaudit.report/1``), a trajectory and a comparison."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from ncaudit.audit import AuditResult, Comparison, TrajectoryRow, comparison_to_json, json_safe, result_to_json
from ncaudit.audit._trajectory import rows_to_json


def render_json(result: AuditResult) -> str:
    """The JSON report, strict (no NaN / Infinity tokens), indented."""
    return json.dumps(result_to_json(result), indent=2, allow_nan=False)


def render_trajectory_json(rows: Sequence[TrajectoryRow], checks: list[dict[str, Any]]) -> str:
    return json.dumps(json_safe(rows_to_json(rows, checks)), indent=2, allow_nan=False)


def render_compare_json(comparison: Comparison) -> str:
    """A comparison as JSON (schema ``ncaudit.compare/1``)."""
    return json.dumps(comparison_to_json(comparison), indent=2, allow_nan=False)
