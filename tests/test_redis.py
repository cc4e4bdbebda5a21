"""The client factory: URLs, ownership, deadlines and error translation."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.connection import Connection
from redis.asyncio.sentinel import SentinelConnectionPool
from redis.exceptions import RedisClusterException, SlotNotCoveredError
from starlette.types import Message, Receive, Scope, Send

from asgi_redis_kit import _clients, _redis
from asgi_redis_kit._redis import Backend, serve_with_lifespan_close
from asgi_redis_kit.errors import BackendUnavailable
from tests.support import RedisProcess


async def test_memory_urls_share_a_server_by_name() -> None:
    a, b, other = Backend("memory://shared-a"), Backend("memory://shared-a"), Backend("memory://b")
    try:
        await a.client.set("k", "v")
        assert await b.client.get("k") == b"v"
        assert await other.client.get("k") is None
    finally:
        for backend in (a, b, other):
            await backend.aclose()


@pytest.mark.parametrize("url", ["http://localhost", "localhost:6379", "mysql://x"])
def test_unknown_url_scheme_is_a_clear_error(url: str) -> None:
    with pytest.raises(ValueError, match="redis://host:port/db"):
        Backend(url)


def test_wrong_type_is_a_type_error() -> None:
    with pytest.raises(TypeError, match=r"URL string or a redis\.asyncio\.Redis"):
        Backend(6379)  # type: ignore[arg-type]


def test_timeout_must_be_positive() -> None:
    with pytest.raises(ValueError, match="positive"):
        Backend("memory://", timeout=0)


def test_repr_hides_the_url() -> None:
    backend = Backend("redis://:hunter2@127.0.0.1:1/0")
    assert "hunter2" not in repr(backend)


async def test_url_client_is_closed_but_a_callers_client_is_not(redis_url: str) -> None:
    ours = Backend(redis_url)
    assert await ours.client.ping()
    await ours.aclose()
    assert ours.owned

    theirs_client = Redis.from_url(redis_url)
    theirs = Backend(theirs_client)
    await theirs.aclose()
    assert await theirs_client.ping()  # still usable: not ours to close
    await theirs_client.aclose()


async def test_lifespan_shutdown_closes_before_the_server_hears() -> None:
    events: list[str] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await receive()
        await send({"type": "lifespan.startup.complete"})
        await receive()
        await send({"type": "lifespan.shutdown.complete"})

    inbox = iter([{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}])

    async def receive() -> Message:
        return next(inbox)

    async def send(message: Message) -> None:
        events.append(message["type"])

    async def close() -> None:
        events.append("closed")

    await serve_with_lifespan_close(app, {"type": "lifespan"}, receive, send, close)
    assert events == ["lifespan.startup.complete", "closed", "lifespan.shutdown.complete"]


@pytest.mark.real_redis
async def test_stopped_server_fails_fast_with_backend_unavailable(
    own_redis: RedisProcess,
) -> None:
    backend = Backend(own_redis.url, timeout=0.5)
    try:
        assert await backend.client.ping()
        own_redis.stop()
        started = time.monotonic()
        with pytest.raises(BackendUnavailable):
            async with backend.call() as client:
                await client.get("k")
        # Generous bound: this checks "no hang", not speed.
        assert time.monotonic() - started < 5 * 0.5
        own_redis.start()
        async with backend.call() as client:  # recovers without a restart
            assert await client.ping()
    finally:
        await backend.aclose()


@pytest.mark.real_redis
async def test_paused_server_hits_the_deadline_and_the_pool_recovers(
    own_redis: RedisProcess,
) -> None:
    backend = Backend(own_redis.url, timeout=0.3)
    try:
        await backend.client.set("k", "before")
        own_redis.pause()
        with pytest.raises(BackendUnavailable):
            async with backend.call() as client:
                await client.get("k")
        own_redis.resume()
        async with backend.call() as client:
            # The cancelled reply must not be read by the next command (CVE-2023-28859).
            await client.set("k2", "after")
            assert await client.get("k") == b"before"
            assert await client.get("k2") == b"after"
    finally:
        await backend.aclose()


@pytest.mark.real_redis
async def test_url_client_is_bounded_by_the_deadline_not_a_socket_timeout(
    own_redis: RedisProcess,
) -> None:
    """URL clients have no socket timeout (it costs a task per send); connects and
    pool waits keep theirs, and a handshake with a paused server -- connect()
    succeeds, its first reply never comes -- still ends at the deadline."""
    backend = Backend(own_redis.url, timeout=0.3)
    try:
        assert isinstance(backend.client, Redis)
        pool = backend.client.connection_pool
        assert isinstance(pool, BlockingConnectionPool)
        assert pool.timeout == 0.3
        assert pool.connection_kwargs["socket_connect_timeout"] == 0.3
        assert pool.connection_kwargs["socket_timeout"] is None
        own_redis.pause()
        started = time.monotonic()
        try:
            with pytest.raises(BackendUnavailable):
                async with backend.call() as client:
                    await client.ping()
            elapsed = time.monotonic() - started
        finally:
            own_redis.resume()
        assert elapsed < 3  # generous: "did not hang"
        async with backend.call() as client:
            assert await client.ping()
    finally:
        await backend.aclose()


class SwallowingConnection(Connection):
    """Stands in for redis-py on Python < 3.12, where the ``asyncio.wait_for`` it
    sends with swallows a cancel that arrives as the send completes (CPython
    gh-86296): redis-py then reads on, for as long as its own socket timeout."""

    armed = False
    swallowed = 0

    async def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        if SwallowingConnection.armed:
            try:
                await asyncio.sleep(30)  # a send still in flight at the deadline
            except asyncio.CancelledError:
                SwallowingConnection.armed = False
                SwallowingConnection.swallowed += 1
        await super().send_packed_command(command, check_health)


@pytest.mark.real_redis
async def test_deadline_holds_when_redis_py_swallows_the_cancel(
    own_redis: RedisProcess,
) -> None:
    """A caller's client with long socket timeouts: our deadline still ends the
    call, and no cancel of ours leaks into the caller's task."""
    client = Redis.from_url(
        own_redis.url,
        connection_class=SwallowingConnection,
        driver_info=None,
        socket_timeout=30,
        socket_connect_timeout=30,
    )
    backend = Backend(client, timeout=0.3)
    try:
        await client.set("k", "before")
        own_redis.pause()
        SwallowingConnection.armed = True
        started = time.monotonic()
        try:
            with pytest.raises(BackendUnavailable):
                async with backend.call() as redis:
                    await redis.get("k")
            elapsed = time.monotonic() - started
        finally:
            own_redis.resume()
        assert SwallowingConnection.swallowed == 1
        # Generous bound: this checks "no hang" (redis-py alone would wait 30 s).
        assert elapsed < 3
        task = asyncio.current_task()
        assert task is not None
        assert task.cancelling() == 0
        await asyncio.sleep(0)  # no stray cancel is pending either
        async with backend.call() as redis:  # and the pool is healthy again
            await redis.set("k2", "after")
            assert await redis.get("k") == b"before"
            assert await redis.get("k2") == b"after"
    finally:
        SwallowingConnection.armed = False
        await client.aclose()


