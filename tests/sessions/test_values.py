"""Session values never change type silently: each one comes back exactly as it was
stored, or storing it raises a TypeError that names the session key.

Round trips go through SessionMiddleware (fakeredis for the many cases, a real Redis
for the end-to-end ones) and are compared with :func:`_same`, which is stricter than
``==``: types must match (``True`` is not ``1``, a tuple is not a list), floats must
match bit for bit (``-0.0``, the sign of a NaN) and dicts must match in order.
"""

from __future__ import annotations

import collections
import dataclasses
import datetime
import decimal
import enum
import math
import random
import struct
import time
import uuid
from collections.abc import Callable
from typing import Any, NamedTuple

import httpx
import orjson
import pytest
from redis.asyncio import Redis
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from asgi_redis_kit import Session, SessionMiddleware, SessionStore
from asgi_redis_kit.sessions._codec import decode, differs, encode, encode_all
from asgi_redis_kit.sessions._cookie import CookieSigner
from tests.support import RedisSpy

from .conftest import SECRET, cookie_of, session_id_of, stored_keys


def _same(a: Any, b: Any) -> bool:
    """``a == b`` with exact types, float bits and dict order."""
    if type(a) is not type(b):
        return False
    if type(a) is float:
        return struct.pack("<d", a) == struct.pack("<d", b)
    if type(a) in (list, tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if type(a) is dict:
        return len(a) == len(b) and all(
            _same(ka, kb) and _same(va, vb)
            for (ka, va), (kb, vb) in zip(a.items(), b.items(), strict=True)
        )
    return bool(a == b)


def _show(value: Any) -> str:
    try:
        return repr(value)[:200]
    except ValueError:  # an int too long for repr()
        return f"an int of {value.bit_length()} bits"


def _nested(depth: int, leaf: Any, *, tuples: bool = True) -> Any:
    """``leaf`` inside ``depth`` containers: lists, str-keyed dicts and tuples."""
    value = leaf
    for level in range(depth):
        value = (value,) if level % 3 == 0 and tuples else [value] if level % 2 else {"k": value}
    return value


NAN = float("nan")

# Everything Starlette's cookie session (json.dumps) accepts, and more, with the
# types json.dumps would change kept: name -> a factory for a fresh value.
ACCEPTED: dict[str, Callable[[], Any]] = {
    "str": lambda: "héllo ☃ \x00 \x01 \U0001f600",
    "empty str": lambda: "",
    "str starting with the tag byte": lambda: "\x01[]",
    "lone surrogates": lambda: "a\ud800b\udfff",
    "int": lambda: 42,
    "zero": lambda: 0,
    "negative int": lambda: -7,
    "64-bit bounds": lambda: [-(2**63), 2**63 - 1, 2**64 - 1],
    "just past 64 bits": lambda: [2**64, -(2**63) - 1],
    "big int": lambda: 10**100,
    "big negative int": lambda: -(10**100),
    "int past str()'s digit limit": lambda: 7**6000,
    "float": lambda: 1.5,
    "floats": lambda: [0.1, 1e16, 5e-324, 1.7976931348623157e308, 1e-7, 123456789.123456789],
    "zero float": lambda: 0.0,
    "negative zero": lambda: -0.0,
    "nan": lambda: NAN,
    "negative nan": lambda: -NAN,
    "inf": lambda: float("inf"),
    "-inf": lambda: float("-inf"),
    "true": lambda: True,
    "false": lambda: False,
    "bool, int and float": lambda: [True, 1, 1.0, False, 0, 0.0, -0.0],
    "none": lambda: None,
    "list": lambda: [1, "a", None],
    "empty list": lambda: [],
    "tuple": lambda: (1, "a", None),
    "empty tuple": lambda: (),
    "one-tuple": lambda: ((),),
    "tuples in lists in dicts": lambda: {"a": [(1, 2), [(3,)]], "b": ({"c": (None,)},)},
    "dict": lambda: {"b": 1, "a": [2]},
    "empty dict": lambda: {},
    "int keys": lambda: {1: "a", 2: "b"},
    "float keys": lambda: {1.5: "x", -0.0: "z", float("inf"): "y", NAN: "n"},
    "bool keys": lambda: {True: "t", False: "f"},
    "none key": lambda: {None: 0},
    "mixed keys in order": lambda: {"1": "s", 2: "i", 2.5: "f", None: "n", False: "b"},
    "big int key": lambda: {2**70: "big", -(2**70): "small"},
    "surrogate key": lambda: {"\udc80": 1, "ok": 2},
    "data that looks like tags": lambda: [["t", [1]], {"t": ["i", "ff"]}, ("d", "l", "f")],
    "tag lookalikes in a tagged value": lambda: ("t", ["i", "ff"], ["f", "nan"], ["s", "00"]),
    "nan inside a dict": lambda: {"scores": [1.0, NAN, float("-inf")]},
    "deep plain": lambda: _nested(254, "leaf", tuples=False),
    "deep tagged": lambda: _nested(200, 2**100),
    "254 levels": lambda: _nested(254, 1),
}


class Colour(enum.Enum):
    RED = 1


class Level(enum.IntEnum):
    HIGH = 3


class Role(enum.StrEnum):
    ADMIN = "admin"


@dataclasses.dataclass
class Point:
    x: int


class Tag(str):
    pass


class Count(int):
    pass


class Ratio(float):
    pass


class Items(list[Any]):
    pass


class Attrs(dict[str, Any]):
    pass


class Pair(NamedTuple):
    a: int
    b: int


class Model:
    def model_dump(self) -> dict[str, Any]:
        return {}


def _cycle() -> list[Any]:
    value: list[Any] = [1]
    value.append(value)
    return value


# name -> (factory, a piece of the message that tells what is wrong or what to do).
REFUSED: dict[str, tuple[Callable[[], Any], str]] = {
    "datetime": (lambda: datetime.datetime(2024, 1, 2, 3, 4), "isoformat()"),
    "aware datetime": (
        lambda: datetime.datetime(2024, 1, 2, tzinfo=datetime.UTC),
        "isoformat()",
    ),
    "date": (lambda: datetime.date(2024, 1, 2), "isoformat()"),
    "time": (lambda: datetime.time(3, 4), "isoformat()"),
    "timedelta": (lambda: datetime.timedelta(seconds=5), "total_seconds()"),
    "decimal": (lambda: decimal.Decimal("1.10"), "str(value)"),
    "uuid": (lambda: uuid.UUID(int=5), "str(value)"),
    "set": (lambda: {1, 2}, "list"),
    "frozenset": (lambda: frozenset({1}), "list"),
    "bytes": (lambda: b"raw", "hex()"),
    "bytearray": (lambda: bytearray(b"raw"), "hex()"),
    "complex": (lambda: 1 + 2j, "complex"),
    "object": (lambda: object(), "object"),
    "enum": (lambda: Colour.RED, ".value"),
    "int enum": (lambda: Level.HIGH, ".value"),
    "str enum": (lambda: Role.ADMIN, ".value"),
    "dataclass": (lambda: Point(1), "asdict"),
    "str subclass": (lambda: Tag("a"), "str(value)"),
    "int subclass": (lambda: Count(3), "int(value)"),
    "float subclass": (lambda: Ratio(0.5), "float(value)"),
    "list subclass": (lambda: Items([1]), "list(value)"),
    "dict subclass": (lambda: Attrs(a=1), "dict(value)"),
    "OrderedDict": (lambda: collections.OrderedDict(a=1), "dict(value)"),
    "defaultdict": (lambda: collections.defaultdict(list), "dict(value)"),
    "Counter": (lambda: collections.Counter("aab"), "dict(value)"),
    "range": (lambda: range(3), "range"),
    "generator": (lambda: (i for i in range(3)), "generator"),
    "namedtuple": (lambda: Pair(1, 2), "_asdict()"),
    "dataclass class": (lambda: Point, "type"),
    "pydantic-like model": (lambda: Model(), "model_dump"),
    "tuple dict key": (lambda: {(1, 2): "x"}, "dict key"),
    "str-subclass dict key": (lambda: {Tag("a"): 1}, "dict key"),
    "too deep": (lambda: _nested(255, 1), "254 levels"),
    "too deep, plain JSON": (lambda: _nested(255, 1, tuples=False), "254 levels"),
    "too deep by a tagged leaf": (lambda: _nested(254, 2**64), "254 levels"),
    "contains itself": (_cycle, "contains itself"),
}


def _values_app(redis: Any, key_prefix: str) -> Starlette:
    async def put(request: Request) -> Response:
        request.session["v"] = ACCEPTED[request.path_params["name"]]()
        return PlainTextResponse("ok")

    async def check(request: Request) -> Response:
        value = request.session["v"]
        expected = ACCEPTED[request.path_params["name"]]()
        return JSONResponse({"same": _same(value, expected), "got": _show(value)})

    async def add_refused(request: Request) -> Response:
        # Nested mutation: no __setitem__ sees it, so only the save can refuse it.
        request.session["box"]["items"].append(REFUSED[request.path_params["name"]][0]())
        return PlainTextResponse("ok")

    async def assign_refused(request: Request) -> Response:
        request.session["when"] = REFUSED[request.path_params["name"]][0]()
        return PlainTextResponse("not reached")

    async def dump(request: Request) -> Response:
        return PlainTextResponse(repr(dict(request.session)))

    async def box(request: Request) -> Response:
        request.session["box"] = {"items": [1]}
        return PlainTextResponse("ok")

    routes = [
        Route("/put/{name}", put, methods=["POST"]),
        Route("/check/{name}", check),
        Route("/box", box, methods=["POST"]),
        Route("/add-refused/{name}", add_refused, methods=["POST"]),
        Route("/assign-refused/{name}", assign_refused, methods=["POST"]),
        Route("/dump", dump),
    ]
    middleware = [
        Middleware(SessionMiddleware, secret_key=SECRET, redis=redis, key_prefix=key_prefix)
    ]
    return Starlette(routes=routes, middleware=middleware)


# -- accepted values come back exactly ---------------------------------------------


@pytest.mark.parametrize("name", list(ACCEPTED))
async def test_accepted_value_round_trips_exactly(
    name: str, fake_redis: Redis, key_prefix: str, make_client: Callable[..., httpx.AsyncClient]
) -> None:
    client = make_client(_values_app(fake_redis, key_prefix))
    assert (await client.post(f"/put/{name}")).status_code == 200
    response = await client.get(f"/check/{name}")
    assert response.status_code == 200
    assert response.json()["same"], response.json()["got"]


def test_same_is_strict() -> None:
    """The comparison the round trips rely on tells apart what == does not."""
    assert _same([1, (2.0,), {None: NAN}], [1, (2.0,), {None: NAN}])
    for a, b in [
        (True, 1),
        (1, 1.0),
        ((1,), [1]),
        (0.0, -0.0),
        (NAN, -NAN),
        ({"a": 1, "b": 2}, {"b": 2, "a": 1}),
        ({1: "a"}, {"1": "a"}),
    ]:
        assert not _same(a, b), (a, b)


@pytest.mark.real_redis
async def test_every_accepted_value_round_trips_through_real_redis(
    real_redis: Redis, key_prefix: str, make_client: Callable[..., httpx.AsyncClient]
) -> None:
    """End to end on a real server: one session holding every accepted value."""

    async def put_all(request: Request) -> Response:
        request.session.update({name: factory() for name, factory in ACCEPTED.items()})
        return PlainTextResponse("ok")

    async def check_all(request: Request) -> Response:
        wrong = [
            name
            for name, factory in ACCEPTED.items()
            if not _same(request.session.get(name), factory())
        ]
        return JSONResponse(wrong)

    app = Starlette(
        routes=[Route("/put", put_all, methods=["POST"]), Route("/check", check_all)],
        middleware=[
            Middleware(
                SessionMiddleware, secret_key=SECRET, redis=real_redis, key_prefix=key_prefix
            )
        ],
    )
    client = make_client(app)
    assert (await client.post("/put")).status_code == 200
    assert (await client.get("/check")).json() == []
    # A second client on the same cookie: nothing came from process memory.
    other = make_client(app, cookies=dict(client.cookies))
    assert (await other.get("/check")).json() == []


# -- refused values raise where they are stored -------------------------------------


@pytest.mark.parametrize("name", list(REFUSED))
def test_refused_value_raises_at_assignment(name: str, fake_redis: Redis) -> None:
    factory, advice = REFUSED[name]
    session = Session(SessionStore(fake_redis))
    with pytest.raises(TypeError, match=r"session\['when'\]") as caught:
        session["when"] = factory()
    assert advice in str(caught.value)
    assert "when" not in session


@pytest.mark.parametrize(
    "store",
    [
        lambda s, v: s.update({"ok": 1, "when": v}),
        lambda s, v: s.update([("ok", 1), ("when", v)]),
        lambda s, v: s.update(ok=1, when=v),
        lambda s, v: s.setdefault("when", v),
        lambda s, v: s.__ior__({"ok": 1, "when": v}),
    ],
    ids=["update-dict", "update-pairs", "update-kwargs", "setdefault", "ior"],
)
def test_every_way_of_storing_checks_the_value(
    store: Callable[[Session, Any], Any], fake_redis: Redis
) -> None:
    session = Session(SessionStore(fake_redis))
    with pytest.raises(TypeError, match=r"session\['when'\] holds a datetime\.datetime"):
        store(session, datetime.datetime(2024, 1, 1))
    assert dict(session) == {}  # all or nothing: "ok" was not stored either


def test_accepted_values_store_every_way(fake_redis: Redis) -> None:
    session = Session(SessionStore(fake_redis))
    session["a"] = (1,)
    session.update({"b": 2**70}, c={1: 2})
    session.update([("d", NAN)])
    session.setdefault("e", -0.0)
    session.setdefault("a", object())  # present: the default is never stored
    session |= {"f": None}
    session.update(self=[1])  # a key named like the method's first parameter
    assert _same(
        dict(session),
        {"a": (1,), "b": 2**70, "c": {1: 2}, "d": NAN, "e": -0.0, "f": None, "self": [1]},
    )


@pytest.mark.parametrize("key", [1, None, ("a",), b"k", Tag("k"), "\ud800"])
def test_bad_session_keys_raise_at_assignment(key: Any, fake_redis: Redis) -> None:
    session = Session(SessionStore(fake_redis))
    with pytest.raises(TypeError, match="session key"):
        session[key] = 1
    with pytest.raises(TypeError, match="session key"):
        session.update({key: 1})
    assert dict(session) == {}


@pytest.mark.parametrize("name", ["datetime", "set", "int enum", "tuple dict key"])
async def test_refused_assignment_raises_in_the_handler(
    name: str, fake_redis: Redis, key_prefix: str
) -> None:
    """The traceback points at the handler's line, not at the middleware's save."""
    app = _values_app(fake_redis, key_prefix)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app), base_url="http://testserver"
    ) as client:
        with pytest.raises(TypeError, match=r"session\['when'\]") as caught:
            await client.post(f"/assign-refused/{name}")
    frames = [entry.name for entry in caught.traceback]
    assert "assign_refused" in frames
    assert frames[frames.index("assign_refused") + 1] == "__setitem__"


