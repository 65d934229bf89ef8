"""Nothing lost, nothing wrong in silence: one test (or a few) per item of the reliability pass.

Disk full mid-extract, a second writer, a joined cache with a missing shard, reports written over their input or on
a full disk, symlink loops in the data, high-bit-depth images, warnings for what the rows cannot show, malformed
attributes, declared sizes that cannot be allocated or were never written, inflating checkpoints, and the messages
of the error paths. Tests that need root (a small tmpfs) skip cleanly where mounting is not permitted; an injected
ENOSPC covers the same paths everywhere.
"""

from __future__ import annotations

import errno
import io
import json
import os
import re
import signal
import subprocess
import sys
import threading
import zipfile
from contextlib import contextmanager
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from extract_fixtures import CLASSES, FAST, N_IMAGES, error_line, last_error_line, make_image_folder
from PIL import Image
from reference import planted
from typer.testing import CliRunner

from ncaudit.cache import CacheWriter, FeatureCache, WriterLock, join_shards, write_cache
from ncaudit.cache._shards import shard_path
from ncaudit.cli import app
from ncaudit.data import load_image, open_dataset
from ncaudit.errors import CacheWriteError, InputError
from ncaudit.extract import _loader as extract_loader
from ncaudit.extract import _single as extract_single
from ncaudit.extract import extract
from ncaudit.models import _checkpoint as models

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


# ---------------------------------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------------------------------
@pytest.fixture
def good(tmp_path: Path) -> Path:
    h, y, etf = planted(C=4, p=6, n=30, sigma=1e-2, offset=100.0, seed=40)
    return write_cache(tmp_path / "good.h5", h, y, weight=etf, class_names=["a", "b", "c", "d"])


def _rows(path: Path) -> dict[str, np.ndarray]:
    with h5py.File(path, "r", locking=False) as f:
        return {k: f[k][()] for k in ("features", "labels", "logits")}


def _state(path: Path) -> tuple[bool, int]:
    with h5py.File(path, "r", locking=False) as f:
        return bool(f.attrs["complete"]), int(f.attrs["n_written"])


def _assert_same_rows(path: Path, reference: Path, n: int | None = None) -> None:
    got, want = _rows(path), _rows(reference)
    for key in got:
        np.testing.assert_array_equal(got[key][:n], want[key][:n], err_msg=key)


def invoke(*args: object):
    return runner.invoke(app, [str(a) for a in args])


def write_raw(path: Path, attrs: dict | None = None, **datasets: object) -> Path:
    with h5py.File(path, "w") as f:
        for k, v in (attrs or {}).items():
            f.attrs[k] = v
        for k, v in datasets.items():
            f.create_dataset(k, data=v)
    return path


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}


@contextmanager
def small_tmpfs(where: Path, size: str = "3m"):
    """A tmpfs of ``size`` mounted at ``where`` (root only); skips the test where mounting is not permitted."""
    where.mkdir(parents=True, exist_ok=True)
    try:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                              capture_output=True, text=True, check=False)
    except OSError:
        done = None
    if done is None or done.returncode != 0:
        pytest.skip("mounting a small tmpfs is not permitted here (needs root); the injected ENOSPC tests cover it")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def fill(directory: Path, leave: int) -> Path:
    """Fill the file system of ``directory`` until about ``leave`` bytes are free."""
    st = os.statvfs(directory)
    free = st.f_bavail * st.f_frsize
    filler = directory / "filler"
    with open(filler, "wb") as fh:
        fh.write(b"\1" * max(0, free - leave))
    return filler


class _FullDisk(io.FileIO):
    """A file that fails with ENOSPC for writes ending beyond ``budget`` bytes (a disk that fills up)."""

    budget = 0

    def write(self, data):
        if self.tell() + len(data) > self.budget:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return super().write(data)


@contextmanager
def disk_full_after(path: Path, budget: int):
    """Writers of ``path`` (h5py, through its file-object driver) get ENOSPC past ``budget`` bytes of file."""
    real = h5py.File
    _FullDisk.budget = budget

    def fake(name, mode="r", *args, **kwargs):
        if isinstance(name, (str, os.PathLike)) and Path(name) == path and mode in ("w", "r+", "a"):
            kwargs.pop("locking", None)
            return real(_FullDisk(name, {"w": "w+", "r+": "r+", "a": "a+"}[mode]), mode, *args, **kwargs)
        return real(name, mode, *args, **kwargs)

    h5py.File = fake
    try:
        yield
    finally:
        h5py.File = real


