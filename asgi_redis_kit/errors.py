"""Errors raised by asgi_redis_kit.

Every error the library raises on purpose derives from one base, so
``except AsgiRedisKitError`` catches all of them::

    AsgiRedisKitError
    ├── BackendUnavailable        Redis did not answer in time or refused the command
    │   └── SessionStoreUnavailable  the request used its session and Redis failed:
    │                                a 503 with Retry-After (also a SessionError and
    │                                a Starlette HTTPException(503))
    ├── DuplicateMiddleware       the same middleware applied twice to one app
    ├── SessionError
    │   ├── SessionNotLoaded      ``request.session`` used without SessionMiddleware
    │   ├── CookieTooLarge        the Set-Cookie header would exceed 4096 bytes
    │   └── SessionStoreUnavailable  (the same class as above)
    └── CacheError
        └── CacheNotConfigured    ``@cached`` used without CacheMiddleware

Configuration mistakes are plain ``ValueError``/``TypeError`` raised from
``__init__``, as Python users expect.
"""

from __future__ import annotations

from starlette.exceptions import HTTPException

# The detail of SessionStoreUnavailable and the body of SessionMiddleware's own 503.
SESSION_STORE_UNAVAILABLE = "Service unavailable: the session store did not answer. Retry shortly."


class AsgiRedisKitError(Exception):
    """Base class of every error raised by asgi_redis_kit."""


class BackendUnavailable(AsgiRedisKitError):
    """Redis could not be reached or did not answer within the deadline.

    Sessions turn it into a 503 with ``Retry-After`` (fail closed); the cache
    runs the handler as if nothing were cached (fail open).
    """


class SessionError(AsgiRedisKitError):
    """Base class of session errors."""


class SessionNotLoaded(SessionError):
    """The session was used on a request that SessionMiddleware did not handle."""


class CookieTooLarge(SessionError):
    """The session cookie would not fit in the 4096 bytes browsers accept."""


class SessionStoreUnavailable(BackendUnavailable, SessionError, HTTPException):
    """The request used its session (read, write, ``incr``...) and Redis failed.

    Also an ``HTTPException(503)`` with ``Retry-After``, so Starlette and FastAPI
    answer 503 even when their ServerErrorMiddleware sits outside SessionMiddleware
    and would otherwise turn it into a 500; apps without exception handlers still
    get the 503 from SessionMiddleware, which catches BackendUnavailable.

    Parameters:
        retry_after: seconds for the ``Retry-After`` header.
    """

    def __init__(self, retry_after: int = 5) -> None:
        HTTPException.__init__(
            self, 503, SESSION_STORE_UNAVAILABLE, {"Retry-After": str(retry_after)}
        )


class CacheError(AsgiRedisKitError):
    """Base class of response-cache errors."""


class CacheNotConfigured(CacheError):
    """``@cached`` ran on a request that CacheMiddleware did not handle."""


class DuplicateMiddleware(AsgiRedisKitError):
    """A middleware of this library was added twice around the same app."""
