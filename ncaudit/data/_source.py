"""A dataset ready for extraction (:class:`DataSource`) and the lazy, picklable image loaders behind it."""

from __future__ import annotations

import hashlib
import io
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ncaudit.data._images import load_image
from ncaudit.data._sample import LIMIT_SEED, stratified_order
from ncaudit.errors import InputError

#: Directory names of dataset splits: a folder named so records its split (timm's synonyms included).
SPLIT_NAMES = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "validation",
               "test": "test", "eval": "eval", "evaluation": "evaluation"}
#: :attr:`DataSource.reader` of :func:`tensor_source`: images in memory, no transform applied.
IN_MEMORY_READER = "in memory, already transformed"


class _Samples(torch.utils.data.Dataset):  # type: ignore[type-arg]
    """``(image tensor, model label)`` for a list of samples; ``images(i)`` loads image ``i`` lazily (picklable and
    fork-safe, for DataLoader workers)."""

    def __init__(self, images: Callable[[int], Any], labels: np.ndarray,
                 transform: Callable[[Any], torch.Tensor] | None) -> None:
        self.images = images
        self.labels = labels
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        img = self.images(index)
        x = self.transform(img) if self.transform is not None else img
        return x, int(self.labels[index])


class _Paths:
    """Images in files, decoded by :func:`load_image`."""

    def __init__(self, paths: list[str]) -> None:
        self.paths = paths

    def __call__(self, index: int) -> Image.Image:
        return load_image(self.paths[index])


class _Items:
    """The first element of ``base[index]``: a torchvision dataset of arrays (CIFAR, MNIST) or in-memory tensors."""

    def __init__(self, base: Any) -> None:
        self.base = base

    def __call__(self, index: int) -> Any:
        return self.base[index][0]


class _Rows:
    """The images of some rows of another loader: image ``i`` is the loader's image ``rows[i]``."""

    def __init__(self, images: Callable[[int], Any], rows: np.ndarray) -> None:
        self.images, self.rows = images, rows

    def __call__(self, index: int) -> Any:
        return self.images(int(self.rows[index]))


class _TarMembers:
    """Images stored in tar files (plain tars or WebDataset shards), read at recorded byte offsets: one open per
    sample, so nothing is shared between DataLoader workers."""

    def __init__(self, files: list[str], file_index: np.ndarray, offsets: np.ndarray, sizes: np.ndarray,
                 names: list[str]) -> None:
        self.files, self.file_index, self.offsets, self.sizes, self.names = files, file_index, offsets, sizes, names

    def __call__(self, index: int) -> Image.Image:
        path, size = self.files[int(self.file_index[index])], int(self.sizes[index])
        label = f"{path}:{self.names[index]}"
        try:
            with open(path, "rb") as fh:
                fh.seek(int(self.offsets[index]))
                data = fh.read(size)
        except OSError as exc:
            raise InputError(f"{label}: cannot read ({exc.strerror or exc}); check the file") from None
        if len(data) != size:
            raise InputError(f"{label}: the tar file ends inside this image; fix or replace the file")
        return load_image(io.BytesIO(data), name=label)


class _ReaderItems:
    """Images of a timm reader whose items are ``(binary file object, label)`` (Hugging Face datasets)."""

    def __init__(self, reader: Any, label: str) -> None:
        self.reader, self.label = reader, label

    def __call__(self, index: int) -> Image.Image:
        fileobj = self.reader[index][0]
        try:
            return load_image(fileobj, name=f"{self.label}[{index}]")
        finally:
            fileobj.close()


@dataclass
class DataSource:
    """A dataset ready for extraction.

    ``labels`` are model class indices once :func:`map_labels` ran (the dataset's own indices before),
    ``dataset_classes`` the dataset's class names in its label order, ``class_names`` the names to store as
    ``/class_names`` (model order) or None. ``kind`` is the dataset as ``--dataset`` names it (``folder``, ``tar``,
    ``torch/cifar10``, ``hfds/NAME``, ``wds/NAME``), ``reader`` what enumerated the samples, ``label_mapping`` how
    dataset labels became model indices; ``notes`` are remarks for the user; ``sampled_from`` is the number of samples
    before :meth:`limit` drew some (None: every sample is kept).
    """

    dataset: _Samples
    kind: str
    split: str | None
    root: Path
    labels: np.ndarray
    dataset_classes: list[str]
    class_names: list[str] | None
    fingerprint: str
    reader: str = ""
    label_mapping: str = "dataset order"
    notes: list[str] = field(default_factory=list)

    sampled_from: int | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def limit(self, n: int, seed: int = LIMIT_SEED) -> None:
        """Keep the first ``n`` rows of :func:`stratified_order` (a class-stratified, seeded sample, read in that
        order), in place; ``sampled_from`` records the size before, the fingerprint the rule (the rows follow from the
        labels it already holds). Nothing changes when ``n`` covers every row."""
        if n >= len(self.labels):
            return
        rows = stratified_order(self.labels, seed)[:n]
        self.sampled_from = len(self.labels)
        self.labels = self.labels[rows]
        self.dataset = _Samples(_Rows(self.dataset.images, rows), self.labels, self.dataset.transform)
        self.fingerprint = hashlib.sha256(f"{self.fingerprint} stratified order, seed {seed}".encode()).hexdigest()

    def set_transform(self, transform: Callable[[Any], torch.Tensor] | None) -> None:
        """Apply ``transform`` to every image from now on."""
        self.dataset.transform = transform

    @property
    def data(self) -> str:
        """Where the data are, for the provenance (a Hugging Face hub name as it is)."""
        if str(self.root) in ("", ".") or (self.kind.startswith("hfds/") and not self.root.exists()):
            return str(self.root) if str(self.root) not in ("", ".") else ""
        return str(self.root.resolve())
