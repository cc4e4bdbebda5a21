"""``@cache.memoize``: a coroutine function's results in the data cache.

A call, top to bottom (``Memoized.__call__``, then ``_Call``):

1. The key: the function's module and qualified name and a canonical encoding
   of its bound arguments (:func:`canonical_arguments`: defaults applied, so
   ``f(1)``, ``f(x=1)`` and ``f(1, y=<default>)`` are one entry; a method's
   ``self`` and ``cls`` left out), or the ``key=`` template or function. Tags are templates
   over the same arguments. An argument with no canonical encoding is a
   ``TypeError`` here, before Redis.
2. One lookup (``Cache.lookup``: concurrent calls share it; on a single server
   it takes the Redis lease when the value is absent), one ``classify``:
   fresh -> return it; stale within ``stale_while_revalidate`` -> return it and
   refresh once in the background; otherwise fill.
3. Fill: the first call in this process leads, the others wait for it (and get
   the bytes it stored, each read back into its own object). The leader holds
   the Redis lease, or polls while another process holds it and runs the
   function itself after ``lock_wait``; it runs the function, stores the result
   and gives the lease back in the same round trip.
4. Redis down or slow (or the breaker open): the function runs, and concurrent
   calls of one key in this process still run it once.

Exceptions are never stored: the leader's exception is raised in the calls
that waited for it, and with ``stale_if_error`` a stale value is returned
instead. A leader that is cancelled gives its lease back (in the background)
and its waiters start over; a store is one atomic command, never half done.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime
import decimal
import enum
import functools
import hashlib
import inspect
import itertools
import logging
import math
import string
import uuid
from collections.abc import Awaitable, Callable, Iterable
from types import TracebackType
from typing import TYPE_CHECKING, Any, Generic, NamedTuple, ParamSpec, TypeVar, assert_never

import orjson

from ..errors import BackendUnavailable
from ._entry import Entry
from ._keys import CacheKey
from ._outcome import Absent, Fresh, SessionGone, Stale, classify
from ._serializers import Serializer
from ._values import MISSING, check_key, check_tags, check_ttl, read_value, value_entry

if TYPE_CHECKING:
    from ._cache import Cache

P = ParamSpec("P")
R = TypeVar("R")

logger = logging.getLogger("asgi_redis_kit.cache")

_SKIPPED = ("self", "cls")


class _Unencodable(TypeError):
    pass


def _type_name(value: Any) -> str:
    # With the module: two types of one name in two modules are not one argument.
    kind = type(value)
    return f"{kind.__module__}.{kind.__qualname__}"


# What a value with no canonical form of its own becomes, where one is allowed
# (inside a pydantic model: see _pydantic_leaf); None: it is refused.
_Leaf = Callable[[Any], Any] | None


def _canonical(value: Any, leaf: _Leaf = None) -> Any:
    """``value`` as a JSON tree that names every type, so that distinct arguments
    never share a key (``1``/``1.0``/``True``, ``None``/NaN, a list/tuple, a
    ``UUID`` and its string) and equal ones always do (dicts and sets in any
    order). Lists stand for types: no user value can pass for one. ``leaf``
    encodes what has no form here, at any depth (the containers stay ours)."""
    if value is None or isinstance(value, bool | str):
        return value
    if isinstance(value, enum.Enum):
        return ["enum", _type_name(value), _canonical(value.value, leaf)]
    if isinstance(value, int):
        return value if -(2**63) <= value < 2**64 else ["int", hex(value)]
    if isinstance(value, float):
        return value if math.isfinite(value) else ["float", repr(value)]
    if isinstance(value, bytes):
        return ["bytes", value.hex()]
    if isinstance(value, list | tuple):
        kind = "list" if isinstance(value, list) else "tuple"
        return [kind, *(_canonical(item, leaf) for item in value)]
    if isinstance(value, dict):
        return ["dict", *_sorted_items(value, leaf)]
    if isinstance(value, set | frozenset):
        return ["set", *sorted(orjson.dumps(_canonical(item, leaf)).decode() for item in value)]
    if isinstance(value, datetime.datetime | datetime.date | datetime.time):
        return [type(value).__name__, value.isoformat()]
    if isinstance(value, datetime.timedelta):
        return ["timedelta", value.days, value.seconds, value.microseconds]
    if isinstance(value, uuid.UUID | decimal.Decimal):
        return [type(value).__name__, str(value)]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
        return ["dataclass", _type_name(value), _canonical(fields, leaf)]
    declared = getattr(type(value), "model_fields", None)
    if isinstance(declared, dict) and callable(getattr(value, "model_dump", None)):
        # A pydantic model, by its attributes as a dataclass is: its JSON dump
        # leaves out Field(exclude=True) (two tenants' queries would share a key)
        # and writes a set in iteration order (another key in every process).
        attrs = {name: getattr(value, name) for name in declared}
        attrs.update(getattr(value, "model_extra", None) or {})
        return ["model", _type_name(value), _canonical(attrs, _pydantic_leaf)]
    if leaf is not None:
        return leaf(value)
    raise _Unencodable(type(value).__name__)


def _pydantic_leaf(value: Any) -> Any:
    """A value inside a pydantic model with no form of ours (pydantic's own types:
    URLs, paths, constrained strings...): as pydantic makes it JSON, named with
    its type. Only ever a leaf: the containers around it are encoded as ours, so
    a set is sorted, never written in iteration order."""
    if hasattr(value, "get_secret_value"):
        # A SecretStr's JSON is "**********": every secret would share a key.
        raise _Unencodable(type(value).__name__)
    from pydantic_core import to_jsonable_python  # present: the value is in a model

    try:
        plain = to_jsonable_python(value)
    except Exception:  # pydantic_core's PydanticSerializationError, and others
        raise _Unencodable(type(value).__name__) from None
    return ["jsonable", _type_name(value), _canonical(plain)]


def _sorted_items(mapping: dict[Any, Any], leaf: _Leaf) -> list[list[Any]]:
    """A dict's items in the order of their encoded keys; two keys that encode
    alike (two NaNs) have no order, and no canonical form."""
    items = sorted(
        ((orjson.dumps(_canonical(k, leaf)), v) for k, v in mapping.items()), key=lambda kv: kv[0]
    )
    if any(a[0] == b[0] for a, b in itertools.pairwise(items)):
        raise _Unencodable("a dict whose keys encode alike")
    return [[k.decode(), _canonical(v, leaf)] for k, v in items]


# A signature whose parameters are all plain (positional-or-keyword): its names
# and defaults in order, so a call binds without ``Signature.bind``.
_Plain = tuple[tuple[str, Any], ...]


def plain_parameters(signature: inspect.Signature) -> _Plain | None:
    """The names and defaults (``inspect.Parameter.empty`` for none) of a signature
    with only positional-or-keyword parameters; None for any other."""
    params = signature.parameters.values()
    if any(p.kind is not inspect.Parameter.POSITIONAL_OR_KEYWORD for p in params):
        return None
    return tuple((p.name, p.default) for p in params)


def _bind_plain(plain: _Plain, args: Any, kwargs: Any) -> dict[str, Any] | None:
    """What ``bind`` + ``apply_defaults`` give for a plain signature, in the same
    order; None when the call does not fit it (``bind`` then raises its TypeError)."""
    if len(args) > len(plain):
        return None
    arguments = {name: value for (name, _), value in zip(plain, args, strict=False)}
    used = 0
    for name, default in plain[len(args) :]:
        if name in kwargs:
            arguments[name] = kwargs[name]
            used += 1
        elif default is inspect.Parameter.empty:
            return None
        else:
            arguments[name] = default
    return arguments if used == len(kwargs) else None


def bound_arguments(
    signature: inspect.Signature, args: Any, kwargs: Any, plain: _Plain | None = None
) -> dict[str, Any]:
    """The call's arguments by name, defaults applied. ``plain``: the signature's
    :func:`plain_parameters`, which spares most calls ``Signature.bind``."""
    arguments = None if plain is None else _bind_plain(plain, args, kwargs)
    if arguments is None:
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        arguments = dict(bound.arguments)
    return arguments


def is_method(qualname: str, signature: inspect.Signature) -> bool:
    """Whether a function's first parameter is a method's ``self`` or ``cls``:
    named so, in a function defined in a class body (its ``qualname``'s parent
    is a class, not ``<locals>`` or the module). A plain function's ``cls`` is
    an argument like any other: left out, two calls would share one entry."""
    first = next(iter(signature.parameters), None)
    owner, dot, _ = qualname.rpartition(".")
    return first in _SKIPPED and bool(dot) and not owner.endswith("<locals>")


def canonical_arguments(qualname: str, arguments: dict[str, Any], *, method: bool) -> bytes:
    """The canonical encoding of bound ``arguments`` (the first, a method's
    ``self``/``cls``, left out when ``method``)."""
    parts = []
    for index, (name, value) in enumerate(arguments.items()):
        if index == 0 and method:
            continue
        try:
            # dumps() here, per argument, to name the one it cannot write (a str
            # with a lone surrogate has no UTF-8).
            parts.append(orjson.dumps([name, _canonical(value)]))
        except (_Unencodable, orjson.JSONEncodeError, RecursionError) as exc:
            why = exc if isinstance(exc, _Unencodable) else type(value).__name__
            raise TypeError(
                f"{qualname}(): argument {name!r} ({why}) has no canonical encoding for "
                "a cache key; pass key= to @cache.memoize (a template such as "
                f"'{qualname}:{{{name}.id}}' or a function of the arguments)"
            ) from None
    return b"[" + b",".join(parts) + b"]"


def _defined(func: Callable[..., Any]) -> Callable[..., Any]:
    """The function a ``functools.partial`` wraps (``func`` itself otherwise),
    whose module and qualified name a partial lacks."""
    while isinstance(func, functools.partial):
        func = func.func
    return func


class Options(NamedTuple):
    """``@cache.memoize``'s options, checked."""

    ttl: float
    tags: tuple[str, ...]
    stale_while_revalidate: float
    stale_if_error: float


