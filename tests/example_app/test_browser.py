"""The example app in headless Chromium, as a person would use it.

Plain ``def`` tests on purpose: Playwright's sync API refuses to run inside an
event loop, and pytest-asyncio only gives ``async def`` tests one. The app runs
as a real uvicorn process on the embedded Redis, exactly as ``./dev serve``
starts it, so the first-run experience is what is tested.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, BrowserContext, Page, Playwright, sync_playwright

from example_app.settings import COOKIE_NAME
from tests.example_app.servers import REPO, AppServer

pytestmark = pytest.mark.browser

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
# Playwright's own browser download does not work here; Debian's chromium does.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
SCREENSHOT = REPO / "docs" / "screenshot.png"
WAIT_MS = 15_000


@pytest.fixture(scope="module")
def server() -> Iterator[AppServer]:
    with AppServer(name="web-1") as app_server:
        yield app_server


@pytest.fixture(scope="module")
def playwright() -> Iterator[Playwright]:
    with sync_playwright() as driver:
        yield driver


@pytest.fixture(scope="module")
def browser(playwright: Playwright) -> Iterator[Browser]:
    if not Path(CHROMIUM).is_file():
        # A failure, not a skip: the browser checks are part of the suite.
        pytest.fail(
            f"Chromium not found at {CHROMIUM}. Install Debian's package with "
            "`apt-get install chromium` (./dev test does this), or point CHROMIUM at a binary.",
            pytrace=False,
        )
    chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
    try:
        yield chromium
    finally:
        chromium.close()


@pytest.fixture
def context(browser: Browser, server: AppServer) -> Iterator[BrowserContext]:
    # A fresh context is a fresh cookie jar: every test starts as a new visitor.
    ctx = browser.new_context(base_url=server.url, viewport={"width": 1100, "height": 720})
    ctx.set_default_timeout(WAIT_MS)
    try:
        yield ctx
    finally:
        ctx.close()


@pytest.fixture
def page(context: BrowserContext) -> Page:
    return context.new_page()


def visits(page: Page) -> int:
    return int(page.locator("#visits").inner_text())


def session_cookie(context: BrowserContext) -> str:
    found = [c for c in context.cookies() if c.get("name") == COOKIE_NAME]
    assert len(found) == 1, context.cookies()
    return found[0].get("value", "")


def log_in(page: Page, name: str) -> None:
    """Log in from the home page already shown (one more visit when it lands)."""
    page.fill("#name", name)
    with page.expect_navigation():
        page.click("#login")
    assert page.locator("#user").inner_text() == name


def test_counter_increments_on_reload(page: Page) -> None:
    page.goto("/")
    assert page.locator("h1").inner_text() == "Número de visitas: 1"
    page.reload()
    assert visits(page) == 2
    with page.expect_navigation():
        page.click("#reload")
    assert visits(page) == 3


def test_reset_button_starts_again(page: Page) -> None:
    page.goto("/")
    page.reload()
    with page.expect_navigation():
        page.click("#reset")
    assert visits(page) == 1


def test_session_cookie_is_httponly(page: Page, context: BrowserContext) -> None:
    page.goto("/")
    cookies = [c for c in context.cookies() if c.get("name") == COOKIE_NAME]
    assert len(cookies) == 1
    assert cookies[0].get("httpOnly") is True
    assert cookies[0].get("sameSite") == "Lax"
    assert cookies[0].get("value")
    # Page scripts see none of it: not the name, not the value.
    visible = page.evaluate("document.cookie")
    assert COOKIE_NAME not in visible
    assert cookies[0].get("value", "") not in visible


def test_login_changes_the_cookie(page: Page, context: BrowserContext) -> None:
    page.goto("/")
    before = session_cookie(context)
    page.reload()  # now the page shows the handle of the stored session
    handle_before = page.locator("#handle").inner_text()

    log_in(page, "Ada")
    after = session_cookie(context)
    assert after != before
    assert page.locator("#handle").inner_text() != handle_before
    assert page.locator("#session-count").inner_text() == "1"
    assert visits(page) == 3, "the visit count survives the id rotation"


def test_logout_resets_the_counter(page: Page) -> None:
    page.goto("/")
    log_in(page, "Grace")
    page.reload()
    assert visits(page) == 3
    with page.expect_navigation():
        page.click("#logout")
    assert visits(page) == 1
    assert page.locator("#user").count() == 0
    assert page.locator("#login").is_visible()


def test_log_out_everywhere(browser: Browser, server: AppServer) -> None:
    laptop = browser.new_context(base_url=server.url)
    phone = browser.new_context(base_url=server.url)
    try:
        on_laptop, on_phone = laptop.new_page(), phone.new_page()
        for device in (on_laptop, on_phone):
            device.goto("/")
            log_in(device, "Linus")
        on_laptop.reload()
        assert on_laptop.locator("#session-count").inner_text() == "2"
        with on_laptop.expect_navigation():
            on_laptop.click("#logout-everywhere")
        assert on_laptop.locator("#login").is_visible()
        on_phone.reload()
        assert on_phone.locator("#login").is_visible()
    finally:
        laptop.close()
        phone.close()


def report_state(page: Page) -> tuple[str, str]:
    """The page's own HIT/MISS badge (filled in by its script) and build time."""
    badge = page.locator("#cache-status")
    # The inline script replaces the placeholder once the page has loaded.
    page.wait_for_function("document.getElementById('cache-status').textContent !== '…'")
    return badge.inner_text(), page.locator("#built-at").inner_text()


