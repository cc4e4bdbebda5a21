"""The Starlette (and FastAPI) apps the scale-out tests drive, and small helpers.

The apps take any ``redis=`` value, so the same routes run on a Redis Cluster
client and on a Sentinel-managed master. ``Calls`` counts handler runs so cache
tests assert HIT/MISS from the handler's side too, not only from ``X-Cache``.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from typing import Any

import httpx
from fastapi import Depends, FastAPI
from pydantic import BaseModel
from redis.asyncio.cluster import ClusterNode, RedisCluster
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp

from asgi_redis_kit import CacheMiddleware, Session, SessionMiddleware, cached, get_cache
from asgi_redis_kit._redis import RedisLike
from asgi_redis_kit.near import NearCache
from tests.scaleout.servers import HOST, ClusterDeployment, CommandLog

SECRET = "scale-out-test-secret-key-0123456789abcdef"
COOKIE = "session"


class Calls(Counter[str]):
    """Handler runs by route name."""


def build_app(
    redis: RedisLike,
    calls: Calls,
    *,
    cache: bool = True,
    cache_timeout: float = 0.5,
    gate: asyncio.Event | None = None,
    near: NearCache | None = None,
) -> Starlette:
    """Sessions (and, with ``cache``, the response cache outside them) on ``redis``.

    ``cache_timeout`` is the cache's deadline (its default, 0.5 s, unless a test
    raises it): a burst that misses it fails open, which a loaded machine can make
    happen in a test that counts errors or handler runs. ``/slow`` waits for
    ``gate`` (a test sets it once its burst is in flight). ``near``: both the
    cache and the sessions keep copies in that NearCache (``near_cache=``)."""

    async def visits(request: Request) -> Response:
        count = await Session.of(request).incr("visits")
        return PlainTextResponse(str(count))

    async def put(request: Request) -> Response:
        for name, value in request.query_params.items():
            request.session[name] = value
        return PlainTextResponse("ok")

    async def show(request: Request) -> Response:
        return JSONResponse(dict(request.session))

    async def login(request: Request) -> Response:
        session = Session.of(request)
        session.regenerate()
        session.bind_user(request.path_params["user"])
        return PlainTextResponse("logged in")

    async def logout(request: Request) -> Response:
        Session.of(request).clear()
        return PlainTextResponse("logged out")

    async def user_sessions(request: Request) -> Response:
        found = await Session.of(request).store.user_sessions(request.path_params["user"])
        return JSONResponse({"count": len(found)})

    async def revoke(request: Request) -> Response:
        await Session.of(request).store.revoke_user(request.path_params["user"])
        return PlainTextResponse("revoked")

    @cached(ttl=60, tags=["item:{item_id}"])
    async def item(request: Request) -> Response:
        calls["item"] += 1
        item_id = request.path_params["item_id"]
        return PlainTextResponse(f"item {item_id} run {calls['item']}")

    @cached(ttl=60)
    async def slow(request: Request) -> Response:
        calls["slow"] += 1
        if gate is not None:
            await gate.wait()
        return PlainTextResponse(f"slow run {calls['slow']}")

    async def invalidate(request: Request) -> Response:
        await get_cache(request).invalidate_tags(f"item:{request.path_params['item_id']}")
        return PlainTextResponse("invalidated")

    async def clear(request: Request) -> Response:
        await get_cache(request).clear()
        return PlainTextResponse("cleared")

    async def stats(request: Request) -> Response:
        return JSONResponse(get_cache(request).stats.as_dict())

    routes = [
        Route("/visits", visits),
        Route("/put", put, methods=["POST"]),
        Route("/show", show),
        Route("/login/{user}", login, methods=["POST"]),
        Route("/logout", logout, methods=["POST"]),
        Route("/users/{user}/sessions", user_sessions),
        Route("/users/{user}/revoke", revoke, methods=["POST"]),
    ]
    near_cache: NearCache | bool = False if near is None else near
    middleware = [
        Middleware(SessionMiddleware, secret_key=SECRET, redis=redis, near_cache=near_cache)
    ]
    if cache:
        routes += [
            Route("/items/{item_id}", item),
            Route("/slow", slow),
            Route("/items/{item_id}/invalidate", invalidate, methods=["POST"]),
            Route("/cache/clear", clear, methods=["POST"]),
            Route("/cache/stats", stats),
        ]
        # Outermost first: a HIT is answered before any session is loaded.
        middleware.insert(
            0,
            Middleware(CacheMiddleware, redis=redis, timeout=cache_timeout, near_cache=near_cache),
        )
    return Starlette(routes=routes, middleware=middleware)


def build_fastapi_app(redis: RedisLike, calls: Calls) -> FastAPI:
    """The FastAPI twin: the visit counter, login, and a cached path operation
    with a typed path parameter, a dependency and a ``response_model``."""

    class Item(BaseModel):
        id: int
        run: int

    def run_counter() -> Calls:
        calls["dependency"] += 1
        return calls

    app = FastAPI(
        middleware=[
            Middleware(CacheMiddleware, redis=redis),
            Middleware(SessionMiddleware, secret_key=SECRET, redis=redis),
        ]
    )

    @app.get("/visits", response_class=PlainTextResponse)
    async def visits(request: Request) -> str:
        return str(await Session.of(request).incr("visits"))

    @app.post("/login/{user}")
    async def login(user: str, request: Request) -> dict[str, str]:
        session = Session.of(request)
        session.regenerate()
        session.bind_user(user)
        return {"user": user}

    @app.get("/users/{user}/sessions")
    async def user_sessions(user: str, request: Request) -> dict[str, int]:
        return {"count": len(await Session.of(request).store.user_sessions(user))}

    @app.get("/items/{item_id}", response_model=Item)
    @cached(ttl=60, tags=["item:{item_id}"])
    async def item(item_id: int, counter: Calls = Depends(run_counter)) -> Any:  # noqa: B008
        counter["item"] += 1
        return {"id": item_id, "run": counter["item"], "secret": "filtered by response_model"}

    @app.post("/items/{item_id}/invalidate")
    async def invalidate(item_id: int, request: Request) -> dict[str, int]:
        return {"bumped": await get_cache(request).invalidate_tags(f"item:{item_id}")}

    @app.get("/cache/stats")
    async def stats(request: Request) -> dict[str, Any]:
        return get_cache(request).stats.as_dict()

    return app


def browser(app: ASGIApp) -> httpx.AsyncClient:
    """One user agent with its own cookie jar."""
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://testserver")


def session_id(client: httpx.AsyncClient) -> str:
    """The raw id inside the signed cookie (``<id>.<signature>``)."""
    value = client.cookies.get(COOKIE)
    assert value, f"no {COOKIE!r} cookie in the jar: {dict(client.cookies)}"
    return value.split(".", 1)[0]


def ok_json(response: httpx.Response) -> Any:
    assert response.status_code == 200, (response.status_code, response.text)
    return response.json()


# -- near cache: app instances with their own client, NearCache and command log --------

# What a near-cache tracker sends on its own connection (made from the client's
# connection class, so a CommandLog records it too); never a request's command.
TRACKER_COMMANDS = frozenset({"PING", "CLIENT", "SUBSCRIBE", "UNSUBSCRIBE", "ROLE", "HELLO"})


class NearInstance:
    """One app instance as another process would run it: ``redis`` (its own
    client, recorded by ``log``), its own ``near`` cache, its own handler counts."""

    def __init__(self, redis: RedisLike, near: NearCache, log: CommandLog, calls: Calls) -> None:
        self.redis = redis
        self.near = near
        self.log = log
        self.calls = calls
        self.app = build_app(redis, calls, near=near, cache_timeout=5)

    def request_commands(self) -> list[tuple[int, tuple[str, ...]]]:
        """Commands recorded since ``log.clear()``, without the trackers' own."""
        return [
            (port, args)
            for port, args in self.log.commands
            if args[0].upper() not in TRACKER_COMMANDS
        ]

    def tracking(self) -> bool:
        states = self.near.stats.tracking
        return bool(states) and all(state == "tracking" for state in states.values())


