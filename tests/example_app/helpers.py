"""Small helpers for the example-app tests: ASGI lifespan and page scraping."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from html import unescape

from starlette.types import ASGIApp, Message


@asynccontextmanager
async def lifespan(app: ASGIApp) -> AsyncIterator[None]:
    """Run ``app``'s startup and shutdown around the block.

    httpx's ASGITransport sends no lifespan events, and the library closes the
    Redis clients it made on shutdown; without this, tests would leak them.
    """
    inbox: asyncio.Queue[Message] = asyncio.Queue()
    outbox: asyncio.Queue[Message] = asyncio.Queue()

    async def receive() -> Message:
        return await inbox.get()

    async def send(message: Message) -> None:
        await outbox.put(message)

    async def run() -> None:
        scope = {"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}
        await app(scope, receive, send)

    task = asyncio.create_task(run())
    await inbox.put({"type": "lifespan.startup"})
    started = await asyncio.wait_for(outbox.get(), 10)
    if started["type"] != "lifespan.startup.complete":
        raise RuntimeError(f"lifespan startup failed: {started}")
    try:
        yield
    finally:
        await inbox.put({"type": "lifespan.shutdown"})
        stopped = await asyncio.wait_for(outbox.get(), 10)
        await asyncio.wait_for(task, 10)
        if stopped["type"] != "lifespan.shutdown.complete":
            raise RuntimeError(f"lifespan shutdown failed: {stopped}")


def by_id(html: str, element_id: str) -> str | None:
    """Text of the first element with ``id="element_id"`` (no nesting needed here)."""
    match = re.search(rf'id="{re.escape(element_id)}"[^>]*>([^<]*)<', html)
    return unescape(match.group(1)) if match else None


def visits(html: str) -> int:
    value = by_id(html, "visits")
    assert value is not None, f"no visit counter on the page:\n{html[:2000]}"
    return int(value)
