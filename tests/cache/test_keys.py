"""Behaviour 2: canonical keys (and checklist 25, 26)."""

from __future__ import annotations

from typing import Any

import pytest
from redis.asyncio import Redis

from asgi_redis_kit import Cache
from asgi_redis_kit._http import header_map
from asgi_redis_kit.cache._keys import KeyScheme, _digest
from asgi_redis_kit.cache._policy import request_bypass_reason
from asgi_redis_kit.cache._request import (
    canonical_query,
    header,
    request_host,
    session_cookie,
)
from tests.cache.conftest import Calls, Framework, Harness, build, client_for


def _key(scope_overrides: dict[str, Any], **options: Any) -> str:
    scope: dict[str, Any] = {
        "type": "http",
        "method": "GET",
        "scheme": "http",
        "path": "/p",
        "root_path": "",
        "query_string": b"",
        "headers": [(b"host", b"example.com")],
    }
    scope.update(scope_overrides)
    defaults: dict[str, Any] = {
        "namespace": "default",
        "host": "example.com",
        "vary": (),
        "session_cookie_name": "session",
        "vary_on_session": False,
        "tags": (),
        "custom": None,
    }
    defaults.update(options)
    return KeyScheme("p:").for_request(scope, **defaults).digest


def test_parts_are_length_prefixed_not_joined() -> None:
    assert _digest([b"ab", b"c"]) != _digest([b"a", b"bc"])
    assert _digest([b"a:b", b""]) != _digest([b"a", b"b"])
    # A path that contains what a naive separator would look like stays distinct.
    assert _key({"path": "/a", "query_string": b"b=c"}) != _key({"path": "/a?b=c"})


def test_query_order_is_canonical_but_repeated_values_keep_their_order() -> None:
    assert canonical_query(b"b=2&a=1") == canonical_query(b"a=1&b=2")
    assert canonical_query(b"a=2&a=1") != canonical_query(b"a=1&a=2")
    assert canonical_query(b"a") != canonical_query(b"")


@pytest.mark.parametrize(
    ("scope", "options"),
    [
        ({"path": "/q"}, {}),
        ({"query_string": b"x=1"}, {}),
        ({"scheme": "https"}, {}),
        ({"root_path": "/mounted"}, {}),
        ({}, {"host": "other.example.com"}),
        ({}, {"namespace": "other"}),
        ({"headers": [(b"x-forwarded-host", b"evil.example")]}, {}),
        ({"headers": [(b"cookie", b"session=abc")]}, {}),
        ({"headers": [(b"accept-language", b"fr")]}, {"vary": ("accept-language",)}),
        ({}, {"custom": b"k"}),
    ],
)
def test_every_keyed_part_changes_the_key(scope: dict[str, Any], options: dict[str, Any]) -> None:
    assert _key(scope, **options) != _key({})


def test_vary_header_absent_and_empty_differ() -> None:
    absent = _key({}, vary=("accept-language",))
    empty = _key({"headers": [(b"accept-language", b"")]}, vary=("accept-language",))
    assert absent != empty


def test_head_and_get_share_a_key_and_tag_keys_hide_braces() -> None:
    assert _key({"method": "HEAD"}) == _key({})
    scheme = KeyScheme("p:")
    # A user-chosen tag or namespace cannot change the hash slot with its own braces.
    assert "{x}" not in scheme.tag_version("{x}")
    assert "{x}" not in scheme.generation("{x}")


def test_the_header_map_reads_headers_as_header_does() -> None:
    """The hit path reads every header from one pass (header_map); it must see
    what the per-name scans saw: any case, repeated names joined in order."""
    scope: dict[str, Any] = {
        "headers": [
            (b"Host", b"Example.com"),
            (b"x-forwarded-host", b"a"),
            (b"X-Forwarded-Host", b"b"),
            (b"cookie", b"session=abc"),
            (b"accept-language", b""),
        ]
    }
    found = header_map(scope)
    for name in (b"host", b"x-forwarded-host", b"cookie", b"accept-language", b"absent"):
        assert found.get(name) == header(scope, name)
    assert found[b"x-forwarded-host"] == b"a, b"
    assert request_host(scope, found) == request_host(scope) == "example.com"
    assert session_cookie(scope, "session", found) == session_cookie(scope, "session") == "abc"
    options: dict[str, Any] = {
        "namespace": "default",
        "host": "example.com",
        "vary": ("accept-language",),
        "session_cookie_name": "session",
        "vary_on_session": True,
        "tags": ("t",),
        "custom": None,
    }
    scheme = KeyScheme("p:")
    with_map = scheme.for_request({**scope, "path": "/p"}, headers=found, **options)
    assert with_map == KeyScheme("p:").for_request({**scope, "path": "/p"}, **options)
    assert (
        request_bypass_reason(
            {**scope, "method": "GET"}, public=False, host="h", allowed_hosts=None, headers=found
        )
        is None
    )
    authorized = {"method": "GET", "headers": [(b"Authorization", b"Bearer x")]}
    for headers in (None, header_map(authorized)):
        assert (
            request_bypass_reason(
                authorized, public=False, host="h", allowed_hosts=None, headers=headers
            )
            == "authorization"
        )


