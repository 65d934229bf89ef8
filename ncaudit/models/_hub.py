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

from ncaudit._validate import check_preprocessing, regular_file
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


#: The hub files a timm model's weights may be published as, in the order timm looks for them.
_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
#: Extensions of weights ncaudit reads itself (:func:`ncaudit.models.load_checkpoint`); others (``.npz``) timm reads.
_OWN_FORMATS = (".safetensors", ".bin", ".pth", ".pt")
#: Bytes a hub ``config.json`` may have (they are a few kB).
MAX_CONFIG_BYTES = 16 << 20
#: Seconds to wait for a connection to the hub (or its proxy) before calling it unreachable.
REACH_TIMEOUT = 3.0


@contextlib.contextmanager
def _hub_offline() -> Iterator[None]:
    """No request to the Hugging Face hub inside the block: huggingface_hub reads ``constants.HF_HUB_OFFLINE`` at
    each call, so the files come from the cache or the call fails at once."""
    from huggingface_hub import constants
    saved = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = saved


def _unreachable(url: str) -> str | None:
    """Why ``url``'s host (or the proxy for it) takes no connection within :data:`REACH_TIMEOUT` seconds; None when
    it does. Name resolution runs in a daemon thread, so a resolver that hangs costs the timeout, not minutes."""
    import socket
    import threading
    import urllib.request
    from urllib.parse import urlparse

    parsed = urlparse(url)
    host, port = parsed.hostname or "", parsed.port or (443 if parsed.scheme == "https" else 80)
    proxy = urllib.request.getproxies().get(parsed.scheme or "https")
    if proxy and not urllib.request.proxy_bypass(host):
        proxied = urlparse(proxy if "://" in proxy else f"http://{proxy}")
        host, port = proxied.hostname or host, proxied.port or 80
    outcome: list[str | None] = []

    def connect() -> None:
        try:
            socket.create_connection((host, port), timeout=REACH_TIMEOUT).close()
            outcome.append(None)
        except (OSError, ValueError) as exc:  # refused, unreachable, unresolvable, or a malformed name
            outcome.append(f"{host}:{port}: {getattr(exc, 'strerror', None) or exc}")

    thread = threading.Thread(target=connect, name="ncaudit-reach", daemon=True)
    thread.start()
    thread.join(REACH_TIMEOUT + 0.5)
    return outcome[0] if outcome else f"{host}:{port}: no answer within {REACH_TIMEOUT:g} s"


def _cached_hub_file(repo: str, filename: str, revision: str | None) -> Path | None:
    """The cached snapshot file of ``repo``, without a network call; an entry there that is not a regular file (a
    FIFO, a dangling link) is returned too, so that loading it names what it is rather than calling it missing."""
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.file_download import repo_folder_name

    found = try_to_load_from_cache(repo, filename, revision=revision)
    if isinstance(found, str):
        return Path(found)
    snapshots = Path(_hf_cache()) / repo_folder_name(repo_id=repo, repo_type="model") / "snapshots"
    odd = [p for p in sorted(snapshots.glob(f"*/{filename}")) if os.path.lexists(p) and not os.path.isfile(p)]
    return odd[0] if odd else None


