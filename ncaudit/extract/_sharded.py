"""``ncaudit extract``: stream a dataset through a checkpoint and write the schema-1 feature cache.

The loop runs under ``torch.inference_mode`` with channels-last inputs, autocast when asked, pinned memory and
non-blocking copies on CUDA and DataLoader workers; a writer thread turns device tensors into HDF5 rows in chunks of
``chunk_rows`` so that writing overlaps compute. The cache carries ``complete = false`` and ``n_written`` until the last
row is in, so an interrupted run is resumable (``resume=True``) and never taken for complete.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import functools
import inspect
import json
import math
import os
import queue
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch

from ncaudit import __version__
from ncaudit.data._factory import open_samples
from ncaudit.data._labels import map_labels, read_class_map
from ncaudit.data._source import IN_MEMORY_READER, DataSource
from ncaudit.data._transforms import (TransformOverrides, build_transform, describe_transform, transform_config,
                                      transform_warnings)
from ncaudit._device import resolve_device
from ncaudit.distributed._collectives import barrier, broadcast_ints, together
from ncaudit.distributed._launch import DistContext, launch_env
from ncaudit.distributed._progress import GlobalProgress
from ncaudit.errors import CacheWriteError, InputError
from ncaudit.models._builder import LoadedModel, Weights
from ncaudit.models._factory import load_model
from ncaudit.models._metadata import imagenet_classes, imagenet_subset_for, recorded_preprocessing
from ncaudit.models._penultimate import PenultimateModel
from ncaudit.cache._shards import (ShardState, join_pieces, parse_shard_path, read_shard, remove_shards, scan_shards,
                                   shard_files, shard_path)
from ncaudit.cache._shards import plan as shard_plan
from ncaudit.stats._gemm import full_precision_matmul
from ncaudit.cache._format import DEFAULT_CHUNK_ROWS, attr_value, encode_attr
from ncaudit.cache._join import join_shards
from ncaudit.cache._lock import WriterLock
from ncaudit.cache._writer import CacheWriter
from ncaudit._validate import format_bytes

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
STORE_DTYPES = ("float32", "float16")
#: Attributes that must match for ``--resume`` to continue a partial file.
RESUME_KEYS = ("model", "weights", "seed", "checkpoint_sha256", "ema", "dataset", "split", "data_fingerprint",
               "transform", "precision", "layers")
_AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class ExtractSummary:
    """What one :func:`extract` call did.

    ``resumed_from`` is the row the run started at (0 for a fresh file), ``images_per_s`` the throughput over the rows
    this call computed, ``max_logit_error`` the largest relative error of ``W h + b`` against the model's logits on the
    first batch.
    """

    out: Path
    n_samples: int
    n_features: int
    num_classes: int
    resumed_from: int
    n_reference: int
    precision: str
    device: str
    store_dtype: str
    classifier_source: str
    max_logit_error: float
    seconds: float
    images_per_s: float
    warnings: tuple[str, ...] = ()


def available_cores() -> int:
    """CPU cores this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto`` -> bf16 autocast on CUDA, fp32 on CPU."""
    if precision not in PRECISIONS:
        raise InputError(f"--precision {precision!r}: use one of {', '.join(PRECISIONS)}")
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return precision


def autocast_context(precision: str, device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """Autocast for bf16/fp16, nothing for fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=_AUTOCAST_DTYPES[precision])


def _unwrap_worker_error(exc: BaseException) -> InputError:
    """An InputError re-raised from a DataLoader worker carries the worker's traceback; keep its last line."""
    text = str(exc).strip().splitlines()
    last = text[-1] if text else type(exc).__name__
    prefix = "ncaudit.errors.InputError: "
    return InputError(last.removeprefix(prefix))


