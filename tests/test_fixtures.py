"""The bundled fixtures: the digits ImageFolder split and the trained ``test_resnet`` checkpoints."""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
DIGITS = FIXTURES / "digits"
CHECKPOINTS = FIXTURES / "checkpoints"
MANIFEST = CHECKPOINTS / "manifest.json"

# Class counts of sklearn.datasets.load_digits (fixed data bundled with scikit-learn; not imported at test time).
SOURCE_COUNTS = [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]
PIXEL_VALUES = {int(round(k * 255 / 16)) for k in range(17)}
NAME = re.compile(r"^\d{5}\.png$")


def _files(split: str) -> dict[int, list[Path]]:
    return {c: sorted((DIGITS / split / str(c)).glob("*.png")) for c in range(10)}


def _index(path: Path) -> int:
    return int(path.stem)


@pytest.fixture(scope="module")
def manifest() -> dict[str, Any]:
    return json.loads(MANIFEST.read_text())


def test_split_layout_counts_and_stratification() -> None:
    for split in ("train", "test"):
        assert sorted(p.name for p in (DIGITS / split).iterdir()) == [str(c) for c in range(10)]
    train, test = _files("train"), _files("test")
    for c in range(10):
        n_train, n_test = len(train[c]), len(test[c])
        assert n_train + n_test == SOURCE_COUNTS[c]
        assert abs(n_test / SOURCE_COUNTS[c] - 0.2) < 0.01, (c, n_test)
        assert all(NAME.match(p.name) for p in train[c] + test[c])
    total = sum(len(v) for v in train.values()) + sum(len(v) for v in test.values())
    assert total == 1797


def test_no_overlap_and_every_source_index_once() -> None:
    train = {_index(p) for v in _files("train").values() for p in v}
    test = {_index(p) for v in _files("test").values() for p in v}
    assert not train & test
    assert train | test == set(range(1797))


def test_images_decode_as_8x8_grayscale() -> None:
    seen: set[int] = set()
    for split in ("train", "test"):
        for paths in _files(split).values():
            for path in paths:
                with Image.open(path) as img:
                    assert img.format == "PNG" and img.mode == "L" and img.size == (8, 8)
                    seen.update(np.unique(np.asarray(img)).tolist())
    assert seen <= PIXEL_VALUES and {0, 255} <= seen


def test_manifest_files_exist_with_sha256(manifest: dict[str, Any]) -> None:
    listed = [c["file"] for c in manifest["checkpoints"]]
    assert [c["epoch"] for c in manifest["checkpoints"]] == [0, 1, 5, 50, 200]
    assert sorted(listed) == sorted(p.name for p in CHECKPOINTS.glob("*.safetensors"))
    for entry in manifest["checkpoints"]:
        data = (CHECKPOINTS / entry["file"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == entry["sha256"], entry["file"]
    t = manifest["transform"]
    assert (t["img_size"], t["mean"], t["std"], t["interpolation"], t["crop_pct"]) == (
        32,
        [0.5] * 3,
        [0.25] * 3,
        "bilinear",
        1.0,
    )


def test_manifest_records_collapse(manifest: dict[str, Any]) -> None:
    rows = manifest["checkpoints"]
    first, last = rows[0]["train_metrics"], rows[-1]["train_metrics"]
    assert last["nc1"] < first["nc1"] / 100 and last["nc1"] < rows[1]["train_metrics"]["nc1"] / 100
    assert last["nc3"] < first["nc3"] / 10
    assert last["nc4"] == 0.0 and rows[-1]["train_accuracy"] == 1.0
    for row in rows:  # float16 storage must not move NC1 (stored weights vs the float32 weights they came from)
        assert abs(row["train_metrics"]["nc1"] / row["nc1_fp32_weights"] - 1) < 0.02


def test_checkpoints_load_strict_with_metadata(manifest: dict[str, Any]) -> None:
    import timm
    from safetensors import safe_open
    from safetensors.torch import load_file

    model = timm.create_model("test_resnet", pretrained=False, num_classes=10)
    for entry in manifest["checkpoints"]:
        path = CHECKPOINTS / entry["file"]
        state = load_file(str(path))
        model.load_state_dict(state, strict=True)
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata()
        assert meta["model"] == "test_resnet" and meta["num_classes"] == "10"
        assert int(meta["epoch"]) == entry["epoch"]
        assert meta["img_size"] == "32" and meta["interpolation"] == "bilinear"
        assert json.loads(meta["mean"]) == [0.5] * 3 and json.loads(meta["std"]) == [0.25] * 3
        assert float(meta["train_accuracy"]) == pytest.approx(entry["train_accuracy"], abs=1e-6)
        assert meta["dtype"] == entry["dtype"]


def test_final_checkpoint_reproduces_accuracy_from_metadata(manifest: dict[str, Any]) -> None:
    """Build the transform from the checkpoint's metadata alone and recover the recorded accuracies."""
    import timm
    import torch
    from safetensors import safe_open
    from safetensors.torch import load_file
    from timm.data import create_transform

    entry = manifest["checkpoints"][-1]
    path = CHECKPOINTS / entry["file"]
    with safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata()
    size = int(meta["img_size"])
    transform = create_transform(
        input_size=(3, size, size),
        interpolation=meta["interpolation"],
        mean=tuple(json.loads(meta["mean"])),
        std=tuple(json.loads(meta["std"])),
        crop_pct=float(meta["crop_pct"]),
        is_training=False,
    )
    model = timm.create_model(meta["model"], pretrained=False, num_classes=int(meta["num_classes"]))
    model.load_state_dict(load_file(str(path)), strict=True)
    model.eval()
    for split, key in (("train", "train_accuracy"), ("test", "test_accuracy")):
        xs, ys = [], []
        for c, paths in _files(split).items():
            for p in paths:
                with Image.open(p) as img:
                    xs.append(transform(img.convert("RGB")))
                ys.append(c)
        with torch.inference_mode():
            pred = model(torch.stack(xs)).argmax(dim=1)
        accuracy = (pred == torch.tensor(ys)).double().mean().item()
        assert accuracy == pytest.approx(entry[key], abs=1.5 / len(ys)), split
