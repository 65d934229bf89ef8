"""``--fail-if`` checks as text: one message per check (every renderer's), failed checks first, a rich table.

The checks themselves are data (``ncaudit.audit.evaluate``); here they become words, every number through
:func:`~ncaudit.report._format.fmt`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from rich.console import Group
from rich.text import Text

from ncaudit._text import printable
from ncaudit.report._format import fmt
from ncaudit.report._layout import Column, FittedTable

#: An outcome's mark in markdown and one-line summaries.
MARKS = {"passed": "✅", "undetermined": "❔"}


def is_undetermined(check: dict[str, Any]) -> bool:
    return check.get("outcome") == "undetermined"


def _threshold(check: dict[str, Any]) -> str:
    """The threshold, with how it follows from the baseline (``0.48 = baseline 0.4 * 1.2``)."""
    threshold = fmt(check.get("threshold"))
    if "baseline" not in check:
        return threshold
    _, _, arith = str(check.get("expression", "")).partition("baseline")
    return f"{threshold} (baseline {fmt(check['baseline'])}{arith})" if arith.strip() else f"baseline {threshold}"


def check_message(check: dict[str, Any]) -> str:
    """One line that says why a check passed or failed.

    ``nc1 = 0.41 > 0.1``; ``nc1 = 0.0123, not > 0.1``; ``undetermined within its uncertainty (±0.037): nc1 = 0.5,
    threshold 0.48 (baseline 0.4 * 1.2)``; ``nc1 could not be computed (null)``; ``the baseline has no value of nc1``.
    """
    metric, op, outcome = check.get("metric", "?"), check.get("op", "?"), check.get("outcome", "")
    if outcome == "failed: metric not available":
        return f"{metric} could not be computed (null)"
    if outcome == "failed: metric not computed":
        return f"{metric} was not computed (not among the --metrics of this audit)"
    if outcome == "failed: baseline not available":
        return f"the baseline has no value of {metric}"
    value, threshold = fmt(check.get("value")), _threshold(check)
    if outcome == "undetermined":
        return (f"undetermined within its uncertainty (±{fmt(check.get('uncertainty'))}): {metric} = {value}, "
                f"threshold {threshold}")
    if check.get("passed"):
        return f"{metric} = {value}, not {op} {threshold}"
    return f"{metric} = {value} {op} {threshold}"


def failed_first(checks: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The checks with the failed (and undetermined) ones first, each group in the order given."""
    return sorted(checks, key=lambda c: bool(c.get("passed")))


def verdict_line(checks: Sequence[dict[str, Any]]) -> str:
    """``all 3 checks passed``, ``1 of 3 checks failed``, ``no checks``."""
    failed = sum(not c.get("passed") for c in checks)
    if not checks:
        return "no checks"
    noun = "check" if len(checks) == 1 else "checks"
    if not failed:
        return f"all {len(checks)} {noun} passed" if len(checks) > 1 else "the check passed"
    return f"{failed} of {len(checks)} {noun} failed"


def checks_table_of(checks: Sequence[dict[str, Any]], title: str = "checks (--fail-if)") -> Group:
    """The checks as a table that fits any width (the expression folds, values are whole), failed checks first, then
    one wrapped line per check that did not pass saying why."""
    ordered = failed_first(checks)
    rows = [([printable(c.get("expression", ""))],
             [fmt(c.get("value")), Text(str(c.get("outcome", "")), style="green" if c.get("passed") else "bold red")])
            for c in ordered]
    table = FittedTable([Column("fails if", justify="left", fit="fold")],
                        [Column("value"), Column("outcome", justify="left")], rows, title=title)
    why = [Text(printable(f"{c.get('expression', '')}: {check_message(c)}"), style="red")
           for c in ordered if not c.get("passed")]
    return Group(table, *why)
