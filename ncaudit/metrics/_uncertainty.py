"""How many digits the features determine: the relative change of each metric when every stored feature is
perturbed by a rounding unit of its dtype (spec rule 7), from the statistics alone.

The model
---------
Every stored value h_ik carries an independent relative rounding error delta_ik, uniform on [-u, u] (one unit u:
2^-24 for float32, 2^-11 for float16, 2^-8 for bfloat16 values, 2^-53 for float64), so the noise matrix E = h o delta
has independent entries of variance sigma^2 h_ik^2 with sigma^2 = u^2 / 3. Its per-coordinate variance is replaced by
its mean over the samples, sigma^2 m2_k with m2_k = (1/N) sum_i h_ik^2 = [Sigma_T]_kk + [mu_G]_k^2: the statistics
size the noise, no pass over the data is needed. A metric q then moves by

    dq = bias_q + (a zero-mean term, linear in E, of standard deviation std_q),

and the stated relative uncertainty is (|bias_q| + Z std_q) / |q| (Z = 2), plus the spread of q over every rank that
the perturbation (or the float64 arithmetic) can give a pseudo-inverse whose spectrum has no gap at its cut-off, plus
the float64 arithmetic error. Everything is first-order perturbation theory with two corrections that real spectra
need: the second-order bias (the noise adds sigma^2 D, D = diag(m2), to every covariance) and its saturation
(a direction whose eigenvalue is below the noise it receives is damped, not inverted).

Least squares (Wedin 1973; the errors-in-variables bias of Fuller 1987)
    With X the centred rows, R = Y - X W_LS^T the residual and Sigma_RR = R^T R / N, a perturbation E moves W_LS by
    dW^T = Sigma_T^+ (E^T R - X^T E W^T) / N + P_perp E^T X Sigma_T^+ W^T / N (P_perp: the directions the cut-off
    dropped). For a scalar q(W_LS) with gradient G (a combination of W and W_LS for the distance, the cosine and
    the norm), independence of R and X (X^T R = 0) gives Var(dq) = (sigma^2 / N) [tr(Sigma_RR G S D S G^T) +
    tr(V^T S V)], V = (G^T W_LS - W_LS^T G P_perp) D^(1/2), S = Sigma_T^+ (damped, see below), both traced with
    random probes s (E[s s^T] = I: tr(A D A^T) = E ||A D^(1/2) s||^2). The bias is the response of W_LS to the
    deterministic part
    sigma^2 D of the noise, direction by direction in the basis that whitens Sigma_T: the eigenvalue tau_j of a
    direction g_j grows by sigma^2 g_j^T D g_j (1 - r / (N - 1)) + sigma^2 tr(P_perp D) / (N - 1) (the repulsion of
    the r directions above it and of the null space), i.e. by the factor 1 + rho_j, and its component of W_LS
    shrinks by 1 / (1 + rho_j). Term (A) = min L moves by -(1/N) sum_i r_i^T W_LS e_i (the envelope theorem) with
    bias (sigma^2 / 2) [tr(W_LS D W_LS^T) (1 - r / (N - 1)) - 2 A tr(D Sigma_T^+) / N] (the noise degrades the
    fit, the refit absorbs part of it); L(W, b) of the fixed classifier moves by -(1/N) sum_i r_i^W . W e_i with
    bias (sigma^2 / 2) tr(W D W^T); term (B) = L(W, b) - A by their difference.

NC1 = sum_k u_k^T Sigma_W u_k / s_k^2
    The noise adds sigma^2 D to Sigma_W (the bias) and sigma^2 D / n_c to each class mean's covariance: Sigma_W
    moves linearly (variance (4 sigma^2 / N) tr(A B), A = w^T Sigma_W w, B = w^T D w, w = U S^-1), each singular value
    of M by s_k's standard deviation sigma (u_k^T D u_k sum_c v_kc^2 / n_c)^(1/2), and each u_k rotates towards the
    complement by P_perp dM v_k / s_k. A class-mean direction that M leaves empty (rank < min(p, C - 1)) is filled
    by the noise itself: its singular value becomes the noise's (half a unit, the RMS error of round-to-nearest),
    and NC1 gains tr(D Sigma_W) / tr(D) / s'^2 for it.

CDNV and NC3
    First order in the class variances and means (blocked over pairs of classes for the CDNV), with the bias of both.

Rank
    The eigenvalues of the Schur complement T (which decide the rank of Sigma_T^+, see :class:`TotalPinv`) move by
    standard deviation 2 (tau_j sigma^2 nu_j / N)^(1/2), nu_j = g_j^T D g_j, up by the noise's bias, and by the
    arithmetic error ARITHMETIC_EIGEN eps lambda_max; every eigenvalue that Z standard deviations, the bias and the
    arithmetic error can carry across the cut-off is a candidate (at most min(N - 1, p) directions), and the metric
    is recomputed at each candidate rank (W_LS changes by the rank-one term c_j g_j^T / tau_j of each direction, c_j =
    Sigma_YH g_j: exact for the truncated pseudo-inverse because the g_j are Sigma_T-conjugate). The singular values
    of M likewise for NC1.

Assumptions: rounding errors independent of each other and of the data's geometry, of the same relative size in
every sample (the per-coordinate mean m2 stands in for h_ik^2); first order in the noise except for the bias and its
saturation; the diagonal of the noise in the whitening basis for the saturation. Calibrated in
``bench/stats.py --uncertainty`` against SVD solves of perturbed copies of the rows (the README has the figures).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ncaudit.metrics._nc1 import MeansBasis
from ncaudit.metrics._numeric import EPS, TINY
from ncaudit.stats import Statistics

#: The stated uncertainty is |bias| + Z standard deviations of the linear term (then the rank spread, arithmetic).
Z = 2.0
#: Random probes of the trace estimates (each costs a few p x PROBES products).
PROBES = 32
#: At most this many directions each side of a cut-off are tried as candidate ranks.
CANDIDATES = 64
#: At most this many directions get an explicit saturation (bias) term; the rest are first order.
SATURATED = 512
#: The float64 error of an eigenvalue of Sigma_T, in units of eps * lambda_max (the largest error measured against an
#: SVD of the rows on the test features was 4).
ARITHMETIC_EIGEN = 8.0
#: A least-squares uncertainty above this is a warning.
WARN_ABOVE = 1e-3

#: The least-squares keys of :attr:`LeastSquaresUncertainty.relative`.
LS_KEYS = ("mse_term_a", "mse_term_b", "ls_distance", "ls_cosine", "w_ls_norm")


# ---------------------------------------------------------------------------------------------------------------------
# The rounding of the features
# ---------------------------------------------------------------------------------------------------------------------
_UNITS = {"float64": 2.0**-53, "float32": 2.0**-24, "float16": 2.0**-11, "bfloat16": 2.0**-8}
_PRECISION_UNITS = {"bf16": 2.0**-8, "fp16": 2.0**-11}


def rounding_unit(feature_dtype: str, precision: str | None = None) -> float:
    """u, the relative rounding unit of the stored features: the dtype's, or the extraction's when it was coarser.

    Parameters
    ----------
    feature_dtype
        The dtype of ``/features`` (``float16``, ``float32``, ``float64``).
    precision
        The cache's ``precision`` attribute: ``bf16`` or ``fp16`` autocast leaves values of that precision even in a
        float32 dataset.
    """
    unit = _UNITS.get(feature_dtype, 2.0**-24)
    return max(unit, _PRECISION_UNITS.get(str(precision or "").lower(), 0.0))


@dataclass(frozen=True)
class Rounding:
    """The rounding noise of a feature cache, sized by its statistics.

    Attributes
    ----------
    unit : float
        u: each stored value carries a relative error uniform on [-u, u].
    moments : ndarray of shape (p,)
        m2_k = (1/N) sum_i h_ik^2 = [Sigma_T]_kk + [mu_G]_k^2: the noise of coordinate k has variance u^2 m2_k / 3.
    n_samples : int
    """

    unit: float
    moments: np.ndarray
    n_samples: int

    @property
    def variance(self) -> float:
        """sigma^2 = u^2 / 3, the variance of a relative error uniform on [-u, u]."""
        return self.unit**2 / 3.0

    @property
    def half_variance(self) -> float:
        """u^2 / 12: the variance of round-to-nearest (uniform within half a unit), used for what noise creates."""
        return self.unit**2 / 12.0


def rounding(stats: Statistics, unit: float) -> Rounding:
    """The :class:`Rounding` of features with these statistics, stored with relative unit ``unit``."""
    centred = stats.centred_means
    moments = np.diag(stats.sigma_w) + stats.priors @ (centred * centred) + stats.global_mean**2
    return Rounding(unit, np.maximum(moments, 0.0), stats.n_samples)


def _probes(p: int, k: int = PROBES, seed: int = 0) -> np.ndarray:
    """k Rademacher probes in R^p (E[s s^T] = I), deterministic."""
    return np.random.default_rng(seed).integers(0, 2, size=(p, k)).astype(np.float64) * 2.0 - 1.0


def _rel(change: float, value: float) -> float:
    if not math.isfinite(value) or not math.isfinite(change):
        return math.inf
    return abs(change) / abs(value) if value != 0 else (0.0 if change == 0 else math.inf)


# ---------------------------------------------------------------------------------------------------------------------
# NC1, CDNV, NC3
# ---------------------------------------------------------------------------------------------------------------------
def _arithmetic_size(stats: Statistics) -> float:
    """Spectral size of the float64 error of Sigma_W (accumulation and solve): 2 eps tr(Sigma_W)."""
    return 2.0 * EPS * float(np.trace(stats.sigma_w))


def nc1_uncertainty(stats: Statistics, basis: MeansBasis, noise: Rounding, value: float, *,
                    probes: int = PROBES, seed: int = 2) -> tuple[float, tuple[int, int]]:
    """Relative uncertainty of NC1 = sum_k u_k^T Sigma_W u_k / s_k^2 and the candidate ranks of Sigma_B.

    Notes
    -----
    With a_k = u_k^T Sigma_W u_k / s_k^2, b_k = u_k^T D u_k / s_k^2 and eta_k = sum_c v_kc^2 / n_c:
    bias sigma^2 (1 - C/N) sum_k b_k (the noise's within-class part); variance (4 sigma^2 / N) tr(A B) (Sigma_W,
    A = w^T Sigma_W w, B = w^T D w, w = U S^-1, by probes) + 4 sigma^2 sum_k a_k^2 b_k eta_k (the singular values) +
    4 sigma^2 sum_k eta_k ||D^(1/2) P_perp Sigma_W u_k||^2 / s_k^6 (the rotation of u_k towards the complement P_perp
    of U; the rotations within U are neglected). A singular
    value within Z of its standard deviation sigma s_k (b_k eta_k)^(1/2) (or ARITHMETIC_EIGEN eps s_1) of the
    cut-off can drop out (NC1 loses a_k); each of the min(p, C - 1) - r directions that M leaves empty is filled by
    the rounding of the means (singular value s'^2 = u^2 tr(D) mean(1/n_c) / 12) and adds tr(D Sigma_W) / tr(D) / s'^2.
    """
    r = basis.rank
    if r == 0 or not math.isfinite(value) or value == 0:
        return math.nan, (r, r)
    n, c, p = stats.n_samples, stats.n_classes, stats.n_features
    s2, d = noise.variance, noise.moments
    w = basis.whitener
    sww = stats.sigma_w @ w
    a = np.sum(sww * w, axis=0)
    b = d @ (w * w)
    counts = stats.counts.astype(np.float64)
    eta = (basis.vt**2) @ (1.0 / counts) if basis.vt is not None else np.full(r, float(np.mean(1.0 / counts)))
    bias = s2 * max(1.0 - c / n, 0.0) * float(np.sum(b))
    t = _probes(r, probes, seed)
    wt = w @ t
    trace_ab = float(np.sum((w.T @ (sww @ t)) * (w.T @ (d[:, None] * wt)))) / probes
    outside = sww - basis.u @ (basis.u.T @ sww)  # the complement's share of Sigma_W u_k / s_k
    rotation = d @ (outside * outside) / basis.s**4
    var = 4.0 * s2 * (trace_ab / n + float(np.sum(a * a * b * eta)) + float(np.sum(eta * rotation)))
    arith = Z * _arithmetic_size(stats) * math.sqrt(float(np.sum(basis.s**-4.0)) / (2.0 * p))
    rel = (abs(bias) + Z * math.sqrt(max(var, 0.0)) + arith) / abs(value)
    # candidate ranks: singular values that can drop below the cut-off, directions the noise can fill
    std_s = math.sqrt(s2) * basis.s * np.sqrt(b * eta)
    drop = np.flatnonzero(basis.s - Z * std_s - ARITHMETIC_EIGEN * EPS * basis.s[0] <= basis.cutoff)
    drop = drop[np.argsort(basis.s[drop])][:CANDIDATES]
    spread = float(np.max(np.cumsum(a[drop]))) / abs(value) if drop.size else 0.0
    empty = min(min(p, c - 1) - r, CANDIDATES)
    fill = noise.half_variance * float(np.sum(d)) * float(np.mean(1.0 / counts))
    if empty > 0 and math.sqrt(fill) > basis.cutoff and np.sum(d) > 0:
        gain = float(d @ np.diag(stats.sigma_w)) / float(np.sum(d)) / fill
        spread = max(spread, empty * gain / abs(value))
        return rel + spread, (r - int(drop.size), r + empty)
    return rel + spread, (r - int(drop.size), r)


def cdnv_uncertainty(stats: Statistics, noise: Rounding, value: float, *, block: int | None = None) -> float:
    """Relative uncertainty of the CDNV, mean over pairs of (Var_c + Var_c') / (2 ||mu_c - mu_c'||^2).

    Notes
    -----
    Var_c moves by the bias sigma^2 (Var_c + ||mu_c||^2)(1 - 1/n_c) (the noise's trace in class c) with variance
    4 sigma^2 Var_c w / n_c (w = sum_k [Sigma_W]_kk m2_k / tr(Sigma_W)); mu_c by noise of covariance sigma^2 D / n_c,
    which moves ||mu_c - mu_c'||^2 by 2 (mu_c - mu_c')^T (dmu_c - dmu_c') and biases it by sigma^2 (tr D_c / n_c +
    tr D_c' / n_c'). The first-order change sums d cdnv / d Var_c and d cdnv / d mu_c =
    -(2 / (C (C - 1))) sum_c' (Var_c + Var_c') (mu_c - mu_c') / ||mu_c - mu_c'||^4 over the pairs, blocked over
    classes (never a C x C array).
    """
    from ncaudit.metrics._pairs import _pair_distances, _upper_blocks

    c = stats.n_classes
    if c < 2 or not math.isfinite(value) or value == 0:
        return math.nan
    s2, d = noise.variance, noise.moments
    x = stats.centred_means
    var_c = stats.variances
    counts = stats.counts.astype(np.float64)
    raw = var_c + np.sum(stats.means**2, axis=1)  # tr D_c, the class's raw second moment
    sq = np.einsum("cp,cp->c", x, x)
    inv_sum = np.zeros(c)
    grad = np.zeros_like(x)
    pair_bias = 0.0
    scale = 2.0 / (c * (c - 1))
    with np.errstate(divide="ignore", invalid="ignore"):
        for part in _upper_blocks(x, block):
            rows, cols, _, mask = part
            d2 = _pair_distances(x, sq, part)
            if mask is not None:
                d2 = np.where(mask, d2, np.inf)
            if np.any(d2 <= 0):
                return math.inf
            inv = 1.0 / d2
            wgt = np.add.outer(var_c[rows], var_c[cols]) * inv * inv
            inv_sum[rows] += inv.sum(axis=1)
            inv_sum[cols] += inv.sum(axis=0)
            grad[rows] += wgt.sum(axis=1)[:, None] * x[rows] - wgt @ x[cols]
            grad[cols] += wgt.sum(axis=0)[:, None] * x[cols] - wgt.T @ x[rows]
            noise_d2 = np.add.outer(raw[rows] / counts[rows], raw[cols] / counts[cols])
            pair_bias -= 0.5 * float(np.sum(wgt * noise_d2))
    d_var = inv_sum / (c * (c - 1))
    w_eff = float(np.diag(stats.sigma_w) @ d) / max(float(np.trace(stats.sigma_w)), TINY)
    var = float(np.sum(d_var**2 * 4.0 * s2 * var_c * w_eff / counts))
    var += float(np.sum((scale * scale * s2) * ((grad * grad) @ d) / counts))
    bias = float(np.sum(d_var * s2 * raw * (1.0 - 1.0 / counts))) + scale * s2 * pair_bias
    return (abs(bias) + Z * math.sqrt(max(var, 0.0))) / abs(value) + stats.n_features * EPS


def nc3_uncertainty(stats: Statistics, weight: np.ndarray, noise: Rounding, value: float) -> float:
    """Relative uncertainty of NC3 = ||W^T / ||W||_F - M / ||M||_F||_F^2 (W is exact; M moves with the class means).

    Notes
    -----
    With R = W / ||W|| - M^T / ||M|| and P = R - <R, M_hat> M_hat, dNC3 = -(2 / ||M||) <P, dM^T>, so its variance is
    (4 sigma^2 / ||M||^2) sum_c ||D^(1/2) (P_c - pi_c sum_c' P_c')||^2 / n_c; the bias is <W_hat, M_hat> E||dM||^2 /
    ||M||^2 with E||dM||^2 = sigma^2 sum_c (Var_c + ||mu_c||^2) / n_c.
    """
    centred = stats.centred_means
    n_m, n_w = float(np.linalg.norm(centred)), float(np.linalg.norm(weight))
    if n_m == 0 or n_w == 0 or not math.isfinite(value) or value == 0:
        return math.nan
    s2, d = noise.variance, noise.moments
    m_hat, w_hat = centred / n_m, weight / n_w
    resid = w_hat - m_hat
    proj = resid - float(np.sum(resid * m_hat)) * m_hat
    coef = proj - np.outer(stats.priors, proj.sum(axis=0))
    counts = stats.counts.astype(np.float64)
    var = 4.0 * s2 / n_m**2 * float(np.sum(((coef * coef) @ d) / counts))
    raw = stats.variances + np.sum(stats.means**2, axis=1)
    bias = float(np.sum(w_hat * m_hat)) * s2 * float(np.sum(raw / counts)) / n_m**2
    return (abs(bias) + Z * math.sqrt(max(var, 0.0))) / abs(value) + stats.n_features * EPS
