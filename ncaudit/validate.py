"""Input validation: every check on user data lives here and raises :class:`~ncaudit.errors.InputError`.

Each message names the problem and the fix in one line; the CLI prints it and exits with code 2.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from ncaudit.errors import InputError


def check_labels(labels: torch.Tensor, num_classes: int, start: int, where: str) -> None:
    """Labels must lie in [0, C)."""
    if labels.numel() == 0:
        return
    lo, hi = int(labels.min()), int(labels.max())
    if lo < 0 or hi >= num_classes:
        bad = int(((labels < 0) | (labels >= num_classes)).nonzero()[0, 0])
        value = int(labels[bad])
        raise InputError(f"{where}: label {value} at row {start + bad} is outside [0, {num_classes}); labels must be "
                         f"class indices below num_classes={num_classes} (fix the labels or the num_classes attribute)")


def check_finite(features: torch.Tensor, start: int, where: str, name: str = "/features") -> None:
    """No NaN or Inf in a batch of features (one cheap row-sum test, then the first bad row is located)."""
    if features.numel() == 0:
        return
    if bool(torch.isfinite(features.sum(dim=1)).all()):
        return
    bad_rows = (~torch.isfinite(features)).any(dim=1).nonzero()
    if bad_rows.numel() == 0:  # the row sum overflowed, the values themselves are finite
        return
    row = int(bad_rows[0, 0])
    raise InputError(f"{where}: {name} row {start + row} holds NaN or Inf; the features are corrupt (re-extract them, "
                     "e.g. with --precision fp32 if half precision overflowed)")


def check_classifier(weight: np.ndarray, bias: np.ndarray | None, where: str) -> None:
    """The classifier must be finite."""
    if not np.isfinite(weight).all():
        raise InputError(f"{where}: /classifier/weight holds NaN or Inf; store the final layer's trained weights")
    if bias is not None and not np.isfinite(bias).all():
        raise InputError(f"{where}: /classifier/bias holds NaN or Inf; store the final layer's trained bias")


def classes_to_keep(counts: np.ndarray, drop_empty: bool, where: str, names: Sequence[str] | None = None) -> np.ndarray:
    """Indices of the classes to audit: all of them, or (with ``drop_empty``) those with samples.

    An empty class is an input error unless the user drops empty classes explicitly; at least 2 classes must remain.
    """
    empty = np.flatnonzero(counts == 0)
    if empty.size and not drop_empty:
        shown = ", ".join(_label(int(c), names) for c in empty[:10]) + (", ..." if empty.size > 10 else "")
        raise InputError(f"{where}: {empty.size} class(es) have no samples ({shown}); pass --drop-empty-classes to "
                         "audit the remaining classes without them")
    keep = np.flatnonzero(counts > 0)
    if keep.size < 2:
        raise InputError(f"{where}: only {keep.size} class(es) have samples; neural-collapse metrics need at least 2")
    return keep


def _label(c: int, names: Sequence[str] | None) -> str:
    return f"{c} ({names[c]})" if names is not None and c < len(names) else str(c)
