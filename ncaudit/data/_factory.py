"""Opening a dataset by ``--dataset`` / ``--data`` / ``--split``: the reader for each format, labels mapped to the
model's classes; in-memory tensors as a source."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ncaudit.data._labels import map_labels
from ncaudit.data._reader_folder import _open_folder
from ncaudit.data._reader_hfds import _open_hfds
from ncaudit.data._reader_tar import _is_tar_data, _open_tar
from ncaudit.data._reader_torch import _open_torch
from ncaudit.data._reader_wds import _open_wds
from ncaudit.data._source import IN_MEMORY_READER, DataSource, _Items, _Samples
from ncaudit.errors import InputError

#: The torchvision datasets ``--dataset`` names without a prefix (kept for compatibility), as timm names them.
TORCH_ALIASES = {"cifar10": "cifar10", "cifar100": "cifar100", "mnist": "mnist", "fashionmnist": "fashion_mnist",
                 "fashion_mnist": "fashion_mnist", "kmnist": "kmnist", "qmnist": "qmnist"}


def dataset_family(dataset: str | None) -> tuple[str, str]:
    """``(family, name)`` of a ``--dataset`` value: ``folder`` (also ``imagefolder``, ``""``), ``tar``, ``torch``
    (``torch/NAME``, or a bare ``cifar10``, ``mnist``, ...), ``hfds`` or ``wds``, as timm's ``create_dataset`` names
    them."""
    text = (dataset or "").strip()
    low = text.lower()
    if low in ("", "imagefolder", "folder", "image_folder"):
        return "folder", ""
    if low == "tar":
        return "tar", ""
    if low in TORCH_ALIASES:
        return "torch", TORCH_ALIASES[low]
    prefix, sep, rest = text.partition("/")
    prefix = prefix.lower()
    if sep and rest and prefix == "torch":
        return "torch", TORCH_ALIASES.get(rest.lower(), rest.lower())
    if sep and rest and prefix in ("hfds", "wds"):
        return prefix, rest
    if prefix in ("hfids", "tfds"):
        raise InputError(f"--dataset {dataset}: streaming ({prefix}/) datasets are not read; use hfds/NAME for a "
                         "Hugging Face dataset on disk or in its cache")
    raise InputError(f"--dataset {dataset!r}: use folder (default; an image folder or tar files), torch/NAME (e.g. "
                     "torch/cifar10, torch/imagenet), hfds/NAME or wds/NAME")


def open_samples(data: str | os.PathLike[str] | None, *, dataset: str | None = None,
                 split: str | None = None) -> DataSource:
    """Open a dataset without a transform, its labels in the dataset's own order (see :func:`map_labels`).

    Parameters
    ----------
    data
        The root: an image folder (one sub-directory per class; ``data/split`` or a synonym when ``split`` names
        one), a ``.tar`` of ``<class>/<image>`` files or a directory of ``<class>.tar`` files, the root of a
        torchvision dataset, a directory of WebDataset shards, or for ``hfds/`` the datasets cache (optional).
    dataset
        ``folder`` (default), ``tar``, ``torch/NAME`` (``cifar10``, ``mnist``, ``imagenet``, ...), ``hfds/NAME``,
        ``wds/NAME``.
    split
        torchvision: ``train`` or the eval split (default); Hugging Face: a split name (default validation, else
        test); WebDataset: a split of the info file or a shard pattern; folders: a sub-directory.

    Raises
    ------
    InputError
        Missing data, no samples, an unknown format or split.
    """
    family, name = dataset_family(dataset)
    root = Path(data).expanduser() if data is not None else None
    if family == "hfds":
        src = _open_hfds(name, root, split)
    else:
        if root is None:
            raise InputError("--data is missing; give the dataset's root directory (or file)")
        if not root.exists():
            raise InputError(f"--data {root}: no such file or directory; give an image folder, a tar file or a "
                             "dataset root")
        if family == "folder" and _is_tar_data(root):
            family = "tar"
        if family in ("folder", "tar") and root.is_file() and root.suffix.lower() != ".tar":
            raise InputError(f"--data {root}: not a directory or a .tar file; give an image folder (one "
                             "sub-directory per class) or a tar of images")
        opener = {"folder": _open_folder, "tar": _open_tar}.get(family)
        src = opener(root, split) if opener else _open_torch(name, root, split) if family == "torch" else \
            _open_wds(name, root, split)
    if len(src) == 0:
        raise InputError(f"--data {root or dataset}: the dataset holds no samples")
    return src


def open_dataset(
    data: str | os.PathLike[str] | None,
    *,
    dataset: str | None = "folder",
    split: str | None = None,
    class_map: str | os.PathLike[str] | None = None,
    transform: Callable[[Any], torch.Tensor] | None = None,
) -> DataSource:
    """:func:`open_samples`, then :func:`map_labels` with ``class_map``, then ``transform`` on every image."""
    src = map_labels(open_samples(data, dataset=dataset, split=split), class_map=class_map)
    src.set_transform(transform)
    return src


def tensor_source(images: torch.Tensor, labels: torch.Tensor | np.ndarray | Sequence[int], *,
                  class_names: Sequence[str] | None = None, name: str = "tensors") -> DataSource:
    """A :class:`DataSource` over images already transformed in memory, ``images`` of shape (N, 3, H, W).

    For benchmarks, demos and callers with their own preprocessing; no transform is applied. The fingerprint
    hashes the labels and the image bytes, so ``resume`` recognises the same tensors.
    """
    y = np.asarray(labels.tolist() if isinstance(labels, torch.Tensor) else labels, dtype=np.int64)
    if images.ndim != 4 or images.shape[0] != len(y):
        raise InputError(f"in-memory images have shape {tuple(images.shape)} for {len(y)} labels; expected "
                         "(N, C, H, W) with one label per image")
    digest = hashlib.sha256(y.tobytes())
    digest.update(images.detach().cpu().contiguous().numpy().tobytes())
    classes = list(class_names) if class_names is not None else [str(c) for c in range(int(y.max()) + 1)]
    base = torch.utils.data.TensorDataset(images)
    return DataSource(dataset=_Samples(_Items(base), y, None), kind=name, split=None, root=Path("."), labels=y,
                      dataset_classes=classes, class_names=list(class_names) if class_names is not None else None,
                      fingerprint=digest.hexdigest(), reader=IN_MEMORY_READER)
