"""Neural Collapse metrics as pure functions of the class statistics and the classifier (float64 numpy, no I/O).

Notation (C classes, p features): class means mu_c, global mean mu_G, M = [mu_c - mu_G]_c of shape (p, C) (stored
as its transpose, rows mu_c - mu_G), Sigma_W, Sigma_B = (1/C) M M^T, Sigma_T = Sigma_W + M diag(pi) M^T, classifier
W (C, p) with rows w_c and bias b (C,). Standard deviations use Bessel's correction (count - 1); "pairs" are the
ordered pairs c != c'.

References
----------
Papyan, Han & Donoho, "Prevalence of neural collapse during the terminal phase of deep learning training",
PNAS 2020. Han, Papyan & Donoho, "Neural collapse under MSE loss: proximity to and dynamics on the central path",
ICLR 2022. Galanti, Gyorgy & Hutter, "On the role of neural collapse in transfer learning", ICLR 2022.
Webb & Lowe, "The optimised internal representation of multilayer classifier networks performs nonlinear
discriminant analysis", Neural Networks 1990.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from ncaudit.stats._residual import Residual
from ncaudit.stats._statistics import Statistics

EPS = float(np.finfo(np.float64).eps)
TINY = float(np.finfo(np.float64).tiny)
#: Working memory of one block of the blocked metrics: a (block, width) slab of float64 (a few such slabs are alive).
PAIR_BLOCK_BYTES = 64 * 2**20


def block_rows(width: int, budget: int = PAIR_BLOCK_BYTES) -> int:
    """Rows of a float64 (rows, width) block that fit ``budget`` bytes (at least one)."""
    return max(1, budget // (8 * max(width, 1)))


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
    """

    equiangle: float
    maxangle: float
    orthogonality: float
    cdnv: float | None = None


