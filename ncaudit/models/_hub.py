"""Published weights through the libraries' own caches: timm tags and ``hf-hub:`` names through the Hugging
Face cache, torchvision weight enums through ``TORCH_HOME``."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping
from dataclasses import replace as dataclass_replace
from pathlib import Path
from typing import Any

import torch

from ncaudit.errors import InputError
from ncaudit.models._builder import LoadedModel, _build, _check_torchvision_arch, _finish
from ncaudit.models._checkpoint import Checkpoint, file_sha256, load_checkpoint


# ---------------------------------------------------------------------------------------------------------------------
# Published weights, through the libraries' own caches
# ---------------------------------------------------------------------------------------------------------------------
def hub_offline() -> bool:
    """Whether the user declared the machine offline (``HF_HUB_OFFLINE``, as huggingface_hub read it)."""
    try:
        from huggingface_hub import constants
        return bool(constants.HF_HUB_OFFLINE)
    except ImportError:  # pragma: no cover - timm depends on huggingface_hub
        return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _hf_cache() -> str:
    from huggingface_hub import constants
    return str(constants.HF_HUB_CACHE)


def _torch_hub_file(url: str) -> Path:
    """Where ``torch.hub.load_state_dict_from_url`` keeps ``url``: ``$TORCH_HOME/hub/checkpoints/<file name>``."""
    from urllib.parse import urlparse
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(url).path)


def _weights_file(path: Path) -> Checkpoint:
    """A record of a cached weights file (path and sha256; the weights themselves are in the model)."""
    return Checkpoint(path=path, sha256=file_sha256(path), state_dict={}, key="", ema=False, has_plain=True,
                      has_ema=False)


def _timm_origin(arch: str) -> tuple[str, str]:
    """``(where the published weights live, "hf" or "url")`` for a timm name, before anything is loaded."""
    for prefix in ("hf-hub:", "hf_hub:"):
        if arch.startswith(prefix):
            return arch[len(prefix):], "hf"
    try:
        import timm
        cfg = timm.models.get_pretrained_cfg(arch)
    except (RuntimeError, ValueError, KeyError):  # an unknown tag: timm's own error follows at build time
        cfg = None
    if cfg is not None and getattr(cfg, "hf_hub_id", None):
        return str(cfg.hf_hub_id), "hf"
    if cfg is not None and getattr(cfg, "url", None):
        return str(cfg.url), "url"
    return arch, "hf"


def _hub_error(name: str, arch: str, exc: BaseException) -> InputError:
    """One line naming what failed, the cache that was looked in and the variable that controls it."""
    where, kind = _timm_origin(arch)
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if isinstance(exc, RuntimeError) and ("pretrained tag" in text or "No pretrained weights" in text):
        base = arch.split(":")[-1].split(".")[0]
        return InputError(f"{name}: {text.rstrip('.')}; see timm.list_pretrained('{base}*') for the published "
                          "weights, or use --checkpoint / --random-init")
    if kind == "url":
        cache, variable = str(Path(torch.hub.get_dir()) / "checkpoints"), "TORCH_HOME"
    else:
        cache, variable = _hf_cache(), "HF_HUB_CACHE (or HF_HOME)"
    if hub_offline():
        return InputError(f"{name}: the published weights ({where}) are not in the cache {cache} and HF_HUB_OFFLINE=1 "
                          f"forbids downloading them; unset HF_HUB_OFFLINE to download them once, or set {variable} "
                          "to a cache that holds them")
    if type(exc).__name__ in ("RepositoryNotFoundError", "GatedRepoError", "RevisionNotFoundError"):
        return InputError(f"{name}: the hub refuses {where} ({text}); check the name, or log in for a gated repo")
    return InputError(f"{name}: could not load the published weights ({where}) into {cache} ({text}); check the "
                      f"network, or set {variable} to a cache that holds them and HF_HUB_OFFLINE=1")


def _timm_weights_file(cfg: Mapping[str, Any]) -> Path | None:
    """The cached file timm loaded the published weights from, when it can be found."""
    hub_id = cfg.get("hf_hub_id")
    if hub_id:
        from huggingface_hub import try_to_load_from_cache
        repo, _, revision = str(hub_id).partition("@")
        for filename in (cfg.get("hf_hub_filename"), "model.safetensors", "pytorch_model.bin",
                         "open_clip_model.safetensors", "open_clip_pytorch_model.bin"):
            found = try_to_load_from_cache(repo, filename, revision=revision or None) if filename else None
            if isinstance(found, str) and os.path.isfile(found):
                return Path(found)
    if cfg.get("url"):
        path = _torch_hub_file(str(cfg["url"]))
        return path if path.is_file() else None
    return None


def _timm_pretrained(name: str, arch: str, img_size: int | None) -> LoadedModel:
    try:
        model = _build("timm", arch, None, img_size, pretrained=True)
    except InputError:
        raise
    except Exception as exc:  # noqa: BLE001 - hub, network (httpx) and tag errors all surface here
        raise _hub_error(name, arch, exc) from None
    from timm.data import infer_imagenet_subset
    cfg = dict(getattr(model, "pretrained_cfg", None) or {})
    path = _timm_weights_file(cfg)
    where = cfg.get("hf_hub_id") or cfg.get("url") or arch
    source = f"timm published weights {where}" + (f" ({path})" if path else "")
    return _finish(model, name, "timm", _weights_file(path) if path else None, weights="pretrained", source=source,
                   pretrained_cfg=cfg, imagenet=infer_imagenet_subset(model))


def _torchvision_member(name: str, arch: str, tag: str | None) -> Any:
    """The weights enum member ``tag`` (``DEFAULT`` when None; ``ResNet50_Weights.X`` or ``X``, any case)."""
    import torchvision
    _check_torchvision_arch(arch)
    try:
        enum = torchvision.models.get_model_weights(arch)
    except (ValueError, KeyError):
        raise InputError(f"{name}: torchvision publishes no weights for this model; use --checkpoint or "
                         "--random-init") from None
    key = (tag or "DEFAULT").split(".")[-1].upper()
    try:
        return enum[key]
    except KeyError:
        raise InputError(f"--weights {tag}: {enum.__name__} has {', '.join(m.name for m in enum)} (or "
                         "DEFAULT)") from None


def _fetch_torch_hub(name: str, member: Any, path: Path) -> None:
    """Download ``member``'s file into the TORCH_HOME cache (hash-checked as torchvision does), unless offline."""
    label = f"{type(member).__name__}.{member.name}"
    if hub_offline():
        raise InputError(f"{name}: the {label} weights are not in TORCH_HOME's cache ({path}) and HF_HUB_OFFLINE=1 "
                         "forbids downloading them; unset HF_HUB_OFFLINE to download them once, or set TORCH_HOME to "
                         f"a directory whose hub/checkpoints/ holds {path.name}")
    match = torch.hub.HASH_REGEX.search(path.name)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(member.url, str(path), match.group(1) if match else None, progress=True)
    except Exception as exc:  # noqa: BLE001 - network, disk or hash errors
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(f"{name}: could not download the {label} weights to {path} ({text}); check the network, "
                         f"or set TORCH_HOME to a directory whose hub/checkpoints/ holds {path.name}") from None


