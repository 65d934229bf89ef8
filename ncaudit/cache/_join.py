"""The HDF5 feature cache, schema 1: reading and writing.

One file per (checkpoint, dataset split); see the README's "HDF5 feature cache" section for the full table.

=============================  ==========================  ===========================================
path                           dtype                       shape
=============================  ==========================  ===========================================
``/features``                  float16 / float32 / float64 ``(N, p)``, chunked along N
``/labels``                    int64                       ``(N,)``
``/logits``                    float32                     ``(N, C)``, optional
``/classifier/weight``         float32 / float64           ``(C, p)``
``/classifier/bias``           as the weight               ``(C,)``, optional (absent: bias-free head)
``/layers/<name>/features``    as ``/features``            ``(N, p_layer)``, optional
``/class_names``               UTF-8 strings               ``(C,)``, optional
``/reference_fp32/index``      int64                       ``(K,)``, optional
``/reference_fp32/features``   float32                     ``(K, p)``, optional
=============================  ==========================  ===========================================

Root attributes: ``ncaudit_schema`` (= 1), ``num_classes``, ``complete``, ``n_written`` and provenance (``model``,
``checkpoint``, ``checkpoint_sha256``, ``dataset``, ``split``, ``precision``, ``transform``, ``created``,
``ncaudit_version``, ...). Writers flush and update ``n_written`` after every chunk; readers open the file read-only
without the HDF5 file lock. Reading never loads more than one batch of rows at a time.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import fcntl
import json
import math
import os
import queue
import re
import socket
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Self

import h5py
import numpy as np

from ncaudit.errors import CacheWriteError, InputError
from ncaudit._validate import attr_bool, attr_int, check_memory, check_schema, format_bytes

SCHEMA_VERSION = 1
FEATURE_DTYPES = ("float16", "float32", "float64")
DEFAULT_CHUNK_ROWS = 256


def attr_value(value: Any) -> Any:
    """HDF5 attribute -> plain, JSON-able Python: bytes to str, numpy scalars and arrays to Python scalars and lists
    (JSON strings kept as str), anything else (compound, reference or opaque data) to its text."""
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    if isinstance(value, np.ndarray):
        return [attr_value(v) for v in value.tolist()]
    if isinstance(value, np.generic):
        return attr_value(value.item())
    if isinstance(value, (list, tuple)):
        return [attr_value(v) for v in value]
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    return str(value)


@dataclass(frozen=True)
class CacheInfo:
    """What a cache holds, read from its metadata without touching the sample data.

    ``n_samples`` is the number of rows a reader uses: all N rows of a complete file, ``n_written`` of a partial one.
    ``sources`` lists the shard files its virtual datasets read from (empty for a plain file).
    """

    path: Path
    n_samples: int
    n_rows: int
    n_features: int
    num_classes: int
    feature_dtype: str
    complete: bool
    has_classifier: bool
    has_bias: bool
    has_logits: bool
    class_names: list[str] | None
    layers: dict[str, int]
    n_reference: int
    attrs: dict[str, Any] = field(default_factory=dict)
    sources: tuple[Path, ...] = ()


class FeatureCache:
    """A schema-1 feature cache opened read-only (no HDF5 file lock), read in batches of rows.

    Opening checks the metadata before any sample is read: the root attributes must be well-formed, links must
    resolve, declared sizes must fit the memory the statistics need, every dataset that will be read must hold the
    rows it declares (HDF5 reads never-written rows as zeros) and every shard of a virtual dataset must exist and
    hold its rows.

    Parameters
    ----------
    path
        The ``.h5`` file; its ``/features`` and ``/labels`` may be virtual datasets over shard files.
    allow_partial
        Accept a file whose ``complete`` attribute is false and read its first ``n_written`` rows.

    Raises
    ------
    InputError
        The file is missing, not HDF5, not schema 1, incomplete (without ``allow_partial``) or malformed.
    """

    def __init__(self, path: str | os.PathLike[str], *, allow_partial: bool = False) -> None:
        self.path = Path(path)
        if not self.path.exists():
            raise InputError(f"{self.path}: no such file; check the path (write one with `ncaudit extract`)")
        if self.path.is_dir():
            raise InputError(f"{self.path}: is a directory; give the path of an .h5 feature cache")
        try:
            self._file = h5py.File(self.path, "r", locking=False)
        except (OSError, RuntimeError) as exc:
            raise InputError(
                f"{self.path}: not a readable HDF5 file ({_short(exc)}); give a cache written by `ncaudit extract` "
                "or in the schema-1 layout of the README"
            ) from None
        try:
            self.info = self._read_info(allow_partial)
        except InputError:
            self._file.close()
            raise
        except (OSError, RuntimeError, KeyError, TypeError, ValueError) as exc:  # HDF5 errors of a damaged file
            self._file.close()
            raise InputError(f"{self.path}: the file is damaged ({_short(exc)}); re-extract it or restore a copy, "
                             "written by `ncaudit extract` or in the schema-1 layout of the README") from None
        except BaseException:
            self._file.close()
            raise

    # -- context manager -------------------------------------------------------------------------------------------
    def __enter__(self) -> FeatureCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._file.close()

    # -- metadata --------------------------------------------------------------------------------------------------
    def _get(self, name: str) -> Any:
        """The object at ``name`` or None; a link that cannot be followed is an error naming the link and target."""
        try:
            obj = self._file.get(name)
        except (KeyError, RuntimeError, OSError, ValueError) as exc:
            raise InputError(f"{self.path}: cannot open /{name}: {_link_text(self._file, name) or 'broken path'} "
                             f"({_short(exc)}); fix the link or store the data in the file itself") from None
        if obj is None and (text := _link_text(self._file, name)):
            raise InputError(f"{self.path}: cannot open /{name}: {text}, whose target is missing; restore the target "
                             "file or store the data in the file itself")
        return obj

    def _dataset(self, name: str) -> h5py.Dataset | None:
        obj = self._get(name)
        if obj is not None and not isinstance(obj, h5py.Dataset):
            raise InputError(f"{self.path}: /{name} is a group, expected a dataset; see the README's schema table")
        return obj

    def _read_info(self, allow_partial: bool) -> CacheInfo:
        where = str(self.path)
        attrs = self._root_attrs()
        check_schema(attrs.get("ncaudit_schema", SCHEMA_VERSION), SCHEMA_VERSION, where)
        feats, labels = self._main_datasets()
        n_rows, p = int(feats.shape[0]), int(feats.shape[1])
        complete, n_samples = self._progress(attrs, n_rows, allow_partial)
        weight, bias = self._dataset("classifier/weight"), self._dataset("classifier/bias")
        logits, names_ds = self._dataset("logits"), self._dataset("class_names")
        num_classes = self._num_classes(attrs, weight, names_ds, logits)
        check_memory([p], num_classes, where)
        self._check_shapes(weight, bias, names_ds, num_classes, p)
        layers = self._layers(attrs, n_rows)
        ref_idx, ref_feat = self._reference(p)
        sources = self._check_stored(feats, labels, layers, n_samples,
                                     [weight, bias, names_ds, ref_idx, ref_feat])
        return CacheInfo(
            path=self.path, n_samples=n_samples, n_rows=n_rows, n_features=p, num_classes=num_classes,
            feature_dtype=feats.dtype.name, complete=complete, has_classifier=weight is not None,
            has_bias=bias is not None, has_logits=logits is not None, class_names=self._class_names(names_ds),
            layers=layers, n_reference=0 if ref_idx is None else int(ref_idx.shape[0]), attrs=attrs,
            sources=sources,
        )

    def _root_attrs(self) -> dict[str, Any]:
        try:
            return {str(attr_value(k)): attr_value(v) for k, v in self._file.attrs.items()}
        except (OSError, RuntimeError, TypeError, ValueError) as exc:
            raise InputError(f"{self.path}: cannot read the root attributes ({_short(exc)}); the file is damaged or "
                             "not a schema-1 cache") from None

    def _main_datasets(self) -> tuple[h5py.Dataset, h5py.Dataset]:
        """``/features`` [N, p] (float16/32/64) and ``/labels`` [N] (integers), shapes and dtypes checked."""
        where = str(self.path)
        feats, labels = self._dataset("features"), self._dataset("labels")
        if feats is None:
            raise InputError(f"{where}: no /features dataset; write the penultimate features as /features [N, p]")
        if labels is None:
            raise InputError(f"{where}: no /labels dataset; write the class indices as /labels [N] (int64)")
        if feats.ndim != 2 or feats.shape[1] == 0:
            raise InputError(f"{where}: /features has shape {feats.shape}, expected 2-D [N, p] with p >= 1")
        if feats.dtype.name not in FEATURE_DTYPES:
            raise InputError(f"{where}: /features has dtype {feats.dtype}, expected one of {', '.join(FEATURE_DTYPES)}")
        if labels.ndim != 1 or labels.shape[0] != feats.shape[0]:
            raise InputError(f"{where}: /labels has shape {labels.shape} but /features has {feats.shape[0]} rows; "
                             "they must match")
        if labels.dtype.kind not in "iu":
            raise InputError(f"{where}: /labels has dtype {labels.dtype}, expected integer class indices")
        return feats, labels

    def _progress(self, attrs: dict[str, Any], n_rows: int, allow_partial: bool) -> tuple[bool, int]:
        """``(complete, rows to read)`` from the ``complete`` and ``n_written`` attributes (both validated)."""
        where = str(self.path)
        complete = attr_bool(attrs.get("complete", True), "complete", where)
        n_written = attr_int(attrs.get("n_written", n_rows), "n_written", where, minimum=0, maximum=n_rows)
        if not complete and not allow_partial:
            raise InputError(f"{where}: the cache is incomplete ({n_written} of {n_rows} rows written, complete=false);"
                             " finish it with `ncaudit extract --resume` or pass --allow-partial")
        return complete, n_rows if complete else n_written

    def _num_classes(self, attrs: dict[str, Any], weight: h5py.Dataset | None, names: h5py.Dataset | None,
                     logits: h5py.Dataset | None) -> int:
        """C from the ``num_classes`` attribute, else the classifier, the class names or the logits (shapes only)."""
        where = str(self.path)
        if "num_classes" in attrs:
            num_classes = attr_int(attrs["num_classes"], "num_classes", where)
        elif weight is not None and weight.ndim >= 1:
            num_classes = int(weight.shape[0])
        elif names is not None and names.ndim == 1:
            num_classes = int(names.shape[0])
        elif logits is not None and logits.ndim == 2:
            num_classes = int(logits.shape[1])
        else:
            raise InputError(f"{where}: cannot tell the number of classes; set the root attribute num_classes "
                             "or store /classifier/weight")
        if num_classes < 2:
            raise InputError(f"{where}: num_classes is {num_classes}; neural-collapse metrics need at least 2 classes")
        return num_classes

    def _check_shapes(self, weight: h5py.Dataset | None, bias: h5py.Dataset | None, names: h5py.Dataset | None,
                      num_classes: int, p: int) -> None:
        where = str(self.path)
        if weight is not None and tuple(weight.shape) != (num_classes, p):
            raise InputError(f"{where}: /classifier/weight has shape {tuple(weight.shape)}, expected [C, p] = "
                             f"[{num_classes}, {p}]; store the final linear layer's weight with one row per class")
        if weight is not None and weight.dtype.kind != "f":
            raise InputError(f"{where}: /classifier/weight has dtype {weight.dtype}, expected float32 or float64")
        if bias is not None and (tuple(bias.shape) != (num_classes,) or bias.dtype.kind != "f"):
            raise InputError(f"{where}: /classifier/bias has shape {tuple(bias.shape)} and dtype {bias.dtype}, "
                             f"expected [C] = [{num_classes}] floats")
        if bias is not None and weight is None:
            raise InputError(f"{where}: /classifier/bias without /classifier/weight; store both or neither")
        if names is not None and (names.ndim != 1 or names.dtype.kind not in "OSU"):
            raise InputError(f"{where}: /class_names has shape {names.shape} and dtype {names.dtype}; expected a 1-D "
                             "dataset of UTF-8 strings")
        if names is not None and names.shape[0] != num_classes:
            raise InputError(f"{where}: /class_names has {names.shape[0]} names for {num_classes} classes")

    def _class_names(self, names: h5py.Dataset | None) -> list[str] | None:
        """The class names (read only after their count and storage were checked)."""
        if names is None:
            return None
        try:
            values = names.asstr(errors="replace")[()] if names.dtype.kind in "OS" else names[()]
        except (OSError, RuntimeError, TypeError, ValueError) as exc:
            raise InputError(f"{self.path}: cannot read /class_names ({_short(exc)}); store UTF-8 strings") from None
        return [str(v) for v in np.asarray(values).tolist()]

    def _layers(self, attrs: dict[str, Any], n_rows: int) -> dict[str, int]:
        """``{name: p_layer}`` of ``/layers/<name>/features``, in the ``layer_order`` attribute's order when valid."""
        group = self._get("layers")
        if not isinstance(group, h5py.Group):
            return {}
        layers: dict[str, int] = {}
        for name in group:
            ds = self._dataset(f"layers/{name}/features")
            if ds is None or ds.ndim != 2 or ds.shape[0] != n_rows or ds.shape[1] == 0 \
                    or ds.dtype.name not in FEATURE_DTYPES:
                raise InputError(f"{self.path}: /layers/{name}/features must be a 2-D float dataset with {n_rows} "
                                 "rows")
            layers[name] = int(ds.shape[1])
        order = attrs.get("layer_order")
        if isinstance(order, str):
            try:
                order = json.loads(order)
            except json.JSONDecodeError:
                order = None
        if isinstance(order, list) and all(isinstance(n, str) for n in order) and set(order) == set(layers):
            layers = {name: layers[name] for name in order}
        return layers

    def _reference(self, p: int) -> tuple[h5py.Dataset | None, h5py.Dataset | None]:
        ref_idx, ref_feat = self._dataset("reference_fp32/index"), self._dataset("reference_fp32/features")
        if ref_idx is None or ref_feat is None:
            return None, None
        if ref_feat.ndim != 2 or ref_feat.shape[1] != p or ref_idx.ndim != 1 or ref_feat.shape[0] != ref_idx.shape[0] \
                or ref_idx.dtype.kind not in "iu" or ref_feat.dtype.kind != "f":
            raise InputError(f"{self.path}: /reference_fp32 has index {ref_idx.shape} {ref_idx.dtype} and features "
                             f"{ref_feat.shape} {ref_feat.dtype}; expected [K] integers and [K, {p}] floats")
        return ref_idx, ref_feat

    def _check_stored(self, feats: h5py.Dataset, labels: h5py.Dataset, layers: dict[str, int], rows: int,
                      whole: list[h5py.Dataset | None]) -> tuple[Path, ...]:
        """Every dataset that will be read holds the rows it declares (shards included); the shard files used."""
        checker = _StorageCheck(self.path)
        try:
            checker.rows(feats, "features", rows)
            checker.rows(labels, "labels", rows)
            for name in layers:
                checker.rows(self._file[f"layers/{name}/features"], f"layers/{name}/features", rows)
            for ds in whole:
                if ds is not None:
                    checker.rows(ds, ds.name.lstrip("/"), int(ds.shape[0]) if ds.ndim else 1)
        finally:
            checker.close()
        return tuple(checker.sources)

    # -- data ------------------------------------------------------------------------------------------------------
    def _read(self, name: str, index: Any = ()) -> np.ndarray:
        try:
            return np.asarray(self._file[name][index])
        except (OSError, RuntimeError, KeyError, TypeError, ValueError) as exc:
            raise InputError(f"{self.path}: cannot read /{name} ({_short(exc)}); the file or one of its shard files "
                             "is damaged") from None

    def classifier(self) -> tuple[np.ndarray, np.ndarray | None] | None:
        """The final linear layer ``(W (C, p), b (C,) or None)`` in float64, or None when the file has none."""
        if not self.info.has_classifier:
            return None
        w = self._read("classifier/weight").astype(np.float64)
        b = self._read("classifier/bias").astype(np.float64) if self.info.has_bias else None
        return w, b

    def reference_fp32(self) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        """``(index (K,), features as stored (K, p), float32 reference (K, p))`` for rows below ``n_samples``."""
        if self.info.n_reference == 0:
            return None
        index = self._read("reference_fp32/index").astype(np.int64)
        ref = self._read("reference_fp32/features")
        keep = (index >= 0) & (index < self.info.n_samples)
        index, ref = index[keep], ref[keep]
        index, first = np.unique(index, return_index=True)  # sorted and unique: h5py fancy indexing needs both
        if index.size == 0:
            return None
        return index, self._read("features", index), ref[first]

    def iter_batches(
        self,
        batch_size: int,
        *,
        layers: Sequence[str] = (),
        prefetch: bool = True,
        rows: range | None = None,
    ) -> Iterator[tuple[int, np.ndarray, np.ndarray, dict[str, np.ndarray]]]:
        """Yield ``(start, features (B, p), labels (B,), {layer: (B, p_layer)})`` over the first ``n_samples`` rows.

        Features keep their stored dtype. With ``prefetch`` a reader thread reads the next batch while the caller
        computes on the current one (h5py releases no GIL while reading, torch does while computing). ``rows``, a
        contiguous range within the first ``n_samples`` rows (one rank's part), streams only those; ``start`` stays
        the row's index in the file.
        """
        if batch_size < 1:
            raise InputError(f"batch size must be at least 1, got {batch_size}")
        feats, labels = self._file["features"], self._file["labels"]
        layer_ds = {name: self._file[f"layers/{name}/features"] for name in layers}
        n = self.info.n_samples
        first = 0
        if rows is not None:
            if rows.step != 1 or not 0 <= rows.start <= rows.stop <= n:
                raise ValueError(f"rows must be a contiguous range within [0, {n}), got {rows}")
            first, n = rows.start, rows.stop

        def read(start: int) -> tuple[int, np.ndarray, np.ndarray, dict[str, np.ndarray]]:
            stop = min(start + batch_size, n)
            try:
                x = feats[start:stop]
                y = np.asarray(labels[start:stop], dtype=np.int64)
                extra = {name: ds[start:stop] for name, ds in layer_ds.items()}
            except (OSError, RuntimeError, KeyError, TypeError, ValueError) as exc:
                raise InputError(f"{self.path}: cannot read rows {start}:{stop} ({_short(exc)}); the file or one of "
                                 "its shard files is missing or damaged") from None
            return start, x, y, extra

        starts = range(first, n, batch_size)
        if not prefetch or len(starts) <= 1:
            for start in starts:
                yield read(start)
            return
        yield from _prefetched(read, starts)


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
                             "(ncaudit.store.join_shards)")

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


