"""Where the weights come from: published weights through the libraries' own caches (a Hugging Face hub cache and a
TORCH_HOME built here, offline), a random init, checkpoints; and the preprocessing the weights record."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from extract_fixtures import make_image_folder, make_synset_folder, timm_model, torchvision_model
from PIL import Image
from typer.testing import CliRunner

from ncaudit.cache import FeatureCache
from ncaudit.cli import app
from ncaudit.data import TransformOverrides, transform_hints
from ncaudit.errors import InputError
from ncaudit.extract import extract
from ncaudit.models import Weights

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "fixtures"
RUN = {"workers": 0, "progress": False, "batch_size": 16, "precision": "fp32", "device": "cpu"}
TAG = "test_resnet.r160_in1k"


def _read(path: Path) -> dict[str, np.ndarray]:
    with h5py.File(path, "r", locking=False) as f:
        return {k: f[k][()] for k in ("features", "labels", "logits", "classifier/weight")}


def _attrs(path: Path) -> dict[str, object]:
    with FeatureCache(path) as cache:
        return dict(cache.info.attrs)


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.nn.Module]:
    """A Hugging Face hub cache holding ``timm/test_resnet.r160_in1k`` as huggingface_hub lays it out, with the
    weights of a random-init model (seed 7) and the repository's config.json."""
    from safetensors.torch import save_file
    cache = tmp_path_factory.mktemp("hf") / "hub"
    repo = cache / f"models--timm--{TAG}"
    revision = "0123456789abcdef0123456789abcdef01234567"
    snapshot = repo / "snapshots" / revision
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    model = timm_model(num_classes=1000, seed=7)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(snapshot / "model.safetensors"))
    (snapshot / "config.json").write_text(json.dumps({"architecture": "test_resnet", "num_classes": 1000,
                                                      "pretrained_cfg": dict(model.pretrained_cfg)}, default=list))
    return cache, model


@pytest.fixture(scope="module")
def synsets(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[int]]:
    """An ImageNet-style val/ of three synset folders (indices 3, 42, 500 of imagenet-1k)."""
    from timm.data import ImageNetInfo
    info, indices = ImageNetInfo(), [3, 42, 500]
    root = make_synset_folder(tmp_path_factory.mktemp("inet") / "val", [info.index_to_label_name(i) for i in indices])
    return root, indices


def _timm_forward(model: torch.nn.Module, root: Path) -> np.ndarray:
    """Pre-logits features through timm's own eval transform of the model's pretrained_cfg (an independent path)."""
    from timm.data import create_transform, resolve_model_data_config
    tf = create_transform(**resolve_model_data_config(model), is_training=False)
    x = torch.stack([tf(Image.open(p).convert("RGB")) for p in sorted(root.glob("*/*.png"))])
    with torch.inference_mode():
        return model.eval().forward_head(model.forward_features(x), pre_logits=True).numpy()


