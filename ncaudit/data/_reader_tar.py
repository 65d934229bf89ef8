"""Reader: a tar file of images, or a directory of tar files, read at recorded member offsets."""

from __future__ import annotations

import hashlib
import os
import tarfile
from pathlib import Path

import numpy as np

from ncaudit.data._reader_folder import _natural_order_note
from ncaudit.data._source import DataSource, _Samples, _TarMembers
from ncaudit.errors import InputError


def _is_tar_data(root: Path) -> bool:
    """A ``.tar`` file, or a directory of ``.tar`` files (one per class) without class sub-directories."""
    if root.is_file():
        return root.suffix.lower() == ".tar"
    return root.is_dir() and any(root.glob("*.tar")) and not any(p.is_dir() for p in root.iterdir())


def _open_tar(root: Path, split: str | None) -> DataSource:
    """Images in a tar file (class = the directory inside it) or in a directory of tars (class = the tar's name),
    enumerated by timm's ``ReaderImageInTar``; classes in sorted order and samples by (class, member) as an
    ImageFolder of the same images."""
    from timm.data.readers.reader_image_in_tar import ReaderImageInTar
    try:
        reader = ReaderImageInTar(str(root))
    except (AssertionError, ValueError, OSError, tarfile.TarError) as exc:
        raise InputError(f"--data {root}: cannot read images from the tar files ({str(exc) or type(exc).__name__}); "
                         "give a .tar of <class>/<image> files or a directory of <class>.tar files") from None
    classes = sorted(reader.class_name_to_idx)
    lut = np.zeros(len(classes), dtype=np.int64)
    for name, idx in reader.class_name_to_idx.items():
        lut[idx] = classes.index(name)
    labels = lut[np.asarray(reader.targets, dtype=np.int64)]
    files: dict[str, int] = {}
    rows: list[tuple[int, str, int, int, int]] = []  # (label, member, file, offset, size)
    for (member, parent, child), label in zip(reader.samples, labels.tolist()):
        path = os.path.join(str(root), parent) if parent else str(root)
        base = child.offset_data if child is not None else 0  # a tar inside a tar: offsets add up
        rows.append((label, member.name, files.setdefault(path, len(files)), base + member.offset_data, member.size))
    rows.sort(key=lambda r: (r[0], r[1]))
    raw = np.asarray([r[0] for r in rows], dtype=np.int64)
    file_index, offsets, sizes = (np.asarray([r[i] for r in rows], dtype=np.int64) for i in (2, 3, 4))
    images = _TarMembers(list(files), file_index, offsets, sizes, [r[1] for r in rows])
    digest = hashlib.sha256("".join(f"{r[1]}\t{r[0]}\t{r[4]}\n" for r in rows).encode())
    return DataSource(dataset=_Samples(images, raw, None), kind="tar", split=split, root=root, labels=raw,
                      dataset_classes=classes, class_names=None, fingerprint=digest.hexdigest(),
                      reader="timm ReaderImageInTar (classes in sorted order)", notes=_natural_order_note(classes))
