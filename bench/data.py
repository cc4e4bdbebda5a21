"""``python -m bench data``: the data cache (``Cache.get`` and ``@cache.memoize``)
against cashews ``@cache``/``cache.get`` and aiocache ``@cached``/``RedisCache.get``,
in one process against the bench's own ``redis-server``.

Per operation: memoized call hit, memoized call miss + store (unique arguments per
call) and plain get hit. Every round times ``-n`` calls of each tool in a row, the
starting tool rotating from round to round; a row is the median over rounds of the
mean wall-clock and CPU µs per call. Redis commands (``INFO commandstats`` deltas)
and round trips (socket writes) per operation come from a separate counted pass
(``_traffic.py``), never from timed rounds. A correctness pass counts the function's
calls: a hit must not run it, a miss must run it once, and ``f(1)`` then ``f(x=1)``
shows whether a tool shares one entry for the two spellings of a call.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import platform
import statistics
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from redis.asyncio import Redis

from ._server import BenchRedis, redis_server_version
from ._targets import DATA_AIOCACHE as AIOCACHE
from ._targets import DATA_CASHEWS as CASHEWS
from ._targets import DATA_TARGETS, NEAR, OURS
from ._traffic import Traffic

OUT = Path(__file__).parent / "results" / "data-cache.md"
TTL = 600
PAYLOAD = {"id": 0, "name": "widget", "tags": ["a", "b"], "price": 9.5}

UNCACHED = "uncached call"

Op = Callable[[int], Awaitable[Any]]


@dataclass
class Tool:
    name: str
    hit: Op  # the memoized function, called with one warmed argument
    miss: Op | None  # the memoized function, called with fresh arguments
    get: Op | None  # a plain get of a stored key
    calls: list[int]  # how often the function body ran
    spellings: Callable[[], Awaitable[int]] | None = None  # f(1) then f(x=1): body runs
    closers: list[Callable[[], Awaitable[Any]]] = field(default_factory=list)


def _body(calls: list[int]) -> Callable[[int], Awaitable[dict[str, Any]]]:
    async def load(x: int) -> dict[str, Any]:
        calls[0] += 1
        return {**PAYLOAD, "id": x}

    return load


async def _ours(url: str, prefix: str, near: bool) -> Tool:
    from asgi_redis_kit import Cache, NearCache

    client: Redis = Redis.from_url(url)
    cache = Cache(redis=client, key_prefix=prefix, near_cache=NearCache() if near else False)
    calls = [0]
    body = _body(calls)

    @cache.memoize(ttl=TTL)
    async def load(x: int) -> dict[str, Any]:
        return await body(x)

    await cache.set("plain", PAYLOAD, ttl=TTL)

    async def spellings() -> int:
        before = calls[0]
        await load(-1)
        await load(x=-1)
        return calls[0] - before

    return Tool(
        NEAR if near else OURS,
        hit=load,
        miss=load,
        get=lambda _: cache.get("plain"),
        calls=calls,
        spellings=spellings,
        closers=[cache.aclose, client.aclose],
    )


async def _cashews(url: str) -> Tool:
    from cashews import Cache

    cache = Cache()
    cache.setup(url)  # its README: cache.setup("redis://..."), then @cache(ttl=...)
    calls = [0]
    body = _body(calls)

    @cache(ttl=TTL)  # type: ignore[misc]
    async def load(x: int) -> dict[str, Any]:
        return await body(x)

    await cache.set("plain", PAYLOAD, expire=TTL)

    async def spellings() -> int:
        before = calls[0]
        await load(-1)
        await load(x=-1)
        return calls[0] - before

    return Tool(
        CASHEWS,
        hit=load,
        miss=load,
        get=lambda _: cache.get("plain"),
        calls=calls,
        spellings=spellings,
        closers=[cache.close],
    )


async def _aiocache(url: str) -> Tool:
    from aiocache import Cache, cached
    from aiocache.serializers import PickleSerializer

    parsed = urlparse(url)
    options: dict[str, Any] = {
        "endpoint": parsed.hostname,
        "port": parsed.port,
        "namespace": f"aio{uuid.uuid4().hex[:6]}",
        "serializer": PickleSerializer(),
    }
    calls = [0]
    body = _body(calls)

    # Its README: @cached(ttl=..., cache=Cache.REDIS, ...) on a coroutine.
    @cached(ttl=TTL, cache=Cache.REDIS, **options)  # type: ignore[misc]
    async def load(x: int) -> dict[str, Any]:
        return await body(x)

    plain = Cache(Cache.REDIS, **options)
    await plain.set("plain", PAYLOAD, ttl=TTL)

    async def spellings() -> int:
        before = calls[0]
        await load(-1)
        await load(x=-1)
        return calls[0] - before

    return Tool(
        AIOCACHE,
        hit=load,
        miss=load,
        get=lambda _: plain.get("plain"),
        calls=calls,
        spellings=spellings,
        closers=[plain.close, load.cache.close],
    )


async def _uncached() -> Tool:
    calls = [0]
    return Tool(UNCACHED, hit=_body(calls), miss=None, get=None, calls=calls)


@dataclass
class Row:
    op: str
    tool: str
    us: float  # median over rounds of wall-clock µs per call
    cpu: float  # the same, CPU µs (time.process_time)
    cmds: float | None = None
    trips: float | None = None
    check: str = "ok"


async def _time(op: Op, args: Callable[[], int], n: int) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(n):
        await op(args())
    return (time.perf_counter() - wall) / n * 1e6, (time.process_time() - cpu) / n * 1e6


async def _count(admin: Redis, op: Op, args: Callable[[], int], n: int) -> tuple[float, float]:
    async with Traffic(admin) as t:
        for _ in range(n):
            await op(args())
    return t.total / n, t.round_trips / n


async def _measure(
    kind: str,
    tools: list[Tool],
    admin: Redis,
    n: int,
    rounds: int,
    fresh: itertools.count[int],
) -> list[Row]:
    ops = [(t, getattr(t, kind)) for t in tools if getattr(t, kind) is not None]
    hit_args = lambda: 1  # noqa: E731
    args = hit_args if kind != "miss" else (lambda: next(fresh))
    checks: dict[str, str] = {}
    for tool, op in ops:
        await op(1)  # warm: store f(1), connect, learn the key
        await op(1)
        before = tool.calls[0]
        for _ in range(20):
            await op(args())
        ran = tool.calls[0] - before
        want = 20 if kind == "miss" or tool.name == UNCACHED else 0
        if kind != "get" and ran != want:
            checks[tool.name] = f"WRONG: body ran {ran} times in 20 calls, expected {want}"
        await _time(op, args, max(1, n // 5))  # warm-up, not kept
    samples: dict[str, list[tuple[float, float]]] = {t.name: [] for t, _ in ops}
    # A miss costs a store (and, near, a tracking set-up): fewer calls keep the run short.
    per_round = max(1, n // 5) if kind == "miss" else n
    for r in range(rounds):
        for tool, op in ops[r % len(ops) :] + ops[: r % len(ops)]:
            samples[tool.name].append(await _time(op, args, per_round))
    rows = []
    for tool, op in ops:
        cmds, trips = (None, None)
        if tool.name != UNCACHED:
            cmds, trips = await _count(admin, op, args, 50)
        rows.append(
            Row(
                kind,
                tool.name,
                statistics.median(s[0] for s in samples[tool.name]),
                statistics.median(s[1] for s in samples[tool.name]),
                cmds,
                trips,
                checks.get(tool.name, "ok"),
            )
        )
    return rows


@dataclass
class Target:
    label: str
    op: str
    tool: str
    peer: str
    limit: float

    def ratio(self, rows: list[Row]) -> float | None:
        by = {(r.op, r.tool): r for r in rows if r.check == "ok"}
        a, b = by.get((self.op, self.tool)), by.get((self.op, self.peer))
        return None if a is None or b is None else a.us / b.us


def targets() -> list[Target]:
    """Issue 9's targets: a memoized hit <= 0.5x the peers' without the near cache,
    <= 0.1x with it (time per call, same run)."""
    return [
        Target(f"{op}, {tool} / {peer}", op, tool, peer, limit)
        for op, tool, peer, limit in DATA_TARGETS
    ]


OPS = {
    "hit": "memoized call, HIT",
    "miss": "memoized call, MISS + store (unique args)",
    "get": "plain get, hit",
}


def _render(rows: list[Row], spell: dict[str, int], settings: str, elapsed: float) -> str:
    out = [
        "# Data cache: asgi_redis_kit vs cashews and aiocache",
        "",
        f"- Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; machine: "
        f"{platform.machine()} {platform.system()}, {_cores()} cores, Python "
        f"{platform.python_version()}, redis-server {redis_server_version()} (the bench's "
        "own, loopback)",
        f"- Command: `./dev bench data` (`python -m bench data`); {settings}; "
        f"run took {elapsed:.0f}s",
        f"- Versions: {_versions()}",
        "- µs/op: median over rounds of each round's mean (wall clock, concurrency 1); "
        "CPU µs/op: the same in this process's CPU time (steadier on a shared machine). "
        "Ratio: µs/op of the row / µs/op of the same operation's peer, same run. "
        "cmds/op: `INFO commandstats` delta over 50 counted calls (PING heartbeats left "
        "out); trips/op: socket writes of redis-py's asyncio connections over the same calls.",
        "",
        "| operation | tool | µs/op | CPU µs/op | vs cashews | vs aiocache | cmds/op | "
        "round trips/op | check |",
        "|---|---|--:|--:|--:|--:|--:|--:|---|",
    ]
    by = {(r.op, r.tool): r for r in rows}
    for r in rows:
        ratios = []
        for peer in (CASHEWS, AIOCACHE):
            p = by.get((r.op, peer))
            ratios.append("" if p is None or r.tool == peer else f"{r.us / p.us:.2f}x")
        cmds = "" if r.cmds is None else f"{r.cmds:.2f}"
        trips = "" if r.trips is None else f"{r.trips:.2f}"
        out.append(
            f"| {OPS[r.op]} | {r.tool} | {r.us:.1f} | {r.cpu:.1f} | {ratios[0]} | "
            f"{ratios[1]} | {cmds} | {trips} | {r.check} |"
        )
    out += ["", "## Targets (issue 9)", "", "| target | limit | measured | met |"]
    out += ["|---|--:|--:|---|"]
    for t in targets():
        m = t.ratio(rows)
        met = "not measured" if m is None else ("yes" if m <= t.limit else "**no**")
        out.append(f"| {t.label} | <= {t.limit}x | {'' if m is None else f'{m:.3f}x'} | {met} |")
    out += [
        "",
        "## Correctness: one entry for `f(1)` and `f(x=1)`?",
        "",
        "Body runs for a cold `f(-1)` then `f(x=-1)`: 1 means one shared entry, 2 means two.",
        "",
    ]
    for name, ran in spell.items():
        out.append(f"- {name}: {ran} ({'shared' if ran == 1 else 'two separate entries'})")
    return "\n".join(out)


def _cores() -> int:
    import os

    return os.cpu_count() or 0


def _versions() -> str:
    from importlib.metadata import version

    return ", ".join(f"{p} {version(p)}" for p in ("cashews", "aiocache", "redis"))


async def _run(url: str, n: int, rounds: int) -> tuple[list[Row], dict[str, int]]:
    admin: Redis = Redis.from_url(url)
    prefix = f"ark:data:{uuid.uuid4().hex[:6]}:"
    tools = [
        await _ours(url, prefix + "p:", near=False),
        await _ours(url, prefix + "n:", near=True),
        await _cashews(url),
        await _aiocache(url),
        await _uncached(),
    ]
    fresh = itertools.count(1_000_000)
    try:
        spell = {t.name: await t.spellings() for t in tools if t.spellings is not None}
        rows = []
        for kind in ("hit", "miss", "get"):
            started = time.monotonic()
            rows += await _measure(kind, tools, admin, n, rounds, fresh)
            print(f"bench data: {kind} done in {time.monotonic() - started:.0f}s", file=sys.stderr)
        return rows, spell
    finally:
        for tool in tools:
            for close in tool.closers:
                await close()
        await admin.aclose()


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m bench data", description=__doc__)
    p.add_argument("-n", type=int, default=2000, help="calls per tool per round")
    p.add_argument("--rounds", type=int, default=9, help="rounds per operation")
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args(argv)
    started = time.monotonic()
    with BenchRedis() as server:
        rows, spell = asyncio.run(_run(server.url, args.n, args.rounds))
    settings = (
        f"{args.rounds} rounds x {args.n} calls per tool per operation ({args.n // 5} for "
        "a miss), tools interleaved, starting tool rotated"
    )
    text = _render(rows, spell, settings, time.monotonic() - started)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text + "\n")
    print(text)
    print(f"\nbench data: wrote {args.out}", file=sys.stderr)
    return 0