# ---------------------------------------------------------------------------------------------------------------------
# 1. Disk full mid-extract
# ---------------------------------------------------------------------------------------------------------------------
def test_injected_enospc_stops_the_run_and_keeps_the_rows_on_disk(images: Path, ckpt: Path, reference: Path,
                                                                   tmp_path: Path) -> None:
    out = tmp_path / "full.h5"
    for budget in (24_000, 20_000, 28_000):  # bytes of file before the disk is full; the first that fails part-way
        out.unlink(missing_ok=True)
        with disk_full_after(out, budget), pytest.raises(CacheWriteError, match="No space left on device") as info:
            extract("test_resnet", ckpt, images, out, chunk_rows=4, **FAST)
        complete, n_written = _state(out)
        if 0 < n_written < N_IMAGES:
            break
    assert not complete and 0 < n_written < N_IMAGES
    assert f"first {n_written} of {N_IMAGES} rows are on disk" in str(info.value) and "--resume" in str(info.value)
    _assert_same_rows(out, reference, n_written)  # every row marked written is really there
    with pytest.raises(InputError, match="incomplete"):
        FeatureCache(out)
    s = extract("test_resnet", ckpt, images, out, resume=True, chunk_rows=4, **FAST)
    assert s.resumed_from == n_written
    assert _state(out) == (True, N_IMAGES)
    _assert_same_rows(out, reference)


def test_disk_full_on_a_real_tmpfs(images: Path, ckpt: Path, reference: Path, tmp_path: Path,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """The disk fills up (another process takes the space) after the cache passed the free-space check."""
    monkeypatch.setitem(getattr(extract, "__wrapped__", extract).__kwdefaults__, "chunk_rows", 4)  # 4-row writes
    real_write = CacheWriter.write
    filled: list[Path] = []

    def write_then_fill(self: CacheWriter, *args: object, **kwargs: object) -> None:
        real_write(self, *args, **kwargs)
        if not filled:
            filled.append(fill(self.path.parent, 0))

    monkeypatch.setattr(CacheWriter, "write", write_then_fill)
    with small_tmpfs(tmp_path / "mnt") as mnt:
        out = mnt / "c.h5"
        base = ["-m", "test_resnet", "-c", ckpt, "-d", images, "-o", out, "--img-size", "32", "-j", "0", "-b", "4",
                "--no-progress"]
        err = error_line(invoke("extract", *base), "No space left on device", "--resume")
        assert "wrote" not in err
        complete, n_written = _state(out)
        assert not complete and 4 <= n_written < N_IMAGES and f"first {n_written} of {N_IMAGES} rows" in err
        _assert_same_rows(out, reference, n_written)
        error_line(invoke("report", out, "-q"), "incomplete")
        filled[0].unlink()
        res = invoke("extract", *base, "--resume")
        assert res.exit_code == 0, res.stderr
        assert _state(out) == (True, N_IMAGES)
        _assert_same_rows(out, reference)


def test_writer_refuses_to_continue_after_a_failed_write(tmp_path: Path) -> None:
    out = tmp_path / "w.h5"
    x = np.random.default_rng(0).standard_normal((256, 64)).astype(np.float32)
    with disk_full_after(out, 30_000):
        writer = CacheWriter(out, n_samples=256, n_features=64, num_classes=2, weight=None, chunk_rows=8)
        with pytest.raises(CacheWriteError):
            for start in range(0, 256, 8):
                writer.write(x[start:start + 8], np.zeros(8, np.int64))
        kept = writer.n_written
        with pytest.raises(CacheWriteError, match="earlier write failed"):
            writer.write(x[:8], np.zeros(8, np.int64))
        writer.close()
    assert _state(out) == (False, kept) and not (tmp_path / "w.h5.lock").exists()


# ---------------------------------------------------------------------------------------------------------------------
# 2. One writer per file
# ---------------------------------------------------------------------------------------------------------------------
HOLDER = """
import sys, time
import numpy as np
from ncaudit.cache import CacheWriter
w = CacheWriter(sys.argv[1], n_samples=16, n_features=96, num_classes=3, weight=None, overwrite=True)
w.write(np.zeros((8, 96), np.float32), np.zeros(8, np.int64))
print("ready", flush=True)
time.sleep(120)
"""


def test_a_second_writer_is_refused_and_a_crashed_one_leaves_no_lock(images: Path, ckpt: Path,
                                                                     tmp_path: Path) -> None:
    out = tmp_path / "shared.h5"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(out)], stdout=subprocess.PIPE, text=True,
                              env=_env())
    try:
        assert holder.stdout.readline().strip() == "ready"
        base = ["-m", "test_resnet", "-c", ckpt, "-d", images, "-o", out, "--img-size", "32", "-j", "0",
                "--no-progress"]
        for flag in ("--overwrite", "--resume"):
            err = error_line(invoke("extract", *base, flag), "another process", f"pid {holder.pid} on")
            assert "is writing this cache" in err
        assert _state(out) == (False, 8)  # untouched by the refused writers
        errors: list[BaseException] = []

        def other_thread() -> None:
            try:
                CacheWriter.resume(out)
            except InputError as exc:
                errors.append(exc)

        thread = threading.Thread(target=other_thread)
        thread.start()
        thread.join()
        assert errors and "another process" in str(errors[0])
    finally:
        holder.kill()  # a crash: the kernel releases the lock, the lock file stays behind
        holder.wait()
    assert (tmp_path / "shared.h5.lock").exists()
    res = invoke("extract", *base, "--overwrite")
    assert res.exit_code == 0, res.stderr
    assert _state(out) == (True, N_IMAGES) and not (tmp_path / "shared.h5.lock").exists()


