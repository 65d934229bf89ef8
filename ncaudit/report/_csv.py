"""A trajectory as CSV: one line per checkpoint and split, every metric, for spreadsheets and plotting scripts."""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence

from ncaudit.audit import METRIC_KEYS, TrajectoryRow

#: The columns before the metrics.
CSV_FIELDS = ("label", "epoch", "checkpoint", "split", "cache", "n_samples", "means_from")


def render_trajectory_csv(rows: Sequence[TrajectoryRow]) -> str:
    """``label, epoch, checkpoint, split, cache, n_samples, means_from`` and every metric key, one line per
    checkpoint and split in the rows' order; a metric that could not be computed is an empty field; floats are
    written with ``repr`` (every digit: the file is for programs)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow([*CSV_FIELDS, *METRIC_KEYS])
    for row in rows:
        for split, result in row.splits.items():
            means = (result.details.get("means_from") or {}).get("path", "")
            head = [row.label, "" if row.epoch is None else row.epoch, row.checkpoint or "", split,
                    result.source.get("path", ""), result.n_samples, means]
            writer.writerow([*head, *("" if result.metrics.get(k) is None else repr(result.metrics[k])
                                      for k in METRIC_KEYS)])
    return buffer.getvalue()
