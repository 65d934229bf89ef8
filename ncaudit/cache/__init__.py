"""The HDF5 feature cache, schema 1: the reader, the verified writer, the writer lock and shard joining.

``FeatureCache`` reads a cache in batches (checked before a row is read), ``CacheWriter`` writes one resumably and
``write_cache`` writes features computed elsewhere from arrays; ``join_shards`` joins the shard files of a distributed
extraction into one cache.
"""

from ncaudit.cache._format import SCHEMA_VERSION
from ncaudit.cache._join import join_shards
from ncaudit.cache._lock import WriterLock
from ncaudit.cache._reader import CacheInfo, FeatureCache
from ncaudit.cache._writer import CacheWriter, write_cache

__all__ = ["SCHEMA_VERSION", "CacheInfo", "CacheWriter", "FeatureCache", "WriterLock", "join_shards", "write_cache"]
