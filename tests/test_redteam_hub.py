"""Hostile or missing hub files: a Hugging Face cache whose weights are a pickle payload, an inflating archive, a
corrupt safetensors file or a FIFO, whose config.json asks for absurd preprocessing; and a hub that cannot be
reached. Cached files load without a network call; a missing one fails in seconds; every bad file is one line that
says what is wrong with it (never "not in the cache").
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

import pytest
import torch
from extract_fixtures import timm_model

from ncaudit.errors import InputError
from ncaudit.models import Weights, _hub, load_model
from ncaudit.models import _checkpoint as checkpoint_module

TAG = "test_resnet.r160_in1k"
REVISION = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty Hugging Face hub cache in use, offline mode off (as on a user's machine), and a hub endpoint that
    refuses connections at once (nothing here can reach the real one)."""
    from huggingface_hub import constants
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "https://127.0.0.1:9")
    return cache


def snapshot(cache: Path, files: dict[str, object]) -> Path:
    """``timm/test_resnet.r160_in1k`` in ``cache`` as huggingface_hub lays it out, holding ``files`` (bytes, a
    state dict saved as safetensors, or a callable that writes the file)."""
    from safetensors.torch import save_file
    repo = cache / f"models--timm--{TAG}"
    snap = repo / "snapshots" / REVISION
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(REVISION)
    for name, content in files.items():
        if isinstance(content, bytes):
            (snap / name).write_bytes(content)
        elif isinstance(content, dict):
            save_file({k: v.contiguous() for k, v in content.items()}, str(snap / name))
        else:
            content(snap / name)
    return snap


def config(**pretrained: object) -> bytes:
    model = timm_model(num_classes=1000, seed=7)
    cfg = {**dict(model.pretrained_cfg), **pretrained}
    return json.dumps({"architecture": "test_resnet", "num_classes": 1000, "pretrained_cfg": cfg},
                      default=list).encode()


@pytest.fixture(scope="module")
def weights() -> dict[str, torch.Tensor]:
    return timm_model(num_classes=1000, seed=7).state_dict()


