"""Checklist 34, the CVE-2023-28859 regression: Redis calls cancelled mid-reply must
not leave a connection whose next user reads somebody else's reply.

Every test runs on a Redis of its own behind a :class:`DelayProxy` that holds every
reply back for ``LATENCY``. Commands reach Redis at once and run; their replies are
still in the proxy when the callers give up, either at our deadline (``timeout``
shorter than the latency) or by an explicit ``task.cancel()``. Then the latency is
removed and every one of ``N`` keys, sessions or cache entries is read back by its
own caller, which must get *its own* value.

How a desynchronised pool would show: a connection handed back to the pool with a
reply still on its way answers the next command with that stale reply, so
``GET cx:7`` returns the value of ``cx:3``, a session request sees another user's
owner, a cache hit serves another query's body. Every test collects such mismatches
and asserts there are none; it also checks that the replies really were abandoned
in flight (``proxy.discarded``) and that no connection leaked past the pool size.

Only did-not-hang bounds are timed (``HANG``), and they are generous. An answer of
"Redis unavailable" while reading back is retried a few times: availability on a
loaded machine is not what these tests are about, wrong answers are.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable, Sequence
from http.cookiejar import CookieJar, DefaultCookiePolicy
from typing import Any, Literal

import httpx
import pytest
from redis.asyncio import BlockingConnectionPool, Redis
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp

from asgi_redis_kit import CacheMiddleware, Session, SessionMiddleware, cached
from asgi_redis_kit._redis import Backend
from asgi_redis_kit.errors import BackendUnavailable
from tests.support import DelayProxy

pytestmark = pytest.mark.real_redis

N = 200  # distinct keys, sessions or cache entries, one caller each
POOL = 20  # max_connections of every pool under test
# Seconds each reply waits in the proxy while the callers give up. The proxy runs
# on the test's event loop, so the callers' giving up (200 cancellations, each
# dropping its connection) must be done within it, or the replies are delivered
# before their connections close and nothing was abandoned in flight: with 0.3 s
# a loaded machine missed that (proxy.discarded == 0). Nothing waits for it to
# pass, so a long one costs no time.
LATENCY = 3.0
DEADLINE = 0.1  # our timeout in the deadline variants: shorter than LATENCY
HANG = 30.0  # did-not-hang bound for a whole phase, in seconds
RETRIES = 5  # read-back attempts per caller when Redis was unavailable

Mode = Literal["deadline", "cancel"]


async def gets_executed(admin: Redis) -> int:
    stats = await admin.info("commandstats")
    return int(stats.get("cmdstat_get", {}).get("calls", 0))


async def other_clients(admin: Redis) -> int:
    """Connections Redis has open, other than ``admin``'s own."""
    mine = await admin.client_id()
    return sum(1 for c in await admin.client_list() if int(c["id"]) != mine)


async def wait_for(check: Callable[[], Awaitable[bool]], what: str) -> None:
    """Poll ``check`` (bounded); an event that never comes is a failure."""
    for _ in range(500):
        if await check():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"still waiting for {what} after 5 s")


async def abandon(
    proxy: DelayProxy, backend: Backend, mode: Mode, calls: Sequence[Awaitable[Any]]
) -> list[Any]:
    """Run ``calls`` with every reply delayed, and make them give up mid-reply: by
    themselves at ``backend``'s deadline (``DEADLINE`` meanwhile), or by
    ``task.cancel()`` once ``POOL`` replies wait in the proxy (the deadline is then
    ``HANG``, so only that cancel interrupts them)."""
    proxy.latency = LATENCY
    replies_before = proxy.chunks["replies"]
    backend.timeout = DEADLINE if mode == "deadline" else HANG
    tasks = [asyncio.ensure_future(call) for call in calls]
    try:
        async with asyncio.timeout(HANG):
            if mode == "cancel":
                await proxy.until_chunks("replies", replies_before + POOL)
                for task in tasks:
                    task.cancel()
            return await asyncio.gather(*tasks, return_exceptions=True)
    finally:
        proxy.latency = 0
        backend.timeout = HANG


async def check_pool(proxy: DelayProxy, admin: Redis, limit: int) -> None:
    assert proxy.open_connections <= limit, proxy.open_connections
    assert await other_clients(admin) <= limit
    # Replies were in the proxy's delay line when their connection was dropped. A
    # pool that kept such connections would leave this at 0 and instead deliver
    # those replies to the next callers (the mismatches checked before).
    assert proxy.discarded > 0


async def all_closed(proxy: DelayProxy) -> None:
    async def closed() -> bool:
        return proxy.open_connections == 0

    await wait_for(closed, "the pool's connections to close")


# -- raw Backend calls ------------------------------------------------------------


