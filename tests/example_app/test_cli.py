"""``python -m example_app``: configuration, startup logs, and failing fast."""

from __future__ import annotations

import subprocess
import sys

import pytest

from example_app.settings import DEV_SECRET, EMBEDDED_REDIS_URL, Settings, redact_url
from tests.example_app.servers import REPO, AppServer
from tests.support import free_port


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
        ("redis://:hunter2@cache:6379/1", "redis://:***@cache:6379/1"),
        ("rediss://app:hunter2@cache.example/0", "rediss://app:***@cache.example/0"),
        ("redis://app:hunter2@[::1]:6380", "redis://app:***@[::1]:6380"),
    ],
)
def test_redis_url_is_shown_without_password(url: str, shown: str) -> None:
    assert redact_url(url) == shown


def test_settings_from_environment() -> None:
    defaults = Settings.from_env({})
    assert defaults.redis_url == EMBEDDED_REDIS_URL
    assert defaults.embedded
    assert defaults.redis_label == "embedded in-process Redis"
    assert defaults.secret_key == DEV_SECRET
    assert defaults.secret_is_default
    assert defaults.instance.startswith("pid ")

    configured = Settings.from_env(
        {
            "REDIS_URL": "redis://:pw@db:6379/0",
            "SESSION_SECRET": "s3cret",
            "INSTANCE_NAME": "blue",
        }
    )
    assert not configured.embedded
    assert not configured.secret_is_default
    assert configured.instance == "blue"
    assert "pw" not in repr(configured)
    assert "s3cret" not in repr(configured)
    assert Settings.from_env({"INSTANCE_NAME": "blue"}, instance="green").instance == "green"


def test_unreachable_redis_fails_fast_with_a_clear_message() -> None:
    port = free_port()  # nothing listens there
    env = {"REDIS_URL": f"redis://:topsecret@127.0.0.1:{port}/0", "PATH": "/usr/bin:/bin"}
    result = subprocess.run(
        [sys.executable, "-m", "example_app", "--port", str(free_port())],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode != 0
    assert f"cannot reach Redis at redis://:***@127.0.0.1:{port}/0" in result.stderr
    assert "Traceback" not in result.stderr
    assert "topsecret" not in result.stderr + result.stdout


@pytest.mark.parametrize("fastapi", [False, True], ids=["starlette", "fastapi"])
def test_embedded_redis_is_announced_in_the_log(fastapi: bool) -> None:
    with AppServer(name="solo", fastapi=fastapi) as server:
        log = server.log()
    assert "REDIS_URL is not set: using an embedded in-process Redis" in log
    assert "SESSION_SECRET is not set" in log
    assert ("FastAPI" if fastapi else "Starlette") + " example app, instance 'solo'" in log
