"""``python -m bench lag``: how long a near cache serves a value another instance
has already overwritten (the invalidation lag).

Two ``NearCache`` instances (two app instances' worth, each with its own tracking
connection) on the bench's own ``redis-server``, run twice: both in one process and
event loop, then B in a process of its own (``time.perf_counter`` is the system-wide
monotonic clock on Linux, so the two processes' timestamps compare). Per trial: B
reads a key through its view (begin, GET + PTTL, put, end) so it holds a local copy;
A overwrites the key with SET; then B's ``get(key)`` is polled, yielding to the loop
between polls, until it returns ``None``. The lag is measured from just before A
sends SET, and also from when A has SET's reply (the window in which a request on B
could still be answered the old value after A's write was acknowledged). Every wait
is bounded; nothing leaves 127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import multiprocessing
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from redis.asyncio import Redis

from asgi_redis_kit.near import NearCache, NearView

from ._report import load
from ._server import BenchRedis, redis_server_version

RESULTS = Path(__file__).parent / "results"
PREFIX = "lag:"
GIVE_UP = 2.0  # seconds: a trial still stale after this is counted as lost
VALUE = b"x" * 300


@dataclass
class Lags:
    how: str
    from_send: list[float] = field(default_factory=list)  # µs
    from_ack: list[float] = field(default_factory=list)  # µs, <= 0: gone before the ack
    lost: int = 0  # still held after GIVE_UP
    not_held: int = 0  # B could not keep its copy (the trial was skipped)


async def _usable(*views: NearView) -> None:
    # Polled: a view offers no event for "tracking confirmed".
    deadline = time.monotonic() + 10
    while not all(v.usable for v in views):
        if time.monotonic() > deadline:
            raise RuntimeError("tracking was not confirmed within 10 s")
        await asyncio.sleep(0.01)


async def _hold(view: NearView, client: Redis, key: str) -> bool:
    """B reads ``key`` the way the library does and keeps it; True when it is held."""
    ticket = view.begin([key])
    try:
        async with client.pipeline(transaction=False) as pipe:
            pipe.get(key)
            pipe.pttl(key)
            value, pttl = await pipe.execute()
        view.put(ticket, key, value, int(pttl), len(value or b""))
    finally:
        view.end(ticket)
    return view.get(key) is not None


async def same_process(url: str, trials: int, keys: int) -> Lags:
    near_a, near_b = NearCache(), NearCache()
    client_a, client_b = Redis.from_url(url), Redis.from_url(url)
    lags = Lags("one process, one event loop")
    try:
        view_a = near_a.view(client_a, PREFIX)
        view_b = near_b.view(client_b, PREFIX)
        await _usable(view_a, view_b)
        for i in range(trials):
            key = f"{PREFIX}{i % keys}"
            if not await _hold(view_b, client_b, key):
                lags.not_held += 1
                continue
            # Let B's tracker drain anything still queued (its own read caused none,
            # but an earlier trial's invalidation may be in flight for another key).
            await asyncio.sleep(0)
            sent = time.perf_counter()
            await client_a.set(key, VALUE, px=600_000)
            view_a.invalidate([key])  # what the library does after its own write
            acked = time.perf_counter()
            while view_b.get(key) is not None:
                if time.perf_counter() - sent > GIVE_UP:
                    lags.lost += 1
                    break
                await asyncio.sleep(0)
            else:
                gone = time.perf_counter()
                lags.from_send.append((gone - sent) * 1e6)
                lags.from_ack.append((gone - acked) * 1e6)
    finally:
        await near_a.aclose()
        await near_b.aclose()
        await client_a.aclose()
        await client_b.aclose()
    return lags


def _recv(conn: Connection, timeout: float = 10.0) -> Any:
    if not conn.poll(timeout):
        raise TimeoutError(f"the other process said nothing for {timeout:g} s")
    return conn.recv()


def _child(url: str, conn: Connection) -> None:
    asyncio.run(_instance_b(url, conn))


async def _instance_b(url: str, conn: Connection) -> None:
    """B in its own process: on ("hold", key) read and keep the key, answer
    ("held", ok), then poll until the copy is gone and answer ("gone", time)."""
    loop = asyncio.get_running_loop()
    near, client = NearCache(), Redis.from_url(url)
    try:
        view = near.view(client, PREFIX)
        await _usable(view)
        conn.send(("ready",))
        while True:
            message = await loop.run_in_executor(None, _recv, conn, 60.0)
            if message[0] != "hold":
                return
            key = message[1]
            held = await _hold(view, client, key)
            conn.send(("held", held))
            if not held:
                continue
            gone: float | None = None
            deadline = time.perf_counter() + GIVE_UP
            while time.perf_counter() < deadline:
                if view.get(key) is None:
                    gone = time.perf_counter()
                    break
                await asyncio.sleep(0)
            conn.send(("gone", gone))
    finally:
        await near.aclose()
        await client.aclose()


async def two_processes(url: str, trials: int, keys: int) -> Lags:
    loop = asyncio.get_running_loop()
    ctx = multiprocessing.get_context("spawn")
    here, there = ctx.Pipe()
    proc = ctx.Process(target=_child, args=(url, there), daemon=True)
    near_a, client_a = NearCache(), Redis.from_url(url)
    lags = Lags("B in a process of its own")

    async def ask(*message: object) -> Any:
        if message:
            here.send(message)
        return await loop.run_in_executor(None, _recv, here, 10.0)

    proc.start()
    try:
        view_a = near_a.view(client_a, PREFIX)
        await _usable(view_a)
        if (await ask())[0] != "ready":
            raise RuntimeError("B did not start")
        for i in range(trials):
            key = f"{PREFIX}{i % keys}"
            _, held = await ask("hold", key)
            if not held:
                lags.not_held += 1
                continue
            sent = time.perf_counter()
            await client_a.set(key, VALUE, px=600_000)
            view_a.invalidate([key])
            acked = time.perf_counter()
            _, gone = await ask()
            if gone is None:
                lags.lost += 1
            else:
                lags.from_send.append((gone - sent) * 1e6)
                lags.from_ack.append((gone - acked) * 1e6)
    finally:
        with contextlib.suppress(Exception):
            here.send(("stop",))
        proc.join(5)
        if proc.is_alive():
            proc.kill()
            proc.join(5)
        await near_a.aclose()
        await client_a.aclose()
    return lags


async def run(url: str, trials: int, keys: int) -> list[Lags]:
    admin = Redis.from_url(url)
    try:
        for i in range(keys):
            await admin.set(f"{PREFIX}{i}", VALUE, px=600_000)
    finally:
        await admin.aclose()
    return [await same_process(url, trials, keys), await two_processes(url, trials, keys)]


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))]


def render(runs: list[Lags], trials: int, keys: int) -> str:
    nproc = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        "# Near cache: invalidation lag between two instances",
        "",
        f"- Date: {now}; nproc={nproc} (load average {load()}); "
        f"Python {platform.python_version()}; "
        f"redis-server {redis_server_version()} (the bench's own, loopback)",
        f"- `python -m bench lag` (bench/lag.py): {trials:,} trials per setup over {keys} "
        "keys; two NearCache instances with their own clients and tracking connections. "
        "B reads a key (begin, GET + PTTL, put, end), A overwrites it with SET, B polls "
        "`get(key)` until it is None.",
        "",
        "| setup | measured from | trials | p50 µs | p90 µs | p99 µs | max µs "
        f"| gone before SET's reply | still stale after {GIVE_UP:g} s | skipped |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for lags in runs:
        for name, values in (
            ("A sends SET", lags.from_send),
            ("A has SET's reply", lags.from_ack),
        ):
            first = name == "A sends SET"
            lost = str(lags.lost) if first else ""
            skipped = str(lags.not_held) if first else ""
            if not values:
                lines.append(
                    f"| {lags.how} | {name} | 0 | - | - | - | - | - | {lost} | {skipped} |"
                )
                continue
            early = "" if first else f"{sum(v <= 0 for v in values) / len(values):.0%}"
            lines.append(
                f"| {lags.how} | {name} | {len(values):,} | {statistics.median(values):,.0f} "
                f"| {_pct(values, 0.9):,.0f} | {_pct(values, 0.99):,.0f} | {max(values):,.0f} "
                f"| {early} | {lost} | {skipped} |"
            )
    lines += [
        "",
        "In one process B's tracker and its polling share the event loop with A, as two "
        "views of one app would; in two processes B's loop runs on its own. A negative "
        "value from the reply (counted in `gone before SET's reply`) means B had dropped "
        "its copy before A's client had parsed the reply. Loopback on a small shared "
        "machine: over a network add the one-way latency from Redis to B.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench lag",
        description="Invalidation lag between two NearCache instances (bench/lag.py).",
    )
    p.add_argument("--trials", type=int, default=2_000, help="overwrites measured (2000)")
    p.add_argument("--keys", type=int, default=100, help="distinct keys cycled over (100)")
    p.add_argument("--out", type=Path, default=RESULTS / "lag.md", help="markdown output")
    args = p.parse_args(argv)
    if not (1 <= args.trials <= 100_000 and 1 <= args.keys <= 10_000):
        p.error("need 1 <= trials <= 100000 and 1 <= keys <= 10000")
    try:
        with BenchRedis() as server:
            runs = asyncio.run(asyncio.wait_for(run(server.url, args.trials, args.keys), 600))
    except KeyboardInterrupt:
        print("lag: interrupted; redis-server stopped, nothing written", file=sys.stderr)
        return 130
    text = render(runs, args.trials, args.keys)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)
    print(f"lag: wrote {args.out}", file=sys.stderr)
    return 0
