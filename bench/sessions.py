"""Session scenarios: ours vs starsessions (Redis store) vs Starlette's cookie sessions.

All tools sit in front of the same Starlette app with the same handlers; only the
middleware stack differs. Every tool gets its own redis-py client on the bench server.
"""

from __future__ import annotations

import asyncio
import datetime
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
from redis.asyncio import Redis
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp

from ._asgi import CookieJar, Lifespan, Reply, call
from ._measure import Case, Plan, Row, Scenario, measure

CONCURRENCY = 32
SECRET = "bench-secret-key-0123456789abcdef0123456789abcdef"
LOGIN_DATA: dict[str, Any] = {
    "user": "alice",
    "visits": 0,
    "cart": [101, 202, 303],
    "csrf": "c" * 32,
}


# ---------------------------------------------------------------- the shared handlers


async def plain(request: Request) -> Response:
    return PlainTextResponse("ok")


async def login(request: Request) -> Response:
    request.session.update(LOGIN_DATA)
    return PlainTextResponse("ok")


async def read(request: Request) -> Response:
    session = request.session
    return PlainTextResponse(f"{session.get('user')} {session.get('visits')}")


async def visit(request: Request) -> Response:
    session = request.session
    session["visits"] = session.get("visits", 0) + 1
    return PlainTextResponse(f"Número de visitas: {session['visits']}")


async def visit_incr(request: Request) -> Response:
    visits = await request.session.incr("visits")  # type: ignore[attr-defined]
    return PlainTextResponse(f"Número de visitas: {visits}")


async def set_key(request: Request) -> Response:
    request.session[request.path_params["key"]] = 1
    return PlainTextResponse("ok")


async def dump(request: Request) -> Response:
    return Response(orjson.dumps(dict(request.session)), media_type="application/json")


ROUTES = [
    Route("/plain", plain),
    Route("/login", login),
    Route("/read", read),
    Route("/visit", visit),
    Route("/visit-incr", visit_incr),
    Route("/set/{key}", set_key),
    Route("/dump", dump),
]


# ---------------------------------------------------------------- the tools


@dataclass
class Tool:
    name: str
    app: ASGIApp
    ours: bool = False
    reference: bool = False
    client: Redis | None = None
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    closers: list[Callable[[], Awaitable[Any]]] = field(default_factory=list)


OURS_NEAR = "asgi_redis_kit (near cache)"


def _ours(url: str, *, near: bool = False) -> Tool:
    from asgi_redis_kit import NearCache, SessionMiddleware

    client = Redis.from_url(url)
    # Its own NearCache (not the shared one): nobody else's entries, closed with it.
    near_cache = NearCache() if near else None
    app = Starlette(
        routes=ROUTES,
        middleware=[
            Middleware(
                SessionMiddleware,
                secret_key=SECRET,
                redis=client,
                near_cache=near_cache or False,
            )
        ],
    )
    if near_cache is not None:
        return Tool(
            OURS_NEAR,
            app,
            client=client,
            note="near_cache=NearCache(): loads from process memory, kept exact by CLIENT TRACKING",
            closers=[near_cache.aclose],
        )
    return Tool("asgi_redis_kit", app, ours=True, client=client)


def _starsessions(url: str) -> Tool:
    from starsessions import SessionAutoloadMiddleware
    from starsessions import SessionMiddleware as StarSessionMiddleware
    from starsessions.stores.redis import RedisStore

    client = Redis.from_url(url)
    # As its README shows: a Redis store, autoload on every request, a 14-day lifetime.
    app = Starlette(
        routes=ROUTES,
        middleware=[
            Middleware(
                StarSessionMiddleware,
                store=RedisStore(connection=client),
                lifetime=datetime.timedelta(days=14),
                cookie_https_only=False,
            ),
            Middleware(SessionAutoloadMiddleware),
        ],
    )
    return Tool("starsessions 2.2 + RedisStore", app, client=client)


def _starlette_cookie(url: str) -> Tool:
    from starlette.middleware.sessions import SessionMiddleware as CookieSessionMiddleware

    app = Starlette(
        routes=ROUTES,
        middleware=[Middleware(CookieSessionMiddleware, secret_key=SECRET, https_only=False)],
    )
    return Tool(
        "starlette SessionMiddleware (cookie, no Redis)",
        app,
        reference=True,
        note="reference: data lives in the cookie, so no server-side revoke/logout-everywhere",
    )


