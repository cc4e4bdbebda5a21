"""Vary learned from the response (RFC 9111 section 4.1, Django's ``learn_cache_key``).

GZipMiddleware and CORSMiddleware inside the cache answer ``Vary: Accept-Encoding``
and ``Vary: Origin``; the cache must keep one entry per variant, never hand one
client's variant to another, and reach every variant when it invalidates.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.middleware.gzip import GZipMiddleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from asgi_redis_kit import Cache, CacheMiddleware, cached
from asgi_redis_kit.cache._request import vary_value
from asgi_redis_kit.cache._scripts import ACQUIRE, LOOKUP, STORE_AND_RELEASE
from tests.cache.conftest import Calls, Clock, Framework, Harness, build, client_for
from tests.scaleout.conftest import cluster, cluster_client, redis_log
from tests.scaleout.servers import ClusterDeployment, CommandLog
from tests.support import RedisSpy, free_port

pytestmark = pytest.mark.real_redis

# The scale-out fixtures, used as they are (see test_cluster_migration).
__all__ = ["cluster", "cluster_client", "redis_log"]

GZIP = {"accept-encoding": "gzip"}
IDENTITY = {"accept-encoding": "identity"}
ORIGINS = ["https://a.example", "https://b.example"]


@asynccontextmanager
async def _client(
    framework: Framework, cache: Cache, calls: Calls, *inner: Middleware
) -> AsyncIterator[httpx.AsyncClient]:
    async with client_for(build(framework, cache, calls, extra=list(inner))) as client:
        yield client


async def _get(client: httpx.AsyncClient, url: str, **headers: str) -> httpx.Response:
    return await client.get(url, headers={k.replace("_", "-"): v for k, v in headers.items()})


async def _load_scripts(redis: Redis) -> None:
    for script in (LOOKUP, ACQUIRE, STORE_AND_RELEASE):
        await redis.script_load(script)  # so EVALSHA never falls back during a count


# -- normalisation of the keyed request header values ---------------------------------------


def test_accept_encoding_is_an_unordered_set_of_tokens_kept_as_sent() -> None:
    same = [b"gzip, br", b"br,gzip", b"br ,  gzip", b"gzip,,br", b" gzip,br "]
    assert {vary_value(b"accept-encoding", value) for value in same} == {b"br,gzip"}
    # Case, q weights and parameters are the tokens' own: GZipMiddleware's
    # ``"gzip" in value`` is case-sensitive, and a raw reader may compare tokens.
    for other in (b"BR, Gzip", b"gzip;q=1, br", b"gzip ;q=1,br", b"gzip;q=0, br"):
        assert vary_value(b"accept-encoding", other) != b"br,gzip"


def test_other_values_are_keyed_byte_for_byte() -> None:
    """A handler reading the raw value decides differently on each of these
    spellings (``first in SUPPORTED``, ``== "pt-BR"``), so none is folded."""
    pairs = [
        (b"accept-language", b"pt-BR", b"pt-br"),
        (b"accept-language", b"de,en", b"de ,en"),
        (b"accept-language", b"de", b"de;q=1"),
        (b"accept-language", b"de", b" de"),
        (b"accept-language", b"es, en", b"en, es"),
        (b"accept", b"text/html", b"Text/HTML"),
        (b"origin", b"https://a.example", b"https://A.example"),
        (b"x-flavour", b"a, b", b"a,b"),
        (b"accept-encoding", b'x;a="1, 2"', b'x;a="1,2"'),
    ]
    for name, value, other in pairs:
        assert vary_value(name, value) == value
        assert vary_value(name, value) != vary_value(name, other)


# -- learned variants end to end ------------------------------------------------------------


async def test_gzip_inside_the_cache_keeps_an_entry_per_encoding(
    framework: Framework, real_redis: Redis, key_prefix: str
) -> None:
    """Checklist: a gzip body never reaches an identity client."""
    cache = Cache(real_redis, key_prefix=key_prefix)
    calls = Calls()
    async with _client(framework, cache, calls, Middleware(GZipMiddleware, minimum_size=1)) as c:
        zipped = await c.get("/page", headers=GZIP)
        plain = await c.get("/page", headers=IDENTITY)
        zipped_again = await c.get("/page", headers=GZIP)
        plain_again = await c.get("/page", headers=IDENTITY)
    assert [r.headers["x-cache"] for r in (zipped, plain, zipped_again, plain_again)] == [
        "MISS",
        "MISS",
        "HIT",
        "HIT",
    ]
    assert calls["page"] == 2
    for response in (zipped, zipped_again):
        assert response.headers["content-encoding"] == "gzip"
        assert response.text == "<h1>page 1</h1>"  # httpx decoded the gzip body
    for response in (plain, plain_again):
        assert "content-encoding" not in response.headers
        assert response.content == b"<h1>page 2</h1>"  # raw bytes, as sent
        assert "accept-encoding" in response.headers["vary"].lower()
    await cache.aclose()


async def test_accept_encoding_spacing_and_order_share_one_entry(
    framework: Framework, real_redis: Redis, key_prefix: str
) -> None:
    cache = Cache(real_redis, key_prefix=key_prefix)
    calls = Calls()
    async with _client(framework, cache, calls, Middleware(GZipMiddleware, minimum_size=1)) as c:
        first = await _get(c, "/page", accept_encoding="gzip, br")
        others = [
            await _get(c, "/page", accept_encoding=value)
            for value in ("br,gzip", "br , gzip", "gzip,,br")
        ]
        only_gzip = await _get(c, "/page", accept_encoding="gzip")
        upper = await _get(c, "/page", accept_encoding="GZIP, br")
    assert first.headers["x-cache"] == "MISS"
    assert [r.headers["x-cache"] for r in others] == ["HIT", "HIT", "HIT"]
    assert {r.text for r in (first, *others)} == {"<h1>page 1</h1>"}
    assert only_gzip.headers["x-cache"] == "MISS"  # another set of codings: its own entry
    # GZipMiddleware's check is case-sensitive: "GZIP" gets no gzip, nor gzip's entry.
    assert upper.headers["x-cache"] == "MISS"
    assert "content-encoding" not in upper.headers
    assert calls["page"] == 3
    await cache.aclose()


async def test_cors_origins_each_get_their_own_entry(
    framework: Framework, real_redis: Redis, key_prefix: str
) -> None:
    cache = Cache(real_redis, key_prefix=key_prefix)
    calls = Calls()
    cors = Middleware(CORSMiddleware, allow_origins=ORIGINS)
    async with _client(framework, cache, calls, cors) as c:
        rounds = []
        for _ in range(2):
            rounds.append(
                [await _get(c, "/page", origin=origin) for origin in ORIGINS]
                + [await c.get("/page")]
            )
    first, second = rounds
    assert [r.headers["x-cache"] for r in first] == ["MISS", "MISS", "MISS"]
    assert [r.headers["x-cache"] for r in second] == ["HIT", "HIT", "HIT"]
    assert calls["page"] == 3
    for responses in rounds:
        allowed = [r.headers.get("access-control-allow-origin") for r in responses]
        assert allowed == [*ORIGINS, None]
        assert [r.text for r in responses] == [f"<h1>page {n}</h1>" for n in (1, 2, 3)]
    await cache.aclose()


async def test_accept_language_variants_run_the_handler_once_each(harness: Harness) -> None:
    url = "/echo?h=vary:Accept-Language"
    es = await _get(harness.client, url, accept_language="es")
    en = await _get(harness.client, url, accept_language="en")
    es_again = await _get(harness.client, url, accept_language="es")
    assert [r.text for r in (es, en, es_again)] == ["echo 1", "echo 2", "echo 1"]
    assert [r.headers["x-cache"] for r in (es, en, es_again)] == ["MISS", "MISS", "HIT"]
    assert harness.calls["echo"] == 2
    # Keyed as sent: case (a case-sensitive handler tells "ES" from "es"), order
    # (a preference) and absent vs empty all count.
    assert (await _get(harness.client, url, accept_language="ES")).text == "echo 3"
    assert (await _get(harness.client, url, accept_language="es,en")).text == "echo 4"
    assert (await _get(harness.client, url, accept_language="en, es")).text == "echo 5"
    assert (await harness.client.get(url)).text == "echo 6"
    assert (await _get(harness.client, url, accept_language="")).text == "echo 7"
    assert (await harness.client.get(url)).text == "echo 6"
    assert (await _get(harness.client, url, accept_language="es")).text == "echo 1"


async def test_vary_star_is_never_stored(
    harness: Harness, real_redis: Redis, key_prefix: str
) -> None:
    for value in ("*", "Accept-Language, *"):
        url = f"/echo?h=vary:{value}"
        responses = [await _get(harness.client, url, accept_language="es") for _ in range(2)]
        assert [r.headers["x-cache"] for r in responses] == ["MISS", "MISS"]
        assert {r.headers["x-cache-reason"] for r in responses} == {"vary"}
    assert harness.calls["echo"] == 4
    assert [k async for k in real_redis.scan_iter(match=f"{key_prefix}*")] == []


async def test_headers_the_key_already_holds_are_not_learned_and_cookie_stays_a_session(
    harness: Harness, real_redis: Redis, key_prefix: str
) -> None:
    url = "/echo?h=vary:Host, X-Forwarded-Host"
    assert [(await harness.client.get(url)).headers["x-cache"] for _ in range(2)] == [
        "MISS",
        "HIT",
    ]
    assert [k async for k in real_redis.scan_iter(match=f"{key_prefix}*:y:*")] == []
    cookie = [await harness.client.get("/echo?h=vary:Cookie") for _ in range(2)]
    assert [(r.headers["x-cache"], r.headers["x-cache-reason"]) for r in cookie] == [
        ("MISS", "session")
    ] * 2
    assert [k async for k in real_redis.scan_iter(match=f"{key_prefix}*:y:*")] == []


async def test_declared_vary_still_keys_and_learns_nothing(
    harness: Harness, real_redis: Redis, key_prefix: str
) -> None:
    """``vary=["accept-language"]`` on /lang, which answers ``Vary: Accept-Language``:
    the declared header is in the key from the start; no vary record is needed."""
    fr = await _get(harness.client, "/lang", accept_language="fr-FR, de;q=0.5")
    same = await _get(harness.client, "/lang", accept_language="fr-FR, de;q=0.5")
    # The handler echoes the raw value: another spelling is another page.
    spelled = await _get(harness.client, "/lang", accept_language="fr-fr,de;q=0.50")
    de = await _get(harness.client, "/lang", accept_language="de")
    responses = (fr, same, spelled, de)
    assert [r.headers["x-cache"] for r in responses] == ["MISS", "HIT", "MISS", "MISS"]
    assert [r.text for r in responses] == [
        "lang fr-FR, de;q=0.5",
        "lang fr-FR, de;q=0.5",
        "lang fr-fr,de;q=0.50",
        "lang de",
    ]
    assert harness.calls["lang"] == 3
    assert [k async for k in real_redis.scan_iter(match=f"{key_prefix}*:y:*")] == []


async def test_invalidation_reaches_every_learned_variant(harness: Harness) -> None:
    url = "/echo?h=vary:Accept-Language"

    async def states() -> list[str]:
        return [
            (await _get(harness.client, url, accept_language=lang)).headers["x-cache"]
            for lang in ("es", "en")
        ]

    assert await states() == ["MISS", "MISS"]
    assert await states() == ["HIT", "HIT"]
    await harness.cache.invalidate_tags("report")
    assert await states() == ["MISS", "MISS"]
    await harness.cache.invalidate("http://testserver/echo")
    assert await states() == ["MISS", "MISS"]
    await harness.cache.clear()
    assert await states() == ["MISS", "MISS"]
    assert await states() == ["HIT", "HIT"]
    assert harness.calls["echo"] == 8


async def test_round_trips_of_learned_variants_and_a_cold_process(
    framework: Framework, real_redis: Redis, key_prefix: str, spy: RedisSpy, clock: Clock
) -> None:
    """Learning costs nothing extra: a miss is 2 round trips (lookup, store with
    the vary record), a warm hit 1. A process that has not met the URL yet pays
    one more round trip once, then serves the other process's variant."""
    await _load_scripts(real_redis)
    url = "/echo?h=vary:Accept-Language"
    one, two = (Cache(real_redis, key_prefix=key_prefix, clock=clock) for _ in range(2))
    calls_one, calls_two = Calls(), Calls()
    async with (
        client_for(build(framework, one, calls_one)) as first,
        client_for(build(framework, two, calls_two)) as second,
    ):

        async def counted(client: httpx.AsyncClient, lang: str) -> tuple[str, str, int, Any]:
            spy.reset()
            response = await _get(client, url, accept_language=lang)
            return response.text, response.headers["x-cache"], spy.round_trips, dict(spy.commands)

        assert await counted(first, "es") == ("echo 1", "MISS", 2, {"EVALSHA": 2})
        assert await counted(first, "es") == ("echo 1", "HIT", 1, {"MGET": 1})
        assert await counted(first, "en") == ("echo 2", "MISS", 2, {"EVALSHA": 2})
        assert await counted(first, "en") == ("echo 2", "HIT", 1, {"MGET": 1})
        # The second process: its first lookup finds the vary record, not the entry.
        assert await counted(second, "en") == ("echo 2", "HIT", 2, {"EVALSHA": 2})
        assert await counted(second, "en") == ("echo 2", "HIT", 1, {"MGET": 1})
        assert await counted(second, "es") == ("echo 1", "HIT", 1, {"EVALSHA": 1})
        # A variant nobody stored yet: the second process runs its own handler.
        assert (await _get(second, url, accept_language="fr")).text == "echo 1"
    assert (calls_one["echo"], calls_two["echo"]) == (2, 1)
    await one.aclose()
    await two.aclose()


