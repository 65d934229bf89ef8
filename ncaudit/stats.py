"""Streaming class statistics: counts, class means, within-class and total covariance, per-class variances.

:class:`ClassStatistics` is a state accumulator in the style of a torchmetrics ``Metric``: :meth:`update` per batch,
:meth:`merge` of two states (shards, files, processes), :meth:`compute` into a frozen :class:`Statistics`, and
:meth:`reset`. It does no I/O and no distributed communication.

Accumulation scheme: a per-class shift
--------------------------------------
Each class c is shifted by a fixed sample of its own, s_c (the first one the accumulator sees). Per batch, one
GEMM accumulates the shifted scatter, and per-class row sums accumulate with ``index_add``:

.. math::

    S = \\sum_i (h_i - s_{y_i})(h_i - s_{y_i})^T, \\quad
    u_c = \\sum_{y_i = c} (h_i - s_c), \\quad
    q_c = \\sum_{y_i = c} \\lVert h_i - s_c \\rVert^2 .

At the end, with d_c = u_c / n_c = mu_c - s_c, a single correction gives the centred scatter

.. math::

    N \\Sigma_W = S - \\sum_c n_c d_c d_c^T, \\qquad n_c \\mathrm{Var}_c = q_c - n_c \\lVert d_c \\rVert^2 .

Because s_c is a sample of class c, the shifted rows are of the size of the within-class spread, not of the
features' common offset: nothing cancels catastrophically even when Sigma_W is 1e-10 of the class means (the
raw-moment formula E[h h^T] - mu mu^T loses every digit there). The batch GEMM therefore may run in float32 for
float32 / float16 features (the rows are centred), while every accumulator is float64. This costs one p x p GEMM per
batch, like a bare streamed X^T X, whatever the class mix of the batch (caches in dataset order often hold one class
per batch); a Chan-style per-batch merge would add a C x p x p correction per batch instead. When a batch holds few
classes, their sums u_c come out of the same GEMM through k one-hot columns appended to the rows.

:meth:`merge` re-expresses the other state's sums around this state's shifts (exact algebra:
S += sum_c [n_c D_c D_c^T + u_c D_c^T + D_c u_c^T] with D_c = s_c^{other} - s_c), so the result does not depend on
how the data were split, batched or ordered beyond floating-point rounding. TF32 and reduced-precision GEMMs are
switched off while updating, whatever the global torch setting.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch



@contextlib.contextmanager
def full_precision_matmul() -> Iterator[None]:
    """Disable TF32 and reduced-precision float32 matmuls inside the block, restoring the settings after."""
    cuda_tf32 = torch.backends.cuda.matmul.allow_tf32
    cudnn_tf32 = torch.backends.cudnn.allow_tf32
    precision = torch.get_float32_matmul_precision()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = cuda_tf32
        torch.backends.cudnn.allow_tf32 = cudnn_tf32
        torch.set_float32_matmul_precision(precision)


def gemm_dtype_for(feature_dtype: str | torch.dtype | np.dtype) -> torch.dtype:
    """The batch GEMM dtype for features of this dtype: float64 for float64 features, else float32 (centred rows)."""
    name = str(feature_dtype).replace("torch.", "")
    return torch.float64 if name == "float64" else torch.float32


class Workspace:
    """Reusable scratch buffers for per-batch temporaries.

    A fresh (B, p) tensor per batch costs more in page faults than the arithmetic done on it (large allocations are
    returned to the OS and faulted in again): reusing buffers keeps the O(B p) work small next to the GEMM.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._buffers: dict[str, torch.Tensor] = {}

    def get(self, name: str, rows: int, cols: int, dtype: torch.dtype) -> torch.Tensor:
        """A (rows, cols) buffer of ``dtype`` (contents undefined), grown when a larger batch arrives."""
        buf = self._buffers.get(name)
        if buf is None or buf.dtype != dtype or buf.shape[0] < rows or buf.shape[1] != cols:
            buf = torch.empty(max(rows, 1), cols, dtype=dtype, device=self.device)
            self._buffers[name] = buf
        return buf[:rows]


