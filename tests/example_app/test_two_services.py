"""The library's main promise, end to end: one user, two services, one Redis.

The Starlette app and its FastAPI twin run as real uvicorn processes on two
loopback ports against the same real Redis, and a plain HTTP client with one
cookie jar moves between them. Cookies are not isolated by port, so the jar
sends the same session cookie to both, just as a browser would behind a load
balancer.
"""

from __future__ import annotations

import re
import secrets
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from redis import Redis

from example_app.settings import COOKIE_NAME
from tests.example_app.helpers import by_id, visits
from tests.example_app.servers import AppServer
from tests.support import RedisProcess

pytestmark = pytest.mark.real_redis


@pytest.fixture(scope="module")
def services(redis_url: str) -> Iterator[tuple[AppServer, AppServer]]:
    secret = secrets.token_urlsafe(32)  # shared by both, as the README tells users
    # Fast flushes into a fleet of their own, for /stats.
    fleet = {"METRICS_FLUSH_SECONDS": "0.2", "METRICS_KEY_PREFIX": f"tf{uuid.uuid4().hex[:8]}:"}
    with (
        AppServer(name="alpha", redis_url=redis_url, secret=secret, env=fleet) as alpha,
        AppServer(name="beta", fastapi=True, redis_url=redis_url, secret=secret, env=fleet) as beta,
    ):
        yield alpha, beta


def page(http: httpx.Client, server: AppServer, path: str = "/") -> str:
    response = http.get(f"{server.url}{path}")
    assert response.status_code == 200, response.text
    assert by_id(response.text, "instance") == server.name
    return response.text


def post(http: httpx.Client, server: AppServer, path: str, **data: str) -> None:
    response = http.post(f"{server.url}{path}", data=data)
    assert response.status_code == 303, response.text


def test_both_services_use_the_one_redis(services: tuple[AppServer, AppServer]) -> None:
    for server, framework in zip(services, ("Starlette", "FastAPI"), strict=True):
        health = httpx.get(f"{server.url}/healthz", timeout=5).json()
        assert health["framework"] == framework
        assert health["redis"].startswith("redis://127.0.0.1:")
        assert "embedded" not in server.log()


def test_counter_continues_across_services(services: tuple[AppServer, AppServer]) -> None:
    alpha, beta = services
    with httpx.Client(timeout=10) as http:
        counts = [visits(page(http, server)) for server in (alpha, beta, alpha, beta)]
    assert counts == [1, 2, 3, 4]


def test_login_on_one_is_seen_on_the_other(services: tuple[AppServer, AppServer]) -> None:
    alpha, beta = services
    user = f"ada-{uuid.uuid4().hex[:8]}"
    with httpx.Client(timeout=10) as http:
        page(http, alpha)
        anonymous_cookie = http.cookies[COOKIE_NAME]
        post(http, beta, "/login", name=user)
        assert http.cookies[COOKIE_NAME] != anonymous_cookie, "login must rotate the id"

        on_alpha = page(http, alpha)
        assert by_id(on_alpha, "user") == user
        assert by_id(on_alpha, "session-count") == "1"
        assert visits(on_alpha) == 2
        assert by_id(page(http, beta), "user") == user


def test_logout_on_one_ends_the_session_on_both(services: tuple[AppServer, AppServer]) -> None:
    alpha, beta = services
    user = f"grace-{uuid.uuid4().hex[:8]}"
    with httpx.Client(timeout=10) as http:
        post(http, alpha, "/login", name=user)
        logged_in = http.cookies[COOKIE_NAME]
        assert by_id(page(http, beta), "user") == user

        post(http, alpha, "/logout")
        for server in (beta, alpha):
            after = page(http, server)
            assert by_id(after, "user") is None
            assert visits(after) == 1
            http.cookies.clear()

        # Replaying the logged-in cookie on the other service does not revive it.
        http.cookies.set(COOKIE_NAME, logged_in)
        assert by_id(page(http, beta), "user") is None


def test_log_out_everywhere_reaches_the_other_service(
    services: tuple[AppServer, AppServer],
) -> None:
    alpha, beta = services
    user = f"linus-{uuid.uuid4().hex[:8]}"
    with httpx.Client(timeout=10) as laptop, httpx.Client(timeout=10) as phone:
        post(laptop, alpha, "/login", name=user)
        post(phone, beta, "/login", name=user)
        assert by_id(page(phone, alpha), "session-count") == "2"

        post(laptop, beta, "/logout-everywhere")
        assert by_id(page(phone, alpha), "user") is None
        assert by_id(page(laptop, alpha), "user") is None


