import os
import sys
from pathlib import Path

# Tests never reach the network: huggingface_hub and datasets read these when first imported.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"

import pytest

sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture
def cache_path(tmp_path):
    """A factory of fresh cache paths under tmp_path."""
    counter = iter(range(10_000))
    return lambda name="cache": tmp_path / f"{name}_{next(counter)}.h5"


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny ImageFolder of three classes (tests/extract_fixtures.py), one per test module."""
    from extract_fixtures import make_image_folder

    return make_image_folder(tmp_path_factory.mktemp("imgs") / "data")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A timm test_resnet checkpoint (3 classes) saved as training scripts do, under ``state_dict`` with an epoch."""
    import torch
    from extract_fixtures import timm_model

    path = tmp_path_factory.mktemp("ckpt") / "test_resnet.pth"
    torch.save({"state_dict": timm_model().state_dict(), "epoch": 1}, path)
    return path


@pytest.fixture(scope="module")
def reference(images: Path, ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The one-process extraction of ``images`` through ``ckpt`` that the extract tests compare against."""
    from extract_fixtures import FAST

    from ncaudit.extract import extract

    out = tmp_path_factory.mktemp("ref") / "ref.h5"
    extract("test_resnet", ckpt, images, out, **FAST)
    return out

