"""The ``ncaudit`` command line: thin wrappers that parse options, call the library and map errors to exit codes.

Exit codes: 0 every check passed, 1 a ``--fail-if`` check failed (the report is still printed), 2 bad input or usage,
130 interrupted. stdout carries the report only; progress bars, warnings and errors go to stderr. torch and timm
are imported inside the commands that need them, so ``ncaudit --help`` answers at once.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import NoReturn, Optional

import typer
from rich.console import Console
from rich.markup import escape

from ncaudit import __version__
from ncaudit.errors import InputError

app = typer.Typer(
    name="ncaudit",
    help="Audit trained image classifiers for Neural Collapse: NC1-NC4, the least-squares classifier and MSE term (B).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)

stderr = Console(stderr=True, highlight=False)


def fail(message: str, code: int = 2) -> NoReturn:
    """Print one line to stderr and exit (2: bad input or usage)."""
    stderr.print(f"[bold red]error:[/] {escape(message)}", soft_wrap=True)
    raise typer.Exit(code=code)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"ncaudit {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    """Audit trained image classifiers for Neural Collapse.

    Typical use: `ncaudit extract` a checkpoint over a dataset into an HDF5 cache, then `ncaudit report` it.
    """


@app.command()
def report(
    cache: Path = typer.Argument(..., help="Feature cache (.h5, schema 1) written by `ncaudit extract` or any tool.",
                                 show_default=False),
    json_out: bool = typer.Option(False, "--json", help="Print the JSON report (schema ncaudit.report/1) on stdout "
                                  "instead of the table; nothing else goes to stdout."),
    fail_if: list[str] = typer.Option(None, "--fail-if", metavar="EXPR",
                                      help="Fail (exit 1) when EXPR holds, e.g. 'nc1>0.05' or 'accuracy<0.9'. "
                                           "Repeatable. EXPR is METRIC OP NUMBER, OP one of < <= > >=."),
    device: str = typer.Option("auto", help="cpu, cuda or auto (CUDA when available). Same numbers either way."),
    batch_size: int = typer.Option(4096, "--batch-size", min=1, help="Rows per streamed batch (memory only)."),
    ridge: float = typer.Option(0.0, help="Ridge λ ≥ 0 of the least-squares classifier W_LS = Σ_YH (Σ_T + λI)†."),
    rcond: Optional[float] = typer.Option(None, help="Relative eigenvalue cut-off of Σ_T† (default p·eps)."),
    allow_partial: bool = typer.Option(False, "--allow-partial",
                                       help="Audit the rows written so far of an incomplete cache."),
    drop_empty_classes: bool = typer.Option(False, "--drop-empty-classes",
                                            help="Leave out classes without samples and their classifier rows "
                                                 "(audit a subset of the classes)."),
    per_class: bool = typer.Option(False, "--per-class", help="Add the per-class table (always in the JSON)."),
    normalize: bool = typer.Option(False, "--normalize", help="Audit h/‖h‖ and w_c/‖w_c‖ with b = 0 (feature-"
                                   "normalised or cosine-classifier models)."),
    layers: bool = typer.Option(False, "--layers", help="Also audit the earlier layers stored under /layers "
                                "(NC1, CDNV, NC2 of the means, NCC accuracy per layer)."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Also write the JSON report to this file "
                                          "(written only once every metric is computed)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars (they are drawn only when stderr is a terminal)."),
) -> None:
    """Compute every Neural Collapse metric of a feature cache and gate on thresholds.

    Two streaming passes over the file (statistics, then per-sample decisions); memory does not grow with the
    number of samples. Exit codes: 0 every check passed, 1 a --fail-if check failed, 2 bad input.
    """
    from ncaudit.audit import METRIC_KEYS, AuditOptions, audit
    from ncaudit.checks import evaluate, parse_checks
    from ncaudit.progress import RichProgress
    from ncaudit.report import render_json, render_table

    try:
        checks = parse_checks(fail_if, METRIC_KEYS)
        options = AuditOptions(
            batch_size=batch_size, device=device, ridge=ridge, rcond=rcond, allow_partial=allow_partial,
            drop_empty_classes=drop_empty_classes, normalize=normalize, layers=[] if layers else None,
        )
        result = audit(cache, options, RichProgress(stderr, enabled=False if quiet else None))
    except InputError as exc:
        fail(str(exc))
    result.checks = evaluate(checks, result.metrics)
    for warning in result.warnings:
        stderr.print(f"[yellow]warning:[/] {escape(warning)}", soft_wrap=True)
    text = render_json(result)
    if output is not None:
        try:
            output.parent.mkdir(parents=True, exist_ok=True)
            output.write_text(text + "\n")
        except OSError as exc:
            fail(f"cannot write {output}: {exc.strerror or exc}; choose a writable path for --output")
    if json_out:
        typer.echo(text)
    else:
        render_table(result, Console(highlight=False), per_class=per_class)
    if not result.passed:
        raise typer.Exit(code=1)



@app.command()
def trajectory(
    caches: list[Path] = typer.Argument(..., help="Caches in training order (e.g. one per checkpoint and split).",
                                        show_default=False),
    json_out: bool = typer.Option(False, "--json", help="Print the trajectory as JSON on stdout."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Draw the trajectory (PNG) as the PNAS figures do; "
                                        "needs matplotlib: pip install 'ncaudit[plot]'."),
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

    Rows keep the order given; each is labelled by the checkpoint's epoch when its provenance records one.
    """
    from ncaudit.audit import AuditOptions, audit
    from ncaudit.checks import evaluate, parse_checks
    from ncaudit.progress import RichProgress
    from ncaudit.report import render_trajectory_json, trajectory_table
    from ncaudit.trajectory import build_rows, known_keys

    try:
        progress = RichProgress(stderr, enabled=False if quiet else None)
        results = []
        for i, path in enumerate(caches):
            last_with_layers = layers and i == len(caches) - 1
            options = AuditOptions(batch_size=batch_size, device=device, normalize=normalize,
                                   layers=[] if last_with_layers else None)
            results.append(audit(path, options, progress))
        rows = build_rows(results)
        checks = parse_checks(fail_if, known_keys(rows))
        outcome = evaluate(checks, {key: rows[-1].value(key) for key in known_keys(rows)})
        if plot is not None:
            from ncaudit.plot import plot_trajectory

            plot_trajectory(rows, plot)
            stderr.print(f"plot written to {plot}")
    except InputError as exc:
        fail(str(exc))
    if json_out:
        typer.echo(render_trajectory_json(rows, outcome))
    else:
        console = Console(highlight=False)
        if not console.is_terminal:  # a log or a pipe: no terminal width to respect, so do not truncate cells
            console = Console(highlight=False, width=200)
        console.print(trajectory_table(rows, layers=layers))
        for c in outcome:
            style = "green" if c["passed"] else "bold red"
            console.print(f"[{style}]{c['outcome']}[/]: fails if {c['expression']} (last row: {c['value']})")
    if not all(c["passed"] for c in outcome):
        raise typer.Exit(code=1)


def main() -> None:
    """Console-script entry point: run the app, turning input errors into one line and exit code 2."""
    try:
        app(standalone_mode=True)
    except InputError as exc:  # raised outside a command's own handler
        stderr.print(f"[bold red]error:[/] {escape(str(exc))}", soft_wrap=True)
        sys.exit(2)
