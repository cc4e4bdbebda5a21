"""Request helpers shared by the Starlette app and its FastAPI twin.

Both apps call these so that their behaviour cannot drift apart: only routing
and the framework's own idioms differ between ``starlette_app`` and
``fastapi_app``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qs, urlsplit

from starlette.datastructures import MutableHeaders
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from asgi_redis_kit import (
    BackendUnavailable,
    Cache,
    CacheMiddleware,
    FleetFlusher,
    Memoized,
    Metrics,
    Session,
    SessionMiddleware,
    SessionStore,
    fleet_stats,
    get_cache,
)

from . import pages
from .pages import Status
from .settings import COOKIE_NAME, COOKIE_PATH, RATE_TAG, RATE_TTL, Settings

MAX_FORM_BYTES = 4096
MAX_NAME_LENGTH = 40


def settings_of(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


def monitoring(settings: Settings) -> tuple[Metrics, FleetFlusher]:
    """What both apps export: ``Metrics`` (given to the middlewares below, read
    by /metrics) and the flusher that adds this instance's counters into Redis
    for /stats, run by :func:`lifespan`."""
    metrics = Metrics()
    flusher = FleetFlusher(
        metrics,
        settings.redis_url,
        instance=settings.instance,
        interval=settings.metrics_interval,
        key_prefix=settings.metrics_prefix,
    )
    return metrics, flusher


def lifespan(flusher: FleetFlusher) -> Callable[[Any], AbstractAsyncContextManager[None]]:
    """The apps' lifespan: the fleet flusher runs while the app does, and
    flushes what is left at shutdown."""

    @asynccontextmanager
    async def run(app: Any) -> AsyncIterator[None]:
        async with flusher:
            yield

    return run


async def stats(request: Request) -> str:
    """/stats: the fleet's last 15 minutes, from Redis."""
    flusher: FleetFlusher = request.app.state.fleet
    try:
        fleet = await fleet_stats(flusher.backend, minutes=15, key_prefix=flusher.key_prefix)
    except BackendUnavailable:
        fleet = None
    return pages.stats_page(fleet=fleet, interval=flusher.interval, status=status_of(request))


def middleware(
    settings: Settings, framework: str, metrics: Metrics | None = None
) -> tuple[list[Middleware], SessionStore]:
    """Both apps' middleware, outermost first, and the session store inside it.

    The cache wraps the sessions so a HIT is answered without loading a session.
    The store is made here so /healthz can ask it about Redis; SessionMiddleware
    still closes it at lifespan shutdown.

    Both use the near cache, the recommended setting: ``near_cache=True`` is the
    process-wide ``NearCache.shared()``, so the cache and the sessions keep their
    Redis values in this process's memory behind one tracking connection, and
    Redis (CLIENT TRACKING) tells every instance when a value changes. A
    repeated cached page or a read-only session then costs no Redis command.
    The embedded memory:// Redis has no tracking: there both run without it.
    """
    store = SessionStore(settings.redis_url, near_cache=True)
    stack = [
        Middleware(ExposeCacheStatus, instance=settings.instance, framework=framework),
        # The cache learns the session cookie's name from SessionMiddleware.
        Middleware(CacheMiddleware, redis=settings.redis_url, near_cache=True, metrics=metrics),
        Middleware(
            SessionMiddleware,
            secret_key=settings.secret_key,
            store=store,
            cookie_name=COOKIE_NAME,
            path=COOKIE_PATH,
            metrics=metrics,
        ),
    ]
    return stack, store


async def health(request: Request) -> dict[str, Any]:
    """/healthz: "ok", or "degraded" when Redis does not answer (sessions then
    answer 503 and the cache steps aside, but the instance still serves)."""
    settings = settings_of(request)
    store: SessionStore = request.app.state.store
    redis_ok = await store.ping()
    return {
        "status": "ok" if redis_ok else "degraded",
        "redis_reachable": redis_ok,
        "app": "asgi_redis_kit example",
        "framework": request.app.state.framework,
        "instance": settings.instance,
        "redis": settings.redis_label,
        "near_cache": near_cache_state(store, get_cache(request)),
    }


def near_cache_state(store: SessionStore, cache: Cache) -> dict[str, Any]:
    """What /healthz says of the near cache (one, shared by the cache and the
    sessions). ``state``: "tracking" once Redis confirmed tracking on every node,
    "off" on a Redis without tracking (the embedded one), "idle" before the
    first request that needed it, else the trackers' states ("connecting",
    "lost": everything goes to Redis meanwhile). ``hits`` and ``misses``: this
    instance's cache lookups answered from memory, and sent to Redis."""
    stats = store.near_stats
    state = "off" if stats is None else "/".join(sorted(set(stats.tracking.values()))) or "idle"
    return {"state": state, "hits": cache.stats.near_hits, "misses": cache.stats.near_misses}


def status_of(request: Request) -> Status:
    settings = settings_of(request)
    return Status(
        instance=settings.instance,
        framework=request.app.state.framework,
        redis=settings.redis_label,
    )


async def home(request: Request) -> str:
    """The visit counter, as both apps serve it at ``/``."""
    session = session_of(request)
    # incr, not session["visits"] += 1: concurrent tabs never lose a visit.
    visits = await session.incr("visits")
    user = session.user_id
    count = len(await session.store.user_sessions(user)) if user else 0
    return pages.home_page(
        visits=visits,
        user=user,
        user_sessions=count,
        handle=session.handle,
        status=status_of(request),
    )


