"""One extraction once its inputs are checked (:class:`_Job`): classes and their names, the transform, the
lines that say what was loaded, and the provenance attributes."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from ncaudit import __version__
from ncaudit.data import (
    DataSource,
    TransformOverrides,
    build_transform,
    describe_transform,
    map_labels,
    transform_config,
)
from ncaudit.data._sample import LIMIT_SEED
from ncaudit.data._source import IN_MEMORY_READER
from ncaudit.data._transforms import transform_warnings
from ncaudit.errors import InputError
from ncaudit.models import LoadedModel, PenultimateModel, imagenet_classes, recorded_preprocessing
from ncaudit.models._metadata import imagenet_subset_for


# ---------------------------------------------------------------------------------------------------------------------
# The steps of an extraction
# ---------------------------------------------------------------------------------------------------------------------
@dataclass
class _Job:
    """One extraction once its inputs are checked: the model, the samples, the output file and where to start."""

    out: Path
    device: torch.device
    precision: str
    workers: int
    batch_size: int
    channels_last: bool
    pm: PenultimateModel
    source: DataSource
    n_total: int
    num_classes: int
    class_names: list[str] | None
    attrs: dict[str, Any]
    store_dtype: str
    chunk_rows: int
    state: dict[str, Any] | None
    resuming: bool
    start: int  # rows of this file already on disk (a resumed file); the run computes the rest
    note: Callable[[str], None]
    rows: range | None = None  # the dataset rows this file holds (None: all n_total of them)
    advance: Callable[[int], None] | None = None  # global progress of a multi-rank run (no bar of its own then)
    reference: bool = True  # write /reference_fp32 into this file (a shard does not: the joined cache gets them)
    inform: Callable[[str], None] = lambda _: None  # information for the user (not a warning)

    @property
    def span(self) -> range:
        """The dataset rows of this file."""
        return range(self.n_total) if self.rows is None else self.rows


def _model_labels(loaded: LoadedModel) -> tuple[str, list[str], list[str]] | None:
    """``(label set, names, synsets)`` of a model whose outputs follow an ImageNet label set: published ImageNet
    weights, or a head the size of one (1000: imagenet-1k) for synset-named data."""
    subset = loaded.imagenet or imagenet_subset_for(loaded.num_classes)
    return (subset, *imagenet_classes(subset)) if subset else None


def _own_class_names(loaded: LoadedModel,
                     space: tuple[str, list[str], list[str]] | None) -> tuple[list[str], str] | None:
    """The names published weights give their outputs: timm ``pretrained_cfg`` label names, ImageNet's synsets and
    descriptions (timm ``ImageNetInfo``), or a torchvision enum's categories."""
    if loaded.weights != "pretrained":
        return None
    names = (loaded.pretrained_cfg or {}).get("label_names")
    if names and len(names) == loaded.num_classes:
        return [str(n) for n in names], "pretrained_cfg label_names"
    if loaded.imagenet and space is not None:
        return space[1], f"timm ImageNetInfo('{space[0]}')"
    categories = list((loaded.tv_weights.meta.get("categories") or []) if loaded.tv_weights is not None else [])
    return (categories, "torchvision weights categories") if len(categories) == loaded.num_classes else None


def _label_classes(src: DataSource, loaded: LoadedModel, class_map: str | os.PathLike[str] | None,
                   note: Callable[[str], None]) -> tuple[list[str] | None, str]:
    """Map the dataset's labels to the model's outputs (class map, else synsets, else dataset order), check they fit
    the head, and return the class names to store (model order) with where they came from."""
    space = _model_labels(loaded)
    own = _own_class_names(loaded, space)
    if src.label_mapping == "dataset order" and src.reader != IN_MEMORY_READER:
        map_labels(src, class_map=class_map, model_classes=space)
    k = loaded.num_classes
    n_data_classes = len(src.class_names) if src.class_names is not None else len(src.dataset_classes)
    if src.class_names is not None and len(src.class_names) != k:
        raise InputError(f"--class-map lists {len(src.class_names)} classes but the model's head has {k} outputs; "
                         "list every model class, in model order")
    if n_data_classes > k or int(src.labels.max()) >= k:
        raise InputError(f"the dataset has {n_data_classes} classes but the model's head has {k} outputs; pass "
                         "--class-map or the dataset the weights were trained on")
    if src.class_names is None and len(src.dataset_classes) < k:
        note(f"the dataset has {len(src.dataset_classes)} classes and the head {k}: labels follow the dataset's class "
             "order 0..; pass --class-map if the model orders its classes differently")
    if src.class_names is not None:
        return src.class_names, src.label_mapping
    if own is not None:
        return own
    return (src.dataset_classes, "the dataset's classes") if len(src.dataset_classes) == k else (None, "")


