"""Extraction: a model's penultimate features, labels, logits and (W, b) over a dataset, into a feature cache.

:func:`extract` is the whole job (``ncaudit extract``): the one-process path (``_single``) streams batches through the
network to a writer thread; under torchrun, or to continue a sharded run, each rank writes its own shard and rank 0
joins them (``_sharded``).
"""

from ncaudit.extract._extract import ExtractSummary, extract
from ncaudit.extract._resume import left_behind
from ncaudit.extract._runtime import PRECISIONS, STORE_DTYPES, autocast_context, available_cores, resolve_precision

__all__ = ["ExtractSummary", "PRECISIONS", "STORE_DTYPES", "autocast_context", "available_cores", "extract",
           "left_behind", "resolve_precision"]
