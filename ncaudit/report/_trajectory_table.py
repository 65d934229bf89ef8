"""A trajectory as a table: one row per checkpoint, the splits side by side (80 columns, or all with ``wide``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from rich import box
from rich.console import Group
from rich.table import Table
from rich.text import Text

from ncaudit.audit import TrajectoryRow
from ncaudit.audit._trajectory import COLUMNS as TRAJECTORY_COLUMNS
from ncaudit.audit._trajectory import NARROW_COLUMNS, PER_SPLIT, split_order
from ncaudit.report._format import fmt_uncertain
from ncaudit.report._table import layers_table


def _trajectory_columns(splits: list[str], wide: bool) -> list[tuple[str, str | None, str]]:
    """``(metric key, split or None, header)`` of the trajectory table: the narrow set fits 80 columns."""
    columns = []
    for key, header in TRAJECTORY_COLUMNS:
        if not wide and key not in NARROW_COLUMNS:
            continue
        per_split = key in PER_SPLIT and len(splits) > 1 and (wide or key != "nc4")
        for split in splits if per_split else [None]:
            columns.append((key, split, f"{header}\n{split}" if split else header))
    return columns


def trajectory_table(rows: Sequence[TrajectoryRow], *, layers: bool = False, wide: bool = False) -> Group:
    """One row per checkpoint; accuracy and NC1 per split side by side, the rest on the primary split.

    The default columns (accuracy, NC1, NC2 of the means, NC3, NC4) fit an 80-column terminal; ``wide`` adds NC2 of
    the classifier, NC4 of every split, term (B), the LS distance and the precision floor. With ``layers``, a second
    table gives the per-layer NC1 of the last cache (collapse through depth).
    """
    splits = split_order(rows)
    # One space of padding (plus the box's column divider) between columns: the narrow set stays within 80.
    table = Table(title="trajectory", box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, padding=(0, 0, 0, 1))
    table.add_column("checkpoint", no_wrap=max(len(r.label) for r in rows) <= 24, overflow="fold")
    columns = []
    for key, split, header in _trajectory_columns(splits, wide):
        values = [r.value(f"{split}.{key}" if split else key) for r in rows]
        if all(v is None for v in values) and key == "nc1_precision_floor":
            continue
        columns.append((key, split))
        table.add_column(header, justify="right", no_wrap=True)
    for r in rows:
        table.add_row(Text(r.label), *(fmt_uncertain(r.value(f"{s}.{k}" if s else k),
                                                     r.uncertainty(f"{s}.{k}" if s else k), compact=True)
                                       for k, s in columns))
    parts: list[Any] = [table]
    if layers and rows and rows[-1].primary.layers:
        last = rows[-1]
        parts.append(layers_table(last.primary, title=f"per-layer NC1 of {last.label} ({last.primary_split})"))
    return Group(*parts)
