"""What a person reads: tables that fit an 80-column terminal, help texts, the partial-cache line, number formats,
plot axes."""

from __future__ import annotations

import io
import json
import re

import h5py
import numpy as np
import pytest
from reference import planted
from rich.console import Console
from typer.testing import CliRunner

from ncaudit.audit import AuditOptions, audit, build_rows
from ncaudit.audit._trajectory import split_of
from ncaudit.cache import write_cache
from ncaudit.cli import app
from ncaudit.report import column_format, fmt_compact, trajectory_table

runner = CliRunner()
EPOCHS = ((0, 0.9), (1, 0.5), (5, 0.1), (50, 0.01), (200, 0.0004))


@pytest.fixture(scope="module")
def rows(tmp_path_factory: pytest.TempPathFactory) -> list:
    """Five checkpoints on a train and a test split, values from 1e-4 to a few units."""
    tmp = tmp_path_factory.mktemp("traj")
    results = []
    for epoch, sigma in EPOCHS:
        for split, seed in (("train", 1), ("test", 2)):
            h, y, etf = planted(C=5, p=8, n=30, sigma=sigma, offset=3.0, seed=seed + epoch)
            path = write_cache(tmp / f"c{epoch}_{split}.h5", h, y, weight=etf * (1 + 0.1 * seed), bias=np.zeros(5),
                               attrs={"checkpoint": f"/runs/r_e{epoch:03d}.pth", "checkpoint_sha256": f"s{epoch}",
                                      "split": split, "model": "planted"})
            results.append(audit(path, AuditOptions(device="cpu")))
    return build_rows(results)


def render(renderable: object, width: int = 80) -> str:
    console = Console(width=width, file=io.StringIO(), record=True, color_system=None)
    console.print(renderable)
    return console.export_text()


@pytest.mark.parametrize("wide", [False, True])
def test_trajectory_table_fits_80_columns(rows: list, wide: bool) -> None:
    text = render(trajectory_table(rows, wide=wide), width=80 if not wide else 200)
    assert "…" not in text and all(len(line) <= (80 if not wide else 200) for line in text.splitlines())
    for row in rows:
        assert row.label in text
        for key in ("accuracy", "nc1", "test.accuracy", "test.nc1", "nc2_equinorm_means", "nc2_equiangle_means",
                    "nc3", "nc4"):
            assert fmt_compact(row.value(key)) in text, (row.label, key)
    for header in ("acc", "NC1", "NC2", "norm μ", "angle μ", "NC3", "NC4", "train", "test"):
        assert header in text
    assert ("term B" in text) == wide and ("angle W" in text) == wide


def test_compact_and_column_formats() -> None:
    assert [fmt_compact(v) for v in (8.6e-4, 0.0131, 0.99721, 1.0, 3.87, 16.37, 12345.6, 0.0, None)] == [
        "8.60e-4", "0.0131", "0.997", "1", "3.87", "16.4", "1.23e4", "0", "—"]
    acc = column_format([1.0, 0.93, 0.9999])
    assert [acc(v) for v in (1.0, 0.93)] == ["1.000", "0.930"]
    small = column_format([2e-5, 0.3, 1.5])
    assert [small(v) for v in (2e-5, 0.3)] == ["2.00e-05", "3.00e-01"]  # one format for the whole column


def test_per_class_table_uses_one_format_per_column(tmp_path) -> None:  # type: ignore[no-untyped-def]
    h, y, etf = planted(C=4, p=6, n=25, sigma=0.05, offset=10.0, seed=3)
    path = write_cache(tmp_path / "c.h5", h, y, weight=etf, bias=np.zeros(4), class_names=list("abcd"))
    res = runner.invoke(app, ["report", str(path), "--per-class", "-q"])
    table = res.stdout[res.stdout.index("per class"):]
    rows = [line.split() for line in table.splitlines() if re.match(r"^\s*\d+\s+[abcd]\s", line)]
    assert len(rows) == 4
    for col in range(3, len(rows[0])):  # ‖μ−μ_G‖, ‖w‖, Var, NC1, acc, NCC acc
        cells = [r[col] for r in rows]
        assert len({("e" in c, len(c.split(".")[-1].split("e")[0])) for c in cells}) == 1, cells


