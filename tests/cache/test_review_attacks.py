"""Outside review (a2) of the response cache: attacks that broke something, and the
cheap ones that did not, kept as regression tests.

Each failing test names the broken invariant in its docstring. Every app here is
a small Starlette app of its own, so what the handler sees is explicit; Redis is
the suite's real server (``own_redis`` where a test pauses it).
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Sequence
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.gzip import GZipMiddleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from asgi_redis_kit import Cache, CacheMiddleware, SessionMiddleware, cached
from tests.cache.conftest import client_for
from tests.support import Opaque, RedisProcess

pytestmark = pytest.mark.real_redis

SECRET = "a2-attack-secret-key-0123456789abcdef"
SUPPORTED = ("en", "de", "pt-BR")


def _language(request: Request) -> str:
    """How a hand-rolled handler picks a language: the first tag of the header
    Starlette gives it, if supported (Starlette has no parser of its own)."""
    raw = request.headers.get("accept-language") or ""
    first = raw.split(",")[0].split(";")[0].strip()
    return first if first in SUPPORTED else "en"


def attack_app(
    cache: Cache, calls: Counter[str], *, sessions: bool = False, gzip: bool = False
) -> Starlette:
    @cached(ttl=60)
    async def greeting(request: Request) -> Response:
        calls["greeting"] += 1
        return PlainTextResponse(
            f"hello in {_language(request)}", headers={"vary": "Accept-Language"}
        )

    @cached(ttl=60, vary=["accept-language"])
    async def declared(request: Request) -> Response:
        calls["declared"] += 1
        return PlainTextResponse(f"hello in {_language(request)}")

    @cached(ttl=60, vary_on_session=True)
    async def form(request: Request) -> Response:
        # A CSRF double-submit form: the token comes from its own cookie, so the
        # response says Vary: Cookie (as Django's csrf does).
        calls["form"] += 1
        token = request.cookies.get("csrftoken", "none")
        return PlainTextResponse(f"<input name=csrf value={token}>", headers={"vary": "Cookie"})

    @cached(ttl=60)
    async def links(request: Request) -> Response:
        # Builds its absolute URL from the proxy's headers, as apps behind a proxy do.
        calls["links"] += 1
        host = request.headers.get("x-forwarded-host", request.url.hostname)
        port = request.headers.get("x-forwarded-port")
        netloc = f"{host}:{port}" if port else f"{host}"
        return PlainTextResponse(f"<a href=//{netloc}/next>")

    @cached(ttl=60)
    async def page(request: Request) -> Response:
        calls["page"] += 1
        return PlainTextResponse(f"page {calls['page']} " + "x" * 600)

    middleware = [Middleware(CacheMiddleware, cache=cache)]
    if sessions:
        middleware.append(
            Middleware(SessionMiddleware, secret_key=SECRET, redis=cache.backend.client)
        )
    if gzip:
        middleware.append(Middleware(GZipMiddleware, minimum_size=1))
    routes = [
        Route("/greeting", greeting),
        Route("/declared", declared),
        Route("/form", form),
        Route("/links", links),
        Route("/page", page),
    ]
    return Starlette(routes=routes, middleware=middleware)


async def raw_get(
    c: httpx.AsyncClient, url: str, headers: Sequence[tuple[str, str]]
) -> httpx.Response:
    """A GET whose header lines are exactly ``headers`` (repeats kept)."""
    return await c.get(url, headers=list(headers))


# -- Vary: Cookie on a vary_on_session route ------------------------------------------------


@pytest.mark.parametrize("sessions", [False, True], ids=["no-session-mw", "session-mw"])
async def test_vary_cookie_on_a_per_user_route_keys_every_cookie(
    real_redis: Redis, key_prefix: str, sessions: bool
) -> None:
    """LEAK. A ``vary_on_session`` route whose response says ``Vary: Cookie``
    (here a CSRF double-submit token read from its own cookie) must not hand one
    visitor's cookie-derived page to another. The key keeps only the session
    cookie's part; two anonymous visitors with different ``csrftoken`` cookies
    share one entry, so the second gets the first one's token."""
    cache = Cache(real_redis, key_prefix=key_prefix)
    calls: Counter[str] = Counter()
    async with client_for(attack_app(cache, calls, sessions=sessions)) as c:
        first = await c.get("/form", headers={"cookie": "csrftoken=AAAA-victim"})
        second = await c.get("/form", headers={"cookie": "csrftoken=BBBB-attacker"})
    await cache.aclose()
    assert "AAAA-victim" in first.text
    assert "AAAA-victim" not in second.text, second.headers.get("x-cache")
    assert "BBBB-attacker" in second.text


