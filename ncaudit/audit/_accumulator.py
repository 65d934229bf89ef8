"""The audit pushed from a loop the caller owns: :class:`AuditAccumulator` (``update`` / ``end_pass`` / ``compute`` /
``merge`` / ``reset``, as a torchmetrics ``Metric``), the passes of ``ncaudit report`` fed batch by batch."""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from ncaudit._device import resolve_device
from ncaudit.audit._api import distributed_default
from ncaudit.audit._audit import _assemble, _check_options
from ncaudit.audit._closed import _closed_form
from ncaudit.audit._deferred import DeferredChecks
from ncaudit.audit._ood import OODMean, _ood_metrics
from ncaudit.audit._options import AuditOptions
from ncaudit.audit._passes import (
    REFINE_ABOVE,
    _DecisionsPass,
    _refine_step,
    _ResidualPass,
    _same_samples,
    _select,
    _setup,
    _StatisticsPass,
    _together,
)
from ncaudit.audit._plan import make_plan
from ncaudit.audit._result import AuditResult, _finite, json_safe
from ncaudit.audit._source import Array, LiveInfo, as_float64, dtype_name
from ncaudit.audit._state import _Closed, _Selection, _Setup, _to_tensor
from ncaudit.distributed import spawn
from ncaudit.errors import InputError
from ncaudit.stats import Decisions, FeatureMean

#: The passes, in order: what :meth:`AuditAccumulator.update` feeds.
PHASES = ("statistics", "decisions", "refinement", "done")


class _Pushed:
    """The :class:`~ncaudit.audit._source.BatchSource` view of an accumulator: what the set-up reads."""

    def __init__(self, info: LiveInfo, classifier: tuple[np.ndarray, np.ndarray | None] | None) -> None:
        self.info = info
        self._classifier = classifier

    def classifier(self) -> tuple[np.ndarray, np.ndarray | None] | None:
        return self._classifier


