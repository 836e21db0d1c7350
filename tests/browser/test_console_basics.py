"""Signing in, and the overview against the finance API."""

from __future__ import annotations

import pytest
from playwright.async_api import Browser

from tests.browser.conftest import Console, new_console, shot
from tests.conftest import Gateway

pytestmark = pytest.mark.browser


async def test_sign_in_lands_on_the_overview(console: Console) -> None:
    page = await console.open("/console")
    assert await page.title() == "Overview · Alephant console"
    assert await page.get_by_role("heading", name="Cost over time").is_visible()
    await shot(page, "overview")


async def test_a_page_without_a_session_redirects_to_sign_in(browser: Browser, gateway: Gateway) -> None:
    tab = await new_console(browser, gateway, signed_in=False)
    try:
        await tab.page.goto(tab.url("/console/runs"))
        assert tab.page.url == tab.url("/console/login?next=/console/runs")
        assert await tab.page.get_by_role("button", name="Sign in").is_visible()
    finally:
        await tab.context.close()
