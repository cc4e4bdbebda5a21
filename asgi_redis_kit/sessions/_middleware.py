"""SessionMiddleware: load before the handler, save before the response headers.

Session access is synchronous (``request.session["x"]``) but Redis is not, so a
request that presents a valid cookie has its session loaded up front (one round
trip). A request without a usable cookie costs nothing until the handler stores
something. Changes are saved when the response starts -- the last moment a
``Set-Cookie`` can still be added -- and only for statuses below 500.

Websocket connections get the session too, read-only: there is no response to
carry a cookie, so changes made there are not saved. When Redis is down, a
websocket that uses its session is closed with 1013 "Try Again Later"; one that
does not is served as usual.

Sessions fail closed: when Redis does not answer, a request that needs the session
gets a 503 with ``Retry-After`` and no ``Set-Cookie``, instead of an anonymous
session that would overwrite or fork the real one. Needing it means using it: when
the load of a cookie's session fails, the request goes on with a placeholder that
raises the 503 (:class:`~asgi_redis_kit.errors.SessionStoreUnavailable`) on first
use, so a handler that never touches ``request.session`` (a public or cached page)
is answered normally. A handler that stores something in a new session gets the
503 when its save fails.

The save at the response's start is ``_responder``'s; :meth:`SessionMiddleware.identify`
and :meth:`SessionMiddleware.handling` let a response cache around or inside the
app key per-user pages without loading the session.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from starlette.datastructures import Secret
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .._http import cookie_values
from .._redis import DEFAULT_MAX_CONNECTIONS, Backend, RedisLike, serve_with_lifespan_close
from ..errors import SESSION_STORE_UNAVAILABLE, BackendUnavailable, DuplicateMiddleware
from ..near import NearCache
from ._cookie import CookieSettings, CookieSigner, SameSite
from ._responder import Responder
from ._session import Session
from ._stats import SessionStats
from ._store import SessionStore
from ._unavailable import UnavailableSession

if TYPE_CHECKING:
    from ..metrics import Metrics

logger = logging.getLogger("asgi_redis_kit.sessions")

_MARK = "asgi_redis_kit.sessions"
_UNAVAILABLE_BODY = (SESSION_STORE_UNAVAILABLE + "\n").encode()
# Signed cookies of our name looked up per request at most (see _load).
_MAX_LOADS = 3


@dataclass(frozen=True, slots=True)
class SessionIdentity:
    """Who a request's session cookie says the visitor is, without loading the
    session: what a cache needs to key a per-user page and to prove, when it
    serves one, that the session still exists.

    Attributes:
        fingerprint: the hex SHA-256 of the session id, as ASCII bytes -- the same
            for every request of the session, and not the id (not a credential).
        record_key: the Redis key of the session's record; it exists while the
            session lives.
        backend: where that key lives.
    """

    fingerprint: bytes
    record_key: str
    backend: Backend


class SessionMiddleware:
    """Redis-backed server-side sessions in ``scope["session"]`` (``request.session``).

    Parameters:
        app: the ASGI app to wrap.
        secret_key: signs the cookie; a list (oldest first, newest last) rotates keys.
        redis: a URL (``redis://``, ``rediss://``, ``unix://``, ``memory://``) or a
            ready ``Redis``/``RedisCluster`` client (never closed by us).
        cookie_name: the cookie's name (``__Host-`` is prepended with ``host_prefix``).
        key_prefix: prefix of every Redis key; share it with :class:`SessionStore`.
        idle_timeout: seconds of inactivity after which a session ends.
        absolute_lifetime: seconds after creation when a session ends anyway;
            ``None`` for no limit.
        same_site, secure, path, domain, partitioned: cookie attributes.
            ``secure="auto"`` sets Secure on https only, so ``http://localhost`` works.
        browser_session: send the cookie without Max-Age/Expires, so the browser
            forgets it when it closes (Starlette's ``max_age=None``). The session
            still ends on the server after ``idle_timeout`` and
            ``absolute_lifetime``; that matters, as browsers that restore tabs on
            restart keep such cookies. ``clear()`` still expires the cookie.
        host_prefix: name the cookie ``__Host-<cookie_name>`` (needs Secure, path
            ``/`` and no domain).
        timeout: deadline in seconds of every Redis call.
        max_connections: pool size of a client made from a URL.
        retry_after: the ``Retry-After`` seconds sent with a 503.
        near_cache: keep loaded sessions in process memory so that a request
            which only reads its session sends no Redis command (see
            :class:`SessionStore`): ``True`` for ``NearCache.shared()``, or a
            ``NearCache``. Off by default.
        metrics: a :class:`~asgi_redis_kit.metrics.Metrics` to export the store's
            counters (``stats``) and Redis call latencies through.
        store: a ready :class:`SessionStore`, instead of ``redis``, ``key_prefix``,
            ``idle_timeout``, ``absolute_lifetime``, ``timeout``, ``max_connections``
            and ``near_cache`` (giving any of those too is an error, not a silent
            no-op).
    """

    def __init__(
        self,
        app: ASGIApp,
        /,
        *,
        secret_key: str | Secret | Sequence[str],
        redis: RedisLike = "redis://localhost:6379/0",
        cookie_name: str = "session",
        key_prefix: str = "ark:s:",
        idle_timeout: float = 14 * 24 * 3600,
        absolute_lifetime: float | None = 30 * 24 * 3600,
        same_site: SameSite = "lax",
        secure: bool | Literal["auto"] = "auto",
        path: str = "/",
        domain: str | None = None,
        partitioned: bool = False,
        host_prefix: bool = False,
        browser_session: bool = False,
        timeout: float = 1.0,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        retry_after: int = 5,
        near_cache: bool | NearCache = False,
        store: SessionStore | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.app = app
        self.signer = CookieSigner(secret_key)
        self.cookie = CookieSettings(
            cookie_name=cookie_name,
            same_site=same_site,
            secure=secure,
            path=path,
            domain=domain,
            partitioned=partitioned,
            host_prefix=host_prefix,
            browser_session=browser_session,
        )
        if idle_timeout is None:
            # Starlette's max_age=None means "until the browser closes"; a session
            # that never idles out would live in Redis forever.
            raise ValueError(
                "idle_timeout=None would keep abandoned sessions in Redis forever; for a "
                "cookie that ends when the browser closes, pass browser_session=True "
                "(the session then still ends after idle_timeout on the server)"
            )
        if isinstance(retry_after, bool) or not isinstance(retry_after, int) or retry_after < 0:
            raise ValueError(f"retry_after must be a whole number of seconds, got {retry_after!r}")
        self.retry_after = retry_after
        if store is not None:
            given = {
                "redis": redis,
                "key_prefix": key_prefix,
                "idle_timeout": idle_timeout,
                "absolute_lifetime": absolute_lifetime,
                "timeout": timeout,
                "max_connections": max_connections,
                "near_cache": near_cache,
            }
            defaults = SessionMiddleware.__init__.__kwdefaults__ or {}
            ignored = [name for name, value in given.items() if value != defaults[name]]
            if ignored:
                raise ValueError(
                    f"store= already carries the Redis settings, so {', '.join(ignored)} "
                    "would be ignored; set them on the SessionStore instead"
                )
        self.store = store or SessionStore(
            Backend(redis, timeout=timeout, max_connections=max_connections),
            key_prefix=key_prefix,
            idle_timeout=idle_timeout,
            absolute_lifetime=absolute_lifetime,
            near_cache=near_cache,
        )
        if metrics is not None:
            metrics.watch(self.store)

    def __repr__(self) -> str:
        return f"<SessionMiddleware cookie={self.cookie.name!r} {self.store!r}>"

    @property
    def stats(self) -> SessionStats:
        """The store's counters (:class:`SessionStats`), shared with ``store.stats``."""
        return self.store.stats

    @property
    def cookie_name(self) -> str:
        """The session cookie's name as sent (``__Host-`` included with ``host_prefix``)."""
        return self.cookie.name

    @staticmethod
    def handling(scope: Scope) -> SessionMiddleware | None:
        """The SessionMiddleware that marked ``scope`` (it runs, or ran, on this
        request), if any."""
        marker = scope.get(_MARK)
        return marker if isinstance(marker, SessionMiddleware) else None

    def identify(self, scope: Scope) -> SessionIdentity | None:
        """The identity in the request's session cookie, checked with this
        middleware's keys but not looked up in Redis; ``None`` without a cookie
        or with a bad signature (the middleware ignores such a cookie too).

        Only the first value of the cookie counts: a request carrying several is
        not one a cache can key on one identity (it decides those itself)."""
        values = cookie_values(scope, self.cookie.name)
        verified = self.signer.unsign(values[0]) if values else None
        if verified is None:
            return None
        session_id = verified[0]
        return SessionIdentity(
            fingerprint=hashlib.sha256(session_id.encode()).hexdigest().encode(),
            record_key=self.store.session_key(session_id),
            backend=self.store.backend,
        )

    async def aclose(self) -> None:
        """Close the Redis client if it was made from a URL (lifespan does this too)."""
        await self.store.aclose()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind not in ("http", "websocket", "lifespan"):
            await self.app(scope, receive, send)
            return
        self._mark(scope)
        if kind == "lifespan":
            await serve_with_lifespan_close(self.app, scope, receive, send, self.aclose)
            return
        try:
            session = await self._load(scope)
        except BackendUnavailable as exc:
            # The message names only the error type; Redis' own text may hold a key.
            logger.warning("session store unavailable while loading a session: %s", exc)
            # Only a request that uses its session needs Redis: the 503 waits for that.
            session = UnavailableSession(self.store, retry_after=self.retry_after)
        scope["session"] = session
        if kind == "websocket":
            # Websockets read the session; there is no response to carry a cookie,
            # so changes made there are not saved.
            await self._serve_websocket(scope, receive, send)
            return
        responder = Responder(self, scope, session, send)
        try:
            await self.app(scope, receive, responder.send)
        except BackendUnavailable as exc:
            # The session was used while Redis was down (a placeholder, or incr()).
            if responder.replaced:
                return  # a 500 for it was already turned into our 503
            if responder.started:
                raise
            logger.warning("session store unavailable during the request: %s", exc)
            await self._unavailable(send)

    async def _serve_websocket(self, scope: Scope, receive: Receive, send: Send) -> None:
        session: Session = scope["session"]
        # Starlette answers our SessionStoreUnavailable (an HTTPException) with a
        # 503 denial response, which is only valid before accept and on servers with
        # the extension; anywhere else the socket is closed with 1013 "Try Again
        # Later" instead (before accept the server answers that with a 403).
        can_deny = "websocket.http.response" in scope.get("extensions", {})
        accepted = closed = False

        async def watch(message: Message) -> None:
            nonlocal accepted, closed
            kind = message["type"]
            denial = kind.startswith("websocket.http.response.")
            if denial and session._store_failed and (accepted or not can_deny):
                if not closed:
                    closed = True
                    self.store.stats.websocket_closes += 1
                    await send({"type": "websocket.close", "code": 1013})
                return
            if kind == "websocket.http.response.start" and session._store_failed:
                self.store.stats.unavailable += 1  # the 503 denial of a session-less socket
            accepted = accepted or kind == "websocket.accept"
            closed = closed or kind == "websocket.close" or denial
            await send(message)

        async def listen() -> Message:
            nonlocal closed
            message = await receive()
            # A client that left needs no close, and its server would refuse one.
            closed = closed or message["type"] == "websocket.disconnect"
            return message

        try:
            await self.app(scope, listen, watch)
        except BackendUnavailable as exc:
            if not session._store_failed:
                raise  # not the session's: another Redis user in the handler failed
            # The session was used while Redis was down, and nothing answered it.
            logger.warning("session store unavailable during a websocket: %s", exc)
            if not closed:
                self.store.stats.websocket_closes += 1
                await send({"type": "websocket.close", "code": 1013})

    def _mark(self, scope: Scope) -> None:
        marker = scope.get(_MARK)
        if marker is self:
            # The same middleware sees a scope it marked before: a copy of a finished
            # request's scope replayed (e.g. a cache refreshing a stale entry), not a
            # second SessionMiddleware. Load afresh.
            scope.pop("session", None)
            return
        if marker is not None:
            raise DuplicateMiddleware(
                "SessionMiddleware runs twice on the same request. It is probably added "
                "both with app.add_middleware(SessionMiddleware, ...) and in "
                "middleware=[Middleware(SessionMiddleware, ...)], or by a mounted "
                "sub-application as well; keep one."
            )
        if "session" in scope:
            raise DuplicateMiddleware(
                "another session middleware already set scope['session'] (for example "
                "starlette.middleware.sessions.SessionMiddleware); use only one"
            )
        scope[_MARK] = self

    async def _load(self, scope: Scope) -> Session:
        """The request's session; touches Redis only for a correctly signed id.

        Browsers send several cookies of one name when older ones have another Path
        or Domain, in no order we control: a signed one whose session ended must
        not hide a live one after it. At most ``_MAX_LOADS`` are looked up, so a
        request stuffed with signed cookies cannot multiply the Redis work.
        """
        presented = False
        loads = 0
        for value in cookie_values(scope, self.cookie.name):
            verified = self.signer.unsign(value)
            if verified is None:
                continue
            if loads == _MAX_LOADS:
                break
            loads += 1
            session_id, resign = verified
            record = await self.store.load(session_id)
            if record is None:
                self.store.stats.not_found += 1
                presented = True
                continue
            self.store.stats.loaded += 1
            return Session(
                self.store,
                session_id=session_id,
                record=record,
                resign=resign,
                retry_after=self.retry_after,
            )
        # Strict mode: an unknown id is never adopted; a save gets a fresh one. No
        # Set-Cookie otherwise: such a cookie may be older than one the browser has
        # just received (a login answered meanwhile).
        return Session(self.store, presented=presented, retry_after=self.retry_after)

    async def _unavailable(self, send: Send) -> None:
        self.store.stats.unavailable += 1
        await send(
            {
                "type": "http.response.start",
                "status": 503,
                "headers": [
                    (b"content-type", b"text/plain; charset=utf-8"),
                    (b"content-length", str(len(_UNAVAILABLE_BODY)).encode()),
                    (b"retry-after", str(self.retry_after).encode()),
                    (b"cache-control", b"no-store"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": _UNAVAILABLE_BODY})
