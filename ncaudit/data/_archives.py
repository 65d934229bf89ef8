"""Tar archives read exactly or refused: every member header read once, the end-of-archive marker required, links
resolved as the folder scan resolves them, duplicate names refused.

Python's ``tarfile`` stops at the first header it cannot read and calls that the end, so an archive cut inside a
header (or inside a member's data, or followed by garbage) reads as a shorter archive without a word. Here the end
must be the end-of-archive marker (a zero block) and every member's data must lie within the file; anything else is
an error naming the archive and the last member read.

The rules follow the folder scan of the same images extracted (:mod:`ncaudit.data._reader_folder`):

* a hard link, or a symbolic link to a regular file of the archive, is an image of its own (as a linked file in a
  folder is), read from its target's data; a link to a directory, out of the archive or to nothing is refused (the
  folder scan would follow the directory: re-create the archive with ``tar --dereference``);
* two members of the same name are refused: extracting the archive keeps only the last, and counting both would
  count an image twice (rebuild the archive, or ``tar --delete`` the stale copy);
* member names must be valid UTF-8 (class names are stored as UTF-8 text).
"""

from __future__ import annotations

import io
import os
import posixpath
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ncaudit._validate import regular_file
from ncaudit.errors import InputError

BLOCK = tarfile.BLOCKSIZE
MAX_LINK_HOPS = 16


@dataclass(frozen=True)
class Member:
    """A regular file of an archive (or a link resolved to one): its name as stored and where its data lie in the
    outermost file."""

    name: str
    offset: int
    size: int


class _Window(io.RawIOBase):
    """Bytes [start, start + size) of an open file, as a seekable file (a tar inside a tar)."""

    def __init__(self, fh: io.BufferedReader, start: int, size: int) -> None:
        self.fh, self.start, self.size, self.pos = fh, start, size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = 0) -> int:
        self.pos = {0: offset, 1: self.pos + offset, 2: self.size + offset}[whence]
        return self.pos

    def tell(self) -> int:
        return self.pos

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        n = max(0, min(len(buffer), self.size - self.pos))
        self.fh.seek(self.start + self.pos)
        data = self.fh.read(n)
        buffer[:len(data)] = data
        self.pos += len(data)
        return len(data)


def _normal(name: str) -> str:
    return posixpath.normpath(name).lstrip("/") if name not in ("", ".") else name


def _utf8(name: str, archive: str) -> str:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        raw = os.fsencode(name)
        raise InputError(f"{archive}: the member {raw!r} is not named in valid UTF-8; rename it and rebuild the "
                         "archive (class names are stored as UTF-8 text)") from None
    return name


def _scan(fileobj: io.RawIOBase | io.BufferedReader, size: int, archive: str) -> list[tarfile.TarInfo]:
    """Every member header of the tar in ``fileobj`` (``size`` bytes), checked to end as a tar ends."""
    try:
        tf = tarfile.open(fileobj=fileobj, mode="r:")  # type: ignore[call-overload]
    except tarfile.TarError as exc:
        raise InputError(f"{archive}: not a readable tar archive ({exc}); fix or replace the file") from None
    infos: list[tarfile.TarInfo] = []
    try:
        while (ti := tf.next()) is not None:
            infos.append(ti)
            if ti.isreg() and ti.offset_data + ti.size > size:
                raise InputError(f"{archive}: the archive ends inside the member {ti.name!r} ({size} bytes of file "
                                 f"for data up to byte {ti.offset_data + ti.size}); it is truncated: copy it again")
    except tarfile.TarError as exc:
        last = f"after the member {infos[-1].name!r}" if infos else "at its start"
        raise InputError(f"{archive}: damaged {last} ({exc}); fix or replace the file") from None
    fileobj.seek(tf.offset)
    marker = fileobj.read(BLOCK)
    if len(marker) < BLOCK or marker.strip(b"\0"):
        last = f"after the member {infos[-1].name!r}" if infos else "before its first member"
        what = "ends without the end-of-archive marker" if len(marker) < BLOCK else "holds no valid header"
        raise InputError(f"{archive}: the archive {what} {last} (byte {tf.offset} of {size}); it is truncated or "
                         "damaged: copy it again (a tar that lost members would be read as a smaller dataset)")
    return infos


