"""Issue 2 item 10 and checklist 31, 33, 35: Redis stopped, paused or saturated.

Sessions fail closed: a request that needs the session gets a 503 with Retry-After,
never a Set-Cookie, and nothing stored is overwritten. The bounds on elapsed time
are generous "did not hang" checks, not speed measurements.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import fakeredis
import httpx
import pytest
from fastapi import FastAPI
from redis.asyncio import Redis
from redis.exceptions import SlotNotCoveredError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from asgi_redis_kit import SessionMiddleware, SessionStore, SessionStoreUnavailable
from asgi_redis_kit.sessions._cookie import CookieSigner
from asgi_redis_kit.sessions._unavailable import UnavailableSession
from tests.support import RedisProcess

from .conftest import SECRET, Gate, build_app, cookie_of, run_lifespan

pytestmark = pytest.mark.real_redis

TIMEOUT = 0.5


@pytest.fixture
async def middleware(own_redis: RedisProcess) -> AsyncIterator[SessionMiddleware]:
    """The middleware with a client it creates (and closes) from the URL."""
    gate = Gate()
    mw = SessionMiddleware(
        build_app(None, wrap=False, gate=gate),
        secret_key=SECRET,
        redis=own_redis.url,
        timeout=TIMEOUT,
        max_connections=4,
    )
    mw.gate = gate  # type: ignore[attr-defined]
    yield mw
    await mw.aclose()


@pytest.fixture
async def own_peek(own_redis: RedisProcess) -> AsyncIterator[Redis]:
    client: Redis = Redis.from_url(own_redis.url, socket_timeout=5)
    yield client
    await client.aclose()


def test_session_store_unavailable_is_public_a_503_and_a_backend_error() -> None:
    import asgi_redis_kit
    from asgi_redis_kit.sessions import SessionStoreUnavailable as old_path

    exc = asgi_redis_kit.SessionStoreUnavailable(7)
    assert "SessionStoreUnavailable" in asgi_redis_kit.__all__
    assert old_path is asgi_redis_kit.SessionStoreUnavailable
    assert isinstance(exc, asgi_redis_kit.BackendUnavailable)
    assert isinstance(exc, asgi_redis_kit.SessionError)
    assert isinstance(exc, HTTPException)
    assert exc.status_code == 503
    assert exc.headers == {"Retry-After": "7"}
    assert "session store" in exc.detail


def assert_unavailable(response: httpx.Response) -> None:
    assert response.status_code == 503
    assert response.headers["retry-after"] == "5"
    assert response.headers["content-type"].startswith("text/plain")
    assert "session store" in response.text
    assert "set-cookie" not in response.headers


async def test_redis_stopped_gives_503_then_recovers_with_the_same_cookie(
    middleware: SessionMiddleware,
    own_redis: RedisProcess,
    own_peek: Redis,
    make_client: Callable[..., httpx.AsyncClient],
) -> None:
    client = make_client(middleware)
    await client.post("/set", json={"a": 1})
    cookie = client.cookies["session"]
    await own_peek.save()  # the restarted server reloads this snapshot
    await own_peek.aclose()
    own_redis.stop()

    for method, url in [("GET", "/read"), ("POST", "/incr/n")]:
        started = time.monotonic()
        response = await client.request(method, url)
        assert time.monotonic() - started < 2 * TIMEOUT + 1
        assert_unavailable(response)
    # A write: would overwrite nothing, but must not pretend to have stored anything.
    response = await client.post("/set", json={"a": "overwritten"})
    assert_unavailable(response)
    # No cookie and no write: this request does not need Redis at all.
    anonymous = make_client(middleware)
    assert (await anonymous.get("/read")).status_code == 200
    # No cookie but a write: fails closed too, without a Set-Cookie.
    assert_unavailable(await anonymous.post("/set", json={"x": 1}))

    own_redis.start()
    response = await client.get("/read")
    assert response.status_code == 200
    assert response.json() == {"a": 1}  # the same cookie, the stored data, no restart
    assert client.cookies["session"] == cookie


async def test_save_failure_before_headers_becomes_503_and_overwrites_nothing(
    middleware: SessionMiddleware,
    own_redis: RedisProcess,
    own_peek: Redis,
    make_client: Callable[..., httpx.AsyncClient],
) -> None:
    """Redis goes away between load and save: the app's response is replaced."""
    gate: Gate = middleware.gate  # type: ignore[attr-defined]
    client = make_client(middleware)
    await client.post("/set", json={"a": 1})
    await own_peek.save()
    slow = asyncio.ensure_future(client.post("/slow-set", json={"a": 2}))
    await gate.reached.wait()
    own_redis.stop()
    gate.opened.set()
    response = await slow
    assert_unavailable(response)
    assert "ok" not in response.text  # the handler's body never leaked out
    own_redis.start()
    assert (await client.get("/read")).json() == {"a": 1}


