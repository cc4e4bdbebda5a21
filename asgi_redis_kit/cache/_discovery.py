"""Finding things in the app around and inside the cache: the Router, the
SessionMiddleware (ours or Starlette's) and a proxy-headers middleware.

Each is looked up once per CacheMiddleware (the middleware stack never changes
after the first request); nothing here runs per request except route matching
(:func:`match_route`).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Iterator
from typing import Any

from starlette.applications import Starlette
from starlette.middleware.sessions import SessionMiddleware as StarletteSessions
from starlette.routing import Host, Match, Mount, Router
from starlette.types import Scope

from ..sessions import SessionMiddleware

logger = logging.getLogger("asgi_redis_kit.cache")

MAX_DEPTH = 64


def match_route(
    routes: Iterable[Any], scope: Scope, depth: int = 0
) -> tuple[Any, dict[str, Any]] | None:
    """The endpoint and path params Starlette's Router would dispatch to, the same
    way it does: the first FULL match wins; a Mount/Host match hands over to
    its own routes for good."""
    if depth > MAX_DEPTH:
        return None
    for route in routes:
        try:
            match, child = route.matches(scope)
        except Exception:  # a custom route that cannot judge this scope: not ours
            logger.debug("route %r failed to match", route, exc_info=True)
            continue
        if match is not Match.FULL:
            continue
        if isinstance(route, Mount | Host):
            return match_route(route.routes, {**scope, **child}, depth + 1)
        return child.get("endpoint"), dict(child.get("path_params", {}))
    return None


def find_router(app: Any) -> Router | None:
    """The Router inside ``app``, following the ``.app`` chain every Starlette
    middleware keeps (and ``.router`` of a Starlette/FastAPI application)."""
    for _ in range(MAX_DEPTH):
        if isinstance(app, Router):
            return app
        router = getattr(app, "router", None)
        if isinstance(router, Router):
            return router
        app = getattr(app, "app", None)
        if app is None:
            return None
    return None


def chain(app: Any) -> Iterator[Any]:
    """``app`` and every app it wraps, down to the Router: the ``.app`` of each
    middleware, and the ``.middleware_stack`` of a Starlette/FastAPI application."""
    seen: set[int] = set()
    for _ in range(MAX_DEPTH):
        if app is None or id(app) in seen:
            return
        seen.add(id(app))
        yield app
        if isinstance(app, Router):
            return
        inner = getattr(app, "app", None)
        if inner is None and isinstance(app, Starlette):
            if app.middleware_stack is None:
                # CacheMiddleware wrapping a Starlette/FastAPI app that has not run
                # yet: build its stack now, exactly as its first __call__ would,
                # so the SessionMiddleware in it is found before the first key.
                app.middleware_stack = app.build_middleware_stack()
            inner = app.middleware_stack
        app = inner


# Middleware that rewrites the scope (scheme, client, Host) from forwarding
# headers, when it trusts the peer. Recognised by class, without importing
# them: uvicorn or hypercorn may be absent, and a class never imported has no
# instance. Look-alikes of other packages are recognised by name.
_PROXY_CLASSES = frozenset(
    {
        "uvicorn.middleware.proxy_headers.ProxyHeadersMiddleware",
        "hypercorn.middleware.proxy_fix.ProxyFixMiddleware",
    }
)
_PROXY_NAME = re.compile(r"Proxy(?:Headers|Fix)|Proxied(?:Headers)?|ForwardedHeaders", re.I)


def find_proxy_middleware(app: Any) -> Any | None:
    """A proxy-headers middleware inside the cache (``app``'s ``.app`` chain).
    It rewrites the scope after the cache keyed it, from headers it honours
    only from trusted peers: the key cannot tell an honoured header from an
    ignored one (see ``_exchange.Exchange.run``)."""
    for found in chain(app):
        for cls in type(found).__mro__:
            if f"{cls.__module__}.{cls.__qualname__}" in _PROXY_CLASSES or _PROXY_NAME.search(
                cls.__name__
            ):
                return found
    return None


def find_sessions(app: Any, scope: Scope) -> SessionMiddleware | StarletteSessions | None:
    """The session middleware in this app, ours or Starlette's: inside us (the
    ``.app`` chain), else outside us (the middleware stack of the application
    in ``scope["app"]``)."""
    for candidate in (app, scope.get("app")):
        for found in chain(candidate):
            if isinstance(found, SessionMiddleware | StarletteSessions):
                return found
    return None
