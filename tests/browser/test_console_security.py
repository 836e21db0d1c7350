"""The console's security properties: no page without a session, no action without the
session's CSRF token (or from another site), and the admin token in no page, cookie or log."""

from __future__ import annotations

from pathlib import Path

import pytest
from playwright.async_api import Browser

from controlplane.console.render import NAV
from tests.browser.conftest import Console, admin_token, new_console
from tests.conftest import Gateway

pytestmark = pytest.mark.browser

PAGES = [href for _, _, href in NAV]


async def test_every_page_without_a_session_redirects_to_sign_in(browser: Browser, gateway: Gateway) -> None:
    tab = await new_console(browser, gateway, signed_in=False)
    try:
        for path in PAGES:
            await tab.page.goto(tab.url(path))
            assert tab.page.url.startswith(tab.url("/console/login?next=")), path
        # An action without a session is refused outright.
        response = await tab.page.request.post(tab.url("/console/logout"), form={"csrf": "x"})
        assert response.status == 403
    finally:
        await tab.context.close()


async def test_a_forged_or_missing_csrf_token_is_refused_and_changes_nothing(console: Console) -> None:
    page = await console.open("/console")
    for form in ({"csrf": "forged-token"}, {}):
        response = await page.request.post(console.url("/console/logout"), form=form)
        assert response.status == 403
        assert "CSRF" in await response.text()
    # A request from another site is refused even with the right token.
    csrf = await page.locator("form.signout input[name=csrf]").input_value()
    response = await page.request.post(console.url("/console/logout"), form={"csrf": csrf},
                                       headers={"Origin": "https://evil.example"})
    assert response.status == 403
    # Still signed in: the refused requests did nothing.
    await console.open("/console")
    assert await page.get_by_text("Signed in as alice").is_visible()


async def test_the_sign_in_form_refuses_a_wrong_token_and_a_forged_form(browser: Browser, gateway: Gateway) -> None:
    tab = await new_console(browser, gateway, signed_in=False)
    try:
        await tab.page.goto(tab.url("/console/login"))
        await tab.page.get_by_label("Admin token").fill("not-the-token")
        await tab.page.get_by_role("button", name="Sign in").click()
        assert await tab.page.get_by_role("alert").inner_text() == "That is not the admin token."
        response = await tab.page.request.post(tab.url("/console/login"),
                                                form={"csrf": "forged", "token": admin_token(gateway)})
        assert response.status == 403
        assert not [c for c in await tab.context.cookies() if c["name"] == "alephant_console"]
    finally:
        await tab.context.close()


async def test_the_admin_token_is_in_no_page_cookie_or_log_line(console: Console, gateway: Gateway) -> None:
    token = admin_token(gateway)
    pages = []
    for path in PAGES:
        page = await console.open(path)
        pages.append(await page.content())
    assert all(token not in html for html in pages)
    cookies = await console.context.cookies()
    session = [c for c in cookies if c["name"] == "alephant_console"]
    assert session and session[0]["httpOnly"] and session[0]["sameSite"] == "Strict"
    assert all(token not in c["value"] for c in cookies)
    # Nor in any log line of any process of the stack (sign-ins included).
    logs = list(Path(gateway.stack.state_dir, "logs").glob("*.log"))
    assert logs
    for log in logs:
        assert token not in log.read_text(errors="replace"), log
    # Nor is the session cookie's own value logged.
    assert all(session[0]["value"] not in log.read_text(errors="replace") for log in logs)


async def test_an_unknown_console_path_is_a_page_not_a_json_error(console: Console) -> None:
    response = await console.page.request.get(console.url("/console/no-such-page"))
    assert response.status == 404 and response.headers["content-type"].startswith("text/html")
    assert "There is no console page at" in await response.text()
