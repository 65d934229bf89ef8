"""Streaming class statistics: counts, class means, within-class and total covariance, per-class variances.

:class:`ClassStatistics` is a state accumulator in the style of a torchmetrics ``Metric``: :meth:`update` per batch,
:meth:`merge` of two states (shards, files, processes), :meth:`compute` into a frozen :class:`Statistics`, and
:meth:`reset`. It does no I/O and no distributed communication. :class:`SampleDecisions` (the second pass) and
:class:`LeastSquaresResidual` (iterative refinement of the least-squares classifier) follow the same pattern.

Accumulation scheme: a per-class shift, float64 products
--------------------------------------------------------
Each class c is shifted by a fixed sample of its own, s_c (the first one the accumulator sees). Per batch, one
symmetric rank-B update accumulates the shifted scatter, and per-class row sums accumulate alongside:

.. math::

    S = \\sum_i (h_i - s_{y_i})(h_i - s_{y_i})^T, \\quad
    u_c = \\sum_{y_i = c} (h_i - s_c), \\quad
    q_c = \\sum_{y_i = c} \\lVert h_i - s_c \\rVert^2 .

At the end, with d_c = u_c / n_c = mu_c - s_c, a single correction gives the centred scatter

.. math::

    N \\Sigma_W = S - \\sum_c n_c d_c d_c^T, \\qquad n_c \\mathrm{Var}_c = q_c - n_c \\lVert d_c \\rVert^2 .

Because s_c is a sample of class c, the shifted rows are of the size of the within-class spread, not of the
features' common offset: nothing cancels catastrophically even when Sigma_W is 1e-10 of the class means (the
raw-moment formula E[h h^T] - mu mu^T loses every digit there). The shifted rows are formed in float64 (exact for
float16 / float32 features) and multiplied in float64: the least-squares classifier needs Sigma_T in *every*
direction, and real penultimate features have spectra that decay over ten or more decades, far below what a float32
product resolves (its error is ~1e-7 of the largest eigenvalue in every direction). On the CPU the product is a
symmetric rank-k update (BLAS ``syrk``, half the flops of a general X^T X); ``gemm_dtype=float32`` is kept for
comparison only and reports an error bound to match. Every accumulator is float64; the update costs one p x p
product per batch whatever the class mix (caches in dataset order often hold one class per batch); with few classes
(C <= p/16) their sums u_c come out of the same product through C one-hot columns appended to the rows.

No host synchronisation per batch: on CUDA the update queues kernels only (no ``.item()``, ``nonzero``, boolean
indexing, ``bincount`` or data-dependent shape; the first-row shifts are claimed with masked writes), so it can ride
along a training or evaluation loop without stalling it. On the CPU the element-wise work runs in NumPy over blocks of
rows that stay in cache, around the same BLAS product.

:meth:`merge` re-expresses the other state's sums around this state's shifts (exact algebra:
S += sum_c [n_c D_c D_c^T + u_c D_c^T + D_c u_c^T] with D_c = s_c^{other} - s_c), so the result does not depend on
how the data were split, batched or ordered beyond floating-point rounding. TF32 and reduced-precision GEMMs are
switched off while updating, whatever the global torch setting.

The rounding error of the accumulated scatter is bounded (probabilistically, Higham & Mary 2019) by
u * sqrt(n) * tr(S) in spectral norm, with u the unit roundoff of the product and n the rows per product;
:attr:`Statistics.error_bound` carries that bound for Sigma_W, and the pseudo-inverse of Sigma_T never keeps an
eigenvalue below it.
"""

from __future__ import annotations

import numpy as np
import torch

from ncaudit import _device
from ncaudit.stats._gemm import Workspace, gram
from ncaudit.stats._host import Scratch
from ncaudit.stats._host_statistics import check_batch, error_bound, host_update, statistics_from_state
from ncaudit.stats._results import Statistics
from ncaudit.stats._state import _State