def test_cached_report_is_shared_by_both_services(
    services: tuple[AppServer, AppServer],
) -> None:
    alpha, beta = services
    # The Host header is part of a cache key. Behind a load balancer both
    # services see the site's one name; here the ports differ, so send it.
    site = {"host": "shop.example"}
    with httpx.Client(timeout=10, headers=site) as http:
        # Start from a known state: the module's Redis may hold an older copy.
        post(http, beta, "/report/invalidate")
        first = http.get(f"{alpha.url}/report")
        second = http.get(f"{beta.url}/report")
    assert (first.headers["x-cache"], second.headers["x-cache"]) == ("MISS", "HIT")
    assert by_id(first.text, "built-at") == by_id(second.text, "built-at")
    # Built by alpha, answered by beta: the cached HTML is alpha's, the
    # header added outside the cache says who actually served it.
    assert by_id(second.text, "built-by") == "alpha"
    assert second.headers["x-served-by"] == "beta"
    # ...and what the page's script reads to correct the frozen footer.
    timing = second.headers["server-timing"]
    assert 'served-by;desc="beta"' in timing
    assert 'framework;desc="FastAPI"' in timing
    assert 'cache;desc="HIT"' in timing


# -- the near cache: both services keep Redis values in memory, and stay coherent --

BOUND = 2.0  # how long one service may serve what the other changed


def health(server: AppServer) -> dict[str, Any]:
    response = httpx.get(f"{server.url}/healthz", timeout=5)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def until_tracking(server: AppServer, within: float = 10.0) -> None:
    """Wait until the server's near cache tracks (its first lookup starts it)."""
    httpx.get(f"{server.url}/report", headers={"host": "shop.example"}, timeout=10)
    deadline = time.monotonic() + within
    while (state := health(server)["near_cache"]["state"]) != "tracking":
        assert time.monotonic() < deadline, f"{server.name}: near cache {state!r}"
        time.sleep(0.05)


def report(http: httpx.Client, server: AppServer) -> tuple[str, str | None]:
    response = http.get(f"{server.url}/report")
    assert response.status_code == 200, response.text
    return response.headers["x-cache"], by_id(response.text, "built-at")


def from_memory(http: httpx.Client, server: AppServer) -> str | None:
    """GET /report until one is answered from the near cache; its built-at.

    A read is not kept when an invalidation of one of its keys arrives while it
    is in flight (Redis cannot say which write it is for), so the copy may take
    a few requests."""
    for _ in range(100):
        before = health(server)["near_cache"]
        verdict, built_at = report(http, server)
        after = health(server)["near_cache"]
        if verdict == "HIT" and after["hits"] > before["hits"]:
            return built_at
        time.sleep(0.02)
    raise AssertionError(f"{server.name} never answered /report from memory")


def test_the_near_cache_tracks_on_both_services(services: tuple[AppServer, AppServer]) -> None:
    for server in services:
        until_tracking(server)


def rate_status(http: httpx.Client, server: AppServer) -> str | None:
    return by_id(page(http, server, "/rate"), "rate-status")


def test_a_rate_invalidation_on_one_makes_the_other_compute_again(
    services: tuple[AppServer, AppServer],
) -> None:
    alpha, beta = services
    with httpx.Client(timeout=10) as http:
        post(http, beta, "/rate/invalidate")
        assert rate_status(http, alpha) == "MISS"
        assert rate_status(http, beta) == "HIT"
        assert rate_status(http, alpha) == "HIT"

        post(http, beta, "/rate/invalidate")
        # alpha may hold the value in memory until Redis tells it: bounded.
        deadline = time.monotonic() + BOUND
        while (verdict := rate_status(http, alpha)) == "HIT":
            assert time.monotonic() < deadline, "alpha still serves the invalidated rate"
            time.sleep(0.02)
        assert verdict == "MISS"


def test_a_report_invalidation_on_one_reaches_the_other_s_memory(
    services: tuple[AppServer, AppServer],
) -> None:
    alpha, beta = services
    site = {"host": "shop.example"}
    with httpx.Client(timeout=10, headers=site) as http:
        for server in services:
            until_tracking(server)
        built = {server.name: from_memory(http, server) for server in services}
        assert built["alpha"] == built["beta"], built

        post(http, beta, "/report/invalidate")
        # alpha held the old page in memory: Redis told it, so it is rebuilt.
        deadline = time.monotonic() + BOUND
        while True:
            verdict, built_at = report(http, alpha)
            if built_at != built["alpha"]:
                break
            assert time.monotonic() < deadline, "alpha still serves the invalidated report"
            time.sleep(0.02)
        assert verdict == "MISS"
        # ...and beta, which invalidated it, shares the new one.
        assert report(http, beta) == ("HIT", built_at)


def test_repeated_reports_are_served_from_memory_on_each_service(
    services: tuple[AppServer, AppServer],
) -> None:
    site = {"host": "shop.example"}
    with httpx.Client(timeout=10, headers=site) as http:
        for server in services:
            until_tracking(server)
        for server in services:
            built_at = from_memory(http, server)
            # A loss of tracking on a busy machine (heartbeat 1 s) sends a
            # lookup to Redis: try a few rounds of ten.
            for _ in range(5):
                before = health(server)["near_cache"]
                answers = {report(http, server) for _ in range(10)}
                after = health(server)["near_cache"]
                assert answers == {("HIT", built_at)}
                if after["misses"] == before["misses"]:
                    assert after["hits"] == before["hits"] + 10
                    break
                built_at = from_memory(http, server)
            else:
                raise AssertionError(f"{server.name}: /report kept going to Redis")


