"""An independent float64 reference of every metric, written plainly: two passes, per-class loops, numpy only.

It shares no code with ncaudit. Least squares is solved on the centred samples with ``np.linalg.lstsq`` (an SVD
of the rows, never their Gram matrix, and not from the statistics), nearest-class-mean decisions use explicit distances, and losses are averaged sample by sample.
"""

from __future__ import annotations

import numpy as np


def _std(x: np.ndarray) -> float:
    return float(np.std(x, ddof=1))


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def reference_metrics(h, y, W=None, b=None, ridge=0.0, reference_rows=None):
    """Every metric of the spec for features ``h`` (N, p), labels ``y`` (N,), classifier ``W`` (C, p), ``b`` (C,).

    ``reference_rows`` = (index, fp32 features) gives the precision floor.
    """
    h = np.asarray(h, dtype=np.float64)
    y = np.asarray(y)
    n_samples, p = h.shape
    classes = sorted(set(y.tolist()))
    C = len(classes)
    counts = np.array([np.sum(y == c) for c in classes], dtype=float)
    means = np.zeros((C, p))
    for k, c in enumerate(classes):
        means[k] = h[y == c].mean(axis=0)
    mu_g = h.mean(axis=0)
    M = (means - mu_g).T  # (p, C)

    sigma_w = np.zeros((p, p))
    var = np.zeros(C)
    class_cov = []
    for k, c in enumerate(classes):
        d = h[y == c] - means[k]
        sigma_w += d.T @ d
        var[k] = np.mean(np.sum(d * d, axis=1))
        class_cov.append(d.T @ d / len(d))
    sigma_w /= n_samples
    sigma_b = M @ M.T / C
    # Pseudo-inverse of Sigma_B keeping its top min(p, C-1) eigenpairs (generic data: that is its rank).
    lam, vec = np.linalg.eigh(sigma_b)
    order = np.argsort(lam)[::-1][: min(p, C - 1)]
    lam, vec = lam[order], vec[:, order]
    keep = lam > lam[0] * 1e-13
    sigma_b_pinv = (vec[:, keep] / lam[keep]) @ vec[:, keep].T

    out = {}
    out["nc1"] = float(np.trace(sigma_w @ sigma_b_pinv) / C)
    pairs = [(i, j) for i in range(C) for j in range(C) if i != j]
    out["cdnv"] = float(np.mean([(var[i] + var[j]) / (2 * np.sum((means[i] - means[j]) ** 2)) for i, j in pairs]))
    cm = means - mu_g
    norms = np.linalg.norm(cm, axis=1)
    out["nc2_equinorm_means"] = _std(norms) / norms.mean()
    cosm = np.array([_cos(cm[i], cm[j]) for i, j in pairs])
    out["nc2_equiangle_means"] = _std(cosm)
    out["nc2_maxangle_means"] = float(np.mean(np.abs(cosm + 1 / (C - 1))))
    out["nc2_orthogonality_means"] = float(np.mean([abs(_cos(means[i], means[j])) for i, j in pairs]))

    # Nearest class mean, by explicit distances.
    dist = np.stack([np.sum((h - means[k]) ** 2, axis=1) for k in range(C)], axis=1)
    ncc = np.array(classes)[np.argmin(dist, axis=1)]
    out["ncc_accuracy"] = float(np.mean(ncc == y))

    per_class_nc1 = [float(np.trace(cov @ sigma_b_pinv) / C) for cov in class_cov]
    out["per_class"] = {
        "count": counts, "variance": var, "nc1": np.array(per_class_nc1), "mean_norm": norms,
        "ncc_accuracy": np.array([np.mean(ncc[y == c] == c) for c in classes]),
    }

    if reference_rows is not None:
        index, ref = reference_rows
        delta = h[index] - np.asarray(ref, dtype=np.float64)
        sigma_d = delta.T @ delta / len(index)
        out["nc1_precision_floor"] = float(np.trace(sigma_d @ sigma_b_pinv) / C)

    # Least squares on the centred samples (the bias absorbs the means): features and labels alone, no classifier.
    Y = np.zeros((n_samples, C))
    Y[np.arange(n_samples), np.searchsorted(classes, y)] = 1.0
    hc = h - mu_g
    yc = Y - Y.mean(axis=0)
    if ridge == 0:
        # The spec's cut-off: eigenvalues of Sigma_T at or below p * eps * lambda_max are dropped, i.e. singular
        # values of the centred rows at or below sqrt(p * eps) * s_max.
        w_ls = np.linalg.lstsq(hc, yc, rcond=np.sqrt(p * np.finfo(float).eps))[0].T
    else:
        A = np.vstack([hc, np.sqrt(ridge * n_samples) * np.eye(p)])
        B = np.vstack([yc, np.zeros((p, C))])
        w_ls = np.linalg.lstsq(A, B, rcond=None)[0].T
    b_ls = Y.mean(axis=0) - w_ls @ mu_g
    resid = hc @ w_ls.T - yc  # = h W_LS^T + b_LS - Y, without the offset
    out["mse_term_a"] = float(0.5 * np.mean(np.sum(resid**2, axis=1)))
    out["w_ls"], out["b_ls"] = w_ls, b_ls
    out["w_ls_norm"] = float(np.linalg.norm(w_ls))

    if W is None:
        return out
    W = np.asarray(W, dtype=np.float64)
    b = np.zeros(C) if b is None else np.asarray(b, dtype=np.float64)
    wn = np.linalg.norm(W, axis=1)
    out["nc2_equinorm_classifier"] = _std(wn) / wn.mean()
    cosw = np.array([_cos(W[i], W[j]) for i, j in pairs])
    out["nc2_equiangle_classifier"] = _std(cosw)
    out["nc2_maxangle_classifier"] = float(np.mean(np.abs(cosw + 1 / (C - 1))))
    out["nc2_orthogonality_classifier"] = float(np.mean(np.abs(cosw)))
    out["nc3"] = float(np.sum((W.T / np.linalg.norm(W) - M / np.linalg.norm(M)) ** 2))
    logits = h @ W.T + b
    pred = np.array(classes)[np.argmax(logits, axis=1)]
    out["accuracy"] = float(np.mean(pred == y))
    out["nc4"] = float(np.mean(pred != ncc))
    out["per_class"]["accuracy"] = np.array([np.mean(pred[y == c] == c) for c in classes])
    out["per_class"]["classifier_norm"] = wn
    out["mse_loss"] = float(0.5 * np.mean(np.sum((h @ W.T + b - Y) ** 2, axis=1)))
    out["mse_term_b"] = out["mse_loss"] - out["mse_term_a"]
    out["ls_distance"] = float(np.linalg.norm(W - w_ls) / np.linalg.norm(w_ls))
    out["ls_cosine"] = float(np.sum(W * w_ls) / (np.linalg.norm(W) * np.linalg.norm(w_ls)))
    return out


