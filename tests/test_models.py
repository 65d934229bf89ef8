"""Checkpoint loading and classifier discovery for ``ncaudit extract``."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pytest
import torch
from extract_fixtures import timm_model, torchvision_model
from torch import nn

from ncaudit.errors import InputError
from ncaudit.models import LoadedModel, PenultimateModel, head_modules, load_checkpoint, load_model


@pytest.fixture(scope="module")
def sd() -> dict[str, torch.Tensor]:
    return timm_model().state_dict()


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_checkpoint_forms_load_the_same_weights(tmp_path: Path, sd: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file
    ns = argparse.Namespace(lr=0.1, model="test_resnet")
    forms = {
        "bare.pth": sd,
        "state_dict.pt": {"state_dict": sd, "epoch": 3, "args": ns},
        "model.bin": {"model": sd, "optimizer": {"state": {}}, "args": ns},
        "module.pth": {"state_dict": {f"module.{k}": v for k, v in sd.items()}},
        "compiled.pth": {f"_orig_mod.module.{k}": v for k, v in sd.items()},
    }
    for name, obj in forms.items():
        torch.save(obj, tmp_path / name)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "w.safetensors"))
    for name in list(forms) + ["w.safetensors"]:
        ckpt = load_checkpoint(tmp_path / name)
        assert _same(ckpt.state_dict, sd), name
        assert not ckpt.ema
        assert len(ckpt.sha256) == 64


def test_torchvision_reference_ema(tmp_path: Path, sd: dict[str, torch.Tensor]) -> None:
    ema = {k: v + 1 if v.is_floating_point() else v for k, v in sd.items()}
    obj = {"model": sd, "model_ema": {"n_averaged": torch.tensor(7), **{f"module.{k}": v for k, v in ema.items()}},
           "args": argparse.Namespace(model_ema=True), "epoch": 1}
    torch.save(obj, tmp_path / "ref.pth")
    plain = load_checkpoint(tmp_path / "ref.pth")
    assert _same(plain.state_dict, sd) and not plain.ema and plain.has_ema
    picked = load_checkpoint(tmp_path / "ref.pth", ema=True)
    assert _same(picked.state_dict, ema) and picked.ema and picked.key == "model_ema"
    torch.save({"state_dict_ema": sd}, tmp_path / "only_ema.pth")
    assert load_checkpoint(tmp_path / "only_ema.pth").ema
    with pytest.raises(InputError, match="--no-ema"):
        load_checkpoint(tmp_path / "only_ema.pth", ema=False)
    torch.save(sd, tmp_path / "plain.pth")
    with pytest.raises(InputError, match="no .*EMA|holds none"):
        load_checkpoint(tmp_path / "plain.pth", ema=True)


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[object, ...]]:
        return (Path.touch, (self.marker,))


def test_pickle_that_runs_code_is_refused_without_running(tmp_path: Path, sd: dict[str, torch.Tensor]) -> None:
    marker = tmp_path / "pwned"
    torch.save({"state_dict": sd, "payload": _Evil(marker)}, tmp_path / "evil.pth")
    assert not marker.exists()
    with pytest.raises(InputError, match="run code"):
        load_checkpoint(tmp_path / "evil.pth")
    assert not marker.exists()


def test_unreadable_and_missing_checkpoints(tmp_path: Path) -> None:
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint at all")
    with pytest.raises(InputError, match="not a readable"):
        load_checkpoint(tmp_path / "junk.pth")
    with pytest.raises(InputError, match="no such checkpoint"):
        load_checkpoint(tmp_path / "missing.pth")
    torch.save({"epoch": 3}, tmp_path / "nostate.pth")
    with pytest.raises(InputError, match="no state dict"):
        load_checkpoint(tmp_path / "nostate.pth")


def test_num_classes_read_from_checkpoint_and_mismatch(tmp_path: Path) -> None:
    torch.save(timm_model(num_classes=7).state_dict(), tmp_path / "k7.pth")
    loaded = load_model("test_resnet", tmp_path / "k7.pth")
    assert loaded.num_classes == 7 and loaded.heads[0][0] == "fc"
    with pytest.raises(InputError, match="does not fit|do not fit"):
        load_model("resnet18", tmp_path / "k7.pth")
    with pytest.raises(InputError, match="unknown timm model"):
        load_model("no_such_net", tmp_path / "k7.pth")


def test_squeezenet_has_no_linear_head() -> None:
    import torchvision
    with torch.device("meta"):
        model = torchvision.models.get_model("squeezenet1_1", weights=None)
    with pytest.raises(InputError, match="squeezenet"):
        head_modules(model, "torchvision")


def _loaded(model: nn.Module, library: str = "timm", name: str = "custom") -> LoadedModel:
    from ncaudit.models import Checkpoint
    model.eval()
    ckpt = Checkpoint(Path("x"), "0" * 64, {}, "", False, True, False)
    return LoadedModel(model=model, name=name, library=library, num_classes=3, checkpoint=ckpt,
                       heads=head_modules(model, library))


X = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def test_plain_linear_head_matches_pre_logits() -> None:
    model = timm_model()
    pm = PenultimateModel(_loaded(model))
    with torch.inference_mode():
        feats, logits = pm.verify(X, "fp32", torch.autocast("cpu", enabled=False))
        pre = model.forward_head(model.forward_features(X), pre_logits=True)
        assert torch.equal(feats, pre)
        assert torch.equal(logits, model(X))
    np.testing.assert_array_equal(pm.weight, model.fc.weight.detach().double().numpy())
    assert "forward_head(pre_logits=True)" in pm.source


def test_norm_before_linear_is_folded_and_bias_free_head_has_no_bias() -> None:
    model = timm_model()
    bn = nn.BatchNorm1d(96)
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.weight.uniform_(0.5, 2)
    model.fc = nn.Sequential(bn, nn.Linear(96, 3))
    pm = PenultimateModel(_loaded(model))
    with torch.inference_mode():
        feats, logits = pm.verify(X, "fp32", torch.autocast("cpu", enabled=False))
    assert "folded" in pm.source and pm.bias is not None
    np.testing.assert_allclose(feats.double().numpy() @ pm.weight.T + pm.bias, logits.double().numpy(), atol=1e-5)

    model2 = timm_model()
    model2.fc = nn.Linear(96, 3, bias=False)
    pm2 = PenultimateModel(_loaded(model2))
    with torch.inference_mode():
        pm2.verify(X, "fp32", torch.autocast("cpu", enabled=False))
    assert pm2.bias is None


def test_mlp_head_is_refused() -> None:
    model = timm_model()
    model.fc = nn.Sequential(nn.Linear(96, 32), nn.ReLU(), nn.Linear(32, 3))
    pm = PenultimateModel(_loaded(model, name="mlp_net"))
    with torch.inference_mode(), pytest.raises(InputError, match="mlp_net.*not an affine"):
        pm.verify(X, "fp32", torch.autocast("cpu", enabled=False))


def test_distilled_two_heads_concatenate_their_inputs() -> None:
    model = timm_model("deit_tiny_distilled_patch16_224", img_size=32)
    with torch.no_grad():  # make the two heads differ clearly
        model.head_dist.weight.mul_(-3)
    pm = PenultimateModel(_loaded(model))
    with torch.inference_mode():
        feats, logits = pm.verify(X, "fp32", torch.autocast("cpu", enabled=False))
        assert torch.allclose(logits, model(X))
    assert feats.shape == (4, 2 * 192) and not pm.shared_input
    assert "concatenated" in pm.source


def test_torchvision_last_linear_and_wrong_layer_is_caught() -> None:
    model = torchvision_model("mobilenet_v3_small")
    pm = PenultimateModel(_loaded(model, "torchvision"))
    assert pm.heads[0][0] == "classifier.3"
    with torch.inference_mode():
        feats, logits = pm.verify(X, "fp32", torch.autocast("cpu", enabled=False))
    assert feats.shape == (4, 1024)
    # a model whose output is not the last Linear's output (logits scaled afterwards) is refused
    wrapped = nn.Sequential(torchvision_model("resnet18"), nn.Softmax(dim=1))
    pm2 = PenultimateModel(_loaded(wrapped, "torchvision", name="softmaxed"))
    with torch.inference_mode(), pytest.raises(InputError, match="softmaxed.*does not reproduce"):
        pm2.verify(X, "fp32", torch.autocast("cpu", enabled=False))
