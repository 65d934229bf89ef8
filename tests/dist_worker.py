"""One rank of the 2-process gloo tests (tests/test_distributed.py runs it under ``torch.distributed.run``).

Every rank builds the same data, accumulates its contiguous slice, merges across ranks through
:mod:`ncaudit.distributed` and saves what it ends with to ``OUT/rank<r>.npz``; the test compares that with one process.
The data builders are shared with the test (imported from here), so both sides see the same rows.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from reference import planted

C, P, N, BATCH = 7, 9, 501, 64


def dataset(kind: str) -> tuple[np.ndarray, np.ndarray]:
    """``f64_sorted`` (dataset order: classes straddle the rank boundary), ``f64_shuffled``, ``f32_shuffled``."""
    counts = [60, 81, 70, 75, 69, 71, 75]  # N = 501 rows, imbalanced
    h, y, _ = planted(C=C, p=P, sigma=1e-4, offset=100.0, seed=40, counts=counts)
    if kind.endswith("shuffled"):
        order = np.random.default_rng(41).permutation(len(y))
        h, y = h[order], y[order]
    return (h.astype(np.float32) if kind.startswith("f32") else h), y


def classifier() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(42)
    _, _, etf = planted(C=C, p=P, seed=40)
    return etf + 0.3 * rng.standard_normal(etf.shape), 0.1 * rng.standard_normal(C)


def accumulate(h: np.ndarray, y: np.ndarray, rows: range):
    """ClassStatistics over ``rows`` in batches of BATCH from rows.start."""
    from ncaudit.stats import ClassStatistics, gemm_dtype_for

    acc = ClassStatistics(C, P, gemm_dtype=gemm_dtype_for(h.dtype))
    for i in range(rows.start, rows.stop, BATCH):
        j = min(i + BATCH, rows.stop)
        acc.update(torch.from_numpy(h[i:j]), torch.from_numpy(y[i:j]))
    return acc


def decide(stats, h: np.ndarray, y: np.ndarray, rows: range):
    """SampleDecisions over ``rows`` with the given (merged) statistics and the test classifier."""
    from ncaudit import metrics
    from ncaudit.stats import SampleDecisions, gemm_dtype_for

    w, b = classifier()
    basis = metrics.means_basis(stats.centred_means)
    dec = SampleDecisions(stats.means, stats.global_mean, w, b, basis.whitener, gemm_dtype=gemm_dtype_for(h.dtype),
                          anchors=stats.anchors)
    for i in range(rows.start, rows.stop, BATCH):
        j = min(i + BATCH, rows.stop)
        dec.update(torch.from_numpy(h[i:j]), torch.from_numpy(y[i:j]))
    return dec


def summary(stats, dec, geo) -> dict[str, np.ndarray]:
    d = dec.compute()
    return {
        "counts": stats.counts, "means": stats.means, "centred_means": stats.centred_means, "sigma_w": stats.sigma_w,
        "variances": stats.variances, "dec_counts": d.counts, "correct": d.correct, "ncc_correct": d.ncc_correct,
        "disagree": np.array(d.disagree), "squared_error": np.array(d.squared_error),
        "whitened_scatter": d.whitened_scatter,
        "pairs": np.array([geo.cdnv, geo.equiangle, geo.maxangle, geo.orthogonality]),
    }


def main(out: Path) -> None:
    from ncaudit import distributed as nd
    from ncaudit import metrics
    from ncaudit.stats import ClassStatistics

    with nd.process_group("cpu") as ctx:
        nd.barrier()
        (out / f"started.{ctx.rank}").write_text("ok")
        results: dict[str, np.ndarray] = {}
        for kind in ("f64_sorted", "f64_shuffled", "f32_shuffled"):
            h, y = dataset(kind)
            rows = ctx.rows(len(y))
            stats = nd.merge_states(accumulate(h, y, rows)).compute()
            geo = metrics.pair_geometry(stats.centred_means, variances=stats.variances, block_rows=3)
            dec = nd.merge_states(decide(stats, h, y, rows), everywhere=False)
            results.update({f"{kind}/{k}": v for k, v in summary(stats, dec, geo).items()})
        # everywhere=False: rank 0 holds the total, the others keep their own state.
        h, y = dataset("f64_shuffled")
        own = accumulate(h, y, ctx.rows(len(y)))
        local_count = own.count.sum().item()
        nd.merge_states(own, everywhere=False)
        results["own_count"] = np.array(own.count.sum().item())
        results["local_count"] = np.array(local_count)
        # Accumulators of different shapes on different ranks are refused on every rank (no hang).
        try:
            nd.merge_states(ClassStatistics(C, P + ctx.rank))
            results["mismatch_refused"] = np.array(False)
        except ValueError:
            results["mismatch_refused"] = np.array(True)
        # Global progress: rank 0 does 100 rows, rank 1 37, at different paces.
        seen: list[int] = []
        with nd.GlobalProgress(initial=5, interval=0.02, on_update=seen.append) as progress:
            steps = [10] * 10 if ctx.rank == 0 else [20, 17]
            for n in steps:
                progress.advance(n)
                time.sleep(0.03)
        results["progress_total"] = np.array(progress.total)
        results["progress_seen_monotonic"] = np.array(seen == sorted(seen) and seen[-1] == progress.total)
        results["all_equal_same"] = np.array(nd.all_equal([N, 3]))
        results["all_equal_differ"] = np.array(nd.all_equal([N, ctx.rank]))
        results["all_equal_lengths"] = np.array(nd.all_equal([1] * (ctx.rank + 1)))
        results["any_rank"] = np.array([nd.any_rank(ctx.rank == 1), nd.any_rank(False)])
        results["broadcast"] = np.array(nd.broadcast_ints([3, 1, 4] if ctx.rank == 0 else None))
        results["rank_rows"] = np.array([nd.rank_rows(N).start, nd.rank_rows(N).stop])
        meta = {"rank": nd.rank(), "world": nd.world_size(), "is_main": nd.is_main(), "backend": ctx.backend}
        np.savez(out / f"rank{ctx.rank}.npz", **results)
        (out / f"meta{ctx.rank}.json").write_text(json.dumps(meta))
        nd.barrier()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
