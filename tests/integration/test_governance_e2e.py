"""Governance before the call, end to end on the session stack (issue 8): an organisation with a
budget and policies, every policy rule type, escalations, recorded refusals, rate-limit headers
and live changes under load.

Each test builds its own workspace (the stack is shared): a built-in `mock` provider under a
unique name with a price override of $0 input and $0.001 per output token, so a call that asks
for `max_tokens` n and gets a prompt longer than n tokens costs exactly n mills, and its hold
(`max_tokens` x the output price) equals that cost. Config changes are awaited through the fleet
view (`GET /admin/v1/fleet`: every worker's `applied_revision` >= the change's `revision`).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import re
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import aiohttp
import psycopg
from multidict import CIMultiDictProxy

from tests.conftest import Gateway, cli_json, eventually, journal_event, wait_until_true
from tests.fakes.upstream import FakeUpstream

MILL = 1_000_000  # $0.001 in nano-USD: one output token at the test price
CENT = 10 * MILL
OUTPUT_PER_MTOK = 10**12  # nano-USD per million output tokens = MILL per token
# 64 words of one token each (4 characters): the mock echoes it, cut at max_tokens, so every call
# asking for at most 64 tokens gets exactly that many.
PROMPT = " ".join(["word"] * 64)


def uid() -> str:
    return uuid.uuid4().hex[:10]


@dataclass
class Org:
    """A workspace of its own: department -> member -> agent, a key bound to the agent, a mock
    provider priced at MILL per output token (and optionally the fake upstream, same price)."""

    gateway: Gateway
    ws: str
    provider: str
    department: str
    member: str
    agent: str
    key: str
    key_id: str
    fake: str | None = None
    revisions: list[int] = field(default_factory=list)

    @property
    def model(self) -> str:
        return f"{self.provider}/echo"

    def admin(self, method: str, path: str, body: Any = None) -> Any:
        """An admin call that must succeed; remembers the config revision it returned."""
        out = self.gateway.admin.call(method, path, body)
        if isinstance(out, dict) and isinstance(out.get("revision"), int):
            self.revisions.append(out["revision"])
        return out

    def create(self, kind: str, **body: Any) -> dict[str, Any]:
        created: dict[str, Any] = self.admin("POST", f"/admin/v1/{kind}", {"workspace_id": self.ws, **body})
        return created

    def new_key(self, **extra: Any) -> tuple[str, str]:
        created = self.create("virtual-keys", name=f"k-{uid()}", **extra)
        return created["key"], created["id"]

    async def synced(self) -> None:
        """Wait until every worker applied the newest revision this org's changes returned."""
        if self.revisions:
            await applied(self.gateway, max(self.revisions))


def make_org(gateway: Gateway, fake_upstream: FakeUpstream | None = None) -> Org:
    tag = uid()
    ws, provider = f"gov-{tag}", f"gm{tag}"
    admin = gateway.admin
    admin.call("POST", "/admin/v1/workspaces", {"id": ws, "name": f"Governance {tag}"})
    admin.call("POST", "/admin/v1/providers", {"workspace_id": ws, "name": provider, "type": "mock",
                                               "options": {"enabled": "true"}})
    admin.call("POST", "/admin/v1/prices", {"provider": provider, "model": "echo", "input_per_mtok_nanos": 0,
                                            "output_per_mtok_nanos": OUTPUT_PER_MTOK})
    fake = None
    if fake_upstream is not None:
        fake = f"gf{tag}"
        admin.call("POST", "/admin/v1/providers", {"workspace_id": ws, "name": fake, "type": "openai",
                                                   "base_url": fake_upstream.base_url,
                                                   "api_key": "sk-governance-fake-0123456789"})
        admin.call("POST", "/admin/v1/prices", {"provider": fake, "model": "gpt-4o-mini", "input_per_mtok_nanos": 0,
                                                "output_per_mtok_nanos": OUTPUT_PER_MTOK})
    dept = admin.call("POST", "/admin/v1/departments", {"workspace_id": ws, "name": "Research"})["id"]
    member = admin.call("POST", "/admin/v1/members", {"workspace_id": ws, "name": "Ada", "department_id": dept,
                                                      "email": "ada@example.com"})["id"]
    agent = admin.call("POST", "/admin/v1/agents", {"workspace_id": ws, "id": f"agent-{tag}", "name": "Researcher",
                                                    "department_id": dept, "member_id": member})["id"]
    created = admin.call("POST", "/admin/v1/virtual-keys", {"workspace_id": ws, "name": "agent key",
                                                            "agent_id": agent})
    org = Org(gateway, ws, provider, dept, member, agent, created["key"], created["id"], fake)
    if isinstance(created.get("revision"), int):
        org.revisions.append(created["revision"])
    return org


