"""Reader: an image folder (one sub-folder per class), scanned once with links followed once."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ncaudit.data._images import IMAGE_EXTENSIONS
from ncaudit.data._source import SPLIT_NAMES, DataSource, _Paths, _Samples
from ncaudit.errors import InputError


def _image_folder(root: Path) -> tuple[list[str], list[str], np.ndarray]:
    """``(classes, image paths, labels)`` of an ImageFolder root, as torchvision's ``ImageFolder`` lists them: one
    sub-directory per class, classes sorted by name (label = index), a class's images at any depth below it in
    sorted path order, files chosen by extension (.jpg, .png, ...).

    Unlike a plain walk, symbolic links are followed once: a link to a directory above it (a loop) is refused, a
    directory reached again through another link of the same class is read once (each file counts once), one shared
    by two classes is refused. Class directory names must be valid UTF-8: they are stored as ``/class_names``.
    """
    classes = _class_directories(root)
    seen: dict[tuple[int, int], str] = {}
    above = _ancestor_keys(root)
    paths: list[str] = []
    labels: list[int] = []
    for label, name in enumerate(classes):
        files = _scan_class(root, name, seen, above)
        if not files:
            raise InputError(f"--data {root}: no images found in class directory {name!r}; expect one sub-directory "
                             f"per class holding {'/'.join(IMAGE_EXTENSIONS[:3])}/... files")
        paths += files
        labels += [label] * len(files)
    return classes, paths, np.asarray(labels, dtype=np.int64)


def _class_directories(root: Path) -> list[str]:
    """The sub-directories of ``root`` (links followed), sorted; each name valid UTF-8."""
    try:
        with os.scandir(root) as entries:
            classes = sorted(e.name for e in entries if e.is_dir())
    except OSError as exc:
        raise InputError(f"--data {root}: cannot list the directory ({exc.strerror}); check its permissions") from None
    if not classes:
        raise InputError(f"--data {root}: no images found (no class sub-directories); expect one sub-directory per "
                         "class holding .jpg/.png/... files")
    for name in classes:
        try:
            name.encode("utf-8")
        except UnicodeEncodeError:
            raise InputError(f"--data {root}: the class directory {os.fsencode(name)!r} is not named in valid UTF-8; "
                             "rename it (class names are stored as UTF-8 text)") from None
    return classes


def _ancestor_keys(root: Path) -> tuple[tuple[int, int], ...]:
    """(device, inode) of ``root`` and every directory above it: a link to any of them is a loop."""
    keys = []
    for directory in (Path(os.path.realpath(root)), *Path(os.path.realpath(root)).parents):
        st = os.stat(directory)
        keys.append((st.st_dev, st.st_ino))
    return tuple(keys)


def _scan_class(root: Path, name: str, seen: dict[tuple[int, int], str],
                above: tuple[tuple[int, int], ...]) -> list[str]:
    """Image paths below ``root/name``, each directory read once (``seen`` maps directories to their class)."""
    found: list[tuple[str, list[str]]] = []
    stack: list[tuple[str, tuple[tuple[int, int], ...]]] = [(os.path.join(str(root), name), above)]
    while stack:
        path, ancestors = stack.pop()
        st = os.stat(path)
        key = (st.st_dev, st.st_ino)
        if key in ancestors:
            raise InputError(f"--data {root}: {path} links back to {os.path.realpath(path)}, a directory above it (a "
                             "loop that would list the same images again and again); remove the link")
        if key in seen:
            if seen[key] != name:
                raise InputError(f"--data {root}: {path} is a link to a directory of class {seen[key]!r}; an image can "
                                 "belong to one class only, remove the link")
            continue  # the same directory again through another link: its images are counted once
        seen[key] = name
        dirs, files = _list_directory(root, path)
        found.append((path, sorted(f for f in files if f.lower().endswith(IMAGE_EXTENSIONS))))
        stack += [(os.path.join(path, d), ancestors + (key,)) for d in dirs]
    found.sort(key=lambda entry: entry[0])  # torchvision sorts os.walk's (directory, ...) tuples
    return [os.path.join(directory, f) for directory, files in found for f in files]


def _list_directory(root: Path, path: str) -> tuple[list[str], list[str]]:
    """``(sub-directories, other entries)`` of ``path``; links to directories count as directories."""
    dirs: list[str] = []
    files: list[str] = []
    try:
        with os.scandir(path) as entries:
            for entry in entries:
                (dirs if entry.is_dir() else files).append(entry.name)
    except OSError as exc:
        raise InputError(f"--data {root}: cannot list {path} ({exc.strerror}); check its permissions") from None
    return dirs, files


def _natural_order_note(classes: Sequence[str]) -> list[str]:
    """A note when natural order (timm's readers: class2 < class10) and plain order (torchvision ImageFolder:
    class10 < class2) of the class names differ: labels follow plain order."""
    from timm.utils.misc import natural_key
    if sorted(classes, key=natural_key) == sorted(classes):
        return []
    return [("class names sort differently in natural order (timm's train.py: 2 before 10) and plain order "
             "(torchvision's ImageFolder: 10 before 2); labels follow plain order, pass --class-map if the model "
             "was trained with the other")]


def _split_folders(root: Path) -> list[str]:
    """The sub-directories of ``root`` named as dataset splits (train, val, test, ...) that hold sub-directories
    themselves: ``root`` is a dataset of splits, not one image folder."""
    try:
        with os.scandir(root) as entries:
            named = sorted(e.name for e in entries if e.is_dir() and e.name.lower() in SPLIT_NAMES)
        found = []
        for name in named:
            with os.scandir(root / name) as entries:
                if any(e.is_dir() for e in entries):
                    found.append(name)
    except OSError:
        return []  # an unreadable root or split: the scan of the class folders says so
    return found


def _names_split(name: str, split: str) -> bool:
    """A directory called ``name`` is the split ``split`` (timm's synonyms: val = validation = eval, ...)."""
    from timm.data.dataset_factory import _EVAL_SYNONYM, _TRAIN_SYNONYM
    name, split = name.lower(), split.split("[")[0].lower()
    return name == split or any(name in group and split in group for group in (_TRAIN_SYNONYM, _EVAL_SYNONYM))


def _split_root(root: Path, split: str | None) -> tuple[Path, str | None]:
    """``root/split`` (or a synonym: val, validation, ...) when it exists, as timm's ``create_dataset`` searches; the
    split is the directory's name when none is given and it names one (``.../imagenet/train``).

    Raises
    ------
    InputError
        No ``--split`` on a root of split folders (``train/``, ``test/``, ...: they would be read as two classes), or
        a ``--split`` that is neither a folder of ``root`` nor ``root`` itself.
    """
    splits = _split_folders(root)
    choose = " or ".join(f"--split {name}" for name in splits)
    if split is None:
        if splits:
            raise InputError(f"--data {root}: holds the split folders {', '.join(splits)}, not class folders; pass "
                             f"{choose}")
        return root, SPLIT_NAMES.get(root.name.lower())
    from timm.data.dataset_factory import _search_split
    found = Path(_search_split(str(root), split))
    if found != root or _names_split(root.name, split):
        return found, split
    if splits:
        raise InputError(f"--split {split}: {root} has no such split folder (it has {', '.join(splits)}); pass "
                         f"{choose}")
    raise InputError(f"--split {split}: {root} has no split folder {split!r} (nor a synonym) and is not one; drop "
                     "--split to read it as one image folder, or give the dataset root that holds the split")


def _open_folder(root: Path, split: str | None) -> DataSource:
    root, split = _split_root(root, split)
    classes, paths, raw = _image_folder(root)
    digest = hashlib.sha256()
    for p, t in zip(paths, raw.tolist()):
        digest.update(f"{os.path.relpath(p, root)}\t{t}\n".encode("utf-8", "surrogateescape"))
    return DataSource(dataset=_Samples(_Paths(paths), raw, None), kind="folder", split=split, root=root, labels=raw,
                      dataset_classes=classes, class_names=None, fingerprint=digest.hexdigest(),
                      reader="ImageFolder (classes in sorted order)", notes=_natural_order_note(classes))
