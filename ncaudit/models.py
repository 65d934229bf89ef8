"""Models for ``ncaudit extract``: build a timm or torchvision classifier, load a local checkpoint into it and find
its penultimate features and final affine map ``(W, b)``.

The penultimate features are the exact input of the affine map that produces the logits. They are captured with
forward pre-hooks on the classifier module(s) while the model runs its own ``forward``, so the logits stored next to
them are the model's own. :meth:`PenultimateModel.verify` checks on real inputs that ``W h + b`` reproduces those
logits; extraction stops when it does not.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import os
import pickle
import re
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before timm is imported: never try the network

import numpy as np
import torch
from torch import nn

from ncaudit.errors import InputError
from ncaudit.validate import available_memory, format_bytes

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
    metadata, or a pickle's scalar top-level entries (``epoch``, ``arch``, ...), as strings.
    """

    path: Path
    sha256: str
    state_dict: dict[str, torch.Tensor]
    key: str
    ema: bool
    has_plain: bool
    has_ema: bool
    metadata: dict[str, str] = field(default_factory=dict)


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
        if not zipfile.is_zipfile(path):
            return
        with zipfile.ZipFile(path) as archive:
            members = archive.infolist()
    except (zipfile.BadZipFile, OSError, ValueError):
        return  # not a readable archive: torch.load says so
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
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        from safetensors import safe_open

        try:
            raw: Any = load_file(str(path), device="cpu")
            with safe_open(str(path), framework="pt") as handle:
                metadata = dict(handle.metadata() or {})
        except (SafetensorError, OSError, ValueError) as exc:
            raise InputError(f"{path}: not a readable safetensors file ({exc}); check the file") from None
    else:
        raw = _read_pickle(path)
        metadata = {str(k): str(v) for k, v in raw.items() if isinstance(v, (int, float, str)) and not
                    isinstance(v, bool)} if isinstance(raw, Mapping) and not _is_state_dict(raw) else {}
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
                      has_plain=plain is not None, has_ema=ema_sd is not None, metadata=metadata)


# ---------------------------------------------------------------------------------------------------------------------
# Building
# ---------------------------------------------------------------------------------------------------------------------
def _split_name(name: str) -> tuple[str, str]:
    if name.startswith(TORCHVISION_PREFIX):
        return "torchvision", name[len(TORCHVISION_PREFIX):]
    return "timm", name


def _build(library: str, arch: str, num_classes: int | None, img_size: int | None = None) -> nn.Module:
    kwargs: dict[str, Any] = {} if num_classes is None else {"num_classes": num_classes}
    if img_size is not None:  # models with a fixed input size (ViTs) take it at construction; others refuse it
        try:
            key = "image_size" if library == "torchvision" else "img_size"
            return _build_kw(library, arch, {**kwargs, key: img_size})
        except TypeError:
            pass
    return _build_kw(library, arch, kwargs)


def _build_kw(library: str, arch: str, kwargs: dict[str, Any]) -> nn.Module:
    if library == "torchvision":
        import torchvision
        if arch not in torchvision.models.list_models():
            raise InputError(f"unknown torchvision model {arch!r}; see torchvision.models.list_models() "
                             "(e.g. torchvision:resnet18)")
        return torchvision.models.get_model(arch, weights=None, **kwargs)
    import timm
    if not timm.is_model(arch):
        raise InputError(f"unknown timm model {arch!r}; see timm.list_models() or prefix torchvision: for a "
                         "torchvision model")
    return timm.create_model(arch, pretrained=False, **kwargs)


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


@dataclass
class LoadedModel:
    """A model in eval mode with its checkpoint loaded."""

    model: nn.Module
    name: str
    library: str
    num_classes: int
    checkpoint: Checkpoint
    heads: list[tuple[str, nn.Module]] = field(default_factory=list)


def load_model(name: str, checkpoint: str | os.PathLike[str] | Checkpoint, *, ema: bool | None = None,
               img_size: int | None = None) -> LoadedModel:
    """Build ``name`` (timm name or ``torchvision:NAME``) with the checkpoint's number of classes and load it.

    The architecture is first built on the meta device (no memory, no init) to find the classifier, whose weight
    shape in the checkpoint gives the number of classes K; then it is built for real with ``num_classes=K`` and the
    state dict is loaded strictly.

    ``img_size`` is passed to constructors that take one (timm ``img_size``, torchvision ``image_size``: ViTs).

    Raises
    ------
    InputError
        Unknown model, no classifier, or a checkpoint that does not fit the architecture.
    """
    library, arch = _split_name(name)
    ckpt = checkpoint if isinstance(checkpoint, Checkpoint) else load_checkpoint(checkpoint, ema=ema)
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
    model.eval()
    return LoadedModel(model=model, name=name, library=library, num_classes=num_classes, checkpoint=ckpt,
                       heads=head_modules(model, library))


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
            "the input of its last linear layer yourself and write a schema-1 cache with ncaudit.store.write_cache")
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