async def applied(gateway: Gateway, revision: int, timeout: float = 15.0) -> dict[str, Any]:
    """The fleet report once every listed worker has applied `revision` (and at least one is listed)."""
    async def check() -> dict[str, Any] | None:
        report = await asyncio.to_thread(gateway.admin.call, "GET", "/admin/v1/fleet")
        workers = report.get("workers") or []
        ok = workers and all((w.get("applied_revision") or 0) >= revision for w in workers)
        return report if ok else None

    return await eventually(check, timeout=timeout, interval=0.05)


@dataclass
class Answer:
    status: int
    body: Any
    headers: CIMultiDictProxy[str]
    request_id: str

    @property
    def error(self) -> dict[str, Any]:
        assert isinstance(self.body, dict) and "error" in self.body, self.body
        error: dict[str, Any] = self.body["error"]
        return error


async def chat(http: aiohttp.ClientSession, gateway: Gateway, key: str, model: str, *, max_tokens: int | None = None,
               headers: Mapping[str, str] | None = None, content: str = PROMPT, tools: list[str] | None = None,
               path: str = "/v1/chat/completions") -> Answer:
    request_id = f"req-gov-{uuid.uuid4().hex}"
    body: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": content}]}
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    if tools:
        if path == "/v1/messages":
            body["tools"] = [{"name": t, "description": t, "input_schema": {"type": "object"}} for t in tools]
        else:
            body["tools"] = [{"type": "function", "function": {"name": t, "parameters": {"type": "object"}}}
                             for t in tools]
    if path == "/v1/messages" and max_tokens is None:
        body["max_tokens"] = 16
    sent = {"Authorization": f"Bearer {key}", "Alephant-Request-Id": request_id, **(headers or {})}
    async with http.post(gateway.stack.origin + path, json=body, headers=sent) as resp:
        try:
            decoded = await resp.json(content_type=None)
        except ValueError:
            decoded = await resp.text()
        return Answer(resp.status, decoded, resp.headers, request_id)


async def journal_rows(database_url: str, event_type: str, request_id: str) -> list[dict[str, Any]]:
    async with await psycopg.AsyncConnection.connect(database_url) as conn:
        cur = await conn.execute("SELECT body FROM event_journal WHERE type = %s AND body->>'request_id' = %s",
                                 (event_type, request_id))
        return [dict(r[0]) for r in await cur.fetchall()]


async def journalled(gateway: Gateway, request_id: str) -> dict[str, Any]:
    """The request's `llm.call`, once the projector has it."""
    return await eventually(lambda: journal_event(gateway.database_url, request_id), timeout=20)


async def policy_decision(gateway: Gateway, request_id: str) -> dict[str, Any]:
    async def one() -> dict[str, Any] | None:
        rows = await journal_rows(gateway.database_url, "policy.decision", request_id)
        return rows[0] if rows else None

    return await eventually(one, timeout=20)


def usd(text: str | None) -> Decimal:
    assert text is not None, "the budget store did not answer"
    return Decimal(text)


