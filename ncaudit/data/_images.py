"""Decoding one image into 8-bit RGB: high bit depths and float images scaled, never clipped."""

from __future__ import annotations

import contextlib
import os
from typing import BinaryIO

import numpy as np
from PIL import Image

from ncaudit._validate import regular_file
from ncaudit.errors import InputError


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
    if isinstance(source, (str, os.PathLike)):
        regular_file(source, "an image")  # a FIFO named x.png would block the DataLoader worker for good
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


#: File extensions read as images (torchvision's ImageFolder list), compared in lower case.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
