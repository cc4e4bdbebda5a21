"""The flow of one request to a ``@cached`` route, top to bottom: ``Exchange.run``
(rules, key, lookup, classify, serve or fill), then ``fill`` (lead),
``follow`` (wait for this process's leader), ``Cache.wait_for_lease`` (poll
while another process holds the lease) and ``refresh`` (stale-while-revalidate).

The whole request, step by step:

1. (``_middleware``) Find the route the app's router will pick, with Starlette's own
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
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
from typing import Any, assert_never

from starlette.requests import Request
from starlette.types import Message, Receive

from ..errors import BackendUnavailable
from ._decorator import RequestState, current
from ._entry import Entry
from ._keys import CacheKey
from ._lock import Flight
from ._outcome import Absent, Fresh, SessionGone, Stale, classify
from ._policy import request_bypass_reason
from ._request import FORWARDING_HEADERS, canonical_host
from ._respond import Responder

logger = logging.getLogger("asgi_redis_kit.cache")


async def _no_send(message: Message) -> None:
    return None


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


class Exchange(Responder):
    """One request's flow: resolve, rules, lookup, classify, then serve or fill."""

    async def run(self) -> None:
        """Request rules, then the key, one lookup through the storage layers,
        one classification of what it found, and serve or fill."""
        cache = self.cache
        # None: the app would see another host than any key could name.
        host = canonical_host(self.scope)
        reason = "host" if host is None else self.bypass_reason(host)
        if reason is not None or host is None:
            await self.bypass(reason or "host")
            return
        key = await self.build_key(host)
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
            case Stale(entry, _):
                # The "error" window: usable only if the app fails (stale-if-error).
                await self.fill(key, versions, entry)
            case Absent(token, locked):
                # ``token``/``locked``: the entry key was absent and the lease is settled.
                await self.fill(key, versions, None, token, locked=locked)
            case SessionGone(token):
                # Logged out, revoked or expired: its cookie gets none of its pages.
                # The session middleware treats the request as anonymous; not stored.
                await self.run_app(key, versions, token, None, reason="session")
            case unknown:
                assert_never(unknown)

    def bypass_reason(self, host: str) -> str | None:
        """Why the request rules send this request around the cache (None: they do not)."""
        config, scope, headers = self.config, self.scope, self.headers
        reason = request_bypass_reason(
            scope,
            public=config.public,
            host=host,
            allowed_hosts=self.cache.allowed_hosts,
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
        return reason

    async def build_key(self, host: str) -> CacheKey:
        """The request's key (its variant as far as this process knows the URL's
        vary record); notes whether it names a user (:attr:`keyed_user`)."""
        cache, config = self.cache, self.config
        identity = self.session.identity() if config.vary_on_session else "cookie"
        if identity == "cookie":
            self.keyed_user = bool(self.session.cookies)
        else:
            self.keyed_user = identity is not None
        return cache.keys.for_request(
            self.scope,
            namespace=config.namespace or cache.namespace,
            host=host,
            vary=config.vary,
            session_cookie_name=self.cookie_name,
            vary_on_session=config.vary_on_session,
            tags=config.filled_tags(self.path_params) if config.tags else (),
            custom=None if config.key is None else await self.custom_key(),
            headers=self.headers,
            session=identity,
            lines=self.lines,
        )

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
                await cache.release_quietly(key, token)
            await self.follow(key, fallback)
            return
        try:
            entry: Entry | None = None
            try:
                if token is None and not locked:
                    token, entry = await cache.acquire(key, versions)
                    locked = entry is None and token is None
                if locked:
                    entry, released = await cache.wait_for_lease(key, versions)
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

    def schedule_refresh(self, key: CacheKey, versions: tuple[int, ...]) -> None:
        flight = self.cache.flights.lead(key.digest)
        if flight is None:
            return  # a refresh (or a miss) for this key is already running here
        self.cache.spawn(self.refresh(key, versions, flight))

    async def refresh(self, key: CacheKey, versions: tuple[int, ...], flight: Flight) -> None:
        state = RequestState()
        current.set(state)  # this task runs in a copy of the request's context
        refresher = Exchange(
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

    def forwarded(self) -> bool:
        """Whether the request carries a forwarding header."""
        return any(name.encode() in self.headers for name in FORWARDING_HEADERS)
