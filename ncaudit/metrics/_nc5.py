"""NC5: orthogonality of the in-distribution class means to the global mean of out-of-distribution features."""

from __future__ import annotations

import math

import numpy as np


def nc5(means: np.ndarray, ood_mean: np.ndarray) -> float:
    """mean_c |cos(mu_c, mu_G^OOD)|: the raw (uncentred) class means against the OOD features' global mean.

    Parameters
    ----------
    means : ndarray of shape (C, p)
        Class means mu_c of the in-distribution features.
    ood_mean : ndarray of shape (p,)
        mu_G^OOD = (1/N_OOD) sum_i h_i^OOD, the global mean of the out-of-distribution features.

    Returns
    -------
    float
        0 when the OOD mean is orthogonal to every class mean (the collapsed geometry Ammar et al. predict), 1 when
        it is parallel to all of them; NaN when a mean is zero.

    References
    ----------
    Ammar et al., "NECO: NEural Collapse Based Out-of-distribution Detection", ICLR 2024 (arXiv:2310.06823).
    """
    mu = np.asarray(means, dtype=np.float64)
    g = np.asarray(ood_mean, dtype=np.float64)
    norms = np.linalg.norm(mu, axis=1) * np.linalg.norm(g)
    if norms.size == 0 or not np.all(norms > 0):
        return math.nan
    return float(np.mean(np.abs(mu @ g) / norms))
