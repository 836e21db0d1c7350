"""Prompt templates on the real stack (issue 10, part 5): versions through the admin API (and its
Idempotency-Key), rendering on /v1/responses and /v1/chat/completions against the mock provider
(`mock/echo` repeats the last user message, so the answer shows the substituted text), version
pinning, 400 on missing/extra variables and malformed templates, 404 on unknown ones, a policy's
`prompts_allow`, and the journalled `llm.call` carrying the template's name and version."""

from __future__ import annotations

import asyncio
import json
import secrets
from typing import Any

import aiohttp
import pytest

from tests.conftest import Gateway, cli_json, eventually, journal_event
from tests.integration.test_governance_e2e import applied

A = "/admin/v1"
WS = "demo"


async def admin(gateway: Gateway, http: aiohttp.ClientSession, method: str, path: str, body: Any = None,
                key: str | None = None) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {gateway.stack.demo['ALEPHANT_ADMIN_TOKEN']}"}
    if key is not None:
        headers["Idempotency-Key"] = key
    async with http.request(method, gateway.stack.admin_url + path, json=body, headers=headers) as resp:
        return resp.status, await resp.json()


async def create(gateway: Gateway, http: aiohttp.ClientSession, name: str, *contents: str, **extra: Any) -> Any:
    messages = [{"role": "system" if i == 0 and len(contents) > 1 else "user", "content": c}
                for i, c in enumerate(contents)]
    status, body = await admin(gateway, http, "POST", f"{A}/prompts",
                               {"workspace_id": WS, "name": name, "messages": messages, **extra})
    assert status == 201, body
    await applied(gateway, body["revision"])
    return body


async def call(gateway: Gateway, http: aiohttp.ClientSession, path: str, body: dict[str, Any],
               key: str | None = None) -> tuple[int, Any, str]:
    headers = {"Authorization": f"Bearer {key or gateway.demo_key}"}
    async with http.post(gateway.base_url + path, json=body, headers=headers) as resp:
        return resp.status, await resp.json(), resp.headers.get("alephant-request-id", "")


def responses_text(body: dict[str, Any]) -> str:
    return "".join(part["text"] for item in body["output"] if item["type"] == "message"
                   for part in item["content"] if part["type"] == "output_text")


@pytest.fixture
def name() -> str:
    return f"tpl-{secrets.token_hex(4)}"


async def test_versions_are_created_listed_and_rendered_on_both_apis(gateway: Gateway, http: aiohttp.ClientSession,
                                                                     name: str) -> None:
    v1 = await create(gateway, http, name, "You are {{persona}}.", "Summarise {{topic}} for {{persona}}",
                      model="mock/echo", params={"temperature": 0.1})
    assert v1["version"] == 1 and v1["name"] == name and v1["id"] and isinstance(v1["revision"], int)
    v2 = await create(gateway, http, name, "v2 {{topic}} please", model="mock/echo")
    assert v2["version"] == 2 and v2["id"] != v1["id"]

    status, listed = await admin(gateway, http, "GET", f"{A}/prompts/{name}?workspace_id={WS}")
    assert status == 200 and [p["version"] for p in listed["data"]] == [1, 2]
    assert listed["data"][0]["messages"][1]["content"] == "Summarise {{topic}} for {{persona}}"

    # Responses: the newest version by default; the template's model applies.
    status, out, request_id = await call(gateway, http, "/responses",
                                         {"prompt": {"id": name, "variables": {"topic": "tides"}}})
    assert status == 200, out
    assert responses_text(out) == "v2 tides please"
    event = await eventually(lambda: journal_event(gateway.database_url, request_id))
    assert event["prompt_id"] == name and event["prompt_version"] == 2 and event["model"] == "echo"

    # Pinned to version 1 (a string, as the OpenAI SDK sends it), on Chat Completions.
    status, out, request_id = await call(gateway, http, "/chat/completions", {
        "prompt": {"id": name, "version": "1", "variables": {"persona": "a child", "topic": "tides"}}})
    assert status == 200, out
    assert out["choices"][0]["message"]["content"] == "Summarise tides for a child"
    event = await eventually(lambda: journal_event(gateway.database_url, request_id))
    assert event["prompt_id"] == name and event["prompt_version"] == 1

    # The request's own messages come after the template's (the echo repeats the last one), and
    # the version can be named by its entity id.
    status, out, _ = await call(gateway, http, "/responses", {
        "prompt": {"id": v1["id"], "variables": {"persona": "x", "topic": "y"}}, "input": "my own question"})
    assert status == 200 and responses_text(out) == "my own question", out

    # A call without a template records none.
    status, out, request_id = await call(gateway, http, "/chat/completions",
                                         {"model": "mock/echo", "messages": [{"role": "user", "content": "hi"}]})
    assert status == 200
    event = await eventually(lambda: journal_event(gateway.database_url, request_id))
    assert event.get("prompt_id") is None and event.get("prompt_version") is None


