"""Response cache: ``@cached`` marks endpoints, CacheMiddleware serves and stores.

See ``_keys`` for how keys are built, ``_policy`` for what is (never) stored,
``_entry`` for the stored format, ``_lock`` for stampede protection and
``_breaker`` for failing open.
"""

from __future__ import annotations

from ._cache import Cache
from ._decorator import RouteCache, cached
from ._middleware import CacheMiddleware, get_cache
from ._policy import DEFAULT_CACHEABLE_STATUSES
from ._stats import CacheStats

__all__ = [
    "DEFAULT_CACHEABLE_STATUSES",
    "Cache",
    "CacheMiddleware",
    "CacheStats",
    "RouteCache",
    "cached",
    "get_cache",
]
