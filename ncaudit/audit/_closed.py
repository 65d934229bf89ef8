"""Every metric and detail assembled from the statistics and the decisions: closed forms, least squares,
sample metrics, per class and per layer."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from ncaudit import metrics
from ncaudit.audit._options import AuditOptions
from ncaudit.audit._passes import REFINE_ABOVE
from ncaudit.audit._plan import FULL, Plan
from ncaudit.audit._result import _finite
from ncaudit.audit._state import _Closed, _Selection, _Setup, _unit_rows
from ncaudit.stats import Decisions, Statistics

if TYPE_CHECKING:
    import torch


def _sample_metrics(m: dict[str, float | None], details: dict[str, Any], decisions: Decisions, n: int) -> None:
    """Accuracy, NC4, NCC accuracy and the check of the MSE closed forms against the direct evaluation (when the
    least-squares terms were computed)."""
    if decisions.correct is not None:
        m["accuracy"] = float(decisions.correct.sum()) / n
        m["nc4"] = float(decisions.disagree) / n
    if decisions.correct is not None and "mse_term_b" in m:  # the least squares were computed with the classifier
        direct = 0.5 * float(decisions.squared_error) / n
        a_plus_b = m["mse_term_a"] + m["mse_term_b"]
        details["mse_check"] = {
            "direct": direct,
            "closed_form": m["mse_loss"],
            "term_a_plus_b": a_plus_b,
            "relative_discrepancy": _rel(a_plus_b, direct),
        }
    m["ncc_accuracy"] = float(decisions.ncc_correct.sum()) / n


def _precision_floor(reference: tuple[np.ndarray, np.ndarray, np.ndarray] | None, basis: metrics.MeansBasis,
                     options: AuditOptions, details: dict[str, Any]) -> float | None:
    """NC1 of the deviations of the stored rows from their float32 recomputation (None without reference rows)."""
    if reference is None or basis.rank == 0:
        return None
    _, stored, ref = reference
    a, b = stored.astype(np.float64), ref.astype(np.float64)
    if options.normalize:
        a, b = _unit_rows(a), _unit_rows(b)
    details["precision_floor_rows"] = int(len(a))
    return metrics.nc1_of_deviations(a - b, basis)


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), np.finfo(float).tiny)


def _run_details(setup: _Setup, sel: _Selection, options: AuditOptions, device: torch.device | None,
                 closed: _Closed, plan: Plan = FULL) -> dict[str, Any]:
    info = setup.info
    ls = closed.ls
    return {
        "feature_dtype": str(info.feature_dtype),
        "gemm_dtype": {
            "statistics": sel.stats.gemm_dtype,
            "decisions": str(setup.gemm).replace("torch.", "") if plan.decisions else None,
            "refinement": "float64" if ls is not None and ls.steps else None,
        },
        "device": "cpu" if device is None else str(device),  # None: the host, without torch
        "batch_size": options.batch_size,
        "normalized": options.normalize,
        "has_classifier": sel.weight is not None,
        "has_bias": bool(info.has_bias) and not options.normalize,
        "complete": info.complete,
        "partial": None if info.complete else {"rows": info.n_samples, "of": info.n_rows},
        "dropped_classes": sel.dropped,
        "classes": [int(c) for c in sel.keep],
    }


def _closed_form(stats: Statistics, weight: np.ndarray | None, bias: np.ndarray | None,
                 options: AuditOptions, plan: Plan = FULL) -> _Closed:
    """Every metric that is a closed form of the statistics (and W, b), the least-squares classifier and an estimate
    of its error; with a ``plan`` of chosen metrics, only the closed forms they read (:mod:`~ncaudit.audit._plan`)."""
    centred = stats.centred_means
    basis = metrics.means_basis(centred) if plan.basis else None
    m: dict[str, float | None] = {}
    if basis is not None and plan.wants("nc1"):
        m["nc1"] = metrics.nc1(stats.sigma_w, basis)
    # One blocked pass per set of vectors: cosines, CDNV and the hyperspherical energies from the same Gram blocks.
    pairs = metrics.pair_geometry(centred, variances=stats.variances, energy=plan.mean_energy) \
        if plan.mean_pairs else None
    if pairs is not None:
        m.update({"cdnv": pairs.cdnv, "nc2_equiangle_means": pairs.equiangle, "nc2_maxangle_means": pairs.maxangle})
    if plan.wants("nc2_equinorm_means"):
        m["nc2_equinorm_means"] = metrics.equinorm(centred)
    if plan.wants("nc2_orthogonality_means"):
        m["nc2_orthogonality_means"] = metrics.orthogonality(stats.means)
    details: dict[str, Any] = {}
    if basis is not None:
        details.update({
            "rank_sigma_b": basis.rank,
            "rank_sigma_b_max": min(stats.n_features, stats.n_classes - 1),
            "sigma_b_cutoff": basis.cutoff,
        })
    details.update({"ridge": options.ridge, "rcond": options.rcond})
    if pairs is not None:
        _energy_metrics(m, details, pairs.energy, "means")
    closed = _Closed(m, details, basis)
    if basis is not None:
        # W_LS and term (A) are functions of the features and labels alone: computed with or without a classifier.
        closed.ls = metrics.least_squares(stats, options.ridge, options.rcond, basis) if plan.least_squares else None
        closed.basis = dataclasses.replace(basis, vt=None)  # V^T (r x C) served the solve; keep U and S only
    ls = closed.ls
    if ls is not None:
        m["mse_term_a"] = metrics.ls_loss(stats, ls)
        closed.estimate = metrics.ls_error_estimate(stats, None, ls, m["mse_term_a"], None)
    if weight is not None and bias is not None:
        loss = metrics.mse_loss(stats, weight, bias) if plan.mse_loss else None
        if ls is not None:
            m["mse_term_b"] = metrics.mse_term_b(stats, weight, bias, ls, loss=loss)
            closed.estimate = metrics.ls_error_estimate(stats, weight, ls, m["mse_term_a"], m["mse_term_b"])
        rows = metrics.pair_geometry(weight, energy=plan.classifier_energy) if plan.classifier_pairs else None
        if rows is not None:
            _energy_metrics(m, details, rows.energy, "classifier")
            m.update({
                "nc2_equiangle_classifier": rows.equiangle,
                "nc2_maxangle_classifier": rows.maxangle,
                "nc2_orthogonality_classifier": rows.orthogonality,
            })
        if plan.wants("nc2_equinorm_classifier"):
            m["nc2_equinorm_classifier"] = metrics.equinorm(weight)
        if plan.wants("nc3"):
            m["nc3"] = metrics.nc3(weight, centred)
        if loss is not None:
            m["mse_loss"] = loss
    return closed


def _energy_metrics(m: dict[str, float | None], details: dict[str, Any], energy: metrics.Energy | None,
                    which: str) -> None:
    """``energy_log_<which>`` and ``energy_riesz_<which>`` (Liu et al. 2023); their variances, the Riesz energy's
    logarithm (known where the energy itself is beyond float64) and s = p - 2 under ``details["energy"]``."""
    if energy is None:
        return
    m[f"energy_log_{which}"] = energy.log_mean
    m[f"energy_riesz_{which}"] = energy.riesz_mean
    block = details.setdefault("energy", {"riesz_s": energy.s})
    block[f"energy_log_{which}"] = {"variance": energy.log_variance}
    block[f"energy_riesz_{which}"] = {"variance": energy.riesz_variance, "log_mean": energy.riesz_log_mean,
                                      "log_variance": energy.riesz_log_variance}


def _least_squares_metrics(closed: _Closed, sel: _Selection) -> None:
    """Terms A and B once refinement has moved W_LS, distance and cosine to W_LS, and the least-squares details."""
    ls, stats, m, details = closed.ls, sel.stats, closed.metrics, closed.details
    if ls is None:
        return
    has_classifier = sel.weight is not None and sel.bias is not None
    if ls.steps:  # refinement measured L(W_LS) on the samples: the closed-form terms gave way to the measured ones
        m["mse_term_a"] = metrics.ls_loss(stats, ls)
        if has_classifier:
            m["mse_term_b"] = metrics.mse_term_b(stats, sel.weight, sel.bias, ls, loss=m["mse_loss"])
    if has_classifier:  # term (B), the distance and the cosine compare W with W_LS
        m.update({
            "ls_distance": metrics.ls_distance(sel.weight, ls),
            "ls_cosine": metrics.ls_cosine(sel.weight, ls),
        })
    details.update({
        "rank_sigma_t": ls.rank,
        "sigma_t_cutoff": ls.cutoff,
        "sigma_t_lambda_max": ls.pinv.lambda_max,
        "sigma_t_error_bound": stats.error_bound,
        "w_ls_norm": float(np.linalg.norm(ls.weight)),
        "least_squares": {
            "error_estimate": closed.estimate,
            "refine_above": REFINE_ABOVE,
            "refinement_steps": ls.steps,
            "last_correction": ls.correction,
            "dominant_between_directions": int(ls.pinv.top.shape[1]),
        },
    })


def _per_class(stats: Statistics, weight: np.ndarray | None, dec: Decisions | None, keep: np.ndarray,
               names: Sequence[str] | None, plan: Plan = FULL) -> list[dict[str, Any]]:
    """One row per class; the sample-level entries (per-class NC1, accuracies) are None before pass 2. With a plan of
    chosen metrics, those entries are present only for the chosen metrics pass 2 computed."""
    counts = stats.counts
    mean_norm = np.linalg.norm(stats.centred_means, axis=1)
    w_norm = np.linalg.norm(weight, axis=1) if weight is not None else None
    nc1_c = None if dec is None or not plan.per_class_nc1 else dec.whitened_scatter / np.maximum(counts, 1)
    sample = ("nc1", "accuracy", "ncc_accuracy") if plan.full else tuple(
        k for k, computed in (("nc1", nc1_c is not None), ("accuracy", plan.classifier_decisions),
                              ("ncc_accuracy", plan.decisions)) if computed and plan.wants(k) and dec is not None)
    rows = []
    for i, c in enumerate(keep):
        row: dict[str, Any] = {"class": int(c)}
        if names is not None:
            row["name"] = names[int(c)]
        row.update({
            "count": int(counts[i]),
            "mean_norm": _finite(mean_norm[i]),
            "classifier_norm": None if w_norm is None else _finite(w_norm[i]),
            "variance": _finite(stats.variances[i]),
        })
        values = {
            "nc1": None if nc1_c is None else _finite(nc1_c[i]),
            "accuracy": None if dec is None or dec.correct is None else float(dec.correct[i]) / counts[i],
            "ncc_accuracy": None if dec is None else float(dec.ncc_correct[i]) / counts[i],
        }
        row.update({k: values[k] for k in sample})
        rows.append(row)
    return rows


#: The per-layer metrics (besides ``n_features`` and ``rank_sigma_b``).
LAYER_METRICS = ("nc1", "cdnv", "nc2_equinorm_means", "nc2_equiangle_means", "ncc_accuracy")


def _layer_block(stats: Statistics, basis: metrics.MeansBasis, dec: Decisions | None,
                 plan: Plan = FULL) -> dict[str, Any]:
    """A layer's NC1, CDNV, NC2 of the means and NCC accuracy (with a plan, the chosen ones among them)."""
    centred = stats.centred_means
    values = {
        "nc1": lambda: _finite(metrics.nc1(stats.sigma_w, basis)),
        "cdnv": lambda: _finite(metrics.cdnv(stats.variances, stats.means)),
        "nc2_equinorm_means": lambda: _finite(metrics.equinorm(centred)),
        "nc2_equiangle_means": lambda: _finite(metrics.equiangle(centred)),
        "ncc_accuracy": lambda: None if dec is None else float(dec.ncc_correct.sum()) / stats.n_samples,
    }
    return {"n_features": stats.n_features, **{k: f() for k, f in values.items() if plan.wants(k)},
            "rank_sigma_b": basis.rank}
