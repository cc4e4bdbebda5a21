"""Outside review (a1) of the session side: attacks that broke something, and the
cheap ones that did not, kept as regression tests.

Each failing test names the broken invariant in its docstring. Requests are held
mid-handler with asyncio Events (``Gate``), and a Redis client subclass holds one
chosen command (``Holding``) so that two requests interleave at a chosen step; the
commands themselves run on a real Redis.
"""

from __future__ import annotations

import asyncio
import math
import secrets
import struct
from collections.abc import AsyncIterator
from typing import Any, cast

import httpx
import pytest
from redis.asyncio import Redis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from asgi_redis_kit import Cache, Session, SessionMiddleware, SessionStore, cached
from asgi_redis_kit._redis import MAX_SECONDS
from asgi_redis_kit.sessions._codec import decode, encode
from asgi_redis_kit.sessions._cookie import CookieSigner
from asgi_redis_kit.sessions._record import handle_of
from tests.scaleout.conftest import cluster  # noqa: F401 - the shared Cluster fixture
from tests.scaleout.servers import HOST, ClusterDeployment
from tests.sessions.conftest import SECRET, Gate, cookie_of, session_id_of

pytestmark = pytest.mark.real_redis


class Holding(Redis):
    """A real client that holds the ``nth`` single command named ``name`` (not one
    in a pipeline) until ``opened`` is set, once ``armed``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.armed = False
        self.name = "SREM"
        self.nth = 1
        self.seen = 0
        self.reached = asyncio.Event()
        self.opened = asyncio.Event()

    def arm(self, name: str, nth: int = 1) -> None:
        self.armed, self.name, self.nth, self.seen = True, name, nth, 0

    async def execute_command(self, *args: Any, **options: Any) -> Any:
        if self.armed and str(args[0]).upper() == self.name:
            self.seen += 1
            if self.seen == self.nth:
                self.reached.set()
                await self.opened.wait()
        return await super().execute_command(*args, **options)  # type: ignore[no-untyped-call]


def attack_app(
    redis: Any,
    key_prefix: str,
    gates: dict[str, Gate] | None = None,
    store: SessionStore | None = None,
) -> Starlette:
    gates = gates or {}

    async def read(request: Request) -> Response:
        return JSONResponse(dict(request.session))

    async def whoami(request: Request) -> Response:
        return JSONResponse({"user": Session.of(request).user_id})

    async def set_values(request: Request) -> Response:
        request.session.update(await request.json())
        return PlainTextResponse("ok")

    async def login(request: Request) -> Response:
        session = Session.of(request)
        session.regenerate()
        session.bind_user(request.path_params["user"])
        return PlainTextResponse("ok")

    async def rotate(request: Request) -> Response:
        Session.of(request).regenerate()
        return PlainTextResponse("ok")

    async def bind(request: Request) -> Response:
        session = Session.of(request)
        gate = gates.get(request.query_params.get("gate", ""))
        if gate is not None:
            await gate.wait()
        try:
            session.bind_user(request.path_params["user"])
        except TypeError:
            return PlainTextResponse("refused", status_code=400)
        return PlainTextResponse("ok")

    async def held(request: Request) -> Response:
        session = Session.of(request)
        await gates["held"].wait()
        op = request.path_params["op"]
        if op == "write":
            session["late"] = True
        elif op == "incr":
            await session.incr("n")
        elif op == "regenerate":
            session.regenerate()
        elif op == "login":
            session.regenerate()
            session.bind_user("alice")
        elif op == "rebind":
            session.bind_user("bob")
        elif op == "clear":
            session.clear()
        return PlainTextResponse("ok")

    async def logout(request: Request) -> Response:
        session = Session.of(request)
        gate = gates.get(request.query_params.get("gate", ""))
        if gate is not None:
            await gate.wait()
        session.clear()
        return PlainTextResponse("ok")

    options: dict[str, Any] = {"store": store} if store else {"redis": redis}
    if store is None:
        options["key_prefix"] = key_prefix
    return Starlette(
        routes=[
            Route("/read", read),
            Route("/whoami", whoami),
            Route("/set", set_values, methods=["POST"]),
            Route("/login/{user}", login, methods=["POST"]),
            Route("/rotate", rotate, methods=["POST"]),
            Route("/bind/{user}", bind, methods=["POST"]),
            Route("/held/{op}", held, methods=["POST"]),
            Route("/logout", logout, methods=["POST"]),
        ],
        middleware=[Middleware(SessionMiddleware, secret_key=SECRET, **options)],
    )


def browser(app: Any, cookie: str | None = None) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app, raise_app_exceptions=False),
        base_url="http://testserver",
        cookies={"session": cookie} if cookie else None,
    )


@pytest.fixture
async def holding(redis_url: str, key_prefix: str) -> AsyncIterator[Holding]:
    client = cast("Holding", Holding.from_url(redis_url))
    try:
        yield client
    finally:
        client.opened.set()
        keys = [key async for key in client.scan_iter(match=f"{key_prefix}*", count=1000)]
        if keys:
            await client.delete(*keys)
        await client.aclose()


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


async def dead_index_entries(redis: Redis, key_prefix: str) -> list[str]:
    dead = []
    async for key in redis.scan_iter(match=f"{key_prefix}u:*", count=1000):
        for member in await redis.smembers(key):  # type: ignore[misc,unused-ignore]
            if not await redis.exists(f"{key_prefix}{_text(member)}"):
                dead.append(f"{_text(key)} -> {_text(member)}")
    return dead


# -- the per-user index -------------------------------------------------------------


async def test_rebind_back_to_the_first_user_keeps_the_session_in_her_index(
    holding: Holding, key_prefix: str
) -> None:
    """Failed before the fix (security). alice -> bob -> alice: request 1 rebinds to bob and
    is slow to send its un-index of alice; request 2 (loaded as bob) rebinds to alice
    and finishes. Request 1's late SREM then removes the entry request 2 relied on:
    a live session bound to alice is missing from her index, and revoke_user("alice")
    does not end it (invariant 1, "the index is a superset", broken)."""
    app = attack_app(holding, key_prefix)
    store = SessionStore(holding, key_prefix=key_prefix)
    async with browser(app) as tab:
        assert (await tab.post("/login/alice")).status_code == 200
        holding.arm("SREM")  # request 1's un-index of alice, after its bind committed
        first = asyncio.ensure_future(tab.post("/bind/bob"))
        # (A fixed protocol may send no such SREM: then request 1 just finishes.)
        reached = asyncio.ensure_future(holding.reached.wait())
        await asyncio.wait({first, reached}, timeout=10, return_when=asyncio.FIRST_COMPLETED)
        reached.cancel()
        assert (await tab.post("/bind/alice")).status_code == 200  # request 2
        holding.opened.set()
        assert (await asyncio.wait_for(first, 10)).status_code == 200
        assert (await tab.get("/whoami")).json() == {"user": "alice"}
        assert len(await store.user_sessions("alice")) == 1, "alice's index lost her session"
        assert await store.revoke_user("alice") == 1
        assert (await tab.get("/whoami")).json() == {"user": None}


async def test_a_rebind_that_lost_the_race_leaves_no_dead_index_entry(
    real_redis: Redis, key_prefix: str
) -> None:
    """Failed before the fix (leak). Two requests loaded the same session of alice; one
    rebinds it to bob, the other (later) to carol and gets MOVED. The loser's index
    add for carol is kept; when the session then ends (logout), nothing removes it:
    a dead id in carol's index, forever with absolute_lifetime=None (no index TTL),
    until someone lists or revokes carol."""
    gates = {"bob": Gate(), "carol": Gate()}
    store = SessionStore(real_redis, key_prefix=key_prefix, absolute_lifetime=None)
    app = attack_app(real_redis, key_prefix, gates, store=store)
    async with browser(app) as tab:
        await tab.post("/login/alice")
        to_bob = asyncio.ensure_future(tab.post("/bind/bob?gate=bob"))
        to_carol = asyncio.ensure_future(tab.post("/bind/carol?gate=carol"))
        await asyncio.wait_for(gates["bob"].reached.wait(), 10)
        await asyncio.wait_for(gates["carol"].reached.wait(), 10)
        gates["bob"].opened.set()
        assert (await asyncio.wait_for(to_bob, 10)).status_code == 200
        gates["carol"].opened.set()
        assert (await asyncio.wait_for(to_carol, 10)).status_code == 200
        assert (await tab.get("/whoami")).json() == {"user": "bob"}
        await tab.post("/logout")
    assert await dead_index_entries(real_redis, key_prefix) == []


async def test_revoke_session_racing_a_rotation_still_ends_it(
    holding: Holding, real_redis: Redis, key_prefix: str
) -> None:
    """Failed before the fix (security). revoke_session(alice, handle) read alice's index;
    before it deletes the session, the browser logs in again (regenerate: the data
    and the binding move to a new id, the old id is deleted). revoke_session then
    finds the old id gone and returns False, and the successor lives on. revoke_user
    follows such a successor (repeated passes); revoke_session does not."""
    app = attack_app(real_redis, key_prefix)
    async with browser(app) as tab:
        await tab.post("/login/alice")
        await tab.post("/set", json={"secret": 1})
        handle = handle_of(session_id_of(tab.cookies["session"]))
        holding.arm("EVALSHA")  # its delete, right after it read the index
        revoke = asyncio.ensure_future(
            SessionStore(holding, key_prefix=key_prefix).revoke_session("alice", handle)
        )
        await asyncio.wait_for(holding.reached.wait(), 10)
        assert cookie_of(await tab.post("/login/alice"))  # the rotation went through
        holding.opened.set()
        revoked = await asyncio.wait_for(revoke, 10)
        data = (await tab.get("/read")).json()
        assert (revoked, data) == (True, {}), "the revoked session lives on under a new id"


@pytest.mark.parametrize("op", ["write", "incr", "regenerate", "login", "rebind", "clear"])
async def test_revoke_session_wins_over_a_request_in_flight(
    real_redis: Redis, key_prefix: str, op: str
) -> None:
    """Passes: revoke_session is a killer like revoke_user / logout / expiry."""
    gates = {"held": Gate()}
    app = attack_app(real_redis, key_prefix, gates)
    store = SessionStore(real_redis, key_prefix=key_prefix)
    async with browser(app) as tab:
        await tab.post("/login/alice")
        old = tab.cookies["session"]
        held = asyncio.ensure_future(tab.post(f"/held/{op}"))
        await asyncio.wait_for(gates["held"].reached.wait(), 10)
        assert await store.revoke_session("alice", handle_of(session_id_of(old)))
        gates["held"].opened.set()
        response = await asyncio.wait_for(held, 10)
        assert response.status_code == 200
        assert not cookie_of(response)
    async with browser(app, old) as replay:
        assert (await replay.get("/read")).json() == {}
    keys = [key async for key in real_redis.scan_iter(match=f"{key_prefix}*")]
    assert keys == []


async def test_two_logins_of_one_session_as_two_users_leave_one_clean_winner(
    real_redis: Redis, key_prefix: str
) -> None:
    """Passes: both loaded the same anonymous session; one login wins, the other
    drops its new record; each index holds exactly the live winner."""
    gates = {"held": Gate()}
    app = attack_app(real_redis, key_prefix, gates)
    store = SessionStore(real_redis, key_prefix=key_prefix)
    async with browser(app) as tab:
        await tab.post("/set", json={"cart": [1]})
        old = tab.cookies["session"]
        async with browser(app, old) as a, browser(app, old) as b:
            first = asyncio.ensure_future(a.post("/held/login"))  # as alice
            await asyncio.wait_for(gates["held"].reached.wait(), 10)
            second = await b.post("/login/bob")
            gates["held"].opened.set()
            lost = await asyncio.wait_for(first, 10)
            assert cookie_of(second)
            assert not cookie_of(lost)
        assert await store.user_sessions("alice") == []
        assert len(await store.user_sessions("bob")) == 1
    assert await dead_index_entries(real_redis, key_prefix) == []


@pytest.mark.parametrize(
    "user", ["{alice}", "}", "{", "a}b{c", "with space", "ünïcødé ☃", "\x00nul", "x" * 20_000]
)
async def test_odd_user_ids_bind_list_and_revoke(
    real_redis: Redis, key_prefix: str, user: str
) -> None:
    """Passes: user ids with hash-tag braces, spaces, unicode, NUL or 20 kB."""
    store = SessionStore(real_redis, key_prefix=key_prefix)
    async with browser(odd_login_app(real_redis, key_prefix, user)) as tab:
        assert (await tab.post("/")).status_code == 200
        assert [info.handle for info in await store.user_sessions(user)] == [
            handle_of(session_id_of(tab.cookies["session"]))
        ]
        assert await store.user_sessions(user + "x") == []
        assert await store.revoke_user(user) == 1
        assert (await tab.get("/read")).json() == {}
    assert await dead_index_entries(real_redis, key_prefix) == []


def odd_login_app(redis: Any, key_prefix: str, user: str) -> Starlette:
    """An app whose login binds ``user``, whatever a URL could carry."""

    async def login(request: Request) -> Response:
        session = Session.of(request)
        session.regenerate()
        session["who"] = "me"
        try:
            session.bind_user(user)
        except TypeError:
            return PlainTextResponse("refused", status_code=400)
        return PlainTextResponse("ok")

    async def read(request: Request) -> Response:
        return JSONResponse(dict(request.session))

    return Starlette(
        routes=[Route("/", login, methods=["POST"]), Route("/read", read)],
        middleware=[
            Middleware(SessionMiddleware, secret_key=SECRET, redis=redis, key_prefix=key_prefix)
        ],
    )


async def test_a_user_id_that_is_not_utf8_is_refused_by_bind_user(
    real_redis: Redis, key_prefix: str
) -> None:
    """Failed before the fix (500). bind_user("\\ud800") is accepted (a non-empty str), and
    the save then dies encoding it: UnicodeEncodeError, a 500 from the middleware
    instead of a TypeError on the handler's line (what a session key like that
    gets). The store's admin API raises UnicodeEncodeError, not its TypeError."""
    lone = "\ud800"
    async with browser(odd_login_app(real_redis, key_prefix, lone)) as tab:
        response = await tab.post("/")
        assert response.status_code == 400, "bind_user accepted a user id it cannot store"
    store = SessionStore(real_redis, key_prefix=key_prefix)
    for user in (lone, "a\udfffb"):
        with pytest.raises(TypeError, match="UTF-8"):
            await store.revoke_user(user)
        with pytest.raises(TypeError, match="UTF-8"):
            await store.user_sessions(user)
        with pytest.raises(TypeError, match="UTF-8"):
            await store.revoke_session(user, "0" * 32)
    # The same class: a key prefix Redis cannot take would fail every request.
    with pytest.raises(TypeError, match="UTF-8"):
        SessionStore(real_redis, key_prefix=lone)


