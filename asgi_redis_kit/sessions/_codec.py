"""How one session value becomes the bytes of its hash field, and back.

The rule: a value comes back exactly as it was stored -- same types (``True`` stays a
bool, a tuple a tuple), same float bits (``-0.0``, NaN and its sign), same dict order
-- or storing it raises a :class:`TypeError` that names the session key, the place
inside the value, and what to store instead. Nothing changes type silently.

Accepted, exact types only, nested in any combination:

* ``str`` (lone surrogates included), ``int`` of any size, ``float`` (``nan``,
  ``inf``, ``-inf`` and ``-0.0`` included), ``bool``, ``None``;
* ``list``, ``tuple``, and ``dict`` whose keys are ``str``, ``int``, ``float``,
  ``bool`` or ``None``.

The session keys themselves are ``str`` (valid UTF-8: they name Redis hash fields).

That is everything Starlette's cookie session (``json.dumps``) accepts, without the
type changes ``json`` makes (tuple -> list, ``{1: x}`` -> ``{"1": x}``).

Refused: everything else -- ``datetime``, ``date``, ``time``, ``timedelta``,
``Decimal``, ``UUID``, sets, ``bytes``, enum members (an ``IntEnum`` would come back
as a bare int), dataclasses and other objects, and subclasses of the accepted types
(``OrderedDict``, ``defaultdict``, ``Counter``, a ``str`` subclass), because each
would come back as something else. So are dict keys of other types, and values
nested more than 254 levels deep once stored (orjson's limit; a big int, a NaN/inf
or a str with lone surrogates is stored as one more level) or containing themselves.
Dates and the like are refused rather than tagged on purpose: restoring them
faithfully means restoring each ``tzinfo`` implementation (``ZoneInfo``, fixed
offsets, pytz) and ``fold``, while the app knows whether it meant an instant or a
wall-clock time and can store the string or number it wants (``.isoformat()``).

Where the error surfaces: :class:`Session` checks every top-level store
(``session[k] = v``, ``update``, ``setdefault``, ``|=``), so the TypeError points at
the handler's own line. A refused value put inside a stored one
(``session["cart"].append(when)``) is only seen by the save as the response starts,
which raises the same TypeError: the app's 500, with the stored session left as it was.

Two stored forms, told apart by the first byte:

* **plain**: ``orjson.dumps(value)``, whenever orjson alone round-trips the value
  (str, int within 64 bits, finite float, bool, None, list, dict with str keys). It is
  the format of every record written before this module, readable by any JSON tool
  and by older versions; the visit counter stays a plain integer for ``HINCRBY``.
  (To a version before this module a tagged field looks corrupt: after a rollback,
  a session holding one starts afresh.)
* **tagged**: ``b"\\x01"`` (no JSON text starts with it) and then JSON in which every
  array is a node naming its type: ``["l", item, ...]`` list, ``["t", item, ...]``
  tuple, ``["d", key, value, ...]`` dict with a non-str key, ``["i", "-1f"]`` an int
  outside 64 bits (hex: ``str(int)`` has a 4300-digit limit, hex has none),
  ``["f", "nan" | "-nan" | "inf" | "-inf"]`` (a NaN with a payload other than
  ``float("nan")``'s: ``["f", "<16 hex digits>"]``, its 64 bits big-endian),
  ``["s", "<hex>"]`` a str with lone surrogates (its UTF-8 "surrogatepass" bytes).
  JSON strings, numbers, booleans, null and objects stand for themselves (object
  values are nodes again). A user's list is always an ``"l"`` node, so no user data
  can pass for a tag.

Encoding is deterministic (the same value always gives the same bytes), because the
session detects changes by comparing them with what it loaded.
"""

from __future__ import annotations

import dataclasses
import datetime
import decimal
import enum
import math
import struct
import uuid
from collections.abc import Iterable, Mapping
from typing import Any

import orjson