async def from_memory(
    instance: NearInstance, agent: httpx.AsyncClient, path: str, within: float = 10.0
) -> httpx.Response:
    """GET ``path`` until one request sends no command: answered from memory.

    A read is not kept when an invalidation of one of its keys arrives while it
    is in flight (also the one of the setup write just before it), so the copy
    may take a few requests. Returns the zero-command response."""
    deadline = time.monotonic() + within
    while True:
        instance.log.clear()
        response = await agent.get(path)
        assert response.status_code == 200, (path, response.status_code, response.text)
        sent = instance.request_commands()
        if not sent:
            return response
        assert time.monotonic() < deadline, f"{path} still sends {sent[:6]} after {within} s"
        await asyncio.sleep(0.02)


async def until_changed(
    agent: httpx.AsyncClient, path: str, old: str, within: float = 3.0
) -> httpx.Response:
    """GET ``path`` until it no longer answers ``old`` (a 200 either way)."""
    deadline = time.monotonic() + within
    while True:
        response = await agent.get(path)
        assert response.status_code == 200, (path, response.status_code, response.text)
        if response.text != old:
            return response
        assert time.monotonic() < deadline, f"{path} still answers {old!r} after {within} s"
        await asyncio.sleep(0.02)


def same_user_agent(app: ASGIApp, other: httpx.AsyncClient) -> httpx.AsyncClient:
    """A user agent on ``app`` holding ``other``'s session cookie (the load
    balancer sent the same user to another instance)."""
    agent = browser(app)
    agent.cookies.set(COOKIE, other.cookies[COOKIE])
    return agent