def _hub_file(name: str, arch: str, repo: str, filenames: tuple[str, ...], revision: str | None,
              what: str = "the published weights are") -> Path:
    """The first of ``filenames`` in the hub cache (no network call), else downloaded once; when the hub cannot be
    reached, an error within seconds instead of minutes of retries."""
    for filename in filenames:
        if (found := _cached_hub_file(repo, filename, revision)) is not None:
            return found
    from huggingface_hub import constants
    cache = _hf_cache()
    if hub_offline():
        subject, verb = what.rsplit(" ", 1)
        raise InputError(f"{name}: {subject} ({repo}) {verb} not in the cache {cache} and HF_HUB_OFFLINE=1 forbids "
                         "downloading them; unset HF_HUB_OFFLINE to download them once, or set HF_HUB_CACHE (or "
                         "HF_HOME) to a cache that holds them")
    why = _unreachable(str(constants.ENDPOINT))
    if why is not None:
        subject, verb = what.rsplit(" ", 1)
        raise InputError(f"{name}: {subject} ({repo}) {verb} not in the cache {cache} and the hub cannot be reached "
                         f"({why}); connect to download them once, or set HF_HUB_CACHE (or HF_HOME) to a cache that "
                         "holds them and HF_HUB_OFFLINE=1")
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError
    for filename in filenames:
        try:
            return Path(hf_hub_download(repo, filename, revision=revision))
        except EntryNotFoundError:
            continue
        except Exception as exc:  # noqa: BLE001 - hub and network (httpx) errors
            raise _hub_error(name, arch, exc) from None
    raise InputError(f"{name}: the hub holds none of {', '.join(filenames)} for {repo}; check the name")


def _read_config(path: Path) -> dict[str, Any]:
    """A hub ``config.json``, checked: a regular file of sane size holding a JSON object whose preprocessing values
    (``pretrained_cfg`` and ``model_args``) are in range, each error one line naming the file and the key."""
    import json

    st = regular_file(path, "a hub config.json")
    if st.st_size > MAX_CONFIG_BYTES:
        raise InputError(f"{path}: a config.json of {st.st_size} bytes; a model config is a few kB: the file is "
                         "damaged, delete it to download it again")
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: not a readable JSON config ({exc}); delete it to download it again") from None
    if not isinstance(cfg, dict):
        raise InputError(f"{path}: holds a JSON {type(cfg).__name__}, not a model config object; delete it to "
                         "download it again")
    pretrained = cfg.get("pretrained_cfg", cfg)
    check_preprocessing(pretrained, f"{path} (pretrained_cfg)")
    check_preprocessing(cfg.get("model_args") or {}, f"{path} (model_args)")
    return cfg


def _timm_weights(name: str, arch: str) -> Path | None:
    """The weights file of published timm weights, from the cache (no network call) or the hub, its hub
    config.json (hf-hub: names) checked on the way; None when timm is to load the weights itself (no hub source
    known, a custom format such as .npz)."""
    where, kind = _timm_origin(arch)
    if kind == "url":
        path = _torch_hub_file(where)
        if not os.path.lexists(path):
            _fetch_torch_hub(name, f"timm {arch}", where, path)
        return path
    repo, _, revision = where.partition("@")
    filenames: tuple[str, ...] = _WEIGHT_FILES
    if arch.startswith(("hf-hub:", "hf_hub:")):
        cfg = _read_config(_hub_file(name, arch, repo, ("config.json",), revision or None, "the model's config is"))
        pretrained = cfg.get("pretrained_cfg", cfg)
        if not isinstance(pretrained, dict) or pretrained.get("custom_load"):
            return None
        if isinstance(pretrained.get("hf_hub_filename"), str):
            filenames = (pretrained["hf_hub_filename"],)
    else:
        try:
            import timm
            pcfg = timm.models.get_pretrained_cfg(arch)
        except (RuntimeError, ValueError, KeyError):
            return None
        if pcfg is None or not getattr(pcfg, "hf_hub_id", None) or getattr(pcfg, "custom_load", False):
            return None
        if getattr(pcfg, "hf_hub_filename", None):
            filenames = (str(pcfg.hf_hub_filename),)
    if filenames != _WEIGHT_FILES and filenames[0].endswith(".bin"):  # timm prefers a safetensors twin
        filenames = (filenames[0][:-4] + ".safetensors", *filenames)
    if not filenames[-1].endswith(_OWN_FORMATS):
        return None
    return _hub_file(name, arch, repo, filenames, revision or None)


