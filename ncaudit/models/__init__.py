"""Models for ``ncaudit extract``: timm and torchvision networks with their weights, and their penultimate features.

Checkpoints load with ``weights_only=True`` or safetensors (:func:`load_checkpoint`); :func:`load_model` builds the
network and loads a checkpoint, published weights (through the libraries' own caches) or a seeded random init;
:class:`PenultimateModel` gives the input of the final linear layer with that layer's (W, b).
"""

from ncaudit.models._builder import LoadedModel, Weights
from ncaudit.models._checkpoint import Checkpoint, file_sha256, load_checkpoint
from ncaudit.models._factory import load_model
from ncaudit.models._heads import head_modules
from ncaudit.models._metadata import imagenet_classes, recorded_preprocessing
from ncaudit.models._penultimate import PenultimateModel, resolve_layers

__all__ = ["Checkpoint", "LoadedModel", "PenultimateModel", "Weights", "file_sha256", "head_modules",
           "imagenet_classes", "load_checkpoint", "load_model", "recorded_preprocessing", "resolve_layers"]
