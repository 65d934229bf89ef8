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
