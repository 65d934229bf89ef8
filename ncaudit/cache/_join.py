"""Joining shard files into one cache whose datasets are HDF5 virtual datasets over the shards."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import h5py

from ncaudit.cache._format import _reason
from ncaudit.cache._lock import WriterLock
from ncaudit.cache._reader import FeatureCache
from ncaudit.errors import CacheWriteError, InputError


def join_shards(path: str | os.PathLike[str], shards: Sequence[str | os.PathLike[str]], *,
                allow_partial: bool = False) -> Path:
    """Join complete shard caches (one per rank) into one cache whose ``/features``, ``/labels`` (and ``/logits``
    and layer features, when every shard has them) are HDF5 virtual datasets over the shards.

    Shard paths are stored relative to the joined file's directory when they lie beside or below it, so the set of
    files can be moved together; ``%`` in their names is escaped as HDF5 reads source names (``%%``). The
    classifier, class names and provenance are copied from the first shard. With ``allow_partial``, an incomplete
    shard contributes its first ``n_written`` rows (the pieces of an interrupted and resumed distributed extraction,
    :mod:`ncaudit.cache._shards`).

    The file is written under a temporary name beside ``path`` and renamed into place when complete: a failure
    (a full disk) leaves no half-joined file. ``report`` reads the result without ``--allow-external`` when the
    shards are the row-named files beside it that a distributed ``extract`` writes
    (:func:`ncaudit.cache._shards.shard_path`), each of the same run; other shards need ``allow_external``.

    Raises
    ------
    InputError
        A shard is unreadable, incomplete (without ``allow_partial``) or of another shape.
    CacheWriteError
        Writing the joined file failed (the shards are untouched).
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
            name = os.path.relpath(s.resolve(), out.resolve().parent)
        except ValueError:
            name = str(s.resolve())
        return name.replace("%", "%%")  # HDF5 reads source names as printf-like patterns

    datasets: dict[str, tuple[tuple[int, ...], str]] = {
        "features": ((total, p), infos[0].feature_dtype),
        "labels": ((total,), "int64"),
    }
    if all(info.has_logits for info in infos):
        datasets["logits"] = ((total, c), "float32")
    common_layers = [name for name in infos[0].layers if all(name in info.layers for info in infos)]
    for name in common_layers:
        datasets[f"layers/{name}/features"] = ((total, infos[0].layers[name]), infos[0].feature_dtype)
    tmp = out.with_name(f".{out.name}.joining-{os.getpid()}")
    with WriterLock(out):
        try:
            with h5py.File(tmp, "w", locking=False) as f, h5py.File(shard_paths[0], "r", locking=False) as first:
                for key, value in first.attrs.items():
                    if key != "rows":  # the first shard's own rows
                        f.attrs[key] = value
                f.attrs["num_classes"] = c
                f.attrs["n_written"] = total
                f.attrs["complete"] = True
                f.attrs["shards"] = json.dumps([source_name(s).replace("%%", "%") for s in shard_paths])
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
                f.flush()
                os.fsync(f.id.get_vfd_handle())
            os.replace(tmp, out)
        except (OSError, RuntimeError) as exc:
            raise CacheWriteError(f"{out}: joining the shards failed ({_reason(exc)}); the shards are kept as they "
                                  "were: free disk space (or fix the I/O error), then rerun (extract --resume joins "
                                  "them)") from None
        finally:
            tmp.unlink(missing_ok=True)
    return out
