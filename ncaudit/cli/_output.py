"""What the gating commands (``report``, ``compare``, ``trajectory``) share: ``--format`` / ``--json``, ``--junit``,
output files checked before any work and written whole, audits on the ranks of a launch, the exit code of the checks.
"""

from __future__ import annotations

import contextlib
import enum
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import typer

from ncaudit.cli._app import _ranks, say_failed_checks, stderr
from ncaudit.errors import InputError


class OutputFormat(str, enum.Enum):
    """What stdout carries."""

    table = "table"
    json = "json"
    markdown = "markdown"


FORMAT_HELP = ("What stdout carries: table (for a terminal or a log), json (every value, for jq and scripts) or "
               "markdown (a GitHub job summary or PR comment: verdict, failed checks first, a compact table).")
JSON_HELP = "The same as --format json."
JUNIT_HELP = ("Also write the checks as JUnit XML (one test case per --fail-if; failed and undetermined checks as "
              "failures) for GitLab, Jenkins or Azure test reports. Written whole, once the audit is done.")
FAIL_IF_HELP = ("Fail (exit 1) when EXPR holds. Repeatable. EXPR is METRIC OP NUMBER (e.g. 'nc1>0.05', "
                "'accuracy<0.9') or METRIC OP baseline [* NUMBER | + NUMBER | - NUMBER] (e.g. 'nc1 > baseline * 1.2', "
                "'accuracy < baseline - 0.01'); OP is < <= > >=, METRIC any metric key, in any case. A check whose "
                "outcome the values' uncertainty could flip fails as undetermined.")

METRICS_HELP = ("Compute only these metrics (keys of the JSON's metrics, comma-separated, any case; e.g. 'nc1' or "
                "'nc1,accuracy'), plus those of --fail-if; only the passes they need run (nc1, cdnv, NC2, NC3, "
                "mse_loss: one pass; accuracy, ncc_accuracy, nc4: two; mse_term_a/b, ls_*: the least squares). "
                "Metrics not asked for are absent from the JSON; details.computed lists those asked. Default: all.")


def format_option(json_note: str) -> Any:
    """The ``--format`` option; ``json_note`` says what the JSON holds."""
    return typer.Option(None, "--format", metavar="table|json|markdown", help=f"{FORMAT_HELP} JSON: {json_note}",
                        show_default=False)


def pick_format(output_format: OutputFormat | None, json_out: bool) -> str:
    """The format asked for: ``--json`` is ``--format json``; both, disagreeing, is a usage error."""
    if json_out and output_format not in (None, OutputFormat.json):
        raise InputError(f"--json and --format {output_format.value} ask for two formats; give one of them")
    return "json" if json_out else (output_format or OutputFormat.table).value


def check_outputs(outputs: Mapping[str, Path | None], inputs: Sequence[Path]) -> None:
    """Refuse, before any work, an output that is an input, a cache, a directory, or the same file as another
    output (``--output r.json --junit r.json``)."""
    from ncaudit.report import check_output

    given = {flag: path for flag, path in outputs.items() if path is not None}
    for flag, path in given.items():
        check_output(path, inputs, flag=flag)
    seen: dict[str, str] = {}
    for flag, path in given.items():
        key = os.path.realpath(path)
        if key in seen:
            raise InputError(f"{seen[key]} and {flag} name the same file {path}; give each its own")
        seen[key] = flag


def write_junit(path: Path | None, suite: str, checks: list[dict[str, Any]], *, seconds: float,
                properties: Mapping[str, Any] | None = None, warnings: Sequence[str] = ()) -> None:
    """``--junit FILE``: the checks as JUnit XML, written atomically (nothing when ``path`` is None)."""
    if path is None:
        return
    from ncaudit.report import render_junit, write_text_atomic

    xml = render_junit(suite, checks, properties=properties, warnings=warnings, time=seconds,
                       classname=" ".join(suite.split()[:2]))  # "ncaudit report": GitLab shows it as the suite
    write_text_atomic(path, xml, flag="--junit")


@contextlib.contextmanager
def auditor(options: Any, quiet: bool) -> Iterator[tuple[Callable[..., Any], bool]]:
    """``(audit one cache, is this the rank that reports)``: one process, or every rank of a torchrun launch in one
    process group (each rank audits its rows of each cache; rank 0 reports). Keywords go to
    :func:`ncaudit.audit.audit_cache` (``ood=``)."""
    from ncaudit._progress import RichProgress
    from ncaudit.audit import audit

    with _ranks(options.device) as group:
        main = group is None or group.is_main
        progress = RichProgress(stderr, enabled=False if quiet or not main else None)
        yield (lambda path, **kwargs: audit(path, options, progress, group, **kwargs)), main


def exit_on_checks(checks: Sequence[dict[str, Any]]) -> None:
    """The end of a gating command, the one place that turns checks into the exit code: 1 when any check failed
    (undetermined ones included), each then one line on stderr whatever goes to stdout; else return (exit 0)."""
    if not say_failed_checks(list(checks)):
        raise typer.Exit(code=1)
