"""A network over a data loader as a :class:`~ncaudit.audit._source.BatchSource`: the penultimate features exactly as
``ncaudit extract`` takes them (:class:`ncaudit.models.FeatureRunner`), computed afresh on every pass, no file written.

:mod:`ncaudit.models` (and with it timm and torchvision) is imported only when a model is audited, so that reading a
cache (``ncaudit report``) never loads them.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from ncaudit.audit._source import LiveInfo
from ncaudit.errors import InputError


def _batch(batch: Any, labels_required: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(images, labels)`` of a loader batch: a pair (or longer tuple / list), a dict with ``image`` / ``label``-like
    keys, or (OOD data, labels not needed) images alone."""
    if isinstance(batch, torch.Tensor):
        x, y = batch, None
    elif isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        x, y = batch[0], batch[1] if len(batch) > 1 else None
    elif isinstance(batch, dict):
        x = next((batch[k] for k in ("image", "images", "pixel_values", "x", "input") if k in batch), None)
        y = next((batch[k] for k in ("label", "labels", "target", "targets", "y") if k in batch), None)
    else:
        x = y = None
    if not isinstance(x, torch.Tensor) or (labels_required and y is None):
        raise InputError(f"the loader yields {type(batch).__name__} batches; audit_model needs (images, labels) "
                         "batches (a tuple or a dict with 'image' and 'label'), labels as class indices of the model")
    if y is not None and not isinstance(y, torch.Tensor):
        y = torch.as_tensor(y)
    return x, y


def _length(loader: Iterable[Any]) -> int | None:
    """Samples the loader yields per pass, when it says (its sampler's length), else None."""
    sampler = getattr(loader, "sampler", None)
    batch_sampler = getattr(loader, "batch_sampler", None)
    if getattr(batch_sampler, "drop_last", False):
        return None
    try:
        return len(sampler) if sampler is not None else None  # type: ignore[arg-type]
    except TypeError:
        return None