@dataclass(frozen=True)
class Statistics:
    """Class statistics of a feature set (float64 numpy arrays; C classes, p features, N samples).

    Attributes
    ----------
    counts : ndarray of shape (C,), int64
        n_c, samples per class.
    origin : ndarray of shape (p,)
        A sample of the data; class means are held relative to it, so that differences of means keep their full
        precision even when the features carry a large common offset.
    offsets : ndarray of shape (C, p)
        mu_c - origin.
    sigma_w : ndarray of shape (p, p)
        Within-class covariance Sigma_W = (1/N) sum_i (h_i - mu_{y_i})(h_i - mu_{y_i})^T (normalised by N).
    variances : ndarray of shape (C,)
        Var_c = (1/n_c) sum_{y_i=c} ||h_i - mu_c||^2 (normalised by n_c), the trace of class c's covariance.
    anchors : ndarray of shape (C, p) or None
        One sample of each class (the accumulator's shifts): h - anchor_y is small and exact in the features' own
        precision, which lets the second pass centre rows by class without float64 arithmetic.
    """

    counts: np.ndarray
    origin: np.ndarray
    offsets: np.ndarray
    sigma_w: np.ndarray
    variances: np.ndarray
    anchors: np.ndarray | None = None

    @property
    def n_samples(self) -> int:
        return int(self.counts.sum())

    @property
    def n_classes(self) -> int:
        return int(self.counts.shape[0])

    @property
    def n_features(self) -> int:
        return int(self.offsets.shape[1])

    @property
    def priors(self) -> np.ndarray:
        """pi_c = n_c / N, shape (C,)."""
        return self.counts / self.counts.sum()

    @property
    def means(self) -> np.ndarray:
        """Class means mu_c = (1/n_c) sum_{y_i=c} h_i, shape (C, p)."""
        return self.origin + self.offsets

    @property
    def global_mean(self) -> np.ndarray:
        """mu_G = (1/N) sum_i h_i = sum_c pi_c mu_c, shape (p,)."""
        return self.origin + self.priors @ self.offsets

    @property
    def centred_means(self) -> np.ndarray:
        """M^T: rows mu_c - mu_G, shape (C, p), computed from the offsets (no cancellation of a common offset)."""
        return self.offsets - self.priors @ self.offsets

    @property
    def sigma_b(self) -> np.ndarray:
        """Between-class covariance Sigma_B = (1/C) M M^T, shape (p, p) (unweighted over classes)."""
        m = self.centred_means
        return m.T @ m / self.n_classes

    @property
    def sigma_t(self) -> np.ndarray:
        """Total covariance Sigma_T = Sigma_W + M diag(pi) M^T, shape (p, p) (normalised by N)."""
        m = self.centred_means
        return self.sigma_w + (m.T * self.priors) @ m

    def select(self, classes: np.ndarray) -> Statistics:
        """The statistics restricted to ``classes`` (in that order); every class left out must be empty."""
        classes = np.asarray(classes, dtype=np.int64)
        if self.counts[classes].sum() != self.counts.sum():
            raise ValueError("select() may only leave out classes without samples")
        anchors = None if self.anchors is None else self.anchors[classes]
        return Statistics(self.counts[classes], self.origin, self.offsets[classes], self.sigma_w,
                          self.variances[classes], anchors)


