"""The issue's speed targets (issue 8, the near cache), checked against one run's rows.

Each target is a ratio of two rows of the same scenario (same run, same machine):
median time per request in-process at concurrency 1 unless the target says
otherwise, requests/s over HTTP for the end-to-end one, or a count of Redis
commands per request. The report's "Targets" table and the chart's top panel are
both drawn from :func:`evaluate`, so they never disagree.
"""

from __future__ import annotations

from dataclasses import dataclass

from ._measure import Row, Scenario

NEAR = "asgi_redis_kit (near cache)"
OURS = "asgi_redis_kit"
FASTAPI_CACHE2 = "fastapi-cache2"
CASHEWS = "cashews 7.6 (redis)"
CASHEWS_CS = "cashews 7.6 (redis, client_side=True)"
AIOCACHE = "aiocache"
NO_CACHE = "no cache"
STARSESSIONS = "starsessions"

# The data cache's targets (issue 9; ``bench/data.py``, its own report): a memoized
# call's hit time over a peer's, same run: (operation, tool, peer, limit).
DATA_CASHEWS = "cashews (redis)"
DATA_AIOCACHE = "aiocache (RedisCache)"
DATA_TARGETS: tuple[tuple[str, str, str, float], ...] = (
    ("hit", OURS, DATA_CASHEWS, 0.5),
    ("hit", OURS, DATA_AIOCACHE, 0.5),
    ("hit", NEAR, DATA_CASHEWS, 0.1),
    ("hit", NEAR, DATA_AIOCACHE, 0.1),
)


@dataclass
class Target:
    label: str
    limit: float
    kind: str  # "<=" (time ratio or commands), ">=" (throughput ratio)
    measured: float | None = None
    cpu: float | None = None  # the same ratio in CPU µs per request, when timed
    unit: str = "x"
    why_missing: str = ""

    @property
    def met(self) -> bool | None:
        if self.measured is None:
            return None
        if self.kind == "<=":
            return self.measured <= self.limit
        return self.measured >= self.limit

    def margin(self) -> str:
        m, limit = self.measured, self.limit
        if m is None:
            return self.why_missing or "not measured"
        if self.unit == "cmds":
            return "none sent" if m == 0 else f"{m:.3g} commands per request too many"
        if self.kind == "<=":
            if m <= limit:
                return f"{(limit - m) / limit:.0%} under the limit"
            return f"{m / limit:.2f}x the limit (needs {1 - limit / m:.0%} less time)"
        if m >= limit:
            return f"{m / limit:.2f}x the limit"
        return f"{m / limit:.2f}x the limit (needs {limit / m:.2f}x the requests/s)"


def _row(scenarios: dict[str, Scenario], key: str, tool: str) -> Row | None:
    sc = scenarios.get(key)
    if sc is None:
        return None
    exact = [r for r in sc.rows if r.tool == tool]
    found = exact or [r for r in sc.rows if r.tool.startswith(tool)]
    return found[0] if found and not found[0].error else None


def _time_ratio(
    scenarios: dict[str, Scenario],
    key: str,
    mine: str,
    peer: str,
    label: str,
    limit: float,
    *,
    by_rps: bool = False,
) -> Target:
    """``by_rps``: time per request from the round's throughput (peer req/s over
    ours), the fair measure at concurrency > 1, where a median latency mostly
    shows who waits in the queue."""
    t = Target(label, limit, "<=")
    a, b = _row(scenarios, key, mine), _row(scenarios, key, peer)
    if a is None or b is None or not a.median_us or not b.median_us or not a.rps or not b.rps:
        t.why_missing = f"not measured ({key}: {mine if a is None else peer} missing)"
        return t
    t.measured = b.rps / a.rps if by_rps else a.median_us / b.median_us
    if a.cpu_us and b.cpu_us:
        t.cpu = a.cpu_us / b.cpu_us
    return t


def _rps_ratio(
    scenarios: dict[str, Scenario], key: str, mine: str, peer: str, label: str, limit: float
) -> Target:
    t = Target(label, limit, ">=")
    a, b = _row(scenarios, key, mine), _row(scenarios, key, peer)
    if a is None or b is None or not a.rps or not b.rps:
        t.why_missing = "not measured (the end-to-end part did not run)"
        return t
    t.measured = a.rps / b.rps
    return t


