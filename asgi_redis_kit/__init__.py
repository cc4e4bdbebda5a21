"""Redis-backed sessions and a response cache for Starlette and FastAPI."""

from __future__ import annotations

from .errors import (
    AsgiRedisKitError,
    BackendUnavailable,
    CacheError,
    CacheNotConfigured,
    CookieTooLarge,
    DuplicateMiddleware,
    SessionError,
    SessionNotLoaded,
)

__version__ = "0.1.0"

__all__ = [
    "AsgiRedisKitError",
    "BackendUnavailable",
    "CacheError",
    "CacheNotConfigured",
    "CookieTooLarge",
    "DuplicateMiddleware",
    "SessionError",
    "SessionNotLoaded",
    "__version__",
]
