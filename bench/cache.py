"""Response-cache scenarios: ours vs fastapi-cache2, cashews (plain and client_side),
aiocache (asgi-caches when it can run), plus a no-cache reference line, and a
two-instance coherence check of cashews' client-side cache.

Every tool serves the same FastAPI app shape (the peers are FastAPI-first) with the same
handler work, configured the way its README shows, with its Redis backend on the bench's
server. A handler-call counter per tool and route proves hits are hits and misses misses.
"""

# The peers' decorators and aiocache are untyped; asgi_caches is probed, not installed.
# mypy: disable-error-code="untyped-decorator,import-untyped,import-not-found,unused-ignore"
from __future__ import annotations

import asyncio
import contextlib
import statistics
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlparse

from fastapi import FastAPI
from fastapi.responses import HTMLResponse
from redis.asyncio import Redis
from starlette.types import ASGIApp

from ._asgi import Lifespan, Reply, call
from ._measure import Case, Plan, Row, Scenario, measure
from ._server import free_port
from ._traffic import Traffic

TTL = 600
SLOW_SECONDS = 0.05
STAMPEDE = 100
TRIALS = 3

JSON_PAYLOAD: dict[str, Any] = {
    "id": 1,
    "name": "widget",
    "price": 9.99,
    "stock": 42,
    "tags": ["blue", "small", "sale"],
    "description": "A small JSON document, the typical API answer.",
    # ~1 KB in all, the size the speed targets name.
    "variants": [
        {"sku": f"W-{i:03d}", "colour": c, "size": z, "price": 9.99 + i, "in_stock": i % 3 != 0}
        for i, (c, z) in enumerate(
            (c, z) for c in ("blue", "red", "green", "black") for z in ("small", "medium", "large")
        )
    ],
}


def _html_page(size: int = 20 * 1024) -> str:
    row = "<tr><td>item {i}</td><td>description of item {i}</td><td>{p:.2f}</td></tr>\n"
    head = "<!doctype html><html><head><title>catalogue</title></head><body><table>\n"
    parts = [head]
    total, i = len(head), 0
    while total < size - 30:
        part = row.format(i=i, p=i * 1.5)
        parts.append(part)
        total += len(part)
        i += 1
    parts.append("</table></body></html>")
    return "".join(parts)[:size]


HTML_PAGE = _html_page()


@dataclass
class Tool:
    name: str
    app: ASGIApp
    calls: Counter[str]
    ours: bool = False
    reference: bool = False
    note: str = ""
    closers: list[Callable[[], Awaitable[Any]]] = field(default_factory=list)
    routes: set[str] = field(default_factory=lambda: {"json", "html", "miss", "slow"})
    # Ours: the Cache's counters (near_hits proves a near row is served from memory).
    stats: Any = None


def _client(url: str) -> Redis:
    return Redis.from_url(url)


# ---------------------------------------------------------------- the tools


def _baseline(url: str) -> Tool:
    calls: Counter[str] = Counter()
    app = FastAPI()

    @app.get("/json")
    async def json_route() -> dict[str, Any]:
        calls["json"] += 1
        return JSON_PAYLOAD

    @app.get("/html", response_class=HTMLResponse)
    async def html_route() -> str:
        calls["html"] += 1
        return HTML_PAGE

    @app.get("/miss")
    async def miss_route(q: int) -> dict[str, Any]:
        calls["miss"] += 1
        return {"q": q, **JSON_PAYLOAD}

    return Tool(
        "no cache (FastAPI handler every time)",
        app,
        calls,
        reference=True,
        note="reference: the handler runs every time",
        routes={"json", "html", "miss"},
    )


OURS_NEAR = "asgi_redis_kit (near cache)"


