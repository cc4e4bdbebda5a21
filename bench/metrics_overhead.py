"""What monitoring costs a request: the cache hit path and a read-only session
request, with metrics off and on, in one run.

    python -m bench.metrics_overhead [-n 2000] [--rounds 9] [--out PATH]

"On" is what an app that monitors runs: every Redis call timed into the
latency histogram, and a ``FleetFlusher`` adding the counters into Redis every
second, in the background, during the timed requests. "Off" is the same app
with both switched off, between rounds (two apps differ by more than that: their
connections and memory layout); the library's counters (plain ints) are kept
either way. Rounds rotate which goes first; each row gives the median over
rounds of CPU µs per request (``time.process_time``, the steadiest figure on a
shared machine) and of wall µs per request, and the ratio on/off. A second
"off" round in every cycle (the control) gives the noise floor of the run.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp

from asgi_redis_kit import (
    CacheMiddleware,
    FleetFlusher,
    Metrics,
    NearCache,
    SessionMiddleware,
    cached,
)
from asgi_redis_kit._calls import Latency
from bench._asgi import CookieJar, Lifespan, call
from bench._server import BenchRedis

SECRET = "b" * 32


@cached(ttl=600)
async def page(request: Request) -> Response:
    return PlainTextResponse("x" * 2048)


async def login(request: Request) -> Response:
    request.session["user"] = "ada"
    return PlainTextResponse("ok")


async def read(request: Request) -> Response:
    return PlainTextResponse(str(request.session.get("user")))


@dataclass
class Side:
    app: ASGIApp
    path: str
    metrics: Metrics
    flusher: FleetFlusher
    jar: CookieJar | None = None

    async def switch(self, on: bool) -> None:
        """Metrics on (latency histogram, flusher running) or off, in the same app."""
        for backend in self.metrics.backends:
            backend.calls.latency = Latency() if on else None
        if on:
            self.flusher.start()
        else:
            await self.flusher.stop()


@asynccontextmanager
async def side(
    url: str, kind: str, *, tag: str, near: NearCache | None = None
) -> AsyncIterator[Side]:
    hub = Metrics()
    routes = [Route("/page", page), Route("/login", login), Route("/read", read)]
    if kind == "cache":
        layer = Middleware(
            CacheMiddleware,
            redis=url,
            key_prefix=f"bm:{tag}:",
            metrics=hub,
            near_cache=near or False,
        )
    else:
        layer = Middleware(
            SessionMiddleware, secret_key=SECRET, redis=url, key_prefix=f"bs:{tag}:", metrics=hub
        )
    app = Starlette(routes=routes, middleware=[layer])
    flusher = FleetFlusher(hub, url, instance=tag, key_prefix=f"bf:{tag}:", interval=1.0)
    async with Lifespan(app):
        if kind == "cache":
            warm = await call(app, "/page")
            warm = await call(app, "/page")
            assert warm.header("x-cache") == "HIT", warm.headers
            yield Side(app, "/page", hub, flusher)
        else:
            jar = CookieJar()
            jar.update(await call(app, "/login"))
            assert (await call(app, "/read", headers=jar.header())).body == b"ada"
            yield Side(app, "/read", hub, flusher, jar)
        await flusher.stop()


async def timed(target: Side, n: int) -> tuple[float, float]:
    """CPU and wall µs per request over ``n`` requests."""
    headers = target.jar.header() if target.jar is not None else []
    cpu, wall = time.process_time(), time.perf_counter()
    for _ in range(n):
        reply = await call(target.app, target.path, headers=headers)
        if reply.status != 200:
            raise RuntimeError(f"{target.path} answered {reply.status}")
    return (time.process_time() - cpu) / n * 1e6, (time.perf_counter() - wall) / n * 1e6


async def compare(url: str, kind: str, n: int, rounds: int, near: bool) -> dict[str, float]:
    """One app, metrics switched on and off between rounds (so the figures differ
    by the metrics alone, not by two apps' connections or memory layout); the
    control is a second round of "off" in every cycle."""
    near_cache = NearCache() if near else None
    label = f"{kind}{'-near' if near else ''}"
    results: dict[str, list[tuple[float, float]]] = {"off": [], "on": [], "control": []}
    try:
        async with side(url, kind, tag=label, near=near_cache) as target:
            await target.switch(False)
            await timed(target, n // 4)  # warm up
            plan = ["off", "on", "control"]
            for index in range(rounds):
                for name in plan[index % 3 :] + plan[: index % 3]:
                    await target.switch(name == "on")
                    results[name].append(await timed(target, n))
            await target.switch(False)
    finally:
        if near_cache is not None:
            await near_cache.aclose()
    out: dict[str, float] = {}
    for name, samples in results.items():
        out[f"{name}_cpu"] = statistics.median(s[0] for s in samples)
        out[f"{name}_wall"] = statistics.median(s[1] for s in samples)
    return out


def report(rows: dict[str, dict[str, float]], n: int, rounds: int) -> str:
    lines = [
        "# Metrics overhead",
        "",
        f"{n} requests per side per round, {rounds} rounds, medians; in-process ASGI driver,",
        "own redis-server on loopback. On = Metrics (latency histogram) + FleetFlusher (1 s).",
        "",
        "| request | CPU µs off | CPU µs on | CPU on/off | CPU off/off (control) "
        "| wall µs off | wall µs on | wall on/off |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in rows.items():
        lines.append(
            f"| {name} | {r['off_cpu']:.1f} | {r['on_cpu']:.1f} | "
            f"{r['on_cpu'] / r['off_cpu'] - 1:+.1%} | {r['control_cpu'] / r['off_cpu'] - 1:+.1%} | "
            f"{r['off_wall']:.1f} | {r['on_wall']:.1f} | "
            f"{r['on_wall'] / r['off_wall'] - 1:+.1%} |"
        )
    return "\n".join(lines) + "\n"


async def main_async(url: str, n: int, rounds: int) -> str:
    rows = {
        "cache hit (1 Redis round trip)": await compare(url, "cache", n, rounds, near=False),
        "cache hit, near cache (0 round trips)": await compare(url, "cache", n, rounds, near=True),
        "read-only session (1 round trip)": await compare(url, "session", n, rounds, near=False),
    }
    return report(rows, n, rounds)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.metrics_overhead")
    parser.add_argument("-n", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=31)
    parser.add_argument("--out", type=Path, default=Path("bench/results/metrics.md"))
    args = parser.parse_args(argv)
    with BenchRedis() as server:
        text = asyncio.run(main_async(server.url, args.n, args.rounds))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