def pair_geometry(vectors: np.ndarray, *, variances: np.ndarray | None = None,
                  block_rows: int | None = None) -> PairGeometry:
    """Every pairwise statistic of the rows of ``vectors`` (C, p) in one pass over blocks of classes.

    Parameters
    ----------
    vectors : ndarray of shape (C, p)
        Rows v_c (centred class means, uncentred means or classifier rows).
    variances : ndarray of shape (C,), optional
        Var_c: also compute the CDNV of the rows (only differences of rows enter it).
    block_rows
        Classes per block (default :func:`pair_block_rows`, a 64 MiB float64 slab).

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
            tmp = np.add(cos, shift)
            max_m.add(np.abs(tmp, out=tmp), second=False)
            orth_m.add(np.abs(cos, out=tmp), second=False)
    value = None
    if variances is not None:
        value = cdnv_m.result()  # NaN without pairs; an infinite or undefined ratio (coinciding means) gives inf
        value = math.inf if cdnv_m.n and not math.isfinite(value) else value
    return PairGeometry(cos_m.ordered_std(), max_m.result(), orth_m.result(), value)


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


# ---------------------------------------------------------------------------------------------------------------------
# NC3: self-duality
# ---------------------------------------------------------------------------------------------------------------------
def nc3(weight: np.ndarray, centred_means: np.ndarray) -> float:
    """NC3 = || W^T / ||W||_F - M / ||M||_F ||_F^2, with W (C, p) and ``centred_means`` = M^T (C, p)."""
    wn, mn = np.linalg.norm(weight), np.linalg.norm(centred_means)
    if wn == 0 or mn == 0:
        return math.nan
    return float(np.sum((weight / wn - centred_means / mn) ** 2))


# ---------------------------------------------------------------------------------------------------------------------
# MSE loss, the Webb-Lowe least-squares classifier and the decomposition L = A + B
# ---------------------------------------------------------------------------------------------------------------------
def quadratic_trace(a: np.ndarray, sigma: np.ndarray) -> float:
    """tr(A Sigma A^T) for A (m, p) and a symmetric Sigma (p, p), as one GEMM and an elementwise sum."""
    return float(np.sum((a @ sigma) * a))


def total_quadratic(stats: Statistics, a: np.ndarray) -> float:
    """tr(A Sigma_T A^T) = tr(A Sigma_W A^T) + ||A M diag(pi)^{1/2}||_F^2, without forming Sigma_T (p x p), and in
    blocks of rows of A (m, p) so that no (m, C) array exceeds the block budget."""
    scale = np.sqrt(stats.priors)
    between = 0.0
    step = block_rows(stats.n_classes)
    for start in range(0, a.shape[0], step):
        part = (a[start:start + step] @ stats.centred_means.T) * scale
        between += float(np.sum(part * part))
    return quadratic_trace(a, stats.sigma_w) + between


def mse_loss(stats: Statistics, weight: np.ndarray, bias: np.ndarray | None = None, *,
             shift: np.ndarray | None = None) -> float:
    """L(W, b) = (1/2N) sum_i ||W h_i + b - e_{y_i}||^2 from the statistics alone.

    Parameters
    ----------
    stats, weight, bias
        Statistics, W (C, p) and b (C,).
    shift
        W mu_G + b, when it is known exactly (pi for the least-squares classifier); else computed.

    Notes
    -----
    Splitting h_i = (h_i - mu_{y_i}) + (mu_{y_i} - mu_G) + mu_G:
    L = 1/2 [ tr(W Sigma_W W^T) + sum_c pi_c ||W (mu_c - mu_G) + (W mu_G + b) - e_c||^2 ], a sum of non-negative
    terms that keeps its relative precision as L -> 0 and never multiplies W by the features' common offset.
    """
    if shift is None:
        shift = weight @ stats.global_mean + (0.0 if bias is None else bias)
    c = stats.n_classes
    centred, pi = stats.centred_means, stats.priors
    between = 0.0
    step = block_rows(c)
    for start in range(0, c, step):  # blocks of classes: never a C x C array at large C
        rows = slice(start, min(start + step, c))
        residual = centred[rows] @ weight.T + shift
        residual[np.arange(residual.shape[0]), np.arange(rows.start, rows.stop)] -= 1.0
        between += float(pi[rows] @ np.sum(residual**2, axis=1))
    return 0.5 * (max(quadratic_trace(weight, stats.sigma_w), 0.0) + between)


# ---------------------------------------------------------------------------------------------------------------------
# The pseudo-inverse of Sigma_T and the Webb-Lowe least-squares classifier
# ---------------------------------------------------------------------------------------------------------------------
def largest_eigenvalue(sym: np.ndarray, iterations: int = 40, seed: int = 0) -> float:
    """An estimate of lambda_max of a symmetric PSD matrix by power iteration (a Rayleigh quotient: never above it)."""
    if sym.size == 0:
        return 0.0
    v = np.random.default_rng(seed).standard_normal(sym.shape[0])
    v /= np.linalg.norm(v)
    value = 0.0
    for _ in range(iterations):
        w = sym @ v
        norm = float(np.linalg.norm(w))
        if norm == 0.0:
            return 0.0
        value = float(v @ w)
        v = w / norm
    return max(value, float(v @ (sym @ v)))


@dataclass(frozen=True)
class TotalPinv:
    """(Sigma_T + lambda I)^dagger in factored form, by block elimination around the dominant between-class directions.

    With B = M diag(pi)^{1/2} = U S V^T, Sigma_T = Sigma_W + B B^T. The t directions U_t of B whose S^2 exceeds
    twice lambda_max(Sigma_W) are split off; in the orthonormal basis [U_t, U_perp],

    .. math::

        \\Sigma_T + \\lambda I = \\begin{pmatrix} K & E \\\\ E^T & D \\end{pmatrix},\\quad
        K = U_t^T \\Sigma_W U_t + S_t^2 + \\lambda,\\ E = U_t^T \\Sigma_W U_\\perp,\\
        D = U_\\perp^T (\\Sigma_W + B B^T) U_\\perp + \\lambda,

    and (Sigma_T + lambda I)^dagger = L^-T diag(K^-1, T^dagger) L^-1 with the Schur complement T = D - E^T K^-1 E.
    Every block is formed from Sigma_W and the exact S_t (no within-class-sized number is ever the difference of
    between-class-sized ones), K is well conditioned after scaling by S_t, and T is eigendecomposed: its eigenvalues
    at or below ``cutoff`` are dropped. This keeps the within-class eigenvalues that an eigendecomposition of Sigma_T
    itself would lose under strong collapse, at the cost of one p x p eigendecomposition of size p - t.

    Attributes
    ----------
    top : ndarray of shape (p, t)
        U_t.
    perp : ndarray of shape (p, p - t) or None
        U_perp (None: t = 0 and the basis is the identity).
    k_inv : ndarray of shape (t, t)
        K^-1.
    coupling : ndarray of shape (t, p - t)
        E.
    vectors, values : ndarray of shape (p - t, k) and (k,)
        The kept eigenpairs of T.
    rank : int
        t + k, the rank of the pseudo-inverse.
    cutoff : float
        max(rcond * lambda_max, error_bound): eigenvalues at or below it are dropped.
    lambda_max : float
        lambda_max(Sigma_T + lambda I).
    """

    top: np.ndarray
    perp: np.ndarray | None
    k_inv: np.ndarray
    coupling: np.ndarray
    vectors: np.ndarray
    values: np.ndarray
    rank: int
    cutoff: float
    lambda_max: float

    def _t_pinv(self, rhs: np.ndarray) -> np.ndarray:
        return self.vectors @ ((self.vectors.T @ rhs) / self.values[:, None])

    def apply_parts(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """(Sigma_T + lambda I)^dagger R for R given in the split basis: x = U_t^T R (t, m), y = U_perp^T R."""
        if self.perp is None:
            return self._t_pinv(y)
        u = self.k_inv @ x
        w = self._t_pinv(y - self.coupling.T @ u)
        return self.top @ (u - self.k_inv @ (self.coupling @ w)) + self.perp @ w

    def apply(self, rhs: np.ndarray) -> np.ndarray:
        """(Sigma_T + lambda I)^dagger R for R of shape (p, m)."""
        if self.perp is None:
            return self._t_pinv(rhs)
        return self.apply_parts(self.top.T @ rhs, self.perp.T @ rhs)


def _weighted_means_svd(stats: Statistics, basis: MeansBasis | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Thin SVD (U, S, V^T) of B = M diag(pi)^{1/2}, reusing the SVD of M when the classes are balanced."""
    pi = stats.priors
    if basis is not None and basis.vt is not None and np.all(pi == pi[0]):
        return basis.u, basis.s * math.sqrt(pi[0]), basis.vt
    b = stats.centred_means.T * np.sqrt(pi)
    u, s, vt = np.linalg.svd(b, full_matrices=False)
    keep = int(np.sum(s > max(b.shape) * EPS * (s[0] if s.size else 0.0)))
    return u[:, :keep], s[:keep], vt[:keep]