def _ours(url: str, *, near: bool = False) -> Tool:
    from asgi_redis_kit import Cache, CacheMiddleware, NearCache, cached

    calls: Counter[str] = Counter()
    client = _client(url)
    app = FastAPI()
    # A NearCache of its own (not the shared one), so this tool's entries and
    # trackers are nobody else's and close with it.
    near_cache = NearCache() if near else None
    # Its own key prefix too: on the shared bench server it must not find the
    # entries the plain row stored (its handler has to run, and store, itself).
    prefix = "ark:near:" if near else "ark:c:"
    cache = Cache(redis=client, key_prefix=prefix, near_cache=near_cache or False)
    app.add_middleware(CacheMiddleware, cache=cache)

    @app.get("/json")
    @cached(ttl=TTL)
    async def json_route() -> dict[str, Any]:
        calls["json"] += 1
        return JSON_PAYLOAD

    @app.get("/html", response_class=HTMLResponse)
    @cached(ttl=TTL)
    async def html_route() -> str:
        calls["html"] += 1
        return HTML_PAGE

    @app.get("/miss")
    @cached(ttl=TTL)
    async def miss_route(q: int) -> dict[str, Any]:
        calls["miss"] += 1
        return {"q": q, **JSON_PAYLOAD}

    @app.get("/slow")
    @cached(ttl=TTL)
    async def slow_route() -> dict[str, Any]:
        calls["slow"] += 1
        await asyncio.sleep(SLOW_SECONDS)
        return JSON_PAYLOAD

    closers: list[Callable[[], Awaitable[Any]]] = [client.aclose]
    if near_cache is not None:
        closers.insert(0, near_cache.aclose)
        return Tool(
            OURS_NEAR,
            app,
            calls,
            note="near_cache=NearCache(): hits from process memory, kept exact by CLIENT TRACKING",
            closers=closers,
            stats=cache.stats,
        )
    return Tool("asgi_redis_kit", app, calls, ours=True, closers=closers, stats=cache.stats)


def _fastapi_cache2(url: str) -> Tool:
    from fastapi_cache import FastAPICache
    from fastapi_cache.backends.redis import RedisBackend
    from fastapi_cache.decorator import cache

    calls: Counter[str] = Counter()
    client = _client(url)
    # Its README: FastAPICache.init(RedisBackend(redis), prefix=...) at startup. It
    # is one global whose init() ignores every call after the first: reset it, so
    # this app really gets the backend it is built with (scenario (f) builds twice).
    FastAPICache.reset()
    FastAPICache.init(RedisBackend(client), prefix="fastapi-cache")
    app = FastAPI()

    @app.get("/json")
    @cache(expire=TTL)
    async def json_route() -> dict[str, Any]:
        calls["json"] += 1
        return JSON_PAYLOAD

    @app.get("/html", response_class=HTMLResponse)
    @cache(expire=TTL)
    async def html_route() -> str:
        calls["html"] += 1
        return HTML_PAGE

    @app.get("/miss")
    @cache(expire=TTL)
    async def miss_route(q: int) -> dict[str, Any]:
        calls["miss"] += 1
        return {"q": q, **JSON_PAYLOAD}

    @app.get("/slow")
    @cache(expire=TTL)
    async def slow_route() -> dict[str, Any]:
        calls["slow"] += 1
        await asyncio.sleep(SLOW_SECONDS)
        return JSON_PAYLOAD

    return Tool(
        "fastapi-cache2 0.2 (RedisBackend)",
        app,
        calls,
        note="caches the return value (JSON-coded), FastAPI re-serializes on a hit",
        closers=[client.aclose],
    )


def _cashews_cache(url: str, **options: Any) -> Any:
    from cashews import Cache

    cache = Cache()
    # Its README: cache.setup("redis://...") then @cache(ttl=...); the client-side
    # variant is cache.setup("redis://...", client_side=True).
    cache.setup(url, **options)
    return cache


CASHEWS = "cashews 7.6 (redis)"
CASHEWS_CS = "cashews 7.6 (redis, client_side=True)"
CASHEWS_ETAG = "cashews 7.6 + CacheEtagMiddleware"


