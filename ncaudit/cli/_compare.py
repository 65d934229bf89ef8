"""``ncaudit compare``."""

from __future__ import annotations

import time
from pathlib import Path

import typer
from rich.console import Console

from ncaudit.cli._app import _command, command, shown, stderr
from ncaudit.cli._output import (
    FAIL_IF_HELP,
    JSON_HELP,
    JUNIT_HELP,
    OutputFormat,
    auditor,
    check_outputs,
    exit_on_checks,
    format_option,
    pick_format,
    write_junit,
)


@command()
def compare(
    a: Path = typer.Argument(..., metavar="A", help="The reference: a saved report (JSON) or a cache.",
                             show_default=False),
    b: Path = typer.Argument(..., metavar="B", help="The candidate: a saved report (JSON) or a cache.",
                             show_default=False),
    output_format: OutputFormat = format_option("schema ncaudit.compare/1."),
    json_out: bool = typer.Option(False, "--json", help=JSON_HELP),
    fail_if: list[str] = typer.Option(None, "--fail-if", metavar="EXPR",
                                      help=FAIL_IF_HELP + " Checks apply to B; 'baseline' is A."),
    metrics: str | None = typer.Option(None, "--metrics", metavar="KEY[,KEY...]",
                                       help="Compare only these metrics (and those of --fail-if); inputs that are "
                                            "caches compute only them (see `ncaudit report --metrics`)."),
    junit: Path | None = typer.Option(None, "--junit", metavar="FILE.xml", help=JUNIT_HELP),
    output: Path | None = typer.Option(None, "--output", "-o", help="Also write the JSON comparison to this file."),
    device: str = typer.Option("auto", help="cpu, cuda or auto (for inputs that are caches)."),
    batch_size: int = typer.Option(4096, "--batch-size", min=1, help="Rows per streamed batch (memory only)."),
    ridge: float = typer.Option(0.0, help="Ridge λ ≥ 0 of the least-squares classifier (caches)."),
    rcond: float | None = typer.Option(None, help="Relative eigenvalue cut-off of Σ_T† (caches; default p·eps)."),
    normalize: bool = typer.Option(False, "--normalize", help="Audit normalised features and classifier rows "
                                   "(caches)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
) -> None:
    """Compare two audits: every metric of A and B side by side, the change, and whether it is better or worse.

    The review of a fine-tune, a pruning or a new augmentation: A is the reference, B the candidate. Each is a saved
    report (`ncaudit report --output`) or a cache (audited here). A change within the two values' uncertainty is
    'same'. Exit codes: 0 every check passed, 1 a --fail-if check failed or was undetermined, 2 bad input.
    """
    from ncaudit.audit import (
        METRIC_KEYS,
        AuditOptions,
        check_comparable,
        compare,
        gate,
        load_result,
        parse_checks,
        require_baseline_metrics,
        with_checks,
    )
    from ncaudit.report import (
        render_compare_json,
        render_compare_markdown,
        render_compare_table,
        write_text_atomic,
    )

    with _command("nothing was written"):
        form = pick_format(output_format, json_out)
        checks = parse_checks(fail_if, METRIC_KEYS)
        check_outputs({"--output": output, "--junit": junit}, [a, b])
        chosen = with_checks(metrics, [c.metric for c in checks])  # the --fail-if keys are always computed
        options = AuditOptions(batch_size=batch_size, device=device, ridge=ridge, rcond=rcond, normalize=normalize,
                               metrics=chosen)
        start = time.perf_counter()
        with auditor(options, quiet) as (run, main):
            first = load_result(a, run, flag="A")
            require_baseline_metrics(checks, first, f"A {a}")
            second = load_result(b, run, flag="B")
        seconds = time.perf_counter() - start
        if not main:
            return
        notes = check_comparable(second, first, f"A {a}", same_width=False, this="B")
        comparison = compare(first, second, str(a), str(b), warnings=notes, keys=chosen)
        gate(comparison, checks)
    for note in comparison.warnings:
        stderr.print(f"[yellow]note:[/] {shown(note)}", soft_wrap=True)
    text = render_compare_json(comparison)
    with _command("the previous files are unchanged"):
        if output is not None:
            write_text_atomic(output, text + "\n")
        write_junit(junit, f"ncaudit compare {a} {b}", comparison.checks, seconds=seconds,
                    warnings=comparison.warnings, properties={"a": str(a), "b": str(b)})
    if form == "json":
        typer.echo(text)
    elif form == "markdown":
        typer.echo(render_compare_markdown(comparison), nl=False)
    else:
        console = Console(highlight=False)
        if not console.is_terminal:  # a log or a pipe: no terminal width to respect, so fold nothing
            console = Console(highlight=False, width=200)
        render_compare_table(comparison, console)
    exit_on_checks(comparison.checks)