class ModelSource:
    """Penultimate features of ``model`` over ``loader``; every call of :meth:`iter_batches` iterates the loader once.

    Parameters
    ----------
    model
        A timm or torchvision network (or any module whose logits come from a final linear layer); DDP / DataParallel
        / ``torch.compile`` wrappers are looked through. Its training mode is restored by :meth:`close`.
    loader
        An iterable of ``(images, labels)`` batches, labels being the model's class indices; it must yield the same
        samples every time it is iterated (order may change).
    classifier, layers
        The classifier module(s) (default: found as ``extract`` finds them); modules whose pooled outputs are
        audited as further layers (:func:`ncaudit.models.resolve_layers`).
    device, precision, channels_last
        Where and how the network runs (:class:`ncaudit.models.FeatureRunner`).
    precision_check
        With a precision other than fp32, the first K rows of the first pass are recomputed in float32 (the
        precision floor of NC1, as ``extract --precision-check``).
    """

    def __init__(self, model: nn.Module, loader: Iterable[Any], *, classifier: Any = None,
                 layers: Sequence[str] | None = None, device: torch.device | None = None, precision: str = "fp32",
                 channels_last: bool = False, num_classes: int | None = None,
                 class_names: Sequence[str] | None = None, attrs: dict[str, Any] | None = None,
                 precision_check: int = 512) -> None:
        from ncaudit import models

        self.loader = loader
        self.loaded = models.from_module(model, classifier)
        net = self.loaded.model
        if device is None:
            param = next(iter(net.parameters()), None)
            device = param.device if param is not None else torch.device("cpu")
        self.device = torch.device(device)
        self.precision = models.resolve_precision(precision, self.device)
        models.resolve_layers(net, self.loaded.library, list(layers or ()))  # refuse bad names before any hook
        self._modes = [(m, m.training) for m in net.modules()]
        net.eval()
        self.pm = models.PenultimateModel(self.loaded, list(layers or ()))
        self.runner = models.FeatureRunner(self.pm, self.device, self.precision, channels_last)
        self.num_classes = num_classes
        self.class_names = list(class_names) if class_names is not None else None
        self.attrs = dict(attrs or {})
        self.precision_check = precision_check if self.precision != "fp32" else 0
        self.labels_required = True
        self._info: LiveInfo | None = None
        self._first: tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor, Iterator[Any]] | None = None
        self._reference: list[tuple[np.ndarray, np.ndarray]] = []
        self._passes = 0

    def close(self) -> None:
        """Remove the capture hooks and restore every module's training mode."""
        self.pm.remove()
        for module, training in self._modes:
            module.train(training)

    def __enter__(self) -> ModelSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def for_loader(self, loader: Iterable[Any]) -> ModelSource:
        """The same network (hooks, verified classifier) over another loader whose labels are not read (OOD data)."""
        twin = object.__new__(ModelSource)
        twin.__dict__.update(self.__dict__)
        twin.loader, twin.labels_required, twin.precision_check = loader, False, 0
        twin._first, twin._reference, twin._passes = None, [], 0
        twin._info = LiveInfo(**{**self.info.__dict__, "n_samples": _length(loader), "layers": {},
                                 "attrs": {**self.info.attrs, "source": "OOD loader through the model in memory"}})
        return twin

    # -----------------------------------------------------------------------------------------------------------------
    # BatchSource
    # -----------------------------------------------------------------------------------------------------------------
    @property
    def info(self) -> LiveInfo:
        if self._info is None:
            self._probe()
        assert self._info is not None
        return self._info

    def _probe(self) -> None:
        """Run the first batch: derive (W, b) and check W h + b against the logits (``extract``'s check); the batch's
        features open the first pass."""
        batches = iter(self.loader)
        try:
            x, y = _batch(next(batches), True)
        except StopIteration:
            raise InputError("audit_model: the loader yielded no batches") from None
        with self.runner.running():
            feats, _ = self.runner.first(x)
        layer_feats = dict(self.pm.layer_features)
        self._note_reference(x, feats)
        self._first = (feats.float(), layer_feats, y, batches)  # type: ignore[assignment]
        pm, loaded = self.pm, self.loaded
        c = pm.weight.shape[0] if pm.weight is not None else loaded.num_classes
        if self.num_classes is not None and self.num_classes != c:
            raise InputError(f"{loaded.name}: the classifier has {c} rows but num_classes is {self.num_classes}")
        self._info = LiveInfo(
            n_features=int(feats.shape[1]), num_classes=int(c), feature_dtype="float32", n_samples=_length(self.loader),
            has_classifier=True, has_bias=pm.bias is not None, class_names=self.class_names,
            layers={name: int(v.shape[1]) for name, v in layer_feats.items()},
            attrs={"source": "model in memory", "model": loaded.name, "precision": self.precision,
                   "classifier_source": pm.source, "logit_check_max_rel_error": pm.max_logit_error,
                   "layers": list(layer_feats), **self.attrs})

    def classifier(self) -> tuple[np.ndarray, np.ndarray | None] | None:
        _ = self.info
        assert self.pm.weight is not None
        return np.asarray(self.pm.weight, dtype=np.float64), \
            None if self.pm.bias is None else np.asarray(self.pm.bias, dtype=np.float64)

    def iter_batches(self, batch_size: int, *, layers: Sequence[str] = (),
                     rows: range | None = None) -> Iterator[tuple[int, torch.Tensor, torch.Tensor, dict[str, Any]]]:
        """One pass over the loader (``batch_size`` and ``rows`` are the loader's business)."""
        _ = self.info
        self._passes += 1
        start = 0
        if self._first is not None:  # the probe's batch opens the first pass
            feats, layer_feats, y, batches = self._first
            self._first = None
            yield start, feats, self._labels(y, feats), {name: layer_feats[name] for name in layers}
            start += feats.shape[0]
        else:
            batches = iter(self.loader)
        for batch in batches:
            x, y = _batch(batch, self.labels_required)
            with self.runner.running():
                feats, _ = self.runner(x)
            layer_feats = dict(self.pm.layer_features)
            if self._passes == 1:
                self._note_reference(x, feats, start)
            feats = feats.float()
            yield start, feats, self._labels(y, feats), {name: layer_feats[name] for name in layers}
            start += feats.shape[0]

    def _labels(self, y: torch.Tensor | None, feats: torch.Tensor) -> torch.Tensor:
        return torch.zeros(feats.shape[0], dtype=torch.int64) if y is None else y

    def _note_reference(self, x: torch.Tensor, feats: torch.Tensor, start: int = 0) -> None:
        """During the first pass of a mixed-precision run: the first K rows again in float32, no autocast."""
        k = min(self.precision_check - start, x.shape[0])
        if k <= 0:
            return
        layer_feats = dict(self.pm.layer_features)
        ref = self.runner.reference(x[:k])
        self.pm.layer_features = layer_feats  # the reference run replaced them
        stored = feats[:k].float()
        self._reference.append((stored.cpu().numpy(), ref.cpu().numpy()))

    def reference_fp32(self) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        if not self._reference:
            return None
        stored = np.concatenate([s for s, _ in self._reference])
        ref = np.concatenate([r for _, r in self._reference])
        return np.arange(len(stored)), stored, ref
