"""The audit from Python, without a cache file: :func:`audit_features` (arrays or tensors in memory) and
:func:`audit_model` (a network over a data loader, e.g. every few epochs of a training run).

Both run the passes of ``ncaudit report`` (:func:`~ncaudit.audit._audit.audit_source`), so for the same features they
give the same numbers as ``extract`` + ``report``, and the same :class:`~ncaudit.audit.AuditResult`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from ncaudit._device import host_threads, resolve_device
from ncaudit.audit._audit import audit_source
from ncaudit.audit._options import AuditOptions, ProgressTracker
from ncaudit.audit._result import AuditResult
from ncaudit.audit._source import Array, ArraySource


def distributed_default(distributed: bool | None) -> bool:
    """``distributed`` as given, else whether this process is one of several ranks of the default process group."""
    if distributed is not None:
        return distributed
    from ncaudit.distributed import is_active, world_size

    return is_active() and world_size() > 1


def _device_of(x: Any, device: str | torch.device | None) -> torch.device:
    if device is not None:
        return resolve_device(device)
    return x.device if isinstance(x, torch.Tensor) else torch.device("cpu")


def _host_view(x: Any) -> np.ndarray | None:
    """A NumPy view of a NumPy array or a CPU tensor of a NumPy dtype (no copy); None for anything else."""
    if isinstance(x, np.ndarray):
        return x
    if isinstance(x, torch.Tensor) and x.device.type == "cpu" and x.dtype in (
            torch.float16, torch.float32, torch.float64, torch.int64, torch.int32, torch.int16, torch.int8,
            torch.uint8):
        return x.detach().numpy()
    return None


def audit_features(
    features: Array,
    labels: Array,
    weight: Array | None = None,
    bias: Array | None = None,
    *,
    num_classes: int | None = None,
    layers: Mapping[str, Array] | None = None,
    ood_features: Array | None = None,
    reference: tuple[Array, Array] | None = None,
    class_names: Sequence[str] | None = None,
    attrs: Mapping[str, Any] | None = None,
    device: str | torch.device | None = None,
    batch_size: int = 4096,
    normalize: bool = False,
    ridge: float = 0.0,
    rcond: float | None = None,
    drop_empty_classes: bool = False,
    distributed: bool | None = None,
    float64_decisions: bool | None = None,
    progress: ProgressTracker | None = None,
    metrics: Sequence[str] | None = None,
    per_class: bool = False,
) -> AuditResult:
    """Every metric of ``ncaudit report`` for features already in memory.

    Parameters
    ----------
    features : array of shape (N, p)
        Penultimate features, NumPy or torch on any device, any float dtype (float16 / bfloat16 are widened to float32
        exactly; the statistics are float64-accurate either way).
    labels : array of shape (N,)
        Class indices in [0, C).
    weight, bias : arrays of shape (C, p) and (C,), optional
        The final linear layer; without it the classifier metrics (NC2 of W, NC3, NC4, least squares) are null.
    num_classes
        C (default: the rows of ``weight``, else the largest label + 1).
    layers
        Earlier layers' features ``{name: (N, p_layer)}`` (the report's per-layer block).
    ood_features : array of shape (N_ood, p), optional
        Out-of-distribution features of the same network: adds ``nc5``.
    reference
        ``(row index (K,), float32 features (K, p))`` when ``features`` were computed in lower precision: the NC1
        precision floor.
    class_names, attrs
        Class names; provenance kept in the result's ``source`` (e.g. ``{"split": "train", "epoch": 3}``).
    device
        Where the passes run (default: where ``features`` are).
    batch_size, normalize, ridge, rcond, drop_empty_classes
        As the ``report`` flags (:class:`~ncaudit.audit.AuditOptions`).
    distributed
        Each rank passes its own shard and every pass merges exactly across the ranks of the default process group,
        so that every rank returns the result of all the rows (default: when a group of several ranks is active; then
        every rank must call this function).
    float64_decisions
        Decide with float64 products (default: on any device but the CPU, where the float32 products of ``report``
        with a float64 recheck of close calls are used).
    progress
        A :class:`~ncaudit.audit.ProgressTracker` (default: none).
    metrics, per_class
        The metric keys to compute (default: every one; ``["nc1"]`` reads the rows once) and, with them, the
        per-class values of the chosen ones (:class:`~ncaudit.audit.AuditOptions`, ``report --metrics``).

    Returns
    -------
    AuditResult
        Renders as ``report`` does (:func:`ncaudit.render_text`, :func:`ncaudit.render_json`); ``result.check([...])``
        evaluates ``--fail-if`` thresholds.

    Raises
    ------
    InputError
        Shapes that disagree, labels outside [0, C), NaN / Inf features, an empty class (without
        ``drop_empty_classes``), OOD features of another width.

    Notes
    -----
    The rows are read in batches of ``batch_size`` (views, no copy): once for the statistics, once for the decisions,
    and again for each refinement step of the least-squares classifier its error estimate asks for.
    """
    dev = _device_of(features, device)
    distributed = distributed_default(distributed)
    host = dev.type == "cpu" and not distributed and not float64_decisions
    if host:  # NumPy views of CPU arrays: the passes run in NumPy, as for a cache (no torch operation per batch)
        arrays = [features, labels, ood_features, *(layers or {}).values()]
        host = all(x is None or _host_view(x) is not None for x in arrays)
    if host:
        features, labels = _host_view(features), _host_view(labels)
        ood_features = None if ood_features is None else _host_view(ood_features)
        layers = None if layers is None else {name: _host_view(x) for name, x in layers.items()}
    source = ArraySource(features, labels, weight, bias, num_classes=num_classes, layers=layers,
                         class_names=class_names, attrs=attrs, reference=reference)
    ood = None
    if ood_features is not None:
        n_ood = ood_features.shape[0]
        dummy = torch.zeros(n_ood, dtype=torch.int64, device=ood_features.device) \
            if isinstance(ood_features, torch.Tensor) else torch.zeros(n_ood, dtype=torch.int64).numpy()
        ood = ArraySource(ood_features, dummy, num_classes=1, what="OOD features in memory")
    options = AuditOptions(batch_size=batch_size, device=str(dev), ridge=ridge, rcond=rcond,
                           drop_empty_classes=drop_empty_classes, normalize=normalize,
                           layers=[] if source.layers else None, metrics=metrics, per_class=per_class)
    with host_threads(dev):  # on the CPU the products are NumPy's: torch's pool must not spin beside them
        return audit_source(source, options, progress, distributed=distributed, device=dev, ood=ood,
                            float64_decisions=float64_decisions, host=host)


def audit_model(
    model: nn.Module,
    loader: Iterable[Any],
    *,
    classifier: str | nn.Module | Sequence[str | nn.Module] | None = None,
    layers: Sequence[str] | None = None,
    device: str | torch.device | None = None,
    precision: str = "fp32",
    channels_last: bool = False,
    normalize: bool = False,
    ridge: float = 0.0,
    rcond: float | None = None,
    num_classes: int | None = None,
    class_names: Sequence[str] | None = None,
    ood_loader: Iterable[Any] | None = None,
    drop_empty_classes: bool = False,
    precision_check: int = 512,
    attrs: Mapping[str, Any] | None = None,
    distributed: bool | None = None,
    float64_decisions: bool | None = None,
    progress: ProgressTracker | None = None,
    metrics: Sequence[str] | None = None,
    per_class: bool = False,
) -> AuditResult:
    """Every metric of ``ncaudit report`` for a network over a data loader, with no cache file.

    The penultimate features are taken exactly as ``ncaudit extract`` takes them (:class:`ncaudit.models.FeatureRunner`:
    the classifier's input captured by a forward pre-hook, the classifier found by timm's ``get_classifier()`` or as
    the last ``nn.Linear``, and W h + b checked against the model's logits on the first batch).

    Parameters
    ----------
    model
        A timm or torchvision network (or any module whose logits come from one final linear layer; wrappers of DDP,
        DataParallel and ``torch.compile`` are looked through). It runs in eval mode under ``torch.inference_mode``;
        every module's training mode is restored afterwards, and no hook is left behind.
    loader
        Yields ``(images, labels)`` batches (labels: the model's class indices), already transformed. It is iterated
        once per pass and must yield the same samples each time (order may change; no random augmentation, no
        ``drop_last`` with shuffling). Under DDP each rank's loader yields its own shard without repeats
        (``DistributedSampler`` pads the last shard with repeated samples: use ``Subset(dataset,
        ncaudit.distributed.rank_rows(len(dataset)))`` instead).
    classifier
        The classifier module(s), by name or as modules (default: as ``extract`` finds them).
    layers
        Module names whose pooled outputs are audited too (``extract --layers``).
    device, precision, channels_last
        Where the batches go and the passes run (default: where the network's parameters are; the network is not
        moved); ``fp32`` (default; TF32 and any caller's autocast off), ``bf16`` or ``fp16`` autocast (then the first
        ``precision_check`` rows are recomputed in float32 for the NC1 precision floor); channels-last inputs.
    ood_loader
        Out-of-distribution images through the same network (labels, if any, are not read): adds ``nc5``.
    normalize, ridge, rcond, drop_empty_classes, num_classes, class_names, attrs, distributed, float64_decisions,
    progress, metrics, per_class
        As for :func:`audit_features` (with ``metrics`` that need no second pass, the loader is iterated once).

    Returns
    -------
    AuditResult

    Raises
    ------
    InputError
        A model without a final linear layer, W h + b that misses the logits, bad batches or labels, a loader that
        yields different samples on the second pass.

    Notes
    -----
    The loader is iterated **twice**: pass 1 (class statistics; its first batch also derives and checks W, b) and
    pass 2 (per-sample decisions, per-class NC1, and the first refinement sums of the least-squares classifier). Only
    when the least-squares classifier's estimated relative error exceeds 1e-7 (a Sigma_T with eigenvalues near its
    rounding level) does it take up to **two more** passes (at most three refinement steps in all, stopping once a
    step changes W_LS by less than 1e-5); ``ood_loader`` is iterated once.
    """
    from ncaudit.audit._model import ModelSource

    with ModelSource(model, loader, classifier=classifier, layers=layers,
                     device=None if device is None else resolve_device(device), precision=precision,
                     channels_last=channels_last, num_classes=num_classes, class_names=class_names,
                     attrs=dict(attrs or {}), precision_check=precision_check) as source:
        ood = None if ood_loader is None else source.for_loader(ood_loader)
        options = AuditOptions(batch_size=getattr(loader, "batch_size", None) or 1, device=str(source.device),
                               ridge=ridge, rcond=rcond, drop_empty_classes=drop_empty_classes, normalize=normalize,
                               layers=[] if layers else None, metrics=metrics, per_class=per_class)
        return audit_source(source, options, progress, distributed=distributed_default(distributed),
                            device=source.device, ood=ood, float64_decisions=float64_decisions)
