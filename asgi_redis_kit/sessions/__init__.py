"""Server-side sessions in Redis: the middleware, the session mapping and the store."""

from __future__ import annotations

from ._middleware import SessionMiddleware
from ._session import Session
from ._store import SessionInfo, SessionStore

__all__ = ["Session", "SessionInfo", "SessionMiddleware", "SessionStore"]
