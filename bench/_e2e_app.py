"""``uvicorn --factory bench._e2e_app:make`` with BENCH_FAMILY, BENCH_TOOL, BENCH_REDIS_URL."""

from __future__ import annotations

import os

from starlette.types import ASGIApp


def make() -> ASGIApp:
    family, tool, url = (os.environ[k] for k in ("BENCH_FAMILY", "BENCH_TOOL", "BENCH_REDIS_URL"))
    if family == "sessions":
        from . import sessions

        return sessions.FACTORIES[tool](url).app
    from . import cache

    return cache.FACTORIES[tool](url).app