def _prefetched(read: Any, starts: range, depth: int = 2) -> Iterator[Any]:
    """Run ``read(start)`` for each start in a background thread, ``depth`` batches ahead of the consumer."""
    q: queue.Queue[Any] = queue.Queue(maxsize=depth)
    stop = threading.Event()
    sentinel = object()

    def worker() -> None:
        try:
            for start in starts:
                if stop.is_set():
                    return
                q.put(("ok", read(start)))
        except BaseException as exc:  # handed to the consumer, re-raised there
            q.put(("err", exc))
        q.put(("ok", sentinel))

    thread = threading.Thread(target=worker, name="ncaudit-reader", daemon=True)
    thread.start()
    try:
        while True:
            kind, item = q.get()
            if kind == "err":
                raise item
            if item is sentinel:
                return
            yield item
    finally:
        stop.set()
        while thread.is_alive():  # unblock a worker waiting on a full queue
            try:
                q.get_nowait()
            except queue.Empty:
                thread.join(timeout=0.05)


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _reason(exc: BaseException) -> str:
    """The OS reason of an HDF5 / OS error ("No space left on device"), else its first line."""
    code = exc.errno if isinstance(exc, OSError) and exc.errno else None
    if code is None and (match := re.search(r"errno = (\d+)", str(exc))):
        code = int(match.group(1))
    return os.strerror(code) if code else _short(exc)


