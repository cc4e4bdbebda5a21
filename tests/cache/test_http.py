"""Behaviour 4: ETag, If-None-Match, max-age, Age, X-Cache."""

from __future__ import annotations

import hashlib

import pytest
from redis.asyncio import Redis

from asgi_redis_kit import Cache
from tests.cache.conftest import Calls, Framework, Harness, build, client_for


async def test_etag_is_a_content_hash_identical_across_workers_and_restarts(
    framework: Framework, real_redis: Redis, redis_url: str, key_prefix: str
) -> None:
    etags = []
    for worker in range(2):
        # Separate prefixes: each "worker" (or restart) computes the ETag itself.
        cache = Cache(redis_url, key_prefix=f"{key_prefix}w{worker}:")
        async with client_for(build(framework, cache, Calls())) as client:
            response = await client.get("/page")
            assert response.headers["x-cache"] == "MISS"
            etags.append(response.headers["etag"])
            assert (await client.get("/page")).headers["etag"] == etags[-1]
        await cache.clear()
        await cache.aclose()
    body = b"<h1>page 1</h1>"
    assert etags[0] == etags[1] == '"' + hashlib.sha256(body).hexdigest()[:32] + '"'
    assert not etags[0].startswith("W/")  # strong


@pytest.mark.parametrize(
    "if_none_match",
    ['"{etag}"', '"other", "{etag}"', 'W/"{etag}"', "*", '"x",W/"{etag}" '],
)
async def test_if_none_match_answers_304_with_the_required_headers(
    harness: Harness, if_none_match: str
) -> None:
    first = await harness.client.get("/lang", headers={"accept-language": "fr"})
    etag = first.headers["etag"].strip('"')
    response = await harness.client.get(
        "/lang",
        headers={"accept-language": "fr", "if-none-match": if_none_match.format(etag=etag)},
    )
    assert response.status_code == 304
    assert response.content == b""
    # RFC 9110 15.4.5: the headers a 200 would have carried among ETag,
    # Cache-Control, Vary, Date, Content-Location, Expires; nothing about a body.
    assert response.headers["etag"] == first.headers["etag"]
    assert "max-age=" in response.headers["cache-control"]
    assert response.headers["vary"] == "Accept-Language"
    assert response.headers["x-cache"] == "HIT"
    assert "content-type" not in response.headers
    assert "content-length" not in response.headers
    assert harness.calls["lang"] == 1


async def test_a_non_matching_if_none_match_gets_the_body(harness: Harness) -> None:
    await harness.client.get("/page")
    response = await harness.client.get("/page", headers={"if-none-match": '"nope", W/"x"'})
    assert (response.status_code, response.headers["x-cache"]) == (200, "HIT")
    assert response.text == "<h1>page 1</h1>"


async def test_a_miss_also_answers_304_when_the_client_has_the_body(harness: Harness) -> None:
    etag = '"' + hashlib.sha256(b"<h1>page 1</h1>").hexdigest()[:32] + '"'
    response = await harness.client.get("/page", headers={"if-none-match": etag})
    assert (response.status_code, response.headers["x-cache"]) == (304, "MISS")
    assert (await harness.client.get("/page")).headers["x-cache"] == "HIT"


async def test_max_age_counts_down_and_age_counts_up(harness: Harness) -> None:
    miss = await harness.client.get("/page")
    assert miss.headers["cache-control"] == "max-age=60"
    assert miss.headers["age"] == "0"
    harness.clock.advance(25)
    hit = await harness.client.get("/page")
    assert hit.headers["x-cache"] == "HIT"
    assert hit.headers["age"] == "25"
    assert hit.headers["cache-control"] == "max-age=35"
    harness.clock.advance(36)  # past ttl=60: fresh no more
    assert (await harness.client.get("/page")).headers["x-cache"] == "MISS"


async def test_app_cache_control_directives_are_kept_with_our_max_age(harness: Harness) -> None:
    url = "/echo?h=cache-control:public, max-age=999, must-revalidate"
    await harness.client.get(url)
    hit = await harness.client.get(url)
    assert hit.headers["x-cache"] == "HIT"
    assert hit.headers["cache-control"] == "public, must-revalidate, max-age=60"