def check_options(
    ttl: float, tags: Iterable[str], stale_while_revalidate: float, stale_if_error: float
) -> Options:
    """``@cache.memoize``'s options, checked (errors name the option)."""
    return Options(
        check_ttl("ttl", ttl, optional=False) or 0.0,
        check_tags(tags),
        _window("stale_while_revalidate", stale_while_revalidate),
        _window("stale_if_error", stale_if_error),
    )


def _template_names(template: str) -> set[str]:
    """The argument names a ``str.format`` template uses."""
    names = set()
    for _, field, _, _ in string.Formatter().parse(template):
        if field is not None:
            root = field.split(".", 1)[0].split("[", 1)[0]
            if not root or root.isdigit():
                raise ValueError(f"template {template!r}: name the arguments ({{user_id}})")
            names.add(root)
    return names


class Memoized(Generic[P, R]):
    """A memoized coroutine function (see :meth:`Cache.memoize`). Call it as the
    function; ``.key(*args, **kwargs)`` is the data key of a call (for
    ``cache.get``/``delete``) and ``await .invalidate(*args, **kwargs)`` drops
    its value."""

    def __init__(
        self,
        cache: Cache,
        func: Callable[P, Awaitable[R]],
        *,
        options: Options,
        key: str | Callable[..., str] | None,
        lock: bool,
        serializer: Serializer | None,
    ) -> None:
        if not inspect.iscoroutinefunction(func):
            raise TypeError(f"@cache.memoize goes on an async def function, got {func!r}")
        self.ttl, self.tags, self.stale_while_revalidate, self.stale_if_error = options
        self.cache = cache
        self.func = func
        self.lock = lock
        self.serializer = serializer or cache.serializer
        self.signature = inspect.signature(func)
        self.plain = plain_parameters(self.signature)
        # What a method's _Bound shows: the signature without its first parameter.
        self.bound_signature = self.signature.replace(
            parameters=list(self.signature.parameters.values())[1:]
        )
        if key is None and (inspect.ismethod(func) or isinstance(func, functools.partial)):
            # Its instance or first arguments are in none of the arguments a
            # default key encodes: two of them would share every entry.
            raise TypeError(
                f"@cache.memoize({func!r}): a bound method or partial carries arguments "
                "its signature does not show, which no default key names; pass key= "
                "(a template or function that names them, e.g. the tenant)"
            )
        defined = _defined(func)
        self.qualname: str = defined.__qualname__
        self.method = is_method(self.qualname, self.signature)
        self.name = f"{defined.__module__}.{self.qualname}"
        if key is not None and not (isinstance(key, str) or callable(key)):
            raise TypeError(f"key= is a template str or a function, got {key!r}")
        self.key_option = key
        params = set(self.signature.parameters)
        for template in (*self.tags, *([key] if isinstance(key, str) else [])):
            unknown = _template_names(template) - params
            if unknown:
                raise ValueError(
                    f"template {template!r} names {sorted(unknown)}, which "
                    f"{self.qualname}() has no parameter for"
                )
        functools.update_wrapper(self, func)

    def __get__(self, instance: object, owner: type | None = None) -> Any:
        # Used on a method: bind the instance as the first argument, as a function would.
        if instance is None:
            return self
        return _Bound(self, instance)

    def key(self, *args: P.args, **kwargs: P.kwargs) -> str:
        """The data key of this call."""
        return self._name_and_tags(args, kwargs)[0]

    async def invalidate(self, *args: P.args, **kwargs: P.kwargs) -> bool:
        """Drop the value of this call (``cache.delete``); whether one was there."""
        return await self.cache.delete(self.key(*args, **kwargs))

    async def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        name, tags = self._name_and_tags(args, kwargs)
        key = self.cache.keys.for_value(self.cache.namespace, name, tags)
        result: R = await _Call(self, key, functools.partial(self.func, *args, **kwargs)).run()
        return result

    def _name_and_tags(self, args: Any, kwargs: Any) -> tuple[str, tuple[str, ...]]:
        arguments = bound_arguments(self.signature, args, kwargs, self.plain)
        option = self.key_option
        if option is None:
            encoded = canonical_arguments(self.qualname, arguments, method=self.method)
            name = f"{self.name}:{hashlib.sha256(encoded).hexdigest()[:32]}"
        elif isinstance(option, str):
            name = option.format_map(arguments)
        else:
            name = option(*args, **kwargs)
        tags = check_tags([tag.format_map(arguments) for tag in self.tags])  # none empty
        return check_key(name), tags


