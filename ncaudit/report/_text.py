"""The report's table as text (what ``ncaudit report`` prints), for results computed in Python."""

from __future__ import annotations

import io

from rich.console import Console

from ncaudit.audit import AuditResult
from ncaudit.report._table import render_table


def render_text(result: AuditResult, *, per_class: bool = False, width: int = 100, warnings: bool = False) -> str:
    """The table ``ncaudit report`` prints for ``result`` (plain text, no colour), ``width`` columns wide; with
    ``warnings`` the report's warnings follow, one ``warning:`` line each (the command prints them on stderr)."""
    buffer = io.StringIO()
    console = Console(file=buffer, width=width, highlight=False, color_system=None, force_terminal=False,
                      soft_wrap=False)
    render_table(result, console, per_class=per_class)
    text = buffer.getvalue()
    if warnings and result.warnings:
        text += "".join(f"warning: {w}\n" for w in result.warnings)
    return text
