"""Reading the rows of a cache's datasets: from the file itself, or straight from the shard (or, with
``allow_external``, other) files it was checked against, each of those checked unchanged before and after every read.

A cache opened read-only keeps one handle on its own file, so replacing the file by a rename does not change what is
read; the files its datasets reach are another matter. A joined cache's rows live in its shards, and a shard that is
rewritten, replaced, truncated or resumed while a report streams it would mix rows of two files into one result. So
every file other than the cache is recorded at open (:class:`FileStamp`: device, inode, size, modification time) and
checked around each read of its rows: any change stops the read with one line.
"""

from __future__ import annotations

import bisect
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from ncaudit.errors import InputError


@dataclass(frozen=True)
class FileStamp:
    """What a file was when it was checked: ``(device, inode, size, modification time in ns)``."""

    path: Path
    key: tuple[int, int, int, int]

    @classmethod
    def of(cls, path: Path, st: os.stat_result | None = None) -> FileStamp:
        st = st if st is not None else os.stat(path)
        return cls(path, (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns))

    def verify(self, cache: Path) -> None:
        """Raise when the file is gone or differs from the checked one."""
        try:
            now = FileStamp.of(self.path).key
        except OSError as exc:
            raise InputError(f"{self.path}: removed while {cache.name} was being read ({exc.strerror or exc}); "
                             f"restore it and rerun the report") from None
        if now == self.key:
            return
        if now[:2] != self.key[:2]:
            what = "replaced by another file"
        elif now[2] != self.key[2]:
            what = f"its size went from {self.key[2]} to {now[2]} bytes"
        else:
            what = "written to (its modification time changed)"
        raise InputError(f"{self.path}: changed while {cache.name} was being read ({what}); rows of two versions "
                         "would be mixed, so the report stops: rerun it once nothing writes the file")


@dataclass(frozen=True)
class Segment:
    """Rows [start, stop) of a cache dataset are rows [offset, offset + stop - start) of ``dataset``, a dataset of
    the cache itself or of one of the files in ``stamps``."""

    start: int
    stop: int
    dataset: h5py.Dataset
    offset: int = 0
    stamps: tuple[FileStamp, ...] = ()


class Rows:
    """One dataset of a cache as the segments that hold its rows, in row order and without gaps."""

    def __init__(self, name: str, segments: Sequence[Segment], cache: Path) -> None:
        self.name = name
        self.segments = list(segments)
        self.cache = cache
        self._starts = [s.start for s in self.segments]

    @classmethod
    def whole(cls, name: str, ds: h5py.Dataset, cache: Path, stamps: Sequence[FileStamp] = ()) -> Rows:
        """Every row of ``ds`` (a scalar dataset is one row)."""
        return cls(name, [Segment(0, int(ds.shape[0]) if ds.ndim else 1, ds, 0, tuple(stamps))], cache)

    @property
    def stamps(self) -> list[FileStamp]:
        seen: dict[Path, FileStamp] = {}
        for segment in self.segments:
            for stamp in segment.stamps:
                seen.setdefault(stamp.path, stamp)
        return list(seen.values())

    def _pieces(self, start: int, stop: int) -> list[tuple[Segment, int, int]]:
        i = max(0, bisect.bisect_right(self._starts, start) - 1)
        out = []
        while start < stop and i < len(self.segments):
            seg = self.segments[i]
            lo, hi = max(start, seg.start), min(stop, seg.stop)
            if lo < hi:
                out.append((seg, lo, hi))
            i += 1
        return out

    def _verified(self, segment: Segment, read: Any) -> np.ndarray:
        for stamp in segment.stamps:
            stamp.verify(self.cache)
        values = np.asarray(read())
        for stamp in segment.stamps:
            stamp.verify(self.cache)
        return values

    def read(self, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop)."""
        parts = [self._verified(seg, lambda seg=seg, lo=lo, hi=hi: seg.dataset[seg.offset + lo - seg.start:
                                                                               seg.offset + hi - seg.start])
                 for seg, lo, hi in self._pieces(start, stop)]
        if not parts:
            return self._empty()
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def _empty(self) -> np.ndarray:
        first = self.segments[0].dataset
        return np.empty((0, *first.shape[1:]), dtype=first.dtype)

    def all(self) -> np.ndarray:
        """The whole dataset (a scalar dataset as it is)."""
        if len(self.segments) == 1 and self.segments[0].dataset.ndim == 0:
            seg = self.segments[0]
            return self._verified(seg, lambda: seg.dataset[()])
        return self.read(0, self.segments[-1].stop if self.segments else 0)

    def take(self, index: np.ndarray) -> np.ndarray:
        """Rows ``index`` (sorted, unique), read segment by segment."""
        parts = []
        for seg in self.segments:
            lo, hi = np.searchsorted(index, [seg.start, seg.stop])
            if lo < hi:
                local = index[lo:hi] - seg.start + seg.offset
                parts.append(self._verified(seg, lambda seg=seg, local=local: seg.dataset[local]))
        if not parts:
            return self._empty()
        return parts[0] if len(parts) == 1 else np.concatenate(parts)
