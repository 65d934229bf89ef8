"""The Webb-Lowe least-squares classifier and the MSE decomposition (Han, Papyan & Donoho 2022): Sigma_T^dagger
by block elimination, W_LS, terms A and B, distance and cosine to W, refinement (the error estimate that decides
refinement is in :mod:`ncaudit.metrics._uncertainty`)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ncaudit.metrics._nc1 import MeansBasis
from ncaudit.metrics._numeric import EPS, block_rows
from ncaudit.stats import Residual, Statistics


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
    dropped_vectors, dropped_values : ndarray of shape (p - t, d) and (d,)
        The eigenpairs of T at or below the cut-off (kept for :mod:`ncaudit.metrics._uncertainty`: the directions
        that a perturbation of the features could bring above it, and the null space of the pseudo-inverse).
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
    dropped_vectors: np.ndarray | None = None
    dropped_values: np.ndarray | None = None

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
        perp = np.linalg.qr(top, mode="complete")[0][:, t:].copy()  # not a view: the p x t columns are freed
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
                     cutoff=cutoff, lambda_max=lambda_max, dropped_vectors=vectors[:, ~keep],
                     dropped_values=values[~keep])
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