def _zero(scenarios: dict[str, Scenario], key: str, tool: str, label: str) -> Target:
    t = Target(label, 0, "<=", unit="cmds")
    row = _row(scenarios, key, tool)
    if row is None or row.timed_cmds is None or row.cmds is None:
        t.why_missing = f"not measured ({key}: {tool} missing)"
        return t
    # Both windows: the counted pass and every timed request.
    t.measured = max(row.cmds, row.timed_cmds)
    return t


def evaluate(found: list[Scenario]) -> list[Target]:
    sc = {s.key: s for s in found}
    hit = "cache-a"
    targets = [
        _time_ratio(sc, hit, NEAR, FASTAPI_CACHE2, "near hit / fastapi-cache2 hit", 0.1),
        _time_ratio(sc, hit, NEAR, CASHEWS, "near hit / cashews (Redis) hit", 0.2),
        _time_ratio(sc, hit, NEAR, AIOCACHE, "near hit / aiocache (Redis) hit", 0.2),
        _time_ratio(sc, hit, NEAR, CASHEWS_CS, "near hit / cashews client_side=True hit", 0.5),
        _time_ratio(sc, hit, NEAR, NO_CACHE, "near hit / uncached FastAPI route", 0.3),
        _rps_ratio(
            sc, "e2e-cache", NEAR, NO_CACHE, "HTTP (uvicorn): near hit req/s / uncached req/s", 2.0
        ),
        _time_ratio(
            sc, "sessions-b", NEAR, STARSESSIONS, "read-only session, near / starsessions", 0.2
        ),
        _zero(sc, "sessions-b", NEAR, "read-only session, near: Redis commands/req"),
        _zero(sc, "cache-a", NEAR, "near hit (JSON): Redis commands/req"),
        _zero(sc, "cache-b", NEAR, "near hit (20 KB HTML): Redis commands/req"),
        _zero(sc, "cache-d", NEAR, "near 304: Redis commands/req"),
        # Without the near cache; the issue names these comparisons without a
        # number, so the limit is "not slower" (1.00).
        _time_ratio(
            sc, "sessions-c", OURS, STARSESSIONS, "visit counter (no near) / starsessions, c=1", 1.0
        ),
        _time_ratio(
            sc,
            "sessions-c32",
            OURS,
            STARSESSIONS,
            "visit counter (no near) / starsessions, c=32 (from req/s)",
            1.0,
            by_rps=True,
        ),
    ]
    for peer, name in (
        (FASTAPI_CACHE2, "fastapi-cache2"),
        (CASHEWS, "cashews"),
        (AIOCACHE, "aiocache"),
    ):
        targets.append(
            _time_ratio(sc, "cache-c", OURS, peer, f"cache miss (no near) / {name} miss", 1.0)
        )
    return targets


def _measured(t: Target) -> str:
    if t.measured is None:
        return "-"
    if t.unit == "cmds":
        return "0" if t.measured == 0 else f"{t.measured:.3g}"
    return f"{t.measured:.3f}"


def table(found: list[Scenario]) -> list[str]:
    targets = evaluate(found)
    if not targets:
        return []
    out = [
        "## Targets (issue 8)",
        "",
        "Ratios of medians from this run (time per request in-process at concurrency 1 "
        "unless the row says otherwise; requests/s for the HTTP row). `CPU ratio` is the "
        "same ratio in CPU µs per request, the steadier number on a shared machine. "
        "Commands per request: the larger of the counted pass and all timed requests "
        "(server-side `INFO commandstats`, heartbeat PINGs left out). The rows without "
        "the near cache have no number in the issue; their limit is 1.00 (not slower).",
        "",
        "| target | limit | measured | CPU ratio | result | by how much |",
        "|---|---:|---:|---:|---|---|",
    ]
    for t in targets:
        limit = f"{t.kind} {t.limit:g}" + ("" if t.unit == "cmds" else "x")
        result = {True: "met", False: "**missed**", None: "not measured"}[t.met]
        cpu = "-" if t.cpu is None else f"{t.cpu:.3f}"
        out.append(f"| {t.label} | {limit} | {_measured(t)} | {cpu} | {result} | {t.margin()} |")
    out.append("")
    return out