# -- request headers keyed otherwise than the handler reads them ---------------------------


@pytest.mark.parametrize("route", ["/greeting", "/declared"], ids=["learned", "vary="])
async def test_a_repeated_header_line_cannot_poison_the_variant_of_its_joined_value(
    real_redis: Redis, key_prefix: str, route: str
) -> None:
    """POISONING. Starlette's ``request.headers.get`` returns the FIRST line of a
    repeated header; the key joins all lines with ", " and normalises the result
    (empty list items dropped). An attacker sending ``Accept-Language:`` (empty)
    then ``Accept-Language: de`` gets the handler's default page stored under the
    very variant of every ``Accept-Language: de`` browser. The same rule the
    Host header has (a second Host bypasses) is missing for keyed headers."""
    cache = Cache(real_redis, key_prefix=key_prefix)
    calls: Counter[str] = Counter()
    async with client_for(attack_app(cache, calls)) as c:
        poison = await raw_get(c, route, [("accept-language", ""), ("accept-language", "de")])
        victim = await raw_get(c, route, [("accept-language", "de")])
    await cache.aclose()
    assert poison.text == "hello in en"  # what the handler saw: the first, empty line
    assert victim.text == "hello in de", victim.headers.get("x-cache")


async def test_accept_language_case_folding_cannot_poison_what_browsers_send(
    real_redis: Redis, key_prefix: str
) -> None:
    """POISONING (app-dependent). ``Accept-Language`` values are lower-cased and
    their spaces dropped before keying, but the handler reads the raw value (a
    hand-rolled, case-sensitive match, as Starlette offers no parser). One
    request written ``pt-br`` stores the fallback page under the variant every
    browser sending ``pt-BR`` hits. The module keys the query byte for byte for
    exactly this reason ("a key that decoded them would let one spelling's page
    be served for another"); header values do not get the same rule."""
    cache = Cache(real_redis, key_prefix=key_prefix)
    calls: Counter[str] = Counter()
    async with client_for(attack_app(cache, calls)) as c:
        poison = await raw_get(c, "/greeting", [("accept-language", "pt-br")])
        victim = await raw_get(c, "/greeting", [("accept-language", "pt-BR")])
    await cache.aclose()
    assert poison.text == "hello in en"
    assert victim.text == "hello in pt-BR", victim.headers.get("x-cache")


async def test_x_forwarded_port_is_keyed_like_the_other_forwarding_headers(
    real_redis: Redis, key_prefix: str
) -> None:
    """POISONING (app-dependent). The key holds ``X-Forwarded-Host``/``-Proto``/
    ``-Prefix``/``Forwarded`` because "apps behind a proxy build URLs from them";
    ``X-Forwarded-Port`` (sent by Traefik, AWS ALB, nginx-ingress; read by
    Werkzeug's ProxyFix and hand-written URL builders) is not keyed, so one
    request carrying it stores links to the attacker's port for everyone."""
    cache = Cache(real_redis, key_prefix=key_prefix)
    calls: Counter[str] = Counter()
    async with client_for(attack_app(cache, calls)) as c:
        poison = await raw_get(c, "/links", [("x-forwarded-port", "31337")])
        victim = await c.get("/links")
    await cache.aclose()
    assert "31337" in poison.text
    assert "31337" not in victim.text, victim.headers.get("x-cache")


# -- attacks that failed: kept as regression tests -----------------------------------------


