"""Reader: a tar file of images, or a directory of tar files, indexed exactly once and read at member offsets."""

from __future__ import annotations

import hashlib
import posixpath
from pathlib import Path

import numpy as np

from ncaudit._validate import regular_file
from ncaudit.data._archives import tar_members
from ncaudit.data._reader_folder import _natural_order_note
from ncaudit.data._source import DataSource, _Samples, _TarMembers
from ncaudit.errors import InputError


def _is_tar_data(root: Path) -> bool:
    """A ``.tar`` file (or anything named so: it is checked to be a regular file when read), or a directory of
    ``.tar`` files (one per class) without class sub-directories."""
    if not root.is_dir():
        return root.suffix.lower() == ".tar"
    return any(root.glob("*.tar")) and not any(p.is_dir() for p in root.iterdir())


def _image(name: str) -> bool:
    from timm.data.readers.img_extensions import get_img_extensions
    return posixpath.splitext(name)[1].lower() in get_img_extensions(as_set=True)


def _leaf(*parts: str) -> str:
    """The class of a sample as timm's ``ReaderImageInTar`` names it: the last directory of its path."""
    return posixpath.join(*parts).strip("/").split("/")[-1]


def _index(tar: Path, parent: str) -> list[tuple[str, str, int, int]]:
    """``(class, member, offset, size)`` of the images in ``tar`` and in the tars it holds (one level, as timm)."""
    rows = []
    for m in tar_members(tar, wanted=lambda name: _image(name) or name.lower().endswith(".tar")):
        directory, base = posixpath.split(m.name)
        stem, ext = posixpath.splitext(base)
        if ext.lower() == ".tar":
            child = f"{tar}:{m.name}"
            with open(tar, "rb") as fh:
                inner = tar_members(tar, fh=fh, start=m.offset, size=m.size, label=child,
                                    wanted=lambda name: _image(name) or name.lower().endswith(".tar"))
            for c in inner:
                if c.name.lower().endswith(".tar"):
                    raise InputError(f"{child}: holds the tar {c.name!r}, a third level of archives; unpack one "
                                     "level (ncaudit reads tars and tars of tars)")
                if _image(c.name):
                    rows.append((_leaf(parent, stem, posixpath.dirname(c.name)), c.name, c.offset, c.size))
        elif _image(m.name):
            rows.append((_leaf(parent, directory), m.name, m.offset, m.size))
    return rows


def _open_tar(root: Path, split: str | None) -> DataSource:
    """Images in a tar file (class = the directory inside it) or in a directory of tars (class = the tar's name),
    labelled as timm's ``ReaderImageInTar`` labels them, each archive read exactly (:mod:`ncaudit.data._archives`);
    classes in sorted order and samples by (class, member) as an ImageFolder of the same images."""
    single = not root.is_dir()
    tars = [root] if single else sorted(p for p in root.glob("*.tar"))
    files: list[str] = []
    rows: list[tuple[str, str, int, int, int]] = []  # (class, member, file, offset, size)
    for tar in tars:
        regular_file(tar, "a tar archive")
        for name, member, offset, size in _index(tar, "" if single else tar.stem):
            rows.append((name, member, len(files), offset, size))
        files.append(str(tar))
    if not rows:
        raise InputError(f"--data {root}: no images found in the tar files (.png/.jpg/.jpeg members); give a .tar of "
                         "<class>/<image> files or a directory of <class>.tar files")
    classes = sorted({r[0] for r in rows})
    index = {name: i for i, name in enumerate(classes)}
    rows.sort(key=lambda r: (index[r[0]], r[1]))
    raw = np.asarray([index[r[0]] for r in rows], dtype=np.int64)
    file_index, offsets, sizes = (np.asarray([r[i] for r in rows], dtype=np.int64) for i in (2, 3, 4))
    images = _TarMembers(files, file_index, offsets, sizes, [r[1] for r in rows])
    digest = hashlib.sha256("".join(f"{r[1]}\t{index[r[0]]}\t{r[4]}\n" for r in rows).encode())
    return DataSource(dataset=_Samples(images, raw, None), kind="tar", split=split, root=root, labels=raw,
                      dataset_classes=classes, class_names=None, fingerprint=digest.hexdigest(),
                      reader="exact tar index, labels as timm ReaderImageInTar (classes in sorted order)",
                      notes=_natural_order_note(classes))
