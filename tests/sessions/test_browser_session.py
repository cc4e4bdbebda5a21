"""``browser_session=True``: a cookie that ends with the browser, a session that
still ends on the server.

The cookie carries neither Max-Age nor Expires, so the browser drops it when it
closes (Starlette's ``max_age=None``). Browsers that restore tabs keep such
cookies across restarts, so the idle timeout (the Redis TTL) and the absolute
lifetime still end the session server-side.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis

from asgi_redis_kit import SessionMiddleware, SessionStore

from .conftest import build_app, cookie_of, session_id_of


def _attribute_names(header: str) -> list[str]:
    return [part.strip().partition("=")[0].lower() for part in header.split(";")[1:]]


@pytest.mark.real_redis
async def test_cookie_has_no_lifetime_but_the_record_has_the_idle_ttl(
    real_redis: Redis, key_prefix: str, make_client: Callable[..., httpx.AsyncClient]
) -> None:
    app = build_app(real_redis, key_prefix=key_prefix, idle_timeout=600, browser_session=True)
    client = make_client(app, base_url="https://example.test")
    response = await client.post("/set", json={"a": 1})
    header = response.headers["set-cookie"]
    names = _attribute_names(header)
    assert "max-age" not in names
    assert "expires" not in names
    assert {"path", "httponly", "samesite", "secure"} <= set(names)
    cookie = cookie_of(response)
    assert cookie
    key = key_prefix + session_id_of(cookie)
    assert 590_000 < await real_redis.pttl(key) <= 600_000
    assert (await client.get("/read")).json() == {"a": 1}


@pytest.mark.real_redis
async def test_clear_still_expires_the_cookie(
    real_redis: Redis, key_prefix: str, make_client: Callable[..., httpx.AsyncClient]
) -> None:
    app = build_app(real_redis, key_prefix=key_prefix, browser_session=True)
    client = make_client(app)
    await client.post("/set", json={"a": 1})
    header = (await client.post("/logout")).headers["set-cookie"]
    assert "Max-Age=0" in header
    assert "Expires=Thu, 01 Jan 1970 00:00:00 GMT" in header
    assert (await client.get("/read")).json() == {}


@pytest.mark.real_redis
async def test_absolute_lifetime_ends_a_session_whose_cookie_lives_on(
    real_redis: Redis, key_prefix: str, make_client: Callable[..., httpx.AsyncClient]
) -> None:
    now = [1_800_000_000.0]
    store = SessionStore(
        real_redis, key_prefix=key_prefix, absolute_lifetime=3600, clock=lambda: now[0]
    )
    app = build_app(real_redis, wrap=False)
    wrapped = SessionMiddleware(app, secret_key="s", store=store, browser_session=True)
    client = make_client(wrapped)
    response = await client.post("/set", json={"a": 1})
    assert "max-age" not in _attribute_names(response.headers["set-cookie"])
    now[0] += 3601  # the browser still sends the cookie; the server ends the session
    assert (await client.get("/read")).json() == {}


@pytest.mark.real_redis
async def test_refreshed_session_without_absolute_lifetime_keeps_a_browser_cookie(
    real_redis: Redis, key_prefix: str, make_client: Callable[..., httpx.AsyncClient]
) -> None:
    app = build_app(real_redis, key_prefix=key_prefix, absolute_lifetime=None, browser_session=True)
    client = make_client(app)
    await client.post("/set", json={"a": 1})
    response = await client.post("/set", json={"a": 2})
    for header in response.headers.get_list("set-cookie"):
        assert "max-age" not in _attribute_names(header)
    assert (await client.get("/read")).json() == {"a": 2}


@pytest.mark.parametrize(
    ("options", "error", "message"),
    [
        ({"idle_timeout": None}, ValueError, "browser_session=True"),
        ({"browser_session": "yes"}, TypeError, "browser_session must be True or False"),
        ({"browser_session": None}, TypeError, "browser_session must be True or False"),
    ],
)
def test_bad_options_are_clear_errors(
    options: dict[str, Any], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        SessionMiddleware(build_app("memory://", wrap=False), secret_key="s", **options)
