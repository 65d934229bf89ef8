"""Audit a training run: every checkpoint on every split, extracted (resumably), audited and lined up.

:func:`audit_run` is what ``ncaudit run`` does for the user's checkpoints and what ``ncaudit demo`` does for the
bundled ones: one cache per checkpoint and split under ``OUT/caches`` (a finished cache of the same checkpoint,
split and sample is kept, a partial one is resumed), one JSON report per cache under ``OUT/reports``, and the
trajectory as ``OUT/trajectory.json``, ``OUT/trajectory.csv`` and ``OUT/trajectory.png``.
"""

from __future__ import annotations

import glob
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ncaudit.audit import (
    METRIC_KEYS,
    TRAIN_SPLITS,
    AuditOptions,
    AuditResult,
    ProgressTracker,
    TrajectoryRow,
    audit_trajectory,
    gate_last_row,
    parse_checks,
)
from ncaudit.cache import FeatureCache
from ncaudit.errors import InputError
from ncaudit.report import render_json, render_trajectory_csv, render_trajectory_json, write_text_atomic

#: Checkpoint files ``--checkpoints`` picks up from a directory.
CHECKPOINT_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors", ".tar", ".ckpt")
_DIGITS = re.compile(r"(\d+)")


@dataclass(frozen=True)
class RunCheckpoint:
    """One checkpoint of a run: ``name`` names its caches and reports (``NAME_SPLIT.h5``)."""

    name: str
    path: Path


@dataclass
class RunResult:
    """The trajectory rows, the audits behind them and the files written under ``out``.

    ``extracted`` lists the caches written (or resumed) by this call, ``kept`` those already finished and kept;
    ``checks`` is the outcome of the ``--fail-if`` checks on the last row.
    """

    rows: list[TrajectoryRow]
    results: list[AuditResult]
    caches: list[Path]
    reports: list[Path] = field(default_factory=list)
    extracted: list[Path] = field(default_factory=list)
    kept: list[Path] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    checks: list[dict[str, Any]] = field(default_factory=list)
    trajectory_json: Path | None = None
    trajectory_csv: Path | None = None
    plot: Path | None = None


def _natural(text: str) -> list[Any]:
    return [int(part) if part.isdigit() else part for part in _DIGITS.split(text)]


def find_checkpoints(patterns: Sequence[str]) -> list[RunCheckpoint]:
    """The checkpoint files that ``patterns`` (files, directories or glob patterns such as ``runs/r50/epoch_*.pth``)
    name, each once, in natural order of their names (``epoch_5`` before ``epoch_50``): the order of training.

    Raises
    ------
    InputError
        A pattern that matches nothing, or two checkpoints with the same file name (their caches would collide).
    """
    found: dict[str, Path] = {}
    for pattern in patterns:
        path = Path(pattern).expanduser()
        if path.is_dir():
            matches = sorted(str(p) for p in path.iterdir() if p.suffix.lower() in CHECKPOINT_SUFFIXES)
        else:
            matches = sorted(glob.glob(str(path))) if glob.has_magic(str(path)) else ([str(path)] if path.exists()
                                                                                      else [])
        matches = [m for m in matches if Path(m).is_file()]
        if not matches:
            raise InputError(f"--checkpoints {pattern}: no checkpoint file there; give files, a directory or a quoted "
                             "glob pattern such as 'runs/r50/epoch_*.pth'")
        for match in matches:
            found.setdefault(os.path.realpath(match), Path(match))
    checkpoints = sorted(found.values(), key=lambda p: (_natural(p.name), str(p)))
    names = [_stem(p) for p in checkpoints]
    for name in set(names):
        twins = [str(p) for p, n in zip(checkpoints, names) if n == name]
        if len(twins) > 1:
            raise InputError(f"--checkpoints: {twins[0]} and {twins[1]} have the same name, so their caches would "
                             "collide; run them into different --out directories")
    return [RunCheckpoint(name, path) for name, path in zip(names, checkpoints)]


def _stem(path: Path) -> str:
    name = path.name
    for suffix in (".pth.tar", *CHECKPOINT_SUFFIXES):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def _make_out(out: Path) -> None:
    """``out/caches`` and ``out/reports``, or one line saying why they cannot be made."""
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out}: is a file; give a directory (created when missing) for the caches, reports "
                         "and plot")
    try:
        (out / "caches").mkdir(parents=True, exist_ok=True)
        (out / "reports").mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"--out {out}: cannot create the directory ({exc.strerror or exc}); give a writable "
                         "directory") from None


def _finished(cache: Path, checkpoint: RunCheckpoint, split: str, limit: int | None, model: str,
              data: str | os.PathLike[str] | None) -> bool | None:
    """True: ``cache`` is complete and holds this checkpoint's ``split`` (same model, sha256 and --limit, data under
    the same root); False: it is partial (resume it: extract checks every option then); None: there is none.

    Raises
    ------
    InputError
        A complete cache of another checkpoint, model, split, sample or dataset (rerun with ``overwrite``).
    """
    if not cache.exists():
        return None
    from ncaudit.models import file_sha256

    try:
        with FeatureCache(cache, allow_partial=True) as fc:
            complete, attrs = fc.info.complete, fc.info.attrs
    except InputError:
        return False  # unreadable or empty: extract decides (resume, or one line naming the problem)
    if not complete:
        return False
    expected = {"model": model, "checkpoint_sha256": file_sha256(checkpoint.path), "split": split,
                "limit": int(limit or 0)}
    root = Path(data).expanduser() if data is not None else None
    if root is not None and root.exists() and attrs.get("data"):  # a local dataset: the cache's data lie below it
        if not Path(str(attrs["data"])).resolve().is_relative_to(root.resolve()):
            expected["data"] = str(root.resolve())
    for key, value in expected.items():
        if attrs.get(key) != value:
            raise InputError(f"{cache}: holds another run's features (its {key} is {str(attrs.get(key))[:40]!r}, "
                             f"this run's {str(value)[:40]!r}); pass --overwrite to extract again, or another --out")
    return True


