"""The console's Runs pages in a browser, against a workload made through the gateway: the list
shows each run with the finance API's cost, filters by run id and agent, pages; a run's page
shows the totals of `GET /admin/v1/runs/{id}` and its calls; a call's archived bodies open from
the timeline, escaped; unknown runs and unarchived bodies are friendly 404 pages."""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import aiohttp
import psycopg
import pytest
import pytest_asyncio
from playwright.async_api import Page

from controlplane.console.render import usd
from tests.browser.conftest import Console, shot
from tests.conftest import AdminHttp, Gateway, eventually
from tests.integration.test_governance_e2e import chat
from tests.integration.test_spend_api import SPEND, post

pytestmark = pytest.mark.browser

MODEL = "mock/echo"
MARKUP = "<b>console</b> & <script>alert(1)</script>"


@dataclass(frozen=True)
class Workload:
    tag: str
    alpha: str  # agents
    beta: str
    workflow: str
    runs: dict[str, str]  # letter -> run id
    calls: dict[str, list[str]]  # run id -> request ids of its model calls
    archived: str  # a model call (run "e") whose bodies a key's log settings keep
    plain: str  # a model call whose key keeps metadata only


async def _call(http: aiohttp.ClientSession, gateway: Gateway, key: str, run: str, agent: str,
                workflow: str | None = None, content: str = "Say something short.") -> str:
    headers = {"Alephant-Run-Id": run, "Alephant-Agent-Id": agent}
    if workflow is not None:
        headers["Alephant-Workflow-Id"] = workflow
    answer = await chat(http, gateway, key, MODEL, max_tokens=4 + len(run) % 5, headers=headers, content=content)
    assert answer.status == 200, answer.body
    return answer.request_id


async def _settled(gateway: Gateway, run: str, calls: int, facts: int, outcome: bool) -> bool | None:
    """True once both projections have folded the run: the journal has its `calls` model calls,
    the finance projection its `facts` facts (and its outcome, when one was reported)."""
    async with await psycopg.AsyncConnection.connect(gateway.database_url) as conn:
        cur = await conn.execute(
            "SELECT (SELECT count(*) FROM event_journal WHERE type = 'llm.call' AND workspace_id = 'demo' "
            "AND body->>'run_id' = %(run)s), (SELECT count(*) FROM finance_fact WHERE workspace_id = 'demo' "
            "AND run_id = %(run)s), (SELECT count(*) FROM run_outcome WHERE workspace_id = 'demo' "
            "AND run_id = %(run)s)", {"run": run})
        row = await cur.fetchone()
    return True if row == (calls, facts, int(outcome)) else None


@pytest_asyncio.fixture(scope="module")
async def workload(gateway: Gateway) -> Workload:
    """Five runs in the demo workspace: a (alpha, 3 calls and a tool spend, in a workflow;
    succeeded), b (beta; failed), c (alpha then beta), d (beta; its id has a slash, a space, % and
    &), e (alpha, a call whose bodies are archived, with markup in it)."""
    tag = os.urandom(4).hex()
    alpha, beta, workflow = f"ra-{tag}-alpha", f"ra-{tag}-beta", f"wf-{tag}"
    runs = {letter: f"run-{tag}-{letter}" for letter in "abcde"} | {"d": f"run-{tag}-d/50% & more"}
    calls: dict[str, list[str]] = {run: [] for run in runs.values()}
    kept = gateway.create_key(name=f"runs-bodies-{tag}")
    gateway.admin.call("POST", "/admin/v1/log-settings", {"workspace_id": "demo", "scope": "key",
                                                          "scope_id": kept["id"], "bodies": "both"})
    key = gateway.demo_key
    async with aiohttp.ClientSession() as http:
        for _ in range(3):
            calls[runs["a"]].append(await _call(http, gateway, key, runs["a"], alpha, workflow))
        spent = await post(http, gateway, key, SPEND, {"amount_usd": "0.125", "vendor": "serpapi", "tool": "search"},
                           idempotency_key=f"idem-{tag}", headers={"Alephant-Run-Id": runs["a"],
                                                                   "Alephant-Agent-Id": alpha})
        assert spent.status == 201, spent.body
        calls[runs["b"]].append(await _call(http, gateway, key, runs["b"], beta))
        calls[runs["c"]].append(await _call(http, gateway, key, runs["c"], alpha))
        calls[runs["c"]].append(await _call(http, gateway, key, runs["c"], beta))
        calls[runs["d"]].append(await _call(http, gateway, key, runs["d"], beta))
        plain = calls[runs["d"]][0]
        for letter, outcome in (("a", "succeeded"), ("b", "failed")):
            done = await post(http, gateway, key, f"/v1/alephant/runs/{runs[letter]}/complete",
                              {"outcome": outcome, "metadata": {"ticket": f"T-{tag}"}})
            assert done.status == 200, done.body

        async def archived_call() -> str | None:  # once the log setting reached the worker
            request_id = await _call(http, gateway, kept["key"], runs["e"], alpha, content=MARKUP)
            calls[runs["e"]].append(request_id)
            event_key = await eventually(functools.partial(_journalled_key, gateway, request_id), timeout=15)
            return request_id if event_key[0] else None

        archived = await eventually(archived_call, timeout=30, interval=0.3)
    for letter, run in runs.items():
        settled = functools.partial(_settled, gateway, run, len(calls[run]), len(calls[run]) + (letter == "a"),
                                    letter in "ab")
        await eventually(settled, timeout=30, interval=0.2)
    return Workload(tag, alpha, beta, workflow, runs, calls, archived, plain)


