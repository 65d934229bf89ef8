"""Rendering audit results: tables (rich, or as text), JSON, markdown, JUnit XML, CSV, trajectory tables and plots,
comparisons, report files written atomically, and trajectory files (one JSON line per epoch of a training run).

Each output format is a function of the result object; nothing here computes a metric. Tables fit any width with
every value whole (``_layout``).
"""

from ncaudit.report._atomic import check_output, write_text_atomic
from ncaudit.report._checks import check_message, checks_table_of, failed_first, verdict_line
from ncaudit.report._compare_table import compare_table, render_compare_table
from ncaudit.report._csv import render_trajectory_csv
from ncaudit.report._format import column_format, fmt, fmt_compact, fmt_percent, fmt_signed, fmt_uncertain
from ncaudit.report._json import render_compare_json, render_json, render_trajectory_json
from ncaudit.report._junit import render_junit
from ncaudit.report._markdown import render_compare_markdown, render_markdown, render_trajectory_markdown
from ncaudit.report._plot import plot_path, plot_trajectory, provenance_title, trajectory_figure
from ncaudit.report._table import checks_table, layers_table, metrics_table, per_class_table, render_table
from ncaudit.report._text import render_text
from ncaudit.report._trajectory_file import TrajectoryWriter, is_trajectory_file, read_trajectory
from ncaudit.report._trajectory_table import trajectory_table

__all__ = ["TrajectoryWriter", "check_message", "check_output", "checks_table", "checks_table_of", "column_format",
           "compare_table", "failed_first", "fmt", "fmt_compact", "fmt_percent", "fmt_signed", "fmt_uncertain",
           "is_trajectory_file",
           "layers_table", "metrics_table", "per_class_table", "plot_path", "plot_trajectory", "provenance_title",
           "read_trajectory", "render_compare_json", "render_compare_markdown", "render_compare_table", "render_json",
           "render_junit", "render_markdown", "render_table", "render_text", "render_trajectory_csv",
           "render_trajectory_json", "render_trajectory_markdown", "trajectory_figure", "trajectory_table",
           "verdict_line", "write_text_atomic"]
