"""Loading a model with its weights (a checkpoint, published weights or a random init): :func:`load_model`."""

from __future__ import annotations

import os

import torch

from ncaudit._validate import check_preprocessing
from ncaudit.errors import InputError
from ncaudit.models._builder import WEIGHT_KINDS, LoadedModel, Weights, _build, _finish, _split_name
from ncaudit.models._checkpoint import Checkpoint, load_checkpoint
from ncaudit.models._heads import _num_classes_from, head_modules
from ncaudit.models._hub import _timm_pretrained, _torchvision_pretrained


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


def _from_checkpoint(name: str, library: str, arch: str, ckpt: Checkpoint, img_size: int | None) -> LoadedModel:
    check_preprocessing(ckpt.metadata, f"{ckpt.path} (metadata)")
    check_preprocessing(ckpt.args, f"{ckpt.path} (training args)")
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