_TAGGED = b"\x01"
# What one session may hold, encoded: Redis' default proto-max-bulk-len.
MAX_SESSION_BYTES = 512 * 1024 * 1024
_DEPTH = 254  # orjson's nesting limit, which every plain record already respects
_INT_MIN, _INT_MAX = -(2**63), 2**64 - 1  # what orjson writes as a JSON integer
_NONFINITE = frozenset({"nan", "-nan", "inf", "-inf"})  # float() parses each, sign included
_KEY_TYPES = (str, int, float, bool, type(None))
_ACCEPTED = "str, int, float, bool, None, or lists, tuples and dicts of them"
# Values that cannot change in place: the same object always encodes the same.
_IMMUTABLE = frozenset({str, int, float, bool, type(None)})
_ABSENT = object()


def encode(key: str, value: Any) -> bytes:
    """The bytes stored for ``session[key] = value``; TypeError if it cannot be kept."""
    if type(key) is not str or not (key.isascii() or is_utf8(key)):
        raise TypeError(f"session keys must be str (valid UTF-8), got {key!r}")
    kind = type(value)
    if (
        (kind is int and _INT_MIN <= value <= _INT_MAX)
        or kind is str
        or kind is bool
        or value is None
        or (kind is float and value - value == 0.0)  # finite: nan and inf give nan
        or ((kind is list or kind is dict) and _plain(value, 1))
    ):
        try:
            return orjson.dumps(value)
        except orjson.JSONEncodeError:
            pass  # a str with lone surrogates, which only the tagged form keeps
    try:
        return _TAGGED + orjson.dumps(_tagged(value, 0))
    except _Refused as exc:
        raise TypeError(f"session[{key!r}]{exc.where()} {exc.problem}") from None


def check(key: str, value: Any) -> None:
    """Raise the TypeError :func:`encode` would, at less cost (for assignments)."""
    kind = type(value)
    if (
        (kind is int or kind is str or kind is float or kind is bool or value is None)
        and type(key) is str
        and key.isascii()
    ):
        return  # every one of these is kept, plainly or tagged
    if (kind is list or kind is dict) and type(key) is str and key.isascii() and _plain(value, 1):
        return
    encode(key, value)


def encode_all(data: dict[str, Any]) -> dict[str, bytes]:
    """:func:`encode` of every item: what a save compares with what it loaded.

    TypeError past :data:`MAX_SESSION_BYTES`: Redis would refuse the write itself
    (its ``proto-max-bulk-len``, 512 MiB by default, and a 1 GiB query buffer) by
    closing the connection, which would read as an outage (a 503) forever.
    """
    encoded: dict[str, bytes] = {}
    for key, value in data.items():
        # Plain ints and strs inline, as cheap as before this module (the visit
        # counter): orjson writes them exactly or refuses them (an int beyond 64
        # bits, a str with lone surrogates), which encode's tagged form then keeps.
        kind = type(value)
        if (kind is int or kind is str) and type(key) is str and key.isascii():
            try:
                encoded[key] = orjson.dumps(value)
                continue
            except orjson.JSONEncodeError:
                pass
        encoded[key] = encode(key, value)
    size = sum(len(key) + len(blob) for key, blob in encoded.items())
    if size > MAX_SESSION_BYTES:
        raise TypeError(
            f"the session holds {size} bytes once encoded, more than the "
            f"{MAX_SESSION_BYTES} a session may hold (what Redis takes in one command); "
            "keep large data elsewhere and store its key in the session"
        )
    return encoded


def differs(
    data: dict[str, Any], snapshot: Mapping[str, bytes], encoded_from: Mapping[str, Any]
) -> bool:
    """``encode_all(data) != snapshot`` (TypeError alike), where ``snapshot[k]`` is
    ``encode(k, encoded_from[k])`` for every key of ``encoded_from``: a value that
    is still that very object and of an immutable type is not encoded again (the
    check after a save, when usually nothing changed, then encodes only the
    containers)."""
    if not encoded_from:
        return encode_all(data) != snapshot
    if len(data) != len(snapshot):
        return True
    for key, value in dict.items(data):
        blob = snapshot.get(key)
        if blob is None:
            return True
        same = value is encoded_from.get(key, _ABSENT)
        if same and type(key) is str and type(value) in _IMMUTABLE:
            continue
        if encode(key, value) != blob:
            return True
    # Every value encodes as stored, so encode_all(data) is snapshot: its size check.
    if sum(map(len, snapshot)) + sum(map(len, snapshot.values())) > MAX_SESSION_BYTES:
        raise TypeError(f"the session holds more than the {MAX_SESSION_BYTES} bytes it may hold")
    return False