async def _journalled_key(gateway: Gateway, request_id: str) -> tuple[str | None] | None:
    """(the call's body key or None) once its llm.call is journalled."""
    async with await psycopg.AsyncConnection.connect(gateway.database_url) as conn:
        cur = await conn.execute("SELECT body->>'body_key' FROM event_journal WHERE type = 'llm.call' "
                                 "AND body->>'request_id' = %s", (request_id,))
        row = await cur.fetchone()
    return None if row is None else (row[0],)


async def _finance_by_run(admin: AdminHttp) -> dict[str, dict[str, Any]]:
    table = await admin.ok("GET", "/admin/v1/finance/summary?group_by=run&workspace_id=demo&limit=100000")
    return {row["run_id"]: row for row in table["data"]}


async def _rows(page: Page) -> dict[str, dict[str, str]]:
    """The runs table: run id -> its cells."""
    out: dict[str, dict[str, str]] = {}
    for row in await page.locator("#runs tbody tr[data-run]").all():
        cells = [(await c.inner_text()).strip() for c in await row.locator("td").all()]
        run = await row.get_attribute("data-run")
        assert run is not None
        out[run] = dict(zip(("run", "agents", "workflow", "first", "last", "requests", "cost", "outcome"), cells,
                            strict=True))
    return out


async def _filter(page: Page, **fields: str) -> None:
    for label, value in fields.items():
        await page.get_by_label(label, exact=True).fill(value)
    async with page.expect_navigation():
        await page.get_by_role("button", name="Filter").click()


async def test_the_runs_list_shows_each_run_with_the_finance_apis_cost_and_filters(
        console: Console, workload: Workload, http: aiohttp.ClientSession, gateway: Gateway) -> None:
    w = workload
    page = await console.open(f"/console/runs?ws=demo&q={w.tag}")
    assert await page.title() == "Runs · Alephant console"
    rows = await _rows(page)
    assert set(rows) == set(w.runs.values())
    finance = await _finance_by_run(AdminHttp(gateway, http))
    for run in w.runs.values():
        assert rows[run]["cost"] == usd(finance[run]["cost_usd"]), run
        assert rows[run]["requests"] == str(finance[run]["requests"]), run
    assert rows[w.runs["a"]]["agents"] == w.alpha and rows[w.runs["a"]]["workflow"] == w.workflow
    assert rows[w.runs["c"]]["agents"] == f"{w.alpha}, {w.beta}"
    assert finance[w.runs["a"]]["tool_cost_usd"] == "0.125"
    assert (rows[w.runs["a"]]["outcome"], rows[w.runs["b"]]["outcome"], rows[w.runs["c"]]["outcome"]) == (
        "succeeded", "failed", "—")
    await shot(page, "runs")

    # By run id substring, from the form.
    await _filter(page, **{"Run id contains": f"{w.tag}-c"})
    assert set(await _rows(page)) == {w.runs["c"]}
    # By agent (runs it took part in, each with its whole total): b, c and d.
    await _filter(page, **{"Run id contains": w.tag, "Agent": w.beta})
    rows = await _rows(page)
    assert set(rows) == {w.runs["b"], w.runs["c"], w.runs["d"]}
    assert rows[w.runs["c"]]["cost"] == usd(finance[w.runs["c"]]["cost_usd"])
    # By workflow, and by a window with none of them.
    await _filter(page, Agent="", Workflow=w.workflow)
    assert set(await _rows(page)) == {w.runs["a"]}
    await _filter(page, Workflow="", From="2020-01-01", To="2020-01-31")
    assert await _rows(page) == {}
    assert "No runs match." in await page.locator("#runs").inner_text()


async def test_the_runs_list_pages(console: Console, workload: Workload) -> None:
    w = workload
    page = await console.open(f"/console/runs?ws=demo&q={w.tag}&per=2")
    seen: list[str] = []
    for number in (1, 2, 3):
        rows = await _rows(page)
        assert len(rows) == (2 if number < 3 else 1), (number, rows)
        seen += rows
        assert f"page {number} of 3" in await page.locator("#runs-summary").inner_text()
        assert await page.get_by_role("link", name="Previous page of runs").count() == (number > 1)
        if number < 3:
            async with page.expect_navigation():
                await page.get_by_role("link", name="Next page of runs").click()
        else:
            assert await page.get_by_role("link", name="Next page of runs").count() == 0
    assert sorted(seen) == sorted(w.runs.values())
    async with page.expect_navigation():
        await page.get_by_role("link", name="Previous page of runs").click()
    assert "page 2 of 3" in await page.locator("#runs-summary").inner_text()