# -- values -------------------------------------------------------------------------


async def test_a_session_with_thousands_of_keys_can_still_log_in(
    real_redis: Redis, key_prefix: str
) -> None:
    """Failed before the fix (data loss / bogus 503). The save scripts pass every field as
    one Lua ``unpack(ARGV, ...)``, which Redis' Lua refuses past ~8000 values
    ("too many results to unpack"). A session that grew to 4500 keys over three
    requests (each saved fine) can no longer be regenerated: every login is a 503
    "store unavailable, retry" -- forever, since retrying cannot help."""
    app = attack_app(real_redis, key_prefix)
    async with browser(app) as tab:
        for start in range(0, 4500, 1500):
            batch = {f"seen:{i}": True for i in range(start, start + 1500)}
            assert (await tab.post("/set", json=batch)).status_code == 200
        response = await tab.post("/login/alice")
        assert response.status_code == 200, response.text
        assert len((await tab.get("/read")).json()) == 4500


async def test_a_first_save_of_five_thousand_keys_is_not_an_outage(
    real_redis: Redis, key_prefix: str
) -> None:
    """Failed before the fix (bogus 503): the same limit on a first save (and on an update
    changing that many fields): a clear error or a save, not "Redis is down"."""
    app = attack_app(real_redis, key_prefix)
    async with browser(app) as tab:
        response = await tab.post("/set", json={f"k{i}": i for i in range(5000)})
        assert response.status_code != 503, "a big session is reported as a Redis outage"


