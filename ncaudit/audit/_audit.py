"""The audit: the streaming passes over a source and the assembly of every metric, as named steps.

Pass 1 accumulates the class statistics (:class:`~ncaudit.stats.ClassStatistics`, one per layer); the metrics that
are closed forms of the statistics follow (:mod:`ncaudit.metrics`); pass 2 makes the per-sample decisions
(:class:`~ncaudit.stats.SampleDecisions`); refinement passes of the least-squares classifier follow when its error
estimate asks for them. Memory stays O(p^2 + C p) whatever the number of samples. :func:`audit_cache` reads a cache
(``ncaudit report``); :func:`audit_source` reads any :class:`~ncaudit.audit._source.BatchSource` (features in memory,
a model over a loader) with the same passes.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ncaudit._device import host_threads, resolve_device, resolve_host
from ncaudit.audit._closed import (
    _closed_form,
    _layer_block,
    _least_squares_metrics,
    _per_class,
    _precision_floor,
    _run_details,
    _sample_metrics,
)
from ncaudit.audit._means_from import TrainingMeans, against_training_means, training_means
from ncaudit.audit._ood import _ood_metrics, _ood_pass, _ood_setup
from ncaudit.audit._options import AuditOptions, ProgressTracker, _NoProgress
from ncaudit.audit._passes import (
    _DecisionsPass,
    _refine,
    _same_samples,
    _select,
    _setup,
    _StatisticsPass,
    _stream,
)
from ncaudit.audit._plan import FULL, SAMPLE_METRICS, Plan, make_plan
from ncaudit.audit._result import METRIC_KEYS, AuditResult, _finite, json_safe
from ncaudit.audit._source import BatchSource
from ncaudit.audit._state import _Closed, _Selection, _Setup
from ncaudit.audit._uncertainty import _uncertainty, _uncertainty_warnings
from ncaudit.audit._warnings import _warnings
from ncaudit.cache import FeatureCache
from ncaudit.errors import InputError
from ncaudit.stats import Decisions

if TYPE_CHECKING:
    import torch

    from ncaudit.distributed import DistContext


def audit_cache(
    path: str | Path,
    options: AuditOptions = AuditOptions(),
    progress: ProgressTracker | None = None,
    group: DistContext | None = None,
    *,
    ood: str | Path | None = None,
) -> AuditResult:
    """Compute every metric of the cache at ``path`` (``ncaudit report``).

    With ``group`` (a torch.distributed process group, :func:`ncaudit.distributed.process_group`), every rank streams
    its contiguous slice of the rows, and the accumulators of each pass merge exactly across the ranks before the
    next step: every rank returns the same result, which equals the single-process one to rounding. ``ood``, a cache
    of out-of-distribution features from the same network, adds NC5 (its labels are not read). One process on the
    CPU (``options.device`` ``cpu``, or ``auto`` without a CUDA device) runs both passes on the host in NumPy
    (:class:`~ncaudit.stats.HostStatistics`, :class:`~ncaudit.stats.HostDecisions`) without importing torch.

    Raises
    ------
    InputError
        Missing or malformed file, labels outside [0, C), NaN / Inf features, a bad classifier shape, an empty class
        (without ``drop_empty_classes``), an incomplete cache (without ``allow_partial``), an OOD cache of another
        feature width.
    """
    progress = progress or _NoProgress()
    _check_options(options)
    # One process on the CPU: the host path in NumPy, without importing torch (device None)
    device = group.device if group is not None else resolve_host(options.device)
    with FeatureCache(path, allow_partial=options.allow_partial, allow_external=options.allow_external) as cache, \
            _open_ood(ood, options) as ood_cache:
        setup = _setup(cache, options, group)
        ood_setup = None if ood_cache is None else _ood_setup(ood_cache, setup, options, group)
        with host_threads(device):  # the products are NumPy's; torch's pool must not spin beside them
            return _audit(cache, setup, options, device, progress, ood_cache, ood_setup)


#: ``ncaudit.audit.audit`` is :func:`audit_cache`.
audit = audit_cache


def audit_source(
    source: BatchSource,
    options: AuditOptions = AuditOptions(),
    progress: ProgressTracker | None = None,
    *,
    distributed: bool = False,
    device: torch.device | None = None,
    ood: BatchSource | None = None,
    float64_decisions: bool | None = None,
    host: bool = False,
) -> AuditResult:
    """Every metric of a live source (features in memory, a model over a loader): the passes of :func:`audit_cache`.

    The source is this process's shard when ``distributed`` (each rank passes its own rows; every pass merges exactly
    across the ranks of the default process group). Labels and finiteness are checked on the device and reported once
    per pass; ``float64_decisions`` (default: on any device but the CPU) decides with float64 products, which need no
    data-dependent recheck. ``host`` (one process, a source of NumPy batches) runs the passes on the host in NumPy as
    :func:`audit_cache` does on the CPU, checking each batch as it comes.
    """
    progress = progress or _NoProgress()
    _check_options(options)
    if host:
        if distributed:
            raise ValueError("host=True runs one process: it cannot merge across ranks")
        # NumPy batches: checked one by one, as a cache's
        setup = _setup(source, options, None, live=True, float64_decisions=bool(float64_decisions), deferred=False)
        ood_setup = None if ood is None else _ood_setup(ood, setup, options, None, live=True)
        return _audit(source, setup, options, None, progress, ood, ood_setup)
    device = device if device is not None else resolve_device(options.device)
    exact = device.type != "cpu" if float64_decisions is None else float64_decisions
    setup = _setup(source, options, None, live=True, distributed=distributed, float64_decisions=exact)
    ood_setup = None if ood is None else _ood_setup(ood, setup, options, None, live=True)
    return _audit(source, setup, options, device, progress, ood, ood_setup)


def _audit(source: BatchSource, setup: _Setup, options: AuditOptions, device: torch.device | None,
           progress: ProgressTracker, ood: BatchSource | None, ood_setup: _Setup | None) -> AuditResult:
    """The passes the chosen metrics need (:func:`~ncaudit.audit._plan.make_plan`; every pass by default), then the
    assembly. ``device`` None runs the passes on the host in NumPy (no torch unless a step needs it: refinement,
    NC5, ``--means-from``)."""
    plan = make_plan(options.metrics, options.per_class)
    stats_pass = _StatisticsPass(setup, options, device)
    title = stats_pass.title if plan.decisions else "pass 1/1: class statistics"
    sel = _select(_stream(source, setup, options, progress, stats_pass, title), setup, options)
    del stats_pass  # frees pass 1
    train = None if options.means_from is None or not plan.training_means else \
        training_means(options.means_from, source, sel.keep, options, device, progress)
    closed = _closed_form(sel.stats, sel.weight, sel.bias, options, plan)
    decisions = layer_decisions = residual = train_decisions = None
    if plan.decisions:
        decisions_pass = _DecisionsPass(setup, sel, closed, options, device, train, plan)
        decisions, layer_decisions, residual, train_decisions = _stream(
            source, setup, options, progress, decisions_pass, decisions_pass.title,
            layers=bool(decisions_pass.layer_dec))  # the layers' features only for their NCC decisions
        del decisions_pass  # frees pass 2's tables (p x 2C and more) before refinement and the assembly
        if setup.deferred:
            _same_samples(sel.stats.counts, decisions, setup.where)
    if closed.ls is not None:
        closed.ls = _refine(source, setup, sel, closed, residual, options, device, progress)
    ood_mean = None
    if ood is not None and ood_setup is not None and plan.ood:
        ood_mean = _ood_pass(ood, ood_setup, options, device, progress)
    reference = source.reference_fp32() if plan.floor else None
    result = _assemble(setup, sel, closed, decisions, layer_decisions, reference, options, device, ood_mean, plan)
    if train is not None:
        _against_training_means(result, train, sel, train_decisions)
    return result


def _against_training_means(result: AuditResult, train: TrainingMeans, sel: _Selection,
                            decisions: Decisions | None) -> None:
    """``--means-from``: NCC accuracy, NC4 and CDNV against the training class means (the set's own beside them;
    with chosen metrics, those of them chosen)."""
    m = dict(result.metrics)
    result.details["means_from"] = json_safe(against_training_means(train, sel.stats, decisions, m))
    if "cdnv" in m:
        (result.details.get("uncertainty") or {}).pop("cdnv", None)  # stated for the set's own means
    result.metrics = {k: _finite(m[k]) for k in METRIC_KEYS if k in m}
    if decisions is not None:
        for row, correct, count in zip(result.per_class, decisions.ncc_correct, sel.stats.counts):
            if "ncc_accuracy" in row:
                row["ncc_accuracy"] = float(correct) / count


def _assemble(setup: _Setup, sel: _Selection, closed: _Closed, decisions: Decisions | None,
              layer_decisions: dict[str, Decisions] | None, reference: tuple[np.ndarray, np.ndarray, np.ndarray] | None,
              options: AuditOptions, device: torch.device | None, ood_mean: Any = None,
              plan: Plan = FULL) -> AuditResult:
    """The result from the statistics, the closed forms and the decisions; before pass 2 (``decisions`` None) the
    sample-level metrics are None and ``details["pending"]`` names them. With a plan of chosen metrics, only those
    are in ``metrics`` (and ``details["computed"]`` lists them)."""
    m, details = closed.metrics, closed.details
    _least_squares_metrics(closed, sel)
    _uncertainty(closed, sel, setup.info, plan)
    if decisions is not None:
        _sample_metrics(m, details, decisions, sel.stats.n_samples)
    elif plan.decisions:
        details["pending"] = {"pass": 2, "metrics": [k for k in SAMPLE_METRICS if plan.wants(k) and (
            k == "ncc_accuracy" or sel.weight is not None)]}
    if plan.floor and closed.basis is not None:
        m["nc1_precision_floor"] = _precision_floor(reference, closed.basis, options, details)
    if ood_mean is not None:
        _ood_metrics(m, details, sel, ood_mean)
    layers = {name: _layer_block(sel.layer_stats[name], sel.layer_bases[name],
                                 None if layer_decisions is None else layer_decisions.get(name), plan)
              for name in setup.layers}
    details.update(_run_details(setup, sel, options, device, closed, plan))
    details["world_size"] = setup.group.world_size if setup.group is not None else _world_size() if setup.merge else 1
    if not plan.full:
        details["computed"] = list(plan.keys or ())
    info = setup.info
    per_class = _per_class(sel.stats, sel.weight, decisions, sel.keep, info.class_names, plan)
    warnings = _warnings(closed, sel, info, per_class) + _uncertainty_warnings(closed, sel, info)
    return AuditResult(
        source=_source(info),
        n_samples=sel.stats.n_samples,
        n_features=info.n_features,
        n_classes=len(sel.keep),
        class_counts=[int(v) for v in sel.stats.counts],
        metrics={k: _finite(m.get(k)) for k in METRIC_KEYS if plan.wants(k)},
        details=json_safe(details),
        per_class=per_class,
        layers=layers,
        warnings=warnings,
    )


def _world_size() -> int:
    from ncaudit.distributed import world_size

    return world_size()


#: Provenance attributes that hold a JSON object: the report embeds them as objects, not as strings of JSON.
JSON_ATTRIBUTES = ("checkpoint_metadata",)


def _source(info: Any) -> dict[str, Any]:
    """The source's path and provenance attributes (JSON objects decoded), and every file read."""
    source: dict[str, Any] = {"path": None if info.path is None else str(info.path)}
    for key, value in info.attrs.items():
        if key == "layer_order":
            continue
        if key in JSON_ATTRIBUTES and isinstance(value, str) and value.startswith("{"):
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                pass  # kept as written
        source[key] = value
    if info.path is not None:  # a cache: every file read (its shards, external files under --allow-external)
        source["files"] = [str(info.path), *(str(p) for p in getattr(info, "sources", ()))]
    return source


@contextlib.contextmanager
def _open_ood(path: str | Path | None, options: AuditOptions) -> Iterator[FeatureCache | None]:
    if path is None:
        yield None
        return
    with FeatureCache(path, allow_external=options.allow_external) as cache:
        yield cache


def _check_options(options: AuditOptions) -> None:
    make_plan(options.metrics)  # unknown metric keys fail before any work
    if options.batch_size < 1:
        raise InputError(f"--batch-size must be at least 1, got {options.batch_size}")
    if options.ridge < 0 or not math.isfinite(options.ridge):
        raise InputError(f"--ridge must be a finite number >= 0, got {options.ridge}")
    if options.rcond is not None and not (0 <= options.rcond < 1):
        raise InputError(f"--rcond must lie in [0, 1), got {options.rcond}")