def _timm_weights_file(cfg: Mapping[str, Any]) -> Path | None:
    """The cached file timm loaded the published weights from, when it can be found."""
    hub_id = cfg.get("hf_hub_id")
    if hub_id:
        repo, _, revision = str(hub_id).partition("@")
        for filename in (cfg.get("hf_hub_filename"), *_WEIGHT_FILES, "open_clip_model.safetensors",
                         "open_clip_pytorch_model.bin"):
            found = _cached_hub_file(repo, filename, revision or None) if filename else None
            if found is not None and os.path.isfile(found):
                return found
    if cfg.get("url"):
        path = _torch_hub_file(str(cfg["url"]))
        return path if path.is_file() else None
    return None


def _timm_pretrained(name: str, arch: str, img_size: int | None) -> LoadedModel:
    """Published timm weights: the file found in the cache (or downloaded once), read and checked as a --checkpoint
    file is (:func:`~ncaudit.models.load_checkpoint`: a pickle refused as such, archive sizes checked before anything
    is inflated), then handed to timm's own loading (its key filters, head and input adaptation) with the hub
    offline, so nothing is fetched twice or checked online."""
    path = _timm_weights(name, arch)
    ckpt = load_checkpoint(path) if path is not None else None
    overlay = {"source": "", "state_dict": ckpt.state_dict} if ckpt is not None else None
    try:
        with _hub_offline() if path is not None or hub_offline() else contextlib.nullcontext():
            model = _build("timm", arch, None, img_size, pretrained=True, pretrained_cfg_overlay=overlay)
    except InputError:
        raise
    except Exception as exc:  # noqa: BLE001 - hub, network (httpx) and tag errors all surface here
        raise _hub_error(name, arch, exc) from None
    from timm.data import infer_imagenet_subset
    cfg = {k: v for k, v in dict(getattr(model, "pretrained_cfg", None) or {}).items() if k != "state_dict"}
    if getattr(model, "pretrained_cfg", None) is not None:
        model.pretrained_cfg = cfg  # the state dict is not kept twice
    record = dataclass_replace(ckpt, state_dict={}) if ckpt is not None else None
    if record is None and (found := _timm_weights_file(cfg)) is not None:
        record = _weights_file(found)
    where = cfg.get("hf_hub_id") or cfg.get("url") or arch
    source = f"timm published weights {where}" + (f" ({record.path})" if record else "")
    return _finish(model, name, "timm", record, weights="pretrained", source=source, pretrained_cfg=cfg,
                   imagenet=infer_imagenet_subset(model))


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


def _fetch_torch_hub(name: str, label: str, url: str, path: Path) -> None:
    """Download ``url`` into the TORCH_HOME cache file ``path`` (hash-checked as torchvision does), unless offline or
    the server cannot be reached (said within seconds)."""
    if hub_offline():
        raise InputError(f"{name}: the {label} weights are not in TORCH_HOME's cache ({path}) and HF_HUB_OFFLINE=1 "
                         "forbids downloading them; unset HF_HUB_OFFLINE to download them once, or set TORCH_HOME to "
                         f"a directory whose hub/checkpoints/ holds {path.name}")
    why = _unreachable(url)
    if why is not None:
        raise InputError(f"{name}: the {label} weights are not in TORCH_HOME's cache ({path}) and their server cannot "
                         f"be reached ({why}); connect to download them once, or set TORCH_HOME to a directory whose "
                         f"hub/checkpoints/ holds {path.name}")
    match = torch.hub.HASH_REGEX.search(path.name)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(url, str(path), match.group(1) if match else None, progress=True)
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
    if not os.path.lexists(path):
        _fetch_torch_hub(name, f"{type(member).__name__}.{member.name}", member.url, path)
    ckpt = load_checkpoint(path)
    with _serving(ckpt.state_dict):
        model = _build("torchvision", arch, None, img_size, pretrained=member)
    categories = list(member.meta.get("categories") or [])
    imagenet = "imagenet-1k" if member.name.startswith("IMAGENET1K") and len(categories) == 1000 else None
    return _finish(model, name, "torchvision", dataclass_replace(ckpt, state_dict={}), weights="pretrained",
                   source=f"torchvision {type(member).__name__}.{member.name} ({path})", tv_weights=member,
                   imagenet=imagenet)