async def test_gzip_never_reaches_an_identity_client_from_a_cold_process(
    real_redis: Redis, key_prefix: str
) -> None:
    """A second process (cold memo) with an identity client after a gzip client
    stored its variant: it reads the vary record and gets its own variant."""
    calls: Counter[str] = Counter()
    first = Cache(real_redis, key_prefix=key_prefix)
    second = Cache(real_redis, key_prefix=key_prefix)
    async with client_for(attack_app(first, calls, gzip=True)) as c:
        zipped = await c.get("/page", headers={"accept-encoding": "gzip"})
    async with client_for(attack_app(second, calls, gzip=True)) as c:
        plain = await c.get("/page", headers={"accept-encoding": "identity"})
        again = await c.get("/page", headers={"accept-encoding": "identity"})
        none = await c.get("/page", headers={"accept-encoding": ""})
    await first.aclose()
    await second.aclose()
    assert zipped.headers["content-encoding"] == "gzip"
    for response in (plain, again, none):
        assert "content-encoding" not in response.headers
        assert response.content.startswith(b"page ")
    assert again.headers["x-cache"] == "HIT"


async def test_if_none_match_of_the_gzip_variant_is_no_304_for_identity(
    real_redis: Redis, key_prefix: str
) -> None:
    cache = Cache(real_redis, key_prefix=key_prefix)
    calls: Counter[str] = Counter()
    async with client_for(attack_app(cache, calls, gzip=True)) as c:
        zipped = await c.get("/page", headers={"accept-encoding": "gzip"})
        etag = zipped.headers["etag"]
        plain = await c.get("/page", headers={"accept-encoding": "identity"})
        conditional = await c.get(
            "/page", headers={"accept-encoding": "identity", "if-none-match": etag}
        )
        zipped_304 = await c.get(
            "/page", headers={"accept-encoding": "gzip", "if-none-match": etag}
        )
        head = await c.head("/page", headers={"accept-encoding": "identity"})
    await cache.aclose()
    assert plain.headers["etag"] != etag
    assert conditional.status_code == 200
    assert "content-encoding" not in conditional.headers
    assert zipped_304.status_code == 304
    assert head.status_code == 200
    assert head.content == b""
    assert "content-encoding" not in head.headers


async def test_invalidate_clear_and_tags_reach_every_variant(
    real_redis: Redis, key_prefix: str
) -> None:
    cache = Cache(real_redis, key_prefix=key_prefix)
    calls: Counter[str] = Counter()
    encodings = ("gzip", "identity", "br")
    async with client_for(attack_app(cache, calls, gzip=True)) as c:

        async def round_() -> list[str]:
            return [
                (await c.get("/page", headers={"accept-encoding": e})).headers["x-cache"]
                for e in encodings
            ]

        assert await round_() == ["MISS"] * 3
        assert await round_() == ["HIT"] * 3
        await cache.invalidate("http://testserver/page")
        assert await round_() == ["MISS"] * 3
        await cache.clear()
        assert await round_() == ["MISS"] * 3
    await cache.aclose()


async def test_paused_redis_serves_every_variant_without_a_500(
    own_redis: RedisProcess, key_prefix: str
) -> None:
    redis = Redis.from_url(own_redis.url)
    cache = Cache(redis, key_prefix=key_prefix, timeout=0.2, breaker_threshold=2)
    calls: Counter[str] = Counter()
    async with client_for(attack_app(cache, calls, gzip=True)) as c:
        await c.get("/page", headers={"accept-encoding": "gzip"})
        own_redis.pause()
        try:
            responses = await asyncio.gather(
                *(c.get("/page", headers={"accept-encoding": e}) for e in ("gzip", "identity") * 3)
            )
        finally:
            own_redis.resume()
    await cache.aclose()
    await redis.aclose()
    assert {r.status_code for r in responses} == {200}
    for response, encoding in zip(responses, ("gzip", "identity") * 3, strict=True):
        assert ("content-encoding" in response.headers) == (encoding == "gzip")


# -- sessions ------------------------------------------------------------------------------


