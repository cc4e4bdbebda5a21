"""Issue 2 item 2: concurrent requests sharing one cookie lose nothing.

All requests are held at a barrier after their session loaded and before they
save, so every one of them overlaps every other: the worst case, every run.

Measured with the same barrier, a whole-blob last-writer-wins store (what
Starlette's cookie session and starsessions do: load the dict, save the dict)
keeps 1 of the 50 keys (49 lost; ``test_whole_blob_control_loses_writes`` measures
it on every run), and a read-modify-write counter under the same barrier ends at 1
instead of 100.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import httpx
import orjson
import pytest
from redis.asyncio import Redis
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from asgi_redis_kit import Session, SessionMiddleware

from .conftest import SECRET

pytestmark = pytest.mark.real_redis

N_KEYS = 50
N_INCR = 100


def barrier_app(redis: Redis, key_prefix: str, barrier: asyncio.Barrier) -> Starlette:
    async def start(request: Request) -> Response:
        request.session["started"] = True
        return PlainTextResponse("ok")

    async def set_key(request: Request) -> Response:
        session = request.session
        await barrier.wait()
        session[request.path_params["key"]] = True
        return PlainTextResponse("ok")

    async def incr(request: Request) -> Response:
        await barrier.wait()
        return PlainTextResponse(str(await Session.of(request).incr("n")))

    async def read(request: Request) -> Response:
        return PlainTextResponse(orjson.dumps(dict(request.session)))

    return Starlette(
        routes=[
            Route("/start", start),
            Route("/set/{key}", set_key),
            Route("/incr", incr),
            Route("/read", read),
        ],
        middleware=[
            Middleware(SessionMiddleware, secret_key=SECRET, redis=redis, key_prefix=key_prefix)
        ],
    )


async def test_fifty_concurrent_writers_keep_all_fifty_keys(
    real_redis: Redis, key_prefix: str, make_client: Callable[..., httpx.AsyncClient]
) -> None:
    client = make_client(barrier_app(real_redis, key_prefix, asyncio.Barrier(N_KEYS)))
    await client.get("/start")
    responses = await asyncio.gather(*(client.get(f"/set/k{i}") for i in range(N_KEYS)))
    assert {r.status_code for r in responses} == {200}
    data = orjson.loads((await client.get("/read")).content)
    assert sorted(k for k in data if k.startswith("k")) == sorted(f"k{i}" for i in range(N_KEYS))


async def test_hundred_concurrent_incr_count_exactly_hundred(
    real_redis: Redis, key_prefix: str, make_client: Callable[..., httpx.AsyncClient]
) -> None:
    client = make_client(barrier_app(real_redis, key_prefix, asyncio.Barrier(N_INCR)))
    await client.get("/start")
    responses = await asyncio.gather(*(client.get("/incr") for _ in range(N_INCR)))
    # Every request saw its own value: the increments were serialised by Redis.
    assert sorted(int(r.text) for r in responses) == list(range(1, N_INCR + 1))
    assert orjson.loads((await client.get("/read")).content)["n"] == N_INCR


async def test_whole_blob_control_loses_writes(real_redis: Redis, key_prefix: str) -> None:
    """The same overlap with load-whole-dict / save-whole-dict, as the peers do.

    If this ever stopped losing writes, the two tests above would prove nothing.
    """
    key = f"{key_prefix}blob"
    await real_redis.set(key, orjson.dumps({}))
    barrier = asyncio.Barrier(N_KEYS)

    async def request(i: int) -> None:
        raw = await real_redis.get(key)
        assert raw is not None
        session = orjson.loads(raw)
        await barrier.wait()
        session[f"k{i}"] = True
        await real_redis.set(key, orjson.dumps(session))

    await asyncio.gather(*(request(i) for i in range(N_KEYS)))
    raw = await real_redis.get(key)
    assert raw is not None
    kept = len(orjson.loads(raw))
    assert kept == 1  # 49 of 50 lost
