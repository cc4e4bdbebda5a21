"""Revoke, logout and expiry win over every request in flight.

A request loads Alice's session and is held (a Gate) before it changes anything;
meanwhile her sessions are revoked (``revoke_user``), the session is logged out by
another request (``clear()``) or its key expires (DEL). Whatever the held request
then does -- write, incr, regenerate, login (regenerate + bind_user), rebind to
another user, clear -- afterwards no session is live (the app only ever had this
one), neither the old nor a new cookie gives any data back, no user index keeps an
id whose session is gone, and the response sets no cookie for a new session.

The second half races ``revoke_user`` itself: a login that rotates the id between
revoke's taking of the index and its deletes, and a bind in flight while revoke
runs. The same races run on a real 3-master Cluster
(tests/scaleout/test_cluster_revoke_races.py), where the session, its replacement
and the user index all live in different slots.
"""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest
from redis.asyncio import ConnectionPool, Redis
from redis.asyncio.cluster import RedisCluster
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from asgi_redis_kit import Session, SessionMiddleware, SessionStore

from .conftest import SECRET, Gate, cookie_of, session_id_of

pytestmark = pytest.mark.real_redis

OPS = ["write", "incr", "regenerate", "login", "login-as-bob", "rebind", "clear"]
KILLERS = ["revoke", "logout", "expire"]


def race_app(redis: Any, key_prefix: str, gate: Gate) -> Starlette:
    async def login(request: Request) -> Response:
        session = Session.of(request)
        session.regenerate()
        session.bind_user("alice")
        session["role"] = "admin"
        return PlainTextResponse("ok")

    async def logout(request: Request) -> Response:
        request.session.clear()
        return PlainTextResponse("ok")

    async def read(request: Request) -> Response:
        return JSONResponse(dict(request.session))

    async def held(request: Request) -> Response:
        session = Session.of(request)
        await gate.wait()
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
        elif op == "login-as-bob":
            session.regenerate()
            session.bind_user("bob")
        elif op == "rebind":
            session.bind_user("bob")
        else:
            session.clear()
        return PlainTextResponse("ok")

    return Starlette(
        routes=[
            Route("/login", login, methods=["POST"]),
            Route("/logout", logout, methods=["POST"]),
            Route("/read", read),
            Route("/held/{op}", held, methods=["POST"]),
        ],
        middleware=[
            Middleware(SessionMiddleware, secret_key=SECRET, redis=redis, key_prefix=key_prefix)
        ],
    )


def client_on(app: Any, cookie: str | None = None) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app, raise_app_exceptions=False),
        base_url="http://testserver",
        cookies={"session": cookie} if cookie else None,
    )


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


async def live_state(peek: Redis | RedisCluster, key_prefix: str) -> tuple[list[str], list[str]]:
    """(ids of the session records left, index entries whose session is gone)."""
    keys = [_text(key) async for key in peek.scan_iter(match=f"{key_prefix}*", count=1000)]
    sessions = [key for key in keys if await peek.type(key) == b"hash"]
    dead: list[str] = []
    for key in keys:
        if await peek.type(key) == b"set":
            for member in await peek.smembers(key):  # type: ignore[misc,unused-ignore]
                if not await peek.exists(f"{key_prefix}{_text(member)}"):
                    dead.append(f"{key} -> {_text(member)}")
    return sorted(sessions), dead


async def race(
    redis: Redis | RedisCluster, peek: Redis | RedisCluster, key_prefix: str, op: str, killer: str
) -> None:
    """Load as alice, hold, kill the session ``killer``'s way, let ``op`` go on."""
    gate = Gate()
    app = race_app(redis, key_prefix, gate)
    store = SessionStore(redis, key_prefix=key_prefix)
    async with client_on(app) as browser:
        assert (await browser.post("/login")).status_code == 200
        old = browser.cookies["session"]
        held = asyncio.ensure_future(browser.post(f"/held/{op}"))
        await asyncio.wait_for(gate.reached.wait(), 10)
        if killer == "revoke":
            assert await store.revoke_user("alice") == 1
        elif killer == "logout":
            async with client_on(app, old) as other_tab:
                assert cookie_of(await other_tab.post("/logout")) == ""
        else:
            assert await peek.delete(f"{key_prefix}{session_id_of(old)}") == 1
        gate.opened.set()
        response = await asyncio.wait_for(held, 10)
        assert response.status_code == 200
        new = cookie_of(response)
        # Only clear() expires the cookie; nothing may hand out a new session.
        assert not new, f"{op} after {killer} set a cookie for a new session"
        if killer == "expire":
            # No operation of ours ended it, so nothing took it out of the index:
            # user_sessions prunes such entries (and the index has a TTL).
            assert await store.user_sessions("alice") == []
        assert await live_state(peek, key_prefix) == ([], [])
        async with client_on(app, old) as replay:
            assert (await replay.get("/read")).json() == {}
        assert await store.user_sessions("alice") == []
        assert await store.user_sessions("bob") == []


