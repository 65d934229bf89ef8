"""What the weights say about themselves: their ImageNet classes and how their images were prepared."""

from __future__ import annotations

from typing import Any

from ncaudit.models._builder import LoadedModel


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