def test_pretrained_from_an_offline_hub_cache(hub: tuple[Path, torch.nn.Module], synsets: tuple[Path, list[int]],
                                              tmp_path: Path) -> None:
    """The real CLI in a process whose environment says offline and where the cache is: timm loads the weights
    through huggingface_hub exactly as for a download."""
    cache, model = hub
    data, indices = synsets
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "PYTHONPATH": str(ROOT)}
    out = tmp_path / "pre.h5"
    res = subprocess.run([sys.executable, "-m", "ncaudit", "extract", "-m", TAG, "--pretrained", "-d", str(data),
                          "-o", str(out), "-j", "0", "--no-progress", "--device", "cpu"], env=env,
                         capture_output=True, text=True, timeout=300, check=False)
    assert res.returncode == 0, res.stderr
    head = " ".join(res.stderr.split())  # the first lines say what was loaded and where each value came from
    assert f"timm published weights timm/{TAG}" in head and "by synset (imagenet-1k" in head
    assert f"from pretrained_cfg of timm/{TAG}: input_size" in head and "crop 160x160" in head
    got = _read(out)
    np.testing.assert_allclose(got["features"], _timm_forward(model, data), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(got["classifier/weight"], model.fc.weight.detach().numpy())
    assert sorted(set(got["labels"].tolist())) == indices
    attrs = _attrs(out)
    assert attrs["weights"] == "pretrained" and attrs["checkpoint"].endswith("model.safetensors")
    assert len(str(attrs["checkpoint_sha256"])) == 64
    with FeatureCache(out) as c:
        assert c.info.class_names[3] == "n01491361 tiger shark, Galeocerdo cuvieri"


def test_hf_hub_name_and_the_offline_error(hub: tuple[Path, torch.nn.Module], synsets: tuple[Path, list[int]],
                                           tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants
    cache, model = hub
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))  # read at call time; the tests run offline
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    extract(f"hf-hub:timm/{TAG}", Weights("pretrained"), synsets[0], tmp_path / "hub.h5", limit=2, **RUN)
    np.testing.assert_array_equal(_read(tmp_path / "hub.h5")["classifier/weight"], model.fc.weight.detach().numpy())
    with pytest.raises(InputError, match=rf"resnet18.a1_in1k: .*not in the cache {cache} and HF_HUB_OFFLINE=1"):
        extract("resnet18.a1_in1k", Weights("pretrained"), synsets[0], tmp_path / "x.h5", **RUN)
    assert not (tmp_path / "x.h5").exists()
    res = CliRunner().invoke(app, ["extract", "-m", "resnet18.zz_none", "--pretrained", "-d", str(synsets[0]), "-o",
                                   str(tmp_path / "y.h5")])
    assert res.exit_code == 2 and "Invalid pretrained tag" in res.stderr and "list_pretrained" in res.stderr


