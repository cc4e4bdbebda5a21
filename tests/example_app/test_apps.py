"""Both example apps in process, through httpx.ASGITransport, on a fresh
embedded Redis per test: the counter, login/logout, and the cached report."""

from __future__ import annotations

import re
import uuid
from collections.abc import AsyncIterator, Callable

import httpx
import pytest
from starlette.types import ASGIApp

from example_app import fastapi_app, starlette_app
from example_app.settings import COOKIE_NAME, Settings
from tests.example_app.helpers import by_id, lifespan, visits
from tests.support import RedisProcess

AppFactory = Callable[[Settings], ASGIApp]
FACTORIES: dict[str, AppFactory] = {
    "starlette": starlette_app.create_app,
    "fastapi": fastapi_app.create_app,
}
BASE_URL = "http://testserver"


@pytest.fixture(params=sorted(FACTORIES))
async def app(request: pytest.FixtureRequest) -> AsyncIterator[ASGIApp]:
    # A memory:// name of its own gives every test an empty Redis.
    settings = Settings(
        redis_url=f"memory://example-test-{uuid.uuid4().hex}",
        instance=f"unit-{request.param}",
        report_delay=0.05,
    )
    application = FACTORIES[request.param](settings)
    async with lifespan(application):
        yield application


def make_client(app: ASGIApp) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=BASE_URL)


@pytest.fixture
async def client(app: ASGIApp) -> AsyncIterator[httpx.AsyncClient]:
    async with make_client(app) as http:
        yield http


async def login(http: httpx.AsyncClient, name: str) -> httpx.Response:
    response = await http.post("/login", data={"name": name})
    assert response.status_code == 303, response.text
    assert response.headers["location"] == "/"
    return response


async def test_counter_increments(client: httpx.AsyncClient) -> None:
    seen = []
    for _ in range(3):
        response = await client.get("/")
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/html")
        seen.append(visits(response.text))
    assert seen == [1, 2, 3]
    assert "Número de visitas: <span" in response.text


async def test_reset_starts_the_counter_again(client: httpx.AsyncClient) -> None:
    for _ in range(3):
        await client.get("/")
    response = await client.post("/reset")
    assert response.status_code == 303
    assert visits((await client.get("/")).text) == 1


async def test_login_rotates_the_cookie_and_keeps_the_data(
    app: ASGIApp, client: httpx.AsyncClient
) -> None:
    await client.get("/")
    before = client.cookies[COOKIE_NAME]

    response = await login(client, "Ada Lovelace")
    after = response.cookies.get(COOKIE_NAME)
    assert after is not None
    assert after != before, "login must rotate the session id"

    page = (await client.get("/")).text
    assert by_id(page, "user") == "Ada Lovelace"
    assert by_id(page, "session-count") == "1"
    assert visits(page) == 2, "regenerate() keeps the session data"

    # The pre-login cookie is dead: replaying it gets a fresh, anonymous session.
    async with make_client(app) as replay:
        replay.cookies.set(COOKIE_NAME, before)
        replayed = (await replay.get("/")).text
    assert by_id(replayed, "user") is None
    assert visits(replayed) == 1


async def test_logout_ends_the_session(client: httpx.AsyncClient) -> None:
    await client.get("/")
    await login(client, "grace")
    logged_in_cookie = client.cookies[COOKIE_NAME]

    response = await client.post("/logout")
    assert response.status_code == 303
    expired = response.headers["set-cookie"].lower()
    assert expired.startswith(f"{COOKIE_NAME}=")
    assert "max-age=0" in expired or "expires=thu, 01 jan 1970" in expired, expired

    page = (await client.get("/")).text
    assert by_id(page, "user") is None
    assert visits(page) == 1

    client.cookies.clear()
    client.cookies.set(COOKIE_NAME, logged_in_cookie)
    assert by_id((await client.get("/")).text, "user") is None


async def test_log_out_everywhere(app: ASGIApp) -> None:
    async with make_client(app) as laptop, make_client(app) as phone:
        await login(laptop, "linus")
        await login(phone, "linus")
        page = (await laptop.get("/")).text
        assert by_id(page, "session-count") == "2"

        response = await laptop.post("/logout-everywhere")
        assert response.status_code == 303

        for device in (laptop, phone):
            page = (await device.get("/")).text
            assert by_id(page, "user") is None
            assert visits(page) == 1


async def test_report_miss_hit_and_invalidate(client: httpx.AsyncClient) -> None:
    first = await client.get("/report")
    assert first.status_code == 200
    assert first.headers["x-cache"] == "MISS"
    built = by_id(first.text, "built-at")
    assert built

    second = await client.get("/report")
    assert second.headers["x-cache"] == "HIT"
    assert by_id(second.text, "built-at") == built
    # What the browser script reads to show HIT/MISS for its own navigation.
    assert 'cache;desc="HIT"' in second.headers.get_list("server-timing")

    response = await client.post("/report/invalidate")
    assert response.status_code == 303
    assert response.headers["location"] == "/report"

    third = await client.get("/report")
    assert third.headers["x-cache"] == "MISS"
    assert by_id(third.text, "built-at") != built