async def unraced(redis: Redis | RedisCluster, peek: Redis | RedisCluster, key_prefix: str) -> None:
    """The control: held the same way but not killed, every op keeps a live session
    (clear() aside), so the races above could fail."""
    for op in OPS:
        gate = Gate()
        gate.opened.set()
        app = race_app(redis, key_prefix, gate)
        async with client_on(app) as browser:
            await browser.post("/login")
            assert (await browser.post(f"/held/{op}")).status_code == 200
            data = (await browser.get("/read")).json()
            if op == "clear":
                assert data == {}
            else:
                assert data["role"] == "admin", op
                sessions, dead = await live_state(peek, key_prefix)
                assert sessions, op
                assert dead == [], op
                # Each session is listed for exactly the user it is bound to. A rebind
                # leaves a stale entry in the old user's index (never un-index a live
                # id: a rebind back may rely on it); the logout below removes it.
                owner = "bob" if op in ("rebind", "login-as-bob") else "alice"
                store = SessionStore(redis, key_prefix=key_prefix)
                assert len(await store.user_sessions(owner)) == 1, op
                other = "alice" if owner == "bob" else "bob"
                assert await store.user_sessions(other) == [], op
                stale = 1 if op == "rebind" else 0
                assert await peek.scard(store.user_key(other)) == stale, op  # type: ignore[misc,unused-ignore]
            await browser.post("/logout")
    assert await live_state(peek, key_prefix) == ([], [])


@pytest.mark.parametrize("killer", KILLERS)
@pytest.mark.parametrize("op", OPS)
async def test_a_request_in_flight_never_undoes_the_end_of_its_session(
    real_redis: Redis, peek: Redis, key_prefix: str, op: str, killer: str
) -> None:
    await race(real_redis, peek, key_prefix, op, killer)


async def test_control_every_op_keeps_the_session_when_nothing_ends_it(
    real_redis: Redis, peek: Redis, key_prefix: str
) -> None:
    await unraced(real_redis, peek, key_prefix)


class PausingRedis(Redis):
    """A client that stops before the second command sent on its own (not in a
    pipeline) until ``opened`` is set: for revoke_user, right after it took the index
    and before it deletes what it found there."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.sent = 0
        self.reached = asyncio.Event()
        self.opened = asyncio.Event()

    async def execute_command(self, *args: Any, **options: Any) -> Any:
        self.sent += 1
        if self.sent == 2:
            self.reached.set()
            await self.opened.wait()
        return await super().execute_command(*args, **options)  # type: ignore[no-untyped-call]


class PausingCluster(RedisCluster):
    """:class:`PausingRedis` for a Cluster client."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.sent = 0
        self.reached = asyncio.Event()
        self.opened = asyncio.Event()

    async def execute_command(self, *args: Any, **options: Any) -> Any:
        self.sent += 1
        if self.sent == 2:
            self.reached.set()
            await self.opened.wait()
        return await super().execute_command(*args, **options)


async def login_between_revokes_take_and_delete(
    redis: Redis | RedisCluster,
    pausing: PausingRedis | PausingCluster,
    peek: Redis | RedisCluster,
    key_prefix: str,
) -> None:
    """revoke_user took the index ({old}); a login of the same user then rotates
    old -> new before revoke's delete runs. new continues a session revoke is ending:
    revoke's marker in the index refuses to index it, so the login is dropped (no
    cookie) and revoke ends old."""
    app = race_app(redis, key_prefix, Gate())
    async with client_on(app) as browser:
        await browser.post("/login")
        revoke = asyncio.ensure_future(
            SessionStore(pausing, key_prefix=key_prefix).revoke_user("alice")
        )
        await asyncio.wait_for(pausing.reached.wait(), 10)
        response = await browser.post("/login")
        assert response.status_code == 200
        assert not cookie_of(response)  # refused: it continues a session being revoked
        pausing.opened.set()
        assert await asyncio.wait_for(revoke, 10) == 1
        assert (await browser.get("/read")).json() == {}
        assert await live_state(peek, key_prefix) == ([], [])


async def test_a_login_racing_revoke_user_is_revoked_too(
    real_redis: Redis, redis_url: str, peek: Redis, key_prefix: str
) -> None:
    pool = ConnectionPool.from_url(redis_url)
    pausing = PausingRedis(connection_pool=pool)
    try:
        await login_between_revokes_take_and_delete(real_redis, pausing, peek, key_prefix)
    finally:
        await pausing.aclose()
        await pool.aclose()


async def test_a_bind_in_flight_is_not_lost_from_the_index(
    real_redis: Redis, peek: Redis, key_prefix: str
) -> None:
    """An index entry whose session exists but is not (yet) bound to the user is a
    bind in flight (the index is written before the binding): revoke_user and
    user_sessions keep it, so a revoke after the bind commits still finds it."""
    gate = Gate()
    app = race_app(real_redis, key_prefix, gate)
    store = SessionStore(real_redis, key_prefix=key_prefix)
    async with client_on(app) as browser:
        await browser.post("/login")
        session_id = session_id_of(browser.cookies["session"])
        await peek.hdel(f"{key_prefix}{session_id}", "m:user")  # not bound yet
        assert await store.revoke_user("alice") == 0
        assert await store.user_sessions("alice") == []
        assert await peek.smembers(store.user_key("alice")) == {session_id.encode()}
        await peek.hset(f"{key_prefix}{session_id}", "m:user", "alice")  # the bind commits
        assert len(await store.user_sessions("alice")) == 1
        assert await store.revoke_user("alice") == 1
        assert (await browser.get("/read")).json() == {}
        assert await live_state(peek, key_prefix) == ([], [])
