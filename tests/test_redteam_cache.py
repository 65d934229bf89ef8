"""Hostile caches: files that reach outside themselves, shards of another run or changed mid-report, names HDF5
reads as patterns, pipes where files should be. Each case is one line on stderr and exit 2 (or, allowed, a report
that names every file it read).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from extract_fixtures import error_line
from reference import planted
from typer.testing import CliRunner

from ncaudit.audit import AuditOptions, audit
from ncaudit.cache import FeatureCache, join_shards, write_cache
from ncaudit.cache._shards import shard_path
from ncaudit.cli import app
from ncaudit.errors import CacheWriteError, InputError

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()
RUN = {"model": "test_resnet", "checkpoint_sha256": "e200" * 16, "data_fingerprint": "d" * 64,
       "transform": json.dumps({"input_size": [3, 32, 32]}), "dataset": "folder", "split": "train"}


def invoke(*args: object):
    return runner.invoke(app, [str(a) for a in args])


def _data(n: int = 40, seed: int = 5):
    h, y, etf = planted(C=4, p=6, n=n, sigma=0.05, seed=seed)
    order = np.random.default_rng(seed).permutation(len(y))  # every shard holds every class
    return h[order], y[order], etf


def _joined(out: Path, parts: int = 3, attrs: dict | None = None) -> tuple[Path, list[Path], np.ndarray]:
    """``out`` joined over row-named shards beside it, as a distributed extraction writes them."""
    h, y, etf = _data()
    bounds = np.linspace(0, len(y), parts + 1).astype(int)
    shards = [write_cache(shard_path(out, a, b), h[a:b], y[a:b], weight=etf,
                          attrs={**RUN, **(attrs or {}), "rows": [int(a), int(b)]})
              for a, b in zip(bounds[:-1], bounds[1:])]
    return join_shards(out, shards), shards, h


def _accuracy(path: Path, *flags: str) -> dict:
    res = invoke("report", path, "-q", "--json", *flags)
    assert res.exit_code == 0, (res.stderr, res.exception)
    return json.loads(res.stdout)


# ---------------------------------------------------------------------------------------------------------------------
# 1. A cache holds its own data
# ---------------------------------------------------------------------------------------------------------------------
def test_external_raw_storage_cannot_print_a_local_file(tmp_path: Path) -> None:
    h, y, etf = _data()
    secret = tmp_path / "secret.txt"
    secret.write_text("TOPSECRET" + "x" * 100)
    path = write_cache(tmp_path / "c.h5", h, y, weight=etf, class_names=list("abcd"))
    with h5py.File(path, "a") as f:
        del f["class_names"]
        f.create_dataset("class_names", shape=(4,), dtype="S16", external=[(str(secret), 0, 64)])
    res = invoke("report", path, "-q", "--per-class", "--json")
    line = error_line(res, "/class_names", str(secret), "--allow-external")
    assert "TOPSECRET" not in res.stdout + line
    allowed = _accuracy(path, "--allow-external")  # read on purpose: named in the report
    assert allowed["source"]["files"] == [str(path), str(secret)]
    assert allowed["per_class"][0]["name"].startswith("TOPSECRET")


def test_relative_external_raw_file_is_the_one_beside_the_cache(tmp_path: Path, monkeypatch) -> None:
    h, y, etf = _data()
    (tmp_path / "d").mkdir()
    path = write_cache(tmp_path / "d" / "c.h5", h, y, weight=etf)
    h.astype(np.float64).tofile(tmp_path / "d" / "raw.bin")
    (h[::-1] * 3).astype(np.float64).tofile(tmp_path / "raw.bin")  # another raw.bin in the working directory
    with h5py.File(path, "a") as f:
        del f["features"]
        f.create_dataset("features", shape=h.shape, dtype="f8", external=[("raw.bin", 0, h.nbytes)])
    want = _accuracy(write_cache(tmp_path / "plain.h5", h, y, weight=etf))["metrics"]
    for cwd in (tmp_path / "d", tmp_path):  # the same file is checked and read from any directory
        monkeypatch.chdir(cwd)
        got = _accuracy(path, "--allow-external")
        assert got["metrics"]["nc1"] == pytest.approx(want["nc1"], rel=1e-12)
        assert got["source"]["files"][1] == str(tmp_path / "d" / "raw.bin")


def test_virtual_dataset_over_another_file_needs_allow_external(tmp_path: Path) -> None:
    """A third-party virtual dataset selecting the whole of its source: refused by default, read when allowed."""
    h, y, etf = _data()
    src = write_cache(tmp_path / "src.h5", h, y, weight=etf)
    path = tmp_path / "vds.h5"
    with h5py.File(path, "w") as f, h5py.File(src) as s:
        for key, value in s.attrs.items():
            f.attrs[key] = value
        s.copy(s["classifier"], f, "classifier")
        for name in ("features", "labels"):
            layout = h5py.VirtualLayout(shape=s[name].shape, dtype=s[name].dtype)
            layout[...] = h5py.VirtualSource("src.h5", name, shape=s[name].shape)
            f.create_virtual_dataset(name, layout)
    error_line(invoke("report", path, "-q"), "/features is a virtual dataset", "src.h5", "--allow-external")
    got, want = _accuracy(path, "--allow-external"), _accuracy(src)
    assert got["metrics"] == want["metrics"] and got["source"]["files"] == [str(path), str(src)]


def test_external_link_is_refused_before_it_is_followed(tmp_path: Path) -> None:
    h, y, etf = _data()
    other = write_cache(tmp_path / "other.h5", h, y, weight=etf)
    path = write_cache(tmp_path / "c.h5", h, y, weight=etf)
    with h5py.File(path, "a") as f:
        del f["features"]
        f["features"] = h5py.SoftLink("/alias")  # a soft link on the way to the external one is followed too
        f["alias"] = h5py.ExternalLink("other.h5", "/features")
    error_line(invoke("report", path, "-q"), "/alias is an external link to other.h5:/features", "--allow-external")
    assert _accuracy(path, "--allow-external")["source"]["files"] == [str(path), str(other)]
    with h5py.File(path, "a") as f:
        del f["alias"]
        f["alias"] = h5py.ExternalLink("other.h5", "/nothing")  # the file exists; the path in it does not
    error_line(invoke("report", path, "-q", "--allow-external"), "target file", "holds no /nothing")


# ---------------------------------------------------------------------------------------------------------------------
# Joined caches: the row-named shards of one run, read straight from them
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["acc99%.h5", "r%%.h5", "r%b.h5"])
def test_percent_in_names_joins_and_reads_the_right_rows(tmp_path: Path, name: str) -> None:
    joined, shards, h = _joined(tmp_path / name)
    with FeatureCache(joined) as cache:  # ncaudit's reader: the shards themselves
        assert cache.info.sources == tuple(shards)
        np.testing.assert_array_equal(np.concatenate([x for _, x, _, _ in cache.iter_batches(7)]), h)
        rows = np.array([0, 12, 13, 40, len(h) - 1])  # across shard boundaries (the reference rows' reads)
        np.testing.assert_array_equal(cache._read("features", rows), h[rows])
    with h5py.File(joined, "r") as f:  # any HDF5 reader resolves the escaped source names to the same rows
        np.testing.assert_array_equal(f["features"][()], h)
    assert _accuracy(joined)["source"]["files"] == [str(joined), *map(str, shards)]


def test_shard_of_another_run_is_refused(tmp_path: Path) -> None:
    joined, shards, _ = _joined(tmp_path / "e200.h5")
    h, y, etf = _data(seed=6)
    write_cache(shards[1], h[:13], y[:13], weight=etf, overwrite=True,  # the e000 shard of the same rows dropped in
                attrs={**RUN, "checkpoint_sha256": "e000" * 16, "rows": [13, 26]})
    error_line(invoke("report", joined, "-q"), shards[1].name, "checkpoint_sha256", "another run")
    write_cache(shards[1], h[:13], y[:13], weight=etf, overwrite=True, attrs={**RUN, "rows": [26, 39]})
    error_line(invoke("report", joined, "-q"), shards[1].name, "records rows [26, 39]", "renamed")


@pytest.mark.parametrize("change", ["replace", "grow", "n_written"])
def test_shard_changed_during_a_report_stops_it(tmp_path: Path, change: str) -> None:
    joined, shards, _ = _joined(tmp_path / "c.h5")
    spare = tmp_path / "spare.h5"
    shutil.copy(shards[2], spare)

    class Meddler:  # after the first batch of pass 1, someone writes the last shard
        done = False

        def task(self, description, total):
            import contextlib

            @contextlib.contextmanager
            def ctx():
                def advance(n):
                    if not Meddler.done:
                        Meddler.done = True
                        if change == "replace":
                            os.replace(spare, shards[2])
                        elif change == "grow":
                            with open(shards[2], "ab") as fh:
                                fh.write(b"\0" * 4096)
                        else:  # another process resumes it (HDF5 allows one open mode per file in a process)
                            subprocess.run([sys.executable, "-c", "import h5py, sys; f = h5py.File(sys.argv[1], 'r+'"
                                            ", locking=False); f.attrs['n_written'] = 3; f.close()", str(shards[2])],
                                           check=True, timeout=60)
                yield advance
            return ctx()

    with pytest.raises(InputError, match=rf"{shards[2].name}: changed while c.h5 was being read"):
        audit(joined, AuditOptions(device="cpu", batch_size=5), Meddler())


def test_missing_rows_of_a_shard_give_no_allow_partial_advice(tmp_path: Path) -> None:
    joined, shards, _ = _joined(tmp_path / "c.h5")
    with h5py.File(shards[0], "r+") as f:  # the shard's features declared but never written
        shape = f["features"].shape
        del f["features"]
        f.create_dataset("features", shape=shape, dtype="f8", chunks=(2, shape[1]))
    line = error_line(invoke("report", joined, "-q"), shards[0].name, "would read the missing rows as zeros")
    assert "--allow-partial" not in line


def test_a_failed_join_leaves_no_file(tmp_path: Path, monkeypatch) -> None:
    out = tmp_path / "c.h5"
    _joined(out)
    out.unlink()

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(h5py.File, "create_virtual_dataset", full)
    with pytest.raises(CacheWriteError, match="joining the shards failed .No space left on device"):
        join_shards(out, sorted(tmp_path.glob("c.rows-*.h5")))
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith("c.rows-")) == []


# ---------------------------------------------------------------------------------------------------------------------
# 4. Pipes where files should be: refused before anything opens them (one process, a time bound)
# ---------------------------------------------------------------------------------------------------------------------
FIFO_CASES = r"""
import os, sys, time, h5py
from pathlib import Path
from ncaudit.cache import FeatureCache
from ncaudit.errors import InputError
d = Path(sys.argv[1])
for name in ("cache.fifo", "ext.h5", "joined.h5"):
    t = time.perf_counter()
    try:
        FeatureCache(d / name, allow_external=True)
        print(name, "opened")
    except InputError as exc:
        print(name, f"{time.perf_counter() - t:.2f}", str(exc))
