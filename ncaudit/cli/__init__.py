"""The ``ncaudit`` command line: thin wrappers that parse options, call the library and map errors to exit codes.

Exit codes: 0 every check passed, 1 a ``--fail-if`` check failed (the report is still printed), 2 bad input or usage,
130 interrupted (Ctrl-C), 143 terminated (SIGTERM, handled like Ctrl-C). stdout carries the report only; progress
bars, warnings and errors go to stderr. torch and timm are imported inside the commands that need them, so
``ncaudit --help`` answers at once. One module per command; importing this package registers them in help order.
"""

from ncaudit.cli._app import app, main

# isort: off
# Importing registers the commands, in help order.
from ncaudit.cli import _extract, _report, _compare, _trajectory, _run, _demo  # noqa: F401
# isort: on

__all__ = ["app", "main"]
