"""Cost of the crash-safe write path: CacheWriter (write-through chunks, flush, fdatasync and a chunk-allocation
check per chunk before n_written advances) against plain h5py slice assignment with one flush per chunk.

Usage::

    python bench/cache_write.py                          # 65,536 rows x 512 float32 features, 256-row chunks
    python bench/cache_write.py --rows 262144 --features 2048 --dir /data/tmp
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import h5py
import numpy as np

from ncaudit.cache import CacheWriter


def plain(path: Path, x: np.ndarray, y: np.ndarray, chunk: int) -> float:
    t0 = time.perf_counter()
    with h5py.File(path, "w", locking=False) as f:
        feats = f.create_dataset("features", shape=x.shape, dtype=x.dtype, chunks=(chunk, x.shape[1]))
        labels = f.create_dataset("labels", shape=y.shape, dtype=y.dtype, chunks=(chunk,))
        for start in range(0, len(y), chunk):
            feats[start:start + chunk] = x[start:start + chunk]
            labels[start:start + chunk] = y[start:start + chunk]
            f.flush()
            f.attrs["n_written"] = start + chunk
            f.flush()
    return time.perf_counter() - t0


def writer(path: Path, x: np.ndarray, y: np.ndarray, chunk: int) -> float:
    t0 = time.perf_counter()
    with CacheWriter(path, n_samples=len(y), n_features=x.shape[1], num_classes=10, weight=None, store_logits=False,
                     chunk_rows=chunk, overwrite=True) as w:
        for start in range(0, len(y), chunk):
            w.write(x[start:start + chunk], y[start:start + chunk])
        w.finish()
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=65_536)
    parser.add_argument("--features", type=int, default=512)
    parser.add_argument("--chunk", type=int, default=256)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=None, help="Directory on the file system to measure.")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((args.rows, args.features)).astype(np.float32)
    y = rng.integers(0, 10, args.rows)
    mb = (x.nbytes + y.nbytes) / 2**20
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        for name, fn in (("plain h5py, flush per chunk", plain), ("CacheWriter (sync + verify)", writer)):
            best = min(fn(Path(tmp) / f"{name[:5]}.h5", x, y, args.chunk) for _ in range(args.repeat))
            print(f"{name:30s} {best:6.2f} s  {mb / best:8.1f} MB/s  ({args.rows} rows x {args.features}, "
                  f"chunks of {args.chunk}, best of {args.repeat})")


if __name__ == "__main__":
    main()
