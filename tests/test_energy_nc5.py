"""Hyperspherical energies (Liu et al. 2023) and NC5 (Ammar et al. 2024): against an independent float64 reference,
on planted geometry whose answer is known in closed form, in `report`, its JSON and `--ood`."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from reference import planted, reference_energy, reference_nc5, simplex_etf
from typer.testing import CliRunner

from ncaudit import audit_features, metrics
from ncaudit.cache import write_cache
from ncaudit.cli import app

runner = CliRunner()


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-300)


# ---------------------------------------------------------------------------------------------------------------------
# The energies as functions of a set of vectors
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("C, p, offset, block", [(7, 5, 0.0, None), (30, 40, 3.0, 4), (50, 300, 0.5, 7),
                                                  (12, 3, 0.0, 1), (9, 2, 1.0, None)])
def test_energies_match_the_float64_reference(C, p, offset, block):
    v = np.random.default_rng(C * p).standard_normal((C, p)) + offset
    got = metrics.hyperspherical_energy(v, block_rows=block)
    ref = reference_energy(v)
    assert got.s == ref["s"] == p - 2
    assert _rel(got.log_mean, ref["log_mean"]) < 1e-12
    assert _rel(got.log_variance, ref["log_variance"]) < 1e-9
    assert abs(got.riesz_log_mean - ref["riesz_log_mean"]) < 1e-11 * max(1.0, abs(ref["riesz_log_mean"]))
    if p == 2:  # s = 0: every kernel value is 1, the variance 0
        assert got.riesz_mean == 1.0 and got.riesz_variance == 0.0
    else:
        assert abs(got.riesz_log_variance - ref["riesz_log_variance"]) < 1e-9 * max(1.0, abs(ref["riesz_log_variance"]))
        assert _rel(got.riesz_mean, math.exp(ref["riesz_log_mean"])) < 1e-10


def test_riesz_energy_beyond_float64_is_reported_in_logs():
    """p = 2048: d^-2046 overflows for any pair closer than ~0.71 and underflows beyond ~1.4; the log-sum-exp keeps
    the mean's logarithm exact, and the mean itself is inf (null in the report) only when it is beyond float64."""
    rng = np.random.default_rng(5)
    v = rng.standard_normal((40, 2048)) + 0.2  # pairs at cos ~ 0.04: d ~ 1.39, d^-2046 ~ 1e-290 each
    v[:5] = v[5:10] + 0.3 * rng.standard_normal((5, 2048))  # five close pairs: d^-2046 overflows
    got = metrics.hyperspherical_energy(v, block_rows=6)
    ref = reference_energy(v)
    assert math.isinf(got.riesz_mean) and math.isfinite(got.riesz_log_mean)
    assert abs(got.riesz_log_mean - ref["riesz_log_mean"]) < 1e-9 * abs(ref["riesz_log_mean"])
    assert abs(got.riesz_log_variance - ref["riesz_log_variance"]) < 1e-9 * abs(ref["riesz_log_variance"])
    w = rng.standard_normal((40, 2048))  # d ~ 1.41: d^-2046 ~ 1e-308, the variance ~ 1e-508 underflows
    far, ref_far = metrics.hyperspherical_energy(w), reference_energy(w)
    assert far.riesz_log_mean < -500 and far.riesz_variance == 0.0 and far.riesz_log_variance < -1000
    assert abs(far.riesz_log_mean - ref_far["riesz_log_mean"]) < 1e-11 * abs(ref_far["riesz_log_mean"])
    assert abs(far.riesz_log_variance - ref_far["riesz_log_variance"]) < 1e-9 * abs(ref_far["riesz_log_variance"])