FACTORIES: dict[str, Callable[[str], Tool]] = {
    "ours": _ours,
    "ours-near": lambda url: _ours(url, near=True),
    "starsessions": _starsessions,
    "starlette-cookie": _starlette_cookie,
}


def build_tools(url: str) -> tuple[list[Tool], list[str]]:
    tools: list[Tool] = []
    problems: list[str] = []
    for factory in FACTORIES.values():
        try:
            tools.append(factory(url))
        except Exception as exc:
            problems.append(f"{factory.__name__.strip('_')}: {type(exc).__name__}: {exc}")
    return tools, problems


# ---------------------------------------------------------------- scenarios


def _expect(status: int = 200) -> Callable[[Reply], str | None]:
    def check(reply: Reply) -> str | None:
        if reply.status != status:
            return f"HTTP {reply.status}: {reply.body[:80]!r}"
        return None

    return check


async def _login(app: ASGIApp) -> CookieJar:
    jar = CookieJar()
    reply = await call(app, "/login")
    if reply.status != 200:
        raise RuntimeError(f"/login answered {reply.status}: {reply.body[:80]!r}")
    jar.update(reply)
    if not jar.cookies:
        raise RuntimeError("/login set no cookie")
    return jar


def _sender(app: ASGIApp, path: str, jar: CookieJar | None) -> Callable[[int], Awaitable[Reply]]:
    if jar is None:

        async def send_plain(i: int) -> Reply:
            return await call(app, path)

        return send_plain

    async def send(i: int) -> Reply:
        reply = await call(app, path, headers=jar.header())
        jar.update(reply)  # a cookie-based session changes its cookie on every write
        return reply

    return send


async def _timed(
    tools: list[Tool],
    admin: Redis,
    plan: Plan,
    index: list[int],
    path: str,
    *,
    cookie: bool,
    concurrency: int = 1,
) -> list[Row]:
    cases: list[Case] = []
    for tool in tools:
        jar = await _login(tool.app) if cookie else None
        workers = None
        if concurrency > 1:
            # One user per concurrent client, each with its own session.
            jars = [await _login(tool.app) if cookie else None for _ in range(concurrency)]
            workers = [_sender(tool.app, path, j) for j in jars]
        probe = await call(tool.app, path, headers=jar.header() if jar else [])
        sets = "answers with Set-Cookie" if probe.set_cookies() else "no Set-Cookie"
        cases.append(
            Case(
                tool.name,
                _sender(tool.app, path, jar),
                _expect(),
                ours=tool.ours,
                reference=tool.reference,
                note="; ".join(filter(None, [sets, tool.note])),
                workers=workers,
            )
        )
        if tool.ours and path == "/visit" and concurrency == 1:
            jar2 = await _login(tool.app)
            cases.append(
                Case(
                    f"{tool.name} (await session.incr)",
                    _sender(tool.app, "/visit-incr", jar2),
                    _expect(),
                    note="atomic HINCRBY instead of read-modify-write",
                )
            )
    return await measure(cases, admin, plan, index)


async def _concurrent(app: ASGIApp, paths: list[str], jar: CookieJar) -> dict[str, Any]:
    """All requests share the cookie the client held before the burst; Set-Cookie
    answers are then applied in completion order, as a browser would."""
    headers = jar.header()
    finished: list[Reply] = []

    async def one(path: str) -> None:
        finished.append(await call(app, path, headers=headers))

    await asyncio.wait_for(asyncio.gather(*(one(p) for p in paths)), 60)
    for reply in finished:
        jar.update(reply)
    bad = [r.status for r in finished if r.status != 200]
    final = await call(app, "/dump", headers=jar.header())
    data: dict[str, Any] = orjson.loads(final.body) if final.status == 200 else {}
    return {"data": data, "errors": bad}


