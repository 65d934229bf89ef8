"""Rendering audit results: tables (rich), JSON, trajectory tables and plots, and report files written atomically.

Each output format is a function of the result object; nothing here computes a metric.
"""

from ncaudit.report._atomic import check_output, write_text_atomic
from ncaudit.report._format import column_format, fmt, fmt_compact, fmt_uncertain
from ncaudit.report._json import render_json, render_trajectory_json
from ncaudit.report._plot import plot_trajectory, trajectory_figure
from ncaudit.report._table import checks_table, layers_table, metrics_table, per_class_table, render_table
from ncaudit.report._trajectory_table import trajectory_table

__all__ = ["check_output", "checks_table", "column_format", "fmt", "fmt_compact", "fmt_uncertain", "layers_table",
           "metrics_table", "per_class_table", "plot_trajectory", "render_json", "render_table", "render_trajectory_json",
           "trajectory_figure", "trajectory_table", "write_text_atomic"]
