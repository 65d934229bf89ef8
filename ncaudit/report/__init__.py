"""Rendering audit results: tables (rich, or as text), JSON, trajectory tables and plots, report files written
atomically, and trajectory files (one JSON line per epoch of a training run).

Each output format is a function of the result object; nothing here computes a metric.
"""

from ncaudit.report._atomic import check_output, write_text_atomic
from ncaudit.report._format import column_format, fmt, fmt_compact
from ncaudit.report._json import render_json, render_trajectory_json
from ncaudit.report._plot import plot_trajectory, trajectory_figure
from ncaudit.report._table import checks_table, layers_table, metrics_table, per_class_table, render_table
from ncaudit.report._text import render_text
from ncaudit.report._trajectory_file import TrajectoryWriter, is_trajectory_file, read_trajectory
from ncaudit.report._trajectory_table import trajectory_table

__all__ = ["TrajectoryWriter", "check_output", "checks_table", "column_format", "fmt", "fmt_compact",
           "is_trajectory_file", "layers_table", "metrics_table", "per_class_table", "plot_trajectory",
           "read_trajectory", "render_json", "render_table", "render_text", "render_trajectory_json",
           "trajectory_figure", "trajectory_table", "write_text_atomic"]
