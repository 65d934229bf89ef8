"""The float32 peer's NC1 on an ncaudit cache, as a user of that library runs it (a contender of ``bench/stats.py``).

Usage::

    python bench/peer_nc1.py CACHE [--batch 4096] [--peer DIR]

rhubarbwu/neural-collapse (``../shared/peers/neural-collapse``, MIT; see ``../shared/peers/README.md``) is imported
from ``--peer``, never from ncaudit. Two streaming passes over ``/features`` read through h5py in batches of
``--batch`` rows, with the peer's own accumulators (float32, on the CPU): ``MeanAccumulator`` (class means and the
global mean), then ``CovarAccumulator`` with those means (the within-class covariance, float32 X^T X of h - mu_y);
NC1 = ``measure.covariance_ratio`` (Tr(Sigma_W Sigma_B^+) / C, ``metric="pinv"``). Prints one JSON line: the NC1
value and the seconds of each pass.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: ``shared/peers/neural-collapse`` beside the project root (or beside a folder above it: git worktrees).
_CANDIDATES = [d / "shared" / "peers" / "neural-collapse" for d in ROOT.parents]
PEER = next((d for d in _CANDIDATES if d.is_dir()), _CANDIDATES[0])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("cache", type=Path)
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--peer", type=Path, default=PEER, help="the peer's source tree (with neural_collapse/)")
    args = ap.parse_args()
    t0 = time.perf_counter()
    sys.path.insert(0, str(args.peer))
    import h5py
    import torch
    from neural_collapse.accumulate import CovarAccumulator, MeanAccumulator
    from neural_collapse.measure import covariance_ratio

    t_import = time.perf_counter() - t0
    with h5py.File(args.cache, "r", locking=False) as f:
        features, labels = f["features"], f["labels"]
        n, p = features.shape
        k = int(f.attrs["num_classes"])
        t = time.perf_counter()
        means_acc = MeanAccumulator(k, p, "cpu")
        for i in range(0, n, args.batch):
            means_acc.accumulate(torch.from_numpy(features[i:i + args.batch]),
                                 torch.from_numpy(labels[i:i + args.batch]).long())
        means, global_mean = means_acc.compute()
        t_means = time.perf_counter() - t
        t = time.perf_counter()
        covar_acc = CovarAccumulator(k, p, "cpu", M=means)
        for i in range(0, n, args.batch):
            covar_acc.accumulate(torch.from_numpy(features[i:i + args.batch]),
                                 torch.from_numpy(labels[i:i + args.batch]).long(), means)
        sigma_w = covar_acc.compute()
        t_covar = time.perf_counter() - t
    t = time.perf_counter()
    nc1 = covariance_ratio(sigma_w, means, global_mean)
    t_ratio = time.perf_counter() - t
    print(json.dumps({"nc1": nc1, "import": t_import, "means": t_means, "covariance": t_covar, "ratio": t_ratio}))


if __name__ == "__main__":
    main()
