"""Issue 2 item 1 and 5: one hash per session, only changed fields written, strict mode."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import httpx
import orjson
import pytest
from redis.asyncio import Redis
from starlette.applications import Starlette

from asgi_redis_kit import SessionStore
from asgi_redis_kit.sessions._cookie import CookieSigner

from .conftest import SECRET, Gate, build_app, cookie_of, session_id_of, stored_keys

pytestmark = pytest.mark.real_redis


async def test_one_hash_per_session_one_orjson_field_per_key(
    client: httpx.AsyncClient, peek: Redis, key_prefix: str
) -> None:
    response = await client.post("/set", json={"visits": 3, "cart": ["a", {"b": 1}]})
    cookie = cookie_of(response)
    assert cookie
    key = f"{key_prefix}{session_id_of(cookie)}"
    assert await stored_keys(peek, key_prefix) == [key]
    assert await peek.type(key) == b"hash"
    fields = await peek.hgetall(key)
    assert fields[b"d:visits"] == b"3"
    assert orjson.loads(fields[b"d:cart"]) == ["a", {"b": 1}]
    assert int(fields[b"m:created"]) > 0
    assert set(fields) == {b"d:visits", b"d:cart", b"m:created"}
    assert 0 < await peek.pttl(key) <= 14 * 24 * 3600 * 1000


async def test_nested_mutation_is_saved(client: httpx.AsyncClient) -> None:
    await client.post("/append/apple")
    await client.post("/append/pear")
    assert (await client.get("/read")).json() == {"cart": ["apple", "pear"]}


async def test_deleting_a_key_deletes_its_field(
    client: httpx.AsyncClient, peek: Redis, key_prefix: str
) -> None:
    await client.post("/set", json={"a": 1, "b": 2})
    await client.post("/delete/a")
    (key,) = await stored_keys(peek, key_prefix)
    assert set(await peek.hgetall(key)) == {b"d:b", b"m:created"}


async def test_save_writes_only_changed_fields(
    real_redis: Redis, key_prefix: str, peek: Redis, make_client: Callable[..., httpx.AsyncClient]
) -> None:
    """A field changed in Redis by someone else while our request ran survives our
    save, because we write only the fields we changed (a whole-blob save erases it)."""
    gate = Gate()
    client = make_client(build_app(real_redis, key_prefix=key_prefix, gate=gate))
    await client.post("/set", json={"mine": 0, "theirs": 0})
    (key,) = await stored_keys(peek, key_prefix)
    slow = asyncio.ensure_future(client.post("/slow-set", json={"mine": 1}))
    await gate.reached.wait()
    await peek.hset(key, "d:theirs", b"42")  # another request's write
    gate.opened.set()
    assert (await slow).status_code == 200
    assert (await client.get("/read")).json() == {"mine": 1, "theirs": 42}


async def test_removing_every_key_deletes_the_record_and_leaves_the_cookie(
    client: httpx.AsyncClient, peek: Redis, key_prefix: str
) -> None:
    """Only clear() expires the cookie: a cookie without a record is an empty session,
    and a Max-Age=0 could hit a newer cookie the browser got from another request."""
    await client.post("/set", json={"a": 1})
    response = await client.post("/delete/a")
    assert "set-cookie" not in response.headers
    assert await stored_keys(peek, key_prefix) == []
    assert (await client.get("/read")).json() == {}


async def test_no_cookie_and_nothing_written_stores_nothing(
    client: httpx.AsyncClient, peek: Redis, key_prefix: str
) -> None:
    response = await client.get("/read")
    assert response.json() == {}
    assert "set-cookie" not in response.headers
    await client.post("/set", json={})  # an update with nothing in it
    assert await stored_keys(peek, key_prefix) == []


async def test_signed_id_without_record_gets_a_fresh_id_and_no_key(
    app: Starlette,
    make_client: Callable[..., httpx.AsyncClient],
    peek: Redis,
    key_prefix: str,
) -> None:
    """Checklist 2: loading never creates a record, and an unknown id is never adopted."""
    presented = "A" * 43
    cookie = CookieSigner(SECRET).sign(presented)
    client = make_client(app, cookies={"session": cookie})
    response = await client.get("/read")
    assert response.json() == {}
    # No Set-Cookie: the browser may hold a newer cookie by the time this arrives.
    assert "set-cookie" not in response.headers
    assert await stored_keys(peek, key_prefix) == []
    response = await client.post("/set", json={"x": 1})
    new_cookie = cookie_of(response)
    assert new_cookie
    assert session_id_of(new_cookie) != presented
    assert await stored_keys(peek, key_prefix) == [f"{key_prefix}{session_id_of(new_cookie)}"]


async def test_corrupt_record_is_an_empty_session_and_a_security_log(
    client: httpx.AsyncClient,
    peek: Redis,
    key_prefix: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Checklist 18."""
    response = await client.post("/set", json={"a": 1})
    cookie = cookie_of(response)
    assert cookie
    (key,) = await stored_keys(peek, key_prefix)
    await peek.hset(key, "d:a", b"{not json")
    with caplog.at_level("WARNING", logger="asgi_redis_kit.sessions"):
        response = await client.get("/read")
    assert response.status_code == 200
    assert response.json() == {}
    assert any("security: corrupt session record" in r.getMessage() for r in caplog.records)
    assert session_id_of(cookie) not in caplog.text


async def test_store_load_never_writes(real_redis: Redis, key_prefix: str, peek: Redis) -> None:
    store = SessionStore(real_redis, key_prefix=key_prefix)
    assert await store.load("B" * 43) is None
    assert await stored_keys(peek, key_prefix) == []


async def test_non_json_value_is_a_clear_error_not_a_silent_loss(
    real_redis: Redis, key_prefix: str, make_client: Callable[..., httpx.AsyncClient]
) -> None:
    from starlette.requests import Request
    from starlette.responses import PlainTextResponse, Response
    from starlette.routing import Route

    app = build_app(real_redis, key_prefix=key_prefix)

    async def bad(request: Request) -> Response:
        request.session["when"] = object()
        return PlainTextResponse("ok")

    app.router.routes.append(Route("/bad", bad))
    response = await make_client(app).get("/bad")
    assert response.status_code == 500  # a programming error, reported loudly