def decode(blob: bytes) -> Any:
    """The value :func:`encode` stored; ValueError for bytes it never writes."""
    if blob[:1] != _TAGGED:
        return orjson.loads(blob)
    return _untag(orjson.loads(blob[1:]), 0)


def is_utf8(text: str) -> bool:
    if text.isascii():
        return True
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def _plain(container: list[Any] | dict[Any, Any], depth: int) -> bool:
    """Whether orjson alone round-trips ``container`` (at nesting level ``depth``):
    exact types only, so a subclass, a tuple or an enum member is not plain."""
    if type(container) is dict:
        for name in container:
            if type(name) is not str:
                return False
        items: Iterable[Any] = container.values()
    else:
        items = container
    # The hot loop of every save: scalars are checked inline, without a call each.
    for item in items:
        kind = type(item)
        if kind is str or kind is bool or item is None:
            continue
        if kind is int:
            if _INT_MIN <= item <= _INT_MAX:
                continue
            return False
        if kind is float:
            if item - item == 0.0:
                continue
            return False
        if (kind is list or kind is dict) and depth < _DEPTH and _plain(item, depth + 1):
            continue
        return False
    return True


class _Refused(Exception):
    """A part of the value that cannot be kept; the path to it grows on the way up."""

    def __init__(self, problem: str) -> None:
        self.problem = problem
        self.path: list[str] = []  # innermost step first

    def where(self) -> str:
        steps = self.path[::-1]
        if len(steps) > 12:  # a cycle or a very deep value: show where it starts
            steps = [*steps[:8], "[...]"]
        return "".join(steps)


def _tagged(value: Any, depth: int) -> Any:
    """``value`` as a tree of JSON types in which every array is a tagged node."""
    kind = type(value)
    if kind is str:
        if is_utf8(value):
            return value
        return _leaf(depth, "s", value.encode("utf-8", "surrogatepass").hex())
    if kind is bool or value is None:
        return value
    if kind is int:
        if _INT_MIN <= value <= _INT_MAX:
            return value
        return _leaf(depth, "i", format(value, "x"))
    if kind is float:
        if math.isfinite(value):
            return value
        name = "nan" if math.isnan(value) else "inf"
        sign = "" if math.copysign(1.0, value) > 0 else "-"  # inf * 0 is a NaN with a sign
        bits = struct.pack(">d", value)
        if name == "nan" and bits != struct.pack(">d", float(sign + name)):
            return _leaf(depth, "f", bits.hex())  # a NaN with a payload: all 64 bits
        return _leaf(depth, "f", sign + name)
    if kind is not list and kind is not tuple and kind is not dict:
        raise _Refused(_refusal(value))
    if depth == _DEPTH:
        raise _Refused(f"is nested more than {_DEPTH} levels deep (or contains itself)")
    if kind is dict:
        return _tagged_dict(value, depth)
    node: list[Any] = ["l" if kind is list else "t"]
    for index, item in enumerate(value):
        try:
            node.append(_tagged(item, depth + 1))
        except _Refused as exc:
            exc.path.append(f"[{index}]")
            raise
    return node


def _tagged_dict(value: dict[Any, Any], depth: int) -> Any:
    plain_keys = all(type(name) is str and is_utf8(name) for name in value)
    node: Any = {} if plain_keys else ["d"]
    for name, item in value.items():
        if type(name) not in _KEY_TYPES:
            raise _Refused(
                f"has a dict key of type {_type_name(name)}, which would come back as "
                "something else; dict keys may be str, int, float, bool or None"
            )
        try:
            encoded = _tagged(item, depth + 1)
            if plain_keys:
                node[name] = encoded
            else:
                node += [_tagged(name, depth + 1), encoded]
        except _Refused as exc:
            exc.path.append(f"[{name!r}]")
            raise
    return node


