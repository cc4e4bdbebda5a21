"""``@cached``: marks an endpoint as cacheable; CacheMiddleware does the caching.

The decorator does not touch requests or responses. It attaches a
:class:`RouteCache` to the endpoint (found by the middleware before routing,
through Starlette's own ``Route.matches``) and, when the endpoint runs, tells
the middleware which configuration actually ran, so a response is only stored
when the endpoint that produced it is the one the middleware matched.

``functools.wraps`` keeps ``__wrapped__``, so FastAPI reads the original
signature (path/query params, ``Depends``, ``response_model``) and resolves its
annotations in the original module; the wrapper stays sync or async like the
original, so FastAPI still runs sync handlers in its thread pool.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Awaitable, Callable, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, TypeVar, cast

from starlette.requests import Request

from .._redis import check_seconds
from ..errors import CacheNotConfigured

ATTRIBUTE = "__asgi_redis_kit_cache__"
DEFAULT_MAX_SIZE = 1024 * 1024

F = TypeVar("F", bound=Callable[..., Any])
KeyFunction = Callable[[Request], str | bytes | Awaitable[str | bytes]]


@dataclass(frozen=True, slots=True)
class RouteCache:
    """The options of one ``@cached`` endpoint (see :func:`cached`)."""

    ttl: float
    key: KeyFunction | None = None
    vary: tuple[str, ...] = ()
    tags: tuple[str, ...] = ()
    public: bool = False
    vary_on_session: bool = False
    ignores_session: bool = False
    stale_while_revalidate: float = 0
    stale_if_error: float = 0
    namespace: str | None = None
    max_size: int = DEFAULT_MAX_SIZE
    jitter: float = 0

    def filled_tags(self, path_params: Mapping[str, Any]) -> tuple[str, ...]:
        try:
            return tuple(tag.format_map(path_params) for tag in self.tags)
        except (KeyError, IndexError, ValueError) as exc:
            raise ValueError(
                f"tag templates {self.tags!r} name a path parameter the route does not "
                f"have ({exc}); available: {sorted(path_params)!r}"
            ) from exc


@dataclass(eq=False)
class RequestState:
    """Per-request notes between CacheMiddleware and the endpoint, carried in a
    ContextVar (it follows FastAPI's thread pool and any task the app spawns)."""

    ran: RouteCache | None = None


current: ContextVar[RequestState | None] = ContextVar("asgi_redis_kit_cache_request", default=None)


def _enter(config: RouteCache, name: str) -> None:
    state = current.get()
    if state is None:
        raise CacheNotConfigured(
            f"@cached on {name} ran, but CacheMiddleware is not installed around this app. "
            "Add it outside SessionMiddleware, e.g. "
            "`app.add_middleware(CacheMiddleware, redis='redis://localhost:6379/0')` "
            "(added last, so it runs first) or "
            "`Starlette(middleware=[Middleware(CacheMiddleware, redis=...), ...])`."
        )
    if state.ran is None:  # the outermost @cached is the one the route holds
        state.ran = config


def cached(
    ttl: float = 60,
    *,
    key: KeyFunction | None = None,
    vary: Sequence[str] = (),
    tags: Sequence[str] = (),
    public: bool = False,
    vary_on_session: bool = False,
    ignores_session: bool = False,
    stale_while_revalidate: float = 0,
    stale_if_error: float = 0,
    namespace: str | None = None,
    max_size: int = DEFAULT_MAX_SIZE,
    jitter: float = 0,
) -> Callable[[F], F]:
    """Cache the whole response of this endpoint for ``ttl`` seconds.

    Write it under the route decorator (``@app.get(...)`` then ``@cached(...)``),
    on a Starlette ``async def endpoint(request)`` or a FastAPI path operation,
    sync or async. Needs CacheMiddleware around the app.

    Parameters:
        ttl: seconds an entry is fresh.
        key: ``f(request) -> str | bytes`` (may be async) replacing path and query
            in the key; host, namespace, session and ``vary`` parts stay.
        vary: request headers whose values are part of the key from the first
            request, e.g. ``("accept-language",)``. Headers a response names in
            its own ``Vary`` (other than ``Cookie``) are learned and keyed too;
            declaring them only saves a cold process one round trip.
        tags: templates filled from path params (``"item:{item_id}"``) for
            :meth:`Cache.invalidate_tags`.
        public: allow requests carrying ``Authorization`` to use the cache.
        vary_on_session: store responses that read the session (``Vary: Cookie``),
            one entry per session cookie value.
        ignores_session: promise that the handler never reads the session, so
            its response is shared by visitors whose sessions hold data. Without
            it such a response is not stored: reads through ``scope["session"]``,
            ``dict(...)`` or ``orjson.dumps`` cannot all be seen, so a session
            with data counts as read. A read that is seen (``request.session``)
            still keeps the response out of the cache.
        stale_while_revalidate: seconds after ``ttl`` during which the old entry is
            served at once while one background refresh runs (RFC 5861).
        stale_if_error: seconds after ``ttl`` during which the old entry is served
            if the handler raises, answers 5xx, or Redis fails mid-way (RFC 5861).
        namespace: namespace of this route's entries (default: the middleware's).
        max_size: bodies over this many bytes are not stored.
        jitter: up to this many seconds added at random to ``ttl`` per entry, so
            entries written together do not expire together.
    """
    if not ttl > 0:
        raise ValueError(f"ttl must be a positive number of seconds, got {ttl!r}")
    for name, value in (
        ("stale_while_revalidate", stale_while_revalidate),
        ("stale_if_error", stale_if_error),
        ("jitter", jitter),
    ):
        if value < 0:
            raise ValueError(f"{name} must not be negative, got {value!r}")
    for name, value in (
        ("ttl", ttl),
        ("stale_while_revalidate", stale_while_revalidate),
        ("stale_if_error", stale_if_error),
        ("jitter", jitter),
    ):
        check_seconds(name, value)
    if max_size < 0:
        raise ValueError(f"max_size must not be negative, got {max_size!r}")
    if isinstance(vary, str) or isinstance(tags, str):
        raise TypeError("vary= and tags= take a list of strings, not one string")
    if vary_on_session and ignores_session:
        raise ValueError(
            "vary_on_session=True (one entry per session) and ignores_session=True "
            "(one entry for every session) contradict each other; pick one"
        )
    if namespace is not None and not namespace:
        raise ValueError("namespace must be a non-empty string or None")
    config = RouteCache(
        ttl=ttl,
        key=key,
        vary=tuple(sorted({name.lower() for name in vary})),
        tags=tuple(tags),
        public=public,
        vary_on_session=vary_on_session,
        ignores_session=ignores_session,
        stale_while_revalidate=stale_while_revalidate,
        stale_if_error=stale_if_error,
        namespace=namespace,
        max_size=max_size,
        jitter=jitter,
    )

    def decorate(func: F) -> F:
        name = getattr(func, "__qualname__", repr(func))
        wrapper: Callable[..., Any]
        if inspect.iscoroutinefunction(func):

            @functools.wraps(func)
            async def async_wrapper(*args: Any, **kwargs: Any) -> Any:
                _enter(config, name)
                return await func(*args, **kwargs)

            wrapper = async_wrapper
        else:

            @functools.wraps(func)
            def sync_wrapper(*args: Any, **kwargs: Any) -> Any:
                _enter(config, name)
                return func(*args, **kwargs)

            wrapper = sync_wrapper
        setattr(wrapper, ATTRIBUTE, config)
        return cast("F", wrapper)

    return decorate


def route_config(endpoint: Any) -> RouteCache | None:
    config = getattr(endpoint, ATTRIBUTE, None)
    return config if isinstance(config, RouteCache) else None