async def budget_view(gateway: Gateway, budget_id: str) -> dict[str, Any]:
    view: dict[str, Any] = await asyncio.to_thread(gateway.admin.call, "GET", f"/admin/v1/budgets/{budget_id}")
    return view


async def settled_budget(gateway: Gateway, budget_id: str, spent: Decimal) -> dict[str, Any]:
    """GET /budgets/{id} once settlements landed: `spent` and nothing held."""
    last: list[dict[str, Any]] = []

    async def check() -> dict[str, Any] | None:
        view = await budget_view(gateway, budget_id)
        last[:] = [view]
        if view.get("spent_usd") is None or usd(view["spent_usd"]) != spent or usd(view["held_usd"]) != 0:
            return None
        return view

    try:
        # Generous: under a full suite's load a settlement can wait out a Redis timeout (1 s) and
        # be applied by the next batch; this is when it lands, not how fast.
        return await eventually(check, timeout=30)
    except BaseException as exc:  # say what the budget showed instead
        raise AssertionError(f"budget {budget_id} never showed spent {spent} and nothing held: {last}") from exc


# -- the "done when" scenario -----------------------------------------------------------------------



def cli_org(gateway: Gateway) -> tuple[Org, dict[str, Any]]:
    """The "done when" organisation, built with the CLI only: a workspace, its priced mock provider,
    a department, a member, an agent, the agent's key, a $1 monthly budget on the agent and a policy
    on the department (the last change waits until every worker applied it). (org, budget)."""
    tag = uid()
    ws, provider = f"cli-{tag}", f"gm{tag}"
    cli_json(gateway, "workspaces", "create", f"CLI org {tag}", "--id", ws)
    cli_json(gateway, "providers", "set", provider, "-w", ws, "--type", "mock", "--option", "enabled=true")
    cli_json(gateway, "prices", "set", provider, "echo", "--input", "0", "--output", str(OUTPUT_PER_MTOK))
    dept = cli_json(gateway, "departments", "create", "Research", "-w", ws)["id"]
    member = cli_json(gateway, "members", "create", "Ada", "-w", ws, "--department", dept,
                      "--email", "ada@example.com")["id"]
    agent = cli_json(gateway, "agents", "create", "Researcher", "-w", ws, "--id", f"agent-{tag}")["id"]
    key = cli_json(gateway, "keys", "create", "-w", ws, "--name", "agent key", "--agent", agent, "--department", dept,
                   "--member", member)
    budget = cli_json(gateway, "budgets", "create", "-w", ws, "--scope", "agent", "--scope-id", agent,
                      "--period", "month", "--limit-usd", "1.00", "--timezone", "UTC")
    cli_json(gateway, "policies", "create", "-w", ws, "--scope", "department", "--scope-id", dept, "--models-allow",
             f"{provider}/*", "--max-tokens-cap", "1000", "--wait")
    return Org(gateway, ws, provider, dept, member, agent, key["key"], key["id"]), budget


