"""Sums for the iterative refinement of the least-squares classifier on the samples."""

from __future__ import annotations

import numpy as np
import torch

from ncaudit.stats._gemm import Workspace, mm
from ncaudit.stats._results import Residual
from ncaudit.stats._state import _Sums


class LeastSquaresResidual(_Sums):
    """Streaming sums for iterative refinement of a least-squares classifier ``W_0`` on the samples themselves.

    The closed form W_LS = Sigma_YH Sigma_T^dagger uses Sigma_T as accumulated; where Sigma_T has eigenvalues that its
    float64 accumulation resolves only to a few digits (spectra decaying over twelve decades), one pass of these
    sums gives the exact residual of the normal equations, and W_1 = W_0 + (Sigma_YH - W_0 Sigma_T) Sigma_T^dagger
    is accurate to the square of W_0's relative error (semi-normal equations with refinement, Bjorck 1987).

    Parameters
    ----------
    weight : ndarray of shape (C, p)
        W_0.
    global_mean : ndarray of shape (p,)
        mu_G.
    priors : ndarray of shape (C,)
        pi.
    device, normalize
        As for :class:`ClassStatistics`.
    """

    STATE: tuple[str, ...] = ("gradient", "squared", "count")

    def __init__(self, weight: np.ndarray, global_mean: np.ndarray, priors: np.ndarray, *,
                 device: str | torch.device = "cpu", normalize: bool = False) -> None:
        self.device = torch.device(device)
        f64 = dict(dtype=torch.float64, device=self.device)
        self.weight = torch.as_tensor(weight, **f64)
        self.weight_t = self.weight.T.contiguous()
        self.global_mean = torch.as_tensor(global_mean, **f64)
        self.priors = torch.as_tensor(priors, **f64)
        self.normalize = normalize
        self._workspace = Workspace(self.device)
        self.reset()

    def reset(self) -> None:
        c, p = self.weight.shape
        self.gradient = torch.zeros(p, c, dtype=torch.float64, device=self.device)
        self.squared = torch.zeros((), dtype=torch.float64, device=self.device)
        self.count = torch.zeros((), dtype=torch.float64, device=self.device)

    @torch.no_grad()
    def update(self, features: torch.Tensor | np.ndarray, labels: torch.Tensor | np.ndarray) -> None:
        """Add one batch: ``features`` (B, p), ``labels`` (B,) already mapped to [0, C)."""
        h = torch.as_tensor(features)
        y = torch.as_tensor(labels).to(self.device, dtype=torch.int64)
        b, (c, p) = h.shape[0], self.weight.shape
        if b == 0:
            return
        ws = self._workspace
        x = ws.get("x", b, p, torch.float64).copy_(h.to(self.device))
        if self.normalize:
            x /= torch.linalg.vector_norm(x, dim=1, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)
        x -= self.global_mean
        r = mm(x, self.weight_t, ws.get("r", b, c, torch.float64))
        r.neg_().sub_(self.priors)
        r[torch.arange(b, device=self.device), y] += 1.0  # r = (e_y - pi) - W_0 x
        self.gradient += mm(x.T, r, ws.get("g", p, c, torch.float64))
        self.squared += r.square().sum()
        self.count += b

    def compute(self) -> Residual:
        n = float(self.count)
        if n == 0:
            raise ValueError("no samples were accumulated")
        return Residual(gradient=(self.gradient.T / n).cpu().numpy(), loss=0.5 * float(self.squared) / n,
                        n_samples=int(n))
