"""Products at full precision: TF32 off, float64 through NumPy's BLAS on the CPU (``syrk`` for ``A^T A``), the
decision GEMM's dtype and the unit roundoff; reusable scratch buffers."""

from __future__ import annotations

import numpy as np
import torch

from ncaudit._device import full_precision_matmul
from ncaudit.stats._host import gemm_name_for


def gemm_dtype_for(feature_dtype: str | torch.dtype | np.dtype) -> torch.dtype:
    """The dtype of the second pass's decision GEMM for features of this dtype (:func:`gemm_name_for` as a torch
    dtype)."""
    return getattr(torch, gemm_name_for(feature_dtype))


def unit_roundoff(dtype: torch.dtype) -> float:
    """u = eps / 2 of a floating dtype."""
    return float(torch.finfo(dtype).eps) / 2


def gram(a: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``a^T a`` (k x k) of a contiguous (B x k) matrix, into ``out``, through :func:`mm`.

    On the CPU NumPy's BLAS sees both operands share one buffer and computes ``A^T A`` as a symmetric rank-k update
    (``syrk``): half the flops of a general product. On CUDA it is ``torch.mm`` with TF32 off.
    """
    return mm(a.T, a, out)


class Workspace:
    """Reusable scratch buffers for per-batch temporaries.

    A fresh (B, p) tensor per batch costs more in page faults than the arithmetic done on it (large allocations are
    returned to the OS and faulted in again): reusing buffers keeps the O(B p) work small next to the GEMM.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._buffers: dict[str, torch.Tensor] = {}

    def get(self, name: str, rows: int, cols: int, dtype: torch.dtype) -> torch.Tensor:
        """A (rows, cols) buffer of ``dtype`` (contents undefined), grown when a larger batch arrives.

        The result is contiguous: a buffer of other width is reallocated rather than sliced.
        """
        buf = self._buffers.get(name)
        if buf is None or buf.dtype != dtype or buf.shape[0] < rows or buf.shape[1] != cols:
            buf = torch.empty(max(rows, 1), cols, dtype=dtype, device=self.device)
            self._buffers[name] = buf
        return buf[:rows]


def mm(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``a @ b`` into ``out`` without TF32: NumPy's BLAS on the CPU (faster than torch's on some CPUs, and the same
    library as :func:`gram`), ``torch.mm`` on CUDA."""
    if a.device.type == "cpu":
        np.matmul(a.numpy(), b.numpy(), out=out.numpy())
        return out
    with full_precision_matmul():
        return torch.mm(a, b, out=out)
