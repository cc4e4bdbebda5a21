"""The key names exactly what the app sees (checklist 41; review finding 1).

Starlette builds ``request.url`` from the first raw ``host`` header when it
parses and from ``scope["server"]`` when it does not, and shows the query's raw
bytes. A key that normalised either would let one odd request store a page
(links to the server's bind address, an attacker's spelling of a parameter)
under the key plain requests hit. These tests send the odd request first, then
the plain one, and demand the plain one is answered by its own handler run.
The requests are raw ASGI calls, because HTTP clients refuse to send such bytes
(uvicorn's h11 accepts them on the wire).
"""

from __future__ import annotations

import pytest
from redis.asyncio import Redis
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from asgi_redis_kit import Cache, CacheMiddleware, cached
from tests.support import asgi_get, http_scope

BIND = ("10.0.0.5", 8000)


def _app(cache: Cache, runs: list[str]) -> Starlette:
    @cached(ttl=60)
    async def page(request: Request) -> Response:
        runs.append(str(request.url))
        return PlainTextResponse(f"{request.url} next={request.url_for('page')}")

    return Starlette(
        routes=[Route("/page", page, name="page")],
        middleware=[Middleware(CacheMiddleware, cache=cache)],
    )


async def _get(
    app: Starlette, headers: list[tuple[bytes, bytes]], query: bytes = b""
) -> tuple[dict[bytes, bytes], str]:
    scope = http_scope(headers=headers, query=query, server=BIND)
    start, body = await asgi_get(app, scope)
    return dict(start["headers"]), body.decode()


ODD_HOSTS = [
    [(b"host", b"example.com\xa0")],  # NBSP: Starlette falls back to scope["server"]
    [(b"host", b"example.com\xe3\x80\x80")],  # U+3000 ideographic space, UTF-8 bytes
    [(b"host", b"example.com\x00")],
    [(b"host", b"example.com\x0b")],
    [(b"host", b"example.com\t")],
    [(b"host", b" example.com")],
    [(b"host", b"example.com ")],
    [(b"host", b"example.com.")],
    [(b"host", b"example..com")],
    [(b"host", b"Example.COM")],
    [(b"host", b"example.com:")],
    [(b"host", b"example.com:080")],
    [(b"host", b"example.com:99999")],
    [(b"host", b"example.com:80:80")],
    [(b"host", b"ex ample.com")],
    [(b"host", b"exa\rmple.com")],
    [(b"host", b"[::1")],
    [(b"host", b"[::g]")],
    [(b"host", b"10.0.0.5:8000"), (b"host", b"example.com")],  # two Host headers
    [(b"host", b"example.com"), (b"host", b"evil.example")],
    [(b"Host", b"evil.example")],  # a name Starlette does not read
]


@pytest.mark.parametrize("odd", ODD_HOSTS, ids=lambda h: repr(h)[:60])
async def test_an_odd_host_never_stores_what_a_canonical_host_gets(
    odd: list[tuple[bytes, bytes]], real_redis: Redis, key_prefix: str
) -> None:
    cache = Cache(real_redis, key_prefix=key_prefix, timeout=5)
    runs: list[str] = []
    app = _app(cache, runs)
    for _ in range(2):
        headers, _body = await _get(app, odd)
        assert headers[b"x-cache"] == b"BYPASS"
        assert headers[b"x-cache-reason"] == b"host"
    for _ in range(2):
        headers, body = await _get(app, [(b"host", b"example.com")])
        assert body == "http://example.com/page next=http://example.com/page"
    assert headers[b"x-cache"] == b"HIT"
    assert len(runs) == 3  # two odd requests, one plain miss
    await cache.aclose()


@pytest.mark.parametrize(
    "host", [b"example.com", b"example.com:8000", b"127.0.0.1:8000", b"[::1]:8000", b"a_b.local"]
)
async def test_a_canonical_host_is_cached_under_itself(
    host: bytes, real_redis: Redis, key_prefix: str
) -> None:
    cache = Cache(real_redis, key_prefix=key_prefix, timeout=5)
    runs: list[str] = []
    app = _app(cache, runs)
    states = [(await _get(app, [(b"host", host)]))[0][b"x-cache"] for _ in range(2)]
    assert states == [b"MISS", b"HIT"]
    _, other = await _get(app, [(b"host", b"other.example")])
    assert "other.example" in other
    assert host.decode() not in other
    await cache.aclose()


async def test_without_a_host_header_the_key_is_the_server_address(
    real_redis: Redis, key_prefix: str
) -> None:
    cache = Cache(real_redis, key_prefix=key_prefix, timeout=5)
    runs: list[str] = []
    app = _app(cache, runs)
    first, body = await _get(app, [])
    assert body.startswith("http://10.0.0.5:8000/page")
    assert first[b"x-cache"] == b"MISS"
    assert (await _get(app, [(b"host", b"example.com")]))[0][b"x-cache"] == b"MISS"
    assert (await _get(app, []))[0][b"x-cache"] == b"HIT"
    await cache.aclose()


@pytest.mark.parametrize(
    ("odd", "plain"),
    [
        (b"q=<b>", b"q=%3Cb%3E"),  # the page echoes request.url: raw bytes differ
        (b"q=a%20b", b"q=a+b"),
        (b"q=%41", b"q=A"),
        (b"%71=1", b"q=1"),
        (b"q=1&&r=2", b"q=1&r=2"),
    ],
)
async def test_query_spellings_the_app_sees_differently_never_share_an_entry(
    odd: bytes, plain: bytes, real_redis: Redis, key_prefix: str
) -> None:
    cache = Cache(real_redis, key_prefix=key_prefix, timeout=5)
    runs: list[str] = []
    app = _app(cache, runs)
    host = [(b"host", b"example.com")]
    assert (await _get(app, host, odd))[0][b"x-cache"] == b"MISS"
    headers, body = await _get(app, host, plain)
    assert headers[b"x-cache"] == b"MISS"
    assert body.startswith(f"http://example.com/page?{plain.decode()} ")
    assert (await _get(app, host, odd))[0][b"x-cache"] == b"HIT"
    await cache.aclose()


async def test_reordered_pairs_share_an_entry_but_two_spellings_of_a_name_keep_their_order(
    real_redis: Redis, key_prefix: str
) -> None:
    cache = Cache(real_redis, key_prefix=key_prefix, timeout=5)
    runs: list[str] = []
    app = _app(cache, runs)
    host = [(b"host", b"example.com")]
    assert (await _get(app, host, b"b=2&a=1"))[0][b"x-cache"] == b"MISS"
    assert (await _get(app, host, b"a=1&b=2"))[0][b"x-cache"] == b"HIT"
    # Both spell the name "q": the handler reads the last value, 2 here and 1 there.
    assert (await _get(app, host, b"%71=1&q=2"))[0][b"x-cache"] == b"MISS"
    assert (await _get(app, host, b"q=2&%71=1"))[0][b"x-cache"] == b"MISS"
    await cache.aclose()
