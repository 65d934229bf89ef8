"""Which way each metric improves: the one table that ``compare`` judges a change by.

A new metric key needs a row here (``tests/test_compare.py`` fails on a key without one). ``"lower"``: the collapsed
or better value is smaller (every "→ 0" metric, losses); ``"higher"``: larger is better (accuracies, the cosine to the
least-squares classifier, "→ 1"); None: a property of the extraction, neither better nor worse.
"""

from __future__ import annotations

import math
from typing import Literal

Direction = Literal["lower", "higher"] | None

#: metric key -> the direction in which it improves.
DIRECTIONS: dict[str, Direction] = {
    "nc1": "lower",
    "cdnv": "lower",
    "nc1_precision_floor": None,  # the NC1 that rounding alone gives: a property of the extraction's precision
    "nc2_equinorm_means": "lower",
    "nc2_equinorm_classifier": "lower",
    "nc2_equiangle_means": "lower",
    "nc2_equiangle_classifier": "lower",
    "nc2_maxangle_means": "lower",
    "nc2_maxangle_classifier": "lower",
    "nc2_orthogonality_means": "lower",
    "nc2_orthogonality_classifier": "lower",
    "nc3": "lower",
    "nc4": "lower",
    "accuracy": "higher",
    "ncc_accuracy": "higher",
    "mse_loss": "lower",
    "mse_term_a": "lower",
    "mse_term_b": "lower",
    "ls_distance": "lower",
    "ls_cosine": "higher",
}


def verdict(key: str, a: float | None, b: float | None, margin: float = 0.0) -> str:
    """How ``b`` stands against ``a`` for metric ``key``: ``better``, ``worse``, ``same`` (the change lies within
    ``margin``, the two values' combined uncertainty), ``changed`` (a metric without a direction) or ``n/a`` (a
    value missing). A key without a row in :data:`DIRECTIONS` (a newer report's) has no direction."""
    direction = DIRECTIONS.get(key)
    if a is None or b is None or not (math.isfinite(a) and math.isfinite(b)):
        return "n/a"
    change = b - a
    if change == 0 or abs(change) <= margin:
        return "same"
    if direction is None:
        return "changed"
    return "better" if (change < 0) == (direction == "lower") else "worse"
