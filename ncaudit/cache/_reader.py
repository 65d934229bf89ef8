"""The HDF5 feature cache, schema 1: reading a cache, checked before a row is read, in batches.

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

import json
import os
import queue
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from ncaudit._validate import attr_bool, attr_int, check_memory, check_schema, regular_file
from ncaudit.cache._format import FEATURE_DTYPES, SCHEMA_VERSION, _short, attr_value
from ncaudit.cache._rows import Rows
from ncaudit.cache._storage import _StorageCheck
from ncaudit.errors import InputError


@dataclass(frozen=True)
class CacheInfo:
    """What a cache holds, read from its metadata without touching the sample data.

    ``n_samples`` is the number of rows a reader uses: all N rows of a complete file, ``n_written`` of a partial one.
    ``sources`` lists every other file read: the shards of a joined cache, or (``allow_external``) the files its
    external links, external storage and virtual datasets reach (empty for a self-contained file).
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
    rows it declares (HDF5 reads never-written rows as zeros), the file must hold its own data (no external links,
    external storage or virtual datasets, :mod:`ncaudit.cache._storage`) except a joined cache's shards, and every
    shard must exist, hold its rows and come from the same run. A shard is read directly, and checked unchanged
    around every read.

    Parameters
    ----------
    path
        The ``.h5`` file; its ``/features`` and ``/labels`` may be virtual datasets over its shard files.
    allow_partial
        Accept a file whose ``complete`` attribute is false and read its first ``n_written`` rows.
    allow_external
        Also read what external links, external raw storage and other virtual datasets reach (with the same checks);
        ``info.sources`` names every such file.

    Raises
    ------
    InputError
        The file is missing, not HDF5, not schema 1, incomplete (without ``allow_partial``) or malformed.
    """

    def __init__(self, path: str | os.PathLike[str], *, allow_partial: bool = False,
                 allow_external: bool = False) -> None:
        self.path = Path(path)
        if not self.path.exists():
            raise InputError(f"{self.path}: no such file; check the path (write one with `ncaudit extract`)")
        if self.path.is_dir():
            raise InputError(f"{self.path}: is a directory; give the path of an .h5 feature cache")
        regular_file(self.path, "a feature cache")
        self._rows: dict[str, Rows] = {}
        self._check: _StorageCheck | None = None
        self._allow_external = allow_external
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
            self.close()
            raise
        except (OSError, RuntimeError, KeyError, TypeError, ValueError) as exc:  # HDF5 errors of a damaged file
            self.close()
            raise InputError(f"{self.path}: the file is damaged ({_short(exc)}); re-extract it or restore a copy, "
                             "written by `ncaudit extract` or in the schema-1 layout of the README") from None
        except BaseException:
            self.close()
            raise

    # -- context manager -------------------------------------------------------------------------------------------
    def __enter__(self) -> FeatureCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._rows.clear()
        if self._check is not None:
            self._check.close()
        self._file.close()

    # -- metadata --------------------------------------------------------------------------------------------------
    def _get(self, name: str) -> Any:
        """The object at ``name`` or None; links are checked before they are followed (:class:`_StorageCheck`), and
        one that cannot be followed is an error naming the link and its target."""
        assert self._check is not None
        return self._check.get(name)

    def _dataset(self, name: str) -> h5py.Dataset | None:
        obj = self._get(name)
        if obj is not None and not isinstance(obj, h5py.Dataset):
            raise InputError(f"{self.path}: /{name} is a group, expected a dataset; see the README's schema table")
        return obj

    def _read_info(self, allow_partial: bool) -> CacheInfo:
        where = str(self.path)
        attrs = self._root_attrs()
        self._check = _StorageCheck(self.path, self._file, attrs, allow_external=self._allow_external)
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
                                     {"classifier/weight": weight, "classifier/bias": bias, "class_names": names_ds,
                                      "reference_fp32/index": ref_idx, "reference_fp32/features": ref_feat})
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
            values = self._rows["class_names"].all()
        except (OSError, RuntimeError, TypeError, ValueError) as exc:
            raise InputError(f"{self.path}: cannot read /class_names ({_short(exc)}); store UTF-8 strings") from None
        return [v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v) for v in np.asarray(values).tolist()]

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
                      whole: dict[str, h5py.Dataset | None]) -> tuple[Path, ...]:
        """Every dataset that will be read holds the rows it declares (shards included), and where each row is read
        from; the other files read."""
        check = self._check
        assert check is not None
        named = {"features": feats, "labels": labels}
        named.update({f"layers/{name}/features": self._dataset(f"layers/{name}/features") for name in layers})
        for name, ds in named.items():
            self._rows[name] = Rows(name, check.segments(ds, name, rows), self.path)
        for name, ds in whole.items():
            if ds is not None:
                self._rows[name] = Rows(name, check.segments(ds, name, int(ds.shape[0]) if ds.ndim else 1),
                                        self.path)
        return check.sources

    # -- data ------------------------------------------------------------------------------------------------------
    def _read(self, name: str, index: np.ndarray | None = None) -> np.ndarray:
        try:
            rows = self._rows[name]
            return rows.all() if index is None else rows.take(index)
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
        feats, labels = self._rows["features"], self._rows["labels"]
        layer_ds = {name: self._rows[f"layers/{name}/features"] for name in layers}
        n = self.info.n_samples
        first = 0
        if rows is not None:
            if rows.step != 1 or not 0 <= rows.start <= rows.stop <= n:
                raise ValueError(f"rows must be a contiguous range within [0, {n}), got {rows}")
            first, n = rows.start, rows.stop

        def read(start: int) -> tuple[int, np.ndarray, np.ndarray, dict[str, np.ndarray]]:
            stop = min(start + batch_size, n)
            try:
                x = feats.read(start, stop)
                y = np.asarray(labels.read(start, stop), dtype=np.int64)
                extra = {name: ds.read(start, stop) for name, ds in layer_ds.items()}
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


def _prefetched(read: Any, starts: range, depth: int = 1) -> Iterator[Any]:
    """Run ``read(start)`` for each start in a background thread, ``depth`` batches ahead of the consumer (one is
    enough to hide a read behind a batch's products; each more holds another batch in memory)."""
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
        deadline = time.monotonic() + 1.0  # a read stuck in the kernel (a hung file system) is left to its daemon
        while thread.is_alive() and time.monotonic() < deadline:  # unblock a worker waiting on a full queue
            try:
                q.get_nowait()
            except queue.Empty:
                thread.join(timeout=0.05)
