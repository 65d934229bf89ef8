"""Building a timm or torchvision network by name, the weights it is to get (:class:`Weights`) and the
loaded result (:class:`LoadedModel`)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from ncaudit.errors import InputError
from ncaudit.models._checkpoint import Checkpoint
from ncaudit.models._heads import _num_classes_from, head_modules

TORCHVISION_PREFIX = "torchvision:"


# ---------------------------------------------------------------------------------------------------------------------
# Building
# ---------------------------------------------------------------------------------------------------------------------
def _split_name(name: str) -> tuple[str, str]:
    if name.startswith(TORCHVISION_PREFIX):
        return "torchvision", name[len(TORCHVISION_PREFIX):]
    return "timm", name


def _build(library: str, arch: str, num_classes: int | None, img_size: int | None = None,
           pretrained: Any = None, pretrained_cfg_overlay: dict[str, Any] | None = None) -> nn.Module:
    """Construct the model; ``pretrained`` is True (timm) or a torchvision weights enum member to load published
    weights through the library's own loading code; ``pretrained_cfg_overlay`` (timm) e.g. hands it a state dict
    read here."""
    kwargs: dict[str, Any] = {} if num_classes is None else {"num_classes": num_classes}
    if pretrained_cfg_overlay is not None:
        kwargs["pretrained_cfg_overlay"] = pretrained_cfg_overlay
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


def _unwrap(model: nn.Module) -> nn.Module:
    """The network inside DistributedDataParallel / DataParallel and ``torch.compile`` wrappers."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod  # type: ignore[assignment]
        else:
            return model


def from_module(model: nn.Module, classifier: str | nn.Module | Sequence[str | nn.Module] | None = None, *,
                name: str | None = None) -> LoadedModel:
    """A network already in memory (a training loop's model) as a :class:`LoadedModel`, its mode left as it is.

    Parameters
    ----------
    model
        A timm or torchvision network, or any ``nn.Module`` whose logits come from a final linear layer (wrappers of
        DistributedDataParallel, DataParallel and ``torch.compile`` are looked through).
    classifier
        The classifier module(s), by name or as modules; default: found as ``extract`` finds it (timm
        ``get_classifier()``, otherwise the last ``nn.Linear``).
    name
        A name for messages and provenance (default: the class name).

    Raises
    ------
    InputError
        No classifier module, or a named one that the model does not have.
    """
    net = _unwrap(model)
    library = "timm" if all(callable(getattr(net, attr, None)) for attr in
                            ("get_classifier", "forward_head", "forward_features")) else "torchvision"
    label = name or type(net).__name__
    modules = dict(net.named_modules())
    if classifier is None:
        try:
            heads = head_modules(net, library)
        except InputError as exc:
            raise InputError(f"{label}: {exc}; or pass classifier=") from None
    else:
        heads = []
        for item in [classifier] if isinstance(classifier, (str, nn.Module)) else list(classifier):
            if isinstance(item, str):
                if item not in modules:
                    raise InputError(f"{label}: no module named {item!r}; pass the classifier's name as in "
                                     "model.named_modules()")
                heads.append((item, modules[item]))
            else:
                found = [n for n, m in modules.items() if m is item]
                if not found:
                    raise InputError(f"{label}: the classifier module given is not part of the model")
                heads.append((found[0], item))
    num_classes = _num_classes_from(net.state_dict(), *heads[0])
    return LoadedModel(model=net, name=label, library=library, num_classes=num_classes, checkpoint=None, heads=heads,
                       weights="in-memory", source="the model in memory")
