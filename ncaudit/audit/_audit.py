"""``audit``: the streaming passes over a cache and the assembly of every metric, as named steps.

Pass 1 accumulates the class statistics (:class:`~ncaudit.stats.ClassStatistics`, one per layer); the metrics that
are closed forms of the statistics follow (:mod:`ncaudit.metrics`); pass 2 makes the per-sample decisions
(:class:`~ncaudit.stats.SampleDecisions`). Memory stays O(p^2 + C p) whatever the number of samples.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from ncaudit._device import resolve_device
from ncaudit.audit._closed import (
    _closed_form,
    _layer_block,
    _least_squares_metrics,
    _per_class,
    _precision_floor,
    _run_details,
    _sample_metrics,
)
from ncaudit.audit._means_from import against_training_means, training_means
from ncaudit.audit._options import AuditOptions, ProgressTracker, _NoProgress
from ncaudit.audit._passes import _decisions_pass, _refine, _select, _setup, _statistics_pass
from ncaudit.audit._result import METRIC_KEYS, AuditResult, _finite, json_safe
from ncaudit.audit._uncertainty import _uncertainty, _uncertainty_warnings
from ncaudit.audit._warnings import _warnings
from ncaudit.cache import CacheInfo, FeatureCache
from ncaudit.distributed import DistContext
from ncaudit.errors import InputError


def audit(
    path: str | Path,
    options: AuditOptions = AuditOptions(),
    progress: ProgressTracker | None = None,
    group: DistContext | None = None,
) -> AuditResult:
    """Compute every metric of the cache at ``path``.

    With ``group`` (a torch.distributed process group, :func:`ncaudit.distributed.process_group`), every rank streams
    its contiguous slice of the rows, and the accumulators of each pass merge exactly across the ranks before the
    next step: every rank returns the same result, which equals the single-process one to rounding.

    Raises
    ------
    InputError
        Missing or malformed file, labels outside [0, C), NaN / Inf features, a bad classifier shape, an empty class
        (without ``drop_empty_classes``), an incomplete cache (without ``allow_partial``).
    """
    progress = progress or _NoProgress()
    _check_options(options)
    device = group.device if group is not None else resolve_device(options.device)
    with FeatureCache(path, allow_partial=options.allow_partial) as cache:
        setup = _setup(cache, options, group)
        sel = _select(_statistics_pass(cache, setup, options, device, progress), setup, options)  # frees pass 1
        train = None if options.means_from is None else \
            training_means(options.means_from, cache, sel.keep, options, device, progress)
        closed = _closed_form(sel.stats, sel.weight, sel.bias, options)
        decisions, layer_decisions, residual, train_decisions = _decisions_pass(cache, setup, sel, closed, options,
                                                                                device, progress, train)
        if closed.ls is not None:
            closed.ls = _refine(cache, setup, sel, closed, residual, options, device, progress)
        reference = cache.reference_fp32()
    m, details = closed.metrics, closed.details
    _least_squares_metrics(closed, sel)
    _uncertainty(closed, sel, setup.info)
    _sample_metrics(m, details, decisions, sel.stats.n_samples)
    m["nc1_precision_floor"] = _precision_floor(reference, closed.basis, options, details)
    layers = {name: _layer_block(sel.layer_stats[name], sel.layer_bases[name], layer_decisions[name])
              for name in setup.layers}
    details.update(_run_details(setup, sel, options, device, closed))
    details["world_size"] = group.world_size if group is not None else 1
    info = setup.info
    per_class = _per_class(sel.stats, sel.weight, decisions, sel.keep, info.class_names)
    if train is not None and train_decisions is not None:
        details["means_from"] = against_training_means(train, sel.stats, train_decisions, m)
        details["uncertainty"].pop("cdnv", None)  # stated for the set's own means, not the training means
        for row, correct, count in zip(per_class, train_decisions.ncc_correct, sel.stats.counts):
            row["ncc_accuracy"] = float(correct) / count
    return AuditResult(
        source=_source(info),
        n_samples=sel.stats.n_samples,
        n_features=info.n_features,
        n_classes=len(sel.keep),
        class_counts=[int(v) for v in sel.stats.counts],
        metrics={k: _finite(m.get(k)) for k in METRIC_KEYS},
        details=json_safe(details),
        per_class=per_class,
        layers=layers,
        warnings=_warnings(closed, sel, info, per_class) + _uncertainty_warnings(closed, sel, info),
    )


#: Provenance attributes that hold a JSON object: the report embeds them as objects, not as strings of JSON.
JSON_ATTRIBUTES = ("checkpoint_metadata",)


def _source(info: CacheInfo) -> dict[str, Any]:
    """The cache's path and provenance attributes, JSON objects decoded."""
    source: dict[str, Any] = {"path": str(info.path)}
    for key, value in info.attrs.items():
        if key == "layer_order":
            continue
        if key in JSON_ATTRIBUTES and isinstance(value, str) and value.startswith("{"):
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                pass  # kept as written
        source[key] = value
    return source


def _check_options(options: AuditOptions) -> None:
    if options.batch_size < 1:
        raise InputError(f"--batch-size must be at least 1, got {options.batch_size}")
    if options.ridge < 0 or not math.isfinite(options.ridge):
        raise InputError(f"--ridge must be a finite number >= 0, got {options.ridge}")
    if options.rcond is not None and not (0 <= options.rcond < 1):
        raise InputError(f"--rcond must lie in [0, 1), got {options.rcond}")
