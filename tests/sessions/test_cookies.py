"""Issue 2 items 4, 5 and 11: ids, signing, cookie attributes and hostile cookies."""

from __future__ import annotations

import base64
import hashlib
import secrets
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from itsdangerous import Signer, TimestampSigner
from redis.asyncio import Redis
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.types import Message

from asgi_redis_kit import CookieTooLarge, SessionMiddleware
from asgi_redis_kit.sessions._cookie import CookieSigner
from asgi_redis_kit.sessions._saving import new_session_id
from tests.support import RedisSpy

from .conftest import SALT, SECRET, build_app, cookie_of, session_id_of, stored_keys


def _flip(value: str, at: int) -> str:
    return value[:at] + ("A" if value[at] != "A" else "B") + value[at + 1 :]


def _attributes(header: str) -> dict[str, str]:
    parts = [part.strip() for part in header.split(";")[1:]]
    return {k.lower(): v for k, _, v in (part.partition("=") for part in parts)}


# -- ids ---------------------------------------------------------------------------


def test_hundred_thousand_ids_are_unique_and_256_bits() -> None:
    """Checklist 8."""
    ids = {new_session_id() for _ in range(100_000)}
    assert len(ids) == 100_000
    for session_id in list(ids)[:1000]:
        assert len(base64.urlsafe_b64decode(session_id + "=")) * 8 == 256


def test_ids_come_from_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []

    def fake(nbytes: int) -> str:
        calls.append(nbytes)
        return "x" * 43

    monkeypatch.setattr(secrets, "token_urlsafe", fake)
    assert new_session_id() == "x" * 43
    assert calls == [32]


# -- signing -----------------------------------------------------------------------


def test_signer_round_trip_and_tamper() -> None:
    signer = CookieSigner(SECRET)
    session_id = new_session_id()
    value = signer.sign(session_id)
    assert signer.unsign(value) == (session_id, False)
    assert session_id_of(value) == session_id  # the cookie holds only the signed id
    # Not the last character: its two low bits are base64 padding and ignored.
    tampered = _flip(value, 50)
    assert signer.unsign(tampered) is None
    assert signer.unsign(new_session_id() + value[43:]) is None  # signature of another id


def test_same_secret_other_salt_is_rejected() -> None:
    """Checklist 5."""
    session_id = new_session_id()
    for salt in ("itsdangerous.Signer", "other.purpose", SALT + "x"):
        forged = Signer(SECRET, salt=salt, digest_method=hashlib.sha256).sign(session_id)
        assert CookieSigner(SECRET).unsign(forged.decode()) is None
    ours = Signer(SECRET, salt=SALT, digest_method=hashlib.sha256).sign(session_id)
    assert CookieSigner(SECRET).unsign(ours.decode()) == (session_id, False)


def test_key_rotation_old_accepted_and_resigned_then_dropped() -> None:
    """Checklist 6 at the signer level."""
    session_id = new_session_id()
    old_cookie = CookieSigner("old").sign(session_id)
    assert CookieSigner(["old", "new"]).unsign(old_cookie) == (session_id, True)
    new_cookie = CookieSigner(["old", "new"]).sign(session_id)
    assert new_cookie == CookieSigner("new").sign(session_id)
    assert CookieSigner(["old", "new"]).unsign(new_cookie) == (session_id, False)
    assert CookieSigner(["new"]).unsign(old_cookie) is None


def test_timestamped_tokens_and_clock_skew() -> None:
    """Checklist 7: the cookie carries no timestamp (expiry is server-side), so no
    clock skew between app servers can reject it; a TimestampSigner token, future
    dated or not, is not a cookie of ours."""
    session_id = new_session_id()
    value = CookieSigner(SECRET).sign(session_id)
    assert "." not in session_id
    assert value.count(".") == 1
    for skew in (-2, 2, 3600):
        token = _skewed_signer(skew).sign(session_id)
        assert CookieSigner(SECRET).unsign(token.decode()) is None


def _skewed_signer(skew: int) -> TimestampSigner:
    class Skewed(TimestampSigner):
        def get_timestamp(self) -> int:
            return int(time.time()) + skew

    return Skewed(SECRET, salt=SALT, digest_method=hashlib.sha256)


@pytest.mark.parametrize("bad", ["", [], [""], ["ok", ""]])
def test_secret_key_must_not_be_empty(bad: Any) -> None:
    with pytest.raises(ValueError, match="secret_key"):
        CookieSigner(bad)


def test_repr_hides_secrets() -> None:
    app = SessionMiddleware(PlainTextResponse("x"), secret_key="hunter2", redis="memory://r")
    assert "hunter2" not in repr(app)
    assert "hunter2" not in repr(app.signer)