async def test_a_dollar_budget_refuses_exactly_when_the_next_hold_would_exceed_it(
        gateway: Gateway, http: aiohttp.ClientSession) -> None:
    """The issue's "done when", set up from the CLI."""
    org, budget = await asyncio.to_thread(cli_org, gateway)
    assert usd(budget["limit_usd"]) == 1 and budget["id"]

    # `alephant budgets get` shows the same figures as the API.
    assert usd(cli_json(gateway, "budgets", "get", budget["id"])["remaining_usd"]) == 1

    # 33 calls of 30 mills: $0.99 spent, $0.01 left.
    for _ in range(33):
        ans = await chat(http, gateway, org.key, org.model, max_tokens=30)
        assert ans.status == 200, ans.body
        assert ans.body["usage"]["completion_tokens"] == 30
    view = await settled_budget(gateway, budget["id"], Decimal("0.99"))
    assert usd(view["remaining_usd"]) == Decimal("0.01")

    # Admitted iff spent + hold <= limit: the refusal comes at the first call that would overspend,
    # and a smaller call that still fits is admitted after it.
    spent = 990 * MILL
    outcomes: list[tuple[int, Answer]] = []
    for tokens in (30, 11, 10, 1, 1):
        ans = await chat(http, gateway, org.key, org.model, max_tokens=tokens)
        fits = spent + tokens * MILL <= 1000 * MILL
        assert ans.status == (200 if fits else 429), (tokens, spent, ans.body)
        if fits:
            spent += tokens * MILL
            await settled_budget(gateway, budget["id"], Decimal(spent) / 10**9)
        else:
            err = ans.error
            assert (err["type"], err["code"]) == ("insufficient_quota", "budget_exceeded")
            assert budget["id"] in err["message"], err["message"]
        outcomes.append((tokens, ans))
    assert [a.status for _, a in outcomes] == [429, 429, 200, 429, 429]
    assert spent == 1000 * MILL

    view = await settled_budget(gateway, budget["id"], Decimal("1"))
    assert usd(view["remaining_usd"]) == 0 and usd(view["held_usd"]) == 0

    # Every call is on record: the refusals with their hold and decision, the successes with their cost.
    for tokens, ans in outcomes:
        event = await journalled(gateway, ans.request_id)
        assert event["agent_id"] == org.agent and event["department_id"] == org.department
        assert event["member_id"] == org.member and event["hold_nanos"] == tokens * MILL
        if ans.status == 429:
            assert (event["status"], event["decision"], event["error_code"]) == (429, "budget_exceeded",
                                                                                 "budget_exceeded")
            assert event["cost_nanos"] == 0
        else:
            assert (event["status"], event["decision"], event["cost_nanos"]) == (200, "allow", tokens * MILL)

    async def ledger_total() -> int | None:
        async with await psycopg.AsyncConnection.connect(gateway.database_url) as conn:
            cur = await conn.execute(
                "SELECT count(*), COALESCE(sum((body->>'cost_nanos')::bigint), 0) FROM event_journal "
                "WHERE type = 'llm.call' AND workspace_id = %s AND body->>'agent_id' = %s", (org.ws, org.agent))
            row = await cur.fetchone()
        assert row is not None
        return int(row[1]) if row[0] == 33 + len(outcomes) else None

    assert await eventually(ledger_total, timeout=20) == 1000 * MILL


# -- policy rules, one per type ---------------------------------------------------------------------


async def test_model_deny_is_a_403_naming_the_rule_in_both_api_shapes(gateway: Gateway,
                                                                      http: aiohttp.ClientSession) -> None:
    org = make_org(gateway)
    policy = org.create("policies", scope="agent", scope_id=org.agent, models_deny=[f"{org.provider}/forbidden-*"])
    await org.synced()

    assert (await chat(http, gateway, org.key, org.model, max_tokens=5)).status == 200
    ans = await chat(http, gateway, org.key, f"{org.provider}/forbidden-1", max_tokens=5)
    assert ans.status == 403
    err = ans.error
    assert (err["type"], err["code"]) == ("permission_error", "policy_denied")
    assert err["param"] and "models_deny" in err["param"] and policy["id"] in err["param"]
    assert err["param"] in err["message"] or policy["id"] in err["message"]

    decision = await policy_decision(gateway, ans.request_id)
    assert decision["outcome"] == "deny" and decision["code"] == "policy_denied"
    assert decision["rule"] == err["param"] and (decision["scope"], decision["scope_id"]) == ("agent", org.agent)
    event = await journalled(gateway, ans.request_id)
    assert (event["status"], event["decision"]) == (403, "policy_denied")

    anthropic = await chat(http, gateway, org.key, f"{org.provider}/forbidden-2", path="/v1/messages")
    assert anthropic.status == 403
    assert anthropic.body["type"] == "error" and anthropic.body["error"]["type"] == "permission_error"
    assert policy["id"] in anthropic.body["error"]["message"]


