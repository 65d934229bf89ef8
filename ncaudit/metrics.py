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


def cdnv(variances: np.ndarray, means: np.ndarray) -> float:
    """Class-distance normalised variance, mean over pairs of (Var_c + Var_c') / (2 ||mu_c - mu_c'||^2).

    Parameters
    ----------
    variances : ndarray of shape (C,)
        Var_c.
    means : ndarray of shape (C, p)
        Class means (centred or not: only differences enter).

    Notes
    -----
    Galanti et al. 2022. Distances come from the Gram matrix of the centred means, O(C^2 p) in one GEMM. Two
    coinciding class means give an infinite value (reported as null).
    """
    c = means.shape[0]
    m = means - means.mean(0)
    g = m @ m.T
    sq = np.diag(g)
    dist2 = np.maximum(sq[:, None] + sq[None, :] - 2.0 * g, 0.0)
    off = ~np.eye(c, dtype=bool)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = (variances[:, None] + variances[None, :]) / (2.0 * dist2)
    value = float(ratio[off].mean())
    return value if math.isfinite(value) else math.inf


# ---------------------------------------------------------------------------------------------------------------------
# NC2: simplex ETF geometry (and the orthogonal frame of bias-free heads)
# ---------------------------------------------------------------------------------------------------------------------
def _std(values: np.ndarray) -> float:
    return float(np.std(values, ddof=1)) if values.size > 1 else math.nan


def pair_cosines(vectors: np.ndarray) -> np.ndarray:
    """cos(v_c, v_c') over the ordered pairs c != c', shape (C (C - 1),); rows of zero norm give NaN."""
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


def equiangle(vectors: np.ndarray) -> float:
    """std over pairs of cos(v_c, v_c'): 0 when all pairs meet at the same angle."""
    return _std(pair_cosines(vectors))


def maxangle(vectors: np.ndarray) -> float:
    """mean over pairs of |cos(v_c, v_c') + 1/(C - 1)|: 0 for the simplex ETF (maximally separated, equiangular)."""
    c = vectors.shape[0]
    return float(np.mean(np.abs(pair_cosines(vectors) + 1.0 / (c - 1))))


def orthogonality(vectors: np.ndarray) -> float:
    """mean over pairs of |cos(v_c, v_c')| of uncentred rows: 0 for an orthogonal frame of any lengths.

    Notes
    -----
    The frame that bias-free MSE training reaches, balanced or not. For centred simplex-ETF means the value is
    1/(C - 1); for uncentred means (mu_G + r e_c) it depends on the offset mu_G.
    """
    return float(np.mean(np.abs(pair_cosines(vectors))))


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
