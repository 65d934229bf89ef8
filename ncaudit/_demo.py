"""The embedded default: the whole pipeline on the bundled digits fixtures.

``fixtures/checkpoints/manifest.json`` lists checkpoints of timm ``test_resnet`` trained on scikit-learn's real 8x8
handwritten digits (``fixtures/digits/{train,test}``) into the terminal phase of training, with the transform they
were trained with. :func:`run_demo` extracts every checkpoint on both splits, audits each cache and groups the
results into a trajectory: the collapse of the PNAS paper, happening on a laptop.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ncaudit.audit import AuditOptions, AuditResult, TrajectoryRow, audit, build_rows
from ncaudit.errors import InputError
from ncaudit.report import render_json, write_text_atomic

SPLITS = ("train", "test")

#: What the demo shows, as paragraphs (one line each: the terminal wraps them).
EXPLANATION = (
    "What you are looking at: timm's test_resnet (0.37 M parameters, 96 penultimate features) trained with SGD and "
    "weight decay on 1,438 real 8x8 handwritten digits, audited at checkpoints from initialisation (epoch 0) to epoch "
    "200. Every row is a real extraction and report of that checkpoint, on the training images and on 359 held-out "
    "test images.\n\n"
    "Read it as the PNAS figures: training accuracy reaches 1.0, and the network keeps going into the terminal phase. "
    "NC1 (within-class spread over between-class spread) falls by orders of magnitude; the class means and "
    "classifier rows approach an equinorm, equiangular simplex (NC2 -> 0) and each other (NC3 -> 0); the "
    "classifier's decisions become the nearest class mean's (NC4 -> 0). Test NC1 stays above train NC1: collapse is "
    "a property of the training data first."
)


def default_fixtures() -> Path:
    """The bundled fixtures: ``NCAUDIT_FIXTURES``, else ``fixtures/`` beside the package (a source checkout)."""
    env = os.environ.get("NCAUDIT_FIXTURES")
    return Path(env) if env else Path(__file__).resolve().parents[1] / "fixtures"


@dataclass
class DemoResult:
    """The trajectory rows, the audits behind them and the files written under ``out``."""

    rows: list[TrajectoryRow]
    results: list[AuditResult]
    caches: list[Path]
    reports: list[Path] = field(default_factory=list)
    plot: Path | None = None


def load_manifest(fixtures: Path) -> dict[str, Any]:
    """The checkpoints manifest, with a clear error when the fixtures are not there."""
    path = fixtures / "checkpoints" / "manifest.json"
    if not path.is_file():
        raise InputError(f"bundled fixtures not found ({path} is missing); run from a source checkout of ncaudit, "
                         "or pass --fixtures DIR (or set NCAUDIT_FIXTURES)")
    try:
        manifest = json.loads(path.read_text())
        _ = [(c["epoch"], c["file"]) for c in manifest["checkpoints"]]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise InputError(f"{path}: not a valid fixtures manifest ({exc}); regenerate it with fixtures/make_digits.py")\
            from None
    return manifest


def run_demo(
    out: Path,
    *,
    fixtures: Path | None = None,
    device: str = "cpu",
    epochs: list[int] | None = None,
    plot: bool = True,
    progress: Callable[[str], None] | None = None,
) -> DemoResult:
    """Extract every bundled checkpoint on the train and test digits into ``out``, audit each, build the trajectory.

    Parameters
    ----------
    out
        Directory for ``caches/``, ``reports/`` and ``trajectory.png``.
    fixtures
        Fixtures directory (default :func:`default_fixtures`).
    device
        Device of both extraction and audit.
    epochs
        Only these checkpoints (default: all in the manifest).
    plot
        Draw ``trajectory.png`` when matplotlib is installed.
    progress
        Called with a line of text before each step.
    """
    from ncaudit.extract import extract

    fixtures = fixtures or default_fixtures()
    manifest = load_manifest(fixtures)
    checkpoints = sorted(manifest["checkpoints"], key=lambda c: c["epoch"])
    if epochs is not None:
        checkpoints = [c for c in checkpoints if c["epoch"] in set(epochs)]
        if not checkpoints:
            have = ", ".join(str(c["epoch"]) for c in manifest["checkpoints"])
            raise InputError(f"no bundled checkpoint at epochs {epochs}; the fixtures have epochs {have}")
    say = progress or (lambda line: None)
    (out / "caches").mkdir(parents=True, exist_ok=True)
    (out / "reports").mkdir(parents=True, exist_ok=True)
    caches, results, reports = [], [], []
    steps = len(checkpoints) * len(SPLITS)
    for i, ckpt in enumerate(checkpoints):
        for j, split in enumerate(SPLITS):
            step = i * len(SPLITS) + j + 1
            cache = out / "caches" / f"e{ckpt['epoch']:03d}_{split}.h5"
            say(f"[{step}/{steps}] epoch {ckpt['epoch']:>3}, {split}: extract + report")
            extract(  # the transform comes from each checkpoint's own metadata
                manifest.get("model", "test_resnet"), fixtures / "checkpoints" / ckpt["file"],
                fixtures / "digits", cache, split=split, device=device, precision="fp32", batch_size=256,
                workers=0, overwrite=True, progress=False,
            )
            result = audit(cache, AuditOptions(device=device))
            report = out / "reports" / f"e{ckpt['epoch']:03d}_{split}.json"
            write_text_atomic(report, render_json(result) + "\n")
            caches.append(cache)
            results.append(result)
            reports.append(report)
    rows = build_rows(results)
    plot_path = None
    if plot:
        try:
            from ncaudit.report import plot_trajectory

            plot_path = plot_trajectory(rows, out / "trajectory.png",
                                        title="test_resnet on the digits: Neural Collapse across training")
        except InputError:
            plot_path = None  # matplotlib missing: the caller says so
    return DemoResult(rows=rows, results=results, caches=caches, reports=reports, plot=plot_path)
