"""User thresholds (``--fail-if 'nc1 > 0.05'``, ``--fail-if 'nc1 > baseline * 1.2'``): parsing and evaluation.

Grammar (spaces optional; metric names and ``baseline`` in any case; ``−`` accepted for ``-``)::

    EXPR      := METRIC OP RIGHT
    OP        := <  |  <=  |  >  |  >=
    RIGHT     := NUMBER                      absolute:  fails when  value OP NUMBER
               | baseline                    fails when  value OP b           (b: the baseline's value of METRIC)
               | baseline * NUMBER           fails when  value OP b * NUMBER
               | baseline + NUMBER           fails when  value OP b + NUMBER
               | baseline - NUMBER           fails when  value OP b - NUMBER

A check *fails* (exit 1) when its expression holds. The uncertainty rule (spec, numerical rule 7): a value ``v`` with
relative uncertainty ``u`` (``details.uncertainty``) is known only within ``v (1 ± u)``; a baseline value ``b`` with
its own ``u_b`` moves the threshold ``t`` by up to ``|dt/db| |b| u_b`` (``dt/db`` is NUMBER for ``baseline * NUMBER``,
else 1). When ``|v - t|`` is within the sum of the two half-widths, the outcome could go either way: the check fails
as *undetermined*, whatever ``v OP t`` says, so a gate never passes on noise.
"""

from __future__ import annotations

import difflib
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
_NUMBER = r"(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"
_PATTERN = re.compile(
    rf"^\s*(?P<metric>[A-Za-z_][A-Za-z0-9_.]*)\s*(?P<op><=|>=|<|>)\s*"
    rf"(?:(?P<number>[-+]?{_NUMBER})|(?P<baseline>baseline)(?:\s*(?P<arith>[*+-])\s*(?P<operand>{_NUMBER}))?)\s*$",
    re.IGNORECASE,
)
FORM = ("'METRIC OP NUMBER' or 'METRIC OP baseline [* NUMBER | + NUMBER | - NUMBER]' (e.g. 'nc1>0.05', "
        "'nc1 > baseline * 1.2', 'accuracy < baseline - 0.01'; OP is <, <=, > or >=)")


def _number(x: float) -> str:
    """The shortest text that reads back as ``x`` (``1e-09``, ``0.05``, ``0.0123456789``)."""
    short = f"{x:g}"
    return short if float(short) == x else repr(x)


@dataclass(frozen=True)
class Check:
    """``metric op threshold``: the check *fails* (exit 1) when the expression is true.

    Attributes
    ----------
    metric : the metric key.
    op : ``<``, ``<=``, ``>`` or ``>=``.
    threshold : the number of an absolute check; for a baseline check, None.
    arith : for a baseline check, ``""`` (the baseline itself), ``"*"``, ``"+"`` or ``"-"``.
    operand : the NUMBER after ``arith`` (1 or 0 when there is none).
    """

    metric: str
    op: str
    threshold: float | None
    arith: str | None = None
    operand: float = 0.0

    @property
    def relative(self) -> bool:
        """Whether the threshold is relative to a baseline's value."""
        return self.arith is not None

    @property
    def expression(self) -> str:
        if not self.relative:
            return f"{self.metric} {self.op} {_number(float(self.threshold))}"
        right = "baseline" if not self.arith else f"baseline {self.arith} {_number(self.operand)}"
        return f"{self.metric} {self.op} {right}"

    def threshold_for(self, baseline: float | None) -> float:
        """The threshold that ``value`` is compared with: the number, or f(baseline)."""
        if not self.relative:
            return float(self.threshold)
        if baseline is None:
            raise ValueError("a baseline check needs the baseline's value")
        if self.arith == "*":
            return baseline * self.operand
        if self.arith == "+":
            return baseline + self.operand
        if self.arith == "-":
            return baseline - self.operand
        return baseline

    def baseline_slope(self) -> float:
        """d threshold / d baseline: how far an error in the baseline moves the threshold."""
        return self.operand if self.arith == "*" else 1.0


def nearest_key(name: str, known: Sequence[str]) -> str | None:
    """The key a mistyped ``name`` most likely meant: the first that it begins, else the closest spelling (ties go to
    the earlier key, in table order), else None."""
    lowered = name.lower()
    for key in known:
        if key.lower().startswith(lowered):
            return key
    scores = [(difflib.SequenceMatcher(None, lowered, key.lower()).ratio(), -i, key) for i, key in enumerate(known)]
    best = max(scores, default=None)
    return best[2] if best is not None and best[0] >= 0.5 else None


def resolve_metric(name: str, known: Sequence[str], text: str, *, flag: str = "--fail-if") -> str:
    """The key of ``known`` that ``name`` names, in any case; else an error naming the nearest key (``flag`` and
    ``text`` say where the name was given).

    Raises
    ------
    InputError
        No key matches; the message suggests the nearest one (prefix, else closest spelling).
    """
    if name in known:
        return name
    lowered = {k.lower(): k for k in known}
    if name.lower() in lowered:
        return lowered[name.lower()]
    plain = [k for k in known if "." not in k]
    splits = "; prefix a split, as in 'test.accuracy'" if len(plain) < len(known) else ""
    if nearest := nearest_key(name, known):  # the nearest key, not the whole list
        raise InputError(f"{flag} {text!r}: unknown metric {name!r}; did you mean {nearest!r}? (the README's "
                         f"metric table lists every key{splits})")
    listing = ", ".join(plain) + splits
    raise InputError(f"{flag} {text!r}: unknown metric {name!r}; metric keys: {listing}")


