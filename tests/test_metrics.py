"""Every metric against the independent float64 reference (tests/reference.py) and against planted closed forms."""

from __future__ import annotations

import numpy as np
import pytest
from reference import planted, reference_metrics

from ncaudit.audit import AuditOptions, audit
from ncaudit.cache import write_cache

RTOL = 1e-6
KEYS = ["nc1", "cdnv", "nc2_equinorm_means", "nc2_equiangle_means", "nc2_maxangle_means", "nc2_orthogonality_means",
        "ncc_accuracy"]
CLASSIFIER_KEYS = ["nc2_equinorm_classifier", "nc2_equiangle_classifier", "nc2_maxangle_classifier",
                   "nc2_orthogonality_classifier", "nc3", "nc4", "accuracy", "mse_loss", "mse_term_a", "mse_term_b",
                   "ls_distance", "ls_cosine"]


def close(ours, ref, rtol=RTOL, atol=1e-13):
    assert ours is not None, "metric is null"
    assert abs(ours - ref) <= rtol * abs(ref) + atol, f"{ours!r} vs reference {ref!r}"


def run(path, h, y, W=None, b=None, **opts):
    write_cache(path, h, y, weight=W, bias=b, num_classes=None if W is not None else int(y.max()) + 1)
    return audit(path, AuditOptions(device="cpu", **opts))


def check_all(result, ref, with_classifier=True, atol=1e-13):
    for key in KEYS + (CLASSIFIER_KEYS if with_classifier else []):
        close(result.metrics[key], ref[key], atol=atol)
    pc = ref["per_class"]
    for i, row in enumerate(result.per_class):
        assert row["count"] == pc["count"][i]
        close(row["variance"], pc["variance"][i])
        close(row["nc1"], pc["nc1"][i])
        close(row["mean_norm"], pc["mean_norm"][i])
        close(row["ncc_accuracy"], pc["ncc_accuracy"][i])
        if with_classifier:
            close(row["accuracy"], pc["accuracy"][i])
            close(row["classifier_norm"], pc["classifier_norm"][i])


def noisy_classifier(etf, rng, scale=0.3):
    return etf + scale * rng.standard_normal(etf.shape), 0.1 * rng.standard_normal(etf.shape[0])


@pytest.mark.parametrize("sigma", [1e-1, 1e-2, 1e-3, 1e-4, 1e-5])
def test_planted_simplex_with_offset(cache_path, sigma):
    h, y, etf = planted(C=6, p=12, n=60, sigma=sigma, offset=100.0, seed=1)
    rng = np.random.default_rng(2)
    W, b = noisy_classifier(etf, rng)
    result = run(cache_path(), h, y, W, b)
    ref = reference_metrics(h, y, W, b)
    check_all(result, ref)
    # The identity A + B = L(W, b) holds against the directly evaluated loss.
    assert result.details["mse_check"]["relative_discrepancy"] < 1e-8


def test_planted_ground_truth(cache_path):
    C, p, n, r, sigma = 8, 24, 400, 2.0, 1e-2
    h, y, etf = planted(C=C, p=p, n=n, sigma=sigma, radius=r, offset=100.0, seed=3)
    result = run(cache_path(), h, y, etf, -etf @ np.full(p, 100.0))  # the bias cancels the common offset
    expected = sigma**2 * (C - 1) ** 2 / (C * r**2)
    # Sampling error of a p-dimensional variance estimate from N samples is ~ sqrt(2/(N p)).
    assert result.metrics["nc1"] == pytest.approx(expected, rel=0.05)
    assert result.metrics["nc2_equinorm_means"] < 1e-2
    assert result.metrics["nc2_maxangle_means"] < 1e-2
    assert result.metrics["nc2_equiangle_classifier"] < 1e-12
    assert result.metrics["nc3"] < 1e-3
    assert result.metrics["nc4"] == 0.0
    assert result.metrics["accuracy"] == 1.0
    assert result.details["rank_sigma_b"] == C - 1


def test_offset_changes_nothing(cache_path):
    h, y, etf = planted(C=5, p=10, n=80, sigma=1e-3, offset=0.0, seed=4)
    rng = np.random.default_rng(5)
    W, b = noisy_classifier(etf, rng)
    a = run(cache_path(), h, y, W, b).metrics
    shift = rng.standard_normal(10)
    W2 = W
    b2 = b - W @ (100.0 * shift)  # the same decision function on shifted features
    c = run(cache_path(), h + 100.0 * shift, y, W2, b2).metrics
    for key in ["nc1", "cdnv", "nc2_equinorm_means", "nc2_equiangle_means", "nc3", "nc4", "accuracy",
                "ncc_accuracy", "mse_term_a"]:
        assert c[key] == pytest.approx(a[key], rel=1e-6, abs=1e-12), key