class _Bound:
    """A Memoized method bound to its instance: it stands where the bound method
    would (a FastAPI dependency or endpoint), so its signature leaves out the
    instance's parameter and its ``__call__`` is a coroutine function, as the
    frameworks that inspect a callable expect of a bound ``async def``."""

    __signature__: inspect.Signature

    def __init__(self, memo: Memoized[..., Any], instance: object) -> None:
        self._memo = memo
        self._instance = instance
        functools.update_wrapper(self, memo.func)
        # Read before __wrapped__ (the function, self included) by inspect.signature.
        self.__signature__ = memo.bound_signature

    async def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return await self._memo(self._instance, *args, **kwargs)

    def key(self, *args: Any, **kwargs: Any) -> str:
        return self._memo.key(self._instance, *args, **kwargs)

    async def invalidate(self, *args: Any, **kwargs: Any) -> bool:
        return await self._memo.invalidate(self._instance, *args, **kwargs)


def _window(name: str, seconds: float) -> float:
    if seconds == 0:
        return 0.0
    return check_ttl(name, seconds, optional=False) or 0.0


# What a leader leaves for the calls that waited on it in this process: the bytes
# stored (each waiter reads its own copy), the exception the function raised with
# the traceback it had then, or None (the leader was cancelled: start over).
_Shared = bytes | tuple[BaseException, TracebackType | None] | None


