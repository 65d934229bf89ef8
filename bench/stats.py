"""Benchmark: the whole ``ncaudit report`` against a bare X^T X, per pass, and the candidate schemes for Sigma_T.

Usage::

    python bench/stats.py                          # both shapes of the issues, 3 runs of every contender
    python bench/stats.py --shapes 100000,512,100 --repeat 1
    python bench/stats.py --contenders peer_nc1,report,api --no-candidates   # a subset, no in-process schemes
    python bench/stats.py --exactness              # least-squares error of each scheme on real and planted features
    python bench/stats.py --uncertainty            # stated uncertainty against SVD solves of perturbed copies
    python bench/stats.py --uncertainty-cost       # seconds of the uncertainty's closed forms at the two shapes
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
* ``torch_syrk64``  ``import torch`` + the same syrk (the issues' yardstick: what any torch user's process pays);
* ``peer_nc1`` the float32 peer library's NC1 (``bench/peer_nc1.py``: rhubarbwu/neural-collapse from
  ``../shared/peers``, two streaming passes with its own accumulators, h5py reads of the same batch size);
* ``report``  ``python -m ncaudit report FILE --json -q``, import included;
* ``report_nc1``  the same with ``--metrics nc1`` (skipped where the flag is not there);
* ``api``     a plain Python process (no environment variable set) that imports ncaudit and calls
  ``ncaudit.audit_cache(FILE)``.

Each contender's process gets the environment a user's would: ``OMP_WAIT_POLICY``, which this script sets for its
in-process timings, is removed (unless it was set when the script started); the CLI sets it itself. Printed per
contender: min-median of the runs, every run, peak RSS; then the ratios the issues set as targets (min and median)
with met / MISSED.

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

``--uncertainty`` calibrates ``details.uncertainty`` (spec rule 7): on planted features (ill-posed: a spectrum
decaying smoothly through the cut-off with N < p; well-posed; two classes with one mean; within-class spectra over
twelve decades) and on real ones (the bundled
network at epochs 0, 1 and 200 and random-init timm resnet18 / convnext_atto, ``ncaudit extract --random-init``, on
both digit splits; float32, ``--precision bf16`` and ``--store-dtype float16`` caches) it prints, per metric, the
stated relative uncertainty, the measured spread (``tests/reference.py``: the largest relative deviation of an SVD
solve of each of 5 copies of the rows, every stored value perturbed by a random half unit of its rounding, from the
solve of the unperturbed rows), their ratio, and the report's own distance from that unperturbed solve. A row passes
when 0.2 <= ratio <= 30 (or both are 100 % or more: undetermined) and the stated value is at most 1e-5 wherever the
spread is at most 1e-7. The caches are extracted once under ``--dir``.

``--uncertainty-cost`` times, in one process on the statistics of the two bench shapes, the closed forms the
uncertainty adds (NC1, CDNV, NC3, the least-squares family and its arithmetic error) and the error estimate it
replaced.
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

_USER_ENV = set(os.environ)  # what the user had set is passed on to every contender
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the CLI does: OpenMP threads must not spin on the BLAS cores

import numpy as np  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from peer_nc1 import PEER  # noqa: E402

from ncaudit import metrics  # noqa: E402
from ncaudit.cache import FeatureCache  # noqa: E402
from ncaudit.stats import ClassStatistics, Statistics  # noqa: E402

SHAPES = ("400000,512,100", "100000,2048,1000")
BATCH = 4096

_READ = """
import sys, h5py, numpy as np
path, kind = sys.argv[1], sys.argv[2]
if kind.startswith("xtx") or kind == "torch_syrk64":
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
        elif kind in ("syrk64", "torch_syrk64"):
            b = x.astype(np.float64); s += b.T @ b
"""

#: The in-process API as a user's script calls it: ``import ncaudit`` and one call, no environment variable set.
_API = """
import sys, ncaudit
ncaudit.audit_cache(sys.argv[1])
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
result = audit(sys.argv[1], AuditOptions(), Timer())
t_audit = time.perf_counter() - t
passes["closed forms and the rest"] = t_audit - sum(passes.values())
print(json.dumps({{"import": t_import, "audit": t_audit, "passes": passes, "details": result.details,
                  "nc1": result.metrics["nc1"]}}))