# ---------------------------------------------------------------------------------------------------------------------
# Writer thread
# ---------------------------------------------------------------------------------------------------------------------
class _AsyncWriter:
    """Write batches to a :class:`CacheWriter` from a background thread, in chunk-aligned blocks of rows.

    Items are ``(event, features, labels, logits)``; ``event`` (a CUDA event or None) is waited on before the
    tensors, copied to the host without blocking, are read.
    """

    def __init__(self, writer: CacheWriter, chunk_rows: int, depth: int = 4) -> None:
        self.writer = writer
        self.chunk_rows = max(1, chunk_rows)
        self.float16 = writer.feature_dtype == np.float16
        self.error: BaseException | None = None
        self._q: queue.Queue[Any] = queue.Queue(maxsize=depth)
        self._thread = threading.Thread(target=self._run, name="ncaudit-writer", daemon=True)
        self._thread.start()

    def put(self, item: tuple[Any, torch.Tensor, np.ndarray, torch.Tensor, dict[str, torch.Tensor]]) -> None:
        if self.error is not None:
            raise self.error
        self._q.put(item)

    def _run(self) -> None:
        feats: list[np.ndarray] = []
        labels: list[np.ndarray] = []
        logits: list[np.ndarray] = []
        extra: dict[str, list[np.ndarray]] = {}
        n = 0

        def flush(rows: int) -> None:
            nonlocal feats, labels, logits, extra, n
            f, y, z = np.concatenate(feats), np.concatenate(labels), np.concatenate(logits)
            e = {name: np.concatenate(parts) for name, parts in extra.items()}
            self.writer.write(f[:rows], y[:rows], z[:rows], {name: v[:rows] for name, v in e.items()})
            feats, labels, logits, n = [f[rows:]], [y[rows:]], [z[rows:]], n - rows
            extra = {name: [v[rows:]] for name, v in e.items()}

        while True:
            item = self._q.get()
            if item is None:
                break
            if self.error is not None:
                continue  # keep draining so the producer never blocks
            try:
                event, f, y, z, layer_feats = item
                if event is not None:
                    event.synchronize()
                fn = f.numpy()
                if self.float16 and not np.all(np.abs(fn) <= 65504):
                    raise InputError(f"features reach {np.abs(fn).max():.3g}, beyond float16's range (65504); use "
                                     "--store-dtype float32")
                feats.append(fn)
                labels.append(y)
                logits.append(z.numpy())
                for name, v in layer_feats.items():
                    extra.setdefault(name, []).append(v.numpy())
                n += len(y)
                if n >= self.chunk_rows:
                    flush(n - n % self.chunk_rows)
            except BaseException as exc:
                self.error = exc
        if self.error is None and n:
            try:
                flush(n)
            except BaseException as exc:
                self.error = exc

    def close(self) -> None:
        """Write what is buffered, stop the thread, re-raise a write error.

        A second Ctrl-C / SIGTERM while the buffered rows are written does not leave the thread writing into a file
        that is being closed: the thread stops after the write in progress, and the interrupt is re-raised then.
        """
        interrupt: BaseException | None = None
        for _ in range(2):
            try:
                if interrupt is not None:
                    self.error = self.error or interrupt  # the thread drops whatever is still queued
                self._q.put(None)
                self._thread.join()
                break
            except KeyboardInterrupt as exc:
                interrupt = exc
        if interrupt is not None:
            raise interrupt
        if self.error is not None:
            raise self.error


# ---------------------------------------------------------------------------------------------------------------------
# Output file state
# ---------------------------------------------------------------------------------------------------------------------
def _existing_state(out: Path) -> dict[str, Any] | None:
    """Root attributes of an existing cache, None when ``out`` does not exist; an error when it is not a cache."""
    if not out.exists():
        return None
    try:
        with h5py.File(out, "r", locking=False) as f:
            attrs = {k: attr_value(v) for k, v in f.attrs.items()}
            attrs["_rows"] = int(f["features"].shape[0]) if "features" in f else -1
            attrs["_has_reference"] = "reference_fp32/index" in f
            attrs["_dtype"] = f["features"].dtype.name if "features" in f else ""
            return attrs
    except OSError:
        return {"_not_cache": True}


def _check_out(out: Path, state: dict[str, Any] | None, *, resume: bool, overwrite: bool) -> None:
    """Refuse early (before any model is loaded) what the existing file forbids."""
    if state is None or overwrite:
        return
    if state.get("_not_cache"):
        raise InputError(f"--out {out}: exists and is not an HDF5 cache; pass --overwrite to replace it")
    complete = bool(state.get("complete", True))
    if complete and not resume:
        raise InputError(f"--out {out}: already holds a complete cache; pass --overwrite to replace it")
    if not complete and not resume:
        raise InputError(f"--out {out}: holds a partial cache ({int(state.get('n_written', 0))} of {state['_rows']} "
                         "rows); pass --resume to continue it or --overwrite to start again")


def _same(stored: Any, value: Any) -> bool:
    a = stored
    b = encode_attr(value)
    if isinstance(a, str) and isinstance(b, str) and a.startswith(("{", "[")):
        try:
            return json.loads(a) == json.loads(b)
        except json.JSONDecodeError:
            return a == b
    return bool(a == b)


def _holding_out_lock(fn: Callable[..., ExtractSummary]) -> Callable[..., ExtractSummary]:
    """Run ``fn`` holding the writer lock of its ``out`` argument, taken before anything reads or writes the file.

    One writer per file: a second extraction to the same file (or ``--resume`` / ``--overwrite`` of a file another
    process writes) is refused at once. The :class:`~ncaudit.cache.CacheWriter` the run opens shares this lock.
    Under torchrun rank 0 holds it (it joins the shards into ``out``); each rank's shard writers lock their shards.
    """

    signature = inspect.signature(fn)

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> ExtractSummary:
        bound = signature.bind(*args, **kwargs).arguments
        out = bound["out"]
        if Path(out).is_dir():
            raise InputError(f"--out {out}: is a directory; give a file name ending in .h5")
        group = bound.get("group")
        if group is not None and not group.is_main:  # rank 0 holds --out; every rank locks its own shards
            return fn(*args, **kwargs)
        with WriterLock(out):
            return fn(*args, **kwargs)

    return wrapper


# ---------------------------------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------------------------------
def _loader(dataset: Any, indices: range, batch_size: int, workers: int, pin: bool) -> torch.utils.data.DataLoader:
    subset = torch.utils.data.Subset(dataset, indices)
    kwargs: dict[str, Any] = {}
    if workers > 0:
        kwargs.update(prefetch_factor=4, persistent_workers=False, worker_init_fn=_quiet_worker)
    return torch.utils.data.DataLoader(subset, batch_size=batch_size, shuffle=False, num_workers=workers,
                                       pin_memory=pin, drop_last=False, **kwargs)


