"""Clients made from a URL follow the running event loop, and leak nothing.

Test suites run one app on many loops: Starlette's ``TestClient(app)`` without
``with`` (the pattern of FastAPI's testing docs) starts a loop per request, and
pytest-asyncio gives every test its own. Neither runs the lifespan, so nothing
ever calls ``aclose()``. The app must work on each loop, and the connections a
finished loop leaves behind must be closed: an unclosed socket is a
``ResourceWarning`` that fails some later test under ``filterwarnings = error``.
"""

from __future__ import annotations

import asyncio
import gc
import subprocess
import sys
import textwrap
import uuid
import warnings
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis as sync_redis
from fastapi import FastAPI
from fastapi.responses import PlainTextResponse
from starlette.exceptions import StarletteDeprecationWarning
from starlette.requests import Request

from asgi_redis_kit import CacheMiddleware, SessionMiddleware, cached
from tests.support import RedisProcess

with warnings.catch_warnings():
    # Starlette 1.x wants httpx2 for its TestClient and warns when it falls back to
    # httpx; the fallback is what our users have installed, so it is what we test.
    warnings.simplefilter("ignore", StarletteDeprecationWarning)
    from starlette.testclient import TestClient

ROOT = Path(__file__).resolve().parent.parent


def make_app(redis: str, prefix: str) -> tuple[FastAPI, Counter[str]]:
    """A FastAPI app with sessions (a visit counter) and a cached page, both on
    clients built from ``redis``."""
    calls: Counter[str] = Counter()
    app = FastAPI()

    @app.get("/visit", response_class=PlainTextResponse)
    async def visit(request: Request) -> str:
        request.session["n"] = request.session.get("n", 0) + 1
        return str(request.session["n"])

    @app.get("/page", response_class=PlainTextResponse)
    @cached(ttl=60)
    async def page() -> str:
        calls["page"] += 1
        return f"page {calls['page']}"

    app.add_middleware(SessionMiddleware, secret_key="k", redis=redis, key_prefix=prefix + "s:")
    app.add_middleware(CacheMiddleware, redis=redis, key_prefix=prefix + "c:")
    return app, calls


def delete_keys(url: str, prefix: str) -> None:
    with sync_redis.Redis.from_url(url) as admin:
        keys = list(admin.scan_iter(match=f"{prefix}*", count=1000))
        if keys:
            admin.delete(*keys)


@pytest.fixture(params=["redis", "memory"])
def url(request: pytest.FixtureRequest, key_prefix: str) -> Iterator[str]:
    """A real server (keys of this test removed afterwards) or an in-process one."""
    if request.param == "memory":
        yield f"memory://loops-{key_prefix}"
        return
    real: str = request.getfixturevalue("redis_url")
    yield real
    delete_keys(real, key_prefix)


def test_testclient_without_with_runs_each_request_on_a_new_loop(url: str, key_prefix: str) -> None:
    app, calls = make_app(url, key_prefix)
    client = TestClient(app)
    # The page first: a response given to a session that holds data is not shared.
    first, second = client.get("/page"), client.get("/page")
    assert (first.headers["x-cache"], second.headers["x-cache"]) == ("MISS", "HIT")
    assert second.text == "page 1"
    assert calls["page"] == 1
    assert [client.get("/visit").text for _ in range(3)] == ["1", "2", "3"]
    client.close()


# One app imported by several tests, each on the loop pytest-asyncio gives it.
_SHARED: dict[str, tuple[FastAPI, Counter[str]]] = {}


@pytest.fixture(scope="module")
def shared_prefix(redis_url: str) -> Iterator[str]:
    prefix = f"shared{uuid.uuid4().hex[:8]}:"
    yield prefix
    _SHARED.clear()
    delete_keys(redis_url, prefix)


@pytest.fixture
def shared_app(url: str, shared_prefix: str) -> tuple[FastAPI, Counter[str]]:
    kind = "memory" if url.startswith("memory") else "redis"
    if kind not in _SHARED:
        _SHARED[kind] = make_app(
            f"memory://{shared_prefix}" if kind == "memory" else url, shared_prefix
        )
    return _SHARED[kind]


@pytest.mark.parametrize("run", [1, 2, 3])
async def test_one_app_shared_by_tests_with_their_own_loops(
    shared_app: tuple[FastAPI, Counter[str]], run: int
) -> None:
    app, calls = shared_app
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
        await client.get("/page")  # stored by the first of these tests to run
        again = await client.get("/page")
        assert [(await client.get("/visit")).text for _ in range(2)] == ["1", "2"]
    assert again.headers["x-cache"] == "HIT"
    assert calls["page"] == 1


def _resource_warnings(caught: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)]


