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
    # The checkpoint's metadata is embedded as an object, not as a string of JSON; the ranks are recorded.
    assert report["source"]["checkpoint_metadata"]["epoch"] == "200" and report["details"]["world_size"] == 1
    pytest.importorskip("matplotlib")
    png = (out / "trajectory.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000


def test_demo_without_fixtures_is_a_clear_error(tmp_path):
    res = runner.invoke(app, ["demo", "--fixtures", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")])
    assert res.exit_code == 2
    assert "fixtures not found" in res.stderr and "Traceback" not in res.stderr


def test_demo_output_fits_80_columns(demo_run):
    """The demo's explanation and trajectory table at 80 columns: wrapped prose, no ellipsis, every value shown."""
    import io

    from rich.console import Console

    from ncaudit._demo import EXPLANATION
    from ncaudit.audit import AuditOptions, audit, build_rows
    from ncaudit.report import fmt_compact, trajectory_table

    _, out = demo_run
    rows = build_rows([audit(p, AuditOptions(device="cpu")) for p in sorted((out / "caches").glob("*.h5"))])
    console = Console(width=80, file=io.StringIO(), record=True, color_system=None)
    console.print(EXPLANATION)
    console.print(trajectory_table(rows))
    text = console.export_text()
    assert "…" not in text and max(len(line) for line in text.splitlines()) <= 80
    assert "\n\n" in EXPLANATION and all(len(p) > 200 for p in EXPLANATION.split("\n\n"))  # paragraphs, unwrapped
    for row in rows:
        assert row.label in text
        for key in ("accuracy", "test.accuracy", "nc1", "test.nc1", "nc2_equinorm_means", "nc2_equiangle_means",
                    "nc3", "nc4"):
            assert fmt_compact(row.value(key)) in text, (row.label, key)


def test_demo_out_that_is_a_file_is_one_line(tmp_path):
    target = tmp_path / "README.md"
    target.write_text("keep me")
    res = runner.invoke(app, ["demo", "--out", str(target), "-q"])
    assert res.exit_code == 2 and "Traceback" not in res.stderr
    assert res.stderr.strip().splitlines() == [f"error: --out {target}: is a file; give a directory (created when "
                                               "missing) for the caches, reports and plot"]
    assert target.read_text() == "keep me"


def test_demo_writes_the_trajectory_files(demo_run):
    res, out = demo_run
    rows = json.loads(res.stdout)["trajectory"]
    assert json.loads((out / "trajectory.json").read_text())["trajectory"] == rows
    lines = (out / "trajectory.csv").read_text().splitlines()
    assert lines[0].startswith("label,epoch,checkpoint,split,cache,n_samples,means_from,nc1,")
    assert len(lines) == 1 + 2 * len(rows)
    assert "trajectory in" in res.stderr and "trajectory.csv" in res.stderr


def test_demo_table_prints_the_explanation_as_paragraphs(demo_run, capsys):
    """The table mode's preface: paragraphs separated by blank lines, never a literal backslash-n."""
    from ncaudit._demo import EXPLANATION
    from ncaudit.audit import AuditOptions, audit, build_rows
    from ncaudit.cli._trajectory import _print_trajectory

    _, out = demo_run
    rows = build_rows([audit(p, AuditOptions(device="cpu")) for p in sorted((out / "caches").glob("*.h5"))[:2]])
    _print_trajectory(rows, [], output_format="table", preface=EXPLANATION)
    text = capsys.readouterr().out
    assert "\\n" not in text
    paragraphs = [p for p in text.split("\n\n") if p.strip()]
    assert len(paragraphs) >= 3 and paragraphs[0].startswith("What you are looking at")
