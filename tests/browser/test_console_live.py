"""The Live page: calls appear over server-sent events within 2 s, under the page's filters; the
page renders recent calls from the journal without the stream; the stream needs a session."""

from __future__ import annotations

import asyncio
import secrets
import time
from typing import Any

import aiohttp
import pytest
from playwright.async_api import Page

from tests.browser.conftest import Console, shot
from tests.conftest import Gateway, journal_event

pytestmark = pytest.mark.browser


async def chat(http: aiohttp.ClientSession, gateway: Gateway, agent: str, run: str | None = None) -> dict[str, Any]:
    """One mock chat completion as `agent`: its request id and cost header, and when it answered."""
    headers = {"Authorization": f"Bearer {gateway.demo_key}", "Alephant-Agent-Id": agent}
    if run:
        headers["Alephant-Run-Id"] = run
    body = {"model": "mock/echo", "messages": [{"role": "user", "content": f"hello from {agent}"}]}
    async with http.post(f"{gateway.base_url}/chat/completions", json=body, headers=headers) as resp:
        assert resp.status == 200, await resp.text()
        answered = time.monotonic()
        return {"request_id": resp.headers["Alephant-Request-Id"], "cost_usd": resp.headers["Alephant-Cost-Usd"],
                "answered": answered}


def row(page: Page, request_id: str) -> Any:
    return page.locator(f'#live-calls tr[data-request-id="{request_id}"]')


async def open_live(console: Console, query: str) -> Page:
    page = await console.open(f"/console/live?{query}")
    await page.wait_for_selector('#live-status[data-state="open"]', timeout=10_000)
    return page


async def test_the_live_tail_shows_a_request_within_2_s(console: Console, gateway: Gateway,
                                                         http: aiohttp.ClientSession) -> None:
    agent, other = f"live-{secrets.token_hex(4)}", f"other-{secrets.token_hex(4)}"
    page = await open_live(console, f"ws=demo&agent={agent}")
    assert await page.get_by_label("Agent id").input_value() == agent
    assert await page.get_by_role("button", name="Pause").is_visible()

    elsewhere = await chat(http, gateway, other)  # another agent's call: filtered out
    call = await chat(http, gateway, agent, run=f"run-{agent}")
    await row(page, call["request_id"]).wait_for(timeout=2_000)
    assert time.monotonic() - call["answered"] < 2.0

    cells = await row(page, call["request_id"]).locator("td").all_inner_texts()
    assert cells[1:4] == [agent, f"run-{agent}", "mock/echo"], cells
    assert cells[4] == "200"
    assert cells[7] == f"${call['cost_usd']}", (cells, call["cost_usd"])
    assert cells[8] == call["request_id"]
    await page.wait_for_timeout(300)  # workers publish independently: give the other call time to arrive
    assert await row(page, elsewhere["request_id"]).count() == 0
    await shot(page, "live")


async def test_pause_holds_new_calls_until_resumed(console: Console, gateway: Gateway,
                                                   http: aiohttp.ClientSession) -> None:
    agent = f"pause-{secrets.token_hex(4)}"
    page = await open_live(console, f"ws=demo&agent={agent}")
    await page.get_by_role("button", name="Pause").click()
    call = await chat(http, gateway, agent)
    status = page.locator("#live-status")
    await page.wait_for_selector('#live-status:has-text("1 new call waiting")', timeout=5_000)
    assert await status.get_attribute("data-state") == "paused"
    assert await row(page, call["request_id"]).count() == 0
    await page.get_by_role("button", name="Resume").click()
    await row(page, call["request_id"]).wait_for(timeout=1_000)
    assert await status.get_attribute("data-state") == "open"


async def test_the_page_lists_recent_calls_from_the_journal(console: Console, gateway: Gateway,
                                                            http: aiohttp.ClientSession) -> None:
    agent, run = f"recent-{secrets.token_hex(4)}", f"run-{secrets.token_hex(4)}"
    first = await chat(http, gateway, agent, run=run)
    second = await chat(http, gateway, agent)
    for call in (first, second):
        for _ in range(100):
            if await journal_event(gateway.database_url, call["request_id"]) is not None:
                break
            await asyncio.sleep(0.1)
        else:
            pytest.fail(f"{call['request_id']} was not journalled")

    # Both calls happened before the page opened, so only the server can have put them there.
    page = await open_live(console, f"ws=demo&agent={agent}")
    ids = await page.locator("#live-calls tr[data-request-id]").evaluate_all(
        "rows => rows.map(r => r.getAttribute('data-request-id'))")
    assert ids == [second["request_id"], first["request_id"]]  # newest first

    page = await open_live(console, f"ws=demo&run={run}")
    ids = await page.locator("#live-calls tr[data-request-id]").evaluate_all(
        "rows => rows.map(r => r.getAttribute('data-request-id'))")
    assert ids == [first["request_id"]]


async def test_the_stream_needs_a_session(gateway: Gateway, http: aiohttp.ClientSession) -> None:
    url = f"{gateway.stack.admin_url}/console/live/stream?ws=demo"
    async with http.get(url, allow_redirects=False) as resp:
        assert resp.status == 303
        assert resp.headers["Location"].startswith("/console/login?next=")
        assert resp.headers.get("Content-Type", "").split(";")[0] != "text/event-stream"
    forged = {"Cookie": "alephant_console=not-a-session"}
    async with http.get(url, allow_redirects=False, headers=forged) as resp:
        assert resp.status == 303


async def test_the_stream_of_an_unknown_workspace_is_404(console: Console) -> None:
    resp = await console.context.request.get(console.url("/console/live/stream?ws=no-such-workspace"))
    assert resp.status == 404
