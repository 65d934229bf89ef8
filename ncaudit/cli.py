"""The ``ncaudit`` command line: thin wrappers that parse options, call the library and map errors to exit codes.

Exit codes: 0 every check passed, 1 a ``--fail-if`` check failed (the report is still printed), 2 bad input or usage,
130 interrupted. stdout carries the report only; progress bars, warnings and errors go to stderr. torch and timm
are imported inside the commands that need them, so ``ncaudit --help`` answers at once.
"""

from __future__ import annotations

import sys
from typing import NoReturn

import typer
from rich.console import Console

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
    stderr.print(f"[bold red]error:[/] {message}", soft_wrap=True)
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


def main() -> None:
    """Console-script entry point: run the app, turning input errors into one line and exit code 2."""
    try:
        app(standalone_mode=True)
    except InputError as exc:  # raised outside a command's own handler
        stderr.print(f"[bold red]error:[/] {exc}", soft_wrap=True)
        sys.exit(2)
