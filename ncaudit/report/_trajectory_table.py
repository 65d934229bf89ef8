"""A trajectory as a table: one row per checkpoint, the splits side by side (80 columns, or all with ``wide``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from rich.console import Group
from rich.text import Text

from ncaudit._text import printable
from ncaudit.audit import TrajectoryRow
from ncaudit.audit._trajectory import COLUMNS as TRAJECTORY_COLUMNS
from ncaudit.audit._trajectory import NARROW_COLUMNS, PER_SPLIT, split_order
from ncaudit.report._format import fmt_compact, fmt_uncertain
from ncaudit.report._layout import Column, FittedTable
from ncaudit.report._table import layers_table


def _trajectory_columns(splits: list[str], wide: bool,
                        rows: Sequence[TrajectoryRow] = ()) -> list[tuple[str, str | None, str]]:
    """``(metric key, split or None, header)`` of the trajectory table: the narrow set fits 80 columns; a metric that
    none of ``rows`` computed (reports of chosen ``--metrics``) has no column."""
    columns = []
    for key, header in TRAJECTORY_COLUMNS:
        if not wide and key not in NARROW_COLUMNS:
            continue
        if rows and not any(key in result.metrics for r in rows for result in r.splits.values()):
            continue
        per_split = key in PER_SPLIT and len(splits) > 1 and (wide or key != "nc4")
        for split in splits if per_split else [None]:
            columns.append((key, split, f"{header}\n{split}" if split else header))
    return columns


def trajectory_table(rows: Sequence[TrajectoryRow], *, layers: bool = False, wide: bool = False) -> Group:
    """One row per checkpoint; accuracy and NC1 per split side by side, the rest on the primary split.

    The default columns (accuracy, NC1, NC2 of the means, NC3, NC4) fit an 80-column terminal; ``wide`` adds NC2 of
    the classifier, NC4 of every split, term (B), the LS distance and the precision floor. At any width every value
    and label is whole: columns that do not fit go into a further block under the same checkpoint labels. When a
    split was audited against the training means (``--means-from``), a second table shows its NCC accuracy, NC4 and
    CDNV against both sets of means. With ``layers``, a last table gives the per-layer NC1 of the last cache
    (collapse through depth).
    """
    splits = split_order(rows)
    columns, headers = [], []
    for key, split, header in _trajectory_columns(splits, wide, rows):
        values = [r.value(f"{split}.{key}" if split else key) for r in rows]
        if all(v is None for v in values) and key == "nc1_precision_floor":
            continue
        columns.append((key, split))
        headers.append(Column(header))
    table_rows = [([printable(r.label)], [fmt_uncertain(r.value(f"{s}.{k}" if s else k), r.uncertainty(f"{s}.{k}" if s else k),
                                             compact=True) for k, s in columns]) for r in rows]
    # One space of padding (plus the divider) between columns: the narrow set stays within 80.
    parts: list[Any] = [FittedTable([Column("checkpoint", justify="left", fit="fold")], headers, table_rows,
                                    title="trajectory", padding=(0, 0, 0, 1))]
    means = _means_table(rows, splits)
    if means is not None:
        parts += [Text(""), means]
    if layers and rows and rows[-1].primary.layers:
        last = rows[-1]
        title = Text(printable(f"per-layer NC1 of {last.label} ({last.primary_split})"))
        parts.append(layers_table(last.primary, title=title))
    return Group(*parts)


#: The metrics measured against both sets of class means: (key, header).
MEANS_COLUMNS = [("ncc_accuracy", "NCC acc"), ("nc4", "NC4"), ("cdnv", "CDNV")]


def _means_table(rows: Sequence[TrajectoryRow], splits: list[str]) -> FittedTable | None:
    """The splits audited against the training means: each metric against the training means and the split's own."""
    audited = [s for s in splits if any(s in r.splits and r.splits[s].details.get("means_from") for r in rows)]
    if not audited:
        return None
    headers, cells = [], []
    for split in audited:
        named = f"{split} " if len(audited) > 1 else ""
        for key, header in MEANS_COLUMNS:
            headers += [Column(f"{header}\n{named}train μ"), Column(f"{header}\n{named}own μ")]
    for r in rows:
        values = []
        for split in audited:
            result = r.splits.get(split)
            own = ((result.details.get("means_from") or {}).get("own_means") or {}) if result is not None else {}
            for key, _ in MEANS_COLUMNS:
                trained = result.metrics.get(key) if result is not None and own else None
                values += [fmt_compact(trained), fmt_compact(own.get(key))]
        cells.append(([printable(r.label)], values))
    return FittedTable([Column("checkpoint", justify="left", fit="fold")], headers, cells,
                       title=f"{', '.join(audited)}: against the training means (train μ) and its own",
                       padding=(0, 0, 0, 1))