async def test_overlapping_calls_each_get_their_whole_deadline() -> None:
    """The calls of one loop share one timer: each still ends at its own start
    plus the timeout, neither sooner nor much later, whoever ended before it."""
    backend = Backend("memory://own-deadlines", timeout=0.3)
    loop = asyncio.get_running_loop()
    took: dict[str, float] = {}

    async def stuck(name: str, delay: float) -> None:
        await asyncio.sleep(delay)
        started = loop.time()
        with pytest.raises(BackendUnavailable):
            async with backend.call():
                await asyncio.sleep(30)
        took[name] = loop.time() - started
        task = asyncio.current_task()
        assert task is not None
        assert task.cancelling() == 0

    async with backend.call():
        pass  # arms the shared timer for a deadline nobody is waiting on any more
    await asyncio.gather(stuck("a", 0.0), stuck("b", 0.1), stuck("c", 0.25))
    assert sorted(took) == ["a", "b", "c"]
    for name, seconds in took.items():
        assert 0.29 <= seconds < 1.5, (name, seconds)
    await backend.aclose()


async def test_a_cancel_from_outside_is_not_a_backend_error() -> None:
    backend = Backend("memory://cancel-from-outside", timeout=5)
    entered = asyncio.Event()

    async def stuck() -> None:
        async with backend.call():
            entered.set()
            await asyncio.sleep(30)

    task = asyncio.ensure_future(stuck())
    await entered.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await backend.aclose()


@pytest.mark.parametrize(
    "error",
    [SlotNotCoveredError("slot 42 is not covered"), RedisClusterException("cluster down")],
)
async def test_cluster_errors_are_backend_unavailable(error: Exception) -> None:
    """redis-py's cluster errors are not RedisErrors; they must not become a 500."""
    backend = Backend("memory://cluster-errors")
    try:
        with pytest.raises(BackendUnavailable) as caught:
            async with backend.call():
                raise error
        assert caught.value.__cause__ is error
    finally:
        await backend.aclose()


class StubSentinel:
    """What SentinelConnectionPool asks of a Sentinel manager: the master's address."""

    def __init__(self, address: tuple[str, int]) -> None:
        self.address = address
        self.asked = 0
        self.hang = False
        self.gave_up = 0

    async def discover_master(self, service_name: str) -> tuple[str, int]:
        self.asked += 1
        if self.hang:
            try:
                await asyncio.sleep(30)
            except asyncio.CancelledError:
                self.gave_up += 1
                raise
        return self.address


