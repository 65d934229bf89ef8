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

import json
import os
import queue
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from ncaudit.errors import InputError

SCHEMA_VERSION = 1
FEATURE_DTYPES = ("float16", "float32", "float64")
DEFAULT_CHUNK_ROWS = 256


def attr_value(value: Any) -> Any:
    """HDF5 attribute -> plain Python (bytes to str, numpy scalars to Python scalars, JSON strings kept as str)."""
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return [attr_value(v) for v in value.tolist()] if value.dtype.kind in "OSU" else value.tolist()
    return value


@dataclass(frozen=True)
class CacheInfo:
    """What a cache holds, read from its metadata without touching the sample data.

    ``n_samples`` is the number of rows a reader uses: all N rows of a complete file, ``n_written`` of a partial one.
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


class FeatureCache:
    """A schema-1 feature cache opened read-only (no HDF5 file lock), read in batches of rows.

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
        except OSError as exc:
            raise InputError(
                f"{self.path}: not a readable HDF5 file ({_short(exc)}); give a cache written by `ncaudit extract` "
                "or in the schema-1 layout of the README"
            ) from None
        try:
            self.info = self._read_info(allow_partial)
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
    def _dataset(self, name: str) -> h5py.Dataset | None:
        obj = self._file.get(name)
        return obj if isinstance(obj, h5py.Dataset) else None

    def _read_info(self, allow_partial: bool) -> CacheInfo:
        f, where = self._file, str(self.path)
        attrs = {k: attr_value(v) for k, v in f.attrs.items()}
        schema = attrs.get("ncaudit_schema", SCHEMA_VERSION)
        if schema != SCHEMA_VERSION:
            raise InputError(f"{where}: ncaudit_schema is {schema!r}, this version reads schema {SCHEMA_VERSION}; "
                             "re-extract the features or upgrade ncaudit")
        feats, labels = self._dataset("features"), self._dataset("labels")
        if feats is None:
            raise InputError(f"{where}: no /features dataset; write the penultimate features as /features [N, p]")
        if labels is None:
            raise InputError(f"{where}: no /labels dataset; write the class indices as /labels [N] (int64)")
        if feats.ndim != 2:
            raise InputError(f"{where}: /features has shape {feats.shape}, expected 2-D [N, p]")
        if feats.dtype.name not in FEATURE_DTYPES:
            raise InputError(f"{where}: /features has dtype {feats.dtype}, expected one of {', '.join(FEATURE_DTYPES)}")
        if labels.ndim != 1 or labels.shape[0] != feats.shape[0]:
            raise InputError(f"{where}: /labels has shape {labels.shape} but /features has {feats.shape[0]} rows; "
                             "they must match")
        if labels.dtype.kind not in "iu":
            raise InputError(f"{where}: /labels has dtype {labels.dtype}, expected integer class indices")
        n_rows, p = int(feats.shape[0]), int(feats.shape[1])
        complete = bool(attrs.get("complete", True))
        n_written = int(attrs.get("n_written", n_rows))
        if not complete and not allow_partial:
            raise InputError(f"{where}: the cache is incomplete ({n_written} of {n_rows} rows written, complete=false);"
                             " finish it with `ncaudit extract --resume` or pass --allow-partial")
        n_samples = n_rows if complete else min(n_written, n_rows)
        weight = self._dataset("classifier/weight")
        bias = self._dataset("classifier/bias")
        logits = self._dataset("logits")
        names_ds = self._dataset("class_names")
        class_names = None
        if names_ds is not None:
            class_names = [attr_value(v) for v in names_ds[()].tolist()]
        num_classes = attrs.get("num_classes")
        if num_classes is None:
            if weight is not None:
                num_classes = weight.shape[0]
            elif class_names is not None:
                num_classes = len(class_names)
            elif logits is not None:
                num_classes = logits.shape[1]
            else:
                raise InputError(f"{where}: cannot tell the number of classes; set the root attribute num_classes "
                                 "or store /classifier/weight")
        num_classes = int(num_classes)
        if num_classes < 2:
            raise InputError(f"{where}: num_classes is {num_classes}; neural-collapse metrics need at least 2 classes")
        if weight is not None and tuple(weight.shape) != (num_classes, p):
            raise InputError(f"{where}: /classifier/weight has shape {tuple(weight.shape)}, expected [C, p] = "
                             f"[{num_classes}, {p}]; store the final linear layer's weight with one row per class")
        if bias is not None and tuple(bias.shape) != (num_classes,):
            raise InputError(f"{where}: /classifier/bias has shape {tuple(bias.shape)}, expected [C] = "
                             f"[{num_classes}]")
        if bias is not None and weight is None:
            raise InputError(f"{where}: /classifier/bias without /classifier/weight; store both or neither")
        if class_names is not None and len(class_names) != num_classes:
            raise InputError(f"{where}: /class_names has {len(class_names)} names for {num_classes} classes")
        layers: dict[str, int] = {}
        group = f.get("layers")
        if isinstance(group, h5py.Group):
            for name in group:
                ds = self._dataset(f"layers/{name}/features")
                if ds is None or ds.ndim != 2 or ds.shape[0] != n_rows:
                    raise InputError(f"{where}: /layers/{name}/features must be a 2-D dataset with {n_rows} rows")
                layers[name] = int(ds.shape[1])
            order = attrs.get("layer_order")
            if isinstance(order, str):
                order = json.loads(order)
            if isinstance(order, list) and set(order) == set(layers):
                layers = {name: layers[name] for name in order}
        n_reference = 0
        ref_idx, ref_feat = self._dataset("reference_fp32/index"), self._dataset("reference_fp32/features")
        if ref_idx is not None and ref_feat is not None:
            if ref_feat.ndim != 2 or ref_feat.shape[1] != p or ref_feat.shape[0] != ref_idx.shape[0]:
                raise InputError(f"{where}: /reference_fp32 has index {ref_idx.shape} and features {ref_feat.shape}; "
                                 f"expected [K] and [K, {p}]")
            n_reference = int(ref_idx.shape[0])
        return CacheInfo(
            path=self.path, n_samples=n_samples, n_rows=n_rows, n_features=p, num_classes=num_classes,
            feature_dtype=feats.dtype.name, complete=complete, has_classifier=weight is not None,
            has_bias=bias is not None, has_logits=logits is not None, class_names=class_names, layers=layers,
            n_reference=n_reference, attrs=attrs,
        )

    # -- data ------------------------------------------------------------------------------------------------------
    def classifier(self) -> tuple[np.ndarray, np.ndarray | None] | None:
        """The final linear layer ``(W (C, p), b (C,) or None)`` in float64, or None when the file has none."""
        weight = self._dataset("classifier/weight")
        if weight is None:
            return None
        bias = self._dataset("classifier/bias")
        w = np.asarray(weight[()], dtype=np.float64)
        b = None if bias is None else np.asarray(bias[()], dtype=np.float64)
        return w, b

    def reference_fp32(self) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        """``(index (K,), features as stored (K, p), float32 reference (K, p))`` for rows below ``n_samples``."""
        if self.info.n_reference == 0:
            return None
        index = np.asarray(self._file["reference_fp32/index"][()], dtype=np.int64)
        ref = np.asarray(self._file["reference_fp32/features"][()])
        keep = (index >= 0) & (index < self.info.n_samples)
        index, ref = index[keep], ref[keep]
        if index.size == 0:
            return None
        order = np.argsort(index, kind="stable")
        index, ref = index[order], ref[order]
        stored = self._file["features"][index]  # h5py fancy indexing needs increasing indices
        return index, stored, ref

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
            except (OSError, KeyError) as exc:
                raise InputError(f"{self.path}: cannot read rows {start}:{stop} ({_short(exc)}); the file or one of "
                                 "its shard files is missing or damaged") from None
            return start, x, y, extra

        starts = range(first, n, batch_size)
        if not prefetch or len(starts) <= 1:
            for start in starts:
                yield read(start)
            return
        yield from _prefetched(read, starts)


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


