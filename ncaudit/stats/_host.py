"""The second pass on the CPU in NumPy: decisions, per-class NC1 and the direct MSE as BLAS products and cache-sized
blocks of element-wise work, with no torch operation per batch.

Torch's element-wise kernels run on its OpenMP pool; in a process without ``OMP_WAIT_POLICY=PASSIVE`` those threads
spin after each kernel and take the cores NumPy's BLAS needs (measured: the decision pass took 2.5x longer in a plain
Python process than in the CLI). Here every per-batch operation is NumPy: the products go to NumPy's BLAS, the rest
(gathers, subtractions, argmax, margins, counts) to single-threaded NumPy over blocks of rows that stay in cache.

Scheme (``SampleDecisions`` with class anchors a_c, float32 features, float32 decision GEMM):

* x = h - a_y, formed in float64 (exact: both are float32 samples of the same class) and rounded once to float32;
* classifier scores (h - mu_G)^T w_c + (w_c^T mu_G + b_c) = x^T w_c + K_{y,c}: a float32 product x W^T plus a
  float64 per-(label, class) constant K;
* shared product (with the per-class block): t = U^T x (float64, p x r, U the left singular vectors of M), so that

  - the per-class NC1 projection is S^-1 U^T (h - mu_y) = S^-1 (t - U^T (mu_y - a_y)) (a per-label table), and
  - the nearest-class-mean scores are (h - a_y)^T m_c + K_{y,c} = t^T (U^T m_c) + x^T (I - U U^T) m_c + K_{y,c}:
    a float32 r x C product of t, the truncated term bounded by ||x|| max_c ||(I - U U^T) m_c||;

* every score whose top-two margin is within its worst-case error bound is computed again in float64 from
  (h - mu_G) and the decision equals the float64 one.

Without anchors (float64 features, normalised features) rows are centred on mu_G in float64 and the per-class block
projects h - mu_y on the whitener U S^-1 in a float64 product of its own, as in :class:`SampleDecisions`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ncaudit._device import release_free_memory
from ncaudit._validate import SQUARABLE
from ncaudit.stats._results import Decisions

_U32 = float(np.finfo(np.float32).eps) / 2
_U64 = float(np.finfo(np.float64).eps) / 2

#: Bytes of float64 rows per block of element-wise work (a block and its gathered rows stay in L2).
BLOCK_BYTES = 1 << 19
#: Bytes of scratch per chunk of rows (inputs of the products and their results).
CHUNK_BYTES = 24 << 20


def one_class(labels: np.ndarray) -> bool:
    """Whether a non-empty block of labels holds one class (the common case of caches in class order: its rows then
    take one row of a table, broadcast, instead of a gather)."""
    return bool(labels[0] == labels[-1] and (labels == labels[0]).all())


class Scratch:
    """Reusable NumPy scratch arrays by name (contents undefined): a fresh large array per batch costs more in page
    faults than the arithmetic done on it."""

    def __init__(self) -> None:
        self._arrays: dict[str, np.ndarray] = {}

    def get(self, name: str, shape: tuple[int, ...], dtype: np.dtype | type = np.float64) -> np.ndarray:
        """An array of ``shape`` (the first dimension may be smaller than the one kept), grown when needed."""
        buf = self._arrays.get(name)
        if buf is None or buf.dtype != dtype or buf.shape[0] < shape[0] or buf.shape[1:] != shape[1:]:
            buf = self._arrays[name] = np.empty((max(shape[0], 1), *shape[1:]), dtype)
        return buf[:shape[0]]

    def clear(self) -> None:
        """Free every array (allocated again on next use)."""
        self._arrays.clear()


def _orthonormal(whitener: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """(U, S) with U S^-1 = ``whitener`` when its columns are orthogonal (U^T U = I to 1e-10), else None."""
    if whitener.shape[1] == 0:
        return None
    norms = np.linalg.norm(whitener, axis=0)
    if not np.all(norms > 0) or not np.all(np.isfinite(norms)):
        return None
    u = whitener / norms
    if np.abs(u.T @ u - np.eye(u.shape[1])).max() > 1e-10:
        return None
    return u, 1.0 / norms


class HostDecider:
    """The per-batch work of :class:`~ncaudit.stats.SampleDecisions` on the CPU, in NumPy, into its state arrays.

    Parameters
    ----------
    rows64 : ndarray of shape (p, C or 2C)
        [M | W^T] in float64 (M: the columns mu_c - mu_G).
    const : ndarray of shape (C or 2C,)
        [-1/2 ||mu_c - mu_G||^2 | W mu_G + b].
    global_mean, means : ndarray of shape (p,) and (C, p)
    whitener : ndarray of shape (p, r)
        U S^-1.
    anchors : ndarray of shape (C, p) or None
        Class anchors (float32 values) when rows are centred on them; None centres on mu_G.
    gemm_dtype : numpy dtype
        float32 or float64.
    per_class, normalize, has_classifier
        As in :class:`SampleDecisions`.
    label_table : ndarray of shape (C, C or 2C) or None
        Per-label constants (a_y - mu_G)^T [M | W] + const (None: formed per chunk for its labels).
    """

    def __init__(self, rows64: np.ndarray, const: np.ndarray, global_mean: np.ndarray, means: np.ndarray,
                 whitener: np.ndarray, anchors: np.ndarray | None, gemm_dtype: np.dtype, *, per_class: bool,
                 normalize: bool, has_classifier: bool, label_table: np.ndarray | None) -> None:
        p, ncols = rows64.shape
        c = means.shape[0]
        self.p, self.c = p, c
        self.rows64, self.const, self.mu_g, self.means = rows64, const, global_mean, means
        self.white = whitener
        self.gemm = np.dtype(gemm_dtype)
        self.low = self.gemm != np.float64
        self.per_class, self.normalize, self.has_classifier = per_class, normalize, has_classifier
        self.anchors64 = anchors
        self.table = label_table
        col_norm = np.linalg.norm(rows64, axis=0)
        self.ncc_colmax = float(col_norm[:c].max()) if c else 0.0
        self.cls_colmax = float(col_norm[c:].max()) if ncols > c else 0.0
        self.w_t = np.ascontiguousarray(rows64[:, c:], dtype=self.gemm) if has_classifier else None
        self.shared = None
        basis = _orthonormal(whitener) if anchors is not None and per_class and self.low else None
        if basis is not None:
            u, s = basis
            coef = u.T @ rows64[:, :c]  # U^T m_c, (r, C)
            resid = 0.0  # max_c ||(I - U U^T) m_c||, in blocks of columns (no p x C temporary)
            for a in range(0, c, 128):
                e = min(a + 128, c)
                part = rows64[:, a:e] - u @ coef[:, a:e]
                resid = max(resid, float(np.sqrt(np.einsum("pc,pc->c", part, part).max())))
            coef_max = float(np.linalg.norm(coef, axis=0).max())
            r = u.shape[1]
            self.shared = dict(u=np.ascontiguousarray(u), inv_s=1.0 / s, coef32=coef.astype(np.float32),
                               within=(means - anchors) @ u, coef_max=coef_max, resid=resid,
                               t_unit=2.0 * (r + 2) * _U32 * coef_max,
                               x_unit=2.0 * ((p + 2) * _U64 * math.sqrt(r) * coef_max + resid))
            self.white = None  # U S^-1 again from U and S where a chunk needs it (see _whitener)
            self.means = None  # mu_c again from M and mu_G where a chunk needs it (see _class_means)
        self.m_t: np.ndarray | None = None
        r = whitener.shape[1]
        row_bytes = p * 12 + r * 12 + 8 * ncols + 8
        self.chunk = int(max(64, CHUNK_BYTES // row_bytes))
        self.block = int(max(16, BLOCK_BYTES // (8 * max(p, ncols))))
        self._scratch = Scratch()

    def release(self) -> None:
        """Free the scratch buffers (they are allocated again by the next update)."""
        self._scratch.clear()

    def _class_means(self) -> np.ndarray:
        if self.means is None:
            self.means = self.rows64[:, :self.c].T + self.mu_g
        return self.means

    def _whitener(self) -> np.ndarray:
        if self.white is None:
            self.white = self.shared["u"] * self.shared["inv_s"]
        return self.white

    def _means_t(self) -> np.ndarray:
        """M in the GEMM's dtype, (p, C), formed on first use (the shared path does without it)."""
        if self.m_t is None:
            self.m_t = np.ascontiguousarray(self.rows64[:, :self.c], dtype=self.gemm)
        return self.m_t

    def update(self, h: np.ndarray, y: np.ndarray, state: dict[str, np.ndarray]) -> None:
        """Decide the rows ``h`` (B, p) with labels ``y`` (B,) and add their counts and sums into ``state``."""
        for a in range(0, len(y), self.chunk):
            self._chunk(h[a:a + self.chunk], y[a:a + self.chunk], state)

    def _buf(self, name: str, shape: tuple[int, ...], dtype: np.dtype | type = np.float64) -> np.ndarray:
        return self._scratch.get(name, shape, dtype)

    @staticmethod
    def _gather(table: np.ndarray, labels: np.ndarray, out: np.ndarray) -> np.ndarray:
        """``table[labels]``: the one row itself when the block holds one class (caches in class order), else
        gathered into ``out``."""
        if one_class(labels):
            return table[labels[0]]
        return np.take(table, labels, axis=0, out=out[:len(labels)])

    def _chunk(self, h: np.ndarray, y: np.ndarray, state: dict[str, np.ndarray]) -> None:
        b, p, c = len(y), self.p, self.c
        anchored = self.anchors64 is not None and h.dtype in (np.float32, np.float16)
        sh = self.shared if anchored else None
        x64 = self._buf("x64", (b, p))
        xg = self._buf("xg", (b, p), self.gemm) if self.low else x64
        norm = self._buf("norm", (b,))
        within = self._buf("within", (b, p)) if self.per_class and sh is None else None
        step = self.block
        gathered = self._buf("gathered", (min(step, b), p))
        # Cache-sized blocks, one pass over the rows from memory; every ufunc on one dtype (mixed-dtype ufuncs take
        # NumPy's buffered casting loops, several times slower than a cast followed by the operation).
        for a in range(0, b, step):
            rows, labels = x64[a:a + step], y[a:a + step]
            rows[...] = h[a:a + step]  # float16 / float32 -> float64: exact
            if anchored:
                rows -= self._gather(self.anchors64, labels, gathered)  # h - a_y: exact in float64
            else:
                if self.normalize:
                    rows /= np.maximum(np.sqrt(np.einsum("bp,bp->b", rows, rows)), np.finfo(np.float64).tiny)[:, None]
                if within is not None:
                    np.subtract(rows, self._gather(self._class_means(), labels, gathered),
                                out=within[a:a + step])  # h - mu_y
                rows -= self.mu_g
            if self.low:
                xg[a:a + step] = rows
        if self.low:  # ||x|| for the error bounds (in float32: the bounds carry a 1 % margin for its rounding)
            norm[...] = np.sqrt(np.einsum("bp,bp->b", xg, xg))
        table = self.table
        label_rows = y
        if anchored and table is None:  # large C: constants for this chunk's labels only
            present, label_rows = np.unique(y, return_inverse=True)
            table = (self.anchors64[present] - self.mu_g) @ self.rows64 + self.const
        consts = table if anchored else self.const
        # The products: classifier scores, nearest-class-mean scores (shared with the per-class block when possible).
        t = None
        if sh is not None:
            t = np.matmul(x64, sh["u"], out=self._buf("t", (b, sh["u"].shape[1])))
            t_norm = np.sqrt(np.einsum("br,br->b", t, t))
            t32 = self._buf("t32", t.shape, np.float32)
            t32[...] = t
            ncc_raw = np.matmul(t32, sh["coef32"], out=self._buf("ncc", (b, c), np.float32))
            ncc_bound = t_norm * sh["t_unit"] + 1.01 * norm * sh["x_unit"]
        else:
            ncc_raw = np.matmul(xg, self._means_t(), out=self._buf("ncc", (b, c), self.gemm))
            ncc_bound = 2.02 * (p + 2) * _U32 * self.ncc_colmax * norm if self.low else None
        ncc_pred = self._decide(ncc_raw, consts, label_rows, ncc_bound, h, y, 0, None)
        correct = None
        if self.has_classifier:
            cls_raw = np.matmul(xg, self.w_t, out=self._buf("cls", (b, c), self.gemm))
            cls_bound = 2.02 * (p + 2) * _U32 * self.cls_colmax * norm if self.low else None
            sq = np.zeros(1)
            pred = self._decide(cls_raw, consts, label_rows, cls_bound, h, y, c, sq)
            correct = pred == y
            state["disagree"][...] += int(np.count_nonzero(pred != ncc_pred))
            state["squared_error"][...] += sq[0]
        state["count"] += np.bincount(y, minlength=c)
        state["ncc_correct"] += np.bincount(y, weights=ncc_pred == y, minlength=c).astype(np.int64)
        if correct is not None:
            state["correct"] += np.bincount(y, weights=correct, minlength=c).astype(np.int64)
        if self.per_class:
            if t is not None:
                z = t  # S^-1 (t - U^T (mu_y - a_y)), in place
                gathered = self._buf("gathered_t", (min(step, b), z.shape[1]))
                for a in range(0, b, step):
                    part = z[a:a + step]
                    part -= self._gather(sh["within"], y[a:a + step], gathered)
                    part *= sh["inv_s"]
            else:
                white = self._whitener()
                z = np.matmul(within, white, out=self._buf("t", (b, white.shape[1])))
            state["whitened_scatter"] += np.bincount(y, weights=np.einsum("br,br->b", z, z), minlength=c)

    def _decide(self, raw: np.ndarray, consts: np.ndarray, label_rows: np.ndarray, bound: np.ndarray | None,
                h: np.ndarray, y: np.ndarray, offset: int, sq: np.ndarray | None) -> np.ndarray:
        """argmax_c of the float64 scores raw + const over one block of columns (offset 0: the class means, C: the
        classifier), exact to the float64 decision; with ``sq``, adds sum ||scores - e_y||^2 into it."""
        b, c = raw.shape
        cols = slice(offset, offset + c)
        pred = np.empty(b, np.int64)
        near: list[np.ndarray] = []
        step = max(16, BLOCK_BYTES // (8 * c))
        anchored = consts.ndim == 2
        scores = self._buf("scores", (min(step, b), c))
        for a in range(0, b, step):
            s = scores[:min(step, b - a)]
            s[...] = raw[a:a + step]
            if anchored:  # the per-label constants of these rows: one row when the block holds one class
                labels = label_rows[a:a + step]
                # fancy rows with a column slice: np.take of a column view would copy the whole table per call
                s += consts[labels[0], cols] if one_class(labels) else consts[labels, cols]
            else:
                s += consts[cols]
            top = s.argmax(1)
            pred[a:a + step] = top
            idx = np.arange(len(s))
            if bound is not None:
                first = s[idx, top]
                s[idx, top] = -np.inf
                margin = first - s.max(1)
                s[idx, top] = first
                close = np.flatnonzero(margin <= bound[a:a + step])
                if close.size:
                    near.append(close + a)
            if sq is not None:
                s[idx, y[a:a + step]] -= 1.0
                sq[0] += float(np.einsum("bc,bc->", s, s))
        if near:
            rows = np.concatenate(near)
            centred = h[rows].astype(np.float64)
            if self.normalize:
                centred /= np.maximum(np.linalg.norm(centred, axis=1), np.finfo(np.float64).tiny)[:, None]
            centred -= self.mu_g
            exact = centred @ self.rows64[:, cols] + self.const[cols]
            pred[rows] = exact.argmax(1)
            if sq is not None:  # the squared error of these rows from their float64 scores instead
                approx = (consts[label_rows[rows]][:, cols] if anchored else consts[cols]) + raw[rows]
                approx[np.arange(len(rows)), y[rows]] -= 1.0
                exact[np.arange(len(rows)), y[rows]] -= 1.0
                sq[0] += float(np.einsum("bc,bc->", exact, exact)) - float(np.einsum("bc,bc->", approx, approx))
        return pred


def gemm_name_for(feature_dtype: object) -> str:
    """The dtype of the second pass's decision GEMM for features of this dtype (a NumPy or torch dtype, or its
    name): ``"float64"`` for float64 features, else ``"float32"`` (rows centred on a sample of their class; close
    calls are decided again in float64)."""
    return "float64" if str(feature_dtype).replace("torch.", "") == "float64" else "float32"


#: The largest float32 score the decision GEMM may form: a quarter of the float32 maximum (sums of partial products
#: stay below it).
FLOAT32_SCORES = float(np.finfo(np.float32).max) / 4


def may_overflow_float32(col_norm: np.ndarray, p: int) -> bool:
    """Whether float32 scores (h - a)^T [M | W] could overflow: each |h_i| <= SQUARABLE (the first pass refuses
    larger features), so ||h - a|| <= 2 SQUARABLE sqrt(p), and a score is at most that times its column's norm."""
    if col_norm.size == 0:
        return False
    bound = 2.0 * SQUARABLE["float32"] * math.sqrt(p)
    return float(col_norm.max()) * bound > FLOAT32_SCORES


@dataclass
class DecisionTables:
    """What the decision pass fixes before its first row (float64 NumPy arrays).

    Attributes
    ----------
    rows64 : ndarray of shape (p, C or 2C)
        [M | W^T], M the columns mu_c - mu_G.
    const : ndarray of shape (C or 2C,)
        [-1/2 ||mu_c - mu_G||^2 | W mu_G + b].
    col_norm : ndarray of shape (C or 2C,)
        The columns' norms (error bounds of low-precision scores).
    gemm : str
        The decision GEMM's dtype: the one asked for, or float64 where float32 scores could overflow.
    anchors64 : ndarray of shape (C, p) or None
        The class anchors (float32 values) when rows are centred on them (float32 GEMM, unnormalised features).
    label_table : ndarray of shape (C, C or 2C) or None
        Per-label constants (a_y - mu_G)^T [M | W] + const, when within the memory budget.
    """

    rows64: np.ndarray
    const: np.ndarray
    col_norm: np.ndarray
    gemm: str
    anchors64: np.ndarray | None
    label_table: np.ndarray | None


def decision_tables(means: np.ndarray, global_mean: np.ndarray, weight: np.ndarray | None, bias: np.ndarray | None,
                    *, gemm: str, normalize: bool, anchors: np.ndarray | None, memory_budget: int) -> DecisionTables:
    """The tables of :class:`DecisionTables` for class means ``means`` (C, p), mu_G and the classifier (W, b)."""
    means = np.asarray(means, dtype=np.float64)
    global_mean = np.asarray(global_mean, dtype=np.float64)
    c, p = means.shape
    centred = means - global_mean
    rows64 = np.empty((p, 2 * c if weight is not None else c))
    rows64[:, :c] = centred.T
    consts = [-0.5 * np.einsum("cp,cp->c", centred, centred)]
    del centred  # C x p: only the columns above are kept
    if weight is not None:
        w = np.asarray(weight, dtype=np.float64)
        rows64[:, c:] = w.T
        consts.append(w @ global_mean + (0.0 if bias is None else np.asarray(bias, dtype=np.float64)))
    const = np.concatenate(consts)
    col_norm = np.linalg.norm(rows64, axis=0)
    if gemm == "float32" and not normalize and may_overflow_float32(col_norm, p):
        gemm = "float64"  # decided once: a huge classifier's float32 scores overflow
    anchors64 = label_table = None
    if anchors is not None and gemm == "float32" and not normalize:  # samples of float32 / float16 features
        anchors64 = np.asarray(anchors, dtype=np.float32).astype(np.float64)
        if c * rows64.shape[1] * 8 <= memory_budget:
            label_table = (anchors64 - global_mean) @ rows64 + const
    return DecisionTables(rows64, const, col_norm, gemm, anchors64, label_table)


def host_decider(tables: DecisionTables, means: np.ndarray, global_mean: np.ndarray, whitener: np.ndarray, *,
                 per_class: bool, normalize: bool, has_classifier: bool) -> HostDecider:
    """The :class:`HostDecider` of these tables (its own copies; the set-up's temporaries handed back to the OS)."""
    decider = HostDecider(tables.rows64, tables.const, np.asarray(global_mean, dtype=np.float64),
                          np.asarray(means, dtype=np.float64), np.asarray(whitener, dtype=np.float64),
                          tables.anchors64, np.dtype(tables.gemm), per_class=per_class, normalize=normalize,
                          has_classifier=has_classifier, label_table=tables.label_table)
    release_free_memory()
    return decider


def decisions_from_state(state: dict[str, np.ndarray], has_classifier: bool) -> Decisions:
    """The :class:`Decisions` of a decision state (NumPy arrays named as :attr:`HostDecisions.STATE`)."""
    return Decisions(
        counts=np.array(state["count"]),
        correct=np.array(state["correct"]) if has_classifier else None,
        ncc_correct=np.array(state["ncc_correct"]),
        disagree=int(state["disagree"]) if has_classifier else None,
        squared_error=float(state["squared_error"]) if has_classifier else None,
        whitened_scatter=np.array(state["whitened_scatter"]),
    )


class HostDecisions:
    """The second pass accumulated in NumPy on the host: ``update`` per batch, ``merge`` (sums), ``compute`` into
    :class:`Decisions`, ``reset``; the same arithmetic (and the same parameters) as :class:`~ncaudit.stats.SampleDecisions` on the CPU,
    which the report of a cache on the CPU uses without importing torch.

    ``gemm_dtype`` is ``"float32"`` (rows centred on their class anchor, close calls decided again in float64) or
    ``"float64"``; after construction it says which one runs (float64 where float32 scores could overflow).
    """

    #: The arrays that make up the state (all sums).
    STATE: tuple[str, ...] = ("count", "correct", "ncc_correct", "disagree", "squared_error", "whitened_scatter")

    def __init__(self, means: np.ndarray, global_mean: np.ndarray, weight: np.ndarray | None,
                 bias: np.ndarray | None, whitener: np.ndarray, *, gemm_dtype: str = "float64",
                 normalize: bool = False, per_class: bool = True, anchors: np.ndarray | None = None,
                 memory_budget: int = 128 << 20) -> None:
        tables = decision_tables(means, global_mean, weight, bias, gemm=gemm_dtype, normalize=normalize,
                                 anchors=anchors, memory_budget=memory_budget)
        self.gemm_dtype = tables.gemm
        self.num_classes = int(np.shape(means)[0])
        self.has_classifier = weight is not None
        self._decider = host_decider(tables, means, global_mean, whitener, per_class=per_class, normalize=normalize,
                                     has_classifier=self.has_classifier)
        self.reset()

    def reset(self) -> None:
        """Restore the empty state."""
        c = self.num_classes
        self.state = {"count": np.zeros(c, np.int64), "correct": np.zeros(c, np.int64),
                      "ncc_correct": np.zeros(c, np.int64), "disagree": np.zeros((), np.int64),
                      "squared_error": np.zeros(()), "whitened_scatter": np.zeros(c)}

    def update(self, features: np.ndarray, labels: np.ndarray) -> None:
        """Decide one batch: ``features`` (B, p), ``labels`` (B,) in [0, C)."""
        h = np.asarray(features)
        if h.dtype not in (np.float16, np.float32, np.float64):
            h = h.astype(np.float64)
        self._decider.update(h, np.asarray(labels).astype(np.int64, copy=False), self.state)

    def merge(self, other: HostDecisions) -> HostDecisions:
        """Add ``other``'s sums (decisions of other rows against the same tables) and return ``self``."""
        for name in self.STATE:
            self.state[name] += other.state[name]
        return self

    def compute(self) -> Decisions:
        """The decisions so far (the batches' scratch is released first)."""
        self._decider.release()
        return decisions_from_state(self.state, self.has_classifier)
