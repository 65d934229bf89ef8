"""What the cache-reading commands import: nothing of the model and data stack (timm, torchvision, PIL, datasets,
matplotlib, ...). Each command runs in a fresh interpreter that lists its modules at exit."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from reference import planted

from ncaudit import _device
from ncaudit.cache import write_cache

ROOT = Path(__file__).resolve().parents[1]
#: Modules that reading a cache never needs: the model zoo, images, datasets, plots, the hub.
HEAVY = ("timm", "torchvision", "PIL", "datasets", "matplotlib", "huggingface_hub", "safetensors", "webdataset",
         "pandas", "pyarrow", "scipy", "sklearn")
_RUN = """
import atexit, json, sys
listing = sys.argv[1]
def _dump():
    with open(listing, "w") as fh:
        json.dump(sorted({name.split(".")[0] for name in sys.modules}), fh)
atexit.register(_dump)
sys.argv = ["ncaudit", *sys.argv[2:]]
from ncaudit.cli import main
main()
"""


def modules_of(tmp_path: Path, *args: object) -> set[str]:
    listing = tmp_path / "modules.json"
    out = subprocess.run([sys.executable, "-c", _RUN, str(listing), *map(str, args)], capture_output=True,
                         text=True, cwd=ROOT)
    assert out.returncode in (0, 1), out.stderr
    return set(json.loads(listing.read_text()))


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("startup")
    h, y, etf = planted(C=3, p=5, n=10, seed=3)
    path = write_cache(tmp / "small.h5", h, y, weight=etf, bias=np.zeros(3), attrs={"split": "train"})
    return path


def test_report_imports_nothing_it_does_not_need(small, tmp_path):
    loaded = modules_of(tmp_path, "report", small, "-q", "--format", "markdown", "--fail-if", "nc1>1",
                        "--junit", tmp_path / "j.xml", "-o", tmp_path / "r.json")
    assert {"h5py", "numpy"} <= loaded  # the streaming statistics: the check itself can fail
    assert not loaded & set(HEAVY), sorted(loaded & set(HEAVY))
    # On the CPU both passes run in NumPy: the process never loads torch (~1.5 s, ~600 MiB of a CUDA build)
    assert ("torch" in loaded) == _device.cuda_possible()
    loaded = modules_of(tmp_path, "compare", tmp_path / "r.json", small, "-q")
    assert not loaded & set(HEAVY), sorted(loaded & set(HEAVY))
    assert ("torch" in loaded) == _device.cuda_possible()


def test_help_imports_no_torch(tmp_path):
    loaded = modules_of(tmp_path, "--help")
    assert not loaded & {"torch", "h5py", *HEAVY}, sorted(loaded & {"torch", "h5py", *HEAVY})
