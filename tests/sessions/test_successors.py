"""Successors: a record that continues a session (rotation, or ``clear()`` then
``bind_user()`` of the same user) keeps its lifetime, cannot outlive a revoke of the
session it continues, and no delete leaves a dead id in any index.

Siblings of the findings in tests/sessions/test_review_attacks.py, in the shapes
those tests do not try (see the _store module docstring for the protocol).
"""

from __future__ import annotations

import asyncio
from typing import Any, cast

import httpx
import pytest
from redis.asyncio import Redis
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from asgi_redis_kit import Session, SessionMiddleware, SessionStore
from asgi_redis_kit.sessions._record import handle_of

from .conftest import SECRET, Gate, cookie_of, session_id_of

pytestmark = pytest.mark.real_redis


def successor_app(store: SessionStore, gates: dict[str, Gate] | None = None) -> Starlette:
    gates = gates or {}

    async def login(request: Request) -> Response:
        session = Session.of(request)
        session.regenerate()
        session.bind_user(request.path_params["user"])
        return PlainTextResponse("ok")

    async def reauth(request: Request) -> Response:
        """The other common re-auth shape: clear(), then bind the same user."""
        session = Session.of(request)
        user = session.user_id
        gate = gates.get(request.query_params.get("gate", ""))
        if gate is not None:
            await gate.wait()
        session.clear()
        session["fresh"] = True
        if user is not None:
            session.bind_user(user)
        return PlainTextResponse("ok")

    async def rotate(request: Request) -> Response:
        Session.of(request).regenerate()
        return PlainTextResponse("ok")

    async def bind(request: Request) -> Response:
        session = Session.of(request)
        gate = gates.get(request.query_params.get("gate", ""))
        if gate is not None:
            await gate.wait()
        session.bind_user(request.path_params["user"])
        return PlainTextResponse("ok")

    async def write(request: Request) -> Response:
        session = Session.of(request)
        gate = gates.get(request.query_params.get("gate", ""))
        if gate is not None:
            await gate.wait()
        session["n"] = session.get("n", 0) + 1
        return PlainTextResponse("ok")

    async def whoami(request: Request) -> Response:
        session = Session.of(request)
        return JSONResponse({"user": session.user_id, "data": dict(session)})

    return Starlette(
        routes=[
            Route("/login/{user}", login, methods=["POST"]),
            Route("/reauth", reauth, methods=["POST"]),
            Route("/rotate", rotate, methods=["POST"]),
            Route("/bind/{user}", bind, methods=["POST"]),
            Route("/write", write, methods=["POST"]),
            Route("/whoami", whoami),
        ],
        middleware=[Middleware(SessionMiddleware, secret_key=SECRET, store=store)],
    )


def browser(app: Any, cookie: str | None = None) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app, raise_app_exceptions=False),
        base_url="http://testserver",
        cookies={"session": cookie} if cookie else None,
    )


