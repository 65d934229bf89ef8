"""The result of an audit (:class:`AuditResult`) and its JSON form, schema ``ncaudit.report/1``."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ncaudit import __version__

#: Metric keys of the report, in table order (spec "Metrics" and "Beyond the balanced simplex").
METRIC_KEYS: tuple[str, ...] = (
    "nc1", "cdnv", "nc1_precision_floor",
    "nc2_equinorm_means", "nc2_equinorm_classifier", "nc2_equiangle_means", "nc2_equiangle_classifier",
    "nc2_maxangle_means", "nc2_maxangle_classifier", "nc2_orthogonality_means", "nc2_orthogonality_classifier",
    "nc3", "nc4", "accuracy", "ncc_accuracy",
    "mse_loss", "mse_term_a", "mse_term_b", "ls_distance", "ls_cosine",
    "energy_log_means", "energy_log_classifier", "energy_riesz_means", "energy_riesz_classifier",
    "nc5",
)


@dataclass
class AuditResult:
    """Everything a report shows: metrics, details, per-class and per-layer blocks (see the JSON schema)."""

    source: dict[str, Any]
    n_samples: int
    n_features: int
    n_classes: int
    class_counts: list[int]
    metrics: dict[str, float | None]
    details: dict[str, Any]
    per_class: list[dict[str, Any]]
    layers: dict[str, dict[str, Any]] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    checks: list[dict[str, Any]] = field(default_factory=list)
    #: What baseline checks compared with (``report --baseline``): its path and provenance; None without one.
    baseline: dict[str, Any] | None = None

    @property
    def passed(self) -> bool:
        return all(check["passed"] for check in self.checks)

    def check(self, expressions: Sequence[str]) -> bool:
        """Evaluate ``--fail-if`` thresholds (``"nc1>0.1"``, ``"accuracy<0.99"``: a check *fails* when its expression
        holds) on this result, with the uncertainty rule of ``report`` (a threshold within the value's
        ``details.uncertainty`` fails as undetermined); they are kept in :attr:`checks` (and the JSON). Whether every
        check passed.

        Raises
        ------
        InputError
            An expression that does not parse, or names no metric.
        """
        from ncaudit.audit._checks import evaluate, parse_checks

        self.checks = evaluate(parse_checks(expressions, METRIC_KEYS), self.metrics,
                               uncertainty=self.details.get("uncertainty"))
        return self.passed

    def to_json(self) -> dict[str, Any]:
        """The JSON report (schema ``ncaudit.report/1``) as a plain dict; :func:`result_to_json`."""
        return result_to_json(self)


def _finite(value: float | None) -> float | None:
    """JSON-safe float: NaN / Inf become None (reported as null)."""
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def json_safe(value: Any) -> Any:
    """Plain JSON values: NaN / Inf to None, numpy scalars to Python ones, recursively."""
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, (float, np.floating)):
        return _finite(float(value))
    if isinstance(value, np.integer):
        return int(value)
    return value


REPORT_SCHEMA = "ncaudit.report/1"


def result_to_json(result: AuditResult) -> dict[str, Any]:
    """The JSON report (schema ``ncaudit.report/1``) as a plain dict (strict JSON: no NaN or Infinity)."""
    return json_safe({
        "schema": REPORT_SCHEMA,
        "ncaudit_version": __version__,
        "source": result.source,
        "n_samples": result.n_samples,
        "n_features": result.n_features,
        "n_classes": result.n_classes,
        "class_counts": result.class_counts,
        "metrics": result.metrics,
        "details": result.details,
        "per_class": result.per_class,
        "layers": result.layers,
        "warnings": result.warnings,
        **({"baseline": result.baseline} if result.baseline is not None else {}),
        "checks": result.checks,
        "passed": result.passed,
    })