class AuditAccumulator:
    """Every metric of ``ncaudit report``, accumulated from batches a training or evaluation loop already computes.

    Parameters
    ----------
    num_classes
        C; labels are class indices in [0, C).
    weight, bias : arrays of shape (C, p) and (C,), optional
        The final linear layer (copied now: the classifier *as it was when the accumulator was made*).
    device
        Where the accumulators live (default: where the first batch of features is).
    normalize, ridge, rcond, drop_empty_classes, class_names, attrs
        As for :func:`ncaudit.audit_features`.
    distributed
        Each rank feeds its own shard and every :meth:`end_pass` merges exactly across the ranks of the default
        process group (default: when a group of several ranks is active); :meth:`end_pass` and :meth:`compute` are
        then collectives that every rank must call.
    float64_decisions
        Decide pass 2 with float64 products (default: on any device but the CPU).
    metrics, per_class
        The metric keys to compute (default: every one) and, with them, the per-class values of the chosen ones, as
        :class:`~ncaudit.audit.AuditOptions`: :meth:`end_pass` asks for a second pass only when a chosen metric
        needs one (``metrics=["nc1"]``: one pass).

    Notes
    -----
    The audit takes passes over the same samples. :meth:`update` feeds the current one; :meth:`end_pass` closes it
    and says whether another is wanted:

    - pass 1, ``"statistics"``: class means, Sigma_W, Sigma_T (float64-accurate). :meth:`compute` after it gives every
      closed-form metric (NC1, CDNV, NC2, NC3, the hyperspherical energies, the MSE loss and its terms, the
      least-squares distances; NC5 with :meth:`update_ood`); the sample-level metrics (``accuracy``,
      ``ncc_accuracy``, ``nc4``, per-class NC1 and accuracies) are null and ``details["pending"]`` names them;
    - pass 2, ``"decisions"``: those sample-level metrics, and the first refinement step of the least-squares
      classifier when its error estimate asks for one;
    - ``"refinement"``: at most two more passes, only when that estimate exceeds 1e-7 and the last step still moved
      W_LS by more than 1e-5.

    So the statistics ride along an evaluation loop already run (one pass), and the full report costs one more::

        acc = AuditAccumulator(num_classes=10, weight=model.fc.weight, bias=model.fc.bias)
        while True:
            for x, y in loader:
                acc.update(features_of(x), y)   # e.g. from a forward hook on model.fc
            if not acc.end_pass():
                break
        result = acc.compute()

    No host synchronisation per batch: :meth:`update` queues device work only (the class statistics' update is
    sync-free, labels and finiteness are checked on the device and reported once by :meth:`end_pass`, pass 2 decides
    with float64 products on CUDA); the device is read once per pass.
    """

    def __init__(self, num_classes: int, weight: Array | None = None, bias: Array | None = None, *,
                 device: str | torch.device | None = None, normalize: bool = False, ridge: float = 0.0,
                 rcond: float | None = None, drop_empty_classes: bool = False,
                 class_names: Sequence[str] | None = None, attrs: Mapping[str, Any] | None = None,
                 distributed: bool | None = None, float64_decisions: bool | None = None,
                 metrics: Sequence[str] | None = None, per_class: bool = False) -> None:
        if num_classes < 1:
            raise InputError(f"num_classes must be at least 1, got {num_classes}")
        self.num_classes = int(num_classes)
        w, b = as_float64(weight), as_float64(bias)
        if w is not None and (w.ndim != 2 or w.shape[0] != num_classes):
            raise InputError(f"the classifier weight must have shape ({num_classes}, p), got {w.shape}")
        if b is not None and (w is None or b.shape != (num_classes,)):
            raise InputError(f"the bias must have shape ({num_classes},) with a weight")
        self._classifier = None if w is None else (w, b)
        self._device = None if device is None else resolve_device(device)
        self.options = AuditOptions(ridge=ridge, rcond=rcond, drop_empty_classes=drop_empty_classes,
                                    normalize=normalize, metrics=metrics, per_class=per_class)
        _check_options(self.options)
        self.plan = make_plan(metrics, per_class)
        self.class_names = list(class_names) if class_names is not None else None
        self.attrs = dict(attrs or {})
        self.distributed = distributed_default(distributed)
        self.float64_decisions = float64_decisions
        self.reset()

    # -----------------------------------------------------------------------------------------------------------------
    # State
    # -----------------------------------------------------------------------------------------------------------------
    def reset(self) -> None:
        """Back to the empty state (pass 1, nothing seen)."""
        self.phase = "statistics"
        self.rows = 0  # rows fed in the current pass (this rank)
        self._setup_: _Setup | None = None
        self._pass: Any = None
        self._sel: _Selection | None = None
        self._closed: _Closed | None = None
        self._decisions: tuple[Decisions, dict[str, Decisions]] | None = None
        self._ood: FeatureMean | None = None
        self._ood_checks: DeferredChecks | None = None
        self._ood_rows = 0

    @property
    def device(self) -> torch.device | None:
        return self._device

    @property
    def done(self) -> bool:
        """Every pass the audit wants has been taken."""
        return self.phase == "done"

    def _start(self, h: torch.Tensor, layers: Mapping[str, torch.Tensor]) -> _Setup:
        """Allocate on the first batch: its width, dtype and device fix the feature block(s)."""
        if self._device is None:
            self._device = h.device
        p = int(h.shape[1])
        if self._classifier is not None and self._classifier[0].shape[1] != p:
            raise InputError(f"the features have {p} dimensions but the classifier weight "
                             f"{self._classifier[0].shape[1]}")
        info = LiveInfo(n_features=p, num_classes=self.num_classes, feature_dtype=dtype_name(h),
                        has_classifier=self._classifier is not None,
                        has_bias=self._classifier is not None and self._classifier[1] is not None,
                        class_names=self.class_names, layers={n: int(v.shape[1]) for n, v in layers.items()},
                        attrs={"source": "batches pushed to an AuditAccumulator", **self.attrs})
        self.options = dataclasses.replace(self.options, device=str(self._device), layers=[] if layers else None,
                                           batch_size=max(1, int(h.shape[0])))  # the caller's batches
        exact = self._device.type != "cpu" if self.float64_decisions is None else self.float64_decisions
        self._setup_ = _setup(_Pushed(info, self._classifier), self.options, None, live=True,
                              distributed=self.distributed, float64_decisions=exact)
        self._pass = _StatisticsPass(self._setup_, self.options, self._device)
        return self._setup_

    # -----------------------------------------------------------------------------------------------------------------
    # The loop
    # -----------------------------------------------------------------------------------------------------------------
    def update(self, features: Array, labels: Array, layers: Mapping[str, Array] | None = None) -> None:
        """Feed one batch to the current pass: ``features`` (B, p) and ``labels`` (B,), NumPy or torch on any device;
        ``layers`` the batch's earlier-layer features ``{name: (B, p_layer)}`` (the same names in every batch)."""
        if self.phase == "done":
            raise RuntimeError("every pass is done: compute() the result, or reset() to start again")
        h = _to_tensor(features)
        extra = {name: _to_tensor(v) for name, v in (layers or {}).items()}
        if h.ndim != 2:
            raise InputError(f"features must have shape (B, p), got {tuple(h.shape)}")
        setup = self._setup_ if self._setup_ is not None else self._start(h, extra)
        if set(extra) != set(setup.layers):
            raise InputError(f"layers {sorted(extra)} differ from those of the first batch ({sorted(setup.layers)})")
        if h.shape[1] != setup.info.n_features:
            raise InputError(f"features have {h.shape[1]} dimensions, the first batch had {setup.info.n_features}")
        y = labels if isinstance(labels, torch.Tensor) else torch.as_tensor(np.asarray(labels))
        if tuple(y.shape) != (h.shape[0],):
            raise InputError(f"labels must have shape ({h.shape[0]},), got {tuple(y.shape)}")
        self._pass.update(self.rows, h, y, extra)
        self.rows += int(h.shape[0])

    def update_ood(self, features: Array) -> None:
        """Feed out-of-distribution features of the same network (any time, any pass): their global mean gives NC5."""
        h = _to_tensor(features)
        if h.ndim != 2:
            raise InputError(f"OOD features must have shape (B, p), got {tuple(h.shape)}")
        if self._ood is None:
            dev = self._device or h.device
            self._ood = FeatureMean(int(h.shape[1]), device=dev, normalize=self.options.normalize)
            self._ood_checks = DeferredChecks(1, dev)
        assert self._ood_checks is not None
        self._ood_checks.features(h, self._ood_rows, "OOD features")
        self._ood.update(h)
        self._ood_rows += int(h.shape[0])

    def end_pass(self) -> bool:
        """Close the current pass (merging across ranks when distributed); whether the audit wants another pass over
        the same samples.

        Raises
        ------
        InputError
            A label outside [0, C) or a non-finite feature was fed (the first one is named), a class without
            samples, a second pass that saw other samples than the first.
        """
        if self.phase == "done":
            return False
        setup = self._setup_
        if setup is None:
            raise InputError("no batch was fed: call update(features, labels) for every batch of the pass first")
        _together(setup, self._pass.check)
        if self.phase == "statistics":
            self._sel = _select(self._pass.finish(), setup, self.options)
            self._closed = closed = _closed_form(self._sel.stats, self._sel.weight, self._sel.bias, self.options,
                                                 self.plan)
            if self.plan.decisions:
                return self._next("decisions", _DecisionsPass(setup, self._sel, closed, self.options,
                                                              self._device, plan=self.plan))  # type: ignore[arg-type]
            if closed.ls is not None and closed.estimate > REFINE_ABOVE:  # the first refinement pass on its own
                return self._next("refinement", _ResidualPass(setup, self._sel, closed.ls, self.options,
                                                              self._device))  # type: ignore[arg-type]
            return self._next("done", None)
        sel, closed = self._sel, self._closed
        assert sel is not None and closed is not None
        if self.phase == "decisions":
            decisions, layer_decisions, residual, _ = self._pass.finish()
            _same_samples(sel.stats.counts, decisions, setup.where)
            self._decisions = (decisions, layer_decisions)
        else:
            residual = self._pass.finish()
        if closed.ls is not None and residual is not None:
            closed.ls, more = _refine_step(sel, closed.ls, residual)
            if more:
                return self._next("refinement", _ResidualPass(setup, sel, closed.ls, self.options,
                                                              self._device))  # type: ignore[arg-type]
        return self._next("done", None)

    def _next(self, phase: str, step: Any) -> bool:
        self.phase, self._pass, self.rows = phase, step, 0
        return phase != "done"

    def compute(self) -> AuditResult:
        """The result so far: after pass 1 (closed automatically if it is still open) the closed forms, the
        sample-level metrics null and listed in ``details["pending"]``; after every pass, the full report.

        Raises
        ------
        RuntimeError
            A later pass has been fed part of its batches: close it with :meth:`end_pass` first.
        """
        if self.phase == "statistics":
            self.end_pass()
        elif self.phase != "done" and self.rows > 0:
            raise RuntimeError(f"the {self.phase} pass is in progress ({self.rows} rows fed): feed every batch, "
                               "then end_pass(), before compute()")
        setup, sel, closed = self._setup_, self._sel, self._closed
        assert setup is not None and sel is not None and closed is not None
        closed = dataclasses.replace(closed, metrics=dict(closed.metrics), details=copy.deepcopy(closed.details))
        decisions, layer_decisions = self._decisions if self._decisions is not None else (None, None)
        result = _assemble(setup, sel, closed, decisions, layer_decisions, None, self.options,
                           self._device, None, self.plan)  # type: ignore[arg-type]
        if self.phase == "refinement":
            result.details["pending"] = {"pass": "refinement", "metrics": [
                k for k in ("mse_term_a", "mse_term_b", "ls_distance", "ls_cosine") if self.plan.wants(k)]}
        ood = self._ood_mean(setup)
        if ood is not None and self.plan.ood:
            _ood_metrics(result.metrics, result.details, sel, ood)
            result.metrics["nc5"] = _finite(result.metrics["nc5"])
            result.details = json_safe(result.details)
        return result

    def _ood_mean(self, setup: _Setup) -> OODMean | None:
        if self._ood is None:
            return None
        if self._ood.num_features != setup.info.n_features:
            raise InputError(f"the OOD features have {self._ood.num_features} dimensions but the audited ones "
                             f"{setup.info.n_features}; NC5 compares features of the same penultimate layer")
        assert self._ood_checks is not None
        _together(setup, lambda: self._ood_checks.raise_first("OOD features"))  # type: ignore[union-attr]
        acc = self._ood
        if setup.merge:  # merge a copy: this rank's own state stays as fed
            from ncaudit.distributed import merge_states, spawn

            acc = merge_states(spawn(acc).load_state_dict(acc.state_dict()))
        return OODMean(acc.compute(), int(float(acc.count)), "OOD features pushed to an AuditAccumulator")

    def spawn(self) -> AuditAccumulator:
        """An empty twin at the same pass (the same classes, classifier and options, and past pass 1 the same
        statistics), to be fed another shard of this pass and merged back with :meth:`merge`."""
        twin = copy.copy(self)
        twin._ood, twin._ood_checks, twin._ood_rows = None, None, 0
        if self._setup_ is None:
            twin.reset()
            return twin
        twin.rows = 0
        twin._pass = copy.copy(self._pass)
        step, device = twin._pass, self._device
        if isinstance(step, _StatisticsPass):
            step.accs = {name: spawn(a) for name, a in step.accs.items()}
            if step.checks is not None:
                step.checks = DeferredChecks(self.num_classes, device)  # type: ignore[arg-type]
        elif isinstance(step, _DecisionsPass):
            step.dec = spawn(step.dec)
            step.layer_dec = {name: spawn(d) for name, d in step.layer_dec.items()}
            step.residual = None if step.residual is None else spawn(step.residual)
        elif isinstance(step, _ResidualPass):
            step.acc = spawn(step.acc)
        return twin

    def merge(self, other: AuditAccumulator) -> AuditAccumulator:
        """Add ``other``'s batches of the current pass (another shard in this process; both at the same pass, made
        with the same arguments) to this accumulator; return ``self``."""
        if other._setup_ is None and other._ood is None:
            return self
        if other.phase != self.phase:
            raise ValueError(f"cannot merge an accumulator in pass {other.phase!r} into one in pass {self.phase!r}")
        if self._setup_ is None:
            if other._setup_ is not None:
                raise ValueError("feed this accumulator a batch before merging another into it")
        elif other._setup_ is not None:
            mine, theirs = _states(self._pass), _states(other._pass)
            for a, b in zip(mine, theirs):
                a.merge(b)
            checks, their_checks = getattr(self._pass, "checks", None), getattr(other._pass, "checks", None)
            if checks is not None and their_checks is not None:
                checks.merge(their_checks, self.rows)
            self.rows += other.rows
        if other._ood is not None:
            if self._ood is None or self._ood_checks is None:
                self._ood = FeatureMean(other._ood.num_features, device=other._ood.device,
                                        normalize=self.options.normalize)
                self._ood_checks = DeferredChecks(1, other._ood.device)
            self._ood.merge(other._ood)
            assert other._ood_checks is not None
            self._ood_checks.merge(other._ood_checks, self._ood_rows)
            self._ood_rows += other._ood_rows
        return self


def _states(step: Any) -> list[Any]:
    """The accumulators of a pass object, in a fixed order."""
    if isinstance(step, _StatisticsPass):
        return list(step.accs.values())
    if isinstance(step, _DecisionsPass):
        return [s for s in (step.dec, *step.layer_dec.values(), step.residual) if s is not None]
    if isinstance(step, _ResidualPass):
        return [step.acc]
    return []
