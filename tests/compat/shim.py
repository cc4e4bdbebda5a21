"""Starlette's SessionMiddleware signature on top of ours, for Starlette's tests.

Options map one to one: ``session_cookie`` -> ``cookie_name``, ``https_only`` ->
``secure``, ``max_age`` -> ``idle_timeout`` (``None``: ``browser_session=True``),
and ``path``, ``same_site``, ``domain``, ``partitioned`` keep their names.
Starlette has no absolute lifetime (every write renews its cookie), so none is
set. The Redis server and key prefix are the running test's (see :func:`use`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

from starlette.datastructures import Secret
from starlette.middleware.sessions import Session
from starlette.types import ASGIApp

from asgi_redis_kit import SessionMiddleware as RedisSessionMiddleware

__all__ = ["Session", "SessionMiddleware", "TestClientFactory", "use"]

# What Starlette's tests annotate their ``test_client_factory`` fixture with.
TestClientFactory = Callable[..., Any]

_target: tuple[str, str] | None = None


def use(target: tuple[str, str] | None) -> None:
    """The (redis URL, key prefix) of the running test, or None after it."""
    global _target
    _target = target


class SessionMiddleware(RedisSessionMiddleware):
    def __init__(
        self,
        app: ASGIApp,
        secret_key: str | Secret,
        session_cookie: str = "session",
        max_age: int | None = 14 * 24 * 60 * 60,
        path: str = "/",
        same_site: Literal["lax", "strict", "none"] = "lax",
        https_only: bool = False,
        domain: str | None = None,
        partitioned: bool = False,
    ) -> None:
        if _target is None:
            raise RuntimeError("the shim's SessionMiddleware runs only inside a compat test")
        redis_url, key_prefix = _target
        super().__init__(
            app,
            secret_key=secret_key,
            redis=redis_url,
            key_prefix=key_prefix,
            cookie_name=session_cookie,
            idle_timeout=14 * 24 * 60 * 60 if max_age is None else max_age,
            absolute_lifetime=None,
            browser_session=max_age is None,
            path=path,
            same_site=same_site,
            secure=https_only,
            domain=domain,
            partitioned=partitioned,
        )
