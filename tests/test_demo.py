"""`ncaudit demo` end to end on the bundled fixtures: real extraction, reports, trajectory and plot."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from ncaudit.cli import app

runner = CliRunner()


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    res = runner.invoke(app, ["demo", "--out", str(out), "--json", "--fail-if", "nc4>0.01"])
    return res, out


def test_demo_shows_collapse(demo_run):
    res, out = demo_run
    assert res.exit_code == 0, res.stderr
    rows = json.loads(res.stdout)["trajectory"]
    epochs = [r["epoch"] for r in rows]
    assert epochs == sorted(epochs) and epochs[0] == 0 and len(rows) >= 4
    first, last = rows[0], rows[-1]
    assert last["nc1"] < first["nc1"] / 100  # two orders of magnitude at least
    assert last["nc3"] < first["nc3"] and last["nc2_equiangle_means"] < first["nc2_equiangle_means"]
    assert last["nc4"] <= 0.01 and last["accuracy"] == 1.0
    assert set(last["splits"]) == {"train", "test"}
    assert last["splits"]["test"]["metrics"]["nc1"] > last["nc1"]  # collapse is strongest on the training data


def test_demo_writes_caches_reports_and_plot(demo_run):
    res, out = demo_run
    caches = sorted((out / "caches").glob("*.h5"))
    reports = sorted((out / "reports").glob("*.json"))
    assert len(caches) == len(reports) == 2 * len(json.loads(res.stdout)["trajectory"])
    report = json.loads(reports[-1].read_text())
    assert report["schema"] == "ncaudit.report/1" and report["source"]["model"] == "test_resnet"
    pytest.importorskip("matplotlib")
    png = (out / "trajectory.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000


def test_demo_without_fixtures_is_a_clear_error(tmp_path):
    res = runner.invoke(app, ["demo", "--fixtures", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")])
    assert res.exit_code == 2
    assert "fixtures not found" in res.stderr and "Traceback" not in res.stderr
