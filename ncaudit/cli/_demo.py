"""``ncaudit demo``."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.markup import escape

from ncaudit.cli._app import _command, command, stderr
from ncaudit.cli._output import exit_on_checks
from ncaudit.cli._trajectory import _print_trajectory, say_written


@command()
def demo(
    out: Path | None = typer.Option(None, "--out", "-o", help="Keep the caches, JSON reports, trajectory (JSON, "
                                       "CSV) and plot in this directory, created when missing (default: a temporary "
                                       "one, removed at the end)."),
    json_out: bool = typer.Option(False, "--json", help="Print the trajectory as JSON on stdout (every metric)."),
    wide: bool = typer.Option(False, "--wide", help="Every column in the table; the default fits 80 columns."),
    fail_if: list[str] = typer.Option(None, "--fail-if", metavar="EXPR", help="Gate on the last checkpoint, as "
                                      "trajectory does (e.g. 'nc1>0.01')."),
    device: str = typer.Option("cpu", help="cpu, cuda or auto."),
    fixtures: Path | None = typer.Option(None, "--fixtures", help="Fixtures directory (default: the bundled "
                                            "fixtures/ of a source checkout, or $NCAUDIT_FIXTURES)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No step-by-step progress on stderr."),
) -> None:
    """Run the real pipeline on the bundled digits: extract every checkpoint (train and test), report, trajectory.

    A small timm network trained into its terminal phase on real handwritten digits: watch NC1 fall by orders of
    magnitude and NC4 reach zero, and the test images measured against the training means. No GPU, no network, no
    data of your own; about 10 s of CPU time on 2 CPU cores (mostly the network's forward passes over 9,000
    images). What ncaudit run does for your own checkpoints.
    """
    import tempfile

    from ncaudit._demo import EXPLANATION, run_demo

    say = (lambda line: None) if quiet else (lambda line: stderr.print(escape(line), soft_wrap=True))
    with tempfile.TemporaryDirectory(prefix="ncaudit-demo-") as tmp:
        target = out if out is not None else Path(tmp)
        with _command("the demo stopped"):
            result = run_demo(target, fixtures=fixtures, device=device, progress=say, fail_if=fail_if)
    _print_trajectory(result.rows, result.checks, output_format="json" if json_out else "table", preface=EXPLANATION,
                      wide=wide)
    if out is None:
        stderr.print("pass --out DIR to keep the caches, JSON reports and trajectory plot", soft_wrap=True)
    else:
        say_written(result, out)
    exit_on_checks(result.checks)
