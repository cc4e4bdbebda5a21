"""The fleet's /stats page in headless Chromium, with two instances on one Redis:
both appear, in the table and in the server-drawn charts, with no script."""

from __future__ import annotations

import secrets
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Page, sync_playwright

from tests.example_app.servers import AppServer
from tests.example_app.test_browser import CHROMIUM, CHROMIUM_ARGS, WAIT_MS

pytestmark = [pytest.mark.browser, pytest.mark.real_redis]


@pytest.fixture(scope="module")
def fleet(redis_url: str) -> Iterator[tuple[AppServer, AppServer]]:
    secret = secrets.token_urlsafe(32)
    env = {"METRICS_FLUSH_SECONDS": "0.2", "METRICS_KEY_PREFIX": f"tb{uuid.uuid4().hex[:8]}:"}
    with (
        AppServer(name="web-a", redis_url=redis_url, secret=secret, env=env) as one,
        AppServer(name="web-b", fastapi=True, redis_url=redis_url, secret=secret, env=env) as two,
    ):
        yield one, two


@pytest.fixture
def page() -> Iterator[Page]:
    if not Path(CHROMIUM).is_file():
        pytest.fail(f"Chromium not found at {CHROMIUM}; ./dev test installs it", pytrace=False)
    with sync_playwright() as driver:
        browser = driver.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            context = browser.new_context(viewport={"width": 1100, "height": 900})
            context.set_default_timeout(WAIT_MS)
            yield context.new_page()
            context.close()
        finally:
            browser.close()


def test_stats_page_shows_both_instances(fleet: tuple[AppServer, AppServer], page: Page) -> None:
    one, two = fleet
    for server in (one, two, one, two):
        page.goto(f"{server.url}/report")
        page.locator("#built-at").wait_for()
    # Flushes run every 0.2 s; reload (bounded) until both instances are in Redis.
    deadline = time.monotonic() + 20
    rows = page.locator("#instances tbody tr")
    while True:
        page.goto(f"{two.url}/stats")
        names = rows.locator("td.instance").all_inner_texts()
        if {"web-a", "web-b"} <= set(names) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert {"web-a", "web-b"} <= set(names)
    assert page.locator("h1").inner_text() == "Fleet stats"
    for chart in ("#requests-chart", "#hit-ratio-chart"):
        assert page.locator(chart).is_visible()
        for name in ("web-a", "web-b"):
            assert page.locator(f'{chart} circle title:text-is("{name}")').count() >= 1
    # A hit ratio is shown for the fleet: two misses (one per instance, as the
    # report is shared, at most) and hits after.
    assert page.locator("#fleet-hit-ratio").inner_text().endswith("%")
    # The page loaded nothing from elsewhere: no script at all.
    assert page.locator("script").count() == 0
