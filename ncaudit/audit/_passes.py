"""The passes over the samples: statistics (pass 1), decisions (pass 2) and the refinement passes of W_LS.

Each pass is an object with ``update(start, features, labels, layers)`` per batch and ``finish()`` (the merge across
ranks, then the pass's result), so that the same code serves the audit that pulls batches from a source
(:func:`_stream`: a cache, arrays in memory, a model over a loader) and :class:`~ncaudit.AuditAccumulator`, to which a
training loop pushes them.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from ncaudit import metrics
from ncaudit._device import torch_device
from ncaudit._validate import check_classifier, check_finite, check_labels, check_memory, classes_to_keep
from ncaudit.audit._means_from import TrainingMeans
from ncaudit.audit._options import AuditOptions, ProgressTracker
from ncaudit.audit._plan import FULL, Plan
from ncaudit.audit._source import BatchSource, SourceInfo
from ncaudit.audit._state import _Closed, _labels, _Selection, _Setup, _to_tensor, _unit_rows
from ncaudit.errors import InputError
from ncaudit.stats import Decisions, HostDecisions, HostStatistics, Residual
from ncaudit.stats._host import gemm_name_for

if TYPE_CHECKING:
    import torch

    from ncaudit.distributed import DistContext
    from ncaudit.stats import ClassStatistics

#: Refine W_LS on the samples when its estimated relative error (metrics.ls_error_estimate) is above this.
REFINE_ABOVE = 1e-7
#: Stop refining once a step changes W_LS by less than this (relative): the error left is about its square.
CONVERGED_BELOW = 1e-5
#: At most this many refinement steps (the first rides along in pass 2; each further one reads the samples again).
MAX_REFINE_STEPS = 3


# ---------------------------------------------------------------------------------------------------------------------
# Set-up
# ---------------------------------------------------------------------------------------------------------------------
def _setup(source: BatchSource, options: AuditOptions, group: DistContext | None, *, live: bool = False,
           distributed: bool = False, float64_decisions: bool = False, deferred: bool | None = None) -> _Setup:
    """What the passes need to know before reading a row.

    A cache (``live`` False) is split into contiguous rows per rank when ``group`` is distributed; a live source
    (arrays in memory, a model over a loader, an accumulator) is already this rank's shard, merged across ranks when
    ``distributed``, and checked on the device (:class:`DeferredChecks`). ``float64_decisions`` makes the decision
    GEMM float64 whatever the features' dtype: exact without the float32 path's data-dependent recheck, so that pass
    2 never waits for the device (the live default on CUDA). ``deferred`` (default: ``live``) checks labels and
    finiteness on the device once per pass instead of batch by batch (False for NumPy batches of a live source).
    """
    info = source.info
    where = _where(info)
    if info.n_samples == 0:
        raise InputError(f"{where}: the cache holds no samples; extract some first" if not live
                         else f"{where}: no samples to audit")
    layers = _select_layers(options.layers, info.layers, where)
    _check_sizes(info, layers, options)
    classifier = source.classifier()
    if classifier is not None:
        check_classifier(*classifier, where)
    split = group is not None and group.distributed and not live
    rows = group.rows(info.n_samples) if split and info.n_samples is not None else None
    gemm = "float64" if float64_decisions else gemm_name_for(info.feature_dtype)
    return _Setup(info, where, layers, gemm, classifier, rows, merge=split or (live and distributed),
                  deferred=live if deferred is None else deferred, group=group)


def _where(info: SourceInfo) -> str:
    return str(info.path) if info.path is not None else str(info.attrs.get("source", "the features"))


def _check_sizes(info: SourceInfo, layers: list[str], options: AuditOptions) -> None:
    """Before the accumulators allocate: the statistics fit in memory, and C classes can have samples at all."""
    check_memory([info.n_features, *(info.layers[name] for name in layers)], info.num_classes, _where(info))
    n = info.n_samples
    if n is not None and info.num_classes > n and not options.drop_empty_classes:
        raise InputError(f"{_where(info)}: num_classes is {info.num_classes} but only {n} rows are read, so "
                         f"at least {info.num_classes - n} classes have no samples; pass "
                         "--drop-empty-classes to audit the classes present, or fix num_classes")


def _select_layers(requested: Sequence[str] | None, available: Mapping[str, int], where: str) -> list[str]:
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


# ---------------------------------------------------------------------------------------------------------------------
# Streaming a source through a pass
# ---------------------------------------------------------------------------------------------------------------------
def _n_rows(setup: _Setup) -> int | None:
    return setup.info.n_samples if setup.rows is None else len(setup.rows)


def _together(setup: _Setup, step: Callable[[], Any]) -> Any:
    """Run ``step``; when the ranks merge, an error on one rank stops every rank (:func:`together`)."""
    if not setup.merge:
        return step()
    from ncaudit.distributed import together

    return together(step)


def _merge(setup: _Setup, accs: Any) -> None:
    """Merge the accumulators across the ranks (when they merge)."""
    if setup.merge:
        from ncaudit.distributed import merge_all

        merge_all(accs)


def _stream(source: BatchSource, setup: _Setup, options: AuditOptions, progress: ProgressTracker, step: Any,
            title: str, *, layers: bool = True) -> Any:
    """Feed every batch of ``source`` (this rank's rows) to the pass ``step``; its ``finish()``."""
    def run() -> None:
        with progress.task(title, _n_rows(setup)) as advance:  # type: ignore[arg-type]
            for start, x, y, extra in source.iter_batches(options.batch_size, layers=setup.layers if layers else (),
                                                          rows=setup.rows):
                step.update(start, x, y, extra)
                advance(len(y))
            step.check()

    _together(setup, run)
    return step.finish()


# ---------------------------------------------------------------------------------------------------------------------
# Pass 1: class statistics
# ---------------------------------------------------------------------------------------------------------------------
class _StatisticsPass:
    """Pass 1: one class-statistics accumulator for the final features (key None) and one per requested layer
    (:class:`~ncaudit.stats.HostStatistics` on the host, ``device`` None; else
    :class:`~ncaudit.stats.ClassStatistics`)."""

    title = "pass 1/2: class statistics"

    def __init__(self, setup: _Setup, options: AuditOptions, device: torch.device | None) -> None:
        info = setup.info
        self.setup = setup
        self.host = device is None
        widths = {None: info.n_features, **{name: info.layers[name] for name in setup.layers}}
        if self.host:
            self.accs: dict[str | None, Any] = {
                name: HostStatistics(info.num_classes, width, normalize=options.normalize)
                for name, width in widths.items()}
        else:
            from ncaudit.stats import ClassStatistics

            self.accs = {name: ClassStatistics(info.num_classes, width, device=device, normalize=options.normalize)
                         for name, width in widths.items()}
        # The batches as the accumulators take them: NumPy on the host, tensors elsewhere
        self._rows, self._as_labels = (np.asarray, _host_labels) if self.host else (_to_tensor, _labels)
        self.checks = None
        if setup.deferred:
            from ncaudit.audit._deferred import DeferredChecks

            self.checks = DeferredChecks(info.num_classes, torch_device(device))

    def update(self, start: int, x: Any, y: Any, extra: Mapping[str, Any]) -> None:
        setup = self.setup
        h, labels = self._rows(x), self._as_labels(y)
        if self.checks is not None:  # on the device, reported once by check(): no synchronisation per batch
            labels = self.checks.labels(labels, start)
            self.checks.features(h, start)
        else:
            check_labels(labels, setup.info.num_classes, start, setup.where)
            check_finite(h, start, setup.where)
        self.accs[None].update(h, labels)
        for name in setup.layers:
            hl = self._rows(extra[name])
            if self.checks is not None:
                self.checks.features(hl, start, f"layers/{name}")
            else:
                check_finite(hl, start, setup.where, f"/layers/{name}/features")
            self.accs[name].update(hl, labels)

    def check(self) -> None:
        """Raise the first bad label or feature row found on the device (one synchronisation per pass)."""
        if self.checks is not None:
            self.checks.raise_first(self.setup.where)

    def finish(self) -> dict[str | None, HostStatistics | ClassStatistics]:
        _merge(self.setup, self.accs.values())
        return self.accs


def _select(accs: dict[str | None, HostStatistics | ClassStatistics], setup: _Setup, options: AuditOptions) -> _Selection:
    """The classes to audit and their statistics; the classifier restricted (and normalised) accordingly."""
    c_all = setup.info.num_classes
    try:
        full_stats = accs[None].compute()
    except ValueError:
        raise InputError(f"{setup.where}: no samples to audit (the data yielded no rows)") from None
    keep = classes_to_keep(full_stats.counts, options.drop_empty_classes, setup.where, setup.info.class_names)
    dropped = [int(c) for c in np.setdiff1d(np.arange(c_all), keep)]
    weight = bias = None
    if setup.classifier is not None:
        every = len(keep) == c_all  # no copy of the C x p rows when every class is kept
        weight = setup.classifier[0] if every else setup.classifier[0][keep]
        bias = np.zeros(len(keep)) if setup.classifier[1] is None else setup.classifier[1][keep]
        if options.normalize:
            weight, bias = _unit_rows(weight), np.zeros(len(keep))
    remap = np.full(c_all, -1, dtype=np.int64)
    remap[keep] = np.arange(len(keep))
    layer_stats = {name: accs[name].compute().select(keep) for name in setup.layers}
    layer_bases = {name: metrics.means_basis(s.centred_means) for name, s in layer_stats.items()}
    setup.classifier = None  # the rows kept are in the selection: free the full C x p copy
    return _Selection(keep, dropped, full_stats.select(keep), layer_stats, layer_bases, weight, bias, remap)


# ---------------------------------------------------------------------------------------------------------------------
# Pass 2: decisions
# ---------------------------------------------------------------------------------------------------------------------
class _DecisionsPass:
    """Pass 2: classifier and nearest-class-mean decisions, per-class NC1 and the direct MSE (NCC per layer), the
    first refinement sums of W_LS when its error estimate asks for them, and with ``train`` (``--means-from``) the
    decisions against the training class means."""

    title = "pass 2/2: decisions"

    def __init__(self, setup: _Setup, sel: _Selection, closed: _Closed, options: AuditOptions,
                 device: torch.device | None, train: TrainingMeans | None = None, plan: Plan = FULL) -> None:
        self.setup, self.device = setup, device
        self.host = device is None
        stats = sel.stats
        if self.host:  # NumPy on the host
            decider: Any = functools.partial(HostDecisions, gemm_dtype=setup.gemm, normalize=options.normalize)
        else:
            import torch

            from ncaudit.stats import SampleDecisions

            decider = functools.partial(SampleDecisions, device=device, gemm_dtype=getattr(torch, setup.gemm),
                                        normalize=options.normalize)
        # The classifier's columns only when a chosen metric reads its decisions (else nearest class mean only); the
        # whitener only for the per-class NC1 traces.
        weight, bias = (sel.weight, sel.bias) if plan.classifier_decisions else (None, None)
        whitener = closed.basis.whitener if closed.basis is not None else np.zeros((stats.n_features, 0))
        self.dec = decider(stats.means, stats.global_mean, weight, bias, whitener, anchors=stats.anchors,
                           per_class=plan.per_class_nc1)
        # float64 when the classifier's scale needs it (reported in the details)
        setup.gemm = str(self.dec.gemm_dtype).replace("torch.", "")
        # --means-from: the same decisions against the training class means (NCC accuracy, NC4)
        self.train_dec = None if train is None or not plan.any(("ncc_accuracy", "nc4")) else decider(
            train.means, train.global_mean, weight, bias, whitener, anchors=stats.anchors, per_class=False)
        self.layer_dec = {
            name: decider(s.means, s.global_mean, None, None, sel.layer_bases[name].whitener, anchors=s.anchors,
                          per_class=False)
            for name, s in sel.layer_stats.items()
        } if plan.wants("ncc_accuracy") else {}
        self.residual = None
        if closed.ls is not None and closed.estimate > REFINE_ABOVE:
            from ncaudit.stats import LeastSquaresResidual

            self.residual = LeastSquaresResidual(closed.ls.weight, stats.global_mean, stats.priors,
                                                 device=torch_device(device), normalize=options.normalize)
        self.remap = _remap(sel.remap, device)
        self.last = len(sel.remap) - 1

    def update(self, start: int, x: Any, y: Any, extra: Mapping[str, Any]) -> None:
        if self.host:  # NumPy batches
            labels, rows = self.remap[_host_labels(y)], np.asarray
        else:
            labels = _labels(y).to(self.device, non_blocking=True)
            if self.setup.deferred:  # labels were checked in pass 1; a loader that changed them shows in the counts
                labels = labels.clamp(0, self.last)
            labels, rows = self.remap[labels], _to_tensor
        h = rows(x)
        self.dec.update(h, labels)
        if self.train_dec is not None:
            self.train_dec.update(h, labels)
        if self.residual is not None:  # torch's accumulator on any path
            self.residual.update(_to_tensor(h), _labels(labels))
        for name, dec in self.layer_dec.items():
            dec.update(rows(extra[name]), labels)

    def check(self) -> None:
        pass

    def finish(self) -> tuple[Decisions, dict[str, Decisions], Residual | None, Decisions | None]:
        _merge(self.setup, [self.dec, *self.layer_dec.values(), self.residual, self.train_dec])
        return self.dec.compute(), {name: d.compute() for name, d in self.layer_dec.items()}, \
            None if self.residual is None else self.residual.compute(), \
            None if self.train_dec is None else self.train_dec.compute()


def _host_labels(y: Any) -> np.ndarray:
    """Labels of a NumPy batch as int64 (no copy when they are)."""
    return np.asarray(y).astype(np.int64, copy=False)


def _remap(remap: np.ndarray, device: torch.device | None) -> Any:
    """The label remap (class index among those kept) where the pass's labels are: NumPy on the host, else a
    tensor on ``device``."""
    if device is None:
        return remap
    import torch

    return torch.from_numpy(remap).to(device)


def _same_samples(stats_counts: np.ndarray, decisions: Decisions, where: str) -> None:
    """A live source must yield the same samples on every pass: pass 2's class counts must be pass 1's."""
    if not np.array_equal(decisions.counts, stats_counts):
        raise InputError(f"{where}: the second pass saw {int(decisions.counts.sum())} samples, the first "
                         f"{int(stats_counts.sum())} (or another class mix); every pass must iterate the same samples "
                         "(no random subset, drop_last=False, no sampler that changes between iterations)")


# ---------------------------------------------------------------------------------------------------------------------
# Refinement of W_LS
# ---------------------------------------------------------------------------------------------------------------------
class _ResidualPass:
    """One refinement pass: the sums of the normal equations' residual of the current W_LS on the samples."""

    def __init__(self, setup: _Setup, sel: _Selection, ls: metrics.LeastSquares, options: AuditOptions,
                 device: torch.device | None) -> None:
        from ncaudit.stats import LeastSquaresResidual

        device = torch_device(device)
        self.setup, self.device = setup, device
        self.title = f"refinement {ls.steps + 1}: least squares"
        stats = sel.stats
        self.acc = LeastSquaresResidual(ls.weight, stats.global_mean, stats.priors, device=device,
                                        normalize=options.normalize)
        self.remap = _remap(sel.remap, device)
        self.last = len(sel.remap) - 1

    def update(self, start: int, x: Any, y: Any, extra: Mapping[str, Any]) -> None:
        labels = _labels(y).to(self.device, non_blocking=True)
        if self.setup.deferred:
            labels = labels.clamp(0, self.last)
        self.acc.update(_to_tensor(x), self.remap[labels])

    def check(self) -> None:
        pass

    def finish(self) -> Residual:
        _merge(self.setup, [self.acc])
        return self.acc.compute()


def _refine_step(sel: _Selection, ls: metrics.LeastSquares, residual: Residual) -> tuple[metrics.LeastSquares, bool]:
    """One refinement step from the residual measured on the samples; whether another pass is wanted."""
    ls = metrics.refine(sel.stats, ls, residual)
    more = ls.steps < MAX_REFINE_STEPS and (ls.correction or 0.0) > CONVERGED_BELOW
    return ls, more


def _refine(source: BatchSource, setup: _Setup, sel: _Selection, closed: _Closed, residual: Residual | None,
            options: AuditOptions, device: torch.device | None, progress: ProgressTracker) -> metrics.LeastSquares:
    """Iterative refinement of W_LS on the samples when its error estimate is above ``REFINE_ABOVE``: the step
    measured in pass 2 (``residual``; measured in a pass of its own when no pass 2 ran), then further passes (at most
    ``MAX_REFINE_STEPS`` in all) while the last correction is above ``CONVERGED_BELOW``."""
    ls = closed.ls
    assert ls is not None

    def measure(ls: metrics.LeastSquares) -> Residual:
        step = _ResidualPass(setup, sel, ls, options, device)
        return _stream(source, setup, options, progress, step, step.title, layers=False)

    if residual is None and closed.estimate > REFINE_ABOVE:  # no pass 2 rode along
        residual = measure(ls)
    while residual is not None:
        ls, more = _refine_step(sel, ls, residual)
        if not more:
            break
        residual = measure(ls)
    return ls