async def test_bad_variables_and_unknown_templates(gateway: Gateway, http: aiohttp.ClientSession, name: str) -> None:
    await create(gateway, http, name, "Hello {{who}} from {{where}}", model="mock/echo")
    for path in ("/responses", "/chat/completions"):
        status, out, _ = await call(gateway, http, path, {"prompt": {"id": name, "variables": {
            "who": "Ada", "when": "now"}}})
        err = out["error"]
        assert status == 400 and err["type"] == "invalid_request_error" and err["param"] == "prompt.variables", out
        assert "missing 'where'" in err["message"] and "unexpected 'when'" in err["message"]

        status, out, _ = await call(gateway, http, path, {"prompt": {"id": f"{name}-nope", "variables": {}}})
        assert status == 404 and f"{name}-nope" in out["error"]["message"], out
        status, out, _ = await call(gateway, http, path, {"prompt": {"id": name, "version": "7", "variables": {
            "who": "a", "where": "b"}}})
        assert status == 404 and "no version 7" in out["error"]["message"], out


async def test_malformed_templates_are_refused_at_create(gateway: Gateway, http: aiohttp.ClientSession,
                                                         name: str) -> None:
    for content in ("Hello {{who", "Hello {{ two words }}"):
        status, out = await admin(gateway, http, "POST", f"{A}/prompts", {
            "workspace_id": WS, "name": name, "messages": [{"role": "user", "content": "ok"},
                                                           {"role": "user", "content": content}]})
        assert status == 400 and out["error"]["param"] == "messages[1].content", out
        assert out["error"]["code"] == "malformed_placeholder"
    status, out = await admin(gateway, http, "POST", f"{A}/prompts", {
        "workspace_id": WS, "name": name, "messages": [{"role": "user", "content": "x"}], "params": {"bogus": 1}})
    assert status == 400, out
    status, out = await admin(gateway, http, "GET", f"{A}/prompts/{name}?workspace_id={WS}")
    assert status == 404, out  # nothing was written


async def test_idempotent_create_makes_one_version(gateway: Gateway, http: aiohttp.ClientSession, name: str) -> None:
    body = {"workspace_id": WS, "name": name, "messages": [{"role": "user", "content": "{{q}}"}]}
    key = secrets.token_hex(8)
    first = await admin(gateway, http, "POST", f"{A}/prompts", body, key=key)
    again = await admin(gateway, http, "POST", f"{A}/prompts", body, key=key)
    assert first[0] == again[0] == 201 and first[1]["id"] == again[1]["id"] and first[1]["version"] == 1
    status, listed = await admin(gateway, http, "GET", f"{A}/prompts/{name}?workspace_id={WS}")
    assert status == 200 and [p["version"] for p in listed["data"]] == [1]


async def test_policy_prompts_allow_restricts_a_key(gateway: Gateway, http: aiohttp.ClientSession,
                                                    name: str) -> None:
    await create(gateway, http, f"{name}-ok", "allowed {{x}}", model="mock/echo")
    other = await create(gateway, http, f"{name}-other", "other {{x}}", model="mock/echo")
    status, key = await admin(gateway, http, "POST", f"{A}/virtual-keys", {"workspace_id": WS})
    assert status == 201, key
    status, policy = await admin(gateway, http, "POST", f"{A}/policies", {
        "workspace_id": WS, "scope": "key", "scope_id": key["id"], "prompts_allow": [f"{name}-ok"]})
    assert status == 201 and policy["prompts_allow"] == [f"{name}-ok"], policy
    await applied(gateway, policy["revision"])

    status, out, _ = await call(gateway, http, "/responses",
                                {"prompt": {"id": f"{name}-ok", "variables": {"x": "1"}}}, key["key"])
    assert status == 200 and responses_text(out) == "allowed 1", out
    status, out, request_id = await call(gateway, http, "/chat/completions",
                                         {"prompt": {"id": f"{name}-other", "variables": {"x": "1"}}}, key["key"])
    assert status == 403 and out["error"]["code"] == "policy_denied", out
    assert f"'{name}-other'" in out["error"]["message"] and "prompts_allow" in out["error"]["message"], out
    event = await eventually(lambda: journal_event(gateway.database_url, request_id))
    assert event["decision"] == "policy_denied" and event["prompt_id"] == f"{name}-other"
    # The dry run answers the same, naming the template by name or by one version's id.
    for ref in (f"{name}-other", other["id"]):
        status, dry = await admin(gateway, http, "POST", f"{A}/decisions/dry-run", {
            "key": key["key"], "body": {"prompt": {"id": ref, "variables": {"x": "1"}}, "model": "mock/echo"}})
        assert status == 200 and (dry["decision"], dry["code"]) == ("deny", "policy_denied"), dry
        assert dry["rule"] == f"policy:{policy['id']}.prompts_allow", dry
    status, dry = await admin(gateway, http, "POST", f"{A}/decisions/dry-run", {
        "key": key["key"], "body": {"prompt": {"id": f"{name}-ok", "variables": {"x": "1"}}, "model": "mock/echo"}})
    assert status == 200 and dry["decision"] == "allow", dry
    # Plain calls without a template are not restricted by prompts_allow.
    status, out, _ = await call(gateway, http, "/chat/completions",
                                {"model": "mock/echo", "messages": [{"role": "user", "content": "hi"}]}, key["key"])
    assert status == 200, out