@pytest.mark.parametrize("order", ["starlette-outside", "starlette-inside"])
async def test_a_foreign_session_cookie_name_still_keys_vary_on_session(
    real_redis: Redis, key_prefix: str, order: str
) -> None:
    """LEAK (configuration-dependent). With Starlette's own SessionMiddleware
    under another cookie name (``session_cookie="sid"``), the cache still keys
    ``vary_on_session`` routes on a cookie called ``session`` (it learns the name
    from our SessionMiddleware only), so every logged-in user shares one entry:
    bob is served alice's private page. A vary_on_session route skips the
    session-read rule, so nothing else stops it."""
    from starlette.middleware.sessions import SessionMiddleware as CookieSessions

    async def login(request: Request) -> Response:
        request.session["user"] = request.query_params["user"]
        return PlainTextResponse("welcome")

    @cached(ttl=60, vary_on_session=True)
    async def me(request: Request) -> Response:
        return PlainTextResponse(f"private page of {request.session.get('user')}")

    layers = [
        Middleware(CookieSessions, secret_key=SECRET, session_cookie="sid"),
        Middleware(CacheMiddleware, redis=real_redis, key_prefix=key_prefix),
    ]
    if order == "starlette-inside":
        layers.reverse()
    app = Starlette(routes=[Route("/login", login), Route("/me", me)], middleware=layers)
    async with client_for(app) as alice, client_for(app) as bob:
        await alice.get("/login", params={"user": "alice"})
        await bob.get("/login", params={"user": "bob"})
        assert (await alice.get("/me")).text == "private page of alice"
        page = await bob.get("/me")
    assert page.text == "private page of bob", page.headers.get("x-cache")


async def test_our_session_middleware_behind_an_opaque_middleware_still_keys_vary_on_session(
    real_redis: Redis, key_prefix: str
) -> None:
    """LEAK (configuration-dependent). The cookie name is learned by walking the
    ``.app`` chain; a middleware that keeps its inner app under another name (a
    closure, ``self._app``) hides our SessionMiddleware(cookie_name="sid") inside
    the cache, which then keys ``vary_on_session`` on a cookie ``session`` nobody
    sends: alice's private page is bob's. Not finding the session middleware
    should fail safe (not store a vary_on_session response whose request carries
    cookies), not fall back to a guessed name."""

    async def login(request: Request) -> Response:
        request.session["user"] = request.query_params["user"]
        return PlainTextResponse("welcome")

    @cached(ttl=60, vary_on_session=True)
    async def me(request: Request) -> Response:
        return PlainTextResponse(f"private page of {request.session.get('user')}")

    app = Starlette(
        routes=[Route("/login", login), Route("/me", me)],
        middleware=[
            Middleware(CacheMiddleware, redis=real_redis, key_prefix=key_prefix),
            Middleware(Opaque),
            Middleware(SessionMiddleware, secret_key=SECRET, redis=real_redis, cookie_name="sid"),
        ],
    )
    async with client_for(app) as alice, client_for(app) as bob:
        await alice.get("/login", params={"user": "alice"})
        await bob.get("/login", params={"user": "bob"})
        assert (await alice.get("/me")).text == "private page of alice"
        page = await bob.get("/me")
    assert page.text == "private page of bob", page.headers.get("x-cache")


# -- what a served response tells caches downstream ----------------------------------------


async def test_a_declared_vary_is_told_to_downstream_caches(
    real_redis: Redis, key_prefix: str
) -> None:
    """LEAK through a downstream shared cache (CDN, nginx proxy_cache). A route
    with ``vary=["accept-language"]`` keys its entries on that header, but the
    served response (MISS and HIT) carries ``Cache-Control: max-age=N`` added by
    the cache and no ``Vary`` naming the header: any shared cache in front keeps
    the first variant and serves it to every value (one tenant's, one
    language's page to all). Django's ``vary_on_headers`` patches ``Vary`` for
    this reason; the key's hidden parts must be named in ``Vary`` (or the
    response kept out of shared caches)."""
    cache = Cache(real_redis, key_prefix=key_prefix)
    calls: Counter[str] = Counter()
    async with client_for(attack_app(cache, calls)) as c:
        miss = await raw_get(c, "/declared", [("accept-language", "de")])
        hit = await raw_get(c, "/declared", [("accept-language", "de")])
    await cache.aclose()
    assert hit.headers["x-cache"] == "HIT"
    for response in (miss, hit):
        assert "max-age" in response.headers["cache-control"]
        vary = {v.strip().lower() for v in response.headers.get("vary", "").split(",")}
        assert "accept-language" in vary, dict(response.headers)


# -- single-flight and lease across processes ----------------------------------------------