@pytest.mark.parametrize("name", ["datetime", "tuple dict key", "contains itself", "set"])
async def test_nested_refused_value_fails_the_request_and_keeps_the_record(
    name: str, fake_redis: Redis, key_prefix: str, make_client: Callable[..., httpx.AsyncClient]
) -> None:
    """Nested mutation is only seen at save time: the request fails with the
    TypeError (the app's 500, a programming error) and the stored record is kept."""
    app = _values_app(fake_redis, key_prefix)
    client = make_client(app)
    await client.post("/box")
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app),  # raises what the app raised
        base_url="http://testserver",
        cookies=dict(client.cookies),
    ) as raising:
        with pytest.raises(TypeError, match=r"session\['box'\]\['items'\]\[1\]"):
            await raising.post(f"/add-refused/{name}")
    response = await client.post(f"/add-refused/{name}")
    assert response.status_code == 500
    assert (await client.get("/dump")).text == "{'box': {'items': [1]}}"


# -- stored form: compatible, deterministic, never rewritten needlessly -------------


@pytest.mark.real_redis
async def test_plain_json_values_are_stored_as_plain_orjson(
    real_redis: Redis,
    key_prefix: str,
    peek: Redis,
    make_client: Callable[..., httpx.AsyncClient],
) -> None:
    """Values JSON keeps exactly are stored as before, so records stay readable by
    older versions and any JSON tool; the others get the tagged form."""
    client = make_client(_values_app(real_redis, key_prefix))
    plain = {"dict": {"b": 1, "a": [2]}, "64-bit bounds": [-(2**63), 2**63 - 1, 2**64 - 1]}
    for name, value in plain.items():
        await client.post(f"/put/{name}")
        (key,) = await stored_keys(peek, key_prefix)
        assert await peek.hget(key, "d:v") == orjson.dumps(value)
    await client.post("/put/tuple")
    stored = await peek.hget(key, "d:v")
    assert stored is not None
    assert stored[:1] == b"\x01"


