"""The exception a memoized leader raised, as its waiters in this process see it.

They share the one exception object (a copy of an arbitrary exception cannot be
made reliably). Each raise must start from the traceback the function left, as
``asyncio.Future.result()`` does: raising it as it is would chain every waiter's
frames onto it, so a burst of N waiters would leave a traceback N calls long,
holding each waiter's frames (and their locals) alive with the exception."""

from __future__ import annotations

import asyncio
import traceback

import pytest

from asgi_redis_kit import Cache

pytestmark = [pytest.mark.real_redis, pytest.mark.timeout(30)]


async def burst(cache: Cache, waiters: int) -> list[BaseException]:
    go = asyncio.Event()

    @cache.memoize(ttl=60, key=f"failing-{waiters}")
    async def failing() -> int:
        await go.wait()
        raise LookupError("upstream down")

    tasks = [asyncio.create_task(failing()) for _ in range(waiters)]
    await asyncio.sleep(0.1)  # all of them wait on the first
    go.set()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert all(isinstance(r, LookupError) for r in results), results
    return [r for r in results if isinstance(r, BaseException)]


def depth(exc: BaseException) -> int:
    return len(traceback.extract_tb(exc.__traceback__))


async def test_waiters_do_not_chain_their_frames_onto_the_shared_exception(
    cache: Cache,
) -> None:
    few = await burst(cache, 2)
    many = await burst(cache, 50)
    # Whichever raise came last: as deep as one call's, not fifty's.
    assert depth(many[-1]) <= depth(few[-1]) + 2, (depth(few[-1]), depth(many[-1]))
    assert "failing" in traceback.format_exception(many[-1])[-2]  # the function's own frame
