"""Exact least-squares geometry on real feature spectra: terms A and B, ls_distance, ls_cosine and ||W_LS|| against an
SVD solve on the samples (tests/reference.py), on the bundled network's features, on random-init timm networks with
BatchNorm and LayerNorm heads, and on planted features whose within-class spectrum decays over twelve decades."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from extract_fixtures import timm_model
from reference import reference_metrics, simplex_etf

from ncaudit import metrics
from ncaudit.audit import AuditOptions, audit
from ncaudit.cache import FeatureCache, write_cache
from ncaudit.stats import ClassStatistics

RTOL = 1e-6
LS_KEYS = ("mse_term_a", "mse_term_b", "ls_distance", "ls_cosine")


def read_cache(path):
    with FeatureCache(path) as cache:
        x = np.concatenate([b[1] for b in cache.iter_batches(1 << 16)])
        y = np.concatenate([b[2] for b in cache.iter_batches(1 << 16)])
        w, b = cache.classifier()
    return x, y, w, b


def assert_least_squares_exact(result, h, y, w, b, rtol=RTOL):
    ref = reference_metrics(h.astype(np.float64), y, w, b)
    for key in LS_KEYS + ("mse_loss",):
        assert result.metrics[key] == pytest.approx(ref[key], rel=rtol), key
    assert result.details["w_ls_norm"] == pytest.approx(np.linalg.norm(ref["w_ls"]), rel=rtol)
    assert result.details["mse_check"]["relative_discrepancy"] < 1e-6
    assert not [w for w in result.warnings if w.startswith("self-check")], result.warnings
    ls = result.details["least_squares"]
    assert result.details["sigma_t_cutoff"] >= result.details["sigma_t_error_bound"]
    # Per class uses the same float64 machinery (no float32-resolved small directions there either).
    np.testing.assert_allclose([row["nc1"] for row in result.per_class], ref["per_class"]["nc1"], rtol=rtol)
    assert result.metrics["nc1"] == pytest.approx(ref["nc1"], rel=rtol)
    return ref, ls


@pytest.fixture(scope="module")
def digits_extract(tmp_path_factory):
    """extract on the bundled digits (train split), as a factory; the bundled checkpoints record their own
    preprocessing, other weights get the fixtures' (32 px, mean 0.5, std 0.25)."""
    from ncaudit._demo import default_fixtures, load_manifest
    from ncaudit.data import TransformOverrides
    from ncaudit.extract import extract

    fixtures = default_fixtures()
    t = load_manifest(fixtures)["transform"]
    fixture_transform = TransformOverrides(img_size=t["img_size"], mean=t["mean"], std=t["std"],
                                           crop_pct=t["crop_pct"], interpolation=t["interpolation"])
    out = tmp_path_factory.mktemp("exact_ls")

    def run(model, checkpoint, name, recorded=True, **kw):
        path = out / f"{name}.h5"
        extract(model, checkpoint, fixtures / "digits", path, split="train", device="cpu", precision="fp32",
                workers=0, progress=False, transform=None if recorded else fixture_transform, overwrite=True, **kw)
        return path

    return fixtures, out, run


@pytest.mark.parametrize("epoch", [0, 1, 5, 50, 200])
def test_bundled_network_every_epoch(digits_extract, epoch):
    fixtures, _, run = digits_extract
    path = run("test_resnet", fixtures / "checkpoints" / f"test_resnet_digits_e{epoch:03d}.safetensors", f"e{epoch}")
    h, y, w, b = read_cache(path)
    result = audit(path, AuditOptions(device="cpu"))
    assert_least_squares_exact(result, h, y, w, b)


