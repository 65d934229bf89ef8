"""Reading checkpoints safely: ``weights_only=True`` or safetensors, archives checked before anything is
inflated, the state dict found and cleaned, training args and metadata kept."""

from __future__ import annotations

import argparse
import hashlib
import os
import pickle
import re
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ncaudit._validate import available_memory, format_bytes, regular_file
from ncaudit.errors import InputError

PLAIN_KEYS = ("state_dict", "model")
EMA_KEYS = ("state_dict_ema", "model_ema")
STRIP_PREFIXES = ("module.", "_orig_mod.")


# ---------------------------------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Checkpoint:
    """A state dict read from a local file, with where it came from.

    ``key`` is the entry of the file the weights came from (``""`` for a bare state dict), ``ema`` whether those are
    EMA weights and ``has_ema`` / ``has_plain`` what else the file held. ``metadata`` holds a safetensors file's
    metadata, or a pickle's scalar top-level entries (``epoch``, ``arch``, ...), as strings; ``args`` the plain
    values of a training script's ``args`` entry (timm ``train.py``, torchvision's reference scripts).
    """

    path: Path
    sha256: str
    state_dict: dict[str, torch.Tensor]
    key: str
    ema: bool
    has_plain: bool
    has_ema: bool
    metadata: dict[str, str] = field(default_factory=dict)
    args: dict[str, Any] = field(default_factory=dict)


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
        with zipfile.ZipFile(path) as archive:
            members = archive.infolist()
    except (zipfile.BadZipFile, OSError, ValueError):
        return  # not a zip (a legacy pickle) or not readable: torch.load says so
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
    if not os.path.lexists(path):
        raise InputError(f"{path}: no such checkpoint file; give the path of a .pth/.pt/.bin or .safetensors file")
    regular_file(path, "a checkpoint")  # a FIFO would block the open (inside safetensors, uninterruptibly)
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open
        from safetensors.torch import load_file

        try:
            raw: Any = load_file(str(path), device="cpu")
            with safe_open(str(path), framework="pt") as handle:
                metadata = dict(handle.metadata() or {})
        except (SafetensorError, OSError, ValueError) as exc:
            raise InputError(f"{path}: not a readable safetensors file ({exc}); check the file") from None
    else:
        raw = _read_pickle(path)
        metadata = {str(k): str(v) for k, v in raw.items() if isinstance(v, (int, float, str)) and not
                    isinstance(v, bool)} if isinstance(raw, Mapping) else {}
    # (a bare state dict holds only tensors: no metadata and no args in it)
    args = _plain_args(raw.get("args")) if isinstance(raw, Mapping) else {}
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
                      has_plain=plain is not None, has_ema=ema_sd is not None, metadata=metadata, args=args)


def _plain_args(args: Any) -> dict[str, Any]:
    """The numbers, strings and lists of numbers of a training script's ``args`` (a Namespace or a dict)."""
    items = vars(args) if isinstance(args, argparse.Namespace) else args if isinstance(args, Mapping) else {}
    out: dict[str, Any] = {}
    for key, value in items.items():
        if isinstance(value, (int, float, str)) or value is None:
            out[str(key)] = value
        elif isinstance(value, (list, tuple)) and all(isinstance(v, (int, float)) for v in value):
            out[str(key)] = list(value)
    return out
