"""Where the work runs: the one place that turns a ``--device`` flag into a :class:`torch.device` (or into the host
without torch, :func:`resolve_host`), and the switch that keeps products at full precision (no TF32) wherever they
run. torch is imported by the functions that need it, not by this module."""

from __future__ import annotations

import contextlib
import ctypes
import glob
import os
import sys
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from ncaudit.errors import InputError

if TYPE_CHECKING:
    import torch

DEVICES = ("auto", "cuda", "cpu")

#: On the CPU the accumulators do their element-wise work in NumPy (one pass over cache-sized blocks; torch's
#: reductions cost far more per element on a busy CPU). False runs the device code path on the CPU as well: the tests
#: check that path for host synchronisation without a GPU.
HOST_NUMPY = True


def release_free_memory() -> None:
    """Hand the C heap's free pages back to the OS (glibc ``malloc_trim``; nothing elsewhere).

    Between the audit's stages the large temporaries of the one before (batches, the closed forms' p x p products)
    are free but stay in the process's heap: glibc raises its mmap threshold after large frees, so later blocks come
    from a heap it trims only above 64 MiB free. Called once per stage, it keeps the peak RSS to what is live.
    """
    global _TRIM
    if _TRIM is None:
        try:
            _TRIM = ctypes.CDLL("libc.so.6").malloc_trim if sys.platform.startswith("linux") else False
        except (OSError, AttributeError):
            _TRIM = False
    if _TRIM:
        _TRIM(0)


_TRIM: Any = None


#: Files whose presence means an NVIDIA driver (and so possibly a CUDA device) is there: Linux, containers, WSL.
_DRIVER_FILES = ("/proc/driver/nvidia/version", "/dev/nvidiactl", "/dev/dxg")


def cuda_possible() -> bool:
    """Whether a CUDA device may be present, decided without importing torch when it is not imported yet: no NVIDIA
    driver file (:data:`_DRIVER_FILES`, ``/dev/nvidia0``...) means no CUDA. With a driver, torch is asked."""
    if "torch" not in sys.modules and sys.platform.startswith("linux") and not (
            any(os.path.exists(f) for f in _DRIVER_FILES) or glob.glob("/dev/nvidia[0-9]*")):
        return False
    import torch

    return bool(torch.cuda.is_available())


def resolve_host(device: str = "auto") -> torch.device | None:
    """None when the work of ``--device`` runs on the host in NumPy, without torch (``cpu``, or ``auto`` where no
    CUDA device can be: see :func:`cuda_possible`); else :func:`resolve_device`'s device (a CPU one included, when
    ``device`` is a torch.device)."""
    name = str(device)
    if not isinstance(device, str):
        return resolve_device(device)
    if name == "cpu" or (name == "auto" and not cuda_possible()):
        return None
    resolved = resolve_device(name)
    return None if resolved.type == "cpu" else resolved


def torch_device(device: torch.device | None) -> torch.device:
    """The torch device of work that needs torch: ``device``, or the CPU for the host (None)."""
    import torch

    return torch.device("cpu") if device is None else device


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto`` -> CUDA when available, else CPU; ``cuda`` / ``cuda:N`` / ``cpu`` as given.

    Raises
    ------
    InputError
        An unknown device name, or CUDA asked for where there is none.
    """
    import torch

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


@contextlib.contextmanager
def host_threads(device: torch.device | None) -> Iterator[None]:
    """On the CPU, torch single-threaded inside the block (restored after); elsewhere nothing (on the host without
    torch, ``device`` None, nothing either unless torch is already imported).

    For work whose products run in NumPy's BLAS (the audit of a cache): torch's few operations around them (labels,
    set-up of a pass) would otherwise wake its OpenMP pool, whose threads spin after each parallel region and take the
    cores the BLAS needs in any process without ``OMP_WAIT_POLICY=PASSIVE`` (measured: pass 2 25 % slower). Not for
    blocks that run a model: its forward pass wants torch's threads.
    """
    if (device is None and "torch" not in sys.modules) or (device is not None and device.type != "cpu"):
        yield
        return
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@contextlib.contextmanager
def full_precision_matmul() -> Iterator[None]:
    """Disable TF32 and reduced-precision float32 matmuls inside the block, restoring the settings after."""
    import torch

    cuda_tf32 = torch.backends.cuda.matmul.allow_tf32
    cudnn_tf32 = torch.backends.cudnn.allow_tf32
    precision = torch.get_float32_matmul_precision()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = cuda_tf32
        torch.backends.cudnn.allow_tf32 = cudnn_tf32
        torch.set_float32_matmul_precision(precision)