def reference_against_means(h, y, means, W=None, b=None):
    """NCC accuracy, NC4 and CDNV of features ``h`` (N, p), labels ``y`` against given class ``means`` (C, p) -- the
    training set's (Hui et al. 2022; Galanti et al. 2022): nearest mean by explicit distances, each class's variance
    taken around the given mean, distances between the given means."""
    h = np.asarray(h, dtype=np.float64)
    means = np.asarray(means, dtype=np.float64)
    C = len(means)
    dist = np.stack([np.sum((h - means[k]) ** 2, axis=1) for k in range(C)], axis=1)
    ncc = np.argmin(dist, axis=1)
    var = np.array([np.mean(np.sum((h[y == c] - means[c]) ** 2, axis=1)) for c in range(C)])
    pairs = [(i, j) for i in range(C) for j in range(C) if i != j]
    out = {
        "ncc_accuracy": float(np.mean(ncc == y)),
        "cdnv": float(np.mean([(var[i] + var[j]) / (2 * np.sum((means[i] - means[j]) ** 2)) for i, j in pairs])),
        "per_class_ncc_accuracy": np.array([np.mean(ncc[y == c] == c) for c in range(C)]),
    }
    if W is not None:
        b = np.zeros(C) if b is None else np.asarray(b, dtype=np.float64)
        pred = np.argmax(h @ np.asarray(W, dtype=np.float64).T + b, axis=1)
        out["nc4"] = float(np.mean(pred != ncc))
    return out


def simplex_etf(C: int, p: int, radius: float = 1.0, rng: np.random.Generator | None = None) -> np.ndarray:
    """C points of a simplex ETF of radius ``radius`` in R^p (p >= C), randomly rotated when ``rng`` is given."""
    E = np.eye(C) - 1.0 / C
    E *= radius * np.sqrt(C / (C - 1))
    out = np.zeros((C, p))
    out[:, :C] = E
    if rng is not None:
        q, _ = np.linalg.qr(rng.standard_normal((p, p)))
        out = out @ q
    return out


