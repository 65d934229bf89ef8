"""Pairwise geometry, blocked over classes (never a C x C array): CDNV, NC2 equinorm, equiangle, maxangle,
orthogonality, and the hyperspherical energies (:mod:`ncaudit.metrics._energy`)."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from ncaudit.metrics._energy import Energy, EnergyAccumulator, unit_distances
from ncaudit.metrics._numeric import PAIR_BLOCK_BYTES, block_rows


def cdnv(variances: np.ndarray, means: np.ndarray, *, block_rows: int | None = None) -> float:
    """Class-distance normalised variance, mean over pairs of (Var_c + Var_c') / (2 ||mu_c - mu_c'||^2).

    Parameters
    ----------
    variances : ndarray of shape (C,)
        Var_c.
    means : ndarray of shape (C, p)
        Class means (centred or not: only differences enter).
    block_rows
        Classes per block (default: from :data:`PAIR_BLOCK_BYTES`).

    Notes
    -----
    Galanti et al. 2022. Distances come from Gram blocks of the centred means (one GEMM per block of classes, peak
    memory O(C p + block C), never C x C). Two coinciding class means give an infinite value (reported as null).
    """
    return pair_geometry(means - means.mean(0), variances=variances, block_rows=block_rows).cdnv


# ---------------------------------------------------------------------------------------------------------------------
# NC2: simplex ETF geometry (and the orthogonal frame of bias-free heads)
# ---------------------------------------------------------------------------------------------------------------------
def pair_block_rows(n_classes: int, budget_bytes: int = PAIR_BLOCK_BYTES) -> int:
    """Classes per block so that one (block, C) float64 slab fits in ``budget_bytes`` (at least 1, at most C)."""
    return max(1, min(n_classes, block_rows(n_classes, budget_bytes)))


def _std(values: np.ndarray) -> float:
    return float(np.std(values, ddof=1)) if values.size > 1 else math.nan


class _Moments:
    """Streaming count, mean and M2 = sum (x - mean)^2 of blocks of values, combined with Chan et al.'s update.

    Within a block the mean is taken first and M2 from the deviations (two passes over the block); blocks combine as
    M2 = M2_a + M2_b + delta^2 n_a n_b / n with delta = mean_b - mean_a: no E[x^2] - E[x]^2 cancellation.
    """

    def __init__(self) -> None:
        self.n, self.mean, self.m2 = 0, 0.0, 0.0

    def add(self, values: np.ndarray, *, second: bool = True) -> None:
        nb = int(values.size)
        if nb == 0:
            return
        mb = float(values.mean())
        m2b = 0.0
        if second:
            dev = (values - mb).ravel()
            m2b = float(np.dot(dev, dev))
        n = self.n + nb
        if self.n == 0:
            self.mean, self.m2 = mb, m2b
        else:
            delta = mb - self.mean
            self.mean += delta * (nb / n)
            self.m2 += m2b + delta * delta * (self.n * nb / n)
        self.n = n

    def result(self) -> float:
        return self.mean if self.n else math.nan

    def ordered_std(self) -> float:
        """Sample std (Bessel) over ordered pairs, from the moments of the unordered ones (each counted twice)."""
        n = 2 * self.n
        return math.sqrt(max(2.0 * self.m2, 0.0) / (n - 1)) if n > 1 else math.nan


_Part = tuple[slice, slice, np.ndarray, "np.ndarray | None"]


def _upper_blocks(x: np.ndarray, block_rows: int | None) -> Iterator[_Part]:
    """The Gram matrix x x^T over the pairs c < c', one block of rows at a time: each unordered pair once.

    For each row block [a, b) one GEMM g = x[a:b] @ x[a:].T, yielded as two parts ``(rows, cols, g_part, mask)``: the
    triangle (cols [a, b), ``mask`` its strict upper part) and the rectangle (cols [b, C), every entry, mask None).
    """
    c = x.shape[0]
    step = block_rows or pair_block_rows(c)
    if step < 1:
        raise ValueError(f"block_rows must be at least 1, got {step}")
    for a in range(0, c, step):
        b = min(a + step, c)
        g = x[a:b] @ x[a:].T
        yield slice(a, b), slice(a, b), g[:, :b - a], np.triu(np.ones((b - a, b - a), dtype=bool), 1)
        if b < c:
            yield slice(a, b), slice(b, c), g[:, b - a:], None


#: Pairs closer than this fraction of ||v_c||^2 + ||v_c'||^2 get their distance from explicit differences.
_NEAR = 1e-3


def _pair_distances(x: np.ndarray, sq: np.ndarray, part: _Part) -> np.ndarray:
    """||v_c - v_c'||^2 over a part from its Gram entries, close pairs recomputed from explicit differences.

    ||v_c||^2 + ||v_c'||^2 - 2 g_cc' carries an absolute error up to about (p + 2) eps (||v_c||^2 + ||v_c'||^2), which
    is large relative to the distance of close vectors: pairs with a distance below ``_NEAR`` times that scale are
    recomputed as sum_k (v_ck - v_c'k)^2. Coinciding means then give exactly 0 and every distance keeps a relative
    error below about (p + 2) eps / _NEAR. Well-separated class means have no such pairs (no extra cost).
    """
    rows, cols, g, mask = part
    scale = np.add.outer(sq[rows], sq[cols])
    dist2 = np.multiply(g, -2.0)
    dist2 += scale
    np.maximum(dist2, 0.0, out=dist2)
    scale *= _NEAR
    near = dist2 <= scale
    if mask is not None:
        near &= mask
    near_r, near_c = np.nonzero(near)
    step = block_rows(x.shape[1])
    for k in range(0, near_r.size, step):
        r, q = near_r[k:k + step], near_c[k:k + step]
        diff = x[rows.start + r] - x[cols.start + q]
        dist2[r, q] = np.einsum("kp,kp->k", diff, diff)
    return dist2


def _pick(values: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """The entries of a part that are pairs: all of a rectangle, the masked ones of a triangle."""
    return values if mask is None else values[mask]


@dataclass(frozen=True)
class PairGeometry:
    """Statistics over the ordered pairs c != c' of a set of C vectors, from one blocked pass over their Gram matrix.

    Attributes
    ----------
    equiangle : float
        std over pairs of cos(v_c, v_c') (Bessel-corrected).
    maxangle : float
        mean over pairs of |cos(v_c, v_c') + 1/(C - 1)|.
    orthogonality : float
        mean over pairs of |cos(v_c, v_c')|.
    cdnv : float or None
        mean over pairs of (Var_c + Var_c') / (2 ||v_c - v_c'||^2) when variances were given (inf when two vectors
        coincide), else None.
    energy : Energy or None
        The hyperspherical energies of the normalised rows, when asked for.
    """

    equiangle: float
    maxangle: float
    orthogonality: float
    cdnv: float | None = None
    energy: Energy | None = None


def pair_geometry(vectors: np.ndarray, *, variances: np.ndarray | None = None,
                  block_rows: int | None = None, energy: bool = False) -> PairGeometry:
    """Every pairwise statistic of the rows of ``vectors`` (C, p) in one pass over blocks of classes.

    Parameters
    ----------
    vectors : ndarray of shape (C, p)
        Rows v_c (centred class means, uncentred means or classifier rows).
    variances : ndarray of shape (C,), optional
        Var_c: also compute the CDNV of the rows (only differences of rows enter it).
    block_rows
        Classes per block (default :func:`pair_block_rows`, a 64 MiB float64 slab).
    energy
        Also compute the hyperspherical energies of the rows normalised to the unit sphere
        (:class:`~ncaudit.metrics._energy.Energy`, from the same Gram blocks).

    Notes
    -----
    One GEMM per block of rows against the rows at or after it, g = V_a V^T: each unordered pair once (means over
    ordered pairs are the same; their M2 is twice the unordered one, over 2n - 1 for Bessel's correction).
    cos = g_cc' / (||v_c|| ||v_c'||) and ||v_c - v_c'||^2 = ||v_c||^2 + ||v_c'||^2 - 2 g_cc' (close pairs recomputed
    from differences). Peak memory is O(C p + block C), never C x C; the std combines per-block means and M2 with
    Chan's update. Rows of zero norm give NaN cosines.
    """
    x = np.asarray(vectors, dtype=np.float64)
    c = x.shape[0]
    sq = np.einsum("cp,cp->c", x, x)
    with np.errstate(divide="ignore"):
        inv = 1.0 / np.sqrt(sq)  # inf for a zero row: its cosines come out NaN
    cos_m, max_m, orth_m, cdnv_m = _Moments(), _Moments(), _Moments(), _Moments()
    shift = 1.0 / (c - 1) if c > 1 else math.nan
    energies = EnergyAccumulator(x.shape[1]) if energy else None
    norms = np.sqrt(sq)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        for part in _upper_blocks(x, block_rows):
            rows, cols, g, mask = part
            if variances is not None:
                ratio = np.add.outer(variances[rows], variances[cols])
                ratio /= _pair_distances(x, sq, part)
                ratio *= 0.5
                cdnv_m.add(_pick(ratio, mask), second=False)
            g *= inv[rows, None]
            g *= inv[None, cols]
            cos = _pick(g, mask)
            cos_m.add(cos)
            if energies is not None:  # ||u_c - u_c'||^2 = 2 - 2 cos, close pairs from the vectors
                energies.add(_pick(unit_distances(x, norms, rows, cols, g, mask), mask))
            tmp = np.add(cos, shift)
            max_m.add(np.abs(tmp, out=tmp), second=False)
            orth_m.add(np.abs(cos, out=tmp), second=False)
    value = None
    if variances is not None:
        value = cdnv_m.result()  # NaN without pairs; an infinite or undefined ratio (coinciding means) gives inf
        value = math.inf if cdnv_m.n and not math.isfinite(value) else value
    return PairGeometry(cos_m.ordered_std(), max_m.result(), orth_m.result(), value,
                        None if energies is None else energies.result())


def equinorm(vectors: np.ndarray) -> float:
    """std_c ||v_c|| / mean_c ||v_c|| for the rows of ``vectors`` (C, p): 0 when every row has the same length."""
    norms = np.linalg.norm(vectors, axis=1)
    mean = float(norms.mean())
    return _std(norms) / mean if mean > 0 else math.nan


def equiangle(vectors: np.ndarray, *, block_rows: int | None = None) -> float:
    """std over pairs of cos(v_c, v_c'): 0 when all pairs meet at the same angle (blocked, see :func:`pair_geometry`)."""
    return pair_geometry(vectors, block_rows=block_rows).equiangle


def maxangle(vectors: np.ndarray, *, block_rows: int | None = None) -> float:
    """mean over pairs of |cos(v_c, v_c') + 1/(C - 1)|: 0 for the simplex ETF (maximally separated, equiangular)."""
    return pair_geometry(vectors, block_rows=block_rows).maxangle


def orthogonality(vectors: np.ndarray, *, block_rows: int | None = None) -> float:
    """mean over pairs of |cos(v_c, v_c')| of uncentred rows: 0 for an orthogonal frame of any lengths.

    Notes
    -----
    The frame that bias-free MSE training reaches, balanced or not. For centred simplex-ETF means the value is
    1/(C - 1); for uncentred means (mu_G + r e_c) it depends on the offset mu_G.
    """
    return pair_geometry(vectors, block_rows=block_rows).orthogonality