async def test_paused_redis_hits_the_deadline_and_recovers(
    middleware: SessionMiddleware,
    own_redis: RedisProcess,
    make_client: Callable[..., httpx.AsyncClient],
) -> None:
    """Checklist 33 (SIGSTOP)."""
    client = make_client(middleware)
    await client.post("/set", json={"a": 1})
    own_redis.pause()
    try:
        started = time.monotonic()
        responses = await asyncio.gather(*(client.get("/read") for _ in range(10)))
        elapsed = time.monotonic() - started
    finally:
        own_redis.resume()
    for response in responses:
        assert_unavailable(response)
    assert elapsed < 2 * TIMEOUT + 1
    # The pool is healthy again: no reply of the paused period is read by mistake.
    for i in range(5):
        await client.post("/set", json={"i": i})
        assert (await client.get("/read")).json() == {"a": 1, "i": i}


async def test_ten_times_the_pool_size_waits_then_succeeds_or_degrades(
    middleware: SessionMiddleware,
    make_client: Callable[..., httpx.AsyncClient],
) -> None:
    """Checklist 35: 40 concurrent requests on a pool of 4: no deadlock, no 500."""
    client = make_client(middleware)
    await client.post("/set", json={"a": 0})
    started = time.monotonic()
    responses = await asyncio.gather(*(client.post("/incr/n") for _ in range(40)))
    assert time.monotonic() - started < 10
    statuses = [r.status_code for r in responses]
    assert set(statuses) <= {200, 503}
    assert statuses.count(200) >= 4
    counted = sorted(int(r.text) for r in responses if r.status_code == 200)
    assert len(set(counted)) == len(counted), counted  # each success its own increment
    stored = (await client.get("/read")).json()["n"]
    # A request whose increment ran in Redis but whose reply came after the
    # deadline answered 503: only those may take the count past the last 200.
    assert counted[-1] <= stored <= counted[-1] + statuses.count(503), (counted, stored)


async def test_redis_down_at_startup(
    make_client: Callable[..., httpx.AsyncClient],
) -> None:
    """Checklist 31: nothing listens; session routes answer 503 quickly, others work."""
    from tests.support import free_port

    mw = SessionMiddleware(
        build_app(None, wrap=False),
        secret_key=SECRET,
        redis=f"redis://127.0.0.1:{free_port()}/0",
        timeout=TIMEOUT,
    )
    try:
        client = make_client(mw)
        assert (await client.get("/noop")).status_code == 200
        started = time.monotonic()
        assert_unavailable(await client.post("/set", json={"a": 1}))
        assert time.monotonic() - started < 2 * TIMEOUT + 1
    finally:
        await mw.aclose()


