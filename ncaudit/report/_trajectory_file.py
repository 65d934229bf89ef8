"""Trajectory files: one JSON line per epoch of a training run (:class:`TrajectoryWriter`), read back by
:func:`read_trajectory` and ``ncaudit trajectory run.jsonl``.

Each line is ``{"schema": "ncaudit.trajectory-row/1", "epoch", "label", "time", "splits": {name: report}}`` with every
split's full report (schema ``ncaudit.report/1``). A row is appended with one ``write`` and flushed to disk
(``fsync``) before :meth:`TrajectoryWriter.write` returns, so a run that crashes keeps every row written before; a
write that fails is cut back to the rows on disk. A crash during a write can leave a torn last line (no newline, or
bytes that do not parse): the reader ignores it with a warning, never misreads it, and a writer that resumes the
file cuts it off first. One writer per file (a lock beside it).
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

from ncaudit.audit import AuditResult, TrajectoryRow, json_safe, result_from_json, result_to_json
from ncaudit.cache import WriterLock
from ncaudit.errors import CacheWriteError, InputError

ROW_SCHEMA = "ncaudit.trajectory-row/1"


def _parse_row(line: bytes, number: int, where: str) -> dict[str, Any]:
    """One complete line as a row, or an InputError naming the line."""
    try:
        row = json.loads(line)
    except (UnicodeDecodeError, json.JSONDecodeError):
        row = None
    if not isinstance(row, dict) or row.get("schema") != ROW_SCHEMA or not isinstance(row.get("splits"), dict):
        raise InputError(f"{where}: line {number} is not a trajectory row (schema {ROW_SCHEMA}); the file is not a "
                         "trajectory written by ncaudit.TrajectoryWriter, or it was edited")
    return row


def _scan(path: Path) -> tuple[list[dict[str, Any]], int, str | None]:
    """``(rows, bytes of the complete rows, warning about a torn last line or None)``.

    Every line but the last must be a row; the last one counts only when it ends in a newline and parses.
    """
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1  # bytes up to and including the last newline
    lines = data[:end].split(b"\n")[:-1]
    rows = [_parse_row(line, i + 1, str(path)) for i, line in enumerate(lines)]
    torn = None
    if end < len(data):
        torn = (f"{path}: ignored a torn last line ({len(data) - end} bytes without a newline: a write was cut off, "
                f"e.g. by a crash); the {len(rows)} complete rows before it are read")
    return rows, end, torn


class TrajectoryWriter:
    """Append one row per epoch (its splits' audits) to a JSON-lines file that ``ncaudit trajectory`` reads and plots.

    Parameters
    ----------
    path
        The ``.jsonl`` file. An existing trajectory is continued (a torn last line cut off, with a warning), so a run
        resumed after a crash appends to the rows it kept; ``overwrite`` starts it afresh.
    overwrite
        Replace an existing file.

    Raises
    ------
    InputError
        ``path`` is a directory, another process writes it, or it holds something else than trajectory rows.

    Examples
    --------
    >>> with TrajectoryWriter("run.jsonl") as log:                        # doctest: +SKIP
    ...     for epoch in range(epochs):
    ...         train_one_epoch(model)
    ...         log.write(epoch, train=audit_model(model, train_eval_loader),
    ...                   test=audit_model(model, test_loader))
    """

    #: Files open for writing in this process (the lock file keeps out other processes).
    _open: ClassVar[set[str]] = set()

    def __init__(self, path: str | os.PathLike[str], *, overwrite: bool = False) -> None:
        self.path = Path(path)
        self._fd: int | None = None
        if self.path.is_dir():
            raise InputError(f"{self.path}: is a directory; give a file name, e.g. run.jsonl")
        self._key = os.path.realpath(self.path)
        if self._key in TrajectoryWriter._open:
            raise InputError(f"{self.path}: another TrajectoryWriter of this process writes it; one writer per file")
        self._lock = WriterLock(self.path).acquire()
        try:
            self.rows = self._prepare(overwrite)
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        except BaseException:
            self._lock.release()
            raise
        TrajectoryWriter._open.add(self._key)

    def _prepare(self, overwrite: bool) -> int:
        """Rows already in the file (0 when new or overwritten); a torn last line is cut off."""
        if overwrite or not self.path.exists():
            if self.path.exists():
                os.truncate(self.path, 0)
            return 0
        rows, end, torn = _scan(self.path)
        if torn is not None:
            warnings.warn(torn.replace("ignored", "cut off"), stacklevel=3)
            os.truncate(self.path, end)
        return len(rows)

    def write(self, epoch: int | None = None, *, label: str | None = None, **splits: AuditResult) -> dict[str, Any]:
        """Append one row: ``epoch``, an optional ``label`` (default ``epoch N``) and one audit per split
        (``train=...``, ``test=...``); returns the row as written. It is on disk when this returns.

        Raises
        ------
        CacheWriteError
            The write failed (disk full, I/O error): the file keeps the rows written before, the run should stop.
        """
        if not splits:
            raise InputError("TrajectoryWriter.write needs at least one split, e.g. write(epoch, train=result)")
        row = {
            "schema": ROW_SCHEMA,
            "epoch": None if epoch is None else int(epoch),
            "label": label or (f"epoch {int(epoch)}" if epoch is not None else f"row {self.rows}"),
            "time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "splits": {name: result_to_json(result) for name, result in splits.items()},
        }
        if self._fd is None:
            raise InputError(f"{self.path}: the writer is closed")
        data = (json.dumps(json_safe(row), allow_nan=False, separators=(",", ":")) + "\n").encode()
        size = os.fstat(self._fd).st_size
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(self._fd, view):]
            os.fsync(self._fd)
        except OSError as exc:
            try:
                os.ftruncate(self._fd, size)  # back to the rows known to be on disk
            except OSError:
                pass
            raise CacheWriteError(f"{self.path}: writing row {self.rows + 1} failed ({exc.strerror or exc}); the "
                                  f"file keeps its {self.rows} rows: free space or fix the path, then continue the "
                                  "run (the writer appends to them)") from None
        self.rows += 1
        return row

    def close(self) -> None:
        """Close the file and release the lock."""
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)  # type: ignore[arg-type]
            self._fd = None
            self._lock.release()
            TrajectoryWriter._open.discard(self._key)

    def __enter__(self) -> TrajectoryWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


def is_trajectory_file(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` looks like a trajectory file (``.jsonl`` / ``.ndjson``, or text starting with ``{``), not a
    feature cache."""
    path = Path(path)
    if path.suffix.lower() in (".jsonl", ".ndjson"):
        return True
    try:
        with open(path, "rb") as fh:
            head = fh.read(64).lstrip()
    except OSError:
        return False
    return head.startswith(b"{")


def read_trajectory(path: str | os.PathLike[str],
                    on_warning: Callable[[str], None] | None = None) -> list[TrajectoryRow]:
    """The rows of a trajectory file, in the order written; a torn last line is ignored and reported to
    ``on_warning`` (default: :func:`warnings.warn`).

    Raises
    ------
    InputError
        Missing file, or a complete line that is not a trajectory row.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such trajectory file; write one with ncaudit.TrajectoryWriter")
    rows, _, torn = _scan(path)
    if torn is not None:
        (on_warning or (lambda msg: warnings.warn(msg, stacklevel=3)))(torn)
    out = []
    for i, row in enumerate(rows):
        try:
            splits = {name: result_from_json(report, f"{path}: line {i + 1}")
                      for name, report in row["splits"].items()}
        except InputError:
            raise
        except (ValueError, KeyError, TypeError, AttributeError):
            raise InputError(f"{path}: line {i + 1} holds a report that is not of schema ncaudit.report/1") from None
        if not splits:
            raise InputError(f"{path}: line {i + 1} has no split")
        epoch = row.get("epoch")
        out.append(TrajectoryRow(key=f"{path}#{i}", label=str(row.get("label") or f"row {i}"),
                                 epoch=None if epoch is None else int(epoch), checkpoint=None, splits=splits))
    return out
