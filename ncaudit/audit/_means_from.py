"""Test-set collapse against the training class means (``report TEST.h5 --means-from TRAIN.h5``).

The nearest-class-mean rule of a test set measured with the test set's own class means reads the test labels; the
literature on test-set collapse measures it against the class means of the *training* features (Hui, Belkin &
Nakkiran 2022; Galanti, György & Hutter 2022). This module checks that a training cache belongs to the audited one
(same classes, feature width, model and checkpoint), streams its class means and turns a second set of decisions
into NCC accuracy, NC4 and CDNV against them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ncaudit import metrics
from ncaudit._device import torch_device
from ncaudit.audit._options import AuditOptions, ProgressTracker
from ncaudit.audit._result import _finite
from ncaudit.audit._state import _to_tensor
from ncaudit.cache import CacheInfo, FeatureCache
from ncaudit.errors import InputError
from ncaudit.stats import Decisions, Statistics

if TYPE_CHECKING:
    import torch

#: The metrics that ``--means-from`` measures against the training means (the others keep the set's own).
MEANS_FROM_METRICS = ("ncc_accuracy", "nc4", "cdnv")


@dataclass(frozen=True)
class TrainingMeans:
    """The class means of a training cache, for the classes audited.

    Attributes
    ----------
    path : str
        The training cache.
    means : ndarray of shape (C, p)
        Its class means mu_c^train (float64), in the audited classes' order.
    global_mean : ndarray of shape (p,)
        sum_c pi_c^train mu_c^train over those classes (the centre of the decision scores; the nearest mean does not
        depend on it).
    counts : ndarray of shape (C,)
        Its samples per class.
    """

    path: str
    means: np.ndarray
    global_mean: np.ndarray
    counts: np.ndarray


def _provenance_clash(train: CacheInfo, test: CacheInfo) -> str | None:
    """Why two caches cannot be a training set and a test set of one network (None: they can)."""
    if train.n_features != test.n_features:
        return f"it holds {train.n_features} features per sample, {test.path} {test.n_features}"
    if train.num_classes != test.num_classes:
        return f"it has {train.num_classes} classes, {test.path} {test.num_classes}"
    if train.class_names is not None and test.class_names is not None and train.class_names != test.class_names:
        first = next(i for i, (a, b) in enumerate(zip(train.class_names, test.class_names)) if a != b)
        return (f"its class {first} is {train.class_names[first]!r}, in {test.path} "
                f"{test.class_names[first]!r}")
    for key, what in (("model", "model"), ("checkpoint_sha256", "checkpoint (sha256)")):
        a, b = train.attrs.get(key), test.attrs.get(key)
        if a and b and a != b:
            return f"it was extracted with another {what}: {str(a)[:24]!r}, {test.path} {str(b)[:24]!r}"
    return None


def _check_classifiers(train: FeatureCache, test: FeatureCache) -> None:
    """Caches of one checkpoint hold the same final layer (when both hold one)."""
    a, b = train.classifier(), test.classifier()
    if a is None or b is None:
        return
    same = a[0].shape == b[0].shape and np.array_equal(a[0], b[0]) and (
        (a[1] is None and b[1] is None) or (a[1] is not None and b[1] is not None and np.array_equal(a[1], b[1])))
    if not same:
        raise InputError(f"--means-from {train.info.path}: its classifier differs from that of {test.info.path}, so "
                         "they come from different checkpoints; pass the training cache of the same checkpoint")


def training_means(path: str | Path, test: FeatureCache, keep: np.ndarray, options: AuditOptions,
                   device: torch.device | None, progress: ProgressTracker) -> TrainingMeans:
    """Check that the cache at ``path`` is the training cache of ``test``'s network and stream its class means.

    Raises
    ------
    InputError
        Another feature width, number or names of classes, model, checkpoint or classifier; an audited class
        without training samples; any problem reading the training cache.
    """
    with FeatureCache(path) as train:
        info = train.info
        clash = _provenance_clash(info, test.info)
        if clash is not None:
            raise InputError(f"--means-from {info.path}: not the training cache of the same network: {clash}; "
                             "pass the training split extracted from the same checkpoint")
        _check_classifiers(train, test)
        import torch

        device = torch_device(device)
        c, p = info.num_classes, info.n_features
        sums = torch.zeros(c, p, dtype=torch.float64, device=device)
        counts = torch.zeros(c, dtype=torch.float64, device=device)
        with progress.task(f"training means: {Path(path).name}", info.n_samples) as advance:
            for _, x, y, _ in train.iter_batches(options.batch_size):
                h = _to_tensor(x).to(device, torch.float64)
                labels = torch.from_numpy(y).to(device)
                if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= c):
                    raise InputError(f"--means-from {info.path}: labels outside [0, {c}); fix the cache")
                if options.normalize:
                    h = h / torch.linalg.vector_norm(h, dim=1, keepdim=True).clamp_min(torch.finfo(h.dtype).tiny)
                sums.index_add_(0, labels, h)
                counts += torch.bincount(labels, minlength=c).to(torch.float64)
                advance(len(y))
    sums_np, counts_np = sums.cpu().numpy()[keep], counts.cpu().numpy()[keep]
    empty = keep[counts_np == 0]
    if empty.size:
        raise InputError(f"--means-from {info.path}: class {int(empty[0])} has no training samples "
                         f"({empty.size} audited class(es) have none); pass a training cache that holds every class")
    if not np.isfinite(sums_np).all():
        raise InputError(f"--means-from {info.path}: the features hold NaN or Inf values; fix the cache")
    means = sums_np / counts_np[:, None]
    return TrainingMeans(str(info.path), means, (counts_np @ means) / counts_np.sum(), counts_np)


def against_training_means(train: TrainingMeans, stats: Statistics, decisions: Decisions | None,
                           m: dict[str, float | None]) -> dict[str, Any]:
    """Replace NCC accuracy, NC4 and CDNV by their values against the training means; return ``details.means_from``
    (the training cache, the metrics measured so, and their values against the set's own means). Only the keys
    that ``m`` holds are replaced (an audit of chosen ``--metrics``); NCC accuracy and NC4 need ``decisions``.

    Notes
    -----
    The decisions are those of :class:`ncaudit.stats.SampleDecisions` over the training means. The CDNV uses each
    class's spread around its training mean, (1/n_c) sum_{y_i=c} ||h_i - mu_c^train||^2
    = Var_c + ||mu_c - mu_c^train||^2, over the squared distances between training means (Galanti et al. 2022).
    """
    n = stats.n_samples
    measured = [key for key in MEANS_FROM_METRICS if key in m]
    own = {key: m.get(key) for key in measured}
    if decisions is not None and "ncc_accuracy" in m:
        m["ncc_accuracy"] = float(decisions.ncc_correct.sum()) / n
    if decisions is not None and "nc4" in m:
        m["nc4"] = None if decisions.disagree is None else float(decisions.disagree) / n
    if "cdnv" in m:
        shift = np.sum((stats.means - train.means) ** 2, axis=1)
        m["cdnv"] = _finite(metrics.cdnv(stats.variances + shift, train.means))
    return {"path": train.path, "metrics": measured, "training_samples": int(train.counts.sum()),
            "own_means": own}
