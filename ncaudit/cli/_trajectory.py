"""``ncaudit trajectory``."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import typer
from rich.console import Console

from ncaudit.cli._app import PLOT_EXTRA, _command, command, shown, stderr
from ncaudit.cli._output import (
    JSON_HELP,
    JUNIT_HELP,
    OutputFormat,
    check_outputs,
    exit_on_checks,
    format_option,
    pick_format,
    write_junit,
)
from ncaudit.errors import InputError


def _print_trajectory(rows: list, outcome: list[dict], *, output_format: str = "table", layers: bool = False,
                      preface: str | None = None, wide: bool = False) -> None:
    """The trajectory on stdout: JSON, markdown, or the table (with an optional preface) and the checks' outcome."""
    from ncaudit.report import check_message, fmt, render_trajectory_json, render_trajectory_markdown, trajectory_table

    if output_format == "json":
        typer.echo(render_trajectory_json(rows, outcome))
        return
    if output_format == "markdown":
        typer.echo(render_trajectory_markdown(rows, outcome, wide=wide), nl=False)
        return
    console = Console(highlight=False)
    prose_width = console.width
    if not console.is_terminal:  # a log or a pipe: no terminal width to respect, so do not truncate cells
        console, prose_width = Console(highlight=False, width=200), 100
    if preface:
        # the program's own prose: paragraphs kept (shown() would print each line break as "\\n")
        console.print("\n\n".join(shown(paragraph) for paragraph in preface.split("\n\n")) + "\n", width=prose_width)
    console.print(trajectory_table(rows, layers=layers, wide=wide))
    for c in outcome:
        style = "green" if c["passed"] else "bold red"
        why = f": {shown(check_message(c))}" if c["outcome"] != "passed" and c["outcome"] != "failed" else ""
        console.print(f"[{style}]{c['outcome']}[/]: fails if {shown(c['expression'])} (last row: "
                      f"{fmt(c['value'])}){why}")


def say_written(result: Any, out: Path) -> None:
    """One line on stderr: where the caches, reports, trajectory files and plot of a run went."""
    plot = f", plot {result.plot}" if result.plot else " (no plot: pip install 'ncaudit[plot]')"
    stderr.print(shown(f"caches in {out / 'caches'}, JSON reports in {out / 'reports'}, trajectory in "
                        f"{result.trajectory_json} and {result.trajectory_csv}{plot}"), soft_wrap=True)


