"""Finding a network's classifier (its final linear layer) and the number of classes it has."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from ncaudit.errors import InputError


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