def _leaf(depth: int, tag: str, payload: str) -> list[str]:
    # The node is an array, one level deeper than the scalar it stands for.
    if depth == _DEPTH:
        raise _Refused(
            f"is nested more than {_DEPTH} levels deep once stored (a big int, a NaN or "
            "an infinity, or a str with lone surrogates is stored as one more level)"
        )
    return [tag, payload]


def _type_name(value: object) -> str:
    kind = type(value)
    if kind.__module__ == "builtins":
        return kind.__qualname__
    return f"{kind.__module__}.{kind.__qualname__}"


def _a(name: str) -> str:
    return f"an {name}" if name[0] in "aeiou" else f"a {name}"


def _refusal(value: object) -> str:
    """Why ``value`` is refused and what to store instead (only on the error path)."""
    held = f"holds {_a(_type_name(value))}, which would not come back as one"
    if isinstance(value, enum.Enum):
        member = f"{type(value).__name__}.{value.name}"
        return (
            f"holds the enum member {member}, which would come back as a bare value; "
            f"store {member}.value and rebuild it with {type(value).__name__}(value)"
        )
    if isinstance(value, datetime.date | datetime.time):
        return f"{held}; store value.isoformat() and parse it back with fromisoformat()"
    if isinstance(value, datetime.timedelta):
        return f"{held}; store value.total_seconds()"
    if isinstance(value, decimal.Decimal | uuid.UUID):
        return f"{held}; store str(value)"
    if isinstance(value, set | frozenset):
        return f"{held}; store a list, e.g. sorted(value)"
    if isinstance(value, bytes | bytearray | memoryview):
        return f"{held}; store text, e.g. value.hex() or base64"
    # Looked up on the type: an instance's __getattr__ could do anything.
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return f"{held}; store dataclasses.asdict(value)"
    if callable(getattr(type(value), "model_dump", None)):  # pydantic
        return f"{held}; store value.model_dump(mode='json')"
    if isinstance(value, tuple) and callable(getattr(type(value), "_asdict", None)):
        return f"{held}; store value._asdict() or tuple(value)"
    for base in (dict, list, tuple, str, int, float):
        if isinstance(value, base):
            return (
                f"holds {_a(_type_name(value))}, a subclass of {base.__name__} that would "
                f"come back as a plain {base.__name__}; store {base.__name__}(value)"
            )
    return f"{held}; store {_ACCEPTED} instead"


def _untag(node: Any, depth: int) -> Any:
    """Inverse of :func:`_tagged`; ValueError for anything it never writes."""
    kind = type(node)
    if kind is not list and kind is not dict:
        return node  # str, int, float, bool or None, as orjson parsed it
    if depth == _DEPTH:
        raise ValueError("tagged session value nested too deeply")
    if kind is dict:
        return {name: _untag(item, depth + 1) for name, item in node.items()}
    tag = node[0] if node else None
    if tag == "l" or tag == "t":
        items = [_untag(item, depth + 1) for item in node[1:]]
        return items if tag == "l" else tuple(items)
    if tag == "d" and len(node) % 2 == 1:
        result: dict[Any, Any] = {}
        for index in range(1, len(node), 2):
            name = _untag(node[index], depth + 1)
            if type(name) not in _KEY_TYPES:
                raise ValueError(f"tagged session dict has a {type(name).__name__} key")
            result[name] = _untag(node[index + 1], depth + 1)
        return result
    if len(node) == 2 and type(node[1]) is str:
        payload: str = node[1]
        if tag == "i":
            return int(payload, 16)
        if tag == "f" and payload in _NONFINITE:
            return float(payload)  # a new NaN each time: two NaN keys stay two keys
        if tag == "f" and len(payload) == 16:
            (number,) = struct.unpack(">d", bytes.fromhex(payload))
            if math.isnan(number):  # only NaNs are written this way
                return number
        if tag == "s":
            return bytes.fromhex(payload).decode("utf-8", "surrogatepass")
    raise ValueError(f"unknown tagged session node {str(tag)[:40]!r}")
