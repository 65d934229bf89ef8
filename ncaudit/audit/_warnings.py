"""Audit a feature cache: the streaming passes over an HDF5 cache and the assembly of every metric.

Pass 1 accumulates the class statistics (:class:`~ncaudit.stats.ClassStatistics`, one per layer); the metrics that
are closed forms of the statistics follow (:mod:`ncaudit.metrics`); pass 2 makes the per-sample decisions
(:class:`~ncaudit.stats.SampleDecisions`). Memory stays O(p^2 + C p) whatever the number of samples.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from ncaudit import __version__, metrics
from ncaudit.errors import InputError
from ncaudit._device import resolve_device
from ncaudit.distributed._collectives import together
from ncaudit.distributed._launch import DistContext
from ncaudit.distributed._merge import merge_all
from ncaudit.stats._decisions import Decisions, SampleDecisions
from ncaudit.stats._gemm import gemm_dtype_for
from ncaudit.stats._residual import LeastSquaresResidual, Residual
from ncaudit.stats._statistics import ClassStatistics, Statistics
from ncaudit.cache._reader import CacheInfo, FeatureCache
from ncaudit._validate import check_classifier, check_finite, check_labels, check_memory, classes_to_keep

#: Metric keys of the report, in table order (spec "Metrics" and "Beyond the balanced simplex").
METRIC_KEYS: tuple[str, ...] = (
    "nc1", "cdnv", "nc1_precision_floor",
    "nc2_equinorm_means", "nc2_equinorm_classifier", "nc2_equiangle_means", "nc2_equiangle_classifier",
    "nc2_maxangle_means", "nc2_maxangle_classifier", "nc2_orthogonality_means", "nc2_orthogonality_classifier",
    "nc3", "nc4", "accuracy", "ncc_accuracy",
    "mse_loss", "mse_term_a", "mse_term_b", "ls_distance", "ls_cosine",
)

#: A measured nc1 within this factor of the precision floor measures rounding, not collapse.
FLOOR_WARNING_FACTOR = 3.0
#: Refine W_LS on the samples when its estimated relative error (metrics.ls_error_estimate) is above this.
REFINE_ABOVE = 1e-7
#: Stop refining once a step changes W_LS by less than this (relative): the error left is about its square.
CONVERGED_BELOW = 1e-5
#: At most this many refinement steps (the first rides along in pass 2; each further one reads the cache again).
MAX_REFINE_STEPS = 3
#: Internal identities (closed form vs direct loss, A + B = L, per-class NC1 sum) must hold to this (relative).
SELF_CHECK_RTOL = 1e-6


class ProgressTracker(Protocol):
    """What the audit needs of a progress display: a task with a total, advanced by a number of rows."""

    def task(self, description: str, total: int) -> contextlib.AbstractContextManager[Callable[[int], None]]: ...


class _NoProgress:
    @contextlib.contextmanager
    def task(self, description: str, total: int) -> Iterator[Callable[[int], None]]:
        yield lambda n: None


@dataclass(frozen=True)
class AuditOptions:
    """Options of an audit (the ``report`` command's flags).

    Attributes
    ----------
    batch_size : rows per streamed batch (results do not depend on it).
    device : ``cpu``, ``cuda`` or ``auto``.
    ridge : lambda >= 0 of the least-squares classifier.
    rcond : relative eigenvalue cut-off of Sigma_T^dagger (default p * eps).
    allow_partial : read the written rows of an incomplete cache.
    drop_empty_classes : leave out classes without samples (and their classifier rows).
    normalize : audit h / ||h|| and w_c / ||w_c|| with b = 0.
    layers : also audit the cache's ``/layers`` (None: none; empty: all; else these names).
    """

    batch_size: int = 4096
    device: str = "cpu"
    ridge: float = 0.0
    rcond: float | None = None
    allow_partial: bool = False
    drop_empty_classes: bool = False
    normalize: bool = False
    layers: Sequence[str] | None = None


@dataclass
class AuditResult:
    """Everything a report shows: metrics, details, per-class and per-layer blocks (see the JSON schema)."""

    source: dict[str, Any]
    n_samples: int
    n_features: int
    n_classes: int
    class_counts: list[int]
    metrics: dict[str, float | None]
    details: dict[str, Any]
    per_class: list[dict[str, Any]]
    layers: dict[str, dict[str, Any]] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    checks: list[dict[str, Any]] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(check["passed"] for check in self.checks)


def _finite(value: float | None) -> float | None:
    """JSON-safe float: NaN / Inf become None (reported as null)."""
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _unit_rows(a: np.ndarray) -> np.ndarray:
    n = np.linalg.norm(a, axis=1, keepdims=True)
    return a / np.where(n > 0, n, 1.0)


def _to_tensor(x: np.ndarray) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(x))
    return t.to(torch.float32) if t.dtype == torch.float16 else t


@dataclass
class _Setup:
    """What the passes need to know about the cache before reading a row."""

    info: CacheInfo
    where: str
    layers: list[str]
    gemm: torch.dtype
    classifier: tuple[np.ndarray, np.ndarray | None] | None
    rows: range | None = None  # this rank's contiguous rows (None: all of them, one process)


@dataclass
class _Selection:
    """The classes audited (all, or those with samples), their statistics and the classifier rows kept."""

    keep: np.ndarray
    dropped: list[int]
    stats: Statistics
    layer_stats: dict[str, Statistics]
    layer_bases: dict[str, metrics.MeansBasis]
    weight: np.ndarray | None
    bias: np.ndarray | None
    remap: torch.Tensor


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
        closed = _closed_form(sel.stats, sel.weight, sel.bias, options)
        decisions, layer_decisions, residual = _decisions_pass(cache, setup, sel, closed, options, device, progress)
        if closed.ls is not None:
            closed.ls = _refine(cache, setup, sel, closed, residual, options, device, progress)
        reference = cache.reference_fp32()
    m, details = closed.metrics, closed.details
    _least_squares_metrics(closed, sel)
    _sample_metrics(m, details, decisions, sel.stats.n_samples)
    m["nc1_precision_floor"] = _precision_floor(reference, closed.basis, options, details)
    layers = {name: _layer_block(sel.layer_stats[name], sel.layer_bases[name], layer_decisions[name])
              for name in setup.layers}
    details.update(_run_details(setup, sel, options, device, closed))
    info = setup.info
    per_class = _per_class(sel.stats, sel.weight, decisions, sel.keep, info.class_names)
    return AuditResult(
        source={"path": str(info.path), **{k: v for k, v in info.attrs.items() if k != "layer_order"}},
        n_samples=sel.stats.n_samples,
        n_features=info.n_features,
        n_classes=len(sel.keep),
        class_counts=[int(v) for v in sel.stats.counts],
        metrics={k: _finite(m.get(k)) for k in METRIC_KEYS},
        details=json_safe(details),
        per_class=per_class,
        layers=layers,
        warnings=_warnings(closed, sel, info, per_class),
    )


def _check_options(options: AuditOptions) -> None:
    if options.batch_size < 1:
        raise InputError(f"--batch-size must be at least 1, got {options.batch_size}")
    if options.ridge < 0 or not math.isfinite(options.ridge):
        raise InputError(f"--ridge must be a finite number >= 0, got {options.ridge}")
    if options.rcond is not None and not (0 <= options.rcond < 1):
        raise InputError(f"--rcond must lie in [0, 1), got {options.rcond}")


def _setup(cache: FeatureCache, options: AuditOptions, group: DistContext | None) -> _Setup:
    info = cache.info
    where = str(info.path)
    if info.n_samples == 0:
        raise InputError(f"{where}: the cache holds no samples; extract some first")
    layers = _select_layers(options.layers, info.layers, where)
    _check_sizes(info, layers, options)
    classifier = cache.classifier()
    if classifier is not None:
        check_classifier(*classifier, where)
    rows = group.rows(info.n_samples) if group is not None and group.distributed else None
    return _Setup(info, where, layers, gemm_dtype_for(info.feature_dtype), classifier, rows)


def _check_sizes(info: CacheInfo, layers: list[str], options: AuditOptions) -> None:
    """Before the accumulators allocate: the statistics fit in memory, and C classes can have samples at all."""
    check_memory([info.n_features, *(info.layers[name] for name in layers)], info.num_classes, str(info.path))
    if info.num_classes > info.n_samples and not options.drop_empty_classes:
        raise InputError(f"{info.path}: num_classes is {info.num_classes} but only {info.n_samples} rows are read, so "
                         f"at least {info.num_classes - info.n_samples} classes have no samples; pass "
                         "--drop-empty-classes to audit the classes present, or fix num_classes")


def _statistics_pass(cache: FeatureCache, setup: _Setup, options: AuditOptions, device: torch.device,
                     progress: ProgressTracker) -> dict[str | None, ClassStatistics]:
    """Pass 1: one class-statistics accumulator for the final features (key None) and one per requested layer,
    merged across ranks when distributed."""
    info, where = setup.info, setup.where
    widths = {None: info.n_features, **{name: info.layers[name] for name in setup.layers}}
    accs = {name: ClassStatistics(info.num_classes, width, device=device, normalize=options.normalize)
            for name, width in widths.items()}

    def stream() -> None:
        with progress.task("pass 1/2: class statistics", _n_rows(setup)) as advance:
            for start, x, y, extra in cache.iter_batches(options.batch_size, layers=setup.layers, rows=setup.rows):
                h, labels = _to_tensor(x), torch.from_numpy(y)
                check_labels(labels, info.num_classes, start, where)
                check_finite(h, start, where)
                accs[None].update(h, labels)
                for name in setup.layers:
                    hl = _to_tensor(extra[name])
                    check_finite(hl, start, where, f"/layers/{name}/features")
                    accs[name].update(hl, labels)
                advance(len(y))

    together(stream)
    merge_all(accs.values())
    return accs


def _n_rows(setup: _Setup) -> int:
    return setup.info.n_samples if setup.rows is None else len(setup.rows)


def _select(accs: dict[str | None, ClassStatistics], setup: _Setup, options: AuditOptions) -> _Selection:
    """The classes to audit and their statistics; the classifier restricted (and normalised) accordingly."""
    c_all = setup.info.num_classes
    full_stats = accs[None].compute()
    keep = classes_to_keep(full_stats.counts, options.drop_empty_classes, setup.where, setup.info.class_names)
    dropped = [int(c) for c in np.setdiff1d(np.arange(c_all), keep)]
    weight = bias = None
    if setup.classifier is not None:
        every = len(keep) == c_all  # no copy of the C x p rows when every class is kept
        weight = setup.classifier[0] if every else setup.classifier[0][keep]
        bias = np.zeros(len(keep)) if setup.classifier[1] is None else setup.classifier[1][keep]
        if options.normalize:
            weight, bias = _unit_rows(weight), np.zeros(len(keep))
    remap = torch.full((c_all,), -1, dtype=torch.int64)
    remap[torch.from_numpy(keep)] = torch.arange(len(keep))
    layer_stats = {name: accs[name].compute().select(keep) for name in setup.layers}
    layer_bases = {name: metrics.means_basis(s.centred_means) for name, s in layer_stats.items()}
    setup.classifier = None  # the rows kept are in the selection: free the full C x p copy
    return _Selection(keep, dropped, full_stats.select(keep), layer_stats, layer_bases, weight, bias, remap)


def _decisions_pass(cache: FeatureCache, setup: _Setup, sel: _Selection, closed: _Closed, options: AuditOptions,
                    device: torch.device, progress: ProgressTracker,
                    ) -> tuple[Decisions, dict[str, Decisions], Residual | None]:
    """Pass 2: classifier and nearest-class-mean decisions, per-class NC1 and the direct MSE (NCC per layer), and the
    first refinement sums of W_LS when its error estimate asks for them."""
    stats = sel.stats
    common = dict(device=device, gemm_dtype=setup.gemm, normalize=options.normalize)
    dec = SampleDecisions(stats.means, stats.global_mean, sel.weight, sel.bias, closed.basis.whitener,
                          anchors=stats.anchors, **common)
    layer_dec = {
        name: SampleDecisions(s.means, s.global_mean, None, None, sel.layer_bases[name].whitener,
                              anchors=s.anchors, per_class=False, **common)
        for name, s in sel.layer_stats.items()
    }
    residual = None
    if closed.ls is not None and closed.estimate > REFINE_ABOVE:
        residual = LeastSquaresResidual(closed.ls.weight, stats.global_mean, stats.priors, device=device,
                                        normalize=options.normalize)

    def stream() -> None:
        with progress.task("pass 2/2: decisions", _n_rows(setup)) as advance:
            for _, x, y, extra in cache.iter_batches(options.batch_size, layers=setup.layers, rows=setup.rows):
                labels = sel.remap[torch.from_numpy(y)]
                h = _to_tensor(x)
                dec.update(h, labels)
                if residual is not None:
                    residual.update(h, labels)
                for name in setup.layers:
                    layer_dec[name].update(_to_tensor(extra[name]), labels)
                advance(len(y))

    together(stream)
    merge_all([dec, *layer_dec.values(), residual])
    return dec.compute(), {name: d.compute() for name, d in layer_dec.items()}, \
        None if residual is None else residual.compute()


def _refine(cache: FeatureCache, setup: _Setup, sel: _Selection, closed: _Closed, residual: Residual | None,
            options: AuditOptions, device: torch.device, progress: ProgressTracker) -> metrics.LeastSquares:
    """Iterative refinement of W_LS on the samples: the step measured in pass 2, then further passes (at most
    ``MAX_REFINE_STEPS`` in all) while the last correction is above ``CONVERGED_BELOW``."""
    ls = closed.ls
    assert ls is not None
    stats = sel.stats
    while residual is not None:
        ls = metrics.refine(stats, ls, residual)
        if ls.steps >= MAX_REFINE_STEPS or (ls.correction or 0.0) <= CONVERGED_BELOW:
            break
        acc = LeastSquaresResidual(ls.weight, stats.global_mean, stats.priors, device=device,
                                   normalize=options.normalize)

        def stream() -> None:
            with progress.task(f"refinement {ls.steps + 1}: least squares", _n_rows(setup)) as advance:
                for _, x, y, _ in cache.iter_batches(options.batch_size, rows=setup.rows):
                    acc.update(_to_tensor(x), sel.remap[torch.from_numpy(y)])
                    advance(len(y))

        together(stream)
        merge_all([acc])
        residual = acc.compute()
    return ls


def _sample_metrics(m: dict[str, float | None], details: dict[str, Any], decisions: Decisions, n: int) -> None:
    """Accuracy, NC4, NCC accuracy and the check of the MSE closed forms against the direct evaluation."""
    if decisions.correct is not None:
        m["accuracy"] = float(decisions.correct.sum()) / n
        m["nc4"] = float(decisions.disagree) / n
        direct = 0.5 * float(decisions.squared_error) / n
        a_plus_b = m["mse_term_a"] + m["mse_term_b"]
        details["mse_check"] = {
            "direct": direct,
            "closed_form": m["mse_loss"],
            "term_a_plus_b": a_plus_b,
            "relative_discrepancy": _rel(a_plus_b, direct),
        }
    m["ncc_accuracy"] = float(decisions.ncc_correct.sum()) / n


def _precision_floor(reference: tuple[np.ndarray, np.ndarray, np.ndarray] | None, basis: metrics.MeansBasis,
                     options: AuditOptions, details: dict[str, Any]) -> float | None:
    """NC1 of the deviations of the stored rows from their float32 recomputation (None without reference rows)."""
    if reference is None or basis.rank == 0:
        return None
    _, stored, ref = reference
    a, b = stored.astype(np.float64), ref.astype(np.float64)
    if options.normalize:
        a, b = _unit_rows(a), _unit_rows(b)
    details["precision_floor_rows"] = int(len(a))
    return metrics.nc1_of_deviations(a - b, basis)


def _warnings(closed: _Closed, sel: _Selection, info: CacheInfo, per_class: list[dict[str, Any]]) -> list[str]:
    """What the reader must know: a partial read or single-sample classes, rounding-dominated NC1, rank deficiency,
    dropped classes, and every internal identity that does not hold to SELF_CHECK_RTOL (with its likely cause)."""
    m, basis, p = closed.metrics, closed.basis, info.n_features
    warnings: list[str] = _coverage_warnings(sel, info)
    floor, nc1 = m.get("nc1_precision_floor"), m.get("nc1")
    if floor is not None and nc1 is not None and math.isfinite(nc1) and nc1 <= FLOOR_WARNING_FACTOR * floor:
        warnings.append(f"nc1 = {nc1:.3g} is within {FLOOR_WARNING_FACTOR:g}x of the extraction precision floor "
                        f"{floor:.3g}: it measures rounding, not collapse; re-extract with --precision fp32")
    c = len(sel.keep)
    if basis.rank < min(p, c - 1):
        warnings.append(f"Sigma_B has rank {basis.rank} < min(p, C-1) = {min(p, c - 1)}: some class means "
                        "coincide or are collinear, NC1 uses the rank found")
    if sel.dropped:
        shown = f"{sel.dropped[:20]}{' ...' if len(sel.dropped) > 20 else ''}"
        warnings.append(f"dropped {len(sel.dropped)} empty class(es): {shown}")
    warnings += _self_check_warnings(closed, sel, per_class)
    return warnings


def _coverage_warnings(sel: _Selection, info: CacheInfo) -> list[str]:
    """What the rows cannot show: a partial read (maybe only the first classes), classes of a single sample."""
    warnings: list[str] = []
    if not info.complete:
        warnings.append(f"partial cache: {info.n_samples} of {info.n_rows} rows read (complete=false), holding "
                        f"{len(sel.keep)} of {info.num_classes} classes; extraction writes in dataset order, often "
                        "class by class, so these metrics describe the rows written so far only (finish the file "
                        "with `ncaudit extract --resume`)")
    single = sel.keep[sel.stats.counts == 1]
    if single.size == len(sel.keep):
        warnings.append("every class has a single sample: within-class variability is zero by construction, so nc1 "
                        "= 0, cdnv and the per-class nc1 say nothing about collapse; audit several samples per class")
    elif single.size:
        shown = ", ".join(str(int(c)) for c in single[:10]) + (", ..." if single.size > 10 else "")
        warnings.append(f"{single.size} class(es) have a single sample ({shown}): their within-class variance is zero "
                        "by construction, which pulls nc1 and cdnv down; audit several samples per class")
    return warnings


def _self_check_warnings(closed: _Closed, sel: _Selection, per_class: list[dict[str, Any]]) -> list[str]:
    """Identities the report computes two ways; a disagreement above SELF_CHECK_RTOL is a warning naming its cause."""
    m, out = closed.metrics, []
    check = closed.details.get("mse_check")
    if check is not None:
        direct, closed_form, a_plus_b = check["direct"], check["closed_form"], check["term_a_plus_b"]
        if _rel(closed_form, direct) > SELF_CHECK_RTOL:
            out.append(f"self-check: the MSE loss from the statistics ({closed_form:.10g}) differs from the loss "
                       f"evaluated sample by sample ({direct:.10g}) by {_rel(closed_form, direct):.2g} (relative): "
                       "Sigma_W or the class means do not describe the rows (float16 rounding of the cache, or "
                       "rows that changed between the passes); mse_loss, terms A and B are uncertain to that level")
        if _rel(a_plus_b, closed_form) > SELF_CHECK_RTOL:
            out.append(f"self-check: term (A) + term (B) = {a_plus_b:.10g} but L(W, b) = {closed_form:.10g} "
                       f"({_rel(a_plus_b, closed_form):.2g} relative): Sigma_T is not resolved where the "
                       "least-squares classifier needs it (estimated error "
                       f"{closed.estimate:.2g}); terms A and B do not add up")
    ls = closed.ls
    if ls is not None and ls.steps and (ls.correction or 0.0) > CONVERGED_BELOW:
        out.append(f"self-check: the least-squares classifier changed by {ls.correction:.2g} (relative) in its last "
                   f"refinement step ({ls.steps} steps): terms A and B, ls_distance and ls_cosine are uncertain to "
                   "about that level (Sigma_T is nearly singular; a --ridge would stabilise it)")
    nc1 = m.get("nc1")
    if nc1 is not None and math.isfinite(nc1) and nc1 > 0 and per_class:
        weighted = float(sum(p * (row["nc1"] or 0.0) for p, row in zip(sel.stats.priors, per_class)))
        if _rel(weighted, nc1) > SELF_CHECK_RTOL:
            out.append(f"self-check: the pi-weighted per-class NC1 ({weighted:.10g}) differs from NC1 ({nc1:.10g}) by "
                       f"{_rel(weighted, nc1):.2g} (relative): the second pass's per-class projection lost precision "
                       "(float16 cache or extreme collapse); per-class nc1 values are uncertain to that level")
    return out


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), np.finfo(float).tiny)


def _run_details(setup: _Setup, sel: _Selection, options: AuditOptions, device: torch.device,
                 closed: _Closed) -> dict[str, Any]:
    info = setup.info
    ls = closed.ls
    return {
        "feature_dtype": info.feature_dtype,
        "gemm_dtype": {
            "statistics": sel.stats.gemm_dtype,
            "decisions": str(setup.gemm).replace("torch.", ""),
            "refinement": "float64" if ls is not None and ls.steps else None,
        },
        "device": str(device),
        "batch_size": options.batch_size,
        "normalized": options.normalize,
        "has_classifier": sel.weight is not None,
        "has_bias": bool(info.has_bias) and not options.normalize,
        "complete": info.complete,
        "partial": None if info.complete else {"rows": info.n_samples, "of": info.n_rows},
        "dropped_classes": sel.dropped,
        "classes": [int(c) for c in sel.keep],
    }


def _select_layers(requested: Sequence[str] | None, available: dict[str, int], where: str) -> list[str]:
    if requested is None:
        return []
    if not requested:
        if not available:
            raise InputError(f"{where}: the cache has no /layers; extract with --layers NAME[,NAME...] first")
        return list(available)
    missing = [name for name in requested if name not in available]
    if missing:
        have = ", ".join(available) or "none"
        raise InputError(f"{where}: no layer {missing[0]!r} in the cache (it has: {have}); pick from those")
    return [name for name in available if name in requested]


@dataclass
class _Closed:
    """The closed forms of the statistics: metrics so far, details, the Sigma_B basis, W_LS and its error estimate."""

    metrics: dict[str, float | None]
    details: dict[str, Any]
    basis: metrics.MeansBasis
    ls: metrics.LeastSquares | None = None
    estimate: float = 0.0


def _closed_form(stats: Statistics, weight: np.ndarray | None, bias: np.ndarray | None,
                 options: AuditOptions) -> _Closed:
    """Every metric that is a closed form of the statistics (and W, b), the least-squares classifier and an estimate
    of its error."""
    centred = stats.centred_means
    basis = metrics.means_basis(centred)
    pairs = metrics.pair_geometry(centred, variances=stats.variances)  # one blocked pass per set of vectors
    m: dict[str, float | None] = {
        "nc1": metrics.nc1(stats.sigma_w, basis),
        "cdnv": pairs.cdnv,
        "nc2_equinorm_means": metrics.equinorm(centred),
        "nc2_equiangle_means": pairs.equiangle,
        "nc2_maxangle_means": pairs.maxangle,
        "nc2_orthogonality_means": metrics.orthogonality(stats.means),
    }
    details: dict[str, Any] = {
        "rank_sigma_b": basis.rank,
        "rank_sigma_b_max": min(stats.n_features, stats.n_classes - 1),
        "sigma_b_cutoff": basis.cutoff,
        "ridge": options.ridge,
        "rcond": options.rcond,
    }
    closed = _Closed(m, details, basis)
    if weight is not None and bias is not None:
        closed.ls = ls = metrics.least_squares(stats, options.ridge, options.rcond, basis)
        closed.basis = dataclasses.replace(basis, vt=None)  # V^T (r x C) served the solve; keep U and S only
        loss = metrics.mse_loss(stats, weight, bias)
        m["mse_term_a"] = metrics.ls_loss(stats, ls)
        m["mse_term_b"] = metrics.mse_term_b(stats, weight, bias, ls, loss=loss)
        closed.estimate = metrics.ls_error_estimate(stats, weight, ls, m["mse_term_a"], m["mse_term_b"])
        rows = metrics.pair_geometry(weight)
        m.update({
            "nc2_equinorm_classifier": metrics.equinorm(weight),
            "nc2_equiangle_classifier": rows.equiangle,
            "nc2_maxangle_classifier": rows.maxangle,
            "nc2_orthogonality_classifier": rows.orthogonality,
            "nc3": metrics.nc3(weight, centred),
            "mse_loss": loss,
        })
    return closed


def _least_squares_metrics(closed: _Closed, sel: _Selection) -> None:
    """Terms A and B once refinement has moved W_LS, distance and cosine to W_LS, and the least-squares details."""
    ls, stats, m, details = closed.ls, sel.stats, closed.metrics, closed.details
    if ls is None or sel.weight is None or sel.bias is None:
        return
    if ls.steps:  # refinement measured L(W_LS) on the samples: the closed-form terms gave way to the measured ones
        m["mse_term_a"] = metrics.ls_loss(stats, ls)
        m["mse_term_b"] = metrics.mse_term_b(stats, sel.weight, sel.bias, ls, loss=m["mse_loss"])
    m.update({
        "ls_distance": metrics.ls_distance(sel.weight, ls),
        "ls_cosine": metrics.ls_cosine(sel.weight, ls),
    })
    details.update({
        "rank_sigma_t": ls.rank,
        "sigma_t_cutoff": ls.cutoff,
        "sigma_t_lambda_max": ls.pinv.lambda_max,
        "sigma_t_error_bound": stats.error_bound,
        "w_ls_norm": float(np.linalg.norm(ls.weight)),
        "least_squares": {
            "error_estimate": closed.estimate,
            "refine_above": REFINE_ABOVE,
            "refinement_steps": ls.steps,
            "last_correction": ls.correction,
            "dominant_between_directions": int(ls.pinv.top.shape[1]),
        },
    })


def _per_class(stats: Statistics, weight: np.ndarray | None, dec: Any, keep: np.ndarray,
               names: Sequence[str] | None) -> list[dict[str, Any]]:
    counts = stats.counts
    mean_norm = np.linalg.norm(stats.centred_means, axis=1)
    w_norm = np.linalg.norm(weight, axis=1) if weight is not None else None
    nc1_c = dec.whitened_scatter / np.maximum(counts, 1)
    rows = []
    for i, c in enumerate(keep):
        row: dict[str, Any] = {"class": int(c)}
        if names is not None:
            row["name"] = names[int(c)]
        row.update({
            "count": int(counts[i]),
            "mean_norm": _finite(mean_norm[i]),
            "classifier_norm": None if w_norm is None else _finite(w_norm[i]),
            "variance": _finite(stats.variances[i]),
            "nc1": _finite(nc1_c[i]),
            "accuracy": None if dec.correct is None else float(dec.correct[i]) / counts[i],
            "ncc_accuracy": float(dec.ncc_correct[i]) / counts[i],
        })
        rows.append(row)
    return rows


def _layer_block(stats: Statistics, basis: metrics.MeansBasis, dec: Decisions) -> dict[str, Any]:
    centred = stats.centred_means
    return {
        "n_features": stats.n_features,
        "nc1": _finite(metrics.nc1(stats.sigma_w, basis)),
        "cdnv": _finite(metrics.cdnv(stats.variances, stats.means)),
        "nc2_equinorm_means": _finite(metrics.equinorm(centred)),
        "nc2_equiangle_means": _finite(metrics.equiangle(centred)),
        "ncc_accuracy": float(dec.ncc_correct.sum()) / stats.n_samples,
        "rank_sigma_b": basis.rank,
    }


def json_safe(value: Any) -> Any:
    """Plain JSON values: NaN / Inf to None, numpy scalars to Python ones, recursively."""
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, (float, np.floating)):
        return _finite(float(value))
    if isinstance(value, np.integer):
        return int(value)
    return value


REPORT_SCHEMA = "ncaudit.report/1"


def result_to_json(result: AuditResult) -> dict[str, Any]:
    """The JSON report (schema ``ncaudit.report/1``) as a plain dict (strict JSON: no NaN or Infinity)."""
    return json_safe({
        "schema": REPORT_SCHEMA,
        "ncaudit_version": __version__,
        "source": result.source,
        "n_samples": result.n_samples,
        "n_features": result.n_features,
        "n_classes": result.n_classes,
        "class_counts": result.class_counts,
        "metrics": result.metrics,
        "details": result.details,
        "per_class": result.per_class,
        "layers": result.layers,
        "warnings": result.warnings,
        "checks": result.checks,
        "passed": result.passed,
    })