def test_imbalanced_classes(cache_path):
    counts = [200, 120, 60, 30, 15, 10]
    h, y, etf = planted(C=6, p=10, n=0, sigma=0.2, offset=5.0, seed=6, counts=counts)
    W, b = noisy_classifier(etf, np.random.default_rng(7))
    result = run(cache_path(), h, y, W, b)
    check_all(result, reference_metrics(h, y, W, b))
    # The pi-weighted per-class NC1 sums to the global NC1.
    pi = np.array(counts) / sum(counts)
    assert sum(pi[i] * r["nc1"] for i, r in enumerate(result.per_class)) == pytest.approx(result.metrics["nc1"],
                                                                                          rel=1e-10)


def test_fewer_features_than_classes(cache_path):
    rng = np.random.default_rng(8)
    C, p = 12, 4
    means = 3.0 * rng.standard_normal((C, p))
    y = np.repeat(np.arange(C), 40)
    h = 50.0 + means[y] + 0.5 * rng.standard_normal((len(y), p))
    W, b = rng.standard_normal((C, p)), rng.standard_normal(C)
    result = run(cache_path(), h, y, W, b)
    check_all(result, reference_metrics(h, y, W, b))
    assert result.details["rank_sigma_b"] == p


def test_two_classes(cache_path):
    h, y, etf = planted(C=2, p=5, n=100, sigma=0.3, offset=10.0, seed=9)
    W, b = noisy_classifier(etf, np.random.default_rng(10))
    result = run(cache_path(), h, y, W, b)
    check_all(result, reference_metrics(h, y, W, b))
    assert result.details["rank_sigma_b"] == 1


def test_bias_free_head(cache_path):
    h, y, etf = planted(C=5, p=8, n=50, sigma=0.1, offset=1.0, seed=11)
    W, _ = noisy_classifier(etf, np.random.default_rng(12))
    result = run(cache_path(), h, y, W, None)
    check_all(result, reference_metrics(h, y, W, None))
    assert result.details["has_bias"] is False


def spread_means(C: int, p: int, rng: np.random.Generator, decades: float = 3.0) -> np.ndarray:
    """Centred class means (C, p) whose singular values spread over ``decades`` orders of magnitude."""
    q, _ = np.linalg.qr(rng.standard_normal((p, C - 1)))
    basis, _ = np.linalg.qr(np.hstack([np.ones((C, 1)), rng.standard_normal((C, C - 1))]))
    v = basis[:, 1:]  # (C, C-1) orthonormal, orthogonal to the ones vector: balanced classes centre at 0
    return v @ np.diag(np.logspace(0, -decades, C - 1)) @ q.T


def test_means_spread_over_three_orders(cache_path):
    """Between-class scales spanning 1e0..1e-3: a default-tolerance pinv drops real directions here."""
    rng = np.random.default_rng(13)
    C, p = 6, 10
    base = spread_means(C, p, rng)
    y = np.repeat(np.arange(C), 80)
    h = 100.0 + base[y] + 1e-5 * rng.standard_normal((len(y), p))
    W, b = base + 0.01 * rng.standard_normal(base.shape), np.zeros(C)
    result = run(cache_path(), h, y, W, b)
    ref = reference_metrics(h, y, W, b)
    check_all(result, ref)
    assert result.details["rank_sigma_b"] == C - 1
    # What a default-tolerance float32 pseudo-inverse of the p x p matrix Sigma_B reports instead: it drops the
    # real directions of the closest class means and under-reports NC1 by orders of magnitude.
    import torch

    means = np.stack([h[y == c].mean(0) for c in range(C)])
    m = means - h.mean(0)
    sigma_b = torch.tensor(m.T @ m / C, dtype=torch.float32)
    d = h - means[y]
    sigma_w = torch.tensor(d.T @ d / len(y), dtype=torch.float32)
    naive = float(torch.trace(sigma_w @ torch.linalg.pinv(sigma_b, hermitian=True))) / C
    assert naive < ref["nc1"] / 30


def test_ridge_least_squares(cache_path):
    h, y, etf = planted(C=4, p=6, n=50, sigma=0.2, offset=3.0, seed=14)
    W, b = noisy_classifier(etf, np.random.default_rng(15))
    result = run(cache_path(), h, y, W, b, ridge=0.05)
    ref = reference_metrics(h, y, W, b, ridge=0.05)
    for key in ["mse_loss", "mse_term_a", "mse_term_b", "ls_distance", "ls_cosine"]:
        close(result.metrics[key], ref[key])


def test_least_squares_classifier_is_the_central_path(cache_path):
    h, y, _ = planted(C=5, p=9, n=40, sigma=0.3, offset=2.0, seed=16)
    ref = reference_metrics(h, y, np.eye(5, 9), np.zeros(5))
    w_ls, b_ls = ref["w_ls"], ref["b_ls"]
    at = run(cache_path(), h, y, w_ls, b_ls).metrics
    assert at["ls_distance"] == pytest.approx(0.0, abs=1e-9)
    assert at["ls_cosine"] == pytest.approx(1.0, abs=1e-9)
    assert at["mse_term_b"] == pytest.approx(0.0, abs=1e-12)
    scaled = run(cache_path(), h, y, 3 * w_ls, b_ls).metrics
    assert scaled["ls_cosine"] == pytest.approx(1.0, abs=1e-9)
    assert scaled["ls_distance"] == pytest.approx(2.0, rel=1e-9)


