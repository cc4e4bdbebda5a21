"""Timing and counting for one scenario.

Every tool of a scenario runs in the same process against the same Redis server.
Rounds interleave the tools round-robin (the starting tool rotates each round) so
slow drifts of a noisy machine spread over all tools instead of landing on one.
"""

from __future__ import annotations

import asyncio
import gc
import statistics
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from redis.asyncio import Redis

from ._asgi import Reply
from ._traffic import HEARTBEAT, Traffic, commandstats

Send = Callable[[int], Awaitable[Reply]]
Check = Callable[[Reply], str | None]


@dataclass
class Case:
    """One tool in one scenario. ``send(i)`` performs request number ``i``; ``check``
    returns an error text when a reply is not what the scenario expects (a hit that
    was a miss, a 200 that should be a 304), so wrong work is never timed as right."""

    tool: str
    send: Send
    check: Check | None = None
    ours: bool = False
    reference: bool = False
    note: str = ""
    # At concurrency > 1: one send per concurrent client (its own cookie jar).
    workers: list[Send] | None = None


@dataclass
class Row:
    tool: str
    ours: bool = False
    reference: bool = False
    median_us: float | None = None
    p95_us: float | None = None
    rps: float | None = None
    cpu_us: float | None = None
    cmds: float | None = None
    sent: float | None = None
    round_trips: float | None = None
    # Server-side commands per request over every timed request (INFO commandstats
    # around each timed round, heartbeat PINGs left out): the steady state.
    timed_cmds: float | None = None
    breakdown: str = ""
    correctness: str = ""
    note: str = ""
    error: str = ""
    latencies: list[float] = field(default_factory=list, repr=False)


@dataclass
class Scenario:
    key: str
    title: str
    what: str
    rows: list[Row]


@dataclass
class Plan:
    rounds: int
    per_round: int
    warmup: int = 30
    counted: int = 20


def _breakdown(commands: Counter[str], n: int) -> str:
    parts = []
    for name, calls in sorted(commands.items(), key=lambda kv: (-kv[1], kv[0])):
        per = calls / n
        parts.append(f"{name} {per:g}" if per != 1 else name)
    return ", ".join(parts) if parts else "-"


async def _checked(case: Case, i: int) -> str | None:
    reply = await case.send(i)
    if case.check is not None:
        return case.check(reply)
    if reply.status >= 400:
        return f"HTTP {reply.status}"
    return None


async def _timed_round(case: Case, per_round: int, index: list[int], lat: list[float]) -> None:
    async def client(send: Send, count: int) -> None:
        for _ in range(count):
            index[0] += 1
            t0 = time.perf_counter_ns()
            await send(index[0])
            lat.append((time.perf_counter_ns() - t0) / 1000)

    if not case.workers:
        await client(case.send, per_round)
        return
    share, extra = divmod(per_round, len(case.workers))
    await asyncio.gather(
        *(client(send, share + (k < extra)) for k, send in enumerate(case.workers))
    )


async def measure(cases: list[Case], admin: Redis, plan: Plan, index: list[int]) -> list[Row]:
    """``index`` is a shared request counter so that scenarios needing fresh keys
    (misses) never repeat one. A case with ``workers`` runs each round as that many
    concurrent clients (requests/s is then the whole round's)."""
    rows = {c.tool: Row(c.tool, ours=c.ours, reference=c.reference, note=c.note) for c in cases}
    live: list[Case] = []
    for case in cases:
        row = rows[case.tool]
        try:
            for _ in range(plan.warmup):
                index[0] += 1
                problem = await _checked(case, index[0])
                if problem:
                    row.error = problem
                    break
            if row.error:
                continue
            async with Traffic(admin) as traffic:
                for _ in range(plan.counted):
                    index[0] += 1
                    await case.send(index[0])
            row.cmds = traffic.total / plan.counted
            row.sent = sum(traffic.sent.values()) / plan.counted
            row.round_trips = traffic.round_trips / plan.counted
            row.breakdown = _breakdown(traffic.commands, plan.counted)
            live.append(case)
        except Exception as exc:  # a peer that breaks is reported, not fatal
            row.error = f"{type(exc).__name__}: {exc}"[:160]

    throughput: dict[str, list[float]] = {c.tool: [] for c in live}
    cpu: dict[str, list[float]] = {c.tool: [] for c in live}
    commands: Counter[str] = Counter()
    for r in range(plan.rounds):
        order = live[r % len(live) :] + live[: r % len(live)] if live else []
        for case in order:
            lat = rows[case.tool].latencies
            gc.collect()
            before = await commandstats(admin)
            cpu_start = time.process_time_ns()
            start = time.perf_counter_ns()
            await _timed_round(case, plan.per_round, index, lat)
            elapsed = (time.perf_counter_ns() - start) / 1e9
            cpu_ns = time.process_time_ns() - cpu_start
            after = await commandstats(admin)
            after.subtract(before)
            after.pop(HEARTBEAT, None)
            commands[case.tool] += sum(v for v in after.values() if v > 0)
            cpu[case.tool].append(cpu_ns / 1000 / plan.per_round)
            throughput[case.tool].append(plan.per_round / elapsed)

    for case in live:
        row = rows[case.tool]
        # Re-check after timing: a cache that stopped hitting must not pass silently.
        index[0] += 1
        problem = await _checked(case, index[0])
        if problem:
            row.error = f"after timing: {problem}"
        lat = sorted(row.latencies)
        row.median_us = statistics.median(lat)
        row.p95_us = lat[min(len(lat) - 1, int(len(lat) * 0.95))]
        row.rps = statistics.median(throughput[case.tool])
        row.cpu_us = statistics.median(cpu[case.tool])
        if plan.rounds:
            row.timed_cmds = commands[case.tool] / (plan.rounds * plan.per_round)
    return [rows[c.tool] for c in cases]
