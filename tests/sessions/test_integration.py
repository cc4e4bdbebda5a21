"""Frameworks and servers: FastAPI, websockets, lifespan, a real uvicorn, double
application, Vary, and logs that never carry an id (checklist 19, 38)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Annotated, Any

import httpx
import pytest
import uvicorn
from fastapi import Depends, FastAPI
from redis.asyncio import Redis
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.sessions import SessionMiddleware as StarletteSessionMiddleware
from starlette.requests import HTTPConnection, Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Mount, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from asgi_redis_kit import (
    BackendUnavailable,
    DuplicateMiddleware,
    Session,
    SessionMiddleware,
    SessionNotLoaded,
    SessionStore,
)
from tests.support import RedisProcess, free_port

from .conftest import SECRET, build_app, cookie_of, run_lifespan, session_id_of

pytestmark = pytest.mark.real_redis


# -- FastAPI -----------------------------------------------------------------------


def session_dep(request: Request) -> Session:
    return Session.of(request)


# Module level: FastAPI resolves the (postponed) annotations in module globals.
SessionDep = Annotated[Session, Depends(session_dep)]


def fastapi_app(redis: Redis, key_prefix: str) -> FastAPI:
    app = FastAPI()
    app.add_middleware(SessionMiddleware, secret_key=SECRET, redis=redis, key_prefix=key_prefix)

    @app.get("/visits")
    async def visits(session: SessionDep) -> dict[str, int]:
        return {"visits": await session.incr("visits")}

    @app.post("/login/{user}")
    async def login(user: str, request: Request) -> dict[str, str | None]:
        session = Session.of(request)
        session.regenerate()
        session.bind_user(user)
        return {"user": session.user_id}

    @app.get("/plain")
    async def plain(request: Request) -> dict[str, Any]:
        # A handler written for Starlette's SessionMiddleware, unchanged.
        request.session["n"] = request.session.get("n", 0) + 1
        return dict(request.session)

    return app


async def test_fastapi_visit_counter_login_and_plain_handlers(
    real_redis: Redis, key_prefix: str, make_client: Callable[..., httpx.AsyncClient]
) -> None:
    client = make_client(fastapi_app(real_redis, key_prefix))
    for expected in (1, 2, 3):
        response = await client.get("/visits")
        assert response.json() == {"visits": expected}
        assert "Cookie" in response.headers["vary"]
    before = client.cookies["session"]
    assert (await client.post("/login/ana")).json() == {"user": "ana"}
    assert session_id_of(client.cookies["session"]) != session_id_of(before)
    assert (await client.get("/visits")).json() == {"visits": 4}
    assert (await client.get("/plain")).json() == {"visits": 4, "n": 1}
    store = SessionStore(real_redis, key_prefix=key_prefix)
    assert len(await store.user_sessions("ana")) == 1


# -- websockets --------------------------------------------------------------------


async def run_websocket(
    app: ASGIApp,
    headers: list[tuple[bytes, bytes]],
    path: str = "/ws",
    extensions: dict[str, Any] | None = None,
) -> list[Message]:
    inbox: list[Message] = [
        {"type": "websocket.connect"},
        {"type": "websocket.disconnect", "code": 1000},
    ]
    sent: list[Message] = []

    async def receive() -> Message:
        return inbox.pop(0) if inbox else {"type": "websocket.disconnect", "code": 1000}

    async def send(message: Message) -> None:
        sent.append(message)

    scope = {
        "type": "websocket",
        "asgi": {"version": "3.0"},
        "scheme": "ws",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": headers,
        "subprotocols": [],
        "client": ("127.0.0.1", 1),
        "server": ("t", 80),
        "extensions": extensions or {},
    }
    await app(scope, receive, send)
    return sent


async def test_websocket_reads_the_session(app: Starlette, client: httpx.AsyncClient) -> None:
    await client.post("/set", json={"room": "lobby"})
    cookie = client.cookies["session"]
    sent = await run_websocket(app, [(b"cookie", f"session={cookie}".encode())])
    assert sent[0]["type"] == "websocket.accept"
    assert sent[1]["text"] == '{"room":"lobby"}'
    sent = await run_websocket(app, [])
    assert sent[1]["text"] == "{}"


async def test_websocket_with_redis_down_is_closed_with_try_again_later_if_it_uses_the_session(
    own_redis: RedisProcess, make_client: Callable[..., httpx.AsyncClient]
) -> None:
    mw = SessionMiddleware(
        build_app(None, wrap=False), secret_key=SECRET, redis=own_redis.url, timeout=0.5
    )
    try:
        client = make_client(mw)
        await client.post("/set", json={"a": 1})
        cookie = [(b"cookie", f"session={client.cookies['session']}".encode())]
        own_redis.stop()
        # /ws accepts, then reads the session: it is closed with 1013, never a 500.
        sent = await run_websocket(mw, cookie)
        assert sent == [
            {"type": "websocket.accept", "subprotocol": None, "headers": []},
            {"type": "websocket.close", "code": 1013},
        ]
        # A socket that never touches its session does not need Redis.
        sent = await run_websocket(mw, cookie, path="/ws-plain")
        kinds = [message["type"] for message in sent]
        assert kinds == ["websocket.accept", "websocket.send", "websocket.close"]
        assert sent[1]["text"] == "no session needed"
        # Used before accept: a 503 denial response where the server can send one
        # (Starlette's answer to our HTTPException), else close 1013 (a 403).
        sent = await run_websocket(
            mw, cookie, path="/ws-early", extensions={"websocket.http.response": {}}
        )
        assert sent[0]["type"] == "websocket.http.response.start"
        assert sent[0]["status"] == 503
        assert (b"retry-after", b"5") in sent[0]["headers"]
        sent = await run_websocket(mw, cookie, path="/ws-early")
        assert sent == [{"type": "websocket.close", "code": 1013}]
        # Counted: two closes with 1013, one 503 denial.
        assert mw.stats.websocket_closes == 2
        assert mw.stats.unavailable == 1
    finally:
        await mw.aclose()


async def test_bare_websocket_apps_get_1013_only_for_their_sessions_failure(
    own_redis: RedisProcess, make_client: Callable[..., httpx.AsyncClient]
) -> None:
    """A bare ASGI websocket app lets SessionStoreUnavailable reach the middleware:
    it closes with 1013, except for a client that already left (no close to send
    then). A Redis error that is not the session's passes through."""

    async def reads_session(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "websocket.accept"})
        await send({"type": "websocket.send", "text": str(dict(scope["session"]))})

    async def other_redis_user(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "websocket.accept"})
        raise BackendUnavailable("the handler's own Redis call failed")

    async def reads_after_disconnect(scope: Scope, receive: Receive, send: Send) -> None:
        assert (await receive())["type"] == "websocket.connect"
        await send({"type": "websocket.accept"})
        assert (await receive())["type"] == "websocket.disconnect"
        dict(scope["session"])  # e.g. logging in a finally block, with Redis down

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        handlers = {
            "/ws": reads_session,
            "/other": other_redis_user,
            "/late": reads_after_disconnect,
        }
        if scope["type"] == "websocket":
            await handlers[scope["path"]](scope, receive, send)
            return
        await build_app(None, wrap=False)(scope, receive, send)

    mw = SessionMiddleware(app, secret_key=SECRET, redis=own_redis.url, timeout=0.5)
    try:
        client = make_client(mw)
        await client.post("/set", json={"a": 1})
        cookie = [(b"cookie", f"session={client.cookies['session']}".encode())]
        assert (await run_websocket(mw, cookie))[1]["text"] == "{'a': 1}"
        with pytest.raises(BackendUnavailable, match="own Redis call"):
            await run_websocket(mw, cookie, path="/other")
        own_redis.stop()
        sent = await run_websocket(mw, cookie)
        assert sent == [{"type": "websocket.accept"}, {"type": "websocket.close", "code": 1013}]
        assert await run_websocket(mw, cookie, path="/late") == [{"type": "websocket.accept"}]
    finally:
        await mw.aclose()


