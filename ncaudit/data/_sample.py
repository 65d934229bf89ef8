"""``--limit N``: a class-stratified, seeded sample of a dataset's rows."""

from __future__ import annotations

import numpy as np

#: The seed of every ``--limit`` sample: the same rows on every run and for every checkpoint.
LIMIT_SEED = 0


def stratified_order(labels: np.ndarray, seed: int = LIMIT_SEED) -> np.ndarray:
    """Every row index once, in the order ``--limit`` takes them: ``--limit N`` keeps the first N.

    First one row of each class, the classes in a random order; then the other rows interleaved in proportion to
    the sizes of their classes: the row of in-class rank k >= 1 of a class of n_c rows comes at the fraction
    (k + 1/2) / n_c of the order (ranks drawn at random within each class, ties between classes broken by a random
    priority). So the first N rows hold every class when N is at least the number of classes C, and each class about
    N n_c / N_total of them (within one row); fewer than C rows hold that many classes, one row each. A larger N
    keeps the rows of a smaller one (so ``--resume`` can extend a sample). The order depends on the labels and
    ``seed`` only.

    Parameters
    ----------
    labels : ndarray of shape (N_total,)
        Class of each row (any integers).
    seed : int
        Seed of the draw (``numpy.random.default_rng``).

    Returns
    -------
    ndarray of shape (N_total,), int64
        A permutation of the row indices.
    """
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    _, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    shuffled = rng.permutation(len(labels))
    grouped = shuffled[np.argsort(inverse[shuffled], kind="stable")]  # rows by class, in random order within each
    starts = np.repeat(np.cumsum(counts) - counts, counts)
    rank = np.empty(len(labels), dtype=np.int64)
    rank[grouped] = np.arange(len(labels)) - starts
    priority = rng.permutation(len(counts))[inverse]
    position = (rank + 0.5) / counts[inverse]
    return np.lexsort((priority, position, rank > 0)).astype(np.int64)