async def test_a_waiting_process_re_reads_the_variant_its_leader_learned(
    real_redis: Redis, redis_url: str, key_prefix: str
) -> None:
    """WRONG HANDLER-RUN COUNT. Process B finds process A's lease on the base key
    and polls the base entry; A's response says ``Vary: Accept-Encoding`` and is
    stored under the variant key, releasing the base lease. B then sees no entry
    and no lease and runs the handler again instead of re-reading the variant
    the vary record now names (in-process followers do re-key: ``follow``)."""
    gate = asyncio.Event()
    entered = asyncio.Event()
    runs: Counter[str] = Counter()

    @cached(ttl=60)
    async def slow(request: Request) -> Response:
        runs["slow"] += 1
        entered.set()
        await asyncio.wait_for(gate.wait(), timeout=10)
        return PlainTextResponse("slow page " + "y" * 600)

    def app(cache: Cache) -> Starlette:
        return Starlette(
            routes=[Route("/slow", slow)],
            middleware=[
                Middleware(CacheMiddleware, cache=cache),
                Middleware(GZipMiddleware, minimum_size=1),
            ],
        )

    polled = asyncio.Event()

    class Polling(Redis):
        """Process B's client: says when B polls (an MGET of entry and lease)."""

        async def execute_command(self, *args: Any, **options: Any) -> Any:
            if str(args[0]).upper() == "MGET":
                polled.set()
            return await super().execute_command(*args, **options)  # type: ignore[no-untyped-call]

    b_redis = Polling.from_url(redis_url)
    a = Cache(real_redis, key_prefix=key_prefix, lock_wait=5)
    b = Cache(b_redis, key_prefix=key_prefix, lock_wait=5)
    gzip = {"accept-encoding": "gzip"}
    async with client_for(app(a)) as ca, client_for(app(b)) as cb:
        leader = asyncio.create_task(ca.get("/slow", headers=gzip))
        await asyncio.wait_for(entered.wait(), timeout=10)
        waiter = asyncio.create_task(cb.get("/slow", headers=gzip))
        await asyncio.wait_for(polled.wait(), timeout=10)  # B found the lease and polls
        gate.set()
        first, second = await asyncio.wait_for(asyncio.gather(leader, waiter), timeout=20)
    await a.aclose()
    await b.aclose()
    await b_redis.aclose()
    assert first.text == second.text
    assert runs["slow"] == 1, second.headers.get("x-cache")


# -- stale entries, HEAD and variants (attacks that failed) --------------------------------


def stale_app(cache: Cache, calls: Counter[str], fail: list[bool]) -> Starlette:
    @cached(ttl=10, stale_while_revalidate=100, stale_if_error=1000)
    async def news(request: Request) -> Response:
        calls["news"] += 1
        if fail:
            raise RuntimeError("backend down")
        return PlainTextResponse(f"news {calls['news']} " + "z" * 600)

    return Starlette(
        routes=[Route("/news", news)],
        middleware=[
            Middleware(CacheMiddleware, cache=cache),
            Middleware(GZipMiddleware, minimum_size=1),
        ],
    )


async def test_stale_variants_refresh_with_their_own_encoding(
    real_redis: Redis, key_prefix: str
) -> None:
    from tests.cache.conftest import Clock, client_for

    clock = Clock()
    cache = Cache(real_redis, key_prefix=key_prefix, clock=clock)
    calls: Counter[str] = Counter()
    fail: list[bool] = []
    gzip, plain = {"accept-encoding": "gzip"}, {"accept-encoding": "identity"}
    async with client_for(stale_app(cache, calls, fail)) as c:
        await c.get("/news", headers=gzip)
        await c.get("/news", headers=plain)
        clock.advance(20)  # stale, inside stale-while-revalidate
        stale_plain = await c.get("/news", headers=plain)
        await cache.wait_background()
        fresh_plain = await c.get("/news", headers=plain)
        fresh_zip = await c.get("/news", headers=gzip)  # still stale: its own refresh
        await cache.wait_background()
        clock.advance(500)  # past revalidate, inside stale-if-error
        fail.append(True)
        error_plain = await c.get("/news", headers=plain)
        error_zip = await c.get("/news", headers=gzip)
        head = await c.head("/news", headers=plain)
    await cache.aclose()
    assert stale_plain.headers["x-cache"] == "STALE"
    assert fresh_plain.headers["x-cache"] == "HIT"
    assert fresh_zip.headers["x-cache"] == "STALE"
    for response in (stale_plain, fresh_plain, error_plain):
        assert "content-encoding" not in response.headers
        assert response.content.startswith(b"news ")
    assert error_plain.headers["x-cache"] == "STALE"
    assert error_zip.headers["content-encoding"] == "gzip"
    assert error_zip.text.startswith("news ")
    assert head.status_code == 200
    assert head.headers["x-cache"] == "STALE"
    assert head.content == b""


