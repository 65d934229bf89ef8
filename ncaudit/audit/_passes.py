"""The passes over the cache: statistics (pass 1), decisions (pass 2) and the refinement passes of W_LS."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from ncaudit import metrics
from ncaudit._validate import check_classifier, check_finite, check_labels, check_memory, classes_to_keep
from ncaudit.audit._means_from import TrainingMeans
from ncaudit.audit._options import AuditOptions, ProgressTracker
from ncaudit.audit._state import _Closed, _Selection, _Setup, _to_tensor, _unit_rows
from ncaudit.cache import CacheInfo, FeatureCache
from ncaudit.distributed import DistContext, merge_all, together
from ncaudit.errors import InputError
from ncaudit.stats import ClassStatistics, Decisions, LeastSquaresResidual, Residual, SampleDecisions, gemm_dtype_for

#: Refine W_LS on the samples when its estimated relative error (metrics.ls_error_estimate) is above this.
REFINE_ABOVE = 1e-7
#: Stop refining once a step changes W_LS by less than this (relative): the error left is about its square.
CONVERGED_BELOW = 1e-5
#: At most this many refinement steps (the first rides along in pass 2; each further one reads the cache again).
MAX_REFINE_STEPS = 3


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
                    device: torch.device, progress: ProgressTracker, train: TrainingMeans | None = None,
                    ) -> tuple[Decisions, dict[str, Decisions], Residual | None, Decisions | None]:
    """Pass 2: classifier and nearest-class-mean decisions, per-class NC1 and the direct MSE (NCC per layer), the
    first refinement sums of W_LS when its error estimate asks for them, and with ``train`` the decisions against the
    training class means."""
    stats = sel.stats
    common = dict(device=device, gemm_dtype=setup.gemm, normalize=options.normalize)
    dec = SampleDecisions(stats.means, stats.global_mean, sel.weight, sel.bias, closed.basis.whitener,
                          anchors=stats.anchors, **common)
    train_dec = None if train is None else SampleDecisions(
        train.means, train.global_mean, sel.weight, sel.bias, closed.basis.whitener, anchors=stats.anchors,
        per_class=False, **common)
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
                if train_dec is not None:
                    train_dec.update(h, labels)
                if residual is not None:
                    residual.update(h, labels)
                for name in setup.layers:
                    layer_dec[name].update(_to_tensor(extra[name]), labels)
                advance(len(y))

    together(stream)
    merge_all([dec, *layer_dec.values(), residual, train_dec])
    return dec.compute(), {name: d.compute() for name, d in layer_dec.items()}, \
        None if residual is None else residual.compute(), None if train_dec is None else train_dec.compute()


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