def test_session_changes_on_one_reach_the_other_within_a_bound(
    services: tuple[AppServer, AppServer],
) -> None:
    alpha, beta = services
    user = f"hedy-{uuid.uuid4().hex[:8]}"

    def until_user(server: AppServer, expected: str | None) -> int:
        deadline = time.monotonic() + BOUND
        while (shown := page(http, server)) and by_id(shown, "user") != expected:
            assert time.monotonic() < deadline, f"{server.name} shows {by_id(shown, 'user')}"
            time.sleep(0.02)
        return visits(shown)

    with httpx.Client(timeout=10) as http:
        for server in services:
            until_tracking(server)
        assert [visits(page(http, s)) for s in (alpha, beta, alpha)] == [1, 2, 3]
        post(http, beta, "/login", name=user)
        seen = until_user(alpha, user)
        assert seen >= 4
        assert visits(page(http, beta)) == seen + 1
        logged_in = http.cookies[COOKIE_NAME]
        post(http, alpha, "/logout")
        # The logged-in cookie, replayed on beta, names no one any more.
        http.cookies.set(COOKIE_NAME, logged_in)
        until_user(beta, None)


def request_commands(redis: Redis) -> Counter[str]:
    """Commands the server ran so far, by name, without the trackers' own
    (heartbeat PINGs, tracking set-up) and this test's INFO."""
    stats = redis.info("commandstats")
    return Counter(
        {
            name.removeprefix("cmdstat_"): int(value["calls"])
            for name, value in stats.items()
            if name.removeprefix("cmdstat_").split("|")[0] not in TRACKER_COMMANDS
        }
    )


TRACKER_COMMANDS = {"ping", "client", "subscribe", "hello", "role", "info"}


def test_repeated_reports_send_no_redis_command(own_redis: RedisProcess) -> None:
    """Counted by the server itself: a Redis of this test's own, so nothing
    but the two services talks to it."""
    secret = secrets.token_urlsafe(32)
    with (
        AppServer(name="alpha", redis_url=own_redis.url, secret=secret) as alpha,
        AppServer(name="beta", fastapi=True, redis_url=own_redis.url, secret=secret) as beta,
        Redis.from_url(own_redis.url, socket_timeout=5) as redis,
        httpx.Client(timeout=10, headers={"host": "shop.example"}) as http,
    ):
        for server in (alpha, beta):
            until_tracking(server)
        for _ in range(5):  # a loss of tracking on a busy machine costs a round
            built = {from_memory(http, server) for server in (alpha, beta)}
            before = request_commands(redis)
            answers = {report(http, server) for server in (alpha, beta) for _ in range(10)}
            sent = request_commands(redis) - before
            assert answers == {("HIT", *built)}
            if not sent:
                return
        raise AssertionError(f"repeated /report HITs sent {dict(sent)}")


def fleet_requests(server: AppServer) -> dict[str, int]:
    """Instance name -> the requests /stats shows for it (its first number)."""
    with httpx.Client(timeout=10) as http:
        html = page(http, server, "/stats")
    rows = re.findall(r'<tr data-instance="([^"]+)">.*?<td class="num">([\d,]+)</td>', html)
    return {name: int(count.replace(",", "")) for name, count in rows}


def test_stats_show_both_services_and_metrics_parse(
    services: tuple[AppServer, AppServer],
) -> None:
    alpha, beta = services
    with httpx.Client(timeout=10) as http:
        for server in (alpha, beta, alpha, beta):
            page(http, server, "/report")
    # Each flushes every 0.2 s: wait (bounded) until both flushed their traffic.
    deadline = time.monotonic() + 20
    seen = fleet_requests(beta)
    while time.monotonic() < deadline and not (seen.get("alpha", 0) and seen.get("beta", 0)):
        time.sleep(0.1)
        seen = fleet_requests(beta)
    assert seen.get("alpha", 0) >= 2, seen
    assert seen.get("beta", 0) >= 2, seen
    with httpx.Client(timeout=10) as http:
        html = page(http, alpha, "/stats")
    assert 'data-instance="beta"' in html
    assert html.count("<svg") == 2
    for server in services:
        text = httpx.get(f"{server.url}/metrics", timeout=10).text
        families = {f.name: f for f in text_string_to_metric_families(text)}
        assert families["asgi_redis_kit_http_requests"].samples[0].value >= 2
        lookups = families["asgi_redis_kit_cache_lookups"].samples
        assert sum(s.value for s in lookups if s.labels["outcome"] in ("hit", "miss")) >= 2
