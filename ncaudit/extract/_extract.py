"""``extract``: the steps of one extraction, from the checked flags to the summary, one process or sharded."""

from __future__ import annotations

import functools
import inspect
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ncaudit._device import resolve_device
from ncaudit.cache import WriterLock
from ncaudit.cache._format import DEFAULT_CHUNK_ROWS
from ncaudit.cache._shards import remove_shards, shard_files
from ncaudit.data import DataSource, TransformOverrides, open_samples, read_class_map
from ncaudit.distributed import DistContext
from ncaudit.errors import InputError
from ncaudit.extract._job import _describe, _Job, _label_classes, _provenance, _transform_for
from ncaudit.extract._loader import _workers
from ncaudit.extract._resume import _check_out, _existing_state, _resume_row
from ncaudit.extract._runtime import STORE_DTYPES, resolve_precision
from ncaudit.extract._sharded import _run_shards
from ncaudit.extract._single import _run
from ncaudit.models import PenultimateModel, Weights, load_model


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
        Images per batch; DataLoader worker processes (default: the cores available); ``limit`` samples only, drawn
        class by class with a fixed seed (:meth:`ncaudit.data.DataSource.limit`: every class is represented when
        ``limit`` is at least the number of classes, and the same rows are drawn on every run).
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
    if limit is not None:  # a class-stratified, seeded sample of the dataset's own classes: whatever the model
        src.limit(limit)
    class_names, names_from = _label_classes(src, loaded, class_map, note)
    cfg = _transform_for(src, loaded, overrides, note)
    for line in _describe(loaded, src, cfg, names_from):
        (info or (lambda _: None))(line)
    for remark in src.notes:
        note(remark)
    n_total = len(src)
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
               else 0, note=note, inform=info or (lambda _: None))
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
