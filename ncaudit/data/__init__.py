"""Datasets and eval transforms for ``ncaudit extract``.

Datasets are read in every format timm's ``create_dataset`` reads, enumerated through timm's readers: image folders
(ImageNet's train/val layouts included), tar files of images, ``torch/NAME`` (torchvision datasets already on disk),
``hfds/NAME`` (a Hugging Face dataset on disk or in its cache) and ``wds/NAME`` WebDataset shards, one reader per
module (``_reader_*.py``). Every encoded image is decoded by :func:`load_image` into RGB and passed through the model's
own eval transform, described by a plain JSON-able dict (with where each value came from) that goes into the cache's
``transform`` attribute. ``--limit N`` keeps the first N rows of :func:`stratified_order`: a class-stratified,
seeded sample.
"""

from ncaudit.data._factory import dataset_family, open_dataset, open_samples, tensor_source
from ncaudit.data._images import load_image
from ncaudit.data._labels import map_labels, read_class_map
from ncaudit.data._sample import LIMIT_SEED, stratified_order
from ncaudit.data._source import DataSource
from ncaudit.data._transforms import (
           ToRGB,
           TransformOverrides,
           build_transform,
           describe_transform,
           transform_config,
           transform_hints,
)

__all__ = ["LIMIT_SEED", "DataSource", "ToRGB", "TransformOverrides", "build_transform", "dataset_family",
           "describe_transform", "load_image", "map_labels", "open_dataset", "open_samples", "read_class_map",
           "stratified_order", "tensor_source", "transform_config", "transform_hints"]
