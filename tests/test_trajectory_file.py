"""Trajectory files written during training: one JSON line per epoch, on disk when written, a torn last line from a
crash ignored with a warning (never misread), read and plotted by `ncaudit trajectory run.jsonl`."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from reference import planted
from typer.testing import CliRunner

from ncaudit import TrajectoryWriter, audit_features, read_trajectory
from ncaudit.cache import write_cache
from ncaudit.cli import app
from ncaudit.errors import CacheWriteError, InputError

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[1]


def _results(epoch: int) -> dict:
    """Train and test audits of a planted 'checkpoint' whose collapse improves with the epoch."""
    sigma = 0.8 / (1 + epoch)
    out = {}
    for split, seed in (("train", 1), ("test", 2)):
        h, y, etf = planted(C=4, p=6, n=30, sigma=sigma, offset=0.0, seed=seed + 10 * epoch)
        out[split] = audit_features(h, y, etf, np.zeros(4), attrs={"split": split})
    return out


@pytest.fixture(scope="module")
def epochs() -> dict[int, dict]:
    return {e: _results(e) for e in (0, 1, 2)}


def test_rows_round_trip_and_feed_the_trajectory_command(tmp_path, epochs):
    path = tmp_path / "run.jsonl"
    with TrajectoryWriter(path) as log:
        for epoch, res in epochs.items():
            row = log.write(epoch, **res)
            assert row["label"] == f"epoch {epoch}" and set(row["splits"]) == {"train", "test"}
        assert log.rows == 3
    lines = path.read_bytes().split(b"\n")
    assert len(lines) == 4 and lines[-1] == b""
    assert [json.loads(line)["epoch"] for line in lines[:3]] == [0, 1, 2]
    rows = read_trajectory(path)
    assert [r.epoch for r in rows] == [0, 1, 2] and rows[0].primary_split == "train"
    assert rows[2].splits["test"].metrics == json.loads(json.dumps(epochs[2]["test"].metrics))
    res = runner.invoke(app, ["trajectory", str(path), "--json", "-q", "--plot", str(tmp_path / "run.png")])
    assert res.exit_code == 0, res.stderr
    out = json.loads(res.stdout)
    assert [r["label"] for r in out["trajectory"]] == ["epoch 0", "epoch 1", "epoch 2"]
    assert out["trajectory"][2]["nc1"] == pytest.approx(epochs[2]["train"].metrics["nc1"], rel=1e-15)
    assert (tmp_path / "run.png").stat().st_size > 10_000
    table = runner.invoke(app, ["trajectory", str(path), "-q", "--fail-if", "test.nc1>0.5"])
    assert table.exit_code == 0 and "epoch 2" in table.stdout
    gate = runner.invoke(app, ["trajectory", str(path), "-q", "--fail-if", "nc1<1"])
    assert gate.exit_code == 1  # gates on the last row, as for caches


def test_a_resumed_run_appends_and_overwrite_starts_afresh(tmp_path, epochs):
    path = tmp_path / "run.jsonl"
    with TrajectoryWriter(path) as log:
        log.write(0, **epochs[0])
    with TrajectoryWriter(path) as log:  # the run restarted from its checkpoint: rows continue
        assert log.rows == 1
        log.write(1, **epochs[1])
    assert [r.epoch for r in read_trajectory(path)] == [0, 1]
    with TrajectoryWriter(path, overwrite=True) as log:
        assert log.rows == 0
        log.write(5, train=epochs[2]["train"])
    assert [(r.epoch, list(r.splits)) for r in read_trajectory(path)] == [(5, ["train"])]


def test_a_torn_last_line_is_ignored_with_a_warning_and_cut_by_the_next_writer(tmp_path, epochs):
    path = tmp_path / "run.jsonl"
    with TrajectoryWriter(path) as log:
        log.write(0, **epochs[0])
        full = log.write(1, **epochs[1])
    text = json.dumps(full, separators=(",", ":"))
    with open(path, "ab") as fh:  # a crash in the middle of the third row
        fh.write(text[: len(text) // 2].encode())
    with pytest.warns(UserWarning, match="torn last line"):
        assert [r.epoch for r in read_trajectory(path)] == [0, 1]
    res = runner.invoke(app, ["trajectory", str(path), "--json", "-q"])
    assert res.exit_code == 0 and "torn last line" in res.stderr
    assert len(json.loads(res.stdout)["trajectory"]) == 2
    # a complete row whose newline never reached the disk is torn too: never taken for a finished row
    with open(path, "ab") as fh:
        fh.truncate(path.stat().st_size - len(text) // 2)
        fh.write(text.encode())
    with pytest.warns(UserWarning, match="torn last line"):
        assert len(read_trajectory(path)) == 2
    with pytest.warns(UserWarning, match="cut off a torn last line"):
        log = TrajectoryWriter(path)
    log.write(2, **epochs[2])
    log.close()
    assert [r.epoch for r in read_trajectory(path)] == [0, 1, 2]


def test_a_crashed_writer_process_keeps_every_finished_row(tmp_path):
    """A real process killed after two rows: both are there and readable; the lock it held is free again."""
    path = tmp_path / "run.jsonl"
    code = f"""
