"""Response cache: ``@cached`` marks endpoints, CacheMiddleware serves and stores.

Module map, in the order a request meets them: ``_middleware`` (the ASGI
entry point; ``_discovery`` finds the router and session middleware),
``_exchange`` (the per-request flow), ``_policy`` and ``_session_rules`` (what
bypasses the cache and what is never stored), ``_request`` and ``_keys`` (how
a request is read and keyed), ``_cache`` (the public Cache API and shared
lookups), ``_storage`` (the storage layers' interface), ``_near_layer``
(lookups from process memory, ``near_cache=``) and ``_redis_layer``
(every Redis command; ``_scripts`` its Lua), ``_outcome`` (what a lookup
found), ``_respond`` (run the app, store, serve), ``_entry`` (the stored
format), ``_lock`` (single flight), ``_breaker`` (failing open), ``_stats``.
The data cache: ``_values`` (``Cache.get``/``set``/``incr``...), ``_memo``
(``@cache.memoize``), ``_serializers``.
"""

from __future__ import annotations

from ._cache import Cache
from ._decorator import RouteCache, cached
from ._memo import Memoized
from ._middleware import CacheMiddleware, get_cache
from ._policy import DEFAULT_CACHEABLE_STATUSES
from ._serializers import JsonSerializer, PydanticSerializer, Serializer
from ._stats import CacheStats
from ._values import MAX_KEY_LENGTH

__all__ = [
    "DEFAULT_CACHEABLE_STATUSES",
    "MAX_KEY_LENGTH",
    "Cache",
    "CacheMiddleware",
    "CacheStats",
    "JsonSerializer",
    "Memoized",
    "PydanticSerializer",
    "RouteCache",
    "Serializer",
    "cached",
    "get_cache",
]