async def test_a_stripped_tool_never_reaches_the_upstream(gateway: Gateway, http: aiohttp.ClientSession,
                                                          fake_upstream: FakeUpstream) -> None:
    org = make_org(gateway, fake_upstream)
    org.create("policies", scope="member", scope_id=org.member, tools_deny=["shell"], tool_action="strip")
    await org.synced()
    marker = f"strip-{uid()} " + PROMPT
    ans = await chat(http, gateway, org.key, f"{org.fake}/gpt-4o-mini", max_tokens=5, content=marker,
                     tools=["shell", "read_file"])
    assert ans.status == 200, ans.body
    forwarded = [r for r in fake_upstream.requests
                 if isinstance(r.body, dict) and marker in str(r.body.get("messages"))]
    assert len(forwarded) == 1
    names = [t["function"]["name"] for t in forwarded[0].body.get("tools", [])]
    assert names == ["read_file"]
    decision = await policy_decision(gateway, ans.request_id)
    assert decision["outcome"] == "strip" and "tools_deny" in decision["rule"]
    assert (decision["scope"], decision["scope_id"]) == ("member", org.member)


async def test_a_denied_tool_is_refused_before_the_upstream(gateway: Gateway, http: aiohttp.ClientSession,
                                                            fake_upstream: FakeUpstream) -> None:
    org = make_org(gateway, fake_upstream)
    org.create("policies", scope="agent", scope_id=org.agent, tools_deny=["shell"])
    await org.synced()
    marker = f"deny-{uid()} " + PROMPT
    ans = await chat(http, gateway, org.key, f"{org.fake}/gpt-4o-mini", max_tokens=5, content=marker,
                     tools=["shell"])
    assert ans.status == 403 and ans.error["code"] == "policy_denied" and "tools_deny" in ans.error["param"]
    assert not [r for r in fake_upstream.requests if marker in str(getattr(r, "body", ""))]
    assert (await policy_decision(gateway, ans.request_id))["outcome"] == "deny"


async def test_max_tokens_is_clamped_to_the_policy_cap_upstream(gateway: Gateway, http: aiohttp.ClientSession,
                                                                fake_upstream: FakeUpstream) -> None:
    org = make_org(gateway, fake_upstream)
    org.create("policies", scope="workspace", scope_id=org.ws, max_tokens_cap=7)
    await org.synced()
    marker = f"clamp-{uid()} " + PROMPT
    ans = await chat(http, gateway, org.key, f"{org.fake}/gpt-4o-mini", max_tokens=100, content=marker)
    assert ans.status == 200, ans.body
    forwarded = [r for r in fake_upstream.requests
                 if isinstance(r.body, dict) and marker in str(r.body.get("messages"))]
    assert len(forwarded) == 1
    body = forwarded[0].body
    assert (body.get("max_completion_tokens") or body.get("max_tokens")) == 7
    assert ans.body["usage"]["completion_tokens"] <= 7
    decision = await policy_decision(gateway, ans.request_id)
    assert decision["outcome"] == "clamp" and "max_tokens" in decision["rule"]
    event = await journalled(gateway, ans.request_id)
    assert event["status"] == 200 and event["hold_nanos"] == 0  # no budget on the path: nothing held


async def test_outside_the_time_window_is_a_403(gateway: Gateway, http: aiohttp.ClientSession) -> None:
    org = make_org(gateway)
    # Only a day two days from now (UTC) is allowed: now is outside, whatever the time of day.
    other_day = (dt.datetime.now(dt.UTC).weekday() + 2) % 7
    org.create("policies", scope="agent", scope_id=org.agent,
               windows=[{"days": [other_day], "start": "00:00", "end": "24:00", "timezone": "UTC"}])
    await org.synced()
    ans = await chat(http, gateway, org.key, org.model, max_tokens=5)
    assert ans.status == 403
    assert (ans.error["type"], ans.error["code"]) == ("permission_error", "outside_time_window")
    assert "windows" in (ans.error["param"] or "")
    decision = await policy_decision(gateway, ans.request_id)
    assert decision["code"] == "outside_time_window" and "windows" in decision["rule"]
    assert (await journalled(gateway, ans.request_id))["decision"] == "outside_time_window"


