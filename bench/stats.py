"""Benchmark: the whole ``ncaudit report`` against a bare X^T X, per pass, and the candidate schemes for Sigma_T.

Usage::

    python bench/stats.py                          # both shapes of the issues, 3 runs of every contender
    python bench/stats.py --shapes 100000,512,100 --repeat 1
    python bench/stats.py --exactness              # least-squares error of each scheme on real and planted features
    python bench/stats.py --json                   # also print every figure as JSON on stdout

For each (N, p, C) a float32 cache in class order with a classifier is written once (``bench/scale.py``'s generator,
under ``--dir``), then every contender runs as a **fresh process** on that same file: wall time from the parent,
peak RSS from ``/usr/bin/time -f %M`` of that process alone (``ru_maxrss`` of children would carry the parent's peak
across fork/exec). Contenders:

* ``read``    reading ``/features`` once in batches (h5py), nothing else;
* ``xtx32``   read + a bare streamed X^T X, ``torch.mm`` in float32 accumulated in float64 (the yardstick of the
  issues);
* ``xtx64``   the same in float64 (``torch.mm``): the yardstick when exact least squares needs float64 products;
* ``syrk64``  the same in float64 through NumPy's ``A.T @ A`` (BLAS syrk: half the flops) -- what ncaudit's first
  pass does;
* ``report``  ``python -m ncaudit report FILE --json -q``, import included.

One more process runs the audit with a timing progress hook and records the seconds of each pass (statistics,
decisions, refinement); "closed forms" is the rest of the audit (metrics, least squares, error estimate). The candidate
schemes for the scatter and for the pseudo-inverse of Sigma_T are timed in-process on the same data:

* scatter: float32 products (the former scheme: fast, but Sigma_W only to ~1e-7 of its largest eigenvalue),
  float64 ``torch.mm``, float64 syrk (chosen);
* pseudo-inverse of Sigma_T: eigendecomposition of Sigma_W + SVD of the factor [Sigma_W^1/2, M diag(pi)^1/2]
  (the former scheme, p x (p + C)), block elimination around the dominant between-class directions (chosen).

``--exactness`` extracts the bundled network (every epoch) and random-init timm resnet18 / convnext_atto on the
digits, builds planted twelve-decade spectra, and prints each least-squares quantity's worst relative error against
``np.linalg.lstsq`` on the samples for: float32 scatter, float64 scatter (closed form only), and the default report
(float64 scatter + refinement when the error estimate asks for it).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the CLI does: OpenMP threads must not spin on the BLAS cores

import numpy as np  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from ncaudit import metrics  # noqa: E402
from ncaudit.cache import FeatureCache  # noqa: E402
from ncaudit.stats import ClassStatistics, Statistics  # noqa: E402

SHAPES = ("400000,512,100", "100000,2048,1000")
BATCH = 4096

_READ = """
import sys, h5py, numpy as np
path, kind = sys.argv[1], sys.argv[2]
if kind.startswith("xtx"):
    import torch
with h5py.File(path, "r", locking=False) as f:
    ds = f["features"]
    p = ds.shape[1]
    s = torch.zeros(p, p, dtype=torch.float64) if kind.startswith("xtx") else np.zeros((p, p))
    for i in range(0, ds.shape[0], {batch}):
        x = ds[i:i + {batch}]
        if kind == "xtx32":
            b = torch.from_numpy(x); s += torch.mm(b.T, b).double()
        elif kind == "xtx64":
            b = torch.from_numpy(x).double(); s += torch.mm(b.T, b)
        elif kind == "syrk64":
            b = x.astype(np.float64); s += b.T @ b
"""

_REPORT = """
import contextlib, json, sys, time
sys.path.insert(0, {root!r})
t0 = time.perf_counter()
from ncaudit.audit import AuditOptions, audit
t_import = time.perf_counter() - t0
passes = {{}}
class Timer:
    @contextlib.contextmanager
    def task(self, description, total):
        t = time.perf_counter()
        yield lambda n: None
        passes[description.split(":")[0]] = time.perf_counter() - t