@pytest.mark.real_redis
async def test_records_written_as_plain_orjson_still_load(
    real_redis: Redis, key_prefix: str, peek: Redis, make_client: Callable[..., httpx.AsyncClient]
) -> None:
    session_id = "B" * 43
    await peek.hset(
        f"{key_prefix}{session_id}",
        mapping={
            "d:visits": b"3",
            "d:cart": b'["a",{"b":1.5,"c":null,"d":true}]',
            "d:when": b'"2024-01-02T03:04:00"',
            "d:big": b"18446744073709551615",
            "d:nothing": b"null",
            "m:created": str(int(time.time() * 1000)).encode(),
        },
    )
    cookie = CookieSigner(SECRET).sign(session_id)
    client = make_client(_values_app(real_redis, key_prefix), cookies={"session": cookie})
    response = await client.get("/dump")
    assert response.text == repr(
        {
            "visits": 3,
            "cart": ["a", {"b": 1.5, "c": None, "d": True}],
            "when": "2024-01-02T03:04:00",
            "big": 18446744073709551615,
            "nothing": None,
        }
    )
    assert cookie_of(response) is None


@pytest.mark.real_redis
@pytest.mark.parametrize(
    "name", ["tuple", "big int", "nan", "int keys", "lone surrogates", "tuples in lists in dicts"]
)
async def test_unchanged_tagged_value_is_not_rewritten(
    name: str,
    real_redis: Redis,
    key_prefix: str,
    spy: RedisSpy,
    make_client: Callable[..., httpx.AsyncClient],
) -> None:
    """Encoding is deterministic: loading and re-encoding gives the stored bytes."""
    client = make_client(_values_app(real_redis, key_prefix))
    assert (await client.post(f"/put/{name}")).status_code == 200
    spy.reset()
    response = await client.get(f"/check/{name}")
    assert response.json()["same"]
    assert dict(spy.commands) == {"EVALSHA": 1}  # the load; no save
    assert spy.round_trips == 1
    assert cookie_of(response) is None


