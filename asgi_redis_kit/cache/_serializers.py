"""How the data cache turns values into bytes and back: the :class:`Serializer`
protocol, the default :class:`JsonSerializer` and :class:`PydanticSerializer`.

Never pickle: a cache is shared by every process that can reach Redis, and
unpickling what one of them wrote runs its code in all the others.

What you get back is what the cache holds, on a miss as on a hit:
``@cache.memoize`` returns the function's result read back through the
serializer, so a caller never sees a ``datetime`` on the first call and a
``str`` on the next.
"""

from __future__ import annotations

from typing import Any, Protocol

import orjson

# No JSON text starts with a NUL byte: a top-level ``bytes`` value is stored raw after it.
_RAW = b"\x00"


class Serializer(Protocol):
    """Two methods: ``dumps`` raises ``TypeError`` for a value it cannot store."""

    def dumps(self, value: Any) -> bytes: ...

    def loads(self, data: bytes) -> Any: ...


class JsonSerializer:
    """The default: orjson. ``str``, ``int`` (64-bit), ``float``, ``bool``,
    ``None``, ``list`` and ``dict`` with ``str`` keys come back as they went
    in, and a top-level ``bytes`` value as ``bytes``. Stored as their JSON
    form, so they come back as JSON types: ``tuple`` -> ``list``,
    ``datetime``/``date``/``time`` -> ISO 8601 ``str``, ``UUID`` -> ``str``,
    dataclasses and ``TypedDict`` -> ``dict``, enum members -> their value.
    NaN and infinities, which JSON has no form for, come back as ``None``.
    Anything else (sets, ``Decimal``, ``bytes`` inside a container, dict keys
    that are not ``str``, ints past 64 bits, objects) is a ``TypeError``.
    For typed results use :class:`PydanticSerializer`."""

    def dumps(self, value: Any) -> bytes:
        if isinstance(value, bytes):
            return _RAW + value
        try:
            return orjson.dumps(value, default=_refuse)
        except TypeError as exc:
            raise TypeError(
                f"cannot cache a {type(value).__name__} value as JSON: {exc}; store "
                "JSON types, or pass serializer=PydanticSerializer(YourType) (or your own)"
            ) from None

    def loads(self, data: bytes) -> Any:
        if data[:1] == _RAW:
            return data[1:]
        return orjson.loads(data)


def _refuse(value: Any) -> Any:
    raise TypeError(f"{type(value).__name__} has no JSON form")


class PydanticSerializer:
    """Values of one type, validated back into it with pydantic: a model, or any
    type a ``pydantic.TypeAdapter`` takes (``list[User]``, ``dict[str, Rate]``,
    ``datetime``), so a memoized function returns the same types on a hit as on a miss::

        @cache.memoize(ttl=60, serializer=PydanticSerializer(User))
        async def load_user(user_id: int) -> User: ...
    """

    def __init__(self, type_: Any) -> None:
        try:
            from pydantic import TypeAdapter
        except ImportError:  # pragma: no cover - pydantic comes with FastAPI
            raise ImportError("PydanticSerializer needs pydantic: pip install pydantic") from None
        self.type = type_
        self._adapter: Any = TypeAdapter(type_)

    def dumps(self, value: Any) -> bytes:
        from pydantic import ValidationError
        from pydantic_core import PydanticSerializationError

        try:
            # Validated first, so a value of another type is refused here, not read back wrong.
            body = bytes(self._adapter.dump_json(self._adapter.validate_python(value)))
            # And read back once: pydantic writes values it refuses to read (a NaN
            # float as null), which no get or memoized hit could ever return.
            self._adapter.validate_json(body)
        except (ValidationError, PydanticSerializationError) as exc:
            raise TypeError(f"cannot cache this value as {self.type!r}: {exc}") from None
        return body

    def loads(self, data: bytes) -> Any:
        return self._adapter.validate_json(data)

    def __repr__(self) -> str:
        return f"PydanticSerializer({self.type!r})"