async def _correctness(tools: list[Tool], keys: int, incs: int) -> tuple[list[Row], list[Row]]:
    key_rows: list[Row] = []
    counter_rows: list[Row] = []
    for tool in tools:
        row = Row(tool.name, ours=tool.ours, reference=tool.reference)
        mine = tool.ours or tool.name == OURS_NEAR
        if mine:
            row.note = "only changed fields are written (HSET per field)"
        elif not tool.reference:
            row.note = "whole session rewritten on save: last writer wins"
        try:
            jar = await _login(tool.app)
            out = await _concurrent(tool.app, [f"/set/k{i}" for i in range(keys)], jar)
            kept = sum(1 for i in range(keys) if f"k{i}" in out["data"])
            row.correctness = f"{kept}/{keys} keys kept, {keys - kept} lost"
            if out["errors"]:
                row.correctness += f" ({len(out['errors'])} errors: {sorted(set(out['errors']))})"
        except Exception as exc:
            row.error = f"{type(exc).__name__}: {exc}"[:160]
        key_rows.append(row)

        variants = [("/visit", tool.name)]
        if mine:
            variants.append(("/visit-incr", f"{tool.name} (await session.incr)"))
        for path, label in variants:
            crow = Row(label, ours=tool.ours and path == "/visit", reference=tool.reference)
            if mine:
                crow.note = (
                    "atomic HINCRBY"
                    if path == "/visit-incr"
                    else "read-modify-write of one key: no store can merge that; use incr()"
                )
            try:
                jar = await _login(tool.app)
                out = await _concurrent(tool.app, [path] * incs, jar)
                final = int(out["data"].get("visits", 0))
                crow.correctness = f"visits = {final}/{incs}, {incs - final} lost updates"
                if out["errors"]:
                    crow.correctness += f" ({len(out['errors'])} errors)"
            except Exception as exc:
                crow.error = f"{type(exc).__name__}: {exc}"[:160]
            counter_rows.append(crow)
    return key_rows, counter_rows


async def run(
    url: str, admin: Redis, plan: Plan, index: list[int]
) -> tuple[list[Scenario], list[str]]:
    tools, problems = build_tools(url)
    scenarios: list[Scenario] = []
    apps = [Lifespan(t.app) for t in tools]
    for lifespan in apps:
        await lifespan.__aenter__()
    try:
        await admin.flushdb()
        scenarios.append(
            Scenario(
                "sessions-a",
                "Sessions (a): no cookie, handler ignores the session",
                "GET /plain with no cookie. The ideal is 0 Redis commands and no Set-Cookie.",
                await _timed(tools, admin, plan, index, "/plain", cookie=False),
            )
        )
        scenarios.append(
            Scenario(
                "sessions-b",
                "Sessions (b): valid cookie, read-only",
                "GET /read with a logged-in cookie (4 keys in the session); the handler reads "
                "two of them and writes nothing.",
                await _timed(tools, admin, plan, index, "/read", cookie=True),
            )
        )
        scenarios.append(
            Scenario(
                "sessions-c",
                "Sessions (c): valid cookie, read + write (visit counter)",
                "GET /visit: `session['visits'] = session.get('visits', 0) + 1`; ours also with "
                "`await request.session.incr('visits')`.",
                await _timed(tools, admin, plan, index, "/visit", cookie=True),
            )
        )
        scenarios.append(
            Scenario(
                "sessions-c32",
                f"Sessions (c32): visit counter, {CONCURRENCY} concurrent clients",
                f"GET /visit as in (c), from {CONCURRENCY} concurrent clients, each its own "
                "logged-in user; requests/s is the whole round's, latency per request.",
                await _timed(
                    tools, admin, plan, index, "/visit", cookie=True, concurrency=CONCURRENCY
                ),
            )
        )
        keys, counters = await _correctness(tools, 50, 100)
        scenarios.append(
            Scenario(
                "sessions-d1",
                "Sessions (d1): 50 concurrent requests, one cookie, each sets a different key",
                "All 50 start from the same cookie; then GET /dump counts the keys that survived.",
                keys,
            )
        )
        scenarios.append(
            Scenario(
                "sessions-d2",
                "Sessions (d2): 100 concurrent visit-counter increments, one cookie",
                "Final `visits` after 100 concurrent GET /visit (and /visit-incr for ours).",
                counters,
            )
        )
    finally:
        for lifespan in reversed(apps):
            await lifespan.__aexit__(None, None, None)
        for tool in tools:
            for close in tool.closers:
                await close()
            if tool.client is not None:
                await tool.client.aclose()
    return scenarios, problems
