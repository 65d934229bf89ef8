"""Two audits side by side (``ncaudit compare A B``): every metric's change and whether it is better or worse.

A is the reference (the baseline of ``--fail-if 'nc1 > baseline * 1.2'``), B the candidate: a fine-tune, a pruned
or re-augmented model against the original. Each input is a saved report or a cache (audited).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ncaudit import __version__
from ncaudit.audit._checks import Check, _half_width, _relative, evaluate
from ncaudit.audit._directions import DIRECTIONS, Direction, verdict
from ncaudit.audit._result import METRIC_KEYS, AuditResult, json_safe

COMPARE_SCHEMA = "ncaudit.compare/1"


@dataclass(frozen=True)
class MetricChange:
    """One metric of A and B: the change B − A, relative to |A|, and its verdict.

    Attributes
    ----------
    key : the metric key.
    a, b : the values (None: not computed).
    change : b − a (None when either is missing).
    relative : (b − a) / |a| (0 when both are 0; None when a is 0 or missing).
    direction : ``lower`` or ``higher`` (which way the metric improves), or None.
    verdict : ``better``, ``worse``, ``same``, ``changed`` or ``n/a`` (see :func:`~._directions.verdict`).
    uncertainty : |a| u_a + |b| u_b, the change that the values' uncertainties allow (0 when exact).
    """

    key: str
    a: float | None
    b: float | None
    change: float | None
    relative: float | None
    direction: Direction
    verdict: str
    uncertainty: float


@dataclass
class Comparison:
    """Audits A (reference) and B (candidate), named as given, with every metric's change and B's checks."""

    a: AuditResult
    b: AuditResult
    a_name: str
    b_name: str
    changes: list[MetricChange]
    warnings: list[str] = field(default_factory=list)
    checks: list[dict[str, Any]] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(check["passed"] for check in self.checks)

    @property
    def keys(self) -> list[str]:
        return [c.key for c in self.changes]


def metric_keys(*results: AuditResult) -> list[str]:
    """The report's metric keys in table order (those that some result holds: reports of chosen ``--metrics`` hold
    only theirs), then any other key that a result holds (a newer report's)."""
    held = {k for r in results for k in r.metrics}
    extra = sorted(held - set(METRIC_KEYS))
    return [*(k for k in METRIC_KEYS if k in held or not results), *extra]


def _change(key: str, a: AuditResult, b: AuditResult) -> MetricChange:
    va, vb = a.metrics.get(key), b.metrics.get(key)
    margin = 0.0
    if va is not None and vb is not None:
        margin = (_half_width(va, _relative(a.details.get("uncertainty"), key))
                  + _half_width(vb, _relative(b.details.get("uncertainty"), key)))
    change = None if va is None or vb is None else vb - va
    relative = None
    if change is not None:
        relative = 0.0 if change == 0 else (change / abs(va) if va != 0 else None)
    return MetricChange(key, va, vb, change, relative, DIRECTIONS.get(key), verdict(key, va, vb, margin), margin)


def compare(a: AuditResult, b: AuditResult, a_name: str, b_name: str, *,
            warnings: Sequence[str] = (), keys: Sequence[str] | None = None) -> Comparison:
    """Every metric of ``a`` and ``b`` side by side (B − A), in the report's order; with ``keys``, those only."""
    changes = [_change(key, a, b) for key in (metric_keys(a, b) if keys is None else keys)]
    return Comparison(a, b, a_name, b_name, changes, list(warnings))


def gate(comparison: Comparison, checks: Sequence[Check]) -> list[dict[str, Any]]:
    """Evaluate checks (:func:`~._checks.parse_checks`) on B, with A as the baseline (``'nc1 > baseline * 1.2'``);
    the uncertainty rule applies with both reports' ``details.uncertainty``."""
    a, b = comparison.a, comparison.b
    comparison.checks = evaluate(checks, b.metrics, uncertainty=b.details.get("uncertainty"),
                                 baseline=a.metrics, baseline_uncertainty=a.details.get("uncertainty"))
    return comparison.checks


def _side(name: str, result: AuditResult) -> dict[str, Any]:
    src = result.source
    return {"name": name, "source": src.get("path"), "n_samples": result.n_samples,
            "n_features": result.n_features, "n_classes": result.n_classes,
            **{k: src[k] for k in ("model", "checkpoint", "checkpoint_sha256", "split") if src.get(k) is not None}}


def comparison_to_json(comparison: Comparison) -> dict[str, Any]:
    """``{"schema": "ncaudit.compare/1", "a", "b", "metrics": {key: {...}}, "warnings", "checks", "passed"}``."""
    return json_safe({
        "schema": COMPARE_SCHEMA,
        "ncaudit_version": __version__,
        "a": _side(comparison.a_name, comparison.a),
        "b": _side(comparison.b_name, comparison.b),
        "metrics": {c.key: {"a": c.a, "b": c.b, "change": c.change, "relative_change": c.relative,
                            "better": c.direction, "verdict": c.verdict, "uncertainty": c.uncertainty}
                    for c in comparison.changes},
        "warnings": comparison.warnings,
        "checks": comparison.checks,
        "passed": comparison.passed,
    })
