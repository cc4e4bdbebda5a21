"""The key is built from exactly what the app will see (c2's variants of review
findings 2, 3, 4, 7, 11 and 12).

Each app echoes what its handler reads, so a test fails as soon as one request's
page is served to a request the handler would have answered otherwise. Requests
go through a raw ASGI call where the header lines must be exactly as written
(httpx lower-cases header names).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import httpx
import pytest
from redis.asyncio import Redis
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.gzip import GZipMiddleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from asgi_redis_kit import Cache, CacheMiddleware, cached
from asgi_redis_kit.cache._request import FORWARDING_HEADERS, canonical_origin
from tests.support import asgi_get, http_scope

pytestmark = pytest.mark.real_redis


class Reply:
    def __init__(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body

    def header(self, name: str) -> str | None:
        found = [v.decode("latin-1") for n, v in self.headers if n.decode().lower() == name]
        return ", ".join(found) if found else None

    @property
    def text(self) -> str:
        return self.body.decode("latin-1")


async def call(
    app: ASGIApp,
    path: str,
    headers: Sequence[tuple[bytes, bytes]] = (),
    *,
    host: bytes = b"testserver",
    client: tuple[str, int] = ("127.0.0.1", 50000),
) -> Reply:
    """One GET whose header lines are exactly ``headers`` (names as written)."""
    scope = http_scope(path, headers=[(b"host", host), *headers], client=client)
    start, body = await asgi_get(app, scope)
    return Reply(start["status"], list(start.get("headers", ())), body)


def echo_app(cache: Cache, calls: Counter[str], *inner: Middleware) -> Starlette:
    @cached(ttl=60, vary=["accept-language"])
    async def declared(request: Request) -> Response:
        calls["declared"] += 1
        return PlainTextResponse(f"first={request.headers.get('accept-language')!r}")

    @cached(ttl=60, vary=["accept-language"])
    async def declared_list(request: Request) -> Response:
        calls["declared_list"] += 1
        return PlainTextResponse(f"all={request.headers.getlist('accept-language')!r}")

    @cached(ttl=60)
    async def learned(request: Request) -> Response:
        calls["learned"] += 1
        value = request.headers.get("x-tenant")
        return PlainTextResponse(f"tenant={value!r}", headers={"vary": "X-Tenant"})

    @cached(ttl=60)
    async def forwarded(request: Request) -> Response:
        calls["forwarded"] += 1
        seen = {name: request.headers.get(name) for name in FORWARDING_HEADERS}
        return PlainTextResponse(repr({k: v for k, v in seen.items() if v is not None}))

    @cached(ttl=60)
    async def page(request: Request) -> Response:
        calls["page"] += 1
        return PlainTextResponse(f"page {calls['page']} " + "x" * 600)

    @cached(ttl=60)
    async def scheme(request: Request) -> Response:
        calls["scheme"] += 1
        return PlainTextResponse(f"<link href={request.url}>")

    routes = [
        Route("/declared", declared),
        Route("/declared-list", declared_list),
        Route("/learned", learned),
        Route("/forwarded", forwarded),
        Route("/page", page),
        Route("/scheme", scheme),
    ]
    return Starlette(routes=routes, middleware=[Middleware(CacheMiddleware, cache=cache), *inner])


# -- finding 2: every line of a keyed header, names as sent ---------------------------------

LA, XT, XFH = b"accept-language", b"x-tenant", b"x-forwarded-host"


@pytest.mark.parametrize(
    ("path", "attack", "plain"),
    [
        # The first line is what .get reads; the joined value is what the old key held.
        ("/declared", [(LA, b""), (LA, b"de")], [(LA, b"de")]),
        ("/declared", [(LA, b"en"), (LA, b"de")], [(LA, b"en, de")]),
        ("/declared-list", [(LA, b"en, de")], [(LA, b"en"), (LA, b"de")]),
        # A line Starlette does not see (its name is not lower-case).
        ("/declared", [(b"Accept-Language", b"de")], [(LA, b"de")]),
        ("/declared", [(b"Accept-Language", b"fr"), (LA, b"de")], [(LA, b"de")]),
        ("/learned", [(XT, b""), (XT, b"acme")], [(XT, b"acme")]),
        ("/learned", [(b"X-Tenant", b"acme")], [(XT, b"acme")]),
        ("/forwarded", [(XFH, b""), (XFH, b"evil.example")], [(XFH, b"evil.example")]),
        ("/forwarded", [(b"X-Forwarded-Host", b"evil.example")], [(XFH, b"evil.example")]),
    ],
)
async def test_a_request_keyed_like_another_is_seen_like_it(
    real_redis: Redis,
    key_prefix: str,
    path: str,
    attack: list[tuple[bytes, bytes]],
    plain: list[tuple[bytes, bytes]],
) -> None:
    cache = Cache(real_redis, key_prefix=key_prefix)
    calls: Counter[str] = Counter()
    app = echo_app(cache, calls)
    if path == "/learned":
        await call(app, path, [(XT, b"learn")])  # the vary record now names X-Tenant
    poisoned = await call(app, path, attack)
    fresh = Cache(real_redis, key_prefix=key_prefix + "ref:")
    expected = await call(echo_app(fresh, Counter()), path, plain)
    served = await call(app, path, plain)
    await cache.aclose()
    await fresh.aclose()
    assert served.text == expected.text, (poisoned.text, served.header("x-cache"))


async def test_gzip_reads_the_first_accept_encoding_line_and_so_does_the_key(
    real_redis: Redis, key_prefix: str
) -> None:
    """GZipMiddleware asks ``"gzip" in headers.get("Accept-Encoding")``: the
    first line. Two lines whose join equals a gzip client's one line must not
    store the identity body under that client's variant."""
    cache = Cache(real_redis, key_prefix=key_prefix)
    app = echo_app(cache, Counter(), Middleware(GZipMiddleware, minimum_size=1))
    ae = b"accept-encoding"
    await call(app, "/page", [(ae, b"identity")])  # learn Accept-Encoding
    attack = await call(app, "/page", [(ae, b"identity"), (ae, b"gzip")])
    victim = await call(app, "/page", [(ae, b"gzip, identity")])
    again = await call(app, "/page", [(ae, b"identity"), (ae, b"gzip")])
    await cache.aclose()
    assert attack.header("content-encoding") is None
    assert victim.header("content-encoding") == "gzip", victim.header("x-cache")
    assert again.header("content-encoding") is None
    assert again.header("x-cache") == "HIT"  # the same lines share their own entry