class _Call:
    """One memoized call's flow: lookup, classify, then return or fill."""

    def __init__(
        self, memo: Memoized[..., Any], key: CacheKey, call: Callable[[], Awaitable[Any]]
    ) -> None:
        self.memo = memo
        self.cache = memo.cache
        self.stats = memo.cache.stats
        self.key = key
        self.call = call
        self.token: str | None = None  # the Redis lease while we hold it

    async def run(self) -> Any:
        cache = self.cache
        try:
            # ``follow=False``: the record may name other tags (a set() of this key);
            # this call stores under its own, whose versions this lookup reads.
            found = await cache.lookup(self.key, lease=self.memo.lock, follow=False)
        except BackendUnavailable:
            return await self.fill((), None, redis=False)
        versions = found.versions
        outcome = classify(found, cache.clock())
        entry = getattr(outcome, "entry", None)
        # Read once: the check and a hit's answer are the same deserialized value.
        value = MISSING if entry is None else self.read(entry)
        if entry is not None and value is MISSING:
            outcome = Absent()  # stored with other tags, or unreadable: refill
        match outcome:
            case Fresh(_):
                self.stats.data_hits += 1
                return value
            case Stale(_, "revalidate"):
                self.stats.data_hits += 1
                self.stats.data_stale += 1
                self.schedule_refresh(versions)
                return value
            case Stale(entry, _):
                self.stats.data_misses += 1
                return await self.fill(versions, entry)
            case Absent(token, locked):
                self.stats.data_misses += 1
                self.token = token
                return await self.fill(versions, None, locked=locked)
            case SessionGone(token):  # only a per-user page's lookup proves a session
                self.token = token
                return await self.fill(versions, None)
            case unknown:
                assert_never(unknown)

    def read(self, entry: Entry) -> Any:
        return read_value(entry, self.key, self.memo.serializer)

    async def fill(
        self,
        versions: tuple[int, ...],
        fallback: Entry | None,
        *,
        locked: bool = False,
        redis: bool = True,
    ) -> Any:
        """Lead the refill in this process, or wait for the call that does."""
        flights = self.cache.value_flights
        shared = flights.get(self.key.entry)
        if shared is not None:
            self.give_back()
            return await self.follow(shared)
        flight: asyncio.Future[_Shared] = asyncio.get_running_loop().create_future()
        flights[self.key.entry] = flight
        outcome: _Shared = None
        try:
            body = await self.lead(versions, fallback, locked=locked, redis=redis)
            outcome = body
            return self.memo.serializer.loads(body)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            outcome = (exc, exc.__traceback__)
            raise
        finally:
            self.give_back()
            if flights.get(self.key.entry) is flight:
                del flights[self.key.entry]
            flight.set_result(outcome)

    async def follow(self, shared: asyncio.Future[_Shared]) -> Any:
        try:
            async with asyncio.timeout(self.cache.lock_wait):
                # shield: one cancelled caller must not cancel what the others wait on.
                outcome = await asyncio.shield(shared)
        except TimeoutError:
            return await self.call()  # the leader is stuck: do not wait for it any longer
        if outcome is None:
            return await _Call(self.memo, self.key, self.call).run()
        if isinstance(outcome, tuple):
            # Every waiter raises the one object: from the function's traceback, as
            # asyncio.Future.result() does, or each raise would chain its frames on.
            exc, tb = outcome
            raise exc.with_traceback(tb)
        self.stats.data_coalesced += 1
        return self.memo.serializer.loads(outcome)

    async def lead(
        self, versions: tuple[int, ...], fallback: Entry | None, *, locked: bool, redis: bool
    ) -> bytes:
        """The function's result as stored (or a value another leader stored
        meanwhile), holding the Redis lease where there is one."""
        cache = self.cache
        if redis and self.memo.lock and self.token is None:
            try:
                if not locked:
                    self.token, entry = await cache.acquire(self.key, versions)
                    if entry is not None and self.read(entry) is not MISSING:
                        return entry.body  # stored just before we asked
                    locked = self.token is None
                if locked:
                    entry, _ = await cache.wait_for_lease(self.key, versions)
                    if entry is not None and self.read(entry) is not MISSING:
                        return entry.body
            except BackendUnavailable:
                redis = False
        try:
            value = await self.call()
        except Exception:
            if fallback is not None and fallback.in_error_window(cache.clock()):
                self.stats.data_stale += 1
                return fallback.body
            raise
        body = self.memo.serializer.dumps(value)
        if redis:
            entry = value_entry(
                self.key,
                body,
                now=cache.clock(),
                ttl=self.memo.ttl,
                stale_while_revalidate=self.memo.stale_while_revalidate,
                stale_if_error=self.memo.stale_if_error,
                versions=versions,
            )
            token, self.token = self.token, None
            try:
                await cache.storage.store(self.key, self.key, entry, token)
                self.stats.data_stores += 1
            except BackendUnavailable:
                pass  # fail open: the caller gets its value; the lease expires
            except asyncio.CancelledError:
                self.token = token  # the store may not have released it
                raise
        return body

    def give_back(self) -> None:
        """Release a lease we still hold, in the background (we may be cancelled)."""
        token, self.token = self.token, None
        if token is not None:
            self.cache.spawn(self.cache.release_quietly(self.key, token))

    def schedule_refresh(self, versions: tuple[int, ...]) -> None:
        if self.key.entry in self.cache.value_flights:
            return  # a refresh (or a refill) of this key is already running here
        self.cache.spawn(self.refresh(versions))

    async def refresh(self, versions: tuple[int, ...]) -> None:
        cache = self.cache
        with contextlib.suppress(BackendUnavailable):
            self.token, _ = await cache.acquire(self.key, versions)
        if self.token is None:
            return  # another process refreshes it, or already did
        self.stats.data_refreshes += 1
        try:
            await self.fill(versions, None)
        except Exception:
            logger.exception("background refresh of a memoized value failed")
