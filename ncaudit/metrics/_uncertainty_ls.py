"""The uncertainty of the least-squares family (terms A and B, ls_distance, ls_cosine, ||W_LS||) under the rounding of
the features, and the float64 arithmetic error of the closed form that decides refinement. The model is in
:mod:`ncaudit.metrics._uncertainty` ("Least squares" and "Rank")."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ncaudit.metrics._least_squares import LeastSquares, TotalPinv
from ncaudit.metrics._numeric import EPS
from ncaudit.metrics._uncertainty import (
    ARITHMETIC_EIGEN,
    CANDIDATES,
    LS_KEYS,
    PROBES,
    SATURATED,
    WARN_ABOVE,
    Rounding,
    Z,
    _probes,
    _rel,
)
from ncaudit.stats import Statistics


# ---------------------------------------------------------------------------------------------------------------------
# The basis that whitens Sigma_T (from the block elimination of TotalPinv)
# ---------------------------------------------------------------------------------------------------------------------
class _Whitening:
    """Coordinates in the Sigma_T-conjugate basis of a :class:`TotalPinv`: the t dominant between-class directions U_t
    (Gram K) and the directions g_j = G z_j of the Schur complement T = Z diag(tau) Z^T, G = U_perp - U_t K^-1 E, for
    which Sigma_T^+ = U_t K^-1 U_t^T + sum_j g_j g_j^T / tau_j (kept j)."""

    def __init__(self, pinv: TotalPinv) -> None:
        self.pinv = pinv
        self.root = np.sqrt(pinv.values)

    def split(self, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(U_t^T v, G^T v) for v of shape (p, m)."""
        pinv = self.pinv
        if pinv.perp is None:
            return np.zeros((0, v.shape[1])), v
        x = pinv.top.T @ v
        return x, pinv.perp.T @ v - pinv.coupling.T @ (pinv.k_inv @ x)

    def coords(self, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(U_t^T v, c) with c_j = g_j^T v / tau_j^(1/2) (kept directions), so that <a, Sigma_T^+ b> =
        x_a^T K^-1 x_b + c_a . c_b."""
        x, y = self.split(v)
        return x, (self.pinv.vectors.T @ y) / self.root[:, None]

    def directions(self, z: np.ndarray) -> np.ndarray:
        """g = G z for z of shape (p - t, m)."""
        pinv = self.pinv
        if pinv.perp is None:
            return z
        return pinv.perp @ z - pinv.top @ (pinv.k_inv @ (pinv.coupling @ z))

    def apply(self, v: np.ndarray, damping: np.ndarray | None = None) -> np.ndarray:
        """Sigma_T^+ v, with the eigenvalue tau_j of T divided by ``damping``_j (< 1 damps) when given."""
        x, c = self.coords(v)
        c = c / self.root[:, None] if damping is None else c * (damping / self.root)[:, None]
        out = self.directions(self.pinv.vectors @ c)
        if x.shape[0]:
            out = out + self.pinv.top @ (self.pinv.k_inv @ x)
        return out

    def form(self, a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray],
             weights: np.ndarray | None = None) -> float:
        """sum over columns of a^T S b, S = U_t K^-1 U_t^T + sum_j w_j g_j g_j^T / tau_j, from :meth:`coords`."""
        xa, ca = a
        xb, cb = b
        top = float(np.sum(xa * (self.pinv.k_inv @ xb))) if xa.shape[0] else 0.0
        return top + float(np.sum(ca * cb if weights is None else ca * cb * weights[:, None]))

    def null_projector(self, v: np.ndarray) -> np.ndarray:
        """P_perp v: the orthogonal projection onto the null space of Sigma_T^+ (the dropped directions of T)."""
        pinv = self.pinv
        dropped = pinv.dropped_vectors
        if dropped is None or dropped.shape[1] == 0:
            return np.zeros_like(v)
        basis_v = v if pinv.perp is None else pinv.perp.T @ v
        out = dropped @ (dropped.T @ basis_v)
        return out if pinv.perp is None else pinv.perp @ out


# ---------------------------------------------------------------------------------------------------------------------
# Least squares: terms A and B, ls_distance, ls_cosine, ||W_LS||
# ---------------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LeastSquaresUncertainty:
    """Relative uncertainties of the least-squares family and what they come from.

    Attributes
    ----------
    relative : dict
        {key: relative uncertainty} for :data:`LS_KEYS` (``w_ls_norm`` is ||W_LS||_F): rounding, rank and
        arithmetic together (inf where the value is 0 and its uncertainty is not).
    rank_range : tuple of int
        The ranks of Sigma_T^+ that the perturbation or the arithmetic can give (equal: the rank is determined).
    noise_ratio : float
        The largest sigma^2 g_j^T D g_j / tau_j over the kept directions: above 1, some direction of Sigma_T is below
        the rounding noise of the features.
    ridge : float
        A ridge lambda that would bring every direction's noise-to-eigenvalue ratio under the level where the
        least-squares family is determined to about 1e-3 (0 when none is needed).
    """

    relative: dict[str, float]
    rank_range: tuple[int, int]
    noise_ratio: float
    ridge: float


class _Quantities:
    """The least-squares quantities as functions of W_LS: what the rank candidates and the gradients need."""

    def __init__(self, weight: np.ndarray, ls_weight: np.ndarray, loss: float, term_a: float) -> None:
        self.weight, self.ls_weight, self.loss, self.term_a = weight, ls_weight, loss, term_a
        n_ls, n_w = float(np.linalg.norm(ls_weight)), float(np.linalg.norm(weight))
        inner = float(np.sum(weight * ls_weight))
        n_d = math.sqrt(max(n_w * n_w - 2.0 * inner + n_ls * n_ls, 0.0))
        if n_d < 1e-4 * (n_w + n_ls):  # close: the difference itself (no cancellation)
            n_d = float(np.linalg.norm(weight - ls_weight))
        self.norms = (n_ls, n_w, n_d, inner)
        self.values = {"mse_term_a": term_a, "mse_term_b": loss - term_a,
                       "ls_distance": n_d / n_ls if n_ls > 0 else math.nan,
                       "ls_cosine": inner / (n_w * n_ls) if n_w * n_ls > 0 else math.nan,
                       "w_ls_norm": n_ls}

    def gradients(self) -> dict[str, tuple[float, float]]:
        """d q / d W_LS = alpha W + beta W_LS for ls_distance, ls_cosine, w_ls_norm: {key: (alpha, beta)}."""
        v = self.values
        n_ls, n_w, n_d, _ = self.norms
        out = {"w_ls_norm": (0.0, 1.0 / n_ls) if n_ls > 0 else (0.0, 0.0)}
        if n_ls > 0 and n_w > 0:
            out["ls_cosine"] = (1.0 / (n_w * n_ls), -v["ls_cosine"] / n_ls**2)
        if n_ls > 0 and n_d > 0:
            out["ls_distance"] = (-1.0 / (n_d * n_ls), 1.0 / (n_d * n_ls) - v["ls_distance"] / n_ls**2)
        return out


def _sigma_t_apply(stats: Statistics, v: np.ndarray, centred: np.ndarray | None = None) -> np.ndarray:
    """Sigma_T v = Sigma_W v + M diag(pi) M^T v for v of shape (p, m), without forming Sigma_T."""
    centred = stats.centred_means if centred is None else centred
    return stats.sigma_w @ v + centred.T @ (stats.priors[:, None] * (centred @ v))


class _Residual:
    """Sigma_RR = (1/N) R^T R, R = Y - X W_LS^T (centred), applied to (C, m) blocks: Sigma_YY - Sigma_YH W^T -
    W Sigma_YH^T + W Sigma_T W^T, exact for any W_LS (refined, ridge)."""

    def __init__(self, stats: Statistics, ls_weight: np.ndarray) -> None:
        self.stats, self.w = stats, ls_weight
        self.centred, self.pi = stats.centred_means, stats.priors
        self.syh = self.pi[:, None] * self.centred  # Sigma_YH = diag(pi) M^T, (C, p)

    def __call__(self, q: np.ndarray) -> np.ndarray:
        pi = self.pi
        wq = self.w.T @ q
        return (pi[:, None] * q - np.outer(pi, pi @ q) - self.syh @ wq - self.w @ (self.syh.T @ q)
                + self.w @ _sigma_t_apply(self.stats, wq, self.centred))


def _quadratic(alpha: float, beta: float, m: np.ndarray) -> float:
    return max(alpha * alpha * m[0, 0] + 2.0 * alpha * beta * m[0, 1] + beta * beta * m[1, 1], 0.0)


def ls_uncertainty(stats: Statistics, weight: np.ndarray, bias: np.ndarray, ls: LeastSquares, noise: Rounding, *,
                   loss: float, term_a: float, arithmetic: dict[str, float] | None = None,
                   probes: int = PROBES, seed: int = 0) -> LeastSquaresUncertainty:
    """Relative uncertainty of terms A and B, ls_distance, ls_cosine and ||W_LS|| under the rounding ``noise``.

    Parameters
    ----------
    stats, weight, bias
        Statistics, the classifier W (C, p) and b (C,).
    ls
        The least-squares classifier as reported (refined or not).
    noise
        The rounding of the features (:func:`rounding`).
    loss, term_a
        L(W, b) and term (A) as reported.
    arithmetic
        The float64 share (:func:`ls_arithmetic`), already scaled to what refinement left; 0 when omitted.
    probes, seed
        Random probes of the trace estimates.

    Returns
    -------
    LeastSquaresUncertainty

    Notes
    -----
    See the module notes for the model. Cost: a few products of p x p by p x ``probes`` and of C x p by p x
    ``probes``, plus O(p^2) per candidate or saturated direction: no pass over the data and no C-column solve.
    """
    n, p = stats.n_samples, stats.n_features
    pinv, lsw = ls.pinv, ls.weight
    wh = _Whitening(pinv)
    s2 = noise.variance
    root_d = np.sqrt(noise.moments)
    rank, tau = ls.rank, pinv.values
    refit = max(0.0, 1.0 - rank / max(n - 1, 1))
    # Per-direction noise of the kept directions of T, estimated with probes (exact below for the saturated ones).
    x = root_d[:, None] * _probes(p, probes, seed)
    cx = wh.coords(x)
    px = wh.null_projector(x)
    null_noise = s2 * float(np.sum(px * px)) / probes  # sigma^2 tr(P_perp D)
    nu = tau * np.mean(cx[1] ** 2, axis=1)  # nu_j = g_j^T D g_j
    rho_a = s2 * nu / tau
    rho_w = rho_a * refit + null_noise / max(n - 1, 1) / tau
    sat = _saturated(stats, wh, noise, lsw, rho_a, rho_w, refit, null_noise)
    rho_a[sat.index], rho_w[sat.index] = sat.rho_a, sat.rho_w
    damp_w, damp_a = 1.0 / (1.0 + rho_w), 1.0 / (1.0 + rho_a)
    rr = _Residual(stats, lsw)
    q = _Quantities(weight, lsw, loss, term_a)
    values = q.values
    std, bias_q = _functional_terms(stats, weight, lsw, wh, x, px, damp_w, rr, s2, n, sat, probes)
    out: dict[str, float] = {}
    for key, (alpha, beta) in q.gradients().items():
        change = abs(alpha * bias_q[0] + beta * bias_q[1]) + Z * math.sqrt(_quadratic(alpha, beta, std))
        out[key] = _rel(change, values[key])
    a_change, b_change = _loss_terms(stats, weight, bias, lsw, wh, x, cx, damp_a, rr, s2, n, sat, probes,
                                     term_a, refit)
    out["mse_term_a"] = _rel(a_change, values["mse_term_a"])
    out["mse_term_b"] = _rel(b_change, values["mse_term_b"])
    # An eigenvalue moves by +rho_w tau (the noise's bias) +- 2 (tau sigma^2 nu / N)^(1/2) (its linear term).
    band = Z * 2.0 * np.sqrt(np.maximum(tau, 0.0) * s2 * nu / n) - rho_w * tau
    spread, rank_range = _rank_spread(stats, wh, q, noise, band, refit, x)
    arithmetic = arithmetic or {}
    relative = {key: out.get(key, math.inf) + spread.get(key, 0.0) + arithmetic.get(key, 0.0) + 4.0 * EPS
                for key in LS_KEYS}  # 4 eps: the rounding of the value itself and of its last operations
    relative = {k: (v if math.isfinite(values[k]) else math.nan) for k, v in relative.items()}
    return LeastSquaresUncertainty(relative, rank_range, float(rho_a.max()) if rho_a.size else 0.0,
                                   _ridge(tau, s2 * nu, n, pinv.cutoff, rank_range != (rank, rank)))


@dataclass(frozen=True)
class _Saturated:
    """The directions whose noise-to-eigenvalue ratio is large enough for its second-order effect to count."""

    index: np.ndarray       # (J,) indices into the kept eigenpairs of T
    g: np.ndarray           # (p, J) the directions g_j
    tau: np.ndarray         # (J,)
    comp: np.ndarray        # (C, J) W_LS Sigma_T g_j: W_LS = ... + sum_j comp_j g_j^T / tau_j
    rho_a: np.ndarray       # (J,) sigma^2 nu_j / tau_j
    rho_w: np.ndarray       # (J,) with the repulsion of the directions above and of the null space


def _saturated(stats: Statistics, wh: _Whitening, noise: Rounding, lsw: np.ndarray, rho_a: np.ndarray,
               rho_w: np.ndarray, refit: float, null_noise: float) -> _Saturated:
    n = noise.n_samples
    worst = np.maximum(rho_a, rho_w)
    index = np.flatnonzero(worst >= 0.01 / n)
    index = index[np.argsort(-worst[index])][:SATURATED]
    g = wh.directions(wh.pinv.vectors[:, index])
    tau = wh.pinv.values[index]
    nu = noise.moments @ (g * g)
    ra = noise.variance * nu / tau
    rw = ra * refit + null_noise / max(n - 1, 1) / tau
    comp = lsw @ _sigma_t_apply(stats, g)
    return _Saturated(index, g, tau, comp, ra, rw)


def _functional_terms(stats: Statistics, weight: np.ndarray, lsw: np.ndarray, wh: _Whitening, x: np.ndarray,
                      px: np.ndarray, damp: np.ndarray, rr: _Residual, s2: float, n: int, sat: _Saturated,
                      probes: int) -> tuple[np.ndarray, np.ndarray]:
    """For q with gradient alpha W + beta W_LS: the 2 x 2 matrix of Var(dq) and the 2-vector of its bias."""
    k = x.shape[1]
    y = wh.apply(x, damp)
    qwl = np.hstack([weight @ y, lsw @ y])
    rq = rr(qwl)
    qw, ql, rqw, rql = qwl[:, :k], qwl[:, k:], rq[:, :k], rq[:, k:]
    t1 = np.array([[np.sum(qw * rqw), np.sum(qw * rql)], [np.sum(ql * rqw), np.sum(ql * rql)]])
    a = lsw @ x
    vwl = np.hstack([weight.T @ a, lsw.T @ a, lsw.T @ np.hstack([weight @ px, lsw @ px])])
    xt, ct = wh.coords(vwl)
    c = {key: (xt[:, i * k:(i + 1) * k], ct[:, i * k:(i + 1) * k]) for i, key in enumerate(("vw", "vl", "up", "upl"))}
    d1, d2 = damp, damp * damp

    def f(w: np.ndarray | None, i: str, j: str) -> float:
        return wh.form(c[i], c[j], w)

    t2 = np.empty((2, 2))
    t2[0, 0] = f(d2, "vw", "vw") + f(None, "up", "up") - 2.0 * f(d1, "vw", "up")
    t2[1, 1] = f(d2, "vl", "vl") + f(None, "upl", "upl") - 2.0 * f(d1, "vl", "upl")
    t2[0, 1] = t2[1, 0] = (f(d2, "vw", "vl") + f(None, "up", "upl") - f(d1, "vw", "upl") - f(d1, "vl", "up"))
    var = s2 / n * (0.5 * (t1 + t1.T) + t2) / probes
    # Bias: the saturated directions' components of W_LS shrink by 1 / (1 + rho_w).
    shrink = sat.rho_w / (1.0 + sat.rho_w) / sat.tau
    bias = -np.array([np.sum(shrink * np.sum(sat.comp * (weight @ sat.g), axis=0)),
                      np.sum(shrink * np.sum(sat.comp * (lsw @ sat.g), axis=0))])
    return var, bias


def _loss_terms(stats: Statistics, weight: np.ndarray, bias: np.ndarray, lsw: np.ndarray, wh: _Whitening,
                x: np.ndarray, cx: tuple[np.ndarray, np.ndarray], damp: np.ndarray, rr: _Residual, s2: float,
                n: int, sat: _Saturated, probes: int, term_a: float, refit: float) -> tuple[float, float]:
    """|bias| + Z std of terms A and B (absolute)."""
    d = np.einsum("pk,pk->p", x, x) / probes  # m2, exactly (Rademacher probes)
    shrink_a = sat.rho_a / (1.0 + sat.rho_a) / sat.tau
    ldx = lsw @ x - (sat.comp * shrink_a) @ (sat.g.T @ x)  # the damped W_LS on the probes
    wx = weight @ x
    dwx = wx - ldx  # (W - damped W_LS) on the probes
    both = rr(np.hstack([ldx, dwx]))
    var_a = s2 / n * float(np.sum(ldx * both[:, :probes])) / probes
    # bias of A: (sigma^2/2) [tr(W_LS D W_LS^T) (1 - r/(N-1)) - 2 A tr(D S) / N], saturated directions damped
    fit = s2 * float(np.sum(lsw * lsw * d))
    if sat.index.size:
        energy = np.sum(sat.comp**2, axis=0) / sat.tau  # ||A_j||^2 in whitened coordinates
        fit = max(fit - float(np.sum(energy * sat.rho_a**2 / (1.0 + sat.rho_a))),
                  float(np.sum(energy * sat.rho_a / (1.0 + sat.rho_a))))
    trace_ds = s2 * wh.form(cx, cx, damp) / probes
    bias_a = 0.5 * (fit * refit - 2.0 * term_a * trace_ds / n)
    # L(W, b): linear term -(1/N) sum_i r_i^W . W e_i with r^W = r - (W - W_LS) x - s, and bias (sigma^2/2) tr(W D W^T)
    shift = weight @ stats.global_mean + bias - stats.priors
    v = (weight - lsw).T @ wx
    total = float(np.sum(dwx * both[:, probes:])) + float(np.sum(v * _sigma_t_apply(stats, v, rr.centred))) \
        + float(np.sum((shift @ wx) ** 2))
    var_b = s2 / n * total / probes
    bias_b = 0.5 * s2 * float(np.sum(weight * weight * d)) - bias_a
    return abs(bias_a) + Z * math.sqrt(max(var_a, 0.0)), abs(bias_b) + Z * math.sqrt(max(var_b, 0.0))


def _rank_spread(stats: Statistics, wh: _Whitening, q: _Quantities, noise: Rounding | None, band: np.ndarray,
                 refit: float, x: np.ndarray | None = None) -> tuple[dict[str, float], tuple[int, int]]:
    """The largest relative change of each quantity over the candidate ranks of Sigma_T^+, and their range.

    A kept eigenvalue tau_j of T is a candidate for removal when tau_j - band_j - eps_a <= cut-off; a dropped one for
    addition when tau_j + its noise bias + band_j + eps_a > cut-off (and the rank is below min(N - 1, p)), eps_a =
    ARITHMETIC_EIGEN eps lambda_max. Removing direction j changes W_LS by -c_j g_j^T / tau_j with c_j = W_LS Sigma_T
    g_j and term (A) by +||c_j||^2 / (2 tau_j); adding one, by +c_j g_j^T / tau' with c_j = Sigma_YH g_j - W_LS
    Sigma_T g_j and tau' = max(tau_j + the noise it receives, cut-off), and A by -||c_j||^2 / (2 tau'). Candidates are
    removed smallest first and added largest first, at most :data:`CANDIDATES` each side.
    """
    pinv = wh.pinv
    n, p = stats.n_samples, stats.n_features
    rank, cut, tau = pinv.rank, pinv.cutoff, pinv.values
    eps_a = ARITHMETIC_EIGEN * EPS * pinv.lambda_max
    remove = np.flatnonzero(tau - band - eps_a <= cut)
    remove = remove[np.argsort(tau[remove])][:CANDIDATES]
    dvals = pinv.dropped_values if pinv.dropped_values is not None else np.zeros(0)
    room = max(min(n - 1, p) - rank, 0)
    add = np.zeros(0, dtype=np.int64)
    raised = np.zeros(0)
    if room and dvals.size:
        noise_d = np.zeros(dvals.size)
        if noise is not None and x is not None:
            _, y = wh.split(x)
            noise_d = noise.variance * np.mean((pinv.dropped_vectors.T @ y) ** 2, axis=1)  # sigma^2 nu_j
        pos = np.maximum(dvals, 0.0)
        reach = dvals + noise_d * refit + Z * 2.0 * np.sqrt(pos * noise_d / n) + eps_a
        add = np.flatnonzero(reach > cut)
        add = add[np.argsort(-dvals[add])][:min(CANDIDATES, room)]
        half = 0.25 * noise_d[add]  # what half a unit (round to nearest) puts there
        raised = np.maximum(dvals[add] + half * refit, cut * (1.0 + 1e-12))
    base = q.values
    spread = {k: 0.0 for k in LS_KEYS}
    if remove.size:
        g = wh.directions(pinv.vectors[:, remove])
        comp = q.ls_weight @ _sigma_t_apply(stats, g)
        _cumulative(q, base, g, -comp / tau[remove], 0.5 * np.sum(comp**2, axis=0) / tau[remove], spread)
    if add.size:
        g = wh.directions(pinv.dropped_vectors[:, add])
        syh = stats.priors[:, None] * stats.centred_means
        comp = syh @ g - q.ls_weight @ _sigma_t_apply(stats, g)
        _cumulative(q, base, g, comp / raised, -0.5 * np.sum(comp**2, axis=0) / raised, spread)
    return spread, (rank - int(remove.size), rank + int(add.size))


def _cumulative(q: _Quantities, base: dict[str, float], g: np.ndarray, coef: np.ndarray, d_a: np.ndarray,
                spread: dict[str, float]) -> None:
    """W_LS + sum_{j <= m} coef_j g_j^T and A + sum_{j <= m} d_a_j for m = 1, 2, ...: the largest relative change of
    each quantity, folded into ``spread``."""
    lsw, w = q.ls_weight, q.weight
    lg = np.sum(coef * (lsw @ g), axis=0)
    wg = np.sum(coef * (w @ g), axis=0)
    gram = (coef.T @ coef) * (g.T @ g)
    n_ls2, n_w = float(np.sum(lsw * lsw)), float(np.linalg.norm(w))
    inner, n_d2 = float(np.sum(w * lsw)), float(np.sum((w - lsw) ** 2))
    s_l = s_w = s_dd = s_a = 0.0
    for m in range(g.shape[1]):
        s_dd += 2.0 * float(np.sum(gram[m, :m])) + float(gram[m, m])
        s_l += float(lg[m])
        s_w += float(wg[m])
        s_a += float(d_a[m])
        n_ls = math.sqrt(max(n_ls2 + 2.0 * s_l + s_dd, 0.0))
        a = q.term_a + s_a
        values = {"mse_term_a": a, "mse_term_b": q.loss - a,
                  "ls_distance": math.sqrt(max(n_d2 - 2.0 * (s_w - s_l) + s_dd, 0.0)) / n_ls if n_ls else math.nan,
                  "ls_cosine": (inner + s_w) / (n_w * n_ls) if n_w * n_ls else math.nan, "w_ls_norm": n_ls}
        for key, value in values.items():
            spread[key] = max(spread[key], _rel(value - base[key], base[key]))


def _ridge(tau: np.ndarray, noise: np.ndarray, n: int, cut: float, rank_uncertain: bool) -> float:
    """The smallest lambda with rho + 2 Z (rho / N)^(1/2) <= WARN_ABOVE in every direction, rho = noise_j /
    (tau_j + lambda) (and 10x the cut-off when the rank is uncertain), rounded up to one significant digit."""
    root = -Z / math.sqrt(n) + math.sqrt(Z * Z / n + WARN_ABOVE)
    target = root * root
    need = float(np.max(noise / target - tau)) if tau.size else 0.0
    if rank_uncertain:
        need = max(need, 10.0 * cut)
    if need <= 0:
        return 0.0
    scale = 10.0 ** math.floor(math.log10(need))
    return math.ceil(need / scale) * scale


def ls_arithmetic(stats: Statistics, weight: np.ndarray, ls: LeastSquares, *, loss: float, term_a: float,
                  probes: int = PROBES, seed: int = 1) -> tuple[dict[str, float], dict[str, float]]:
    """Relative error of the least-squares quantities from the float64 arithmetic: (the first-order error of the
    closed-form solve at the rank used, which refinement on the samples reduces; what it cannot: the spread over the
    ranks within the arithmetic error of the cut-off and the floor of evaluating a loss).

    Notes
    -----
    Sigma_T is perturbed by a symmetric Delta with iid Gaussian entries of spectral size eps_s = 2 eps tr(Sigma_W) (the
    backward error of the float64 scatter and of the symmetric solve): dW_LS = -W_LS Delta Sigma_T^+, dA =
    1/2 <W_LS^T W_LS, Delta>, dL(W) = 1/2 <W^T W, Delta>, and Var <Delta, K> = eps_s^2 ||K + K^T||_F^2 / (8p) <=
    eps_s^2 ||K||_F^2 / (2p), estimated with probes (||K||_F^2 = E ||K s||^2); the error is Z standard deviations.
    The eigenvalues of T within ARITHMETIC_EIGEN eps lambda_max of the cut-off give the candidate ranks (refinement on
    the samples removes the first part, never the second).
    """
    p = stats.n_features
    size = 2.0 * EPS * float(np.trace(stats.sigma_w))
    q = _Quantities(weight, ls.weight, loss, term_a)
    values = q.values
    wh = _Whitening(ls.pinv)
    s = _probes(p, probes, seed)
    a = ls.weight @ s
    y = wh.apply(np.hstack([weight.T @ a, ls.weight.T @ a]))
    yw, yl = y[:, :probes], y[:, probes:]
    gram = np.array([[np.sum(yw * yw), np.sum(yw * yl)], [np.sum(yw * yl), np.sum(yl * yl)]]) / probes
    scale = size / math.sqrt(2.0 * p)
    fixed: dict[str, float] = {}
    for key, (alpha, beta) in q.gradients().items():
        fixed[key] = _rel(Z * scale * math.sqrt(_quadratic(alpha, beta, gram)), values[key])
    lt = ls.weight.T @ a
    wt = weight.T @ (weight @ s)
    fixed["mse_term_a"] = _rel(Z * scale * 0.5 * math.sqrt(np.sum(lt * lt) / probes), values["mse_term_a"])
    fixed["mse_term_b"] = _rel(Z * scale * 0.5 * math.sqrt(np.sum((wt - lt) ** 2) / probes), values["mse_term_b"])
    spread, _ = _rank_spread(stats, wh, q, None, np.zeros_like(ls.pinv.values), 0.0)
    # Evaluating a loss: each residual w . x_i + ... carries an error up to eps ||w|| ||x_i||, so L(W) has an
    # absolute floor (2 L)^(1/2) e + e^2 / 2 with e = eps ||W||_F tr(Sigma_T)^(1/2) (what a loss at zero shows).
    root_t = math.sqrt(max(float(np.trace(stats.sigma_w)) + float(stats.priors @ np.sum(stats.centred_means**2, 1)),
                           0.0))

    def floor(w: np.ndarray, value: float) -> float:
        e = EPS * float(np.linalg.norm(w)) * root_t
        return math.sqrt(2.0 * max(value, 0.0)) * e + 0.5 * e * e

    floor_a, floor_l = floor(ls.weight, term_a), floor(weight, loss)
    spread["mse_term_a"] += _rel(floor_a, values["mse_term_a"])
    spread["mse_term_b"] += _rel(floor_a + floor_l, values["mse_term_b"])
    return {k: fixed.get(k, math.inf) for k in LS_KEYS}, spread


def ls_error_estimate(stats: Statistics, weight: np.ndarray | None, ls: LeastSquares, term_a: float,
                      term_b: float | None, *, seed: int = 1) -> float:
    """The largest relative float64-arithmetic error of terms A and B, ||W_LS||, ls_distance and ls_cosine of the
    closed form (:func:`ls_arithmetic`: first order at the rank used plus the ranks within the arithmetic error of the
    cut-off and the floor of evaluating a loss); without a classifier (``weight`` and ``term_b`` None) of term A and
    ||W_LS|| only. Above ``REFINE_ABOVE`` the audit refines W_LS on the samples.
    """
    has_w = weight is not None and term_b is not None
    w = weight if has_w else np.zeros_like(ls.weight)
    fixed, spread = ls_arithmetic(stats, w, ls, loss=term_a + (term_b if has_w else 0.0), term_a=term_a, seed=seed)
    keys = LS_KEYS if has_w else ("mse_term_a", "w_ls_norm")
    finite = [fixed[k] + spread[k] for k in keys if math.isfinite(fixed[k] + spread[k])]
    return max(finite, default=0.0)
