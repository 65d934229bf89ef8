"""Labels and features checked on the device, reported once per pass: the checks of a live audit (a training loop's
batches on CUDA) without a host synchronisation per batch."""

from __future__ import annotations

import torch

from ncaudit import _device
from ncaudit._validate import SQUARABLE
from ncaudit.distributed import rank, world_size
from ncaudit.errors import InputError

#: "No bad row yet": larger than any row index.
_NONE = torch.iinfo(torch.int64).max


class DeferredChecks:
    """The first label outside [0, C) and the first non-finite (or unsquarably large) feature row, tracked on the
    device with element-wise operations only; :meth:`raise_first` reads them once and raises.

    :meth:`labels` returns the labels with bad ones replaced by 0, so that the accumulators never index out of range
    (an illegal memory access on CUDA); the pass is refused afterwards anyway.
    """

    def __init__(self, num_classes: int, device: torch.device) -> None:
        self.num_classes = num_classes
        self.device = device
        self.bad_label_row = torch.full((), _NONE, dtype=torch.int64, device=device)
        self.bad_label = torch.zeros((), dtype=torch.int64, device=device)
        self.bad_rows: dict[str, torch.Tensor] = {}

    def _first(self, bad: torch.Tensor, start: int) -> torch.Tensor:
        """Index (from ``start``) of the first True in ``bad``, or _NONE: a 0-d tensor, no synchronisation."""
        index = torch.arange(start, start + bad.shape[0], device=bad.device)
        return torch.where(bad, index, torch.full_like(index, _NONE)).amin()

    def labels(self, y: torch.Tensor, start: int) -> torch.Tensor:
        """Record the first label outside [0, C) of this batch; the labels with bad ones set to 0."""
        if y.shape[0] == 0:
            return y
        y = y.to(self.device, non_blocking=True)
        bad = (y < 0) | (y >= self.num_classes)
        first = self._first(bad, start)
        value = y.gather(0, (first - start).clamp(0, y.shape[0] - 1).reshape(1)).reshape(())  # no tensor __index__
        earlier = first < self.bad_label_row
        self.bad_label = torch.where(earlier, value, self.bad_label)
        self.bad_label_row = torch.minimum(first, self.bad_label_row)
        return torch.where(bad, torch.zeros_like(y), y)

    def features(self, h: torch.Tensor, start: int, name: str = "features") -> None:
        """Record the first row of ``h`` holding NaN / Inf or a value beyond what the statistics' products hold."""
        if h.shape[0] == 0:
            return
        limit = SQUARABLE["float64" if h.dtype == torch.float64 else "float32"]
        if h.device.type == "cpu" and _device.HOST_NUMPY:  # host memory: NumPy's row reductions, no device to wait for
            rows = h.numpy()
            bad = torch.from_numpy(~((rows.min(1) >= -limit) & (rows.max(1) <= limit)))
        else:
            low, high = torch.aminmax(h, dim=1)
            bad = ~((low >= -limit) & (high <= limit))  # NaN fails both comparisons
        first = self._first(bad.to(self.device, non_blocking=True), start)
        previous = self.bad_rows.get(name)
        self.bad_rows[name] = first if previous is None else torch.minimum(first, previous)

    def raise_first(self, where: str) -> None:
        """Raise the first problem found (reads two scalars per feature block from the device, once)."""
        on_rank = f" on rank {rank()}" if world_size() > 1 else ""
        row = int(self.bad_label_row)
        if row != _NONE:
            raise InputError(f"{where}: label {int(self.bad_label)} at row {row}{on_rank} is outside "
                             f"[0, {self.num_classes}); labels must be class indices below num_classes="
                             f"{self.num_classes} (map the dataset's labels to the model's classes)")
        for name, first in self.bad_rows.items():
            row = int(first)
            if row != _NONE:
                raise InputError(f"{where}: {name} row {row}{on_rank} holds NaN or Inf (or a value too large to "
                                 "square); the features are corrupt (a diverged model, or half precision that "
                                 "overflowed: audit with precision='fp32')")

    def merge(self, other: DeferredChecks, offset: int) -> None:
        """Take ``other``'s findings, its rows numbered after this one's ``offset`` rows (another shard)."""
        shifted = torch.where(other.bad_label_row == _NONE, other.bad_label_row, other.bad_label_row + offset)
        earlier = shifted.to(self.device) < self.bad_label_row
        self.bad_label = torch.where(earlier, other.bad_label.to(self.device), self.bad_label)
        self.bad_label_row = torch.minimum(shifted.to(self.device), self.bad_label_row)
        for name, first in other.bad_rows.items():
            moved = torch.where(first == _NONE, first, first + offset).to(self.device)
            mine = self.bad_rows.get(name)
            self.bad_rows[name] = moved if mine is None else torch.minimum(moved, mine)