def total_pinv(stats: Statistics, ridge: float = 0.0, rcond: float | None = None,
               basis: MeansBasis | None = None) -> tuple[TotalPinv, np.ndarray]:
    """The factored (Sigma_T + lambda I)^dagger and Sigma_T^dagger B (p, C), B = M diag(pi)^{1/2}.

    Eigenvalues at or below max(rcond * lambda_max, stats.error_bound) are dropped (rcond default p * eps): never
    below what the accumulation of Sigma_W resolves. See :class:`TotalPinv` for the scheme.
    """
    p = stats.n_features
    sigma_w = stats.sigma_w
    u, s, vt = _weighted_means_svd(stats, basis)
    lam_w = largest_eigenvalue(sigma_w)
    rel = p * EPS if rcond is None else rcond
    cut_estimate = max(rel * ((s[0] ** 2 if s.size else 0.0) + lam_w + ridge), stats.error_bound)
    t = int(np.sum(s**2 > max(2.2 * lam_w + ridge, 10.0 * cut_estimate)))
    if t == 0:
        between = u * s
        blocks = (np.zeros((p, 0)), None, np.zeros((0, 0)), np.zeros((0, p)))
        schur = sigma_w + between @ between.T + ridge * np.eye(p)
        rhs_y = between @ vt
        k_max = 0.0
    else:
        top, s_top = u[:, :t], s[:t]
        perp = np.linalg.qr(top, mode="complete")[0][:, t:]
        w_top, w_perp = sigma_w @ top, sigma_w @ perp
        small = (perp.T @ u[:, t:]) * s[t:]  # U_perp^T B, from B's own factors: no between-sized rounding
        k_scaled = np.eye(t) + (top.T @ w_top + ridge * np.eye(t)) / s_top[:, None] / s_top[None, :]
        k_inv = np.linalg.inv(0.5 * (k_scaled + k_scaled.T)) / s_top[:, None] / s_top[None, :]
        coupling = top.T @ w_perp
        schur = perp.T @ w_perp + small @ small.T + ridge * np.eye(p - t) - coupling.T @ (k_inv @ coupling)
        blocks = (top, perp, k_inv, coupling)
        rhs_y = small @ vt[t:]
        k_max = largest_eigenvalue((top.T @ w_top) + np.diag(s_top**2)) + ridge
    values, vectors = np.linalg.eigh(0.5 * (schur + schur.T))
    lambda_max = max(k_max, float(values[-1]) if values.size else 0.0)
    cutoff = max(rel * lambda_max, stats.error_bound)
    keep = values > cutoff
    pinv = TotalPinv(*blocks, vectors=vectors[:, keep], values=values[keep], rank=t + int(keep.sum()),
                     cutoff=cutoff, lambda_max=lambda_max)
    solution = pinv.apply_parts(s[:t, None] * vt[:t], rhs_y) if t else pinv.apply(rhs_y)
    return pinv, solution