# -- finding 4: every forwarding header is keyed --------------------------------------------


@pytest.mark.parametrize("name", FORWARDING_HEADERS)
async def test_each_forwarding_header_gets_its_own_entry(
    real_redis: Redis, key_prefix: str, name: str
) -> None:
    cache = Cache(real_redis, key_prefix=key_prefix)
    app = echo_app(cache, Counter())
    poisoned = await call(app, "/forwarded", [(name.encode(), b"evil.example")])
    plain = await call(app, "/forwarded")
    await cache.aclose()
    assert "evil.example" in poisoned.text
    assert plain.text == "{}", plain.header("x-cache")


@pytest.mark.parametrize(
    "name",
    [
        "x-forwarded-port",
        "x-forwarded-scheme",
        "x-scheme",
        "x-forwarded-ssl",
        "x-original-host",
        "x-forwarded-server",
    ],
)
def test_the_headers_proxies_send_are_all_forwarding_headers(name: str) -> None:
    assert name in FORWARDING_HEADERS


# -- finding 7: a declared vary is told downstream ------------------------------------------


async def test_served_vary_names_declared_and_learned_headers_once(
    real_redis: Redis, key_prefix: str
) -> None:
    cache = Cache(real_redis, key_prefix=key_prefix)
    calls: Counter[str] = Counter()
    app = echo_app(cache, calls, Middleware(GZipMiddleware, minimum_size=1))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as c:
        headers = {"accept-language": "de", "accept-encoding": "gzip"}
        miss = await c.get("/declared", headers=headers)
        hit = await c.get("/declared", headers=headers)
        not_modified = await c.get(
            "/declared", headers={**headers, "if-none-match": hit.headers["etag"]}
        )
    await cache.aclose()
    assert [miss.headers["x-cache"], hit.headers["x-cache"]] == ["MISS", "HIT"]
    assert not_modified.status_code == 304
    for response in (miss, hit, not_modified):
        names = [v.strip().lower() for v in response.headers.get("vary", "").split(",")]
        assert sorted(names) == ["accept-encoding", "accept-language"], names