@pytest.mark.parametrize("split", [0, 6], ids=["whole-reply-late", "half-a-reply"])
@pytest.mark.parametrize("mode", ["deadline", "cancel"])
@pytest.mark.parametrize("client_kind", ["url", "callers-client"])
async def test_backend_calls_abandoned_mid_reply_leave_every_caller_its_own_value(
    proxy: DelayProxy, admin: Redis, mode: Mode, split: int, client_kind: str
) -> None:
    values = {f"cx:{i}": f"value-{i}-{uuid.uuid4().hex}" for i in range(N)}
    await admin.mset(values)
    if client_kind == "url":
        # Our own client: socket timeouts equal to the deadline, one quick retry.
        backend = Backend(proxy.url, timeout=DEADLINE, max_connections=POOL)
    else:
        # A caller's client with long socket timeouts: only our deadline's
        # cancellation (or the explicit cancel) interrupts a read.
        pool = BlockingConnectionPool.from_url(
            proxy.url, max_connections=POOL, timeout=10, socket_timeout=10
        )
        backend = Backend(Redis.from_pool(pool), timeout=DEADLINE)
    client = backend.client
    assert isinstance(client, Redis)
    try:
        # Open the whole pool before any latency, so the callers below are
        # cancelled reading GET replies, not connection handshakes.
        pool_ = client.connection_pool
        held = [await pool_.get_connection() for _ in range(POOL)]  # type: ignore[no-untyped-call]
        for connection in held:
            await pool_.release(connection)
        assert proxy.accepted == POOL

        async def get(key: str) -> Any:
            async with backend.call() as redis:
                return await redis.get(key)

        proxy.split = split
        executed = await gets_executed(admin)
        results = await abandon(proxy, backend, mode, [get(k) for k in values])
        if mode == "deadline":
            assert [type(r) for r in results] == [BackendUnavailable] * N
        else:
            # Callers queued behind the pool may give up waiting for a connection
            # (the URL client's pool wait is the short deadline it was made with)
            # before the cancel reaches them, on a slow machine. Either way none
            # of them may have returned a value.
            kinds = {type(r) for r in results}
            assert kinds <= {asyncio.CancelledError, BackendUnavailable}, kinds
            assert sum(isinstance(r, asyncio.CancelledError) for r in results) >= POOL
        # The commands did run in Redis: their replies were in flight when abandoned.
        assert await gets_executed(admin) - executed >= POOL

        wrong: list[tuple[str, Any]] = []

        async def read_back(key: str) -> None:
            for _ in range(RETRIES):
                try:
                    got = await get(key)
                except BackendUnavailable:
                    continue
                if got != values[key].encode():
                    # Desynchronised: e.g. ("cx:7", b"value-3-...") - another GET's reply.
                    wrong.append((key, got))
                return
            wrong.append((key, "unavailable every time"))

        keys = list(values)
        async with asyncio.timeout(HANG):
            for start in range(0, N, POOL):
                await asyncio.gather(*(read_back(k) for k in keys[start : start + POOL]))
        assert wrong == []
        await check_pool(proxy, admin, POOL)
    finally:
        await backend.aclose()
        if client_kind != "url":
            await client.aclose()
    await all_closed(proxy)


# -- requests through the middleware -------------------------------------------------


def session_app(proxy: DelayProxy, key_prefix: str) -> SessionMiddleware:
    async def claim(request: Request) -> Response:
        request.session["owner"] = request.query_params["owner"]
        return PlainTextResponse("ok")

    async def whoami(request: Request) -> Response:
        visits = await Session.of(request).incr("visits")
        return PlainTextResponse(f"{request.session.get('owner', '-')} {visits}")

    inner = Starlette(routes=[Route("/claim", claim), Route("/whoami", whoami)])
    return SessionMiddleware(
        inner,
        secret_key="cancellation-test",
        redis=proxy.url,
        key_prefix=key_prefix,
        # Generous while setting up and reading back; abandon() lowers the deadline.
        timeout=HANG,
        max_connections=POOL,
    )


def asgi_client(app: ASGIApp) -> httpx.AsyncClient:
    # No cookie jar: every request carries exactly the cookie its user sends.
    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app),
        base_url="http://test",
        cookies=CookieJar(policy=DefaultCookiePolicy(allowed_domains=[])),
    )


async def open_pool(client: httpx.AsyncClient, path: Callable[[int], str]) -> None:
    """A burst of concurrent requests, so the pool opens its connections before any
    latency (some may be answered 503 while waiting for one; that is fine here)."""
    await asyncio.gather(*(client.get(path(i)) for i in range(3 * POOL)))


