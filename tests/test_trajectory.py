"""`ncaudit trajectory`: row order, grouping of splits, labels, gating on the last row, the plot."""

from __future__ import annotations

import json

import numpy as np
import pytest
from reference import planted
from typer.testing import CliRunner

from ncaudit.cache import write_cache
from ncaudit.cli import app

runner = CliRunner()


@pytest.fixture
def run_caches(tmp_path):
    """Caches of three 'checkpoints' whose collapse improves with the epoch, on a train and a test split."""
    paths = {}
    for epoch, sigma in ((0, 0.8), (10, 0.1), (100, 0.01)):
        for split, seed in (("train", 1), ("test", 2)):
            h, y, etf = planted(C=4, p=6, n=40, sigma=sigma, offset=0.0, seed=seed + epoch)
            paths[(epoch, split)] = write_cache(
                tmp_path / f"e{epoch}_{split}.h5", h, y, weight=etf, bias=np.zeros(4),
                attrs={"checkpoint": f"/ckpt/run_e{epoch:03d}.safetensors", "checkpoint_sha256": f"sha{epoch}",
                       "split": split, "model": "planted"})
    return paths


def test_rows_keep_given_order_and_pair_splits(run_caches):
    order = [run_caches[(100, "train")], run_caches[(0, "test")], run_caches[(0, "train")],
             run_caches[(100, "test")], run_caches[(10, "train")]]
    res = runner.invoke(app, ["trajectory", *map(str, order), "--json", "-q"])
    assert res.exit_code == 0, res.stderr
    out = json.loads(res.stdout)
    rows = out["trajectory"]
    assert [r["epoch"] for r in rows] == [100, 0, 10]
    assert [r["label"] for r in rows] == ["epoch 100", "epoch 0", "epoch 10"]
    assert set(rows[0]["splits"]) == {"train", "test"} and set(rows[2]["splits"]) == {"train"}
    assert rows[0]["split"] == "train"
    # Top-level keys are the train metrics under the spec's keys.
    assert rows[0]["nc1"] == rows[0]["splits"]["train"]["metrics"]["nc1"]
    assert rows[0]["nc1"] < rows[1]["nc1"] / 100


def test_gating_on_last_row(run_caches):
    paths = [str(run_caches[(e, "train")]) for e in (0, 10, 100)]
    ok = runner.invoke(app, ["trajectory", *paths, "--json", "-q", "--fail-if", "nc1>0.01"])
    assert ok.exit_code == 0, ok.stderr  # only the last row counts
    reversed_ = runner.invoke(app, ["trajectory", *paths[::-1], "--json", "-q", "--fail-if", "nc1>0.01"])
    assert reversed_.exit_code == 1
    both = [str(run_caches[(100, s)]) for s in ("train", "test")]
    split_check = runner.invoke(app, ["trajectory", *both, "-q", "--fail-if", "test.accuracy<0.5"])
    assert split_check.exit_code == 0, split_check.stderr
    bad = runner.invoke(app, ["trajectory", *both, "-q", "--fail-if", "valid.nc1>1"])
    assert bad.exit_code == 2 and "unknown metric" in bad.stderr


def test_table(run_caches):
    paths = [str(run_caches[(e, s)]) for e in (0, 100) for s in ("train", "test")]
    res = runner.invoke(app, ["trajectory", *paths])
    assert res.exit_code == 0, res.stderr
    assert "epoch 0" in res.stdout and "epoch 100" in res.stdout and "NC1" in res.stdout and "test" in res.stdout


def test_plot_is_a_png(run_caches, tmp_path):
    pytest.importorskip("matplotlib")
    paths = [str(run_caches[(e, s)]) for e in (0, 10, 100) for s in ("train", "test")]
    out = tmp_path / "plots" / "trajectory.png"
    res = runner.invoke(app, ["trajectory", *paths, "-q", "--plot", str(out)])
    assert res.exit_code == 0, res.stderr
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert 20_000 < len(data) < 2_000_000


