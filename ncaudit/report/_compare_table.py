"""A comparison as a rich table: every metric of A and B side by side, the change and whether it is better."""

from __future__ import annotations

from typing import Any

from rich import box
from rich.console import Console, Group
from rich.table import Table
from rich.text import Text

from ncaudit.audit import AuditResult, Comparison
from ncaudit.report._checks import checks_table_of, verdict_line
from ncaudit.report._format import fmt, fmt_percent, fmt_signed

_STYLES = {"better": "green", "worse": "bold red", "same": "dim", "n/a": "dim"}


def _side(label: str, name: str, result: AuditResult) -> Text:
    src = result.source
    text = Text.assemble((f"{label}  ", "bold"), (name, "cyan"),
                         f"   N = {fmt(result.n_samples)}   p = {fmt(result.n_features)}   C = {fmt(result.n_classes)}")
    extras = [str(src[k]) for k in ("model", "split") if src.get(k)]
    if extras:
        text.append("   " + " · ".join(extras), style="dim")
    return text


def compare_table(comparison: Comparison) -> Table:
    """One row per metric: A, B, B − A, (B − A)/|A| and the verdict (better / worse / same / changed / n/a)."""
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
    table.add_column("metric", style="bold", overflow="fold")  # the names fold; numbers and verdicts are never cut
    cells = [(fmt(c.a), fmt(c.b), fmt_signed(c.change), fmt_percent(c.relative)) for c in comparison.changes]
    for i, header in enumerate(("A", "B", "change", "relative")):
        width = max([len(header)] + [len(row[i]) for row in cells])
        table.add_column(header, justify="right", no_wrap=True, min_width=width)
    table.add_column("", no_wrap=True, min_width=max([len(c.verdict) for c in comparison.changes] + [1]))
    for c, row in zip(comparison.changes, cells):
        table.add_row(c.key, *row, Text(c.verdict, style=_STYLES.get(c.verdict, "")))
    return table


def render_compare_table(comparison: Comparison, console: Console) -> None:
    """Print the comparison: which is A and which B, the table, warnings, the checks on B."""
    parts: list[Any] = [_side("A", comparison.a_name, comparison.a), _side("B", comparison.b_name, comparison.b),
                        compare_table(comparison)]
    for warning in comparison.warnings:
        parts.append(Text(f"note: {warning}", style="yellow"))
    if comparison.checks:
        parts.append(checks_table_of(comparison.checks, title="checks on B (--fail-if; baseline = A)"))
    console.print(Group(*parts))
    if comparison.checks:
        console.print(Text(verdict_line(comparison.checks), style="green" if comparison.passed else "bold red"))