async def test_a_mixed_burst_gives_each_encoding_its_own_body(
    framework: Framework, real_redis: Redis, key_prefix: str
) -> None:
    """40 concurrent cold requests, half gzip, half identity: the first leader
    learns the Vary; the waiters of the other encoding do not get its body and
    run the handler once more between them."""
    cache = Cache(real_redis, key_prefix=key_prefix, timeout=5)
    calls = Calls(gate=asyncio.Event())
    async with _client(framework, cache, calls, Middleware(GZipMiddleware, minimum_size=1)) as c:

        async def open_gate() -> None:
            assert calls.gate is not None
            await calls.entered.wait()
            await asyncio.sleep(0.2)  # let the others pile up behind the leader
            calls.gate.set()

        opener = asyncio.create_task(open_gate())
        async with asyncio.timeout(20):
            responses = await asyncio.gather(
                *(c.get("/page", headers=GZIP if n % 2 else IDENTITY) for n in range(40))
            )
        await opener
    assert calls["page"] == 2
    for n, response in enumerate(responses):
        if n % 2:
            assert response.headers["content-encoding"] == "gzip"
        else:
            assert "content-encoding" not in response.headers
            assert response.content.startswith(b"<h1>page ")
    assert len({r.text for r in responses}) == 2
    await cache.aclose()


