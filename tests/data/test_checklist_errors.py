"""Checklist 44 on the data cache: a Redis error reply that is not the caller's
fault (OOM, READONLY, LOADING, BUSY, MASTERDOWN, CLUSTERDOWN) makes reads fail
open (``get``/``get_many`` the default, ``exists`` False, a memoized function
runs) and writes raise BackendUnavailable (``set``, ``set_many``, ``delete``,
``incr``, ``invalidate_tags``, ``clear``), never a raw ResponseError.

Each code comes from a tiny RESP server on loopback that answers every command
with it (the connection handshake excepted), and where a throwaway
redis-server can produce it for real, from that too: OOM (full, noeviction),
READONLY (a replica), BUSY (a long Lua script), MASTERDOWN (a replica cut off
from its master with replica-serve-stale-data no). The response cache's
versions are tests/cache/test_redis_errors.py."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from redis.asyncio import Redis

from asgi_redis_kit import BackendUnavailable, Cache
from tests.support import RedisProcess, fill_until_oom, free_port

pytestmark = [pytest.mark.real_redis, pytest.mark.timeout(60)]

ERRORS = {
    "OOM": b"OOM command not allowed when used memory > 'maxmemory'.",
    "READONLY": b"READONLY You can't write against a read only replica.",
    "LOADING": b"LOADING Redis is loading the dataset in memory",
    "BUSY": b"BUSY Redis is busy running a script. You can only call SCRIPT KILL.",
    "MASTERDOWN": b"MASTERDOWN Link with MASTER is down and replica-serve-stale-data is 'no'.",
    "CLUSTERDOWN": b"CLUSTERDOWN The cluster is down",
}
# What the connection handshake sends; answered, so the commands meet the error.
HANDSHAKE = {
    b"HELLO": b"%1\r\n$5\r\nproto\r\n:3\r\n",
    b"CLIENT": b"+OK\r\n",
    b"SELECT": b"+OK\r\n",
    b"PING": b"+PONG\r\n",
}


class ErrorServer:
    """Answers every RESP command (but the handshake's) with one error reply."""

    def __init__(self, error: bytes) -> None:
        self.error = b"-" + error + b"\r\n"
        self.commands: list[bytes] = []
        self.port = free_port()
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def __aenter__(self) -> ErrorServer:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for writer in list(self._writers):
            writer.close()
        await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        with contextlib.suppress(OSError, asyncio.IncompleteReadError, ValueError):
            while header := await reader.readline():
                assert header.startswith(b"*"), header
                args = []
                for _ in range(int(header[1:])):
                    size = int((await reader.readline())[1:])
                    args.append((await reader.readexactly(size + 2))[:-2])
                name = args[0].upper()
                self.commands.append(name)
                writer.write(HANDSHAKE.get(name, self.error))
                await writer.drain()
        writer.close()
        self._writers.discard(writer)


def cache_on(redis: str | Redis) -> Cache:
    # The breaker never opens: every call below meets the error reply itself.
    return Cache(redis, key_prefix="e:", timeout=5, breaker_threshold=10**9)


async def reads_fail_open(cache: Cache, stored: dict[str, object]) -> None:
    """Reads answer a stored value or the default, and never raise."""
    calls = 0

    @cache.memoize(ttl=60, key="memo:{x}")
    async def f(x: int) -> int:
        nonlocal calls
        calls += 1
        return x * 2

    for key in ("k", "absent"):
        assert await cache.get(key, "default") in (stored.get(key), "default")
        assert await cache.get_many([key, "absent"], "d") in (
            [stored.get(key), "d"],
            ["d", "d"],
        )
        await cache.exists(key)
    assert await f(21) == 42
    assert await f(21) == 42
    assert calls in (1, 2)


WRITES: dict[str, Callable[[Cache], Awaitable[object]]] = {
    "set": lambda cache: cache.set("k", "new", ttl=60),
    "set_many": lambda cache: cache.set_many({"k": "new", "k2": "new"}, ttl=60),
    "delete": lambda cache: cache.delete("k"),
    "incr": lambda cache: cache.incr("n"),
    "invalidate_tags": lambda cache: cache.invalidate_tags("t"),
    "clear": lambda cache: cache.clear(),
}


async def writes_raise(cache: Cache) -> None:
    for name, write in WRITES.items():
        try:
            await write(cache)
        except BackendUnavailable:
            continue
        raise AssertionError(f"{name} did not raise BackendUnavailable")


@pytest.mark.parametrize("client_kind", ["url", "callers-client"])
@pytest.mark.parametrize("code", list(ERRORS))
async def test_every_error_reply_fails_reads_open_and_writes_closed(
    code: str, client_kind: str
) -> None:
    async with ErrorServer(ERRORS[code]) as server:
        client = Redis.from_url(server.url) if client_kind == "callers-client" else None
        cache = cache_on(client or server.url)
        try:
            assert await cache.get("k", "default") == "default"
            assert await cache.get_many(["k", "j"], "d") == ["d", "d"]
            assert not await cache.exists("k")
            await reads_fail_open(cache, {})
            await writes_raise(cache)
            # Each path reached the server and met the error there.
            assert {b"MGET", b"EVALSHA", b"EXEC", b"EVAL"} <= set(server.commands), set(
                server.commands
            )
        finally:
            await cache.aclose()
            if client is not None:
                await client.aclose()


# -- the same codes from a real redis-server ------------------------------------------


@pytest.fixture
async def seeded(own_redis: RedisProcess) -> AsyncIterator[Cache]:
    """A cache on the throwaway server, with a value under "k"."""
    cache = cache_on(own_redis.url)
    try:
        await cache.set("k", "old", ttl=60)
        yield cache
    finally:
        await cache.aclose()


async def test_a_full_redis(seeded: Cache, admin: Redis) -> None:
    await fill_until_oom(admin)
    await reads_fail_open(seeded, {"k": "old"})
    assert await seeded.get("k") == "old"  # reads still work on a full Redis
    await writes_raise(seeded)


async def test_a_read_only_replica(seeded: Cache, admin: Redis) -> None:
    primary = RedisProcess().start()
    try:
        await admin.replicaof("127.0.0.1", primary.port)
        await reads_fail_open(seeded, {"k": "old"})
        await writes_raise(seeded)
    finally:
        await admin.replicaof("NO", "ONE")
        primary.close()


async def test_a_replica_cut_off_from_its_master(seeded: Cache, admin: Redis) -> None:
    await admin.config_set("replica-serve-stale-data", "no")
    await admin.replicaof("127.0.0.1", free_port())  # nobody listens there
    try:
        assert await seeded.get("k", "default") == "default"  # MASTERDOWN for reads too
        await reads_fail_open(seeded, {})
        await writes_raise(seeded)
    finally:
        await admin.replicaof("NO", "ONE")


async def test_a_redis_busy_running_a_script(
    seeded: Cache, admin: Redis, own_redis: RedisProcess
) -> None:
    await admin.config_set("busy-reply-threshold", 50)
    blocker = Redis.from_url(own_redis.url, socket_timeout=30)
    script = asyncio.ensure_future(blocker.eval("while true do end", 0))
    try:
        probe = Redis.from_url(own_redis.url, socket_timeout=10)
        try:

            async def busy() -> bool:
                try:
                    await probe.ping()
                except Exception as exc:
                    return "BUSY" in str(exc)
                return False

            for _ in range(200):
                if await busy():
                    break
                await asyncio.sleep(0.02)
            else:
                raise AssertionError("the server never answered BUSY")
            assert await seeded.get("k", "default") == "default"
            await reads_fail_open(seeded, {})
            await writes_raise(seeded)
        finally:
            await probe.script_kill()
            await probe.aclose()
    finally:
        with contextlib.suppress(Exception):
            await script
        await blocker.aclose()