def test_close_pairs_keep_their_digits():
    """Two nearly parallel vectors (d ~ 1e-9): 2 - 2 cos loses every digit of their distance, and so do differences of
    rows normalised first (relative error eps / d ~ 1e-8); the distance from the vectors keeps it to ~1e-16."""
    v = np.random.default_rng(1).standard_normal((6, 8))
    v[1] = v[0] + 1e-9 * np.random.default_rng(2).standard_normal(8)
    got, ref = metrics.hyperspherical_energy(v), reference_energy(v)
    assert _rel(got.log_mean, ref["log_mean"]) < 1e-14
    assert abs(got.riesz_log_mean - ref["riesz_log_mean"]) < 1e-14 * abs(ref["riesz_log_mean"])
    assert _rel(got.riesz_log_variance, ref["riesz_log_variance"]) < 1e-13


@pytest.mark.parametrize("C, p", [(4, 6), (10, 10), (10, 96), (100, 512)])
def test_simplex_energies_in_closed_form(C, p):
    """The simplex's unit vectors are all at d^2 = 2C/(C-1): log energy -1/2 log(2C/(C-1)), Riesz
    (2C/(C-1))^(-(p-2)/2), both with variance 0."""
    etf = simplex_etf(C, p, rng=np.random.default_rng(C))
    got = metrics.hyperspherical_energy(etf, block_rows=3)
    d2 = 2 * C / (C - 1)
    assert got.log_mean == pytest.approx(-0.5 * math.log(d2), rel=1e-13)
    assert got.riesz_log_mean == pytest.approx(-(p - 2) / 2 * math.log(d2), rel=1e-13, abs=1e-13)
    assert got.riesz_mean == pytest.approx(d2 ** (-(p - 2) / 2), rel=1e-12)
    assert got.log_variance < 1e-28 and got.riesz_variance <= 1e-26 * got.riesz_mean ** 2


def test_energies_in_the_report_of_planted_simplex_features():
    C, p = 6, 12
    h, y, etf = planted(C=C, p=p, n=40, sigma=1e-6, offset=7.0, seed=3)
    result = audit_features(h, y, etf, np.zeros(C))
    d2 = 2 * C / (C - 1)
    m = result.metrics
    assert m["energy_log_means"] == pytest.approx(-0.5 * math.log(d2), rel=1e-9)
    assert m["energy_log_classifier"] == pytest.approx(-0.5 * math.log(d2), rel=1e-12)
    assert m["energy_riesz_means"] == pytest.approx(d2 ** (-(p - 2) / 2), rel=1e-8)
    assert m["energy_riesz_classifier"] == pytest.approx(d2 ** (-(p - 2) / 2), rel=1e-12)
    energy = result.details["energy"]
    assert energy["riesz_s"] == p - 2
    assert energy["energy_log_means"]["variance"] < 1e-12
    assert energy["energy_riesz_classifier"]["log_mean"] == pytest.approx(-(p - 2) / 2 * math.log(d2), rel=1e-12)


def test_energies_of_coinciding_means_are_null():
    """Two classes with the same mean: log(1/0) is infinite, reported as null (never a huge finite number)."""
    h, y, _ = planted(C=4, p=6, n=20, sigma=0.1, offset=0.0, seed=4)
    h[y == 1] = h[y == 0]  # class 1 repeats class 0's rows: the same mean, bit for bit
    result = audit_features(h, y)
    assert result.metrics["energy_log_means"] is None and result.metrics["energy_riesz_means"] is None
    assert result.metrics["energy_log_classifier"] is None  # no classifier


