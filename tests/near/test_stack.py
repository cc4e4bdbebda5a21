"""The whole stack on the near cache: CacheMiddleware outside SessionMiddleware,
both on the SAME NearCache, on a real Redis.

What this shows together (each layer's own tests show it alone):

* a ``vary_on_session`` page of a logged-in session, repeated, sends no Redis
  command: the entry, its record and versions are local, and the session is
  proved alive from the copy the session store keeps in the same NearCache;
* a page that only reads its session sends none either;
* two instances (own client, own NearCache, one Redis, as two processes):
  a logout on A, or ``revoke_user`` from an admin script, ends B's cached
  per-user page and B's session within a polled bound;
* the visit counter (``Session.incr``) keeps its counts across instances.

Commands are counted per instance with a RedisSpy; the trackers' own traffic
(which shares the client's connection class) is left out, and their heartbeat
is long so that none is sent while a test counts."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass

import httpx
import pytest
from redis.asyncio import Redis
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from asgi_redis_kit import (
    Cache,
    CacheMiddleware,
    NearCache,
    Session,
    SessionMiddleware,
    SessionStore,
    cached,
)
from tests.near.session_app import request_commands, usable
from tests.support import RedisSpy, counting_client

pytestmark = [pytest.mark.real_redis, pytest.mark.timeout(60)]

SECRET = "near-stack-test-secret-" + "x" * 20
COOKIE = "stack_session"
# How long B may go on serving what A (or an admin) ended.
BOUND = 2.0


def stack_app(redis: Redis, prefix: str, near: NearCache, calls: Counter[str]) -> Starlette:
    """The recommended stack: the cache outside the sessions, one NearCache."""
    cache = Cache(redis, key_prefix=prefix + "c:", timeout=5, near_cache=near)
    store = SessionStore(redis, key_prefix=prefix + "s:", near_cache=near)

    async def login(request: Request) -> Response:
        session = Session.of(request)
        session.regenerate()
        session.bind_user(request.path_params["user"])
        return PlainTextResponse("logged in")

    async def logout(request: Request) -> Response:
        request.session.clear()
        return PlainTextResponse("logged out")

    async def visit(request: Request) -> Response:
        return PlainTextResponse(str(await Session.of(request).incr("visits")))

    async def read(request: Request) -> Response:
        session = Session.of(request)
        return JSONResponse({"user": session.user_id, "visits": session.get("visits")})

    @cached(ttl=60, vary_on_session=True)
    async def mine(request: Request) -> Response:
        calls["mine"] += 1
        return PlainTextResponse(f"{Session.of(request).user_id} {calls['mine']}")

    app = Starlette(
        routes=[
            Route("/login/{user}", login, methods=["POST"]),
            Route("/logout", logout, methods=["POST"]),
            Route("/visit", visit, methods=["POST"]),
            Route("/read", read),
            Route("/mine", mine),
        ],
        middleware=[
            Middleware(CacheMiddleware, cache=cache),
            Middleware(SessionMiddleware, secret_key=SECRET, store=store, cookie_name=COOKIE),
        ],
    )
    app.state.cache = cache
    return app


@dataclass
class Instance:
    name: str
    prefix: str
    spy: RedisSpy
    redis: Redis
    near: NearCache
    cache: Cache
    calls: Counter[str]
    http: httpx.AsyncClient

    async def send(self, method: str, path: str, cookie: str | None) -> httpx.Response:
        """One request carrying ``cookie`` (the instances share no cookie jar:
        the test carries the visitor's cookie from one to the other)."""
        headers = {"cookie": f"{COOKIE}={cookie}"} if cookie else {}
        response = await self.http.request(method, path, headers=headers)
        self.http.cookies.clear()
        assert response.status_code == 200, (self.name, path, response.text)
        return response

    async def commands(self, method: str, path: str, cookie: str | None) -> dict[str, int]:
        """The Redis commands one request sent (trackers' own left out)."""
        self.spy.reset()
        await self.send(method, path, cookie)
        return request_commands(self.spy)

    async def until_silent(self, path: str, cookie: str) -> None:
        """GET ``path`` until a request sends no command: its keys are all local.

        A read is refused (not kept) when an invalidation of one of its keys
        arrives while it is in flight -- also that of the write just before it --
        so the copies may take a few requests."""
        for _ in range(100):
            if not await self.commands("GET", path, cookie):
                return
            await asyncio.sleep(0.01)
        raise AssertionError(f"{self.name}: {path} never answered from memory")


def cookie_of(response: httpx.Response) -> str:
    value = response.cookies.get(COOKIE)
    assert value, response.headers
    return value


@pytest.fixture
async def instances(redis_url: str, key_prefix: str) -> AsyncIterator[tuple[Instance, Instance]]:
    made: list[Instance] = []
    for name in ("A", "B"):
        spy = RedisSpy()
        redis = counting_client(redis_url, spy, socket_timeout=5, socket_connect_timeout=5)
        near = NearCache(heartbeat=60, heartbeat_timeout=5)
        calls: Counter[str] = Counter()
        app = stack_app(redis, key_prefix, near, calls)
        http = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app, raise_app_exceptions=False),
            base_url="http://testserver",
            timeout=30,
        )
        made.append(Instance(name, key_prefix, spy, redis, near, app.state.cache, calls, http))
    try:
        yield made[0], made[1]
    finally:
        for instance in made:
            await instance.http.aclose()
            await instance.cache.aclose()
            await instance.near.aclose()
        redis = made[0].redis
        keys = [k async for k in redis.scan_iter(match=f"{key_prefix}*", count=1000)]
        if keys:
            await redis.delete(*keys)
        for instance in made:
            await instance.redis.aclose()