@pytest.mark.parametrize(
    "blob",
    [
        b"\x01",
        b"\x01[",
        b"\x01[]",
        b'\x01["x",1]',
        b'\x01["i","zz"]',
        b'\x01["i",5]',
        b'\x01["f","nan2"]',
        b'\x01["s","d8"]',
        b'\x01["s","zz"]',
        b'\x01["d",1]',
        b'\x01["d",["l"],2]',
        b'\x01["d",{},2]',
        b'\x01["l",["q"]]',
        b"\x01" + b'["l",' * 600 + b"1" + b"]" * 600,
        b"\x01" + b'{"a":' * 600 + b"1" + b"}" * 600,
        b"\x02[]",
        b"",
    ],
)
async def test_corrupt_tagged_field_is_an_empty_session_not_an_error(
    blob: bytes, fake_redis: Redis, key_prefix: str, make_client: Callable[..., httpx.AsyncClient]
) -> None:
    session_id = "C" * 43
    await fake_redis.hset(
        f"{key_prefix}{session_id}", mapping={"d:v": blob, "m:created": b"9999999999999"}
    )
    cookie = CookieSigner(SECRET).sign(session_id)
    client = make_client(_values_app(fake_redis, key_prefix), cookies={"session": cookie})
    response = await client.get("/dump")
    assert (response.status_code, response.text) == (200, "{}")


