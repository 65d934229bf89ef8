"""Where the work runs: the one place that turns a ``--device`` flag into a :class:`torch.device`."""

from __future__ import annotations

import torch

from ncaudit.errors import InputError

DEVICES = ("auto", "cuda", "cpu")


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto`` -> CUDA when available, else CPU; ``cuda`` / ``cuda:N`` / ``cpu`` as given.

    Raises
    ------
    InputError
        An unknown device name, or CUDA asked for where there is none.
    """
    name = str(device)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    base = name.split(":", 1)[0]
    if base not in DEVICES:
        raise InputError(f"--device {name!r}: use one of {', '.join(DEVICES)} (or cuda:N)")
    if base == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda: no CUDA device is available; use --device cpu (or auto)")
    try:
        return torch.device(name)
    except RuntimeError:
        raise InputError(f"--device {name!r}: not a device name; use cpu, cuda, cuda:N or auto") from None