def test_lock_record_without_flock(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Where the file system has no flock, the pid/host record is the lock: broken when its process is gone."""
    import fcntl

    def no_flock(fd: int, op: int) -> None:
        raise OSError(errno.ENOLCK, "no locks available")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    cache = tmp_path / "c.h5"
    lock_file = tmp_path / "c.h5.lock"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    import socket
    lock_file.write_text(f"pid {dead.pid} on {socket.gethostname()} since then\n")
    with WriterLock(cache) as lock:  # the recorded process is gone: the record is broken
        assert lock.held and f"pid {os.getpid()}" in lock_file.read_text()
    lock_file.write_text("pid 1 on some-other-host since then\n")
    with pytest.raises(InputError, match="some-other-host.*delete"):
        WriterLock(cache).acquire()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        lock_file.write_text(f"pid {live.pid} on {socket.gethostname()} since then\n")
        with pytest.raises(InputError, match="another process"):
            WriterLock(cache).acquire()
    finally:
        live.kill()
        live.wait()


# ---------------------------------------------------------------------------------------------------------------------
# 3. A joined cache with a missing or short shard
# ---------------------------------------------------------------------------------------------------------------------
def _shards(tmp_path: Path) -> tuple[Path, list[Path]]:
    h, y, etf = planted(C=4, p=6, n=25, sigma=0.05, seed=3)
    order = np.random.default_rng(0).permutation(len(y))  # every shard holds every class
    h, y = h[order], y[order]
    shards = [write_cache(shard_path(tmp_path / "joined.h5", i * 25, (i + 1) * 25), h[i * 25:(i + 1) * 25],
                          y[i * 25:(i + 1) * 25], weight=etf) for i in range(4)]
    return join_shards(tmp_path / "joined.h5", shards), shards


def test_missing_or_short_shard_is_named(tmp_path: Path) -> None:
    joined, shards = _shards(tmp_path)
    ok = invoke("report", joined, "--json", "-q")
    assert ok.exit_code == 0 and json.loads(ok.stdout)["class_counts"] == [25] * 4
    saved = shards[1].read_bytes()
    shards[1].unlink()
    error_line(invoke("report", joined, "--json", "-q"), shards[1].name, "does not exist")
    h, y, etf = planted(C=4, p=6, n=3, seed=4)
    write_cache(shards[1], h[:10], y[:10], weight=etf)  # replaced by a shorter shard
    error_line(invoke("report", joined, "--json", "-q"), shards[1].name, "short")
    shards[1].write_bytes(saved)
    with h5py.File(shards[1], "r+") as f:  # the shard is now a partial cache that wrote 5 of its 25 rows
        f.attrs["complete"], f.attrs["n_written"] = False, 5
    error_line(invoke("report", joined, "--json", "-q"), shards[1].name, "incomplete")


# ---------------------------------------------------------------------------------------------------------------------
# 4. Reports: never over an input or an HDF5 file; atomic on a full disk
# ---------------------------------------------------------------------------------------------------------------------
def test_report_output_never_replaces_the_cache(good: Path, tmp_path: Path) -> None:
    error_line(invoke("report", good, "-q", "-o", good), "is the input")
    other = write_cache(tmp_path / "other.h5", *planted(C=3, p=4, n=5, seed=1)[:2])
    error_line(invoke("report", good, "-q", "-o", other), "HDF5 file")
    with FeatureCache(good) as cache, FeatureCache(other):
        assert cache.info.n_samples == 120  # both caches intact
    ok = invoke("report", good, "-q", "-o", tmp_path / "r.json")
    assert ok.exit_code == 0 and json.loads((tmp_path / "r.json").read_text())["n_samples"] == 120


def test_report_output_is_replaced_only_when_complete(good: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "r.json"
    target.write_text('{"old": true}\n')

    def full(src: object, dst: object) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "replace", full)
    error_line(invoke("report", good, "-q", "-o", target), "No space left on device", "unchanged")
    assert target.read_text() == '{"old": true}\n' and sorted(p.name for p in tmp_path.iterdir()) == [
        "good.h5", "r.json"]


def test_report_output_on_a_full_tmpfs_keeps_the_old_report(tmp_path: Path) -> None:
    h, y, etf = planted(C=40, p=40, n=3, seed=12)
    cache = write_cache(tmp_path / "c40.h5", h, y, weight=etf)  # its report spans several pages
    with small_tmpfs(tmp_path / "mnt", "1m") as mnt:
        target = mnt / "r.json"
        target.write_text('{"old": true}\n')
        fill(mnt, 0)
        error_line(invoke("report", cache, "-q", "-o", target), "No space left on device")
        assert target.read_text() == '{"old": true}\n'
        assert sorted(p.name for p in mnt.iterdir()) == ["filler", "r.json"]


# ---------------------------------------------------------------------------------------------------------------------
# 5. Symlinks inside --data
# ---------------------------------------------------------------------------------------------------------------------
def test_directory_symlink_loop_is_refused(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "data", per_class=2)
    (root / "c_eel" / "loop").symlink_to("..")
    with pytest.raises(InputError, match="c_eel/loop.*loop"):
        open_dataset(root)
    (root / "c_eel" / "loop").unlink()
    (root / "c_eel" / "up").symlink_to(tmp_path)  # above the root: a loop too
    with pytest.raises(InputError, match="loop"):
        open_dataset(root)


def test_linked_directories_count_each_file_once(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "data", per_class=2)
    extra = tmp_path / "more"
    make_image_folder(extra, per_class=3)
    (root / "a_dog" / "x").symlink_to(extra / "a_dog")
    (root / "a_dog" / "y").symlink_to(extra / "a_dog")  # the same directory twice in one class: read once
    src = open_dataset(root)
    assert list(np.bincount(src.labels)) == [2 + 3, 2 + 2, 2]
    (root / "c_eel" / "z").symlink_to(extra / "a_dog")  # and once more in another class: ambiguous
    with pytest.raises(InputError, match="one class only"):
        open_dataset(root)


def test_scan_matches_torchvision_imagefolder_without_links(tmp_path: Path) -> None:
    from torchvision.datasets import ImageFolder

    root = make_image_folder(tmp_path / "data", per_class=2)
    for sub in ("b_cat/x", "b_cat/x-y", "b_cat/x/z"):  # '-' sorts before '/': directory order matters
        (root / sub).mkdir(parents=True, exist_ok=True)
        for name in ("1.PNG", "0.jpg", "skip.txt"):
            (root / sub / name).write_bytes(b"")
    src = open_dataset(root)
    folder = ImageFolder(str(root), loader=lambda p: p)
    assert src.dataset_classes == folder.classes
    assert src.dataset.images.paths == [p for p, _ in folder.samples]
    assert list(src.labels) == [t for _, t in folder.samples]


# ---------------------------------------------------------------------------------------------------------------------
# 6. High-bit-depth images
# ---------------------------------------------------------------------------------------------------------------------
def test_16_bit_png_and_float_tiff_are_scaled_not_clipped(tmp_path: Path) -> None:
    grey8 = np.random.default_rng(0).integers(0, 256, (20, 24), dtype=np.uint8)
    Image.fromarray(grey8.astype(np.uint16) * 257).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I;16")
    np.testing.assert_array_equal(np.asarray(load_image(tmp_path / "g16.png")), np.repeat(grey8[..., None], 3, 2))
    Image.fromarray(grey8.astype(np.float32) / 255).save(tmp_path / "f.tif")
    got = np.asarray(load_image(tmp_path / "f.tif"))
    assert np.abs(got.astype(int) - grey8[..., None]).max() == 0
    Image.fromarray(grey8.astype(np.float32) * 4).save(tmp_path / "big.tif")
    with pytest.raises(InputError, match=r"big.tif.*floating-point.*\[0, 1\]"):
        load_image(tmp_path / "big.tif")
    with open(tmp_path / "g16.png", "rb") as fh:  # file objects too (tar / WebDataset members)
        assert np.asarray(load_image(io.BytesIO(fh.read()), name="member.png")).max() == grey8.max()


def test_16_bit_dataset_gives_the_same_inputs_as_8_bit(tmp_path: Path) -> None:
    from ncaudit.data import build_transform

    cfg = {"library": "torchvision", "input_size": [3, 16, 16], "interpolation": "bilinear", "mean": [0.5] * 3,
           "std": [0.5] * 3, "crop_pct": 1.0, "crop_mode": "center"}
    rng = np.random.default_rng(1)
    for c in ("a", "b"):
        for root in ("d8", "d16"):
            (tmp_path / root / c).mkdir(parents=True)
        for i in range(3):
            g = rng.integers(0, 256, (16, 16), dtype=np.uint8)
            Image.fromarray(g).save(tmp_path / "d8" / c / f"{i}.png")
            Image.fromarray(g.astype(np.uint16) * 257).save(tmp_path / "d16" / c / f"{i}.png")
    a = open_dataset(tmp_path / "d8", transform=build_transform(cfg))
    b = open_dataset(tmp_path / "d16", transform=build_transform(cfg))
    for i in range(len(a)):
        torch.testing.assert_close(a.dataset[i][0], b.dataset[i][0], rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------------------------
# 7. Warnings for what the rows cannot show
# ---------------------------------------------------------------------------------------------------------------------
def test_one_sample_per_class_warns(tmp_path: Path) -> None:
    h, y, etf = planted(C=4, p=6, n=1, seed=5)
    path = write_cache(tmp_path / "one.h5", h, y, weight=etf)
    res = invoke("report", path, "--json", "-q")
    assert res.exit_code == 0, res.stderr
    report = json.loads(res.stdout)
    assert report["metrics"]["nc1"] == 0
    assert any("single sample" in w for w in report["warnings"])
    assert "single sample" in invoke("report", path, "-q").stderr  # the table's warnings (stderr)
    h, y, etf = planted(C=4, p=6, n=5, seed=5)
    some = write_cache(tmp_path / "some.h5", np.vstack([h, h[:1] + 1]), np.append(y, 0)[np.r_[0:20, 20]],
                       weight=etf)
    assert not any("single" in w for w in json.loads(invoke("report", some, "--json", "-q").stdout)["warnings"])


def test_partial_cache_in_class_order_warns(tmp_path: Path) -> None:
    h, y, etf = planted(C=4, p=6, n=25, seed=3)
    order = np.argsort(y, kind="stable")
    path = write_cache(tmp_path / "p.h5", h[order], y[order], weight=etf)
    with h5py.File(path, "r+") as f:
        f.attrs["complete"], f.attrs["n_written"] = False, 50  # only the first two classes are in
    res = invoke("report", path, "--json", "-q", "--allow-partial", "--drop-empty-classes")
    assert res.exit_code == 0, res.stderr
    warnings = json.loads(res.stdout)["warnings"]
    assert any("partial cache: 50 of 100 rows" in w and "2 of 4 classes" in w for w in warnings), warnings
    table = invoke("report", path, "-q", "--allow-partial", "--drop-empty-classes")
    assert "partial cache" in table.stderr


# ---------------------------------------------------------------------------------------------------------------------
# 8. Malformed attributes
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("attrs", "needle"), [
    ({"num_classes": 4.7}, "num_classes attribute is 4.7, not a whole number"),
    ({"num_classes": "4"}, "num_classes attribute is the string '4'"),
    ({"num_classes": np.array([4, 4])}, "num_classes attribute is an array"),
    ({"num_classes": True}, "num_classes attribute is the boolean"),
    ({"complete": "false"}, "complete attribute is the string 'false'"),
    ({"complete": 2}, "complete attribute is 2"),
    ({"n_written": "12"}, "n_written attribute is the string"),
    ({"n_written": 10**9}, "n_written attribute is 1000000000"),
    ({"ncaudit_schema": "1"}, "ncaudit_schema attribute is the string '1', not a number"),
])
def test_malformed_attributes_are_refused(tmp_path: Path, attrs: dict, needle: str) -> None:
    h, y, _ = planted(C=4, p=6, n=5, seed=6)
    path = write_raw(tmp_path / "bad.h5", {"num_classes": 4, **attrs}, features=h, labels=y)
    error_line(invoke("report", path, "--json", "-q", "--allow-partial"), needle)


def test_whole_float_num_classes_is_accepted(tmp_path: Path) -> None:
    h, y, _ = planted(C=4, p=6, n=5, seed=6)
    path = write_raw(tmp_path / "ok.h5", {"num_classes": 4.0, "complete": np.True_}, features=h, labels=y)
    assert invoke("report", path, "--json", "-q").exit_code == 0


# ---------------------------------------------------------------------------------------------------------------------
# 9. One line instead of a traceback; declared sizes checked before allocating or reading
# ---------------------------------------------------------------------------------------------------------------------
def _huge(path: Path, **declared: tuple[tuple[int, ...], str]) -> Path:
    """A cache with small real /features and /labels plus datasets declared at a size and never written."""
    with h5py.File(path, "w") as f:
        for name, (shape, dtype) in declared.items():
            chunks = (min(shape[0], 4096),) + tuple(shape[1:])
            f.create_dataset(name, shape=shape, dtype=dtype, chunks=chunks)
    return path


def test_huge_declared_sizes_are_refused_before_allocating(tmp_path: Path) -> None:
    h, y, _ = planted(C=4, p=6, n=5, seed=7)
    path = write_raw(tmp_path / "c1e9.h5", {"num_classes": 10**9}, features=h, labels=y)
    error_line(invoke("report", path, "-q", "--drop-empty-classes"), "C = 1000000000", "memory")
    wide = write_raw(tmp_path / "p2e5.h5", {"num_classes": 2}, features=np.ones((2, 200_000), np.float32),
                     labels=np.array([0, 1]))
    error_line(invoke("report", wide, "-q"), "p = 200000", "memory")
    names = _huge(tmp_path / "names.h5", class_names=((200_000_000,), h5py.string_dtype()))
    with h5py.File(names, "a") as f:
        f["features"], f["labels"] = h, y
    error_line(invoke("report", names, "-q", "--drop-empty-classes"), "C = 200000000")
    with h5py.File(names, "a") as f:
        f.attrs["num_classes"] = 4
    error_line(invoke("report", names, "-q"), "/class_names has 200000000 names for 4 classes")
    clf = _huge(tmp_path / "clf.h5", **{"classifier/weight": ((100_000_000, 16), "float32")})
    with h5py.File(clf, "a") as f:
        f["features"], f["labels"] = np.ones((8, 16), np.float32), np.arange(8) % 2
    error_line(invoke("report", clf, "-q", "--drop-empty-classes"))


def test_links_inside_the_file_and_negative_n_written(tmp_path: Path) -> None:
    h, y, _ = planted(C=4, p=6, n=5, seed=8)
    path = write_raw(tmp_path / "loop.h5", {"num_classes": 4}, labels=y)
    with h5py.File(path, "a") as f:
        f["features"] = h5py.SoftLink("/again")
        f["again"] = h5py.SoftLink("/features")
    error_line(invoke("report", path, "-q"), "/features is a soft link to /again")
    neg = write_raw(tmp_path / "neg.h5", {"num_classes": 4, "complete": False, "n_written": -5}, features=h,
                    labels=y)
    error_line(invoke("report", neg, "-q", "--allow-partial"), "n_written attribute is -5")


def test_features_too_large_to_square_are_one_line(tmp_path: Path) -> None:
    h, y, etf = planted(C=4, p=6, n=10, sigma=0.1, seed=13)
    path = write_cache(tmp_path / "big.h5", (h * 1e30).astype(np.float32), y, weight=etf)
    error_line(invoke("report", path, "-q"), "reaches", "rescale the features")
    wide = write_cache(tmp_path / "ok64.h5", h * 1e30, y, weight=etf)  # float64 statistics hold these
    assert invoke("report", wide, "--json", "-q").exit_code == 0


def test_class_directory_not_utf8_is_one_line(images: Path, ckpt: Path, tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "data", per_class=2)
    os.rename(root / CLASSES[0], os.path.join(os.fsencode(root), b"caf\xe9"))
    res = invoke("extract", "-m", "test_resnet", "-c", ckpt, "-d", root, "-o", tmp_path / "o.h5", "--img-size", "32",
                 "-j", "0", "--no-progress")
    error_line(res, "not named in valid UTF-8", "caf\\xe9")
    assert not (tmp_path / "o.h5").exists()


# ---------------------------------------------------------------------------------------------------------------------
# 10. A huge dataset declared but never written
# ---------------------------------------------------------------------------------------------------------------------
def test_declared_but_never_written_dataset_is_refused_at_once(tmp_path: Path) -> None:
    path = _huge(tmp_path / "empty.h5", features=((10**8, 1000), "float32"), labels=((10**8,), "int64"))
    with h5py.File(path, "a") as f:
        f.attrs["num_classes"] = 10
    assert path.stat().st_size < 100_000
    done = subprocess.run([sys.executable, "-m", "ncaudit", "report", str(path), "--json", "-q"], env=_env(),
                          capture_output=True, text=True, timeout=120, check=False)  # the bound is a hang guard, not a figure
    assert done.returncode == 2 and done.stdout == "", done.stderr
    assert "/features declares shape (100000000, 1000)" in done.stderr
    assert "only 0 of the 24415 chunks holding its first 100000000 rows were ever written" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_partially_written_rows_of_a_complete_file_are_refused(tmp_path: Path) -> None:
    h, y, _ = planted(C=4, p=6, n=50, seed=9)
    path = tmp_path / "holes.h5"
    with h5py.File(path, "w") as f:
        f.attrs["num_classes"] = 4
        f.create_dataset("features", shape=h.shape, dtype="float32", chunks=(16, 6))
        f["features"][:100] = h[:100]  # rows 100..199 never written
        f["labels"] = y
    error_line(invoke("report", path, "-q"), "chunks holding its first 200 rows were ever written")


# ---------------------------------------------------------------------------------------------------------------------
# 11. A deflate-compressed checkpoint that inflates far beyond its size
# ---------------------------------------------------------------------------------------------------------------------
def test_inflating_checkpoint_is_refused_before_loading(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    plain = tmp_path / "plain.pth"
    torch.save({"fc.weight": torch.zeros(2048, 2048)}, plain)  # 16 MiB of zeros
    bomb = tmp_path / "bomb.pth"
    with zipfile.ZipFile(plain) as src, zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info.filename))
    assert bomb.stat().st_size < 200_000
    monkeypatch.setattr(models, "INFLATE_CHECK_BYTES", 1 << 20, raising=False)  # test scale: 16 MiB stands for GBs

    def never(*args: object, **kwargs: object) -> None:
        raise AssertionError("torch.load ran on an archive that should have been refused")

    monkeypatch.setattr(torch, "load", never)
    with pytest.raises(InputError, match=r"refused: the checkpoint archive declares 16.0 MiB.*compressed"):
        models.load_checkpoint(bomb)


# ---------------------------------------------------------------------------------------------------------------------
# 12. Messages that mislead
# ---------------------------------------------------------------------------------------------------------------------
def test_free_space_in_mib_below_a_gib(images: Path, ckpt: Path, tmp_path: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(1 << 30, 1 << 30, 300 << 20))
    monkeypatch.setattr(extract_single, "_open_writer", _needs(1 << 29, extract_single._open_writer))
    with pytest.raises(InputError) as info:
        extract("test_resnet", ckpt, images, tmp_path / "y.h5", **FAST)
    assert re.search(r"needs about 51\d\.\d MiB but only 300\.0 MiB is free", str(info.value)), info.value
    assert "GiB" not in str(info.value)


def _needs(rows: int, real):
    """_open_writer for a job of ``rows`` rows (so the projected size crosses the free space)."""
    def wrapper(job, p, widths):
        job.n_total = rows // ((p + 3) * 4 + 8)
        return real(job, p, widths)
    return wrapper


def test_bad_image_advice_is_what_resume_accepts(images: Path, ckpt: Path, reference: Path, tmp_path: Path) -> None:
    import shutil

    root = tmp_path / "data"
    shutil.copytree(images, root)
    good = (root / "c_eel" / "03.png").read_bytes()
    (root / "c_eel" / "03.png").write_bytes(b"\x89PNG garbage")
    out = tmp_path / "o.h5"
    base = ["-m", "test_resnet", "-c", ckpt, "-d", root, "-o", out, "--img-size", "32", "-j", "0", "-b", "2",
            "--no-progress"]
    err = error_line(invoke("extract", *base), "c_eel/03.png", "replace a bad image", "--overwrite")
    kept = _state(out)[1]
    assert f"keeps its first {kept} rows" in err
    (root / "c_eel" / "03.png").unlink()  # removing the file changes the dataset: --resume says so
    error_line(invoke("extract", *base, "--resume"), "the dataset changed", "--overwrite")
    (root / "c_eel" / "03.png").write_bytes(good)  # replacing it, as advised, resumes
    assert invoke("extract", *base, "--resume").exit_code == 0
    _assert_same_rows(out, reference)


def test_broken_external_link_is_named_with_its_target(tmp_path: Path) -> None:
    _, y, _ = planted(C=4, p=6, n=5, seed=10)
    path = write_raw(tmp_path / "ext.h5", {"num_classes": 4}, labels=y)
    with h5py.File(path, "a") as f:
        f["features"] = h5py.ExternalLink("gone.h5", "/features")
    error_line(invoke("report", path, "-q"), "/features is an external link to gone.h5:/features",
                   "--allow-external")
    error_line(invoke("report", path, "-q", "--allow-external"),
                   "/features is an external link to gone.h5:/features", "target file gone.h5 does not exist")


TERMINATE = """
import os, signal, sys
from ncaudit.cache import CacheWriter
from ncaudit.extract._async_writer import _AsyncWriter
real_write, real_init = CacheWriter.write, _AsyncWriter.__init__
def write(self, *args, **kwargs):
    real_write(self, *args, **kwargs)
    if self.n_written == 8:
        os.kill(os.getpid(), signal.SIGTERM)
def init(self, writer, chunk_rows, depth=4):
    real_init(self, writer, 4, depth)  # write every 4 rows
CacheWriter.write, _AsyncWriter.__init__ = write, init
from ncaudit.cli import main
sys.argv = ["ncaudit", "extract", "-m", "test_resnet", "-c", sys.argv[1], "-d", sys.argv[2], "-o", sys.argv[3],
            "--img-size", "32", "-j", "0", "-b", "4", "--no-progress"]
main()
"""


def test_sigterm_is_handled_like_ctrl_c(images: Path, ckpt: Path, reference: Path, tmp_path: Path) -> None:
    out = tmp_path / "term.h5"
    done = subprocess.run([sys.executable, "-c", TERMINATE, str(ckpt), str(images), str(out)], env=_env(),
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 143, (done.returncode, done.stderr)
    line = last_error_line(done.stderr)
    assert "terminated (SIGTERM)" in line and "--resume" in line, done.stderr
    complete, n_written = _state(out)
    assert not complete and n_written >= 8
    _assert_same_rows(out, reference, n_written)
    assert not (tmp_path / "term.h5.lock").exists()
    s = extract("test_resnet", ckpt, images, out, resume=True, **FAST)
    assert s.resumed_from == n_written
    _assert_same_rows(out, reference)


def test_sigterm_handler_is_restored_after_a_command(good: Path) -> None:
    before = signal.getsignal(signal.SIGTERM)
    assert invoke("report", good, "-q").exit_code == 0
    assert signal.getsignal(signal.SIGTERM) is before


def test_class_names_are_not_read_as_markup(tmp_path: Path) -> None:
    h, y, etf = planted(C=4, p=6, n=5, seed=11)
    names = ["[b]x", "a[/]", "[red]c", "plain"]
    path = write_cache(tmp_path / "markup.h5", h, y, weight=etf, class_names=names)
    res = invoke("report", path, "-q", "--per-class")
    assert res.exit_code == 0, (res.stderr, res.exception)
    for name in names:
        assert name in res.stdout


class _Resetting(torch.utils.data.Dataset):  # type: ignore[type-arg]
    """Reports errors through sys.excepthook as multiprocessing's resource_sharer thread does once the parent died."""

    def __len__(self) -> int:
        return 2

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        for exc in (ConnectionResetError(errno.ECONNRESET, "Connection reset by peer"), ValueError("still shown")):
            try:
                raise exc
            except (ConnectionResetError, ValueError):
                sys.excepthook(*sys.exc_info())
        return torch.zeros(1), 0


def test_dataloader_workers_do_not_print_connection_reset_tracebacks(capfd: pytest.CaptureFixture[str]) -> None:
    loader = extract_loader._loader(_Resetting(), range(2), 1, 1, False)
    assert len(list(loader)) == 2
    err = capfd.readouterr().err
    assert "ConnectionResetError" not in err and "ValueError: still shown" in err


def test_to_rgb_transform_scales_sixteen_bit_images_too() -> None:
    """Images that reach the transform without load_image (datasets yielding PIL images) are scaled the same way."""
    from ncaudit.data import ToRGB

    g = np.random.default_rng(3).integers(0, 256, (8, 8), dtype=np.uint8)
    eight = np.asarray(ToRGB()(Image.fromarray(g)))
    sixteen = np.asarray(ToRGB()(Image.fromarray(g.astype(np.uint16) * 257)))
    np.testing.assert_array_equal(eight, sixteen)
