"""NC5: the pass over out-of-distribution features (their global mean) and the metric against the class means."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from ncaudit import metrics
from ncaudit._device import torch_device
from ncaudit._validate import check_finite
from ncaudit.audit._options import AuditOptions, ProgressTracker
from ncaudit.audit._passes import _stream, _where
from ncaudit.audit._source import BatchSource
from ncaudit.audit._state import _Selection, _Setup, _to_tensor
from ncaudit.errors import InputError

if TYPE_CHECKING:
    import torch

    from ncaudit.distributed import DistContext


@dataclass(frozen=True)
class OODMean:
    """The global mean of the out-of-distribution features, how many rows gave it, and where they came from."""

    mean: np.ndarray
    n_samples: int
    where: str


def _ood_setup(source: BatchSource, setup: _Setup, options: AuditOptions, group: DistContext | None, *,
               live: bool = False) -> _Setup:
    """The OOD source's set-up: the in-distribution features' width, its own rows per rank, no classifier; its
    checks deferred when the audited source's are."""
    info = source.info
    where = _where(info)
    if info.n_features != setup.info.n_features:
        raise InputError(f"{where}: the OOD features have {info.n_features} dimensions but the audited ones "
                         f"{setup.info.n_features}; NC5 compares features of the same network's penultimate layer "
                         "(extract both with the same model)")
    if info.n_samples == 0:
        raise InputError(f"{where}: the OOD cache holds no samples; extract some first")
    split = group is not None and group.distributed and not live
    rows = group.rows(info.n_samples) if split and info.n_samples is not None else None
    return _Setup(info, where, [], setup.gemm, None, rows, merge=setup.merge, deferred=setup.deferred,
                  group=group)


class _OODPass:
    """The global mean of the OOD features (labels not read)."""

    title = "NC5: out-of-distribution mean"

    def __init__(self, setup: _Setup, options: AuditOptions, device: torch.device | None) -> None:
        from ncaudit.audit._deferred import DeferredChecks
        from ncaudit.stats import FeatureMean

        self.setup = setup
        device = torch_device(device)
        self.acc = FeatureMean(setup.info.n_features, device=device, normalize=options.normalize)
        self.checks = DeferredChecks(1, device) if setup.deferred else None

    def update(self, start: int, x: Any, y: Any, extra: Any) -> None:
        h = _to_tensor(x)
        if self.checks is not None:
            self.checks.features(h, start, "OOD features")
        else:
            check_finite(h, start, self.setup.where)
        self.acc.update(h)

    def check(self) -> None:
        if self.checks is not None:
            self.checks.raise_first(self.setup.where)

    def finish(self) -> OODMean:
        if self.setup.merge:
            from ncaudit.distributed import merge_all

            merge_all([self.acc])
        try:
            mean = self.acc.compute()
        except ValueError:
            raise InputError(f"{self.setup.where}: no OOD samples to audit") from None
        return OODMean(mean, int(float(self.acc.count)), self.setup.where)


def _ood_pass(source: BatchSource, setup: _Setup, options: AuditOptions, device: torch.device | None,
              progress: ProgressTracker) -> OODMean:
    step = _OODPass(setup, options, device)
    return _stream(source, setup, options, progress, step, step.title, layers=False)


def _ood_metrics(m: dict[str, float | None], details: dict[str, Any], sel: _Selection, ood: OODMean) -> None:
    """NC5 = mean_c |cos(mu_c, mu_G^OOD)| (raw class means), and where the OOD mean came from."""
    m["nc5"] = metrics.nc5(sel.stats.means, ood.mean)
    details["ood"] = {"source": ood.where, "n_samples": ood.n_samples,
                      "global_mean_norm": float(np.linalg.norm(ood.mean))}
