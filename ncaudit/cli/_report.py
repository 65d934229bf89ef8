"""``ncaudit report``."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import typer
from rich.console import Console

from ncaudit.cli._app import _command, command, shown, stderr
from ncaudit.cli._output import (
    FAIL_IF_HELP,
    JSON_HELP,
    JUNIT_HELP,
    METRICS_HELP,
    OutputFormat,
    auditor,
    check_outputs,
    exit_on_checks,
    format_option,
    pick_format,
    write_junit,
)


@command()
def report(
    cache: Path = typer.Argument(..., help="Feature cache (.h5, schema 1) written by `ncaudit extract` or any tool.",
                                 show_default=False),
    output_format: OutputFormat = format_option("schema ncaudit.report/1; nothing else goes to stdout."),
    json_out: bool = typer.Option(False, "--json", help=JSON_HELP),
    fail_if: list[str] = typer.Option(None, "--fail-if", metavar="EXPR", help=FAIL_IF_HELP),
    metrics: str | None = typer.Option(None, "--metrics", metavar="KEY[,KEY...]", help=METRICS_HELP),
    baseline: Path | None = typer.Option(None, "--baseline", metavar="OLD", help="The last good audit, for "
                                         "'baseline' in --fail-if: a saved report (--output / --json) or a cache "
                                         "(audited with the same options). Refused when its schema, class count or "
                                         "feature width differs."),
    junit: Path | None = typer.Option(None, "--junit", metavar="FILE.xml", help=JUNIT_HELP),
    device: str = typer.Option("auto", help="cpu, cuda or auto (CUDA when available). Same numbers either way."),
    batch_size: int = typer.Option(4096, "--batch-size", min=1, help="Rows per streamed batch (memory only)."),
    ridge: float = typer.Option(0.0, help="Ridge λ ≥ 0 of the least-squares classifier W_LS = Σ_YH (Σ_T + λI)†."),
    rcond: float | None = typer.Option(None, help="Relative eigenvalue cut-off of Σ_T† (default p·eps)."),
    allow_partial: bool = typer.Option(False, "--allow-partial",
                                       help="Audit the rows written so far of an incomplete cache."),
    allow_external: bool = typer.Option(False, "--allow-external",
                                        help="Also read the files the cache's external links, external storage and "
                                             "virtual datasets reach (refused by default: a cache holds its own data "
                                             "or its shards'); the JSON source.files names every file read."),
    drop_empty_classes: bool = typer.Option(False, "--drop-empty-classes",
                                            help="Leave out classes without samples and their classifier rows "
                                                 "(audit a subset of the classes)."),
    per_class: bool = typer.Option(False, "--per-class", help="Add the per-class table (always in the JSON; folded "
                                   "in the markdown)."),
    normalize: bool = typer.Option(False, "--normalize", help="Audit h/‖h‖ and w_c/‖w_c‖ with b = 0 (feature-"
                                   "normalised or cosine-classifier models)."),
    layers: bool = typer.Option(False, "--layers", help="Also audit the earlier layers stored under /layers "
                                "(NC1, CDNV, NC2 of the means, NCC accuracy per layer)."),
    means_from: Path | None = typer.Option(None, "--means-from", metavar="TRAIN.h5", help="The training cache of "
                                              "the same checkpoint: NCC accuracy, NC4 and CDNV of this (test) cache "
                                              "against the training class means, as the literature on test-set "
                                              "collapse measures them (the table and the JSON say so)."),
    output: Path | None = typer.Option(None, "--output", "-o", help="Also write the JSON report to this file "
                                          "(written only once every metric is computed)."),
    ood: Path | None = typer.Option(None, "--ood", metavar="OOD.h5", help="A cache of out-of-distribution features "
                                    "from the same network (labels not read): adds NC5, mean |cos(μ_c, μ_G^OOD)|."),
    quiet: bool = typer.Option(False, "--quiet", "-q",
                               help="No progress bars (they are drawn only when stderr is a terminal)."),
) -> None:
    """Compute every Neural Collapse metric of a feature cache and gate on thresholds.

    Two streaming passes over the file (statistics, then per-sample decisions); memory does not grow with the
    number of samples. --metrics computes only the metrics named (and the --fail-if ones): '--metrics nc1' reads the
    file once and skips the decisions and the least squares. Every value is printed with the digits its features
    determine: how far it moves when each stored feature is perturbed by one rounding unit of its dtype (float32, float16, bfloat16), the float64
    arithmetic and an undetermined rank included, is the JSON's details.uncertainty (relative, by metric key),
    shown as '-0.016 ±31%' or '~2e-2 (undetermined)', with a warning naming the cause and the fix above 1e-3; a
    check whose threshold lies within that uncertainty fails as undetermined. With --baseline, checks can be
    relative to the last good model ('nc1 > baseline * 1.2').
    Exit codes: 0 every check passed, 1 a --fail-if check failed or was undetermined, 2 bad input.
    """
    from ncaudit.audit import (
        METRIC_KEYS,
        AuditOptions,
        baseline_info,
        check_comparable,
        evaluate,
        load_result,
        parse_checks,
        require_baseline,
        require_baseline_metrics,
        with_checks,
    )
    from ncaudit.report import render_json, render_markdown, render_table, write_text_atomic

    with _command("nothing was written"):
        form = pick_format(output_format, json_out)
        checks = parse_checks(fail_if, METRIC_KEYS)
        require_baseline(checks, baseline is not None)
        chosen = with_checks(metrics, [c.metric for c in checks])  # the --fail-if keys are always computed
        check_outputs({"--output": output, "--junit": junit},
                      [cache, *([baseline] if baseline else []), *([means_from] if means_from is not None else []),
                       *([ood] if ood is not None else [])])
        options = AuditOptions(
            batch_size=batch_size, device=device, ridge=ridge, rcond=rcond, allow_partial=allow_partial,
            allow_external=allow_external,
            drop_empty_classes=drop_empty_classes, normalize=normalize, layers=[] if layers else None,
            means_from=means_from, metrics=chosen, per_class=per_class,
        )
        start = time.perf_counter()
        with auditor(options, quiet) as (run, main):
            old = None if baseline is None else load_result(baseline, run)  # first: a bad baseline fails at once
            if old is not None:
                require_baseline_metrics(checks, old, f"--baseline {baseline}")
            result = run(cache, ood=ood)
        seconds = time.perf_counter() - start
        if not main:  # a rank other than 0 under torchrun: rank 0 reports
            return
        if old is not None:
            result.warnings.extend(check_comparable(result, old, f"--baseline {baseline}"))
            result.baseline = baseline_info(baseline, old)
    result.checks = evaluate(
        checks, result.metrics, uncertainty=result.details.get("uncertainty"),
        baseline=None if old is None else old.metrics,
        baseline_uncertainty=None if old is None else old.details.get("uncertainty"),
    )
    for warning in result.warnings:
        stderr.print(f"[yellow]warning:[/] {shown(warning)}", soft_wrap=True)
    text = render_json(result)
    with _command("the previous files are unchanged"):
        if output is not None:
            write_text_atomic(output, text + "\n")
        write_junit(junit, f"ncaudit report {cache}", result.checks, seconds=seconds, warnings=result.warnings,
                    properties=_properties(result))
    if form == "json":
        typer.echo(text)
    elif form == "markdown":
        typer.echo(render_markdown(result, per_class=per_class), nl=False)
    else:
        render_table(result, Console(highlight=False), per_class=per_class)
    exit_on_checks(result.checks)


def _properties(result: Any) -> dict[str, Any]:
    """What a JUnit report records of the audit: the cache, its provenance, its size, the baseline."""
    src = result.source
    return {"path": src.get("path"), "model": src.get("model"), "checkpoint": src.get("checkpoint"),
            "split": src.get("split"), "n_samples": result.n_samples, "n_features": result.n_features,
            "n_classes": result.n_classes, "baseline": (result.baseline or {}).get("path")}
