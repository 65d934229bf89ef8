"""Dataset labels to model class indices: class maps, ImageNet synsets, class names."""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from ncaudit.data._source import DataSource
from ncaudit.errors import InputError

_SYNSET = re.compile(r"^n\d{8}$")


def read_class_map(path: str | os.PathLike[str]) -> list[str]:
    """Class names in model order from a JSON list or a text file with one name per line (timm's ``.txt``)."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise InputError(f"--class-map {p}: cannot read ({exc.strerror}); give a JSON list or a .txt file") from None
    if p.suffix.lower() == ".txt":
        names: Any = [line.strip() for line in text.splitlines() if line.strip()]
    else:
        try:
            names = json.loads(text)
        except json.JSONDecodeError as exc:
            raise InputError(f"--class-map {p}: not JSON ({exc.msg} at line {exc.lineno}); give a JSON list of class "
                             "names in model order, or a .txt file with one name per line") from None
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names) or not names:
        raise InputError(f"--class-map {p}: expected a JSON list of class names in model order, e.g. "
                         '["cat", "dog"] (or a .txt file with one name per line)')
    if len(set(names)) != len(names):
        raise InputError(f"--class-map {p}: class names repeat; each model class needs a distinct name")
    return names


def is_synset(name: str) -> bool:
    """A WordNet synset id as ImageNet names its classes (``n01440764``)."""
    return bool(_SYNSET.match(name))


def map_labels(src: DataSource, *, class_map: str | os.PathLike[str] | None = None,
               model_classes: tuple[str, list[str], list[str]] | None = None) -> DataSource:
    """Turn the dataset's labels into model indices, in place; ``src.class_names`` becomes the model's names.

    With ``class_map`` (a JSON list or a ``.txt`` of names in model order) every dataset class name is looked up in
    it. Else, when the dataset's classes are ImageNet synsets and ``model_classes`` = ``(label set, names, synsets)``
    gives the model's synsets in model order, each class maps by synset, so a subset of ImageNet keeps the model's
    indices (sorted folder order would shift them). Else labels keep the dataset's order.

    Raises
    ------
    InputError
        A dataset class missing from the class map or from the model's synsets.
    """
    if class_map is not None:
        names = order = read_class_map(class_map)
        mapping = f"by name through --class-map {class_map}"

        def problem(missing: list[str]) -> str:
            return (f"--class-map {class_map}: dataset class {missing[0]!r} is not in the map ({len(missing)} "
                    "missing); list every dataset class, in model order")
    elif model_classes is not None and src.dataset_classes and all(map(is_synset, src.dataset_classes)):
        subset, names, order = model_classes
        mapping = f"by synset ({subset}, timm ImageNetInfo)"

        def problem(missing: list[str]) -> str:
            return (f"dataset class {missing[0]} is not one of the model's {len(order)} {subset} classes "
                    f"({len(missing)} missing); pass --class-map to say which output each class is")
    else:
        return src
    index = {n: i for i, n in enumerate(order)}
    missing = [c for c in src.dataset_classes if c not in index]
    if missing:
        raise InputError(problem(missing))
    lut = np.asarray([index[c] for c in src.dataset_classes]).astype(np.int64)
    src.class_names, src.label_mapping = names, mapping
    src.labels = lut[src.labels] if len(lut) else src.labels
    src.dataset.labels = src.labels
    digest = hashlib.sha256(src.fingerprint.encode())
    digest.update(src.label_mapping.encode() + lut.tobytes())
    src.fingerprint = digest.hexdigest()
    return src
