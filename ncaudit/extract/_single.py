"""The one-process run: first batch and classifier check, the stream of batches to the writer, and the
float32 reference rows."""

from __future__ import annotations

import contextlib
import datetime as _dt
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ncaudit._validate import format_bytes
from ncaudit.cache import CacheWriter
from ncaudit.data import DataSource
from ncaudit.errors import CacheWriteError, InputError
from ncaudit.extract._async_writer import _AsyncWriter
from ncaudit.extract._job import _Job
from ncaudit.extract._loader import _loader, _progress, _to_device, _worker_errors
from ncaudit.extract._runtime import autocast_context
from ncaudit.models import PenultimateModel
from ncaudit.stats import full_precision_matmul


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
        job.inform(f"projected cache size {format_bytes(need)} (extra layers: {widths}); {format_bytes(free)} free")
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
