"""examples/train_digits.py runs: it trains on part of the digits for two epochs, audits every epoch with the API and
writes a trajectory that `ncaudit trajectory` reads, and its plot."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

from ncaudit.cli import app

ROOT = Path(__file__).resolve().parents[1]


def test_train_digits_example(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "HF_HUB_OFFLINE": "1"}
    run = subprocess.run([sys.executable, str(ROOT / "examples" / "train_digits.py"), "--epochs", "2", "--subset",
                          "300", "--test-subset", "150", "--out", str(tmp_path)], env=env, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("epoch ") >= 3 and "wrote" in run.stdout
    assert (tmp_path / "trajectory.png").stat().st_size > 10_000
    res = CliRunner().invoke(app, ["trajectory", str(tmp_path / "trajectory.jsonl"), "--json", "-q"])
    assert res.exit_code == 0, res.stderr
    rows = json.loads(res.stdout)["trajectory"]
    assert [r["epoch"] for r in rows] == [0, 1, 2]
    for row in rows:
        assert set(row["splits"]) == {"train", "test"}
        assert row["splits"]["train"]["n_samples"] == 300 and row["splits"]["test"]["n_samples"] == 150
        assert row["splits"]["test"]["metrics"]["accuracy"] is not None  # the accumulator took its second pass
