"""The report of a cache on the CPU runs on the host in NumPy without importing torch (tests/test_startup.py checks
the whole process), and gives what the torch accumulators give: HostStatistics against ClassStatistics, HostDecisions against SampleDecisions, the whole audit on
both paths, and the NumPy checks of labels and finiteness."""

import sys

import numpy as np
import pytest
import torch
from reference import planted

from ncaudit import _device
from ncaudit.audit import AuditOptions, audit_cache
from ncaudit.cache import write_cache
from ncaudit.errors import InputError
from ncaudit.stats import ClassStatistics, HostDecisions, HostStatistics, SampleDecisions


def _data(seed=0, c=5, p=24, n=40, dtype=np.float32, order="class"):
    rng = np.random.default_rng(seed)
    h, y, _ = planted(C=c, p=p, n=n, sigma=0.3, offset=50.0, seed=seed)
    h = h + 1e-3 * rng.standard_normal(h.shape) @ np.diag(np.logspace(0, -8, p))  # a decaying spectrum on top
    if order == "mixed":
        perm = rng.permutation(len(y))
        h, y = h[perm], y[perm]
    w = rng.standard_normal((c, p))
    b = rng.standard_normal(c)
    return h.astype(dtype), y.astype(np.int64), w, b


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("order", ["class", "mixed"])
@pytest.mark.parametrize("normalize", [False, True])
def test_host_statistics_equal_class_statistics(dtype, order, normalize):
    h, y, _, _ = _data(dtype=dtype, order=order)
    host = HostStatistics(5, h.shape[1], normalize=normalize)
    ref = ClassStatistics(5, h.shape[1], normalize=normalize)
    for a in range(0, len(y), 37):  # batches that straddle classes
        host.update(h[a:a + 37], y[a:a + 37])
        ref.update(torch.from_numpy(h[a:a + 37]), torch.from_numpy(y[a:a + 37]))
    got, want = host.compute(), ref.compute()
    np.testing.assert_array_equal(got.counts, want.counts)
    np.testing.assert_array_equal(got.anchors, want.anchors)
    for name in ("origin", "offsets", "sigma_w", "variances"):
        np.testing.assert_allclose(getattr(got, name), getattr(want, name), rtol=1e-12,
                                   atol=1e-14 * np.abs(getattr(want, name)).max())
    assert got.error_bound == pytest.approx(want.error_bound, rel=1e-12)
    assert got.gemm_dtype == want.gemm_dtype == "float64"


def test_host_statistics_refuse_bad_shapes_and_empty_state():
    acc = HostStatistics(3, 4)
    with pytest.raises(ValueError, match=r"shape \(B, 4\)"):
        acc.update(np.zeros((2, 5), np.float32), np.zeros(2, np.int64))
    with pytest.raises(ValueError, match="labels must have shape"):
        acc.update(np.zeros((2, 4), np.float32), np.zeros(3, np.int64))
    with pytest.raises(ValueError, match="no samples"):
        acc.compute()
    with pytest.raises(ValueError, match="gemm_dtype"):
        HostStatistics(3, 4, gemm_dtype="float16")


@pytest.mark.parametrize("dtype,gemm", [(np.float32, "float32"), (np.float64, "float64"), (np.float16, "float32")])
@pytest.mark.parametrize("order", ["class", "mixed"])
def test_host_decisions_equal_sample_decisions(dtype, gemm, order):
    h, y, w, b = _data(seed=1, dtype=dtype, order=order)
    stats = HostStatistics(5, h.shape[1])
    stats.update(h, y)
    s = stats.compute()
    from ncaudit import metrics

    white = metrics.means_basis(s.centred_means).whitener
    args = (s.means, s.global_mean, w, b, white)
    host = HostDecisions(*args, gemm_dtype=gemm, anchors=s.anchors)
    ref = SampleDecisions(*args, gemm_dtype=getattr(torch, gemm), anchors=s.anchors)
    assert host.gemm_dtype == gemm
    for a in range(0, len(y), 53):
        host.update(h[a:a + 53], y[a:a + 53])
        ref.update(torch.from_numpy(h[a:a + 53]), torch.from_numpy(y[a:a + 53]))
    got, want = host.compute(), ref.compute()
    for name in ("counts", "correct", "ncc_correct"):
        np.testing.assert_array_equal(getattr(got, name), getattr(want, name))
    assert got.disagree == want.disagree
    assert got.squared_error == pytest.approx(want.squared_error, rel=1e-12)
    np.testing.assert_allclose(got.whitened_scatter, want.whitened_scatter, rtol=1e-12)