async def test_redis_down_never_coalesces_a_gzip_body_to_an_identity_client(
    key_prefix: str,
) -> None:
    """Without Redis, requests for one key wait for one handler run and take its
    answer when it may be shared. An answer that varies on a header the key does
    not hold yet (here: the first, gzip, answer) is shared with nobody."""
    release, shared = asyncio.Event(), asyncio.Event()
    runs: list[str] = []

    async def linger() -> None:
        shared.set()  # the body is out: a shareable entry would be on the flight now
        await release.wait()

    @cached(ttl=60)
    async def page(request: Request) -> Response:
        runs.append(request.headers.get("accept-encoding", ""))
        background = None if shared.is_set() else BackgroundTask(linger)
        return PlainTextResponse("z" * 2000, background=background)

    cache = Cache(f"redis://127.0.0.1:{free_port()}", key_prefix=key_prefix, lock_wait=30)
    app = Starlette(
        routes=[Route("/page", page)],
        middleware=[
            Middleware(CacheMiddleware, cache=cache),
            Middleware(GZipMiddleware, minimum_size=1),
        ],
    )
    async with client_for(app) as client, asyncio.timeout(10):
        leader = asyncio.create_task(client.get("/page", headers=GZIP))
        await shared.wait()
        plain = await client.get("/page", headers=IDENTITY)
        release.set()
        zipped = await leader
    assert (zipped.headers["x-cache"], zipped.headers["content-encoding"]) == ("BYPASS", "gzip")
    assert (plain.headers["x-cache"], plain.headers["x-cache-reason"]) == ("BYPASS", "backend")
    assert "content-encoding" not in plain.headers
    assert plain.content == b"z" * 2000
    assert runs == ["gzip", "identity"]
    await cache.aclose()