def _cashews(url: str, *, etag: bool = False, client_side: bool = False) -> Tool:
    calls: Counter[str] = Counter()
    cache = _cashews_cache(url, client_side=True) if client_side else _cashews_cache(url)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> Any:
        await cache.init()
        yield
        await cache.close()

    app = FastAPI(lifespan=lifespan)
    if etag:
        from cashews.contrib.fastapi import CacheEtagMiddleware

        app.add_middleware(CacheEtagMiddleware, cache_instance=cache)

    @app.get("/json")
    @cache(ttl=TTL)
    async def json_route() -> dict[str, Any]:
        calls["json"] += 1
        return JSON_PAYLOAD

    @app.get("/html", response_class=HTMLResponse)
    @cache(ttl=TTL)
    async def html_route() -> str:
        calls["html"] += 1
        return HTML_PAGE

    @app.get("/miss")
    @cache(ttl=TTL)
    async def miss_route(q: int) -> dict[str, Any]:
        calls["miss"] += 1
        return {"q": q, **JSON_PAYLOAD}

    @app.get("/slow")
    @cache(ttl=TTL)
    async def slow_route() -> dict[str, Any]:
        calls["slow"] += 1
        await asyncio.sleep(SLOW_SECONDS)
        return JSON_PAYLOAD

    @app.get("/slow-lock")
    @cache(ttl=TTL, lock=True)
    async def slow_lock_route() -> dict[str, Any]:
        calls["slow-lock"] += 1
        await asyncio.sleep(SLOW_SECONDS)
        return JSON_PAYLOAD

    if etag:
        return Tool(
            CASHEWS_ETAG,
            app,
            calls,
            note="ETag middleware from cashews.contrib.fastapi (a BaseHTTPMiddleware)",
            routes={"json"},
        )
    if client_side:
        return Tool(
            CASHEWS_CS,
            app,
            calls,
            note="a hit is served from an in-process copy (BCAST tracking on prefix cashews:); "
            "pickled return value, FastAPI re-serializes",
            routes={"json", "html", "miss", "slow", "slow-lock"},
        )
    return Tool(
        CASHEWS,
        app,
        calls,
        note="caches the return value (pickled), FastAPI re-serializes on a hit",
        routes={"json", "html", "miss", "slow", "slow-lock"},
    )


def _aiocache(url: str) -> Tool:
    from aiocache import Cache, cached, cached_stampede
    from aiocache.serializers import PickleSerializer

    calls: Counter[str] = Counter()
    parsed = urlparse(url)
    # Its README: @cached(ttl=..., cache=Cache.REDIS, serializer=PickleSerializer(), ...) on a
    # coroutine. It caches that function's return value, not the HTTP response.
    options: dict[str, Any] = {
        "ttl": TTL,
        "cache": Cache.REDIS,
        "endpoint": parsed.hostname,
        "port": parsed.port,
        "namespace": "aiocache",
        "serializer": PickleSerializer(),
    }

    @cached(**options)
    async def get_json() -> dict[str, Any]:
        calls["json"] += 1
        return JSON_PAYLOAD

    @cached(**options)
    async def get_html() -> str:
        calls["html"] += 1
        return HTML_PAGE

    @cached(**options)
    async def get_miss(q: int) -> dict[str, Any]:
        calls["miss"] += 1
        return {"q": q, **JSON_PAYLOAD}

    @cached(**options)
    async def get_slow() -> dict[str, Any]:
        calls["slow"] += 1
        await asyncio.sleep(SLOW_SECONDS)
        return JSON_PAYLOAD

    @cached_stampede(lease=2, **options)
    async def get_slow_lock() -> dict[str, Any]:
        calls["slow-lock"] += 1
        await asyncio.sleep(SLOW_SECONDS)
        return JSON_PAYLOAD

    app = FastAPI()

    @app.get("/json")
    async def json_route() -> dict[str, Any]:
        return await get_json()  # type: ignore[no-any-return]

    @app.get("/html", response_class=HTMLResponse)
    async def html_route() -> str:
        return await get_html()  # type: ignore[no-any-return]

    @app.get("/miss")
    async def miss_route(q: int) -> dict[str, Any]:
        return await get_miss(q)  # type: ignore[no-any-return]

    @app.get("/slow")
    async def slow_route() -> dict[str, Any]:
        return await get_slow()  # type: ignore[no-any-return]

    @app.get("/slow-lock")
    async def slow_lock_route() -> dict[str, Any]:
        return await get_slow_lock()  # type: ignore[no-any-return]

    closers = [f.cache.close for f in (get_json, get_html, get_miss, get_slow, get_slow_lock)]  # type: ignore[attr-defined]
    return Tool(
        "aiocache 0.12 (RedisCache)",
        app,
        calls,
        note="caches the handler's return value, not the HTTP response; FastAPI re-serializes",
        closers=closers,
        routes={"json", "html", "miss", "slow", "slow-lock"},
    )