@pytest.mark.parametrize("order", ["cache-outside", "session-outside"])
async def test_a_session_bound_to_a_user_counts_as_read_without_data(
    real_redis: Redis, key_prefix: str, order: str
) -> None:
    """LEAK. "A session holding data counts as read whatever path the handler
    took" -- but a session whose only content is its bound user (``bind_user``
    at login, no data keys) is not ``exposed``: an auth backend or handler that
    reads ``scope["session"].user_id`` directly (the path the rule exists for)
    gets a shared route's page stored, and the next logged-in visitor is served
    "hello alice"."""
    from asgi_redis_kit import Session

    async def login(request: Request) -> Response:
        session = Session.of(request)
        session.regenerate()
        session.bind_user(request.query_params["user"])
        return PlainTextResponse("welcome")

    @cached(ttl=60)
    async def home(request: Request) -> Response:
        user = request.scope["session"].user_id  # e.g. an AuthenticationBackend
        return PlainTextResponse(f"hello {user}")

    layers = [
        Middleware(CacheMiddleware, redis=real_redis, key_prefix=key_prefix),
        Middleware(SessionMiddleware, secret_key=SECRET, redis=real_redis),
    ]
    if order == "session-outside":
        layers.reverse()
    app = Starlette(routes=[Route("/login", login), Route("/home", home)], middleware=layers)
    async with client_for(app) as alice, client_for(app) as bob:
        await alice.get("/login", params={"user": "alice"})
        await bob.get("/login", params={"user": "bob"})
        assert (await alice.get("/home")).text == "hello alice"
        page = await bob.get("/home")
    assert page.text == "hello bob", page.headers.get("x-cache")


# -- invalidation by URL -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "url"),
    [
        ("testserver:80", "http://testserver/page"),
        ("testserver", "http://testserver:80/page"),
        ("xn--bcher-kva.example", "http://bücher.example/page"),
    ],
    ids=["port-in-host", "port-in-url", "idna"],
)
async def test_invalidate_url_reaches_the_entries_of_the_same_origin(
    real_redis: Redis, key_prefix: str, host: str, url: str
) -> None:
    """WRONG ANSWER (stale after invalidation). ``invalidate(url)`` names the URL
    by its netloc as written; entries are filed under the Host header exactly
    as sent. A proxy that always sends the port (nginx ``$host:$server_port``)
    or a URL written with its default port or in Unicode names the same origin
    but another URL id, so the invalidation silently reaches nothing."""
    cache = Cache(real_redis, key_prefix=key_prefix)
    calls: Counter[str] = Counter()
    async with client_for(attack_app(cache, calls)) as c:
        first = await c.get("/page", headers={"host": host})
        await cache.invalidate(url)
        second = await c.get("/page", headers={"host": host})
    await cache.aclose()
    assert first.headers["x-cache"] == "MISS"
    assert second.headers["x-cache"] == "MISS", "invalidate() did not reach the entry"


# -- Redis faults --------------------------------------------------------------------------


