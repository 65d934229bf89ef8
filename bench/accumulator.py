"""Benchmark: the streaming accumulator's ``update`` on the CPU against a bare float64 syrk of the same batches.

Usage::

    python bench/accumulator.py                              # the default shapes, 7 interleaved rounds
    python bench/accumulator.py --shapes 1024,2048,1000 --rounds 5 --json

For each (B, p, C) the same float32 batches (random rows; labels shuffled, and sorted by class as dataset order
gives them) are fed, round after round, to:

* ``bare``        the yardstick: each batch cast into a float64 buffer, ``X^T X`` through NumPy's BLAS (syrk, as
  ncaudit's product is) and added into a float64 p x p sum: the least any float64-accurate scatter must do;
* ``statistics``  :meth:`ncaudit.ClassStatistics.update` (the pass-1 accumulator of ``report``);
* ``accumulator`` :meth:`ncaudit.AuditAccumulator.update` in its first pass (the statistics plus the labels' and
  features' checks on the device): what a training loop pays per batch.

The contenders alternate within each round, so a slow patch of a shared machine hits all of them; the figure is the
ratio bare / contender per round (>= 1 means as fast as the bare syrk), reported as min / median / max over rounds.
Threads: torch's and NumPy's defaults (both use the cores available).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the CLI does

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ncaudit import AuditAccumulator, ClassStatistics  # noqa: E402

SHAPES = ("1024,512,100", "1024,2048,1000", "4096,2048,1000", "256,2048,1000")


def batches(b: int, p: int, c: int, n_batches: int, order: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    rng = np.random.default_rng(0)
    out = []
    for i in range(n_batches):
        x = torch.from_numpy((rng.standard_normal((b, p)) + 3.0).astype(np.float32))
        y = torch.from_numpy(rng.integers(0, c, b) if order == "shuffled" else np.full(b, i % c, dtype=np.int64))
        out.append((x, y))
    return out


def bare(data: list[tuple[torch.Tensor, torch.Tensor]], p: int) -> None:
    total = np.zeros((p, p))
    buf = np.empty((data[0][0].shape[0], p))
    gram = np.empty((p, p))
    for x, _ in data:
        rows = buf[:x.shape[0]]
        rows[...] = x.numpy()
        np.matmul(rows.T, rows, out=gram)
        total += gram


def statistics_update(data: list[tuple[torch.Tensor, torch.Tensor]], p: int, c: int) -> None:
    acc = ClassStatistics(c, p)
    for x, y in data:
        acc.update(x, y)


def accumulator_update(data: list[tuple[torch.Tensor, torch.Tensor]], p: int, c: int) -> None:
    acc = AuditAccumulator(c)
    for x, y in data:
        acc.update(x, y)


def run(shape: str, rounds: int, order: str) -> dict[str, object]:
    b, p, c = (int(v) for v in shape.split(","))
    n_batches = max(3, int(2e10 // (b * p * p)) + 1)  # about 20 GFLOP of products per contender
    data = batches(b, p, c, n_batches, order)
    contenders = {"bare": lambda: bare(data, p), "statistics": lambda: statistics_update(data, p, c),
                  "accumulator": lambda: accumulator_update(data, p, c)}
    for fn in contenders.values():  # warm-up: page faults, BLAS threads
        fn()
    seconds: dict[str, list[float]] = {k: [] for k in contenders}
    for _ in range(rounds):
        for name, fn in contenders.items():
            t0 = time.perf_counter()
            fn()
            seconds[name].append(time.perf_counter() - t0)
    ratios = {k: [bb / t for bb, t in zip(seconds["bare"], v)] for k, v in seconds.items() if k != "bare"}
    return {
        "shape": {"B": b, "p": p, "C": c, "batches": n_batches, "labels": order},
        "seconds": {k: [round(t, 4) for t in v] for k, v in seconds.items()},
        "ratio_bare_over": {k: {"min": min(v), "median": statistics.median(v), "max": max(v)}
                            for k, v in ratios.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), help="B,p,C triples")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    rows = []
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, load "
          f"{os.getloadavg()[0]:.1f}", file=sys.stderr)
    for shape in args.shapes:
        for order in ("shuffled", "sorted"):
            row = run(shape, args.rounds, order)
            rows.append(row)
            r = row["ratio_bare_over"]
            s = row["shape"]
            print(f"B={s['B']:5d} p={s['p']:5d} C={s['C']:5d} {order:8s}  bare {min(row['seconds']['bare']):.3f} s"
                  + "".join(f"  {k}: {r[k]['median']:.2f}x ({r[k]['min']:.2f}-{r[k]['max']:.2f})" for k in r),
                  flush=True)
    if args.json:
        print(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