def planted(C=6, p=12, n=50, sigma=1e-3, radius=1.0, offset=100.0, seed=0, counts=None):
    """Planted features: h = offset + r ETF_y + sigma z; returns (h, y, etf)."""
    rng = np.random.default_rng(seed)
    etf = simplex_etf(C, p, radius, rng)
    counts = [n] * C if counts is None else counts
    y = np.concatenate([np.full(k, c) for c, k in enumerate(counts)])
    h = offset + etf[y] + sigma * rng.standard_normal((len(y), p))
    return h, y, etf


def reference_energy(vectors):
    """Hyperspherical energies of the rows of ``vectors`` on the unit sphere, written plainly: every ordered pair in a
    Python loop, distances from explicit differences (close pairs in 50-digit decimal arithmetic), the Riesz kernel
    (s = p - 2) as exact logs summed with a log-sum-exp over all pairs at once. Returns a dict with ``log_mean``, ``log_variance``, ``riesz_log_mean``,
    ``riesz_log_variance`` (variances with Bessel's correction over the ordered pairs)."""
    from decimal import Decimal, localcontext

    v = np.asarray(vectors, dtype=np.float64)
    u = v / np.linalg.norm(v, axis=1, keepdims=True)
    C, p = u.shape
    s = p - 2

    def distance(i: int, j: int) -> float:
        d = np.sqrt(np.sum((u[i] - u[j]) ** 2))
        if d > 0.05:
            return float(d)
        with localcontext() as ctx:  # a close pair: 50 digits, normalised in decimal arithmetic
            ctx.prec = 50
            a, b = [Decimal(float(t)) for t in v[i]], [Decimal(float(t)) for t in v[j]]
            na, nb = sum(t * t for t in a).sqrt(), sum(t * t for t in b).sqrt()
            return float(sum((x / na - y / nb) ** 2 for x, y in zip(a, b)).sqrt())

    dist = np.array([distance(i, j) for i in range(C) for j in range(C) if i != j])
    log_inv = -np.log(dist)
    logs = s * log_inv  # log(d^-s)
    top = logs.max()
    log_mean = top + np.log(np.sum(np.exp(logs - top))) - np.log(len(logs))
    # variance of d^-s in logs: Var = mean-scaled sum of (x - m)^2 / (n - 1), with x / m = exp(logs - log_mean)
    rel = np.sum((np.exp(logs - log_mean) - 1.0) ** 2) / (len(logs) - 1)
    return {"log_mean": float(np.mean(log_inv)), "log_variance": float(np.var(log_inv, ddof=1)),
            "riesz_log_mean": float(log_mean), "riesz_log_variance": float(2 * log_mean + np.log(rel)) if rel > 0
            else -np.inf, "s": s}


def reference_nc5(h, y, ood):
    """NC5 = mean_c |cos(mu_c, mu_G^OOD)| from raw class means and the OOD rows' mean."""
    h = np.asarray(h, dtype=np.float64)
    g = np.asarray(ood, dtype=np.float64).mean(axis=0)
    values = []
    for c in sorted(set(np.asarray(y).tolist())):
        mu = h[np.asarray(y) == c].mean(axis=0)
        values.append(abs(_cos(mu, g)))
    return float(np.mean(values))


# ---------------------------------------------------------------------------------------------------------------------
# Rule 7: how far each metric moves when the stored features are perturbed by half a rounding unit
# ---------------------------------------------------------------------------------------------------------------------
#: The metrics that carry an uncertainty (``details.uncertainty``); w_ls_norm is ||W_LS||_F.
UNCERTAIN_KEYS = ("nc1", "cdnv", "nc3", "mse_term_a", "mse_term_b", "ls_distance", "ls_cosine", "w_ls_norm")
#: Calibration of the stated uncertainty against the measured spread: within these factors of it...
CALIBRATION = (0.2, 30.0)
#: ... and at most QUIET where the spread is at most STILL (no false alarm on well-posed features).
STILL, QUIET = 1e-7, 1e-5


