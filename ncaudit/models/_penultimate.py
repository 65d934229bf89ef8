"""Models for ``ncaudit extract``: build a timm or torchvision classifier with its weights (a local checkpoint, the
library's published weights through its own cache, or a seeded random init) and find its penultimate features and
final affine map ``(W, b)``.

The penultimate features are the exact input of the affine map that produces the logits. They are captured with
forward pre-hooks on the classifier module(s) while the model runs its own ``forward``, so the logits stored next to
them are the model's own. :meth:`PenultimateModel.verify` checks on real inputs that ``W h + b`` reproduces those
logits; extraction stops when it does not.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import hashlib
import os
import pickle
import re
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from dataclasses import replace as dataclass_replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ncaudit.errors import InputError
from ncaudit._validate import available_memory, format_bytes

TORCHVISION_PREFIX = "torchvision:"
PLAIN_KEYS = ("state_dict", "model")
EMA_KEYS = ("state_dict_ema", "model_ema")
STRIP_PREFIXES = ("module.", "_orig_mod.")
#: Relative tolerance of the logit check per precision, against the bound |W| |h| + |b| of each logit.
LOGIT_RTOL = {"fp32": 1e-4, "bf16": 3e-2, "fp16": 4e-3}


# ---------------------------------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Checkpoint:
    """A state dict read from a local file, with where it came from.

    ``key`` is the entry of the file the weights came from (``""`` for a bare state dict), ``ema`` whether those are
    EMA weights and ``has_ema`` / ``has_plain`` what else the file held. ``metadata`` holds a safetensors file's
    metadata, or a pickle's scalar top-level entries (``epoch``, ``arch``, ...), as strings; ``args`` the plain
    values of a training script's ``args`` entry (timm ``train.py``, torchvision's reference scripts).
    """

    path: Path
    sha256: str
    state_dict: dict[str, torch.Tensor]
    key: str
    ema: bool
    has_plain: bool
    has_ema: bool
    metadata: dict[str, str] = field(default_factory=dict)
    args: dict[str, Any] = field(default_factory=dict)


def file_sha256(path: str | os.PathLike[str], block: int = 1 << 22) -> str:
    """Hex SHA-256 of a file, read in blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(block):
            digest.update(chunk)
    return digest.hexdigest()


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def clean_state_dict(state: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Drop non-tensors and torchvision's EMA ``n_averaged`` counter; strip ``module.`` / ``_orig_mod.`` prefixes."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if not isinstance(value, torch.Tensor) or key == "n_averaged":
            continue
        changed = True
        while changed:
            changed = False
            for prefix in STRIP_PREFIXES:
                if key.startswith(prefix):
                    key, changed = key[len(prefix):], True
        out[key] = value
    return out


#: A checkpoint archive may declare at most this many times its compressed size: torch.save stores its members
#: uncompressed, and float weights deflate by a few percent, so a larger ratio is an archive built to inflate.
MAX_INFLATE_RATIO = 20
#: Archives declaring less than this are not checked for their ratio (it takes real memory to matter).
INFLATE_CHECK_BYTES = 256 << 20


def check_archive_sizes(path: Path) -> None:
    """Refuse, before anything is inflated, a zip checkpoint whose members declare more than memory can hold or far
    more than the archive's compressed size (a few MB of deflated zeros can declare gigabytes).

    Sizes come from the zip's central directory; ``torch.load`` allocates what they declare (and fails a member
    whose data do not match its declared size). Non-zip (legacy) checkpoints are as large as their file.
    """
    try:
        with zipfile.ZipFile(path) as archive:
            members = archive.infolist()
    except (zipfile.BadZipFile, OSError, ValueError):
        return  # not a zip (a legacy pickle) or not readable: torch.load says so
    declared = sum(m.file_size for m in members)
    packed = sum(m.compress_size for m in members)
    if declared > INFLATE_CHECK_BYTES and declared > MAX_INFLATE_RATIO * max(packed, 1):
        ratio = declared / max(packed, 1)
        raise InputError(f"{path}: refused: the checkpoint archive declares {format_bytes(declared)} of data in "
                         f"{format_bytes(packed)} of compressed members ({ratio:,.0f}x); torch.save writes "
                         "uncompressed archives. Re-save the weights (torch.save(model.state_dict(), PATH)) or as "
                         ".safetensors")
    if declared > (have := available_memory()):
        raise InputError(f"{path}: the checkpoint declares {format_bytes(declared)} of tensors but "
                         f"{format_bytes(have)} of memory is available; load it on a machine with more memory")


def _read_pickle(path: Path) -> Any:
    check_archive_sizes(path)
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        text = str(exc)
        if "Unsupported global" not in text and "GLOBAL" not in text:
            detail = [ln.strip() for ln in text.splitlines() if ln.strip().startswith("Unsupported")]
            raise InputError(f"{path}: not a readable PyTorch checkpoint ({detail[0] if detail else 'bad pickle'}); "
                             "give a .pth/.pt/.bin state_dict or a .safetensors file") from None
        match = re.search(r"GLOBAL (\S+)", text)
        why = f"it imports {match.group(1)}" if match else "it is not a plain-data pickle"
        raise InputError(
            f"{path}: refused: loading this checkpoint would run code from the file ({why}); nothing of it was run. "
            "Re-save the weights as a plain state_dict (torch.save(model.state_dict(), PATH)) or as .safetensors"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(f"{path}: not a readable PyTorch checkpoint ({first}); give a .pth/.pt/.bin state_dict "
                         "or a .safetensors file") from None


def load_checkpoint(path: str | os.PathLike[str], *, ema: bool | None = None) -> Checkpoint:
    """Read a checkpoint file without running code from it.

    Parameters
    ----------
    path
        ``.safetensors``, or a PyTorch pickle (``.pth``, ``.pt``, ``.bin``) read with ``weights_only=True``
        (``argparse.Namespace`` allowed, as in timm and torchvision training checkpoints): a bare state dict or a
        dict holding one under ``state_dict`` / ``model`` (plain) or ``state_dict_ema`` / ``model_ema`` (EMA).
    ema
        True: the EMA weights (an error when there are none); False: the plain weights; None: plain when present,
        else EMA.

    Raises
    ------
    InputError
        Missing or unreadable file, a pickle that needs arbitrary code, no state dict found, the asked-for copy
        absent.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such checkpoint file; give the path of a .pth/.pt/.bin or .safetensors file")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open
        from safetensors.torch import load_file

        try:
            raw: Any = load_file(str(path), device="cpu")
            with safe_open(str(path), framework="pt") as handle:
                metadata = dict(handle.metadata() or {})
        except (SafetensorError, OSError, ValueError) as exc:
            raise InputError(f"{path}: not a readable safetensors file ({exc}); check the file") from None
    else:
        raw = _read_pickle(path)
        metadata = {str(k): str(v) for k, v in raw.items() if isinstance(v, (int, float, str)) and not
                    isinstance(v, bool)} if isinstance(raw, Mapping) else {}
    # (a bare state dict holds only tensors: no metadata and no args in it)
    args = _plain_args(raw.get("args")) if isinstance(raw, Mapping) else {}
    sha = file_sha256(path)

    plain: tuple[str, Mapping[str, Any]] | None = None
    ema_sd: tuple[str, Mapping[str, Any]] | None = None
    if _is_state_dict(raw):
        plain = ("", raw)
    elif isinstance(raw, Mapping):
        for key in PLAIN_KEYS:
            if isinstance(raw.get(key), Mapping) and clean_state_dict(raw[key]):
                plain = (key, raw[key])
                break
        for key in EMA_KEYS:
            if isinstance(raw.get(key), Mapping) and clean_state_dict(raw[key]):
                ema_sd = (key, raw[key])
                break
    if plain is None and ema_sd is None:
        keys = ", ".join(sorted(map(str, raw))[:8]) if isinstance(raw, Mapping) else type(raw).__name__
        raise InputError(f"{path}: no state dict found (top level: {keys}); save a bare state_dict or a dict with "
                         f"one of {', '.join(PLAIN_KEYS + EMA_KEYS)}")
    if ema is True and ema_sd is None:
        raise InputError(f"{path}: --ema asked for EMA weights but the file holds none (no "
                         f"{' or '.join(EMA_KEYS)}); drop --ema")
    if ema is False and plain is None:
        raise InputError(f"{path}: --no-ema asked for plain weights but the file holds only EMA weights "
                         f"({ema_sd[0] if ema_sd else ''}); drop --no-ema")
    use_ema = ema is True or (ema is None and plain is None)
    key, state = ema_sd if use_ema else plain  # type: ignore[misc]
    return Checkpoint(path=path, sha256=sha, state_dict=clean_state_dict(state), key=key, ema=use_ema,
                      has_plain=plain is not None, has_ema=ema_sd is not None, metadata=metadata, args=args)


def _plain_args(args: Any) -> dict[str, Any]:
    """The numbers, strings and lists of numbers of a training script's ``args`` (a Namespace or a dict)."""
    items = vars(args) if isinstance(args, argparse.Namespace) else args if isinstance(args, Mapping) else {}
    out: dict[str, Any] = {}
    for key, value in items.items():
        if isinstance(value, (int, float, str)) or value is None:
            out[str(key)] = value
        elif isinstance(value, (list, tuple)) and all(isinstance(v, (int, float)) for v in value):
            out[str(key)] = list(value)
    return out


# ---------------------------------------------------------------------------------------------------------------------
# Building
# ---------------------------------------------------------------------------------------------------------------------
def _split_name(name: str) -> tuple[str, str]:
    if name.startswith(TORCHVISION_PREFIX):
        return "torchvision", name[len(TORCHVISION_PREFIX):]
    return "timm", name


def _build(library: str, arch: str, num_classes: int | None, img_size: int | None = None,
           pretrained: Any = None) -> nn.Module:
    """Construct the model; ``pretrained`` is True (timm) or a torchvision weights enum member to load published
    weights through the library's own loading code."""
    kwargs: dict[str, Any] = {} if num_classes is None else {"num_classes": num_classes}
    if img_size is not None:  # models with a fixed input size (ViTs) take it at construction; others refuse it
        try:
            key = "image_size" if library == "torchvision" else "img_size"
            return _build_kw(library, arch, {**kwargs, key: img_size}, pretrained)
        except TypeError:
            pass
    return _build_kw(library, arch, kwargs, pretrained)


def _check_torchvision_arch(arch: str) -> None:
    import torchvision
    if arch not in torchvision.models.list_models():
        raise InputError(f"unknown torchvision model {arch!r}; see torchvision.models.list_models() "
                         "(e.g. torchvision:resnet18)")


def _build_kw(library: str, arch: str, kwargs: dict[str, Any], pretrained: Any = None) -> nn.Module:
    if library == "torchvision":
        import torchvision
        _check_torchvision_arch(arch)
        try:
            return torchvision.models.get_model(arch, weights=pretrained, **kwargs)
        except ValueError as exc:  # e.g. an image_size the published weights do not allow
            raise InputError(f"torchvision:{arch}: {str(exc).splitlines()[0]}") from None
    import timm
    if not arch.startswith(("hf-hub:", "hf_hub:", "local-dir:")) and not timm.is_model(arch):
        raise InputError(f"unknown timm model {arch!r}; see timm.list_models() or prefix torchvision: for a "
                         "torchvision model")
    return timm.create_model(arch, pretrained=bool(pretrained), **kwargs)


def _module_name(model: nn.Module, module: nn.Module) -> str:
    for name, mod in model.named_modules():
        if mod is module:
            return name
    raise RuntimeError("module not found in model")


def _last_linear(model: nn.Module) -> tuple[str, nn.Module] | None:
    found = None
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear):
            found = (name, mod)
    return found


def head_modules(model: nn.Module, library: str) -> list[tuple[str, nn.Module]]:
    """The module(s) whose output is (averaged into) the logits: timm ``get_classifier()`` (one, or two for a
    distilled model), torchvision the last ``nn.Linear``.

    Raises
    ------
    InputError
        No such module (e.g. torchvision squeezenet, whose classifier is a convolution).
    """
    if library == "timm":
        cls = model.get_classifier()  # type: ignore[operator]
        mods = list(cls) if isinstance(cls, (tuple, list)) else [cls]
        if not mods or any(isinstance(m, nn.Identity) or not any(True for _ in m.parameters()) for m in mods):
            raise InputError("the timm model has no classifier module (get_classifier() is empty); ncaudit needs a "
                             "model with a final linear layer")
        return [(_module_name(model, m), m) for m in mods]
    found = _last_linear(model)
    if found is None:
        raise InputError("the torchvision model has no nn.Linear layer (its classifier is e.g. a convolution, as in "
                         "squeezenet), so there is no final affine map (W, b) to audit; use a model whose head ends "
                         "in a linear layer")
    return [found]


def _num_classes_from(state: Mapping[str, torch.Tensor], head_name: str, head: nn.Module) -> int:
    weight_keys = [f"{head_name}.{n}" if n else head_name for n, m in head.named_modules()
                   if isinstance(m, (nn.Linear, nn.Conv2d, nn.Conv1d))]
    for key in reversed(weight_keys):
        tensor = state.get(f"{key}.weight")
        if tensor is not None and tensor.ndim >= 2:
            return int(tensor.shape[0])
    raise InputError(f"the checkpoint has no classifier weight {weight_keys[-1] + '.weight' if weight_keys else ''}"
                     " for this architecture; check --model (the checkpoint may be for another architecture)")


WEIGHT_KINDS = ("checkpoint", "pretrained", "random-init")


@dataclass(frozen=True)
class Weights:
    """Where a model's weights come from: exactly one of a local checkpoint, the library's published weights, or a
    seeded random initialisation.

    ``kind`` is ``checkpoint`` (``checkpoint`` the file, ``ema`` which copy in it), ``pretrained`` (timm: the tag in
    the model name or ``hf-hub:ORG/NAME``; torchvision: ``tag`` names a weights enum member, ``DEFAULT`` when None) or
    ``random-init`` (``torch.manual_seed(seed)`` before construction: an untrained network, reproducibly).
    """

    kind: str = "checkpoint"
    checkpoint: Path | None = None
    ema: bool | None = None
    tag: str | None = None
    seed: int = 0

    @classmethod
    def from_flags(cls, checkpoint: str | os.PathLike[str] | None = None, *, pretrained: bool = False,
                   random_init: bool = False, weights: str | None = None, ema: bool | None = None,
                   seed: int = 0) -> Weights:
        """The weights the CLI flags ask for; exactly one of ``--checkpoint``, ``--pretrained`` (``--weights``
        implies it), ``--random-init``.

        Raises
        ------
        InputError
            None or several of them, or ``--ema`` without a checkpoint.
        """
        chosen = [flag for flag, on in (("--checkpoint", checkpoint is not None),
                                        ("--pretrained", pretrained or weights is not None),
                                        ("--random-init", random_init)) if on]
        if not chosen:
            raise InputError("say where the weights come from: --checkpoint FILE, --pretrained (the library's "
                             "published weights) or --random-init (an untrained network)")
        if len(chosen) > 1:
            implied = " (--weights implies --pretrained)" if weights is not None and not pretrained else ""
            raise InputError(f"{' and '.join(chosen)} contradict each other{implied}; give exactly one of "
                             "--checkpoint, --pretrained, --random-init")
        if ema is not None and checkpoint is None:
            raise InputError(f"--ema/--no-ema pick a copy inside a --checkpoint file; drop it with {chosen[0]}")
        if checkpoint is not None:
            return cls("checkpoint", checkpoint=Path(checkpoint), ema=ema)
        if random_init:
            return cls("random-init", seed=seed)
        return cls("pretrained", tag=weights)


@dataclass
class LoadedModel:
    """A model in eval mode with its weights loaded.

    ``weights`` is where they came from (one of :data:`WEIGHT_KINDS`) and ``source`` says it in words.
    ``checkpoint`` is the local file they were read from: the checkpoint, or for published weights the file in the
    library's cache when it can be found (its state dict is not kept); None for a random init. ``pretrained_cfg`` /
    ``tv_weights`` are the published weights' timm config or torchvision enum member, and ``imagenet`` the ImageNet
    label set (a timm ``ImageNetInfo`` subset) the published weights' outputs follow.
    """

    model: nn.Module
    name: str
    library: str
    num_classes: int
    checkpoint: Checkpoint | None
    heads: list[tuple[str, nn.Module]] = field(default_factory=list)
    weights: str = "checkpoint"
    source: str = ""
    seed: int | None = None
    pretrained_cfg: dict[str, Any] | None = None
    tv_weights: Any = None
    imagenet: str | None = None


def load_model(name: str, weights: Weights | str | os.PathLike[str] | Checkpoint, *, ema: bool | None = None,
               img_size: int | None = None, num_classes: int | None = None) -> LoadedModel:
    """Build ``name`` (a timm name, ``hf-hub:ORG/NAME`` or ``torchvision:NAME``) with its weights, in eval mode.

    ``weights`` is a :class:`Weights` or a checkpoint path (``ema`` then picks the copy). A checkpoint gives the
    number of classes K through its classifier's shape: the architecture is first built on the meta device (no
    memory, no init) to find the classifier, then for real with ``num_classes=K``, and the state dict is loaded
    strictly. Published weights come through the library's own loading code and cache (timm ``create_model(...,
    pretrained=True)``: HF_HOME / HF_HUB_CACHE; torchvision weights enums: TORCH_HOME, read with
    ``weights_only=True``), honouring HF_HUB_OFFLINE. A random init needs ``num_classes``.

    ``img_size`` is passed to constructors that take one (timm ``img_size``, torchvision ``image_size``: ViTs).

    Raises
    ------
    InputError
        Unknown model, no classifier, a checkpoint that does not fit the architecture, published weights that are
        neither cached nor downloadable (the message names the cache and the variable).
    """
    library, arch = _split_name(name)
    if not isinstance(weights, Weights):
        ckpt = weights if isinstance(weights, Checkpoint) else load_checkpoint(weights, ema=ema)
        return _from_checkpoint(name, library, arch, ckpt, img_size)
    if weights.kind == "checkpoint":
        if weights.checkpoint is None:
            raise InputError("no checkpoint file given; pass --checkpoint FILE")
        return _from_checkpoint(name, library, arch, load_checkpoint(weights.checkpoint, ema=weights.ema), img_size)
    if weights.kind == "random-init":
        return _random_init(name, library, arch, num_classes, weights.seed, img_size)
    if weights.kind != "pretrained":
        raise InputError(f"unknown weights kind {weights.kind!r}; use one of {', '.join(WEIGHT_KINDS)}")
    if library == "torchvision":
        return _torchvision_pretrained(name, arch, weights.tag, img_size)
    if weights.tag is not None:
        raise InputError(f"--weights {weights.tag}: names torchvision weights; a timm model takes its pretrained tag "
                         f"in the name, e.g. {arch.split('.')[0]}.a1_in1k (see timm.list_pretrained())")
    return _timm_pretrained(name, arch, img_size)


def _finish(model: nn.Module, name: str, library: str, checkpoint: Checkpoint | None, **extra: Any) -> LoadedModel:
    """Eval mode, classifier found, number of classes read off it."""
    model.eval()
    try:
        heads = head_modules(model, library)
    except InputError as exc:
        raise InputError(f"{name}: {exc}") from None
    num_classes = _num_classes_from(model.state_dict(), *heads[0])
    return LoadedModel(model=model, name=name, library=library, num_classes=num_classes, checkpoint=checkpoint,
                       heads=heads, **extra)


def _from_checkpoint(name: str, library: str, arch: str, ckpt: Checkpoint, img_size: int | None) -> LoadedModel:
    try:
        with torch.device("meta"):
            skeleton = _build(library, arch, None, img_size)
        heads = head_modules(skeleton, library)
    except InputError as exc:
        raise InputError(f"{name}: {exc}") from None
    num_classes = _num_classes_from(ckpt.state_dict, *heads[0])
    model = _build(library, arch, num_classes, img_size)
    try:
        result = model.load_state_dict(ckpt.state_dict, strict=False)
    except RuntimeError as exc:  # shape mismatches
        lines = [ln.strip() for ln in str(exc).splitlines() if "size mismatch" in ln]
        raise InputError(f"{ckpt.path}: does not fit {name} ({lines[0] if lines else 'shape mismatch'}); check "
                         "--model") from None
    if result.missing_keys or result.unexpected_keys:
        parts = []
        if result.missing_keys:
            parts.append(f"{len(result.missing_keys)} missing, e.g. {result.missing_keys[0]}")
        if result.unexpected_keys:
            parts.append(f"{len(result.unexpected_keys)} unexpected, e.g. {result.unexpected_keys[0]}")
        raise InputError(f"{ckpt.path}: weights do not fit {name} ({'; '.join(parts)}); check --model")
    source = f"checkpoint {ckpt.path}" + (f" ({ckpt.key}, EMA weights)" if ckpt.ema else "")
    return _finish(model, name, library, ckpt, weights="checkpoint", source=source)


def _random_init(name: str, library: str, arch: str, num_classes: int | None, seed: int,
                 img_size: int | None) -> LoadedModel:
    if num_classes is None or num_classes < 1:
        raise InputError(f"{name}: --random-init needs the number of classes (taken from the dataset)")
    with torch.random.fork_rng(devices=[]):  # a reproducible init that leaves the caller's RNG alone
        torch.manual_seed(seed)
        model = _build(library, arch, num_classes, img_size)
    return _finish(model, name, library, None, weights="random-init", seed=seed,
                   source=f"random init (torch.manual_seed({seed}))")


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


# ---------------------------------------------------------------------------------------------------------------------
# What the weights say about their classes and their preprocessing
# ---------------------------------------------------------------------------------------------------------------------
def imagenet_subset_for(num_classes: int) -> str | None:
    """The timm ``ImageNetInfo`` subset with ``num_classes`` classes (1000: ``imagenet-1k``), or None."""
    from timm.data import infer_imagenet_subset
    return infer_imagenet_subset({"num_classes": num_classes})


def imagenet_classes(subset: str) -> tuple[list[str], list[str]]:
    """``(names, synsets)`` of an ImageNet subset in model order, from timm's ``ImageNetInfo``: each name is the
    synset and its description, e.g. ``"n01440764 tench, Tinca tinca"``."""
    from timm.data import ImageNetInfo
    info = ImageNetInfo(subset)
    synsets = [str(s) for s in info.label_names()]
    return [f"{s} {info.label_name_to_description(s)}" for s in synsets], synsets


def recorded_preprocessing(loaded: LoadedModel) -> list[tuple[str, dict[str, Any]]]:
    """What the weights themselves record about how their images were prepared, as ``(source, raw values)``
    pairs, lowest priority first: a timm ``pretrained_cfg``, a torchvision enum's ``transforms()``, a checkpoint's
    training ``args`` and its (safetensors) metadata. The values are raw; :mod:`ncaudit.data` interprets them."""
    hints: list[tuple[str, dict[str, Any]]] = []
    if loaded.weights == "pretrained" and loaded.pretrained_cfg:
        cfg = loaded.pretrained_cfg
        hints.append((f"pretrained_cfg of {cfg.get('hf_hub_id') or cfg.get('architecture', loaded.name)}", dict(cfg)))
    if loaded.tv_weights is not None:
        member = loaded.tv_weights
        tf = member.transforms()
        crop, resize = int(tf.crop_size[0]), int(tf.resize_size[0])
        hints.append((f"{type(member).__name__}.{member.name}.transforms()", {
            "input_size": [3, crop, crop], "crop_pct": crop / resize, "mean": list(tf.mean), "std": list(tf.std),
            "interpolation": getattr(tf.interpolation, "value", str(tf.interpolation)), "crop_mode": "center"}))
    ckpt = loaded.checkpoint
    if loaded.weights == "checkpoint" and ckpt is not None:
        if ckpt.args:
            hints.append(("checkpoint args", dict(ckpt.args)))
        if ckpt.metadata:
            hints.append(("checkpoint metadata", dict(ckpt.metadata)))
    return hints


# ---------------------------------------------------------------------------------------------------------------------
# Penultimate features and (W, b)
# ---------------------------------------------------------------------------------------------------------------------
def _affine_of(module: nn.Module, in_shape: tuple[int, ...], scale: float, name: str,
               model_name: str) -> tuple[np.ndarray, np.ndarray | None, str]:
    """``(W (C, p), b (C,) or None, how)`` of ``module`` seen as a map from flattened inputs of shape ``in_shape``.

    A plain ``nn.Linear`` is read off; anything else is probed in float64 (``b = g(0)``, ``W e_j = g(e_j) - b``) and
    then tested for affinity on random inputs of the features' scale.
    """
    if isinstance(module, nn.Linear) and len(in_shape) == 1:
        w = module.weight.detach().double().cpu().numpy()
        b = None if module.bias is None else module.bias.detach().double().cpu().numpy()
        return w, b, f"{name} (nn.Linear)"
    probe = copy.deepcopy(module).double().cpu().eval()
    for sub in probe.modules():  # the copy carries the capture hooks: drop them
        sub._forward_pre_hooks.clear()
        sub._forward_hooks.clear()
    p = int(np.prod(in_shape))

    def g(x: torch.Tensor) -> torch.Tensor:
        y = probe(x.reshape((x.shape[0],) + in_shape))
        return y.reshape(x.shape[0], -1)

    with torch.inference_mode():
        zero = torch.zeros(1, p, dtype=torch.float64)
        b0 = g(zero)[0]
        cols = []
        for i in range(0, p, 1024):
            basis = torch.zeros(min(1024, p - i), p, dtype=torch.float64)
            basis[torch.arange(basis.shape[0]), torch.arange(i, i + basis.shape[0])] = 1.0
            cols.append(g(basis) - b0)
        w = torch.cat(cols, 0).T.contiguous()
        gen = torch.Generator().manual_seed(0)
        r = torch.randn(16, p, generator=gen, dtype=torch.float64) * max(scale, 1e-3)
        err = (g(r) - (r @ w.T + b0)).abs().max().item()
        ref = (r.abs() @ w.abs().T + b0.abs()).max().item()
    if not err <= 1e-8 * max(ref, 1e-12):
        raise InputError(
            f"{model_name}: the classifier {name} ({type(module).__name__}) is not an affine map of its input (an MLP "
            "head?), so there is no (W, b) to audit; use a checkpoint whose head ends in one linear layer, or compute "
            "the input of its last linear layer yourself and write a schema-1 cache with ncaudit.cache.write_cache")
    has_bias = any(n.endswith("bias") for n, _ in module.named_parameters()) or bool(b0.abs().max() > 0)
    return w.numpy(), (b0.numpy() if has_bias else None), f"{name} ({type(module).__name__}, folded to W, b)"


def resolve_layers(model: nn.Module, library: str, names: Sequence[str]) -> list[tuple[str, nn.Module, int | None]]:
    """``(name, module, channels or None)`` for each requested layer.

    A name is a module name (``layer3``, ``stages.2``, ``blocks.11``, torchvision ``features.7``); for timm models an
    integer picks ``feature_info[i]`` (its module name is stored). Channels come from timm's ``feature_info``.

    Raises
    ------
    InputError
        An unknown name (the message lists the model's feature stages).
    """
    modules = dict(model.named_modules())
    info: dict[str, int] = {}
    stages: list[str] = []
    if library == "timm" and getattr(model, "feature_info", None):
        for entry in model.feature_info:  # type: ignore[union-attr]
            info[str(entry["module"])] = int(entry["num_chs"])
            stages.append(str(entry["module"]))
    out: list[tuple[str, nn.Module, int | None]] = []
    for raw in names:
        name = raw.strip()
        if library == "timm" and name.lstrip("-").isdigit() and stages:
            try:
                name = stages[int(name)]
            except IndexError:
                raise InputError(f"--layers {raw}: the model has {len(stages)} feature stages (0..{len(stages) - 1}: "
                                 f"{', '.join(stages)})") from None
        if not name or name not in modules:
            hint = f"feature stages: {', '.join(stages)}" if stages else "see model.named_modules()"
            raise InputError(f"--layers {raw!r}: no such module in the model ({hint})")
        if "/" in name:
            raise InputError(f"--layers {raw!r}: a layer name cannot contain '/'")
        if any(n == name for n, _, _ in out):
            continue
        out.append((name, modules[name], info.get(name)))
    order = {name: i for i, name in enumerate(modules)}
    return sorted(out, key=lambda entry: order[entry[0]])  # network order


def pool_layer_output(out: Any, channels: int | None, class_token: bool, skip_tokens: int = 0) -> torch.Tensor:
    """One vector per sample from a layer's output, in float32.

    Spatial maps are global-average-pooled (NCHW, or NHWC when ``channels`` says so); token sequences ``(B, T, D)``
    give the class token when the model has one, else the mean of the tokens after the first ``skip_tokens``
    (register tokens).
    """
    if isinstance(out, (tuple, list)):
        out = out[0]
    if not isinstance(out, torch.Tensor):
        raise InputError(f"a layer returned {type(out).__name__}, not a tensor; pick another layer")
    if out.ndim == 4:
        if channels is not None and out.shape[1] != channels and out.shape[-1] == channels:
            return out.float().mean(dim=(1, 2))
        return out.float().mean(dim=(2, 3))
    if out.ndim == 3:
        return out[:, 0].float() if class_token else out[:, skip_tokens:].float().mean(dim=1)
    return out.float().reshape(out.shape[0], -1)


class PenultimateModel:
    """Run a :class:`LoadedModel` and return ``(features (B, p), logits (B, C))`` per batch.

    The features are the input(s) of the classifier module(s), captured by forward pre-hooks during the model's own
    ``forward``. With two heads that read different inputs (a distilled ViT: class and distillation tokens) the
    features are the two inputs concatenated and ``W = [W_1, W_2] / 2``, ``b = (b_1 + b_2) / 2``; with two heads on
    the same input, ``W = (W_1 + W_2) / 2``. ``weight``, ``bias`` and ``source`` are set by :meth:`verify` on the
    first batch.
    """

    def __init__(self, loaded: LoadedModel, layers: Sequence[str] = ()) -> None:
        self.loaded = loaded
        self.model = loaded.model
        self.heads = loaded.heads
        self.weight: np.ndarray | None = None
        self.bias: np.ndarray | None = None
        self.source = ""
        self.shared_input = True
        self.max_logit_error = float("nan")
        self._captured: list[torch.Tensor | None] = [None] * len(self.heads)
        self._handles = [mod.register_forward_pre_hook(self._hook(i)) for i, (_, mod) in enumerate(self.heads)]
        #: Pooled outputs of the requested layers from the last call, ``{name: (B, p_layer)}`` in network order.
        self.layer_features: dict[str, torch.Tensor] = {}
        self.layers = resolve_layers(self.model, loaded.library, layers)
        # timm ViTs: cls_token (None without one) and num_prefix_tokens (class + register tokens); torchvision ViT:
        # class_token
        cls = getattr(self.model, "cls_token", None) is not None or isinstance(
            getattr(self.model, "class_token", None), (torch.Tensor, nn.Parameter))
        skip = int(getattr(self.model, "num_prefix_tokens", 0) or 0)
        for name, mod, chans in self.layers:
            self._handles.append(mod.register_forward_hook(self._layer_hook(name, chans, cls, skip)))

    def _layer_hook(self, name: str, channels: int | None, cls: bool, skip: int) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            self.layer_features[name] = pool_layer_output(output, channels, cls, skip)
        return hook

    def _hook(self, i: int) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            self._captured[i] = args[0]
        return hook

    def remove(self) -> None:
        """Remove the hooks from the model."""
        for handle in self._handles:
            handle.remove()

    @property
    def n_features(self) -> int:
        if self.weight is None:
            raise RuntimeError("verify() has not run")
        return int(self.weight.shape[1])

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self._captured = [None] * len(self.heads)
        self.layer_features = {}
        logits = self.model(x)
        if isinstance(logits, (tuple, list)):
            logits = logits[0]
        if any(t is None for t in self._captured):
            raise InputError(f"{self.loaded.name}: the classifier module was not called in forward(); ncaudit cannot "
                             "tell which layer feeds the logits")
        self._check_layers()
        return self._assemble(self._captured, logits)

    def _check_layers(self) -> None:
        missing = [name for name, _, _ in self.layers if name not in self.layer_features]
        if missing:
            raise InputError(f"--layers {missing[0]}: this module is not called in the model's forward(); pick a "
                             "module that is (e.g. a feature stage)")
        self.layer_features = {name: self.layer_features[name] for name, _, _ in self.layers}

    def verify(self, x: torch.Tensor, precision: str, autocast: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the first batch, derive ``(W, b)`` and check ``W h + b`` against the model's logits.

        Returns the batch's ``(features, logits)``.

        Raises
        ------
        InputError
            The recomputed logits miss the model's own beyond the precision's tolerance, or the head is not affine.
        """
        name = self.loaded.name
        with autocast:
            self._captured = [None] * len(self.heads)
            self.layer_features = {}
            logits = self.model(x)
        self._check_layers()
        layer_features = dict(self.layer_features)
        if isinstance(logits, (tuple, list)):
            logits = logits[0]
        inputs = list(self._captured)
        if any(t is None for t in inputs):
            raise InputError(f"{name}: the classifier module was not called in forward(); ncaudit cannot tell which "
                             "layer feeds the logits")
        self.shared_input = all(t is inputs[0] or (t.shape == inputs[0].shape and torch.equal(t, inputs[0]))
                                for t in inputs)  # type: ignore[union-attr]
        parts = []
        for (hname, mod), t in zip(self.heads, inputs if not self.shared_input else inputs[:1] * len(inputs)):
            scale = float(t.float().std().item()) if t.numel() > 1 else 1.0  # type: ignore[union-attr]
            parts.append(_affine_of(mod, tuple(t.shape[1:]), scale, hname, name))  # type: ignore[union-attr]
        ws = [w for w, _, _ in parts]
        bs = [b for _, b, _ in parts]
        k = len(parts)
        if k == 1:
            weight = ws[0]
        elif self.shared_input:
            weight = sum(ws) / k
        else:
            weight = np.concatenate(ws, 1) / k
        bias = None if all(b is None for b in bs) else sum(np.zeros(weight.shape[0]) if b is None else b
                                                            for b in bs) / k
        self.weight, self.bias = weight, bias
        how = " + ".join(h for _, _, h in parts)
        if k > 1:
            how = (f"mean of {how} on the same input" if self.shared_input
                   else f"mean of {how}; features = their inputs concatenated")
        self.source = how

        feats, logits = self._assemble(inputs, logits)
        if self.loaded.library == "timm" and k == 1:
            m: Any = self.model
            few = x[:2]  # a documentation check, not the safety check above: two samples keep it cheap
            with autocast:
                pre = m.forward_head(m.forward_features(few), pre_logits=True)
            pre = pre.reshape(pre.shape[0], -1).float()
            ref = feats[:2].float()
            tol = 1e-4 if precision == "fp32" else 5e-2
            same = pre.shape == ref.shape and torch.allclose(pre, ref, rtol=tol, atol=tol * float(ref.abs().max()))
            self.source += ("; features = forward_head(pre_logits=True)" if same
                            else "; features = the classifier's input (forward_head(pre_logits=True) differs)")
        self.layer_features = layer_features  # the pre-logits check above ran the layers again on two samples
        if logits.shape[1] != weight.shape[0]:
            raise InputError(f"{name}: the model returns {logits.shape[1]} outputs but its classifier has "
                             f"{weight.shape[0]} rows; ncaudit cannot map features to logits")
        h = feats.detach().double().cpu().numpy()
        z = logits.detach().double().cpu().numpy()
        pred = h @ weight.T + (0.0 if bias is None else bias)
        bound = np.abs(h) @ np.abs(weight).T + (0.0 if bias is None else np.abs(bias))
        rtol = LOGIT_RTOL.get(precision, 3e-2)
        err = np.abs(pred - z)
        tol = rtol * bound + 1e-6 * (bound.max() + 1e-30)
        self.max_logit_error = float((err / np.maximum(bound, 1e-30)).max())
        if not np.all(np.isfinite(z)) or not np.all(np.isfinite(h)):
            raise InputError(f"{name}: the first batch gives non-finite features or logits; check the checkpoint and "
                             "the input normalisation (--mean/--std)")
        if not np.all(err <= tol):
            raise InputError(
                f"{name}: W·h + b from the classifier ({how}) does not reproduce the model's logits (relative error "
                f"{self.max_logit_error:.2g} > {rtol:g} at {precision}); the head is not one affine map of the "
                "captured features, so ncaudit refuses rather than audit the wrong layer")
        return feats, logits

    def _assemble(self, inputs: list[Any], logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        flat = [t.reshape(t.shape[0], -1) for t in inputs]
        feats = flat[0] if self.shared_input else torch.cat(flat, 1)
        return feats, logits.reshape(logits.shape[0], -1)