def _transform_for(src: DataSource, loaded: LoadedModel, overrides: TransformOverrides,
                   note: Callable[[str], None]) -> dict[str, Any]:
    """The eval transform (weights' records, then flags), set on the source; warnings for a resolution or
    normalisation the weights were not trained with."""
    if src.reader == IN_MEMORY_READER:
        return {"library": "none", "note": "images given in memory, already transformed"}
    recorded = recorded_preprocessing(loaded)
    cfg = transform_config(loaded.model, loaded.library, recorded=recorded, **asdict(overrides))
    for warning in transform_warnings(cfg, recorded):
        note(warning)
    named = {source for source, _ in recorded}
    from_weights = any(source in named for source in cfg["sources"].values())
    defaulted = [key for key, source in cfg["sources"].items() if not str(source).startswith("--")]
    if not from_weights and loaded.weights == "checkpoint" and defaulted:  # a flag gave every value: nothing to say
        note(f"the checkpoint records no preprocessing (no safetensors metadata, no training args): "
             f"{', '.join(defaulted)} from the {cfg['sources'][defaulted[0]]}; pass --img-size/--mean/--std "
             "(--crop-pct, --interpolation, --crop-mode) if it was trained otherwise")
    src.set_transform(build_transform(cfg))
    return cfg


def _describe(loaded: LoadedModel, src: DataSource, cfg: dict[str, Any], names_from: str) -> list[str]:
    """The first lines of output: the weights, the data and the transform, each with where it came from."""
    where = f" {src.root}" if src.data and not src.kind.startswith("hfds/") else ""
    split = f", split {src.split}" if src.split else ""
    lines = [f"model: {loaded.name} ({loaded.num_classes} classes), {loaded.source}",
             f"data: {src.kind}{where}{split}: {_images(src)}, {len(src.dataset_classes)} classes; reader: "
             f"{src.reader}; labels: {src.label_mapping}" + (f"; class names: {names_from}" if names_from else "")]
    return lines + describe_transform(cfg)


def _images(src: DataSource) -> str:
    if src.sampled_from is None:
        return f"{len(src)} images"
    return f"{len(src)} of {src.sampled_from} images (--limit: a class-stratified sample, seed {LIMIT_SEED})"


def _provenance(model_name: str, loaded: LoadedModel, src: DataSource, cfg: dict[str, Any], precision: str,
                device: torch.device, limit: int | None) -> dict[str, Any]:
    """The root attributes that say where the features came from (and that --resume must find unchanged)."""
    ckpt = loaded.checkpoint
    attrs: dict[str, Any] = {
        "model": model_name, "weights": loaded.weights, "weights_source": loaded.source,
        "checkpoint": str(ckpt.path.resolve()) if ckpt else "", "checkpoint_sha256": ckpt.sha256 if ckpt else "",
        "checkpoint_key": ckpt.key if ckpt else "", "ema": bool(ckpt.ema) if ckpt else False, "dataset": src.kind,
        "data": src.data, "split": src.split or "", "reader": src.reader, "label_mapping": src.label_mapping,
        "data_fingerprint": src.fingerprint, "precision": precision, "device": device.type, "transform": cfg,
        "ncaudit_version": __version__, "limit": int(limit or 0),
        "seed": loaded.seed if loaded.seed is not None else "",
    }
    meta = ckpt.metadata if ckpt else {}
    if meta:
        attrs["checkpoint_metadata"] = meta
    epoch = meta.get("epoch", "") if loaded.weights == "checkpoint" else "0" if loaded.weights == "random-init" else ""
    if epoch.strip().lstrip("-").isdigit():
        attrs["epoch"] = int(epoch)
    return attrs