async def test_an_update_of_thousands_of_fields_and_a_rebind_with_many_keys_save(
    real_redis: Redis, key_prefix: str
) -> None:
    """Sibling of the unpack limit: an update that changes, then deletes, 9000
    fields, and a user index add, go through the same scripts in slices."""
    app = attack_app(real_redis, key_prefix)
    async with browser(app) as tab:
        assert (await tab.post("/set", json={"a": 1})).status_code == 200
        batch = {f"k{i}": i for i in range(9000)}
        assert (await tab.post("/set", json=batch)).status_code == 200
        assert len((await tab.get("/read")).json()) == 9001
        assert (await tab.post("/login/alice")).status_code == 200
        assert (await tab.post("/logout")).status_code == 200
        assert (await tab.get("/read")).json() == {}


async def test_a_session_past_what_redis_takes_is_a_clear_error_not_an_outage(
    real_redis: Redis, key_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A session past MAX_SESSION_BYTES (512 MiB: Redis' default proto-max-bulk-len,
    past which it drops the connection -- a 503 "retry" forever) is the app's
    TypeError naming the limit, and the stored session is left as it was. The
    limit is lowered here so the test does not need gigabytes of memory."""
    from asgi_redis_kit.sessions import _codec

    monkeypatch.setattr(_codec, "MAX_SESSION_BYTES", 10_000)
    app = attack_app(real_redis, key_prefix)
    async with browser(app) as tab:
        assert (await tab.post("/set", json={"a": "x" * 5000})).status_code == 200
        assert (await tab.post("/set", json={"b": "y" * 6000})).status_code == 500
        strict = httpx.AsyncClient(
            transport=httpx.ASGITransport(app), base_url="http://testserver", cookies=tab.cookies
        )
        async with strict:
            with pytest.raises(TypeError, match="a session may hold"):
                await strict.post("/set", json={"b": "y" * 6000})
        assert (await tab.get("/read")).json() == {"a": "x" * 5000}


async def test_a_cached_route_with_thousands_of_tags_is_cached(
    real_redis: Redis, key_prefix: str
) -> None:
    """Failed before the fix: the cache's lookup script had the same unpack() of every
    version key (one per tag); past ~8000 tags each lookup failed like an outage."""
    from asgi_redis_kit import CacheMiddleware

    cache = Cache(real_redis, key_prefix=key_prefix)

    @cached(ttl=60, tags=[f"t{i}" for i in range(9000)])
    async def page(request: Request) -> Response:
        return PlainTextResponse("page")

    app = Starlette(
        routes=[Route("/", page)], middleware=[Middleware(CacheMiddleware, cache=cache)]
    )
    try:
        async with browser(app) as tab:
            assert (await tab.get("/")).headers["x-cache"] == "MISS"
            assert (await tab.get("/")).headers["x-cache"] == "HIT"
            await cache.invalidate_tags("t8999")
            assert (await tab.get("/")).headers["x-cache"] == "MISS"
    finally:
        await cache.aclose()


@pytest.mark.parametrize(
    "bits",
    [
        0x7FF8_0000_0000_0001,
        0xFFF8_0000_0000_0001,  # negative, with a payload
        0x7FF0_0000_0000_0001,  # signalling
        0x7FFF_FFFF_FFFF_FFFF,
        0x7FF8_0000_0000_0000,  # float("nan"): the short form, as before
        0xFFF8_0000_0000_0000,  # float("-nan")
    ],
)
def test_a_nan_keeps_its_payload_bits(bits: int) -> None:
    """Failed before the fix (cosmetic: a documented promise). README and _codec say a
    value comes back with "the same float bits"; a NaN keeps its sign but its
    payload comes back as the canonical quiet NaN. (Siblings: nested, as a dict
    key, and the canonical NaNs keep the stored form older records have.)"""
    (value,) = struct.unpack("<d", struct.pack("<Q", bits))
    assert math.isnan(value)
    back = decode(encode("x", value))
    assert struct.pack("<d", back) == struct.pack("<d", value)
    (nested,) = decode(encode("x", [{value: (value,)}]))
    ((key, (item,)),) = nested.items()
    assert struct.pack("<d", key) == struct.pack("<d", item) == struct.pack("<d", value)
    assert encode("x", value) == encode("x", value)  # deterministic
    if bits & 0x000F_FFFF_FFFF_FFFF == 0x0008_0000_0000_0000:
        assert encode("x", value) in (b'\x01["f","nan"]', b'\x01["f","-nan"]')


@pytest.mark.parametrize(
    "blob",
    [
        b"",
        b"\x01",
        b"\x01[]",
        b'\x01["d", [1], 2]',
        b'\x01["d", {}, 2]',
        b'\x01["i", "zz"]',
        b'\x01["s", "ff"]',
        b'\x01["s", "d800"]',
        b'\x01["f", "NaN"]',
        b"\x01" + b'["l",' * 300 + b"1" + b"]" * 300,
        b"[" * 2000 + b"]" * 2000,
        b"\xff\xfe",
        b'\x01{"a": ["q", 1]}',
    ],
)
async def test_crafted_field_bytes_are_an_empty_session_not_a_500(
    real_redis: Redis, key_prefix: str, blob: bytes
) -> None:
    """Passes (on a default client): a corrupt data field means a fresh session."""
    app = attack_app(real_redis, key_prefix)
    async with browser(app) as tab:
        await tab.post("/set", json={"a": 1})
        sid = session_id_of(tab.cookies["session"])
        await real_redis.hset(f"{key_prefix}{sid}", "d:evil", blob)
        response = await tab.get("/read")
        assert response.status_code == 200
        assert response.json() == {}


async def test_a_crafted_field_on_a_decode_responses_client_is_not_a_500(
    redis_url: str, real_redis: Redis, key_prefix: str
) -> None:
    """Failed before the fix (500, for every request of that cookie). With a caller's client
    made with decode_responses=True (which the library otherwise works with), a
    data field that is not UTF-8 makes redis-py raise UnicodeDecodeError while it
    parses the load's reply: not a RedisError, so neither the corrupt-record path
    nor the 503 path catches it.

    Fixed by refusing such clients at construction, for sessions and the cache
    alike (and a URL asking for it): stored bytes are not always text, so a
    decoding client cannot be made safe reply by reply. (The original test served
    a request through such a client; the clear error now comes before any.)"""
    client: Redis = Redis.from_url(redis_url, decode_responses=True)
    url = f"{redis_url}?decode_responses=true"
    try:
        for make in (
            lambda redis: SessionStore(redis, key_prefix=key_prefix),
            lambda redis: SessionMiddleware(
                attack_app(redis, key_prefix), secret_key=SECRET, redis=redis
            ),
            lambda redis: Cache(redis),
        ):
            for redis in (client, url):
                with pytest.raises(ValueError, match="decode_responses"):
                    make(redis)
        # A default client is still taken.
        assert SessionStore(real_redis, key_prefix=key_prefix).backend.client is real_redis
    finally:
        await client.aclose()


# -- lifetime and cookies -----------------------------------------------------------


async def test_rotating_the_id_does_not_restart_the_absolute_lifetime(
    real_redis: Redis, key_prefix: str
) -> None:
    """Failed before the fix (security). absolute_lifetime is "seconds after creation when a
    session ends however active it is", but regenerate() (rotation, no new login)
    gives the successor a fresh creation time: an app that rotates ids periodically,
    as OWASP suggests, or a stolen cookie replayed to any endpoint that rotates,
    keeps the session (and its user binding) alive forever."""
    now = [1_000_000.0]
    store = SessionStore(
        real_redis,
        key_prefix=key_prefix,
        idle_timeout=1000,
        absolute_lifetime=100,
        clock=lambda: now[0],
    )
    app = attack_app(real_redis, key_prefix, store=store)
    async with browser(app) as tab:
        await tab.post("/login/alice")
        await tab.post("/set", json={"role": "admin"})
        now[0] += 60
        assert cookie_of(await tab.post("/rotate"))
        now[0] += 60  # 120 s after the login: past the absolute lifetime
        assert (await tab.get("/read")).json() == {}, "rotation extended the lifetime"
        assert (await tab.get("/whoami")).json() == {"user": None}


async def test_a_stale_cookie_sent_first_does_not_hide_the_live_one(
    real_redis: Redis, key_prefix: str
) -> None:
    """Failed before the fix (availability). Browsers send two cookies of one name when an
    older one has another Path or Domain (say, the app moved from path="/app" to
    "/"), the longer path first. When that first cookie is validly signed but its
    session ended, the middleware stops there: the user looks logged out, and every
    login sets the "/" cookie again while the stale one keeps coming first -- a
    login loop until the browser drops it. (Starlette's own middleware uses the
    last value.)"""
    app = attack_app(real_redis, key_prefix)
    async with browser(app) as tab:
        await tab.post("/login/alice")
        live = tab.cookies["session"]
    stale = CookieSigner(SECRET).sign(secrets.token_urlsafe(32))
    async with browser(app) as other:
        response = await other.get(
            "/whoami", headers={"cookie": f"session={stale}; session={live}"}
        )
        assert response.json() == {"user": "alice"}


async def test_many_signed_cookies_cost_at_most_three_loads(
    real_redis: Redis, key_prefix: str, spy: Any
) -> None:
    """Sibling of the stale-cookie fix: trying the next cookie is capped, so a
    request carrying a hundred validly signed (stolen or replayed) ids of ended
    sessions costs three loads, not a hundred."""
    app = attack_app(real_redis, key_prefix)
    signer = CookieSigner(SECRET)
    stale = "; ".join(f"session={signer.sign(secrets.token_urlsafe(32))}" for _ in range(100))
    async with browser(app) as tab:
        spy.reset()
        response = await tab.get("/whoami", headers={"cookie": stale})
        assert response.json() == {"user": None}
        assert spy.commands["EVALSHA"] + spy.commands["EVAL"] <= 3, spy.commands


@pytest.mark.parametrize(
    "header",
    [
        "session=" + "A" * 5000,
        'session=""',
        "session",
        "session=; session=;",
        "session==.=.",
        "SESSION={live}x",
        "session={live}\x00",
        "session= {live} ",
    ],
)
async def test_hostile_cookie_variants_never_500(
    real_redis: Redis, key_prefix: str, header: str
) -> None:
    """Passes: forged, oversized, duplicated or mangled cookies get an empty (or the
    right) session, never an error."""
    app = attack_app(real_redis, key_prefix)
    async with browser(app) as tab:
        await tab.post("/set", json={"a": 1})
        live = tab.cookies["session"]
    async with browser(app) as other:
        response = await other.get("/read", headers={"cookie": header.format(live=live)})
        assert response.status_code == 200
        assert response.json() in ({}, {"a": 1})


async def test_a_logout_racing_a_rebind_leaves_no_dead_index_entry(
    real_redis: Redis, key_prefix: str
) -> None:
    """Failed before the fix (leak). A logout that loaded the session as alice deletes it
    after another request rebound it to bob: the logout un-indexes alice (the user
    it loaded), so bob's index keeps a dead id. The same holds for the save that
    finds the absolute lifetime over (store.delete with the loaded user)."""
    gates = {"logout": Gate()}
    store = SessionStore(real_redis, key_prefix=key_prefix, absolute_lifetime=None)
    app = attack_app(real_redis, key_prefix, gates, store=store)
    async with browser(app) as tab:
        await tab.post("/login/alice")
        logout = asyncio.ensure_future(tab.post("/logout?gate=logout"))
        await asyncio.wait_for(gates["logout"].reached.wait(), 10)
        assert (await tab.post("/bind/bob")).status_code == 200
        gates["logout"].opened.set()
        assert cookie_of(await asyncio.wait_for(logout, 10)) == ""
        assert (await tab.get("/whoami")).json() == {"user": None}
    assert await dead_index_entries(real_redis, key_prefix) == []


@pytest.mark.parametrize("slow_op", ["read-only", "incr"])
@pytest.mark.parametrize("other", ["login", "logout", "revoke"])
async def test_a_slow_request_does_not_resign_a_cookie_whose_session_was_rotated(
    real_redis: Redis, key_prefix: str, other: str, slow_op: str
) -> None:
    """Failed before the fix (logs the user out). During a secret-key rotation every request
    with an old-key cookie gets that cookie re-signed. A slow read-only request that
    loaded the session before another tab logged in (regenerate: new id, old one
    deleted) still re-signs the *old* id at the end, without checking it still
    exists: its Set-Cookie overwrites the new login cookie with a dead one -- the
    very thing "no Set-Cookie for a session that ended" exists to prevent."""
    old_app = attack_app(real_redis, key_prefix)  # signs with SECRET only
    gates = {"held": Gate()}
    rotating = Starlette(
        routes=attack_app(real_redis, key_prefix, gates).routes,
        middleware=[
            Middleware(
                SessionMiddleware,
                secret_key=[SECRET, "the-new-key"],
                redis=real_redis,
                key_prefix=key_prefix,
            )
        ],
    )
    async with browser(old_app) as tab:
        await tab.post("/set", json={"cart": [1]})
        old_cookie = tab.cookies["session"]
    async with browser(rotating, old_cookie) as slow_tab, browser(rotating, old_cookie) as tab:
        slow = asyncio.ensure_future(slow_tab.post(f"/held/{slow_op}"))
        await asyncio.wait_for(gates["held"].reached.wait(), 10)
        if other == "login":
            assert cookie_of(await tab.post("/login/alice"))
        elif other == "logout":
            assert (await tab.post("/logout")).status_code == 200
        else:
            assert (await tab.post("/bind/alice")).status_code == 200
            store = SessionStore(real_redis, key_prefix=key_prefix)
            assert await store.revoke_user("alice") == 1
        gates["held"].opened.set()
        response = await asyncio.wait_for(slow, 10)
        assert response.status_code == 200
        assert not cookie_of(response), "re-signed the id of a session that no longer exists"


async def test_user_sessions_on_a_read_only_replica_still_lists(
    own_redis: Any, key_prefix: str
) -> None:
    """Failed before the fix (availability of a read). user_sessions prunes dead entries
    with an SREM in the same call; on a read-only replica (or during a failover)
    that write is refused and the whole listing raises BackendUnavailable, though
    every read it needs succeeded. Pruning is housekeeping: it should not fail the
    listing."""
    from tests.support import RedisProcess

    primary = RedisProcess().start()
    source: Redis = Redis.from_url(primary.url)
    replica: Redis = Redis.from_url(own_redis.url)
    try:
        app = attack_app(source, key_prefix)
        async with browser(app) as tab:
            await tab.post("/login/alice")
        async with browser(app) as tab:
            await tab.post("/login/alice")
            await tab.post("/logout")
        store_on_primary = SessionStore(source, key_prefix=key_prefix)
        await source.sadd(store_on_primary.user_key("alice"), "x" * 43)  # a dead entry
        await source.config_set("repl-diskless-sync-delay", 0)  # sync at once
        await replica.replicaof("127.0.0.1", primary.port)
        for _ in range(200):
            if await replica.exists(store_on_primary.user_key("alice")):
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError("the replica never synced")
        store = SessionStore(replica, key_prefix=key_prefix)
        assert len(await store.user_sessions("alice")) == 1
    finally:
        await replica.replicaof("NO", "ONE")
        await replica.aclose()
        await source.aclose()
        primary.close()


def test_one_url_store_serves_threads_each_with_its_own_loop(
    redis_url: str, key_prefix: str
) -> None:
    """Passes: four threads, each running its own loop at the same time, share one
    SessionStore made from a URL; no cross-loop error, and nothing left unclosed."""
    import gc
    import threading

    stores = [SessionStore(redis_url, key_prefix=key_prefix)]
    errors: list[BaseException] = []

    def worker(n: int) -> None:
        store = stores[0]

        async def run() -> None:
            for i in range(20):
                assert await store.user_sessions(f"u{n}-{i}") == []
                assert await store.revoke_user(f"u{n}-{i}") == 0

        try:
            asyncio.run(run())
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert errors == []
    stores.clear()  # the Backend is collected: its clients of finished loops close
    gc.collect()


@pytest.mark.parametrize("option", ["idle_timeout", "absolute_lifetime"])
@pytest.mark.parametrize("seconds", [float("inf"), 1e17, float("nan"), MAX_SECONDS + 1])
def test_a_timeout_redis_cannot_set_is_refused_at_startup(option: str, seconds: float) -> None:
    """Failed before the fix (outage by config). inf is an OverflowError from int(); 1e17 s
    is accepted, and then PEXPIRE answers "invalid expire time": with idle_timeout
    every save is a 503, with absolute_lifetime every login (the index TTL)."""
    options: dict[str, Any] = {option: seconds}
    with pytest.raises(ValueError, match=option):
        SessionStore("redis://127.0.0.1:1/0", **options)
    with pytest.raises(ValueError, match=option):
        SessionMiddleware(attack_app(None, "x:"), secret_key=SECRET, **options)


async def test_the_longest_timeouts_allowed_work_on_redis(
    real_redis: Redis, key_prefix: str
) -> None:
    """The limit is safe: sessions and their index live MAX_SECONDS on a real Redis."""
    store = SessionStore(
        real_redis,
        key_prefix=key_prefix,
        idle_timeout=MAX_SECONDS,
        absolute_lifetime=MAX_SECONDS,
    )
    async with browser(attack_app(real_redis, key_prefix, store=store)) as tab:
        assert (await tab.post("/login/alice")).status_code == 200
        assert (await tab.get("/whoami")).json() == {"user": "alice"}
    assert await real_redis.pttl(store.user_key("alice")) > (MAX_SECONDS - 60) * 1000
    assert len(await store.user_sessions("alice")) == 1


@pytest.mark.parametrize("seconds", [float("inf"), 1e17, float("nan")])
@pytest.mark.parametrize("option", ["ttl", "stale_while_revalidate", "stale_if_error", "jitter"])
def test_a_cache_time_redis_cannot_set_is_refused_by_cached(option: str, seconds: float) -> None:
    """Failed before the fix: the same class in the cache. inf or NaN windows were taken
    (NaN passes "must not be negative"), then failed each store: int() of an
    infinity, a NaN TTL, or an entry whose JSON turns inf into null."""
    options: dict[str, Any] = {option: seconds}
    with pytest.raises(ValueError, match=option):
        cached(**options)


@pytest.mark.parametrize("seconds", [float("inf"), 1e17, float("nan")])
@pytest.mark.parametrize("option", ["lock_lease", "lock_wait", "max_lifetime"])
def test_a_cache_time_redis_cannot_set_is_refused_at_startup(option: str, seconds: float) -> None:
    """Failed before the fix: Cache took them, and every lease or store then failed."""
    options: dict[str, Any] = {option: seconds}
    with pytest.raises(ValueError, match=option):
        Cache("redis://127.0.0.1:1/0", **options)


class Rotating(Redis):
    """A real client that, before each delete revoke_user sends (every second
    EVALSHA sent on its own: take, delete, take, delete...), lets ``before`` run."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.before: Any = None
        self.evalshas = 0

    async def execute_command(self, *args: Any, **options: Any) -> Any:
        if self.before is not None and str(args[0]).upper() == "EVALSHA":
            self.evalshas += 1
            if self.evalshas % 2 == 0:
                await self.before()
        return await super().execute_command(*args, **options)  # type: ignore[no-untyped-call]


async def test_revoke_user_does_not_report_success_while_a_session_escaped(
    redis_url: str, real_redis: Redis, key_prefix: str
) -> None:
    """Failed before the fix (security). A stolen cookie whose holder rotates the id (any
    endpoint calling regenerate()) each time revoke_user is between its take of the
    index and its delete makes every pass find the old id gone; after
    REVOKE_PASSES revoke_user gives up with only a log line and returns 0, and the
    session lives on bound to alice. The caller is told nothing."""
    rotating = cast("Rotating", Rotating.from_url(redis_url))
    try:
        app = attack_app(real_redis, key_prefix)
        async with browser(app) as thief:
            await thief.post("/login/alice")

            async def rotate() -> None:
                # A fixed protocol may refuse the rotation (no cookie): that is the fix.
                assert (await thief.post("/rotate")).status_code == 200

            rotating.before = rotate
            store = SessionStore(rotating, key_prefix=key_prefix)
            try:
                revoked = await store.revoke_user("alice")
            except Exception:
                revoked = -1  # an error saying the revoke is incomplete is fine too
            rotating.before = None
            alive = (await thief.get("/whoami")).json()
            assert revoked == -1 or alive == {"user": None}, (revoked, alive)
    finally:
        await rotating.aclose()


@pytest.mark.parametrize("option", ["idle_timeout", "absolute_lifetime"])
async def test_a_shorter_idle_timeout_applies_to_existing_sessions(
    real_redis: Redis, key_prefix: str, option: str
) -> None:
    """Failed before the fix (security, low). After an incident the idle timeout is cut from
    1000 s to 10 s. A session stored under the old setting keeps its ~1000 s TTL
    through every later read: the refresh only ever lengthens a TTL (touch_due),
    and the load does not clamp one that is longer than the setting allows.
    (Sibling: an absolute lifetime brought in or cut to 10 s.)"""
    before = SessionStore(
        real_redis, key_prefix=key_prefix, idle_timeout=1000, absolute_lifetime=None
    )
    async with browser(attack_app(real_redis, key_prefix, store=before)) as tab:
        await tab.post("/login/alice")
        cookie = tab.cookies["session"]
    options: dict[str, Any] = {"idle_timeout": 1000, "absolute_lifetime": None, option: 10}
    after = SessionStore(real_redis, key_prefix=key_prefix, **options)
    async with browser(attack_app(real_redis, key_prefix, store=after), cookie) as tab:
        assert (await tab.get("/whoami")).json() == {"user": "alice"}
    pttl = await real_redis.pttl(f"{key_prefix}{session_id_of(cookie)}")
    assert 0 < pttl <= 10_000, f"the session still idles out in {pttl / 1000:.0f} s"


async def test_incr_of_a_key_that_is_not_utf8_is_the_same_type_error_everywhere(
    real_redis: Redis, key_prefix: str
) -> None:
    """Failed before the fix (cosmetic). session["\\ud800"] = 1 and incr("\\ud800") on a
    new session raise the codec's TypeError; incr on a stored session raises
    redis-py's UnicodeEncodeError instead."""

    async def bump(request: Request) -> Response:
        session = Session.of(request)
        session["a"] = 1
        if request.query_params.get("odd"):
            try:
                await session.incr("\ud800")
            except TypeError:
                return PlainTextResponse("refused", status_code=400)
        return PlainTextResponse("ok")

    app = Starlette(
        routes=[Route("/", bump, methods=["POST"])],
        middleware=[
            Middleware(
                SessionMiddleware, secret_key=SECRET, redis=real_redis, key_prefix=key_prefix
            )
        ],
    )
    async with browser(app) as tab:
        assert (await tab.post("/?odd=1")).status_code == 400  # new session: local
        assert (await tab.post("/")).status_code == 200
        assert (await tab.post("/?odd=1")).status_code == 400  # stored: Redis


# -- Redis Cluster: the sibling of the rebind race in regenerate() -------------------


class HoldingCluster(RedisCluster):
    """:class:`Holding` for a Cluster client."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.armed = False
        self.seen = 0
        self.reached = asyncio.Event()
        self.opened = asyncio.Event()

    async def execute_command(self, *args: Any, **options: Any) -> Any:
        if self.armed and str(args[0]).upper() == "SREM":
            self.seen += 1
            if self.seen == 1:
                self.reached.set()
                await self.opened.wait()
        return await super().execute_command(*args, **options)


@pytest.fixture
async def holding_cluster(
    cluster: ClusterDeployment,  # noqa: F811 - the fixture imported above
) -> AsyncIterator[HoldingCluster]:
    cluster.flushall()
    client = HoldingCluster(
        startup_nodes=[ClusterNode(HOST, port) for port in cluster.ports], socket_timeout=2
    )
    await client.initialize()
    try:
        yield client
    finally:
        client.opened.set()
        await client.aclose()
        cluster.flushall()


async def test_cluster_a_login_that_lost_to_a_rebind_does_not_unindex_the_session(
    holding_cluster: HoldingCluster, key_prefix: str
) -> None:
    """Failed before the fix (security, Cluster). A login (regenerate) loaded the session as
    alice; meanwhile it was rebound to bob. Its step (b) finds it bound to bob
    (DELETE_IF_USER answers 2) but still sends "SREM alice's index" -- a round trip
    of its own on Cluster. If, before that SREM lands, another request rebinds the
    session back to alice, the SREM removes the entry that rebind relied on, and
    revoke_user("alice") no longer finds a live session bound to her."""
    client = holding_cluster
    gates = {"held": Gate()}
    app = attack_app(client, key_prefix, gates)
    store = SessionStore(client, key_prefix=key_prefix)
    async with browser(app) as tab:
        await tab.post("/login/alice")
        cookie = tab.cookies["session"]
        async with browser(app, cookie) as slow:
            login = asyncio.ensure_future(slow.post("/held/login"))
            await asyncio.wait_for(gates["held"].reached.wait(), 10)
            assert (await tab.post("/bind/bob")).status_code == 200
            client.armed = True  # the login's SREM of alice's index, after its (b)
            gates["held"].opened.set()
            await asyncio.wait_for(client.reached.wait(), 10)
            assert (await tab.post("/bind/alice")).status_code == 200
            client.opened.set()
            assert not cookie_of(await asyncio.wait_for(login, 10))  # the login lost
        assert (await tab.get("/whoami")).json() == {"user": "alice"}
        assert await store.revoke_user("alice") == 1, "alice's live session escaped revoke"


async def test_a_longer_absolute_lifetime_does_not_let_sessions_outlive_their_index(
    real_redis: Redis, key_prefix: str
) -> None:
    """Failed before the fix (security). The index gets its TTL (the absolute lifetime) only
    when an id is added. Raise absolute_lifetime (30 -> 90 days, say) and a session
    created before keeps being refreshed up to the new limit, while its user's index
    still expires at the old one: from then on revoke_user finds nothing and the
    session, bound to its user, lives on. (The same happens when an admin
    SessionStore with another absolute_lifetime puts entries back in revoke_user.)"""
    before = SessionStore(real_redis, key_prefix=key_prefix, absolute_lifetime=1000)
    async with browser(attack_app(real_redis, key_prefix, store=before)) as tab:
        await tab.post("/login/alice")
        cookie = tab.cookies["session"]
    after = SessionStore(
        real_redis, key_prefix=key_prefix, idle_timeout=100_000, absolute_lifetime=100_000
    )
    async with browser(attack_app(real_redis, key_prefix, store=after), cookie) as tab:
        assert (await tab.get("/whoami")).json() == {"user": "alice"}  # refreshed
    # One transaction: both TTLs read at one instant (read one after the other,
    # the second is a millisecond shorter even when they end together).
    pipe = real_redis.pipeline(transaction=True)
    pipe.pttl(f"{key_prefix}{session_id_of(cookie)}")
    pipe.pttl(after.user_key("alice"))
    session_ttl, index_ttl = await pipe.execute()
    assert session_ttl > 1_000_000  # the refresh applied the new lifetime
    # A second of slack: the TTLs are 100,000 s, the clocks of one request apart.
    assert index_ttl < 0 or index_ttl >= session_ttl - 1000, "the index expires first"


async def test_clear_then_bind_in_a_request_whose_session_was_revoked_binds_nothing(
    real_redis: Redis, key_prefix: str
) -> None:
    """Failed before the fix (security, medium). regenerate() + bind_user() in a request
    whose session was revoked meanwhile is dropped (replace() checks the old record),
    but clear() + bind_user() -- the other common login/re-auth shape, e.g.
    ``uid = s.user_id; s.clear(); s.bind_user(uid)`` -- creates a new session bound
    to the revoked user without checking: the revoke is undone by a request that
    was authorised by the revoked session."""
    gates = {"held": Gate()}

    async def reauth(request: Request) -> Response:
        session = Session.of(request)
        user = session.user_id
        await gates["held"].wait()
        session.clear()
        if user is not None:
            session.bind_user(user)
        return PlainTextResponse("ok")

    base = attack_app(real_redis, key_prefix)
    app = Starlette(
        routes=[*base.routes, Route("/reauth", reauth, methods=["POST"])],
        middleware=[
            Middleware(
                SessionMiddleware, secret_key=SECRET, redis=real_redis, key_prefix=key_prefix
            )
        ],
    )
    store = SessionStore(real_redis, key_prefix=key_prefix)
    async with browser(app) as tab:
        await tab.post("/login/alice")
        held = asyncio.ensure_future(tab.post("/reauth"))
        await asyncio.wait_for(gates["held"].reached.wait(), 10)
        assert await store.revoke_user("alice") == 1
        gates["held"].opened.set()
        response = await asyncio.wait_for(held, 10)
        assert response.status_code == 200
        assert (await tab.get("/whoami")).json() == {"user": None}
        assert await store.user_sessions("alice") == []


async def test_an_unchanged_session_of_odd_values_is_never_rewritten(
    real_redis: Redis, key_prefix: str, spy: Any
) -> None:
    """Passes: values in both stored forms, read back three times, cost the loads
    only (no save: encoding is deterministic, dict order and float bits kept)."""

    async def fill(request: Request) -> Response:
        session = Session.of(request)
        session["tuple"] = (1, (2.5, None), [True])
        session["big"] = -(2**200)
        session["floats"] = [-0.0, float("nan"), float("-inf"), 1e308, 5e-324]
        session["keys"] = {7: "a", 2.5: "b", None: "c", True: "d", "z": {"y": 1, "x": 2}}
        session["text"] = "surrogate \udcff and ☃"
        session["order"] = {"b": 1, "a": 2}
        await session.incr("n", 2**62)
        return PlainTextResponse("ok")

    base = attack_app(real_redis, key_prefix)
    app = Starlette(
        routes=[*base.routes, Route("/fill", fill, methods=["POST"])],
        middleware=[
            Middleware(
                SessionMiddleware, secret_key=SECRET, redis=real_redis, key_prefix=key_prefix
            )
        ],
    )
    async with browser(app) as tab:
        assert (await tab.post("/fill")).status_code == 200
        spy.reset()
        for _ in range(3):
            assert (await tab.get("/whoami")).status_code == 200
        assert dict(spy.commands) == {"EVALSHA": 3}
        assert spy.round_trips == 3
