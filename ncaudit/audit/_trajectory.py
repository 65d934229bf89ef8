"""Trajectories: the metrics of several caches (checkpoints of one training run, on one or two splits) as rows.

Caches are grouped by checkpoint (its sha256, else its path, else the cache's own path); each group is one row in
the order the caches were given, with the train and test splits side by side. A row is labelled by the checkpoint's
epoch when the provenance says it (attribute ``epoch``, the checkpoint's metadata, or an ``e123`` / ``epoch123``
pattern in its file name), else by the checkpoint's or the cache's file name.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ncaudit.audit._audit import audit
from ncaudit.audit._checks import evaluate, parse_checks, require_baseline
from ncaudit.audit._options import AuditOptions, ProgressTracker
from ncaudit.audit._result import METRIC_KEYS, AuditResult
from ncaudit.cache import CacheInfo, FeatureCache
from ncaudit.errors import InputError

#: Columns of the trajectory table, in order: (metric key, header). Accuracy, NC1 and NC4 get one column per split.
COLUMNS: list[tuple[str, str]] = [
    ("accuracy", "acc"),
    ("nc1", "NC1"),
    ("nc2_equinorm_means", "NC2\nnorm μ"),
    ("nc2_equinorm_classifier", "NC2\nnorm W"),
    ("nc2_equiangle_means", "NC2\nangle μ"),
    ("nc2_equiangle_classifier", "NC2\nangle W"),
    ("nc3", "NC3"),
    ("nc4", "NC4"),
    ("mse_term_b", "term B"),
    ("ls_distance", "LS dist"),
    ("nc1_precision_floor", "floor"),
]
#: The columns that fit an 80-column terminal (``--wide`` shows every column, ``--json`` every metric).
NARROW_COLUMNS = ("accuracy", "nc1", "nc2_equinorm_means", "nc2_equiangle_means", "nc3", "nc4")
#: Metrics shown for every split side by side (in the narrow table NC4 only for the primary split).
PER_SPLIT = ("accuracy", "nc1", "nc4")

_EPOCH_PATTERN = re.compile(r"(?:^|[^a-z])(?:epoch|ep|e)[_-]?(\d+)(?:[^0-9]|$)", re.IGNORECASE)
TRAIN_SPLITS = ("train", "training")


@dataclass
class TrajectoryRow:
    """One checkpoint: its label, epoch (or None) and one audit per split (``train``, ``test``, ...)."""

    key: str
    label: str
    epoch: int | None
    checkpoint: str | None
    splits: dict[str, AuditResult] = field(default_factory=dict)

    @property
    def primary_split(self) -> str:
        """The split whose metrics head the row: train when present, else the first one given."""
        for name in self.splits:
            if name in TRAIN_SPLITS:
                return name
        return next(iter(self.splits))

    @property
    def primary(self) -> AuditResult:
        return self.splits[self.primary_split]

    def value(self, key: str) -> float | None:
        """A metric of the primary split, or ``split.key`` (e.g. ``test.accuracy``) of another one."""
        if "." in key:
            split, metric = key.split(".", 1)
            result = self.splits.get(split)
            return None if result is None else result.metrics.get(metric)
        return self.primary.metrics.get(key)

    def uncertainty(self, key: str) -> Any:
        """The relative uncertainty of :meth:`value` (``details.uncertainty`` of its split; None when not stated)."""
        split, _, metric = key.rpartition(".")
        result = self.splits.get(split) if split else self.primary
        return None if result is None else (result.details.get("uncertainty") or {}).get(metric)


def epoch_of(source: dict[str, Any]) -> int | None:
    """The epoch recorded in a cache's provenance, or parsed from the checkpoint's file name."""
    for value in (source.get("epoch"), _metadata(source).get("epoch")):
        try:
            if value is not None and str(value).strip() != "":
                return int(float(value))
        except (TypeError, ValueError):
            pass
    name = Path(str(source.get("checkpoint") or "")).stem
    match = _EPOCH_PATTERN.search(name)
    return int(match.group(1)) if match else None


def _metadata(source: dict[str, Any]) -> dict[str, Any]:
    meta = source.get("checkpoint_metadata")
    if isinstance(meta, str) and meta:
        try:
            meta = json.loads(meta)
        except json.JSONDecodeError:
            return {}
    return meta if isinstance(meta, dict) else {}


def split_of(source: dict[str, Any]) -> str:
    """The dataset split of a cache: its ``split`` attribute (``extract --split``, or the dataset's own), else the
    name of its data directory when that names a split (``.../val``), else ``data``. Never the cache's file name."""
    split = source.get("split")
    if split:
        return str(split)
    from ncaudit.data._source import SPLIT_NAMES
    return SPLIT_NAMES.get(Path(str(source.get("data") or "")).name.lower(), "data")


def dataset_of(source: dict[str, Any]) -> str:
    """The dataset a cache was extracted from, by name: a ``torch/``, ``hfds/`` or ``wds/`` name, else its data
    directory (the parent of a split directory such as ``.../digits/train``); "" when the cache does not say."""
    kind = str(source.get("dataset") or "")
    if "/" in kind:
        return kind.split("/", 1)[1]
    data = str(source.get("data") or "")
    if not data:
        return ""
    from ncaudit.data._source import SPLIT_NAMES
    path = Path(data)
    return path.parent.name if path.name.lower() in SPLIT_NAMES and path.parent.name else path.name


def checkpoint_key(source: dict[str, Any]) -> str:
    """What identifies a cache's checkpoint: its sha256, else its path, else the random init, else the cache."""
    init = f"{source.get('model')} {source.get('weights_source')}" if source.get("weights") == "random-init" else ""
    return str(source.get("checkpoint_sha256") or source.get("checkpoint") or init or source.get("path"))


def build_rows(results: Sequence[AuditResult]) -> list[TrajectoryRow]:
    """Group audits by checkpoint (in the given order) with their splits side by side."""
    rows: dict[str, TrajectoryRow] = {}
    for result in results:
        src = result.source
        checkpoint = src.get("checkpoint") or None
        key = checkpoint_key(src)
        split = split_of(src)
        row = rows.get(key)
        if row is None or split in row.splits:
            if row is not None:  # the same checkpoint and split again: keep both, as separate rows
                key = f"{key}#{len(rows)}"
            epoch = epoch_of(src)
            if epoch is not None:
                label = f"epoch {epoch}"
            elif src.get("weights") == "pretrained":  # the cached file is model.safetensors: name the model
                label = str(src.get("model"))
            else:
                label = Path(str(checkpoint or src.get("path", "?"))).stem
            row = rows[key] = TrajectoryRow(key=key, label=label, epoch=epoch, checkpoint=checkpoint)
        row.splits[split] = result
    return list(rows.values())


def check_caches(infos: Sequence[CacheInfo], *, mixed: bool = False) -> list[str]:
    """Refuse caches that cannot be rows of one run (another number of classes, feature width or model) unless
    ``mixed``; return warnings: a file given twice, and with ``mixed`` the differences let through.

    Raises
    ------
    InputError
        Caches of different class counts, feature widths or models without ``mixed``.
    """
    warnings = []
    first = infos[0] if infos else None
    seen: dict[str, int] = {}
    for i, info in enumerate(infos):
        real = os.path.realpath(info.path)
        if real in seen:
            warnings.append(f"{info.path} is given twice (caches {seen[real] + 1} and {i + 1}): its rows appear twice")
        seen.setdefault(real, i)
        if first is None or i == 0:
            continue
        clash = _run_clash(first, info)
        if clash is None:
            continue
        if not mixed:
            raise InputError(f"trajectory: {clash}: not one run's checkpoints; pass --mixed to line them up anyway")
        warnings.append(f"--mixed: {clash}")
    return warnings


def _run_clash(first: CacheInfo, info: CacheInfo) -> str | None:
    if info.num_classes != first.num_classes:
        return f"{info.path} has {info.num_classes} classes, {first.path} {first.num_classes}"
    if info.n_features != first.n_features:
        return f"{info.path} holds {info.n_features} features per sample, {first.path} {first.n_features}"
    a, b = first.attrs.get("model"), info.attrs.get("model")
    if a and b and a != b:
        return f"{info.path} comes from model {b!r}, {first.path} from {a!r}"
    return None


def training_pairs(infos: Sequence[CacheInfo]) -> list[Path | None]:
    """For each cache, the training cache of the same checkpoint whose class means it is audited against (None for a
    training split itself).

    Raises
    ------
    InputError
        A cache of another split whose checkpoint has no training cache among ``infos``.
    """
    train: dict[str, Path] = {}
    for info in infos:
        source = {"path": str(info.path), **info.attrs}
        if split_of(source) in TRAIN_SPLITS:
            train.setdefault(checkpoint_key(source), info.path)
    pairs: list[Path | None] = []
    for info in infos:
        source = {"path": str(info.path), **info.attrs}
        if split_of(source) in TRAIN_SPLITS:
            pairs.append(None)
            continue
        match = train.get(checkpoint_key(source))
        if match is None:
            raise InputError(f"--train-means: no training cache of the checkpoint of {info.path} (split "
                             f"{split_of(source)}) among the caches given; add it, or drop --train-means")
        pairs.append(match)
    return pairs


def audit_trajectory(paths: Sequence[str | Path], options: AuditOptions = AuditOptions(),
                     progress: ProgressTracker | None = None, *, mixed: bool = False, train_means: bool = False,
                     layers: bool = False) -> tuple[list[TrajectoryRow], list[str]]:
    """Audit caches as the rows of a trajectory (:func:`build_rows`) and return them with the warnings to show.

    The caches are first checked to be one run's (:func:`check_caches`); a file given twice is audited once. With
    ``train_means`` every cache of another split is audited against the class means of the training cache of its
    checkpoint (:func:`training_pairs`, ``AuditOptions.means_from``). With ``layers`` the last cache's ``/layers``
    are audited too.
    """
    infos = []
    for path in paths:
        with FeatureCache(path) as cache:
            infos.append(cache.info)
    warnings = check_caches(infos, mixed=mixed)
    pairs = training_pairs(infos) if train_means else [None] * len(infos)
    done: dict[tuple[str, str | None], AuditResult] = {}
    results = []
    for i, (path, pair) in enumerate(zip(paths, pairs)):
        last = layers and i == len(paths) - 1
        key = (os.path.realpath(path), None if pair is None else os.path.realpath(pair))
        if key not in done or last:
            done[key] = audit(path, replace(options, layers=[] if last else None, means_from=pair), progress)
        results.append(done[key])
    return build_rows(results), warnings


def split_order(rows: Sequence[TrajectoryRow]) -> list[str]:
    """Every split of the rows, training splits first, then in order of appearance."""
    seen = list(dict.fromkeys(s for row in rows for s in row.splits))
    return sorted(seen, key=lambda s: (s not in TRAIN_SPLITS, seen.index(s)))


def known_keys(rows: Sequence[TrajectoryRow]) -> list[str]:
    """Metric keys a ``--fail-if`` on a trajectory may name: the primary split's, and ``split.key`` of every split."""
    splits = sorted({s for row in rows for s in row.splits})
    return list(METRIC_KEYS) + [f"{s}.{k}" for s in splits for k in METRIC_KEYS]


def gate_last_row(rows: Sequence[TrajectoryRow], fail_if: Sequence[str] | None) -> list[dict[str, Any]]:
    """Parse ``--fail-if`` expressions against the trajectory's keys and evaluate them on the last row."""
    keys = known_keys(rows)
    checks = parse_checks(fail_if, keys)
    require_baseline(checks, False, "a trajectory gates its last row on numbers; compare two checkpoints with "
                                    "`ncaudit compare A B`")
    last = rows[-1]
    return evaluate(checks, {key: last.value(key) for key in keys},
                    uncertainty={key: last.uncertainty(key) for key in keys})


def rows_to_json(rows: Sequence[TrajectoryRow], checks: list[dict[str, Any]]) -> dict[str, Any]:
    """``{"schema", "trajectory": [row...], "checks", "passed"}``; each row carries the primary split's metrics
    under the spec's keys and their relative uncertainties under ``uncertainty``, plus every split's full metrics and
    uncertainties (and per-layer blocks when audited) under its name."""
    out_rows = []
    for row in rows:
        item: dict[str, Any] = {"label": row.label, "epoch": row.epoch, "checkpoint": row.checkpoint,
                                "split": row.primary_split}
        item.update(row.primary.metrics)
        item["uncertainty"] = row.primary.details.get("uncertainty") or {}
        item["splits"] = {
            name: {"source": res.source.get("path"), "n_samples": res.n_samples, "metrics": res.metrics,
                   "uncertainty": res.details.get("uncertainty") or {},
                   **({"layers": res.layers} if res.layers else {}),
                   **({"means_from": res.details["means_from"]} if res.details.get("means_from") else {})}
            for name, res in row.splits.items()
        }
        out_rows.append(item)
    return {"schema": "ncaudit.trajectory/1", "trajectory": out_rows, "checks": checks,
            "passed": all(c["passed"] for c in checks)}