async def test_a_run_page_shows_the_run_apis_totals_and_its_calls(
        console: Console, workload: Workload, http: aiohttp.ClientSession, gateway: Gateway) -> None:
    w = workload
    run = w.runs["a"]
    page = await console.open(f"/console/runs?ws=demo&q={w.tag}")
    async with page.expect_navigation():
        await page.get_by_role("link", name=run, exact=True).click()
    assert await page.get_by_role("heading", name=f"Run {run}").is_visible()
    expected = await AdminHttp(gateway, http).ok("GET", f"/admin/v1/runs/{run}?workspace_id=demo")
    totals = page.locator("#run-totals")
    for name in ("cost", "llm_cost", "tool_cost", "payments_out", "revenue", "margin", "cache_savings"):
        assert await totals.locator(f'[data-field="{name}_usd"]').inner_text() == usd(expected[f"{name}_usd"]), name
    assert await totals.locator('[data-field="requests"]').inner_text() == str(expected["requests"])
    assert await page.locator('#run-facts [data-field="agents"]').inner_text() == ", ".join(expected["agents"])

    timeline = await AdminHttp(gateway, http).ok("GET", f"/admin/v1/runs/{run}/timeline?workspace_id=demo")
    calls = page.locator('#timeline tbody tr[data-type="llm.call"]')
    assert {await r.get_attribute("data-request") for r in await calls.all()} == set(w.calls[run])
    by_request = {i["request_id"]: i for i in timeline["items"] if i["type"] == "llm.call"}
    for row in await calls.all():
        item = by_request[await row.get_attribute("data-request")]
        assert await row.locator('[data-field="cost_usd"]').inner_text() == usd(item["cost_usd"])
        assert "mock / echo" in await row.inner_text() and "ms" in await row.inner_text()
    spend = page.locator('#timeline tbody tr[data-type="tool.spend"]')
    assert await spend.locator('[data-field="cost_usd"]').inner_text() == "$0.125"
    assert "succeeded" in await page.locator('#timeline tbody tr[data-type="run.completed"]').inner_text()
    assert "succeeded" in await page.locator('#run-facts [data-field="outcome"]').inner_text()
    assert f"T-{w.tag}" in await page.locator('#run-facts [data-field="outcome"]').inner_text()
    await shot(page, "run")

    # A run id with a slash, a space, % and & is linked and found as it is.
    odd = w.runs["d"]
    page = await console.open(f"/console/runs?ws=demo&q={quote(odd)}")
    async with page.expect_navigation():
        await page.get_by_role("link", name=odd, exact=True).click()
    assert await page.get_by_role("heading", name=f"Run {odd}").is_visible()
    assert await page.locator('#timeline tbody tr[data-type="llm.call"]').count() == 1


async def test_archived_bodies_open_from_the_timeline_escaped(console: Console, workload: Workload) -> None:
    w = workload

    async def archived() -> bool | None:  # the archive uploads in batches: a new body may take seconds
        got = await console.context.request.get(console.url(f"/console/requests/{w.archived}/body?ws=demo"))
        return True if got.status == 200 else None

    # Polled outside the page: a 404 document load would be a console error.
    await eventually(archived, timeout=30, interval=0.5)
    page = await console.open(f"/console/runs/{w.runs['e']}?ws=demo")
    async with page.expect_navigation():
        await page.get_by_role("link", name=f"Bodies of {w.archived}").click()
    request = await page.locator("#body-request").inner_text()
    assert MARKUP in request  # shown as text: no element made of it
    assert await page.locator("#body-request b, #body-request script").count() == 0
    assert '"messages"' in request and await page.locator("#body-response").inner_text()
    assert await page.get_by_role("link", name=f"Back to run {w.runs['e']}").is_visible()
    await shot(page, "run-body")


async def test_unknown_runs_and_unarchived_bodies_are_friendly_not_found_pages(
        console: Console, workload: Workload) -> None:
    got = await console.context.request.get(console.url(f"/console/runs/run-nope-{workload.tag}?ws=demo"))
    text = await got.text()
    assert got.status == 404 and "Run not found" in text and got.headers["content-type"].startswith("text/html")
    got = await console.context.request.get(console.url(f"/console/requests/{workload.plain}/body?ws=demo"))
    assert got.status == 404 and "metadata only" in await got.text()
    got = await console.context.request.get(console.url(f"/console/requests/req-nope-{workload.tag}/body?ws=demo"))
    assert got.status == 404 and "No model call with request id" in await got.text()
    got = await console.context.request.get(console.url("/console/runs?ws=demo&from=yesterday"))
    assert got.status == 400 and "From must be a date" in await got.text()
