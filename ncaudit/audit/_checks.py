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
    return Check(_metric_key(metric, text, list(known)), op, float(number))


def _metric_key(name: str, text: str, known: list[str]) -> str:
    """The metric key ``name`` names, whatever its case (``NC1`` is ``nc1``); an unknown name suggests the nearest."""
    by_lower = {key.lower(): key for key in known}
    key = by_lower.get(name.lower())
    if key is not None:
        return key
    import difflib
    near = difflib.get_close_matches(name.lower(), list(by_lower), n=1, cutoff=0.6)
    hint = f"did you mean {by_lower[near[0]]!r}?" if near else "metric keys are nc1, cdnv, nc3, accuracy, ..."
    raise InputError(f"--fail-if {text!r}: unknown metric {name!r}; {hint} (the README's metric table lists them)")


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