class ClassStatistics:
    """Streaming, mergeable accumulator of the class statistics of features ``h`` with labels ``y``.

    Parameters
    ----------
    num_classes
        C; labels must lie in [0, C).
    num_features
        p.
    device
        Where the accumulators live and the GEMMs run (``cpu``, ``cuda``); results are identical up to rounding.
    gemm_dtype
        dtype of the per-batch scatter GEMM on shifted rows: float64 (default) or float32 (fast; exact enough
        because rows are centred). Accumulators are float64 either way.
    normalize
        Project every feature onto the unit sphere, h / ||h||, before accumulating (``report --normalize``).

    Notes
    -----
    Memory is O(p^2 + C p), independent of the number of samples. See the module docstring for the scheme.
    """

    def __init__(
        self,
        num_classes: int,
        num_features: int,
        *,
        device: str | torch.device = "cpu",
        gemm_dtype: torch.dtype = torch.float64,
        normalize: bool = False,
    ) -> None:
        if num_classes < 1 or num_features < 1:
            raise ValueError(f"need num_classes >= 1 and num_features >= 1, got {num_classes}, {num_features}")
        self.num_classes = num_classes
        self.num_features = num_features
        self.device = torch.device(device)
        self.gemm_dtype = gemm_dtype
        self.normalize = normalize
        self.reset()

    def reset(self) -> None:
        """Restore the empty state."""
        c, p, dev = self.num_classes, self.num_features, self.device
        f64 = torch.float64
        self.count = torch.zeros(c, dtype=f64, device=dev)
        self.seen = torch.zeros(c, dtype=torch.bool, device=dev)
        self.shift = torch.zeros(c, p, dtype=f64, device=dev)
        self._shift32 = torch.zeros(c, p, dtype=torch.float32, device=dev)  # float32 copy of the shifts, for gathers
        self.shifted_sum = torch.zeros(c, p, dtype=f64, device=dev)
        self.shifted_sqnorm = torch.zeros(c, dtype=f64, device=dev)
        self.scatter = torch.zeros(p, p, dtype=f64, device=dev)
        self._workspace = Workspace(dev)

    #: The tensors that make up the state (everything :meth:`merge` reads).
    STATE: tuple[str, ...] = ("count", "seen", "shift", "shifted_sum", "shifted_sqnorm", "scatter")

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The accumulated state as CPU tensors (to send to another process and :meth:`load_state_dict` there)."""
        return {name: getattr(self, name).detach().cpu() for name in self.STATE}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> ClassStatistics:
        """Replace this state by ``state`` (from :meth:`state_dict` of an accumulator of the same shape)."""
        for name in self.STATE:
            value = state[name].to(self.device)
            if value.shape != getattr(self, name).shape:
                raise ValueError(f"state {name!r} has shape {tuple(value.shape)}, expected "
                                 f"{tuple(getattr(self, name).shape)}")
            setattr(self, name, value.to(getattr(self, name).dtype).clone())
        self._shift32 = self.shift.to(torch.float32)
        return self

    @torch.no_grad()
    def update(self, features: torch.Tensor | np.ndarray, labels: torch.Tensor | np.ndarray) -> None:
        """Accumulate one batch: ``features`` (B, p), any float dtype; ``labels`` (B,) integers in [0, C).

        Shapes are checked here; label range and finiteness are the caller's checks (:mod:`ncaudit.validate`).
        """
        h = torch.as_tensor(features)
        y = torch.as_tensor(labels)
        if h.ndim != 2 or h.shape[1] != self.num_features:
            raise ValueError(f"features must have shape (B, {self.num_features}), got {tuple(h.shape)}")
        if y.shape != (h.shape[0],):
            raise ValueError(f"labels must have shape ({h.shape[0]},), got {tuple(y.shape)}")
        if h.shape[0] == 0:
            return
        h = h.to(self.device, non_blocking=True)
        y = y.to(self.device, dtype=torch.int64, non_blocking=True)
        if h.dtype != torch.float64:
            h = h.to(torch.float32)
        if self.normalize:
            h = h / torch.linalg.vector_norm(h, dim=1, keepdim=True).clamp_min(torch.finfo(h.dtype).tiny)
        self._claim_shifts(h, y)
        # Rows minus their class's shift, in the rows' own precision: exact or nearly so, since both are samples of
        # the same class (the shifts are stored samples, so the float32 cast of a shift is exact).
        b, p, c = h.shape[0], self.num_features, self.num_classes
        ws = self._workspace
        shift = self.shift if h.dtype == torch.float64 else self._shift32
        batch_counts = torch.bincount(y, minlength=c)
        present = batch_counts.nonzero().squeeze(1)
        k = int(present.numel())
        # Few classes in the batch (dataset order is often sorted by class): their row sums ride along in the
        # scatter GEMM as k one-hot columns, [X | Y]^T [X | Y], for 2k/p more flops. Many classes: index_put_.
        # The one-hot block is padded with zero columns to a multiple of 16: BLAS is up to 40% slower on odd widths.
        onehot = k <= self.num_features // 16
        width = -(-(p + k) // 16) * 16 if onehot else p
        wide = ws.get("wide", b, -(-(p + max(16, p // 16)) // 16) * 16, self.gemm_dtype)[:, :width]
        shifted = wide[:, :p] if h.dtype == self.gemm_dtype else ws.get("shifted", b, p, h.dtype)
        gathered = torch.index_select(shift, 0, y, out=ws.get("gathered", b, p, h.dtype))
        torch.sub(h, gathered, out=shifted)
        if shifted.data_ptr() != wide.data_ptr():
            wide[:, :p].copy_(shifted)
        if onehot:
            column = torch.full((c,), -1, dtype=torch.int64, device=self.device)
            column[present] = torch.arange(k, device=self.device)
            wide[:, p:].zero_()
            wide[torch.arange(b, device=self.device), p + column[y]] = 1.0
        with full_precision_matmul():
            gram = torch.mm(wide.T, wide, out=ws.get("gram", width, width, self.gemm_dtype))
        gram64 = gram if gram.dtype == torch.float64 else ws.get("gram64", width, width, torch.float64).copy_(gram)
        self.scatter += gram64[:p, :p]
        self.count += batch_counts.to(torch.float64)
        if onehot:
            self.shifted_sum[present] += gram64[p:p + k, :p]
        else:
            # Per-class sums of the shifted rows in float64 (O(B p), small next to the GEMM's O(B p^2));
            # index_put_ with accumulate, not index_add_, which serialises when a batch holds one class.
            shifted64 = shifted if shifted.dtype == torch.float64 else \
                ws.get("shifted64", b, p, torch.float64).copy_(shifted)
            self.shifted_sum.index_put_((y,), shifted64, accumulate=True)
        sqnorm = torch.linalg.vector_norm(shifted, dim=1).to(torch.float64).square()  # positive terms: no cancellation
        self.shifted_sqnorm += torch.bincount(y, weights=sqnorm, minlength=c)

    def _claim_shifts(self, h: torch.Tensor, y: torch.Tensor) -> None:
        """Fix the shift of every class seen for the first time to its first row in this batch."""
        b = y.shape[0]
        first = torch.full((self.num_classes,), b, dtype=torch.int64, device=self.device)
        first.scatter_reduce_(0, y, torch.arange(b, device=self.device), reduce="amin")
        new = (first < b) & ~self.seen
        if bool(new.any()):
            classes = new.nonzero().squeeze(1)
            self.shift[classes] = h[first[classes]].to(torch.float64)
            self._shift32[classes] = h[first[classes]].to(torch.float32)
            self.seen |= new

    @torch.no_grad()
    def merge(self, other: ClassStatistics) -> ClassStatistics:
        """Add ``other``'s samples to this state (exactly: no information is lost) and return ``self``."""
        if (other.num_classes, other.num_features) != (self.num_classes, self.num_features):
            raise ValueError("cannot merge statistics of different shapes")
        if other.normalize != self.normalize:
            raise ValueError("cannot merge normalised and unnormalised statistics")
        o_count = other.count.to(self.device)
        o_seen = other.seen.to(self.device)
        o_shift = other.shift.to(self.device)
        o_sum = other.shifted_sum.to(self.device)
        o_sq = other.shifted_sqnorm.to(self.device)
        # Classes this state has not seen adopt the other's shift; the rest move the other's sums onto our shift.
        adopt = o_seen & ~self.seen
        self.shift[adopt] = o_shift[adopt]
        self._shift32[adopt] = o_shift[adopt].to(torch.float32)
        self.seen |= o_seen
        delta = torch.where(o_seen[:, None], o_shift - self.shift, torch.zeros_like(o_shift))  # D_c
        nd = o_count[:, None] * delta
        # sum_c [(u_c + n_c D_c)(u_c + n_c D_c)^T - u_c u_c^T / n_c ... ] written out without cancellation:
        # S' = S_o + U^T D + D^T U + D^T diag(n) D
        self.scatter += other.scatter.to(self.device) + o_sum.T @ delta + delta.T @ o_sum + delta.T @ nd
        self.shifted_sqnorm += o_sq + 2 * (o_sum * delta).sum(1) + o_count * delta.square().sum(1)
        self.shifted_sum += o_sum + nd
        self.count += o_count
        return self

    @torch.no_grad()
    def compute(self) -> Statistics:
        """The :class:`Statistics` of everything seen so far (float64 numpy arrays).

        Raises
        ------
        ValueError
            No sample has been seen.
        """
        n = self.count
        total = float(n.sum())
        if total == 0:
            raise ValueError("no samples were accumulated")
        safe_n = n.clamp_min(1.0)
        d = self.shifted_sum / safe_n[:, None]  # d_c = mu_c - s_c
        sigma_w = (self.scatter - d.T @ (d * n[:, None])) / total
        sigma_w = 0.5 * (sigma_w + sigma_w.T)
        variances = ((self.shifted_sqnorm - n * d.square().sum(1)) / safe_n).clamp_min(0.0)
        origin = self.shift[int(self.seen.nonzero()[0, 0])]
        # mu_c - origin = (s_c - origin) + d_c: the shift difference is exact for nearby values (Sterbenz).
        offsets = torch.where(self.seen[:, None], (self.shift - origin) + d, torch.zeros_like(d))
        as_np = lambda t: t.detach().cpu().numpy()  # noqa: E731
        return Statistics(
            counts=np.rint(as_np(n)).astype(np.int64),
            origin=as_np(origin).copy(),
            offsets=as_np(offsets),
            sigma_w=as_np(sigma_w),
            variances=as_np(variances),
            anchors=as_np(self.shift).copy(),
        )


