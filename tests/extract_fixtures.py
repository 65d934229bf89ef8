"""Shared helpers for the tests: tiny image folders and checkpoints built in-process (no downloads), the one-line
error of a failed command."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch
from PIL import Image

from ncaudit.data import TransformOverrides

CLASSES = ("b_cat", "a_dog", "c_eel")  # ImageFolder sorts: a_dog=0, b_cat=1, c_eel=2
PER_CLASS = 8
#: Images of :func:`make_image_folder`: PER_CLASS per class plus a grey and an RGBA one.
N_IMAGES = len(CLASSES) * PER_CLASS + 2


#: Quick extraction settings of the tests: 32 px, no worker processes, no progress bar, batches of 8.
FAST = {"transform": TransformOverrides(img_size=32), "workers": 0, "progress": False, "batch_size": 8}


def make_image_folder(root: Path, per_class: int = PER_CLASS, seed: int = 0) -> Path:
    """``root/<class>/<i>.png``: random 36x40 RGB images, plus one grey and one RGBA image in the first class."""
    rng = np.random.default_rng(seed)
    for c, name in enumerate(CLASSES):
        d = root / name
        d.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            arr = rng.integers(0, 256, (36, 40, 3), dtype=np.uint8)
            arr[..., c] //= 3  # a little class signal
            Image.fromarray(arr).save(d / f"{i:02d}.png")
    Image.fromarray(rng.integers(0, 256, (36, 40), dtype=np.uint8), mode="L").save(root / CLASSES[0] / "grey.png")
    Image.fromarray(rng.integers(0, 256, (36, 40, 4), dtype=np.uint8), mode="RGBA").save(
        root / CLASSES[0] / "rgba.png")
    return root


def make_synset_folder(root: Path, synsets: list[str]) -> Path:
    """An ImageNet-style folder: :func:`make_image_folder`'s classes renamed, in sorted order, to ``synsets``."""
    make_image_folder(root, per_class=2)
    for old, new in zip(sorted(p.name for p in root.iterdir()), synsets):
        (root / old).rename(root / new)
    return root


def timm_model(name: str = "test_resnet", num_classes: int = 3, seed: int = 0, **kwargs: object) -> torch.nn.Module:
    import timm
    torch.manual_seed(seed)
    return timm.create_model(name, pretrained=False, num_classes=num_classes, **kwargs).eval()


def torchvision_model(name: str, num_classes: int = 3, seed: int = 0, **kwargs: object) -> torch.nn.Module:
    import torchvision
    torch.manual_seed(seed)
    return torchvision.models.get_model(name, weights=None, num_classes=num_classes, **kwargs).eval()


def last_error_line(stderr: str) -> str:
    """The one ``error:`` line of a failed command: the last line of stderr, no traceback (what extract loaded or
    warned about may be said before it)."""
    lines = stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("error:")]
    assert "Traceback" not in stderr and len(errors) == 1 and lines[-1] == errors[0], stderr
    return errors[0]


def error_line(res, *needles: str) -> str:
    """The one ``error:`` line of a command that exited 2 (:func:`last_error_line`: what it loaded may come first),
    holding every needle."""
    assert res.exit_code == 2, (res.exit_code, res.stdout, res.stderr, res.exception)
    line = last_error_line(res.stderr)
    for needle in needles:
        assert needle in line, line
    return line


def only_error_line(res, *needles: str) -> str:
    """A command that exited 2 with one line on stderr, no traceback and nothing on stdout; the line, holding every
    needle."""
    assert res.exit_code == 2, (res.exit_code, res.stdout, res.stderr)
    err = res.stderr.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    for needle in needles:
        assert needle in err, err
    assert res.stdout == ""
    return err
