"""Where the work runs: the one place that turns a ``--device`` flag into a :class:`torch.device`, and the switch that
keeps products at full precision (no TF32) wherever they run."""

from __future__ import annotations

import contextlib
import ctypes
import sys
from collections.abc import Iterator
from typing import Any

import torch

from ncaudit.errors import InputError

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


@contextlib.contextmanager
def host_threads(device: torch.device) -> Iterator[None]:
    """On the CPU, torch single-threaded inside the block (restored after); elsewhere nothing.

    For work whose products run in NumPy's BLAS (the audit of a cache): torch's few operations around them (labels,
    set-up of a pass) would otherwise wake its OpenMP pool, whose threads spin after each parallel region and take the
    cores the BLAS needs in any process without ``OMP_WAIT_POLICY=PASSIVE`` (measured: pass 2 25 % slower). Not for
    blocks that run a model: its forward pass wants torch's threads.
    """
    if device.type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@contextlib.contextmanager
def full_precision_matmul() -> Iterator[None]:
    """Disable TF32 and reduced-precision float32 matmuls inside the block, restoring the settings after."""
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
