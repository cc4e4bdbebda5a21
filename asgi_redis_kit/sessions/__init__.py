"""Server-side sessions in Redis: the middleware, the session mapping and the store.

::

    app = Starlette(routes=..., middleware=[
        Middleware(SessionMiddleware, secret_key=[old_key, new_key], redis="redis://..."),
    ])

    async def login(request):
        session = Session.of(request)      # request.session, typed as Session
        session.regenerate()               # new id at save time: no fixation
        session.bind_user(user.id)         # listed by store.user_sessions()
        await session.incr("logins")       # atomic, concurrent-safe, committed at once

Changes are saved as the response starts, and not at all when the handler raises
or answers 5xx -- except ``incr()`` on a stored session, which is one atomic Redis
command applied when it is awaited and is not rolled back on error.

    await SessionStore("redis://...").revoke_user(user.id)   # log out everywhere

Module map: ``_middleware`` (load/save around the app, 503 on outages),
``_session`` (the dict and its save plan), ``_store`` (load, save, replace and the
protocol that keeps revokes ahead of requests), ``_index`` (the per-user index and
revoking), ``_scripts`` (the Lua), ``_record`` (keys and fields of a record),
``_base`` (round trips), ``_cookie`` (signing and ``Set-Cookie``).
"""

from __future__ import annotations

from ..errors import SessionStoreUnavailable
from ._index import SessionInfo
from ._middleware import SessionIdentity, SessionMiddleware
from ._session import Session
from ._stats import SessionStats
from ._store import SessionStore

__all__ = [
    "Session",
    "SessionIdentity",
    "SessionInfo",
    "SessionMiddleware",
    "SessionStats",
    "SessionStore",
    "SessionStoreUnavailable",
]
