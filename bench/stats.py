"""Benchmark: ncaudit's one-pass class statistics vs a bare streamed X^T X (torch, float32), plus the report passes.

Usage::

    python bench/stats.py                      # the two shapes of the issue, in memory and on disk
    python bench/stats.py --shapes 100000,512,100 --repeat 3
    python bench/stats.py --device cuda

For each (N, p, C) it times, on the same data:

* ``xtx``    bare streamed X^T X in float32 (batches of ``--batch`` rows, accumulated in float64);
* ``stats``  ClassStatistics.update over the same batches (float32 GEMM on class-shifted rows, float64 state);
* ``disk``   both again, reading the batches from an HDF5 cache (FeatureCache.iter_batches vs plain h5py slices);
* ``pass2``  SampleDecisions (classifier + nearest-class-mean decisions, per-class NC1) over the same batches;
* peak RSS of a fresh process auditing the on-disk cache at N/4 and N rows (memory must not grow with N);
* ``report`` / ``report_4_layers``: the whole audit (both passes) of an on-disk cache, without and with four extra
  layers of width p under ``/layers`` (``--layers-n`` rows): the per-layer block should cost at most 4x one layer.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ncaudit import metrics  # noqa: E402
from ncaudit.stats import ClassStatistics, SampleDecisions  # noqa: E402
from ncaudit.store import FeatureCache  # noqa: E402


def timed(fn, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return best


def make_data(n: int, p: int, c: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Post-ReLU-like features: a class mean plus noise, sorted by class as dataset order often is."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, c, (n,), generator=g).sort().values
    means = torch.rand(c, p, generator=g) * 2
    x = torch.empty(n, p)
    step = 65536
    for i in range(0, n, step):
        x[i:i + step] = (means[y[i:i + step]] + 0.3 * torch.randn(min(step, n - i), p, generator=g)).relu_()
    return x.numpy(), y.numpy()


def bench_memory(x: np.ndarray, y: np.ndarray, c: int, batch: int, device: str, repeat: int) -> dict[str, float]:
    dev = torch.device(device)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)

    def xtx() -> None:
        s = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64, device=dev)
        for i in range(0, len(y), batch):
            b = xt[i:i + batch].to(dev)
            s += (b.T @ b).double()

    def stats() -> None:
        acc = ClassStatistics(c, x.shape[1], device=dev, gemm_dtype=torch.float32)
        for i in range(0, len(y), batch):
            acc.update(xt[i:i + batch], yt[i:i + batch])
        acc.compute()

    acc = ClassStatistics(c, x.shape[1], device=dev, gemm_dtype=torch.float32)
    for i in range(0, len(y), batch):
        acc.update(xt[i:i + batch], yt[i:i + batch])
    st = acc.compute()
    basis = metrics.means_basis(st.centred_means)
    w = st.centred_means + 0.01

    def pass2() -> None:
        dec = SampleDecisions(st.means, st.global_mean, w, np.zeros(c), basis.whitener, device=dev,
                              gemm_dtype=torch.float32, anchors=st.anchors)
        for i in range(0, len(y), batch):
            dec.update(xt[i:i + batch], yt[i:i + batch])
        dec.compute()

    def pass2_plain() -> None:  # the same decisions without the per-class block
        dec = SampleDecisions(st.means, st.global_mean, w, np.zeros(c), basis.whitener, device=dev,
                              gemm_dtype=torch.float32, per_class=False)
        for i in range(0, len(y), batch):
            dec.update(xt[i:i + batch], yt[i:i + batch])

    return {"xtx": timed(xtx, repeat), "stats": timed(stats, repeat), "pass2": timed(pass2, repeat),
            "pass2_without_per_class": timed(pass2_plain, repeat)}


def bench_disk(path: Path, c: int, batch: int, device: str, repeat: int) -> dict[str, float]:
    dev = torch.device(device)

    def xtx() -> None:
        with h5py.File(path, "r", locking=False) as f:
            ds = f["features"]
            s = torch.zeros(ds.shape[1], ds.shape[1], dtype=torch.float64, device=dev)
            for i in range(0, ds.shape[0], batch):
                b = torch.from_numpy(ds[i:i + batch]).to(dev)
                s += (b.T @ b).double()

    def stats() -> None:
        with FeatureCache(path) as cache:
            acc = ClassStatistics(c, cache.info.n_features, device=dev, gemm_dtype=torch.float32)
            for _, xb, yb, _ in cache.iter_batches(batch):
                acc.update(torch.from_numpy(xb), torch.from_numpy(yb))
            acc.compute()

    return {"disk_xtx": timed(xtx, repeat), "disk_stats": timed(stats, repeat)}


def write_h5(path: Path, x: np.ndarray, y: np.ndarray, c: int) -> None:
    with h5py.File(path, "w") as f:
        f.attrs["ncaudit_schema"] = 1
        f.attrs["num_classes"] = c
        f.attrs["complete"] = True
        f.attrs["n_written"] = len(y)
        f.create_dataset("features", data=x, chunks=(min(256, len(y)), x.shape[1]))
        f.create_dataset("labels", data=y.astype(np.int64), chunks=(min(256, len(y)),))


def bench_layers(n: int, p: int, c: int, device: str, repeat: int) -> dict[str, float]:
    """The full audit of a cache with and without four extra layers of width p."""
    from ncaudit.audit import AuditOptions, audit

    x, y = make_data(n, p, c, seed=1)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "layers.h5"
        write_h5(path, x, y, c)
        with h5py.File(path, "a") as f:
            for k in range(4):
                f.create_dataset(f"layers/block{k}/features", data=np.roll(x, k + 1, axis=1),
                                 chunks=(min(256, n), p))
        plain = timed(lambda: audit(path, AuditOptions(device=device)), repeat)
        layered = timed(lambda: audit(path, AuditOptions(device=device, layers=[])), repeat)
    return {"report": plain, "report_4_layers": layered, "layers_cost_per_layer": (layered - plain) / plain / 4}


def peak_rss_of_audit(path: Path, device: str) -> float:
    """Peak RSS (MiB) of a fresh process auditing ``path`` (statistics + decisions)."""
    code = (
        "import resource, sys; sys.path.insert(0, %r)\n"
        "from ncaudit.audit import audit, AuditOptions\n"
        "audit(%r, AuditOptions(device=%r))\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)\n"
    ) % (str(Path(__file__).resolve().parents[1]), str(path), device)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(out.stderr.strip().splitlines()[-1])
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="*", default=["400000,512,100", "100000,2048,1000"],
                    help="N,p,C triples")
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--no-disk", action="store_true")
    ap.add_argument("--json", action="store_true", help="print the results as JSON")
    ap.add_argument("--layers-n", type=int, default=100000, help="rows of the 4-layer audit (0: skip it)")
    args = ap.parse_args()
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, device {args.device}", file=sys.stderr)
    rows = []
    for shape in args.shapes:
        n, p, c = (int(v) for v in shape.split(","))
        x, y = make_data(n, p, c)
        row: dict[str, float | int] = {"N": n, "p": p, "C": c}
        row.update(bench_memory(x, y, c, args.batch, args.device, args.repeat))
        if not args.no_disk:
            with tempfile.TemporaryDirectory() as tmp:
                full, quarter = Path(tmp) / "full.h5", Path(tmp) / "quarter.h5"
                write_h5(full, x, y, c)
                row.update(bench_disk(full, c, args.batch, args.device, args.repeat))
                del x
                with h5py.File(full, "r") as f:
                    write_h5(quarter, f["features"][::4], f["labels"][::4], c)  # every class kept
                row["rss_mib_quarter_N"] = peak_rss_of_audit(quarter, args.device)
                row["rss_mib_N"] = peak_rss_of_audit(full, args.device)
        row["ratio_memory"] = row["stats"] / row["xtx"]
        if "disk_xtx" in row:
            row["ratio_disk"] = row["disk_stats"] / row["disk_xtx"]
        row["ratio_pass2_per_class"] = row["pass2"] / row["pass2_without_per_class"]
        if args.layers_n:
            row.update(bench_layers(min(args.layers_n, n), p, c, args.device, 1))
        rows.append(row)
        print(" ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()),
              file=sys.stderr)
    if args.json:
        print(json.dumps(rows, indent=2))
    print(f"peak RSS of this process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB",
          file=sys.stderr)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
    main()