def _asgi_caches(url: str) -> Tool:
    import asgi_caches  # noqa: F401  # not installable alongside starlette 1.x, see run()

    raise RuntimeError("unreachable")


ASGI_CACHES_NOTE = (
    "asgi-caches 0.3.1: not measured. It pins starlette==0.* (we run starlette 1.10) and its "
    "backend (async-caches -> aioredis 2.0.1) fails to import on Python 3.11 "
    "(`TypeError: duplicate base class TimeoutError`)."
)


FACTORIES: dict[str, Callable[[str], Tool]] = {
    "ours": _ours,
    "ours-near": lambda url: _ours(url, near=True),
    "fastapi-cache2": _fastapi_cache2,
    "cashews": _cashews,
    "cashews client_side": lambda url: _cashews(url, client_side=True),
    "cashews+etag": lambda url: _cashews(url, etag=True),
    "aiocache": _aiocache,
    "no-cache": _baseline,
}


def build_tools(url: str) -> tuple[list[Tool], list[str]]:
    tools: list[Tool] = []
    problems: list[str] = []
    for name, factory in FACTORIES.items():
        try:
            tools.append(factory(url))
        except Exception as exc:
            problems.append(f"cache: could not set up {name}: {type(exc).__name__}: {exc}")
    try:
        _asgi_caches(url)
    except Exception:
        problems.append(ASGI_CACHES_NOTE)
    return tools, problems


# ---------------------------------------------------------------- scenarios


def _near_hits(tool: Tool) -> int | None:
    return None if tool.name != OURS_NEAR or tool.stats is None else int(tool.stats.near_hits)


async def settle_near(tool: Tool, path: str, headers: list[tuple[bytes, bytes]]) -> None:
    """Repeat a request until the near cache answers it from memory: its tracking
    connection confirms asynchronously, and until then a lookup goes to Redis."""
    if _near_hits(tool) is None:
        return
    deadline = time.monotonic() + 10
    while True:
        before = _near_hits(tool)
        await call(tool.app, path, headers=headers)
        if _near_hits(tool) != before:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"{tool.name}: {path} never answered from memory within 10 s")
        await asyncio.sleep(0.01)


class _NearCheck:
    """For the near row: every checked request must be a near hit (stats.near_hits
    grows by one), not a Redis hit. ``mark()`` before the request, ``check()`` after."""

    def __init__(self, tool: Tool) -> None:
        self.tool = tool
        self.before: int | None = None

    def mark(self) -> None:
        self.before = _near_hits(self.tool)

    def check(self) -> str | None:
        now, before = _near_hits(self.tool), self.before
        if now is not None and before is not None and now != before + 1:
            return f"not a near hit: stats.near_hits went {before} -> {now}"
        return None


def _hit_case(tool: Tool, route: str) -> Case:
    path = f"/{route}"
    near = _NearCheck(tool)

    async def send(i: int) -> Reply:
        near.mark()
        return await call(tool.app, path)

    def check(reply: Reply) -> str | None:
        if reply.status != 200:
            return f"HTTP {reply.status}: {reply.body[:80]!r}"
        if not tool.reference and tool.calls[route] != 1:
            return f"not a hit: handler ran {tool.calls[route]} times"
        return near.check()

    return Case(tool.name, send, check, ours=tool.ours, reference=tool.reference, note=tool.note)


def _miss_case(tool: Tool) -> Case:
    sent = [0]
    base = tool.calls["miss"]

    async def send(i: int) -> Reply:
        sent[0] += 1
        return await call(tool.app, "/miss", query=f"q={i}")

    def check(reply: Reply) -> str | None:
        if reply.status != 200:
            return f"HTTP {reply.status}: {reply.body[:80]!r}"
        if tool.calls["miss"] - base != sent[0]:
            ran = tool.calls["miss"] - base
            return f"not a miss: {sent[0]} requests, handler ran {ran} times"
        return None

    return Case(tool.name, send, check, ours=tool.ours, reference=tool.reference, note=tool.note)


async def _stores(tool: Tool) -> str | None:
    """A miss must also store: the same request again may not run the handler."""
    before = tool.calls["miss"]
    await call(tool.app, "/miss", query="q=-1")
    await call(tool.app, "/miss", query="q=-1")
    if not tool.reference and tool.calls["miss"] != before + 1:
        return "a repeated request ran the handler again (nothing stored)"
    return None