"""


#: Set here for the in-process timings; a contender's process gets the environment a user's would (the CLI sets
#: the variable itself before importing torch; the API, the peer and the yardsticks run without it).
_OURS = ("OMP_WAIT_POLICY",)


def fresh(cmd: list[str], **env: str) -> tuple[float, float, str]:
    """Run ``cmd`` as a fresh process: (wall seconds, peak RSS MiB of that process, stdout)."""
    base = {k: v for k, v in os.environ.items() if k not in _OURS or k in _USER_ENV}
    with tempfile.NamedTemporaryFile("r", suffix=".rss") as rss:
        t0 = time.perf_counter()
        run = subprocess.run(["/usr/bin/time", "-f", "%M", "-o", rss.name, *cmd], capture_output=True, text=True,
                             env={**base, "PYTHONPATH": str(ROOT), **env})
        wall = time.perf_counter() - t0
        if run.returncode != 0:
            raise RuntimeError(f"{cmd[:4]} failed: {run.stderr.strip().splitlines()[-1:]}")
        return wall, float(Path(rss.name).read_text().split()[-1]) / 1024, run.stdout


#: Every contender (a fresh process each): the yardsticks, the float32 peer's NC1, the report and the API.
KINDS = ("read", "xtx32", "xtx64", "syrk64", "torch_syrk64", "peer_nc1", "report", "report_nc1", "api")


def _has_metrics_flag() -> bool:
    """Whether ``ncaudit report`` takes ``--metrics`` (the ``report_nc1`` contender is skipped where it does not)."""
    run = subprocess.run([sys.executable, "-m", "ncaudit", "report", "--help"], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "200"})
    return "--metrics" in run.stdout


def _command(kind: str, path: Path) -> list[str]:
    if kind == "report":  # exactly what a user runs
        return [sys.executable, "-m", "ncaudit", "report", str(path), "--json", "-q"]
    if kind == "report_nc1":
        return [sys.executable, "-m", "ncaudit", "report", str(path), "--json", "-q", "--metrics", "nc1"]
    if kind == "api":
        return [sys.executable, "-c", _API, str(path)]
    if kind == "peer_nc1":
        return [sys.executable, str(ROOT / "bench" / "peer_nc1.py"), str(path), "--batch", str(BATCH)]
    return [sys.executable, "-c", _READ.format(batch=BATCH), str(path), kind]


def contenders(path: Path, repeat: int, kinds: tuple[str, ...] = KINDS) -> dict[str, dict[str, object]]:
    """Every contender, ``repeat`` times, alternated (so drift in the machine's load hits all of them alike)."""
    out: dict[str, dict[str, object]] = {}
    if "report_nc1" in kinds and not _has_metrics_flag():
        print("report --metrics: not available in this version; contender report_nc1 skipped", file=sys.stderr)
        kinds = tuple(k for k in kinds if k != "report_nc1")
    if "peer_nc1" in kinds and not PEER.is_dir():
        print("the float32 peer's source is not beside the project; contender peer_nc1 skipped", file=sys.stderr)
        kinds = tuple(k for k in kinds if k != "peer_nc1")
    for _ in range(repeat):
        for kind in kinds:
            wall, rss, stdout = fresh(_command(kind, path))
            row = out.setdefault(kind, {"runs": [], "rss_mib": []})
            row["runs"].append(wall)  # type: ignore[union-attr]
            row["rss_mib"].append(rss)  # type: ignore[union-attr]
            if kind == "peer_nc1":
                row["nc1"] = json.loads(stdout.strip().splitlines()[-1])["nc1"]
    # The seconds of each pass, from one more run of the audit with a timing progress hook (a plain process).
    if "report" in out:
        _, _, stdout = fresh([sys.executable, "-c", _REPORT.format(root=str(ROOT)), str(path)])
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


#: The issue's targets: (numerator, denominator, the largest ratio allowed at each shape (None: any)).
TARGETS = (
    ("report", "peer_nc1", {"400000,512,100": 1.3, "100000,2048,1000": 1.3}),
    ("report_nc1", "peer_nc1", {"400000,512,100": 1.0, "100000,2048,1000": 1.0}),
    ("report", "torch_syrk64", {"400000,512,100": 1.5, "100000,2048,1000": 2.3}),
    ("api", "report", {"400000,512,100": 1.1, "100000,2048,1000": 1.1}),
    ("report", "read", {}), ("report", "xtx32", {}), ("report", "xtx64", {}), ("report", "syrk64", {}),
)


def bench_shape(shape: str, directory: Path, repeat: int, kinds: tuple[str, ...] = KINDS,
                candidates: bool = True) -> dict[str, object]:
    import scale

    n, p, c = (int(v) for v in shape.split(","))
    path = directory / f"bench_{n}_{p}_{c}.h5"
    if not scale.cache_matches(path, n, p, c):
        scale.generate(path, n, p, c)
    row: dict[str, object] = {"shape": shape, "N": n, "p": p, "C": c, "file_gb": path.stat().st_size / 1e9}
    row["contenders"] = runs = contenders(path, repeat, kinds)
    best = {k: min(v["runs"]) for k, v in runs.items()}  # type: ignore[type-var]
    median = {k: float(np.median(v["runs"])) for k, v in runs.items()}  # type: ignore[arg-type]
    row["ratios"] = {f"{a} / {b}": {"min": best[a] / best[b], "median": median[a] / median[b],
                                    "target": limits.get(f"{n},{p},{c}")}
                     for a, b, limits in TARGETS if a in best and b in best}
    if candidates:
        row["scatter_candidates"] = scatter_candidates(path, repeat)
        row["pinv_candidates"] = pinv_candidates(path, repeat)
    return row


def print_shape(row: dict[str, object]) -> None:
    runs = row["contenders"]
    print(f"\n(N, p, C) = ({row['N']:,}, {row['p']}, {row['C']}), {row['file_gb']:.2f} GB float32 cache")
    print(f"  {'contender (fresh process)':28s} {'min-median s':>14s} {'all runs s':>24s} {'peak RSS MiB':>14s}")
    for kind, v in runs.items():  # type: ignore[union-attr]
        all_runs = " ".join(f"{t:.2f}" for t in v["runs"])
        t = f"{min(v['runs']):.2f}-{float(np.median(v['runs'])):.2f}"
        m = f"{min(v['rss_mib']):.0f}-{max(v['rss_mib']):.0f}"
        print(f"  {kind:28s} {t:>14s} {all_runs:>24s} {m:>14s}")
    for name, r in row["ratios"].items():  # type: ignore[union-attr]
        target = r["target"]
        verdict = "" if target is None else f"  target <= {target}: {'met' if r['min'] <= target else 'MISSED'}" + (
            "" if (r["min"] <= target) == (r["median"] <= target) else " (min), "
            + ("met" if r["median"] <= target else "missed") + " (median)")
        print(f"  {name:28s} {r['min']:6.2f}x (min) {r['median']:6.2f}x (median){verdict}")
    if "peer_nc1" in runs:
        print(f"  the peer's NC1 (float32): {runs['peer_nc1']['nc1']:.7g}")  # type: ignore[index]
    if "report" in runs:
        bd = runs["report"]["breakdown"]  # type: ignore[index]
        print(f"  report breakdown (one more run, plain process): import {bd['import']:.2f} s, "
              + ", ".join(f"{k} {v:.2f} s" for k, v in bd["passes"].items()))
        gemm = bd["details"].get("gemm_dtype")
        ls = bd["details"].get("least_squares", {})
        print(f"  products: {gemm}; least squares: estimate {ls.get('error_estimate', 0):.2g}, "
              f"refinement steps {ls.get('refinement_steps')}; NC1 {bd['nc1']:.7g}")
    if "scatter_candidates" in row:
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


# ---------------------------------------------------------------------------------------------------------------------
# --uncertainty, --uncertainty-cost
# ---------------------------------------------------------------------------------------------------------------------
_U32, _U16, _BF16 = 2.0**-24, 2.0**-11, 2.0**-8


def _extract_cli(directory: Path, name: str, args: list[str]) -> Path:
    """``ncaudit extract ARGS -o DIR/NAME.h5`` once (a complete cache there is reused)."""
    out = directory / f"{name}.h5"
    if not out.exists():
        run = subprocess.run([sys.executable, "-m", "ncaudit", "extract", *args, "-o", str(out), "--device", "cpu",
                              "--no-progress"], capture_output=True, text=True,
                             env={**os.environ, "PYTHONPATH": str(ROOT)})
        if run.returncode != 0:
            raise RuntimeError(f"extract {name} failed: {run.stderr.strip().splitlines()[-1:]}")
    return out


def uncertainty_cases(directory: Path, quick: bool = False) -> list[tuple[str, Path, float]]:
    """(label, cache, rounding unit) of every calibration case, extracted or written under ``directory``."""
    sys.path.insert(0, str(ROOT / "tests"))
    from test_uncertainty import planted_duplicate, planted_ill_posed, planted_well_posed

    from ncaudit.cache import write_cache

    directory.mkdir(parents=True, exist_ok=True)
    cases = []
    for label, make in (("planted ill-posed (N=200 < p=256)", planted_ill_posed),
                        ("planted well-posed", planted_well_posed), ("planted, two classes share a mean",
                                                                    planted_duplicate)):
        h, y, w, b = make()
        path = directory / f"{make.__name__}.h5"
        write_cache(path, h, y, weight=w, bias=b, overwrite=True)
        cases.append((label, path, _U32))
    from test_exact_ls import planted_decades
    for placement, radius, seed in (("random", 1.0, 0), ("top", 1.0, 1)):
        h, y, w, b = planted_decades(placement, radius, seed)
        path = directory / f"planted_decades_{placement}.h5"
        write_cache(path, h, y, weight=w, bias=b, overwrite=True)
        cases.append((f"planted twelve decades ({placement} means)", path, _U32))
    digits = ROOT / "fixtures" / "digits"
    ckpts = ROOT / "fixtures" / "checkpoints"
    for epoch in (0, 1, 200):
        for split in ("train", "test"):
            path = _extract_cli(directory, f"e{epoch}_{split}", [
                "-m", "test_resnet", "-c", str(ckpts / f"test_resnet_digits_e{epoch:03d}.safetensors"),
                "-d", str(digits), "--split", split])
            cases.append((f"bundled epoch {epoch}, {split}", path, _U32))
    if quick:
        return cases
    for arch in ("resnet18", "convnext_atto"):
        for split in ("train", "test"):
            base = ["-m", arch, "--random-init", "-d", str(digits), "--split", split]
            cases.append((f"{arch} random init, {split}", _extract_cli(directory, f"{arch}_{split}", base), _U32))
            cases.append((f"{arch} random init, {split}, bf16",
                          _extract_cli(directory, f"{arch}_{split}_bf16", [*base, "--precision", "bf16"]), _BF16))
    for split in ("train", "test"):
        base = ["-m", "resnet18", "--random-init", "-d", str(digits), "--split", split, "--store-dtype", "float16"]
        cases.append((f"resnet18 random init, {split}, float16 cache",
                      _extract_cli(directory, f"resnet18_{split}_f16", base), _U16))
    path = _extract_cli(directory, "e200_train_bf16", [
        "-m", "test_resnet", "-c", str(ckpts / "test_resnet_digits_e200.safetensors"), "-d", str(digits), "--split",
        "train", "--precision", "bf16"])
    cases.append(("bundled epoch 200, train, bf16", path, _BF16))
    return cases


def uncertainty_table(directory: Path, quick: bool = False) -> list[dict[str, object]]:
    sys.path.insert(0, str(ROOT / "tests"))
    from reference import UNCERTAIN_KEYS, calibrated, perturbed_spread
    from test_exact_ls import read_cache

    from ncaudit.audit import AuditOptions, audit

    rows = []
    for label, path, unit in uncertainty_cases(directory, quick):
        h, y, w, b = read_cache(path)
        b = np.zeros(len(w)) if b is None else b
        result = audit(path, AuditOptions(device="cpu"))
        stated = result.details["uncertainty"]
        base, spread, ranks = perturbed_spread(h, y, w, b, unit)
        ours = {**result.metrics, "w_ls_norm": result.details.get("w_ls_norm")}
        model = result.details["uncertainty_model"]
        row: dict[str, object] = {"case": label, "N": len(y), "p": h.shape[1], "unit": unit,
                                  "rank_sigma_t": result.details.get("rank_sigma_t"),
                                  "stated_rank_range": model.get("rank_sigma_t_range"),
                                  "measured_ranks": sorted({r[0] for r in ranks}), "metrics": {}}
        print(f"\n{label}: N = {len(y)}, p = {h.shape[1]}, unit 2^{round(math.log2(unit))}, rank of Sigma_T "
              f"{row['rank_sigma_t']} (stated {model.get('rank_sigma_t_range')}, perturbed copies "
              f"{row['measured_ranks']}), Sigma_B {model.get('rank_sigma_b_range')} (copies "
              f"{sorted({r[1] for r in ranks})})")
        print(f"  {'metric':12s} {'value':>11s} {'stated':>9s} {'measured':>9s} {'ratio':>8s} {'report-SVD':>10s}  ok")
        for key in UNCERTAIN_KEYS:
            s_, m_ = stated.get(key), spread[key]
            if s_ is None or not math.isfinite(base[key]):
                continue
            off = abs(ours[key] - base[key]) / abs(base[key]) if base[key] else math.inf
            ok = calibrated(s_, m_)
            row["metrics"][key] = {"value": ours[key], "stated": s_, "measured": m_, "report_vs_svd": off, "ok": ok}
            ratio = s_ / m_ if m_ > 0 else math.inf
            verdict = "yes" if ok else "NO"
            print(f"  {key:12s} {ours[key]:11.4g} {s_:9.2e} {m_:9.2e} {ratio:8.2f} {off:10.1e}  {verdict}")
        rows.append(row)
    bad = [(r["case"], k) for r in rows for k, v in r["metrics"].items() if not v["ok"]]  # type: ignore[union-attr]
    print(f"\n{sum(len(r['metrics']) for r in rows) - len(bad)} of {sum(len(r['metrics']) for r in rows)} "
          f"calibrated{': not ' + ', '.join(f'{c} {k}' for c, k in bad) if bad else ''}")
    return rows


def former_error_estimate(stats: Statistics, weight: np.ndarray, ls: metrics.LeastSquares, term_a: float,
                          term_b: float, *, seed: int = 0) -> float:
    """The error estimate that decided refinement before details.uncertainty (kept here to time its replacement):
    the relative error of the least-squares quantities caused by the rounding of Sigma_W, to first order.

    Notes
    -----
    Sigma_W is perturbed by Delta = 4 u tr(Sigma_W) E / ||E||_2 with E a random symmetric Gaussian matrix (u the unit
    roundoff: the size of the backward error of a float64 scatter and of the symmetric solve), and the first-order
    changes follow in closed form: dW_LS = -W_LS Delta Sigma_T^dagger, dA = 1/2 <W_LS^T W_LS, Delta> - lambda
    <W_LS, dW_LS>, dL(W) = 1/2 <W^T W, Delta>, dB = dL(W) - dA. The largest relative change is returned. Measured
    against an SVD solve on the samples, the actual error was 0.02 to 1.6 times this estimate on real and planted
    features (tests/test_exact_ls.py, bench/stats.py --exactness).
    """
    p = stats.n_features
    size = 4.0 * (metrics.EPS / 2) * float(np.trace(stats.sigma_w))
    w_ls = ls.weight
    n_ls, n_w = float(np.linalg.norm(w_ls)), float(np.linalg.norm(weight))
    if size == 0.0 or n_ls == 0.0:
        return 0.0
    g = np.random.default_rng(seed).standard_normal((p, p))
    delta = (g + g.T) * (size / (2.0 * math.sqrt(2.0 * p)))  # ||g + g^T||_2 ~ 2 sqrt(2p)
    wd = w_ls @ delta
    d_w = -ls.pinv.apply(wd.T).T
    d_a = 0.5 * float(np.sum(wd * w_ls)) - ls.ridge * float(np.sum(w_ls * d_w))
    d_b = 0.5 * _quadratic_trace(weight, delta) - d_a
    d_norm = float(np.sum(w_ls * d_w)) / n_ls
    changes = [abs(d_a) / max(abs(term_a), metrics.TINY), abs(d_b) / max(abs(term_b), metrics.TINY), abs(d_norm) / n_ls]
    diff = weight - w_ls
    n_diff = float(np.linalg.norm(diff))
    if n_diff > 0:
        dist = n_diff / n_ls
        changes.append(abs(-float(np.sum(diff * d_w)) / n_diff / n_ls - dist * d_norm / n_ls) / dist)
    if n_w > 0:
        cos = float(np.sum(weight * w_ls)) / (n_w * n_ls)
        d_cos = float(np.sum(weight * d_w)) / (n_w * n_ls) - cos * d_norm / n_ls
        changes.append(abs(d_cos) / max(abs(cos), metrics.TINY))
    return max(changes)


def _quadratic_trace(a: np.ndarray, sigma: np.ndarray) -> float:
    return float(np.sum((a @ sigma) * a))


def uncertainty_cost(directory: Path, shapes: list[str], repeat: int) -> list[dict[str, object]]:
    """Seconds of the closed forms the uncertainty adds, in one process, on each bench shape's statistics."""
    import scale

    from ncaudit.audit._closed import _closed_form
    from ncaudit.audit._options import AuditOptions

    rows = []
    for shape in shapes:
        n, p, c = (int(v) for v in shape.split(","))
        path = directory / f"bench_{n}_{p}_{c}.h5"
        if not scale.cache_matches(path, n, p, c):
            scale.generate(path, n, p, c)
        with FeatureCache(path) as cache:
            acc = ClassStatistics(cache.info.num_classes, cache.info.n_features)
            for _, x, y, _ in cache.iter_batches(BATCH):
                acc.update(x, y)
            w, b = cache.classifier()
            dtype = cache.info.feature_dtype
        stats = acc.compute()
        w, b = w.astype(np.float64), np.zeros(c) if b is None else b.astype(np.float64)
        closed = _closed_form(stats, w, b, AuditOptions())
        ls, m, basis = closed.ls, closed.metrics, closed.basis
        noise = metrics.rounding(stats, metrics.rounding_unit(dtype))
        parts = {
            "nc1": lambda: metrics.nc1_uncertainty(stats, basis, noise, m["nc1"]),
            "cdnv": lambda: metrics.cdnv_uncertainty(stats, noise, m["cdnv"]),
            "nc3": lambda: metrics.nc3_uncertainty(stats, w, noise, m["nc3"]),
            "least squares (rounding)": lambda: metrics.ls_uncertainty(stats, w, b, ls, noise, loss=m["mse_loss"],
                                                                        term_a=m["mse_term_a"]),
            "least squares (arithmetic)": lambda: metrics.ls_arithmetic(stats, w, ls, loss=m["mse_loss"],
                                                                         term_a=m["mse_term_a"]),
            "error estimate (new)": lambda: metrics.ls_error_estimate(stats, w, ls, m["mse_term_a"], m["mse_term_b"]),
        }
        parts["error estimate (former)"] = lambda: former_error_estimate(stats, w, ls, m["mse_term_a"],
                                                                         m["mse_term_b"])
        row: dict[str, object] = {"N": n, "p": p, "C": c, "seconds": {k: _timed(f, repeat) for k, f in parts.items()}}
        sec: dict[str, float] = row["seconds"]  # type: ignore[assignment]
        added = sum(v for k, v in sec.items() if "error estimate" not in k)
        row["added"] = added
        row["net"] = net = added + sec["error estimate (new)"] - sec["error estimate (former)"]
        print(f"\n(N, p, C) = ({n:,}, {p}, {c}): the uncertainty's closed forms, best of {repeat}")
        for k, v in row["seconds"].items():  # type: ignore[union-attr]
            print(f"  {k:28s} {v:7.3f} s")
        print(f"  {'added by details.uncertainty':28s} {added:7.3f} s")
        print(f"  {'net (the estimate replaced)':28s} {net:7.3f} s")
        rows.append(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="*", default=list(SHAPES), help="N,p,C triples")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()) / "ncaudit-bench",
                    help="where the benchmark caches are written once and reused")
    ap.add_argument("--exactness", action="store_true", help="only the least-squares exactness table")
    ap.add_argument("--uncertainty", action="store_true", help="only the calibration table of details.uncertainty")
    ap.add_argument("--quick", action="store_true", help="with --uncertainty: the planted and bundled cases only")
    ap.add_argument("--uncertainty-cost", action="store_true",
                    help="only the seconds of the uncertainty's closed forms at the bench shapes")
    ap.add_argument("--json", action="store_true", help="also print every figure as JSON on stdout")
    ap.add_argument("--contenders", default=",".join(KINDS),
                    help=f"comma-separated subset of {', '.join(KINDS)} (default: all)")
    ap.add_argument("--no-candidates", action="store_true",
                    help="skip the in-process timings of the scatter and pseudo-inverse schemes")
    args = ap.parse_args()
    print(f"torch {torch.__version__}, numpy {np.__version__}, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.2f}", file=sys.stderr)
    if args.exactness:
        rows: list[dict[str, object]] = exactness()
    elif args.uncertainty:
        rows = uncertainty_table(args.dir / "uncertainty", args.quick)
    elif args.uncertainty_cost:
        args.dir.mkdir(parents=True, exist_ok=True)
        rows = uncertainty_cost(args.dir, args.shapes, args.repeat)
    else:
        args.dir.mkdir(parents=True, exist_ok=True)
        rows = []
        for shape in args.shapes:
            kinds = tuple(k for k in args.contenders.split(",") if k)
            unknown = set(kinds) - set(KINDS)
            if unknown:
                ap.error(f"unknown contenders {sorted(unknown)}; pick from {', '.join(KINDS)}")
            rows.append(bench_shape(shape, args.dir, args.repeat, kinds, not args.no_candidates))
            print_shape(rows[-1])
    if args.json:
        print(json.dumps(rows, indent=2, default=str))


if __name__ == "__main__":
    main()
