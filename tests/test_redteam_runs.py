"""Hostile runs: a full disk at the writer lock, interrupts before anything is written, a resumed finished run, a
failing torchrun, names HDF5 reads as patterns under torchrun, and rows whose bits would depend on the thread count.
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from extract_fixtures import FAST, last_error_line
from typer.testing import CliRunner

from ncaudit.cache import CacheWriter, WriterLock
from ncaudit.cache import _lock as lock_module
from ncaudit.cache import _writer as writer_module
from ncaudit.cli import app
from ncaudit.errors import InputError
from ncaudit.extract import extract

ROOT = Path(__file__).resolve().parents[1]
CHECKPOINT = ROOT / "fixtures" / "checkpoints" / "test_resnet_digits_e200.safetensors"
runner = CliRunner()


def _cli(*args: object):
    return runner.invoke(app, [str(a) for a in args])


# ---------------------------------------------------------------------------------------------------------------------
# Writes: the lock's record, n_written, and what an interrupt leaves
# ---------------------------------------------------------------------------------------------------------------------
def test_a_full_disk_at_the_lock_record_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(lock_module, "_stamp", full)
    with pytest.raises(InputError, match=r"cannot write the lock file c.h5.lock \(No space left on device\)"):
        WriterLock(tmp_path / "c.h5").acquire()
    assert list(tmp_path.iterdir()) == []  # no empty lock file left behind


def test_n_written_is_on_disk_before_the_rows_are_said_to_be(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[int] = []
    real = writer_module._sync

    def sync(f: h5py.File) -> None:
        real(f)
        synced.append(int(f.attrs["n_written"]))

    monkeypatch.setattr(writer_module, "_sync", sync)
    with CacheWriter(tmp_path / "c.h5", n_samples=8, n_features=2, num_classes=2, weight=None) as writer:
        writer.write(np.zeros((4, 2), np.float32), np.zeros(4, np.int64))
        assert synced[-1] == writer.n_written == 4  # the last sync of a write already holds its n_written
        writer.write(np.zeros((4, 2), np.float32), np.zeros(4, np.int64))
        assert synced[-1] == writer.n_written == 8


def test_an_interrupt_before_any_write_says_nothing_was_written(images: Path, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    from ncaudit.extract import _extract

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(_extract, "load_model", interrupted)
    out = tmp_path / "o.h5"
    res = _cli("extract", "-m", "test_resnet", "-c", CHECKPOINT, "-d", images, "-o", out, "--no-progress")
    assert res.exit_code == 130
    assert last_error_line(res.stderr) == "error: interrupted; nothing was written" and not out.exists()


def test_a_finished_resume_is_a_no_op(images: Path, ckpt: Path, tmp_path: Path) -> None:
    out = tmp_path / "done.h5"
    extract("test_resnet", ckpt, images, out, **FAST)
    before = (out.read_bytes(), out.stat().st_mtime_ns)
    s = extract("test_resnet", ckpt, images, out, resume=True, **FAST)
    assert s.already_complete and s.resumed_from == s.n_samples
    assert (out.read_bytes(), out.stat().st_mtime_ns) == before
    with pytest.raises(InputError, match="written with another precision"):  # still the same job only
        extract("test_resnet", ckpt, images, out, resume=True, **dict(FAST, precision="bf16"))


def test_rows_do_not_depend_on_the_thread_count(images: Path, ckpt: Path, tmp_path: Path) -> None:
    """Small batches of some CPU kernels split by thread count (test_resnet at 32 px: 10 rows differ in the last
    bits between 1 and 2 threads); every batch is computed at full size, so a rank of a torchrun launch
    (OMP_NUM_THREADS=1) writes the rows one process with more threads writes."""
    threads = torch.get_num_threads()
    rows = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            out = tmp_path / f"t{n}.h5"
            extract("test_resnet", ckpt, images, out, **dict(FAST, batch_size=16))  # 26 images: 16 + 10
            with h5py.File(out, "r") as f:
                rows.append(f["features"][()])
    finally:
        torch.set_num_threads(threads)
    np.testing.assert_array_equal(rows[0], rows[1])


# ---------------------------------------------------------------------------------------------------------------------
# torchrun: `ncaudit torchrun`, % in --out, --resume of a finished run, a failing run in one line
# ---------------------------------------------------------------------------------------------------------------------
def _torchrun(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return subprocess.run([sys.executable, "-m", "ncaudit", "torchrun", "--standalone", "--nnodes=1",
                           "--nproc_per_node=2", "-m", "ncaudit", *args], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=300)


def _extract_args(data: Path, out: str, *extra: str) -> list[str]:
    return ["extract", "-m", "test_resnet", "-c", str(CHECKPOINT), "-d", str(data), "--split", "test", "-o", out,
            "--workers", "0", "--no-progress", "--device", "cpu", *extra]


def test_torchrun_with_percent_in_out_then_a_finished_resume(tmp_path: Path) -> None:
    data = ROOT / "fixtures" / "digits"
    one = tmp_path / "one.h5"
    extract("test_resnet", CHECKPOINT, data, one, split="test", workers=0, progress=False, device="cpu")
    run = _torchrun(*_extract_args(data, "r%%.h5"), cwd=tmp_path)
    if run.returncode != 0 and "process group" in run.stderr:
        pytest.skip("the gloo process group could not start in this environment")
    assert run.returncode == 0, run.stderr[-3000:]
    with h5py.File(tmp_path / "r%%.h5", "r") as a, h5py.File(one, "r") as b:  # any HDF5 reader, bit for bit
        for key in ("features", "labels", "logits"):
            np.testing.assert_array_equal(a[key][()], b[key][()], err_msg=key)
    before = (tmp_path / "r%%.h5").read_bytes()
    again = _torchrun(*_extract_args(data, "r%%.h5", "--resume"), cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "already complete" in again.stderr and "Traceback" not in again.stderr
    assert (tmp_path / "r%%.h5").read_bytes() == before


@pytest.mark.skipif(not os.environ.get("NCAUDIT_SLOW"), reason="slow (a torchrun extraction): set NCAUDIT_SLOW=1; "
                    "test_distributed's bad-input run checks the one line and exit 2 in every run")
def test_a_failing_torchrun_extract_is_one_line_and_exit_2(tmp_path: Path) -> None:
    import shutil

    data = tmp_path / "digits"
    shutil.copytree(ROOT / "fixtures" / "digits" / "test", data / "test")
    victim = sorted((data / "test" / "9").iterdir())[-1]  # in rank 1's rows
    victim.write_bytes(b"not an image")
    run = _torchrun(*_extract_args(data, "bad.h5"), cwd=tmp_path)
    if "process group" in run.stderr and "image" not in run.stderr:
        pytest.skip("the gloo process group could not start in this environment")
    assert run.returncode == 2, run.stderr[-3000:]
    line = last_error_line(run.stderr)
    assert line.startswith("error: rank 1: ") and victim.name in line
    assert "ChildFailedError" not in run.stderr and "SIGABRT" not in run.stderr
