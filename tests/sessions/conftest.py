"""A small Starlette app exercising every session feature, and clients for it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route, WebSocketRoute
from starlette.types import ASGIApp, Message
from starlette.websockets import WebSocket

from asgi_redis_kit import Session, SessionMiddleware
from asgi_redis_kit.sessions._cookie import SALT

SECRET = "test-secret-key"
__all__ = [
    "SALT",
    "SECRET",
    "Gate",
    "build_app",
    "cookie_of",
    "run_lifespan",
    "session_id_of",
    "stored_keys",
]


class Gate:
    """Lets a test hold handlers at a point until it opens the gate."""

    def __init__(self) -> None:
        self.reached = asyncio.Event()
        self.opened = asyncio.Event()

    async def wait(self) -> None:
        self.reached.set()
        await self.opened.wait()


def build_app(
    redis: Any, *, gate: Gate | None = None, wrap: bool = True, **options: Any
) -> Starlette:
    """The test app; ``options`` go to SessionMiddleware. With ``wrap=False`` the
    app comes without it, for tests that wrap (and close) the middleware themselves."""
    options.setdefault("secret_key", SECRET)

    async def read(request: Request) -> Response:
        return JSONResponse(dict(request.session))

    async def noop(request: Request) -> Response:
        return PlainTextResponse("no session here")

    async def set_values(request: Request) -> Response:
        request.session.update(await request.json())
        return PlainTextResponse("ok")

    async def delete_key(request: Request) -> Response:
        request.session.pop(request.path_params["key"], None)
        return PlainTextResponse("ok")

    async def append(request: Request) -> Response:
        request.session.setdefault("cart", [])
        request.session["cart"].append(request.path_params["item"])
        return PlainTextResponse("ok")

    async def incr(request: Request) -> Response:
        value = await Session.of(request).incr(request.path_params["key"])
        return PlainTextResponse(str(value))

    async def login(request: Request) -> Response:
        session = Session.of(request)
        session.regenerate()
        session.bind_user(request.path_params["user"])
        session["user"] = request.path_params["user"]
        return PlainTextResponse("logged in")

    async def logout(request: Request) -> Response:
        request.session.clear()
        return PlainTextResponse("logged out")

    async def regenerate(request: Request) -> Response:
        Session.of(request).regenerate()
        return PlainTextResponse("ok")

    async def slow_set(request: Request) -> Response:
        session = Session.of(request)
        assert gate is not None
        await gate.wait()
        session.update(await request.json())
        return PlainTextResponse("ok")

    async def slow_incr(request: Request) -> Response:
        session = Session.of(request)
        assert gate is not None
        await gate.wait()
        return PlainTextResponse(str(await session.incr(request.path_params["key"])))

    async def fail(request: Request) -> Response:
        request.session["lost"] = True
        raise RuntimeError("handler failed")

    async def incr_then_fail(request: Request) -> Response:
        session = Session.of(request)
        session["lost"] = True
        await session.incr("n")
        if request.path_params["how"] == "raise":
            raise RuntimeError("handler failed after incr")
        return PlainTextResponse("broken", status_code=500)

    async def error(request: Request) -> Response:
        request.session["lost"] = True
        return PlainTextResponse("broken", status_code=int(request.path_params["status"]))

    async def stream(request: Request) -> Response:
        session = Session.of(request)
        session["before"] = True

        async def body() -> AsyncIterator[bytes]:
            yield b"first "
            session["during"] = True
            yield b"second"

        return StreamingResponse(body())

    async def whoami(request: Request) -> Response:
        session = Session.of(request)
        return JSONResponse({"user": session.user_id, "handle": session.handle})

    async def ws(websocket: WebSocket) -> None:
        await websocket.accept()
        await websocket.send_json(dict(websocket.session))
        await websocket.close()

    async def ws_early(websocket: WebSocket) -> None:
        room = websocket.session.get("room")
        await websocket.accept()
        await websocket.send_text(f"room {room}")
        await websocket.close()

    async def ws_plain(websocket: WebSocket) -> None:
        await websocket.accept()
        await websocket.send_text("no session needed")
        await websocket.close()

    routes = [
        Route("/read", read),
        Route("/noop", noop),
        Route("/set", set_values, methods=["POST"]),
        Route("/delete/{key}", delete_key, methods=["POST"]),
        Route("/append/{item}", append, methods=["POST"]),
        Route("/incr/{key}", incr, methods=["POST"]),
        Route("/login/{user}", login, methods=["POST"]),
        Route("/logout", logout, methods=["POST"]),
        Route("/regenerate", regenerate, methods=["POST"]),
        Route("/slow-set", slow_set, methods=["POST"]),
        Route("/slow-incr/{key}", slow_incr, methods=["POST"]),
        Route("/fail", fail, methods=["POST"]),
        Route("/error/{status}", error, methods=["POST"]),
        Route("/incr-then-fail/{how}", incr_then_fail, methods=["POST"]),
        Route("/stream", stream),
        Route("/whoami", whoami),
        WebSocketRoute("/ws", ws),
        WebSocketRoute("/ws-plain", ws_plain),
        WebSocketRoute("/ws-early", ws_early),
    ]
    middleware = [Middleware(SessionMiddleware, redis=redis, **options)] if wrap else []
    return Starlette(routes=routes, middleware=middleware)


async def run_lifespan(app: ASGIApp) -> list[str]:
    """Start and shut down ``app`` as a server would; the lifespan messages sent."""
    inbox: asyncio.Queue[Message] = asyncio.Queue()
    sent: list[str] = []

    async def send(message: Message) -> None:
        sent.append(message["type"])

    task = asyncio.ensure_future(app({"type": "lifespan", "state": {}}, inbox.get, send))
    await inbox.put({"type": "lifespan.startup"})
    await inbox.put({"type": "lifespan.shutdown"})
    await asyncio.wait_for(task, 10)
    return sent


def client_for(app: Any, **kwargs: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app, raise_app_exceptions=False),
        base_url=kwargs.pop("base_url", "http://testserver"),
        **kwargs,
    )


def cookie_of(response: httpx.Response, name: str = "session") -> str | None:
    """The value our Set-Cookie gives ``name`` ("" when it expires it), or None."""
    for header in response.headers.get_list("set-cookie"):
        first = header.split(";", 1)[0]
        cookie_name, _, value = first.partition("=")
        if cookie_name == name:
            return value
    return None


ClientFactory = Callable[..., Awaitable[httpx.AsyncClient]]


@pytest.fixture
async def make_client() -> AsyncIterator[Callable[..., httpx.AsyncClient]]:
    """``make_client(app)`` → an httpx client on ``app``, closed after the test."""
    clients: list[httpx.AsyncClient] = []

    def make(app: Any, **kwargs: Any) -> httpx.AsyncClient:
        client = client_for(app, **kwargs)
        clients.append(client)
        return client

    yield make
    for client in clients:
        await client.aclose()


@pytest.fixture
async def app(real_redis: Redis, key_prefix: str) -> Starlette:
    """The test app on the real Redis, counted by ``spy``."""
    return build_app(real_redis, key_prefix=key_prefix)


@pytest.fixture
async def client(
    app: Starlette, make_client: Callable[..., httpx.AsyncClient]
) -> httpx.AsyncClient:
    return make_client(app)


@pytest.fixture
async def peek(redis_url: str) -> AsyncIterator[Redis]:
    """An uncounted client for looking at what the library stored."""
    client: Redis = Redis.from_url(redis_url)
    yield client
    await client.aclose()


async def stored_keys(peek: Redis, key_prefix: str) -> list[str]:
    keys = await peek.keys(f"{key_prefix}*")
    return sorted(key.decode() if isinstance(key, bytes) else key for key in keys)


def session_id_of(cookie: str) -> str:
    """The raw id inside a signed cookie value (tests only; the app never exposes it)."""
    return cookie.rsplit(".", 1)[0]