@pytest.mark.parametrize("arch", ["resnet18", "convnext_atto"])  # BatchNorm features; a LayerNorm head
def test_random_init_timm_networks(digits_extract, arch):
    """Random-init features have spectra spanning 10+ decades (LayerNorm even an exact null direction)."""
    _, out, run = digits_extract
    checkpoint = out / f"{arch}.pth"
    torch.save(timm_model(arch, num_classes=10).state_dict(), checkpoint)
    path = run(arch, checkpoint, arch, recorded=False)
    h, y, w, b = read_cache(path)
    result = audit(path, AuditOptions(device="cpu"))
    assert_least_squares_exact(result, h, y, w, b)
    sigma = np.linalg.eigvalsh(np.cov(h.astype(np.float64).T))
    assert sigma[0] < 1e-10 * sigma[-1]  # the case the float32 scheme got wrong: a spectrum over ten decades


def assert_without_classifier(path, h, y, tmp, rtol=RTOL):
    """The same features without their classifier: term (A) and ||W_LS|| unchanged and exact; term (B) and ls_*
    null (they compare W with W_LS)."""
    bare = write_cache(tmp, h, y, num_classes=int(y.max()) + 1)
    result = audit(bare, AuditOptions(device="cpu", batch_size=512))
    ref = reference_metrics(h.astype(np.float64), y)
    assert result.metrics["mse_term_a"] == pytest.approx(ref["mse_term_a"], rel=rtol)
    assert result.details["w_ls_norm"] == pytest.approx(ref["w_ls_norm"], rel=rtol)
    assert all(result.metrics[k] is None for k in ("mse_loss", "mse_term_b", "ls_distance", "ls_cosine"))
    full = audit(path, AuditOptions(device="cpu", batch_size=512))
    assert result.metrics["mse_term_a"] == pytest.approx(full.metrics["mse_term_a"], rel=rtol)
    return result


def test_least_squares_without_a_classifier_on_real_features(digits_extract, cache_path):
    fixtures, _, run = digits_extract
    path = run("test_resnet", fixtures / "checkpoints" / "test_resnet_digits_e200.safetensors", "e200_bare")
    h, y, _, _ = read_cache(path)
    assert_without_classifier(path, h, y, cache_path())


def planted_decades(placement, radius, seed, decades=12, p=128, C=10, n=200):
    """Class means on a simplex ETF (random directions, or the top eigen-directions of Sigma_W) plus within-class
    noise whose covariance has eigenvalues from 1 down to 10^-decades, stored as float32 with a common offset."""
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((p, p)))
    lam = np.logspace(0, -decades, p)
    etf = simplex_etf(C, p, radius, rng if placement == "random" else None)
    if placement == "top":
        etf = etf @ q.T
    y = np.repeat(np.arange(C), n)
    h = (etf[y] + (rng.standard_normal((len(y), p)) * np.sqrt(lam)) @ q.T + 3.0).astype(np.float32)
    w = etf / radius**2 + 0.1 / radius * rng.standard_normal(etf.shape)
    return h, y, w, 0.01 * rng.standard_normal(C)


@pytest.mark.parametrize("placement,radius,seed", [("random", 1.0, 0), ("random", 0.1, 1), ("top", 1.0, 1),
                                                   ("top", 0.1, 0)])
def test_planted_twelve_decades(cache_path, placement, radius, seed):
    """Sigma_W from 1 down to 1e-12: a float64 scatter resolves the smallest eigenvalues to a few digits only, so
    W_LS is refined on the samples (the closed form alone is off by up to ~1e-3 here)."""
    h, y, w, b = planted_decades(placement, radius, seed)
    path = write_cache(cache_path(), h, y, weight=w, bias=b)
    result = audit(path, AuditOptions(device="cpu", batch_size=512))
    _, ls = assert_least_squares_exact(result, h, y, w, b)
    assert ls["refinement_steps"] >= 1 and ls["error_estimate"] > 1e-7
    assert result.details["gemm_dtype"]["refinement"] == "float64"


def test_least_squares_without_a_classifier_on_twelve_decades(cache_path):
    """The refinement of W_LS on the samples works without a classifier too."""
    h, y, w, b = planted_decades("random", 0.1, 1)
    path = write_cache(cache_path(), h, y, weight=w, bias=b)
    result = assert_without_classifier(path, h, y, cache_path())
    assert result.details["least_squares"]["refinement_steps"] >= 1