# ---------------------------------------------------------------------------------------------------------------------
# NC5
# ---------------------------------------------------------------------------------------------------------------------
def _orthogonal_ood(C: int, p: int, n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ID features with raw class means on the first C coordinates, OOD rows whose mean lies exactly on e_C."""
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(C), n)
    means = np.zeros((C, p))
    means[:, :C] = 3.0 * np.eye(C) + rng.uniform(0.1, 1.0, (C, C))
    noise = rng.standard_normal((len(y), p))
    noise -= np.concatenate([noise[y == c].mean(0, keepdims=True).repeat(n, 0) for c in range(C)])  # exact means
    h = means[y] + 0.1 * noise
    z = rng.standard_normal((50, p))
    ood = np.concatenate([z, -z])  # mean exactly 0 ...
    ood[:, C] += 2.0  # ... plus 2 e_C: orthogonal to every class mean
    return h, y, ood


def test_nc5_of_an_orthogonal_ood_mean_is_zero():
    h, y, ood = _orthogonal_ood(C=5, p=9, n=30, seed=0)
    result = audit_features(h, y, ood_features=ood)
    assert result.metrics["nc5"] == pytest.approx(0.0, abs=1e-14)
    assert result.details["ood"]["n_samples"] == 100


def test_nc5_matches_the_reference_and_ignores_ood_labels(tmp_path):
    h, y, etf = planted(C=6, p=10, n=30, sigma=0.2, offset=1.0, seed=8)
    rng = np.random.default_rng(9)
    ood = 0.5 + rng.standard_normal((80, 10))
    expected = reference_nc5(h, y, ood)
    assert 0.05 < expected < 1.0
    assert audit_features(h, y, etf, ood_features=ood).metrics["nc5"] == pytest.approx(expected, rel=1e-12)
    # The same through `report --ood`: the OOD cache's labels (here beyond the ID classes) are not read.
    id_path = write_cache(tmp_path / "id.h5", h.astype(np.float32), y, weight=etf, bias=np.zeros(6))
    ood_path = write_cache(tmp_path / "ood.h5", ood.astype(np.float32), np.arange(80) % 40, num_classes=40)
    res = runner.invoke(app, ["report", str(id_path), "--ood", str(ood_path), "--json", "-q"])
    assert res.exit_code == 0, res.stderr
    out = json.loads(res.stdout)
    expected32 = reference_nc5(h.astype(np.float32), y, ood.astype(np.float32))
    assert out["metrics"]["nc5"] == pytest.approx(expected32, rel=1e-10)
    assert out["details"]["ood"]["n_samples"] == 80 and out["details"]["ood"]["source"] == str(ood_path)
    table = runner.invoke(app, ["report", str(id_path), "--ood", str(ood_path), "-q"])
    assert table.exit_code == 0 and "OOD data" in table.stdout and "energy_log_means" in table.stdout
    plain = runner.invoke(app, ["report", str(id_path), "-q"])
    assert "OOD data" not in plain.stdout and "energy_riesz_means" in plain.stdout  # NC5 shown only with --ood


def test_ood_cache_of_another_width_is_one_line_and_exit_2(tmp_path):
    h, y, etf = planted(C=4, p=8, n=10, seed=1)
    id_path = write_cache(tmp_path / "id.h5", h, y, weight=etf)
    ood_path = write_cache(tmp_path / "ood.h5", np.ones((5, 7)), np.zeros(5, dtype=np.int64), num_classes=2)
    res = runner.invoke(app, ["report", str(id_path), "--ood", str(ood_path), "-q"])
    assert res.exit_code == 2
    lines = [line for line in res.stderr.strip().splitlines() if line]
    assert len(lines) == 1 and "7 dimensions" in lines[0] and "8" in lines[0] and "same model" in lines[0]
    assert res.stdout == ""
    missing = runner.invoke(app, ["report", str(id_path), "--ood", str(tmp_path / "nope.h5"), "-q"])
    assert missing.exit_code == 2


def test_nc5_with_normalized_features():
    """--normalize: the class means and the OOD mean are those of h / ||h||."""
    h, y, _ = planted(C=5, p=7, n=20, sigma=0.3, offset=2.0, seed=11)
    ood = np.random.default_rng(12).standard_normal((60, 7)) * 3 + 1.0
    unit = lambda a: a / np.linalg.norm(a, axis=1, keepdims=True)  # noqa: E731
    got = audit_features(h, y, ood_features=ood, normalize=True).metrics["nc5"]
    assert got == pytest.approx(reference_nc5(unit(h), y, unit(ood)), rel=1e-12)
