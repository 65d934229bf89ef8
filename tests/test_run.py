"""`ncaudit run` on the bundled checkpoints (a small class-stratified --limit keeps it fast): every checkpoint x split
extracted, reported and lined up; finished caches kept, partial ones resumed; the files and the plot's title."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
from typer.testing import CliRunner

from ncaudit._demo import default_fixtures
from ncaudit._run import find_checkpoints
from ncaudit.cli import app
from ncaudit.errors import InputError

runner = CliRunner()
FIXTURES = default_fixtures()
LIMIT = 30


def run_args(out: Path, *extra: str) -> list[str]:
    return ["run", "--model", "test_resnet", "--checkpoints", str(FIXTURES / "checkpoints" / "*.safetensors"),
            "--data", str(FIXTURES / "digits"), "--splits", "train,test", "--out", str(out), "--limit", str(LIMIT),
            "--device", "cpu", "--workers", "0", "-q", *extra]


@pytest.fixture(scope="module")
def first_run(tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("run") / "r"
    titles: list[str | None] = []
    import ncaudit.report as report

    real = report.plot_trajectory

    def spy(rows, path, title=None):  # type: ignore[no-untyped-def]
        titles.append(title)
        return real(rows, path, title=title)

    mp = pytest.MonkeyPatch()
    mp.setattr(report, "plot_trajectory", spy)
    try:
        res = runner.invoke(app, run_args(out, "--json"))
    finally:
        mp.undo()
    return res, out, titles


def test_run_extracts_reports_and_lines_up_every_checkpoint(first_run) -> None:
    res, out, titles = first_run
    assert res.exit_code == 0, res.stderr
    rows = json.loads(res.stdout)["trajectory"]
    assert [r["epoch"] for r in rows] == [0, 1, 5, 50, 200]  # natural order of the file names
    for row in rows:
        assert set(row["splits"]) == {"train", "test"}
        assert row["splits"]["train"]["n_samples"] == row["splits"]["test"]["n_samples"] == LIMIT
        assert row["splits"]["test"]["means_from"]["path"].endswith(f"{Path(row['checkpoint']).stem}_train.h5")
    caches = sorted(p.name for p in (out / "caches").glob("*.h5"))
    assert len(caches) == 10 and "test_resnet_digits_e200_test.h5" in caches
    assert len(list((out / "reports").glob("*.json"))) == 10
    report = json.loads((out / "reports" / "test_resnet_digits_e050_train.json").read_text())
    assert report["class_counts"] == [3] * 10 and report["source"]["limit"] == LIMIT  # stratified: every class
    assert json.loads((out / "trajectory.json").read_text())["trajectory"] == rows
    assert len((out / "trajectory.csv").read_text().splitlines()) == 11
    pytest.importorskip("matplotlib")
    assert (out / "trajectory.png").read_bytes()[:4] == b"\x89PNG"
    assert titles == ["test_resnet on digits: Neural Collapse across training (train, test)"]
    assert rows[-1]["nc1"] < rows[0]["nc1"] / 100


def test_run_again_keeps_finished_caches_and_resumes_a_partial_one(first_run) -> None:
    res, out, _ = first_run
    again = runner.invoke(app, run_args(out, "--json", "--title", "mine"))
    assert again.exit_code == 0, again.stderr
    assert json.loads(again.stdout)["trajectory"] == json.loads(res.stdout)["trajectory"]
    cache = out / "caches" / "test_resnet_digits_e005_test.h5"
    with h5py.File(cache, "r") as f:
        before = f["features"][:]
    with h5py.File(cache, "r+") as f:  # as an interrupted run leaves it
        f.attrs["complete"] = False
        f.attrs["n_written"] = 12
    loud = runner.invoke(app, run_args(out)[:-1] + ["--json"])  # without -q: the steps are said
    assert loud.exit_code == 0, loud.stderr
    assert "e005, test: extract (resumed)" in loud.stderr and loud.stderr.count("kept (finished earlier)") == 9
    with h5py.File(cache, "r") as f:
        assert f.attrs["complete"]
        np.testing.assert_array_equal(f["features"][:], before)
    assert json.loads(loud.stdout)["trajectory"] == json.loads(res.stdout)["trajectory"]


def test_run_refuses_another_runs_cache_and_bad_input(first_run, tmp_path) -> None:
    _, out, _ = first_run
    other = runner.invoke(app, run_args(out, "--json")[:-2] + ["--limit", "20", "-q"])
    assert other.exit_code == 2 and "holds another run's features (its limit is" in other.stderr
    assert len(other.stderr.strip().splitlines()) == 1
    (tmp_path / "other").mkdir()
    args = run_args(out)
    args[args.index("--data") + 1] = str(tmp_path / "other")
    moved = runner.invoke(app, args)
    assert moved.exit_code == 2 and "holds another run's features (its data is" in moved.stderr
    none = runner.invoke(app, ["run", "-m", "test_resnet", "-c", str(tmp_path / "nothing_*.pth"), "-d",
                               str(FIXTURES / "digits"), "-o", str(tmp_path / "o")])
    assert none.exit_code == 2 and "no checkpoint file there" in none.stderr
    gate = runner.invoke(app, run_args(tmp_path / "g", "--fail-if", "Nc9>1"))
    assert gate.exit_code == 2 and "unknown metric" in gate.stderr and not (tmp_path / "g").exists()


def test_find_checkpoints_orders_naturally(tmp_path) -> None:
    for name in ("epoch_50.pth", "epoch_5.pth", "epoch_100.pth", "notes.txt"):
        (tmp_path / name).write_bytes(b"x")
    assert [c.name for c in find_checkpoints([str(tmp_path / "epoch_*.pth")])] == ["epoch_5", "epoch_50",
                                                                                    "epoch_100"]
    assert [c.name for c in find_checkpoints([str(tmp_path)])] == ["epoch_5", "epoch_50", "epoch_100"]
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "epoch_5.pth").write_bytes(b"y")
    with pytest.raises(InputError, match="have the same name"):
        find_checkpoints([str(tmp_path / "epoch_5.pth"), str(tmp_path / "b" / "epoch_5.pth")])
