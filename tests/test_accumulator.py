"""`AuditAccumulator`: the report's passes fed from a loop the caller owns — the closed forms after one pass, the full
report after the passes it asks for, exact merges, errors reported once per pass, and an update that never waits for
the device (checked on the CPU by watching every operation; on CUDA when there is one)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from reference import planted
from test_api import same_report
from torch.utils._python_dispatch import TorchDispatchMode

import ncaudit._device as device_module
from ncaudit import AuditAccumulator, audit_features
from ncaudit.errors import InputError

SAMPLE_LEVEL = ("nc4", "accuracy", "ncc_accuracy")


def _data(seed: int = 0, dtype: Any = np.float32) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    h, y, etf = planted(C=6, p=16, n=50, sigma=0.3, offset=4.0, seed=seed)
    rng = np.random.default_rng(seed + 1)
    order = rng.permutation(len(y))
    return h[order].astype(dtype), y[order], etf + 0.2 * rng.standard_normal(etf.shape), 0.1 * rng.standard_normal(6)


def _batches(h: np.ndarray, y: np.ndarray, size: int = 64):
    for i in range(0, len(y), size):
        yield torch.from_numpy(h[i:i + size]), torch.from_numpy(y[i:i + size])


def run_all_passes(acc: AuditAccumulator, h: np.ndarray, y: np.ndarray, size: int = 64) -> int:
    """The loop of the accumulator's docstring; the number of passes taken."""
    passes = 0
    while True:
        passes += 1
        for x, labels in _batches(h, y, size):
            acc.update(x, labels)
        if not acc.end_pass():
            return passes


def test_all_passes_give_the_report():
    h, y, w, b = _data()
    acc = AuditAccumulator(6, torch.from_numpy(w), torch.from_numpy(b))
    assert run_all_passes(acc, h, y) == 2 and acc.done
    got = acc.compute()
    ref = audit_features(h, y, w, b, batch_size=64)
    assert not same_report(ref, got), same_report(ref, got)
    assert got.source["source"] == "batches pushed to an AuditAccumulator"
    with pytest.raises(RuntimeError, match="every pass is done"):
        acc.update(torch.from_numpy(h[:4]), torch.from_numpy(y[:4]))
    acc.reset()
    assert acc.phase == "statistics" and run_all_passes(acc, h, y, size=100) == 2


def test_one_pass_gives_the_closed_forms_and_names_what_needs_another():
    """The statistics ride along one loop: every closed form (to 1e-10 of the full report), the sample-level metrics
    null and listed as pending."""
    h, y, w, b = _data(seed=3)
    acc = AuditAccumulator(6, w, b)
    for x, labels in _batches(h, y):
        acc.update(x, labels)
    partial = acc.compute()  # closes pass 1
    full = audit_features(h, y, w, b, batch_size=64)
    assert acc.phase == "decisions"
    assert partial.details["pending"] == {"pass": 2, "metrics": list(SAMPLE_LEVEL)}
    for key, value in full.metrics.items():
        if key in SAMPLE_LEVEL:
            assert partial.metrics[key] is None
        elif value is None:
            assert partial.metrics[key] is None, key
        else:
            assert partial.metrics[key] == pytest.approx(value, rel=1e-10), key
    assert all(row["accuracy"] is None and row["nc1"] is None for row in partial.per_class)
    assert not [w for w in partial.warnings if w.startswith("self-check")]
    headless = AuditAccumulator(6)
    for x, labels in _batches(h, y):
        headless.update(x, labels)
    assert headless.compute().details["pending"] == {"pass": 2, "metrics": ["ncc_accuracy"]}
    x, labels = next(_batches(h, y))
    acc.update(x, labels)
    with pytest.raises(RuntimeError, match="decisions pass is in progress"):
        acc.compute()


def test_refinement_passes_when_the_least_squares_error_asks():
    """Features whose within-class spectrum spans twelve decades: the accumulator asks for refinement passes as the
    report takes them, and gives the report's numbers."""
    from test_exact_ls import planted_decades

    h, y, w, b = planted_decades("top", 1.0, 1)
    acc = AuditAccumulator(10, w, b)
    passes = run_all_passes(acc, h, y, size=512)
    ref = audit_features(h, y, w, b, batch_size=512)
    assert passes == 2 + ref.details["least_squares"]["refinement_steps"] - 1 >= 3
    got = acc.compute()
    assert not same_report(ref, got), same_report(ref, got)


