"""Markdown for CI pages: a GitHub job summary (``$GITHUB_STEP_SUMMARY``), a pull-request or merge-request comment.

GitHub-flavoured markdown (tables; ``<details>`` folds the long parts): a heading with the verdict, the failed checks
first, then a compact table. Every string that comes from the data (paths, model and class names) is written as a
code span, so nothing in it is read as markup, HTML, a mention or a link; every number goes through
:func:`~ncaudit.report._format.fmt` (values with a stated uncertainty through
:func:`~ncaudit.report._format.fmt_uncertain`).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from ncaudit.audit import AuditResult, Comparison, TrajectoryRow
from ncaudit.audit._trajectory import COLUMNS as TRAJECTORY_COLUMNS
from ncaudit.audit._trajectory import NARROW_COLUMNS, split_order
from ncaudit.report._checks import MARKS, check_message, failed_first, verdict_line
from ncaudit.report._format import fmt, fmt_percent, fmt_signed, fmt_uncertain
from ncaudit.report._table import GROUPS
from ncaudit.report._trajectory_table import _trajectory_columns

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_SPECIAL = re.compile(r"([\\`*_\[\]<|~$&])")  # ">" starts nothing inside a line
_HEADERS = dict(TRAJECTORY_COLUMNS)


def md_code(text: Any, table: bool = True) -> str:
    """``text`` as an inline code span: control characters become spaces, the fence is one backtick longer than any
    run of backticks inside, and in a table cell (``table``) ``|`` is escaped (outside a table it would stay so)."""
    text = _CONTROL.sub(" ", str(text))
    if table:
        text = text.replace("|", "\\|")
    if not text.strip():
        return ""
    fence = "`" * (max((len(run) for run in re.findall(r"`+", text)), default=0) + 1)
    pad = " " if text.startswith(("`", " ")) or text.endswith(("`", " ")) else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def md_text(text: str) -> str:
    """Our own prose (meanings, headers) in a table cell: markdown's special characters escaped."""
    return _SPECIAL.sub(r"\\\1", _CONTROL.sub(" ", text))


def md_table(headers: Sequence[str], rows: Sequence[Sequence[str]], right: Sequence[bool] | None = None) -> str:
    """A GitHub-flavoured table; ``right`` marks the right-aligned (numeric) columns. Cells must be escaped."""
    right = right or [False] * len(headers)
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---:" if r else "---" for r in right) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _mark(check: dict[str, Any]) -> str:
    return MARKS.get(str(check.get("outcome")), "✅" if check.get("passed") else "❌")


def checks_markdown(checks: Sequence[dict[str, Any]]) -> str:
    """The checks as a table, failed (and undetermined) first: mark, expression, outcome, why."""
    rows = [[_mark(c), md_code(c.get("expression", "")), md_text(str(c.get("outcome", ""))),
             md_text(check_message(c))] for c in failed_first(checks)]
    return md_table(["", "check (fails if)", "outcome", "why"], rows)


def _verdict(checks: Sequence[dict[str, Any]]) -> str:
    if not checks:
        return ""
    return f" · {'✅' if all(c.get('passed') for c in checks) else '❌'} {verdict_line(checks)}"


def _provenance(source: dict[str, Any], n: int, p: int, c: int) -> str:
    """A paragraph line (not a table cell): model, split, sizes."""
    extras = [md_code(source[k], table=False) for k in ("model", "split") if source.get(k)]
    return " · ".join([*extras, f"N = {fmt(n)}, p = {fmt(p)}, C = {fmt(c)}"])


def _details(summary: str, body: str) -> str:
    """A folded block (``<details>``): blank lines around the body let the markdown inside render."""
    return f"<details><summary>{summary}</summary>\n\n{body}\n\n</details>"


def _warnings(warnings: Sequence[str]) -> list[str]:
    return ["**warnings**\n\n" + "\n".join(f"- {md_text(w)}" for w in warnings)] if warnings else []


def _all_metrics(metrics: dict[str, Any], uncertainty: dict[str, Any]) -> str:
    rows, named = [], set()
    for _, group in GROUPS:
        for key, meaning in group:
            named.add(key)
            if key not in metrics:  # not among the --metrics computed
                continue
            rows.append([md_code(key), fmt_uncertain(metrics.get(key), uncertainty.get(key)), md_text(meaning)])
    rows += [[md_code(k), fmt_uncertain(v, uncertainty.get(k)), ""] for k, v in metrics.items() if k not in named]
    return md_table(["metric", "value", "meaning"], rows, [False, True, False])


