"""The output file before a run: what an existing file allows (``--resume``, ``--overwrite``) and where a
resumed run starts."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import h5py

from ncaudit._validate import regular_file
from ncaudit.cache._format import RUN_KEYS, attr_value, encode_attr
from ncaudit.errors import InputError

#: Attributes that must match for ``--resume`` to continue a partial file.
RESUME_KEYS = RUN_KEYS


# ---------------------------------------------------------------------------------------------------------------------
# Output file state
# ---------------------------------------------------------------------------------------------------------------------
def _existing_state(out: Path) -> dict[str, Any] | None:
    """Root attributes of an existing cache, None when ``out`` does not exist; an error when it is not a cache."""
    if not out.exists():
        return None
    regular_file(out, "--out (an HDF5 cache)")  # a FIFO would block the open
    try:
        with h5py.File(out, "r", locking=False) as f:
            attrs = {k: attr_value(v) for k, v in f.attrs.items()}
            attrs["_rows"] = int(f["features"].shape[0]) if "features" in f else -1
            attrs["_has_reference"] = "reference_fp32/index" in f
            attrs["_n_reference"] = int(f["reference_fp32/index"].shape[0]) if attrs["_has_reference"] else 0
            attrs["_dtype"] = f["features"].dtype.name if "features" in f else ""
            attrs["_features"] = int(f["features"].shape[1]) if "features" in f and f["features"].ndim == 2 else 0
            return attrs
    except OSError:
        return {"_not_cache": True}


def left_behind(out: str | Path) -> str:
    """What an interrupted or failed extraction leaves at ``out``, in words that are true: a partial cache and how
    many of its rows ``n_written`` keeps, shards of a sharded run, an untouched complete file, or nothing."""
    from ncaudit.cache._shards import scan_shards, shard_files

    out = Path(out)
    if out.is_file():
        try:
            with h5py.File(out, "r", locking=False) as f:
                complete = bool(attr_value(f.attrs.get("complete", True)))
                written = int(attr_value(f.attrs.get("n_written", 0)))
        except (OSError, ValueError, TypeError):
            return f"{out} is not a readable cache: rerun with --overwrite"
        if complete:
            return f"{out} is unchanged (a complete cache)"
        return f"{out} is left partial (complete=false) with its first {written} rows on disk: rerun with --resume " \
               "to continue"
    if shard_files(out):
        try:
            kept = sum(state.n_written for state in scan_shards(out))
        except InputError:
            kept = -1
        rows = f"{kept} rows" if kept >= 0 else "the rows written"
        return f"the shards of {out.name} keep {rows}: rerun with --resume to continue"
    return "nothing was written"


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