class CacheWriter:
    """Write a schema-1 cache row chunk by row chunk, resumably.

    The datasets are created at their final size ``n_samples``; each :meth:`write` appends rows at ``n_written``,
    flushes the file and then advances the ``n_written`` attribute, so a crash loses at most the chunk in flight and
    leaves ``complete = false``. :meth:`finish` sets ``complete = true``.

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
        if self.path.exists() and not overwrite:
            raise InputError(f"{self.path}: already exists; pass --overwrite to replace it or --resume to continue it")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        f = h5py.File(self.path, "w", locking=False)
        self._file = f
        try:
            f.attrs["ncaudit_schema"] = SCHEMA_VERSION
            f.attrs["num_classes"] = int(num_classes)
            f.attrs["complete"] = False
            f.attrs["n_written"] = 0
            for key, value in (attrs or {}).items():
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
            for name, width in (layers or {}).items():
                f.create_dataset(f"layers/{name}/features", shape=(n_samples, width), dtype=feature_dtype,
                                 chunks=chunk + (width,))
            if layers:
                f.attrs["layer_order"] = json.dumps(list(layers))
            f.flush()
        except BaseException:
            f.close()
            raise
        self.n_written = 0
        self.n_samples = n_samples

    @classmethod
    def resume(cls, path: str | os.PathLike[str]) -> CacheWriter:
        """Reopen a partial cache for appending at its ``n_written`` row."""
        self = cls.__new__(cls)
        self.path = Path(path)
        try:
            self._file = h5py.File(self.path, "r+", locking=False)
        except OSError as exc:
            raise InputError(f"{self.path}: cannot reopen for resuming ({_short(exc)}); pass --overwrite to start "
                             "again") from None
        self.n_written = int(self._file.attrs.get("n_written", 0))
        self.n_samples = int(self._file["features"].shape[0])
        return self

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
        """Append one chunk of rows, flush, then advance ``n_written``."""
        start, stop = self.n_written, self.n_written + len(labels)
        if stop > self.n_samples:
            raise ValueError(f"writing rows {start}:{stop} past the cache's {self.n_samples} rows")
        f = self._file
        f["features"][start:stop] = features
        f["labels"][start:stop] = labels
        if logits is not None and "logits" in f:
            f["logits"][start:stop] = logits
        for name, values in (layers or {}).items():
            f[f"layers/{name}/features"][start:stop] = values
        f.flush()
        f.attrs["n_written"] = stop
        f.flush()
        self.n_written = stop

    def write_reference(self, index: np.ndarray, features: np.ndarray) -> None:
        """Store ``/reference_fp32``: rows ``index`` recomputed in float32 without autocast or TF32."""
        f = self._file
        for name in ("reference_fp32/index", "reference_fp32/features"):
            if name in f:
                del f[name]
        f.create_dataset("reference_fp32/index", data=np.asarray(index, dtype=np.int64))
        f.create_dataset("reference_fp32/features", data=np.asarray(features, dtype=np.float32))
        f.flush()

    def finish(self, **attrs: Any) -> None:
        """Mark the cache complete (every row written) and close it."""
        if self.n_written != self.n_samples:
            raise ValueError(f"finish() after {self.n_written} of {self.n_samples} rows")
        for key, value in attrs.items():
            self._file.attrs[key] = encode_attr(value)
        self._file.attrs["complete"] = True
        self._file.flush()
        self.close()

    def close(self) -> None:
        if self._file.id.valid:
            self._file.close()

    def __enter__(self) -> CacheWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


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
    with h5py.File(out, "w", locking=False) as f, h5py.File(shard_paths[0], "r", locking=False) as first:
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
