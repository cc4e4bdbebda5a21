"""One Cache shared by CacheMiddleware and @cache.memoize: invalidate_tags
drops a cached page and memoized data with the same tag."""

from __future__ import annotations

import httpx
from redis.asyncio import Redis
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from asgi_redis_kit.cache import Cache, CacheMiddleware, cached


async def test_one_tag_drops_pages_and_data(real_redis: Redis, key_prefix: str) -> None:
    cache = Cache(real_redis, key_prefix=key_prefix)
    runs = {"page": 0, "data": 0}

    @cache.memoize(ttl=60, tags=["user:{user_id}"])
    async def profile(user_id: int) -> int:
        runs["data"] += 1
        return runs["data"]

    @cached(ttl=60, tags=["user:42"])
    async def page(request: Request) -> PlainTextResponse:
        runs["page"] += 1
        return PlainTextResponse(f"page {runs['page']}")

    app = CacheMiddleware(Starlette(routes=[Route("/u", page)]), cache=cache)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
        assert (await client.get("/u")).text == "page 1"
        assert (await client.get("/u")).text == "page 1"
        assert await profile(42) == 1
        assert await profile(42) == 1
        await cache.invalidate_tags("user:42")
        assert (await client.get("/u")).text == "page 2"
        assert await profile(42) == 2
