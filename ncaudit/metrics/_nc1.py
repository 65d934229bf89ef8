"""NC1: the basis of Sigma_B with its true rank (spec rule 1) and tr(Sigma_W Sigma_B^dagger) / C."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ncaudit.metrics._numeric import EPS


# ---------------------------------------------------------------------------------------------------------------------
# Pseudo-inverses with an explicit rank
# ---------------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MeansBasis:
    """Thin SVD of M = U S V^T restricted to its numerical rank: Sigma_B^dagger = C U S^-2 U^T.

    Attributes
    ----------
    u : ndarray of shape (p, r)
        Left singular vectors of M kept.
    s : ndarray of shape (r,)
        Their singular values, descending.
    cutoff : float
        Singular values at or below it were dropped: max(p, C) * eps * s_max.
    vt : ndarray of shape (r, C)
        The matching right singular vectors.
    """

    u: np.ndarray
    s: np.ndarray
    cutoff: float
    vt: np.ndarray | None = None

    @property
    def rank(self) -> int:
        return int(self.s.shape[0])

    @property
    def whitener(self) -> np.ndarray:
        """U S^-1, shape (p, r): ||(h - mu)^T U S^-1||^2 = (1/C) (h - mu)^T Sigma_B^dagger (h - mu)."""
        return self.u / self.s


def means_basis(centred_means: np.ndarray) -> MeansBasis:
    """The rank-r basis of Sigma_B from the thin SVD of M.

    Parameters
    ----------
    centred_means : ndarray of shape (C, p)
        Rows mu_c - mu_G.

    Notes
    -----
    Sigma_B has rank r <= min(p, C - 1) because sum_c pi_c (mu_c - mu_G) = 0. At most min(p, C - 1) singular values
    are kept, and only those above max(p, C) * eps * s_max; a default-tolerance ``pinv`` of the p x p matrix Sigma_B
    instead keeps spurious tiny eigenvalues (or drops real small ones) and mis-states NC1 by orders of magnitude.
    """
    c, p = centred_means.shape
    u, s, vt = np.linalg.svd(centred_means.T, full_matrices=False)
    if s.size == 0 or s[0] == 0.0:
        return MeansBasis(u[:, :0], s[:0], 0.0, vt[:0])
    cutoff = max(p, c) * EPS * float(s[0])
    keep = min(int(np.sum(s > cutoff)), min(p, c - 1))
    return MeansBasis(u[:, :keep], s[:keep], cutoff, vt[:keep])


# ---------------------------------------------------------------------------------------------------------------------
# NC1: within-class variability
# ---------------------------------------------------------------------------------------------------------------------
def nc1(sigma_w: np.ndarray, basis: MeansBasis) -> float:
    """NC1 = (1/C) tr(Sigma_W Sigma_B^dagger).

    Notes
    -----
    With Sigma_B^dagger = C U S^-2 U^T this is sum_k u_k^T Sigma_W u_k / s_k^2, an r-term sum: no p x p inverse.
    """
    if basis.rank == 0:
        return math.nan
    wu = basis.whitener
    return float(np.sum((sigma_w @ wu) * wu))


def nc1_of_deviations(deviations: np.ndarray, basis: MeansBasis) -> float:
    """(1/C) tr(Sigma_D Sigma_B^dagger) for Sigma_D = (1/K) sum_k d_k d_k^T, from the K rows ``deviations`` (K, p).

    Used for the precision floor (d_k = h_k - h_k^fp32): the NC1 that these perturbations alone would produce.
    """
    if basis.rank == 0 or deviations.shape[0] == 0:
        return math.nan
    z = deviations @ basis.whitener
    return float(np.sum(z * z) / deviations.shape[0])
