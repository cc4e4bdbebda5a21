"""``python -m example_app``: run the example app with uvicorn.

    python -m example_app [--fastapi] [--host 127.0.0.1] [--port 8000] [--name NAME]

Environment: HOST, PORT, INSTANCE_NAME (flags win), REDIS_URL (unset: an
embedded in-process Redis), SESSION_SECRET (unset: a fixed development secret;
services that share sessions must share it).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Sequence

import uvicorn
from redis.asyncio import Redis
from redis.exceptions import RedisError
from starlette.types import ASGIApp

from .settings import Settings

log = logging.getLogger("example_app")
CONNECT_TIMEOUT = 3.0


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m example_app",
        description="The asgi_redis_kit demo: visit counter, login/logout, a cached page.",
    )
    parser.add_argument(
        "--fastapi", action="store_true", help="serve the FastAPI twin instead of Starlette"
    )
    parser.add_argument("--host", default=os.environ.get("HOST", "127.0.0.1"))
    # A string default goes through type=int too, so a bad PORT gets argparse's
    # one-line error instead of a traceback.
    parser.add_argument("--port", type=int, default=os.environ.get("PORT", "8000"))
    parser.add_argument(
        "--name", default=None, help="instance name shown on every page (default: the pid)"
    )
    return parser.parse_args(argv)


async def redis_problem(url: str) -> str | None:
    """Why ``url`` cannot be used right now, or None when it answers PING."""
    try:
        client = Redis.from_url(
            url, socket_connect_timeout=CONNECT_TIMEOUT, socket_timeout=CONNECT_TIMEOUT
        )
    except ValueError as exc:
        return f"it is not a valid Redis URL ({exc})"
    try:
        await client.ping()
    except (RedisError, OSError) as exc:
        return f"{type(exc).__name__}: {exc}"
    finally:
        await client.aclose()
    return None


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s:     %(name)s: %(message)s")
    settings = Settings.from_env(instance=args.name)

    if settings.secret_is_default:
        log.warning(
            "SESSION_SECRET is not set: signing cookies with the built-in development "
            "secret. Set SESSION_SECRET (the same value on every service) in production."
        )
    if settings.embedded:
        log.info(
            "REDIS_URL is not set: using an embedded in-process Redis (memory://). "
            "Sessions and cached pages live in this process only and vanish when it stops; "
            "set REDIS_URL=redis://host:6379/0 to share them between services."
        )
    else:
        problem = asyncio.run(redis_problem(settings.redis_url))
        if problem is not None:
            # One clear line and a non-zero exit, not a traceback wall.
            print(
                f"example_app: cannot reach Redis at {settings.redis_label}: {problem}\n"
                "example_app: start a Redis server there, fix REDIS_URL, or unset it to "
                "use the embedded in-process Redis.",
                file=sys.stderr,
            )
            return 2
        log.info("Using Redis at %s", settings.redis_label)

    app: ASGIApp
    if args.fastapi:
        from .fastapi_app import create_app as create_fastapi

        app = create_fastapi(settings)
    else:
        from .starlette_app import create_app as create_starlette

        app = create_starlette(settings)

    log.info(
        "%s example app, instance %r, on http://%s:%d",
        "FastAPI" if args.fastapi else "Starlette",
        settings.instance,
        args.host,
        args.port,
    )
    uvicorn.run(app, host=args.host, port=args.port, log_level="info", lifespan="on")
    return 0


if __name__ == "__main__":
    sys.exit(main())