def test_memoized_key_parts_are_the_computed_ones() -> None:
    scheme = KeyScheme("p:")
    for _ in range(2):  # computed, then memoized
        assert scheme.url_id("ns", "h", "/a") == _digest([b"ns", b"h", b"/a"])[:32]
        assert scheme.generation("ns") == KeyScheme("p:").generation("ns")
    assert scheme.url_id("ns", "h", "/b") != scheme.url_id("ns", "h", "/a")


async def test_query_order_shares_an_entry_and_other_values_do_not(harness: Harness) -> None:
    a = await harness.client.get("/items/1?q=a&z=1")
    b = await harness.client.get("/items/1?z=1&q=a")
    c = await harness.client.get("/items/1?q=b&z=1")
    d = await harness.client.get("/items/2?q=a&z=1")
    assert [r.headers["x-cache"] for r in (a, b, c, d)] == ["MISS", "HIT", "MISS", "MISS"]
    assert harness.calls["item"] == 3


async def test_hosts_never_share_entries_and_the_allowlist_is_enforced(
    framework: Framework, real_redis: Redis, key_prefix: str
) -> None:
    cache = Cache(real_redis, key_prefix=key_prefix, allowed_hosts=["a.example", "*.b.example"])
    calls = Calls()
    app = build(framework, cache, calls)
    async with client_for(app, "a.example") as a, client_for(app, "x.b.example") as b:
        assert (await a.get("/forwarded")).headers["x-cache"] == "MISS"
        from_b = await b.get("/forwarded")
        assert from_b.headers["x-cache"] == "MISS"  # Host B never gets Host A's entry
        assert "x.b.example" in from_b.text
        assert (await a.get("/forwarded")).headers["x-cache"] == "HIT"
    async with client_for(app, "evil.example") as evil:
        for _ in range(2):
            outside = await evil.get("/forwarded")
            assert outside.headers["x-cache"] == "BYPASS"
            assert outside.headers["x-cache-reason"] == "host"
    assert calls["forwarded"] == 4
    await cache.aclose()


async def test_vary_headers_give_separate_entries(harness: Harness) -> None:
    fr = await harness.client.get("/lang", headers={"accept-language": "fr"})
    de = await harness.client.get("/lang", headers={"accept-language": "de"})
    fr2 = await harness.client.get("/lang", headers={"accept-language": "fr"})
    assert (fr.text, de.text, fr2.text) == ("lang fr", "lang de", "lang fr")
    assert [r.headers["x-cache"] for r in (fr, de, fr2)] == ["MISS", "MISS", "HIT"]


async def test_custom_key_function_replaces_path_and_query(
    real_redis: Redis, key_prefix: str
) -> None:
    from starlette.applications import Starlette
    from starlette.middleware import Middleware
    from starlette.requests import Request
    from starlette.responses import PlainTextResponse, Response
    from starlette.routing import Route

    from asgi_redis_kit import CacheMiddleware, cached

    seen: list[str] = []

    async def ignore_tracking(request: Request) -> str:
        return str(sorted(k for k in request.query_params if not k.startswith("utm_")))

    @cached(ttl=60, key=ignore_tracking)
    async def landing(request: Request) -> Response:
        seen.append(str(request.url))
        return PlainTextResponse("landing")

    cache = Cache(real_redis, key_prefix=key_prefix)
    app = Starlette(
        routes=[Route("/landing", landing)], middleware=[Middleware(CacheMiddleware, cache=cache)]
    )
    async with client_for(app) as client:
        assert (await client.get("/landing?utm_source=a")).headers["x-cache"] == "MISS"
        assert (await client.get("/landing?utm_source=b")).headers["x-cache"] == "HIT"
        assert (await client.get("/landing?page=2")).headers["x-cache"] == "MISS"
    assert len(seen) == 2
    await cache.aclose()
