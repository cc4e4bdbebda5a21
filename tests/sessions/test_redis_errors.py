"""Redis answering with an error reply is an outage, not a bug: a 503, never a 500.

A full Redis (``maxmemory`` reached, ``noeviction``: OOM), a read-only replica
(READONLY), a master missing its replicas (NOREPLICAS) and a Redis busy running a
slow script (BUSY) each answer every session
path: loading, the first save, an update, ``incr``, ``regenerate``, login, logout,
the idle-TTL refresh, and ``revoke_user`` / ``user_sessions`` on the store. What
Redis still allows works as usual (reads; deletes and TTL refreshes on a full
Redis); everything else is a 503 with ``Retry-After`` and no ``Set-Cookie`` from
the middleware, or ``BackendUnavailable`` from the store -- never a 500 or a
``TypeError``, and never a lost session.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

import httpx
import pytest
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from asgi_redis_kit import SessionStore
from asgi_redis_kit.errors import BackendUnavailable
from tests.support import RedisProcess, fill_until_oom

from .conftest import build_app, client_for, session_id_of

pytestmark = pytest.mark.real_redis

PREFIX = "errs:"


def assert_unavailable(response: httpx.Response, path: str) -> None:
    assert response.status_code == 503, f"{path}: {response.status_code} {response.text}"
    assert response.headers["retry-after"] == "5", path
    assert "set-cookie" not in response.headers, path


@dataclass
class Prepared:
    """Sessions stored while Redis was healthy: ``main`` (alice, with data and a
    counter), ``other`` (alice, to log out) and ``aged`` (alice, due a TTL refresh)."""

    main: str
    other: str
    aged: str


async def prepare(redis: Redis, peek: Redis) -> Prepared:
    app = build_app(redis, key_prefix=PREFIX)
    cookies: list[str] = []
    for _ in range(3):
        async with client_for(app) as browser:
            await browser.post("/set", json={"cart": ["book"], "n": 1})
            await browser.post("/login/alice")
            cookies.append(browser.cookies["session"])
    main, other, aged = cookies
    # Due a TTL refresh: aged by more than a tenth of the idle timeout.
    assert await peek.pexpire(f"{PREFIX}{session_id_of(aged)}", 10 * 24 * 3600 * 1000)
    return Prepared(main, other, aged)


async def request(
    redis: Redis, method: str, url: str, cookie: str | None = None, json: object = None
) -> httpx.Response:
    app = build_app(redis, key_prefix=PREFIX)
    async with client_for(app, cookies={"session": cookie} if cookie else None) as browser:
        return await browser.request(method, url, json=json)


async def read(redis: Redis, cookie: str) -> object:
    response = await request(redis, "GET", "/read", cookie)
    assert response.status_code == 200
    return response.json()


async def assert_writes_refused(redis: Redis, prepared: Prepared) -> None:
    """Every path that must write new data answers 503 and loses nothing."""
    main = prepared.main
    assert_unavailable(await request(redis, "POST", "/set", json={"a": 1}), "first save")
    assert_unavailable(await request(redis, "POST", "/set", main, {"b": 2}), "update save")
    assert_unavailable(await request(redis, "POST", "/incr/n", main), "incr")
    assert_unavailable(await request(redis, "POST", "/incr/fresh", main), "incr of a new key")
    assert_unavailable(await request(redis, "POST", "/regenerate", main), "regenerate")
    assert_unavailable(await request(redis, "POST", "/login/alice", main), "login")


async def assert_nothing_lost(redis: Redis, prepared: Prepared) -> None:
    for cookie in (prepared.main, prepared.aged):
        assert await read(redis, cookie) == {"cart": ["book"], "n": 1, "user": "alice"}


@pytest.fixture
async def server(own_redis: RedisProcess) -> AsyncIterator[tuple[Redis, Redis]]:
    """(the app's client, an uncounted one for setting things up) on own_redis."""
    redis: Redis = Redis.from_url(own_redis.url, socket_timeout=5)
    peek: Redis = Redis.from_url(own_redis.url, socket_timeout=5)
    try:
        yield redis, peek
    finally:
        await redis.aclose()
        await peek.aclose()


async def test_a_full_redis_is_a_503_for_every_write_and_never_a_500(
    server: tuple[Redis, Redis],
) -> None:
    redis, peek = server
    prepared = await prepare(redis, peek)
    await fill_until_oom(peek)

    await assert_writes_refused(redis, prepared)
    # Reads, TTL refreshes and deletes need no memory: Redis still does them.
    assert await read(redis, prepared.main) == {"cart": ["book"], "n": 1, "user": "alice"}
    aged_key = f"{PREFIX}{session_id_of(prepared.aged)}"
    await read(redis, prepared.aged)
    assert await peek.pttl(aged_key) > 10 * 24 * 3600 * 1000  # refreshed
    logout = await request(redis, "POST", "/logout", prepared.other)
    assert logout.status_code == 200
    assert "Max-Age=0" in logout.headers["set-cookie"]
    store = SessionStore(redis, key_prefix=PREFIX)
    assert len(await store.user_sessions("alice")) == 2
    await assert_nothing_lost(redis, prepared)
    assert await store.revoke_user("alice") == 2


async def test_store_incr_on_a_full_redis_is_backend_unavailable_not_a_type_error(
    server: tuple[Redis, Redis],
) -> None:
    redis, peek = server
    prepared = await prepare(redis, peek)
    await fill_until_oom(peek)
    store = SessionStore(redis, key_prefix=PREFIX)
    with pytest.raises(BackendUnavailable):
        await store.incr(session_id_of(prepared.main), "n", 1, user="alice")
    # Once there is room again, a genuine mistake is the caller's error again.
    await peek.config_set("maxmemory", 0)
    await peek.hset(f"{PREFIX}{session_id_of(prepared.main)}", "d:word", b'"seven"')
    with pytest.raises(TypeError, match="not hold an integer"):
        await store.incr(session_id_of(prepared.main), "word", 1, user="alice")
    with pytest.raises(TypeError, match="not hold an integer"):
        await store.incr(session_id_of(prepared.main), "n", 2**63, user="alice")
    with pytest.raises(TypeError, match="not hold an integer"):
        await store.incr(session_id_of(prepared.main), "n", 2**63 - 1, user="alice")
    assert await store.incr(session_id_of(prepared.main), "n", 1, user="alice") == 2


@contextlib.contextmanager
def primary_server() -> Iterator[RedisProcess]:
    server = RedisProcess().start()
    try:
        yield server
    finally:
        server.close()


async def test_a_read_only_replica_is_a_503_for_every_write(
    server: tuple[Redis, Redis],
) -> None:
    redis, peek = server
    with primary_server() as primary:
        source: Redis = Redis.from_url(primary.url, socket_timeout=5)
        try:
            prepared = await prepare(source, source)
            await peek.replicaof("127.0.0.1", primary.port)
            for _ in range(200):  # the replica has synced the sessions
                if await peek.exists(f"{PREFIX}{session_id_of(prepared.main)}"):
                    break
                await asyncio.sleep(0.05)
            else:
                raise AssertionError("the replica never synced")

            await assert_writes_refused(redis, prepared)
            assert_unavailable(await request(redis, "GET", "/read", prepared.aged), "touch")
            assert_unavailable(await request(redis, "POST", "/logout", prepared.other), "logout")
            assert await read(redis, prepared.main) == {"cart": ["book"], "n": 1, "user": "alice"}
            store = SessionStore(redis, key_prefix=PREFIX)
            assert len(await store.user_sessions("alice")) == 3
            with pytest.raises(BackendUnavailable):
                await store.revoke_user("alice")
            with pytest.raises(BackendUnavailable):
                await store.incr(session_id_of(prepared.main), "n", 1, user="alice")
            await assert_nothing_lost(source, prepared)
            assert await read(source, prepared.other) != {}
        finally:
            await peek.replicaof("NO", "ONE")
            await source.aclose()


async def test_a_busy_redis_is_a_503_everywhere(
    server: tuple[Redis, Redis], own_redis: RedisProcess
) -> None:
    redis, peek = server
    prepared = await prepare(redis, peek)
    await peek.config_set("busy-reply-threshold", 50)
    blocker: Redis = Redis.from_url(own_redis.url)
    busy = asyncio.ensure_future(blocker.eval("while true do end", 0))
    try:
        for _ in range(200):  # until Redis answers BUSY
            try:
                await peek.ping()
            except ResponseError as exc:
                if str(exc).startswith("BUSY"):
                    break
                raise
            await asyncio.sleep(0.05)
        else:
            raise AssertionError("Redis never became busy")

        assert_unavailable(await request(redis, "GET", "/read", prepared.main), "load")
        assert_unavailable(await request(redis, "POST", "/set", json={"a": 1}), "first save")
        for method, url in [("POST", "/incr/n"), ("POST", "/login/alice"), ("POST", "/logout")]:
            assert_unavailable(await request(redis, method, url, prepared.main), url)
        noop = await request(redis, "GET", "/noop", prepared.main)
        assert noop.status_code == 200  # a page that does not use its session is served
        store = SessionStore(redis, key_prefix=PREFIX)
        with pytest.raises(BackendUnavailable):
            await store.user_sessions("alice")
        with pytest.raises(BackendUnavailable):
            await store.revoke_user("alice")
    finally:
        for _ in range(100):
            try:
                await peek.script_kill()
                break
            except ResponseError:  # not busy (yet / any more)
                if busy.done():
                    break
                await asyncio.sleep(0.05)
        with contextlib.suppress(ResponseError):
            await asyncio.wait_for(busy, 10)
        await blocker.aclose()
    await assert_nothing_lost(redis, prepared)


async def test_a_master_without_its_replicas_is_a_503_for_every_write(
    server: tuple[Redis, Redis],
) -> None:
    """``min-replicas-to-write`` unmet: every write answers NOREPLICAS."""
    redis, peek = server
    prepared = await prepare(redis, peek)
    await peek.config_set("min-replicas-to-write", 1)
    try:
        await assert_writes_refused(redis, prepared)
        assert await read(redis, prepared.main) == {"cart": ["book"], "n": 1, "user": "alice"}
        store = SessionStore(redis, key_prefix=PREFIX)
        with pytest.raises(BackendUnavailable):
            await store.revoke_user("alice")
    finally:
        await peek.config_set("min-replicas-to-write", 0)
    await assert_nothing_lost(redis, prepared)