class HoldFirstScript(Redis):
    """A real client that holds its first EVALSHA sent on its own until ``opened``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.seen = 0
        self.reached = asyncio.Event()
        self.opened = asyncio.Event()

    async def execute_command(self, *args: Any, **options: Any) -> Any:
        if str(args[0]).upper() == "EVALSHA":
            self.seen += 1
            if self.seen == 1:
                self.reached.set()
                await self.opened.wait()
        return await super().execute_command(*args, **options)  # type: ignore[no-untyped-call]


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


async def dead_entries(redis: Redis, key_prefix: str) -> list[str]:
    dead = []
    async for key in redis.scan_iter(match=f"{key_prefix}u:*", count=1000):
        if await redis.type(key) != b"set":
            continue
        for member in await redis.smembers(key):  # type: ignore[misc,unused-ignore]
            if not await redis.exists(f"{key_prefix}{_text(member)}"):
                dead.append(f"{_text(key)} -> {_text(member)}")
    return dead


async def test_clear_then_bind_of_the_same_user_keeps_the_absolute_lifetime(
    real_redis: Redis, key_prefix: str
) -> None:
    """Fails on main: clear() + bind_user(same user) is a successor too, so it keeps
    the creation time; a re-auth every minute must not keep a session forever."""
    now = [1_000_000.0]
    store = SessionStore(
        real_redis, key_prefix=key_prefix, absolute_lifetime=100, clock=lambda: now[0]
    )
    app = successor_app(store)
    async with browser(app) as tab:
        await tab.post("/login/alice")
        now[0] += 60
        assert cookie_of(await tab.post("/reauth"))
        assert (await tab.get("/whoami")).json()["user"] == "alice"
        now[0] += 60  # 120 s after the login
        assert (await tab.get("/whoami")).json() == {"user": None, "data": {}}


async def test_a_login_as_another_user_starts_a_new_lifetime(
    real_redis: Redis, key_prefix: str
) -> None:
    """The control of the test above: a login of someone else is a new session."""
    now = [1_000_000.0]
    store = SessionStore(
        real_redis, key_prefix=key_prefix, absolute_lifetime=100, clock=lambda: now[0]
    )
    app = successor_app(store)
    async with browser(app) as tab:
        await tab.post("/login/alice")
        now[0] += 60
        assert cookie_of(await tab.post("/login/bob"))
        now[0] += 60
        assert (await tab.get("/whoami")).json()["user"] == "bob"


@pytest.mark.parametrize("racer", ["reauth", "rotate twice"])
async def test_revoke_session_ends_what_a_racing_request_made_of_it(
    redis_url: str, real_redis: Redis, key_prefix: str, racer: str
) -> None:
    """Fails on main: revoke_session(alice, handle) is held before its first step;
    meanwhile the browser re-authenticates with clear() + bind_user("alice"), or
    rotates twice (a chain of successors). Whatever the browser holds afterwards
    is logged out."""
    holding = cast("HoldFirstScript", HoldFirstScript.from_url(redis_url))
    try:
        app = successor_app(SessionStore(real_redis, key_prefix=key_prefix))
        async with browser(app) as tab:
            await tab.post("/login/alice")
            await tab.post("/write")
            handle = handle_of(session_id_of(tab.cookies["session"]))
            revoke = asyncio.ensure_future(
                SessionStore(holding, key_prefix=key_prefix).revoke_session("alice", handle)
            )
            await asyncio.wait_for(holding.reached.wait(), 10)
            if racer == "reauth":
                assert cookie_of(await tab.post("/reauth"))
            else:
                assert cookie_of(await tab.post("/rotate"))
                assert cookie_of(await tab.post("/rotate"))
            holding.opened.set()
            assert await asyncio.wait_for(revoke, 10)
            assert (await tab.get("/whoami")).json() == {"user": None, "data": {}}
        assert await dead_entries(real_redis, key_prefix) == []
    finally:
        holding.opened.set()
        await holding.aclose()


async def test_revoke_session_leaves_the_users_other_sessions(
    real_redis: Redis, key_prefix: str
) -> None:
    """The control: the chain is only the revoked session and its successors."""
    store = SessionStore(real_redis, key_prefix=key_prefix)
    app = successor_app(store)
    async with browser(app) as one, browser(app) as two:
        await one.post("/login/alice")
        await two.post("/login/alice")
        await two.post("/rotate")
        assert await store.revoke_session("alice", handle_of(session_id_of(one.cookies["session"])))
        assert (await one.get("/whoami")).json()["user"] is None
        assert (await two.get("/whoami")).json()["user"] == "alice"
        assert len(await store.user_sessions("alice")) == 1


async def test_the_end_of_the_lifetime_after_a_rebind_leaves_no_dead_entry(
    real_redis: Redis, key_prefix: str
) -> None:
    """Fails on main: a write loaded as alice is held; another request rebinds the
    session to bob; the absolute lifetime then ends while the write runs, and its
    save deletes the record -- un-indexing alice (the user it loaded) only, so
    bob's index kept a dead id."""
    now = [1_000_000.0]
    gates = {"write": Gate()}
    store = SessionStore(
        real_redis, key_prefix=key_prefix, absolute_lifetime=100, clock=lambda: now[0]
    )
    app = successor_app(store, gates)
    async with browser(app) as tab:
        await tab.post("/login/alice")
        held = asyncio.ensure_future(tab.post("/write?gate=write"))
        await asyncio.wait_for(gates["write"].reached.wait(), 10)
        assert (await tab.post("/bind/bob")).status_code == 200
        now[0] += 200
        gates["write"].opened.set()
        assert (await asyncio.wait_for(held, 10)).status_code == 200
    assert await dead_entries(real_redis, key_prefix) == []


async def test_a_write_under_a_longer_lifetime_keeps_the_index_alive(
    real_redis: Redis, key_prefix: str
) -> None:
    """Fails on main: the sibling of the attack test's TTL refresh by a read, with a
    write refreshing the TTL: the index must live as long as the session."""
    before = SessionStore(real_redis, key_prefix=key_prefix, absolute_lifetime=1000)
    async with browser(successor_app(before)) as tab:
        await tab.post("/login/alice")
        cookie = tab.cookies["session"]
    after = SessionStore(
        real_redis, key_prefix=key_prefix, idle_timeout=100_000, absolute_lifetime=100_000
    )
    async with browser(successor_app(after), cookie) as tab:
        assert (await tab.post("/write")).status_code == 200
    # One transaction: read apart, the second TTL is shorter by the time between.
    pipe = real_redis.pipeline(transaction=True)
    pipe.pttl(f"{key_prefix}{session_id_of(cookie)}")
    pipe.pttl(after.user_key("alice"))
    session_ttl, index_ttl = await pipe.execute()
    assert session_ttl > 1_000_000
    assert index_ttl >= session_ttl - 1000  # a second of slack on 100,000 s


async def test_a_revoke_leaves_no_marker_and_keeps_the_index_ttl(
    real_redis: Redis, key_prefix: str
) -> None:
    """revoke_user's marker goes with it, and an entry it puts back (a session bound
    elsewhere) keeps the index's TTL rather than a shorter one."""
    store = SessionStore(real_redis, key_prefix=key_prefix, absolute_lifetime=1000)
    app = successor_app(store)
    async with browser(app) as tab:
        await tab.post("/login/alice")
        await tab.post("/bind/bob")  # a stale entry in alice's index
        index = store.user_key("alice")
        before = await real_redis.pttl(index)
        admin = SessionStore(real_redis, key_prefix=key_prefix, absolute_lifetime=10)
        assert await admin.revoke_user("alice") == 0
        assert [_text(m) for m in await real_redis.smembers(index)] == [  # type: ignore[misc,unused-ignore]
            session_id_of(tab.cookies["session"])
        ]
        assert await real_redis.pttl(index) > before - 60_000
        assert (await tab.get("/whoami")).json()["user"] == "bob"