@dataclass(frozen=True)
class LeastSquares:
    """The Webb-Lowe least-squares classifier W_LS = Sigma_YH (Sigma_T + lambda I)^dagger, b_LS = pi - W_LS mu_G.

    Attributes
    ----------
    weight : ndarray of shape (C, p)
    bias : ndarray of shape (C,)
    ridge : float
        lambda.
    pinv : TotalPinv
        The pseudo-inverse used (rank, cut-off, lambda_max).
    loss : float or None
        L(W_LS, b_LS) measured on the samples by iterative refinement (None: not refined; use the closed form).
    steps : int
        Refinement steps taken.
    correction : float or None
        ||W_LS change|| / ||W_LS|| of the last refinement step (the a-posteriori error of the step before it).
    """

    weight: np.ndarray
    bias: np.ndarray
    ridge: float
    pinv: TotalPinv
    loss: float | None = None
    steps: int = 0
    correction: float | None = None

    @property
    def rank(self) -> int:
        return self.pinv.rank

    @property
    def cutoff(self) -> float:
        return self.pinv.cutoff


def least_squares(stats: Statistics, ridge: float = 0.0, rcond: float | None = None,
                  basis: MeansBasis | None = None) -> LeastSquares:
    """Closed-form least-squares (ridge) classifier of the features, from the statistics (no pass over samples).

    Parameters
    ----------
    stats
        Class statistics.
    ridge
        lambda >= 0.
    rcond
        Eigenvalues of Sigma_T + lambda I at or below ``rcond * lambda_max`` are dropped (default p * eps), and never
        any below ``stats.error_bound``.
    basis
        The SVD of the centred means (:func:`means_basis`), reused for balanced classes.

    Notes
    -----
    Sigma_YH = diag(pi) M^T (the cross-covariance of the one-hot targets and the features);
    W_LS = Sigma_YH (Sigma_T + lambda I)^dagger = diag(pi)^{1/2} (Sigma_T^dagger B)^T with B = M diag(pi)^{1/2}, and
    b_LS = pi - W_LS mu_G minimise (1/2N) sum_i ||W h_i + b - e_{y_i}||^2 + (lambda/2) ||W||_F^2 (Webb & Lowe 1990;
    Han et al. 2022). The pseudo-inverse is :class:`TotalPinv`.
    """
    if ridge < 0:
        raise ValueError(f"the ridge must be non-negative, got {ridge}")
    if rcond is not None and rcond < 0:
        raise ValueError(f"rcond must be non-negative, got {rcond}")
    pinv, solution = total_pinv(stats, ridge, rcond, basis)
    w_ls = np.sqrt(stats.priors)[:, None] * solution.T
    return LeastSquares(w_ls, stats.priors - w_ls @ stats.global_mean, ridge, pinv)


def ls_loss(stats: Statistics, ls: LeastSquares) -> float:
    """Term (A) = L(W_LS, b_LS): measured by refinement when available, else the closed form (W_LS mu_G + b_LS = pi)."""
    if ls.loss is not None:
        return ls.loss
    return mse_loss(stats, ls.weight, shift=stats.priors)


def refine(stats: Statistics, ls: LeastSquares, residual: Residual) -> LeastSquares:
    """One step of iterative refinement of W_LS from sums over the samples (:class:`ncaudit.stats.Residual`).

    Notes
    -----
    With G = Sigma_YH - W_0 Sigma_T (measured on the samples) the ridge normal equations W (Sigma_T + lambda I) =
    Sigma_YH give the correction Delta = (G - lambda W_0)(Sigma_T + lambda I)^dagger, and the loss of
    W_1 = W_0 + Delta follows exactly from the measured loss of W_0:
    L(W_1) = L(W_0) - <G, Delta> + 1/2 tr(Delta Sigma_T Delta^T) (the last term is second order in Delta).
    """
    w0 = ls.weight
    delta = ls.pinv.apply((residual.gradient - ls.ridge * w0).T).T
    w1 = w0 + delta
    loss = residual.loss - float(np.sum(residual.gradient * delta)) + 0.5 * total_quadratic(stats, delta)
    norm = float(np.linalg.norm(w1))
    return LeastSquares(w1, stats.priors - w1 @ stats.global_mean, ls.ridge, ls.pinv, loss=max(loss, 0.0),
                        steps=ls.steps + 1, correction=float(np.linalg.norm(delta)) / norm if norm > 0 else 0.0)


