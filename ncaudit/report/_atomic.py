"""Output files that are written whole or not at all, and never over an input.

A report goes to a temporary file in the target's directory, is flushed to disk and only then renamed over the
target, so a full disk or a crash leaves the previous file as it was (never a truncated one). An output path that is
an HDF5 file (a feature cache, a shard) or one of the command's inputs is refused: ``extract -o`` names the cache, so
``report X.h5 -o X.h5`` is an easy slip.
"""

from __future__ import annotations

import os
import stat
import tempfile
from collections.abc import Sequence
from pathlib import Path

import h5py

from ncaudit.errors import InputError


def is_hdf5(path: Path) -> bool:
    """Whether ``path`` holds an HDF5 superblock signature (at offset 0, 512, 1024, ... as the format allows)."""
    try:
        return bool(h5py.is_hdf5(path))
    except OSError:
        return False


def check_output(path: Path, inputs: Sequence[Path], flag: str = "--output") -> None:
    """Refuse an output path that is a directory, one of ``inputs``, or an existing HDF5 file."""
    if path.is_dir():
        raise InputError(f"{flag} {path}: is a directory; give a file name, e.g. report.json")
    if not path.exists():
        return
    for source in inputs:
        try:
            same = os.path.samefile(path, source)
        except OSError:
            same = False
        if same:
            raise InputError(f"{flag} {path}: is the input {source}, which writing would destroy; give another file "
                             "name, e.g. report.json")
    if is_hdf5(path):
        raise InputError(f"{flag} {path}: is an HDF5 file (a feature cache?) that the report would replace; give "
                         "another file name, e.g. report.json")


def write_text_atomic(path: Path, text: str, flag: str = "--output") -> None:
    """Write ``text`` to ``path`` through a temporary file in the same directory, synced and then renamed.

    The target keeps its previous content until the new one is complete on disk; on failure the temporary file is
    removed. A target that is not a regular file (``/dev/stdout``, a pipe) is written directly.

    Raises
    ------
    InputError
        The directory is not writable, the disk is full, or another I/O error; the previous file is unchanged.
    """
    data = text.encode("utf-8")
    try:
        if path.exists() and not stat.S_ISREG(path.stat().st_mode):
            with open(path, "wb") as fh:
                fh.write(data)
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        _replace(path, data)
    except OSError as exc:
        raise InputError(f"cannot write {flag} {path}: {exc.strerror or exc}; the previous file, if any, is "
                         "unchanged: choose a writable path with free space") from None


def _replace(path: Path, data: bytes) -> None:
    mode = path.stat().st_mode & 0o777 if path.exists() else 0o666 & ~_umask()
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
