"""Datasets and eval transforms for ``ncaudit extract``.

Images come from an ImageFolder directory (default) or from a torchvision dataset already on disk (never
downloaded). Every image is converted to RGB and passed through the model's own eval transform, described by a plain
JSON-able dict that goes into the cache's ``transform`` attribute.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
from PIL import Image

from ncaudit.errors import InputError

DATASETS = ("imagefolder", "cifar10", "cifar100", "mnist", "fashionmnist")
SPLITS = ("train", "test")
INTERPOLATIONS = ("bilinear", "bicubic", "nearest", "lanczos", "box", "hamming")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: torchvision's classification eval defaults: resize 256, centre crop 224, bilinear, ImageNet mean/std.
TORCHVISION_DEFAULTS: dict[str, Any] = {
    "input_size": [3, 224, 224], "interpolation": "bilinear", "mean": list(IMAGENET_MEAN),
    "std": list(IMAGENET_STD), "crop_pct": 224 / 256, "crop_mode": "center",
}


# ---------------------------------------------------------------------------------------------------------------------
# Transforms
# ---------------------------------------------------------------------------------------------------------------------
def parse_floats(text: str | Sequence[float] | None, what: str) -> list[float] | None:
    """``"0.5,0.5,0.5"`` (or one number, repeated) -> three floats; None stays None."""
    if text is None:
        return None
    try:
        values = [float(v) for v in text.replace(" ", "").split(",") if v] if isinstance(text, str) \
            else [float(v) for v in text]
    except ValueError:
        raise InputError(f"--{what} {text!r}: expected 1 or 3 comma-separated numbers, e.g. 0.5,0.5,0.5") from None
    if len(values) == 1:
        values = values * 3
    if len(values) != 3 or not all(math.isfinite(v) for v in values):
        raise InputError(f"--{what} {text!r}: expected 1 or 3 comma-separated finite numbers, e.g. 0.5,0.5,0.5")
    if what == "std" and any(v <= 0 for v in values):
        raise InputError(f"--std {text!r}: standard deviations must be positive")
    return values


def transform_config(
    model: torch.nn.Module,
    library: str,
    *,
    img_size: int | None = None,
    mean: Sequence[float] | str | None = None,
    std: Sequence[float] | str | None = None,
    crop_pct: float | None = None,
    interpolation: str | None = None,
) -> dict[str, Any]:
    """The eval transform as a JSON-able dict: the model's own (timm ``resolve_model_data_config``; torchvision's
    classification defaults) with the user's overrides applied.

    ``img_size`` sets the crop to N x N keeping ``crop_pct`` (so the resize is ``floor(N / crop_pct)``).
    """
    if library == "timm":
        from timm.data import resolve_model_data_config
        base = resolve_model_data_config(model)
        cfg: dict[str, Any] = {
            "input_size": [int(v) for v in base["input_size"]], "interpolation": str(base["interpolation"]),
            "mean": [float(v) for v in base["mean"]], "std": [float(v) for v in base["std"]],
            "crop_pct": float(base["crop_pct"]), "crop_mode": str(base.get("crop_mode") or "center"),
        }
    else:
        cfg = json.loads(json.dumps(TORCHVISION_DEFAULTS))
    cfg["library"] = library
    if img_size is not None:
        if img_size < 1:
            raise InputError(f"--img-size {img_size}: must be a positive number of pixels")
        cfg["input_size"] = [cfg["input_size"][0], int(img_size), int(img_size)]
    if (m := parse_floats(mean, "mean")) is not None:
        cfg["mean"] = m
    if (s := parse_floats(std, "std")) is not None:
        cfg["std"] = s
    if crop_pct is not None:
        if not 0 < crop_pct <= 1:
            raise InputError(f"--crop-pct {crop_pct}: must be in (0, 1] (1 = no crop)")
        cfg["crop_pct"] = float(crop_pct)
    if interpolation is not None:
        if interpolation not in INTERPOLATIONS:
            raise InputError(f"--interpolation {interpolation!r}: use one of {', '.join(INTERPOLATIONS)}")
        cfg["interpolation"] = interpolation
    return cfg


class ToRGB:
    """Convert a PIL image to RGB (grey, palette, RGBA, CMYK...)."""

    def __call__(self, img: Image.Image) -> Image.Image:
        return img if img.mode == "RGB" else img.convert("RGB")

    def __repr__(self) -> str:
        return "ToRGB()"


def build_transform(cfg: dict[str, Any]) -> Callable[[Image.Image], torch.Tensor]:
    """The callable for :func:`transform_config`'s dict: RGB conversion, resize, centre crop, to tensor, normalise."""
    from torchvision import transforms as T
    size = int(cfg["input_size"][-1]), int(cfg["input_size"][-2])
    if cfg.get("library") == "timm":
        from timm.data import create_transform
        tf = create_transform(input_size=tuple(cfg["input_size"]), interpolation=cfg["interpolation"],
                              mean=tuple(cfg["mean"]), std=tuple(cfg["std"]), crop_pct=cfg["crop_pct"],
                              crop_mode=cfg.get("crop_mode", "center"), is_training=False)
        return T.Compose([ToRGB(), tf])
    mode = T.InterpolationMode(cfg["interpolation"])
    h, w = size[1], size[0]
    scale = (math.floor(h / cfg["crop_pct"]), math.floor(w / cfg["crop_pct"]))
    resize = scale[0] if h == w else scale
    return T.Compose([ToRGB(), T.Resize(resize, interpolation=mode), T.CenterCrop((h, w)), T.ToTensor(),
                      T.Normalize(cfg["mean"], cfg["std"])])