@pytest.mark.parametrize("mode", ["deadline", "cancel"])
async def test_session_requests_abandoned_mid_reply_leave_every_user_their_own_session(
    proxy: DelayProxy, admin: Redis, key_prefix: str, mode: Mode
) -> None:
    app = session_app(proxy, key_prefix)
    owners = [f"user-{i}-{uuid.uuid4().hex}" for i in range(N)]
    cookies: list[str] = []
    try:
        async with asgi_client(app) as client, asyncio.timeout(HANG):
            for owner in owners:
                for _ in range(RETRIES):
                    response = await client.get("/claim", params={"owner": owner})
                    if response.status_code == 200:
                        break
                assert response.status_code == 200
                cookies.append(response.cookies["session"])
            await open_pool(client, lambda i: f"/whoami?x={i}")

        def whoami(i: int) -> Awaitable[httpx.Response]:
            return client.get("/whoami", headers={"cookie": f"session={cookies[i]}"})

        async with asgi_client(app) as client:
            calls = [whoami(i) for i in range(N)]
            results = await abandon(proxy, app.store.backend, mode, calls)
        if mode == "deadline":
            # Sessions fail closed: a 503, never a 200 with whatever came back.
            assert [getattr(r, "status_code", r) for r in results] == [503] * N
        else:
            assert all(isinstance(r, asyncio.CancelledError) for r in results), results

        wrong: list[tuple[int, str]] = []

        async def read_back(i: int) -> None:
            for _ in range(RETRIES):
                response = await whoami(i)
                if response.status_code == 503:
                    continue
                owner, _, visits = response.text.partition(" ")
                if response.status_code != 200 or owner != owners[i] or not visits.isdigit():
                    # Desynchronised: user 7 sees "user-3-... 4" (user 3's session),
                    # or a 500 where a hash reply was parsed as an integer.
                    wrong.append((i, f"{response.status_code} {response.text}"))
                return
            wrong.append((i, "503 every time"))

        async with asgi_client(app) as client, asyncio.timeout(HANG):
            for start in range(0, N, POOL):
                await asyncio.gather(*(read_back(i) for i in range(start, start + POOL)))
        assert wrong == []
        await check_pool(proxy, admin, POOL)
    finally:
        await app.aclose()
    await all_closed(proxy)


def cache_app(
    proxy: DelayProxy, key_prefix: str, bodies: dict[str, str], calls: list[str]
) -> CacheMiddleware:
    @cached(ttl=300)
    async def item(request: Request) -> Response:
        q = request.query_params["q"]
        calls.append(q)
        return PlainTextResponse(bodies[q])

    return CacheMiddleware(
        Starlette(routes=[Route("/item", item)]),
        redis=proxy.url,
        key_prefix=key_prefix,
        # Generous while storing and reading back (a store cut short keeps the
        # stampede lease, and the key uncached, for lock_lease); abandon() lowers it.
        timeout=HANG,
        max_connections=POOL,
        # Never stop asking Redis: every request below must go through the pool.
        breaker_threshold=10**9,
    )


@pytest.mark.parametrize("mode", ["deadline", "cancel"])
async def test_cache_requests_abandoned_mid_reply_leave_every_query_its_own_entry(
    proxy: DelayProxy, admin: Redis, key_prefix: str, mode: Mode
) -> None:
    bodies = {str(i): f"body-{i}-{uuid.uuid4().hex}" for i in range(N)}
    calls: list[str] = []
    app = cache_app(proxy, key_prefix, bodies, calls)

    async def fetch(client: httpx.AsyncClient, q: str) -> httpx.Response:
        return await client.get("/item", params={"q": q})

    async def hit(client: httpx.AsyncClient, q: str) -> str:
        """Read ``q`` until it is a hit (bounded); '' when it is right, else what
        was wrong."""
        for _ in range(RETRIES):
            response = await fetch(client, q)
            if response.text != bodies[q]:
                # Desynchronised: the entry of another query, e.g. "body-3-..." for q=7,
                # served as a HIT.
                return f"{response.status_code} {response.headers.get('x-cache')} {response.text}"
            if response.headers.get("x-cache") == "HIT":
                return ""
        return f"never a HIT: {response.headers}"

    try:
        async with asgi_client(app) as client, asyncio.timeout(HANG):
            for start in range(0, N, POOL):
                stored = await asyncio.gather(
                    *(hit(client, str(i)) for i in range(start, start + POOL))
                )
                assert stored == [""] * POOL
            await open_pool(client, lambda i: f"/item?q={i}")
            calls.clear()

            calls_ = [fetch(client, q) for q in bodies]
            results = await abandon(proxy, app.cache.backend, mode, calls_)
        if mode == "deadline":
            # The cache fails open: the handler answers, with the right body.
            assert [getattr(r, "text", r) for r in results] == list(bodies.values())
        else:
            assert all(isinstance(r, asyncio.CancelledError) for r in results), results

        calls.clear()
        async with asgi_client(app) as client, asyncio.timeout(HANG):
            wrong: list[str] = []
            for start in range(0, N, POOL):
                wrong += await asyncio.gather(
                    *(hit(client, str(i)) for i in range(start, start + POOL))
                )
        assert [w for w in wrong if w] == []
        assert len(calls) < N  # served from Redis, not by the handler
        await check_pool(proxy, admin, POOL)
    finally:
        await app.cache.aclose()
    await all_closed(proxy)
