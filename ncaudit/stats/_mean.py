"""The mean of a stream of features (the global mean of out-of-distribution features, for NC5)."""

from __future__ import annotations

import numpy as np
import torch

from ncaudit.stats._state import _Sums


class FeatureMean(_Sums):
    """Streaming, mergeable mean of features ``h`` (B, p), labels ignored: (1/N) sum_i h_i in float64.

    Rows are shifted by the first row seen before they are summed, so that a large common offset does not cost the
    sum its digits; sums merge exactly (the other state's shift is carried with it). No host synchronisation per
    batch.

    Parameters
    ----------
    num_features
        p.
    device, normalize
        As for :class:`~ncaudit.stats.ClassStatistics` (``normalize``: the mean of h / ||h||).
    """

    STATE: tuple[str, ...] = ("total", "count", "shift", "seen")

    def __init__(self, num_features: int, *, device: str | torch.device = "cpu", normalize: bool = False) -> None:
        self.num_features = num_features
        self.device = torch.device(device)
        self.normalize = normalize
        self.reset()

    def reset(self) -> None:
        f64 = dict(dtype=torch.float64, device=self.device)
        self.total = torch.zeros(self.num_features, **f64)
        self.count = torch.zeros((), **f64)
        self.shift = torch.zeros(self.num_features, **f64)
        self.seen = torch.zeros((), **f64)  # 1.0 once the shift holds a row

    @torch.no_grad()
    def update(self, features: torch.Tensor | np.ndarray) -> None:
        """Add one batch of rows (any float dtype)."""
        h = torch.as_tensor(features).to(self.device, torch.float64)
        if h.ndim != 2 or h.shape[1] != self.num_features:
            raise ValueError(f"features must have shape (B, {self.num_features}), got {tuple(h.shape)}")
        if h.shape[0] == 0:
            return
        if self.normalize:
            h = h / torch.linalg.vector_norm(h, dim=1, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)
        self.shift = torch.where(self.seen > 0, self.shift, h[0])
        self.seen.fill_(1.0)
        self.total += (h - self.shift).sum(0)
        self.count += h.shape[0]

    @torch.no_grad()
    def merge(self, other: FeatureMean) -> FeatureMean:  # type: ignore[override]
        """Add ``other``'s rows, re-expressed around this state's shift (exact algebra)."""
        o_total, o_count = other.total.to(self.device), other.count.to(self.device)
        o_shift, o_seen = other.shift.to(self.device), other.seen.to(self.device)
        self.shift = torch.where(self.seen > 0, self.shift, o_shift)
        self.total += torch.where(o_seen > 0, o_total + o_count * (o_shift - self.shift), torch.zeros_like(o_total))
        self.count += o_count
        self.seen = torch.maximum(self.seen, o_seen)
        return self

    def compute(self) -> np.ndarray:
        """mu = shift + total / N, shape (p,).

        Raises
        ------
        ValueError
            No row has been seen.
        """
        n = float(self.count)
        if n == 0:
            raise ValueError("no samples were accumulated")
        return (self.shift + self.total / n).cpu().numpy()
