"""Test-set collapse against the training class means (`report TEST.h5 --means-from TRAIN.h5`, `trajectory
--train-means`): NCC accuracy, NC4 and CDNV against an independent float64 reference, the pairing checks, what the
table and the JSON say, and the bundled network's real features."""

from __future__ import annotations

import json

import numpy as np
import pytest
from reference import planted, reference_against_means, reference_metrics
from typer.testing import CliRunner

from ncaudit.audit import MEANS_FROM_METRICS, AuditOptions, audit, audit_trajectory
from ncaudit.cache import write_cache
from ncaudit.cli import app

runner = CliRunner()
RTOL = 1e-10


def split_network(tmp_path, dtype=np.float64, sigma=0.4, seed=5, C=6, p=10, attrs=None):
    """A train and a test cache of one 'network': the same classifier, features drawn around the same ETF means, the
    test set noisier (so its own means differ from the training means)."""
    h, y, etf = planted(C=C, p=p, n=80, sigma=sigma, offset=2.0, seed=seed)
    rng = np.random.default_rng(seed)
    w = etf * 2.0 + 0.3 * rng.standard_normal(etf.shape)
    b = 0.1 * rng.standard_normal(C)
    test_h = h[1::2] + 0.5 * sigma * rng.standard_normal(h[1::2].shape) + 0.05  # shifted: other class means
    base = {"model": "planted", "checkpoint_sha256": "abc", **(attrs or {})}
    train = write_cache(tmp_path / "train.h5", h[::2].astype(dtype), y[::2], weight=w, bias=b,
                        attrs={**base, "split": "train"})
    test = write_cache(tmp_path / "test.h5", test_h.astype(dtype), y[1::2], weight=w, bias=b,
                       attrs={**base, "split": "test"})
    return train, test, (h[::2].astype(dtype), y[::2]), (test_h.astype(dtype), y[1::2]), (w, b)


def class_means(h, y, C):
    h = np.asarray(h, dtype=np.float64)
    return np.stack([h[y == c].mean(0) for c in range(C)])


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_against_the_training_means_matches_the_float64_reference(tmp_path, dtype):
    train, test, (htr, ytr), (hte, yte), (w, b) = split_network(tmp_path, dtype=dtype)
    own = audit(test, AuditOptions(device="cpu"))
    got = audit(test, AuditOptions(device="cpu", means_from=train))
    ref = reference_against_means(hte, yte, class_means(htr, ytr, 6), w, b)
    for key in MEANS_FROM_METRICS:
        assert got.metrics[key] == pytest.approx(ref[key], rel=RTOL, abs=1e-12), key
    np.testing.assert_allclose([r["ncc_accuracy"] for r in got.per_class], ref["per_class_ncc_accuracy"], rtol=RTOL)
    # Everything else is the test set's own, and the own-means values are kept beside.
    means = got.details["means_from"]
    assert means["path"] == str(train) and means["metrics"] == list(MEANS_FROM_METRICS)
    assert means["own_means"] == {k: own.metrics[k] for k in MEANS_FROM_METRICS}
    for key, value in own.metrics.items():
        if key not in MEANS_FROM_METRICS:
            assert got.metrics[key] == value, key
    own_ref = reference_metrics(hte, yte, w, b)
    assert own.metrics["ncc_accuracy"] == pytest.approx(own_ref["ncc_accuracy"])
    # The quantities differ: the test set's own means are not the training means.
    assert got.metrics["cdnv"] != pytest.approx(own.metrics["cdnv"], rel=1e-3)
    assert got.metrics["ncc_accuracy"] < own.metrics["ncc_accuracy"]


def test_report_table_and_json_say_which_means(tmp_path):
    train, test, *_ = split_network(tmp_path)
    table = runner.invoke(app, ["report", str(test), "-q", "--per-class", "--means-from", str(train)])
    assert table.exit_code == 0, table.stderr
    said = " ".join(table.stdout.split())
    assert "class means of NCC accuracy, NC4 and CDNV: the training set's, from" in said and "train.h5" in said
    assert "(training means)" in table.stdout
    assert "train μ" in table.stdout  # the per-class NCC column
    plain = runner.invoke(app, ["report", str(test), "-q"])
    assert "class means: this split's own" in " ".join(plain.stdout.split()) and "--means-from" in plain.stdout
    report = json.loads(runner.invoke(app, ["report", str(test), "-q", "--json", "--means-from", str(train)]).stdout)
    assert report["details"]["means_from"]["path"] == str(train)
    gated = runner.invoke(app, ["report", str(test), "-q", "--json", "--means-from", str(train),
                                "--fail-if", "ncc_accuracy>0.99"])
    assert gated.exit_code in (0, 1)  # gates on the training-means value
    out = runner.invoke(app, ["report", str(test), "-q", "--means-from", str(train), "-o", str(train)])
    assert out.exit_code == 2 and "error:" in out.stderr  # never written over an input