async def test_rate_lookup_miss_hit_and_invalidate(client: httpx.AsyncClient) -> None:
    first = await client.get("/rate")
    assert first.status_code == 200
    assert by_id(first.text, "rate-status") == "MISS"
    value = by_id(first.text, "rate-value")
    second = await client.get("/rate")
    assert by_id(second.text, "rate-status") == "HIT"
    assert by_id(second.text, "rate-value") == value
    # The data is cached, the page is not: it greets whoever asks.
    await login(client, "Ana")
    greeted = await client.get("/rate")
    assert by_id(greeted.text, "greeting") == "Hola, Ana"
    assert by_id(greeted.text, "rate-status") == "HIT"

    response = await client.post("/rate/invalidate")
    assert response.status_code == 303
    assert response.headers["location"] == "/rate"
    third = await client.get("/rate")
    assert by_id(third.text, "rate-status") == "MISS"


async def test_report_page_explains_its_no_cache(client: httpx.AsyncClient) -> None:
    """The library would send ``max-age`` (the entry's remaining TTL); the demo sends
    ``no-cache`` so every reload reaches the server and the HIT/MISS badge is about
    this response. The page must say so, and revalidating must be the cheap 304."""
    for expected in ("MISS", "HIT"):
        response = await client.get("/report")
        assert response.headers["x-cache"] == expected
        assert response.headers["cache-control"] == "no-cache"
        note = re.search(r'id="browser-cache"[^>]*>(.*?)</p>', response.text, re.DOTALL)
        assert note is not None, "the report page does not explain its Cache-Control"
        assert "no-cache" in note.group(1)
        assert "max-age" in note.group(1)
    again = await client.get("/report", headers={"if-none-match": response.headers["etag"]})
    assert again.status_code == 304


async def test_report_is_shared_between_visitors(app: ASGIApp) -> None:
    async with make_client(app) as one, make_client(app) as two:
        # Two visitors with sessions of their own share the page the handler
        # built without reading the session. (The library keeps anonymous and
        # cookie-bearing requests in separate entries on purpose.)
        await one.get("/")
        await two.get("/")
        first = await one.get("/report")
        second = await two.get("/report")
    assert (first.headers["x-cache"], second.headers["x-cache"]) == ("MISS", "HIT")
    assert by_id(first.text, "built-at") == by_id(second.text, "built-at")


@pytest.mark.parametrize(
    "headers",
    [
        {"origin": "http://evil.example"},
        {"sec-fetch-site": "cross-site"},
        {"origin": "null"},
    ],
)
async def test_cross_site_form_posts_are_refused(
    client: httpx.AsyncClient, headers: dict[str, str]
) -> None:
    await client.get("/")
    await login(client, "mallory-target")
    for path in ("/logout", "/reset", "/logout-everywhere", "/report/invalidate"):
        response = await client.post(path, headers=headers)
        assert response.status_code == 403, path
    assert by_id((await client.get("/")).text, "user") == "mallory-target"


async def test_same_origin_form_posts_are_accepted(client: httpx.AsyncClient) -> None:
    headers = {"origin": BASE_URL, "sec-fetch-site": "same-origin"}
    response = await client.post("/login", data={"name": "eve"}, headers=headers)
    assert response.status_code == 303
    assert by_id((await client.get("/")).text, "user") == "eve"


async def test_blank_login_name_is_ignored(client: httpx.AsyncClient) -> None:
    response = await client.post("/login", data={"name": "   "})
    assert response.status_code == 303
    assert by_id((await client.get("/")).text, "user") is None


async def test_user_input_is_escaped(client: httpx.AsyncClient) -> None:
    await login(client, "<script>alert(1)</script>")
    page = (await client.get("/")).text
    assert "<script>alert(1)" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page


async def test_healthz_and_status_area(app: ASGIApp, client: httpx.AsyncClient) -> None:
    health = await client.get("/healthz")
    assert health.status_code == 200
    body = health.json()
    assert body["status"] == "ok"
    assert body["redis"] == "embedded in-process Redis"
    # The embedded Redis has no CLIENT TRACKING: the near cache steps aside.
    assert body["near_cache"] == {"state": "off", "hits": 0, "misses": 0}
    assert body["framework"] in {"Starlette", "FastAPI"}
    assert health.headers["x-served-by"] == body["instance"]

    page = (await client.get("/")).text
    assert by_id(page, "instance") == body["instance"]
    assert by_id(page, "framework") == body["framework"]
    assert by_id(page, "redis") == "embedded in-process Redis"


@pytest.mark.real_redis
@pytest.mark.parametrize("name", sorted(FACTORIES))
async def test_healthz_reports_degraded_while_redis_is_down(
    name: str, own_redis: RedisProcess
) -> None:
    """Checklist 31: with Redis gone the instance keeps answering and says so;
    the cached report still renders (the cache fails open)."""
    settings = Settings(redis_url=own_redis.url, instance="degraded", report_delay=0.01)
    application = FACTORIES[name](settings)
    async with lifespan(application), make_client(application) as http:
        assert (await http.get("/healthz")).json()["status"] == "ok"
        own_redis.stop()
        health = await http.get("/healthz")
        assert health.status_code == 200
        assert health.json()["status"] == "degraded"
        assert health.json()["redis_reachable"] is False
        report = await http.get("/report")
        assert report.status_code == 200
        assert report.headers["x-cache"] == "BYPASS"
        own_redis.start()
        assert (await http.get("/healthz")).json()["status"] == "ok"