async def _etag_case(tool: Tool) -> Case | Row:
    first = await call(tool.app, "/json")
    second = await call(tool.app, "/json")
    etag = second.header("etag") or first.header("etag")
    if etag is None:
        return Row(tool.name, reference=tool.reference, note="no ETag / If-None-Match support")
    headers = [(b"if-none-match", etag.encode())]
    await settle_near(tool, "/json", headers)
    near = _NearCheck(tool)

    async def send(i: int) -> Reply:
        near.mark()
        return await call(tool.app, "/json", headers=headers)

    def check(reply: Reply) -> str | None:
        if reply.status != 304:
            return f"If-None-Match {etag!r} answered {reply.status}, not 304"
        return near.check()

    return Case(tool.name, send, check, ours=tool.ours, note=tool.note)


async def _stampede(tool: Tool, admin: Redis, route: str, label: str) -> Row:
    """TRIALS bursts on a cold key (Redis flushed before each); handler runs per burst."""
    row = Row(label, ours=tool.ours and route == "slow")
    runs: list[int] = []
    times: list[float] = []
    bad: Counter[int] = Counter()
    commands: Counter[str] = Counter()
    sent = round_trips = connections = 0
    try:
        for _ in range(TRIALS):
            await admin.flushdb()
            tool.calls[route] = 0
            async with Traffic(admin) as traffic:
                start = time.perf_counter()
                burst = (call(tool.app, f"/{route}") for _ in range(STAMPEDE))
                replies = await asyncio.wait_for(asyncio.gather(*burst), 60)
                times.append(time.perf_counter() - start)
            runs.append(tool.calls[route])
            bad.update(r.status for r in replies if r.status != 200)
            commands.update(traffic.commands)
            sent += sum(traffic.sent.values())
            round_trips += traffic.round_trips
            connections += traffic.connections
        total = STAMPEDE * TRIALS
        row.correctness = f"handler ran {', '.join(map(str, runs))}x (per burst of {STAMPEDE})"
        if bad:
            row.correctness += f"; errors {dict(bad)}"
        row.cmds = sum(commands.values()) / total
        row.sent = sent / total
        row.round_trips = round_trips / total
        row.breakdown = ", ".join(f"{k} {v / total:.2g}" for k, v in commands.most_common())
        row.note = (
            f"burst median {statistics.median(times) * 1000:.0f} ms (handler sleeps "
            f"{SLOW_SECONDS * 1000:.0f} ms); {connections / TRIALS:.0f} new Redis connections "
            "per burst"
        )
        if 0 in runs:
            row.note += (
                "; 0x = that burst was served from an in-process copy that outlived the "
                "FLUSHDB before it (no invalidation reached it, see Cache (g))"
            )
    except Exception as exc:
        row.error = f"{type(exc).__name__}: {exc}"[:160]
    return row


def _lock_label(tool: Tool) -> str:
    if tool.name == CASHEWS_CS:
        return "cashews client_side (lock=True)"
    return "cashews (lock=True)" if tool.name == CASHEWS else "aiocache cached_stampede"


async def _outage(tool: Tool, route: str, label: str) -> Row:
    """TRIALS bursts while the tool's Redis refuses connections: what the clients
    get, and how often the handler runs per burst."""
    row = Row(label, ours=tool.ours and route == "slow")
    runs: list[int] = []
    answers: Counter[str] = Counter()
    try:
        for _ in range(TRIALS):
            tool.calls[route] = 0
            burst = (call(tool.app, f"/{route}") for _ in range(STAMPEDE))
            replies = await asyncio.wait_for(asyncio.gather(*burst, return_exceptions=True), 60)
            runs.append(tool.calls[route])
            answers.update(
                str(r.status) if isinstance(r, Reply) else f"raised {type(r).__name__}"
                for r in replies
            )
        total = STAMPEDE * TRIALS
        shown = ", ".join(f"{k} x{v}" for k, v in sorted(answers.items()))
        row.correctness = (
            f"answers {shown} (of {total}); handler ran {', '.join(map(str, runs))}x "
            f"(per burst of {STAMPEDE})"
        )
    except Exception as exc:
        row.error = f"{type(exc).__name__}: {exc}"[:160]
    return row


