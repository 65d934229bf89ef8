"""Storage checks before a row is read: links that resolve, every dataset holding the rows it declares, and
the shards behind a joined (virtual) cache present and holding theirs."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import h5py

from ncaudit._validate import attr_bool, attr_int, format_bytes
from ncaudit.cache._format import _short, attr_value
from ncaudit.errors import InputError


def _link_text(f: h5py.File, name: str) -> str:
    """``/a is a soft link to /b`` (or an external link to ``file:/b``) for the first link on the way to ``name``."""
    parts = [part for part in name.split("/") if part]
    for i in range(1, len(parts) + 1):
        sub = "/".join(parts[:i])
        try:
            link = f.get(sub, getlink=True)
        except (KeyError, RuntimeError, OSError, ValueError):
            return ""
        if isinstance(link, h5py.SoftLink):
            return f"/{sub} is a soft link to {link.path}"
        if isinstance(link, h5py.ExternalLink):
            return f"/{sub} is an external link to {link.filename}:{link.path}"
        if link is None:
            return ""
    return ""


def _unwritten(ds: h5py.Dataset, rows: int) -> str | None:
    """Why the first ``rows`` rows of ``ds`` are not all stored in the file, or None when they are.

    HDF5 returns the fill value (zeros) for storage that was never written, so a dataset declared at a size and never
    filled would read as zeros for as long as its declared size takes to read. Chunked datasets must hold every chunk
    of those rows (and, unfiltered, their bytes); contiguous ones their whole storage. Costs a few metadata reads.
    """
    dcpl = ds.id.get_create_plist()
    layout = dcpl.get_layout()
    stored = int(ds.id.get_storage_size())
    need_bytes = rows * ds.dtype.itemsize * math.prod(ds.shape[1:])
    if layout == h5py.h5d.CHUNKED:
        chunks = ds.chunks
        per_row = math.prod(-(-n // c) for n, c in zip(ds.shape[1:], chunks[1:]))
        need = -(-rows // chunks[0]) * per_row
        have = int(ds.id.get_num_chunks())
        if have < need:
            return f"only {have} of the {need} chunks holding its first {rows} rows were ever written"
        if dcpl.get_nfilters() == 0 and stored < need_bytes:
            return f"it stores {format_bytes(stored)} of the {format_bytes(need_bytes)} its first {rows} rows take"
    elif layout == h5py.h5d.CONTIGUOUS:
        if dcpl.get_external_count() > 0:
            return _unwritten_external(ds)
        if stored < ds.nbytes:
            return f"it stores {format_bytes(stored)} of its declared {format_bytes(ds.nbytes)}"
    return None


def _unwritten_external(ds: h5py.Dataset) -> str | None:
    """Raw data in external files (``H5Pset_external``): each file must exist and hold its part."""
    base = Path(ds.file.filename).parent
    for name, offset, size in ds.external or ():
        text = name.decode("utf-8", "replace") if isinstance(name, bytes) else str(name)
        path = Path(text) if Path(text).is_absolute() else base / text
        if not path.is_file():
            path = Path.cwd() / text
        if not path.is_file() or path.stat().st_size < offset + min(size, ds.nbytes):
            return f"its external raw-data file {text} is missing or shorter than declared"
    return None


class _StorageCheck:
    """Checks that datasets hold the rows they declare, following virtual datasets into their source (shard) files.

    A virtual dataset reads missing sources, and rows its mappings do not cover, as zeros; so every mapping that
    feeds the rows read must name a source file that exists and a dataset there with the mapped rows written (also
    when the shard is a partial cache), and the mappings must cover every row read.
    """

    MAX_DEPTH = 4

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sources: list[Path] = []
        self._files: dict[Path, h5py.File] = {}

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()

    def rows(self, ds: h5py.Dataset, name: str, rows: int, depth: int = 0, where: str | None = None) -> None:
        where = where or str(self.path)
        if rows <= 0 or ds.size == 0:
            return
        if ds.is_virtual:
            self._virtual(ds, name, rows, depth, where)
            return
        why = _unwritten(ds, rows)
        if why is not None:
            raise InputError(f"{where}: /{name} declares shape {tuple(ds.shape)} ({format_bytes(ds.nbytes)}) but "
                             f"{why}; HDF5 would read the missing rows as zeros. Re-extract, or write the data "
                             "(or --allow-partial with the right n_written)")

    def _virtual(self, ds: h5py.Dataset, name: str, rows: int, depth: int, where: str) -> None:
        if depth >= self.MAX_DEPTH:
            raise InputError(f"{where}: /{name} is a virtual dataset nested {depth} levels deep (or in a loop); join "
                             "the shard files directly")
        try:
            mappings = ds.virtual_sources()
        except (OSError, RuntimeError, ValueError) as exc:
            raise InputError(f"{where}: cannot read the virtual mappings of /{name} ({_short(exc)})") from None
        covered = 0
        for m in mappings:
            covered += self._mapping(m, ds, name, rows, depth, where)
        need = rows * math.prod(ds.shape[1:])
        if covered < need:
            raise InputError(f"{where}: the virtual dataset /{name} maps {covered} of the {need} values of its first "
                             f"{rows} rows to source files; the rest would read as zeros. Re-join the shards "
                             "(ncaudit.cache.join_shards)")

    def _mapping(self, m: Any, ds: h5py.Dataset, name: str, rows: int, depth: int, where: str) -> int:
        """Check one mapping's source; return how many of the first ``rows`` rows' values it maps."""
        vsel = m.vspace.copy()
        window = (rows,) + tuple(ds.shape[1:])
        vsel.select_hyperslab((0,) * len(window), window, op=h5py.h5s.SELECT_AND)
        mapped = int(vsel.get_select_npoints())
        if mapped == 0:
            return 0
        src_bounds = m.src_space.get_select_bounds()
        path = self._source_path(m.file_name)
        if path is None:
            raise InputError(f"{where}: /{name} reads {mapped} values from {m.file_name}, which does not exist "
                             f"(looked beside {self.path.name} and in the working directory); restore that shard "
                             "file or re-join the shards")
        src = self._source_dataset(path, m.dset_name, name, where)
        if src is ds or (path == self.path and src.name == ds.name):
            raise InputError(f"{where}: the virtual dataset /{name} reads from itself; re-join the shards")
        if src_bounds is not None:
            last = tuple(int(v) for v in src_bounds[1])
            if src.ndim != len(last) or any(e >= n for e, n in zip(last, src.shape)):
                raise InputError(f"{path}: the shard's {m.dset_name} has shape {tuple(src.shape)} but "
                                 f"{self.path.name} reads it up to index {last}; the shard is short or was replaced, "
                                 "re-join the shards")
            self._check_shard_progress(path, last[0] + 1)
            self.rows(src, m.dset_name.lstrip("/"), last[0] + 1, depth + 1, str(path))
        return mapped

    def _source_path(self, file_name: str) -> Path | None:
        if file_name == ".":
            return self.path
        candidate = Path(file_name)
        if candidate.is_absolute():
            return candidate if candidate.is_file() else None
        prefix = os.environ.get("HDF5_VDS_PREFIX")
        for base in ([Path(prefix)] if prefix else []) + [self.path.parent, Path.cwd()]:
            if (base / candidate).is_file():
                return base / candidate
        return None

    def _source_dataset(self, path: Path, dset_name: str, name: str, where: str) -> h5py.Dataset:
        f = self._files.get(path)
        if f is None:
            try:
                f = h5py.File(path, "r", locking=False)
            except (OSError, RuntimeError) as exc:
                raise InputError(f"{where}: /{name} reads from {path}, which is not a readable HDF5 file "
                                 f"({_short(exc)}); restore that shard file") from None
            self._files[path] = f
            if path != self.path:
                self.sources.append(path)
        try:
            src = f.get(dset_name)
        except (KeyError, RuntimeError, OSError, ValueError):
            src = None
        if not isinstance(src, h5py.Dataset):
            raise InputError(f"{path}: no dataset {dset_name} in this shard, which {where} reads for /{name}; restore "
                             "the shard or re-join the shards")
        return src

    def _check_shard_progress(self, path: Path, rows: int) -> None:
        """A shard that is itself a partial cache must have written the rows the join reads."""
        attrs = self._files[path].attrs
        try:
            complete = attr_bool(attr_value(attrs["complete"]), "complete", str(path)) if "complete" in attrs else True
            written = attr_value(attrs["n_written"]) if "n_written" in attrs else None
        except (OSError, RuntimeError, KeyError) as exc:
            raise InputError(f"{path}: cannot read the shard's attributes ({_short(exc)})") from None
        if not complete and written is not None and attr_int(written, "n_written", str(path), minimum=0) < rows:
            raise InputError(f"{path}: the shard is incomplete ({written} rows written) but {self.path.name} reads "
                             f"{rows} rows from it; finish it with `ncaudit extract --resume`, then re-join")
