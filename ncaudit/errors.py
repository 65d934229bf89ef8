"""The project's error types.

Every problem with the user's input (a file, a flag, a checkpoint) is raised as :class:`InputError` with a one-line
message that names the problem and the fix; the CLI prints it to stderr and exits with code 2.
"""

from __future__ import annotations


class InputError(ValueError):
    """Bad input: the message names the problem and how to fix it. The CLI maps it to exit code 2."""


class CacheWriteError(InputError):
    """Writing a feature cache failed (disk full, I/O error); the file keeps the rows known to be on disk.

    The message says how many rows are kept and how to continue (``extract --resume``); it is complete as it is.
    """


class MirroredError(InputError):
    """An error another rank of a distributed run stopped on, raised on this rank too so that every rank stops.

    Rank 0 prints the message (whichever rank failed); the other ranks exit with code 2 and print nothing, so a failed
    run says what went wrong once.
    """

    quiet = True


class Terminated(KeyboardInterrupt):
    """SIGTERM while a command runs, raised where Ctrl-C would be; the CLI exits with 143 (128 + SIGTERM)."""