# ---------------------------------------------------------------------------------------------------------------------
# Datasets
# ---------------------------------------------------------------------------------------------------------------------
def load_image(source: str | os.PathLike[str] | BinaryIO, name: str | None = None) -> Image.Image:
    """Open and fully decode an image from a path or a binary file object into 8-bit RGB (so a truncated file fails
    here), naming the file (``name``, else the path) on failure.

    High-bit-depth images are scaled, not clipped: 16-bit grey (PNG, TIFF) by 255/65535, integer images by their
    declared bit depth, float images (TIFF) in [0, 1] by 255; a float image outside [0, 1] is refused. (16-bit colour
    PNGs are decoded to 8 bits per channel by Pillow itself.)
    """
    label = name or str(source if isinstance(source, (str, os.PathLike)) else getattr(source, "name", "<image>"))
    try:
        with contextlib.ExitStack() as stack:
            fh = stack.enter_context(open(source, "rb")) if isinstance(source, (str, os.PathLike)) else source
            img = Image.open(fh)
            img.load()
            return _to_rgb8(img, label)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise InputError(f"{label}: unreadable or truncated image ({str(exc).splitlines()[0] if str(exc) else exc}); "
                         "fix or remove the file") from None


def _to_rgb8(img: Image.Image, label: str) -> Image.Image:
    """8-bit RGB of a decoded image; grey images of more than 8 bits (modes I;16*, I, F) are scaled to 0..255."""
    if img.mode == "RGB":
        return img.copy()
    if not (img.mode.startswith("I") or img.mode == "F"):
        return img.convert("RGB")
    values = np.asarray(img)
    if img.mode == "F":
        scale = _float_scale(values, label)
    else:
        scale = 255.0 / (2.0 ** _integer_bits(img, values, label) - 1)
    grey = np.clip(np.rint(values.astype(np.float64) * scale), 0, 255).astype(np.uint8)
    return Image.fromarray(grey, mode="L").convert("RGB")


def _integer_bits(img: Image.Image, values: np.ndarray, label: str) -> int:
    """Bits per sample of an integer grey image: 16 for I;16*, else the TIFF tag, else the smallest that fits."""
    if values.size and int(values.min()) < 0:
        raise InputError(f"{label}: a signed integer image with negative values; convert it to 8-bit (e.g. PNG) "
                         "first")
    if img.mode.startswith("I;16"):
        return 16
    tag = getattr(img, "tag_v2", None)
    declared = tag.get(258) if tag is not None else None  # TIFF BitsPerSample
    if isinstance(declared, tuple):
        declared = declared[0] if declared else None
    if isinstance(declared, int) and 8 <= declared <= 32:
        return declared
    top = int(values.max()) if values.size else 0
    return 8 if top <= 255 else 16 if top <= 65535 else 32


def _float_scale(values: np.ndarray, label: str) -> float:
    """A float image is taken as intensities in [0, 1]; anything else is refused rather than guessed."""
    finite = bool(np.isfinite(values).all())
    lo, hi = (float(values.min()), float(values.max())) if values.size and finite else (0.0, 0.0)
    if not finite or lo < 0 or hi > 1:
        shown = "NaN or Inf" if not finite else f"[{lo:.4g}, {hi:.4g}]"
        raise InputError(f"{label}: a floating-point image with values {shown}, not intensities in [0, 1]; convert "
                         "it to 8-bit (e.g. PNG) or scale it to [0, 1] first")
    return 255.0


class _Samples(torch.utils.data.Dataset):  # type: ignore[type-arg]
    """``(image tensor, model label)`` for a list of samples; loads images lazily (picklable for workers)."""

    def __init__(self, base: Any, labels: np.ndarray, transform: Callable[[Any], torch.Tensor] | None,
                 paths: list[str] | None = None) -> None:
        self.base = base
        self.labels = labels
        self.transform = transform
        self.paths = paths

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        if self.paths is not None:
            img: Any = load_image(self.paths[index])
        else:
            img = self.base[index][0]
        x = self.transform(img) if self.transform is not None else img
        return x, int(self.labels[index])


@dataclass
class DataSource:
    """A dataset ready for extraction.

    ``labels`` are model class indices (after ``--class-map``), ``dataset_classes`` the dataset's own class names in
    its label order, ``class_names`` the names to store as ``/class_names`` (model order) or None.
    """

    dataset: _Samples
    kind: str
    split: str | None
    root: Path
    labels: np.ndarray
    dataset_classes: list[str]
    class_names: list[str] | None
    fingerprint: str

    def __len__(self) -> int:
        return len(self.labels)


