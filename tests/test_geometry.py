"""Geometry beyond the balanced simplex: orthogonal frames, per-layer collapse, per-class blocks, central path."""

from __future__ import annotations

import json

import numpy as np
import pytest
from reference import planted, reference_metrics, simplex_etf
from typer.testing import CliRunner

from ncaudit.audit import AuditOptions, audit
from ncaudit.cache import write_cache
from ncaudit.cli import app

runner = CliRunner()


def test_orthogonal_frame_with_count_dependent_lengths(cache_path):
    """Bias-free MSE on imbalanced data: means and rows on an orthogonal frame, lengths set by the counts."""
    rng = np.random.default_rng(50)
    counts = [400, 200, 100, 50, 20]
    C, p = len(counts), 8
    q, _ = np.linalg.qr(rng.standard_normal((p, p)))
    lengths = np.sqrt(np.array(counts) / max(counts)) * 3.0
    frame = lengths[:, None] * q[:C]
    y = np.concatenate([np.full(k, c) for c, k in enumerate(counts)])
    h = frame[y] + 1e-4 * rng.standard_normal((len(y), p))
    W = 0.5 * frame / lengths[:, None] ** 2  # rows shrink for minority... any lengths: still orthogonal
    result = audit(write_cache(cache_path(), h, y, weight=W), AuditOptions(device="cpu"))
    assert result.metrics["nc2_orthogonality_means"] < 1e-4
    assert result.metrics["nc2_orthogonality_classifier"] < 1e-12
    # Centred, the same frame is far from orthogonal (and unequal lengths make it no simplex either).
    assert result.metrics["nc2_equinorm_means"] > 0.1
    ref = reference_metrics(h, y, W, None)
    for key in ("nc2_orthogonality_means", "nc2_orthogonality_classifier"):
        assert result.metrics[key] == pytest.approx(ref[key], rel=1e-6, abs=1e-13)
    norms = [row["classifier_norm"] for row in result.per_class]
    assert norms == sorted(norms)  # minority classes have the longer rows here, as built


@pytest.mark.parametrize("offset", [0.0, 0.7, 3.0])
def test_simplex_orthogonality_closed_form(cache_path, offset):
    """Centred ETF means: |cos| = 1/(C-1). Uncentred with mu_G = a u (u orthogonal to the simplex):
    |a^2 - r^2/(C-1)| / (a^2 + r^2)."""
    rng = np.random.default_rng(51)
    C, p, r = 5, 9, 2.0
    etf = simplex_etf(C, p, r)  # spans the first C coordinates
    u = np.zeros(p)
    u[-1] = 1.0
    y = np.repeat(np.arange(C), 50)
    h = offset * u + etf[y] + 1e-7 * rng.standard_normal((len(y), p))
    result = audit(write_cache(cache_path(), h, y, weight=etf), AuditOptions(device="cpu"))
    expected = abs(offset**2 - r**2 / (C - 1)) / (offset**2 + r**2)
    assert result.metrics["nc2_orthogonality_means"] == pytest.approx(expected, rel=1e-5)
    assert result.metrics["nc2_orthogonality_classifier"] == pytest.approx(1 / (C - 1), rel=1e-12)
    assert result.metrics["nc2_maxangle_means"] < 1e-5


def test_orthogonality_rows_shown_for_bias_free_heads(cache_path):
    h, y, etf = planted(C=3, p=5, n=20, sigma=0.1, seed=52)
    free = runner.invoke(app, ["report", str(write_cache(cache_path(), h, y, weight=etf)), "-q"])
    assert "nc2_orthogonality_means" in free.stdout
    biased = runner.invoke(app, ["report", str(write_cache(cache_path(), h, y, weight=etf, bias=np.zeros(3))), "-q"])
    assert "nc2_orthogonality_means" not in biased.stdout
    assert "nc2_orthogonality_means" in json.loads(runner.invoke(
        app, ["report", str(write_cache(cache_path(), h, y, weight=etf, bias=np.zeros(3))), "-q", "--json"]
    ).stdout)["metrics"]