# ---------------------------------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------------------------------
def encode_attr(value: Any) -> Any:
    """A Python value as an HDF5 attribute: None as "", dicts and lists as sorted JSON strings."""
    if value is None:
        return ""
    if isinstance(value, (Mapping, list, tuple)):
        return json.dumps(value, sort_keys=True, default=str)
    return value


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
                    _stamp(fd)
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


class CacheWriter:
    """Write a schema-1 cache row chunk by row chunk, resumably, as the only writer of the file.

    The datasets are created at their final size ``n_samples``; each :meth:`write` puts rows at ``n_written``, flushes
    the file, syncs it to disk, checks that every chunk of those rows is allocated within the file, and only then
    advances the ``n_written`` attribute. So a crash loses at most the chunk in flight and a failed write (disk full,
    I/O error) raises :class:`~ncaudit.errors.CacheWriteError` with ``n_written`` at the last row known to be on disk:
    the file stays resumable. Chunks are written through (no HDF5 chunk cache), so a write error surfaces in the call
    that caused it rather than when a cached chunk is evicted later. :meth:`finish` sets ``complete = true``.

    The writer holds a :class:`WriterLock` on the file from creation (or :meth:`resume`) to :meth:`close`.

    Parameters
    ----------
    path
        Output file. Must not exist unless ``overwrite`` (an existing file is replaced only when writing starts).
    n_samples, n_features, num_classes
        N, p and C.
    weight, bias
        The final affine map, ``(C, p)`` and ``(C,)`` or None for a bias-free head.
    feature_dtype
        ``float32`` (default), ``float16`` or ``float64`` for ``/features`` and layer features.
    store_logits
        Create ``/logits`` (N, C) float32.
    layers
        ``{name: p_layer}`` of further layers stored under ``/layers/<name>/features`` (in network order).
    class_names
        C names in model order, stored as ``/class_names``.
    attrs
        Provenance attributes; dicts and lists are stored as JSON strings.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        n_samples: int,
        n_features: int,
        num_classes: int,
        weight: np.ndarray | None,
        bias: np.ndarray | None = None,
        feature_dtype: str = "float32",
        store_logits: bool = True,
        layers: Mapping[str, int] | None = None,
        class_names: Sequence[str] | None = None,
        attrs: Mapping[str, Any] | None = None,
        chunk_rows: int = DEFAULT_CHUNK_ROWS,
        overwrite: bool = False,
    ) -> None:
        self.path = Path(path)
        if feature_dtype not in FEATURE_DTYPES:
            raise InputError(f"feature dtype {feature_dtype!r} is not one of {', '.join(FEATURE_DTYPES)}")
        self._lock = WriterLock(self.path).acquire()
        try:
            if self.path.exists() and not overwrite:
                raise InputError(f"{self.path}: already exists; pass --overwrite to replace it or --resume to "
                                 "continue it")
            self._file = self._create(n_samples, n_features, num_classes, weight, bias, feature_dtype, store_logits,
                                      layers or {}, class_names, attrs or {}, chunk_rows)
        except BaseException:
            self._lock.release()
            raise
        self.n_written = 0
        self.n_samples = n_samples
        self._failed = False
        self._hold_datasets()

    def _create(self, n_samples: int, n_features: int, num_classes: int, weight: np.ndarray | None,
                bias: np.ndarray | None, feature_dtype: str, store_logits: bool, layers: Mapping[str, int],
                class_names: Sequence[str] | None, attrs: Mapping[str, Any], chunk_rows: int) -> h5py.File:
        """Create the file with every dataset at its final size; a failure removes the half-made file."""
        try:
            f = h5py.File(self.path, "w", locking=False, rdcc_nbytes=0)
        except (OSError, RuntimeError) as exc:
            raise CacheWriteError(f"{self.path}: cannot create the cache ({_reason(exc)}); free disk space or choose "
                                  "another output path") from None
        try:
            f.attrs["ncaudit_schema"] = SCHEMA_VERSION
            f.attrs["num_classes"] = int(num_classes)
            f.attrs["complete"] = False
            f.attrs["n_written"] = 0
            for key, value in attrs.items():
                f.attrs[key] = encode_attr(value)
            chunk = (max(1, min(chunk_rows, n_samples)),)
            f.create_dataset("features", shape=(n_samples, n_features), dtype=feature_dtype,
                             chunks=chunk + (n_features,))
            f.create_dataset("labels", shape=(n_samples,), dtype="int64", chunks=chunk)
            if store_logits:
                f.create_dataset("logits", shape=(n_samples, num_classes), dtype="float32",
                                 chunks=chunk + (num_classes,))
            if weight is not None:
                w = np.asarray(weight)
                wdtype = "float64" if w.dtype == np.float64 else "float32"
                f.create_dataset("classifier/weight", data=w.astype(wdtype))
                if bias is not None:
                    f.create_dataset("classifier/bias", data=np.asarray(bias).astype(wdtype))
            if class_names is not None:
                f.create_dataset("class_names", data=list(class_names), dtype=h5py.string_dtype("utf-8"))
            for name, width in layers.items():
                f.create_dataset(f"layers/{name}/features", shape=(n_samples, width), dtype=feature_dtype,
                                 chunks=chunk + (width,))
            if layers:
                f.attrs["layer_order"] = json.dumps(list(layers))
            f.flush()
            _sync(f)
        except BaseException as exc:
            _close_quietly(f)
            self.path.unlink(missing_ok=True)
            if isinstance(exc, (OSError, RuntimeError)):
                raise CacheWriteError(f"{self.path}: cannot create the cache ({_reason(exc)}); free disk space or "
                                      "choose another output path") from None
            raise
        return f

    @classmethod
    def resume(cls, path: str | os.PathLike[str]) -> CacheWriter:
        """Reopen a partial cache for appending at its ``n_written`` row (taking the writer lock)."""
        self = cls.__new__(cls)
        self.path = Path(path)
        self._lock = WriterLock(self.path).acquire()
        try:
            self._file = h5py.File(self.path, "r+", locking=False, rdcc_nbytes=0)
        except (OSError, RuntimeError) as exc:
            self._lock.release()
            raise InputError(f"{self.path}: cannot reopen for resuming ({_short(exc)}); pass --overwrite to start "
                             "again") from None
        try:
            self._failed = False
            self._hold_datasets()
            self.n_samples = int(self._datasets["features"].shape[0])
            self.n_written = attr_int(attr_value(self._file.attrs.get("n_written", 0)), "n_written", str(self.path),
                                      minimum=0, maximum=self.n_samples)
        except BaseException:
            self.close()
            raise
        return self

    def _hold_datasets(self) -> None:
        """Keep one open handle per written dataset for the writer's lifetime (so write errors reach the caller)."""
        f = self._file
        names = ["features", "labels", "logits"] + [f"layers/{n}/features" for n in f.get("layers", {})]
        self._datasets: dict[str, h5py.Dataset] = {n: f[n] for n in names if isinstance(f.get(n), h5py.Dataset)}
        if "features" not in self._datasets or "labels" not in self._datasets:
            raise InputError(f"{self.path}: no /features or /labels to write to; pass --overwrite to start again")

    @property
    def feature_dtype(self) -> np.dtype:
        return self._datasets["features"].dtype

    @property
    def attrs(self) -> h5py.AttributeManager:
        return self._file.attrs

    def write(
        self,
        features: np.ndarray,
        labels: np.ndarray,
        logits: np.ndarray | None = None,
        layers: Mapping[str, np.ndarray] | None = None,
    ) -> None:
        """Append one chunk of rows; flush, sync and verify them; then advance ``n_written``.

        Raises
        ------
        CacheWriteError
            A write, flush or sync failed, or the rows are not allocated in the file: ``n_written`` stays at the
            rows already on disk, the file stays resumable, and the writer refuses further writes.
        """
        start, stop = self.n_written, self.n_written + len(labels)
        if stop > self.n_samples:
            raise ValueError(f"writing rows {start}:{stop} past the cache's {self.n_samples} rows")
        blocks: dict[str, np.ndarray] = {"features": features, "labels": labels}
        if logits is not None and "logits" in self._datasets:
            blocks["logits"] = logits
        for name, values in (layers or {}).items():
            blocks[f"layers/{name}/features"] = values
        with self._guard(f"writing rows {start}:{stop}"):
            for name, values in blocks.items():
                self._datasets[name][start:stop] = values
            self._file.flush()
            _sync(self._file)
            _verify_rows(self._file, [self._datasets[name] for name in blocks], start, stop)
            self._file.attrs["n_written"] = stop
            self._file.flush()
        self.n_written = stop

    @contextlib.contextmanager
    def _guard(self, what: str) -> Iterator[None]:
        """Turn an HDF5 / OS write error into a :class:`CacheWriteError` that says what is kept; stop further writes."""
        if self._failed:
            raise CacheWriteError(f"{self.path}: an earlier write failed; the file keeps its first {self.n_written} "
                                  "rows, rerun `ncaudit extract` with --resume")
        try:
            yield
        except (OSError, RuntimeError) as exc:
            self._failed = True
            raise CacheWriteError(
                f"{self.path}: {what} failed ({_reason(exc)}); its first {self.n_written} of {self.n_samples} rows are "
                "on disk and the file is resumable: free disk space (or fix the I/O error), then rerun "
                "`ncaudit extract` with --resume") from None

    def write_reference(self, index: np.ndarray, features: np.ndarray) -> None:
        """Store ``/reference_fp32``: rows ``index`` recomputed in float32 without autocast or TF32."""
        f = self._file
        with self._guard("writing /reference_fp32"):
            for name in ("reference_fp32/index", "reference_fp32/features"):
                if name in f:
                    del f[name]
            f.create_dataset("reference_fp32/index", data=np.asarray(index, dtype=np.int64))
            f.create_dataset("reference_fp32/features", data=np.asarray(features, dtype=np.float32))
            f.flush()
            _sync(f)

    def finish(self, **attrs: Any) -> None:
        """Mark the cache complete (every row written) and close it."""
        if self.n_written != self.n_samples:
            raise ValueError(f"finish() after {self.n_written} of {self.n_samples} rows")
        with self._guard("marking the cache complete"):
            for key, value in attrs.items():
                self._file.attrs[key] = encode_attr(value)
            self._file.attrs["complete"] = True
            self._file.flush()
            _sync(self._file)
        self.close()

    def close(self) -> None:
        """Close the file (quietly after a failed write: its error was raised already) and release the lock."""
        try:
            if self._file.id.valid:
                if self._failed:
                    _close_quietly(self._file)
                else:
                    self._file.close()
        finally:
            self._lock.release()

    def __enter__(self) -> CacheWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _sync(f: h5py.File) -> None:
    """Push the file's written bytes to the device (a deferred write error, e.g. ENOSPC on NFS, surfaces here)."""
    if f.driver != "sec2":
        return
    fd = f.id.get_vfd_handle()
    (getattr(os, "fdatasync", None) or os.fsync)(fd)