@pytest.mark.parametrize("change,message", [
    ({"model": "other"}, "another model"),
    ({"checkpoint_sha256": "def"}, "another checkpoint"),
])
def test_caches_of_other_networks_are_refused(tmp_path, change, message):
    train, test, (htr, ytr), _, (w, b) = split_network(tmp_path)
    other = write_cache(tmp_path / "other.h5", htr, ytr, weight=w, bias=b, attrs={"model": "planted",
                        "checkpoint_sha256": "abc", "split": "train", **change})
    res = runner.invoke(app, ["report", str(test), "-q", "--means-from", str(other)])
    assert res.exit_code == 2 and message in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.stderr


def test_other_shapes_classes_and_classifiers_are_refused(tmp_path):
    train, test, (htr, ytr), _, (w, b) = split_network(tmp_path)
    cases = {
        "features per sample": write_cache(tmp_path / "p.h5", htr[:, :8], ytr, weight=w[:, :8], bias=b),
        "classes": write_cache(tmp_path / "c.h5", htr[ytr < 5], ytr[ytr < 5], weight=w[:5], bias=b[:5]),
        "classifier differs": write_cache(tmp_path / "w.h5", htr, ytr, weight=w + 1e-3, bias=b),
        "no training samples": write_cache(tmp_path / "e.h5", htr[ytr < 5], ytr[ytr < 5], num_classes=6),
    }
    for message, path in cases.items():
        res = runner.invoke(app, ["report", str(test), "-q", "--means-from", str(path)])
        assert res.exit_code == 2 and message in res.stderr, (message, res.stderr)
        assert len(res.stderr.strip().splitlines()) == 1 and "Traceback" not in res.stderr
    names = write_cache(tmp_path / "n.h5", htr, ytr, weight=w, bias=b, class_names=list("abcdef"))
    named = write_cache(tmp_path / "m.h5", htr, ytr, weight=w, bias=b, class_names=list("abcdeg"))
    res = runner.invoke(app, ["report", str(named), "-q", "--means-from", str(names)])
    assert res.exit_code == 2 and "class 5 is 'f'" in res.stderr


def test_trajectory_pairs_each_test_cache_with_its_training_cache(tmp_path):
    caches = []
    for epoch, sigma in ((0, 0.8), (10, 0.1)):
        d = tmp_path / f"e{epoch}"
        d.mkdir()
        train, test, *_ = split_network(d, sigma=sigma, seed=epoch + 1, attrs={"checkpoint_sha256": f"s{epoch}",
                                                                               "checkpoint": f"/r/e{epoch}.pth"})
        caches += [test, train]  # the test cache first: pairing is by checkpoint, not by order
    rows, _ = audit_trajectory(caches, AuditOptions(device="cpu"), train_means=True)
    for row, (test, train) in zip(rows, (caches[0:2], caches[2:4])):
        assert row.splits["test"].details["means_from"]["path"] == str(train)
        assert row.splits["train"].details.get("means_from") is None
        assert row.splits["test"].metrics == audit(test, AuditOptions(device="cpu", means_from=train)).metrics
    res = runner.invoke(app, ["trajectory", *map(str, caches), "-q", "--train-means"])
    assert res.exit_code == 0, res.stderr
    assert "against the training means" in res.stdout and "own μ" in res.stdout
    js = json.loads(runner.invoke(app, ["trajectory", *map(str, caches), "-q", "--train-means", "--json"]).stdout)
    assert js["trajectory"][0]["splits"]["test"]["means_from"]["path"] == str(caches[1])
    lone = runner.invoke(app, ["trajectory", str(caches[0]), "-q", "--train-means"])
    assert lone.exit_code == 2 and "no training cache" in lone.stderr


def test_demo_shows_both_on_real_features(tmp_path):
    """The bundled network's last checkpoint on the real digits: test NCC accuracy and NC4 against the training means
    equal the float64 reference on the extracted features."""
    from ncaudit._demo import run_demo
    from ncaudit.cache import FeatureCache

    result = run_demo(tmp_path, epochs=[200], plot=False)
    (row,) = result.rows
    test = row.splits["test"]
    assert test.details["means_from"]["path"] == str(tmp_path / "caches" / "e200_train.h5")

    def read(path):
        with FeatureCache(path) as cache:
            return (np.concatenate([b[1] for b in cache.iter_batches(4096)]),
                    np.concatenate([b[2] for b in cache.iter_batches(4096)]), cache.classifier())

    htr, ytr, _ = read(tmp_path / "caches" / "e200_train.h5")
    hte, yte, (w, b) = read(tmp_path / "caches" / "e200_test.h5")
    ref = reference_against_means(hte, yte, class_means(htr, ytr, 10), w, b)
    for key in MEANS_FROM_METRICS:
        assert test.metrics[key] == pytest.approx(ref[key], rel=1e-9), key
    assert set(test.details["means_from"]["own_means"]) == set(MEANS_FROM_METRICS)