def _quiet_worker(_: int) -> None:
    """DataLoader worker set-up: end quietly when the parent is gone or on SIGTERM.

    A worker whose parent was killed finds the parent's sockets reset while it hands over a batch; Python's
    ``resource_sharer`` thread then prints a ConnectionResetError traceback through ``sys.excepthook``. Those
    connection errors are dropped here (any other error is still printed), and SIGTERM ends the worker as Ctrl-C does
    (torch's worker loop exits quietly on KeyboardInterrupt).
    """
    previous = sys.excepthook

    def hook(kind: type[BaseException], value: BaseException, tb: Any) -> None:
        if not issubclass(kind, (ConnectionError, EOFError)):
            previous(kind, value, tb)

    sys.excepthook = hook
    signal.signal(signal.SIGTERM, _raise_interrupt)


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def _worker_died(exc: RuntimeError, out: Path) -> InputError | None:
    """A DataLoader worker that was killed (out of memory, a signal) as a one-line error, else None."""
    text = str(exc).strip().splitlines()
    if not text or "DataLoader worker" not in text[0]:
        return None
    return InputError(f"{text[0].rstrip('. ')}; it was killed (out of memory? fewer --workers or a smaller "
                      f"--batch-size help). {out} keeps the rows written so far: rerun with --resume")


def _to_device(x: torch.Tensor, device: torch.device, channels_last: bool) -> torch.Tensor:
    x = x.to(device, non_blocking=device.type == "cuda")
    return x.contiguous(memory_format=torch.channels_last) if channels_last and x.ndim == 4 else x


def _progress(enabled: bool, total: int, done: int) -> Any:
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        ProgressColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )
    from rich.text import Text

    class _Rate(ProgressColumn):
        def render(self, task: Any) -> Text:
            speed = task.finished_speed or task.speed
            return Text(f"{speed:,.0f} img/s" if speed else "-- img/s")

    return Progress(TextColumn("extract"), BarColumn(), MofNCompleteColumn(), _Rate(), TimeElapsedColumn(),
                    TextColumn("ETA"), TimeRemainingColumn(), console=Console(stderr=True), disable=not enabled,
                    transient=False)


def _reference_features(pm: PenultimateModel, data: DataSource, k: int, batch_size: int, workers: int,
                        device: torch.device, channels_last: bool) -> np.ndarray:
    """The first ``k`` samples' features in float32, no autocast, TF32 off."""
    out = []
    loader = _loader(data.dataset, range(k), batch_size, workers, device.type == "cuda")
    with full_precision_matmul(), torch.inference_mode():
        for x, _ in loader:
            feats, _ = pm(_to_device(x, device, channels_last))
            out.append(feats.float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, pm.n_features), np.float32)


# ---------------------------------------------------------------------------------------------------------------------
# The steps of an extraction
# ---------------------------------------------------------------------------------------------------------------------
@dataclass
class _Job:
    """One extraction once its inputs are checked: the model, the samples, the output file and where to start."""

    out: Path
    device: torch.device
    precision: str
    workers: int
    batch_size: int
    channels_last: bool
    pm: PenultimateModel
    source: DataSource
    n_total: int
    num_classes: int
    class_names: list[str] | None
    attrs: dict[str, Any]
    store_dtype: str
    chunk_rows: int
    state: dict[str, Any] | None
    resuming: bool
    start: int  # rows of this file already on disk (a resumed file); the run computes the rest
    note: Callable[[str], None]
    rows: range | None = None  # the dataset rows this file holds (None: all n_total of them)
    advance: Callable[[int], None] | None = None  # global progress of a multi-rank run (no bar of its own then)
    reference: bool = True  # write /reference_fp32 into this file (a shard does not: the joined cache gets them)

    @property
    def span(self) -> range:
        """The dataset rows of this file."""
        return range(self.n_total) if self.rows is None else self.rows


def _check_flags(store_dtype: str, batch_size: int, limit: int | None, precision_check: int, workers: int | None,
                 resume: bool, overwrite: bool) -> None:
    """Refuse contradictory or out-of-range flags before anything is loaded."""
    if store_dtype not in STORE_DTYPES:
        raise InputError(f"--store-dtype {store_dtype!r}: use float32 or float16")
    if batch_size < 1:
        raise InputError(f"--batch-size {batch_size}: must be at least 1")
    if limit is not None and limit < 1:
        raise InputError(f"--limit {limit}: must be at least 1")
    if precision_check < 0:
        raise InputError(f"--precision-check {precision_check}: must be 0 (off) or a positive number of samples")
    if workers is not None and workers < 0:
        raise InputError(f"--workers {workers}: must be 0 or more")
    if resume and overwrite:
        raise InputError("--resume and --overwrite contradict each other; pass one of them")


def _open_data(data: str | os.PathLike[str] | DataSource | None, dataset: str, split: str | None) -> DataSource:
    """The samples, labels still in the dataset's order (in-memory sources come ready)."""
    return data if isinstance(data, DataSource) else open_samples(data, dataset=dataset, split=split)


def _init_classes(src: DataSource, class_map: str | os.PathLike[str] | None) -> int:
    """The head size of a random init: the class map's length, else the dataset's number of classes."""
    if class_map is not None:
        return len(read_class_map(class_map))
    return max(len(src.dataset_classes), int(src.labels.max()) + 1)


def _model_labels(loaded: LoadedModel) -> tuple[str, list[str], list[str]] | None:
    """``(label set, names, synsets)`` of a model whose outputs follow an ImageNet label set: published ImageNet
    weights, or a head the size of one (1000: imagenet-1k) for synset-named data."""
    subset = loaded.imagenet or imagenet_subset_for(loaded.num_classes)
    return (subset, *imagenet_classes(subset)) if subset else None


