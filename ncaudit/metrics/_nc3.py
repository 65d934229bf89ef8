"""NC3: self-duality of the classifier and the centred class means."""

from __future__ import annotations

import math

import numpy as np


# ---------------------------------------------------------------------------------------------------------------------
# NC3: self-duality
# ---------------------------------------------------------------------------------------------------------------------
def nc3(weight: np.ndarray, centred_means: np.ndarray) -> float:
    """NC3 = || W^T / ||W||_F - M / ||M||_F ||_F^2, with W (C, p) and ``centred_means`` = M^T (C, p)."""
    wn, mn = np.linalg.norm(weight), np.linalg.norm(centred_means)
    if wn == 0 or mn == 0:
        return math.nan
    return float(np.sum((weight / wn - centred_means / mn) ** 2))