# -- lifespan ----------------------------------------------------------------------


async def connected_clients(peek: Redis) -> int:
    clients: list[Any] = await peek.client_list()
    return len(clients)


async def test_lifespan_closes_the_client_made_from_a_url(
    own_redis: RedisProcess, make_client: Callable[..., httpx.AsyncClient]
) -> None:
    """Checklist 38: the pool is closed at shutdown; CLIENT LIST back to baseline."""
    peek: Redis = Redis.from_url(own_redis.url)
    try:
        baseline = await connected_clients(peek)
        app = build_app(own_redis.url, key_prefix="ls:")
        await make_client(app).post("/set", json={"a": 1})
        assert await connected_clients(peek) == baseline + 1
        sent = await run_lifespan(app)
        assert sent == ["lifespan.startup.complete", "lifespan.shutdown.complete"]
        for _ in range(50):  # the server notices the close asynchronously
            if await connected_clients(peek) == baseline:
                break
            await asyncio.sleep(0.02)
        assert await connected_clients(peek) == baseline
    finally:
        await peek.aclose()


async def test_lifespan_leaves_a_callers_client_open(
    real_redis: Redis, app: Starlette, client: httpx.AsyncClient
) -> None:
    await client.post("/set", json={"a": 1})
    await run_lifespan(app)
    assert await real_redis.ping()


