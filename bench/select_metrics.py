"""Benchmark: ``ncaudit report`` with and without ``--metrics`` (compute what is asked), whole processes.

Usage::

    python bench/select_metrics.py FILE.h5                                   # full vs nc1, 3 runs each, alternated
    python bench/select_metrics.py FILE.h5 --select nc1 accuracy mse_term_a  # more selections
    python bench/select_metrics.py FILE.h5 --repeat 5 --json

Each contender is ``python -m ncaudit report FILE --json -q [--metrics KEYS]`` as a fresh process (import included),
run ``--repeat`` times with the contenders alternated so that drift in the machine's load hits all of them alike; wall
time from the parent, peak RSS of that process from ``/usr/bin/time -f %M``. Every value a selection reports is checked
against the full report's (relative 1e-12) and the keys not asked for against their absence. Figures are min–median.
Bench caches: ``bench/stats.py`` / ``bench/scale.py`` write them (e.g. ``/tmp/ncaudit-bench/bench_400000_512_100.h5``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def fresh(cmd: list[str]) -> tuple[float, float, str]:
    """Run ``cmd`` as a fresh process: (wall seconds, peak RSS MiB of that process, stdout)."""
    with tempfile.NamedTemporaryFile("r", suffix=".rss") as rss:
        t0 = time.perf_counter()
        run = subprocess.run(["/usr/bin/time", "-f", "%M", "-o", rss.name, *cmd], capture_output=True, text=True,
                             env={**os.environ, "PYTHONPATH": str(ROOT)})
        wall = time.perf_counter() - t0
        if run.returncode not in (0, 1):
            raise RuntimeError(f"{cmd[3:]} failed: {run.stderr.strip().splitlines()[-1:]}")
        return wall, float(Path(rss.name).read_text().split()[-1]) / 1024, run.stdout


def check(full: dict, part: dict, keys: str) -> str:
    """'ok' when every value of ``part`` equals ``full``'s to 1e-12 (relative) and only the keys asked are there."""
    asked = set(part["details"]["computed"])
    if set(part["metrics"]) != asked:
        return f"keys {sorted(set(part['metrics']) ^ asked)} differ from those asked"
    for key, value in part["metrics"].items():
        ref = full["metrics"][key]
        if (value is None) != (ref is None) or (value is not None and
                                                 abs(value - ref) > 1e-12 * max(abs(ref), math.ulp(0.0))):
            return f"{key}: {value!r} vs the full report's {ref!r}"
    return "ok"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("file", type=Path)
    parser.add_argument("--select", nargs="*", default=["nc1"], help="--metrics values to time against the full "
                                                                      "report (default: nc1)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", action="store_true", help="also print every figure as JSON")
    args = parser.parse_args()
    contenders = ["full", *args.select]
    runs: dict[str, dict[str, list[float]]] = {c: {"wall": [], "rss": []} for c in contenders}
    outputs: dict[str, dict] = {}
    for _ in range(args.repeat):
        for c in contenders:
            cmd = [sys.executable, "-m", "ncaudit", "report", str(args.file), "--json", "-q", "--device", "cpu",
                   *([] if c == "full" else ["--metrics", c])]
            wall, rss, out = fresh(cmd)
            runs[c]["wall"].append(wall)
            runs[c]["rss"].append(rss)
            outputs[c] = json.loads(out)
    print(f"{args.file.name}: ncaudit report --json -q, whole processes, {args.repeat} runs alternated (min–median)")
    for c in contenders:
        w, r = runs[c]["wall"], runs[c]["rss"]
        same = "" if c == "full" else f"   values: {check(outputs['full'], outputs[c], c)}"
        name = "(everything)" if c == "full" else f"--metrics {c}"
        print(f"  {name:32s} {min(w):6.2f}–{statistics.median(w):6.2f} s"
              f"   {min(r):6.0f}–{statistics.median(r):6.0f} MiB{same}")
    if args.json:
        print(json.dumps(runs))


if __name__ == "__main__":
    main()
