"""Every metric and detail assembled from the statistics and the decisions: closed forms, least squares,
sample metrics, per class and per layer."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from ncaudit import metrics
from ncaudit.audit._options import AuditOptions
from ncaudit.audit._passes import REFINE_ABOVE
from ncaudit.audit._result import _finite
from ncaudit.audit._state import _Closed, _Selection, _Setup, _unit_rows
from ncaudit.stats import Decisions, Statistics


def _sample_metrics(m: dict[str, float | None], details: dict[str, Any], decisions: Decisions, n: int) -> None:
    """Accuracy, NC4, NCC accuracy and the check of the MSE closed forms against the direct evaluation."""
    if decisions.correct is not None:
        m["accuracy"] = float(decisions.correct.sum()) / n
        m["nc4"] = float(decisions.disagree) / n
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


def _run_details(setup: _Setup, sel: _Selection, options: AuditOptions, device: torch.device,
                 closed: _Closed) -> dict[str, Any]:
    info = setup.info
    ls = closed.ls
    return {
        "feature_dtype": info.feature_dtype,
        "gemm_dtype": {
            "statistics": sel.stats.gemm_dtype,
            "decisions": str(setup.gemm).replace("torch.", ""),
            "refinement": "float64" if ls is not None and ls.steps else None,
        },
        "device": str(device),
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
                 options: AuditOptions) -> _Closed:
    """Every metric that is a closed form of the statistics (and W, b), the least-squares classifier and an estimate
    of its error."""
    centred = stats.centred_means
    basis = metrics.means_basis(centred)
    pairs = metrics.pair_geometry(centred, variances=stats.variances)  # one blocked pass per set of vectors
    m: dict[str, float | None] = {
        "nc1": metrics.nc1(stats.sigma_w, basis),
        "cdnv": pairs.cdnv,
        "nc2_equinorm_means": metrics.equinorm(centred),
        "nc2_equiangle_means": pairs.equiangle,
        "nc2_maxangle_means": pairs.maxangle,
        "nc2_orthogonality_means": metrics.orthogonality(stats.means),
    }
    details: dict[str, Any] = {
        "rank_sigma_b": basis.rank,
        "rank_sigma_b_max": min(stats.n_features, stats.n_classes - 1),
        "sigma_b_cutoff": basis.cutoff,
        "ridge": options.ridge,
        "rcond": options.rcond,
    }
    closed = _Closed(m, details, basis)
    # W_LS and term (A) are functions of the features and labels alone: computed with or without a classifier.
    closed.ls = ls = metrics.least_squares(stats, options.ridge, options.rcond, basis)
    closed.basis = dataclasses.replace(basis, vt=None)  # V^T (r x C) served the solve; keep U and S only
    m["mse_term_a"] = metrics.ls_loss(stats, ls)
    closed.estimate = metrics.ls_error_estimate(stats, None, ls, m["mse_term_a"], None)
    if weight is not None and bias is not None:
        loss = metrics.mse_loss(stats, weight, bias)
        m["mse_term_b"] = metrics.mse_term_b(stats, weight, bias, ls, loss=loss)
        closed.estimate = metrics.ls_error_estimate(stats, weight, ls, m["mse_term_a"], m["mse_term_b"])
        rows = metrics.pair_geometry(weight)
        m.update({
            "nc2_equinorm_classifier": metrics.equinorm(weight),
            "nc2_equiangle_classifier": rows.equiangle,
            "nc2_maxangle_classifier": rows.maxangle,
            "nc2_orthogonality_classifier": rows.orthogonality,
            "nc3": metrics.nc3(weight, centred),
            "mse_loss": loss,
        })
    return closed


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


def _per_class(stats: Statistics, weight: np.ndarray | None, dec: Any, keep: np.ndarray,
               names: Sequence[str] | None) -> list[dict[str, Any]]:
    counts = stats.counts
    mean_norm = np.linalg.norm(stats.centred_means, axis=1)
    w_norm = np.linalg.norm(weight, axis=1) if weight is not None else None
    nc1_c = dec.whitened_scatter / np.maximum(counts, 1)
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
            "nc1": _finite(nc1_c[i]),
            "accuracy": None if dec.correct is None else float(dec.correct[i]) / counts[i],
            "ncc_accuracy": float(dec.ncc_correct[i]) / counts[i],
        })
        rows.append(row)
    return rows


def _layer_block(stats: Statistics, basis: metrics.MeansBasis, dec: Decisions) -> dict[str, Any]:
    centred = stats.centred_means
    return {
        "n_features": stats.n_features,
        "nc1": _finite(metrics.nc1(stats.sigma_w, basis)),
        "cdnv": _finite(metrics.cdnv(stats.variances, stats.means)),
        "nc2_equinorm_means": _finite(metrics.equinorm(centred)),
        "nc2_equiangle_means": _finite(metrics.equiangle(centred)),
        "ncc_accuracy": float(dec.ncc_correct.sum()) / stats.n_samples,
        "rank_sigma_b": basis.rank,
    }
