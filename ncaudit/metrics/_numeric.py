"""float64 constants and the block size shared by every blocked loop over classes."""

from __future__ import annotations

import numpy as np

EPS = float(np.finfo(np.float64).eps)
TINY = float(np.finfo(np.float64).tiny)
#: Working memory of one block of the blocked metrics: a (block, width) slab of float64 (a few such slabs are alive).
PAIR_BLOCK_BYTES = 64 * 2**20


def block_rows(width: int, budget: int = PAIR_BLOCK_BYTES) -> int:
    """Rows of a float64 (rows, width) block that fit ``budget`` bytes (at least one)."""
    return max(1, budget // (8 * max(width, 1)))
