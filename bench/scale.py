"""Benchmark: `ncaudit report` on an ImageNet-1k-shaped cache against reading the file once and a bare X^T X.

Usage::

    python bench/scale.py --cache /data/in1k-shape.h5                # N = 1.28 M, p = 2048, C = 1000 float32 (~10 GB)
    python bench/scale.py --cache /tmp/small.h5 --shape 20000,256,100  # a quick smoke test
    python bench/scale.py --cache /data/in1k-shape.h5 --steps h5py,xtx32,report --json

Steps (each printed as it finishes; ``--json`` prints them all at the end):

* ``generate``  writes the cache once with :class:`ncaudit.cache.CacheWriter`, chunk by chunk (never all in memory):
  class means plus noise, post-ReLU, rows in class order as datasets are stored; a cache of the same shape at that
  path is reused;
* ``dd``        ``dd if=CACHE of=/dev/null bs=16M``, buffered and (where the file system allows) ``iflag=direct``,
  i.e. the disk without the page cache;
* ``h5py``      reading ``/features`` once in chunked slices;
* ``xtx32`` / ``xtx64``  a bare streamed X^T X (``torch.mm`` in float32 / float64, accumulated in float64) over the
  file, reading included;
* ``report``    ``python -m ncaudit report CACHE --json`` in a fresh process: wall time and peak RSS
  (``/usr/bin/time -f %M``, else VmHWM sampled from ``/proc``; never ``ru_maxrss`` of children);
* ``report2``   ``torchrun --standalone --nproc_per_node=2 -m ncaudit report CACHE --json`` when ``report`` runs
  distributed (it prints "not available yet" otherwise).

The ratios printed at the end are the report's time over one sequential h5py read (is the pass compute-bound?) and
over the bare float32 X^T X. Timings on a shared machine are noisy; the page cache flatters every read after the
first (compare with ``dd iflag=direct``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ncaudit.cache import CacheWriter, FeatureCache

IMAGENET = (1_281_167, 2048, 1000)
STEPS = ("dd", "h5py", "xtx32", "xtx64", "report", "report2")


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}


# ---------------------------------------------------------------------------------------------------------------------
# The cache
# ---------------------------------------------------------------------------------------------------------------------
def cache_matches(path: Path, n: int, p: int, c: int) -> bool:
    """Whether ``path`` is a complete cache of this shape (then it is reused)."""
    try:
        with FeatureCache(path) as cache:
            info = cache.info
            return (info.n_samples, info.n_features, info.num_classes, info.feature_dtype) == (n, p, c, "float32")
    except Exception:  # noqa: BLE001 - any unreadable file is simply regenerated
        return False


def generate(path: Path, n: int, p: int, c: int, chunk: int = 16384, seed: int = 0) -> float:
    """Write the synthetic cache in chunks of ``chunk`` rows; the seconds it took."""
    need = n * (p * 4 + 8) + c * p * 4
    parent = path.resolve().parent
    parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(parent).free
    if need > 0.95 * free:
        raise SystemExit(f"{path}: the cache needs {need / 1e9:.1f} GB, {free / 1e9:.1f} GB free")
    g = torch.Generator().manual_seed(seed)
    means = torch.rand(c, p, generator=g) * 2
    counts = torch.full((c,), n // c, dtype=torch.int64)
    counts[: n % c] += 1
    labels = torch.repeat_interleave(torch.arange(c), counts)  # class order, as datasets are stored
    weight = means - means.mean(0)
    weight = (weight / weight.norm(dim=1, keepdim=True) + 0.05 * torch.randn(c, p, generator=g)).numpy()
    t0 = time.perf_counter()
    writer = CacheWriter(path, n_samples=n, n_features=p, num_classes=c, weight=weight, bias=np.zeros(c, np.float32),
                         store_logits=False, overwrite=True,
                         attrs={"model": "synthetic", "dataset": "bench/scale.py", "split": f"seed {seed}"})
    with writer:
        for start in range(0, n, chunk):
            y = labels[start:start + chunk]
            x = (means[y] + 0.3 * torch.randn(len(y), p, generator=g)).relu_()
            writer.write(x.numpy(), y.numpy())
            print(f"\rgenerate: {min(start + chunk, n):,} / {n:,} rows", end="", file=sys.stderr, flush=True)
        writer.finish()
    print(file=sys.stderr)
    return time.perf_counter() - t0


# ---------------------------------------------------------------------------------------------------------------------
# Reading and X^T X
# ---------------------------------------------------------------------------------------------------------------------
def time_dd(path: Path, direct: bool) -> float | None:
    cmd = ["dd", f"if={path}", "of=/dev/null", "bs=16M"] + (["iflag=direct"] if direct else [])
    t0 = time.perf_counter()
    run = subprocess.run(cmd, capture_output=True, text=True, check=False)
    return time.perf_counter() - t0 if run.returncode == 0 else None


def time_h5py(path: Path, batch: int) -> float:
    t0 = time.perf_counter()
    with h5py.File(path, "r", locking=False) as f:
        ds = f["features"]
        for i in range(0, ds.shape[0], batch):
            ds[i:i + batch]
    return time.perf_counter() - t0


def time_xtx(path: Path, batch: int, dtype: torch.dtype) -> float:
    t0 = time.perf_counter()
    with h5py.File(path, "r", locking=False) as f:
        ds = f["features"]
        s = torch.zeros(ds.shape[1], ds.shape[1], dtype=torch.float64)
        for i in range(0, ds.shape[0], batch):
            b = torch.from_numpy(ds[i:i + batch]).to(dtype)
            s += torch.mm(b.T, b).double()
    return time.perf_counter() - t0


# ---------------------------------------------------------------------------------------------------------------------
# Fresh processes: wall time and peak RSS
# ---------------------------------------------------------------------------------------------------------------------
def run_measured(cmd: list[str]) -> dict[str, object]:
    """Run ``cmd``; wall seconds, peak RSS (bytes, of the largest process) and the parsed JSON report on stdout."""
    gnu_time = Path("/usr/bin/time")
    with tempfile.TemporaryDirectory() as tmp:
        rss, out_path, err_path = Path(tmp) / "rss", Path(tmp) / "out", Path(tmp) / "err"
        full = [str(gnu_time), "-f", "%M", "-o", str(rss), *cmd] if gnu_time.exists() else cmd
        t0 = time.perf_counter()
        with out_path.open("w") as out_f, err_path.open("w") as err_f:  # files, not pipes: the child never blocks
            proc = subprocess.Popen(full, stdout=out_f, stderr=err_f, text=True, env=_env())
            peak = 0
            while proc.poll() is None:  # without GNU time: sample the child's own high-water mark until it exits
                if not gnu_time.exists():
                    peak = max(peak, _vm_hwm(proc.pid))
                time.sleep(0.05)
        wall = time.perf_counter() - t0
        if gnu_time.exists():
            text = rss.read_text().strip().splitlines()
            peak = int(text[-1]) * 1024 if text and text[-1].isdigit() else 0
        out, err = out_path.read_text(), err_path.read_text()
    result: dict[str, object] = {"seconds": wall, "peak_rss_bytes": peak, "returncode": proc.returncode}
    try:
        result["report"] = json.loads(out) if out.strip() else None
    except json.JSONDecodeError:
        result["report"] = None
    if proc.returncode != 0:
        result["error"] = err.strip().splitlines()[-1] if err.strip() else "no output"
    return result


def _vm_hwm(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def time_report(path: Path, device: str) -> dict[str, object]:
    result = run_measured([sys.executable, "-m", "ncaudit", "report", str(path), "--json", "--device", device])
    startup = run_measured([sys.executable, "-c", "import ncaudit.audit, ncaudit.cli"])
    result["startup_seconds"] = startup["seconds"]  # interpreter and torch import: part of the wall time above
    return result


def time_report_2(path: Path, device: str) -> dict[str, object] | str:
    from ncaudit.distributed import WIRED_COMMANDS

    if "report" not in WIRED_COMMANDS:
        return "not available: `ncaudit report` does not run distributed in this version"
    return run_measured([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
                         "ncaudit", "report", str(path), "--json", "--device", device])


# ---------------------------------------------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", type=Path, required=True, help="where the synthetic cache is (or is written once)")
    ap.add_argument("--shape", default=",".join(map(str, IMAGENET)), help="N,p,C (default: ImageNet-1k train)")
    ap.add_argument("--steps", default=",".join(STEPS), help=f"comma-separated subset of {','.join(STEPS)}")
    ap.add_argument("--batch", type=int, default=8192, help="rows per read / GEMM in the bare passes")
    ap.add_argument("--device", default="cpu", help="device of the report runs")
    ap.add_argument("--json", action="store_true", help="print every figure as JSON at the end")
    args = ap.parse_args()
    n, p, c = (int(v) for v in args.shape.split(","))
    steps = [s for s in args.steps.split(",") if s]
    unknown = set(steps) - set(STEPS)
    if unknown:
        raise SystemExit(f"unknown steps {sorted(unknown)}; pick from {', '.join(STEPS)}")
    figures: dict[str, object] = {"shape": {"n": n, "p": p, "c": c}, "threads": torch.get_num_threads()}
    say = (lambda key, text: print(f"{key:>10}: {text}", file=sys.stderr, flush=True))
    if cache_matches(args.cache, n, p, c):
        say("generate", f"reusing {args.cache}")
    else:
        figures["generate_s"] = generate(args.cache, n, p, c)
        say("generate", f"{figures['generate_s']:.1f} s")
    size = args.cache.stat().st_size
    figures["file_bytes"] = size
    gb = size / 1e9
    if "dd" in steps:
        for direct in (False, True):
            key = "dd_direct_s" if direct else "dd_s"
            figures[key] = time_dd(args.cache, direct)
            text = "not supported here" if figures[key] is None else f"{figures[key]:.1f} s, {gb / figures[key]:.2f} GB/s"
            say(key[:-2], text)
    for step, fn in (("h5py", lambda: time_h5py(args.cache, args.batch)),
                     ("xtx32", lambda: time_xtx(args.cache, args.batch, torch.float32)),
                     ("xtx64", lambda: time_xtx(args.cache, args.batch, torch.float64))):
        if step in steps:
            figures[f"{step}_s"] = fn()
            say(step, f"{figures[f'{step}_s']:.1f} s, {gb / figures[f'{step}_s']:.2f} GB/s")
    for step, fn in (("report", time_report), ("report2", time_report_2)):
        if step not in steps:
            continue
        res = fn(args.cache, args.device)
        figures[step] = res
        if isinstance(res, str):
            say(step, res)
        elif res["returncode"] != 0:
            say(step, f"failed (exit {res['returncode']}): {res.get('error')}")
        else:
            report = res.get("report") or {}
            rows = report.get("n_samples") if isinstance(report, dict) else None
            start = f" (of which {res['startup_seconds']:.1f} s start-up)" if "startup_seconds" in res else ""
            say(step, f"{res['seconds']:.1f} s{start}, peak RSS {res['peak_rss_bytes'] / 2**30:.2f} GiB, {rows} rows")
    report = figures.get("report")
    if isinstance(report, dict) and report.get("returncode") == 0:
        for base in ("h5py", "xtx32", "xtx64"):
            if f"{base}_s" in figures:
                figures[f"report_over_{base}"] = report["seconds"] / figures[f"{base}_s"]
                say(f"/ {base}", f"report takes {figures[f'report_over_{base}']:.2f}x the {base} pass")
    if args.json:
        for step in ("report", "report2"):  # the reports themselves are long: keep their metrics only
            if isinstance(figures.get(step), dict) and isinstance(figures[step].get("report"), dict):
                figures[step]["report"] = {"n_samples": figures[step]["report"].get("n_samples"),
                                           "metrics": figures[step]["report"].get("metrics")}
        print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