# -- escalation -------------------------------------------------------------------------------------


async def test_an_approved_escalation_admits_one_retry(gateway: Gateway, http: aiohttp.ClientSession) -> None:
    org = make_org(gateway)
    # Calls estimated above $0.005 need an admin: 10 tokens ($0.01) escalate, 2 tokens do not.
    org.create("policies", scope="agent", scope_id=org.agent, escalate_over_usd="0.005")
    await org.synced()
    assert (await chat(http, gateway, org.key, org.model, max_tokens=2)).status == 200

    refused = await chat(http, gateway, org.key, org.model, max_tokens=10)
    assert refused.status == 403
    assert (refused.error["type"], refused.error["code"]) == ("permission_error", "escalation_required")
    found = re.search(r"\besc_[0-9a-f]+\b", refused.error["message"])
    assert found, refused.error["message"]
    esc_id = found.group(0)
    decision = await policy_decision(gateway, refused.request_id)
    assert decision["outcome"] == "escalate" and decision["escalation_id"] == esc_id

    async def pending() -> dict[str, Any] | None:
        status, body = await asyncio.to_thread(gateway.admin.request, "GET", f"/admin/v1/escalations/{esc_id}")
        return body if status == 200 and body.get("status") == "pending" else None

    row = await eventually(pending, timeout=20)
    assert row["workspace_id"] == org.ws and row["key_id"] == org.key_id

    # Without approval, naming the id changes nothing.
    early = await chat(http, gateway, org.key, org.model, max_tokens=10, headers={"Alephant-Escalation-Id": esc_id})
    assert early.status == 403 and early.error["code"] == "escalation_required"

    approved = org.admin("POST", f"/admin/v1/escalations/{esc_id}/approve", {})
    assert approved["status"] == "approved"
    await org.synced()

    retry = await chat(http, gateway, org.key, org.model, max_tokens=10, headers={"Alephant-Escalation-Id": esc_id})
    assert retry.status == 200, retry.body
    again = await chat(http, gateway, org.key, org.model, max_tokens=10, headers={"Alephant-Escalation-Id": esc_id})
    assert again.status == 403 and again.error["code"] == "escalation_required"
    assert esc_id in again.error["message"]
    # Another key of the same agent (under the same policy) cannot use the grant.
    other_key, _ = org.new_key(agent_id=org.agent)
    await org.synced()
    stolen = await chat(http, gateway, other_key, org.model, max_tokens=10, headers={"Alephant-Escalation-Id": esc_id})
    assert stolen.status == 403 and stolen.error["code"] == "escalation_required"


# -- refusals are recorded --------------------------------------------------------------------------


