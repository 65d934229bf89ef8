"""``ncaudit report``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape

from ncaudit.cli._app import _command, _ranks, command, stderr


@command()
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
    rcond: float | None = typer.Option(None, help="Relative eigenvalue cut-off of Σ_T† (default p·eps)."),
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
    output: Path | None = typer.Option(None, "--output", "-o", help="Also write the JSON report to this file "
                                          "(written only once every metric is computed)."),
    quiet: bool = typer.Option(False, "--quiet", "-q",
                               help="No progress bars (they are drawn only when stderr is a terminal)."),
) -> None:
    """Compute every Neural Collapse metric of a feature cache and gate on thresholds.

    Two streaming passes over the file (statistics, then per-sample decisions); memory does not grow with the
    number of samples. Every value is printed with the digits its features determine: how far it moves when each
    stored feature is perturbed by one rounding unit of its dtype (float32, float16, bfloat16), the float64
    arithmetic and an undetermined rank included, is the JSON's details.uncertainty (relative, by metric key),
    shown as '-0.016 ±31%' or '~2e-2 (undetermined)', with a warning naming the cause and the fix above 1e-3.
    Exit codes: 0 every check passed, 1 a --fail-if check failed, 2 bad input.
    """
    from ncaudit.audit import METRIC_KEYS, AuditOptions, evaluate, parse_checks
    from ncaudit.report import check_output, render_json, render_table, write_text_atomic

    with _command("nothing was written"):
        checks = parse_checks(fail_if, METRIC_KEYS)
        if output is not None:
            check_output(output, [cache])
        options = AuditOptions(
            batch_size=batch_size, device=device, ridge=ridge, rcond=rcond, allow_partial=allow_partial,
            drop_empty_classes=drop_empty_classes, normalize=normalize, layers=[] if layers else None,
        )
        result = _audit_on_ranks(cache, options, quiet)
    if result is None:  # a rank other than 0 under torchrun: rank 0 reports
        return
    result.checks = evaluate(checks, result.metrics)
    for warning in result.warnings:
        stderr.print(f"[yellow]warning:[/] {escape(warning)}", soft_wrap=True)
    text = render_json(result)
    if output is not None:
        with _command(f"{output} is unchanged"):
            write_text_atomic(output, text + "\n")
    if json_out:
        typer.echo(text)
    else:
        render_table(result, Console(highlight=False), per_class=per_class)
    if not result.passed:
        raise typer.Exit(code=1)


def _audit_on_ranks(cache: Path, options: Any, quiet: bool) -> Any:
    """``audit`` in one process, or on every rank of a torchrun launch (None on ranks other than 0)."""
    from ncaudit._progress import RichProgress
    from ncaudit.audit import audit

    with _ranks(options.device) as group:
        main = group is None or group.is_main
        result = audit(cache, options, RichProgress(stderr, enabled=False if quiet or not main else None), group)
    return result if main else None