async def test_counter_stays_a_plain_integer_field(
    fake_redis: Redis, key_prefix: str, make_client: Callable[..., httpx.AsyncClient]
) -> None:
    """incr() works on the plain form (HINCRBY) and reads back as an int."""

    async def visit(request: Request) -> Response:
        return PlainTextResponse(str(await Session.of(request).incr("visits")))

    app = _values_app(fake_redis, key_prefix)
    app.router.routes.append(Route("/visit", visit, methods=["POST"]))
    client = make_client(app)
    assert [(await client.post("/visit")).text for _ in range(3)] == ["1", "2", "3"]
    await client.post("/box")
    key = f"{key_prefix}{session_id_of(client.cookies['session'])}"
    assert await fake_redis.hget(key, "d:visits") == b"3"
    assert "'visits': 3," in (await client.get("/dump")).text


def _random_value(rng: random.Random, depth: int = 0) -> Any:
    """A random accepted value: the corners above, mixed and nested."""
    scalars: list[Callable[[], Any]] = [
        lambda: rng.choice(["", "a", "é", "\ud800", "\x01", "t", "l", "null", "☃" * 3]),
        lambda: rng.choice([0, 1, -1, 2**63 - 1, -(2**63), 2**64 - 1, 2**64, -(2**63) - 1]),
        lambda: rng.randint(-(2**200), 2**200),
        lambda: rng.choice([0.0, -0.0, 0.1, 1e300, 5e-324, NAN, -NAN, math.inf, -math.inf]),
        lambda: rng.choice([True, False, None]),
    ]
    if depth >= 4 or rng.random() < 0.4:
        return rng.choice(scalars)()
    size = rng.randint(0, 4)
    kind = rng.choice(["list", "tuple", "dict", "keys"])
    if kind == "list":
        return [_random_value(rng, depth + 1) for _ in range(size)]
    if kind == "tuple":
        return tuple(_random_value(rng, depth + 1) for _ in range(size))
    if kind == "dict":
        return {
            rng.choice(["a", "b", "\udc80", "t"]): _random_value(rng, depth + 1)
            for _ in range(size)
        }
    keys = [rng.choice(scalars)() for _ in range(size)]
    return {key: _random_value(rng, depth + 1) for key in keys}