async def test_401_403_and_429_each_leave_a_queryable_record(gateway: Gateway, http: aiohttp.ClientSession) -> None:
    org = make_org(gateway)
    limit = org.create("limits", scope="key", scope_id=org.key_id, rpm=1)
    await org.synced()

    mismatch = await chat(http, gateway, org.key, org.model, max_tokens=5,
                          headers={"Alephant-Agent-Id": "someone-else"})
    assert mismatch.status == 403 and mismatch.error["code"] == "agent_mismatch"

    async def mismatches() -> list[dict[str, Any]] | None:
        async with await psycopg.AsyncConnection.connect(gateway.database_url) as conn:
            cur = await conn.execute("SELECT body FROM event_journal WHERE type = 'llm.call' AND workspace_id = %s "
                                     "AND body->>'error_code' = 'agent_mismatch'", (org.ws,))
            rows = [dict(r[0]) for r in await cur.fetchall()]
        return rows or None

    (event,) = await eventually(mismatches, timeout=20)
    assert (event["status"], event["decision"], event["key_id"]) == (403, "agent_mismatch", org.key_id)

    assert (await chat(http, gateway, org.key, org.model, max_tokens=5)).status == 200
    limited = await chat(http, gateway, org.key, org.model, max_tokens=5)
    assert limited.status == 429 and limited.error["code"] == "rate_limit_exceeded"
    assert limit["id"] in limited.error["message"]
    event = await journalled(gateway, limited.request_id)
    assert (event["status"], event["decision"]) == (429, "rate_limit_exceeded")

    since_ms = int(time.time() * 1000)
    unknown = await chat(http, gateway, "sk-alephant-unknown-" + uid(), org.model, max_tokens=5)
    assert unknown.status == 401 and unknown.error["code"] == "invalid_api_key"

    async def refusal_counts() -> dict[str, Any] | None:
        async with await psycopg.AsyncConnection.connect(gateway.database_url) as conn:
            cur = await conn.execute(
                "SELECT body FROM event_journal WHERE type = 'auth.refusals' "
                "AND (body->>'window_end_ms')::bigint >= %s",
                (since_ms,))
            rows = [dict(r[0]) for r in await cur.fetchall()]
        hits = [r for r in rows if r.get("count", 0) >= 1 and r.get("codes", {}).get("invalid_api_key", 0) >= 1
                and r.get("endpoints", {}).get("/v1/chat/completions", 0) >= 1]
        return hits[0] if hits else None

    counted = await eventually(refusal_counts, timeout=30)
    assert counted["window_start_ms"] <= counted["window_end_ms"]


async def test_an_agent_mismatch_is_recorded_under_the_request_id_the_client_sent(
        gateway: Gateway, http: aiohttp.ClientSession) -> None:
    org = make_org(gateway)
    await org.synced()
    mismatch = await chat(http, gateway, org.key, org.model, max_tokens=5,
                          headers={"Alephant-Agent-Id": "someone-else"})
    assert mismatch.status == 403 and mismatch.error["code"] == "agent_mismatch"
    assert mismatch.headers.get("Alephant-Request-Id") == mismatch.request_id
    event = await journalled(gateway, mismatch.request_id)
    assert (event["status"], event["decision"]) == (403, "agent_mismatch")


async def test_rate_limit_headers_then_429_with_retry_after(gateway: Gateway, http: aiohttp.ClientSession) -> None:
    org = make_org(gateway)
    limit = org.create("limits", scope="agent", scope_id=org.agent, rpm=3)
    await org.synced()
    remaining = []
    for _ in range(3):
        ans = await chat(http, gateway, org.key, org.model, max_tokens=5)
        assert ans.status == 200, ans.body
        assert ans.headers["x-ratelimit-limit-requests"] == "3"
        assert ans.headers["x-ratelimit-reset-requests"]
        remaining.append(int(ans.headers["x-ratelimit-remaining-requests"]))
    assert remaining == [2, 1, 0]
    over = await chat(http, gateway, org.key, org.model, max_tokens=5)
    assert over.status == 429
    assert (over.error["type"], over.error["code"]) == ("rate_limit_error", "rate_limit_exceeded")
    assert limit["id"] in over.error["message"]
    retry_after = int(over.headers["Retry-After"])
    assert 1 <= retry_after <= 60  # one request's worth of a 3-per-minute limit
    assert over.headers["x-ratelimit-remaining-requests"] == "0"


# -- live changes under load ------------------------------------------------------------------------


class Load:
    """Background requests (a few in flight at a time) until stopped; counts the statuses."""

    def __init__(self, http: aiohttp.ClientSession, gateway: Gateway, key: str, model: str) -> None:
        self.http, self.gateway, self.key, self.model = http, gateway, key, model
        self.statuses: dict[int, int] = {}
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    async def _loop(self) -> None:
        while not self._stop.is_set():
            ans = await chat(self.http, self.gateway, self.key, self.model, max_tokens=1)
            self.statuses[ans.status] = self.statuses.get(ans.status, 0) + 1

    def start(self, parallel: int = 3) -> None:
        self._tasks = [asyncio.create_task(self._loop()) for _ in range(parallel)]

    async def stop(self) -> dict[int, int]:
        self._stop.set()
        await asyncio.gather(*self._tasks)
        return self.statuses