def test_host_decisions_without_classifier():
    h, y, _, _ = _data(seed=2)
    stats = HostStatistics(5, h.shape[1])
    stats.update(h, y)
    s = stats.compute()
    dec = HostDecisions(s.means, s.global_mean, None, None, np.zeros((h.shape[1], 0)), gemm_dtype="float32",
                        anchors=s.anchors, per_class=False)
    dec.update(h, y)
    got = dec.compute()
    assert got.correct is None and got.disagree is None and got.squared_error is None
    h64 = h.astype(np.float64)  # the nearest class mean, written plainly in float64
    nearest = np.argmin(((h64[:, None, :] - s.means[None]) ** 2).sum(-1), axis=1)
    np.testing.assert_array_equal(got.ncc_correct, np.bincount(y, weights=nearest == y, minlength=5))


@pytest.fixture(scope="module")
def host_cache(tmp_path_factory):
    h, y, w, b = _data(seed=3, c=6, p=32, n=60, order="mixed")
    return write_cache(tmp_path_factory.mktemp("host") / "a.h5", h, y, weight=w, bias=b)


@pytest.mark.parametrize("options", [AuditOptions(), AuditOptions(normalize=True), AuditOptions(batch_size=50)])
def test_audit_on_the_host_equals_the_torch_path(host_cache, options, monkeypatch):
    host = audit_cache(host_cache, options)
    assert host.details["device"] == "cpu"
    import ncaudit.audit._audit as hub

    monkeypatch.setattr(hub, "resolve_host", lambda device: torch.device("cpu"))
    ref = audit_cache(host_cache, options)
    assert set(host.metrics) == set(ref.metrics)
    for key, want in ref.metrics.items():
        got = host.metrics[key]
        if want is None:
            assert got is None, key
        else:
            assert got == pytest.approx(want, rel=1e-9, abs=1e-13), key
    assert [r.get("accuracy") for r in host.per_class] == [r.get("accuracy") for r in ref.per_class]
    assert host.details["gemm_dtype"] == ref.details["gemm_dtype"]


def test_resolve_host():
    assert _device.resolve_host("cpu") is None
    if not torch.cuda.is_available():
        assert _device.resolve_host("auto") is None
        with pytest.raises(InputError, match="no CUDA device"):
            _device.resolve_host("cuda")
    with pytest.raises(InputError, match="--device 'tpu'"):
        _device.resolve_host("tpu")


def test_no_driver_means_no_cuda_without_importing_torch(monkeypatch):
    monkeypatch.setattr(_device, "_DRIVER_FILES", ("/nonexistent/nvidia",))
    monkeypatch.setattr(_device.glob, "glob", lambda pattern: [])
    monkeypatch.delitem(sys.modules, "torch")  # as in a fresh process (restored after the test)
    if not sys.platform.startswith("linux"):
        pytest.skip("the driver files are Linux's")
    assert _device.cuda_possible() is False
    assert "torch" not in sys.modules