def parse_check(text: str, known: Iterable[str]) -> Check:
    """Parse one ``--fail-if`` expression (see the module's grammar) against the metric keys ``known``.

    Raises
    ------
    InputError
        Not of the grammar's form, or an unknown metric (the message suggests the nearest key).
    """
    match = _PATTERN.match(text.replace("\u2212", "-"))
    if not match:
        raise InputError(f"--fail-if {text!r} is not of the form {FORM}")
    metric = resolve_metric(match["metric"], list(known), text)
    if match["number"] is not None:
        return Check(metric, match["op"], float(match["number"]))
    arith = match["arith"] or ""
    operand = float(match["operand"]) if arith else 0.0
    if not math.isfinite(operand):
        raise InputError(f"--fail-if {text!r}: the number after baseline must be finite")
    return Check(metric, match["op"], None, arith, operand)


def metric_names(texts: Sequence[str] | None, known: Sequence[str]) -> list[str]:
    """The keys of ``known`` that ``--fail-if`` expressions name, a ``split.`` prefix dropped (``test.accuracy`` ->
    ``accuracy``), in any case; expressions that do not parse or name no key are left to :func:`parse_checks`."""
    lowered = {k.lower(): k for k in known}
    out = []
    for text in texts or ():
        match = _PATTERN.match(text.replace("\u2212", "-"))
        name = match["metric"].rpartition(".")[2].lower() if match else ""
        if name in lowered:
            out.append(lowered[name])
    return out


def parse_checks(texts: Sequence[str] | None, known: Iterable[str]) -> list[Check]:
    known = list(known)
    return [parse_check(t, known) for t in texts or ()]


def require_baseline(checks: Sequence[Check], has_baseline: bool, how: str = "give --baseline OLD.json") -> None:
    """Refuse baseline checks when there is no baseline (``how`` says where one comes from)."""
    relative = [c.expression for c in checks if c.relative]
    if relative and not has_baseline:
        raise InputError(f"--fail-if {relative[0]!r} compares with a baseline, and there is none: {how}")


def _relative(uncertainty: Mapping[str, Any] | None, key: str) -> float:
    """The relative uncertainty of ``key`` (0 when not stated); a non-finite or negative one counts as unbounded."""
    if not uncertainty:
        return 0.0
    u = uncertainty.get(key)
    if u is None:
        return 0.0
    try:
        u = abs(float(u))
    except (TypeError, ValueError):
        return math.inf
    return u if math.isfinite(u) else math.inf


def _half_width(x: float, u: float) -> float:
    """|x| u, unbounded when u is (also for x = 0)."""
    return math.inf if math.isinf(u) else abs(x) * u


def _finite(value: Any) -> float | None:
    if value is None or isinstance(value, bool):
        return None
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def evaluate(
    checks: Sequence[Check],
    values: Mapping[str, float | None],
    *,
    uncertainty: Mapping[str, Any] | None = None,
    baseline: Mapping[str, float | None] | None = None,
    baseline_uncertainty: Mapping[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """Each check with the metric's value, its threshold and its outcome.

    Parameters
    ----------
    checks : parsed ``--fail-if`` expressions.
    values : metric key -> value (None: could not be computed).
    uncertainty : metric key -> relative uncertainty u of the value (``details.uncertainty``; missing keys: 0).
    baseline, baseline_uncertainty : the same for the baseline's report (baseline checks only).

    Returns
    -------
    list of dict
        ``expression``, ``metric``, ``op``, ``threshold``, ``value``, ``uncertainty`` (the absolute half-width X
        of the undetermined band, 0 when exact), ``passed``, ``outcome`` (``passed``, ``failed``, ``undetermined``,
        ``failed: metric not available``, ``failed: metric not computed`` (a result of other ``--metrics``),
        ``failed: baseline not available``), and for a baseline check
        ``baseline`` (the baseline's value).

    Notes
    -----
    With t the threshold, X = |v| u + |dt/db| |b| u_b; the check is *undetermined* (it fails) when X > 0 and
    |v - t| <= X. A metric that could not be computed fails its check; so does a baseline without the metric.
    """
    out = []
    for check in checks:
        value = _finite(values.get(check.metric))
        entry: dict[str, Any] = {"expression": check.expression, "metric": check.metric, "op": check.op,
                                 "threshold": check.threshold, "value": value, "uncertainty": 0.0}
        base = None
        if check.relative:
            if baseline is None:
                raise InputError(f"--fail-if {check.expression!r} compares with a baseline, and there is none")
            base = _finite(baseline.get(check.metric))
            entry["baseline"] = base
        if check.metric not in values:
            outcome = "failed: metric not computed"
        elif value is None:
            outcome = "failed: metric not available"
        elif check.relative and base is None:
            outcome = "failed: baseline not available"
        else:
            threshold = check.threshold_for(base)
            margin = _half_width(value, _relative(uncertainty, check.metric))
            if check.relative:
                margin += _half_width(check.baseline_slope() * base, _relative(baseline_uncertainty, check.metric))
            entry["threshold"], entry["uncertainty"] = threshold, margin
            if margin > 0 and abs(value - threshold) <= margin:
                outcome = "undetermined"
            else:
                outcome = "failed" if _OPS[check.op](value, threshold) else "passed"
        entry["passed"] = outcome == "passed"
        entry["outcome"] = outcome
        out.append(entry)
    return out
