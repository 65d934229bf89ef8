"""The project's error types.

Every problem with the user's input (a file, a flag, a checkpoint) is raised as :class:`InputError` with a one-line
message that names the problem and the fix; the CLI prints it to stderr and exits with code 2.
"""

from __future__ import annotations


class InputError(ValueError):
    """Bad input: the message names the problem and how to fix it. The CLI maps it to exit code 2."""
