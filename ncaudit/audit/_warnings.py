"""What the reader must be told: coverage, rounding-dominated NC1, rank deficiency, and the self-checks."""

from __future__ import annotations

import math
from typing import Any

from ncaudit.audit._closed import _rel
from ncaudit.audit._passes import CONVERGED_BELOW
from ncaudit.audit._source import SourceInfo
from ncaudit.audit._state import _Closed, _Selection

#: A measured nc1 within this factor of the precision floor measures rounding, not collapse.
FLOOR_WARNING_FACTOR = 3.0


#: Internal identities (closed form vs direct loss, A + B = L, per-class NC1 sum) must hold to this (relative).
SELF_CHECK_RTOL = 1e-6


def _warnings(closed: _Closed, sel: _Selection, info: SourceInfo, per_class: list[dict[str, Any]]) -> list[str]:
    """What the reader must know: a partial read or single-sample classes, rounding-dominated NC1, rank deficiency,
    dropped classes, and every internal identity that does not hold to SELF_CHECK_RTOL (with its likely cause)."""
    m, basis, p = closed.metrics, closed.basis, info.n_features
    warnings: list[str] = _coverage_warnings(sel, info)
    floor, nc1 = m.get("nc1_precision_floor"), m.get("nc1")
    if floor is not None and nc1 is not None and math.isfinite(nc1) and nc1 <= FLOOR_WARNING_FACTOR * floor:
        warnings.append(f"nc1 = {nc1:.3g} is within {FLOOR_WARNING_FACTOR:g}x of the extraction precision floor "
                        f"{floor:.3g}: it measures rounding, not collapse; re-extract with --precision fp32")
    c = len(sel.keep)
    if basis is not None and basis.rank < min(p, c - 1):
        warnings.append(f"Sigma_B has rank {basis.rank} < min(p, C-1) = {min(p, c - 1)}: some class means "
                        "coincide or are collinear, NC1 uses the rank found")
    if sel.dropped:
        shown = f"{sel.dropped[:20]}{' ...' if len(sel.dropped) > 20 else ''}"
        warnings.append(f"dropped {len(sel.dropped)} empty class(es): {shown}")
    warnings += _self_check_warnings(closed, sel, per_class)
    return warnings


def _coverage_warnings(sel: _Selection, info: SourceInfo) -> list[str]:
    """What the rows cannot show: a partial read (maybe only the first classes), classes of a single sample."""
    warnings: list[str] = []
    if not info.complete:
        warnings.append(f"partial cache: {info.n_samples} of {info.n_rows} rows read (complete=false), holding "
                        f"{len(sel.keep)} of {info.num_classes} classes; extraction writes in dataset order, often "
                        "class by class, so these metrics describe the rows written so far only (finish the file "
                        "with `ncaudit extract --resume`)")
    single = sel.keep[sel.stats.counts == 1]
    if single.size == len(sel.keep):
        warnings.append("every class has a single sample: within-class variability is zero by construction, so nc1 "
                        "= 0, cdnv and the per-class nc1 say nothing about collapse; audit several samples per class")
    elif single.size:
        shown = ", ".join(str(int(c)) for c in single[:10]) + (", ..." if single.size > 10 else "")
        warnings.append(f"{single.size} class(es) have a single sample ({shown}): their within-class variance is zero "
                        "by construction, which pulls nc1 and cdnv down; audit several samples per class")
    return warnings


def _self_check_warnings(closed: _Closed, sel: _Selection, per_class: list[dict[str, Any]]) -> list[str]:
    """Identities the report computes two ways; a disagreement above SELF_CHECK_RTOL is a warning naming its cause."""
    m, out = closed.metrics, []
    check = closed.details.get("mse_check")
    if check is not None:
        direct, closed_form, a_plus_b = check["direct"], check["closed_form"], check["term_a_plus_b"]
        if _rel(closed_form, direct) > SELF_CHECK_RTOL:
            out.append(f"self-check: the MSE loss from the statistics ({closed_form:.10g}) differs from the loss "
                       f"evaluated sample by sample ({direct:.10g}) by {_rel(closed_form, direct):.2g} (relative): "
                       "Sigma_W or the class means do not describe the rows (float16 rounding of the cache, or "
                       "rows that changed between the passes); mse_loss, terms A and B are uncertain to that level")
        if _rel(a_plus_b, closed_form) > SELF_CHECK_RTOL:
            out.append(f"self-check: term (A) + term (B) = {a_plus_b:.10g} but L(W, b) = {closed_form:.10g} "
                       f"({_rel(a_plus_b, closed_form):.2g} relative): Sigma_T is not resolved where the "
                       "least-squares classifier needs it (estimated error "
                       f"{closed.estimate:.2g}); terms A and B do not add up")
    ls = closed.ls
    if ls is not None and ls.steps and (ls.correction or 0.0) > CONVERGED_BELOW:
        out.append(f"self-check: the least-squares classifier changed by {ls.correction:.2g} (relative) in its last "
                   f"refinement step ({ls.steps} steps): terms A and B, ls_distance and ls_cosine are uncertain to "
                   "about that level (Sigma_T is nearly singular; a --ridge would stabilise it)")
    nc1 = m.get("nc1")
    if nc1 is not None and math.isfinite(nc1) and nc1 > 0 and per_class and per_class[0].get("nc1") is not None:
        weighted = float(sum(p * (row["nc1"] or 0.0) for p, row in zip(sel.stats.priors, per_class)))
        if _rel(weighted, nc1) > SELF_CHECK_RTOL:
            out.append(f"self-check: the pi-weighted per-class NC1 ({weighted:.10g}) differs from NC1 ({nc1:.10g}) by "
                       f"{_rel(weighted, nc1):.2g} (relative): the second pass's per-class projection lost precision "
                       "(float16 cache or extreme collapse); per-class nc1 values are uncertain to that level")
    return out
