"""The cache's schema constants and how Python values are stored as (and read from) HDF5 attributes; the
one-line text of an HDF5 or OS error."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from typing import Any

import numpy as np

SCHEMA_VERSION = 1
FEATURE_DTYPES = ("float16", "float32", "float64")
DEFAULT_CHUNK_ROWS = 256
#: The provenance attributes that make two files pieces of one extraction: the same checkpoint, data (its
#: fingerprint), transform and options. ``extract --resume`` continues a file only when they match; a joined cache
#: reads a shard only when they match the joined file's.
RUN_KEYS = ("model", "weights", "seed", "checkpoint_sha256", "ema", "dataset", "split", "data_fingerprint",
            "transform", "precision", "layers")


def attr_value(value: Any) -> Any:
    """HDF5 attribute -> plain, JSON-able Python: bytes to str, numpy scalars and arrays to Python scalars and lists
    (JSON strings kept as str), anything else (compound, reference or opaque data) to its text."""
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    if isinstance(value, np.ndarray):
        return [attr_value(v) for v in value.tolist()]
    if isinstance(value, np.generic):
        return attr_value(value.item())
    if isinstance(value, (list, tuple)):
        return [attr_value(v) for v in value]
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    return str(value)


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _reason(exc: BaseException) -> str:
    """The OS reason of an HDF5 / OS error ("No space left on device"), else its first line."""
    code = exc.errno if isinstance(exc, OSError) and exc.errno else None
    if code is None and (match := re.search(r"errno = (\d+)", str(exc))):
        code = int(match.group(1))
    return os.strerror(code) if code else _short(exc)


# ---------------------------------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------------------------------
def encode_attr(value: Any) -> Any:
    """A Python value as an HDF5 attribute: None as "", dicts and lists as sorted JSON strings."""
    if value is None:
        return ""
    if isinstance(value, (Mapping, list, tuple)):
        return json.dumps(value, sort_keys=True, default=str)
    return value