def _own_class_names(loaded: LoadedModel,
                     space: tuple[str, list[str], list[str]] | None) -> tuple[list[str], str] | None:
    """The names published weights give their outputs: timm ``pretrained_cfg`` label names, ImageNet's synsets and
    descriptions (timm ``ImageNetInfo``), or a torchvision enum's categories."""
    if loaded.weights != "pretrained":
        return None
    names = (loaded.pretrained_cfg or {}).get("label_names")
    if names and len(names) == loaded.num_classes:
        return [str(n) for n in names], "pretrained_cfg label_names"
    if loaded.imagenet and space is not None:
        return space[1], f"timm ImageNetInfo('{space[0]}')"
    categories = list((loaded.tv_weights.meta.get("categories") or []) if loaded.tv_weights is not None else [])
    return (categories, "torchvision weights categories") if len(categories) == loaded.num_classes else None


def _label_classes(src: DataSource, loaded: LoadedModel, class_map: str | os.PathLike[str] | None,
                   note: Callable[[str], None]) -> tuple[list[str] | None, str]:
    """Map the dataset's labels to the model's outputs (class map, else synsets, else dataset order), check they fit
    the head, and return the class names to store (model order) with where they came from."""
    space = _model_labels(loaded)
    own = _own_class_names(loaded, space)
    if src.label_mapping == "dataset order" and src.reader != IN_MEMORY_READER:
        map_labels(src, class_map=class_map, model_classes=space)
    k = loaded.num_classes
    n_data_classes = len(src.class_names) if src.class_names is not None else len(src.dataset_classes)
    if src.class_names is not None and len(src.class_names) != k:
        raise InputError(f"--class-map lists {len(src.class_names)} classes but the model's head has {k} outputs; "
                         "list every model class, in model order")
    if n_data_classes > k or int(src.labels.max()) >= k:
        raise InputError(f"the dataset has {n_data_classes} classes but the model's head has {k} outputs; pass "
                         "--class-map or the dataset the weights were trained on")
    if src.class_names is None and len(src.dataset_classes) < k:
        note(f"the dataset has {len(src.dataset_classes)} classes and the head {k}: labels follow the dataset's class "
             "order 0..; pass --class-map if the model orders its classes differently")
    if src.class_names is not None:
        return src.class_names, src.label_mapping
    if own is not None:
        return own
    return (src.dataset_classes, "the dataset's classes") if len(src.dataset_classes) == k else (None, "")


def _transform_for(src: DataSource, loaded: LoadedModel, overrides: TransformOverrides,
                   note: Callable[[str], None]) -> dict[str, Any]:
    """The eval transform (weights' records, then flags), set on the source; warnings for a resolution or
    normalisation the weights were not trained with."""
    if src.reader == IN_MEMORY_READER:
        return {"library": "none", "note": "images given in memory, already transformed"}
    recorded = recorded_preprocessing(loaded)
    cfg = transform_config(loaded.model, loaded.library, recorded=recorded, **asdict(overrides))
    for warning in transform_warnings(cfg, recorded):
        note(warning)
    if not recorded and loaded.weights == "checkpoint":
        note(f"the checkpoint records no preprocessing (no safetensors metadata, no training args): using the "
             f"{next(iter(cfg['sources'].values()))}; pass --img-size/--mean/--std if it was trained otherwise")
    src.set_transform(build_transform(cfg))
    return cfg


def _describe(loaded: LoadedModel, src: DataSource, cfg: dict[str, Any], names_from: str) -> list[str]:
    """The first lines of output: the weights, the data and the transform, each with where it came from."""
    where = f" {src.root}" if src.data and not src.kind.startswith("hfds/") else ""
    split = f", split {src.split}" if src.split else ""
    lines = [f"model: {loaded.name} ({loaded.num_classes} classes), {loaded.source}",
             f"data: {src.kind}{where}{split}: {len(src)} images, {len(src.dataset_classes)} classes; reader: "
             f"{src.reader}; labels: {src.label_mapping}" + (f"; class names: {names_from}" if names_from else "")]
    return lines + describe_transform(cfg)


def _provenance(model_name: str, loaded: LoadedModel, src: DataSource, cfg: dict[str, Any], precision: str,
                device: torch.device, limit: int | None) -> dict[str, Any]:
    """The root attributes that say where the features came from (and that --resume must find unchanged)."""
    ckpt = loaded.checkpoint
    attrs: dict[str, Any] = {
        "model": model_name, "weights": loaded.weights, "weights_source": loaded.source,
        "checkpoint": str(ckpt.path.resolve()) if ckpt else "", "checkpoint_sha256": ckpt.sha256 if ckpt else "",
        "checkpoint_key": ckpt.key if ckpt else "", "ema": bool(ckpt.ema) if ckpt else False, "dataset": src.kind,
        "data": src.data, "split": src.split or "", "reader": src.reader, "label_mapping": src.label_mapping,
        "data_fingerprint": src.fingerprint, "precision": precision, "device": device.type, "transform": cfg,
        "ncaudit_version": __version__, "limit": int(limit or 0),
        "seed": loaded.seed if loaded.seed is not None else "",
    }
    meta = ckpt.metadata if ckpt else {}
    if meta:
        attrs["checkpoint_metadata"] = meta
    epoch = meta.get("epoch", "") if loaded.weights == "checkpoint" else "0" if loaded.weights == "random-init" else ""
    if epoch.strip().lstrip("-").isdigit():
        attrs["epoch"] = int(epoch)
    return attrs


