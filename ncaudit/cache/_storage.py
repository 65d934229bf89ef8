"""Storage checks before a row is read: a cache reads its own data (or its shards'), links are checked before they
are followed, every dataset holds the rows it declares, and the shards of a joined cache are the ones of its run.

A cache is self-contained. HDF5 can make a dataset read other files, in three ways: an external link, external raw
storage (``H5Pset_external``: the bytes of any local file) and a virtual dataset (rows mapped from other HDF5 files).
Each would let a cache from elsewhere print a local file, or read zeros, or another run's rows. So each is refused,
naming the dataset and the file it reaches, except the layout :func:`ncaudit.cache.join_shards` writes for a
distributed extraction: virtual datasets over the row-named shards beside the joined file
(``<stem>.rows-<start>-<stop>.h5``), each written by the same run (same provenance, same rows). Their rows are read
straight from the shards, never through HDF5's own resolution of the source names. ``allow_external`` (the
``--allow-external`` flag) reads the rest too, with the same checks of what each file holds, and names every file.

Every file other than the cache is checked to be a regular file before anything opens it (a FIFO would block the
open, uninterruptibly) and recorded (:class:`~ncaudit.cache._rows.FileStamp`) so the reads can check it is unchanged.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import h5py

from ncaudit._validate import attr_bool, attr_int, format_bytes, regular_file
from ncaudit.cache._format import RUN_KEYS, _short, attr_value
from ncaudit.cache._rows import FileStamp, Segment
from ncaudit.cache._shards import parse_shard_path
from ncaudit.errors import InputError

#: Root attributes that a shard of a joined cache must share with the joined file: the same checkpoint, data,
#: transform and options produced its rows (``rows``, when the shard records it, must match its name). Pieces of a
#: resumed run may differ in what --resume allows to differ (the --limit, where the data lie).
SHARD_KEYS = (*RUN_KEYS, "num_classes")

ALLOW_HINT = "pass --allow-external to read it anyway (allow_external=True)"


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
    elif layout == h5py.h5d.CONTIGUOUS and stored < ds.nbytes:
        return f"it stores {format_bytes(stored)} of its declared {format_bytes(ds.nbytes)}"
    return None


def _unescape(name: str) -> str | None:
    """A virtual-dataset source file name as a file name: HDF5 reads ``%%`` as ``%`` and ``%b`` as a block number
    (printf-style names of unlimited datasets, which are not resolved here: None)."""
    out, i = [], 0
    while i < len(name):
        if name[i] == "%":
            if name[i + 1:i + 2] != "%":
                return None
            i += 1
        out.append(name[i])
        i += 1
    return "".join(out)


def _row_box(space: Any, extent: tuple[int, ...]) -> tuple[int, int] | None:
    """``(first row, rows)`` when ``space`` selects whole rows [first, first + rows) of ``extent``, else None."""
    kind = space.get_select_type()
    if kind == h5py.h5s.SEL_ALL:
        return 0, int(extent[0]) if extent else 1
    if kind != h5py.h5s.SEL_HYPERSLABS or not extent:
        return None
    lo, hi = (tuple(int(v) for v in b) for b in space.get_select_bounds())
    if math.prod(h - low + 1 for low, h in zip(lo, hi)) != int(space.get_select_npoints()):
        return None
    if any(v != 0 for v in lo[1:]) or any(h != n - 1 for h, n in zip(hi[1:], extent[1:])):
        return None
    return lo[0], hi[0] - lo[0] + 1


def _select_bounds(space: Any, extent: tuple[int, ...]) -> tuple[int, ...] | None:
    """The last index a source selection reads (its whole extent for an "all" selection), or None when empty."""
    if space.get_select_type() == h5py.h5s.SEL_ALL:
        return tuple(int(n) - 1 for n in extent) if extent and all(extent) else None
    bounds = space.get_select_bounds()
    return None if bounds is None else tuple(int(v) for v in bounds[1])


def _open_object(f: h5py.File, name: str) -> Any:
    """``f.get(name)``, a dataset opened so that relative external raw-data files are found beside its file
    (``${ORIGIN}``) rather than in the working directory, as the storage check looks for them."""
    obj = f.get(name)
    if not isinstance(obj, h5py.Dataset):
        return obj
    dcpl = obj.id.get_create_plist()
    if dcpl.get_layout() != h5py.h5d.CONTIGUOUS or dcpl.get_external_count() == 0:
        return obj
    del obj, dcpl  # HDF5 refuses a second handle with another prefix while this one is open
    dapl = h5py.h5p.create(h5py.h5p.DATASET_ACCESS)
    dapl.set_efile_prefix(b"${ORIGIN}")
    return h5py.Dataset(h5py.h5d.open(f.id, name.encode(), dapl=dapl))


def _brief(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 50 else text[:47] + "..."


class _StorageCheck:
    """What a cache reads, checked: the links to an object, the storage of each dataset, the shards (or, allowed,
    the other files) it reaches. Keeps the handles of the files it opened (a joined cache's rows are read from them)
    until :meth:`close`.

    A virtual dataset reads missing sources, and rows its mappings do not cover, as zeros; so every mapping that
    feeds the rows read must name a source file that exists and a dataset there with the mapped rows written (also
    when the shard is a partial cache), and the mappings must cover every row read.
    """

    MAX_DEPTH = 4
    MAX_HOPS = 16

    def __init__(self, path: Path, f: h5py.File, attrs: dict[str, Any], *, allow_external: bool = False) -> None:
        self.path = path
        self.file = f
        self.attrs = attrs
        self.allow_external = allow_external
        self.stamps: dict[Path, FileStamp] = {}  # every other file read, in the order found
        self._files: dict[Path, h5py.File] = {}
        self._provenance_checked: set[Path] = set()
        self._external: tuple[str, h5py.ExternalLink, Path | None] | None = None  # the last one walked through

    @property
    def sources(self) -> tuple[Path, ...]:
        return tuple(self.stamps)

    def close(self) -> None:
        for f in self._files.values():
            try:
                f.close()
            except (OSError, RuntimeError):
                pass
        self._files.clear()

    # -- files -----------------------------------------------------------------------------------------------------
    def _stamp(self, path: Path, role: str) -> FileStamp:
        """Check ``path`` is a regular file (before anything opens it) and record it."""
        key = Path(os.path.abspath(path))
        if key not in self.stamps:
            self.stamps[key] = FileStamp.of(key, regular_file(path, role))
        return self.stamps[key]

    def _open(self, path: Path, role: str, where: str) -> h5py.File:
        key = Path(os.path.abspath(path))
        self._stamp(key, role)
        f = self._files.get(key)
        if f is None:
            try:
                f = h5py.File(key, "r", locking=False)
            except (OSError, RuntimeError) as exc:
                raise InputError(f"{where}: reads {path}, which is not a readable HDF5 file ({_short(exc)}); restore "
                                 "that file") from None
            self._files[key] = f
        return f

    def stamps_of(self, obj: h5py.HLObject) -> tuple[FileStamp, ...]:
        """The stamp of the file ``obj`` lives in, when that is not the cache (an allowed external link)."""
        key = Path(os.path.abspath(obj.file.filename))
        return (self.stamps[key],) if key in self.stamps else ()

    # -- links -----------------------------------------------------------------------------------------------------
    def get(self, name: str) -> Any:
        """The object at ``/name`` or None; every link on the way checked before HDF5 follows it."""
        self._external = None
        self._walk(self.file, name, 0)
        try:
            obj = _open_object(self.file, name)
        except (KeyError, RuntimeError, OSError, ValueError) as exc:
            text = _link_text(self.file, name)
            why = self._dangling() if self._external else f"({_short(exc)})"
            raise InputError(f"{self.path}: cannot open /{name}: {text or 'broken path'} {why}; fix the link or "
                             "store the data in the file itself") from None
        if obj is None and (text := _link_text(self.file, name)):
            why = self._dangling() if self._external else "and no object of that name exists in the file"
            raise InputError(f"{self.path}: cannot open /{name}: {text}, {why}; fix the link or store the data in "
                             "the file itself")
        if obj is not None and Path(os.path.abspath(obj.file.filename)) not in {Path(os.path.abspath(self.path)),
                                                                                 *self.stamps}:
            raise InputError(f"{self.path}: /{name} resolved to {obj.file.filename}, not the file that was checked; "
                             "store the data in the file itself")
        return obj

    def _dangling(self) -> str:
        """Why the external link the last walk went through leads nowhere, in words that are true."""
        assert self._external is not None
        sub, link, target = self._external
        if target is None:
            return f"(through {sub}, an external link whose target file {link.filename} does not exist)"
        return f"(through {sub}, an external link whose target file {target} holds no {link.path})"

    def _link_target(self, filename: Path) -> Path | None:
        """The file HDF5 opens for an external link to ``filename``: as is when absolute, else the first that exists
        under HDF5_EXT_PREFIX, beside the cache, in the working directory."""
        if filename.is_absolute():
            return filename if filename.exists() else None
        prefixes = [p for p in os.environ.get("HDF5_EXT_PREFIX", "").split(os.pathsep) if p]
        for base in [Path(p) for p in prefixes] + [self.path.parent, Path.cwd()]:
            if (base / filename).exists():
                return base / filename
        return None

    def _walk(self, f: h5py.File, name: str, depth: int) -> None:
        """Follow ``/name`` in ``f`` link by link: soft links by their path, external links refused (or, allowed,
        their target checked to be a regular file before HDF5 opens it, and walked in turn)."""
        todo = [part for part in name.split("/") if part]
        done: list[str] = []
        hops = 0
        while todo:
            part = todo.pop(0)
            sub = "/" + "/".join(done + [part])
            try:
                link = f.get(sub, getlink=True)
            except (KeyError, RuntimeError, OSError, ValueError):
                return  # a broken path: the get that follows says so
            if isinstance(link, h5py.SoftLink):
                hops += 1
                if hops > self.MAX_HOPS:
                    raise InputError(f"{self.path}: cannot open /{name}: {_link_text(f, name)}, and the soft links "
                                     f"go round a loop (more than {self.MAX_HOPS} of them); store the data under its "
                                     "own name")
                target = [p for p in link.path.split("/") if p and p != "."]
                todo = ([] if link.path.startswith("/") else done) + target + todo
                done = []
                continue
            if isinstance(link, h5py.ExternalLink):
                self._external_link(sub, link, name, depth, todo)
                return
            if link is None:
                return
            done.append(part)

    def _external_link(self, sub: str, link: h5py.ExternalLink, name: str, depth: int, rest: list[str]) -> None:
        if not self.allow_external:
            raise InputError(f"{self.path}: {sub} is an external link to {link.filename}:{link.path}; a cache must "
                             f"hold its own data (an external link can read any local file): {ALLOW_HINT}")
        if depth >= self.MAX_DEPTH:
            raise InputError(f"{self.path}: /{name} goes through {depth} external links (or a loop); store the data "
                             "in the file itself")
        target = self._link_target(Path(link.filename))
        self._external = (sub, link, target)
        if target is None:
            return  # nothing to open: the get reports the dangling link
        g = self._open(target, f"the target of the external link {sub}", str(self.path))
        self._walk(g, "/".join([link.path, *rest]), depth + 1)

    # -- storage ---------------------------------------------------------------------------------------------------
    def segments(self, ds: h5py.Dataset, name: str, rows: int, depth: int = 0,
                 where: str | None = None) -> list[Segment]:
        """The segments to read the first ``rows`` rows of ``ds`` from, after checking they are all stored."""
        where = where or str(self.path)
        own = self.stamps_of(ds)
        if rows <= 0 or ds.size == 0:
            return [Segment(0, max(rows, 0), ds, 0, own)]
        if ds.is_virtual:
            return self._virtual(ds, name, rows, depth, where)
        dcpl = ds.id.get_create_plist()
        if dcpl.get_layout() == h5py.h5d.CONTIGUOUS and dcpl.get_external_count() > 0:
            ds, stamps = self._external_raw(ds, name, where)
            return [Segment(0, rows, ds, 0, own + stamps)]
        why = _unwritten(ds, rows)
        if why is not None:
            fix = "re-extract it, or (a partial cache) set n_written to the rows written and pass --allow-partial" \
                if depth == 0 else "the shard is damaged or was replaced: re-extract it (extract --resume recomputes " \
                                   "the rows of a removed shard)"
            raise InputError(f"{where}: /{name} declares shape {tuple(ds.shape)} ({format_bytes(ds.nbytes)}) but "
                             f"{why}; HDF5 would read the missing rows as zeros. {fix[0].upper()}{fix[1:]}")
        return [Segment(0, rows, ds, 0, own)]

    def _external_raw(self, ds: h5py.Dataset, name: str, where: str) -> tuple[h5py.Dataset, tuple[FileStamp, ...]]:
        """Raw data in external files (``H5Pset_external``), allowed: each a regular file holding its part, resolved
        as HDF5 reads it (HDF5_EXTFILE_PREFIX, else the directory of the dataset's file: :func:`_open_object`)."""
        entries = ds.external or []
        texts = [n.decode("utf-8", "replace") if isinstance(n, bytes) else str(n) for n, _, _ in entries]
        if not self.allow_external:
            raise InputError(f"{where}: /{name} keeps its data in the external raw file {texts[0]} (HDF5 external "
                             f"storage: the bytes of any local file); a cache must hold its own data: {ALLOW_HINT}")
        origin = str(Path(os.path.abspath(ds.file.filename)).parent)
        prefix = os.environ.get("HDF5_EXTFILE_PREFIX", "${ORIGIN}").replace("${ORIGIN}", origin)
        stamps = []
        for text, (_, offset, size) in zip(texts, entries):
            path = Path(text) if Path(text).is_absolute() else Path(prefix) / text
            stamp = self._stamp(path, f"the external raw-data file of /{name}")
            if stamp.key[2] < offset + min(size, ds.nbytes):
                raise InputError(f"{where}: /{name} reads {format_bytes(min(size, ds.nbytes))} from {path} at byte "
                                 f"{offset}, but the file holds {stamp.key[2]} bytes; restore the file")
            stamps.append(stamp)
        return ds, tuple(stamps)

    def _virtual(self, ds: h5py.Dataset, name: str, rows: int, depth: int, where: str) -> list[Segment]:
        if depth >= self.MAX_DEPTH:
            raise InputError(f"{where}: /{name} is a virtual dataset nested {depth} levels deep (or in a loop); join "
                             "the shard files directly")
        try:
            mappings = ds.virtual_sources()
        except (OSError, RuntimeError, ValueError) as exc:
            raise InputError(f"{where}: cannot read the virtual mappings of /{name} ({_short(exc)})") from None
        if depth == 0:
            shards = self._shard_layout(ds, name, rows, mappings, where)
            if shards is not None:
                return shards
        if not self.allow_external:
            files = sorted({_unescape(m.file_name) or m.file_name for m in mappings})
            reach = f"reads {files[0]}" + (f" and {len(files) - 1} more file(s)" if len(files) > 1 else "") \
                if files else "maps no file"
            raise InputError(f"{where}: /{name} is a virtual dataset that {reach}; a cache must hold its own data, "
                             f"or be joined over the row-named shards beside it (as `extract` writes them): "
                             f"{ALLOW_HINT}")
        before = set(self.stamps)
        covered = sum(self._mapping(m, ds, name, rows, depth, where) for m in mappings)
        need = rows * math.prod(ds.shape[1:])
        if covered < need:
            raise InputError(f"{where}: the virtual dataset /{name} maps {covered} of the {need} values of its first "
                             f"{rows} rows to source files; the rest would read as zeros. Re-join the shards "
                             "(ncaudit.cache.join_shards)")
        stamps = self.stamps_of(ds) + tuple(s for p, s in self.stamps.items() if p not in before)
        return [Segment(0, rows, ds, 0, stamps)]

    def _mapping(self, m: Any, ds: h5py.Dataset, name: str, rows: int, depth: int, where: str) -> int:
        """Check one mapping's source (allowed external files); return how many of the first ``rows`` rows' values
        it maps."""
        vsel = m.vspace.copy()
        window = (rows,) + tuple(ds.shape[1:])
        vsel.select_hyperslab((0,) * len(window), window, op=h5py.h5s.SELECT_AND)
        mapped = int(vsel.get_select_npoints())
        if mapped == 0:
            return 0
        file_name = _unescape(m.file_name)
        if file_name is None:
            raise InputError(f"{where}: /{name} reads from {m.file_name!r}, a printf-style source name (one file "
                             "per block); join the files under their own names")
        path = self._source_path(file_name, ds)
        if path is None:
            raise InputError(f"{where}: /{name} reads {mapped} values from {file_name}, which does not exist "
                             f"(looked beside {Path(ds.file.filename).name} and in the working directory); restore "
                             "that shard file or re-join the shards")
        same = os.path.abspath(path) == os.path.abspath(ds.file.filename)
        f = ds.file if same else self._open(path, f"a source file of /{name}", where)
        src = self._source_dataset(f, path, m.dset_name, name, where)
        if src == ds or (same and src.name == ds.name):
            raise InputError(f"{where}: the virtual dataset /{name} reads from itself; re-join the shards")
        last = _select_bounds(m.src_space, tuple(m.src_space.shape))
        if last is not None:
            if src.ndim != len(last) or any(e >= n for e, n in zip(last, src.shape)):
                raise InputError(f"{path}: the shard's {m.dset_name} has shape {tuple(src.shape)} but "
                                 f"{self.path.name} reads it up to index {last}; the shard is short or was replaced, "
                                 "re-join the shards")
            self._check_shard_progress(f, path, last[0] + 1)
            self.segments(src, m.dset_name.lstrip("/"), last[0] + 1, depth + 1, str(path))
        return mapped

    def _source_path(self, file_name: str, ds: h5py.Dataset) -> Path | None:
        """The source file HDF5 reads: ``.`` is the file itself; a relative name is looked up under
        HDF5_VDS_PREFIX, beside the virtual dataset's file, then in the working directory."""
        if file_name == ".":
            return Path(ds.file.filename)
        candidate = Path(file_name)
        if candidate.is_absolute():
            return candidate if candidate.exists() else None
        prefix = os.environ.get("HDF5_VDS_PREFIX")
        for base in ([Path(prefix)] if prefix else []) + [Path(ds.file.filename).parent, Path.cwd()]:
            if (base / candidate).exists():
                return base / candidate
        return None

    def _source_dataset(self, f: h5py.File, path: Path, dset_name: str, name: str, where: str) -> h5py.Dataset:
        self._walk(f, dset_name, 1)
        try:
            src = _open_object(f, dset_name)
        except (KeyError, RuntimeError, OSError, ValueError):
            src = None
        if not isinstance(src, h5py.Dataset):
            raise InputError(f"{path}: no dataset {dset_name} in this shard, which {where} reads for /{name}; restore "
                             "the shard or re-join the shards")
        return src

    def _check_shard_progress(self, f: h5py.File, path: Path, rows: int) -> None:
        """A shard that is itself a partial cache must have written the rows the join reads."""
        attrs = f.attrs
        try:
            complete = attr_bool(attr_value(attrs["complete"]), "complete", str(path)) if "complete" in attrs else True
            written = attr_value(attrs["n_written"]) if "n_written" in attrs else None
        except (OSError, RuntimeError, KeyError) as exc:
            raise InputError(f"{path}: cannot read the shard's attributes ({_short(exc)})") from None
        if not complete and written is not None and attr_int(written, "n_written", str(path), minimum=0) < rows:
            raise InputError(f"{path}: the shard is incomplete ({written} rows written) but {self.path.name} reads "
                             f"{rows} rows from it; finish it with `ncaudit extract --resume`, then re-join")

    # -- the shards of a joined cache ------------------------------------------------------------------------------
    def _shard_layout(self, ds: h5py.Dataset, name: str, rows: int, mappings: Any, where: str
                      ) -> list[Segment] | None:
        """The segments of a virtual dataset in ncaudit's own shard layout (whole rows of ``<stem>.rows-A-B.h5``
        beside the cache, each mapped at row A), read straight from the shards; None when it is not that layout."""
        pieces = []
        for m in mappings:
            file_name = _unescape(m.file_name)
            if file_name is None or os.sep in file_name or "/" in file_name or m.dset_name.strip("/") != name:
                return None
            span = parse_shard_path(self.path, file_name)
            dst, src = _row_box(m.vspace, tuple(ds.shape)), _row_box(m.src_space, tuple(m.src_space.shape))
            if span is None or dst is None or src is None or src[0] != 0 or src[1] != dst[1]:
                return None
            pieces.append((dst[0], dst[1], file_name, span))
        if not pieces:
            return None
        segments, pos = [], 0
        for first, count, file_name, (start, stop) in sorted(pieces):
            if first >= rows:
                break
            if first != pos:
                raise InputError(f"{where}: /{name} maps rows {pos}:{first} to no shard (or to two); they would read "
                                 "as zeros. Re-join the shards (extract --resume)")
            if first != start or count > stop - start:
                raise InputError(f"{where}: /{name} maps rows {first}:{first + count} to {file_name}, which holds "
                                 f"rows {start}:{stop}; the join is damaged: re-join the shards (extract --resume)")
            n = min(count, rows - first)
            segments.append(self._shard(ds, name, self.path.parent / file_name, start, stop, n, first))
            pos = first + count
        if pos < rows:
            raise InputError(f"{where}: the virtual dataset /{name} maps {pos} of its first {rows} rows to shards; the "
                             "rest would read as zeros. Re-join the shards (extract --resume)")
        return segments

    def _shard(self, ds: h5py.Dataset, name: str, path: Path, start: int, stop: int, n: int, first: int) -> Segment:
        if not os.path.lexists(path):
            raise InputError(f"{self.path}: /{name} reads rows {start}:{start + n} from {path.name}, which does not "
                             f"exist beside it; restore that shard file (or rerun extract with --resume)")
        f = self._open(path, f"a shard of {self.path.name}", str(self.path))
        self._check_provenance(f, path, start, stop)
        src = self._source_dataset(f, path, name, name, str(self.path))
        if src.ndim != ds.ndim or src.shape[0] != stop - start or src.shape[1:] != ds.shape[1:]:
            raise InputError(f"{path}: the shard's /{name} has shape {tuple(src.shape)} but its name says rows "
                             f"{start}:{stop} of [{', '.join(map(str, ds.shape))}]; the shard is short or was "
                             "replaced: re-extract it")
        self._check_shard_progress(f, path, n)
        (segment,) = self.segments(src, name, n, 1, str(path))
        return Segment(first, first + n, segment.dataset, 0, (self.stamps[Path(os.path.abspath(path))],
                                                               *segment.stamps))

    def _check_provenance(self, f: h5py.File, path: Path, start: int, stop: int) -> None:
        """The shard was written by the run of the joined file: same :data:`SHARD_KEYS`, rows as named."""
        key = Path(os.path.abspath(path))
        if key in self._provenance_checked:
            return
        try:
            theirs = {str(attr_value(k)): attr_value(v) for k, v in f.attrs.items()}
        except (OSError, RuntimeError, TypeError, ValueError) as exc:
            raise InputError(f"{path}: cannot read the shard's attributes ({_short(exc)})") from None
        for k in SHARD_KEYS:
            if self.attrs.get(k) != theirs.get(k):
                raise InputError(f"{path}: this shard was written with {k} {_brief(theirs.get(k))} but "
                                 f"{self.path.name} with {_brief(self.attrs.get(k))}; it belongs to another run: put "
                                 "back the shard of this run, or re-extract")
        rows = theirs.get("rows")
        if isinstance(rows, str):
            try:
                rows = json.loads(rows)
            except json.JSONDecodeError:
                pass
        if rows is not None and rows != [start, stop]:
            raise InputError(f"{path}: this shard records rows {_brief(rows)} but is named for rows "
                             f"{start}:{stop}; it was renamed: put back the right shard, or re-extract")
        self._provenance_checked.add(key)
