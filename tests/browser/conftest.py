"""Browser tests of the console (issue 15): Playwright driving headless Chromium against the real
stack (the session's `gateway` fixture). They run with `make test-browser` (marker `browser`).

Chromium: `ALEPHANT_CHROMIUM` if set, else the system's (`chromium`, `chromium-browser`,
`google-chrome`), else Playwright's own download (`playwright install chromium`). `.ci/run`
installs the system package when it is missing; without any browser the tests fail with these
instructions.

`console` gives a signed-in page. Every console message of level error and every uncaught page
error is collected, and the test fails on any at teardown. `shot(page, name)` saves a full-page
screenshot under ALEPHANT_ARTIFACTS (default `.alephant/artifacts/console/`).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import pytest_asyncio
from playwright.async_api import Browser, BrowserContext, Page, async_playwright

from tests.conftest import Gateway

ARTIFACTS = Path(os.environ.get("ALEPHANT_ARTIFACTS", ".alephant/artifacts")) / "console"
# Without the background-networking switches Chromium keeps dialling Google on a closed network.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage"]
INSTALL_HINT = ("No Chromium found. Install it with your package manager (Debian/Ubuntu: `sudo apt-get install "
                "chromium`), or run `.venv/bin/playwright install chromium`, or point ALEPHANT_CHROMIUM at a "
                "Chromium or Chrome binary.")


def chromium_path() -> str | None:
    """The browser to drive: ALEPHANT_CHROMIUM, a system Chromium, or None (Playwright's own)."""
    if os.environ.get("ALEPHANT_CHROMIUM"):
        return os.environ["ALEPHANT_CHROMIUM"]
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        found = shutil.which(name)
        if found:
            return found
    return None


@pytest_asyncio.fixture(scope="session")
async def browser() -> AsyncIterator[Browser]:
    async with async_playwright() as pw:
        path = chromium_path()
        try:
            launched = await pw.chromium.launch(executable_path=path, args=CHROMIUM_ARGS, headless=True)
        except Exception as exc:  # no browser at all: say how to get one
            pytest.fail(f"{INSTALL_HINT} ({type(exc).__name__}: {str(exc).splitlines()[0]})")
        yield launched
        await launched.close()


@dataclass
class Console:
    """A signed-in console tab and what it reported."""

    page: Page
    context: BrowserContext
    base: str  # the control plane's root URL
    errors: list[str] = field(default_factory=list)

    def url(self, path: str) -> str:
        return self.base + path

    async def open(self, path: str) -> Page:
        response = await self.page.goto(self.url(path))
        assert response is not None and response.status == 200, (path, response and response.status)
        return self.page


def admin_token(gateway: Gateway) -> str:
    return gateway.stack.demo["ALEPHANT_ADMIN_TOKEN"]


async def sign_in(page: Page, base: str, token: str, name: str = "alice") -> None:
    await page.goto(base + "/console/login")
    await page.get_by_label("Your name").fill(name)
    await page.get_by_label("Admin token").fill(token)
    await page.get_by_role("button", name="Sign in").click()
    await page.wait_for_url(base + "/console*")


async def new_console(browser: Browser, gateway: Gateway, *, name: str = "alice", signed_in: bool = True) -> Console:
    context = await browser.new_context(viewport={"width": 1400, "height": 900})
    page = await context.new_page()
    console = Console(page, context, gateway.stack.admin_url)
    page.on("console", lambda msg: console.errors.append(f"console.{msg.type}: {msg.text}")
            if msg.type == "error" else None)
    page.on("pageerror", lambda exc: console.errors.append(f"pageerror: {exc}"))
    if signed_in:
        await sign_in(page, console.base, admin_token(gateway), name)
    return console


@pytest_asyncio.fixture
async def console(browser: Browser, gateway: Gateway) -> AsyncIterator[Console]:
    tab = await new_console(browser, gateway)
    yield tab
    await tab.context.close()
    assert tab.errors == [], tab.errors


async def shot(page: Page, name: str) -> Path:
    """A full-page screenshot, kept as a test artifact."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    await page.screenshot(path=str(path), full_page=True)
    return path