# -- a real server -----------------------------------------------------------------


@contextlib.asynccontextmanager
async def serve(app: ASGIApp) -> AsyncIterator[str]:
    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, lifespan="on", log_level="warning")
    server = uvicorn.Server(config)
    task = asyncio.ensure_future(server.serve())
    for _ in range(500):
        if server.started:
            break
        await asyncio.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 10)


async def test_through_uvicorn_on_loopback(redis_url: str, key_prefix: str) -> None:
    app = build_app(redis_url, key_prefix=key_prefix)
    async with serve(app) as url, httpx.AsyncClient(base_url=url) as client:
        assert (await client.post("/incr/visits")).text == "1"
        assert (await client.post("/incr/visits")).text == "2"
        response = await client.post("/login/zoe")
        header = response.headers["set-cookie"]
        assert "HttpOnly" in header
        assert "Secure" not in header  # plain http on loopback: auto mode
        assert (await client.get("/read")).json() == {"visits": 2, "user": "zoe"}
        response = await client.post("/logout")
        assert "Max-Age=0" in response.headers["set-cookie"]
        assert (await client.get("/read")).json() == {}
    peek: Redis = Redis.from_url(redis_url)
    try:
        assert await peek.keys(f"{key_prefix}*") == []
    finally:
        await peek.aclose()


# -- configuration mistakes --------------------------------------------------------


async def test_applied_twice_is_a_duplicate_middleware_error(
    real_redis: Redis, key_prefix: str, make_client: Callable[..., httpx.AsyncClient]
) -> None:
    inner = build_app(real_redis, key_prefix=key_prefix)
    outer = Starlette(
        routes=[Mount("/", inner)],
        middleware=[Middleware(SessionMiddleware, secret_key=SECRET, redis=real_redis)],
    )
    transport = httpx.ASGITransport(outer)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        with pytest.raises(DuplicateMiddleware, match="mounted sub-application"):
            await client.get("/read")


