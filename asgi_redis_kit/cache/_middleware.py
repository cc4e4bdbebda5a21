"""CacheMiddleware: the ASGI entry point of the response cache. It owns the
configuration (and the :class:`Cache` it makes), finds once what it needs in
the app (the Router, the SessionMiddleware and its cookie, a proxy-headers
middleware inside it: ``_discovery``), and per HTTP request resolves the
route: no ``@cached`` route, the request passes through untouched; else an
``_exchange.Exchange`` runs the request. HEAD is resolved as GET.

Which module decides each step of a request:

1. route: ``_discovery.match_route`` (Starlette's own ``Route.matches``
   through ``Mount``/``Host``), options from ``_decorator``;
2. request rules: ``_policy.request_bypass_reason``, the host check in
   ``_request.canonical_host``, the session rules in ``_session_rules``;
3. key: ``_keys`` (from what ``_request`` reads);
4. lookup through the storage layers: ``Cache.lookup`` (``_cache``, shared by
   concurrent requests) over ``cache.storage`` (``_storage``; Redis:
   ``_redis_layer``);
5. outcome: ``_outcome.classify`` (fresh / stale / absent / session gone);
6. serve or fill: ``_exchange`` (the flow: lead, follow, wait, refresh),
   ``_respond`` (run the app, store, serve), ``_lock`` (single flight).

Per-request state lives in the Exchange, never on the middleware.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.routing import Router
from starlette.types import ASGIApp, Receive, Scope, Send

from .._redis import Backend, RedisLike, serve_with_lifespan_close
from ..errors import CacheNotConfigured, DuplicateMiddleware
from ..near import NearCache
from ..sessions import SessionMiddleware
from ._cache import Cache
from ._decorator import RequestState, RouteCache, current, route_config
from ._discovery import find_proxy_middleware, find_router, find_sessions, match_route
from ._exchange import Exchange
from ._session_rules import SessionWarnings

if TYPE_CHECKING:
    from ..metrics import Metrics

logger = logging.getLogger("asgi_redis_kit.cache")

SCOPE_KEY = "asgi_redis_kit.cache"


class _Unset(enum.Enum):
    """The default of CacheMiddleware options: tells "not given" from any value."""

    UNSET = "unset"


_UNSET = _Unset.UNSET


class CacheMiddleware:
    """Response cache for ``@cached`` endpoints. Pure ASGI; owns its :class:`Cache`.

    Put it outside SessionMiddleware so hits are served before the session loads::

        app.add_middleware(SessionMiddleware, secret_key=...)
        app.add_middleware(CacheMiddleware, redis="redis://localhost:6379/0")

    Parameters:
        app: the ASGI app.
        cache: an existing :class:`Cache` to use instead of making one. It keeps
            its own settings: giving any option below with it is a ``ValueError``.
            :meth:`aclose` leaves it open (lifespan shutdown still closes it).
        redis, key_prefix, namespace, timeout, max_connections, allowed_hosts,
        cacheable_statuses, breaker_threshold, breaker_cooldown, lock_lease,
        lock_wait, max_lifetime, clock, near_cache: see :class:`Cache`.
        session_cookie: leave it ``None``: the name is learned on the first
            request from the SessionMiddleware in the app, ours or Starlette's
            (inside or outside this middleware), and is ``"session"`` without
            one. Set it when a middleware hides the session middleware (keeps
            its inner app elsewhere than ``.app``): a warning then names it. A name that
            contradicts that SessionMiddleware raises ``ValueError``.
        metrics: a :class:`~asgi_redis_kit.metrics.Metrics` to export the cache's
            counters (``stats``), breaker state and Redis latencies through.
    """

    def __init__(
        self,
        app: ASGIApp,
        /,
        *,
        redis: RedisLike | _Unset = _UNSET,
        key_prefix: str | _Unset = _UNSET,
        namespace: str | _Unset = _UNSET,
        cache: Cache | None = None,
        timeout: float | _Unset = _UNSET,
        max_connections: int | _Unset = _UNSET,
        allowed_hosts: Sequence[str] | _Unset | None = _UNSET,
        cacheable_statuses: Iterable[int] | _Unset = _UNSET,
        session_cookie: str | _Unset | None = _UNSET,
        breaker_threshold: int | _Unset = _UNSET,
        breaker_cooldown: float | _Unset = _UNSET,
        lock_lease: float | _Unset = _UNSET,
        lock_wait: float | _Unset = _UNSET,
        max_lifetime: float | _Unset = _UNSET,
        clock: Callable[[], float] | _Unset = _UNSET,
        near_cache: bool | NearCache | _Unset = _UNSET,
        metrics: Metrics | None = None,
    ) -> None:
        # Explicit keywords (not **options) so mypy can check
        # Middleware(CacheMiddleware, ...) calls against them; the defaults are
        # Cache's, which alone knows them.
        given: dict[str, Any] = {
            name: value
            for name, value in (
                ("redis", redis),
                ("key_prefix", key_prefix),
                ("namespace", namespace),
                ("timeout", timeout),
                ("max_connections", max_connections),
                ("allowed_hosts", allowed_hosts),
                ("cacheable_statuses", cacheable_statuses),
                ("session_cookie", session_cookie),
                ("breaker_threshold", breaker_threshold),
                ("breaker_cooldown", breaker_cooldown),
                ("lock_lease", lock_lease),
                ("lock_wait", lock_wait),
                ("max_lifetime", max_lifetime),
                ("clock", clock),
                ("near_cache", near_cache),
            )
            if value is not _UNSET
        }
        if cache is not None and given:
            raise ValueError(
                f"CacheMiddleware(cache=...) uses that Cache's own settings, so "
                f"{', '.join(sorted(given))} would be ignored; pass them to Cache(...) "
                "instead, or drop cache="
            )
        # A Cache we make is ours to close (aclose); one passed in stays the caller's.
        self._owns_cache = cache is None
        self.cache = cache if cache is not None else Cache(**given)
        if metrics is not None:
            metrics.watch(self.cache)
        self.app = app
        self._router: Router | None = None
        self._warned = False
        # Learned on the first request (the middleware stack exists by then).
        self._sessions_found = False
        self.sessions: SessionMiddleware | None = None
        self._cookie_name = "session"
        self._config_error: ValueError | None = None
        self.session_warnings = SessionWarnings()
        # The session store's backend last seen, and where its sessions are proven.
        self._proof_on: tuple[Backend, Backend | None] | None = None
        # A proxy-headers middleware inside us (found on the first request).
        self._proxy_checked = False
        self.inner_proxy: object | None = None

    async def aclose(self) -> None:
        """Close the Cache this middleware made (its background refreshes and
        the Redis client it made from a URL); a ``cache=`` passed in stays open.
        Lifespan shutdown does this too."""
        if self._owns_cache:
            await self.cache.aclose()

    def _find_sessions(self, scope: Scope) -> None:
        """Learn the session cookie's name from our SessionMiddleware in the app.

        An explicit ``session_cookie`` that contradicts it fails every request:
        keying on a cookie the sessions do not use serves one user's
        ``vary_on_session`` page to another, and silently picking one of two
        contradicting settings hides a configuration the user got wrong."""
        self._sessions_found = True
        found = find_sessions(self.app, scope)
        explicit = self.cache.session_cookie
        if found is None:
            self._cookie_name = explicit or "session"
            return
        if isinstance(found, SessionMiddleware):
            self.sessions = found
            actual = found.cookie_name
        else:
            # Starlette's: its cookie is the whole signed session, keyed as it is.
            actual = found.session_cookie
        self._cookie_name = actual
        if explicit is not None and explicit != actual:
            self._config_error = ValueError(
                f"CacheMiddleware(session_cookie={explicit!r}) does not match the cookie "
                f"{actual!r} of the SessionMiddleware in this app; drop session_cookie= "
                "(the cache learns the name from SessionMiddleware) or set it to "
                f"{actual!r}"
            )

    def _find_proxy(self) -> None:
        self._proxy_checked = True
        self.inner_proxy = find_proxy_middleware(self.app)
        if self.inner_proxy is not None:
            logger.warning(
                "%s runs inside CacheMiddleware: it rewrites the scheme, client or host "
                "after the cache keyed the request, and honours forwarding headers only "
                "from trusted proxies, which no key can tell apart. Requests carrying a "
                "forwarding header (X-Forwarded-Proto, X-Forwarded-Host, Forwarded, ...) "
                "now bypass the cache. Add the proxy-headers middleware outside "
                "CacheMiddleware (or let the server apply it, e.g. uvicorn "
                "--proxy-headers --forwarded-allow-ips=...).",
                type(self.inner_proxy).__name__,
            )

    def proof_backend(self, backend: Backend) -> Backend | None:
        """Where a ``vary_on_session`` lookup proves a session of ``backend``
        still exists: None when that is the cache's own server (the proof then
        rides in the lookup's round trip), else ``backend`` itself."""
        if self._proof_on is None or self._proof_on[0] is not backend:
            same = self.cache.redis_layer.shares_server(backend)
            self._proof_on = (backend, None if same else backend)
        return self._proof_on[1]

    def cookie_name(self, scope: Scope) -> str:
        """The session cookie's name (found on the first request)."""
        if not self._sessions_found:
            self._find_sessions(scope)
        if self._config_error is not None:
            raise self._config_error
        return self._cookie_name

    def _find_router(self, scope: Scope) -> Router | None:
        if self._router is None:
            # Found once: Starlette builds its middleware stack on the first request,
            # and the router object never changes afterwards.
            self._router = find_router(self.app)
        if self._router is not None:
            return self._router
        # A middleware between us and the router that hides its ``.app``: fall back
        # to the application Starlette/FastAPI put in the scope before running its
        # middleware stack (we are inside that stack).
        router = getattr(scope.get("app"), "router", None)
        if isinstance(router, Router):
            return router
        if not self._warned:
            self._warned = True
            logger.warning(
                "CacheMiddleware found no Starlette Router inside %r; nothing is cached", self.app
            )
        return None

    def _route(self, scope: Scope) -> tuple[RouteCache, dict[str, Any]] | None:
        router = self._find_router(scope)
        found = None if router is None else match_route(router.routes, scope)
        if found is None:
            return None
        config = route_config(found[0])
        return None if config is None else (config, found[1])

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not self._sessions_found and scope["type"] in ("http", "lifespan"):
            self._find_sessions(scope)
        if scope["type"] == "lifespan":
            await serve_with_lifespan_close(self.app, scope, receive, send, self.cache.aclose)
            return
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        self.cache.stats.requests += 1
        if not self._proxy_checked:
            self._find_proxy()
        if SCOPE_KEY in scope:
            raise DuplicateMiddleware(
                "CacheMiddleware is applied twice to the same request; keep one. A common "
                "cause is adding it both with app.add_middleware() and around a mounted app."
            )
        if self._config_error is not None:
            raise self._config_error
        scope[SCOPE_KEY] = self.cache
        state = RequestState()
        token = current.set(state)
        try:
            # HEAD is answered as a GET without its body (RFC 9110 section 9.3.2), so it
            # shares the GET entry even where the app routes GET only (FastAPI).
            route = self._route({**scope, "method": "GET"} if scope["method"] == "HEAD" else scope)
            if route is None:
                await self.app(scope, receive, send)
                return
            await Exchange(self, scope, receive, send, state, *route).run()
        finally:
            current.reset(token)


def get_cache(request: Request | Mapping[str, Any]) -> Cache:
    """The Cache of the CacheMiddleware that handled ``request`` (a Request or a scope)."""
    scope = request.scope if isinstance(request, Request) else request
    cache = scope.get(SCOPE_KEY)
    if not isinstance(cache, Cache):
        raise CacheNotConfigured(
            "get_cache(request) found no CacheMiddleware around this app; add it with "
            "`app.add_middleware(CacheMiddleware, redis='redis://localhost:6379/0')`"
        )
    return cache