async def _outage_scenario() -> tuple[Scenario, list[str]]:
    """The same tools, each pointed at a port where no Redis listens."""
    tools, problems = build_tools(f"redis://127.0.0.1:{free_port()}/0")
    tools = [t for t in tools if "slow" in t.routes or "slow-lock" in t.routes]
    rows: list[Row] = []
    for tool in tools:
        try:
            async with Lifespan(tool.app):
                if "slow" in tool.routes:
                    rows.append(await _outage(tool, "slow", tool.name))
                if "slow-lock" in tool.routes:
                    rows.append(await _outage(tool, "slow-lock", _lock_label(tool)))
        except Exception as exc:
            rows.append(Row(tool.name, ours=tool.ours, error=f"{type(exc).__name__}: {exc}"[:160]))
        finally:
            for close in tool.closers:
                with contextlib.suppress(Exception):
                    await close()
    scenario = Scenario(
        "cache-f",
        f"Cache (f): Redis down, {STAMPEDE} concurrent requests",
        f"The tools' Redis URL names a port nobody listens on; {STAMPEDE} concurrent GET /slow "
        f"(the handler sleeps {SLOW_SECONDS * 1000:.0f} ms), {TRIALS} bursts per tool. "
        "Ideal: every answer a 200, and the handler still runs once per burst.",
        rows,
    )
    return scenario, [p.replace("cache: ", "cache (f): ", 1) for p in problems]


COHERENCE_DELAYS = (0.01, 0.1, 0.5, 2.0)
CASHEWS_CS_README = "cashews client_side=True (README setup)"


async def _coherent_after(url: str, options: dict[str, Any], tag: str) -> str:
    """Two cashews instances on one Redis. Per delay: A stores "old", B reads it (and
    keeps its copy), A overwrites with "new", and after the delay B reads again."""
    a, b = _cashews_cache(url, **options), _cashews_cache(url, **options)
    await asyncio.wait_for(a.init(), 10)
    await asyncio.wait_for(b.init(), 10)
    seen: list[tuple[float, Any]] = []
    try:
        for delay in COHERENCE_DELAYS:
            key = f"coherence:{tag}:{delay}"
            await a.set(key, "old", expire=TTL)
            if await b.get(key) != "old":
                return f"setup failed: B did not read {key!r} back"
            await a.set(key, "new", expire=TTL)
            await asyncio.sleep(delay)
            seen.append((delay, await b.get(key)))
    finally:
        await a.close()
        await b.close()
    stale = [d for d, v in seen if v != "new"]
    shown = ", ".join(f"{d:g} s: {v!r}" for d, v in seen)
    if not stale:
        return f"coherent: B read the new value after every delay ({shown})"
    after = ", ".join(f"{d:g}" for d in stale)
    return f"stale: B still read the old value after {after} s ({shown})"


async def _coherence_scenario(url: str) -> Scenario:
    variants: list[tuple[str, dict[str, Any], str]] = [
        (
            CASHEWS_CS_README,
            {"client_side": True},
            "when stale: redis-py 8 opens RESP3 connections by default, and cashews waits "
            "for RESP2 pub/sub messages on __redis__:invalidate, which a RESP3 connection "
            "never gets (CLIENT LIST shows resp=3)",
        ),
        (
            "cashews client_side=True, protocol=2",
            {"client_side": True, "protocol": 2},
            "forcing RESP2 on the connection makes its BCAST listener see the invalidations",
        ),
        (CASHEWS, {}, "no local copy: every get reads Redis (the control)"),
    ]
    rows: list[Row] = []
    for i, (label, options, note) in enumerate(variants):
        row = Row(label, note=note)
        try:
            row.correctness = await asyncio.wait_for(_coherent_after(url, options, str(i)), 60)
            # The explanation belongs to the outcome it explains.
            if i == 0 and not row.correctness.startswith("stale"):
                row.note = ""
        except Exception as exc:
            row.error = f"{type(exc).__name__}: {exc}"[:160]
        rows.append(row)
    delays = "/".join(f"{d:g}" for d in COHERENCE_DELAYS)
    return Scenario(
        "cache-g",
        "Cache (g): two instances, one overwrites: does the other see it?",
        "Two cache instances (two app processes' worth) on one Redis. A stores a key, B "
        f"reads it, A overwrites it; B reads again after {delays} s. `coherent` = B got the "
        "new value every time, `stale` = B served its old in-process copy. Without "
        "`near_cache`, asgi_redis_kit keeps no in-process copy (every hit reads Redis); "
        "its near cache's invalidation lag between two instances is `python -m bench lag` "
        "(bench/results/lag.md).",
        rows,
    )