def test_closed_form_alone_misses_the_planted_decades(cache_path, monkeypatch):
    """Without refinement the same case is wrong beyond 1e-6: the refinement is what makes it exact."""
    import ncaudit.audit._passes as audit_module

    h, y, w, b = planted_decades("top", 1.0, 1)
    path = write_cache(cache_path(), h, y, weight=w, bias=b)
    monkeypatch.setattr(audit_module, "REFINE_ABOVE", float("inf"))
    result = audit(path, AuditOptions(device="cpu"))
    ref = reference_metrics(h.astype(np.float64), y, w, b)
    worst = max(abs(result.metrics[k] - ref[k]) / abs(ref[k]) for k in LS_KEYS)
    assert worst > 1e-6
    assert result.details["least_squares"]["refinement_steps"] == 0


def test_float32_scatter_gets_an_honest_rank():
    """A float32 accumulation resolves Sigma_W to ~1e-7 of its largest eigenvalue: its error bound says so, and the
    pseudo-inverse cuts everything below it instead of inverting rounding noise."""
    h, y, _, _ = planted_decades("random", 1.0, 0)
    ranks = {}
    for dtype in (torch.float64, torch.float32):
        acc = ClassStatistics(10, 128, gemm_dtype=dtype)
        acc.update(h, y)
        stats = acc.compute()
        ls = metrics.least_squares(stats)
        assert ls.cutoff >= stats.error_bound
        ranks[dtype] = ls.rank
        assert stats.gemm_dtype == str(dtype).replace("torch.", "")
    assert ranks[torch.float64] == 128
    assert ranks[torch.float32] < 100  # everything under ~1e-6 of the largest eigenvalue is unresolved in float32


@pytest.mark.parametrize("ridge", [1e-6, 1e-2])
def test_ridge_on_twelve_decades(cache_path, ridge):
    h, y, w, b = planted_decades("random", 1.0, 2)
    path = write_cache(cache_path(), h, y, weight=w, bias=b)
    result = audit(path, AuditOptions(device="cpu", ridge=ridge))
    ref = reference_metrics(h.astype(np.float64), y, w, b, ridge=ridge)
    for key in LS_KEYS:
        assert result.metrics[key] == pytest.approx(ref[key], rel=RTOL), key


def test_error_estimate_tracks_the_actual_error():
    """The first-order estimate that decides refinement is within a small factor of the actual error."""
    h, y, w, b = planted_decades("top", 1.0, 1)
    acc = ClassStatistics(10, 128)
    acc.update(h, y)
    stats = acc.compute()
    ls = metrics.least_squares(stats)
    estimate = metrics.ls_error_estimate(stats, w, ls, metrics.ls_loss(stats, ls), metrics.mse_term_b(stats, w, b, ls))
    ref = reference_metrics(h.astype(np.float64), y, w, b)
    actual = abs(np.linalg.norm(ls.weight) - np.linalg.norm(ref["w_ls"])) / np.linalg.norm(ref["w_ls"])
    assert actual < 10 * estimate
    assert estimate > 1e-7  # and it asks for refinement here


def test_layers_of_the_bundled_network(digits_extract):
    """report --layers: every layer's NC1 / NCC accuracy from the same float64 statistics, against the reference."""
    fixtures, _, run = digits_extract
    path = run("test_resnet", fixtures / "checkpoints" / "test_resnet_digits_e200.safetensors", "layers",
               layers="layer1,layer2,layer3")
    result = audit(path, AuditOptions(device="cpu", layers=[]))
    with FeatureCache(path) as cache:
        batches = list(cache.iter_batches(1 << 16, layers=list(cache.info.layers)))
    y = np.concatenate([b[2] for b in batches])
    for name, block in result.layers.items():
        h = np.concatenate([b[3][name] for b in batches]).astype(np.float64)
        ref = reference_metrics(h, y)
        assert block["nc1"] == pytest.approx(ref["nc1"], rel=RTOL), name
        assert block["ncc_accuracy"] == pytest.approx(ref["ncc_accuracy"], abs=1e-12), name