# -- attributes --------------------------------------------------------------------


@pytest.mark.real_redis
async def test_default_cookie_attributes_on_https(
    real_redis: Redis, key_prefix: str, make_client: Callable[..., httpx.AsyncClient]
) -> None:
    """Checklist 9."""
    app = build_app(real_redis, key_prefix=key_prefix)
    response = await make_client(app, base_url="https://example.test").post("/set", json={"a": 1})
    header = response.headers["set-cookie"]
    assert len(header) <= 4096
    attributes = _attributes(header)
    assert attributes["path"] == "/"
    assert attributes["samesite"] == "Lax"
    assert "httponly" in attributes
    assert "secure" in attributes
    assert "domain" not in attributes
    assert "partitioned" not in attributes
    assert attributes["max-age"] == str(30 * 24 * 3600)


@pytest.mark.real_redis
async def test_auto_secure_is_off_on_plain_http(
    real_redis: Redis, key_prefix: str, make_client: Callable[..., httpx.AsyncClient]
) -> None:
    app = build_app(real_redis, key_prefix=key_prefix)
    client = make_client(app, base_url="http://localhost")
    response = await client.post("/set", json={"a": 1})
    attributes = _attributes(response.headers["set-cookie"])
    assert "secure" not in attributes
    assert "httponly" in attributes
    # ... so http://localhost development keeps its session.
    assert (await client.get("/read")).json() == {"a": 1}


@pytest.mark.real_redis
async def test_host_prefix_domain_path_partitioned(
    real_redis: Redis, key_prefix: str, make_client: Callable[..., httpx.AsyncClient]
) -> None:
    app = build_app(
        real_redis,
        key_prefix=key_prefix,
        host_prefix=True,
        partitioned=True,
        same_site="strict",
        idle_timeout=60,
        absolute_lifetime=None,
    )
    response = await make_client(app, base_url="https://example.test").post("/set", json={"a": 1})
    header = response.headers["set-cookie"]
    assert header.startswith("__Host-session=")
    attributes = _attributes(header)
    assert {"secure", "httponly", "partitioned"} <= set(attributes)
    assert attributes["samesite"] == "Strict"
    assert attributes["path"] == "/"
    assert "domain" not in attributes
    assert attributes["max-age"] == "60"

    app = build_app(real_redis, key_prefix=key_prefix, domain="example.test", path="/app")
    response = await make_client(app).post("/set", json={"a": 1})
    attributes = _attributes(response.headers["set-cookie"])
    assert attributes["domain"] == "example.test"
    assert attributes["path"] == "/app"


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"host_prefix": True, "secure": False}, "Secure"),
        ({"host_prefix": True, "domain": "example.com"}, "Domain"),
        ({"host_prefix": True, "path": "/app"}, "path='/'"),
        ({"same_site": "none", "secure": False}, "Secure"),
        ({"partitioned": True, "secure": False}, "Secure"),
        ({"same_site": "loose"}, "same_site"),
        ({"cookie_name": "bad name"}, "cookie name"),
        ({"path": "/a;b"}, "path"),
        ({"domain": "x.com; Secure"}, "domain"),
        ({"idle_timeout": 0}, "idle_timeout"),
        ({"absolute_lifetime": -1}, "absolute_lifetime"),
    ],
)
def test_bad_config_is_a_clear_value_error(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SessionMiddleware(PlainTextResponse("x"), secret_key=SECRET, redis="memory://", **options)


def test_cookie_over_4096_bytes_is_refused_at_config_time() -> None:
    with pytest.raises(CookieTooLarge, match="4096"):
        SessionMiddleware(
            PlainTextResponse("x"), secret_key=SECRET, redis="memory://", path="/" + "a" * 4100
        )


# -- hostile cookies (checklist 1, 3, 4) -------------------------------------------

HOSTILE = [
    "",
    "x" * 10_240,
    "\x00",
    "a\r\nSet-Cookie: evil=1",
    "a;b",
    "*",
    "../../etc/passwd",
    '"quoted"',
]


@pytest.mark.real_redis
@pytest.mark.parametrize("value", HOSTILE)
async def test_hostile_cookie_values_get_a_fresh_session_without_touching_redis(
    app: Starlette, spy: RedisSpy, peek: Redis, key_prefix: str, value: str
) -> None:
    transport = httpx.ASGITransport(app)
    raw = f"session={value}".encode("latin-1", "replace")
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        response = await client.get("/read", headers={"cookie": raw.decode("latin-1")})
        assert response.status_code == 200
        assert response.json() == {}
        assert spy.total == 0
        response = await client.post(
            "/set", json={"a": 1}, headers={"cookie": raw.decode("latin-1")}
        )
    assert response.status_code == 200
    cookie = cookie_of(response)
    assert cookie
    assert await stored_keys(peek, key_prefix) == [f"{key_prefix}{session_id_of(cookie)}"]


@pytest.mark.real_redis
async def test_non_utf8_and_raw_bytes_cookie_header(app: Starlette, spy: RedisSpy) -> None:
    """httpx cannot send these bytes, so speak ASGI directly."""
    messages: list[Message] = []

    async def receive() -> Message:
        return {"type": "http.request", "body": b""}

    async def send(message: Message) -> None:
        messages.append(message)

    for raw in (b"session=\xff\xfe\xfd", b"session=\xc3\x28.\x00", b"\xff=\xff; session"):
        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": "GET",
            "scheme": "http",
            "path": "/read",
            "raw_path": b"/read",
            "query_string": b"",
            "root_path": "",
            "headers": [(b"cookie", raw)],
            "client": ("127.0.0.1", 1),
            "server": ("t", 80),
        }
        messages.clear()
        await app(scope, receive, send)
        assert messages[0]["status"] == 200
    assert spy.total == 0