def test_merged_shards_equal_one_accumulator():
    h, y, w, b = _data(seed=5, dtype=np.float64)
    ood = np.random.default_rng(6).standard_normal((40, 16)) + 1.0
    one = AuditAccumulator(6, w, b)
    one.update_ood(ood)
    run_all_passes(one, h, y)
    halves = (slice(0, 130), slice(130, None))
    first = AuditAccumulator(6, w, b)
    second = first.spawn()
    second.update_ood(ood[:25])
    first.update_ood(ood[25:])
    while True:
        for acc, part in zip((first, second), halves):
            for x, labels in _batches(h[part], y[part]):
                acc.update(x, labels)
        first.merge(second)
        more = first.end_pass()
        if not more:
            break
        second = first.spawn()  # an empty shard of the next pass
        assert second.phase == first.phase and second.rows == 0
    a, b_ = one.compute(), first.compute()
    # (the rounding-error bound counts the products merged, and the Sigma_T cut-off may be that bound; the MSE check's
    # discrepancy is itself a rounding residual, compared below on its own scale)
    diff = [d for d in same_report(a, b_, rtol=1e-12)
            if not d.startswith(("/details/sigma_t_error_bound", "/details/sigma_t_cutoff",
                                 "/details/mse_check/relative_discrepancy"))]
    assert not diff, diff
    for r in (a, b_):
        assert r.details["mse_check"]["relative_discrepancy"] < 1e-13
    assert a.metrics["nc5"] is not None and a.metrics["nc5"] == pytest.approx(b_.metrics["nc5"], rel=1e-14)


def test_bad_batches_are_reported_once_per_pass_with_their_row():
    h, y, w, b = _data(seed=7)
    acc = AuditAccumulator(6, w, b)
    y_bad = y.copy()
    y_bad[77] = 9
    for x, labels in _batches(h, y_bad):
        acc.update(x, labels)  # no error yet: the check is on the device
    with pytest.raises(InputError, match=r"label 9 at row 77 is outside \[0, 6\)"):
        acc.end_pass()
    acc = AuditAccumulator(6, w, b)
    h_bad = h.copy()
    h_bad[130, 3] = np.inf
    for x, labels in _batches(h_bad, y):
        acc.update(x, labels)
    with pytest.raises(InputError, match="features row 130 holds NaN or Inf"):
        acc.end_pass()
    acc = AuditAccumulator(6, w, b)
    with pytest.raises(InputError, match="no batch was fed"):
        acc.end_pass()
    with pytest.raises(InputError, match="shape"):
        acc.update(torch.zeros(4, 16), torch.zeros(3, dtype=torch.int64))
    acc.update(torch.zeros(4, 16), torch.zeros(4, dtype=torch.int64))
    with pytest.raises(InputError, match="16"):
        acc.update(torch.zeros(4, 15), torch.zeros(4, dtype=torch.int64))


def test_a_second_pass_over_other_samples_is_refused():
    h, y, w, b = _data(seed=9)
    acc = AuditAccumulator(6, w, b)
    for x, labels in _batches(h, y):
        acc.update(x, labels)
    acc.end_pass()
    for x, labels in _batches(h[:-10], y[:-10]):
        acc.update(x, labels)
    with pytest.raises(InputError, match="every pass must iterate the same samples"):
        acc.end_pass()


# ---------------------------------------------------------------------------------------------------------------------
# No host synchronisation per batch
# ---------------------------------------------------------------------------------------------------------------------
#: aten operations that make the host wait for a CUDA device: a value read back (item, bool, int, float, equal), or
#: an output whose shape depends on the data (nonzero, masked_select, unique, bincount's size, boolean indexing).
SYNCING = {"aten::_local_scalar_dense", "aten::item", "aten::nonzero", "aten::argwhere", "aten::masked_select",
           "aten::unique", "aten::_unique", "aten::_unique2", "aten::unique_dim", "aten::unique_consecutive",
           "aten::bincount", "aten::histc", "aten::repeat_interleave", "aten::equal", "aten::is_nonzero",
           "aten::allclose"}
INDEXING = {"aten::index.Tensor", "aten::index", "aten::index_put_", "aten::index_put", "aten::_index_put_impl_"}