class NoNetwork:
    """Records (and refuses) every attempt to open a connection or resolve a name."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: list[str] = []

        def refuse(what):
            def call(*args, **kwargs):
                self.calls.append(f"{what}{args[:2]}")
                raise OSError("network disabled by the test")
            return call

        monkeypatch.setattr(socket.socket, "connect", refuse("connect"))
        monkeypatch.setattr(socket, "getaddrinfo", refuse("getaddrinfo"))
        monkeypatch.setattr(socket, "create_connection", refuse("create_connection"))


# ---------------------------------------------------------------------------------------------------------------------
# Offline in seconds (issue 22, item 4): without HF_HUB_OFFLINE
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", [TAG, f"hf-hub:timm/{TAG}"])
def test_a_cached_file_loads_without_a_network_call(hub: Path, weights: dict, monkeypatch: pytest.MonkeyPatch,
                                                    name: str) -> None:
    snapshot(hub, {"model.safetensors": weights, "config.json": config()})
    net = NoNetwork(monkeypatch)
    loaded = load_model(name, Weights("pretrained"))
    assert net.calls == []
    assert loaded.checkpoint is not None and loaded.checkpoint.path.name == "model.safetensors"
    torch.testing.assert_close(loaded.model.fc.weight, weights["fc.weight"], rtol=0, atol=0)
    assert "state_dict" not in loaded.pretrained_cfg


@pytest.mark.parametrize("name", [TAG, f"hf-hub:timm/{TAG}"])
def test_a_missing_file_fails_within_seconds(hub: Path, name: str) -> None:
    start = time.perf_counter()
    with pytest.raises(InputError, match=r"not in the cache .* and the hub cannot be reached \(127.0.0.1:9"):
        load_model(name, Weights("pretrained"))
    assert time.perf_counter() - start < _hub.REACH_TIMEOUT + 2


def test_an_unanswering_hub_costs_the_timeout_not_minutes(monkeypatch: pytest.MonkeyPatch) -> None:
    import threading

    released = threading.Event()

    def hang(*args, **kwargs):  # a resolver or a connection that never answers (until the test ends)
        released.wait(30)
        raise OSError("released")

    monkeypatch.setattr(socket, "create_connection", hang)
    monkeypatch.setattr(_hub, "REACH_TIMEOUT", 0.3)
    start = time.perf_counter()
    try:
        assert "no answer within 0.3 s" in _hub._unreachable("https://huggingface.co")
        assert time.perf_counter() - start < 2
    finally:
        released.set()


# ---------------------------------------------------------------------------------------------------------------------
# 5. Hub files get the --checkpoint path's checks and messages
# ---------------------------------------------------------------------------------------------------------------------
class _Payload:
    def __reduce__(self):
        return (os.system, ("echo the payload ran",))


def _pickle_payload(path: Path) -> None:
    torch.save({"fc.weight": torch.zeros(2), "x": _Payload()}, path)


def _fifo(path: Path) -> None:
    os.mkfifo(path.parent.parent.parent / "blob")
    os.symlink("../../blob", path)


@pytest.mark.parametrize("files, needle", [
    ({"pytorch_model.bin": _pickle_payload}, "refused: loading this checkpoint would run code"),
    ({"model.safetensors": b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all"}, "not a readable safetensors file"),
    ({"model.safetensors": _fifo}, "is a FIFO (named pipe), not a regular file"),
])
def test_a_bad_cached_weights_file_says_what_is_wrong(hub: Path, files: dict, needle: str) -> None:
    snapshot(hub, files)
    with pytest.raises(InputError) as info:
        load_model(TAG, Weights("pretrained"))
    assert needle in str(info.value) and "not in the cache" not in str(info.value)


def test_an_inflating_cached_archive_is_refused_before_inflating(hub: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def inflating(path: Path) -> None:  # zeros deflate ~1000x: the archive declares far more than it holds
        import zipfile
        torch.save({"fc.weight": torch.zeros(4)}, path)
        with zipfile.ZipFile(path, "a", compression=zipfile.ZIP_DEFLATED) as z:
            z.writestr("archive/data/big", b"\0" * (8 << 20))

    snapshot(hub, {"pytorch_model.bin": inflating})
    monkeypatch.setattr(checkpoint_module, "INFLATE_CHECK_BYTES", 1 << 20)
    loads = []
    monkeypatch.setattr(torch, "load", lambda *a, **k: loads.append(a))
    with pytest.raises(InputError, match="refused: the checkpoint archive declares"):
        load_model(TAG, Weights("pretrained"))
    assert loads == []


@pytest.mark.parametrize("pretrained, model_args, needle", [
    ({"input_size": [3, -160, 160]}, {}, "(pretrained_cfg): input_size is [3, -160, 160]"),
    ({"input_size": [3, 100000, 100000]}, {}, "(pretrained_cfg): input_size is [3, 100000, 100000]"),
    ({"std": [0.0, 0.2, 0.2]}, {}, "(pretrained_cfg): std is [0.0, 0.2, 0.2]"),
    ({"crop_pct": 0}, {}, "(pretrained_cfg): crop_pct is 0"),
    ({}, {"img_size": 100000}, "(model_args): img_size is 100000"),
])
def test_config_json_values_are_range_checked(hub: Path, weights: dict, pretrained: dict, model_args: dict,
                                              needle: str) -> None:
    raw = json.loads(config(**pretrained))
    raw["model_args"] = model_args
    snap = snapshot(hub, {"model.safetensors": weights, "config.json": json.dumps(raw).encode()})
    with pytest.raises(InputError) as info:
        load_model(f"hf-hub:timm/{TAG}", Weights("pretrained"))
    assert str(info.value).startswith(f"{snap / 'config.json'} ") and needle in str(info.value), str(info.value)


def test_config_json_that_is_not_json(hub: Path, weights: dict) -> None:
    snapshot(hub, {"model.safetensors": weights, "config.json": b"{\"architecture\": "})
    with pytest.raises(InputError, match="config.json: not a readable JSON config"):
        load_model(f"hf-hub:timm/{TAG}", Weights("pretrained"))


def test_checkpoint_metadata_is_range_checked(tmp_path: Path, weights: dict) -> None:
    from safetensors.torch import save_file
    small = timm_model(num_classes=3).state_dict()
    path = tmp_path / "big.safetensors"
    save_file({k: v.contiguous() for k, v in small.items()}, str(path), metadata={"img_size": "100000"})
    with pytest.raises(InputError, match=r"big.safetensors \(metadata\): img_size is '100000'"):
        load_model("test_resnet", Weights("checkpoint", checkpoint=path))