def audit_run(
    model: str,
    checkpoints: Sequence[RunCheckpoint],
    data: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    splits: Sequence[str] = ("train", "test"),
    extract_options: dict[str, Any] | None = None,
    audit_options: AuditOptions = AuditOptions(),
    train_means: bool = True,
    overwrite: bool = False,
    plot: bool = True,
    title: str | None = None,
    fail_if: Sequence[str] | None = None,
    progress: Callable[[str], None] | None = None,
    audit_progress: ProgressTracker | None = None,
) -> RunResult:
    """Extract every checkpoint on every split into ``out``, audit each cache and write the trajectory.

    Parameters
    ----------
    model
        The architecture (timm name, ``hf-hub:``, ``torchvision:NAME``) of every checkpoint.
    checkpoints
        In training order (:func:`find_checkpoints`).
    data, splits
        The dataset root and its splits; each split is a cache per checkpoint.
    out
        Directory of ``caches/``, ``reports/``, ``trajectory.json``, ``trajectory.csv`` and ``trajectory.png``.
    extract_options
        Keyword arguments of :func:`ncaudit.extract.extract` (dataset, limit, device, precision, batch size,
        workers, transform, class map, ...).
    audit_options
        How each cache is audited.
    train_means
        Audit the other splits against the class means of the training split of the same checkpoint as well
        (test-set collapse; :func:`ncaudit.audit.audit_trajectory`), when ``splits`` has a training split.
    overwrite
        Extract every cache again; otherwise a finished cache of the same checkpoint, split and sample is kept and a
        partial one is resumed.
    plot, title
        Draw ``trajectory.png`` when matplotlib is installed, titled ``title`` (default: from the caches'
        provenance).
    fail_if
        ``--fail-if`` expressions, checked before anything is extracted and evaluated on the last row
        (:func:`ncaudit.audit.gate_last_row`); the outcome is ``RunResult.checks`` and goes into ``trajectory.json``.
    progress
        Called with a line of text before each step.
    audit_progress
        The progress display of the audits.

    Raises
    ------
    InputError
        Bad input anywhere: ``out`` a file, a cache of another run in the way, any extraction or audit error.
    """
    from ncaudit.extract import extract

    out, say = Path(out), progress or (lambda line: None)
    if not checkpoints:
        raise InputError("no checkpoints to audit; pass --checkpoints")
    if not splits:
        raise InputError("--splits is empty; name the splits to extract, e.g. train,test")
    parse_checks(fail_if, [*METRIC_KEYS, *(f"{split}.{key}" for split in splits for key in METRIC_KEYS)])
    _make_out(out)
    options = dict(extract_options or {})
    caches, extracted, kept = [], [], []
    steps = len(checkpoints) * len(splits)
    for i, ckpt in enumerate(checkpoints):
        for j, split in enumerate(splits):
            step = f"[{i * len(splits) + j + 1}/{steps}] {ckpt.name}, {split}"
            cache = out / "caches" / f"{ckpt.name}_{split}.h5"
            state = None if overwrite else _finished(cache, ckpt, split, options.get("limit"), model, data)
            caches.append(cache)
            if state:
                say(f"{step}: kept (finished earlier)")
                kept.append(cache)
                continue
            say(f"{step}: extract" + (" (resumed)" if state is False else ""))
            extract(model, ckpt.path, data, cache, split=split, overwrite=overwrite, resume=state is False, **options)
            extracted.append(cache)
    say(f"audit {len(caches)} caches")
    pair = train_means and len(splits) > 1 and any(split in TRAIN_SPLITS for split in splits)
    rows, warnings = audit_trajectory(caches, audit_options, audit_progress, train_means=pair)
    result = RunResult(rows=rows, results=[], caches=caches, extracted=extracted, kept=kept, warnings=warnings,
                       checks=gate_last_row(rows, fail_if))
    by_path = {os.path.realpath(r.source["path"]): r for row in rows for r in row.splits.values()}
    for cache in caches:
        audited = by_path[os.path.realpath(cache)]
        report = out / "reports" / f"{cache.stem}.json"
        write_text_atomic(report, render_json(audited) + "\n")
        result.results.append(audited)
        result.reports.append(report)
    result.trajectory_json, result.trajectory_csv = out / "trajectory.json", out / "trajectory.csv"
    write_text_atomic(result.trajectory_json, render_trajectory_json(rows, result.checks) + "\n")
    write_text_atomic(result.trajectory_csv, render_trajectory_csv(rows))
    if plot:
        try:
            from ncaudit.report import plot_trajectory, provenance_title

            result.plot = plot_trajectory(rows, out / "trajectory.png", title=title or provenance_title(rows))
        except InputError as exc:
            if "matplotlib" not in str(exc):
                raise
            result.plot = None  # matplotlib missing: the caller says so
    return result
