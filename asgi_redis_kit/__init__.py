"""Redis-backed sessions and a response cache for Starlette and FastAPI."""

from __future__ import annotations

from .cache import (
    Cache,
    CacheMiddleware,
    CacheStats,
    JsonSerializer,
    Memoized,
    PydanticSerializer,
    Serializer,
    cached,
    get_cache,
)
from .errors import (
    AsgiRedisKitError,
    BackendUnavailable,
    CacheError,
    CacheNotConfigured,
    CookieTooLarge,
    DuplicateMiddleware,
    SessionError,
    SessionNotLoaded,
    SessionStoreUnavailable,
)
from .metrics import FleetFlusher, Metrics, fleet_stats
from .near import NearCache, NearStats
from .sessions import Session, SessionInfo, SessionMiddleware, SessionStats, SessionStore

__version__ = "0.1.0"

__all__ = [
    "AsgiRedisKitError",
    "BackendUnavailable",
    "Cache",
    "CacheError",
    "CacheMiddleware",
    "CacheNotConfigured",
    "CacheStats",
    "CookieTooLarge",
    "DuplicateMiddleware",
    "FleetFlusher",
    "JsonSerializer",
    "Memoized",
    "Metrics",
    "NearCache",
    "NearStats",
    "PydanticSerializer",
    "Serializer",
    "Session",
    "SessionError",
    "SessionInfo",
    "SessionMiddleware",
    "SessionNotLoaded",
    "SessionStats",
    "SessionStore",
    "SessionStoreUnavailable",
    "__version__",
    "cached",
    "fleet_stats",
    "get_cache",
]