def test_numpy_checks_of_labels_and_features():
    from ncaudit._validate import check_finite, check_labels

    check_labels(np.array([0, 2, 1]), 3, 0, "x.h5")
    with pytest.raises(InputError, match=r"label 3 at row 12 is outside \[0, 3\)"):
        check_labels(np.array([0, 3, 1]), 3, 11, "x.h5")
    h = np.zeros((4, 3), np.float32)
    check_finite(h, 0, "x.h5")
    h[2, 1] = np.nan
    with pytest.raises(InputError, match="row 7 holds NaN or Inf"):
        check_finite(h, 5, "x.h5")
    h[2, 1] = 0.0
    h[3, 0] = -3e16
    with pytest.raises(InputError, match=r"row 3 reaches 3e\+16.*float32 statistics"):
        check_finite(h, 0, "x.h5")
    # a CPU tensor takes the same NumPy checks
    with pytest.raises(InputError, match=r"row 3 reaches"):
        check_finite(torch.from_numpy(h), 0, "x.h5")


def test_audit_features_on_cpu_arrays_runs_on_the_host(monkeypatch):
    """NumPy arrays and CPU tensors take the host path (HostStatistics); float64 decisions the torch one; same
    metrics."""
    import ncaudit.audit._passes as passes
    from ncaudit import audit_features

    h, y, w, b = _data(seed=4, order="mixed")
    made = []

    class Counting(passes.HostStatistics):
        def __init__(self, *args, **kwargs):
            made.append(1)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(passes, "HostStatistics", Counting)
    host = audit_features(h, y, w, b)
    tensors = audit_features(torch.from_numpy(h), torch.from_numpy(y), w, b)
    assert len(made) == 2
    ref = audit_features(h, y, w, b, float64_decisions=True)  # the torch accumulators
    assert len(made) == 2
    for result in (host, tensors):
        assert result.details["device"] == "cpu"
        for key, want in ref.metrics.items():
            got = result.metrics[key]
            assert (got is None) if want is None else got == pytest.approx(want, rel=1e-9, abs=1e-13), key
    with pytest.raises(InputError, match="label 5 at row 3"):
        bad = y.copy()
        bad[3] = 5
        audit_features(h, bad, w, b)


@pytest.mark.parametrize("order", ["class", "mixed"])
def test_host_merges_equal_one_pass(order):
    """Two shards merged (a class only in the second shard, others in both with other shifts) = one pass over all."""
    h, y, w, b = _data(seed=5, order=order)
    one = HostStatistics(5, h.shape[1])
    one.update(h, y)
    cut = len(y) // 3
    first = HostStatistics(5, h.shape[1])
    keep = y[:cut] != 4  # class 4 is seen by the second shard only
    first.update(h[:cut][keep], y[:cut][keep])
    second = HostStatistics(5, h.shape[1])
    second.update(np.concatenate([h[:cut][~keep], h[cut:]]), np.concatenate([y[:cut][~keep], y[cut:]]))
    got, want = first.merge(second).compute(), one.compute()
    np.testing.assert_array_equal(got.counts, want.counts)
    for name in ("offsets", "sigma_w", "variances"):
        np.testing.assert_allclose(getattr(got, name), getattr(want, name), rtol=1e-10,
                                   atol=1e-12 * np.abs(getattr(want, name)).max())
    np.testing.assert_allclose(got.global_mean, want.global_mean, rtol=1e-14)
    with pytest.raises(ValueError, match="different shapes"):
        one.merge(HostStatistics(4, h.shape[1]))

    from ncaudit import metrics

    s = want
    args = (s.means, s.global_mean, w, b, metrics.means_basis(s.centred_means).whitener)
    whole, a, z = (HostDecisions(*args, gemm_dtype="float32", anchors=s.anchors) for _ in range(3))
    whole.update(h, y)
    a.update(h[:cut], y[:cut])
    z.update(h[cut:], y[cut:])
    got_d, want_d = a.merge(z).compute(), whole.compute()
    np.testing.assert_array_equal(got_d.correct, want_d.correct)
    np.testing.assert_array_equal(got_d.ncc_correct, want_d.ncc_correct)
    assert got_d.squared_error == pytest.approx(want_d.squared_error, rel=1e-12)