def test_per_layer_blocks(cache_path):
    rng = np.random.default_rng(53)
    h, y, etf = planted(C=4, p=6, n=40, sigma=0.05, offset=10.0, seed=53)
    early = rng.standard_normal((len(y), 12)) + 0.5 * np.eye(12)[y]  # barely separated
    middle = 5.0 + np.eye(8)[y] + 0.2 * rng.standard_normal((len(y), 8))
    path = write_cache(cache_path(), h, y, weight=etf, bias=np.zeros(4),
                       layers={"stage1": early, "stage2": middle})
    result = audit(path, AuditOptions(device="cpu", layers=[]))
    assert list(result.layers) == ["stage1", "stage2"]
    for name, feats in (("stage1", early), ("stage2", middle)):
        ref = reference_metrics(feats, y)
        block = result.layers[name]
        assert block["n_features"] == feats.shape[1]
        for key in ("nc1", "cdnv", "nc2_equinorm_means", "nc2_equiangle_means", "ncc_accuracy"):
            assert block[key] == pytest.approx(ref[key], rel=1e-6, abs=1e-13), (name, key)
    assert result.layers["stage1"]["nc1"] > result.layers["stage2"]["nc1"] > result.metrics["nc1"]
    table = runner.invoke(app, ["report", str(path), "--layers", "-q"])
    assert table.exit_code == 0
    assert table.stdout.index("stage1") < table.stdout.index("stage2") < table.stdout.index("(final)")
    missing = runner.invoke(app, ["report", str(write_cache(cache_path(), h, y, weight=etf)), "--layers", "-q"])
    assert missing.exit_code == 2 and "--layers" in missing.stderr


def test_per_class_block_table_and_json(cache_path):
    counts = [90, 30, 10]
    h, y, etf = planted(C=3, p=5, n=0, sigma=0.3, offset=1.0, seed=54, counts=counts)
    path = write_cache(cache_path(), h, y, weight=etf, bias=-etf @ np.ones(5), class_names=["cat", "dog", "emu"])
    res = runner.invoke(app, ["report", str(path), "-q", "--per-class"])
    assert res.exit_code == 0 and "emu" in res.stdout
    report = json.loads(runner.invoke(app, ["report", str(path), "-q", "--json"]).stdout)
    rows = report["per_class"]
    assert [r["count"] for r in rows] == counts
    assert set(rows[0]) >= {"class", "name", "count", "mean_norm", "classifier_norm", "variance", "nc1", "accuracy",
                            "ncc_accuracy"}
    pi = np.array(counts) / sum(counts)
    assert sum(p * r["nc1"] for p, r in zip(pi, rows)) == pytest.approx(report["metrics"]["nc1"], rel=1e-10)


def test_collapse_through_depth_on_the_digits(tmp_path):
    """extract --layers on the bundled network with no transform flags (the checkpoint's metadata says how its
    images were prepared), then report --layers and trajectory --layers: the README's figures."""
    from ncaudit._demo import default_fixtures, load_manifest
    from ncaudit.extract import extract

    fixtures = default_fixtures()
    manifest = load_manifest(fixtures)
    kw = {"split": "train", "device": "cpu", "precision": "fp32", "workers": 0, "progress": False}
    files = {c["epoch"]: fixtures / "checkpoints" / c["file"] for c in manifest["checkpoints"]}
    first, last = min(files), max(files)
    extract("test_resnet", files[first], fixtures / "digits", tmp_path / "first.h5", **kw)
    extract("test_resnet", files[last], fixtures / "digits", tmp_path / "last.h5", layers="layer1,layer2,layer3",
            **kw)
    report = json.loads(runner.invoke(app, ["report", str(tmp_path / "last.h5"), "--layers", "--json", "-q"]).stdout)
    assert list(report["layers"]) == ["layer1", "layer2", "layer3"]
    transform = json.loads(report["source"]["transform"])
    assert transform["input_size"] == [3, 32, 32] and transform["std"] == [0.25] * 3
    assert transform["sources"]["input_size"] == transform["sources"]["std"] == "checkpoint metadata"
    nc1 = [report["layers"][name]["nc1"] for name in ("layer1", "layer2", "layer3")] + [report["metrics"]["nc1"]]
    np.testing.assert_allclose(nc1, [1.14, 0.122, 0.0119, 8.6e-4], rtol=0.01)  # README: 1.14 → … → 8.6e-4
    assert report["metrics"]["accuracy"] == 1.0 and report["source"]["split"] == "train"
    traj = runner.invoke(app, ["trajectory", str(tmp_path / "first.h5"), str(tmp_path / "last.h5"), "--layers", "-q"])
    assert traj.exit_code == 0, traj.stderr
    assert "per-layer NC1" in traj.stdout and "layer2" in traj.stdout