def session_of(request: Request) -> Session:
    # Starlette types request.session as a plain dict; this is the real type.
    return Session.of(request)


def is_same_origin(request: Request) -> bool:
    """CSRF sanity check for the POST forms.

    The session cookie is SameSite=Lax, which already keeps it off cross-site
    POSTs in every current browser; this is the second layer for browsers that
    send Fetch Metadata or Origin: a request that says it is cross-site, or
    whose Origin is not this host, is refused. Requests without either header
    (curl, old clients) are let through because SameSite covers browsers.
    """
    site = request.headers.get("sec-fetch-site")
    if site is not None and site not in {"same-origin", "none"}:
        return False
    origin = request.headers.get("origin")
    if origin is None:
        return True
    parts = urlsplit(origin)
    return parts.scheme == request.url.scheme and parts.netloc == request.headers.get("host")


async def form_field(request: Request, name: str) -> str:
    """One field of an ``application/x-www-form-urlencoded`` body.

    Parsed by hand so the demo needs no python-multipart, which Starlette's
    ``request.form()`` and FastAPI's ``Form()`` would pull in for this one field.
    """
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_FORM_BYTES:
            return ""
    values = parse_qs(body.decode("utf-8", errors="replace"), max_num_fields=10)
    return values.get(name, [""])[0]


def clean_user_name(raw: str) -> str | None:
    name = " ".join(raw.split())[:MAX_NAME_LENGTH]
    return name or None


async def build_report(delay: float) -> tuple[str, list[tuple[str, int]]]:
    """The slow part of the report page: about ``delay`` seconds of waiting."""
    await asyncio.sleep(delay)
    built = datetime.now(UTC)
    seed = int(built.timestamp())
    rows = [
        (region, 10_000 + (seed * (i + 7) * 7919) % 90_000)
        for i, region in enumerate(["Madrid", "Lisboa", "Berlin", "Paris", "Milano"])
    ]
    stamp = built.strftime("%Y-%m-%d %H:%M:%S.") + f"{built.microsecond // 1000:03d} UTC"
    return stamp, rows


RATE_DELAY = 0.3

# Set by the request that asks for the rate, marked by the lookup when it really
# runs: a list, not a bool, so a mark made inside a task the cache starts (which
# copies the context) is still seen by the request.
_computed: ContextVar[list[bool] | None] = ContextVar("rate_computed", default=None)


def rate_lookup(request: Request) -> Memoized[[], dict[str, Any]]:
    """The slow "exchange rate" lookup, memoized with the Cache the app's
    CacheMiddleware uses (made once per app, kept in ``app.state``)."""
    state = request.app.state
    lookup: Memoized[[], dict[str, Any]] | None = getattr(state, "rate_lookup", None)
    if lookup is None:
        instance = settings_of(request).instance

        @get_cache(request).memoize(ttl=RATE_TTL, tags=[RATE_TAG])
        async def exchange_rate() -> dict[str, Any]:
            marks = _computed.get()
            if marks is not None:
                marks.append(True)
            await asyncio.sleep(RATE_DELAY)
            now = time.time()
            value = round(1.05 + (int(now) % 100) / 1000, 4)
            return {"pair": "EUR/USD", "value": value, "computed_at": now, "by": instance}

        lookup = state.rate_lookup = exchange_rate
    return lookup


async def rate(request: Request) -> str:
    """/rate: the data is cached, the page is not (it greets this session's user)."""
    marks: list[bool] = []
    token = _computed.set(marks)
    try:
        data = await rate_lookup(request)()
    finally:
        _computed.reset(token)
    return pages.rate_page(
        user=session_of(request).user_id,
        pair=str(data["pair"]),
        value=float(data["value"]),
        age=max(0.0, time.time() - float(data["computed_at"])),
        computed_by=str(data["by"]),
        verdict="MISS" if marks else "HIT",
        status=status_of(request),
    )


async def invalidate_rate(request: Request) -> None:
    await get_cache(request).invalidate_tags(RATE_TAG)


class ExposeCacheStatus:
    """Outermost middleware: tell the browser which instance answered and whether
    the response cache hit, in ``Server-Timing`` (which page scripts can read for
    their own navigation) as well as the library's ``X-Cache`` header.

    It sits outside ``CacheMiddleware`` so what it adds is never stored in a
    cache entry: a HIT served by instance B must not claim instance A answered.

    For the same reason of honesty it asks browsers to revalidate cached pages
    (``no-cache``) instead of reusing them for the entry's max-age: the demo is
    about the shared server-side cache, and a copy reused silently by the
    browser would show a stale HIT/MISS badge. Revalidation is cheap: the
    library answers ``If-None-Match`` with a 304 straight from Redis.
    """

    def __init__(self, app: ASGIApp, *, instance: str, framework: str) -> None:
        self.app = app
        # Header values are latin-1 on the wire; keep any name presentable.
        self.instance = instance.encode("ascii", "replace").decode()
        quoted = self.instance.replace("\\", "\\\\").replace('"', '\\"')
        self.timing = f'served-by;desc="{quoted}", framework;desc="{framework}"'

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_status(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                headers.append("X-Served-By", self.instance)
                headers.append("Server-Timing", self.timing)
                verdict = headers.get("x-cache")
                if verdict:
                    headers.append("Server-Timing", f'cache;desc="{verdict}"')
                    headers["Cache-Control"] = "no-cache"
            await send(message)

        await self.app(scope, receive, send_with_status)
