"""Penultimate features and the final affine map (W, b): ``forward_head(pre_logits=True)`` or a forward hook,
W h + b checked against the logits, further layers pooled."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from ncaudit.errors import InputError
from ncaudit.models._builder import LoadedModel

#: Relative tolerance of the logit check per precision, against the bound |W| |h| + |b| of each logit.
LOGIT_RTOL = {"fp32": 1e-4, "bf16": 3e-2, "fp16": 4e-3}


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