import os, sys, signal
sys.path.insert(0, {str(ROOT / 'tests')!r})
from test_trajectory_file import _results
from ncaudit import TrajectoryWriter
log = TrajectoryWriter({str(path)!r})
for epoch in range(2):
    log.write(epoch, **_results(epoch))
os.kill(os.getpid(), signal.SIGKILL)
"""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == -9, run.stderr
    assert [r.epoch for r in read_trajectory(path)] == [0, 1]
    with TrajectoryWriter(path) as log:
        assert log.rows == 2


def test_a_failed_write_leaves_the_rows_on_disk(tmp_path, epochs, monkeypatch):
    path = tmp_path / "run.jsonl"
    log = TrajectoryWriter(path)
    log.write(0, **epochs[0])
    size = path.stat().st_size
    real_write = os.write

    def full_disk(fd: int, data: bytes) -> int:
        real_write(fd, bytes(data[:100]))  # part of the row reaches the file, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", full_disk)
    with pytest.raises(CacheWriteError, match="keeps its 1 rows"):
        log.write(1, **epochs[1])
    monkeypatch.undo()
    assert path.stat().st_size == size  # cut back to the row known to be on disk
    log.write(1, **epochs[1])
    log.close()
    assert [r.epoch for r in read_trajectory(path)] == [0, 1]


def test_bad_files_and_usage_are_one_line_errors(tmp_path, epochs):
    path = tmp_path / "run.jsonl"
    with TrajectoryWriter(path) as log:
        log.write(0, **epochs[0])
        with pytest.raises(InputError, match="one writer per file"):
            TrajectoryWriter(path)
        with pytest.raises(InputError, match="at least one split"):
            log.write(1)
    corrupt = tmp_path / "corrupt.jsonl"
    corrupt.write_text('{"schema": "something else"}\n' + path.read_text())
    for call in (lambda: read_trajectory(corrupt), lambda: TrajectoryWriter(corrupt)):
        with pytest.raises(InputError, match="line 1 is not a trajectory row"):
            call()
    res = runner.invoke(app, ["trajectory", str(corrupt), "-q"])
    assert res.exit_code == 2 and "line 1 is not a trajectory row" in res.stderr
    h, y, etf = planted(C=4, p=6, n=10, seed=0)
    cache = write_cache(tmp_path / "c.h5", h, y, weight=etf)
    mixed = runner.invoke(app, ["trajectory", str(path), str(cache), "-q"])
    assert mixed.exit_code == 2 and "not both" in mixed.stderr
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert runner.invoke(app, ["trajectory", str(empty), "-q"]).exit_code == 2
    with pytest.raises(InputError, match="is a directory"):
        TrajectoryWriter(tmp_path)