def test_float32_and_float16_features(cache_path):
    h, y, etf = planted(C=5, p=16, n=100, sigma=0.05, offset=3.0, seed=17)
    W, b = noisy_classifier(etf, np.random.default_rng(18))
    for dtype in (np.float32, np.float16):
        hd = h.astype(dtype)
        result = run(cache_path(), hd, y, W, b)
        ref = reference_metrics(hd.astype(np.float64), y, W, b)
        check_all(result, ref)


def test_precision_floor(cache_path):
    h, y, etf = planted(C=5, p=10, n=60, sigma=1e-3, offset=1.0, seed=19)
    rng = np.random.default_rng(20)
    index = np.arange(0, len(y), 3)
    ref_rows = h[index] + 1e-4 * rng.standard_normal((len(index), h.shape[1]))  # stored = fp32 + rounding noise
    path = cache_path()
    write_cache(path, h, y, weight=etf, bias=np.zeros(5), reference=(index, ref_rows.astype(np.float32)))
    result = audit(path, AuditOptions(device="cpu"))
    ref = reference_metrics(h, y, etf, None, reference_rows=(index, ref_rows.astype(np.float32)))
    close(result.metrics["nc1_precision_floor"], ref["nc1_precision_floor"])
    assert result.metrics["nc1_precision_floor"] > 0
    # Without reference rows the floor is null.
    assert run(cache_path(), h, y, etf, np.zeros(5)).metrics["nc1_precision_floor"] is None


def test_no_classifier_gives_nulls_except_what_features_decide(cache_path):
    """Without a classifier, term (A) and ||W_LS|| still follow from the features and labels; everything that
    compares with W (term B, ls_*, NC3, accuracy, ...) is null."""
    h, y, _ = planted(C=4, p=6, n=30, sigma=0.1, seed=21)
    result = run(cache_path(), h, y)
    ref = reference_metrics(h, y)
    check_all(result, ref, with_classifier=False)
    close(result.metrics["mse_term_a"], ref["mse_term_a"])
    close(result.details["w_ls_norm"], ref["w_ls_norm"])
    for key in CLASSIFIER_KEYS:
        if key != "mse_term_a":
            assert result.metrics[key] is None, key


@pytest.mark.parametrize("sigma,offset", [(1e-2, 100.0), (1e-3, 10.0), (0.3, 0.0)])
def test_float32_collapsed_features_with_offset(cache_path, sigma, offset):
    """float32 caches take the float32-GEMM path (class-anchored rows); it must still match float64 to 1e-6."""
    h, y, etf = planted(C=12, p=24, n=40, sigma=sigma, offset=offset, seed=23)
    rng = np.random.default_rng(24)
    h32 = h.astype(np.float32)
    order = rng.permutation(len(y))
    h32, y = h32[order], y[order]
    W, b = noisy_classifier(etf, rng, scale=0.05)
    b = b - W @ np.full(24, offset)
    result = run(cache_path(), h32, y, W, b, batch_size=97)
    assert result.details["gemm_dtype"]["statistics"] == "float64"  # Sigma_T is needed in every direction
    assert result.details["gemm_dtype"]["decisions"] == "float32"
    check_all(result, reference_metrics(h32.astype(np.float64), y, W, b))


def test_decisions_near_ties_equal_float64(cache_path):
    """Samples on the decision boundaries: float32-scored rows near a tie are decided again in float64."""
    rng = np.random.default_rng(25)
    p, offset = 6, 100.0
    e = np.eye(p)[0]
    bulk_y = np.repeat([0, 1], 300)
    bulk = offset + np.where(bulk_y[:, None] == 0, e, -e) + 0.1 * rng.standard_normal((600, p))
    tie_y = rng.integers(0, 2, 400)
    ties = offset + rng.uniform(-2e-5, 2e-5, (400, 1)) * e + 0.3 * rng.standard_normal((400, p)) * (1 - e)
    h = np.vstack([bulk, ties]).astype(np.float32)
    y = np.concatenate([bulk_y, tie_y])
    mu = np.stack([h[y == c].astype(np.float64).mean(0) for c in range(2)])
    W = np.stack([e, -e]) + 1e-3 * rng.standard_normal((2, p))
    b = -W @ ((mu[0] + mu[1]) / 2)  # the classifier's boundary passes through the ties as well
    result = run(cache_path(), h, y, W, b)
    ref = reference_metrics(h.astype(np.float64), y, W, b)
    for key in ("ncc_accuracy", "accuracy", "nc4"):
        assert result.metrics[key] == ref[key], key
