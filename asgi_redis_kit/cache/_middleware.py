"""CacheMiddleware: serves hits before the app runs, stores what the app answers.

Per request:

1. Find the route the app's router will pick, with Starlette's own
   ``Route.matches`` (through ``Mount``/``Host``, honouring ``root_path``), and
   read the ``@cached`` options attached to its endpoint. No ``@cached`` route:
   the request passes through untouched.
2. Request rules (``_policy``) may bypass the cache.
3. One round trip reads the entry and the namespace/URL/tag versions (a Lua
   script on a single server, which also takes the Redis lease when the entry
   key is absent; pipelined single-key GETs on Cluster). A fresh entry is
   served right here: no session load, no dependencies, no handler. A stale
   one within ``stale_while_revalidate`` is served and one background refresh
   is started.
4. On a miss the first request in this process leads (single-flight) and holds
   the Redis lease (taken by the lookup, or by a round trip of its own when
   the lookup could not take it); the others wait and re-read the entry. The
   leader runs the app with a ``send`` wrapper that holds
   ``http.response.start`` back until the first body chunk: a complete body is
   checked against the response rules and stored (with the lease released in
   the same round trip) before it is sent; a streamed one passes through
   unbuffered. A cold miss thus costs two round trips, a hit one. A leader
   that learns its response will not be stored (its status or headers say
   so, it streams, it is too big) ends its flight and releases its lease
   right then, so the requests waiting for it, here and in other processes,
   run the handler at once instead of waiting ``lock_wait`` for nothing.
5. When Redis fails, the request bypasses the cache but keeps the single-flight:
   requests for a key that another one is running wait for it and get its
   response when the storage rules allow it (``X-Cache-Reason: coalesced``).

Vary: a response whose ``Vary`` names request headers the key does not hold
(GZipMiddleware's ``Accept-Encoding``, CORSMiddleware's ``Origin``) is stored
under a variant key holding those headers' values, and the URL's vary record
names them so that later lookups build that variant's key (``_keys``). Until
then the key covers fewer headers than the response varies on, so such a
response is never handed to the requests waiting on the same key: they look
it up again, under their own variant.

A waiter in another process polls the leader's entry; when the lease goes
away with no entry there, it reads the vary record once and moves to the
variant the leader stored under, as an in-process follower does.

A route's ``vary=`` names are added to the stored response's ``Vary``, so a
shared cache in front that is told our ``max-age`` keeps the variants apart.

Proxy headers: a proxy-headers middleware *inside* us (uvicorn's
``ProxyHeadersMiddleware``, hypercorn's ``ProxyFixMiddleware``, look-alikes by
name) rewrites the scheme or host after we keyed the request, and only for
trusted peers; requests carrying a forwarding header then bypass the cache
(``forwarded``) and one warning says to move it outside.

Sessions: the middleware learns the session cookie's name from the
SessionMiddleware (ours or Starlette's) it finds in the app on the first
request. A request that carries that cookie, or comes with a session loaded
outside us that came from a cookie or holds data, bypasses a route shared by
everyone (neither ``vary_on_session`` nor ``ignores_session``) before any
lookup: an empty session's page must never be served to a live one. A
``vary_on_session`` key also holds every other cookie (``_keys``). Finding the
middleware is not relied on: a ``vary_on_session`` response is not stored when
the key named no one yet the session the handler saw is someone's, nor any
response when the SessionMiddleware that handled the request (its scope mark)
reads another cookie than the key named (one warning says so). With a session
middleware *outside* the cache, ``scope["session"]`` is already loaded when we
run: a shared route whose handler read it is not stored, and a
``vary_on_session`` entry is keyed on the loaded session's handle (a new or
unknown session is no session) instead of the raw cookie. With our
SessionMiddleware *inside* the cache, a ``vary_on_session`` key is made from
the cookie's session id (verified with that middleware's signer; a bad
signature is no session), and its lookup proves the session still exists: an
EXISTS in the same script on a single server, in the same pipeline on
Cluster, or sent concurrently to the session store when that is another
server. A logged-out, revoked or expired session's cookie is never served its
cached pages: the app runs and sees an anonymous session.

Per-request state lives in a :class:`_Exchange`, never on the middleware.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import inspect
import logging
import random
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from starlette.requests import Request
from starlette.routing import Router
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .._http import header_map
from .._redis import Backend, RedisLike, serve_with_lifespan_close
from ..errors import BackendUnavailable, CacheNotConfigured, DuplicateMiddleware
from ..sessions import SessionMiddleware
from ._cache import Cache
from ._decorator import RequestState, RouteCache, current, route_config
from ._discovery import find_proxy_middleware, find_router, find_sessions, match_route, same_server
from ._entry import Entry, content_etag, encode, etag_matches, served_headers
from ._keys import CacheKey
from ._lock import Flight
from ._outcome import Absent, Fresh, SessionGone, Stale, classify
from ._policy import (
    learned_vary,
    request_bypass_reason,
    response_store_reason,
    storable_headers,
    with_vary,
)
from ._request import FORWARDING_HEADERS, canonical_host
from ._session_rules import SessionRules, SessionWarnings

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
        lock_wait, max_lifetime, clock: see :class:`Cache`.
        session_cookie: leave it ``None``: the name is learned on the first
            request from the SessionMiddleware in the app, ours or Starlette's
            (inside or outside this middleware), and is ``"session"`` without
            one. Set it when a middleware hides the session middleware (keeps
            its inner app elsewhere than ``.app``): a warning then names it. A name that
            contradicts that SessionMiddleware raises ``ValueError``.
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
            same = same_server(backend.client, self.cache.backend.client)
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
            await _Exchange(self, scope, receive, send, state, *route).run()
        finally:
            current.reset(token)


def _with_headers(message: Message, extra: Sequence[tuple[bytes, bytes]]) -> Message:
    ours = {name for name, _ in extra}
    headers = [(n, v) for n, v in message.get("headers", ()) if n.lower() not in ours]
    return {**message, "headers": headers + list(extra)}


def _x_cache(state: str, reason: str | None) -> list[tuple[bytes, bytes]]:
    headers = [(b"x-cache", state.encode())]
    if reason:
        headers.append((b"x-cache-reason", reason.encode()))
    return headers


async def _no_send(message: Message) -> None:
    return None


def _without_body(send: Send) -> Send:
    """The client asked HEAD; the app (or the entry) answers as for GET."""

    async def head_send(message: Message) -> None:
        if message["type"] == "http.response.body" and message.get("body"):
            message = {**message, "body": b""}
        await send(message)

    return head_send


class _Exchange:
    """Everything about one request: a fresh object per request, so nothing of it
    ever lands on the shared middleware."""

    def __init__(
        self,
        middleware: CacheMiddleware,
        scope: Scope,
        receive: Receive,
        send: Send,
        state: RequestState,
        config: RouteCache,
        path_params: dict[str, Any],
    ) -> None:
        self.middleware = middleware
        self.app = middleware.app
        self.cache = middleware.cache
        self.head = scope["method"] == "HEAD"
        self.scope = {**scope, "method": "GET"} if self.head else scope
        self.receive = receive
        self.send = _without_body(send) if self.head else send
        self.state = state
        self.config = config
        self.path_params = path_params
        self.stats = self.cache.stats
        self.headers = header_map(scope)
        self.cookie_name = middleware.cookie_name(scope)
        self.session = SessionRules(
            self.scope,
            self.headers,
            cookie_name=self.cookie_name,
            sessions=middleware.sessions,
            ignores_session=config.ignores_session,
            prove_on=middleware.proof_backend,
            warnings=middleware.session_warnings,
        )
        # Whether a waiter already moved on to the variant key its leader learned.
        self.rekeyed = False
        # Whether a vary_on_session key holds someone (set by run).
        self.keyed_user = False

    # -- entry points ------------------------------------------------------------------

    async def run(self) -> None:
        cache, config, scope, headers = self.cache, self.config, self.scope, self.headers
        host = canonical_host(scope)
        if host is None:
            # The app would see another host than any key could name.
            await self.bypass("host")
            return
        reason = request_bypass_reason(
            scope,
            public=config.public,
            host=host,
            allowed_hosts=cache.allowed_hosts,
            headers=headers,
        )
        if reason is None and self.middleware.inner_proxy is not None and self.forwarded():
            # The proxy middleware inside us may rewrite the scope from these
            # headers, or ignore them (an untrusted peer): no key can tell which.
            reason = "forwarded"
        if reason is None and len(self.session.cookies) > 1:
            # The session middleware and a cookie parser may each pick another of
            # the values: the key could name someone else's session.
            reason = "cookie"
        shared = not (config.vary_on_session or config.ignores_session)
        if reason is None and shared and self.session.carries():
            # Checklist 22: a page shared by everyone is never one for a visitor
            # with a session; nor is an empty session's page served to a live one.
            reason = "session"
        if reason is not None:
            await self.bypass(reason)
            return
        identity = self.session.identity() if config.vary_on_session else "cookie"
        if identity == "cookie":
            self.keyed_user = bool(self.session.cookies)
        else:
            self.keyed_user = identity is not None
        key = cache.keys.for_request(
            scope,
            namespace=config.namespace or cache.namespace,
            host=host,
            vary=config.vary,
            session_cookie_name=self.cookie_name,
            vary_on_session=config.vary_on_session,
            tags=config.filled_tags(self.path_params) if config.tags else (),
            custom=None if config.key is None else await self.custom_key(),
            headers=headers,
            session=identity,
        )
        try:
            found = await cache.lookup(key, lease=True, session=self.session.proof)
        except BackendUnavailable:
            await self.without_redis(key)
            return
        # The variant the URL's vary record names for this request's headers.
        key, versions = found.key, found.versions
        match classify(found, cache.clock()):
            case Fresh(entry):
                self.stats.hits += 1
                await self.serve(entry, "HIT")
            case Stale(entry, "revalidate"):
                self.stats.stale += 1
                self.schedule_refresh(key, versions)
                await self.serve(entry, "STALE", "revalidating")
            case Stale(entry, "error"):
                # Usable only if the app fails (stale-if-error).
                await self.fill(key, versions, entry)
            case Absent(token, locked):
                # ``token``/``locked``: the entry key was absent and the lease is settled.
                await self.fill(key, versions, None, token, locked=locked)
            case SessionGone(token):
                # Logged out, revoked or expired: its cookie gets none of its pages.
                # The session middleware treats the request as anonymous; not stored.
                await self.run_app(key, versions, token, None, reason="session")

    async def fill(
        self,
        key: CacheKey,
        versions: tuple[int, ...],
        fallback: Entry | None,
        token: str | None = None,
        *,
        locked: bool = False,
    ) -> None:
        """Lead (or follow) the refill of ``key``. ``token``: a lease the lookup
        already took for us; ``locked``: the lookup saw another holder's lease."""
        cache = self.cache
        flight = cache.flights.lead(key.digest)
        if flight is None:
            if token is not None:
                # Our lookup took the lease although a leader here already runs
                # (its lease had expired): that leader stores; give ours back.
                with contextlib.suppress(BackendUnavailable):
                    await cache.release(key, token)
            await self.follow(key, fallback)
            return
        try:
            entry: Entry | None = None
            try:
                if token is None and not locked:
                    token, entry = await cache.acquire(key, versions)
                    locked = entry is None and token is None
                if locked:
                    entry, released = await self.wait_for_other_process(key, versions)
                    if released and not self.rekeyed:
                        # The other leader may have stored under a variant its
                        # response's Vary named (not under ``key``): read the vary
                        # record once and re-key, as an in-process follower does.
                        found = await cache.lookup(key, session=self.session.proof)
                        outcome = classify(found, cache.clock())
                        if isinstance(outcome, SessionGone):
                            await self.run_app(key, versions, None, fallback, reason="session")
                            return
                        entry = outcome.entry if isinstance(outcome, Fresh) else None
                        if entry is None and found.key.entry != key.entry:
                            self.rekeyed = True
                            cache.flights.done(key.digest, flight)
                            await self.fill(found.key, found.versions, fallback)
                            return
            except BackendUnavailable:
                if fallback is not None:
                    # Redis failed after showing us a stale entry: stale-if-error.
                    self.stats.stale += 1
                    await self.serve(fallback, "STALE", "backend")
                    return
                entry = None
            if entry is not None:
                self.stats.hits += 1
                await self.serve(entry, "HIT")
                return
            await self.run_app(key, versions, token, fallback, flight=flight)
        finally:
            cache.flights.done(key.digest, flight)

    async def without_redis(self, key: CacheKey) -> None:
        """Redis failed before the entry could be read: the request bypasses the
        cache. Requests for the same key meanwhile still wait for this one run of
        the handler and get what it would have stored, so a burst against a down
        or slow Redis does not become a burst against the app."""
        flights = self.cache.flights
        flight = flights.lead(key.digest, without_redis=True)
        if flight is None:
            await self.follow(key, None)
            return
        try:
            await self.bypass("backend", key, flight)
        finally:
            flights.done(key.digest, flight)

    async def follow(self, key: CacheKey, fallback: Entry | None) -> None:
        """Wait for this process's leader, then re-read what it stored. The
        leader's response itself is never shared: it may belong to one user."""
        cache = self.cache
        flight = cache.flights.waiting_on(key.digest)
        if flight is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(cache.lock_wait):
                    await flight.wait()
            shared = flight.entry
            if shared is not None and shared.is_fresh(cache.clock()):
                # The leader could not store it: Redis has nothing to re-read.
                self.stats.coalesced += 1
                await self.serve(shared, "HIT", "coalesced")
                return
            if flight.without_redis:
                await self.bypass("backend")
                return
        try:
            found = await cache.lookup(key, session=self.session.proof)
        except BackendUnavailable:
            await self.run_app(key, (), None, fallback, store=False)
            return
        outcome = classify(found, cache.clock())
        if isinstance(outcome, SessionGone):
            await self.run_app(key, found.versions, None, fallback, reason="session")
            return
        if isinstance(outcome, Fresh):
            self.stats.hits += 1
            await self.serve(outcome.entry, "HIT")
            return
        if found.key.entry != key.entry and not self.rekeyed:
            # The leader learned that responses vary on headers the key lacked:
            # this request's variant is another key, with a refill of its own
            # (once: a record that keeps changing must not bounce us forever).
            self.rekeyed = True
            await self.fill(found.key, found.versions, fallback)
            return
        await self.run_app(found.key, found.versions, None, fallback)

    async def wait_for_other_process(
        self, key: CacheKey, versions: tuple[int, ...]
    ) -> tuple[Entry | None, bool]:
        """Poll ``key``'s entry while another process holds its lease: the entry,
        and whether the lease was released without one (False: ``lock_wait`` ran out)."""
        cache = self.cache
        delay = 0.005
        loop = asyncio.get_running_loop()
        deadline = loop.time() + cache.lock_wait
        while loop.time() < deadline:
            await asyncio.sleep(min(delay, max(0.0, deadline - loop.time())))
            delay = min(delay * 1.5, 0.1)
            found = await cache.poll(key, versions)
            outcome = classify(found, cache.clock())
            if isinstance(outcome, Fresh):
                return outcome.entry, False
            if not found.locked:
                return None, True
        return None, False

    def schedule_refresh(self, key: CacheKey, versions: tuple[int, ...]) -> None:
        flight = self.cache.flights.lead(key.digest)
        if flight is None:
            return  # a refresh (or a miss) for this key is already running here
        self.cache.spawn(self.refresh(key, versions, flight))

    async def refresh(self, key: CacheKey, versions: tuple[int, ...], flight: Flight) -> None:
        state = RequestState()
        current.set(state)  # this task runs in a copy of the request's context
        refresher = _Exchange(
            self.middleware,
            {**self.scope, "method": "GET"},
            _empty_receive(),
            _no_send,
            state,
            self.config,
            self.path_params,
        )
        refresher.keyed_user = self.keyed_user  # the same request's key
        try:
            token, _ = await self.cache.acquire(key, versions)
            if token is None:
                return  # another process refreshes it, or already did
            self.stats.refreshes += 1
            await refresher.run_app(key, versions, token, None, count=False, flight=flight)
        except BackendUnavailable:
            return
        except Exception:
            logger.exception("background refresh of a stale cache entry failed")
        finally:
            self.cache.flights.done(key.digest, flight)

    # -- helpers -----------------------------------------------------------------------

    async def custom_key(self) -> bytes | None:
        if self.config.key is None:
            return None
        request = Request({**self.scope, "path_params": self.path_params}, self.receive)
        value: Any = self.config.key(request)
        if inspect.isawaitable(value):
            value = await value
        return value if isinstance(value, bytes) else str(value).encode()

    async def bypass(
        self, reason: str, key: CacheKey | None = None, flight: Flight | None = None
    ) -> None:
        """Run the app around the cache. With ``key``'s ``flight``, a response the
        rules would store (a complete body in one message) that fits every request
        of ``key`` is left on it as an entry; any other ends the flight as soon as
        that is known, so the requests waiting on it run the app themselves."""
        self.stats.bypass[reason] += 1
        extra = _x_cache("BYPASS", reason)
        start: Message | None = None

        def settle(entry: Entry | None) -> None:
            nonlocal flight
            if key is None or flight is None:
                return
            if entry is None:
                self.cache.flights.done(key.digest, flight)
            else:
                flight.share(entry)
            flight = None

        async def send(message: Message) -> None:
            nonlocal start
            if message["type"] == "http.response.start":
                start = message
                if flight is not None and self.not_stored_reason(
                    message["status"], message.get("headers", ()), None
                ):
                    settle(None)
                message = _with_headers(message, extra)
            elif flight is not None and start is not None:
                settle(self.shareable(start, message, key))
                start = None
            await self.send(message)

        await self.call_app(send)

    def shareable(self, start: Message, message: Message, key: CacheKey | None) -> Entry | None:
        """The entry a response made of ``start`` and ``message`` would store, if
        it is complete, the rules allow it, and it fits every request of ``key``
        (it varies on no header the key lacks)."""
        if key is None or message["type"] != "http.response.body" or message.get("more_body"):
            return None
        status: int = start["status"]
        headers = list(start.get("headers", ()))
        body: bytes = message.get("body", b"")
        if self.not_stored_reason(status, headers, body) is not None:
            return None
        if not set(self.learned_vary(headers)) <= set(key.learned):
            return None
        return self.build_entry(status, headers, body, ())

    async def serve(self, entry: Entry, state: str, reason: str | None = None) -> None:
        now = self.cache.clock()
        inm = self.headers.get(b"if-none-match")
        if inm is not None and entry.status == 200 and etag_matches(inm, entry.etag):
            self.stats.not_modified += 1
            headers = served_headers(entry, now, state=state, reason=reason, not_modified=True)
            await self.send({"type": "http.response.start", "status": 304, "headers": headers})
            await self.send({"type": "http.response.body", "body": b""})
            return
        headers = served_headers(entry, now, state=state, reason=reason)
        await self.send({"type": "http.response.start", "status": entry.status, "headers": headers})
        await self.send({"type": "http.response.body", "body": entry.body})

    async def call_app(self, send: Send) -> None:
        """Run the app, noting first what a foreign session outside us holds (taken
        here, not per request: a hit never runs the app and never needs it)."""
        self.session.before_app()
        await self.app(self.scope, self.receive, send)

    def forwarded(self) -> bool:
        """Whether the request carries a forwarding header."""
        return any(name.encode() in self.headers for name in FORWARDING_HEADERS)

    def keyed_headers(self) -> list[str]:
        return ["host", *FORWARDING_HEADERS, *self.config.vary]

    def learned_vary(self, headers: Sequence[tuple[bytes, bytes]]) -> tuple[str, ...]:
        """The request headers the response varies on that the base key lacks."""
        return learned_vary(headers, self.keyed_headers())

    def not_stored_reason(
        self, status: int, headers: Sequence[tuple[bytes, bytes]], body: bytes | None
    ) -> str | None:
        """Why the rules forbid storing this complete response (None: store it).
        ``body`` None: what is known at the start message already (status and
        headers, a session read so far); a None answer then decides nothing."""
        config = self.config
        if self.state.ran is not config:
            return "route"
        reason = response_store_reason(
            status,
            headers,
            statuses=self.cache.cacheable_statuses,
            vary_on_session=config.vary_on_session,
        )
        if reason is None and not config.vary_on_session and self.session.read():
            reason = "session"
        # The key holds no one, yet the session the handler saw is someone's: its
        # cookie has a name we did not learn. Never share that page.
        unkeyed = config.vary_on_session and not self.keyed_user
        if reason is None and unkeyed and self.session.holds_data():
            reason = "session"
        if reason is None and self.session.misread_cookie():
            reason = "session"
        if reason is not None or body is None:
            return reason
        if len(body) > config.max_size:
            return "size"
        if self.session.changed():  # last: it encodes the session
            return "session"
        return None

    def build_entry(
        self,
        status: int,
        headers: Sequence[tuple[bytes, bytes]],
        body: bytes,
        versions: tuple[int, ...],
    ) -> Entry:
        config = self.config
        fresh = config.ttl + (random.uniform(0, config.jitter) if config.jitter else 0.0)
        app_etag = next((v for n, v in headers if n.lower() == b"etag"), None)
        # Keyed on the visitor's cookies (the session's or any other): private,
        # so a shared cache in front does not hand it to others.
        per_user = config.vary_on_session and b"cookie" in self.headers
        return Entry(
            status=status,
            headers=tuple(storable_headers(with_vary(headers, config.vary))),
            body=body,
            etag=app_etag.decode("latin-1") if app_etag else content_etag(body),
            stored_at=self.cache.clock(),
            fresh_for=fresh,
            stale_while_revalidate=config.stale_while_revalidate,
            stale_if_error=config.stale_if_error,
            versions=versions,
            per_user=per_user,
        )

    async def run_app(
        self,
        key: CacheKey,
        versions: tuple[int, ...],
        token: str | None,
        fallback: Entry | None,
        *,
        store: bool = True,
        reason: str | None = None,
        count: bool = True,
        flight: Flight | None = None,
    ) -> None:
        """Run the app; store its answer if the rules allow; serve ``fallback``
        (stale-if-error) instead of an exception or a 5xx. An entry Redis failed
        to take is left on ``flight`` for this process's waiting requests (when
        it fits all of them). As soon as the answer is known not to be stored,
        ``flight`` ends and the lease ``token`` is released: nobody waits for it."""
        cache, stats = self.cache, self.stats
        if count:
            stats.misses += 1
        held: Message | None = None
        mode = "holding"  # -> "passing" (sent through) or "swallowing" (stale served)
        not_stored = reason

        async def give_up(why: str) -> None:
            nonlocal token, not_stored
            not_stored = why
            if flight is not None:
                cache.flights.done(key.digest, flight)
            if token is not None:
                lease, token = token, None
                with contextlib.suppress(BackendUnavailable):
                    await cache.release(key, lease)

        async def send(message: Message) -> None:
            nonlocal held, mode, token, not_stored
            if mode == "passing":
                await self.send(message)
                return
            if mode == "swallowing":
                return
            if message["type"] == "http.response.start":
                held = message
                if store:
                    why = not_stored or self.not_stored_reason(
                        message["status"], message.get("headers", ()), None
                    )
                    if why is not None:
                        await give_up(why)  # e.g. Set-Cookie, no-store: known before the body
                return
            if held is None:
                await self.send(message)
                return
            status: int = held["status"]
            headers: list[tuple[bytes, bytes]] = list(held.get("headers", ()))
            if message["type"] != "http.response.body" or message.get("more_body", False):
                if fallback is not None and status >= 500:
                    mode = "swallowing"
                    await self.serve_stale_on_error(fallback)
                    return
                mode = "passing"
                why = not_stored or "streaming"
                await give_up(why)
                stats.not_stored[why] += 1
                await self.send(_with_headers(held, _x_cache("MISS", why)))
                await self.send(message)
                return
            body: bytes = message.get("body", b"")
            mode = "passing"
            if fallback is not None and status >= 500:
                mode = "swallowing"
                await self.serve_stale_on_error(fallback)
                return
            if not_stored is None and not store:
                not_stored = "backend"
            if not_stored is None:
                not_stored = self.not_stored_reason(status, headers, body)
            if not_stored is None:
                entry = self.build_entry(status, headers, body, versions)
                vary = self.learned_vary(headers)
                try:
                    await cache.store(key, encode(entry), entry.lifetime, token, vary=vary)
                    token = None  # released by the store script
                    if flight is not None:
                        # Waiters re-read it now, not after the app's background tasks,
                        # and a later miss on this key may lead a flight of its own.
                        cache.flights.done(key.digest, flight)
                except BackendUnavailable:
                    not_stored = "backend"
                    if flight is not None and set(vary) <= set(key.learned):
                        flight.share(entry)  # it fits every request waiting on this key
                else:
                    await self.serve(entry, "MISS")
                    return
            if flight is None or flight.entry is None:
                await give_up(not_stored)
            stats.not_stored[not_stored] += 1
            await self.send(_with_headers(held, _x_cache("MISS", not_stored)))
            await self.send(message)

        try:
            await self.call_app(send)
        except Exception:
            if fallback is None or mode != "holding":
                raise
            logger.exception("cached endpoint failed; serving the stale entry (stale-if-error)")
            await self.serve_stale_on_error(fallback)
        finally:
            if token is not None:
                with contextlib.suppress(BackendUnavailable):
                    await cache.release(key, token)
        if mode == "holding" and held is not None:
            await self.send(_with_headers(held, _x_cache("MISS", not_stored)))

    async def serve_stale_on_error(self, fallback: Entry) -> None:
        self.stats.stale += 1
        await self.serve(fallback, "STALE", "error")


def _empty_receive() -> Receive:
    sent = False

    async def receive() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": b"", "more_body": False}
        # A background refresh has no client; wait until the app gives up on us.
        await asyncio.Event().wait()
        return {"type": "http.disconnect"}

    return receive


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
