"""The interface a response cache uses to key per-user pages without loading
the session: ``SessionMiddleware.identify``/``handling``/``cookie_name`` and the
non-raising ``Session`` readers ``record_handle``, ``changed`` and ``holds_data``."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from asgi_redis_kit import Session, SessionMiddleware
from asgi_redis_kit.sessions import SessionIdentity
from asgi_redis_kit.sessions._record import handle_of
from asgi_redis_kit.sessions._session import UnavailableSession
from tests.support import asgi_get, http_scope

from .conftest import SECRET, cookie_of, session_id_of

pytestmark = pytest.mark.real_redis


def _readers(session: Session) -> dict[str, Any]:
    return {
        "record_handle": session.record_handle,
        "changed": session.changed,
        "holds_data": session.holds_data,
    }


def reader_app() -> Starlette:
    """Handlers that report the readers, before and after a change; none of them
    asks for the session, so ``accessed`` must stay False unless they change it."""

    async def peek(request: Request) -> Response:
        session: Session = request.scope["session"]
        return JSONResponse({**_readers(session), "accessed": session.accessed})

    async def write(request: Request) -> Response:
        session: Session = request.scope["session"]
        before = _readers(session)
        dict.__setitem__(session, "n", 1)  # a change no hook sees, like nested mutation
        return JSONResponse({"before": before, "after": _readers(session)})

    async def login(request: Request) -> Response:
        Session.of(request)["user"] = "ann"
        return PlainTextResponse("ok")

    return Starlette(
        routes=[
            Route("/peek", peek),
            Route("/write", write, methods=["POST"]),
            Route("/login", login, methods=["POST"]),
        ]
    )


@pytest.fixture
async def middleware(real_redis: Redis, key_prefix: str) -> AsyncIterator[SessionMiddleware]:
    mw = SessionMiddleware(reader_app(), secret_key=SECRET, redis=real_redis, key_prefix=key_prefix)
    yield mw
    await mw.aclose()


@pytest.fixture
def client(
    middleware: SessionMiddleware, make_client: Callable[..., httpx.AsyncClient]
) -> httpx.AsyncClient:
    return make_client(middleware)


async def _login(client: httpx.AsyncClient) -> str:
    response = await client.post("/login")
    cookie = cookie_of(response)
    assert cookie
    return cookie


def _scope(*cookies: str) -> dict[str, Any]:
    headers = [(b"host", b"testserver")]
    headers += [(b"cookie", f"session={value}".encode()) for value in cookies]
    return http_scope(headers=headers)


async def test_identify_names_the_stored_session(
    middleware: SessionMiddleware, client: httpx.AsyncClient, peek: Redis
) -> None:
    cookie = await _login(client)
    session_id = session_id_of(cookie)

    identity = middleware.identify(_scope(cookie))

    assert identity == SessionIdentity(
        fingerprint=hashlib.sha256(session_id.encode()).hexdigest().encode(),
        record_key=middleware.store.session_key(session_id),
        backend=middleware.store.backend,
    )
    assert session_id.encode() not in identity.fingerprint
    assert await peek.exists(identity.record_key) == 1


async def test_identify_refuses_no_cookie_a_bad_signature_and_reads_only_the_first(
    middleware: SessionMiddleware, client: httpx.AsyncClient
) -> None:
    cookie = await _login(client)
    forged = session_id_of(cookie) + ".not-the-signature"

    assert middleware.identify(_scope()) is None
    assert middleware.identify(_scope(forged)) is None
    assert middleware.identify(_scope(forged, cookie)) is None
    assert middleware.identify(_scope(cookie, forged)) is not None


async def test_identify_checks_with_this_middlewares_keys_and_cookie(
    real_redis: Redis, key_prefix: str, client: httpx.AsyncClient
) -> None:
    cookie = await _login(client)
    other_key = SessionMiddleware(
        reader_app(), secret_key="another-key", redis=real_redis, key_prefix=key_prefix
    )
    prefixed = SessionMiddleware(
        reader_app(), secret_key=SECRET, redis=real_redis, host_prefix=True
    )

    assert other_key.identify(_scope(cookie)) is None
    assert prefixed.cookie_name == "__Host-session"
    assert prefixed.identify(_scope(cookie)) is None
    scope = http_scope(headers=[(b"cookie", f"__Host-session={cookie}".encode())])
    assert prefixed.identify(scope) is not None


async def test_handling_is_the_middleware_that_marked_the_scope(
    middleware: SessionMiddleware,
) -> None:
    scope = http_scope("/peek")
    assert SessionMiddleware.handling(scope) is None

    start, _ = await asgi_get(middleware, scope)

    assert start["status"] == 200
    assert SessionMiddleware.handling(scope) is middleware
    assert SessionMiddleware.handling({"type": "http", "asgi_redis_kit.sessions": 1}) is None


async def test_readers_of_a_new_session(client: httpx.AsyncClient) -> None:
    peeked = (await client.get("/peek")).json()
    written = (await client.post("/write")).json()

    assert peeked == {
        "record_handle": None,
        "changed": False,
        "holds_data": False,
        "accessed": False,
    }
    assert written["before"] == {"record_handle": None, "changed": False, "holds_data": False}
    assert written["after"] == {"record_handle": None, "changed": True, "holds_data": True}


async def test_readers_of_a_stored_session(client: httpx.AsyncClient) -> None:
    cookie = await _login(client)
    peeked = (await client.get("/peek")).json()

    assert peeked["record_handle"] == handle_of(session_id_of(cookie))
    assert peeked == {
        "record_handle": peeked["record_handle"],
        "changed": False,
        "holds_data": True,
        "accessed": False,
    }
    written = (await client.post("/write")).json()
    assert written["before"]["changed"] is False
    assert written["after"]["changed"] is True


async def test_readers_never_raise_on_the_stand_in_for_a_failed_load(
    middleware: SessionMiddleware,
) -> None:
    session = UnavailableSession(middleware.store, retry_after=5)

    assert _readers(session) == {"record_handle": None, "changed": False, "holds_data": False}
    assert session.accessed is False
    assert session._store_failed is False
