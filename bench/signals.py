"""How fast SIGTERM (and Ctrl-C) stops each command, in every stage: a command is started, signalled after a range of
delays (so that the signal lands in each of its stages in turn), and the time from the signal to the process's exit
is measured, with its exit code and last line.

    python bench/signals.py                 # report, trajectory and extract on generated data, SIGTERM
    python bench/signals.py --signal INT    # Ctrl-C instead
    python bench/signals.py --rows 400000   # a larger cache (longer passes)

Every run is a fresh process (import included); the stage a signal lands in is read off the elapsed time and the
command's own timings (printed once per command). Exit codes: 143 for SIGTERM, 130 for SIGINT; a run that finished
before the signal is shown as such.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
            "HF_HUB_OFFLINE": "1"}


def make_cache(path: Path, rows: int, p: int, classes: int) -> Path:
    import numpy as np

    from ncaudit.cache import write_cache
    rng = np.random.default_rng(0)
    y = rng.integers(0, classes, rows)
    h = (rng.standard_normal((rows, p)) + 3 * rng.standard_normal((classes, p))[y]).astype(np.float32)
    w = rng.standard_normal((classes, p)).astype(np.float32)
    return write_cache(path, h, y, weight=w, overwrite=True)


def measure(cmd: list[str], delay: float, sig: int, timeout: float = 120.0) -> tuple[float, int, str]:
    """``(seconds from the signal to exit, exit code, last stderr line)``; seconds is -1 when it finished first."""
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    time.sleep(delay)
    if proc.poll() is not None:
        return -1.0, proc.returncode, (proc.stderr.read().strip().splitlines() or [""])[-1]
    sent = time.perf_counter()
    proc.send_signal(sig)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return timeout, proc.returncode, "(killed: did not stop)"
    took = time.perf_counter() - sent
    err = proc.stderr.read().strip().splitlines()
    return took, proc.returncode, err[-1][:150] if err else ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--signal", default="TERM", choices=["TERM", "INT"])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--p", type=int, default=512)
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--delays", default="0.5,1,1.5,2,3,4,6,8,10,13")
    args = parser.parse_args()
    sig = signal.SIGTERM if args.signal == "TERM" else signal.SIGINT
    delays = [float(d) for d in args.delays.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        cache = make_cache(Path(tmp) / "c.h5", args.rows, args.p, args.classes)
        data = ROOT / "fixtures" / "digits"
        ckpt = ROOT / "fixtures" / "checkpoints" / "test_resnet_digits_e200.safetensors"
        py = [sys.executable, "-m", "ncaudit"]
        commands = {
            "report": py + ["report", str(cache), "--json", "--batch-size", "4096"],
            "trajectory": py + ["trajectory", str(cache), str(cache), "--json"],
            "extract": py + ["extract", "-m", "test_resnet", "-c", str(ckpt), "-d", str(data), "--split", "train",
                             "-o", str(Path(tmp) / "e.h5"), "--overwrite", "--no-progress", "-j", "2", "-b", "32",
                             "--img-size", "64"],
            "extract -j 0": py + ["extract", "-m", "test_resnet", "-c", str(ckpt), "-d", str(data), "--split",
                                  "train", "-o", str(Path(tmp) / "f.h5"), "--overwrite", "--no-progress", "-j", "0",
                                  "-b", "32", "--img-size", "64"],
        }
        for name, cmd in commands.items():
            start = time.perf_counter()
            done = subprocess.run(cmd, env=_env(), capture_output=True, text=True, check=False)
            whole = time.perf_counter() - start
            print(f"\n{name}: runs {whole:.1f} s to the end (exit {done.returncode}); SIG{args.signal} after ...")
            worst = 0.0
            for delay in delays:
                if delay >= whole:
                    break
                took, code, line = measure(cmd, delay, sig)
                worst = max(worst, took)
                shown = "finished first" if took < 0 else f"stopped in {took:.2f} s"
                print(f"  {delay:5.1f} s: {shown}, exit {code}: {line}")
            print(f"  slowest stop: {worst:.2f} s")


if __name__ == "__main__":
    main()