@pytest.mark.parametrize("requests", [1, 3])
def test_no_unclosed_connection_after_testclient_without_lifespan(
    url: str, key_prefix: str, requests: int
) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        app, _ = make_app(url, key_prefix)
        client = TestClient(app)
        for _ in range(requests):
            assert client.get("/visit").status_code == 200
            assert client.get("/page").status_code == 200
        client.close()
        del app, client
        gc.collect()
    assert _resource_warnings(caught) == []


def test_no_unclosed_connection_when_a_loop_closes_without_shutting_down(
    own_redis: RedisProcess, key_prefix: str
) -> None:
    """A loop closed by hand (no ``shutdown_asyncgens``) cannot close anything any
    more; the next loop disposes of its connections without awaiting on it, and
    garbage collection of those of the last one."""

    async def visit(app: FastAPI) -> str:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            await client.get("/page")
            return (await client.get("/visit")).text

    with (
        warnings.catch_warnings(record=True) as caught,
        sync_redis.Redis.from_url(own_redis.url) as admin,
    ):
        warnings.simplefilter("always")
        baseline = len(admin.client_list())
        app, _ = make_app(own_redis.url, key_prefix)
        loop = asyncio.new_event_loop()
        assert loop.run_until_complete(visit(app)) == "1"
        loop.close()
        assert len(admin.client_list()) > baseline
        assert asyncio.run(visit(app)) == "1"  # a new client, a new cookie jar
        assert len(admin.client_list()) == baseline  # the app is alive, nothing is open
        loop = asyncio.new_event_loop()
        assert loop.run_until_complete(visit(app)) == "1"
        loop.close()
        del app
        gc.collect()
        assert len(admin.client_list()) == baseline
    assert _resource_warnings(caught) == []


def test_connections_close_when_their_loop_shuts_down(
    own_redis: RedisProcess, key_prefix: str
) -> None:
    """Not later, at the next loop or gc: a suite that keeps its apps alive must
    not pile up connections, one pool per finished loop."""
    with sync_redis.Redis.from_url(own_redis.url) as admin:
        baseline = len(admin.client_list())
        app, _ = make_app(own_redis.url, key_prefix)
        client = TestClient(app)
        for _ in range(3):
            assert client.get("/visit").status_code == 200
            assert client.get("/page").status_code == 200
            # The request's loop has ended: Redis saw its connections close.
            assert len(admin.client_list()) == baseline
        client.close()


async def test_an_app_dropped_while_its_loop_runs_closes_its_connections(
    own_redis: RedisProcess, key_prefix: str
) -> None:
    admin = sync_redis.Redis.from_url(own_redis.url)
    try:
        baseline = len(admin.client_list())
        app, _ = make_app(own_redis.url, key_prefix)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            assert (await client.get("/visit")).text == "1"
            assert (await client.get("/page")).status_code == 200
        assert len(admin.client_list()) > baseline
        del app, transport, client
        gc.collect()
        for _ in range(200):  # the close is scheduled on this loop; let it run
            if len(admin.client_list()) == baseline:
                break
            await asyncio.sleep(0.01)
        assert len(admin.client_list()) == baseline
    finally:
        admin.close()


def test_interpreter_exit_after_testclient_without_with_is_silent(
    redis_url: str, key_prefix: str
) -> None:
    """The whole pattern in a fresh interpreter under ``-W error``: nothing is
    closed by hand, and nothing may be reported as unclosed, at gc or at exit."""
    script = textwrap.dedent(f"""
        import asyncio, gc, warnings
        import httpx
        with warnings.catch_warnings():
            from starlette.exceptions import StarletteDeprecationWarning
            warnings.simplefilter("ignore", StarletteDeprecationWarning)
            from starlette.testclient import TestClient
        from tests.test_event_loops import make_app

        kept = []  # alive until exit
        for url in ({redis_url!r}, "memory://exit"):
            app, calls = make_app(url, {key_prefix!r})
            client = TestClient(app)
            for _ in range(3):
                assert client.get("/visit").status_code == 200
                assert client.get("/page").status_code == 200
            kept.append(app)

        async def visit(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
                assert (await client.get("/visit")).status_code == 200

        # A loop closed by hand, with no later loop to clean up after it.
        app, calls = make_app({redis_url!r}, {key_prefix!r})
        loop = asyncio.new_event_loop()
        loop.run_until_complete(visit(app))
        loop.close()
        kept.append(app)
        gc.collect()
        print("ok")
    """)
    done = subprocess.run(
        [sys.executable, "-W", "error", "-c", script],
        cwd=ROOT,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    delete_keys(redis_url, key_prefix)
    assert done.stdout.strip() == "ok", done.stderr
    assert "Warning" not in done.stderr
    assert "Exception ignored" not in done.stderr
