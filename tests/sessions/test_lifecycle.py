"""Issue 2 items 6, 8 and 9: login/logout, fixation, resurrection, the user index,
and no saving on errors."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import httpx
import pytest
from redis.asyncio import Redis

from asgi_redis_kit import SessionInfo, SessionStore

from .conftest import Gate, build_app, cookie_of, session_id_of, stored_keys

pytestmark = pytest.mark.real_redis


async def test_login_rotates_the_id_keeps_data_and_kills_the_old_cookie(
    client: httpx.AsyncClient,
    make_client: Callable[..., httpx.AsyncClient],
    app: object,
    peek: Redis,
    key_prefix: str,
) -> None:
    """Checklist 10 (fixation)."""
    before = cookie_of(await client.post("/set", json={"cart": ["book"]}))
    assert before
    response = await client.post("/login/alice")
    after = cookie_of(response)
    assert after
    assert session_id_of(after) != session_id_of(before)
    assert await peek.exists(f"{key_prefix}{session_id_of(before)}") == 0
    assert await peek.exists(f"{key_prefix}{session_id_of(after)}") == 1
    assert (await client.get("/read")).json() == {"cart": ["book"], "user": "alice"}
    replay = make_client(app, cookies={"session": before})
    assert (await replay.get("/read")).json() == {}


async def test_logout_deletes_the_record_expires_the_cookie_and_replay_is_anonymous(
    client: httpx.AsyncClient,
    make_client: Callable[..., httpx.AsyncClient],
    app: object,
    peek: Redis,
    key_prefix: str,
) -> None:
    """Checklist 13."""
    await client.post("/login/alice")
    cookie = client.cookies["session"]
    response = await client.post("/logout")
    header = response.headers["set-cookie"]
    assert header.startswith("session=;")
    assert "Max-Age=0" in header
    assert await stored_keys(peek, key_prefix) == []  # record and user index gone
    replay = make_client(app, cookies={"session": cookie})
    assert (await replay.get("/read")).json() == {}


async def test_data_set_after_clear_goes_to_a_new_session(
    client: httpx.AsyncClient, real_redis: Redis, key_prefix: str, peek: Redis
) -> None:
    from starlette.requests import Request
    from starlette.responses import PlainTextResponse, Response
    from starlette.routing import Route

    app = build_app(real_redis, key_prefix=key_prefix)

    async def clear_then_set(request: Request) -> Response:
        request.session.clear()
        request.session["flash"] = "bye"
        return PlainTextResponse("ok")

    app.router.routes.append(Route("/clear-then-set", clear_then_set))
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app), base_url="http://t"
    ) as browser:
        old = cookie_of(await browser.post("/login/bob"))
        assert old
        new = cookie_of(await browser.get("/clear-then-set"))
        assert new
        assert session_id_of(new) != session_id_of(old)
        assert (await browser.get("/read")).json() == {"flash": "bye"}
        assert await SessionStore(real_redis, key_prefix=key_prefix).user_sessions("bob") == []


async def test_slow_request_after_logout_does_not_resurrect(
    real_redis: Redis, key_prefix: str, peek: Redis, make_client: Callable[..., httpx.AsyncClient]
) -> None:
    """Checklist 14: the slow request loaded the session before the logout and saves
    after it; the save must be a no-op, not a re-creation."""
    gate = Gate()
    client = make_client(build_app(real_redis, key_prefix=key_prefix, gate=gate))
    await client.post("/login/alice")
    cookie = client.cookies["session"]
    slow = asyncio.ensure_future(client.post("/slow-set", json={"late": True}))
    await gate.reached.wait()
    other_tab = make_client(client._transport.app, cookies={"session": cookie})  # type: ignore[attr-defined]
    assert cookie_of(await other_tab.post("/logout")) == ""
    gate.opened.set()
    response = await slow
    assert response.status_code == 200
    # No Set-Cookie: this request did not log out, and the browser may already hold
    # a newer cookie that a Max-Age=0 would erase (see the two tests below).
    assert cookie_of(response) is None
    assert await stored_keys(peek, key_prefix) == []
    replay = make_client(client._transport.app, cookies={"session": cookie})  # type: ignore[attr-defined]
    assert (await replay.get("/read")).json() == {}


async def test_a_read_with_the_pre_login_cookie_does_not_log_the_user_out(
    real_redis: Redis, key_prefix: str, make_client: Callable[..., httpx.AsyncClient]
) -> None:
    """A request that left the browser before the login response arrived carries the
    old cookie, whose record the login deleted. Its answer must not expire the
    cookie: the browser would apply that to the new cookie it just received."""
    app = build_app(real_redis, key_prefix=key_prefix)
    browser = make_client(app)
    await browser.post("/set", json={"cart": ["book"]})
    pre_login = browser.cookies["session"]
    await browser.post("/login/alice")
    in_flight = make_client(app, cookies={"session": pre_login})
    response = await in_flight.get("/read")
    assert response.json() == {}
    assert "set-cookie" not in response.headers
    browser.cookies.extract_cookies(response)  # the browser gets that answer too
    assert (await browser.get("/whoami")).json()["user"] == "alice"
    assert (await browser.get("/read")).json() == {"cart": ["book"], "user": "alice"}


async def test_a_slow_write_with_the_pre_login_cookie_does_not_log_the_user_out(
    real_redis: Redis, key_prefix: str, make_client: Callable[..., httpx.AsyncClient]
) -> None:
    """The same race when the old session was loaded before the login and its save
    finds it gone: the late write is dropped (no resurrection), the cookie left alone."""
    gate = Gate()
    browser = make_client(build_app(real_redis, key_prefix=key_prefix, gate=gate))
    await browser.post("/set", json={"cart": ["book"]})
    slow = asyncio.ensure_future(browser.post("/slow-set", json={"late": True}))
    await gate.reached.wait()
    await browser.post("/login/alice")
    gate.opened.set()
    response = await slow
    assert response.status_code == 200
    assert "set-cookie" not in response.headers
    assert (await browser.get("/read")).json() == {"cart": ["book"], "user": "alice"}


async def test_slow_request_after_revoke_does_not_resurrect_via_incr(
    real_redis: Redis, key_prefix: str, peek: Redis, make_client: Callable[..., httpx.AsyncClient]
) -> None:
    store = SessionStore(real_redis, key_prefix=key_prefix)
    client = make_client(build_app(real_redis, key_prefix=key_prefix))
    await client.post("/login/alice")
    old = client.cookies["session"]
    await store.revoke_user("alice")
    # incr on a revoked session starts a new anonymous session, never the old one.
    response = await client.post("/incr/n")
    assert response.text == "1"
    new = cookie_of(response)
    assert new
    assert session_id_of(new) != session_id_of(old)
    assert await peek.exists(f"{key_prefix}{session_id_of(old)}") == 0


async def test_revoke_user_deletes_all_of_a_and_none_of_b(
    real_redis: Redis, key_prefix: str, peek: Redis, make_client: Callable[..., httpx.AsyncClient]
) -> None:
    """Checklist 15, with three devices for A and two for B."""
    app = build_app(real_redis, key_prefix=key_prefix)
    a_devices = [make_client(app) for _ in range(3)]
    b_devices = [make_client(app) for _ in range(2)]
    for device in a_devices:
        await device.post("/login/alice")
    for device in b_devices:
        await device.post("/login/bob")
    store = SessionStore(real_redis, key_prefix=key_prefix)
    a_sessions = await store.user_sessions("alice")
    assert len(a_sessions) == 3
    assert all(isinstance(info, SessionInfo) for info in a_sessions)
    handles = {(await d.get("/whoami")).json()["handle"] for d in a_devices}
    assert {info.handle for info in a_sessions} == handles
    raw_ids = {session_id_of(d.cookies["session"]) for d in a_devices}
    assert not raw_ids & {info.handle for info in a_sessions}  # never the raw id
    assert all(info.created_at <= info.expires_at for info in a_sessions)

    assert await store.revoke_user("alice") == 3
    for device in a_devices:
        assert (await device.get("/read")).json() == {}
    for device in b_devices:
        assert (await device.get("/read")).json() == {"user": "bob"}
    assert await store.user_sessions("alice") == []
    assert len(await store.user_sessions("bob")) == 2
    assert await store.revoke_user("alice") == 0


async def test_index_prunes_expired_and_rebound_sessions(
    real_redis: Redis, key_prefix: str, peek: Redis, make_client: Callable[..., httpx.AsyncClient]
) -> None:
    app = build_app(real_redis, key_prefix=key_prefix)
    first, second = make_client(app), make_client(app)
    await first.post("/login/alice")
    await second.post("/login/alice")
    await peek.delete(f"{key_prefix}{session_id_of(first.cookies['session'])}")  # expired
    await second.post("/login/bob")  # rebound
    store = SessionStore(real_redis, key_prefix=key_prefix)
    assert await store.user_sessions("alice") == []
    assert await peek.scard(store.user_key("alice")) == 0
    # A stale index entry never lets revoke_user delete someone else's session.
    await peek.sadd(store.user_key("alice"), session_id_of(second.cookies["session"]))
    assert await store.revoke_user("alice") == 0
    assert (await second.get("/read")).json() == {"user": "bob"}


async def test_revoke_one_session_by_handle(
    real_redis: Redis, key_prefix: str, make_client: Callable[..., httpx.AsyncClient]
) -> None:
    app = build_app(real_redis, key_prefix=key_prefix)
    laptop, phone = make_client(app), make_client(app)
    await laptop.post("/login/alice")
    await phone.post("/login/alice")
    store = SessionStore(real_redis, key_prefix=key_prefix)
    handle = (await phone.get("/whoami")).json()["handle"]
    assert await store.revoke_session("alice", handle)
    assert (await phone.get("/read")).json() == {}
    assert (await laptop.get("/read")).json() == {"user": "alice"}
    assert not await store.revoke_session("alice", handle)


async def test_user_index_keys_use_a_hash_tag_and_expire(
    real_redis: Redis, key_prefix: str, peek: Redis, client: httpx.AsyncClient
) -> None:
    await client.post("/login/alice")
    store = SessionStore(real_redis, key_prefix=key_prefix)
    index = store.user_key("alice")
    assert index.endswith("{alice}")
    assert 0 < await peek.pttl(index) <= 30 * 24 * 3600 * 1000


async def test_changes_are_not_saved_when_the_handler_raises(
    client: httpx.AsyncClient, peek: Redis, key_prefix: str
) -> None:
    """Checklist 17."""
    await client.post("/set", json={"kept": 1})
    response = await client.post("/fail")
    assert response.status_code == 500
    assert "set-cookie" not in response.headers
    assert (await client.get("/read")).json() == {"kept": 1}


@pytest.mark.parametrize("status", [500, 502, 503])
async def test_changes_are_not_saved_on_5xx(
    client: httpx.AsyncClient, peek: Redis, key_prefix: str, status: int
) -> None:
    await client.post("/set", json={"kept": 1})
    response = await client.post(f"/error/{status}")
    assert response.status_code == status
    assert "set-cookie" not in response.headers
    assert (await client.get("/read")).json() == {"kept": 1}


@pytest.mark.parametrize("how", ["raise", "500"])
async def test_incr_is_committed_at_once_and_not_rolled_back_on_error(
    client: httpx.AsyncClient, peek: Redis, key_prefix: str, how: str
) -> None:
    """The documented exception to checklist 17: incr() on a stored session is an
    atomic HINCRBY that returned its value, so a later failure does not undo it;
    the request's other changes are still dropped."""
    await client.post("/set", json={"n": 1})
    response = await client.post(f"/incr-then-fail/{how}")
    assert response.status_code == 500
    assert "set-cookie" not in response.headers
    assert (await client.get("/read")).json() == {"n": 2}


async def test_incr_on_a_new_session_is_dropped_on_error(
    client: httpx.AsyncClient, peek: Redis, key_prefix: str
) -> None:
    """Nobody else can see a new session yet: its incr is local and dropped too."""
    response = await client.post("/incr-then-fail/raise")
    assert response.status_code == 500
    assert "set-cookie" not in response.headers
    assert await stored_keys(peek, key_prefix) == []


async def test_new_session_on_5xx_stores_nothing(
    client: httpx.AsyncClient, peek: Redis, key_prefix: str
) -> None:
    response = await client.post("/error/500")
    assert "set-cookie" not in response.headers
    assert await stored_keys(peek, key_prefix) == []


async def test_4xx_is_a_deliberate_answer_and_is_saved(client: httpx.AsyncClient) -> None:
    await client.post("/error/404")
    assert (await client.get("/read")).json() == {"lost": True}