async def tracking(instance: Instance) -> None:
    """Both prefixes tracked (registering one later would flush the other)."""
    for layer in ("c:", "s:"):
        instance.near.view(instance.redis, instance.prefix + layer)
    await usable(instance.near)


async def logged_in(instance: Instance, user: str) -> str:
    return cookie_of(await instance.send("POST", f"/login/{user}", None))


async def until_ended(b: Instance, cookie: str, user: str) -> float:
    """Poll B with the ended session's cookie until neither its cached page nor
    its session names ``user``; fail after :data:`BOUND`. Returns the wait."""
    start = time.monotonic()
    while True:
        page = (await b.send("GET", "/mine", cookie)).text
        session = (await b.send("GET", "/read", cookie)).json()
        if not page.startswith(f"{user} ") and session["user"] is None:
            return time.monotonic() - start
        assert time.monotonic() - start < BOUND, (page, session)
        await asyncio.sleep(0.02)


async def test_a_per_user_page_of_a_logged_in_session_sends_no_command(
    instances: tuple[Instance, Instance],
) -> None:
    a, _ = instances
    await tracking(a)
    cookie = await logged_in(a, "ann")
    first = await a.send("GET", "/mine", cookie)
    assert (first.headers["x-cache"], first.text) == ("MISS", "ann 1")
    await a.until_silent("/mine", cookie)
    hits = a.cache.stats.near_hits
    for _ in range(5):
        a.spy.reset()
        response = await a.send("GET", "/mine", cookie)
        assert (response.headers["x-cache"], response.text) == ("HIT", "ann 1")
        assert request_commands(a.spy) == {}
    assert a.cache.stats.near_hits == hits + 5
    assert a.calls["mine"] == 1


async def test_a_read_only_session_page_sends_no_command(
    instances: tuple[Instance, Instance],
) -> None:
    a, _ = instances
    await tracking(a)
    cookie = await logged_in(a, "ann")
    await a.until_silent("/read", cookie)
    for _ in range(5):
        a.spy.reset()
        assert (await a.send("GET", "/read", cookie)).json() == {"user": "ann", "visits": None}
        assert request_commands(a.spy) == {}


async def warm_on(b: Instance, cookie: str, user: str) -> None:
    """B serves ``user``'s cached page and session from memory."""
    assert (await b.send("GET", "/mine", cookie)).text.startswith(f"{user} ")
    await b.until_silent("/mine", cookie)
    await b.until_silent("/read", cookie)
    assert (await b.send("GET", "/read", cookie)).json()["user"] == user


async def test_a_logout_on_one_instance_ends_the_page_and_session_on_the_other(
    instances: tuple[Instance, Instance],
) -> None:
    a, b = instances
    await tracking(a)
    await tracking(b)
    cookie = await logged_in(a, "ann")
    await warm_on(b, cookie, "ann")

    await a.send("POST", "/logout", cookie)
    await until_ended(b, cookie, "ann")
    # ...and it stays ended (nothing older comes back from memory).
    for _ in range(5):
        assert not (await b.send("GET", "/mine", cookie)).text.startswith("ann ")


async def test_revoke_user_from_an_admin_store_ends_them_on_an_instance(
    instances: tuple[Instance, Instance], redis_url: str, key_prefix: str
) -> None:
    a, b = instances
    await tracking(a)
    await tracking(b)
    cookie = await logged_in(a, "bob")
    await warm_on(b, cookie, "bob")

    admin = SessionStore(redis_url, key_prefix=key_prefix + "s:")
    try:
        assert await admin.revoke_user("bob") == 1
    finally:
        await admin.aclose()
    await until_ended(b, cookie, "bob")


async def test_the_visit_counter_keeps_its_counts_across_instances(
    instances: tuple[Instance, Instance],
) -> None:
    a, b = instances
    await tracking(a)
    await tracking(b)
    cookie = await logged_in(a, "cy")
    counts: list[int] = []
    for instance in (a, b, a, b, a, b):
        # Each instance has just read the session from memory before it counts.
        await instance.until_silent("/read", cookie)
        counts.append(int((await instance.send("POST", "/visit", cookie)).text))
    assert counts == [1, 2, 3, 4, 5, 6]

    for instance in (a, b):
        deadline = time.monotonic() + BOUND
        while (await instance.send("GET", "/read", cookie)).json()["visits"] != 6:
            assert time.monotonic() < deadline, f"{instance.name} never shows 6 visits"
            await asyncio.sleep(0.02)