def test_torchvision_weights_from_torch_home(synsets: tuple[Path, list[int]], tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    import torchvision
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    member = torchvision.models.MobileNet_V3_Small_Weights.IMAGENET1K_V1
    with pytest.raises(InputError, match=r"not in TORCH_HOME's cache .*mobilenet_v3_small-047dcff4.pth"):
        extract("torchvision:mobilenet_v3_small", Weights("pretrained"), synsets[0], tmp_path / "x.h5", **RUN)
    model = torchvision_model("mobilenet_v3_small", num_classes=1000, seed=5)
    target = tmp_path / "torch" / "hub" / "checkpoints" / Path(member.url).name
    target.parent.mkdir(parents=True)
    torch.save(model.state_dict(), target)
    notes: list[str] = []
    out = tmp_path / "tv.h5"
    extract("torchvision:mobilenet_v3_small", Weights("pretrained", tag="IMAGENET1K_V1"), synsets[0], out,
            transform=TransformOverrides(img_size=64), log=notes.append, **RUN)
    assert any("evaluating at 64x64 px" in n and "224x224" in n for n in notes), notes
    got = _read(out)
    np.testing.assert_array_equal(got["classifier/weight"], model.classifier[-1].weight.detach().numpy())
    T = torchvision.transforms  # the enum's own recipe at 64 px: resize floor(64 * 256 / 224) = 73, crop 64
    tf = T.Compose([T.Resize(73), T.CenterCrop(64), T.ToTensor(), T.Normalize([0.485, 0.456, 0.406],
                                                                                [0.229, 0.224, 0.225])])
    x = torch.stack([tf(Image.open(p).convert("RGB")) for p in sorted(synsets[0].glob("*/*.png"))])
    with torch.inference_mode():
        want = torch.flatten(model.eval().avgpool(model.features(x)), 1)
        want = model.classifier[:-1](want).numpy()
    np.testing.assert_allclose(got["features"], want, rtol=1e-4, atol=1e-4)
    attrs = _attrs(out)
    transform = json.loads(str(attrs["transform"]))
    assert transform["sources"]["mean"] == "MobileNet_V3_Small_Weights.IMAGENET1K_V1.transforms()"
    assert transform["crop_pct"] == pytest.approx(224 / 256) and attrs["weights"] == "pretrained"


def test_random_init_is_reproducible_and_exclusive(tmp_path: Path) -> None:
    data = make_image_folder(tmp_path / "d", per_class=3)
    out = tmp_path / "init.h5"
    extract("test_resnet", Weights("random-init"), data, out, transform=TransformOverrides(img_size=32), **RUN)
    model = timm_model("test_resnet", num_classes=3)  # seed 0; the classes come from the dataset
    got = _read(out)
    np.testing.assert_array_equal(got["classifier/weight"], model.fc.weight.detach().numpy())
    attrs = _attrs(out)
    assert attrs["weights"] == "random-init" and attrs["seed"] == 0 and attrs["epoch"] == 0
    runner = CliRunner()
    base = ["extract", "-m", "test_resnet", "-d", str(data), "-o", str(tmp_path / "z.h5")]
    none = runner.invoke(app, base)
    assert none.exit_code == 2 and "--checkpoint FILE, --pretrained" in none.stderr
    both = runner.invoke(app, [*base, "--random-init", "--weights", "DEFAULT"])
    assert both.exit_code == 2 and "contradict" in both.stderr and "--weights implies --pretrained" in both.stderr
    ema = runner.invoke(app, [*base, "--pretrained", "--ema"])
    assert ema.exit_code == 2 and "--ema" in ema.stderr
    assert not (tmp_path / "z.h5").exists()


def test_preprocessing_from_the_checkpoint_flags_override_with_a_warning(tmp_path: Path) -> None:
    data = make_image_folder(tmp_path / "d", per_class=2)
    args = argparse.Namespace(model="test_resnet", img_size=40, input_size=None, mean=[0.4, 0.4, 0.4],
                              std=[0.3, 0.3, 0.3], crop_pct=1.0, interpolation="bicubic", lr=0.1)
    torch.save({"state_dict": timm_model().state_dict(), "args": args, "epoch": 9}, tmp_path / "train.pth.tar")
    extract("test_resnet", tmp_path / "train.pth.tar", data, tmp_path / "a.h5", **RUN)
    cfg = json.loads(str(_attrs(tmp_path / "a.h5")["transform"]))
    assert cfg["input_size"] == [3, 40, 40] and cfg["mean"] == [0.4] * 3 and cfg["interpolation"] == "bicubic"
    assert cfg["sources"]["input_size"] == cfg["sources"]["std"] == "checkpoint args"
    assert cfg["sources"]["crop_mode"].startswith("timm default")
    notes: list[str] = []
    extract("test_resnet", tmp_path / "train.pth.tar", data, tmp_path / "b.h5", log=notes.append,
            transform=TransformOverrides(img_size=48, std=0.25), **RUN)
    cfg = json.loads(str(_attrs(tmp_path / "b.h5")["transform"]))
    assert cfg["input_size"] == [3, 48, 48] and cfg["sources"]["input_size"] == "--img-size"
    assert any("evaluating at 48x48 px" in n and "40x40" in n and "checkpoint args" in n for n in notes), notes
    assert any("normalising with std 0.25,0.25,0.25" in n for n in notes), notes


def test_transform_hints_read_every_recorded_form() -> None:
    meta = {"img_size": "32", "mean": "[0.5, 0.5, 0.5]", "std": "[0.25, 0.25, 0.25]", "crop_pct": "1.0",
            "interpolation": "bilinear", "epoch": "200"}  # the bundled checkpoints' safetensors metadata
    assert transform_hints(meta) == {"input_size": [3, 32, 32], "mean": [0.5] * 3, "std": [0.25] * 3,
                                     "crop_pct": 1.0, "interpolation": "bilinear"}
    refs = {"val_resize_size": 232, "val_crop_size": 224, "interpolation": "bilinear"}  # torchvision's references
    assert transform_hints(refs) == {"input_size": [3, 224, 224], "crop_pct": 224 / 232, "interpolation": "bilinear"}
    cfg = {"input_size": (3, 224, 224), "test_input_size": (3, 288, 288), "crop_mode": "squash", "mean": (0.1,),
           "std": (0, 1, 1), "interpolation": "random"}
    assert transform_hints(cfg) == {"input_size": [3, 224, 224], "test_input_size": [3, 288, 288],
                                    "crop_mode": "squash", "mean": [0.1] * 3}
