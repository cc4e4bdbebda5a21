"""Trackers belong to the loop that made them, and a finished loop leaks nothing."""

from __future__ import annotations

import asyncio
import gc
import sys
import threading
import time
import warnings

import pytest
from redis.asyncio import Redis

from asgi_redis_kit.near import NearCache
from tests.near.conftest import HEARTBEAT, HEARTBEAT_TIMEOUT, load, until, usable

pytestmark = pytest.mark.real_redis


def no_resource_warnings() -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gc.collect()
    leaks = [w for w in caught if issubclass(w.category, ResourceWarning)]
    assert not leaks, [str(w.message) for w in leaks]


async def use(near: NearCache, url: str, key: str) -> None:
    client = Redis.from_url(url, socket_timeout=5)
    try:
        view = await usable(near.view(client, key.rsplit(":", 1)[0]))
        await client.set(key, b"v")
        assert await load(view, client, key) == b"v"
        await client.set(key, b"w")
        await until(lambda: view.get(key) is None, 5)
    finally:
        await client.aclose()


def test_each_loop_tracks_on_its_own_and_asyncio_run_closes_it(
    redis_url: str, key_prefix: str
) -> None:
    near = NearCache(heartbeat=HEARTBEAT, heartbeat_timeout=HEARTBEAT_TIMEOUT)
    key = f"{key_prefix}loops:k"
    for _ in range(3):
        asyncio.run(use(near, redis_url, key))
        # asyncio.run cancelled the tracker; it closed its connection on the way out.
        assert set(near.stats.tracking.values()) == {"closed"}
        assert near.stats.entries == 0
        no_resource_warnings()


def test_a_loop_closed_under_a_running_tracker_has_its_socket_closed(
    redis_url: str, key_prefix: str
) -> None:
    near = NearCache(heartbeat=HEARTBEAT, heartbeat_timeout=HEARTBEAT_TIMEOUT)
    key = f"{key_prefix}dead:k"
    loop = asyncio.new_event_loop()
    client = Redis.from_url(redis_url, socket_timeout=5)

    async def track() -> None:
        await usable(near.view(client, f"{key_prefix}dead"))
        await client.aclose()

    loop.run_until_complete(track())
    assert set(near.stats.tracking.values()) == {"tracking"}
    loop.close()  # the tracker task is left pending, its socket open
    # The next view (on any loop) drops the dead loop's domain and its socket.
    asyncio.run(use(near, redis_url, key))
    with warnings.catch_warnings():
        # The abandoned task itself is reported by asyncio's logger, not a warning.
        warnings.simplefilter("ignore", RuntimeWarning)
        no_resource_warnings()


async def test_aclose_stops_the_trackers_of_this_loop_and_a_new_view_starts_again(
    redis_url: str, key_prefix: str
) -> None:
    near = NearCache(heartbeat=HEARTBEAT, heartbeat_timeout=HEARTBEAT_TIMEOUT)
    client = Redis.from_url(redis_url, socket_timeout=5)
    try:
        view = await usable(near.view(client, key_prefix))
        await near.aclose()
        assert not view.usable
        assert near.stats.tracking == {}
        again = await usable(near.view(client, key_prefix))
        assert again is not view
        await near.aclose()
    finally:
        await client.aclose()


def test_loops_in_two_threads_share_the_memory_bound_safely(
    redis_url: str, key_prefix: str
) -> None:
    """One NearCache, one loop per thread: puts that evict each other's entries,
    gets and flushes race on the one shared LRU. Nothing may raise and the byte
    count must stay the sum of what is kept."""
    near = NearCache(
        max_bytes=20_000,
        max_entry_bytes=1_000,
        heartbeat=HEARTBEAT,
        heartbeat_timeout=HEARTBEAT_TIMEOUT,
    )
    errors: list[BaseException] = []
    start = threading.Barrier(2)

    async def hammer(db: int) -> None:
        client = Redis.from_url(redis_url.rsplit("/", 1)[0] + f"/{db}", socket_timeout=5)
        try:
            view = await usable(near.view(client, key_prefix))
            start.wait(5)
            deadline = time.monotonic() + 1.5
            i = 0
            while time.monotonic() < deadline:
                i += 1
                key = f"{key_prefix}{i % 300}"
                ticket = view.begin([key])
                view.put(ticket, key, b"v", -1, 500)
                view.end(ticket)
                view.get(f"{key_prefix}{(i * 7) % 300}")
                if i % 500 == 0:
                    view.invalidate([key])
                    await asyncio.sleep(0)
        finally:
            await client.aclose()

    def run(db: int) -> None:
        try:
            asyncio.run(hammer(db))
        except BaseException as exc:
            errors.append(exc)

    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible
    try:
        threads = [threading.Thread(target=run, args=(db,)) for db in (0, 1)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
    finally:
        sys.setswitchinterval(old)
    assert errors == []
    kept = near._store._entries.values()
    assert (near.stats.entries, near.stats.bytes) == (len(kept), sum(e.size for e in kept))
    assert near.stats.bytes <= near.max_bytes