class ClassStatistics(_State):
    """Streaming, mergeable accumulator of the class statistics of features ``h`` with labels ``y``.

    Parameters
    ----------
    num_classes
        C; labels must lie in [0, C).
    num_features
        p.
    device
        Where the accumulators live and the products run (``cpu``, ``cuda``); results are identical up to rounding.
    gemm_dtype
        dtype of the per-batch scatter product on shifted rows: float64 (default, what the least-squares classifier
        needs) or float32 (a comparison scheme only: it resolves Sigma_W to ~1e-7 of its largest eigenvalue).
        Accumulators are float64 either way.
    normalize
        Project every feature onto the unit sphere, h / ||h||, before accumulating (``report --normalize``).

    Notes
    -----
    Memory is O(p^2 + C p), independent of the number of samples. See the module docstring for the scheme.
    """

    #: The tensors that make up the state (everything :meth:`merge` reads).
    STATE: tuple[str, ...] = ("count", "seen", "shift", "shifted_sum", "shifted_sqnorm", "scatter", "max_rows",
                              "products")

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
        if gemm_dtype not in (torch.float64, torch.float32):
            raise ValueError(f"gemm_dtype must be float64 or float32, got {gemm_dtype}")
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
        self.shifted_sum = torch.zeros(c, p, dtype=f64, device=dev)
        self.shifted_sqnorm = torch.zeros(c, dtype=f64, device=dev)
        self.scatter = torch.zeros(p, p, dtype=f64, device=dev)
        self.max_rows = torch.zeros((), dtype=f64, device=dev)  # rows of the largest product (error bound)
        self.products = torch.zeros((), dtype=f64, device=dev)  # products added into the scatter (error bound)
        self._workspace = Workspace(dev)
        self._scratch = Scratch()
        self._host = dev.type == "cpu" and _device.HOST_NUMPY  # NumPy on the CPU; the sync-free path elsewhere

    @torch.no_grad()
    def update(self, features: torch.Tensor | np.ndarray, labels: torch.Tensor | np.ndarray) -> None:
        """Accumulate one batch: ``features`` (B, p), any float dtype; ``labels`` (B,) integers in [0, C).

        Shapes are checked here; label range and finiteness are the caller's checks (:mod:`ncaudit._validate`, or
        the deferred device-side checks of :mod:`ncaudit.audit`). No host synchronisation on any device: no
        ``.item()``, no data-dependent shape, no Python branch on a tensor's value (see :meth:`_prepare_device`).
        """
        h = torch.as_tensor(features)
        y = torch.as_tensor(labels)
        if not check_batch(tuple(h.shape), tuple(y.shape), self.num_features):
            return
        if self._host:
            self._update_host(h.cpu(), y.cpu())
            return
        y = y.to(self.device, dtype=torch.int64, non_blocking=True)
        h = h.to(self.device, non_blocking=True)
        b, p, c = h.shape[0], self.num_features, self.num_classes
        # Few classes (C <= p/16, a static choice: no look at the labels): the per-class row sums ride along in the
        # scatter product as C one-hot columns, [X | Y]^T [X | Y], for 2C/p more flops; otherwise index_put_. The
        # width is padded with zero columns to a multiple of 16: BLAS is up to 40% slower on odd widths.
        onehot = c <= p // 16
        width = -(-(p + c) // 16) * 16 if onehot else p
        ws = self._workspace
        wide = ws.get("wide", b, width, torch.float64)
        x = wide[:, :p]
        # x = h - s_y in float64 (exact for float16 / float32 features: both are samples), ||x_i||^2 per row.
        sqnorm = self._prepare_device(h, y, x)
        if onehot:
            wide[:, p:].zero_()
            wide[torch.arange(b, device=self.device), p + y] = 1.0
        if self.gemm_dtype == torch.float64:
            product = gram(wide, ws.get("gram", width, width, torch.float64))
        else:
            low = ws.get("wide_low", b, width, self.gemm_dtype).copy_(wide)
            product = ws.get("gram", width, width, torch.float64).copy_(
                gram(low, ws.get("gram_low", width, width, self.gemm_dtype)))
        self.scatter += product[:p, :p]
        ones = torch.ones((), dtype=torch.float64, device=self.device).expand(b)
        self.count.index_add_(0, y, ones)
        if onehot:
            self.shifted_sum += product[p:p + c, :p]
        else:
            # index_put_ with accumulate, not index_add_, which serialises when a batch holds one class.
            self.shifted_sum.index_put_((y,), x, accumulate=True)
        self.shifted_sqnorm.index_add_(0, y, sqnorm)  # positive terms: no cancellation
        self.max_rows.clamp_(min=float(b))
        self.products += 1.0

    def _update_host(self, h: torch.Tensor, y: torch.Tensor) -> None:
        """CPU: the whole update in NumPy on views of the state (:func:`~ncaudit.stats._host_statistics.host_update`),
        no torch operation (torch's OpenMP threads, woken by an element-wise op, spin and take the cores of the BLAS
        product in a process without ``OMP_WAIT_POLICY=PASSIVE``)."""
        if h.dtype not in (torch.float16, torch.float32, torch.float64):
            h = h.to(torch.float32)  # bfloat16 has no NumPy dtype: exact in float32
        state = {name: getattr(self, name).numpy() for name in self.STATE}
        host_update(state, h.detach().numpy(), y.detach().numpy().astype(np.int64, copy=False),
                    normalize=self.normalize, gemm=str(self.gemm_dtype).replace("torch.", ""), scratch=self._scratch)

    def _prepare_device(self, h: torch.Tensor, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Any device, without host synchronisation: shifts claimed with masked writes (no ``nonzero``, no Python
        branch on a tensor), ``x = h - s_y``, the squared row norms."""
        x.copy_(h)  # float16 / float32 -> float64 is exact
        if self.normalize:
            x /= torch.linalg.vector_norm(x, dim=1, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)
        self._claim_shifts(x, y)
        x -= torch.index_select(self.shift, 0, y, out=self._workspace.get("gathered", x.shape[0], x.shape[1],
                                                                          torch.float64))
        return torch.linalg.vector_norm(x, dim=1).square()

    def _claim_shifts(self, h: torch.Tensor, y: torch.Tensor) -> None:
        """Fix the shift of every class seen for the first time to its first row in this batch (sync-free).

        Every class's first row in the batch is found with a scatter-min; a class not seen before takes it through a
        masked write over C rows (or, when C exceeds the batch, an accumulating write of the B rows masked to the
        claiming ones onto the class's zero shift). Shapes depend on C and B only, never on the labels' values.
        """
        b, c = y.shape[0], self.num_classes
        dev = self.device
        first = torch.full((c,), b, dtype=torch.int64, device=dev)
        first.scatter_reduce_(0, y, torch.arange(b, device=dev), reduce="amin")
        new = (first < b) & ~self.seen
        if c <= b:
            rows = torch.index_select(h, 0, first.clamp(max=b - 1))
            torch.where(new[:, None], rows, self.shift, out=self.shift)
        else:
            claim = new[y] & (first[y] == torch.arange(b, device=dev))
            self.shift.index_put_((y,), torch.where(claim[:, None], h, torch.zeros((), dtype=h.dtype, device=dev)),
                                  accumulate=True)
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
        self.seen |= o_seen
        delta = torch.where(o_seen[:, None], o_shift - self.shift, torch.zeros_like(o_shift))  # D_c
        nd = o_count[:, None] * delta
        # S' = S_o + U^T D + D^T U + D^T diag(n) D
        self.scatter += other.scatter.to(self.device) + o_sum.T @ delta + delta.T @ o_sum + delta.T @ nd
        self.shifted_sqnorm += o_sq + 2 * (o_sum * delta).sum(1) + o_count * delta.square().sum(1)
        self.shifted_sum += o_sum + nd
        self.count += o_count
        self.max_rows = torch.maximum(self.max_rows, other.max_rows.to(self.device))
        self.products += other.products.to(self.device) + 1.0
        return self

    def _host_state(self) -> dict[str, np.ndarray]:
        return {name: getattr(self, name).detach().cpu().numpy() for name in self.STATE}

    def error_bound(self) -> float:
        """Bound on ||computed - exact||_2 of Sigma_W: u_gemm sqrt(rows per product) tr(S)/N plus the float64
        accumulation of the products, u_64 sqrt(products) tr(S)/N (probabilistic bounds, Higham & Mary 2019)."""
        names = ("count", "shifted_sqnorm", "max_rows", "products")  # not the p x p scatter
        return error_bound({name: getattr(self, name).detach().cpu().numpy() for name in names},
                           str(self.gemm_dtype).replace("torch.", ""))

    @torch.no_grad()
    def compute(self) -> Statistics:
        """The :class:`Statistics` of everything seen so far (float64 numpy arrays; the closed form of
        :func:`~ncaudit.stats._host_statistics.statistics_from_state`, on the host whatever the device).

        Raises
        ------
        ValueError
            No sample has been seen.
        """
        if self._host:
            self._scratch.clear()
            _device.release_free_memory()  # the batches of the pass just read
        return statistics_from_state(self._host_state(), str(self.gemm_dtype).replace("torch.", ""))
