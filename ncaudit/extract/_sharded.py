"""The sharded run (torchrun, or a resumed sharded file): each rank's shards planned, written and checked,
then joined by rank 0."""

from __future__ import annotations

import dataclasses
import math
import os
import time
from collections.abc import Sequence

import numpy as np

from ncaudit.cache import CacheWriter, join_shards
from ncaudit.cache._shards import (
    ShardState,
    join_pieces,
    parse_shard_path,
    read_shard,
    remove_shards,
    scan_shards,
    shard_path,
)
from ncaudit.cache._shards import plan as shard_plan
from ncaudit.distributed import DistContext, GlobalProgress, barrier, broadcast_ints, together
from ncaudit.errors import InputError
from ncaudit.extract._job import _Job
from ncaudit.extract._loader import _progress
from ncaudit.extract._resume import _check_same_job, _existing_state
from ncaudit.extract._single import _probe_batch, _reference_features, _run, _runner


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
    runner = _runner(job)
    with runner.running():
        runner.first(probe[0])


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
