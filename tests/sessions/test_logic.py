"""The logic subset on both fakeredis and a real server (checklist 40).

fakeredis runs our Lua through lupa, so this is also what keeps the zero-setup
``memory://`` demo honest.
"""

from __future__ import annotations

from collections.abc import Callable

import httpx
import pytest
from redis.asyncio import Redis

from asgi_redis_kit import SessionMiddleware, SessionStore

from .conftest import SECRET, build_app, cookie_of, session_id_of


@pytest.fixture
def browser(
    any_redis: Redis, key_prefix: str, make_client: Callable[..., httpx.AsyncClient]
) -> httpx.AsyncClient:
    return make_client(build_app(any_redis, key_prefix=key_prefix))


async def test_write_read_update_delete(browser: httpx.AsyncClient) -> None:
    await browser.post("/set", json={"a": 1, "nested": {"x": [1, 2]}})
    await browser.post("/append/z")
    await browser.post("/delete/a")
    assert (await browser.get("/read")).json() == {"nested": {"x": [1, 2]}, "cart": ["z"]}


async def test_incr_new_and_stored_sessions(browser: httpx.AsyncClient) -> None:
    assert (await browser.post("/incr/n")).text == "1"  # new session: local, saved once
    assert (await browser.post("/incr/n")).text == "2"  # stored: HINCRBY in Lua
    assert (await browser.get("/read")).json() == {"n": 2}


async def test_incr_on_a_non_integer_is_a_type_error(
    any_redis: Redis, key_prefix: str, browser: httpx.AsyncClient
) -> None:
    await browser.post("/set", json={"n": "seven"})
    response = await browser.post("/incr/n")
    assert response.status_code == 500  # a programming error, not a Redis outage
    store = SessionStore(any_redis, key_prefix=key_prefix)
    with pytest.raises(TypeError, match="not hold an integer"):
        await store.incr(session_id_of(browser.cookies["session"]), "n", 1)


async def test_login_logout_and_the_user_index(
    any_redis: Redis, key_prefix: str, browser: httpx.AsyncClient
) -> None:
    store = SessionStore(any_redis, key_prefix=key_prefix)
    before = cookie_of(await browser.post("/set", json={"cart": [1]}))
    after = cookie_of(await browser.post("/login/kim"))
    assert before
    assert after
    assert session_id_of(before) != session_id_of(after)
    assert await any_redis.exists(store.session_key(session_id_of(before))) == 0
    assert (await browser.get("/whoami")).json()["user"] == "kim"
    assert len(await store.user_sessions("kim")) == 1
    assert cookie_of(await browser.post("/logout")) == ""
    assert await store.user_sessions("kim") == []
    assert await any_redis.exists(store.session_key(session_id_of(after))) == 0


async def test_update_of_a_vanished_session_does_not_recreate_it(
    any_redis: Redis, key_prefix: str
) -> None:
    store = SessionStore(any_redis, key_prefix=key_prefix)
    created = store.now_ms()
    key_id = "C" * 43
    fields = {"m:created": b"%d" % created}
    assert await store.save(key_id, create=True, fields=fields, ttl_ms=60_000)
    await any_redis.delete(store.session_key(key_id))
    result = await store.save(key_id, create=False, fields={"d:x": b"1"}, ttl_ms=60_000)
    assert result == 0
    assert await any_redis.exists(store.session_key(key_id)) == 0
    assert await store.incr(key_id, "n", 1) is None
    assert await any_redis.exists(store.session_key(key_id)) == 0
    assert not await store.touch(key_id, 60_000)


async def test_memory_url_runs_the_whole_flow(
    make_client: Callable[..., httpx.AsyncClient],
) -> None:
    """The zero-setup path: ``redis="memory://..."`` (in-process fakeredis)."""
    mw = SessionMiddleware(
        build_app(None, wrap=False), secret_key=SECRET, redis="memory://sessions-logic"
    )
    try:
        client = make_client(mw)
        for expected in ("1", "2", "3"):
            assert (await client.post("/incr/visits")).text == expected
        await client.post("/login/lee")
        assert (await client.get("/read")).json() == {"visits": 3, "user": "lee"}
        assert await mw.store.revoke_user("lee") == 1
        assert (await client.get("/read")).json() == {}
    finally:
        await mw.aclose()