async def test_cli_creates_and_lists_versions(gateway: Gateway, http: aiohttp.ClientSession, name: str) -> None:
    messages = json.dumps([{"role": "user", "content": "Ping {{who}}"}])
    first = await asyncio.to_thread(cli_json, gateway, "prompts", "create", name, "-w", WS, "--messages", messages,
                                    "--model", "mock/echo", "--params", '{"max_tokens": 20}', "--wait")
    second = await asyncio.to_thread(cli_json, gateway, "prompts", "create", name, "-w", WS, "--messages", messages)
    assert (first["version"], second["version"]) == (1, 2) and first["params"] == {"max_tokens": 20}
    listed = await asyncio.to_thread(cli_json, gateway, "prompts", "list", name, "-w", WS)
    assert [p["version"] for p in listed["data"]] == [1, 2]
    everything = await asyncio.to_thread(cli_json, gateway, "prompts", "list", "-w", WS)
    assert {p["id"] for p in everything["data"]} >= {first["id"], second["id"]}
    status, out, _ = await call(gateway, http, "/chat/completions",
                                {"prompt": {"id": name, "version": 1, "variables": {"who": "CLI"}}})
    assert status == 200 and out["choices"][0]["message"]["content"] == "Ping CLI", out


async def test_a_streamed_call_renders_and_records_the_template(gateway: Gateway, http: aiohttp.ClientSession,
                                                                name: str) -> None:
    await create(gateway, http, name, "Stream {{what}}", model="mock/echo")
    headers = {"Authorization": f"Bearer {gateway.demo_key}"}
    body = {"prompt": {"id": name, "variables": {"what": "this"}}, "stream": True}
    async with http.post(gateway.base_url + "/chat/completions", json=body, headers=headers) as resp:
        assert resp.status == 200, await resp.text()
        request_id = resp.headers["alephant-request-id"]
        text = ""
        async for line in resp.content:
            if line.startswith(b"data: {"):
                for choice in json.loads(line[6:])["choices"]:
                    text += choice.get("delta", {}).get("content") or ""
    assert text == "Stream this"
    event = await eventually(lambda: journal_event(gateway.database_url, request_id))
    assert event["stream"] is True and event["prompt_id"] == name and event["prompt_version"] == 1


async def test_cost_is_grouped_by_prompt_version(gateway: Gateway, http: aiohttp.ClientSession, name: str) -> None:
    """The finance projection keeps each call's template and version: `group_by=prompt` gives one
    row per version, with the calls and the cost their answers reported."""
    await create(gateway, http, name, "first {{x}}", model="mock/echo")
    await create(gateway, http, name, "second {{x}} is longer than the first", model="mock/echo")
    costs: dict[int, list[str]] = {1: [], 2: []}
    for version, n in ((1, 2), (2, 3)):
        for i in range(n):
            body = {"prompt": {"id": name, "version": str(version), "variables": {"x": f"v{version}-{i}"}}}
            async with http.post(gateway.base_url + "/chat/completions", json=body,
                                 headers={"Authorization": f"Bearer {gateway.demo_key}"}) as resp:
                assert resp.status == 200, await resp.text()
                costs[version].append(resp.headers["Alephant-Cost-Usd"])
    from decimal import Decimal

    expected = {f"{name}@v{v}": (len(c), sum((Decimal(x) for x in c), Decimal(0))) for v, c in costs.items()}

    async def grouped() -> dict[str, tuple[int, Decimal]] | None:
        status, out = await admin(gateway, http, "GET",
                                  f"{A}/finance/summary?group_by=prompt&workspace_id={WS}&limit=1000")
        assert status == 200, out
        rows = {r["group"]: (r["requests"], Decimal(r["llm_cost_usd"])) for r in out["data"] if r["group"]
                and r["group"].startswith(f"{name}@")}
        return rows if rows == expected else None

    assert await eventually(grouped, timeout=30) == expected
    assert all(cost > 0 for _, cost in expected.values())