async def test_learned_variants_on_cluster_stay_in_the_url_slot(
    cluster: ClusterDeployment, cluster_client: RedisCluster, redis_log: CommandLog
) -> None:
    prefix = "vary:"
    cache = Cache(cluster_client, key_prefix=prefix, timeout=5)
    cold = Cache(cluster_client, key_prefix=prefix, timeout=5)
    calls, cold_calls = Calls(), Calls()
    gzip = Middleware(GZipMiddleware, minimum_size=1)
    async with (
        _client("starlette", cache, calls, gzip) as c,
        _client("starlette", cold, cold_calls, gzip) as other,
    ):
        states = [
            (r.headers["x-cache"], r.headers.get("content-encoding"))
            for r in [
                await c.get("/page", headers=headers)
                for headers in (GZIP, IDENTITY, GZIP, IDENTITY)
            ]
            + [await other.get("/page", headers=headers) for headers in (IDENTITY, GZIP)]
        ]
        assert states == [
            ("MISS", "gzip"),
            ("MISS", None),
            ("HIT", "gzip"),
            ("HIT", None),
            ("HIT", None),
            ("HIT", "gzip"),
        ]
        mine = [k for k in cluster.all_keys() if k.startswith(prefix)]
        records = [k for k in mine if ":y:" in k]
        entries = [k for k in mine if ":e:" in k]
        assert (len(records), len(entries)) == (1, 2), mine
        assert {cluster.keyslot(k) for k in [*records, *entries]} == {cluster.keyslot(records[0])}
    assert (calls["page"], cold_calls["page"]) == (2, 0)
    spanning = [a[:3] for a, slots in cluster.multi_key_commands(redis_log) if len(set(slots)) > 1]
    assert spanning == []
    for one in (cache, cold):
        assert one.stats.errors == 0, one.stats.as_dict()
        await one.aclose()