def test_plot_without_matplotlib_is_a_clear_error(run_caches, tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    res = runner.invoke(app, ["trajectory", str(run_caches[(0, "train")]), "-q", "--plot", str(tmp_path / "x.png")])
    assert res.exit_code == 2
    assert "pip install 'ncaudit[plot]'" in res.stderr and "Traceback" not in res.stderr


def test_caches_of_other_runs_are_refused_unless_mixed(run_caches, tmp_path):
    h, y, etf = planted(C=2, p=6, n=20, sigma=0.3, offset=0.0, seed=9)
    other = write_cache(tmp_path / "init.h5", h, y, weight=etf, bias=np.zeros(2),
                        attrs={"weights": "random-init", "model": "planted", "split": "train"})
    paths = [str(run_caches[(100, "train")]), str(other)]
    res = runner.invoke(app, ["trajectory", *paths, "-q"])
    assert res.exit_code == 2 and "has 2 classes" in res.stderr and "--mixed" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
    mixed = runner.invoke(app, ["trajectory", *paths, "-q", "--mixed"])
    assert mixed.exit_code == 0 and "warning: --mixed" in mixed.stderr
    h2, y2, etf2 = planted(C=4, p=6, n=20, sigma=0.3, offset=0.0, seed=9)
    model = write_cache(tmp_path / "m.h5", h2, y2, weight=etf2, bias=np.zeros(4), attrs={"model": "resnet18"})
    res = runner.invoke(app, ["trajectory", str(run_caches[(0, "train")]), str(model), "-q"])
    assert res.exit_code == 2 and "from model 'resnet18'" in res.stderr


def test_a_repeated_file_is_said(run_caches):
    path = str(run_caches[(0, "train")])
    res = runner.invoke(app, ["trajectory", path, str(run_caches[(10, "train")]), path, "-q", "--json"])
    assert res.exit_code == 0
    assert "given twice (caches 1 and 3)" in res.stderr
    assert len(json.loads(res.stdout)["trajectory"]) == 3  # kept as given


def test_a_failed_check_is_one_line_on_stderr_in_json_mode(run_caches):
    paths = [str(run_caches[(e, "train")]) for e in (100, 0)]
    res = runner.invoke(app, ["trajectory", *paths, "-q", "--json", "--fail-if", "NC1>0.01"])
    assert res.exit_code == 1 and json.loads(res.stdout)["passed"] is False
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("check failed: nc1 > 0.01 (value: ")


def test_plot_goes_where_it_says(run_caches, tmp_path):
    pytest.importorskip("matplotlib")
    paths = [str(run_caches[(e, s)]) for e in (0, 100) for s in ("train", "test")]
    (tmp_path / "plots").mkdir()
    res = runner.invoke(app, ["trajectory", *paths, "-q", "--plot", str(tmp_path / "plots")])
    assert res.exit_code == 0, res.stderr
    written = tmp_path / "plots" / "trajectory.png"
    assert written.read_bytes()[:4] == b"\x89PNG" and f"plot written to {written}" in " ".join(res.stderr.split())
    res = runner.invoke(app, ["trajectory", *paths, "-q", "--plot", str(tmp_path / "curves")])
    assert (tmp_path / "curves.png").is_file() and "curves.png" in res.stderr
    res = runner.invoke(app, ["trajectory", *paths, "-q", "--plot", str(tmp_path / "x.jpg")])
    assert res.exit_code == 2 and ".png, .pdf, .svg" in res.stderr and not (tmp_path / "x.jpg").exists()


def test_plot_title_and_central_path_panel(run_caches):
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    from ncaudit.audit import AuditOptions, audit_trajectory
    from ncaudit.report import provenance_title, trajectory_figure

    rows, _ = audit_trajectory([run_caches[(e, s)] for e in (0, 100) for s in ("train", "test")],
                               AuditOptions(device="cpu"))
    title = provenance_title(rows)
    assert title == "planted: Neural Collapse across training (train, test)"
    fig = trajectory_figure(rows, title)
    try:
        panels = {ax.get_title(): ax for ax in fig.axes}
        assert fig._suptitle.get_text() == title
        ls = panels["central path: ‖W − W_LS‖/‖W_LS‖"]
        assert len(ls.get_lines()) == 2 and "MSE term (B) = L(W, b) − L(W_LS, b_LS)" in panels
        np.testing.assert_allclose(ls.get_lines()[0].get_ydata(), [r.value("ls_distance") for r in rows])
    finally:
        plt.close(fig)
