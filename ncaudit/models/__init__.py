"""Models for ``ncaudit extract`` and :func:`ncaudit.audit_model`: timm and torchvision networks with their weights,
and their penultimate features.

Checkpoints load with ``weights_only=True`` or safetensors (:func:`load_checkpoint`); :func:`load_model` builds the
network and loads a checkpoint, published weights (through the libraries' own caches) or a seeded random init;
:func:`from_module` takes a network already in memory. :class:`PenultimateModel` gives the input of the final linear
layer with that layer's (W, b); :class:`FeatureRunner` runs it on batches, the one definition of the features that
extraction and the in-memory audit share.
"""

from ncaudit.models._builder import LoadedModel, Weights, from_module
from ncaudit.models._checkpoint import Checkpoint, file_sha256, load_checkpoint
from ncaudit.models._factory import load_model
from ncaudit.models._heads import head_modules
from ncaudit.models._metadata import imagenet_classes, recorded_preprocessing
from ncaudit.models._penultimate import PenultimateModel, resolve_layers
from ncaudit.models._runner import PRECISIONS, FeatureRunner, autocast_context, resolve_precision, to_device

__all__ = ["PRECISIONS", "Checkpoint", "FeatureRunner", "LoadedModel", "PenultimateModel", "Weights",
           "autocast_context", "file_sha256", "from_module", "head_modules", "imagenet_classes", "load_checkpoint",
           "load_model", "recorded_preprocessing", "resolve_layers", "resolve_precision", "to_device"]
