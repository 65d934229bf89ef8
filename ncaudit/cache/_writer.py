"""Writing a cache: the verified, resumable writer and ``write_cache`` for features computed elsewhere."""

from __future__ import annotations

import contextlib
import errno
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from ncaudit._validate import attr_int
from ncaudit.cache._format import (
    DEFAULT_CHUNK_ROWS,
    FEATURE_DTYPES,
    SCHEMA_VERSION,
    _reason,
    _short,
    attr_value,
    encode_attr,
)
from ncaudit.cache._lock import WriterLock
from ncaudit.errors import CacheWriteError, InputError


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
            _sync(self._file)  # n_written itself on disk before it is reported as kept
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