def mse_term_b(stats: Statistics, weight: np.ndarray, bias: np.ndarray, ls: LeastSquares, *,
               loss: float | None = None) -> float:
    """Term (B) = L(W, b) - L(W_LS, b_LS) (``loss``: L(W, b) when already computed).

    Notes
    -----
    Unrefined, it is written without subtracting the two losses: with Delta = W - W_LS,
    B = 1/2 [ tr(Delta Sigma_T Delta^T) + ||W mu_G + b - pi||^2 ] - lambda <W_LS, Delta>_F
    (Delta mu_G + b - b_LS = W mu_G + b - pi; the last, cross term is -lambda <W_LS, Delta>_F because
    W_LS Sigma_T - Sigma_YH = -lambda W_LS: zero without ridge). Once refinement has measured L(W_LS) on the samples,
    B = L(W, b) - L(W_LS): the closed form would reuse the directions of Sigma_T that refinement had to correct.
    """
    if ls.loss is not None:
        return (mse_loss(stats, weight, bias) if loss is None else loss) - ls.loss
    delta_w = weight - ls.weight
    shift = weight @ stats.global_mean + bias - stats.priors
    cross = -ls.ridge * float(np.sum(ls.weight * delta_w))
    return 0.5 * (max(total_quadratic(stats, delta_w), 0.0) + float(shift @ shift)) + cross


def ls_distance(weight: np.ndarray, ls: LeastSquares) -> float:
    """||W - W_LS||_F / ||W_LS||_F: 0 on the central path."""
    n = np.linalg.norm(ls.weight)
    return float(np.linalg.norm(weight - ls.weight) / n) if n > 0 else math.nan


def ls_cosine(weight: np.ndarray, ls: LeastSquares) -> float:
    """<W, W_LS>_F / (||W||_F ||W_LS||_F): alignment with the least-squares classifier, blind to scale."""
    d = np.linalg.norm(weight) * np.linalg.norm(ls.weight)
    return float(np.sum(weight * ls.weight) / d) if d > 0 else math.nan


def ls_error_estimate(stats: Statistics, weight: np.ndarray, ls: LeastSquares, term_a: float, term_b: float, *,
                      seed: int = 0) -> float:
    """Estimated relative error of the least-squares quantities (terms A and B, ||W_LS||, distance, cosine) caused
    by the rounding of Sigma_W (accumulation and solve), to first order.

    Notes
    -----
    Sigma_W is perturbed by Delta = 4 u tr(Sigma_W) E / ||E||_2 with E a random symmetric Gaussian matrix (u the unit
    roundoff: the size of the backward error of a float64 scatter and of the symmetric solve), and the first-order
    changes follow in closed form: dW_LS = -W_LS Delta Sigma_T^dagger, dA = 1/2 <W_LS^T W_LS, Delta> - lambda
    <W_LS, dW_LS>, dL(W) = 1/2 <W^T W, Delta>, dB = dL(W) - dA. The largest relative change is returned. Measured
    against an SVD solve on the samples, the actual error was 0.02 to 1.6 times this estimate on real and planted
    features (tests/test_exact_ls.py, bench/stats.py --exactness).
    """
    p = stats.n_features
    size = 4.0 * (EPS / 2) * float(np.trace(stats.sigma_w))
    w_ls = ls.weight
    n_ls, n_w = float(np.linalg.norm(w_ls)), float(np.linalg.norm(weight))
    if size == 0.0 or n_ls == 0.0:
        return 0.0
    g = np.random.default_rng(seed).standard_normal((p, p))
    delta = (g + g.T) * (size / (2.0 * math.sqrt(2.0 * p)))  # ||g + g^T||_2 ~ 2 sqrt(2p)
    wd = w_ls @ delta
    d_w = -ls.pinv.apply(wd.T).T
    d_a = 0.5 * float(np.sum(wd * w_ls)) - ls.ridge * float(np.sum(w_ls * d_w))
    d_b = 0.5 * quadratic_trace(weight, delta) - d_a
    d_norm = float(np.sum(w_ls * d_w)) / n_ls
    changes = [abs(d_a) / max(abs(term_a), TINY), abs(d_b) / max(abs(term_b), TINY), abs(d_norm) / n_ls]
    diff = weight - w_ls
    n_diff = float(np.linalg.norm(diff))
    if n_diff > 0:
        dist = n_diff / n_ls
        changes.append(abs(-float(np.sum(diff * d_w)) / n_diff / n_ls - dist * d_norm / n_ls) / dist)
    if n_w > 0:
        cos = float(np.sum(weight * w_ls)) / (n_w * n_ls)
        d_cos = float(np.sum(weight * d_w)) / (n_w * n_ls) - cos * d_norm / n_ls
        changes.append(abs(d_cos) / max(abs(cos), TINY))
    return max(changes)
