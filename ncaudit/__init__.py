"""ncaudit: audit trained image classifiers for Neural Collapse.

The public surface is small and importable from here:

- the HDF5 feature cache (schema 1): :class:`FeatureCache` reads one, :class:`CacheWriter` and :func:`write_cache`
  write one, :func:`join_shards` joins the shards of a distributed extraction;
- the streaming statistics accumulator :class:`ClassStatistics` (``update`` / ``merge`` / ``compute``) and the
  :class:`Statistics` it computes;
- the audit of a cache, :func:`audit_cache` with :class:`AuditOptions`, and its :class:`AuditResult`
  (:func:`result_to_json` gives the JSON report);
- the errors :class:`InputError` (bad input: the command line exits 2) and :class:`CacheWriteError`.

The stages live in subpackages (``ncaudit.data``, ``ncaudit.models``, ``ncaudit.extract``, ``ncaudit.cache``,
``ncaudit.stats``, ``ncaudit.metrics``, ``ncaudit.audit``, ``ncaudit.report``, ``ncaudit.cli``); see
``docs/architecture.md``. The names above are imported on first use, so ``import ncaudit`` (and ``ncaudit --help``)
loads neither torch nor h5py.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.2.0"

#: Public name -> (subpackage, name there).
_EXPORTS: dict[str, tuple[str, str]] = {
    "CacheInfo": ("ncaudit.cache", "CacheInfo"),
    "CacheWriter": ("ncaudit.cache", "CacheWriter"),
    "FeatureCache": ("ncaudit.cache", "FeatureCache"),
    "join_shards": ("ncaudit.cache", "join_shards"),
    "write_cache": ("ncaudit.cache", "write_cache"),
    "ClassStatistics": ("ncaudit.stats", "ClassStatistics"),
    "Statistics": ("ncaudit.stats", "Statistics"),
    "AuditOptions": ("ncaudit.audit", "AuditOptions"),
    "AuditResult": ("ncaudit.audit", "AuditResult"),
    "audit_cache": ("ncaudit.audit", "audit"),
    "result_to_json": ("ncaudit.audit", "result_to_json"),
    "CacheWriteError": ("ncaudit.errors", "CacheWriteError"),
    "InputError": ("ncaudit.errors", "InputError"),
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    try:
        module, attr = _EXPORTS[name]
    except KeyError:
        raise AttributeError(f"module 'ncaudit' has no attribute {name!r}") from None
    value = getattr(importlib.import_module(module), attr)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})


if TYPE_CHECKING:  # the names of _EXPORTS for type checkers (re-exported: `X as X`)
    from ncaudit.audit import AuditOptions as AuditOptions
    from ncaudit.audit import AuditResult as AuditResult
    from ncaudit.audit import audit as audit_cache  # noqa: F401
    from ncaudit.audit import result_to_json as result_to_json
    from ncaudit.cache import CacheInfo as CacheInfo
    from ncaudit.cache import CacheWriter as CacheWriter
    from ncaudit.cache import FeatureCache as FeatureCache
    from ncaudit.cache import join_shards as join_shards
    from ncaudit.cache import write_cache as write_cache
    from ncaudit.errors import CacheWriteError as CacheWriteError
    from ncaudit.errors import InputError as InputError
    from ncaudit.stats import ClassStatistics as ClassStatistics
    from ncaudit.stats import Statistics as Statistics
