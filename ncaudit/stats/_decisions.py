"""The second pass: classifier and nearest-class-mean decisions, per-class NC1 traces and the direct MSE."""

from __future__ import annotations

import numpy as np
import torch

from ncaudit import _device
from ncaudit.stats._gemm import Workspace, mm
from ncaudit.stats._host import HostDecider, decision_tables, decisions_from_state, host_decider
from ncaudit.stats._results import Decisions
from ncaudit.stats._state import _Sums


class SampleDecisions(_Sums):
    """Second streaming pass: classifier and nearest-class-mean decisions, per-class NC1 and the direct MSE.

    The class means, the classifier and the whitener U S^-1 of Sigma_B are fixed (from the first pass). One GEMM per
    batch scores both decision rules against the columns [mu_c - mu_G | w_c]; nothing is p x p per class, and nothing
    is C x C beyond a memory budget (large C: per-label constants are formed for the labels of each batch only, and
    batches are processed in row chunks that keep the (rows x 2C) score block within the budget).

    Parameters
    ----------
    means : ndarray of shape (C, p)
        mu_c.
    global_mean : ndarray of shape (p,)
        mu_G.
    weight, bias : ndarray of shape (C, p) and (C,), or None
        The classifier (``bias`` None means zero).
    whitener : ndarray of shape (p, r)
        U S^-1 from :func:`ncaudit.metrics.means_basis`.
    device, gemm_dtype, normalize
        As for :class:`ClassStatistics` (here float32 is the default choice for float16 / float32 features).
    per_class
        Also accumulate the per-class NC1 sums (the per-class block of the report).
    anchors : ndarray of shape (C, p), optional
        A sample of each class (:attr:`Statistics.anchors`); used with float32 GEMMs on float32 / float16 features.
    memory_budget
        Bytes for per-label tables and score blocks (default 128 MiB).

    Notes
    -----
    Scores are s_c = (h - mu_G)^T (mu_c - mu_G) - 1/2 ||mu_c - mu_G||^2 for the nearest class mean (never raw
    ||h||^2) and (h - mu_G)^T w_c + (w_c^T mu_G + b_c) for the classifier.

    With float32 GEMMs and ``anchors``, rows are centred on the anchor a_y of their own class instead of mu_G: the GEMM
    then multiplies within-class-sized numbers, and a float64 constant per (label, class) restores the same scores,
    s = (h - a_y)^T [M | W] + ((a_y - mu_G)^T [M | W] + const). Without anchors (or with float64 features, or
    normalised ones) rows are centred on mu_G in float64.

    The per-class NC1 projects h - mu_y (float64) on the whitener U S^-1 in float64: a float32 projection, or one
    recovered from the scores through U = M V S^-1, carries relative errors of ~u_32 p cond(M), 1e-4 and more on
    real features.

    A float32-scored row whose top-two margin is within the GEMM's worst-case rounding bound is decided again in
    float64, so every decision equals the float64 one. A classifier (or class means) so large that float32 scores
    could overflow for features within the first pass's bound is scored in float64 throughout (decided once, here).

    With float64 GEMMs the update never waits for the device (counts are scatter-adds, no boolean indexing); the
    float32 path's close-call recheck gathers a data-dependent set of rows, a host synchronisation per batch (and the
    large-C anchored path a ``unique`` of the labels), which is why the in-memory audit decides in float64 on CUDA.
    """

    #: The tensors that make up the state (all sums: merging adds them).
    STATE: tuple[str, ...] = ("count", "correct", "ncc_correct", "disagree", "squared_error", "whitened_scatter")

    def __init__(
        self,
        means: np.ndarray,
        global_mean: np.ndarray,
        weight: np.ndarray | None,
        bias: np.ndarray | None,
        whitener: np.ndarray,
        *,
        device: str | torch.device = "cpu",
        gemm_dtype: torch.dtype = torch.float64,
        normalize: bool = False,
        per_class: bool = True,
        anchors: np.ndarray | None = None,
        memory_budget: int = 128 << 20,
    ) -> None:
        self.device = torch.device(device)
        self.normalize = normalize
        self.per_class = per_class
        f64 = dict(dtype=torch.float64, device=self.device)
        tables = decision_tables(means, global_mean, weight, bias, gemm=str(gemm_dtype).replace("torch.", ""),
                                 normalize=normalize, anchors=anchors, memory_budget=memory_budget)
        self.gemm_dtype = gemm_dtype = getattr(torch, tables.gemm)  # float64 where float32 scores could overflow
        self.has_classifier = weight is not None
        self.num_classes, self.num_features = np.shape(means)
        ncols = tables.rows64.shape[1]
        # Rows per chunk: the float64 score block (rows x ncols) and its float32 twin stay within the budget.
        self._chunk = max(16, memory_budget // (16 * max(ncols, 1)))
        self.anchored = tables.anchors64 is not None
        self._workspace = Workspace(self.device)
        self._host: HostDecider | None = None
        if self.device.type == "cpu" and _device.HOST_NUMPY:  # NumPy per batch on the CPU (ncaudit.stats._host)
            self._host = host_decider(tables, means, global_mean, whitener, per_class=per_class, normalize=normalize,
                                      has_classifier=self.has_classifier)
            self._label_table = tables.label_table  # the decider's own (NumPy), or None beyond the budget
        else:
            self.means = torch.as_tensor(means, **f64)
            self.global_mean = torch.as_tensor(global_mean, **f64)
            self._rows64 = torch.as_tensor(tables.rows64, **f64)  # [M | W^T], (p, C or 2C)
            self._const = torch.as_tensor(tables.const, **f64)
            self._col_norm = torch.as_tensor(tables.col_norm, **f64)
            self._rows = self._rows64.to(gemm_dtype)
            self._white = torch.as_tensor(whitener, **f64)
            if self.anchored:  # samples of float32 / float16 features: exact in float32
                self._anchors = torch.as_tensor(tables.anchors64, dtype=torch.float32, device=self.device)
            self._label_table = None if tables.label_table is None else torch.as_tensor(tables.label_table, **f64)
        del tables
        self.reset()

    def _label_constants(self, labels: torch.Tensor) -> torch.Tensor:
        """Per-label float64 score constants (a_y - mu_G)^T [M | W] + const, shape (k, ncols), for ``labels`` (k,)."""
        return (self._anchors[labels].to(torch.float64) - self.global_mean) @ self._rows64 + self._const

    def reset(self) -> None:
        c, dev = self.num_classes, self.device
        self.count = torch.zeros(c, dtype=torch.int64, device=dev)
        self.correct = torch.zeros(c, dtype=torch.int64, device=dev)
        self.ncc_correct = torch.zeros(c, dtype=torch.int64, device=dev)
        self.disagree = torch.zeros((), dtype=torch.int64, device=dev)
        self.squared_error = torch.zeros((), dtype=torch.float64, device=dev)
        self.whitened_scatter = torch.zeros(c, dtype=torch.float64, device=dev)

    def _argmax(self, scores: torch.Tensor, h: torch.Tensor, row_norm: torch.Tensor | None,
                block: slice) -> torch.Tensor:
        """argmax over one block of score columns, exact to the float64 decision (see the class notes)."""
        part = scores[:, block]
        if row_norm is None:
            return part.argmax(1)
        first, pred = part.max(1)  # the first maximal index, as argmax
        second = part.scatter(1, pred[:, None], float("-inf")).amax(1)  # cheaper than topk(2) for small C
        margin = first - second
        unit = torch.finfo(self.gemm_dtype).eps
        bound = 2.0 * (self.num_features + 2) * unit * row_norm * self._col_norm[block].max()
        near = (margin <= bound).nonzero().squeeze(1)
        if near.numel():
            centred = h[near].to(torch.float64) - self.global_mean
            exact = centred @ self._rows64[:, block] + self._const[block]
            part[near] = exact
            pred[near] = exact.argmax(1)
        return pred

    @torch.no_grad()
    def update(self, features: torch.Tensor | np.ndarray, labels: torch.Tensor | np.ndarray) -> None:
        """Decide one batch: ``features`` (B, p), ``labels`` (B,) in [0, C); large batches go in row chunks."""
        h = torch.as_tensor(features)
        y = torch.as_tensor(labels)
        if self._host is not None:
            h, y = h.cpu(), y.cpu()
            if h.dtype not in (torch.float16, torch.float32, torch.float64):
                h = h.to(torch.float32)  # bfloat16 has no NumPy dtype: exact in float32
            state = {name: getattr(self, name).numpy() for name in self.STATE}
            self._host.update(h.detach().numpy(), y.detach().numpy().astype(np.int64, copy=False), state)
            return
        for start in range(0, h.shape[0], self._chunk):
            self._update(h[start:start + self._chunk].to(self.device),
                         y[start:start + self._chunk].to(self.device, dtype=torch.int64))

    def _scores(self, h: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """``(scores (B, ncols) float64, the rows (for rechecks and the per-class block), row norms or None)``."""
        b, p = h.shape
        ws = self._workspace
        ncols = self._rows.shape[1]
        if self.anchored and h.dtype in (torch.float32, torch.float16):
            h = h.to(torch.float32)
            x = torch.index_select(self._anchors, 0, y, out=ws.get("x", b, p, torch.float32))
            torch.sub(h, x, out=x)  # h - a_y: within-class sized
            raw = mm(x, self._rows, ws.get("raw", b, ncols, torch.float32))
            if self._label_table is not None:
                const, rows = self._label_table, y
            else:  # large C: constants for this batch's labels only
                present, rows = torch.unique(y, return_inverse=True)
                const = self._label_constants(present)
            scores = torch.index_select(const, 0, rows, out=ws.get("scores", b, ncols, torch.float64))
            scores.add_(raw)
            return scores, h, torch.linalg.vector_norm(x, dim=1)
        low = self.gemm_dtype != torch.float64
        h = ws.get("h64", b, p, torch.float64).copy_(h)
        if self.normalize:
            h /= torch.linalg.vector_norm(h, dim=1, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)
        x = torch.sub(h, self.global_mean, out=ws.get("centred", b, p, torch.float64))
        gemm_in = ws.get("centred_low", b, p, self.gemm_dtype).copy_(x) if low else x
        raw = mm(gemm_in, self._rows, ws.get("raw", b, ncols, self.gemm_dtype))
        scores = ws.get("scores", b, ncols, torch.float64).copy_(raw).add_(self._const)
        return scores, h, torch.linalg.vector_norm(x, dim=1) if low else None

    def _update(self, h: torch.Tensor, y: torch.Tensor) -> None:
        b, c = h.shape[0], self.num_classes
        if b == 0:
            return
        scores, h, row_norm = self._scores(h, y)
        ncc_pred = self._argmax(scores, h, row_norm, slice(0, c))
        # Counts by scatter-adds of 0/1 per row (no bincount, no boolean indexing: nothing waits for the device).
        self.count.index_add_(0, y, torch.ones((), dtype=torch.int64, device=self.device).expand(b))
        self.ncc_correct.index_add_(0, y, (ncc_pred == y).to(torch.int64))
        if self.has_classifier:
            pred = self._argmax(scores, h, row_norm, slice(c, 2 * c))
            self.correct.index_add_(0, y, (pred == y).to(torch.int64))
            self.disagree += (pred != ncc_pred).sum()
            logits = scores[:, c:]
            logits[torch.arange(b, device=self.device), y] -= 1.0
            self.squared_error += torch.linalg.vector_norm(logits).square()
        if self.per_class:
            self._per_class(h, y)

    def _per_class(self, h: torch.Tensor, y: torch.Tensor) -> None:
        """Accumulate ||S^-1 U^T (h - mu_y)||^2 per class, in float64 (see the class notes)."""
        b, p = h.shape[0], self.num_features
        ws = self._workspace
        within = torch.index_select(self.means, 0, y, out=ws.get("within", b, p, torch.float64))
        within.neg_().add_(h)  # h - mu_y in one (B, p) float64 buffer
        z = mm(within, self._white, ws.get("z", b, self._white.shape[1], torch.float64))
        self.whitened_scatter.index_add_(0, y, torch.linalg.vector_norm(z, dim=1).square())

    def compute(self) -> Decisions:
        if self._host is not None:
            self._host.release()  # scratch buffers, reallocated by a later update
        return decisions_from_state({name: getattr(self, name).detach().cpu().numpy() for name in self.STATE},
                                    self.has_classifier)
