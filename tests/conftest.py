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
