"""Datasets and eval transforms for ``ncaudit extract``.

Datasets are read in every format timm's ``create_dataset`` reads, enumerated through timm's readers: image folders
(ImageNet's train/val layouts included), tar files of images, ``torch/NAME`` (torchvision datasets already on disk),
``hfds/NAME`` (a Hugging Face dataset on disk or in its cache) and ``wds/NAME`` WebDataset shards. Every encoded image
is decoded by :func:`load_image` into RGB and passed through the model's own eval transform, described by a plain
JSON-able dict (with where each value came from) that goes into the cache's ``transform`` attribute.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import math
import os
import re
import tarfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
from PIL import Image

from ncaudit.errors import InputError

#: The torchvision datasets ``--dataset`` names without a prefix (kept for compatibility), as timm names them.
TORCH_ALIASES = {"cifar10": "cifar10", "cifar100": "cifar100", "mnist": "mnist", "fashionmnist": "fashion_mnist",
                 "fashion_mnist": "fashion_mnist", "kmnist": "kmnist", "qmnist": "qmnist"}
#: Directory names of dataset splits: a folder named so records its split (timm's synonyms included).
SPLIT_NAMES = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "validation",
               "test": "test", "eval": "eval", "evaluation": "evaluation"}
#: :attr:`DataSource.reader` of :func:`tensor_source`: images in memory, no transform applied.
IN_MEMORY_READER = "in memory, already transformed"
INTERPOLATIONS = ("bilinear", "bicubic", "nearest", "lanczos", "box", "hamming")
CROP_MODES = ("center", "squash", "border")
TRANSFORM_KEYS = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: torchvision's classification eval defaults: resize 256, centre crop 224, bilinear, ImageNet mean/std.
TORCHVISION_DEFAULTS: dict[str, Any] = {
    "input_size": [3, 224, 224], "interpolation": "bilinear", "mean": list(IMAGENET_MEAN),
    "std": list(IMAGENET_STD), "crop_pct": 224 / 256, "crop_mode": "center",
}
_SYNSET = re.compile(r"^n\d{8}$")


# ---------------------------------------------------------------------------------------------------------------------
# Transforms
# ---------------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TransformOverrides:
    """The user's transform flags (``--img-size``, ``--mean``, ``--std``, ``--crop-pct``, ``--interpolation``,
    ``--crop-mode``); None keeps what the weights record."""

    img_size: int | None = None
    mean: Sequence[float] | str | float | None = None
    std: Sequence[float] | str | float | None = None
    crop_pct: float | None = None
    interpolation: str | None = None
    crop_mode: str | None = None


def parse_floats(text: str | float | Sequence[float] | None, what: str) -> list[float] | None:
    """``"0.5,0.5,0.5"`` (or one number, repeated) -> three floats; None stays None."""
    if text is None:
        return None
    if isinstance(text, (int, float)):
        text = [text]
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


def _numbers(value: Any) -> list[float] | None:
    """A list of numbers from a list, a number, or a string (JSON ``[0.5, 0.5]`` or ``0.5,0.5``); None if not."""
    if isinstance(value, str):
        text = value.strip()
        try:
            value = json.loads(text) if text.startswith("[") else [float(v) for v in text.strip("()").split(",") if v]
        except ValueError:
            return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = [value]
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, (int, float)) for v in value):
        return [float(v) for v in value]
    return None


def _size(value: Any) -> list[int] | None:
    """``[3, H, W]`` from an image size (N, [H, W] or [C, H, W], as numbers or text)."""
    nums = _numbers(value)
    if not nums or len(nums) > 3 or any(v < 1 or v != int(v) for v in nums):
        return None
    ints = [int(v) for v in nums]
    return [3, ints[0], ints[0]] if len(ints) == 1 else [3, *ints] if len(ints) == 2 else ints


def transform_hints(raw: Mapping[str, Any]) -> dict[str, Any]:
    """The transform values recorded in ``raw`` (safetensors metadata, a timm ``pretrained_cfg``, a training
    script's ``args``), normalised to :data:`TRANSFORM_KEYS` plus ``test_input_size``; anything unreadable is left
    out.

    Recognised: ``input_size`` (before ``img_size``, as timm's ``resolve_data_config``), ``img_size``,
    ``test_input_size``, ``mean``, ``std``, ``crop_pct``, ``crop_mode``, ``interpolation``, and torchvision's
    reference-script ``val_crop_size`` / ``val_resize_size``.
    """
    out: dict[str, Any] = {}
    size = _size(raw.get("input_size")) or _size(raw.get("img_size")) or _size(raw.get("val_crop_size"))
    if size:
        out["input_size"] = size
    if test := _size(raw.get("test_input_size")):
        out["test_input_size"] = test
    for key in ("mean", "std"):
        nums = _numbers(raw.get(key))
        if nums and len(nums) in (1, 3) and all(math.isfinite(v) for v in nums) and (key == "mean" or min(nums) > 0):
            out[key] = nums * 3 if len(nums) == 1 else nums
    crop = _numbers(raw.get("crop_pct"))
    resize, val_crop = _numbers(raw.get("val_resize_size")), _numbers(raw.get("val_crop_size"))
    if crop and len(crop) == 1 and 0 < crop[0] <= 1:
        out["crop_pct"] = crop[0]
    elif resize and val_crop and resize[0] > 0 and 0 < val_crop[0] <= resize[0]:
        out["crop_pct"] = val_crop[0] / resize[0]
    for key, allowed in (("interpolation", INTERPOLATIONS), ("crop_mode", CROP_MODES)):
        value = str(raw.get(key) or "").strip().lower()
        if value in allowed:
            out[key] = value
    return out


def _model_default(model: torch.nn.Module, library: str) -> tuple[str, dict[str, Any]]:
    """``(label, values)`` of the model's own eval transform: timm ``resolve_model_data_config``; torchvision's
    classification defaults."""
    if library != "timm":
        return "torchvision classification defaults", json.loads(json.dumps(TORCHVISION_DEFAULTS))
    from timm.data import resolve_model_data_config
    base = resolve_model_data_config(model)
    cfg = getattr(model, "pretrained_cfg", None) or {}
    tag = cfg.get("hf_hub_id") or ".".join(str(v) for v in (cfg.get("architecture"), cfg.get("tag")) if v)
    return f"timm default ({tag} pretrained_cfg)" if tag else "timm default", {
        "input_size": [int(v) for v in base["input_size"]], "interpolation": str(base["interpolation"]),
        "mean": [float(v) for v in base["mean"]], "std": [float(v) for v in base["std"]],
        "crop_pct": float(base["crop_pct"]), "crop_mode": str(base.get("crop_mode") or "center"),
    }


def _override_values(overrides: TransformOverrides, channels: int) -> dict[str, tuple[str, Any]]:
    """``{key: (flag, value)}`` of the flags given, checked."""
    out: dict[str, tuple[str, Any]] = {}
    if overrides.img_size is not None:
        if overrides.img_size < 1:
            raise InputError(f"--img-size {overrides.img_size}: must be a positive number of pixels")
        out["input_size"] = ("--img-size", [channels, int(overrides.img_size), int(overrides.img_size)])
    if (m := parse_floats(overrides.mean, "mean")) is not None:
        out["mean"] = ("--mean", m)
    if (s := parse_floats(overrides.std, "std")) is not None:
        out["std"] = ("--std", s)
    if overrides.crop_pct is not None:
        if not 0 < overrides.crop_pct <= 1:
            raise InputError(f"--crop-pct {overrides.crop_pct}: must be in (0, 1] (1 = no crop)")
        out["crop_pct"] = ("--crop-pct", float(overrides.crop_pct))
    if overrides.interpolation is not None:
        if overrides.interpolation not in INTERPOLATIONS:
            raise InputError(f"--interpolation {overrides.interpolation!r}: use one of {', '.join(INTERPOLATIONS)}")
        out["interpolation"] = ("--interpolation", overrides.interpolation)
    if overrides.crop_mode is not None:
        if overrides.crop_mode not in CROP_MODES:
            raise InputError(f"--crop-mode {overrides.crop_mode!r}: use one of {', '.join(CROP_MODES)}")
        out["crop_mode"] = ("--crop-mode", overrides.crop_mode)
    return out


def transform_config(
    model: torch.nn.Module,
    library: str,
    *,
    recorded: Sequence[tuple[str, Mapping[str, Any]]] = (),
    img_size: int | None = None,
    mean: Sequence[float] | str | None = None,
    std: Sequence[float] | str | None = None,
    crop_pct: float | None = None,
    interpolation: str | None = None,
    crop_mode: str | None = None,
) -> dict[str, Any]:
    """The eval transform as a JSON-able dict, each value from the highest-priority place that gives it.

    From lowest to highest priority: the model's own default (timm ``resolve_model_data_config``; torchvision's
    classification defaults), then each ``(source, raw values)`` of ``recorded`` in order (what the weights record:
    :func:`ncaudit.models.recorded_preprocessing`, read by :func:`transform_hints`), then the flags. ``img_size`` sets
    the crop to N x N keeping ``crop_pct`` (so the resize is ``floor(N / crop_pct)``). ``sources`` maps each key to
    where its value came from.
    """
    label, cfg = _model_default(model, library)
    sources = dict.fromkeys(TRANSFORM_KEYS, label)
    trained, where = _recorded_hints(recorded)
    for key, value in trained.items():
        if key in TRANSFORM_KEYS:
            cfg[key], sources[key] = value, where[key]
    flags = TransformOverrides(img_size, mean, std, crop_pct, interpolation, crop_mode)
    for key, (flag, value) in _override_values(flags, int(cfg["input_size"][0])).items():
        cfg[key], sources[key] = value, flag
    cfg["library"] = library
    cfg["sources"] = sources
    return cfg


def _recorded_hints(recorded: Sequence[tuple[str, Mapping[str, Any]]]) -> tuple[dict[str, Any], dict[str, str]]:
    """``(values, where)``: the :func:`transform_hints` of each ``(source, raw)`` of ``recorded``, the last source
    that gives a key winning, and ``{key: that source}``."""
    values: dict[str, Any] = {}
    where: dict[str, str] = {}
    for source, raw in recorded:
        for key, value in transform_hints(raw).items():
            values[key], where[key] = value, source
    return values, where


def transform_warnings(cfg: Mapping[str, Any], recorded: Sequence[tuple[str, Mapping[str, Any]]]) -> list[str]:
    """Warnings for an evaluation at a resolution or a normalisation other than the weights record (a flag
    overrode them): features of images the network was not trained on."""
    trained, where = _recorded_hints(recorded)
    out = []
    size = list(cfg["input_size"][1:])
    sizes = [list(trained[k][1:]) for k in ("input_size", "test_input_size") if k in trained]
    if sizes and size not in sizes:
        shown = " or ".join("x".join(map(str, s)) for s in sizes)
        out.append(f"evaluating at {'x'.join(map(str, size))} px, but the weights were trained/evaluated at {shown} "
                   f"px ({where['input_size' if 'input_size' in where else 'test_input_size']}); features of images "
                   "at another resolution are not the ones the network learnt; drop --img-size to use theirs")
    for key in ("mean", "std"):
        if key in trained and not np.allclose(cfg[key], trained[key], rtol=1e-5, atol=1e-7):
            out.append(f"normalising with {key} {_short(cfg[key])}, but the weights were trained with {key} "
                       f"{_short(trained[key])} ({where[key]}); drop --{key} to use theirs")
    return out


def _short(values: Sequence[float]) -> str:
    return ",".join(f"{v:.4g}" for v in values)


def describe_transform(cfg: Mapping[str, Any]) -> list[str]:
    """Two lines for a terminal: the transform, and where each value came from."""
    if "input_size" not in cfg:
        return [f"transform: {cfg.get('note', 'none')}"]
    h, w = int(cfg["input_size"][1]), int(cfg["input_size"][2])
    resize = math.floor(min(h, w) / float(cfg["crop_pct"]) + 1e-6)
    first = (f"transform: resize {resize} px ({cfg['interpolation']}), {cfg.get('crop_mode', 'center')} crop {h}x{w} "
             f"(crop_pct {float(cfg['crop_pct']):.4g}), mean {_short(cfg['mean'])}, std {_short(cfg['std'])}")
    by_source: dict[str, list[str]] = {}
    for key, source in (cfg.get("sources") or {}).items():
        by_source.setdefault(source, []).append(key)
    second = "  from " + "; ".join(f"{source}: {', '.join(keys)}" for source, keys in by_source.items())
    return [first, second]


class ToRGB:
    """Convert a PIL image to 8-bit RGB (grey, palette, RGBA, CMYK...; 16-bit and float grey scaled, not clipped)."""

    def __call__(self, img: Image.Image) -> Image.Image:
        return img if img.mode == "RGB" else _to_rgb8(img, getattr(img, "filename", "") or "<image>")

    def __repr__(self) -> str:
        return "ToRGB()"


def build_transform(cfg: Mapping[str, Any]) -> Callable[[Image.Image], torch.Tensor]:
    """The callable for :func:`transform_config`'s dict: RGB conversion, resize, crop, to tensor, normalise."""
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
    scale = (math.floor(h / cfg["crop_pct"] + 1e-6), math.floor(w / cfg["crop_pct"] + 1e-6))
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
    dataset labels became model indices; ``notes`` are remarks for the user.
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

    def __len__(self) -> int:
        return len(self.labels)

    def set_transform(self, transform: Callable[[Any], torch.Tensor] | None) -> None:
        """Apply ``transform`` to every image from now on."""
        self.dataset.transform = transform

    @property
    def data(self) -> str:
        """Where the data are, for the provenance (a Hugging Face hub name as it is)."""
        if str(self.root) in ("", ".") or (self.kind.startswith("hfds/") and not self.root.exists()):
            return str(self.root) if str(self.root) not in ("", ".") else ""
        return str(self.root.resolve())


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


def _natural_order_note(classes: Sequence[str]) -> list[str]:
    """A note when natural order (timm's readers: class2 < class10) and plain order (torchvision ImageFolder:
    class10 < class2) of the class names differ: labels follow plain order."""
    from timm.utils.misc import natural_key
    if sorted(classes, key=natural_key) == sorted(classes):
        return []
    return [("class names sort differently in natural order (timm's train.py: 2 before 10) and plain order "
             "(torchvision's ImageFolder: 10 before 2); labels follow plain order, pass --class-map if the model "
             "was trained with the other")]


def _split_root(root: Path, split: str | None) -> tuple[Path, str | None]:
    """``root/split`` (or a synonym: val, validation, ...) when it exists, as timm's ``create_dataset`` searches;
    the split is the directory's name when none is given and it names one (``.../imagenet/train``)."""
    if split is not None:
        from timm.data.dataset_factory import _search_split
        return Path(_search_split(str(root), split)), split
    return root, SPLIT_NAMES.get(root.name.lower())


def _open_folder(root: Path, split: str | None) -> DataSource:
    root, split = _split_root(root, split)
    classes, paths, raw = _image_folder(root)
    digest = hashlib.sha256()
    for p, t in zip(paths, raw.tolist()):
        digest.update(f"{os.path.relpath(p, root)}\t{t}\n".encode("utf-8", "surrogateescape"))
    return DataSource(dataset=_Samples(_Paths(paths), raw, None), kind="folder", split=split, root=root, labels=raw,
                      dataset_classes=classes, class_names=None, fingerprint=digest.hexdigest(),
                      reader="ImageFolder (classes in sorted order)", notes=_natural_order_note(classes))


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


class _DiskHfds:
    """A Hugging Face dataset saved with ``save_to_disk`` (which ``load_dataset`` does not read), served like timm's
    ``ReaderHfds``: items are ``(binary file object, label)``, images left undecoded."""

    def __init__(self, path: Path, split: str | None) -> None:
        import datasets
        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            if split is None or split not in ds:
                raise InputError(f"--dataset hfds/{path}: give --split, one of {', '.join(ds)}")
            ds = ds[split]
        self.image_key, self.label_key = _hf_columns(ds.features)
        self.dataset = ds.cast_column(self.image_key, datasets.Image(decode=False))
        self.split = str(ds.split) if ds.split is not None else split
        from timm.data.readers._hfds import get_class_labels
        self.class_to_idx = get_class_labels(ds.info, self.label_key)

    def __getitem__(self, index: int) -> tuple[BinaryIO, int]:
        item = self.dataset[index]
        image = item[self.image_key]
        fileobj = io.BytesIO(image["bytes"]) if image.get("bytes") else open(image["path"], "rb")  # noqa: SIM115
        return fileobj, item[self.label_key]

    def __len__(self) -> int:
        return len(self.dataset)


def _hf_columns(features: Any) -> tuple[str, str]:
    """The image and label columns: ``image`` / ``label`` (timm's defaults) when present, else the first Image and
    the first ClassLabel (or integer) column."""
    import datasets
    names = list(features or {})
    image = "image" if "image" in names else next((n for n in names if isinstance(features[n], datasets.Image)), "")
    label = "label" if "label" in names else next(
        (n for n in names if isinstance(features[n], datasets.ClassLabel)), "")
    if not image or not label:
        raise InputError(f"the Hugging Face dataset has columns {', '.join(names)}; ncaudit needs an Image column and "
                         "a ClassLabel (or integer) label column")
    return image, label


def _hfds_reader(name: str, root: Path | None, split: str | None) -> tuple[Any, str]:
    """timm's ``ReaderHfds`` over a dataset name or local directory (``datasets.load_dataset``, cached under
    ``root`` when given, else HF_DATASETS_CACHE), or the same over a ``save_to_disk`` directory."""
    try:
        import datasets
    except ImportError:
        raise InputError("--dataset hfds/...: needs the Hugging Face datasets package: pip install 'ncaudit[hf]'") \
            from None
    path = Path(name).expanduser()
    if (path / "state.json").is_file() or (path / "dataset_dict.json").is_file():
        return _DiskHfds(path, split), "datasets.load_from_disk"
    from timm.data.readers.reader_hfds import ReaderHfds
    cache = str(root) if root is not None else None
    candidates = [split] if split else ["validation", "test", "train"]
    errors: list[str] = []
    try:
        builder = datasets.load_dataset_builder(name, cache_dir=cache)
        image, label = _hf_columns(builder.info.features) if builder.info.features else ("image", "label")
        for candidate in candidates:
            try:
                return ReaderHfds(name=name, root=cache, split=candidate, input_key=image, target_key=label), \
                    f"timm ReaderHfds (split {candidate})"
            except (ValueError, KeyError) as exc:  # an unknown split (timm/datasets never raise InputError)
                errors.append(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
    except InputError:
        raise
    except (ValueError, KeyError) as exc:  # from the builder: the same for every split
        errors.append(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
    except Exception as exc:  # noqa: BLE001 - datasets raises many kinds (not found, offline, network)
        raise _hfds_error(name, exc) from None
    raise InputError(f"--dataset hfds/{name}: no split {' / '.join(candidates)} ({errors[-1]}); give --split")


def _hfds_error(name: str, exc: BaseException) -> InputError:
    from datasets import config
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    offline = "HF_HUB_OFFLINE=1 (or HF_DATASETS_OFFLINE=1) is set, so nothing is downloaded; " \
        if config.HF_HUB_OFFLINE else ""
    return InputError(f"--dataset hfds/{name}: cannot load it ({text}); {offline}give a local directory, or a name "
                      f"cached under HF_DATASETS_CACHE ({config.HF_DATASETS_CACHE}) or --data")


def _open_hfds(name: str, root: Path | None, split: str | None) -> DataSource:
    reader, how = _hfds_reader(name, root, split)
    ds, key = reader.dataset, reader.label_key
    if key in ds.column_names:  # one column read by arrow, not row by row
        raw = np.asarray(ds.select_columns([key]).with_format("numpy")[key], dtype=np.int64)
    else:
        raw = np.asarray(list(reader.iter_targets()), dtype=np.int64)
    if raw.size and int(raw.min()) < 0:
        raise InputError(f"--dataset hfds/{name}: some labels are negative (unlabelled samples, e.g. a test split "
                         "without labels); pick a labelled split")
    by_index = sorted(reader.class_to_idx.items(), key=lambda kv: kv[1])
    classes = [str(n) for n, _ in by_index] or [str(i) for i in range(int(raw.max()) + 1 if raw.size else 0)]
    split = getattr(reader, "split", None) or split
    digest = hashlib.sha256(raw.tobytes())
    digest.update(f"{name}|{len(reader)}".encode())
    return DataSource(dataset=_Samples(_ReaderItems(reader, f"hfds/{name}"), raw, None), kind=f"hfds/{name}",
                      split=split, root=Path(name), labels=raw, dataset_classes=classes, class_names=None,
                      fingerprint=digest.hexdigest(), reader=how)


@contextlib.contextmanager
def _quiet(logger: str) -> Iterator[None]:
    """Silence a library logger's warnings (timm's WebDataset reader warns when there is no info file)."""
    log = logging.getLogger(logger)
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def _wds_shards(root: Path, name: str, split: str | None) -> tuple[list[str], int, str]:
    """``(shard files, samples announced by the info file or 0, split)`` from timm's ``ReaderWds``: ``split`` is a
    split of ``root/_info.json`` (``info.json``) or a brace pattern such as ``digits-test-{0000..0003}.tar``."""
    try:
        import webdataset  # noqa: F401
        from timm.data.readers.reader_wds import ReaderWds
    except ImportError:
        raise InputError("--dataset wds/...: needs the webdataset package: pip install 'ncaudit[wds]'") from None
    errors: list[str] = []
    for candidate in ([split] if split else ["validation", "val", "test"]):
        try:
            with _quiet("timm.data.readers.reader_wds"):
                reader = ReaderWds(root=str(root), name=name, split=candidate)
        except (RuntimeError, KeyError, ValueError) as exc:
            errors.append(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
            continue
        files = [str(root / f) for f in reader.split_info.filenames]
        missing = [f for f in files if not os.path.isfile(f)]
        if missing:
            raise InputError(f"--dataset wds/{name}: shard {missing[0]} not found ({len(missing)} of {len(files)} "
                             "missing); ncaudit reads local shards only")
        return files, int(reader.split_info.num_samples or 0), reader.split_info.name or str(candidate)
    raise InputError(f"--dataset wds/{name}: {errors[-1] if errors else 'no split'}; give --split as a split of "
                     f"{root}/_info.json or a shard pattern such as 'NAME-{{0000..0009}}.tar'")


#: Image extensions of WebDataset samples, in timm's order of preference (its ``input_key``), plus jpeg.
_WDS_IMAGES = ("jpg", "png", "webp", "jpeg")


def _index_shard(path: str) -> Iterator[tuple[str, str, int, int, int]]:
    """``(key, member, offset, size, label)`` per sample of a WebDataset shard, in shard order: members grouped by
    key as webdataset does, the image by extension preference, the label from the ``.cls`` member."""
    from webdataset.tariterators import base_plus_ext

    def emit(key: str, group: dict[str, tarfile.TarInfo], tf: tarfile.TarFile) -> tuple[str, str, int, int, int]:
        image = next((group[e] for e in _WDS_IMAGES if e in group), None)
        if image is None or "cls" not in group:
            raise InputError(f"{path}: sample {key!r} has {', '.join(sorted(group))}; a WebDataset sample needs an "
                             "image (.jpg/.png/.webp) and a class index (.cls)")
        fh = tf.extractfile(group["cls"])
        try:
            label = int((fh.read() if fh else b"").decode().strip())
        except ValueError:
            raise InputError(f"{path}: sample {key!r}: its .cls member is not an integer class index") from None
        return key, image.name, image.offset_data, image.size, label

    try:
        with tarfile.open(path, "r:") as tf:
            key, group = None, {}
            for ti in tf:
                parts = base_plus_ext(ti.name) if ti.isfile() else None
                if not parts or parts[0] is None:
                    continue
                if parts[0] != key and group:
                    yield emit(key, group, tf)  # type: ignore[arg-type]
                    group = {}
                key = parts[0]
                group[parts[1].lower()] = ti
            if group:
                yield emit(key, group, tf)  # type: ignore[arg-type]
    except tarfile.TarError as exc:
        raise InputError(f"{path}: not a readable tar shard ({exc}); fix or replace the file") from None


def _open_wds(name: str, root: Path, split: str | None) -> DataSource:
    files, announced, split = _wds_shards(root, name, split)
    rows = [(i, *row) for i, f in enumerate(files) for row in _index_shard(f)]
    if not rows:
        raise InputError(f"--dataset wds/{name}: the shards of split {split} hold no samples")
    raw = np.asarray([r[5] for r in rows], dtype=np.int64)
    if int(raw.min()) < 0:
        raise InputError(f"--dataset wds/{name}: some .cls labels are negative (unlabelled samples); pick a labelled "
                         "split")
    images = _TarMembers(files, np.asarray([r[0] for r in rows]), np.asarray([r[3] for r in rows], dtype=np.int64),
                         np.asarray([r[4] for r in rows], dtype=np.int64), [r[2] for r in rows])
    digest = hashlib.sha256("".join(f"{os.path.basename(files[r[0]])}:{r[1]}\t{r[5]}\n" for r in rows).encode())
    notes = [f"the info file announces {announced} samples but the shards hold {len(rows)}"] \
        if announced and announced != len(rows) else []
    return DataSource(dataset=_Samples(images, raw, None), kind=f"wds/{name}", split=split, root=root, labels=raw,
                      dataset_classes=[str(i) for i in range(int(raw.max()) + 1)], class_names=None,
                      fingerprint=digest.hexdigest(), reader="timm ReaderWds split info + shard index", notes=notes)


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
