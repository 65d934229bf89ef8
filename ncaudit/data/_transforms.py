"""The eval transform: resolved from the user's flags, what the weights record and the model's defaults, as a
plain JSON-able dict with where each value came from; then built as a torchvision transform."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from ncaudit.data._images import _to_rgb8
from ncaudit.errors import InputError

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
