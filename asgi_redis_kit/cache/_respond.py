"""How one cached request's response is made: run the app and store what it
answers (``run_app``), pass it through around the cache (``bypass``), or serve
an entry (``serve``, with 304s for a matching ``If-None-Match``). The response
rules (``_policy``) and the session rules (``_session_rules``) decide whether
an answer is stored; this module applies them to the ASGI messages, and holds
``http.response.start`` back until the first body chunk so a complete body is
stored (lease released in the same round trip) before it is sent. A leader
that learns its response will not be stored ends its flight and releases its
lease right then, so the requests waiting for it run the handler at once.

The per-request state lives on :class:`Responder`; the flow that decides which
of these runs is its subclass ``_exchange.Exchange``.
"""

from __future__ import annotations

import contextlib
import logging
import random
from collections.abc import Sequence
from typing import Any, Protocol

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .._redis import Backend
from ..errors import BackendUnavailable
from ..sessions import SessionMiddleware
from ._cache import Cache
from ._decorator import RequestState, RouteCache
from ._entry import Entry, content_etag, etag_matches, served_headers
from ._keys import CacheKey
from ._lock import Flight
from ._policy import learned_vary, response_store_reason, storable_headers, with_vary
from ._request import FORWARDING_HEADERS, header_lines, joined_headers
from ._session_rules import SessionRules, SessionWarnings

logger = logging.getLogger("asgi_redis_kit.cache")


def _with_headers(message: Message, extra: Sequence[tuple[bytes, bytes]]) -> Message:
    ours = {name for name, _ in extra}
    headers = [(n, v) for n, v in message.get("headers", ()) if n.lower() not in ours]
    return {**message, "headers": headers + list(extra)}


def _x_cache(state: str, reason: str | None) -> list[tuple[bytes, bytes]]:
    headers = [(b"x-cache", state.encode())]
    if reason:
        headers.append((b"x-cache-reason", reason.encode()))
    return headers


def _without_body(send: Send) -> Send:
    """The client asked HEAD; the app (or the entry) answers as for GET."""

    async def head_send(message: Message) -> None:
        if message["type"] == "http.response.body" and message.get("body"):
            message = {**message, "body": b""}
        await send(message)

    return head_send


class Site(Protocol):
    """What a request needs of the CacheMiddleware that runs it (found once per
    middleware, read by every request)."""

    @property
    def app(self) -> ASGIApp: ...

    @property
    def cache(self) -> Cache: ...

    @property
    def sessions(self) -> SessionMiddleware | None: ...

    @property
    def session_warnings(self) -> SessionWarnings: ...

    @property
    def inner_proxy(self) -> object | None: ...

    def cookie_name(self, scope: Scope) -> str: ...

    def proof_backend(self, backend: Backend) -> Backend | None: ...


class Responder:
    """One request's state (a fresh object per request, so nothing of it ever
    lands on the shared middleware), and how the app's answer is served,
    stored or passed through."""

    def __init__(
        self,
        middleware: Site,
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
        # Every header line by name, and the joined values: one pass over the headers.
        self.lines = header_lines(scope)
        self.headers = joined_headers(self.lines)
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
        # The header rules' verdict on the last response seen (config, status,
        # headers, reason): asked at the start message and again with the body.
        self.header_verdict: tuple[RouteCache, int, tuple[tuple[bytes, bytes], ...], str | None]
        self.header_verdict = (config, -1, (), None)

    # -- how the app's answer goes out -------------------------------------------------

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
        # The same status and headers as at the start message (the usual miss):
        # their verdict again, without reading every header once more.
        seen = tuple(headers)
        known, known_status, known_headers, reason = self.header_verdict
        if known is not config or known_status != status or known_headers != seen:
            reason = response_store_reason(
                status,
                headers,
                statuses=self.cache.cacheable_statuses,
                vary_on_session=config.vary_on_session,
            )
            self.header_verdict = (config, status, seen, reason)
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
                await cache.release_quietly(key, lease)

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
                    await cache.store(key, entry, token, vary=vary)
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