async def test_a_full_redis_keeps_variants_apart_and_never_500s(
    own_redis: RedisProcess, key_prefix: str
) -> None:
    """Out of memory: misses cannot store (nor take a lease); every variant is
    still answered, each client its own encoding, no 500, and entries stored
    before are still served."""
    from tests.support import fill_until_oom

    redis = Redis.from_url(own_redis.url)
    cache = Cache(redis, key_prefix=key_prefix, timeout=2)
    calls: Counter[str] = Counter()
    async with client_for(attack_app(cache, calls, gzip=True)) as c:
        stored = await c.get("/page", headers={"accept-encoding": "gzip"})
        await fill_until_oom(redis)
        encodings = ("gzip", "identity") * 3
        responses = await asyncio.gather(
            *(c.get("/page", headers={"accept-encoding": e}) for e in encodings)
        )
        hit = await c.get("/page", headers={"accept-encoding": "gzip"})
    await cache.aclose()
    await redis.aclose()
    assert stored.headers["content-encoding"] == "gzip"
    assert {r.status_code for r in responses} == {200}
    for response, encoding in zip(responses, encodings, strict=True):
        assert ("content-encoding" in response.headers) == (encoding == "gzip")
        assert response.text.startswith("page ")
    assert hit.headers["x-cache"] == "HIT"


@pytest.mark.parametrize("order", ["cache-outside", "session-outside"])
async def test_an_empty_session_page_is_not_served_to_a_logged_in_user(
    real_redis: Redis, key_prefix: str, order: str
) -> None:
    """POISONING (logged-in users get the logged-out page). A request with a
    session cookie that names no session (garbage, expired, or a valid empty
    one) reaches a handler that reads ``scope["session"]`` directly (an auth
    library's path); the session is empty and was not asked for through
    ``request.session``, so nothing counts as read, and the guest page is
    stored under the "carries the session cookie" key, which every logged-in
    visitor's request also has. Alice, logged in, is served "hello guest"
    without her handler running."""

    async def login(request: Request) -> Response:
        request.session["user"] = request.query_params["user"]
        return PlainTextResponse("welcome")

    @cached(ttl=60)
    async def home(request: Request) -> Response:
        user = request.scope["session"].get("user")  # not request.session
        return PlainTextResponse(f"hello {user or 'guest'}")

    layers = [
        Middleware(CacheMiddleware, redis=real_redis, key_prefix=key_prefix),
        Middleware(SessionMiddleware, secret_key=SECRET, redis=real_redis),
    ]
    if order == "session-outside":
        layers.reverse()
    app = Starlette(routes=[Route("/login", login), Route("/home", home)], middleware=layers)
    async with client_for(app) as alice, client_for(app) as stale:
        await alice.get("/login", params={"user": "alice"})
        guest = await stale.get("/home", headers={"cookie": "session=expired-or-garbage"})
        page = await alice.get("/home")
    assert guest.text == "hello guest"
    assert page.text == "hello alice", page.headers.get("x-cache")


# -- forwarding headers that only count from a trusted proxy -------------------------------


async def test_an_untrusted_x_forwarded_proto_cannot_poison_the_trusted_proxys_entry(
    real_redis: Redis, key_prefix: str
) -> None:
    """POISONING (scheme downgrade). uvicorn's ProxyHeadersMiddleware inside the
    cache honours ``X-Forwarded-Proto`` only from a trusted proxy. The key holds
    the raw header value and the scheme as the cache saw it (before the
    rewrite), not whether the header was honoured: a direct, untrusted client
    sending ``X-Forwarded-Proto: https`` gets an ``http://`` page stored under
    the very key of every request the proxy forwards, so real users are served
    ``http://`` links (mixed content, or a redirect loop for apps that force
    https)."""
    from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware

    @cached(ttl=60)
    async def canonical(request: Request) -> Response:
        return PlainTextResponse(f"<link rel=canonical href={request.url}>")

    app = Starlette(
        routes=[Route("/canonical", canonical)],
        middleware=[
            Middleware(CacheMiddleware, redis=real_redis, key_prefix=key_prefix),
            Middleware(ProxyHeadersMiddleware, trusted_hosts=["10.0.0.1"]),
        ],
    )
    https = {"x-forwarded-proto": "https"}

    def from_(address: str) -> httpx.AsyncClient:
        transport = httpx.ASGITransport(app=app, client=(address, 40000))
        return httpx.AsyncClient(transport=transport, base_url="http://testserver")

    async with from_("6.6.6.6") as attacker, from_("10.0.0.1") as proxy:
        poison = await attacker.get("/canonical", headers=https)
        page = await proxy.get("/canonical", headers=https)
    assert "http://testserver" in poison.text
    assert "https://testserver" in page.text, page.headers.get("x-cache")