@contextlib.contextmanager
def _serving(state: Mapping[str, torch.Tensor]) -> Iterator[None]:
    """Let torchvision's builders receive ``state`` (read with ``weights_only=True``) instead of unpickling the
    cached file themselves (``load_state_dict_from_url`` does so with ``weights_only=False``)."""
    from unittest import mock

    import torchvision.models._api as api
    with mock.patch.object(api, "load_state_dict_from_url", lambda *args, **kwargs: dict(state)):
        yield


def _torchvision_pretrained(name: str, arch: str, tag: str | None, img_size: int | None) -> LoadedModel:
    member = _torchvision_member(name, arch, tag)
    path = _torch_hub_file(member.url)
    if not path.is_file():
        _fetch_torch_hub(name, member, path)
    ckpt = load_checkpoint(path)
    with _serving(ckpt.state_dict):
        model = _build("torchvision", arch, None, img_size, pretrained=member)
    categories = list(member.meta.get("categories") or [])
    imagenet = "imagenet-1k" if member.name.startswith("IMAGENET1K") and len(categories) == 1000 else None
    return _finish(model, name, "torchvision", dataclass_replace(ckpt, state_dict={}), weights="pretrained",
                   source=f"torchvision {type(member).__name__}.{member.name} ({path})", tv_weights=member,
                   imagenet=imagenet)