def _read_class_map(path: str | os.PathLike[str]) -> list[str]:
    p = Path(path)
    try:
        names = json.loads(p.read_text(encoding="utf-8"))
    except OSError as exc:
        raise InputError(f"--class-map {p}: cannot read ({exc.strerror}); give a JSON file") from None
    except json.JSONDecodeError as exc:
        raise InputError(f"--class-map {p}: not JSON ({exc.msg} at line {exc.lineno}); give a JSON list of class "
                         "names in model order") from None
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names) or not names:
        raise InputError(f"--class-map {p}: expected a JSON list of class names in model order, e.g. "
                         '["cat", "dog"]')
    if len(set(names)) != len(names):
        raise InputError(f"--class-map {p}: class names repeat; each model class needs a distinct name")
    return names


def _torchvision_dataset(kind: str, root: Path, split: str) -> Any:
    import torchvision.datasets as D
    cls = {"cifar10": D.CIFAR10, "cifar100": D.CIFAR100, "mnist": D.MNIST, "fashionmnist": D.FashionMNIST}[kind]
    expect = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python", "mnist": "MNIST/raw",
              "fashionmnist": "FashionMNIST/raw"}[kind]
    try:
        return cls(root=str(root), train=split == "train", download=False)
    except (RuntimeError, OSError, ValueError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise InputError(f"--dataset {kind}: not found under {root} ({first}); put torchvision's files at "
                         f"{root / expect} (ncaudit never downloads)") from None


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


#: File extensions read as images (torchvision's ImageFolder list), compared in lower case.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


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


def open_dataset(
    data: str | os.PathLike[str],
    *,
    dataset: str = "imagefolder",
    split: str | None = None,
    class_map: str | os.PathLike[str] | None = None,
    transform: Callable[[Any], torch.Tensor] | None = None,
) -> DataSource:
    """Open the dataset; labels are mapped to model indices through ``class_map`` when given.

    Parameters
    ----------
    data
        ImageFolder root (one sub-directory per class; with ``split``, ``data/split`` when it exists) or the root
        directory of a torchvision dataset.
    dataset
        One of ``imagefolder``, ``cifar10``, ``cifar100``, ``mnist``, ``fashionmnist``.
    split
        ``train`` or ``test`` for torchvision datasets (default ``test``).
    class_map
        JSON list of class names in model order; every dataset class must appear in it.

    Raises
    ------
    InputError
        Missing directory or dataset, no images, a class missing from the class map.
    """
    root = Path(data)
    kind = dataset.lower()
    if kind not in DATASETS:
        raise InputError(f"--dataset {dataset!r}: use one of {', '.join(DATASETS)}")
    if not root.exists():
        raise InputError(f"--data {root}: no such directory; give an ImageFolder root or a dataset root")
    if not root.is_dir():
        raise InputError(f"--data {root}: not a directory; give an ImageFolder root (one sub-directory per class)")
    paths: list[str] | None = None
    digest = hashlib.sha256()
    if kind == "imagefolder":
        if split is not None and (root / split).is_dir():
            root = root / split
        classes, paths, raw = _image_folder(root)
        base: Any = None
        for p, t in zip(paths, raw.tolist()):
            digest.update(f"{os.path.relpath(p, root)}\t{t}\n".encode("utf-8", "surrogateescape"))
    else:
        split = split or "test"
        if split not in SPLITS:
            raise InputError(f"--split {split!r}: use train or test for --dataset {kind}")
        base = _torchvision_dataset(kind, root, split)
        classes = [str(c) for c in base.classes]
        targets = base.targets
        raw = np.asarray(targets.tolist() if isinstance(targets, torch.Tensor) else targets, dtype=np.int64)
        digest.update(raw.tobytes())
    if raw.size == 0:
        raise InputError(f"--data {root}: the dataset holds no samples")
    digest.update(f"{kind}|{split}|{len(raw)}".encode())
    names: list[str] | None = None
    labels = raw
    if class_map is not None:
        names = _read_class_map(class_map)
        index = {n: i for i, n in enumerate(names)}
        missing = [c for c in classes if c not in index]
        if missing:
            raise InputError(f"--class-map {class_map}: dataset class {missing[0]!r} is not in the map "
                             f"({len(missing)} missing); list every dataset class, in model order")
        lut = np.asarray([index[c] for c in classes], dtype=np.int64)
        labels = lut[raw]
        digest.update(json.dumps(names).encode())
    return DataSource(dataset=_Samples(base, labels, transform, paths), kind=kind, split=split,
                      root=root, labels=labels, dataset_classes=classes, class_names=names,
                      fingerprint=digest.hexdigest())


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
    return DataSource(dataset=_Samples(base, y, None), kind=name, split=None, root=Path("."), labels=y,
                      dataset_classes=classes, class_names=list(class_names) if class_names is not None else None,
                      fingerprint=digest.hexdigest())