t = time.perf_counter()
result = audit(sys.argv[1], AuditOptions(device="cpu"), Timer())
t_audit = time.perf_counter() - t
passes["closed forms and the rest"] = t_audit - sum(passes.values())
print(json.dumps({{"import": t_import, "audit": t_audit, "passes": passes, "details": result.details}}))
"""


def fresh(cmd: list[str], **env: str) -> tuple[float, float, str]:
    """Run ``cmd`` as a fresh process: (wall seconds, peak RSS MiB of that process, stdout)."""
    with tempfile.NamedTemporaryFile("r", suffix=".rss") as rss:
        t0 = time.perf_counter()
        run = subprocess.run(["/usr/bin/time", "-f", "%M", "-o", rss.name, *cmd], capture_output=True, text=True,
                             env={**os.environ, "PYTHONPATH": str(ROOT), **env})
        wall = time.perf_counter() - t0
        if run.returncode != 0:
            raise RuntimeError(f"{cmd[:4]} failed: {run.stderr.strip().splitlines()[-1:]}")
        return wall, float(Path(rss.name).read_text().split()[-1]) / 1024, run.stdout


def contenders(path: Path, repeat: int) -> dict[str, dict[str, object]]:
    """Every contender, ``repeat`` times, alternated (so drift in the machine's load hits all of them alike)."""
    out: dict[str, dict[str, object]] = {}
    for _ in range(repeat):
        for kind in ("read", "xtx32", "xtx64", "syrk64", "report"):
            if kind == "report":  # exactly what a user runs
                cmd = [sys.executable, "-m", "ncaudit", "report", str(path), "--json", "-q"]
            else:
                cmd = [sys.executable, "-c", _READ.format(batch=BATCH), str(path), kind]
            wall, rss, _ = fresh(cmd)
            row = out.setdefault(kind, {"runs": [], "rss_mib": []})
            row["runs"].append(wall)  # type: ignore[union-attr]
            row["rss_mib"].append(rss)  # type: ignore[union-attr]
    # The seconds of each pass, from one more run of the audit with a timing progress hook (the CLI's environment).
    _, _, stdout = fresh([sys.executable, "-c", _REPORT.format(root=str(ROOT)), str(path)], OMP_WAIT_POLICY="PASSIVE")
    out["report"]["breakdown"] = json.loads(stdout.strip().splitlines()[-1])
    return out


def _timed(fn, repeat: int) -> float:
    best = math.inf
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def scatter_candidates(path: Path, repeat: int) -> dict[str, float]:
    """Pass 1 alone, in memory, per scatter scheme (the data read once beforehand)."""
    with FeatureCache(path) as cache:
        batches = [(torch.from_numpy(x), torch.from_numpy(y)) for _, x, y, _ in cache.iter_batches(BATCH)]
        c, p = cache.info.num_classes, cache.info.n_features
    import ncaudit.stats._statistics as stats_module  # where ClassStatistics looks up gram

    def run(dtype: torch.dtype) -> None:
        acc = ClassStatistics(c, p, gemm_dtype=dtype)
        for x, y in batches:
            acc.update(x, y)
        acc.compute()

    def torch_gram(a: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        return torch.mm(a.T, a, out=out)

    out = {"float32 products": _timed(lambda: run(torch.float32), repeat),
           "float64 syrk (chosen)": _timed(lambda: run(torch.float64), repeat)}
    original = stats_module.gram
    stats_module.gram = torch_gram
    try:
        out["float64 torch.mm"] = _timed(lambda: run(torch.float64), repeat)
    finally:
        stats_module.gram = original
    return out


def factor_svd_pinv(stats: Statistics) -> int:
    """The former scheme: eigh(Sigma_W), then the SVD of the p x (p + C) factor [Sigma_W^1/2, M diag(pi)^1/2]."""
    lam, q = np.linalg.eigh(stats.sigma_w)
    factor = np.hstack([q * np.sqrt(np.clip(lam, 0, None)), stats.centred_means.T * np.sqrt(stats.priors)])
    s = np.linalg.svd(factor, compute_uv=True, full_matrices=False)[1]
    return int(np.sum(s**2 > stats.n_features * metrics.EPS * s[0] ** 2))


def pinv_candidates(path: Path, repeat: int) -> dict[str, float]:
    with FeatureCache(path) as cache:
        acc = ClassStatistics(cache.info.num_classes, cache.info.n_features)
        for _, x, y, _ in cache.iter_batches(BATCH):
            acc.update(x, y)
    stats = acc.compute()
    basis = metrics.means_basis(stats.centred_means)
    return {"eigh + factor SVD (former)": _timed(lambda: factor_svd_pinv(stats), repeat),
            "block elimination (chosen)": _timed(lambda: metrics.total_pinv(stats, basis=basis), repeat)}


def bench_shape(shape: str, directory: Path, repeat: int) -> dict[str, object]:
    import scale

    n, p, c = (int(v) for v in shape.split(","))
    path = directory / f"bench_{n}_{p}_{c}.h5"
    if not scale.cache_matches(path, n, p, c):
        scale.generate(path, n, p, c)
    row: dict[str, object] = {"N": n, "p": p, "C": c, "file_gb": path.stat().st_size / 1e9}
    row["contenders"] = runs = contenders(path, repeat)
    best = {k: min(v["runs"]) for k, v in runs.items()}  # type: ignore[type-var]
    row["ratios"] = {f"report / {k}": best["report"] / best[k] for k in ("read", "xtx32", "xtx64", "syrk64")}
    row["scatter_candidates"] = scatter_candidates(path, repeat)
    row["pinv_candidates"] = pinv_candidates(path, repeat)
    return row


def print_shape(row: dict[str, object]) -> None:
    runs = row["contenders"]
    print(f"\n(N, p, C) = ({row['N']:,}, {row['p']}, {row['C']}), {row['file_gb']:.2f} GB float32 cache")
    print(f"  {'contender (fresh process)':28s} {'best s':>8s} {'all runs s':>24s} {'peak RSS MiB':>13s}")
    for kind, v in runs.items():  # type: ignore[union-attr]
        all_runs = " ".join(f"{t:.2f}" for t in v["runs"])
        print(f"  {kind:28s} {min(v['runs']):8.2f} {all_runs:>24s} {max(v['rss_mib']):13.0f}")
    for name, value in row["ratios"].items():  # type: ignore[union-attr]
        print(f"  {name:28s} {value:8.2f}x")
    bd = runs["report"]["breakdown"]  # type: ignore[index]
    print(f"  report breakdown (last run): import {bd['import']:.2f} s, "
          + ", ".join(f"{k} {v:.2f} s" for k, v in bd["passes"].items()))
    gemm = bd["details"].get("gemm_dtype")
    ls = bd["details"].get("least_squares", {})
    print(f"  products: {gemm}; least squares: estimate {ls.get('error_estimate', 0):.2g}, "
          f"refinement steps {ls.get('refinement_steps')}")
    print("  pass 1 alone, in memory, per scatter scheme: "
          + ", ".join(f"{k} {v:.2f} s" for k, v in row["scatter_candidates"].items()))  # type: ignore[union-attr]
    print("  pseudo-inverse of Sigma_T: "
          + ", ".join(f"{k} {v:.2f} s" for k, v in row["pinv_candidates"].items()))  # type: ignore[union-attr]


# ---------------------------------------------------------------------------------------------------------------------
# --exactness
# ---------------------------------------------------------------------------------------------------------------------
def exactness() -> list[dict[str, object]]:
    sys.path.insert(0, str(ROOT / "tests"))
    from extract_fixtures import timm_model
    from reference import reference_metrics
    from test_exact_ls import planted_decades, read_cache

    from ncaudit._demo import default_fixtures, load_manifest
    from ncaudit.audit import AuditOptions, audit
    from ncaudit.cache import write_cache
    from ncaudit.data import TransformOverrides
    from ncaudit.extract import extract

    fixtures = default_fixtures()
    t = load_manifest(fixtures)["transform"]
    keys = ("mse_term_a", "mse_term_b", "ls_distance", "ls_cosine")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        cases: list[tuple[str, Path]] = []
        kw = dict(split="train", device="cpu", precision="fp32", workers=0, progress=False)
        for epoch in (0, 1, 5, 50, 200):  # the bundled checkpoints record their preprocessing
            path = Path(tmp) / f"e{epoch}.h5"
            extract("test_resnet", fixtures / "checkpoints" / f"test_resnet_digits_e{epoch:03d}.safetensors",
                    fixtures / "digits", path, **kw)
            cases.append((f"bundled test_resnet epoch {epoch}", path))
        for arch in ("resnet18", "convnext_atto"):
            ckpt = Path(tmp) / f"{arch}.pth"
            torch.save(timm_model(arch, num_classes=10).state_dict(), ckpt)
            path = Path(tmp) / f"{arch}.h5"
            extract(arch, ckpt, fixtures / "digits", path, transform=TransformOverrides(
                img_size=32, mean=t["mean"], std=t["std"], crop_pct=t["crop_pct"], interpolation=t["interpolation"]),
                **kw)
            cases.append((f"{arch} random init (digits)", path))
        for placement, radius, seed in (("random", 1.0, 0), ("top", 1.0, 1)):
            h, y, w, b = planted_decades(placement, radius, seed)
            path = Path(tmp) / f"planted_{placement}.h5"
            write_cache(path, h, y, weight=w, bias=b)
            cases.append((f"planted 12 decades ({placement} means)", path))
        for name, path in cases:
            h, y, w, b = read_cache(path)
            b = np.zeros(len(w)) if b is None else b
            ref = reference_metrics(h.astype(np.float64), y, w, b)
            ref["w_ls_norm"] = float(np.linalg.norm(ref["w_ls"]))
            row: dict[str, object] = {"case": name}
            for scheme, dtype in (("float32 scatter", torch.float32), ("float64 scatter, closed form", torch.float64)):
                acc = ClassStatistics(len(w), h.shape[1], gemm_dtype=dtype)
                acc.update(h, y)
                st = acc.compute()
                ls = metrics.least_squares(st)
                ours = {"mse_term_a": metrics.ls_loss(st, ls), "mse_term_b": metrics.mse_term_b(st, w, b, ls),
                        "ls_distance": metrics.ls_distance(w, ls), "ls_cosine": metrics.ls_cosine(w, ls),
                        "w_ls_norm": float(np.linalg.norm(ls.weight))}
                row[scheme] = max(abs(ours[k] - ref[k]) / abs(ref[k]) for k in ours)
            result = audit(path, AuditOptions(device="cpu"))
            ours = {k: result.metrics[k] for k in keys} | {"w_ls_norm": result.details["w_ls_norm"]}
            row["report (default)"] = max(abs(ours[k] - ref[k]) / abs(ref[k]) for k in ours)
            ls_d = result.details["least_squares"]
            row["estimate"] = ls_d["error_estimate"]
            row["refinement steps"] = ls_d["refinement_steps"]
            rows.append(row)
    print(f"\n{'features':40s} {'float32 scatter':>16s} {'float64 closed':>15s} {'report':>9s} {'estimate':>9s} steps")
    for r in rows:
        print(f"{r['case']:40s} {r['float32 scatter']:16.1e} {r['float64 scatter, closed form']:15.1e} "
              f"{r['report (default)']:9.1e} {r['estimate']:9.1e} {r['refinement steps']:5d}")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="*", default=list(SHAPES), help="N,p,C triples")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()) / "ncaudit-bench",
                    help="where the benchmark caches are written once and reused")
    ap.add_argument("--exactness", action="store_true", help="only the least-squares exactness table")
    ap.add_argument("--json", action="store_true", help="also print every figure as JSON on stdout")
    args = ap.parse_args()
    print(f"torch {torch.__version__}, numpy {np.__version__}, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.2f}", file=sys.stderr)
    if args.exactness:
        rows: list[dict[str, object]] = exactness()
    else:
        args.dir.mkdir(parents=True, exist_ok=True)
        rows = []
        for shape in args.shapes:
            rows.append(bench_shape(shape, args.dir, args.repeat))
            print_shape(rows[-1])
    if args.json:
        print(json.dumps(rows, indent=2, default=str))


if __name__ == "__main__":
    main()