async def cluster_instance(
    cluster: ClusterDeployment, calls: Calls, *, heartbeat: float = 60, heartbeat_timeout: float = 5
) -> NearInstance:
    """An instance with its own recorded ``RedisCluster`` client on ``cluster``
    and its own NearCache (a 60 s heartbeat unless a test needs the trackers
    to notice a topology change)."""
    log = CommandLog()
    client = RedisCluster(
        startup_nodes=[ClusterNode(HOST, port) for port in cluster.ports],
        socket_timeout=2,
        socket_connect_timeout=2,
    )
    recording = log.connection_class()
    client.connection_kwargs["connection_class"] = recording
    for node in client.startup_nodes:
        node.connection_class = recording
    await client.initialize()
    near = NearCache(heartbeat=heartbeat, heartbeat_timeout=heartbeat_timeout)
    return NearInstance(client, near, log, calls)


async def near_tracking(*instances: NearInstance, within: float = 10.0) -> None:
    """Wait until each instance tracks every master; its first requests (a
    cached page, a session) are what make its views and start the trackers."""
    deadline = time.monotonic() + within
    for instance in instances:
        async with browser(instance.app) as agent:
            assert (await agent.get("/items/warm-up")).status_code == 200
            assert (await agent.get("/visits")).status_code == 200
        while not instance.tracking():
            assert time.monotonic() < deadline, f"not tracking: {instance.near.stats.tracking}"
            await asyncio.sleep(0.02)


async def entry_of(cluster: ClusterDeployment, agent: httpx.AsyncClient, path: str) -> str:
    """GET ``path`` (a MISS on an empty cache) and return the entry key it stored."""
    before = set(cluster.all_keys())
    response = await agent.get(path)
    assert (response.status_code, response.headers.get("x-cache")) == (200, "MISS"), response
    [entry] = [k for k in set(cluster.all_keys()) - before if ":e:" in k]
    return entry


async def pages_on_masters(
    cluster: ClusterDeployment, agent: httpx.AsyncClient, wanted: int
) -> dict[int, str]:
    """Cached pages /items/<n> whose entries are on ``wanted`` different
    masters: {master port: path}."""
    found: dict[int, str] = {}
    for n in range(60):
        path = f"/items/{n}"
        entry = await entry_of(cluster, agent, path)
        found.setdefault(cluster.owner_of(cluster.keyslot(entry)), path)
        if len(found) >= wanted:
            return found
    raise AssertionError(f"entries landed on only {sorted(found)}")


async def sessions_on_masters(
    cluster: ClusterDeployment, app: ASGIApp, wanted: int
) -> dict[int, httpx.AsyncClient]:
    """User agents whose sessions are on ``wanted`` different masters."""
    found: dict[int, httpx.AsyncClient] = {}
    for _ in range(60):
        agent = browser(app)
        assert (await agent.get("/visits")).text == "1"
        owner = cluster.owner_of(cluster.keyslot(f"ark:s:{session_id(agent)}"))
        if owner in found:
            await agent.aclose()
            continue
        found[owner] = agent
        if len(found) >= wanted:
            return found
    raise AssertionError(f"sessions landed on only {sorted(found)}")
