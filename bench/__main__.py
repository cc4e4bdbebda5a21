"""``python -m bench``: the comparison with the peers, or ``python -m bench soak``
(``bench/soak.py``). ``./dev bench [args]`` runs it in the project venv."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
import time
from pathlib import Path

from redis.asyncio import Redis

from . import _report
from ._measure import Plan, Scenario
from ._server import BenchRedis

RESULTS = Path(__file__).parent / "results"
CHART = Path(__file__).parent.parent / "docs" / "bench.png"


def _parse(argv: list[str]) -> argparse.Namespace:
    # Plain text: argparse prints description and epilog as they are.
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description="Compare asgi_redis_kit with its peers in one run on this machine and\n"
        "write a markdown report (method: bench/README.md). ./dev bench runs this.",
        epilog="the soak run:\n  python -m bench soak [--minutes M] [--rps R] [--latency-ms L] "
        "[--concurrency C] [--out PATH]\n  (python -m bench soak --help for its options)\n"
        "the fleet run (near-cache invalidation cost on Redis):\n  python -m bench fleet "
        "[--clients N] [--writes W] [--seconds S] [--out PATH]\n"
        "the data cache (Cache.get, @cache.memoize) vs cashews and aiocache:\n  "
        "python -m bench data [-n N] [--rounds R] [--out PATH]\n"
        "the near cache's invalidation lag between two instances:\n  python -m bench lag "
        "[--trials N] [--keys K] [--out PATH]",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--quick", action="store_true", help="fewer rounds and requests (~1 min)")
    p.add_argument("--only", choices=["sessions", "cache"], help="run one family of scenarios")
    p.add_argument("-n", type=int, help="requests per tool per round")
    p.add_argument("--rounds", type=int, help="rounds per scenario (tools interleaved)")
    p.add_argument(
        "--out",
        type=Path,
        help="markdown output (default: bench/results/latest.md for a complete run, "
        "quick.md or partial.md otherwise)",
    )
    p.add_argument("--no-e2e", action="store_true", help="skip the uvicorn end-to-end run")
    p.add_argument(
        "--chart",
        type=Path,
        help="PNG of the time-vs-ours ratios (default: docs/bench.png for a complete run, "
        "else the markdown output's path with .png)",
    )
    return p.parse_args(argv)


async def _main(args: argparse.Namespace, url: str) -> tuple[str, list[Scenario], str]:
    plan = Plan(
        rounds=args.rounds or (3 if args.quick else 10),
        per_round=args.n or (100 if args.quick else 500),
    )
    if plan.rounds < 1 or plan.per_round < 1 or plan.rounds * plan.per_round > 200_000:
        raise SystemExit("bench: need 1 <= rounds, 1 <= n and rounds * n <= 200000")
    admin = Redis.from_url(url)
    index = [0]
    scenarios: list[Scenario] = []
    notes: list[str] = []
    started = time.monotonic()
    try:
        if args.only in (None, "sessions"):
            from . import sessions

            found, problems = await sessions.run(url, admin, plan, index)
            scenarios += found
            notes += [f"sessions: could not set up {p}" for p in problems]
            print(f"bench: sessions done in {time.monotonic() - started:.0f}s", file=sys.stderr)
        if args.only in (None, "cache"):
            from . import cache

            found, problems = await cache.run(url, admin, plan, index)
            scenarios += found
            notes += problems
            print(f"bench: cache done in {time.monotonic() - started:.0f}s", file=sys.stderr)
        if not args.quick and not args.no_e2e:
            from . import e2e

            found, problems = await e2e.run(url, admin, args.only)
            scenarios += found
            notes += problems
    finally:
        await admin.aclose()
    settings = (
        f"{'--quick, ' if args.quick else ''}{plan.rounds} rounds x {plan.per_round} "
        f"requests per tool (interleaved), {plan.warmup} warm-up and {plan.counted} counted "
        f"requests per tool; total run {time.monotonic() - started:.0f}s"
    )
    text = _report.render(
        "asgi_redis_kit vs peers: latest results", scenarios, settings=settings, notes=notes
    )
    return text, scenarios, settings


def _on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    signal.signal(signal.SIGTERM, _on_sigterm)
    # Ctrl-C must reach us even when a shell started us in the background.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    if argv[:1] == ["soak"]:
        from . import soak

        return soak.main(argv[1:])
    if argv[:1] == ["fleet"]:
        from . import fleet

        return fleet.main(argv[1:])
    if argv[:1] == ["data"]:
        from . import data

        return data.main(argv[1:])
    if argv[:1] == ["lag"]:
        from . import lag

        return lag.main(argv[1:])
    args = _parse(argv)
    # Only a complete run replaces the committed results.
    partial = args.quick or args.only or args.no_e2e
    name = "quick.md" if args.quick else "partial.md" if partial else "latest.md"
    out: Path = args.out or RESULTS / name
    chart: Path = args.chart or (out.with_suffix(".png") if partial else CHART)
    try:
        with BenchRedis() as server:
            text, scenarios, settings = asyncio.run(_main(args, server.url))
    except KeyboardInterrupt:
        print("bench: interrupted; redis-server stopped, nothing written", file=sys.stderr)
        return 130
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text + "\n")
    print(text)
    print(f"\nbench: wrote {out}", file=sys.stderr)
    from . import _chart

    problem = _chart.write(scenarios, chart, subtitle=settings.split("; total")[0])
    print(problem or f"bench: wrote {chart}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
