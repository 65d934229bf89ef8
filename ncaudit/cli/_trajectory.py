"""``ncaudit trajectory``."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape

from ncaudit.cli._app import PLOT_EXTRA, _command, command, stderr
from ncaudit.errors import InputError


def _print_trajectory(rows: list, outcome: list[dict], *, json_out: bool, layers: bool = False,
                      preface: str | None = None, wide: bool = False) -> None:
    """The trajectory on stdout: JSON, or the table (with an optional preface) and the checks' outcome."""
    from ncaudit.report import fmt, render_trajectory_json, trajectory_table

    if json_out:
        typer.echo(render_trajectory_json(rows, outcome))
        return
    console = Console(highlight=False)
    prose_width = console.width
    if not console.is_terminal:  # a log or a pipe: no terminal width to respect, so do not truncate cells
        console, prose_width = Console(highlight=False, width=200), 100
    if preface:
        console.print(escape(preface) + "\n", width=prose_width)
    console.print(trajectory_table(rows, layers=layers, wide=wide))
    for c in outcome:
        style = "green" if c["passed"] else "bold red"
        console.print(f"[{style}]{c['outcome']}[/]: fails if {escape(c['expression'])} (last row: "
                      f"{fmt(c['value'])})")


@command()
def trajectory(
    caches: list[Path] = typer.Argument(..., metavar="CACHE.h5... | RUN.jsonl", help="Caches in training order "
                                        "(e.g. one per checkpoint and split), or trajectory files written during "
                                        "training by ncaudit.TrajectoryWriter (one row per epoch).",
                                        show_default=False),
    json_out: bool = typer.Option(False, "--json", help="Print the trajectory as JSON on stdout (every metric)."),
    wide: bool = typer.Option(False, "--wide", help="Every column in the table (NC2 of the classifier, NC4 of each "
                              "split, term B, LS distance, precision floor); the default fits 80 columns."),
    plot: Path | None = typer.Option(None, "--plot", metavar="FILE.png", help="Draw the trajectory (PNG) as the "
                                        f"PNAS figures do; needs matplotlib: {PLOT_EXTRA}."),
    fail_if: list[str] = typer.Option(None, "--fail-if", metavar="EXPR",
                                      help="Gate on the LAST row: fail (exit 1) when EXPR holds, e.g. 'nc1>0.01' "
                                           "(train split, else the only one) or 'test.accuracy<0.9'."),
    layers: bool = typer.Option(False, "--layers", help="Also show the per-layer NC1 of the last cache."),
    device: str = typer.Option("auto", help="cpu, cuda or auto."),
    batch_size: int = typer.Option(4096, "--batch-size", min=1, help="Rows per streamed batch."),
    normalize: bool = typer.Option(False, "--normalize", help="Audit normalised features and classifier rows."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
) -> None:
    """Follow collapse across checkpoints: one row per checkpoint, train and test side by side.

    Rows keep the order given; each is labelled by the checkpoint's epoch when its provenance records one. A
    trajectory file (.jsonl) gives its rows as written during training (a torn last line from a crash is ignored
    with a warning).
    """
    from ncaudit.audit import build_rows, gate_last_row
    from ncaudit.report import is_trajectory_file

    with _command("nothing was written"):
        files = [path for path in caches if is_trajectory_file(path)]
        if files and len(files) != len(caches):
            raise InputError("give either feature caches (.h5) or trajectory files (.jsonl), not both; audit the "
                             "caches with ncaudit report and compare them separately")
        if files:
            rows = _rows_from_files(files)
        else:
            rows = build_rows(_audit_caches(caches, batch_size, device, normalize, layers, quiet))
        outcome = gate_last_row(rows, fail_if)
        if plot is not None:
            from ncaudit.report import plot_trajectory

            plot_trajectory(rows, plot)
            stderr.print(escape(f"plot written to {plot}"))
    _print_trajectory(rows, outcome, json_out=json_out, layers=layers, wide=wide)
    if not all(c["passed"] for c in outcome):
        raise typer.Exit(code=1)


def _audit_caches(caches: list[Path], batch_size: int, device: str, normalize: bool, layers: bool,
                  quiet: bool) -> list:
    """Every cache audited (the last one with its layers when asked)."""
    from ncaudit._progress import RichProgress
    from ncaudit.audit import AuditOptions, audit

    progress = RichProgress(stderr, enabled=False if quiet else None)
    results = []
    for i, path in enumerate(caches):
        last_with_layers = layers and i == len(caches) - 1
        options = AuditOptions(batch_size=batch_size, device=device, normalize=normalize,
                               layers=[] if last_with_layers else None)
        results.append(audit(path, options, progress))
    return results


def _rows_from_files(files: list[Path]) -> list:
    """The rows of trajectory files, in the order given; a torn last line is a warning on stderr."""
    from ncaudit.report import read_trajectory

    def warn(message: str) -> None:
        stderr.print(f"[yellow]warning:[/] {escape(message)}", soft_wrap=True)

    rows = [row for path in files for row in read_trajectory(path, on_warning=warn)]
    if not rows:
        raise InputError(f"{files[0]}: the trajectory has no complete row yet; write one with TrajectoryWriter.write")
    return rows
