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

from ncaudit.stats import Statistics

EPS = float(np.finfo(np.float64).eps)


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
    """

    u: np.ndarray
    s: np.ndarray
    cutoff: float

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
    u, s, _ = np.linalg.svd(centred_means.T, full_matrices=False)
    if s.size == 0 or s[0] == 0.0:
        return MeansBasis(u[:, :0], s[:0], 0.0)
    cutoff = max(p, c) * EPS * float(s[0])
    keep = min(int(np.sum(s > cutoff)), min(p, c - 1))
    return MeansBasis(u[:, :keep], s[:keep], cutoff)


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
    return float(np.einsum("pk,pq,qk->", wu, sigma_w, wu))


def nc1_of_deviations(deviations: np.ndarray, basis: MeansBasis) -> float:
    """(1/C) tr(Sigma_D Sigma_B^dagger) for Sigma_D = (1/K) sum_k d_k d_k^T, from the K rows ``deviations`` (K, p).

    Used for the precision floor (d_k = h_k - h_k^fp32): the NC1 that these perturbations alone would produce.
    """
    if basis.rank == 0 or deviations.shape[0] == 0:
        return math.nan
    z = deviations @ basis.whitener
    return float(np.einsum("kr,kr->", z, z) / deviations.shape[0])


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
#: Working memory of one block of the pairwise metrics: a (block, C) slab of float64 (a few such slabs are alive).
PAIR_BLOCK_BYTES = 64 * 2**20


def pair_block_rows(n_classes: int, budget_bytes: int = PAIR_BLOCK_BYTES) -> int:
    """Classes per block so that one (block, C) float64 slab fits in ``budget_bytes`` (at least 1, at most C)."""
    return max(1, min(n_classes, budget_bytes // (8 * max(n_classes, 1))))


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
    step = max(1, PAIR_BLOCK_BYTES // (8 * x.shape[1]))
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


def pair_cosines(vectors: np.ndarray) -> np.ndarray:
    """cos(v_c, v_c') over the ordered pairs c != c', shape (C (C - 1),); rows of zero norm give NaN.

    This materialises C (C - 1) values: for small C (tests, plots). The metrics use :func:`pair_geometry`.
    """
    norms = np.linalg.norm(vectors, axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        unit = vectors / norms[:, None]
    cos = unit @ unit.T
    return cos[~np.eye(vectors.shape[0], dtype=bool)]


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
def mse_loss(stats: Statistics, weight: np.ndarray, bias: np.ndarray) -> float:
    """L(W, b) = (1/2N) sum_i ||W h_i + b - e_{y_i}||^2 from the statistics alone.

    Notes
    -----
    Splitting h_i = (h_i - mu_{y_i}) + mu_{y_i}:
    L = 1/2 [ tr(W Sigma_W W^T) + sum_c pi_c ||W mu_c + b - e_c||^2 ], a sum of non-negative terms, so it keeps
    its relative precision as L -> 0.
    """
    residual = stats.means @ weight.T + bias - np.eye(stats.n_classes)
    within = float(np.einsum("cp,pq,cq->", weight, stats.sigma_w, weight))
    between = float(stats.priors @ np.sum(residual**2, axis=1))
    return 0.5 * (max(within, 0.0) + between)


@dataclass(frozen=True)
class LeastSquares:
    """The Webb-Lowe least-squares classifier W_LS = Sigma_YH (Sigma_T + lambda I)^dagger, b_LS = pi - W_LS mu_G.

    Attributes
    ----------
    weight : ndarray of shape (C, p)
    bias : ndarray of shape (C,)
    ridge : float
        lambda.
    rank : int
        Rank of Sigma_T + lambda I used by the pseudo-inverse.
    cutoff : float
        Eigenvalue cut-off of that pseudo-inverse.
    """

    weight: np.ndarray
    bias: np.ndarray
    ridge: float
    rank: int
    cutoff: float


def least_squares(stats: Statistics, ridge: float = 0.0, rcond: float | None = None) -> LeastSquares:
    """Closed-form least-squares (ridge) classifier of the features, from the statistics (no pass over samples).

    Parameters
    ----------
    stats
        Class statistics.
    ridge
        lambda >= 0.
    rcond
        Eigenvalues of Sigma_T at or below ``rcond * lambda_max`` are dropped (default p * eps).

    Notes
    -----
    Sigma_YH = diag(pi) M^T (the cross-covariance of the one-hot targets and the features);
    W_LS = Sigma_YH (Sigma_T + lambda I)^dagger and b_LS = pi - W_LS mu_G minimise
    (1/2N) sum_i ||W h_i + b - e_{y_i}||^2 + (lambda/2) ||W||_F^2 (Webb & Lowe 1990; Han et al. 2022).

    Sigma_T's eigenpairs are taken from the SVD of a square-root factor, F = [Sigma_W^{1/2}, M diag(pi)^{1/2}]
    (Sigma_T = F F^T, eigenvalues s^2): the eigendecomposition of Sigma_T itself loses its small eigenvalues (the
    within-class directions, ~sigma^2) to rounding of the large ones once collapse is strong, while the SVD keeps them
    to eps * s_max / s. With F = U S V^T and V_2 the rows of V belonging to the M block,
    W_LS = diag(pi)^{1/2} V_2 S (S^2 + lambda)^{-1} U^T.
    """
    if ridge < 0:
        raise ValueError(f"the ridge must be non-negative, got {ridge}")
    if rcond is not None and rcond < 0:
        raise ValueError(f"rcond must be non-negative, got {rcond}")
    p = stats.n_features
    pi = stats.priors
    lam_w, q = np.linalg.eigh(stats.sigma_w)
    factor = np.hstack([q * np.sqrt(np.clip(lam_w, 0.0, None)), stats.centred_means.T * np.sqrt(pi)])
    u, s, vt = np.linalg.svd(factor, full_matrices=False)
    eig = s**2
    cutoff = (p * EPS if rcond is None else rcond) * (float(eig[0]) if eig.size else 0.0)
    keep = eig > cutoff
    u, s, v2 = u[:, keep], s[keep], vt[keep, p:].T
    w_ls = (np.sqrt(pi)[:, None] * v2 * (s / (s**2 + ridge))) @ u.T
    return LeastSquares(w_ls, pi - w_ls @ stats.global_mean, ridge, int(keep.sum()), cutoff)


def mse_term_b(stats: Statistics, weight: np.ndarray, bias: np.ndarray, ls: LeastSquares) -> float:
    """Term (B) = L(W, b) - L(W_LS, b_LS), written without subtracting the two losses.

    Notes
    -----
    With Delta = W - W_LS and delta = b - b_LS,
    B = 1/2 [ tr(Delta Sigma_T Delta^T) + ||Delta mu_G + delta||^2 ] - lambda <W_LS, Delta>_F.
    The last (cross) term is -lambda <W_LS, Delta>_F (W_LS Sigma_T - Sigma_YH = -lambda W_LS): zero without ridge.
    """
    delta_w = weight - ls.weight
    delta_b = bias - ls.bias
    quad = float(np.einsum("cp,pq,cq->", delta_w, stats.sigma_t, delta_w))
    shift = delta_w @ stats.global_mean + delta_b
    cross = -ls.ridge * float(np.sum(ls.weight * delta_w))
    return 0.5 * (max(quad, 0.0) + float(shift @ shift)) + cross


def ls_distance(weight: np.ndarray, ls: LeastSquares) -> float:
    """||W - W_LS||_F / ||W_LS||_F: 0 on the central path."""
    n = np.linalg.norm(ls.weight)
    return float(np.linalg.norm(weight - ls.weight) / n) if n > 0 else math.nan


def ls_cosine(weight: np.ndarray, ls: LeastSquares) -> float:
    """<W, W_LS>_F / (||W||_F ||W_LS||_F): alignment with the least-squares classifier, blind to scale."""
    d = np.linalg.norm(weight) * np.linalg.norm(ls.weight)
    return float(np.sum(weight * ls.weight) / d) if d > 0 else math.nan
