"""Pass 1 on the host in NumPy: the shifted-scatter update, the closed form of :class:`Statistics` from the state,
and :class:`HostStatistics`, the accumulator of a cache's report on the CPU (no torch imported).

The scheme is :class:`~ncaudit.stats.ClassStatistics`' (see :mod:`ncaudit.stats._statistics`), whose CPU path runs
the same two functions on NumPy views of its tensors:

.. math::

    S = \\sum_i (h_i - s_{y_i})(h_i - s_{y_i})^T, \\quad
    u_c = \\sum_{y_i = c} (h_i - s_c), \\quad
    q_c = \\sum_{y_i = c} \\lVert h_i - s_c \\rVert^2 ,

with s_c the first sample of class c seen, and at the end d_c = u_c / n_c,
N Sigma_W = S - sum_c n_c d_c d_c^T, n_c Var_c = q_c - n_c ||d_c||^2.
"""

from __future__ import annotations

import math

import numpy as np

from ncaudit._device import release_free_memory
from ncaudit.stats._host import Scratch, one_class
from ncaudit.stats._results import Statistics

#: Rows per block of element-wise work: a block of float64 rows and its gathered shifts stay in cache.
HOST_BLOCK_BYTES = 1 << 20

_U64 = float(np.finfo(np.float64).eps) / 2