def svd_metrics(h, y, W, b):
    """The rule-7 metrics of features h (N, p) by SVD, with the spec's cut-offs: least squares by
    ``np.linalg.lstsq`` (LAPACK gelsd) on the centred rows, singular values at or below sqrt(p eps) s_max dropped;
    NC1 through the thin SVD of M, singular values at or below max(p, C) eps s_max dropped (at most C - 1 kept)."""
    h = np.asarray(h, dtype=np.float64)
    n, p = h.shape
    c = W.shape[0]
    eps = np.finfo(float).eps
    counts = np.bincount(y, minlength=c)
    means = np.stack([h[y == k].mean(axis=0) for k in range(c)])
    mu = h.mean(axis=0)
    m = means - (counts / n) @ means  # rows mu_c - mu_G
    u, s, _ = np.linalg.svd(m.T, full_matrices=False)
    keep = min(int(np.sum(s > max(p, c) * eps * s[0])), min(p, c - 1))
    dev = h - means[y]
    sigma_w = dev.T @ dev / n
    whiten = u[:, :keep] / s[:keep]
    var = np.array([np.mean(np.sum(dev[y == k] ** 2, axis=1)) for k in range(c)])
    dist = np.sum((means[:, None] - means[None]) ** 2, axis=-1)
    pairs = ~np.eye(c, dtype=bool)
    with np.errstate(divide="ignore"):  # coinciding class means: an infinite CDNV
        cdnv = float(np.mean(((var[:, None] + var[None]) / (2 * np.where(pairs, dist, 1.0)))[pairs]))
    out = {"nc1": float(np.sum((sigma_w @ whiten) * whiten)), "cdnv": cdnv,
           "nc3": float(np.sum((W / np.linalg.norm(W) - m / np.linalg.norm(m)) ** 2))}
    onehot = np.zeros((n, c))
    onehot[np.arange(n), y] = 1.0
    hc, yc = h - mu, onehot - onehot.mean(axis=0)
    w_ls, _, rank, _ = np.linalg.lstsq(hc, yc, rcond=np.sqrt(p * eps))
    w_ls = w_ls.T
    out["mse_term_a"] = float(0.5 * np.mean(np.sum((hc @ w_ls.T - yc) ** 2, axis=1)))
    out["mse_term_b"] = float(0.5 * np.mean(np.sum((h @ W.T + b - onehot) ** 2, axis=1))) - out["mse_term_a"]
    norm = float(np.linalg.norm(w_ls))
    out["ls_distance"] = float(np.linalg.norm(W - w_ls)) / norm
    out["ls_cosine"] = float(np.sum(W * w_ls)) / (float(np.linalg.norm(W)) * norm)
    out["w_ls_norm"] = norm
    out["rank_sigma_t"], out["rank_sigma_b"] = int(rank), keep
    return out


def perturbed_spread(h, y, W, b, unit, copies=5, seed=0):
    """The measured uncertainty of rule 7. ``copies`` copies of the features, each stored value multiplied by
    (1 + delta) with delta uniform on [-unit/2, unit/2] (half a rounding unit, independently), are solved by
    :func:`svd_metrics`; the spread of a metric is its largest relative deviation from the unperturbed solve,
    max_k |q(h_k) - q(h)| / |q(h)|.

    Returns (unperturbed metrics, {key: spread}, [(rank of Sigma_T, rank of Sigma_B) of each copy]).
    """
    h = np.asarray(h, dtype=np.float64)
    W, b = np.asarray(W, dtype=np.float64), np.asarray(b, dtype=np.float64)
    base = svd_metrics(h, y, W, b)
    rng = np.random.default_rng(seed)
    spread = dict.fromkeys(UNCERTAIN_KEYS, 0.0)
    ranks = []
    for _ in range(copies):
        q = svd_metrics(h * (1.0 + rng.uniform(-unit / 2, unit / 2, h.shape)), y, W, b)
        ranks.append((q["rank_sigma_t"], q["rank_sigma_b"]))
        for key in UNCERTAIN_KEYS:
            change = abs(q[key] - base[key])
            spread[key] = max(spread[key], change / abs(base[key]) if base[key] != 0 else (np.inf if change else 0.0))
    return base, spread, ranks


def calibrated(stated, measured):
    """Whether a stated relative uncertainty is calibrated against the measured spread: within CALIBRATION of it
    (or both at least 1: neither the value's first digit is determined, where a ratio means nothing), and at most
    QUIET where the spread is at most STILL."""
    if stated is None or not np.isfinite(measured):
        return False
    if measured <= STILL and stated > QUIET:
        return False
    if measured >= 1.0 and stated >= 1.0:
        return True
    if measured == 0:
        return stated <= QUIET
    return CALIBRATION[0] <= stated / measured <= CALIBRATION[1]
