"""How a batch of images becomes penultimate features: precision (autocast), device placement, the first batch's
check of (W, b) against the logits, and the float32 reference rows. One definition, used by ``extract`` and by
:func:`ncaudit.audit_model`, so that both see the same numbers for the same model, images and batches."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from ncaudit._device import full_precision_matmul
from ncaudit.errors import InputError
from ncaudit.models._penultimate import PenultimateModel

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
_AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto`` -> bf16 autocast on CUDA, fp32 on CPU."""
    if precision not in PRECISIONS:
        raise InputError(f"--precision {precision!r}: use one of {', '.join(PRECISIONS)}")
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return precision


def autocast_context(precision: str, device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """Autocast for bf16/fp16; for fp32 autocast switched off (a caller's own autocast region, e.g. a training loop's
    mixed precision, must not lower the features' precision)."""
    if precision == "fp32":
        return torch.autocast(device_type=device.type, enabled=False)
    return torch.autocast(device_type=device.type, dtype=_AUTOCAST_DTYPES[precision])


def to_device(x: torch.Tensor, device: torch.device, channels_last: bool) -> torch.Tensor:
    """A batch of images on ``device`` (asynchronously from pinned memory on CUDA), channels-last when asked."""
    x = x.to(device, non_blocking=device.type == "cuda")
    return x.contiguous(memory_format=torch.channels_last) if channels_last and x.ndim == 4 else x


def full_batch(x: torch.Tensor, size: int | None) -> torch.Tensor:
    """``x`` padded to ``size`` rows with copies of its last row (the caller keeps the first ``len(x)`` outputs).

    Every forward then sees a whole batch, so the features of a row do not depend on the size of the batch it falls
    in: some CPU kernels split a small batch by the number of threads (measured: test_resnet on 7 rows differs by an
    ulp between 1 and 2 threads, on 64 rows it does not), and a rank of a torchrun launch (OMP_NUM_THREADS=1) ends its
    slice on another partial batch than one process would. The rows of a batch never mix, so the padding changes no
    real row.
    """
    n = int(x.shape[0])
    if size is None or n == 0 or n >= size:
        return x
    return torch.cat([x, x[-1:].expand(size - n, *x.shape[1:])])


class FeatureRunner:
    """Run a :class:`PenultimateModel` on batches of images: ``(features (B, p), logits (B, C))`` per batch.

    Parameters
    ----------
    pm
        The model with its capture hooks.
    device
        Where the model runs (the inputs are moved there).
    precision
        ``fp32`` (TF32 off), ``bf16`` or ``fp16`` (autocast), as resolved by :func:`resolve_precision`.
    channels_last
        Feed 4-D inputs in channels-last memory format (the model should be in that format too).
    pad_to
        Pad every batch to this many rows (:func:`full_batch`) and return the batch's own rows: ``extract`` does, so a
        row's features do not depend on where the batches of a run (or of a rank's slice) end. The layer features of
        :attr:`PenultimateModel.layer_features` are those of the padded batch.

    Notes
    -----
    Every call must run inside :meth:`running` (inference mode; full-precision matmuls at fp32). The first batch goes
    through :meth:`first`, which derives (W, b) from the classifier module(s) and checks W h + b against the model's
    logits (:meth:`PenultimateModel.verify`); :meth:`reference` recomputes rows in float32 without autocast for the
    precision floor of a mixed-precision run.
    """

    def __init__(self, pm: PenultimateModel, device: torch.device, precision: str, channels_last: bool = False,
                 pad_to: int | None = None) -> None:
        self.pm = pm
        self.pad_to = pad_to
        self.device = device
        self.precision = precision
        self.channels_last = channels_last
        self.autocast = autocast_context(precision, device)

    @contextlib.contextmanager
    def running(self) -> Iterator[None]:
        """Inference mode, and full-precision matmuls when the precision is fp32."""
        fp32 = full_precision_matmul() if self.precision == "fp32" else contextlib.nullcontext()
        with fp32, torch.inference_mode():
            yield

    def first(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The first batch: derive (W, b) and check them against the logits; its features and logits."""
        return self.pm.verify(self._input(x), self.precision, self.autocast)

    def _input(self, x: torch.Tensor) -> torch.Tensor:
        return to_device(full_batch(x, self.pad_to), self.device, self.channels_last)

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n = int(x.shape[0])
        with self.autocast:
            feats, logits = self.pm(self._input(x))
        return feats[:n], logits[:n]

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        """Features of ``x`` in float32: no autocast, TF32 off (the rows of ``/reference_fp32``)."""
        with full_precision_matmul(), torch.inference_mode(), autocast_context("fp32", self.device):
            feats, _ = self.pm(self._input(x))
        return feats[:int(x.shape[0])].float()