def host_update(state: dict[str, np.ndarray], h: np.ndarray, y: np.ndarray, *, normalize: bool, gemm: str,
                scratch: Scratch) -> None:
    """Add the batch ``h`` (B, p) float16/32/64 with labels ``y`` (B,) int64 into ``state`` (NumPy arrays named as
    :attr:`HostStatistics.STATE`), in place.

    Per block of rows that stays in cache: cast to float64, claim the shifts, x = h - s_y, ||x||^2 and the per-class
    sums u_c (one row sum when the block holds one class, as in caches in class order); then one ``syrk`` of the
    batch (BLAS sees ``x^T x`` of one buffer: half the flops of a general product). No one-hot columns in the product
    here (they cost (p + C)^2 / p^2 more flops at C = p/5).
    """
    b, p = h.shape
    c = state["count"].shape[0]
    xn = scratch.get("wide", (b, p))
    shift, seen, sums = state["shift"], state["seen"], state["shifted_sum"]
    sq = np.empty(b)
    step = max(16, HOST_BLOCK_BYTES // (16 * p))
    gathered = scratch.get("gathered", (min(step, b), p))
    for a in range(0, b, step):
        rows, labels = xn[a:a + step], y[a:a + step]
        rows[...] = h[a:a + step]  # float16 / float32 -> float64 is exact
        if normalize:
            norms = np.sqrt(np.einsum("bp,bp->b", rows, rows))
            rows /= np.maximum(norms, np.finfo(np.float64).tiny)[:, None]
        one = one_class(labels)
        if one and seen[labels[0]]:
            rows -= shift[labels[0]]
        else:
            if not seen[labels].all():
                classes, first = np.unique(labels, return_index=True)
                new = ~seen[classes]
                shift[classes[new]] = rows[first[new]]
                seen[classes[new]] = True
            rows -= np.take(shift, labels, axis=0, out=gathered[:len(labels)])
        np.einsum("bp,bp->b", rows, rows, out=sq[a:a + step])
        if one:
            sums[labels[0]] += rows.sum(0)
        else:
            _add_by_label(sums, labels, rows)
    if gemm == "float64":
        product = np.matmul(xn.T, xn, out=scratch.get("gram", (p, p)))  # syrk
    else:
        low = scratch.get("wide_low", (b, p), np.dtype(gemm))
        low[...] = xn
        product = np.matmul(low.T, low, out=scratch.get("gram_low", (p, p), np.dtype(gemm)))
    state["scatter"] += product
    state["count"] += np.bincount(y, minlength=c)
    state["shifted_sqnorm"] += np.bincount(y, weights=sq, minlength=c)
    state["max_rows"][...] = max(float(state["max_rows"]), float(b))
    state["products"][...] += 1.0


def check_batch(features: tuple[int, ...], labels: tuple[int, ...], num_features: int) -> bool:
    """The shapes of a batch, (B, p) features and (B,) labels, checked (ValueError); whether it holds any row."""
    if len(features) != 2 or features[1] != num_features:
        raise ValueError(f"features must have shape (B, {num_features}), got {features}")
    if labels != (features[0],):
        raise ValueError(f"labels must have shape ({features[0]},), got {labels}")
    return features[0] > 0


def _add_by_label(sums: np.ndarray, labels: np.ndarray, rows: np.ndarray) -> None:
    """sums[labels[i]] += rows[i]: one row sum per run of equal labels (``reduceat``; sorted first when the labels
    are not in order). Three times faster than ``np.add.at`` on a block that straddles two classes."""
    if not bool(np.all(labels[1:] >= labels[:-1])):
        order = np.argsort(labels, kind="stable")
        labels, rows = labels[order], rows[order]
    starts = np.flatnonzero(np.r_[True, labels[1:] != labels[:-1]])
    sums[labels[starts]] += np.add.reduceat(rows, starts, axis=0)


def error_bound(state: dict[str, np.ndarray], gemm: str) -> float:
    """Bound on ||computed - exact||_2 of Sigma_W: u_gemm sqrt(rows per product) tr(S)/N plus the float64
    accumulation of the products, u_64 sqrt(products) tr(S)/N (probabilistic bounds, Higham & Mary 2019)."""
    total = float(state["count"].sum())
    if total == 0:
        return 0.0
    trace = float(state["shifted_sqnorm"].sum()) / total
    unit = float(np.finfo(np.dtype(gemm)).eps) / 2
    return trace * (unit * math.sqrt(float(state["max_rows"])) + _U64 * (math.sqrt(float(state["products"])) + 2.0))


def statistics_from_state(state: dict[str, np.ndarray], gemm: str) -> Statistics:
    """The :class:`Statistics` of an accumulated state (NumPy arrays named as :attr:`HostStatistics.STATE`).

    Raises
    ------
    ValueError
        No sample has been seen.
    """
    n = state["count"]
    total = float(n.sum())
    if total == 0:
        raise ValueError("no samples were accumulated")
    safe_n = np.maximum(n, 1.0)
    d = state["shifted_sum"] / safe_n[:, None]  # d_c = mu_c - s_c
    sigma_w = (state["scatter"] - d.T @ (d * n[:, None])) / total
    sigma_w = 0.5 * (sigma_w + sigma_w.T)
    variances = np.maximum((state["shifted_sqnorm"] - n * np.einsum("cp,cp->c", d, d)) / safe_n, 0.0)
    seen, shift = state["seen"], state["shift"]
    origin = shift[int(np.flatnonzero(seen)[0])].copy()
    # mu_c - origin = (s_c - origin) + d_c: the shift difference is exact for nearby values (Sterbenz).
    offsets = np.where(seen[:, None], (shift - origin) + d, 0.0)
    return Statistics(
        counts=np.rint(n).astype(np.int64),
        origin=origin,
        offsets=offsets,
        sigma_w=sigma_w,
        variances=variances,
        anchors=shift.copy(),
        error_bound=error_bound(state, gemm),
        gemm_dtype=gemm,
    )


class HostStatistics:
    """The class statistics of pass 1 accumulated in NumPy on the host: ``update`` per batch, ``merge`` of two states
    (shards, files), ``compute`` into a :class:`Statistics`, ``reset``; the same arithmetic as
    :class:`~ncaudit.stats.ClassStatistics` on the CPU.

    The report of a cache on the CPU uses it, so that its process never imports torch (about 1.5 s and 600 MiB of
    a CUDA build); states that travel between processes or devices are :class:`~ncaudit.stats.ClassStatistics`'.

    Parameters
    ----------
    num_classes, num_features
        C and p; labels must lie in [0, C).
    normalize
        Project every feature onto the unit sphere before accumulating.
    gemm_dtype
        ``"float64"`` (default) or ``"float32"`` (a comparison scheme only).
    """

    #: The arrays that make up the state.
    STATE: tuple[str, ...] = ("count", "seen", "shift", "shifted_sum", "shifted_sqnorm", "scatter", "max_rows",
                              "products")

    def __init__(self, num_classes: int, num_features: int, *, normalize: bool = False,
                 gemm_dtype: str = "float64") -> None:
        if num_classes < 1 or num_features < 1:
            raise ValueError(f"need num_classes >= 1 and num_features >= 1, got {num_classes}, {num_features}")
        if gemm_dtype not in ("float64", "float32"):
            raise ValueError(f"gemm_dtype must be float64 or float32, got {gemm_dtype}")
        self.num_classes, self.num_features = num_classes, num_features
        self.normalize, self.gemm_dtype = normalize, gemm_dtype
        self.reset()

    def reset(self) -> None:
        """Restore the empty state."""
        c, p = self.num_classes, self.num_features
        self.state = {"count": np.zeros(c), "seen": np.zeros(c, bool), "shift": np.zeros((c, p)),
                      "shifted_sum": np.zeros((c, p)), "shifted_sqnorm": np.zeros(c), "scatter": np.zeros((p, p)),
                      "max_rows": np.zeros(()), "products": np.zeros(())}
        self._scratch = Scratch()

    def update(self, features: np.ndarray, labels: np.ndarray) -> None:
        """Accumulate one batch: ``features`` (B, p) float16/32/64, ``labels`` (B,) integers in [0, C) (checked by
        the caller)."""
        h, y = np.asarray(features), np.asarray(labels).astype(np.int64, copy=False)
        if not check_batch(tuple(h.shape), tuple(y.shape), self.num_features):
            return
        if h.dtype not in (np.float16, np.float32, np.float64):
            h = h.astype(np.float64)
        host_update(self.state, h, y, normalize=self.normalize, gemm=self.gemm_dtype, scratch=self._scratch)

    def merge(self, other: HostStatistics) -> HostStatistics:
        """Add ``other``'s samples to this state (exactly, as :meth:`ClassStatistics.merge
        <ncaudit.stats.ClassStatistics.merge>`: the other's sums re-expressed around this state's shifts,
        S += S_o + U_o^T D + D^T U_o + D^T diag(n_o) D with D_c = s_c^other - s_c) and return ``self``."""
        if (other.num_classes, other.num_features) != (self.num_classes, self.num_features):
            raise ValueError("cannot merge statistics of different shapes")
        if other.normalize != self.normalize:
            raise ValueError("cannot merge normalised and unnormalised statistics")
        a, o = self.state, other.state
        adopt = o["seen"] & ~a["seen"]  # classes only the other has seen adopt its shift
        a["shift"][adopt] = o["shift"][adopt]
        a["seen"] |= o["seen"]
        delta = np.where(o["seen"][:, None], o["shift"] - a["shift"], 0.0)
        nd = o["count"][:, None] * delta
        a["scatter"] += o["scatter"] + o["shifted_sum"].T @ delta + delta.T @ o["shifted_sum"] + delta.T @ nd
        a["shifted_sqnorm"] += (o["shifted_sqnorm"] + 2 * np.einsum("cp,cp->c", o["shifted_sum"], delta)
                                + o["count"] * np.einsum("cp,cp->c", delta, delta))
        a["shifted_sum"] += o["shifted_sum"] + nd
        a["count"] += o["count"]
        a["max_rows"][...] = max(float(a["max_rows"]), float(o["max_rows"]))
        a["products"][...] += float(o["products"]) + 1.0
        return self

    def error_bound(self) -> float:
        """See :func:`error_bound`."""
        return error_bound(self.state, self.gemm_dtype)

    def compute(self) -> Statistics:
        """The :class:`Statistics` of everything seen so far (the batches' scratch is released first)."""
        self._scratch.clear()
        release_free_memory()  # the batches of the pass just read
        return statistics_from_state(self.state, self.gemm_dtype)
