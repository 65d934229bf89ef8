"""Hyperspherical energy of the normalised class means and classifier rows (uniformity on the sphere), blocked over
pairs with the rest of the pairwise geometry (:func:`ncaudit.metrics.pair_geometry`).

With unit vectors u_c = v_c / ||v_c|| (v_c = mu_c - mu_G, or the classifier rows w_c) and d_cc' = ||u_c - u_c'||:

- log energy: mean over pairs c != c' of log(1 / d_cc'), and its variance;
- Riesz s-energy: mean over pairs of d_cc'^(-s) with s = p - 2, and its variance.

Both are minimal, with zero variance, when the u_c are spread uniformly; for C <= p + 1 points the minimiser of
either is the simplex (d^2 = 2C / (C - 1) for every pair).

Numerical scheme. The distances come from the Gram block of the unit vectors, d^2 = 2 - 2 cos; close pairs
(d^2 below 2e-3) are recomputed without cancellation from the vectors themselves: with D = v_c - v_c' (exact for
nearby vectors), ||v_c|| - ||v_c'|| = D . (v_c + v_c') / (||v_c|| + ||v_c'||) and
u_c - u_c' = D / ||v_c|| - v_c' (||v_c|| - ||v_c'||) / (||v_c|| ||v_c'||), every term to full relative precision
(differences of rows normalised first would leave d with a relative error of eps / d).

The Riesz kernel under- or overflows float64 for any real width (d^(-2046) for p = 2048: d = 0.7 overflows, d = 1.5
underflows), so it is accumulated in logs: each pair gives l = -(s / 2) log d^2; a block of pairs is summarised by its
log-mean L_b = logsumexp(l) - log n_b and its relative second moment R_b = sum (exp(l - L_b) - 1)^2 (= M2_b / m_b^2,
every term at most n_b^2: no overflow), and blocks combine as Chan et al.'s update does, rescaled by the new mean:
with L = log((n_a e^{L_a} + n_b e^{L_b}) / n) (a logaddexp), r_a = e^{L_a - L} and r_b = e^{L_b - L},
R = R_a r_a^2 + R_b r_b^2 + (r_b - r_a)^2 n_a n_b / n. The energy is e^L and its variance e^{2L} R' / (n' - 1) over
the n' = 2n ordered pairs (R' = 2R); both are reported also as logs, finite whenever no two vectors coincide, so a
mean beyond float64's range (reported null) is still known.

References
----------
Liu, Yu, Weller & Schölkopf, "Generalizing and Decoupling Neural Collapse via Hyperspherical Uniformity Gap",
ICLR 2023 (arXiv:2303.06484). Chan, Golub & LeVeque, "Algorithms for computing the sample variance", 1983.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Energy:
    """Hyperspherical energies of a set of C unit vectors in R^p (over the ordered pairs c != c').

    Attributes
    ----------
    log_mean, log_variance : float
        mean and (Bessel) variance over pairs of log(1 / ||u_c - u_c'||).
    riesz_mean, riesz_variance : float
        mean and variance over pairs of ||u_c - u_c'||^(-s); inf beyond float64's range.
    riesz_log_mean, riesz_log_variance : float
        Their natural logarithms (finite unless two vectors coincide).
    s : float
        The Riesz exponent, p - 2.
    """

    log_mean: float
    log_variance: float
    riesz_mean: float
    riesz_variance: float
    riesz_log_mean: float
    riesz_log_variance: float
    s: float


class _LogMoments:
    """Streaming count, log-mean and relative second moment R = M2 / mean^2 of positive values given by their logs."""

    def __init__(self) -> None:
        self.n, self.log_mean, self.rel_m2 = 0, -math.inf, 0.0

    def add(self, logs: np.ndarray) -> None:
        nb = int(logs.size)
        if nb == 0:
            return
        top = float(logs.max())
        if not math.isfinite(top):  # a coinciding pair (+inf), or NaN: the energy is infinite / undefined
            lb, rb = top, math.nan
        else:
            work = np.subtract(logs, top)  # one block-sized temporary, reused
            np.exp(work, out=work)
            lb = top + math.log(float(work.sum())) - math.log(nb)
            np.subtract(logs, lb, out=work)
            np.exp(work, out=work)  # x / mean of the block: at most n_b
            work -= 1.0
            rb = float(np.dot(work.ravel(), work.ravel()))
        if self.n == 0:
            self.n, self.log_mean, self.rel_m2 = nb, lb, rb
            return
        n = self.n + nb
        la = self.log_mean
        if not (math.isfinite(la) and math.isfinite(lb)):  # +inf (a coinciding pair) or NaN stays so
            self.n, self.log_mean, self.rel_m2 = n, la + lb if math.isnan(la + lb) else max(la, lb), math.nan
            return
        total = float(np.logaddexp(math.log(self.n) + la, math.log(nb) + lb)) - math.log(n)
        ra, rb_scale = math.exp(la - total), math.exp(lb - total)
        self.rel_m2 = self.rel_m2 * ra * ra + rb * rb_scale * rb_scale + (rb_scale - ra) ** 2 * (self.n * nb / n)
        self.n, self.log_mean = n, total

    def ordered(self) -> tuple[float, float, float, float]:
        """``(mean, variance, log mean, log variance)`` over the ordered pairs (each unordered pair counted twice;
        Bessel's correction over 2n - 1)."""
        if self.n == 0:
            return math.nan, math.nan, math.nan, math.nan
        big = 2 * self.n
        rel = 2.0 * self.rel_m2 / (big - 1) if big > 1 else math.nan
        log_var = 2.0 * self.log_mean + math.log(rel) if rel > 0 else (-math.inf if rel == 0 else math.nan)
        return _exp(self.log_mean), _exp(log_var), self.log_mean, log_var


def _exp(x: float) -> float:
    if math.isnan(x):
        return math.nan
    return math.inf if x > 709.78 else math.exp(x)


class EnergyAccumulator:
    """Both energies over blocks of pairs: fed the squared distances of unit vectors, block by block."""

    def __init__(self, n_features: int) -> None:
        from ncaudit.metrics._pairs import _Moments

        self.s = float(n_features - 2)
        self.log = _Moments()
        self.riesz = _LogMoments()

    def add(self, dist2: np.ndarray) -> None:
        """Add the pairs of one block, given as squared distances ||u_c - u_c'||^2 (overwritten)."""
        with np.errstate(divide="ignore", invalid="ignore"):
            logs = np.log(dist2, out=dist2)  # the block's own buffer: no copy
            logs *= -0.5  # log(1 / d)
        self.log.add(logs)
        if self.s == 0.0:  # d^0 = 1 for every pair, coinciding ones included
            logs.fill(0.0)
        else:
            logs *= self.s  # log(d^-s) = -s log d
        self.riesz.add(logs)

    def result(self) -> Energy:
        log_mean = self.log.result()
        log_var = self.log.ordered_std() ** 2 if self.log.n else math.nan
        mean, var, lm, lv = self.riesz.ordered()
        return Energy(log_mean, log_var, mean, var, lm, lv, self.s)


#: Pairs with ||u_c - u_c'||^2 below this get their distance from the vectors (see the module notes).
_NEAR = 2e-3


def unit_distances(x: np.ndarray, norms: np.ndarray, rows: slice, cols: slice, cos: np.ndarray,
                   mask: np.ndarray | None) -> np.ndarray:
    """||u_c - u_c'||^2 over a block of pairs (``rows`` x ``cols``) from its cosines, close pairs recomputed from the
    rows of ``x`` (see the module notes)."""
    dist2 = np.multiply(cos, -2.0)
    dist2 += 2.0
    np.maximum(dist2, 0.0, out=dist2)
    near = dist2 <= _NEAR
    if mask is not None:
        near &= mask
    r, q = np.nonzero(near)
    for k in range(0, r.size, 4096):
        a, b = rows.start + r[k:k + 4096], cols.start + q[k:k + 4096]
        va, vb, na, nb = x[a], x[b], norms[a], norms[b]
        diff = va - vb
        dn = np.einsum("kp,kp->k", diff, va + vb) / (na + nb)  # ||v_a|| - ||v_b||
        delta = diff / na[:, None] - vb * (dn / (na * nb))[:, None]
        dist2[r[k:k + 4096], q[k:k + 4096]] = np.einsum("kp,kp->k", delta, delta)
    return dist2


def hyperspherical_energy(vectors: np.ndarray, *, block_rows: int | None = None) -> Energy:
    """The log and Riesz (s = p - 2) energies of the rows of ``vectors`` (C, p) projected onto the unit sphere.

    Parameters
    ----------
    vectors : ndarray of shape (C, p)
        v_c (centred class means, or classifier rows); each is normalised, u_c = v_c / ||v_c||.
    block_rows
        Classes per block of the pair pass (see :func:`ncaudit.metrics.pair_geometry`).

    Returns
    -------
    Energy

    Notes
    -----
    One blocked pass over the Gram matrix, memory O(C p + block C); see the module notes for the scheme.
    """
    from ncaudit.metrics._pairs import pair_geometry

    result = pair_geometry(vectors, block_rows=block_rows, energy=True).energy
    assert result is not None
    return result
