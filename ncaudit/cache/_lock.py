"""One writer per cache file: an OS lock (``flock``) on ``<cache>.lock`` that records its holder."""

from __future__ import annotations

import datetime as _dt
import errno
import fcntl
import os
import socket
import threading
from pathlib import Path
from typing import ClassVar, Self

from ncaudit.errors import InputError


class WriterLock:
    """One writer per cache: an exclusive OS lock (``flock``) on ``<cache>.lock``, which records the holder.

    The kernel releases the lock when its holder exits, crashed or killed, so a later ``--resume`` takes it over; the
    file is removed when the lock is released normally. On a file system without ``flock`` the record alone is the
    lock: a record of a process that is gone (same host) is broken, one of another host is refused with its name.
    Within one thread the lock is re-entrant (``extract`` holds it for its whole run and the writer it opens shares
    it); any other thread or process is refused.

    Raises
    ------
    InputError
        Another process holds the lock (the message names its pid and host).
    """

    #: Locks held by this process: (lock path, thread id) -> [fd, references].
    _held: ClassVar[dict[tuple[str, int], list[int]]] = {}

    def __init__(self, cache: str | os.PathLike[str]) -> None:
        self.cache = Path(cache)
        self.path = self.cache.with_name(self.cache.name + ".lock")
        self._key: tuple[str, int] | None = None

    @property
    def held(self) -> bool:
        return self._key is not None

    def acquire(self) -> WriterLock:
        if self._key is not None:
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        key = (os.path.join(os.path.realpath(self.path.parent), self.path.name), threading.get_ident())
        entry = WriterLock._held.get(key)
        if entry is None:
            entry = WriterLock._held[key] = [self._lock_file(), 0]
        entry[1] += 1
        self._key = key
        return self

    def _lock_file(self) -> int:
        """Open, lock and stamp the lock file; the locked descriptor."""
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as exc:
                raise InputError(f"{self.cache}: cannot create the lock file {self.path.name} ({exc.strerror}); "
                                 "write the cache to a writable directory") from None
            try:
                if self._take(fd):
                    self._stamp(fd)
                    return fd
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)  # the previous holder removed the file between our open and our lock: retry

    def _take(self, fd: int) -> bool:
        """Lock ``fd``; False when the lock file was replaced meanwhile (then the caller retries)."""
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._busy(_read_record(fd))
        except OSError as exc:
            if exc.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                raise
            self._check_record(_read_record(fd))  # no flock here: the record is the lock
        try:
            return os.fstat(fd).st_ino == os.stat(self.path).st_ino
        except FileNotFoundError:
            return False

    def _stamp(self, fd: int) -> None:
        """Record the holder in the (locked) lock file; a full disk is one line, and leaves no empty lock file."""
        try:
            _stamp(fd)
        except OSError as exc:
            try:
                os.unlink(self.path)
            except OSError:
                pass
            raise InputError(f"{self.cache}: cannot write the lock file {self.path.name} ({exc.strerror or exc}); "
                             "nothing was written: free disk space (or fix the I/O error), then rerun") from None

    def _busy(self, holder: str) -> None:
        raise InputError(f"{self.cache}: another process ({holder or 'unknown'}) is writing this cache; wait for it to "
                         "finish or stop it, then rerun (with --resume to continue its rows)")

    def _check_record(self, holder: str) -> None:
        pid, _, host = holder.partition(" on ")
        host = host.split(" since ")[0]
        if not pid.startswith("pid ") or not pid[4:].isdigit():
            return
        if host != socket.gethostname():
            raise InputError(f"{self.cache}: {self.path.name} says {holder} is writing this cache; if that process is "
                             f"gone, delete {self.path} and rerun")
        if int(pid[4:]) != os.getpid() and _alive(int(pid[4:])):
            self._busy(holder)

    def release(self) -> None:
        """Drop this reference; the last one removes the lock file, then unlocks (so no waiter locks a stale file)."""
        if self._key is None:
            return
        entry = WriterLock._held[self._key]
        entry[1] -= 1
        if entry[1] == 0:
            del WriterLock._held[self._key]
            try:
                os.unlink(self.path)
            except OSError:
                pass
            os.close(entry[0])
        self._key = None

    def __enter__(self) -> Self:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _stamp(fd: int) -> None:
    stamp = _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")
    text = f"pid {os.getpid()} on {socket.gethostname()} since {stamp}\n".encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, text, 0)


def _read_record(fd: int) -> str:
    try:
        return os.pread(fd, 256, 0).decode("utf-8", "replace").strip()
    except OSError:
        return ""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