def _resolve(ti: tarfile.TarInfo, by_name: dict[str, tarfile.TarInfo], archive: str) -> tarfile.TarInfo | None:
    """The regular member a link leads to; None for a link to nothing; an error for a link the folder scan would
    follow elsewhere (a directory, out of the archive) or a loop."""
    seen = 0
    current = ti
    while current.islnk() or current.issym():
        seen += 1
        if seen > MAX_LINK_HOPS:
            raise InputError(f"{archive}: the link {ti.name!r} goes round a loop of links; remove it")
        link = current.linkname
        if current.issym():
            if link.startswith("/") or _normal(posixpath.join(posixpath.dirname(current.name), link)).startswith(".."):
                raise InputError(f"{archive}: the link {ti.name!r} points out of the archive ({link}); re-create "
                                 "the archive with tar --dereference (-h) to store the image itself")
            link = posixpath.join(posixpath.dirname(_normal(current.name)), link)
        target = by_name.get(_normal(link))
        if target is None:
            prefix = _normal(link) + "/"
            if any(name.startswith(prefix) for name in by_name):
                raise InputError(f"{archive}: the link {ti.name!r} points to the directory {link}; links to "
                                 "directories are not followed inside archives: re-create the archive with tar "
                                 "--dereference (-h)")
            return None
        if target.isdir():
            raise InputError(f"{archive}: the link {ti.name!r} points to the directory {link}; links to directories "
                             "are not followed inside archives: re-create the archive with tar --dereference (-h)")
        current = target
    return current if current.isreg() else None


def tar_members(path: str | os.PathLike[str], *, fh: io.BufferedReader | None = None, start: int = 0,
                size: int | None = None, label: str | None = None,
                wanted: Callable[[str], bool] = lambda name: True) -> list[Member]:
    """The regular files of a tar archive (links to regular files resolved to their data), in archive order.

    ``fh``/``start``/``size`` read a tar stored inside another file (a member of an outer tar); offsets are always
    in the outermost file. A link to nothing is refused when ``wanted(name)`` (an image the folder would list and
    fail to read), skipped otherwise. See the module notes for what else is refused.

    Raises
    ------
    InputError
        Not a regular file, not a tar, truncated or damaged, a member name not in UTF-8, two members of one name, a
        link to a directory, out of the archive or in a loop.
    """
    archive = label or str(path)
    if fh is None:
        regular_file(path, "a tar archive")
        with open(path, "rb") as own:
            return tar_members(path, fh=own, start=0, size=os.fstat(own.fileno()).st_size, label=archive,
                               wanted=wanted)
    window = _Window(fh, start, size if size is not None else 0)
    infos = _scan(io.BufferedReader(window, BLOCK * 8), window.size, archive)
    by_name: dict[str, tarfile.TarInfo] = {}
    for ti in infos:
        name = _normal(_utf8(ti.name, archive))
        if ti.isdir():
            by_name.setdefault(name, ti)
            continue
        if name in by_name and not by_name[name].isdir():
            raise InputError(f"{archive}: two members are named {name!r}; extracting it keeps only the last, so "
                             "ncaudit refuses to guess: rebuild the archive (or tar --delete the stale copy)")
        by_name[name] = ti
    members = []
    for ti in infos:
        if ti.isdir():
            continue
        link = ti.islnk() or ti.issym()
        target = _resolve(ti, by_name, archive) if link else ti if ti.isreg() else None
        if target is None and link and wanted(_normal(ti.name)):
            raise InputError(f"{archive}: the link {ti.name!r} points to {ti.linkname!r}, which the archive does not "
                             "hold as a file; add the image, or re-create the archive with tar --dereference (-h)")
        if target is not None:
            members.append(Member(ti.name, start + target.offset_data, target.size))
    return members


def archive_files(root: Path) -> list[Path]:
    """The ``.tar`` files of a directory of tars, sorted (each checked when it is read)."""
    return sorted(p for p in root.iterdir() if p.suffix.lower() == ".tar")
