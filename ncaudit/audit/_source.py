"""Where an audit's batches come from: the :class:`BatchSource` protocol the passes read, and the in-memory source.

A :class:`~ncaudit.cache.FeatureCache` is one (rows from an HDF5 file); :class:`ArraySource` serves features already in
memory (NumPy arrays or torch tensors on any device); ``ModelSource`` (:mod:`ncaudit.audit._model`) runs a network
over a data loader. The passes see only this protocol, so every source gives the same numbers for the same rows.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeAlias

import numpy as np

from ncaudit._validate import is_tensor
from ncaudit.errors import InputError

if TYPE_CHECKING:
    import torch

#: An array of features or labels: NumPy, or a torch tensor on any device.
Array: TypeAlias = "np.ndarray | torch.Tensor"


class SourceInfo(Protocol):
    """What the passes read about a source before its first row (:class:`~ncaudit.cache.CacheInfo` is one)."""

    path: Path | str | None
    n_samples: int | None
    n_rows: int | None
    n_features: int
    num_classes: int
    feature_dtype: str
    complete: bool
    has_bias: bool
    class_names: list[str] | None
    layers: dict[str, int]
    attrs: dict[str, Any]


class BatchSource(Protocol):
    """Batches of rows for the audit's passes; read as many times as the passes need.

    ``iter_batches`` yields ``(start, features (B, p), labels (B,), {layer: (B, p_layer)})`` with ``start`` the index
    of the batch's first row; ``rows`` (a contiguous range, one rank's part of a cache) may restrict it. ``classifier``
    gives the final layer ``(W (C, p), b (C,) or None)`` in float64, ``reference_fp32`` the rows recomputed in float32
    (``(index, stored features, float32 features)``) when the features were computed in lower precision.
    """

    @property
    def info(self) -> SourceInfo: ...

    def classifier(self) -> tuple[np.ndarray, np.ndarray | None] | None: ...

    def iter_batches(self, batch_size: int, *, layers: Sequence[str] = (),
                     rows: range | None = None) -> Iterator[tuple[int, Any, Any, dict[str, Any]]]: ...

    def reference_fp32(self) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None: ...


@dataclass
class LiveInfo:
    """:class:`SourceInfo` of a live source (features in memory, a model over a loader): ``path`` is None and
    ``attrs["source"]`` says what the rows are; ``n_samples`` is None when not known before the first pass."""

    n_features: int
    num_classes: int
    feature_dtype: str
    n_samples: int | None = None
    has_classifier: bool = False
    has_bias: bool = False
    class_names: list[str] | None = None
    layers: dict[str, int] = field(default_factory=dict)
    attrs: dict[str, Any] = field(default_factory=dict)
    path: Path | str | None = None
    complete: bool = True

    @property
    def n_rows(self) -> int | None:
        return self.n_samples


def dtype_name(x: Array) -> str:
    """``float32``, ``float16``, ... of a NumPy array or a torch tensor."""
    return str(x.dtype).replace("torch.", "")


def as_float64(x: Array | None) -> np.ndarray | None:
    """A host float64 copy of a classifier array (NumPy or a tensor on any device)."""
    if x is None:
        return None
    if is_tensor(x):
        import torch

        return x.detach().to("cpu", torch.float64).numpy().copy()
    return np.array(x, dtype=np.float64)


def _rows_of(x: Array, name: str) -> Array:
    if is_tensor(x):
        return x.detach()
    if isinstance(x, np.ndarray):
        return x
    raise InputError(f"{name} must be a NumPy array or a torch tensor, got {type(x).__name__}")


class ArraySource:
    """Features, labels and the classifier already in memory, served in batches of rows (views, no copies).

    Parameters
    ----------
    features : array of shape (N, p)
        NumPy or torch (any device, any float dtype); the audit runs where they are unless told otherwise.
    labels : array of shape (N,)
        Integers in [0, C).
    weight, bias : arrays of shape (C, p) and (C,), optional
        The final linear layer (``bias`` None: a bias-free head).
    num_classes
        C (default: the classifier's rows, else the largest label + 1).
    layers
        Further feature blocks ``{name: (N, p_layer)}`` (per-layer NC1, CDNV, NC2, NCC accuracy).
    class_names, attrs
        Names of the classes; provenance shown in the report's ``source`` (e.g. ``split``, ``epoch``).
    reference
        ``(index (K,), float32 features (K, p))``: rows recomputed in full precision (the precision floor).

    Raises
    ------
    InputError
        Shapes that do not agree, or not arrays.
    """

    def __init__(self, features: Array, labels: Array, weight: Array | None = None, bias: Array | None = None, *,
                 num_classes: int | None = None, layers: Mapping[str, Array] | None = None,
                 class_names: Sequence[str] | None = None, attrs: Mapping[str, Any] | None = None,
                 reference: tuple[Array, Array] | None = None, what: str = "features in memory") -> None:
        self.features = _rows_of(features, "features")
        self.labels = _rows_of(labels, "labels")
        if self.features.ndim != 2:
            raise InputError(f"{what}: features must have shape (N, p), got {tuple(self.features.shape)}")
        n, p = self.features.shape
        if tuple(self.labels.shape) != (n,):
            raise InputError(f"{what}: labels must have shape ({n},), got {tuple(self.labels.shape)}")
        if not (self.features.dtype in (np.float16, np.float32, np.float64) if isinstance(self.features, np.ndarray)
                else self.features.is_floating_point()):
            raise InputError(f"{what}: features must be floating point, got {dtype_name(self.features)}")
        w, b = as_float64(weight), as_float64(bias)
        if w is not None and (w.ndim != 2 or w.shape[1] != p):
            raise InputError(f"{what}: the classifier weight must have shape (C, {p}), got {w.shape}")
        if b is not None and (w is None or b.shape != (w.shape[0],)):
            raise InputError(f"{what}: the bias must have shape (C,) with a weight of C rows")
        self._classifier = None if w is None else (w, b)
        if num_classes is None:
            num_classes = w.shape[0] if w is not None else (int(self.labels.max()) + 1 if n else 1)
        if w is not None and w.shape[0] != num_classes:
            raise InputError(f"{what}: the classifier has {w.shape[0]} rows but num_classes is {num_classes}")
        self.layers = {name: _rows_of(v, f"layers[{name!r}]") for name, v in (layers or {}).items()}
        for name, v in self.layers.items():
            if v.ndim != 2 or v.shape[0] != n:
                raise InputError(f"{what}: layer {name!r} must have shape ({n}, p_layer), got {tuple(v.shape)}")
        self.reference = reference
        self._info = LiveInfo(n_features=p, num_classes=int(num_classes), feature_dtype=dtype_name(self.features),
                              n_samples=n, has_classifier=w is not None, has_bias=b is not None,
                              class_names=list(class_names) if class_names is not None else None,
                              layers={name: int(v.shape[1]) for name, v in self.layers.items()},
                              attrs={"source": what, **dict(attrs or {})})

    @property
    def info(self) -> LiveInfo:
        return self._info

    def classifier(self) -> tuple[np.ndarray, np.ndarray | None] | None:
        return self._classifier

    def iter_batches(self, batch_size: int, *, layers: Sequence[str] = (),
                     rows: range | None = None) -> Iterator[tuple[int, Array, Array, dict[str, Array]]]:
        n = self._info.n_samples or 0
        span = rows if rows is not None else range(n)
        for start in range(span.start, span.stop, batch_size):
            stop = min(start + batch_size, span.stop)
            yield start, self.features[start:stop], self.labels[start:stop], \
                {name: self.layers[name][start:stop] for name in layers}

    def reference_fp32(self) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        if self.reference is None:
            return None
        index = np.asarray(as_float64(self.reference[0]), dtype=np.int64)
        ref = as_float64(self.reference[1])
        if is_tensor(self.features):
            import torch

            stored = self.features[torch.as_tensor(index)]
        else:
            stored = self.features[index]
        return index, np.asarray(as_float64(stored)), np.asarray(ref)