async def test_changes_while_streaming_are_not_saved_and_logged_without_the_id(
    client: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    """The session is saved just before the headers go out, so a save failure can
    always become a 503. A streaming body that changes the session later cannot
    get a cookie any more: those changes are dropped with a warning."""
    with caplog.at_level("WARNING", logger="asgi_redis_kit.sessions"):
        response = await client.get("/stream")
    assert response.text == "first second"
    assert (await client.get("/read")).json() == {"before": True}
    assert "not saved" in caplog.text
    cookie = cookie_of(response)
    assert cookie
    assert cookie not in caplog.text
    assert cookie.split(".")[0] not in caplog.text


async def test_killed_and_restarted_under_load_recovers_without_a_restart(
    middleware: SessionMiddleware,
    own_redis: RedisProcess,
    own_peek: Redis,
    make_client: Callable[..., httpx.AsyncClient],
) -> None:
    """Checklist 32: traffic keeps flowing while Redis dies and comes back; errors
    are 503s only, they stop soon after the restart, and connections return to
    their baseline."""
    client = make_client(middleware)
    await client.post("/set", json={"a": 1})
    await own_peek.save()
    statuses: list[int] = []
    answered = asyncio.Condition()
    stop = asyncio.Event()

    async def load() -> None:
        while not stop.is_set():
            response = await client.post("/incr/n")
            statuses.append(response.status_code)
            async with answered:
                answered.notify_all()
            if response.status_code == 503:
                assert response.headers["retry-after"] == "5"
                assert "set-cookie" not in response.headers
            await asyncio.sleep(0.01)

    async def until(what: str, check: Callable[[], bool]) -> None:
        try:
            async with asyncio.timeout(20), answered:
                await answered.wait_for(check)
        except TimeoutError:
            raise AssertionError(f"no {what} after 20 s: {statuses[-20:]}") from None

    workers = [asyncio.ensure_future(load()) for _ in range(8)]
    try:
        await until("traffic", lambda: statuses.count(200) >= 8)
        own_redis.stop()
        await until("503 while Redis is down", lambda: statuses.count(503) >= 8)
        own_redis.start()
        restarted = len(statuses)
        # Recovered by itself: ten answers in a row are 200s again.
        await until("recovery", lambda: statuses[restarted:][-10:] == [200] * 10)
    finally:
        stop.set()
        await asyncio.gather(*workers)
    assert set(statuses) <= {200, 503}
    assert 503 in statuses[:restarted]
    # Soon: at most the requests already failing when it came back, one per worker.
    assert statuses[restarted:].count(503) <= len(workers)
    peek: Redis = Redis.from_url(own_redis.url)
    try:
        clients = await peek.client_list()
        assert len(clients) <= 1 + 4  # us, plus at most the pool (max_connections=4)
    finally:
        await peek.aclose()


@pytest.mark.parametrize("inside", [True, False])
async def test_incr_losing_redis_mid_request_is_a_503_in_either_middleware_order(
    own_redis: RedisProcess, make_client: Callable[..., httpx.AsyncClient], inside: bool
) -> None:
    """``inside``: added with Middleware(...), so Starlette's ServerErrorMiddleware is
    outside ours. Otherwise ours wraps the whole app and Starlette's error handling
    sees the failure first: it must still be a 503, not a 500."""
    gate = Gate()
    app: ASGIApp
    closer: SessionMiddleware | None = None
    if inside:
        app = build_app(own_redis.url, gate=gate, timeout=TIMEOUT)
    else:
        app = closer = SessionMiddleware(
            build_app(None, wrap=False, gate=gate),
            secret_key=SECRET,
            redis=own_redis.url,
            timeout=TIMEOUT,
        )
    try:
        client = make_client(app)
        await client.post("/set", json={"n": 1})
        slow = asyncio.ensure_future(client.post("/slow-incr/n"))
        await gate.reached.wait()
        own_redis.stop()
        gate.opened.set()
        response = await slow
        assert response.status_code == 503
        assert response.headers["retry-after"] == "5"
        assert "set-cookie" not in response.headers
        assert "session store" in response.text
    finally:
        if closer is not None:
            await closer.aclose()
        else:
            await run_lifespan(app)  # closes the client the middleware made


class SlotlessRedis(fakeredis.FakeAsyncRedis):
    """A client that gets redis-py's cluster errors (not RedisErrors) for every
    command, like a RedisCluster whose slot has no node yet."""

    async def execute_command(self, *args: Any, **options: Any) -> Any:
        raise SlotNotCoveredError("Slot 42 is not covered by the cluster.")

    def pipeline(self, transaction: bool = True, shard_hint: Any = None) -> Any:
        raise SlotNotCoveredError("Slot 42 is not covered by the cluster.")


async def test_uncovered_cluster_slot_is_a_503_not_a_500(
    make_client: Callable[..., httpx.AsyncClient],
) -> None:
    server = fakeredis.FakeServer()
    healthy = fakeredis.FakeAsyncRedis(server=server)
    slotless = SlotlessRedis(server=server)
    try:
        before = make_client(build_app(healthy))
        await before.post("/set", json={"a": 1})
        during = make_client(build_app(slotless), cookies=before.cookies)
        assert_unavailable(await during.get("/read"))
        assert_unavailable(await during.post("/incr/n"))
        assert (await make_client(build_app(slotless)).get("/read")).status_code == 200
    finally:
        await healthy.aclose()
        await slotless.aclose()


async def test_a_key_of_the_wrong_type_is_a_corrupt_record_not_a_503(
    any_redis: Redis,
    key_prefix: str,
    make_client: Callable[..., httpx.AsyncClient],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Checklist 18: someone SET our key. Until its TTL ran out every request
    answered 503; now it is an empty session, a security log line, and a write
    gets a fresh id (the foreign key is never adopted nor touched)."""
    client = make_client(build_app(any_redis, key_prefix=key_prefix))
    cookie = cookie_of(await client.post("/set", json={"a": 1}))
    assert cookie
    key = f"{key_prefix}{cookie.rsplit('.', 1)[0]}"
    await any_redis.delete(key)
    await any_redis.set(key, "not a hash")
    with caplog.at_level("WARNING", logger="asgi_redis_kit.sessions"):
        response = await client.get("/read")
    assert response.status_code == 200
    assert response.json() == {}
    assert "set-cookie" not in response.headers
    assert any("security: corrupt session record" in r.getMessage() for r in caplog.records)
    assert cookie.rsplit(".", 1)[0] not in caplog.text
    response = await client.post("/set", json={"b": 2})
    fresh = cookie_of(response)
    assert fresh
    assert fresh != cookie
    assert (await client.get("/read")).json() == {"b": 2}
    assert await any_redis.get(key) == b"not a hash"


async def test_an_error_reply_on_load_is_a_503_not_a_500(
    own_redis: RedisProcess,
    own_peek: Redis,
    make_client: Callable[..., httpx.AsyncClient],
) -> None:
    """Redis answers, with an error other than WRONGTYPE (here NOPERM: an ACL user
    that may run our scripts but not HGETALL). Still an outage: 503."""
    await own_peek.acl_setuser(
        "limited", enabled=True, nopass=True, keys=["~*"], commands=["+@all", "-hgetall"]
    )
    url = own_redis.url.replace("redis://", "redis://limited:x@")
    app = build_app(url, timeout=TIMEOUT)
    try:
        client = make_client(app)
        await client.post("/set", json={"a": 1})  # no HGETALL: a new session is created
        assert await own_peek.dbsize() == 1
        assert_unavailable(await client.get("/read"))
        assert (await client.get("/noop")).status_code == 200
    finally:
        await run_lifespan(app)


async def test_redis_down_only_requests_that_use_the_session_get_a_503(
    middleware: SessionMiddleware,
    own_redis: RedisProcess,
    own_peek: Redis,
    make_client: Callable[..., httpx.AsyncClient],
) -> None:
    """DESIGN "Failure policy": requests that *need* the session get the 503. A
    cookie alone does not: its load fails, and only using the session answers 503."""
    client = make_client(middleware)
    await client.post("/set", json={"a": 1})
    cookie = client.cookies["session"]
    await own_peek.save()
    await own_peek.aclose()
    own_redis.stop()

    ignores = await client.get("/noop")
    assert ignores.status_code == 200
    assert ignores.text == "no session here"
    assert "set-cookie" not in ignores.headers
    assert_unavailable(await client.get("/read"))
    assert_unavailable(await client.get("/whoami"))  # user_id / handle
    for url in ("/incr/n", "/regenerate", "/logout", "/login/ann"):
        assert_unavailable(await client.post(url))

    own_redis.start()
    assert (await client.get("/noop")).status_code == 200
    assert (await client.get("/read")).json() == {"a": 1}
    assert client.cookies["session"] == cookie


def test_the_unavailable_placeholder_raises_on_every_use_and_never_saves() -> None:
    store = SessionStore(fakeredis.FakeAsyncRedis())
    session = UnavailableSession(store, retry_after=7)
    assert "unavailable" in repr(session)
    uses: list[Callable[[], Any]] = [
        session.mark_accessed,
        lambda: session["a"],
        lambda: session.__setitem__("a", 1),
        lambda: session.__delitem__("a"),
        lambda: "a" in session,
        lambda: list(session),
        lambda: len(session),
        lambda: bool(session),
        lambda: session.get("a"),
        session.keys,
        session.values,
        session.items,
        lambda: session.pop("a", None),
        session.popitem,
        lambda: session.setdefault("a", 1),
        lambda: session.update(a=1),
        session.copy,
        session.clear,
        session.regenerate,
        lambda: session.bind_user("u"),
        lambda: session.user_id,
        lambda: session.handle,
        lambda: session.is_new,
        lambda: dict(session),
        lambda: session == {},
        lambda: session | {"a": 1},
        lambda: reversed(session),
    ]
    for use in uses:
        with pytest.raises(SessionStoreUnavailable) as info:
            use()
        assert info.value.headers == {"Retry-After": "7"}
    with pytest.raises(SessionStoreUnavailable):
        asyncio.run(session.incr("n"))
    assert asyncio.run(session._save()) is None
    assert not session._late_changes()


class SessionReader:
    """A user middleware inside SessionMiddleware that reads the session on /mw."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] == "/mw":
            scope["state"] = {"user": scope["session"].get("user")}
        await self.app(scope, receive, send)


def framework_app(framework: str, outside: bool, redis: str) -> ASGIApp:
    options: dict[str, Any] = {"secret_key": SECRET, "redis": redis, "timeout": TIMEOUT}

    async def read(request: Request) -> Response:
        return JSONResponse(dict(request.session))

    async def noop(request: Request) -> Response:
        return PlainTextResponse("no session here")

    app: Starlette
    if framework == "fastapi":
        app = FastAPI()
        app.add_api_route("/read", read)
        app.add_api_route("/noop", noop)
        app.add_api_route("/mw", noop)
        app.add_middleware(SessionReader)
        if not outside:
            app.add_middleware(SessionMiddleware, **options)  # added last: outer
    else:
        routes = [Route("/read", read), Route("/noop", noop), Route("/mw", noop)]
        inner = [Middleware(SessionReader)]
        outer = [] if outside else [Middleware(SessionMiddleware, **options)]
        app = Starlette(routes=routes, middleware=outer + inner)
    return SessionMiddleware(app, **options) if outside else app


@pytest.mark.parametrize("framework", ["starlette", "fastapi"])
@pytest.mark.parametrize("outside", [False, True], ids=["inside", "outside"])
async def test_using_an_unloadable_session_is_a_503_in_every_framework_and_order(
    make_client: Callable[..., httpx.AsyncClient], framework: str, outside: bool
) -> None:
    """``outside``: SessionMiddleware wraps the whole app, so Starlette's
    ServerErrorMiddleware is inside it and sees a failure in a middleware first
    (and answers 500). Otherwise ours is added with Middleware(...)/add_middleware
    and ServerErrorMiddleware is outside. Either way: handler or middleware, a 503."""
    from tests.support import free_port

    app = framework_app(framework, outside, f"redis://127.0.0.1:{free_port()}/0")
    cookie = CookieSigner(SECRET).sign("A" * 43)
    try:
        client = make_client(app, cookies={"session": cookie})
        ignores = await client.get("/noop")
        assert ignores.status_code == 200
        assert "set-cookie" not in ignores.headers
        for url in ("/read", "/mw"):
            response = await client.get(url)
            assert response.status_code == 503, (url, response.text)
            assert response.headers["retry-after"] == "5"
            assert "set-cookie" not in response.headers
            assert "session store" in response.text
    finally:
        if isinstance(app, SessionMiddleware):
            await app.aclose()
        else:
            await run_lifespan(app)


async def test_ping_reports_whether_redis_answers(own_redis: RedisProcess) -> None:
    """Checklist 31's "health reports degraded": health endpoints ask the store."""
    store = SessionStore(own_redis.url, timeout=TIMEOUT)
    try:
        assert await store.ping() is True
        own_redis.stop()
        assert await store.ping() is False
        own_redis.start()
        assert await store.ping() is True
    finally:
        await store.aclose()