def _check_same_job(path: Path, state: dict[str, Any], attrs: dict[str, Any], *, data_changed: bool) -> None:
    """Refuse to continue ``path`` unless its :data:`RESUME_KEYS` match this run's ``attrs`` (``data_changed``: say
    so in words when the data fingerprint differs)."""
    for key in RESUME_KEYS:
        if _same(state.get(key, ""), attrs[key]):
            continue
        if data_changed and key == "data_fingerprint":
            raise InputError(f"--resume: the dataset changed since {path} was started (files added, removed or "
                             "renamed, or other labels), so its rows no longer line up; pass --overwrite to start again")
        raise InputError(f"--resume: {path} was written with another {key} ({str(state.get(key, ''))[:60]!r}); "
                         "resume with the same checkpoint, data and options, or pass --overwrite")


def _resume_row(out: Path, state: dict[str, Any], attrs: dict[str, Any], n_total: int, store_dtype: str) -> int:
    """The row a resumed run starts at, after checking that the partial file was written by the same job."""
    _check_same_job(out, state, attrs, data_changed=True)
    if state["_rows"] != n_total or state.get("_dtype") != store_dtype:
        raise InputError(f"--resume: {out} has {state['_rows']} rows of {state.get('_dtype')}, this run "
                         f"{n_total} of {store_dtype}; use the same --limit and --store-dtype, or --overwrite")
    return int(state.get("n_written", 0))


@contextlib.contextmanager
def _worker_errors(out: Path) -> Iterator[None]:
    """Raise a DataLoader worker's InputError as its own one-line message, a killed worker as an InputError."""
    try:
        yield
    except InputError as exc:
        raise _unwrap_worker_error(exc) from None
    except RuntimeError as exc:
        raise _worker_died(exc, out) or exc from None


def _probe_batch(job: _Job) -> Any:
    """The first batch of the dataset (read in this process), on which (W, b) is derived and checked."""
    return next(iter(_loader(job.source.dataset, range(min(job.batch_size, job.n_total)), job.batch_size, 0,
                             job.device.type == "cuda")))


def _first_batch(job: _Job) -> tuple[Any, Any, Any]:
    """``(batch iterator, first batch or None, probe batch)``: the probe derives (W, b) even when nothing is left."""
    todo = range(job.span.start + job.start, job.span.stop)
    batches = iter(_loader(job.source.dataset, todo, job.batch_size, job.workers, job.device.type == "cuda"))
    with _worker_errors(job.out):
        first = next(batches) if len(todo) else None
        probe = first if first is not None else _probe_batch(job)
    return batches, first, probe