def _verify_rows(f: h5py.File, datasets: Sequence[h5py.Dataset], start: int, stop: int) -> None:
    """Every chunk of rows ``start:stop`` is allocated and lies within the file's size on disk."""
    end = 0
    for ds in datasets:
        step = ds.chunks[0] if ds.chunks else 0
        for row in range(start - start % step, stop, step) if step else ():
            info = ds.id.get_chunk_info_by_coord((row,) + (0,) * (ds.ndim - 1))
            if info.byte_offset is None:
                raise OSError(errno.EIO, f"rows {row}:{row + step} of {ds.name} are not in the file after writing")
            end = max(end, info.byte_offset + info.size)
    if f.driver == "sec2" and os.fstat(f.id.get_vfd_handle()).st_size < end:
        raise OSError(errno.EIO, "the file on disk is shorter than the rows just written")


def _close_quietly(f: h5py.File) -> None:
    """Close a file whose writes failed: HDF5 retries the failed flush on close and fails again; that is expected."""
    try:
        f.close()
    except (OSError, RuntimeError):
        pass


def write_cache(
    path: str | os.PathLike[str],
    features: np.ndarray,
    labels: np.ndarray,
    *,
    weight: np.ndarray | None = None,
    bias: np.ndarray | None = None,
    num_classes: int | None = None,
    logits: np.ndarray | None = None,
    layers: Mapping[str, np.ndarray] | None = None,
    class_names: Sequence[str] | None = None,
    reference: tuple[np.ndarray, np.ndarray] | None = None,
    attrs: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write in-memory arrays as a complete schema-1 cache (features from any framework, fixtures, tests)."""
    features = np.asarray(features)
    labels = np.asarray(labels, dtype=np.int64)
    if num_classes is None:
        num_classes = int(weight.shape[0]) if weight is not None else int(labels.max()) + 1
    dtype = features.dtype.name if features.dtype.name in FEATURE_DTYPES else "float32"
    writer = CacheWriter(
        path, n_samples=len(labels), n_features=features.shape[1], num_classes=num_classes, weight=weight, bias=bias,
        feature_dtype=dtype, store_logits=logits is not None,
        layers={k: int(v.shape[1]) for k, v in (layers or {}).items()}, class_names=class_names, attrs=attrs,
        overwrite=overwrite,
    )
    with writer:
        step = 4096
        for start in range(0, len(labels), step):
            sl = slice(start, start + step)
            writer.write(features[sl], labels[sl], None if logits is None else logits[sl],
                         {k: v[sl] for k, v in (layers or {}).items()})
        if reference is not None:
            writer.write_reference(*reference)
        writer.finish()
    return Path(path)


def join_shards(path: str | os.PathLike[str], shards: Sequence[str | os.PathLike[str]], *,
                allow_partial: bool = False) -> Path:
    """Join complete shard caches (one per rank) into one cache whose ``/features``, ``/labels`` (and ``/logits``
    and layer features, when every shard has them) are HDF5 virtual datasets over the shards.

    Shard paths are stored relative to the joined file's directory when they lie beside or below it, so the set of
    files can be moved together. The classifier, class names and provenance are copied from the first shard. With
    ``allow_partial``, an incomplete shard contributes its first ``n_written`` rows (the pieces of an interrupted and
    resumed distributed extraction, :mod:`ncaudit.shards`).
    """
    out = Path(path)
    shard_paths = [Path(s) for s in shards]
    if not shard_paths:
        raise InputError("no shard files to join")
    infos = []
    for s in shard_paths:
        with FeatureCache(s, allow_partial=allow_partial) as cache:
            infos.append(cache.info)
    p, c = infos[0].n_features, infos[0].num_classes
    for info in infos:
        if info.n_features != p or info.num_classes != c or info.feature_dtype != infos[0].feature_dtype:
            raise InputError(f"{info.path}: shard has p={info.n_features}, C={info.num_classes}, "
                             f"{info.feature_dtype}; the first shard has p={p}, C={c}, {infos[0].feature_dtype}")
    total = sum(info.n_samples for info in infos)

    def source_name(s: Path) -> str:
        try:
            return os.path.relpath(s.resolve(), out.resolve().parent)
        except ValueError:
            return str(s.resolve())

    datasets: dict[str, tuple[tuple[int, ...], str]] = {
        "features": ((total, p), infos[0].feature_dtype),
        "labels": ((total,), "int64"),
    }
    if all(info.has_logits for info in infos):
        datasets["logits"] = ((total, c), "float32")
    common_layers = [name for name in infos[0].layers if all(name in info.layers for info in infos)]
    for name in common_layers:
        datasets[f"layers/{name}/features"] = ((total, infos[0].layers[name]), infos[0].feature_dtype)
    with WriterLock(out), h5py.File(out, "w", locking=False) as f, \
            h5py.File(shard_paths[0], "r", locking=False) as first:
        for key, value in first.attrs.items():
            f.attrs[key] = value
        f.attrs["num_classes"] = c
        f.attrs["n_written"] = total
        f.attrs["complete"] = True
        f.attrs["shards"] = json.dumps([source_name(s) for s in shard_paths])
        for name in ("classifier/weight", "classifier/bias", "class_names"):
            if name in first:
                first.copy(first[name], f, name=name)
        for name, (shape, dtype) in datasets.items():
            layout = h5py.VirtualLayout(shape=shape, dtype=dtype)
            offset = 0
            for s, info in zip(shard_paths, infos):
                n = info.n_samples
                src_shape = (info.n_rows,) + shape[1:]
                layout[offset:offset + n] = h5py.VirtualSource(source_name(s), name, shape=src_shape)[:n]
                offset += n
            f.create_virtual_dataset(name, layout)
    return out