def test_partial_cache_says_so_in_table_and_json(tmp_path) -> None:  # type: ignore[no-untyped-def]
    h, y, _ = planted(C=3, p=4, n=10, seed=41)
    path = tmp_path / "partial.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("features", data=h)
        f.create_dataset("labels", data=y)
        f.attrs.update({"num_classes": 3, "complete": False, "n_written": 12})
    table = runner.invoke(app, ["report", str(path), "--allow-partial", "--drop-empty-classes", "-q"])
    assert table.exit_code == 0 and "partial: 12 of 30 rows" in table.stdout
    js = json.loads(runner.invoke(app, ["report", str(path), "--allow-partial", "--drop-empty-classes", "-q",
                                        "--json"]).stdout)
    assert js["details"]["partial"] == {"rows": 12, "of": 30}


def test_trajectory_check_line_rounds(rows: list) -> None:
    paths = [str(r.primary.source["path"]) for r in rows]
    res = runner.invoke(app, ["trajectory", *paths, "-q", "--fail-if", "nc1>1"])
    value = re.search(r"last row: ([^)]*)\)", res.stdout).group(1)  # type: ignore[union-attr]
    assert value == f"{rows[-1].value('nc1'):.3e}" and len(value) <= 9


def test_help_is_readable() -> None:
    wide = {"COLUMNS": "250"}
    extract = runner.invoke(app, ["extract", "--help"], env=wide).stdout
    assert "W h + b is checked against the model's own logits on the first batch" in extract  # not hard-wrapped
    for text in (extract, runner.invoke(app, ["trajectory", "--help"], env=wide).stdout,
                 runner.invoke(app, ["--help"], env=wide).stdout):
        assert "<bool>" not in text and "<list" not in text and "<str>" not in text
    trajectory = runner.invoke(app, ["trajectory", "--help"], env=wide).stdout
    assert "pip install 'ncaudit[plot]'" in trajectory and "CACHE.h5..." in trajectory
    assert "--pretrained" in extract and "ncaudit[wds]" in extract and "INTEGER" in extract
    # Grouped, the common path first: weights, data, output; then preprocessing and how it runs.
    panels = ["Model and weights", "─ Data ─", "─ Output ─", "─ Preprocessing", "─ How it runs ─"]
    places = [extract.index(p) for p in panels]
    assert places == sorted(places)
    assert extract.index("--model") < extract.index("--data") < extract.index("--out") < extract.index("--device")
    run = runner.invoke(app, ["run", "--help"], env=wide).stdout
    assert "--checkpoints" in run and "'runs/r50/epoch_*.pth'" in run and "--title" in run


def test_split_comes_from_the_dataset_not_the_file_name() -> None:
    assert split_of({"split": "val", "path": "x_train.h5"}) == "val"
    assert split_of({"path": "run_train.h5"}) == "data"
    assert split_of({"path": "a.h5", "data": "/data/imagenet/train"}) == "train"


def _axes(figure):  # type: ignore[no-untyped-def]
    return {ax.get_title(): ax for ax in figure.axes}


@pytest.mark.parametrize("n", [1, 2, 5])
def test_plot_axes(rows: list, n: int) -> None:
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    from ncaudit.report import trajectory_figure
    fig = trajectory_figure(rows[-n:])
    try:
        axes = _axes(fig)
        assert all(ax.get_ylabel() for ax in fig.axes)
        assert "NC4: classifier ≠ nearest class mean" in axes
        epochs = [float(e) for e, _ in EPOCHS[-n:]]
        for ax in fig.axes:
            assert list(ax.get_xticks()) == epochs  # ticks at the checkpoints, whatever their number
        nc3 = axes["NC3: ‖W/‖W‖ − M/‖M‖‖²"]
        low = min(r.value("nc3") for r in rows[-n:])
        ticks = [t for t in nc3.get_yticks() if nc3.get_ylim()[0] <= t <= nc3.get_ylim()[1]]
        assert nc3.get_ylim()[0] <= low and any(t <= low for t in ticks)  # a labelled tick below the last point
    finally:
        plt.close(fig)