@dataclass(frozen=True)
class Decisions:
    """Per-sample decision counts from the second pass (numpy arrays, C classes).

    Attributes
    ----------
    counts : ndarray of shape (C,), int64
        Samples per class seen in this pass.
    correct : ndarray of shape (C,), int64 or None
        Samples of class c with argmax_c' (w_c'^T h + b_c') = c (None without a classifier).
    ncc_correct : ndarray of shape (C,), int64
        Samples of class c whose nearest class mean is mu_c.
    disagree : int or None
        Samples where the classifier's and the nearest-class-mean decisions differ (NC4 numerator).
    squared_error : float or None
        sum_i ||W h_i + b - e_{y_i}||^2, evaluated sample by sample (checks the closed form of the MSE loss).
    whitened_scatter : ndarray of shape (C,)
        sum_{y_i=c} ||S^-1 U^T (h_i - mu_c)||^2, so that class c's NC1 = whitened_scatter_c / n_c.
    """

    counts: np.ndarray
    correct: np.ndarray | None
    ncc_correct: np.ndarray
    disagree: int | None
    squared_error: float | None
    whitened_scatter: np.ndarray


class SampleDecisions:
    """Second streaming pass: classifier and nearest-class-mean decisions, per-class NC1 and the direct MSE.

    The class means, the classifier and the whitener U S^-1 of Sigma_B are fixed (from the first pass). One GEMM per
    batch scores both decision rules against the columns [mu_c - mu_G | w_c]; nothing is p x p per class.

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
        As for :class:`ClassStatistics`.
    per_class
        Also accumulate the per-class NC1 sums (the per-class block of the report).
    anchors : ndarray of shape (C, p), optional
        A sample of each class (:attr:`Statistics.anchors`); used with float32 GEMMs on float32 / float16 features.

    Notes
    -----
    Scores are s_c = (h - mu_G)^T (mu_c - mu_G) - 1/2 ||mu_c - mu_G||^2 for the nearest class mean (never raw
    ||h||^2) and (h - mu_G)^T w_c + (w_c^T mu_G + b_c) for the classifier.

    With float32 GEMMs and ``anchors``, rows are centred on the anchor a_y of their own class instead of mu_G: the GEMM
    then multiplies within-class-sized numbers, and a float64 constant per (label, class) restores the same scores,
    s = (h - a_y)^T [M | W] + ((a_y - mu_G)^T [M | W] + const). The per-class NC1 reuses that product: with
    U = M V S^-1, S^-1 U^T (h - mu_y) = V^T S^-2 [(h - a_y)^T M - (mu_y - a_y)^T M], two small terms, so no float64
    pass over the features and no extra (B x p x r) GEMM are needed. Without anchors (or with float64 features, or
    normalised ones) rows are centred on mu_G in float64 and projected directly.

    A float32-scored row whose top-two margin is within the GEMM's worst-case rounding bound is decided again in
    float64, so every decision equals the float64 one.
    """

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
    ) -> None:
        self.device = torch.device(device)
        self.gemm_dtype = gemm_dtype
        self.normalize = normalize
        self.per_class = per_class
        f64 = dict(dtype=torch.float64, device=self.device)
        self.means = torch.as_tensor(means, **f64)
        self.global_mean = torch.as_tensor(global_mean, **f64)
        self.num_classes, self.num_features = self.means.shape
        centred = self.means - self.global_mean
        self.has_classifier = weight is not None
        cols = [centred]
        consts = [-0.5 * centred.square().sum(1)]
        if weight is not None:
            w = torch.as_tensor(weight, **f64)
            b = torch.zeros(self.num_classes, **f64) if bias is None else torch.as_tensor(bias, **f64)
            cols.append(w)
            consts.append(w @ self.global_mean + b)
        self._rows64 = torch.cat(cols).T.contiguous()  # (p, C or 2C)
        self._const = torch.cat(consts)
        self._rows = self._rows64.to(gemm_dtype)
        self._col_norm = torch.linalg.vector_norm(self._rows64, dim=0)
        white = torch.as_tensor(whitener, **f64)
        self._white = white.to(gemm_dtype)
        self.anchored = anchors is not None and gemm_dtype == torch.float32 and not normalize
        if self.anchored:
            a = torch.as_tensor(anchors, **f64)
            self._anchors = a.to(torch.float32)
            self._row_const = (a - self.global_mean) @ self._rows64 + self._const  # (C, C or 2C), per label
            # V S^-2 = M^T U S^-3 (C, r) and D = (mu - a) M (C, C): S^-1 U^T (h - mu_y) = (q - D[y]) V S^-2.
            self._proj = ((centred @ white) * white.square().sum(0)).to(torch.float32)
            self._mean_offsets = ((self.means - a) @ centred.T).to(torch.float32)
        self._workspace = Workspace(self.device)
        self.reset()

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
        pred = part.argmax(1)
        if row_norm is not None:
            top = part.topk(2, dim=1).values
            margin = top[:, 0] - top[:, 1]
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
        """Decide one batch: ``features`` (B, p), ``labels`` (B,) in [0, C)."""
        h = torch.as_tensor(features).to(self.device)
        y = torch.as_tensor(labels).to(self.device, dtype=torch.int64)
        b, p, c = h.shape[0], self.num_features, self.num_classes
        if b == 0:
            return
        ws = self._workspace
        ncols = self._rows.shape[1]
        low = self.gemm_dtype != torch.float64
        if self.anchored and h.dtype in (torch.float32, torch.float16):
            h = h.to(torch.float32)
            x = torch.index_select(self._anchors, 0, y, out=ws.get("x", b, p, torch.float32))
            torch.sub(h, x, out=x)  # h - a_y: within-class sized, exact for nearby values
            with full_precision_matmul():
                raw = torch.mm(x, self._rows, out=ws.get("raw", b, ncols, torch.float32))
            scores = torch.index_select(self._row_const, 0, y, out=ws.get("scores", b, ncols, torch.float64))
            scores.add_(raw)
            row_norm = torch.linalg.vector_norm(x, dim=1)
        else:
            h = ws.get("h64", b, p, torch.float64).copy_(h)
            if self.normalize:
                h /= torch.linalg.vector_norm(h, dim=1, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)
            x = torch.sub(h, self.global_mean, out=ws.get("centred", b, p, torch.float64))
            gemm_in = ws.get("centred_low", b, p, self.gemm_dtype).copy_(x) if low else x
            with full_precision_matmul():
                raw = torch.mm(gemm_in, self._rows, out=ws.get("raw", b, ncols, self.gemm_dtype))
            scores = ws.get("scores", b, ncols, torch.float64).copy_(raw).add_(self._const)
            row_norm = torch.linalg.vector_norm(x, dim=1) if low else None
        ncc_pred = self._argmax(scores, h, row_norm, slice(0, c))
        self.count += torch.bincount(y, minlength=c)
        self.ncc_correct += torch.bincount(y[ncc_pred == y], minlength=c)
        if self.has_classifier:
            pred = self._argmax(scores, h, row_norm, slice(c, 2 * c))
            self.correct += torch.bincount(y[pred == y], minlength=c)
            self.disagree += (pred != ncc_pred).sum()
            logits = scores[:, c:]
            logits[torch.arange(b, device=self.device), y] -= 1.0
            self.squared_error += torch.linalg.vector_norm(logits).square()
        if not self.per_class:
            return
        r = self._white.shape[1]
        if self.anchored and x.dtype == torch.float32:
            q = torch.index_select(self._mean_offsets, 0, y, out=ws.get("q", b, c, torch.float32))
            torch.sub(raw[:, :c], q, out=q)  # (h - mu_y)^T M as a difference of two small terms
            with full_precision_matmul():
                z = torch.mm(q, self._proj, out=ws.get("z", b, r, torch.float32))
        else:
            # h - mu_y in float64 keeps its relative precision however large the common offset.
            within = torch.index_select(self.means, 0, y, out=ws.get("within", b, p, torch.float64))
            torch.sub(h, within, out=within)
            w_in = ws.get("within_low", b, p, self.gemm_dtype).copy_(within) if low else within
            with full_precision_matmul():
                z = torch.mm(w_in, self._white, out=ws.get("z", b, r, self.gemm_dtype))
        white = torch.linalg.vector_norm(z, dim=1).to(torch.float64).square()
        self.whitened_scatter += torch.bincount(y, weights=white, minlength=c)

    #: The tensors that make up the state (all sums: merging adds them).
    STATE: tuple[str, ...] = ("count", "correct", "ncc_correct", "disagree", "squared_error", "whitened_scatter")

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The accumulated sums as CPU tensors."""
        return {name: getattr(self, name).detach().cpu() for name in self.STATE}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> SampleDecisions:
        """Replace the sums by ``state`` (from :meth:`state_dict` of a pass with the same means and classifier)."""
        for name in self.STATE:
            setattr(self, name, state[name].to(self.device, getattr(self, name).dtype).clone())
        return self

    @torch.no_grad()
    def merge(self, other: SampleDecisions) -> SampleDecisions:
        """Add ``other``'s counts and sums (it must use the same means, classifier and whitener)."""
        for name in self.STATE:
            getattr(self, name).add_(getattr(other, name).to(self.device))
        return self

    def compute(self) -> Decisions:
        as_np = lambda t: t.detach().cpu().numpy()  # noqa: E731
        return Decisions(
            counts=as_np(self.count),
            correct=as_np(self.correct) if self.has_classifier else None,
            ncc_correct=as_np(self.ncc_correct),
            disagree=int(self.disagree) if self.has_classifier else None,
            squared_error=float(self.squared_error) if self.has_classifier else None,
            whitened_scatter=as_np(self.whitened_scatter),
        )