async def run(
    url: str, admin: Redis, plan: Plan, index: list[int]
) -> tuple[list[Scenario], list[str]]:
    tools, problems = build_tools(url)
    lifespans = [Lifespan(t.app) for t in tools]
    scenarios: list[Scenario] = []
    for lifespan in lifespans:
        await lifespan.__aenter__()
    try:
        await admin.flushdb()
        coherence = await _coherence_scenario(url)
        verdict = {r.tool: r.correctness for r in coherence.rows}.get(CASHEWS_CS_README, "")
        for tool in tools:
            if tool.name == CASHEWS_CS and verdict:
                tool.note += f"; two-instance check: {verdict.split(':')[0]} (Cache (g))"
        main = [t for t in tools if t.name != CASHEWS_ETAG]
        for route, key, title, what in (
            (
                "json",
                "cache-a",
                "Cache (a): hit on a small JSON route",
                f"GET /json, entry already stored ({len(str(JSON_PAYLOAD))}-byte dict).",
            ),
            (
                "html",
                "cache-b",
                "Cache (b): hit on a 20 KB HTML route",
                f"GET /html ({len(HTML_PAGE)} bytes, `response_class=HTMLResponse`), stored.",
            ),
        ):
            for tool in main:
                tool.calls[route] = 0
                await call(tool.app, f"/{route}")  # store the entry
                await settle_near(tool, f"/{route}", [])
            cases = [_hit_case(t, route) for t in main if route in t.routes]
            scenarios.append(Scenario(key, title, what, await measure(cases, admin, plan, index)))

        cases, early = [], []
        for tool in main:
            problem = await _stores(tool)
            if problem:
                early.append(Row(tool.name, ours=tool.ours, error=problem))
            else:
                cases.append(_miss_case(tool))
        rows = await measure(cases, admin, plan, index) + early
        scenarios.append(
            Scenario(
                "cache-c",
                "Cache (c): miss + store",
                "GET /miss?q=<never seen before>: key lookup, handler, store.",
                rows,
            )
        )

        etag_rows: list[Row] = []
        etag_cases: list[Case] = []
        for tool in tools:
            if tool.name in (CASHEWS, CASHEWS_CS) or tool.reference:
                continue
            found = await _etag_case(tool)
            if isinstance(found, Row):
                etag_rows.append(found)
            else:
                etag_cases.append(found)
        scenarios.append(
            Scenario(
                "cache-d",
                "Cache (d): conditional request, If-None-Match -> 304",
                "GET /json with the ETag the tool sent before; expect 304 without running "
                "the handler.",
                await measure(etag_cases, admin, plan, index) + etag_rows,
            )
        )

        stampede_rows: list[Row] = []
        for tool in main:
            if "slow" in tool.routes:
                stampede_rows.append(await _stampede(tool, admin, "slow", tool.name))
            if "slow-lock" in tool.routes:
                stampede_rows.append(await _stampede(tool, admin, "slow-lock", _lock_label(tool)))
        scenarios.append(
            Scenario(
                "cache-e",
                f"Cache (e): stampede, {STAMPEDE} concurrent cold requests",
                f"{STAMPEDE} concurrent GET /slow on an empty cache; the handler sleeps "
                f"{SLOW_SECONDS * 1000:.0f} ms, {TRIALS} bursts per tool. Ideal: it runs once per "
                "burst. Commands and round trips are per request, over all bursts.",
                stampede_rows,
            )
        )
        scenarios.append(coherence)
        outage, outage_problems = await _outage_scenario()
        scenarios.append(outage)
        problems += [p for p in outage_problems if p not in problems]
    finally:
        for lifespan in reversed(lifespans):
            await lifespan.__aexit__(None, None, None)
        for tool in tools:
            for close in tool.closers:
                with contextlib.suppress(Exception):  # best effort at shutdown
                    await close()
    return scenarios, problems
