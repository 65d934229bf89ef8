"""Reader: a torchvision dataset already on disk (``torch/NAME``)."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ncaudit.data._source import SPLIT_NAMES, DataSource, _Items, _Paths, _Samples
from ncaudit.errors import InputError

#: Where torchvision expects each dataset's files under ``--data`` (named in the error when they are missing).
_TORCH_FILES = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python", "mnist": "MNIST/raw",
                "fashion_mnist": "FashionMNIST/raw", "kmnist": "KMNIST/raw", "qmnist": "QMNIST/raw",
                "imagenet": "meta.bin (or ILSVRC2012_devkit_t12.tar.gz) and train/ or val/"}


def _torch_split(name: str, split: str | None) -> str:
    """The split a ``torch/NAME`` dataset reads, as timm's ``create_dataset`` decides it (default: the eval one)."""
    split = split or "validation"
    kind = SPLIT_NAMES.get(split)  # None: not a split name
    if name == "imagenet":
        return "val" if kind not in (None, "train") else split
    if name in _TORCH_FILES:
        return "train" if kind == "train" else "test"
    return split


def _torchvision_dataset(name: str, root: Path, split: str) -> Any:
    """A torchvision dataset already on disk, through timm's ``create_dataset("torch/NAME")``; never downloads."""
    from timm.data import create_dataset
    try:
        return create_dataset(f"torch/{name}", root=str(root), split=split, download=False)
    except (RuntimeError, OSError, ValueError, AssertionError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        where = f"put torchvision's files at {root / _TORCH_FILES[name]}" if name in _TORCH_FILES else \
            "check --data"
        raise InputError(f"--dataset torch/{name}: not found under {root} ({first}); {where} (ncaudit never "
                         "downloads)") from None


def _open_torch(name: str, root: Path, split: str | None) -> DataSource:
    split = _torch_split(name, split)
    base = _torchvision_dataset(name, root, split)
    samples = getattr(base, "samples", None) or getattr(base, "imgs", None)
    if samples and isinstance(samples[0], (tuple, list)) and isinstance(samples[0][0], (str, os.PathLike)):
        images: Callable[[int], Any] = _Paths([str(p) for p, _ in samples])  # files: decoded by load_image
        raw = np.asarray([int(t) for _, t in samples], dtype=np.int64)
    else:
        targets = getattr(base, "targets", None)
        if targets is None:
            raise InputError(f"--dataset torch/{name}: the dataset exposes no targets; ncaudit cannot read its labels")
        raw = np.asarray(targets.tolist() if isinstance(targets, torch.Tensor) else targets, dtype=np.int64)
        raw = raw[:, 0] if raw.ndim == 2 else raw  # QMNIST: extended targets, class first
        images = _Items(base)
    wnids = getattr(base, "wnids", None)  # ImageNet: synsets, in its label order
    classes = [str(c) for c in (wnids or getattr(base, "classes", None) or range(int(raw.max()) + 1))]
    digest = hashlib.sha256(raw.tobytes())
    for p in getattr(images, "paths", []):
        digest.update(os.path.relpath(p, root).encode("utf-8", "surrogateescape"))
    return DataSource(dataset=_Samples(images, raw, None), kind=f"torch/{name}", split=split, root=root, labels=raw,
                      dataset_classes=classes, class_names=None, fingerprint=digest.hexdigest(),
                      reader=f"torchvision {type(base).__name__} (timm create_dataset)")
