"""The frozen results of the passes: :class:`Statistics` (pass 1), :class:`Decisions` (pass 2) and
:class:`Residual` (a refinement step of the least-squares classifier), NumPy arrays
whatever device accumulated them (no torch here: the report of a cache on the CPU runs without it)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


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
    error_bound : float
        Bound on the spectral norm of the rounding error of ``sigma_w`` (u sqrt(n) tr(S) / N, see the module notes);
        eigenvalues of Sigma_T below it are not resolved by how the statistics were accumulated.
    gemm_dtype : str
        dtype of the products that accumulated the scatter (``float64``; ``float32`` only in comparisons).
    """

    counts: np.ndarray
    origin: np.ndarray
    offsets: np.ndarray
    sigma_w: np.ndarray
    variances: np.ndarray
    anchors: np.ndarray | None = None
    error_bound: float = 0.0
    gemm_dtype: str = "float64"

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
        if np.array_equal(classes, np.arange(self.n_classes)):
            return self  # every class, in order: no copy of the (C, p) arrays
        if self.counts[classes].sum() != self.counts.sum():
            raise ValueError("select() may only leave out classes without samples")
        anchors = None if self.anchors is None else self.anchors[classes]
        return Statistics(self.counts[classes], self.origin, self.offsets[classes], self.sigma_w,
                          self.variances[classes], anchors, self.error_bound, self.gemm_dtype)


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


@dataclass(frozen=True)
class Residual:
    """Sums over the samples for one iterative-refinement step of the least-squares classifier W_0.

    Attributes
    ----------
    gradient : ndarray of shape (C, p)
        (1/N) sum_i r_i (h_i - mu_G)^T with r_i = (e_{y_i} - pi) - W_0 (h_i - mu_G): Sigma_YH - W_0 Sigma_T,
        the residual of the normal equations, evaluated on the samples.
    loss : float
        (1/2N) sum_i ||r_i||^2 = L(W_0, b_0), the loss of W_0 evaluated sample by sample.
    n_samples : int
    """

    gradient: np.ndarray
    loss: float
    n_samples: int