@pytest.mark.real_redis
async def test_sentinel_master_is_checked_at_most_every_interval(
    own_redis: RedisProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A failover moves the pool to the new master within one check interval,
    connections in use at that moment included; a Sentinel that does not answer
    costs at most half a deadline and is not an error."""
    other = RedisProcess().start()
    try:
        sentinel = StubSentinel(("127.0.0.1", own_redis.port))
        pool = SentinelConnectionPool(  # type: ignore[no-untyped-call]
            "mymaster", sentinel, socket_timeout=5
        )
        client = Redis(connection_pool=pool)
        backend = Backend(client, timeout=2)
        interval = 0.2
        monkeypatch.setattr(_redis, "SENTINEL_CHECK_INTERVAL", interval)
        loop = asyncio.get_running_loop()
        started = loop.time()
        for _ in range(20):
            async with backend.call() as redis:
                await redis.set("k", "on the first master")
        elapsed = loop.time() - started
        # One check per interval the 20 quick calls spanned (one, unless the machine
        # stalled), plus redis-py's own when it connected; never one per call.
        assert 2 <= sentinel.asked <= 2 + int(elapsed / interval), (sentinel.asked, elapsed)

        entered, release = asyncio.Event(), asyncio.Event()

        async def busy() -> None:
            # Holds a pooled connection to the first master across the failover.
            async with client.client() as pinned:
                await pinned.ping()
                entered.set()
                await release.wait()

        holder = asyncio.ensure_future(busy())
        await entered.wait()
        sentinel.address = ("127.0.0.1", other.port)  # failover
        await asyncio.sleep(0.25)
        async with backend.call() as redis:
            await redis.set("k", "on the new master")
        release.set()
        await holder
        for _ in range(3):  # the pinned connection came back: it must not be reused
            async with backend.call() as redis:
                assert await redis.get("k") == b"on the new master"

        sentinel.hang = True
        await asyncio.sleep(0.25)
        # The check gives up (at half the deadline) and the call goes on: a check
        # that waited for Sentinel would end the call at the deadline instead.
        async with backend.call() as redis:
            assert await redis.get("k") == b"on the new master"
        assert sentinel.gave_up == 1
        await client.aclose(close_connection_pool=True)
    finally:
        other.close()


# -- event loops -----------------------------------------------------------------------


def _run_on_new_loop(backend: Backend, *command: str) -> tuple[Any, Any]:
    """One command (PING by default) through ``backend`` on a loop of its own; the
    client it used, and the reply."""

    async def call() -> tuple[Any, Any]:
        async with backend.call() as client:
            return client, await client.execute_command(*(command or ("PING",)))

    return asyncio.run(call())


@pytest.mark.parametrize("kind", ["redis", "memory"])
def test_url_backend_makes_one_client_per_loop_and_keeps_it(
    request: pytest.FixtureRequest, kind: str, key_prefix: str
) -> None:
    url = request.getfixturevalue("redis_url") if kind == "redis" else f"memory://{key_prefix}"
    backend = Backend(url)

    async def twice() -> tuple[Any, Any]:
        first = backend.client
        async with backend.call() as client:
            await client.set(f"{key_prefix}k", "v")
        return first, client

    first, second = asyncio.run(twice())
    assert first is second  # the same loop keeps its client
    other, reply = _run_on_new_loop(backend)
    assert other is not first
    assert reply
    # Clients of one URL see the same data (memory:// too: one server per name).
    _, value = _run_on_new_loop(backend, "GETDEL", f"{key_prefix}k")
    assert value == b"v"


def test_callers_client_is_used_on_every_loop_as_it_is(redis_url: str) -> None:
    client = Redis.from_url(redis_url)
    backend = Backend(client)

    async def use_then_close() -> Any:
        async with backend.call() as used:
            assert await used.ping()
        await client.aclose()  # the caller closes it on its loop: reusable on the next
        return used

    assert asyncio.run(use_then_close()) is client
    assert asyncio.run(use_then_close()) is client


def test_callers_client_with_connections_of_a_closed_loop_is_a_clear_error(
    redis_url: str,
) -> None:
    """Its connections cannot work on another loop; say so and how to fix it, not
    "Event loop is closed" from deep inside redis-py."""
    client = Redis.from_url(redis_url)
    backend = Backend(client)
    _run_on_new_loop(backend)  # leaves a connection of that (now closed) loop pooled
    with pytest.raises(RuntimeError, match="create it on the loop that uses it"):
        _run_on_new_loop(backend)
    _clients._drop_connections(client)  # tidy up what the test itself left behind
