"""The embedded default: the whole pipeline on the bundled digits fixtures.

``fixtures/checkpoints/manifest.json`` lists checkpoints of timm ``test_resnet`` trained on scikit-learn's real 8x8
handwritten digits (``fixtures/digits/{train,test}``) into the terminal phase of training, with the transform they
were trained with. :func:`run_demo` extracts every checkpoint on both splits, audits each cache and groups the
results into a trajectory (the machinery of ``ncaudit run``, :mod:`ncaudit._run`): the collapse of the PNAS paper,
happening on a laptop.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ncaudit._run import RunCheckpoint, RunResult, audit_run
from ncaudit.audit import AuditOptions
from ncaudit.errors import InputError

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
    "a property of the training data first.\n\n"
    "The second table asks the same of the test images the way the literature on test-set collapse does (Hui et al. "
    "2022, Galanti et al. 2022): nearest-class-mean accuracy, NC4 and CDNV against the class means of the training "
    "images (train μ), next to the same quantities against the test images' own means (own μ), which read the test "
    "labels."
)


def default_fixtures() -> Path:
    """The bundled fixtures: ``NCAUDIT_FIXTURES``, else ``fixtures/`` beside the package (a source checkout)."""
    env = os.environ.get("NCAUDIT_FIXTURES")
    return Path(env) if env else Path(__file__).resolve().parents[1] / "fixtures"


#: What :func:`run_demo` returns: the trajectory, the audits and the files written (:class:`ncaudit._run.RunResult`).
DemoResult = RunResult


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
    fail_if: list[str] | None = None,
) -> RunResult:
    """Extract every bundled checkpoint on the train and test digits into ``out``, audit each, build the trajectory:
    :func:`ncaudit._run.audit_run` on the bundled run, every cache extracted afresh, the test split audited against
    both its own and the training class means.

    Parameters
    ----------
    out
        Directory for ``caches/``, ``reports/``, ``trajectory.json``, ``trajectory.csv`` and ``trajectory.png``.
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
    fail_if
        ``--fail-if`` expressions, evaluated on the last checkpoint (``RunResult.checks``).
    """
    fixtures = fixtures or default_fixtures()
    manifest = load_manifest(fixtures)
    chosen = sorted(manifest["checkpoints"], key=lambda c: c["epoch"])
    if epochs is not None:
        chosen = [c for c in chosen if c["epoch"] in set(epochs)]
        if not chosen:
            have = ", ".join(str(c["epoch"]) for c in manifest["checkpoints"])
            raise InputError(f"no bundled checkpoint at epochs {epochs}; the fixtures have epochs {have}")
    checkpoints = [RunCheckpoint(f"e{c['epoch']:03d}", fixtures / "checkpoints" / c["file"]) for c in chosen]
    # The transform comes from each checkpoint's own metadata.
    return audit_run(manifest.get("model", "test_resnet"), checkpoints, fixtures / "digits", out, splits=SPLITS,
                     extract_options={"device": device, "precision": "fp32", "batch_size": 256, "workers": 0,
                                      "progress": False},
                     audit_options=AuditOptions(device=device), overwrite=True, plot=plot, fail_if=fail_if,
                     title="test_resnet on the digits: Neural Collapse across training", progress=progress)
