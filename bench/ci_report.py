"""How long CI waits for ncaudit on a small cache: `ncaudit report` end to end (a fresh process each run, import
included) on the bundled e200 cache (1,438 x 96), and `ncaudit --help`.

    python bench/ci_report.py --repeat 7            # extracts the cache into a temporary directory first
    python bench/ci_report.py --cache e200-train.h5 --repeat 7

Prints every run, then best / median / worst of each command, and where the report's time goes by `python -X
importtime` (torch, h5py, the CLI) against the rest (reading the cache and computing every metric).
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CKPT = ROOT / "fixtures" / "checkpoints" / "test_resnet_digits_e200.safetensors"


def extract(out: Path) -> Path:
    subprocess.run(["ncaudit", "extract", "--model", "test_resnet", "--checkpoint", str(CKPT), "--data",
                    str(ROOT / "fixtures" / "digits"), "--split", "train", "--out", str(out)], check=True,
                   capture_output=True)
    return out


def timed(cmd: list[str], repeat: int) -> list[float]:
    runs = []
    for _ in range(repeat):
        start = time.perf_counter()
        out = subprocess.run(cmd, capture_output=True)
        runs.append(time.perf_counter() - start)
        if out.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)} exited {out.returncode}: {out.stderr.decode()[-500:]}")
    return runs


def import_times(cmd: list[str]) -> dict[str, float]:
    """Cumulative import seconds of a few top-level packages in one run of ``cmd`` (python -X importtime)."""
    out = subprocess.run([sys.executable, "-X", "importtime", "-m", "ncaudit", *cmd[1:]], capture_output=True,
                         text=True)
    found: dict[str, float] = {}
    for line in out.stderr.splitlines():
        match = re.match(r"import time:\s+\d+ \|\s+(\d+) \|( *)(\S+)$", line)
        if match and match.group(3) in ("torch", "h5py", "numpy", "typer", "ncaudit.cli", "ncaudit.audit",
                                        "ncaudit.report"):
            found[match.group(3)] = int(match.group(1)) / 1e6  # each is imported once: its cumulative time
    return found


def summary(name: str, runs: list[float]) -> str:
    return (f"{name}: best {min(runs):.2f} s, median {statistics.median(runs):.2f} s, worst {max(runs):.2f} s "
            f"({len(runs)} runs: {', '.join(f'{r:.2f}' for r in runs)})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, help="the e200 train cache (default: extract it to a temporary file)")
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="ncaudit-bench-") as tmp:
        cache = args.cache or extract(Path(tmp) / "e200-train.h5")
        report = ["ncaudit", "report", str(cache), "--json", "-q"]
        results = {"ncaudit --help": timed(["ncaudit", "--help"], args.repeat),
                   "ncaudit report e200-train.h5 --json -q": timed(report, args.repeat),
                   "ncaudit report ... --format markdown --junit": timed(
                       ["ncaudit", "report", str(cache), "-q", "--format", "markdown", "--fail-if", "nc1>0.01",
                        "--junit", str(Path(tmp) / "j.xml")], args.repeat)}
        for name, runs in results.items():
            print(summary(name, runs))
        imports = import_times(report)
        print("imports in one report run (cumulative, s; nested: torch is inside ncaudit.audit): "
              + ", ".join(f"{k} {v:.2f}" for k, v in imports.items()))
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", _IN_PROCESS, str(cache)], check=True)
        print(f"(that process took {time.perf_counter() - start:.2f} s)")


_IN_PROCESS = """
import sys, time
start = time.perf_counter()
from ncaudit.audit import AuditOptions, audit
imported = time.perf_counter()
audit(sys.argv[1], AuditOptions(device="cpu"))
done = time.perf_counter()
print(f"in one process: import {imported - start:.2f} s, audit {done - imported:.2f} s")
"""


if __name__ == "__main__":
    main()