@pytest.mark.real_redis
async def test_tampered_signature_never_reaches_redis(
    client: httpx.AsyncClient, spy: RedisSpy, app: Starlette, peek: Redis, key_prefix: str
) -> None:
    """Checklist 1."""
    cookie = cookie_of(await client.post("/set", json={"secret": "data"}))
    assert cookie
    spy.reset()
    tampered = _flip(cookie, 60)
    transport = httpx.ASGITransport(app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as other:
        response = await other.get("/read", headers={"cookie": f"session={tampered}"})
    assert response.json() == {}
    assert spy.total == 0
    assert len(await stored_keys(peek, key_prefix)) == 1


@pytest.mark.real_redis
async def test_session_id_in_query_or_header_is_ignored(
    client: httpx.AsyncClient, app: Starlette, spy: RedisSpy
) -> None:
    """Checklist 4."""
    cookie = cookie_of(await client.post("/set", json={"secret": "data"}))
    assert cookie
    spy.reset()
    transport = httpx.ASGITransport(app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as other:
        for url, headers in [
            (f"/read?session={cookie}", {}),
            (f"/read?session_id={session_id_of(cookie)}", {}),
            ("/read", {"x-session": cookie, "authorization": f"Bearer {cookie}"}),
            ("/read", {"x-session-id": session_id_of(cookie)}),
        ]:
            response = await other.get(url, headers=headers)
            assert response.json() == {}
    assert spy.total == 0


@pytest.mark.real_redis
async def test_duplicate_cookies_first_valid_wins(
    client: httpx.AsyncClient, app: Starlette
) -> None:
    cookie = cookie_of(await client.post("/set", json={"who": "me"}))
    assert cookie
    transport = httpx.ASGITransport(app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as other:
        for header in (
            f"session=garbage; session={cookie}",
            f"session={cookie}; session=garbage",
            f"session={cookie}; other=1; session={cookie}",
        ):
            response = await other.get("/read", headers={"cookie": header})
            assert response.status_code == 200
            assert response.json() == {"who": "me"}


@pytest.mark.real_redis
async def test_rotated_key_cookie_is_accepted_and_resigned(
    real_redis: Redis, key_prefix: str, make_client: Callable[..., httpx.AsyncClient]
) -> None:
    """Checklist 6 end to end."""
    old_app = build_app(real_redis, key_prefix=key_prefix, secret_key="old")
    old_cookie = cookie_of(await make_client(old_app).post("/set", json={"a": 1}))
    assert old_cookie
    rotating = build_app(real_redis, key_prefix=key_prefix, secret_key=["old", "new"])
    client = make_client(rotating, cookies={"session": old_cookie})
    response = await client.get("/read")
    assert response.json() == {"a": 1}
    new_cookie = cookie_of(response)
    assert new_cookie
    assert new_cookie != old_cookie
    assert session_id_of(new_cookie) == session_id_of(old_cookie)  # same session
    assert CookieSigner("new").unsign(new_cookie) is not None
    new_only = build_app(real_redis, key_prefix=key_prefix, secret_key="new")
    assert (await make_client(new_only, cookies={"session": new_cookie}).get("/read")).json() == {
        "a": 1
    }
    stale = make_client(new_only, cookies={"session": old_cookie})
    assert (await stale.get("/read")).json() == {}