"""


def test_fifos_are_refused_before_opening(tmp_path: Path) -> None:
    h, y, etf = _data()
    os.mkfifo(tmp_path / "cache.fifo")
    os.mkfifo(tmp_path / "pipe")
    path = write_cache(tmp_path / "ext.h5", h, y, weight=etf)
    with h5py.File(path, "a") as f:
        del f["features"]
        f["features"] = h5py.ExternalLink("pipe", "/features")
    joined, shards, _ = _joined(tmp_path / "joined.h5")
    shards[1].unlink()
    os.mkfifo(shards[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}
    done = subprocess.run([sys.executable, "-c", FIFO_CASES, str(tmp_path)], env=env, capture_output=True, text=True,
                          timeout=60)
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 3, done.stderr
    for line in lines:
        name, seconds, message = line.split(" ", 2)
        assert float(seconds) < 1 and "is a FIFO (named pipe), not a regular file" in message, line


# ---------------------------------------------------------------------------------------------------------------------
# 6. What reaches the terminal, and what the numbers survive
# ---------------------------------------------------------------------------------------------------------------------
HOSTILE = ["\x1b]0;owned\x07title", "\x1b[2Jclear", "\x1b]8;;http://evil.example\x1b\\link\x1b]8;;\x1b\\", "\u202etxt.exe"]


def test_control_characters_from_data_never_reach_the_terminal(tmp_path: Path) -> None:
    h, y, etf = _data()
    path = write_cache(tmp_path / "c.h5", h, y, weight=etf, class_names=HOSTILE,
                       attrs={"model": "\x1b]0;model\x07m", "dataset": "\x1b[31mred", "split": "\x9b2J"})
    res = invoke("report", path, "-q", "--per-class")
    assert res.exit_code == 0, (res.stderr, res.exception)
    for text in (res.stdout, res.stderr):
        assert not any(ch in text for ch in "\x1b\x07\x9b\u202e"), repr(text)
    assert "\\x1b]0;owned\\x07title" in res.stdout and "\\u202etxt.exe" in res.stdout and "\\x1b]0;model" in res.stdout
    bad = tmp_path / "\x1b]0;x\x07.h5"
    bad.write_bytes(b"not hdf5")
    res = invoke("report", bad, "-q")
    line = error_line(res, "\\x1b]0;x\\x07.h5")
    assert "\x1b" not in res.stderr and "\x07" not in line


def test_a_huge_finite_classifier_is_decided_in_float64() -> None:
    from ncaudit.stats import SampleDecisions

    rng = np.random.default_rng(1)
    c, p, n = 10, 64, 1000
    means = 3 * rng.standard_normal((c, p))
    y = rng.integers(0, c, n)
    h = (means[y] + 2 * rng.standard_normal((n, p))).astype(np.float32)
    w = ((means + 0.3 * rng.standard_normal(means.shape)) * 1e37).astype(np.float32)  # finite in float32
    want = (h.astype(np.float64) @ w.astype(np.float64).T).argmax(1) == y
    mu = np.stack([h[y == k].astype(np.float64).mean(0) for k in range(c)])
    anchors = np.stack([h[y == k][0] for k in range(c)]).astype(np.float64)
    import torch
    dec = SampleDecisions(mu, mu.mean(0), w, None, np.eye(p), gemm_dtype=torch.float32, anchors=anchors)
    assert dec.gemm_dtype == torch.float64  # decided once, before the pass
    dec.update(torch.from_numpy(h), torch.from_numpy(y))
    assert int(dec.compute().correct.sum()) == int(want.sum()) == n


def test_float64_features_too_large_get_no_float64_advice(tmp_path: Path) -> None:
    h, y, etf = _data()
    h = h.astype(np.float64)
    h[3, 0] = 1e200
    line = error_line(invoke("report", write_cache(tmp_path / "c.h5", h, y, weight=etf), "-q"), "row 3 reaches 1e+200")
    assert "store them as float64" not in line