def test_cached_report_miss_hit_and_invalidate(page: Page, server: AppServer) -> None:
    # Start from a known state whatever earlier tests did to the shared cache;
    # not following the redirect, which would rebuild the page right away.
    reset = page.request.post(f"{server.url}/report/invalidate", max_redirects=0)
    assert reset.status == 303

    first = page.goto("/report")
    assert first is not None
    assert first.headers["x-cache"] == "MISS"
    status, built = report_state(page)
    assert status == "MISS"

    second = page.goto("/report")
    assert second is not None
    assert second.headers["x-cache"] == "HIT"
    assert report_state(page) == ("HIT", built)

    with page.expect_navigation():
        page.click("#invalidate")
    status, rebuilt = report_state(page)
    assert status == "MISS"
    assert rebuilt != built


def test_rate_lookup_hit_after_reload_and_miss_after_invalidar(
    page: Page, server: AppServer
) -> None:
    reset = page.request.post(f"{server.url}/rate/invalidate", max_redirects=0)
    assert reset.status == 303
    page.goto("/rate")
    assert page.locator("#rate-status").inner_text() == "MISS"
    page.reload()
    assert page.locator("#rate-status").inner_text() == "HIT"
    with page.expect_navigation():
        page.click("#invalidate")
    assert page.url.endswith("/rate")
    assert page.locator("#rate-status").inner_text() == "MISS"


def test_screenshot_of_the_home_page(page: Page, tmp_path: Path) -> None:
    """Takes the picture the README shows. It lands in docs/screenshot.png only
    with UPDATE_SCREENSHOT=1, so an ordinary run leaves the work tree clean (the
    session handle on the page differs every run)."""
    page.goto("/")
    log_in(page, "Ada Lovelace")
    for _ in range(3):
        page.reload()
    assert visits(page) == 5
    target = SCREENSHOT if os.environ.get("UPDATE_SCREENSHOT") == "1" else tmp_path / "home.png"
    page.screenshot(path=str(target), full_page=True)
    assert target.stat().st_size > 10_000


def test_fastapi_twin_in_the_browser(browser: Browser) -> None:
    """The FastAPI twin serves the same pages: counter, login, cached report."""
    with AppServer(name="web-fastapi", fastapi=True) as twin:
        ctx = browser.new_context(base_url=twin.url)
        ctx.set_default_timeout(WAIT_MS)
        try:
            page = ctx.new_page()
            page.goto("/")
            page.reload()
            assert visits(page) == 2
            assert page.locator("#framework").inner_text() == "FastAPI"
            log_in(page, "Guido")
            assert visits(page) == 3
            page.goto("/report")
            assert report_state(page)[0] == "MISS"
            page.reload()
            assert report_state(page)[0] == "HIT"
            assert page.locator("#answered-by").inner_text() == "web-fastapi"
            assert page.locator("#framework").inner_text() == "FastAPI"
        finally:
            ctx.close()