async def takes_effect_within(check: Any, seconds: float) -> None:
    """Poll `check` (async, -> bool) until true; fail if that takes longer than `seconds`."""
    await wait_until_true(check, timeout=seconds)


async def settled_once(gateway: Gateway, budget_id: str) -> None:
    """Wait until the budget shows some spend (the load is charging it)."""
    async def spent() -> bool:
        view = await budget_view(gateway, budget_id)
        return view.get("spent_usd") is not None and usd(view["spent_usd"]) > 0

    await wait_until_true(spent, timeout=10)


async def test_revoke_tighten_and_repolicy_take_effect_within_a_second_under_load(
        gateway: Gateway, http: aiohttp.ClientSession) -> None:
    org = make_org(gateway)
    budget = org.create("budgets", scope="agent", scope_id=org.agent, period="total", limit_usd="5.00")
    policy = org.create("policies", scope="agent", scope_id=org.agent, models_allow=[f"{org.provider}/*"])
    doomed_key, doomed_id = org.new_key()
    await org.synced()
    loads = [Load(http, gateway, org.key, org.model), Load(http, gateway, doomed_key, org.model)]
    for load in loads:
        load.start()
    try:
        async def running() -> bool:
            return all(sum(x.statuses.values()) > 5 for x in loads)

        await wait_until_true(running)

        async def change(method: str, path: str, body: Any = None) -> int:
            out = await asyncio.to_thread(gateway.admin.call, method, path, body)
            assert out["propagated"] is True and isinstance(out["revision"], int), out
            return int(out["revision"])

        # 1. Revoke a key: 401 within a second.
        rev = await change("POST", f"/admin/v1/virtual-keys/{doomed_id}/revoke")

        async def revoked() -> bool:
            ans = await chat(http, gateway, doomed_key, org.model, max_tokens=1)
            return ans.status == 401 and ans.error["code"] == "invalid_api_key"

        await takes_effect_within(revoked, 1.0)
        fleet = await applied(gateway, rev, timeout=5)
        assert all(w["applied_revision"] >= rev for w in fleet["workers"])

        # 2. Tighten the budget below what is spent: budget_exceeded within a second.
        await settled_once(gateway, budget["id"])
        rev = await change("PATCH", f"/admin/v1/budgets/{budget['id']}", {"limit_usd": "0.000001"})

        async def exhausted() -> bool:
            ans = await chat(http, gateway, org.key, org.model, max_tokens=1)
            return ans.status == 429 and ans.error["code"] == "budget_exceeded"

        await takes_effect_within(exhausted, 1.0)
        await applied(gateway, rev, timeout=5)
        rev = await change("PATCH", f"/admin/v1/budgets/{budget['id']}", {"limit_usd": "5.00"})
        await applied(gateway, rev, timeout=5)

        # 3. Change the policy to deny the model: policy_denied within a second.
        rev = await change("PATCH", f"/admin/v1/policies/{policy['id']}", {"models_deny": [f"{org.provider}/*"]})

        async def denied() -> bool:
            ans = await chat(http, gateway, org.key, org.model, max_tokens=1)
            return ans.status == 403 and ans.error["code"] == "policy_denied"

        await takes_effect_within(denied, 1.0)
        await applied(gateway, rev, timeout=5)
    finally:
        statuses = [await load.stop() for load in loads]
    # The load saw only answers the changes explain: never a 5xx.
    assert all(code < 500 for s in statuses for code in s), statuses
    assert statuses[1].get(401, 0) > 0 and statuses[0].get(200, 0) > 0
