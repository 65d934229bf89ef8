"""User thresholds (``--fail-if 'nc1>0.05'``): parsing and evaluation against a report's metrics."""

from __future__ import annotations

import math
import operator
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ncaudit.errors import InputError

_OPS: dict[str, Callable[[float, float], bool]] = {
    "<=": operator.le, ">=": operator.ge, "<": operator.lt, ">": operator.gt,
}
_PATTERN = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_.]*)\s*(<=|>=|<|>)\s*([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*$")


@dataclass(frozen=True)
class Check:
    """``metric op threshold``: the check *fails* (exit 1) when the expression is true."""

    metric: str
    op: str
    threshold: float

    @property
    def expression(self) -> str:
        return f"{self.metric} {self.op} {self.threshold:g}"


def parse_check(text: str, known: Iterable[str]) -> Check:
    """Parse ``'<metric key> <op> <number>'`` with op one of <, <=, >, >=."""
    match = _PATTERN.match(text)
    if not match:
        raise InputError(f"--fail-if {text!r} is not of the form 'METRIC OP NUMBER' (e.g. 'nc1>0.05'; "
                         "OP is <, <=, > or >=)")
    metric, op, number = match.groups()
    known = list(known)
    if metric not in known:
        raise InputError(f"--fail-if {text!r}: unknown metric {metric!r}; use one of {', '.join(known)}")
    return Check(metric, op, float(number))


def parse_checks(texts: Sequence[str] | None, known: Iterable[str]) -> list[Check]:
    known = list(known)
    return [parse_check(t, known) for t in texts or ()]


def evaluate(checks: Sequence[Check], values: Mapping[str, float | None]) -> list[dict[str, Any]]:
    """Each check with the metric's value and its outcome; a metric that could not be computed fails its check."""
    out = []
    for check in checks:
        value = values.get(check.metric)
        if value is None or not math.isfinite(value):
            triggered, outcome = True, "failed: metric not available"
        else:
            triggered = _OPS[check.op](value, check.threshold)
            outcome = "failed" if triggered else "passed"
        out.append({"expression": check.expression, "metric": check.metric, "op": check.op,
                    "threshold": check.threshold, "value": value, "passed": not triggered, "outcome": outcome})
    return out