class SyncMonitor(TorchDispatchMode):
    """Records every operation that would synchronise with a CUDA device, and Python-level reads of tensor values."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []
        self._patched: list[tuple[str, Any]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        name = func._schema.name
        overload = f"{name}.{func._overloadname}"
        if name in SYNCING:
            self.calls.append(name)
        if name in INDEXING or overload in INDEXING:
            indices = args[1] if len(args) > 1 else ()
            if any(isinstance(t, torch.Tensor) and t.dtype == torch.bool for t in (indices or ()) if t is not None):
                self.calls.append(f"{name} with a boolean mask")
        return func(*args, **(kwargs or {}))

    def __enter__(self) -> SyncMonitor:
        for attr in ("tolist", "cpu"):
            original = getattr(torch.Tensor, attr)

            def wrapped(t: torch.Tensor, *a: Any, _attr: str = attr, _original: Any = original, **k: Any) -> Any:
                self.calls.append(f"Tensor.{_attr}")
                return _original(t, *a, **k)

            self._patched.append((attr, original))
            setattr(torch.Tensor, attr, wrapped)
        return super().__enter__()

    def __exit__(self, *exc: Any) -> None:
        for attr, original in self._patched:
            setattr(torch.Tensor, attr, original)
        super().__exit__(*exc)


def test_the_monitor_sees_synchronising_calls():
    """The check below can fail: reading a value, boolean indexing and nonzero are all seen."""
    t = torch.arange(6.0)
    with SyncMonitor() as monitor:
        _ = bool(t.sum() > 3)
        _ = t[t > 2]
        _ = t.nonzero()
        _ = t.tolist()
    assert {"aten::_local_scalar_dense", "aten::nonzero", "Tensor.tolist"} <= set(monitor.calls)
    assert any("boolean mask" in c for c in monitor.calls) or "aten::nonzero" in monitor.calls


def test_update_never_waits_for_the_device(monkeypatch):
    """Every update of every pass (statistics, decisions, refinement) with the device code path forced on the CPU:
    no operation that would synchronise a CUDA device. end_pass() reads the device once per pass, by design."""
    import ncaudit.audit._passes as passes

    monkeypatch.setattr(device_module, "HOST_NUMPY", False)  # the path CUDA takes
    monkeypatch.setattr(passes, "REFINE_ABOVE", 0.0)  # always ask for refinement: its passes are watched too
    monkeypatch.setattr(passes, "CONVERGED_BELOW", -1.0)
    h, y, w, b = _data(seed=11)
    acc = AuditAccumulator(6, w, b, float64_decisions=True)
    phases, seen = [], []
    while True:
        phases.append(acc.phase)
        with SyncMonitor() as monitor:
            for x, labels in _batches(h, y):
                acc.update(x, labels)
        seen += [(acc.phase, c) for c in monitor.calls]
        if not acc.end_pass():
            break
    with SyncMonitor() as monitor:
        acc.update_ood(torch.from_numpy(h[:40]))
    seen += [("ood", c) for c in monitor.calls]
    assert phases == ["statistics", "decisions", "refinement", "refinement"]
    assert not seen, seen
    ref = audit_features(h, y, w, b, batch_size=64, float64_decisions=True)
    got = acc.compute()
    for key, value in ref.metrics.items():
        if key in ("nc5",):
            continue
        assert (got.metrics[key] is None) == (value is None), key
        if value is not None and key not in ("mse_term_a", "mse_term_b", "ls_distance", "ls_cosine"):
            assert got.metrics[key] == pytest.approx(value, rel=1e-10), key


def test_the_float32_decision_path_would_wait(monkeypatch):
    """Why the live audit decides in float64 on CUDA: the float32 GEMM's close-call recheck gathers a data-dependent
    set of rows."""
    monkeypatch.setattr(device_module, "HOST_NUMPY", False)  # the path CUDA takes
    h, y, w, b = _data(seed=13)
    acc = AuditAccumulator(6, w, b, float64_decisions=False)
    for x, labels in _batches(h, y):
        acc.update(x, labels)
    acc.end_pass()
    with SyncMonitor() as monitor:
        x, labels = next(_batches(h, y))
        acc.update(x, labels)
    assert "aten::nonzero" in monitor.calls


def test_statistics_update_runs_on_shapes_alone():
    """On the meta device (shapes, no data) any data-dependent operation fails: pass 1 and its checks run there."""
    from ncaudit.audit._deferred import DeferredChecks
    from ncaudit.stats import ClassStatistics, FeatureMean

    for c, b in ((10, 64), (300, 64)):  # both ways of claiming first rows (C <= B, C > B)
        acc = ClassStatistics(c, 48, device="meta")
        checks = DeferredChecks(c, torch.device("meta"))
        mean = FeatureMean(48, device="meta")
        for start in range(0, 3 * b, b):
            x = torch.empty(b, 48, dtype=torch.float32, device="meta")
            labels = checks.labels(torch.empty(b, dtype=torch.int64, device="meta"), start)
            checks.features(x, start)
            acc.update(x, labels)
            mean.update(x)
        assert acc.scatter.shape == (48, 48) and acc.shift.device.type == "meta"


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_update_never_synchronises_and_matches_the_cpu():
    """With torch.cuda.set_sync_debug_mode("error") every synchronising call in an update raises."""
    h, y, w, b = _data(seed=17)
    acc = AuditAccumulator(6, w, b, device="cuda")
    dev = torch.device("cuda")
    batches = [(x.to(dev), labels.to(dev)) for x, labels in _batches(h, y)]
    torch.cuda.synchronize()
    while True:
        torch.cuda.set_sync_debug_mode("error")
        try:
            for x, labels in batches:
                acc.update(x, labels)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        if not acc.end_pass():
            break
    got = acc.compute()
    ref = audit_features(h, y, w, b, batch_size=64, float64_decisions=True)
    on_gpu = audit_features(torch.from_numpy(h).to(dev), torch.from_numpy(y).to(dev), torch.from_numpy(w).to(dev),
                            torch.from_numpy(b).to(dev), batch_size=64)
    assert got.details["device"].startswith("cuda") and on_gpu.details["device"].startswith("cuda")
    for key, value in ref.metrics.items():
        if value is not None:
            assert got.metrics[key] == pytest.approx(value, rel=1e-9), key
            assert on_gpu.metrics[key] == pytest.approx(value, rel=1e-9), key