async def test_after_starlettes_own_session_middleware_is_a_duplicate(
    real_redis: Redis, key_prefix: str
) -> None:
    app = Starlette(
        routes=[Route("/", lambda request: PlainTextResponse("x"))],
        middleware=[
            Middleware(StarletteSessionMiddleware, secret_key=SECRET),
            Middleware(SessionMiddleware, secret_key=SECRET, redis=real_redis),
        ],
    )
    transport = httpx.ASGITransport(app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        with pytest.raises(DuplicateMiddleware, match="another session middleware"):
            await client.get("/")


async def test_applied_twice_fails_at_startup_too(real_redis: Redis) -> None:
    app = SessionMiddleware(
        SessionMiddleware(build_app(None, wrap=False), secret_key=SECRET, redis=real_redis),
        secret_key=SECRET,
        redis=real_redis,
    )
    with pytest.raises(DuplicateMiddleware):
        await run_lifespan(app)


def test_session_of_without_the_middleware_says_what_to_do() -> None:
    conn = HTTPConnection({"type": "http", "headers": []})
    with pytest.raises(SessionNotLoaded, match="add SessionMiddleware"):
        Session.of(conn)


# -- Vary --------------------------------------------------------------------------


async def test_vary_cookie_only_when_the_session_was_read_and_never_twice(
    real_redis: Redis, key_prefix: str, make_client: Callable[..., httpx.AsyncClient]
) -> None:
    async def varies(request: Request) -> Response:
        request.session.get("x")
        return PlainTextResponse("x", headers={"vary": "Accept-Encoding, cookie"})

    app = build_app(real_redis, key_prefix=key_prefix)
    app.router.routes.append(Route("/varies", varies))
    client = make_client(app)
    assert (await client.get("/read")).headers["vary"] == "Cookie"
    assert "vary" not in (await client.get("/noop")).headers
    assert (await client.get("/varies")).headers.get_list("vary") == ["Accept-Encoding, cookie"]


# -- logs --------------------------------------------------------------------------


async def test_logs_never_contain_a_session_id_or_cookie(
    real_redis: Redis,
    key_prefix: str,
    peek: Redis,
    make_client: Callable[..., httpx.AsyncClient],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Checklist 19: drive every path that logs, then search the captured logs."""
    caplog.set_level("DEBUG")
    app = build_app(real_redis, key_prefix=key_prefix)
    client = make_client(app)
    secrets_seen: set[str] = set()

    def remember(response: httpx.Response) -> None:
        cookie = cookie_of(response)
        if cookie:
            secrets_seen.update({cookie, session_id_of(cookie)})

    remember(await client.post("/login/eve"))
    remember(await client.get("/stream"))  # warning: changes after the headers
    remember(await client.post("/regenerate"))
    key = f"{key_prefix}{session_id_of(client.cookies['session'])}"
    await peek.hset(key, "d:user", b"\xff not json")
    remember(await client.get("/read"))  # security warning: corrupt record
    remember(await client.post("/login/eve"))
    await SessionStore(real_redis, key_prefix=key_prefix).revoke_user("eve")
    remember(await client.post("/incr/n"))  # info: session ended during the request
    await make_client(app).get("/read", headers={"cookie": "session=forged.value"})
    assert len(secrets_seen) >= 8
    assert caplog.records, "the paths above are expected to log"
    for secret in secrets_seen:
        assert secret not in caplog.text


async def test_a_replayed_copy_of_a_finished_scope_is_not_a_duplicate(
    app: Starlette, client: httpx.AsyncClient
) -> None:
    """A response cache refreshing a stale entry replays ``{**scope}`` of an earlier
    request through the same middleware: that must load the session again, not
    raise DuplicateMiddleware."""
    await client.post("/set", json={"a": 1})
    scopes: list[dict[str, Any]] = []

    async def recorder(scope: Any, receive: Any, send: Any) -> None:
        scopes.append(scope)
        await app(scope, receive, send)

    transport = httpx.ASGITransport(recorder)
    async with httpx.AsyncClient(
        transport=transport, base_url="http://testserver", cookies=client.cookies
    ) as browser:
        assert (await browser.get("/read")).json() == {"a": 1}
    sent: list[Message] = []

    async def receive() -> Message:
        return {"type": "http.request", "body": b""}

    async def send(message: Message) -> None:
        sent.append(message)

    await app({**scopes[0]}, receive, send)
    assert sent[0]["status"] == 200
    assert sent[1]["body"] == b'{"a":1}'


def test_store_with_redis_options_is_an_error_not_a_silent_no_op() -> None:
    """store= carries the Redis settings; repeating them on the middleware would
    be ignored, so it is refused with the names of the offending options."""
    store = SessionStore("memory://store-conflict")
    with pytest.raises(ValueError, match="key_prefix, timeout would be ignored"):
        SessionMiddleware(
            PlainTextResponse("x"), secret_key=SECRET, store=store, key_prefix="x:", timeout=2
        )
    # Cookie settings are not the store's, so they go with store= fine.
    SessionMiddleware(PlainTextResponse("x"), secret_key=SECRET, store=store, cookie_name="sid")
