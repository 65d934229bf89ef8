"""The streaming statistics: exact merges, invariance to batching / order / sharding, and why centring matters."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from reference import planted, reference_metrics

from ncaudit.audit import AuditOptions, audit
from ncaudit.cache import join_shards, write_cache
from ncaudit.cache._shards import shard_path
from ncaudit.errors import InputError
from ncaudit.stats import ClassStatistics


def two_pass(h, y, C):
    means = np.stack([h[y == c].mean(0) for c in range(C)])
    d = h - means[y]
    return means, d.T @ d / len(y), np.array([np.mean(np.sum(d[y == c] ** 2, 1)) for c in range(C)])


def accumulate(h, y, C, batch, order=None, **kw):
    acc = ClassStatistics(C, h.shape[1], **kw)
    idx = np.arange(len(y)) if order is None else order
    for i in range(0, len(idx), batch):
        sl = idx[i:i + batch]
        acc.update(h[sl], y[sl])
    return acc


@pytest.fixture(scope="module")
def data():
    h, y, etf = planted(C=7, p=9, n=40, sigma=1e-4, offset=100.0, seed=30)
    return h, y, etf


@pytest.mark.parametrize("batch", [1, 7, 4096])
def test_batch_size_invariance(data, batch):
    h, y, _ = data
    means, sw, var = two_pass(h, y, 7)
    st = accumulate(h, y, 7, batch).compute()
    np.testing.assert_allclose(st.means, means, rtol=0, atol=1e-12)
    np.testing.assert_allclose(st.sigma_w, sw, rtol=0, atol=1e-9 * np.abs(sw).max())
    np.testing.assert_allclose(st.variances, var, rtol=1e-9)


def test_order_and_shards(data):
    h, y, _ = data
    base = accumulate(h, y, 7, 64).compute()
    rng = np.random.default_rng(31)
    shuffled = accumulate(h, y, 7, 64, order=rng.permutation(len(y))).compute()
    parts = np.array_split(rng.permutation(len(y)), 3)
    merged = accumulate(h, y, 7, 50, order=parts[0])
    for part in parts[1:]:
        merged.merge(accumulate(h, y, 7, 33, order=part))
    merged = merged.compute()
    for other in (shuffled, merged):
        np.testing.assert_array_equal(other.counts, base.counts)
        np.testing.assert_allclose(other.means, base.means, rtol=0, atol=1e-12)
        np.testing.assert_allclose(other.centred_means, base.centred_means, rtol=0, atol=1e-13)
        np.testing.assert_allclose(other.sigma_w, base.sigma_w, rtol=0, atol=1e-9 * np.abs(base.sigma_w).max())
        np.testing.assert_allclose(other.variances, base.variances, rtol=1e-9)


def test_merge_with_classes_missing_from_a_shard(data):
    h, y, _ = data
    a = accumulate(h[y < 3], y[y < 3], 7, 16)
    b = accumulate(h[y >= 3], y[y >= 3], 7, 16)
    merged = a.merge(b).compute()
    means, sw, _ = two_pass(h, y, 7)
    np.testing.assert_allclose(merged.means, means, rtol=0, atol=1e-12)
    np.testing.assert_allclose(merged.sigma_w, sw, rtol=0, atol=1e-9 * np.abs(sw).max())


def test_sorted_by_class_batches(data):
    """Caches in dataset order often hold one class per batch: the scheme must not care."""
    h, y, _ = data
    order = np.argsort(y, kind="stable")
    st = accumulate(h, y, 7, 40, order=order).compute()
    means, sw, _ = two_pass(h, y, 7)
    np.testing.assert_allclose(st.sigma_w, sw, rtol=0, atol=1e-9 * np.abs(sw).max())


def test_float32_gemm_on_centred_rows(data):
    h, y, _ = data
    h32 = h.astype(np.float32)
    means, sw, _ = two_pass(h32.astype(np.float64), y, 7)
    st = accumulate(h32, y, 7, 100, gemm_dtype=torch.float32).compute()
    # float32 features with a +100 offset and sigma = 1e-4: relative error of Sigma_W stays ~1e-6.
    assert np.abs(st.sigma_w - sw).max() < 1e-5 * np.abs(np.diag(sw)).max()


def test_naive_raw_moments_fail_where_centring_does_not(data):
    """E[h h^T] - mu mu^T in float32 loses every digit of Sigma_W under a +100 offset; the shifted scheme keeps them."""
    h, y, _ = data
    C = 7
    h = h.astype(np.float32)  # the features as a network stores them; the float64 reference runs on these values
    means, sw, _ = two_pass(h.astype(np.float64), y, C)
    x = torch.tensor(h, dtype=torch.float32)
    second = torch.zeros(h.shape[1], h.shape[1])
    for c in range(C):  # the raw-moment formula, per class, in float32
        xc = x[torch.tensor(y == c)]
        mu = xc.mean(0)
        second += xc.T @ xc - len(xc) * torch.outer(mu, mu)
    naive = second.double().numpy() / len(y)
    naive_err = np.abs(naive - sw).max() / np.abs(np.diag(sw)).max()
    ours = accumulate(h, y, C, 64, gemm_dtype=torch.float32).compute()
    ours_err = np.abs(ours.sigma_w - sw).max() / np.abs(np.diag(sw)).max()
    assert naive_err > 1.0  # more error than signal
    assert ours_err < 1e-5


def test_report_invariant_to_batch_size_and_shards(tmp_path):
    h, y, etf = planted(C=5, p=8, n=60, sigma=1e-3, offset=100.0, seed=32)
    rng = np.random.default_rng(33)
    order = rng.permutation(len(y))
    h, y = h[order], y[order]
    W, b = etf + 0.2 * rng.standard_normal(etf.shape), rng.standard_normal(5)
    whole = write_cache(tmp_path / "whole.h5", h, y, weight=W, bias=b)
    shards = []  # the row-named shards beside the joined file, as a distributed extract writes them
    for part in np.array_split(np.arange(len(y)), 3):
        shards.append(write_cache(shard_path(tmp_path / "joined.h5", part[0], part[-1] + 1), h[part], y[part],
                                  weight=W, bias=b))
    joined = join_shards(tmp_path / "joined.h5", shards)
    ref = reference_metrics(h, y, W, b)
    results = [audit(whole, AuditOptions(batch_size=bs, device="cpu")) for bs in (1, 7, 4096)]
    results.append(audit(joined, AuditOptions(batch_size=13, device="cpu")))
    for res in results:
        assert res.n_samples == len(y)
        for key in ("nc1", "cdnv", "nc3", "nc4", "accuracy", "ncc_accuracy", "mse_term_a", "mse_term_b"):
            assert res.metrics[key] == pytest.approx(ref[key], rel=1e-6, abs=1e-13), key


def test_joined_cache_resolves_shards_from_another_directory(tmp_path, monkeypatch):
    h, y, etf = planted(C=3, p=4, n=10, seed=34)
    (tmp_path / "d").mkdir()
    shards = [write_cache(tmp_path / "d" / f"s{i}.h5", h[i::2], y[i::2], weight=etf) for i in range(2)]
    joined = join_shards(tmp_path / "d" / "all.h5", shards)
    monkeypatch.chdir(tmp_path)  # the reader's working directory is not the files' directory
    with pytest.raises(InputError, match="s0.h5.*--allow-external"):  # not the row-named shards of extract
        audit(joined, AuditOptions(device="cpu"))
    result = audit(joined, AuditOptions(device="cpu", allow_external=True))
    assert result.n_samples == len(y)
    assert result.source["files"] == [str(joined), *(str(s) for s in shards)]


def test_normalize_equals_reference_on_normalized_features(cache_path):
    h, y, etf = planted(C=5, p=8, n=50, sigma=0.05, offset=0.5, seed=35)
    rng = np.random.default_rng(36)
    W = etf + 0.1 * rng.standard_normal(etf.shape)
    path = write_cache(cache_path(), h, y, weight=W, bias=rng.standard_normal(5))
    result = audit(path, AuditOptions(device="cpu", normalize=True))
    hn = h / np.linalg.norm(h, axis=1, keepdims=True)
    Wn = W / np.linalg.norm(W, axis=1, keepdims=True)
    ref = reference_metrics(hn, y, Wn, np.zeros(5))
    for key in ("nc1", "cdnv", "nc2_equinorm_means", "nc2_equinorm_classifier", "nc3", "nc4", "accuracy",
                "mse_term_a", "mse_term_b", "ls_cosine"):
        assert result.metrics[key] == pytest.approx(ref[key], rel=1e-6, abs=1e-13), key
    assert result.details["normalized"] is True
    scaled = write_cache(cache_path(), h * rng.uniform(0.1, 10.0, size=(len(y), 1)), y, weight=W * 3.0,
                         bias=np.zeros(5))
    again = audit(scaled, AuditOptions(device="cpu", normalize=True))
    for key in ("nc1", "nc3", "nc4", "mse_term_b"):
        assert again.metrics[key] == pytest.approx(result.metrics[key], rel=1e-9, abs=1e-14), key


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu(tmp_path):
    h, y, etf = planted(C=6, p=16, n=100, sigma=1e-4, offset=100.0, seed=37)
    path = write_cache(tmp_path / "c.h5", h.astype(np.float32), y, weight=etf, bias=np.zeros(6))
    cpu = audit(path, AuditOptions(device="cpu"))
    gpu = audit(path, AuditOptions(device="cuda"))
    for key, value in cpu.metrics.items():
        if value is not None:
            assert gpu.metrics[key] == pytest.approx(value, rel=1e-5, abs=1e-12), key


def test_float32_decisions_recheck_near_ties():
    """Margins far below float32 resolution: the rows are re-decided in float64 and agree with a float64 pass."""
    from ncaudit.stats import SampleDecisions

    rng = np.random.default_rng(38)
    p = 3
    means = np.array([[1.0, 0.0, 0.0], [-1.0, 0.0, 0.0]])
    t = rng.choice([-1.0, 1.0], 500) * 2.0 ** rng.integers(-34, -26, 500)  # exact in float32, tiny
    h = np.stack([t, rng.uniform(-1, 1, 500), rng.uniform(-1, 1, 500)], axis=1).astype(np.float32)
    y = rng.integers(0, 2, 500)
    anchors = np.array([[1.0, 0.7, -0.2], [-1.0, -0.4, 0.9]])
    W, b = means.copy(), np.zeros(2)
    white = np.array([[0.5], [0.0], [0.0]])
    exact = SampleDecisions(means, np.zeros(p), W, b, white, gemm_dtype=torch.float64)
    fast = SampleDecisions(means, np.zeros(p), W, b, white, gemm_dtype=torch.float32, anchors=anchors)
    for acc in (exact, fast):
        acc.update(torch.from_numpy(h), torch.from_numpy(y))
    e, f = exact.compute(), fast.compute()
    np.testing.assert_array_equal(f.ncc_correct, e.ncc_correct)
    np.testing.assert_array_equal(f.correct, e.correct)
    assert f.disagree == e.disagree == 0
    np.testing.assert_array_equal(e.ncc_correct, [np.sum((y == 0) & (t > 0)), np.sum((y == 1) & (t < 0))])


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_one_hot_and_index_put_paths_agree(dtype):
    """Sorted batches (few classes: sums from one-hot GEMM columns) and shuffled ones (index_put_) agree."""
    h, y, _ = planted(C=5, p=64, n=90, sigma=1e-3, offset=50.0, seed=39)
    h = h.astype(dtype)
    gemm = torch.float64 if dtype == np.float64 else torch.float32
    sorted_acc = accumulate(h, y, 5, 50, order=np.argsort(y, kind="stable"), gemm_dtype=gemm).compute()
    shuffled = accumulate(h, y, 5, 50, order=np.random.default_rng(40).permutation(len(y)), gemm_dtype=gemm).compute()
    means, sw, var = two_pass(h.astype(np.float64), y, 5)
    for st in (sorted_acc, shuffled):
        np.testing.assert_array_equal(st.counts, [90] * 5)
        np.testing.assert_allclose(st.centred_means, means - means.mean(0), rtol=0, atol=1e-12 if gemm == torch.float64
                                   else 1e-6)
        tol = 1e-10 if gemm == torch.float64 else 1e-6
        assert np.abs(st.sigma_w - sw).max() < tol * np.abs(np.diag(sw)).max()
        np.testing.assert_allclose(st.variances, var, rtol=tol)


def test_state_dict_round_trip_merges_like_the_original():
    rng = np.random.default_rng(11)
    h = rng.standard_normal((300, 6)) + 5.0
    y = rng.integers(0, 4, 300)
    a, b = ClassStatistics(4, 6), ClassStatistics(4, 6)
    a.update(h[:120], y[:120])
    b.update(h[120:], y[120:])
    moved = ClassStatistics(4, 6).load_state_dict(b.state_dict())
    one = ClassStatistics(4, 6)
    one.update(h, y)
    merged = a.merge(moved).compute()
    ref = one.compute()
    np.testing.assert_allclose(merged.sigma_w, ref.sigma_w, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(merged.means, ref.means, rtol=1e-12)
    with pytest.raises(ValueError):
        ClassStatistics(5, 6).load_state_dict(b.state_dict())


def test_large_class_counts_take_the_memory_bounded_path():
    """Beyond the memory budget, per-label constants are formed per batch and rows go in chunks: same decisions and
    sums as the tabulated path (what makes C = 21,843 fit; no C x C table)."""
    from ncaudit import metrics
    from ncaudit.stats import SampleDecisions

    rng = np.random.default_rng(71)
    c, p = 300, 16
    y = rng.integers(0, c, 3000)
    h = (rng.standard_normal((c, p)) * 3)[y] + rng.standard_normal((3000, p))
    h = h.astype(np.float32)
    acc = ClassStatistics(c, p)
    acc.update(h, y)
    st = acc.compute()
    w, b = rng.standard_normal((c, p)), rng.standard_normal(c)
    white = metrics.means_basis(st.centred_means).whitener
    kw = dict(gemm_dtype=torch.float32, anchors=st.anchors)
    table = SampleDecisions(st.means, st.global_mean, w, b, white, **kw)
    small = SampleDecisions(st.means, st.global_mean, w, b, white, memory_budget=1 << 16, **kw)
    assert table._label_table is not None and small._label_table is None and small._chunk < 3000
    for dec in (table, small):
        for start in range(0, 3000, 1024):
            dec.update(h[start:start + 1024], y[start:start + 1024])
    a, z = table.compute(), small.compute()
    np.testing.assert_array_equal(a.correct, z.correct)
    np.testing.assert_array_equal(a.ncc_correct, z.ncc_correct)
    assert a.disagree == z.disagree
    np.testing.assert_allclose(a.whitened_scatter, z.whitened_scatter, rtol=1e-12)
    assert z.squared_error == pytest.approx(a.squared_error, rel=1e-9)