def _per_class(rows: Sequence[dict[str, Any]]) -> str:
    keys = [("count", "n"), ("nc1", "NC1"), ("accuracy", "acc"), ("ncc_accuracy", "NCC acc")]
    keys = [(k, h) for k, h in keys if any(k in r for r in rows)]  # not computed: no column
    body = [[fmt(r.get("class")), md_code(r.get("name", ""))] + [fmt(r.get(k)) for k, _ in keys] for r in rows]
    return md_table(["class", "name"] + [h for _, h in keys], body, [True, False] + [True] * len(keys))


def render_markdown(result: AuditResult, *, per_class: bool = False) -> str:
    """One report: the verdict, the failed checks first, a one-row table of the headline metrics, and every metric
    (with its meaning) folded below; with ``per_class``, the per-class table folded too."""
    src, unc = result.source, result.details.get("uncertainty") or {}
    parts = [f"### ncaudit report{_verdict(result.checks)}",
             f"{md_code(src.get('path', ''), table=False)} · "
             + _provenance(src, result.n_samples, result.n_features, result.n_classes)]
    if result.baseline:
        parts[-1] += f" · baseline {md_code(result.baseline.get('path', ''), table=False)}"
    if result.checks:
        parts.append(checks_markdown(result.checks))
    # --metrics without a headline key: the first metrics computed head the report instead
    headline = [k for k, _ in TRAJECTORY_COLUMNS if k in NARROW_COLUMNS and k in result.metrics] \
        or list(result.metrics)[:len(NARROW_COLUMNS)]
    if headline:
        parts.append(md_table([md_text(_HEADERS.get(k, k).replace("\n", " ")) for k in headline],
                              [[fmt_uncertain(result.metrics.get(k), unc.get(k)) for k in headline]],
                              [True] * len(headline)))
    parts += _warnings(result.warnings)
    parts.append(_details("every metric", _all_metrics(result.metrics, unc)))
    if per_class and result.per_class:
        parts.append(_details("per class", _per_class(result.per_class)))
    return "\n\n".join(parts) + "\n"


def render_trajectory_markdown(rows: Sequence[TrajectoryRow], checks: Sequence[dict[str, Any]], *,
                               wide: bool = False) -> str:
    """A trajectory: the checks on its last row first, then one table row per checkpoint (splits side by side)."""
    columns = _trajectory_columns(split_order(rows), wide, rows)
    parts = [f"### ncaudit trajectory: {len(rows)} checkpoint{'s' if len(rows) != 1 else ''}{_verdict(checks)}"]
    if checks:
        parts.append(checks_markdown(checks) + "\n\nChecks apply to the last row.")
    body = [[md_code(r.label)] + [fmt_uncertain(r.value(f"{s}.{k}" if s else k), r.uncertainty(f"{s}.{k}" if s else k),
                                                3) for k, s, _ in columns] for r in rows]
    parts.append(md_table(["checkpoint"] + [md_text(h.replace("\n", " ")) for _, _, h in columns], body,
                          [False] + [True] * len(columns)))
    return "\n\n".join(parts) + "\n"


_VERDICT_TEXT = {"worse": "**worse**"}


def render_compare_markdown(comparison: Comparison) -> str:
    """A comparison: counts of better / worse metrics, the failed checks first, then every metric side by side."""
    counts: dict[str, int] = {}
    for c in comparison.changes:
        counts[c.verdict] = counts.get(c.verdict, 0) + 1
    tally = ", ".join(f"{counts[v]} {v}" for v in ("better", "worse", "same", "changed", "n/a") if counts.get(v))
    a, b = comparison.a, comparison.b
    sides = [f"**{label}** {md_code(name, table=False)} · "
             f"{_provenance(r.source, r.n_samples, r.n_features, r.n_classes)}"
             for label, name, r in (("A", comparison.a_name, a), ("B", comparison.b_name, b))]
    parts = [f"### ncaudit compare: {tally}{_verdict(comparison.checks)}", "\\\n".join(sides)]
    if comparison.checks:
        parts.append(checks_markdown(comparison.checks) + "\n\nChecks apply to B; `baseline` is A.")
    rows = [[md_code(c.key), fmt(c.a), fmt(c.b), fmt_signed(c.change), fmt_percent(c.relative),
             _VERDICT_TEXT.get(c.verdict, md_text(c.verdict))] for c in comparison.changes]
    parts.append(md_table(["metric", "A", "B", "change", "relative", "verdict"], rows,
                          [False, True, True, True, True, False]))
    parts += _warnings(comparison.warnings)
    return "\n\n".join(parts) + "\n"
