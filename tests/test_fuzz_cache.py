"""Property-based fuzz of the cache reader: whatever the file, ``ncaudit report`` exits 0 with a finite report or 2
with one line naming the problem, never with a traceback, never hanging, never allocating beyond the declared-size
checks.

Each example builds one HDF5 file from random draws: shapes, dtypes and values of every dataset of the schema, root
attributes of every type, chunked / contiguous / compressed / never-written storage, soft, external and hard links
(loops and dangling ones included), virtual datasets over shard files that may be missing, short or partial, and
truncated or corrupted files. Each example runs under a time bound (SIGALRM) and an address-space bound (RLIMIT_AS a
few GiB above the process's size), so a hang or a huge allocation fails the property instead of the machine.

CI runs a bounded, derandomized number of examples (``NCAUDIT_FUZZ_EXAMPLES``, default 60: a few seconds);
``python bench/fuzz_cache.py`` runs thousands with fresh random seeds.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import shutil
import signal
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from ncaudit import _validate as validate
from ncaudit.cli import app

EXAMPLES = int(os.environ.get("NCAUDIT_FUZZ_EXAMPLES", "60"))
RANDOM = os.environ.get("NCAUDIT_FUZZ_RANDOM", "") == "1"
KEEP = Path(os.environ["NCAUDIT_FUZZ_KEEP"]) if os.environ.get("NCAUDIT_FUZZ_KEEP") else None
SECONDS_PER_EXAMPLE = 30  # a hang guard: a healthy example takes well under a second
HEADROOM = 4 << 30  # address space an example may add to the process

runner = CliRunner()
FEATURE_DTYPES = ["float16", "float32", "float64", "int32", "bool", "complex64"]
LABEL_DTYPES = ["int64", "int8", "uint8", "uint64", "float32", "bool"]
ODD_VALUES: list[Any] = [-1, 0, 1, 2.5, 10**9, 10**12, -5, "3", "false", True, np.array([2, 2]), 4.0, b"x"]


# ---------------------------------------------------------------------------------------------------------------------
# Bounds on each example
# ---------------------------------------------------------------------------------------------------------------------
def _vm_size() -> int:
    with open("/proc/self/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    return 0


@contextlib.contextmanager
def bounded(seconds: int) -> Iterator[None]:
    """Fail with TimeoutError after ``seconds``; MemoryError for allocations beyond the headroom (Linux).

    The declared-size checks are told that half the headroom is available, so any allocation they let through must
    fit in the address-space bound: an example that hits it is an estimate that was wrong.
    """
    def alarm(signum: int, frame: Any) -> None:
        raise TimeoutError(f"an example ran for more than {seconds} s")

    real_available = validate.available_memory
    validate.available_memory = lambda: HEADROOM // 2
    previous = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(seconds)
    limits = resource.getrlimit(resource.RLIMIT_AS)
    size = _vm_size()
    if size:
        cap = size + HEADROOM
        resource.setrlimit(resource.RLIMIT_AS, (cap if limits[1] < 0 else min(cap, limits[1]), limits[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, limits)
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
        validate.available_memory = real_available


# ---------------------------------------------------------------------------------------------------------------------
# Building a random cache
# ---------------------------------------------------------------------------------------------------------------------
def _values(draw: Any, shape: tuple[int, ...], dtype: str) -> np.ndarray:
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    if dtype == "bool":
        return rng.integers(0, 2, shape).astype(bool)
    if dtype.startswith(("int", "uint")):
        return rng.integers(0, 4, shape).astype(dtype)
    x = (rng.standard_normal(shape) * draw(st.sampled_from([1.0, 1e-6, 1e4, 1e30]))).astype(np.float64)
    if x.size and draw(st.booleans()) and draw(st.booleans()):
        x.flat[draw(st.integers(0, x.size - 1))] = draw(st.sampled_from([np.nan, np.inf, -np.inf]))
    with np.errstate(over="ignore", invalid="ignore"):
        return x.astype(dtype)


def _dataset(draw: Any, group: h5py.Group, name: str, shape: tuple[int, ...], dtype: str) -> None:
    """Create ``name`` with random storage: written or declared-only, chunked / compressed / contiguous."""
    layout = draw(st.sampled_from(["contiguous", "chunked", "gzip", "declared", "declared_huge"]))
    if layout == "declared_huge" and shape:
        shape = (draw(st.sampled_from([10**6, 10**8])),) + shape[1:]
        layout = "declared"
    if layout == "declared" or (layout == "contiguous" and not all(shape)):
        chunks = (max(1, min(shape[0], 4096)),) + tuple(max(1, s) for s in shape[1:]) if shape else None
        group.create_dataset(name, shape=shape, dtype=dtype, chunks=chunks if all(shape) else None)
        return
    data = _values(draw, shape, dtype)
    if layout == "contiguous" or not data.size or not shape:
        group.create_dataset(name, data=data)
    else:
        chunks = (draw(st.integers(1, max(1, shape[0]))),) + tuple(max(1, s) for s in shape[1:])
        group.create_dataset(name, data=data, chunks=chunks, compression="gzip" if layout == "gzip" else None)


def _shape(draw: Any, n: int, p: int) -> tuple[int, ...]:
    return draw(st.sampled_from([(n, p), (n, p), (n, p), (n,), (n, p, 1), (), (n + 1, p)]))


def _attrs(draw: Any, f: h5py.File, n: int, c: int) -> None:
    for key, good in (("num_classes", c), ("complete", True), ("n_written", n), ("ncaudit_schema", 1)):
        kind = draw(st.sampled_from(["absent", "good", "good", "odd"]))
        if kind == "good":
            f.attrs[key] = good
        elif kind == "odd":
            f.attrs[key] = draw(st.sampled_from(ODD_VALUES))
    if draw(st.booleans()):
        f.attrs["complete"] = False
        f.attrs["n_written"] = draw(st.integers(-2, n + 2))
    if draw(st.booleans()):
        f.attrs["layer_order"] = draw(st.sampled_from(['["a"]', "not json", "[1, 2]", '{"a": 1}']))
    if draw(st.integers(0, 5)) == 0:
        _odd_provenance(f)


def _odd_provenance(f: h5py.File) -> None:
    """Provenance attributes of odd types: an undecodable name and value, a compound value, an object reference."""
    f.attrs[b"model\xff"] = b"\xfe"
    f.attrs["compound"] = np.zeros(1, dtype=[("x", "i4"), ("y", "S2")])[0]
    f.attrs["reference"] = f.ref
    f.attrs["nan"] = np.nan


def _optional(draw: Any, f: h5py.File, n: int, p: int, c: int) -> None:
    if draw(st.booleans()):
        _dataset(draw, f, "classifier/weight", draw(st.sampled_from([(c, p), (c, p), (c + 1, p), (c,)])),
                 draw(st.sampled_from(["float32", "float64", "int32"])))
        if draw(st.booleans()):
            _dataset(draw, f, "classifier/bias", draw(st.sampled_from([(c,), (c,), (c, 1)])), "float32")
    elif draw(st.booleans()):
        _dataset(draw, f, "classifier/bias", (c,), "float32")
    if draw(st.booleans()):
        kind = draw(st.sampled_from(["names", "markup", "count", "ints", "declared"]))
        if kind == "ints":
            f["class_names"] = np.arange(c)
        elif kind == "declared":
            count = draw(st.sampled_from([c, 10**8]))
            f.create_dataset("class_names", shape=(count,), dtype=h5py.string_dtype(),
                             chunks=(min(count, 1024),) if count else None)
        else:
            names = [f"[b]c{i}[/]" if kind == "markup" else f"c{i}" for i in range(c + (kind == "count"))]
            f.create_dataset("class_names", data=names, dtype=h5py.string_dtype())
    if draw(st.booleans()):
        _dataset(draw, f, "logits", (n, c), "float32")
    if draw(st.booleans()):
        rows = draw(st.sampled_from([n, n, n + 1]))
        _dataset(draw, f, "layers/stage/features", (rows, draw(st.integers(1, 5))),
                 draw(st.sampled_from(["float32", "float16", "int8"])))
    if draw(st.booleans()):
        k = draw(st.integers(0, 6))
        f["reference_fp32/index"] = np.asarray(draw(st.lists(st.integers(-3, n + 3), min_size=k, max_size=k)),
                                               dtype=np.int64)
        _dataset(draw, f, "reference_fp32/features", draw(st.sampled_from([(k, p), (k, p), (k, p + 1)])), "float32")


def _shard(path: Path, draw: Any, rows: int, p: int, c: int, partial: bool) -> None:
    with h5py.File(path, "w") as s:
        s.create_dataset("features", data=np.random.default_rng(rows).standard_normal((rows, p)).astype(np.float32))
        s.create_dataset("labels", data=np.arange(rows) % c)
        if partial:
            s.attrs["complete"], s.attrs["n_written"] = False, draw(st.integers(0, rows))


def _virtual(draw: Any, f: h5py.File, directory: Path, n: int, p: int, c: int) -> None:
    """/features and /labels as virtual datasets over 1-3 shard files, some missing, short or partial."""
    k = draw(st.integers(1, 3))
    sizes = [draw(st.integers(0, max(1, n))) for _ in range(k)]
    total = sum(sizes)
    extra = draw(st.sampled_from([0, 0, 0, 3]))  # rows no mapping covers
    for name, shape, dtype in (("features", (total, p), "float32"), ("labels", (total,), "int64")):
        layout = h5py.VirtualLayout(shape=(total + extra,) + shape[1:], dtype=dtype)
        offset = 0
        for i, rows in enumerate(sizes):
            if rows:
                src = h5py.VirtualSource(f"shard{i}.h5", name, shape=(rows,) + shape[1:])
                layout[offset:offset + rows] = src
            offset += rows
        f.create_virtual_dataset(name, layout)
    for i, rows in enumerate(sizes):
        fate = draw(st.sampled_from(["ok"] * 6 + ["missing", "short", "partial"]))
        if fate != "missing":
            _shard(directory / f"shard{i}.h5", draw, max(0, rows - 2) if fate == "short" else rows, p, c,
                   partial=fate == "partial")


def _links(draw: Any, f: h5py.File, directory: Path, n: int, p: int) -> None:
    kind = draw(st.sampled_from(["soft", "loop", "dangling", "external_missing", "external", "hard"]))
    target = "features" if "features" not in f else "labels"
    if target == "labels" and "labels" in f:
        return
    if kind == "soft":
        f.create_dataset("stored", data=_values(draw, (n, p) if target == "features" else (n,), "float32"))
        f[target] = h5py.SoftLink("/stored")
    elif kind == "loop":
        f[target] = h5py.SoftLink("/again")
        f["again"] = h5py.SoftLink(f"/{target}")
    elif kind == "dangling":
        f[target] = h5py.SoftLink("/nowhere")
    elif kind == "external_missing":
        f[target] = h5py.ExternalLink("gone.h5", f"/{target}")
    elif kind == "external":
        with h5py.File(directory / "other.h5", "w") as o:
            o.create_dataset(target, data=_values(draw, (n, p) if target == "features" else (n,), "float32"))
        f[target] = h5py.ExternalLink("other.h5", f"/{target}")
    else:
        f.create_dataset("stored", data=_values(draw, (n, p), "float64"))
        f[target] = f["stored"]


def build(draw: Any, directory: Path) -> Path:
    """One random cache file in ``directory`` (with its shard or link targets beside it): half of the examples are a
    valid cache with a few mutations (so that the statistics, virtual datasets and optional datasets are reached),
    half are free-form."""
    path = directory / "cache.h5"
    if draw(st.booleans()):
        _mutated_valid(draw, path, directory)
    else:
        _free_form(draw, path, directory)
    _damage(draw, path)
    return path


MUTATIONS = ["attr", "provenance", "partial", "declared", "holes", "label", "nan", "weight", "bias", "names", "huge", "link",
             "virtual", "empty_class", "one_sample", "layers", "reference", "dtype"]


def _mutated_valid(draw: Any, path: Path, directory: Path) -> None:
    c = draw(st.integers(2, 4))
    mutations = draw(st.lists(st.sampled_from(MUTATIONS), max_size=2, unique=True))
    n = c if "one_sample" in mutations else draw(st.integers(2 * c, 30))
    p = draw(st.integers(1, 6))
    labels = np.arange(n) % c
    if "empty_class" in mutations:
        labels = np.where(labels == c - 1, 0, labels)
    if "label" in mutations:
        labels[draw(st.integers(0, n - 1))] = draw(st.sampled_from([-1, c, 10**6]))
    feats = _values(draw, (n, p), "float64") if "nan" in mutations else \
        np.random.default_rng(draw(st.integers(0, 99))).standard_normal((n, p)) + 3 * np.eye(c, p)[labels % c]
    with h5py.File(path, "w") as f:
        f.attrs.update({"ncaudit_schema": 1, "num_classes": c, "complete": True, "n_written": n})
        if "attr" in mutations:
            f.attrs[draw(st.sampled_from(["num_classes", "complete", "n_written", "ncaudit_schema"]))] = \
                draw(st.sampled_from(ODD_VALUES))
        if "partial" in mutations:
            f.attrs["complete"], f.attrs["n_written"] = False, draw(st.integers(0, n))
        if "provenance" in mutations:
            _odd_provenance(f)
        if "virtual" in mutations:
            _virtual(draw, f, directory, n, p, c)
        elif "link" in mutations:
            _links(draw, f, directory, n, p)
        if "features" not in f:
            _main(draw, f, feats, mutations)
        if "labels" not in f:
            f.create_dataset("labels", data=labels.astype("uint8" if "dtype" in mutations else "int64"))
        _good_optional(draw, f, n, p, c, mutations)


def _main(draw: Any, f: h5py.File, feats: np.ndarray, mutations: list[str]) -> None:
    dtype = draw(st.sampled_from(["float16", "float32", "float64"]))
    n, p = feats.shape
    if "declared" in mutations:
        f.create_dataset("features", shape=(draw(st.sampled_from([n, 10**6, 10**8])), p), dtype=dtype,
                         chunks=(min(n, 64), p))
    elif "holes" in mutations:
        ds = f.create_dataset("features", shape=(n, p), dtype=dtype, chunks=(max(1, n // 4), p))
        ds[: n // 2] = feats[: n // 2]
    else:
        with np.errstate(over="ignore"):
            f.create_dataset("features", data=feats.astype(dtype), chunks=(max(1, n // 3), p),
                             compression="gzip" if draw(st.booleans()) else None)


def _good_optional(draw: Any, f: h5py.File, n: int, p: int, c: int, mutations: list[str]) -> None:
    rng = np.random.default_rng(draw(st.integers(0, 99)))
    if draw(st.booleans()) or "weight" in mutations or "huge" in mutations:
        rows = draw(st.sampled_from([c + 1, 10**8])) if "weight" in mutations else c
        if rows > 10**6 or "huge" in mutations:
            f.create_dataset("classifier/weight", shape=(max(rows, 10**7), p), dtype="float32", chunks=(4096, p))
        else:
            f["classifier/weight"] = rng.standard_normal((rows, p))
        if draw(st.booleans()) or "bias" in mutations:
            f["classifier/bias"] = rng.standard_normal(c + ("bias" in mutations))
    if draw(st.booleans()) or "names" in mutations:
        count = c + ("names" in mutations)
        f.create_dataset("class_names", data=[f"[b]c{i}" for i in range(count)], dtype=h5py.string_dtype())
    if "huge" in mutations:
        f.attrs["num_classes"] = draw(st.sampled_from([10**7, 10**9, 2 * 10**8]))
    if draw(st.booleans()):
        f["logits"] = rng.standard_normal((n, c)).astype(np.float32)
    if draw(st.booleans()) or "layers" in mutations:
        rows = n + ("layers" in mutations and draw(st.booleans()))
        f["layers/stage/features"] = rng.standard_normal((rows, draw(st.integers(1, 4)))).astype(np.float32)
    if draw(st.booleans()) or "reference" in mutations:
        index = rng.integers(-1 if "reference" in mutations else 0, n + ("reference" in mutations), 5)
        f["reference_fp32/index"] = index
        f["reference_fp32/features"] = rng.standard_normal((5, p)).astype(np.float32)


def _free_form(draw: Any, path: Path, directory: Path) -> None:
    n, p, c = draw(st.integers(0, 30)), draw(st.integers(0, 6)), draw(st.integers(0, 5))
    with h5py.File(path, "w") as f:
        _attrs(draw, f, n, c)
        if draw(st.integers(0, 5)) == 0:
            _virtual(draw, f, directory, n, p, max(c, 1))
        else:
            if draw(st.integers(0, 4)) == 0:
                _links(draw, f, directory, n, p)
            if "features" not in f and draw(st.integers(0, 9)):
                _dataset(draw, f, "features", _shape(draw, n, p), draw(st.sampled_from(FEATURE_DTYPES)))
            if "labels" not in f and draw(st.integers(0, 9)):
                shape = draw(st.sampled_from([(n,), (n,), (n,), (n + 1,), (n, 1)]))
                labels = np.random.default_rng(draw(st.integers(0, 99))).integers(
                    0, max(c, 1) + draw(st.sampled_from([0, 0, 0, 1])), shape)
                if draw(st.booleans()) and labels.size:
                    labels.flat[0] = -1 if draw(st.booleans()) else labels.flat[0]
                f.create_dataset("labels", data=labels.astype(draw(st.sampled_from(LABEL_DTYPES))))
        _optional(draw, f, n, p, max(c, 0))


def _damage(draw: Any, path: Path) -> None:
    """Sometimes truncate the file or flip bytes in it."""
    kind = draw(st.sampled_from(["none"] * 8 + ["truncate", "flip"]))
    size = path.stat().st_size
    if kind == "truncate":
        os.truncate(path, draw(st.integers(0, max(0, size - 1))))
    elif kind == "flip":
        with open(path, "r+b") as fh:
            for _ in range(draw(st.integers(1, 8))):
                fh.seek(draw(st.integers(0, max(0, size - 1))))
                fh.write(bytes([draw(st.integers(0, 255))]))


# ---------------------------------------------------------------------------------------------------------------------
# The property
# ---------------------------------------------------------------------------------------------------------------------
def check_report(path: Path, options: list[str]) -> None:
    if KEEP:  # the file of the example in flight, to find what crashed the interpreter (if anything does)
        shutil.rmtree(KEEP, ignore_errors=True)
        shutil.copytree(path.parent, KEEP)
        (KEEP / "options.txt").write_text(" ".join(options))
    with bounded(SECONDS_PER_EXAMPLE):
        res = runner.invoke(app, ["report", str(path), "--json", "-q", *options])
    if res.exception is not None and not isinstance(res.exception, SystemExit):
        raise res.exception
    assert res.exit_code in (0, 2), (res.exit_code, res.stdout[-500:], res.stderr)
    err = res.stderr.strip()
    kind = "virtual " if any(path.parent.glob("shard*")) or (path.parent / "other.h5").exists() else ""
    event(f"{kind}exit {res.exit_code}" + (f": {' '.join(err.split(': ', 2)[-1].split()[:3])}" if res.exit_code else ""))
    if res.exit_code == 2:
        assert res.stdout == "" and err.startswith("error:") and len(err.splitlines()) == 1, err
        assert "Traceback" not in err
        return
    report = json.loads(res.stdout)  # strict JSON: metrics are finite numbers or null
    assert all(v is None or np.isfinite(v) for v in report["metrics"].values())
    assert all(err_line.startswith("warning:") for err_line in err.splitlines() if err_line), err


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="the memory bound reads /proc (Linux)")
@settings(max_examples=EXAMPLES, deadline=None, derandomize=not RANDOM, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])
@given(data=st.data())
def test_any_cache_gives_a_finite_report_or_one_line(data: st.DataObject) -> None:
    options = data.draw(st.lists(st.sampled_from(["--allow-partial", "--drop-empty-classes", "--normalize",
                                                  "--per-class"]), unique=True, max_size=3))
    with tempfile.TemporaryDirectory(prefix="ncaudit-fuzz-") as tmp:
        path = build(data.draw, Path(tmp))
        check_report(path, options)