def _open_writer(job: _Job, p: int, layer_widths: dict[str, int]) -> CacheWriter:
    """Reopen the partial file of a resumed run, or create the cache after checking the free disk space."""
    if job.resuming and job.start > 0:
        return CacheWriter.resume(job.out)
    itemsize = 2 if job.store_dtype == "float16" else 4
    k = job.num_classes
    row = (p + sum(layer_widths.values())) * itemsize + 8 + 4 * k
    need = len(job.span) * row + 8 * k * (p + 1) + (1 << 20)
    parent = job.out.resolve().parent
    free = shutil.disk_usage(parent if parent.exists() else Path.cwd()).free
    if layer_widths:
        widths = ", ".join(f"{name} {w}" for name, w in layer_widths.items())
        job.note(f"projected cache size {format_bytes(need)} (extra layers: {widths}); {format_bytes(free)} free")
    if need > free:
        raise InputError(f"--out {job.out}: the cache needs about {format_bytes(need)} but only {format_bytes(free)} "
                         "is free; free space, use --store-dtype float16 or --limit")
    pm = job.pm
    weight = pm.weight.astype(np.float32)  # type: ignore[union-attr]
    bias = None if pm.bias is None else pm.bias.astype(np.float32)
    job.attrs["created"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    return CacheWriter(job.out, n_samples=len(job.span), n_features=p, num_classes=k, weight=weight, bias=bias,
                       feature_dtype=job.store_dtype, store_logits=True, class_names=job.class_names,
                       layers=layer_widths, attrs=job.attrs, chunk_rows=job.chunk_rows, overwrite=True)


def _stream(job: _Job, writer: CacheWriter, batches: Any, first: Any, head: tuple[torch.Tensor, torch.Tensor],
            autocast: Any, progress: bool) -> None:
    """Run every remaining batch through the model and hand the rows to a writer thread (first batch included)."""
    dev, pm = job.device, job.pm
    sink = _AsyncWriter(writer, job.chunk_rows)
    done = job.start
    with _progress(progress and job.advance is None, len(job.span), job.start) as bar:
        task = bar.add_task("extract", total=len(job.span), completed=job.start)

        def emit(feats: torch.Tensor, logits: torch.Tensor, y: torch.Tensor, extra: dict[str, torch.Tensor]) -> None:
            nonlocal done
            if dev.type == "cuda":
                f = feats.float().to("cpu", non_blocking=True)
                z = logits.float().to("cpu", non_blocking=True)
                extra = {name: v.to("cpu", non_blocking=True) for name, v in extra.items()}
                event = torch.cuda.Event()
                event.record()
            else:
                f, z, event = feats.float(), logits.float(), None
            sink.put((event, f, y.numpy().astype(np.int64), z, extra))
            done += len(y)
            bar.update(task, completed=done)
            if job.advance is not None:
                job.advance(len(y))

        try:
            with _worker_errors(job.out):
                if first is not None:
                    emit(*head, first[1], pm.layer_features)
                    for x, y in batches:
                        with autocast:
                            feats, logits = pm(_to_device(x, dev, job.channels_last))
                        emit(feats, logits, y, pm.layer_features)
        finally:
            sink.close()


def _reference_rows(job: _Job, writer: CacheWriter, precision_check: int) -> int:
    """Recompute the first K samples in float32 into /reference_fp32 (mixed precision only); K written."""
    if job.precision == "fp32" or precision_check == 0 or not job.reference:
        return 0
    n_ref = min(precision_check, job.n_total)
    if not (job.resuming and job.state is not None and job.state.get("_has_reference")):
        ref = _reference_features(job.pm, job.source, n_ref, job.batch_size, job.workers, job.device,
                                  job.channels_last)
        writer.write_reference(np.arange(n_ref), ref)
    return n_ref


def _run(job: _Job, *, progress: bool, precision_check: int) -> tuple[float, int]:
    """Derive (W, b) on the first batch, write every row, the reference rows and the completion mark.

    Returns ``(seconds spent on the rows, reference rows)``. A failure after the file is open leaves it partial
    and resumable.
    """
    autocast = autocast_context(job.precision, job.device)
    fp32_ctx = full_precision_matmul() if job.precision == "fp32" else contextlib.nullcontext()
    t0 = time.perf_counter()
    writer: CacheWriter | None = None
    try:
        with fp32_ctx, torch.inference_mode():
            batches, first, probe = _first_batch(job)
            head = job.pm.verify(_to_device(probe[0], job.device, job.channels_last), job.precision, autocast)
            layer_widths = {name: int(v.shape[1]) for name, v in job.pm.layer_features.items()}
            job.attrs["classifier_source"] = job.pm.source
            job.attrs["logit_check_max_rel_error"] = job.pm.max_logit_error
            writer = _open_writer(job, int(head[0].shape[1]), layer_widths)
            _stream(job, writer, batches, first, head, autocast, progress)
            seconds = time.perf_counter() - t0
            n_ref = _reference_rows(job, writer, precision_check)
            writer.finish()
    except CacheWriteError:
        raise
    except OSError as exc:
        kept = writer.n_written if writer is not None else 0
        raise InputError(f"--out {job.out}: writing failed ({str(exc).splitlines()[0] if str(exc) else exc}); "
                         f"{kept} rows are kept: free disk space or fix the path, then rerun with --resume") from None
    except InputError as exc:
        if writer is None:
            raise
        raise InputError(f"{exc} ({job.out} keeps its first {writer.n_written} rows, marked incomplete: fix the cause "
                         "in place, e.g. replace a bad image by a readable one, and rerun with --resume; after adding, "
                         "removing or renaming data files, rerun with --overwrite)") from None
    finally:
        if writer is not None:
            writer.close()
    return seconds, n_ref


def _workers(workers: int | None, group: DistContext | None) -> int:
    """DataLoader workers: as asked, else the cores available shared among the ranks on this node."""
    if workers is not None:
        return workers
    local = launch_env().local_world_size if group is not None and group.distributed else 1
    return max(1, available_cores() // max(1, local))


# ---------------------------------------------------------------------------------------------------------------------
# Several ranks: row-named shards beside --out, joined by rank 0
# ---------------------------------------------------------------------------------------------------------------------
def _shard_states(job: _Job, group: DistContext, *, resume: bool, overwrite: bool) -> list[ShardState]:
    """Rank 0 prepares the shard files of ``--out`` and scans them; every rank gets the same list.

    ``--overwrite`` removes them (damaged ones too) and ``--out``; without ``--resume`` existing shards are an error;
    with it, a single-file ``--out`` written by one process becomes the shard of its rows, so its rows are kept too
    (once it and the shards are checked: a refused resume leaves ``--out`` as it was).
    """
    out = job.out

    def prepare() -> list[int]:
        if not group.is_main:
            return []
        if overwrite:
            remove_shards(out)
            out.unlink(missing_ok=True)
            return []
        existing = scan_shards(out)
        if existing and not resume:
            raise InputError(f"--out {out}: {len(existing)} shard file(s) of an interrupted multi-rank extraction lie "
                             f"beside it ({existing[0].path.name}, ...); pass --resume to continue it or --overwrite "
                             "to start again")
        single = job.state  # read by extract under out's writer lock: nothing wrote out since
        if resume and single is not None and not single.get("_not_cache"):
            target = shard_path(out, 0, single["_rows"])
            # Check the shards as the scan after the rename will find them, before out is renamed: a refused resume
            # leaves it as it was (a file with no /features gets a name the scan skips).
            after = [state for state in existing if state.path.name != target.name]  # type: ignore[union-attr]
            if parse_shard_path(out, target) is not None:
                after.append(read_shard(out, 0, single["_rows"]))
            _check_kept(job, shard_plan(job.n_total, 1, sorted(after, key=lambda s: (s.start, s.stop))).kept)
            os.replace(out, target)  # its rows are kept like any shard's
            existing = scan_shards(out)
        return [v for state in existing for v in (state.start, state.stop, state.n_written)]

    flat = broadcast_ints(together(prepare))
    return [ShardState(a, b, n, shard_path(out, a, b)) for a, b, n in zip(flat[::3], flat[1::3], flat[2::3])]


def _check_kept(job: _Job, kept: Sequence[ShardState]) -> None:
    """Every kept shard was written by the same job (checkpoint, data, options, dtype)."""
    for shard in kept:
        state = _existing_state(shard.path)  # type: ignore[arg-type]
        if state is None or state.get("_not_cache"):
            raise InputError(f"{shard.path}: not a readable shard; remove it to recompute its rows")
        _check_same_job(shard.path, state, job.attrs, data_changed=False)  # type: ignore[arg-type]
        if state.get("_dtype") != job.store_dtype:
            raise InputError(f"--resume: {shard.path} holds {state.get('_dtype')} features, this run "
                             f"{job.store_dtype}; use the same --store-dtype, or --overwrite")


def _verify_head(job: _Job) -> None:
    """Derive (W, b) and check them on the first batch of the dataset (every rank: also those with no rows left)."""
    if job.pm.weight is not None:
        return
    probe = _probe_batch(job)
    autocast = autocast_context(job.precision, job.device)
    with full_precision_matmul() if job.precision == "fp32" else contextlib.nullcontext(), torch.inference_mode():
        job.pm.verify(_to_device(probe[0], job.device, job.channels_last), job.precision, autocast)


def _join(job: _Job, precision_check: int) -> int:
    """Rank 0: join the shards, in row order, into ``--out`` (HDF5 virtual datasets over them), add the float32
    reference rows of a mixed-precision run, and rename it into place; the reference rows written."""
    pieces = join_pieces(job.n_total, scan_shards(job.out))
    tmp = job.out.with_name(job.out.name + ".joining")
    join_shards(tmp, [piece.path for piece in pieces], allow_partial=True)  # type: ignore[misc]
    n_ref = 0
    if job.precision != "fp32" and precision_check > 0:
        n_ref = min(precision_check, job.n_total)
        ref = _reference_features(job.pm, job.source, n_ref, job.batch_size, job.workers, job.device,
                                  job.channels_last)
        with CacheWriter.resume(tmp) as writer:
            writer.write_reference(np.arange(n_ref), ref)
    os.replace(tmp, job.out)
    return n_ref


def _run_shards(job: _Job, group: DistContext, *, resume: bool, overwrite: bool, progress: bool,
                precision_check: int) -> tuple[float, int, int, float]:
    """Every rank extracts its contiguous part of the rows no shard holds yet into shard files of its own; after a
    barrier rank 0 joins them into ``--out``. Returns ``(seconds, reference rows, rows kept from earlier runs,
    global images/s)``."""
    plan = shard_plan(job.n_total, group.world_size, _shard_states(job, group, resume=resume, overwrite=overwrite),
                      align=job.batch_size)
    together(lambda: _check_kept(job, plan.kept) if group.is_main else None)
    if group.is_main:
        for state in plan.stale:
            state.path.unlink(missing_ok=True)  # type: ignore[union-attr]
    barrier()
    _verify_head(job)
    t0 = time.perf_counter()
    with _progress(progress and group.is_main, job.n_total, plan.n_done) as bar:
        task = bar.add_task("extract", total=job.n_total, completed=plan.n_done)
        with GlobalProgress(plan.n_done, on_update=lambda total: bar.update(task, completed=total)) as counter:
            together(lambda: [_run(dataclasses.replace(job, out=spec.path(job.out), rows=spec.rows, start=0,
                                                       resuming=False, state=None, advance=counter.advance,
                                                       reference=False), progress=False, precision_check=0)
                              for spec in plan.assignments[group.rank]])
    seconds = time.perf_counter() - t0
    n_ref = together(lambda: _join(job, precision_check) if group.is_main else 0)
    barrier()
    return seconds, n_ref, plan.n_done, (job.n_total - plan.n_done) / seconds if seconds > 0 else math.nan


@_holding_out_lock
def extract(
    model_name: str,
    weights: Weights | str | os.PathLike[str],
    data: str | os.PathLike[str] | DataSource | None,
    out: str | os.PathLike[str],
    *,
    dataset: str = "folder",
    split: str | None = None,
    class_map: str | os.PathLike[str] | None = None,
    transform: TransformOverrides | None = None,
    device: str = "auto",
    precision: str = "auto",
    batch_size: int = 64,
    workers: int | None = None,
    limit: int | None = None,
    store_dtype: str = "float32",
    precision_check: int = 512,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    channels_last: bool = True,
    layers: Sequence[str] | str | None = None,
    log: Callable[[str], None] | None = None,
    info: Callable[[str], None] | None = None,
    group: DistContext | None = None,
) -> ExtractSummary:
    """Extract penultimate features, labels, logits and the final affine map of a model over a dataset.

    Parameters
    ----------
    model_name
        timm model name (with a pretrained tag for ``--pretrained``, e.g. ``resnet50.a1_in1k``), ``hf-hub:ORG/NAME``
        or ``torchvision:NAME``.
    weights
        A :class:`ncaudit.models.Weights` (checkpoint, published weights or random init), or a checkpoint path:
        ``.pth``/``.pt``/``.bin`` (loaded with ``weights_only=True``) or ``.safetensors``.
    data, dataset, split, class_map
        See :func:`ncaudit.data.open_samples` and :func:`ncaudit.data.map_labels`; ``data`` may also be a ready
        :class:`ncaudit.data.DataSource` (e.g. :func:`ncaudit.data.tensor_source` over in-memory tensors), used as is.
    out
        The ``.h5`` cache to write (schema 1).
    transform
        Overrides of the eval transform, which otherwise comes from what the weights record (safetensors metadata,
        training ``args``, the published config), else the model's default (:func:`ncaudit.data.transform_config`).
    device, precision
        ``auto`` = CUDA with bf16 autocast when present, else CPU fp32.
    batch_size, workers, limit
        Images per batch; DataLoader worker processes (default: the cores available); first ``limit`` samples only.
    store_dtype
        ``float32`` or ``float16`` for ``/features``.
    precision_check
        When the precision is not fp32, recompute the first K samples in float32 into ``/reference_fp32`` (0: off).
    resume, overwrite
        Continue a partial cache written with the same weights and data; replace an existing file.
    progress
        Show a progress bar on stderr.
    chunk_rows
        Rows per HDF5 chunk and per write.
    channels_last
        Run the model and its inputs in channels-last memory format.
    layers
        Further layers to store under ``/layers/<name>/features`` (names or ``"a,b"``; see
        :func:`ncaudit.models.resolve_layers`): spatial maps average-pooled, token sequences reduced to the class token.
    log, info
        Called with one-line warnings as they arise; with the lines that say what was loaded and where each
        transform value came from, before the first image is read.

    group
        The torch.distributed process group of a ``torchrun`` launch (:func:`ncaudit.distributed.process_group`):
        every rank extracts a contiguous part of the rows into its own shard file beside ``out``
        (``<stem>.rows-<start>-<stop>.h5``) and rank 0 joins them into ``out``. Shards left by an interrupted run
        are continued by ``resume`` with any number of ranks, one process included.

    Returns
    -------
    ExtractSummary

    Raises
    ------
    InputError
        Any problem with the inputs, the output file, the classifier check or writing (e.g. disk full).
    """
    notes: list[str] = []

    def note(msg: str) -> None:
        notes.append(msg)
        if log is not None:
            log(msg)

    out, overrides = Path(out), transform or TransformOverrides()
    weights = weights if isinstance(weights, Weights) else Weights("checkpoint", checkpoint=Path(weights))
    _check_flags(store_dtype, batch_size, limit, precision_check, workers, resume, overwrite)
    state = _existing_state(out)
    _check_out(out, state, resume=resume, overwrite=overwrite)
    dev = group.device if group is not None else resolve_device(device)
    prec = resolve_precision(precision, dev)
    src = _open_data(data, dataset, split) if weights.kind == "random-init" else None  # its classes size the head
    loaded = load_model(model_name, weights, img_size=overrides.img_size,
                        num_classes=_init_classes(src, class_map) if src is not None else None)
    src = src if src is not None else _open_data(data, dataset, split)
    loaded.model = loaded.model.to(dev, memory_format=torch.channels_last if channels_last else torch.preserve_format)
    class_names, names_from = _label_classes(src, loaded, class_map, note)
    cfg = _transform_for(src, loaded, overrides, note)
    for line in _describe(loaded, src, cfg, names_from):
        (info or (lambda _: None))(line)
    for remark in src.notes:
        note(remark)
    n_total = len(src) if limit is None else min(limit, len(src))
    attrs = _provenance(model_name, loaded, src, cfg, prec, dev, limit)
    attrs["class_names_source"] = names_from
    layer_names = [n for n in (layers.split(",") if isinstance(layers, str) else (layers or ())) if n.strip()]
    pm = PenultimateModel(loaded, layer_names)
    attrs["layers"] = [name for name, _, _ in pm.layers]
    distributed = group is not None and group.distributed
    if overwrite and not distributed:  # one process replaces a sharded run by one plain file (ranks: _shard_states)
        remove_shards(out)
    sharded = distributed or bool(shard_files(out))  # names only: _shard_states reads them
    resuming = bool(resume and state is not None and not state.get("_not_cache")) and not sharded
    job = _Job(out=out, device=dev, precision=prec, workers=_workers(workers, group), batch_size=batch_size,
               channels_last=channels_last, pm=pm, source=src, n_total=n_total, num_classes=loaded.num_classes,
               class_names=class_names, attrs=attrs, store_dtype=store_dtype, chunk_rows=chunk_rows, state=state,
               resuming=resuming, start=_resume_row(out, state, attrs, n_total, store_dtype) if resuming and state
               else 0, note=note)
    try:
        if sharded:
            seconds, n_ref, kept, rate = _run_shards(job, group or DistContext(0, 1, 0, dev, None), resume=resume,
                                                     overwrite=overwrite, progress=progress,
                                                     precision_check=precision_check)
        else:
            seconds, n_ref = _run(job, progress=progress, precision_check=precision_check)
            kept, rate = job.start, (n_total - job.start) / seconds if seconds > 0 else math.nan
    finally:
        pm.remove()
    return ExtractSummary(
        out=out, n_samples=n_total, n_features=pm.n_features, num_classes=job.num_classes, resumed_from=kept,
        n_reference=n_ref, precision=prec, device=dev.type, store_dtype=store_dtype, classifier_source=pm.source,
        max_logit_error=pm.max_logit_error, seconds=seconds, images_per_s=rate if n_total > kept else math.nan,
        warnings=tuple(notes))
