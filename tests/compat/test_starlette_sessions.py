"""Starlette's own ``tests/middleware/test_session.py``, run against our middleware.

The file is the one of the installed Starlette version (see ``upstream``), with
Starlette's SessionMiddleware swapped for ours through ``shim``, on a real Redis
with this test's key prefix. Its ``test_client_factory`` makes a
``TestClient(app)`` used without ``with``: a new event loop per request and no
lifespan, as in most users' suites.

Rewrites besides the swap: Starlette writes cookie attributes in lower case
(``path=``, ``domain=``, ``partitioned``), we write them as RFC 6265 does
(``Path=``...). Browsers read attribute names case-insensitively (RFC 6265
section 5.2), so only those expectations are adjusted. Tests that cannot apply by
design are listed in ``BY_DESIGN`` with the reason; a name there that Starlette
no longer has fails ``test_by_design_list_matches_upstream``.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Iterator

import pytest
import redis as sync_redis
from starlette.exceptions import StarletteDeprecationWarning
from starlette.routing import Route

from tests.compat import shim
from tests.compat.upstream import load_test_module, sdist

with warnings.catch_warnings():
    # Starlette 1.x warns when its TestClient falls back to httpx (no httpx2).
    warnings.simplefilter("ignore", StarletteDeprecationWarning)
    from starlette.testclient import TestClient

REWRITES = [
    (
        "from starlette.middleware.sessions import Session, SessionMiddleware",
        "from tests.compat.shim import Session, SessionMiddleware",
    ),
    (
        "from tests.types import TestClientFactory",
        "from tests.compat.shim import TestClientFactory",
    ),
    ('r"; path=(\\S+);"', 'r"; Path=(\\S+);"'),
    ('"domain=.example.com" in set_cookie', '"Domain=.example.com" in set_cookie'),
    ('("partitioned" in attributes)', '("Partitioned" in attributes)'),
]

BY_DESIGN = {
    "test_session_expires": (
        "max_age=-1: Starlette signs a cookie that is expired on arrival; our "
        "idle_timeout is the Redis TTL that ends the session, and a non-positive one "
        "is refused at startup (see test_non_positive_max_age_is_refused)"
    ),
    "test_session_zero_max_age": (
        "max_age=0 (a cookie the browser deletes at once): refused at startup like "
        "any non-positive idle_timeout"
    ),
    "test_session_tracks_modification": (
        "a unit test of starlette.middleware.sessions.Session, Starlette's own dict "
        "that records writes; our session is another class (changes are found by "
        "comparing encoded values at save time), tested here through the middleware"
    ),
}

upstream = load_test_module(
    "tests/middleware/test_session.py", "starlette_upstream_test_session", REWRITES
)
UPSTREAM_TESTS = sorted(name for name in vars(upstream) if name.startswith("test_"))
globals().update(
    {name: getattr(upstream, name) for name in UPSTREAM_TESTS if name not in BY_DESIGN}
)


@pytest.fixture(autouse=True)
def redis_target(redis_url: str, key_prefix: str) -> Iterator[None]:
    shim.use((redis_url, key_prefix))
    yield
    shim.use(None)
    with sync_redis.Redis.from_url(redis_url) as admin:
        keys = list(admin.scan_iter(match=f"{key_prefix}*", count=1000))
        if keys:
            admin.delete(*keys)


@pytest.fixture
def test_client_factory() -> shim.TestClientFactory:
    # Starlette's conftest also runs trio; redis-py's client is asyncio only.
    return functools.partial(TestClient, backend="asyncio")


def test_by_design_list_matches_upstream() -> None:
    assert len(UPSTREAM_TESTS) >= 10
    assert set(BY_DESIGN) <= set(UPSTREAM_TESTS)


@pytest.mark.parametrize("max_age", [0, -1])
def test_non_positive_max_age_is_refused(max_age: int) -> None:
    with pytest.raises(ValueError, match="idle_timeout must be a positive number"):
        shim.SessionMiddleware(
            upstream.Starlette(routes=[Route("/", upstream.view_session)]),
            secret_key="example",
            max_age=max_age,
        )


def test_a_failed_download_is_an_error_not_a_skip() -> None:
    with pytest.raises(RuntimeError, match=r"could not download starlette==0\.0\.0"):
        sdist("0.0.0")  # no such release on PyPI
