"""Benchmark: ``audit_model`` on the bundled digits against ``extract`` + ``report`` end to end.

Usage::

    python bench/audit_model.py                   # 3 interleaved rounds, the train split (1,438 images)
    python bench/audit_model.py --rounds 5 --split test --json

Each round runs, as fresh processes (wall time from this parent, imports included):

* ``extract+report``  ``python -m ncaudit extract -m test_resnet -c <e200> -d fixtures/digits --split S -o X.h5``
  then ``python -m ncaudit report X.h5 --json -q`` (two processes, as a user runs them);
* ``audit_model``     one process that builds the same network from the same checkpoint, a DataLoader over the
  same images with the checkpoint's recorded transform, and calls :func:`ncaudit.audit_model` (two passes of the
  network over the images, no file written).

Inside that process the time of the ``audit_model`` call alone is also recorded (``in-process``: what a training loop
pays per audit, the model and loader already there), and likewise ``extract()`` + ``audit_cache()`` called in one
process. Both contenders use the DataLoader in this process (``--workers 0``) and one thread count, so the comparison
is of the pipelines, not of worker start-up. The figures are min / median / max over rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHECKPOINT = ROOT / "fixtures" / "checkpoints" / "test_resnet_digits_e200.safetensors"

_AUDIT_MODEL = """
import json, sys, time
t0 = time.perf_counter()
sys.path.insert(0, {root!r})
import torch
from ncaudit import audit_model
from ncaudit.data import build_transform, open_dataset, transform_config
from ncaudit.models import Weights, load_model, recorded_preprocessing
loaded = load_model("test_resnet", Weights("checkpoint", checkpoint={ckpt!r}))
cfg = {cfg!r}
data = open_dataset({data!r}, split={split!r}, transform=build_transform(cfg))
loader = torch.utils.data.DataLoader(data.dataset, batch_size=64)
t1 = time.perf_counter()
result = audit_model(loaded.model, loader)
t2 = time.perf_counter()
print(json.dumps({{"setup": t1 - t0, "audit_model": t2 - t1, "nc1": result.metrics["nc1"]}}))
"""

_IN_PROCESS_PIPELINE = """
import json, sys, time
sys.path.insert(0, {root!r})
from ncaudit import AuditOptions, audit_cache
from ncaudit.extract import extract
t1 = time.perf_counter()
extract("test_resnet", {ckpt!r}, {data!r}, {out!r}, split={split!r}, workers=0, progress=False, batch_size=64,
        overwrite=True)
result = audit_cache({out!r}, AuditOptions(device="cpu"))
t2 = time.perf_counter()
print(json.dumps({{"extract+audit_cache": t2 - t1, "nc1": result.metrics["nc1"]}}))
"""


def _wall(cmd: list[str], env: dict[str, str]) -> tuple[float, str]:
    t0 = time.perf_counter()
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t0
    if run.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:4])} ... failed:\n{run.stderr[-2000:]}")
    return wall, run.stdout


def _spread(values: list[float]) -> dict[str, float]:
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--split", default="train")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "HF_HUB_OFFLINE": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    data = str(ROOT / "fixtures" / "digits")
    times: dict[str, list[float]] = {k: [] for k in ("extract+report", "audit_model", "in-process audit_model",
                                                     "in-process extract+audit_cache")}
    nc1: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        cache = str(Path(tmp) / "digits.h5")
        cfg = None
        for _ in range(args.rounds):
            w1, _ = _wall([sys.executable, "-m", "ncaudit", "extract", "-m", "test_resnet", "-c", str(CHECKPOINT),
                           "-d", data, "--split", args.split, "-o", cache, "--workers", "0", "--no-progress",
                           "--batch-size", "64", "--overwrite", "--device", "cpu"], env)
            w2, out = _wall([sys.executable, "-m", "ncaudit", "report", cache, "--json", "-q", "--device", "cpu"], env)
            times["extract+report"].append(w1 + w2)
            nc1["extract+report"] = json.loads(out)["metrics"]["nc1"]
            if cfg is None:
                import h5py

                with h5py.File(cache, "r") as f:
                    cfg = json.loads(f.attrs["transform"])
            code = _AUDIT_MODEL.format(root=str(ROOT), ckpt=str(CHECKPOINT), cfg=cfg, data=data, split=args.split)
            w3, out = _wall([sys.executable, "-c", code], env)
            inner = json.loads(out.strip().splitlines()[-1])
            times["audit_model"].append(w3)
            times["in-process audit_model"].append(inner["audit_model"])
            nc1["audit_model"] = inner["nc1"]
            code = _IN_PROCESS_PIPELINE.format(root=str(ROOT), ckpt=str(CHECKPOINT), data=data, split=args.split,
                                               out=str(Path(tmp) / "inproc.h5"))
            _, out = _wall([sys.executable, "-c", code], env)
            times["in-process extract+audit_cache"].append(json.loads(out.strip().splitlines()[-1])
                                                           ["extract+audit_cache"])
    summary = {k: _spread(v) for k, v in times.items()}
    print(f"digits {args.split}, {args.rounds} rounds, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}; "
          f"nc1 {nc1}", file=sys.stderr)
    for name, s in summary.items():
        print(f"{name:32s} {s['median']:7.2f} s  (min {s['min']:.2f}, max {s['max']:.2f})")
    if args.json:
        print(json.dumps({"seconds": times, "summary": summary, "nc1": nc1}, indent=2))


if __name__ == "__main__":
    main()