def test_random_values_round_trip_and_encode_deterministically() -> None:
    """Seeded, bounded: the stored bytes decode to the same value, which encodes to
    the same bytes again (so loading never makes an unchanged session look changed);
    the plain form is used exactly when orjson alone keeps the value."""
    rng = random.Random(20261201)
    for _ in range(3000):
        value = _random_value(rng)
        blob = encode("k", value)
        back = decode(blob)
        assert _same(back, value), (value, blob)
        assert encode("k", back) == blob
        assert encode_all({"k": value}) == {"k": blob}
        if blob[:1] != b"\x01":
            assert _same(orjson.loads(blob), value)


@pytest.mark.parametrize(
    "mutate",
    [
        lambda d: None,
        lambda d: d.__setitem__("n", d["n"] + 1),
        lambda d: d.__setitem__("n", int("7")),  # an equal int, another object
        lambda d: d.__setitem__("s", "".join(["ab", "c"])),  # an equal str, another object
        lambda d: d.__setitem__("s", "abd"),
        lambda d: d.__setitem__("f", -0.0),
        lambda d: d["cart"].append(4),
        lambda d: d["nested"]["k"].append(None),
        lambda d: d.__setitem__("t", (1, 2)),
        lambda d: d["t"][1].append(3),  # inside a tuple, which is not immutable then
        lambda d: d.pop("n"),
        lambda d: d.__setitem__("new", 1),
        lambda d: (d.pop("n"), d.__setitem__("other", 7)),
        lambda d: d["cart"].append(datetime.date(2026, 1, 1)),
        lambda d: d.__setitem__("n", True),
    ],
)
def test_the_check_after_a_save_agrees_with_encoding_everything(
    mutate: Callable[[dict[str, Any]], Any],
) -> None:
    """differs skips the values still the very immutable objects it encoded, and
    must still answer exactly what comparing a fresh encode_all would."""
    data: dict[str, Any] = {
        "n": 7,
        "s": "abc",
        "f": 0.0,
        "none": None,
        "b": False,
        "cart": [1, 2, 3],
        "nested": {"k": [1]},
        "t": (1, [2]),
    }
    values = dict(data)
    snapshot = encode_all(values)
    mutate(data)

    def answer(check: Callable[[], bool]) -> bool | str:
        try:
            return check()
        except TypeError:
            return "TypeError"

    expected = answer(lambda: encode_all(data) != snapshot)
    assert answer(lambda: differs(data, snapshot, values)) == expected
    # With nothing known about the values (before any save) it is the full encode.
    assert answer(lambda: differs(data, snapshot, {})) == expected