# -- finding 11: URL ids name the origin ----------------------------------------------------


@pytest.mark.parametrize(
    ("host", "url"),
    [
        (b"example.com:443", "https://example.com/page"),
        (b"example.com", "https://example.com:443/page"),
        (b"example.com:80", "http://EXAMPLE.com./page"),
        (b"[::1]:80", "http://[::1]/page"),
        (b"xn--bcher-kva.example:8080", "http://B\u00fccher.example:8080/page"),
    ],
)
async def test_invalidate_reaches_every_spelling_of_the_origin(
    real_redis: Redis, key_prefix: str, host: bytes, url: str
) -> None:
    cache = Cache(real_redis, key_prefix=key_prefix)
    app = echo_app(cache, Counter())
    await call(app, "/page", host=host)
    assert (await call(app, "/page", host=host)).header("x-cache") == "HIT"
    await cache.invalidate(url)
    after = await call(app, "/page", host=host)
    await cache.aclose()
    assert after.header("x-cache") == "MISS", "invalidate() did not reach the entry"


async def test_invalidate_by_request_and_other_ports_stay_apart(
    real_redis: Redis, key_prefix: str
) -> None:
    cache = Cache(real_redis, key_prefix=key_prefix)
    app = echo_app(cache, Counter())
    for host in (b"testserver", b"testserver:8080"):
        await call(app, "/page", host=host)
    request = Request({"type": "http", "path": "/page", "headers": [(b"host", b"testserver:80")]})
    await cache.invalidate(request)
    plain = await call(app, "/page", host=b"testserver")
    other_port = await call(app, "/page", host=b"testserver:8080")
    await cache.aclose()
    assert plain.header("x-cache") == "MISS"
    assert other_port.header("x-cache") == "HIT"
    assert canonical_origin("B\u00fcCHER.example.:443") == "xn--bcher-kva.example"
    assert canonical_origin("[::1]:8443") == "[::1]:8443"


# -- finding 12: a proxy-headers middleware inside the cache --------------------------------


class ProxyFixMiddleware:
    """A look-alike of hypercorn's: honours X-Forwarded-Proto from 10.0.0.1 only."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and (scope.get("client") or ("",))[0] == "10.0.0.1":
            for name, value in scope["headers"]:
                if name == b"x-forwarded-proto":
                    scope = {**scope, "scheme": value.decode()}
        await self.app(scope, receive, send)


@pytest.mark.parametrize("proxy", ["uvicorn", "look-alike"])
async def test_an_inner_proxy_middleware_makes_forwarded_requests_bypass(
    real_redis: Redis, key_prefix: str, proxy: str, caplog: pytest.LogCaptureFixture
) -> None:
    from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware

    caplog.set_level("WARNING", logger="asgi_redis_kit.cache")
    inner = (
        Middleware(ProxyHeadersMiddleware, trusted_hosts=["10.0.0.1"])
        if proxy == "uvicorn"
        else Middleware(ProxyFixMiddleware)
    )
    cache = Cache(real_redis, key_prefix=key_prefix)
    app = echo_app(cache, Counter(), inner)
    https = [(b"x-forwarded-proto", b"https")]
    attacker = await call(app, "/scheme", https, client=("6.6.6.6", 1))
    trusted = await call(app, "/scheme", https, client=("10.0.0.1", 1))
    # Another forwarding header the proxy middleware may honour: bypassed as well.
    host = await call(app, "/scheme", [(b"forwarded", b"proto=https")], client=("10.0.0.1", 1))
    plain = [await call(app, "/scheme") for _ in range(2)]
    await cache.aclose()
    assert "http://testserver" in attacker.text
    assert "https://testserver" in trusted.text
    for reply in (attacker, trusted, host):
        assert (reply.header("x-cache"), reply.header("x-cache-reason")) == (
            "BYPASS",
            "forwarded",
        )
    assert [r.header("x-cache") for r in plain] == ["MISS", "HIT"]  # the rest is cached
    warnings = [r for r in caplog.records if "outside CacheMiddleware" in r.getMessage()]
    assert len(warnings) == 1
