"""Every number with the digits its features determine (spec rule 7): ``details.uncertainty`` and its warnings."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ncaudit import metrics
from ncaudit.audit._plan import FULL, Plan
from ncaudit.audit._state import _Closed, _Selection
from ncaudit.cache import CacheInfo

#: The metrics that carry an uncertainty, in ``details.uncertainty`` (``w_ls_norm`` is ||W_LS||_F,
#: ``details.w_ls_norm``).
UNCERTAIN_KEYS: tuple[str, ...] = ("nc1", "cdnv", "nc3", "mse_term_a", "mse_term_b", "ls_distance", "ls_cosine",
                                   "w_ls_norm")
#: Relative uncertainties are capped here so that JSON (which has no infinity) keeps them as numbers.
CAP = 1e300


def _uncertainty(closed: _Closed, sel: _Selection, info: CacheInfo, plan: Plan = FULL) -> None:
    """``details.uncertainty`` = {metric key: relative uncertainty} and ``details.uncertainty_model`` (the rounding
    unit, the candidate ranks, the noise ratio and the ridge that would make the least squares well posed); with a
    plan of chosen metrics, for those of them that carry one (and ``w_ls_norm`` with the least squares)."""
    stats, m, details = sel.stats, closed.metrics, closed.details
    unit = metrics.rounding_unit(info.feature_dtype, info.attrs.get("precision"))
    noise: metrics.Rounding | None = None

    def rounding() -> metrics.Rounding:
        nonlocal noise
        noise = metrics.rounding(stats, unit) if noise is None else noise
        return noise

    out: dict[str, float] = {}
    model: dict[str, Any] = {"rounding_unit": unit, "probes": metrics.UNCERTAINTY_PROBES}
    nc1 = m.get("nc1")
    if nc1 is not None and math.isfinite(nc1) and closed.basis is not None:
        out["nc1"], rank_b = metrics.nc1_uncertainty(stats, closed.basis, rounding(), nc1)
        model["rank_sigma_b_range"] = list(rank_b)
    cdnv = m.get("cdnv")
    if cdnv is not None and math.isfinite(cdnv):
        out["cdnv"] = metrics.cdnv_uncertainty(stats, rounding(), cdnv)
    # W_LS and term (A) need no classifier; without one, W = 0 stands in and only A and ||W_LS|| are kept
    has_w = sel.weight is not None and sel.bias is not None
    nc3 = m.get("nc3")
    if has_w and nc3 is not None and math.isfinite(nc3):
        out["nc3"] = metrics.nc3_uncertainty(stats, sel.weight, rounding(), nc3)
    ls = closed.ls
    if ls is not None:
        weight = sel.weight if has_w else np.zeros_like(ls.weight)
        bias = sel.bias if has_w else np.zeros(ls.weight.shape[0])
        term_a = m["mse_term_a"]
        loss = m["mse_loss"] if has_w else term_a
        fixed, spread = metrics.ls_arithmetic(stats, weight, ls, loss=loss, term_a=term_a)
        if ls.steps:
            # Refinement measured the error on the samples: W_LS is now within its last correction (relative) of the
            # exact solve, which each quantity feels as the first-order model's ratio of its error to ||W_LS||'s.
            norm = fixed["w_ls_norm"]
            scale = (ls.correction or 0.0) / norm if 0 < norm < math.inf else None
            fixed = {k: v * scale if scale is not None else (ls.correction or 0.0) for k, v in fixed.items()}
        arithmetic = {k: fixed[k] + spread[k] for k in metrics.LS_KEYS}
        res = metrics.ls_uncertainty(stats, weight, bias, ls, rounding(), loss=loss, term_a=term_a,
                                     arithmetic=arithmetic)
        out.update({k: res.relative[k] for k in (metrics.LS_KEYS if has_w else ("mse_term_a", "w_ls_norm"))})
        model.update({"rank_sigma_t_range": list(res.rank_range), "noise_ratio": res.noise_ratio,
                      "suggested_ridge": res.ridge, "arithmetic": max(_finite(arithmetic.values()), default=0.0)})
    details["uncertainty"] = {k: min(out[k], CAP) if not math.isnan(out[k]) else None
                              for k in UNCERTAIN_KEYS if k in out and (plan.wants(k) or k == "w_ls_norm")}
    details["uncertainty_model"] = model


def _finite(values: Any) -> list[float]:
    return [v for v in values if math.isfinite(v)]


def _describe(key: str, value: float | None, uncertainty: float) -> str:
    if uncertainty >= 1:
        return f"{key} = {'null' if value is None else format(value, '.4g')} (undetermined)"
    return f"{key} = {'null' if value is None else format(value, '.4g')} (±{100 * uncertainty:.2g}%)"


def _uncertainty_warnings(closed: _Closed, sel: _Selection, info: CacheInfo) -> list[str]:
    """One warning for the least-squares family when an uncertainty exceeds WARN_ABOVE (its cause and the fix: a
    ridge computed from the spectrum, more samples, a float32 cache), one for NC1 / CDNV / NC3."""
    unc = closed.details.get("uncertainty") or {}
    model = closed.details.get("uncertainty_model") or {}
    m, out = closed.metrics, []
    above = metrics.UNCERTAINTY_WARN_ABOVE
    unit = model.get("rounding_unit", 2.0**-24)
    low = unit > 2.0**-24
    ls_bad = {k: v for k, v in unc.items() if k in metrics.LS_KEYS and v is not None and v > above}
    if ls_bad:
        value = closed.details.get("w_ls_norm") if "w_ls_norm" in ls_bad else None
        named = ", ".join(_describe(k, value if k == "w_ls_norm" else m.get(k), v) for k, v in ls_bad.items())
        causes, fixes = [], []
        rank = closed.details.get("rank_sigma_t")
        lo, hi = model.get("rank_sigma_t_range", [rank, rank])
        if lo != hi:
            causes.append(f"Sigma_T has no spectral gap at its cut-off (the rank is anywhere in {lo}..{hi})")
        n, p = sel.stats.n_samples, sel.stats.n_features
        if n <= p:
            causes.append(f"N = {n} <= p = {p}")
        if low:
            causes.append(f"the features carry {_precision_name(unit)} rounding")
        if not causes:
            causes.append(f"some directions of Sigma_T are at the level of the features' rounding noise (noise / "
                          f"eigenvalue up to {model.get('noise_ratio', 0.0):.2g})")
        ridge = model.get("suggested_ridge") or 0.0
        if ridge > 0:
            fixes.append(f"--ridge {ridge:g} (from the spectrum: it makes every direction well posed)")
        if n <= p or lo != hi:
            fixes.append("more samples")
        if low:
            fixes.append("a float32 cache (extract with " + ("--store-dtype float32)" if info.feature_dtype == "float16"
                                                             else "--precision fp32)"))
        out.append(f"the features' rounding leaves the least-squares family uncertain: {named}; cause: "
                   f"{', '.join(causes)}; fix: {' or '.join(fixes) or 'more samples'}")
    other = {k: v for k, v in unc.items() if k in ("nc1", "cdnv", "nc3") and v is not None and v > above}
    if other:
        named = ", ".join(_describe(k, m.get(k), v) for k, v in other.items())
        lo, hi = model.get("rank_sigma_b_range", [None, None])
        cause = (f"Sigma_B's rank is not determined ({lo}..{hi}: some class means coincide up to rounding)"
                 if lo != hi else f"the features carry {_precision_name(unit)} rounding" if low
                 else "the class means are within rounding of each other")
        out.append(f"the features' rounding leaves collapse metrics uncertain: {named}; cause: {cause}")
    return out


def _precision_name(unit: float) -> str:
    return {2.0**-8: "bfloat16", 2.0**-11: "float16", 2.0**-24: "float32"}.get(unit, f"{unit:.2g}-relative")
