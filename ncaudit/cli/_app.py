"""The ``ncaudit`` application: readable help, one-line errors and exit codes, signals, ``main``."""

from __future__ import annotations

import contextlib
import functools
import inspect
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any, NoReturn

import typer
from rich.console import Console
from rich.markup import escape
from typer.core import TyperArgument, TyperCommand, TyperGroup

from ncaudit import __version__
from ncaudit.errors import InputError, Terminated

# The report's passes alternate torch's OpenMP threads (elementwise work) with the BLAS threads of its products; OpenMP
# threads that spin after each parallel region take the cores the BLAS needs (measured: a batch of pass 1 took 1.3x
# longer). Read when torch is first imported, which the commands do lazily; a value the user set is kept.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

_TYPE_NAMES = {"str": "TEXT", "int": "INTEGER", "float": "FLOAT", "Path": "PATH", "PosixPath": "PATH"}


def _value_type(param: Any, ctx: Any) -> str | None:
    """The value column of ``--help``: nothing for a switch, the metavar when given, else TEXT, INTEGER, FLOAT or
    PATH; arguments show their metavar in the name column."""
    if getattr(param, "is_flag", False) or isinstance(param, TyperArgument):
        return None
    if param.metavar:
        return str(param.metavar)
    bare = param.bare_type() if hasattr(param, "bare_type") else ""
    return None if bare == "bool" else _TYPE_NAMES.get(bare, str(bare).upper() or None)


def _readable(params: list[Any]) -> list[Any]:
    for param in params:
        param.display_type_rich = functools.partial(_value_type, param)  # shadows the method on this instance
    return params


class _Command(TyperCommand):
    """A command whose help shows readable value types (see :func:`_value_type`)."""

    def get_params(self, ctx: Any) -> list[Any]:
        return _readable(super().get_params(ctx))


class _Group(TyperGroup):
    """The top-level group, with the same readable help."""

    def get_params(self, ctx: Any) -> list[Any]:
        return _readable(super().get_params(ctx))


app = typer.Typer(
    name="ncaudit",
    cls=_Group,
    help="Audit trained image classifiers for Neural Collapse: NC1-NC4, the least-squares classifier and MSE term (B).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)

stderr = Console(stderr=True, highlight=False)
PLOT_EXTRA = escape("pip install 'ncaudit[plot]'")  # rich markup would take [plot] for a tag


def _unwrap(doc: str | None) -> str:
    """A docstring as help text: paragraphs kept, the line breaks inside them removed (the terminal wraps)."""
    paragraphs = inspect.cleandoc(doc or "").split("\n\n")
    return "\n\n".join(" ".join(line.strip() for line in p.splitlines()) for p in paragraphs)


def command(**kwargs: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """``app.command`` with readable help: unwrapped docstring paragraphs, readable value types."""
    def register(fn: Callable[..., Any]) -> Callable[..., Any]:
        return app.command(cls=_Command, help=_unwrap(fn.__doc__), **kwargs)(fn)
    return register


def fail(message: str, code: int = 2) -> NoReturn:
    """Print one line to stderr and exit (2: bad input or usage)."""
    stderr.print(f"[bold red]error:[/] {escape(message)}", soft_wrap=True)
    raise typer.Exit(code=code)


def say_failed_checks(checks: list[dict[str, Any]]) -> bool:
    """One line on stderr per failed ``--fail-if`` check, whatever goes to stdout (table, JSON) or to files; True
    when every check passed."""
    from ncaudit.report import fmt

    for check in checks:
        if not check["passed"]:
            value = "not available" if check["value"] is None else fmt(check["value"])
            stderr.print(f"[bold red]check failed:[/] {escape(check['expression'])} (value: {value})", soft_wrap=True)
    return all(check["passed"] for check in checks)


@contextlib.contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """While the block runs, SIGTERM raises :class:`~ncaudit.errors.Terminated` (a KeyboardInterrupt) in the main
    thread, so a terminated command unwinds as Ctrl-C does (files closed, partial caches left resumable). The previous
    handler is restored after the block."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise Terminated

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def _command(after_interrupt: str) -> Iterator[None]:
    """A command's body: an InputError exits 2 with one line; Ctrl-C exits 130 and SIGTERM 143, each with one line
    ending in ``after_interrupt`` (what is left behind)."""
    with terminate_as_interrupt():
        try:
            yield
        except InputError as exc:
            fail(str(exc))
        except Terminated:
            fail(f"terminated (SIGTERM); {after_interrupt}", code=143)
        except KeyboardInterrupt:
            fail(f"interrupted; {after_interrupt}", code=130)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"ncaudit {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    ctx: typer.Context,
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    """Audit trained image classifiers for Neural Collapse.

    Typical use: `ncaudit extract` a model over a dataset into an HDF5 cache, then `ncaudit report` it.
    """
    if os.environ.get("WORLD_SIZE", "1") != "1" and ctx.invoked_subcommand:  # launched by torchrun
        from ncaudit.distributed import check_launch

        try:
            check_launch(ctx.invoked_subcommand)
        except InputError as exc:
            fail(str(exc))


@contextlib.contextmanager
def _ranks(device: str) -> Iterator[Any]:
    """The torch.distributed process group of a torchrun launch (NCCL on CUDA, gloo on CPU), None for one process."""
    from ncaudit.distributed import launch_env, process_group

    if not launch_env().distributed:
        yield None
        return
    with process_group(device) as group:
        yield group


def main() -> None:
    """Console-script entry point: run the app, turning input errors into one line and exit code 2."""
    try:
        app(standalone_mode=True)
    except InputError as exc:  # raised outside a command's own handler
        stderr.print(f"[bold red]error:[/] {escape(str(exc))}", soft_wrap=True)
        sys.exit(2)