@command()
def trajectory(
    caches: list[Path] = typer.Argument(..., metavar="CACHE.h5... | RUN.jsonl", help="Caches in training order "
                                        "(e.g. one per checkpoint and split), or trajectory files written during "
                                        "training by ncaudit.TrajectoryWriter (one row per epoch).",
                                        show_default=False),
    output_format: OutputFormat = format_option("every metric, schema ncaudit.trajectory/1."),
    json_out: bool = typer.Option(False, "--json", help=JSON_HELP),
    wide: bool = typer.Option(False, "--wide", help="Every column in the table (NC2 of the classifier, NC4 of each "
                              "split, term B, LS distance, precision floor); the default fits 80 columns."),
    plot: Path | None = typer.Option(None, "--plot", metavar="FILE.png", help="Draw the trajectory as the PNAS "
                                        "figures do, with a central-path panel (.png, .pdf or .svg; a directory "
                                        f"gets trajectory.png); needs matplotlib: {PLOT_EXTRA}."),
    title: str | None = typer.Option(None, "--title", help="The plot's title (default: the model and data the "
                                        "caches record)."),
    train_means: bool = typer.Option(False, "--train-means", help="Audit every test (non-training) cache against "
                                     "the class means of the training cache of the same checkpoint: NCC accuracy, "
                                     "NC4 and CDNV as the test-collapse literature measures them."),
    mixed: bool = typer.Option(False, "--mixed", help="Line up caches of different class counts, feature widths or "
                               "models (refused otherwise: they are not one run's checkpoints)."),
    fail_if: list[str] = typer.Option(None, "--fail-if", metavar="EXPR",
                                      help="Gate on the LAST row: fail (exit 1) when EXPR holds, e.g. 'nc1>0.01' "
                                           "(train split, else the only one) or 'test.accuracy<0.9'."),
    junit: Path | None = typer.Option(None, "--junit", metavar="FILE.xml", help=JUNIT_HELP),
    layers: bool = typer.Option(False, "--layers", help="Also show the per-layer NC1 of the last cache."),
    metrics: str | None = typer.Option(None, "--metrics", metavar="KEY[,KEY...]",
                                       help="Audit the caches for these metrics only (and those of --fail-if, split "
                                            "prefixes dropped); see `ncaudit report --metrics`."),
    device: str = typer.Option("auto", help="cpu, cuda or auto."),
    batch_size: int = typer.Option(4096, "--batch-size", min=1, help="Rows per streamed batch."),
    normalize: bool = typer.Option(False, "--normalize", help="Audit normalised features and classifier rows."),
    allow_external: bool = typer.Option(False, "--allow-external", help="Also read the files the caches' external "
                                        "links, external storage and virtual datasets reach (see report)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
) -> None:
    """Follow collapse across checkpoints: one row per checkpoint, train and test side by side.

    Rows keep the order given; each is labelled by the checkpoint's epoch when its provenance records one. The
    caches must be one run's (same classes, feature width and model) unless --mixed. A trajectory file (.jsonl)
    gives its rows as written during training (a torn last line from a crash is ignored with a warning).
    """
    from ncaudit._progress import RichProgress
    from ncaudit.audit import METRIC_KEYS, AuditOptions, audit_trajectory, gate_last_row, metric_names, with_checks
    from ncaudit.report import is_trajectory_file

    with _command("nothing was written"):
        form = pick_format(output_format, json_out)
        if plot is not None:
            from ncaudit.report import plot_path

            plot = plot_path(plot)  # the file written; a bad suffix is refused before any audit
        check_outputs({"--plot": plot, "--junit": junit}, list(caches))
        start = time.perf_counter()
        files = [path for path in caches if is_trajectory_file(path)]
        if files and len(files) != len(caches):
            raise InputError("give either feature caches (.h5) or trajectory files (.jsonl), not both; audit the "
                             "caches with ncaudit report and compare them separately")
        if files and metrics is not None:
            raise InputError("--metrics chooses what caches are audited for; a trajectory file holds the rows its "
                             "run wrote: drop --metrics, or give the caches")
        if files:
            rows = _rows_from_files(files)
        else:
            progress = RichProgress(stderr, enabled=False if quiet else None)
            options = AuditOptions(batch_size=batch_size, device=device, normalize=normalize,
                                   allow_external=allow_external,
                                   metrics=with_checks(metrics, metric_names(fail_if, METRIC_KEYS)))
            rows, warnings = audit_trajectory(caches, options, progress, mixed=mixed, train_means=train_means,
                                              layers=layers)
            for warning in warnings:
                stderr.print(f"[yellow]warning:[/] {shown(warning)}", soft_wrap=True)
        outcome = gate_last_row(rows, fail_if)
        if plot is not None:
            from ncaudit.report import plot_trajectory, provenance_title

            written = plot_trajectory(rows, plot, title=title if title is not None else provenance_title(rows))
            stderr.print(shown(f"plot written to {written}"), soft_wrap=True)
        write_junit(junit, f"ncaudit trajectory ({len(rows)} checkpoints, last: {rows[-1].label})", outcome,
                    seconds=time.perf_counter() - start, warnings=rows[-1].primary.warnings,
                    properties={"last": rows[-1].label, "caches": " ".join(map(str, caches))})
    _print_trajectory(rows, outcome, output_format=form, layers=layers, wide=wide)
    exit_on_checks(outcome)


def _rows_from_files(files: list[Path]) -> list:
    """The rows of trajectory files, in the order given; a torn last line is a warning on stderr."""
    from ncaudit.report import read_trajectory

    def warn(message: str) -> None:
        stderr.print(f"[yellow]warning:[/] {shown(message)}", soft_wrap=True)

    rows = [row for path in files for row in read_trajectory(path, on_warning=warn)]
    if not rows:
        raise InputError(f"{files[0]}: the trajectory has no complete row yet; write one with TrajectoryWriter.write")
    return rows
