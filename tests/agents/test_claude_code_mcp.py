"""Claude Code, the real CLI from npm, with the gateway as both its model endpoint and its MCP
server (issue 16): one headless turn in which the model calls a tool of an upstream MCP server
through the gateway's aggregate `/mcp` endpoint.

The model is tests/agents/fake_claude.py's ScriptedClaude behind an anthropic-type provider: it
loads the MCP tool with ToolSearch (Claude Code defers MCP tools by default), calls it, then
quotes its result. The MCP server is tests/fakes/mcp_server.py's, registered as `tools` with a
priced `echo`; a workspace policy denies `tools.fail`. Claude Code runs as a user would configure
it (README, "Point your clients at it"): `ANTHROPIC_BASE_URL` at the gateway's root, the virtual
key as its token, and an `--mcp-config` naming `<gateway>/mcp` as an HTTP server with the key and
the `Alephant-*` headers; a throwaway HOME, telemetry and updates off, no network but the
stack's loopback.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import psycopg
import pytest
import pytest_asyncio

from tests.agents.conftest import CLAUDE_CODE_VERSION
from tests.agents.fake_claude import FINAL_PREFIX, ScriptedClaude
from tests.conftest import Gateway, eventually
from tests.fakes.mcp_server import McpTestServer
from tests.integration.test_governance_e2e import applied

pytestmark = [pytest.mark.agent_cli, pytest.mark.timeout(600)]

MODEL = "claude-sonnet-4-5"
IN_NANOS_PER_TOKEN, OUT_NANOS_PER_TOKEN = 3_000, 15_000  # $3 / $15 per million tokens
TOOL_PRICE_USD, TOOL_PRICE_NANOS = "0.001", 1_000_000
MCP_NAME = "alephant"  # the server's name in Claude Code's config: its tools are mcp__alephant__<tool>
CLI_TIMEOUT_S = 180


@pytest_asyncio.fixture
async def upstream() -> AsyncIterator[McpTestServer]:
    async with McpTestServer() as srv:
        yield srv


def _cli_env(home: Path, root: str, key: str, model: str, agent: str, run: str) -> dict[str, str]:
    """Claude Code's environment: nothing inherited but PATH, so a developer's own settings and
    credentials never leak in, and nothing it may do reaches beyond the gateway."""
    return {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(home), "LANG": "C.UTF-8",
        "ANTHROPIC_BASE_URL": root, "ANTHROPIC_AUTH_TOKEN": key, "ANTHROPIC_API_KEY": "",
        "ANTHROPIC_MODEL": model,
        "ANTHROPIC_CUSTOM_HEADERS": f"Alephant-Agent-Id: {agent}\nAlephant-Run-Id: {run}",
        "DISABLE_TELEMETRY": "1", "DISABLE_AUTOUPDATER": "1", "DISABLE_ERROR_REPORTING": "1",
        "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
    }


async def _run_cli(argv: list[str], env: dict[str, str], cwd: Path) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(*argv, env=env, cwd=cwd, stdin=asyncio.subprocess.DEVNULL,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), CLI_TIMEOUT_S)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        pytest.fail(f"Claude Code did not finish its turn within {CLI_TIMEOUT_S}s")
    return proc.returncode or 0, out.decode(errors="replace"), err.decode(errors="replace")


async def _journal(gateway: Gateway, type_: str, run: str) -> list[dict[str, Any]]:
    async with await psycopg.AsyncConnection.connect(gateway.database_url) as conn:
        cur = await conn.execute("SELECT body FROM event_journal WHERE type = %s AND body->>'run_id' = %s",
                                 (type_, run))
        return [dict(r[0]) for r in await cur.fetchall()]


async def test_claude_code_calls_a_tool_through_the_mcp_endpoint_priced_on_its_run(
        claude_code: Path, gateway: Gateway, upstream: McpTestServer, tmp_path: Path) -> None:
    tag = os.urandom(4).hex()
    ws, agent, provider, run = f"cc{tag}", f"claude-code-{tag}", f"ccfake{tag}", f"run-cc-{tag}"
    marker = f"echoed-through-alephant-{tag}"
    admin = gateway.admin
    async with ScriptedClaude(tool=f"mcp__{MCP_NAME}__tools__echo", arguments={"text": marker}) as model:
        revision = 0

        def create(kind: str, **body: Any) -> dict[str, Any]:
            nonlocal revision
            created: dict[str, Any] = admin.call("POST", f"/admin/v1/{kind}", body)
            revision = max(revision, int(created.get("revision") or 0))
            return created

        # The workspace's default provider takes any bare model name Claude Code may send on the side.
        create("workspaces", id=ws, name="Claude Code through the gateway", default_provider=provider)
        create("providers", workspace_id=ws, name=provider, type="anthropic", base_url=model.base_url,
               api_key="sk-ant-scripted-upstream-0001")
        create("prices", provider=provider, model=MODEL, input_per_mtok_nanos=IN_NANOS_PER_TOKEN * 1_000_000,
               output_per_mtok_nanos=OUT_NANOS_PER_TOKEN * 1_000_000)
        create("agents", workspace_id=ws, id=agent, name="Claude Code")
        create("mcp-servers", workspace_id=ws, name="tools", url=upstream.url,
               headers={"Authorization": "Bearer up-secret"}, tools={"echo": {"price_usd": TOOL_PRICE_USD}})
        create("policies", workspace_id=ws, scope="workspace", scope_id=ws, tools_deny=["tools.fail"])
        key: str = create("virtual-keys", workspace_id=ws, name="claude-code", agent_id=agent)["key"]
        await applied(gateway, revision)

        root = gateway.base_url.removesuffix("/v1")
        home, work = tmp_path / "home", tmp_path / "work"
        home.mkdir()
        work.mkdir()
        mcp_config = tmp_path / "mcp.json"
        mcp_config.write_text(json.dumps({"mcpServers": {MCP_NAME: {
            "type": "http", "url": f"{root}/mcp",
            "headers": {"Authorization": f"Bearer {key}", "Alephant-Agent-Id": agent, "Alephant-Run-Id": run}}}}))
        argv = [str(claude_code), "-p", f"Call the echo tool of the '{MCP_NAME}' MCP server with the text "
                f"'{marker}' and tell me what it answered.", "--mcp-config", str(mcp_config),
                "--strict-mcp-config", "--allowedTools", f"mcp__{MCP_NAME}__tools__echo",
                "--output-format", "json", "--no-session-persistence"]
        started = time.monotonic()
        code, out, err = await _run_cli(argv, _cli_env(home, root, key, f"{provider}/{MODEL}", agent, run), work)
        elapsed = time.monotonic() - started
        print(f"Claude Code {CLAUDE_CODE_VERSION}: one turn with a tool call through the gateway in {elapsed:.1f}s")

    assert code == 0, f"exit {code}\nstdout: {out[-3000:]}\nstderr: {err[-3000:]}"
    result = json.loads(out)
    assert result.get("is_error") is False and result.get("subtype") == "success", result
    assert FINAL_PREFIX in result["result"] and marker in result["result"], result["result"]

    # The model really offered, called and read the tool, all through the gateway.
    messages = [r for r in model.requests if r.path.split("?")[0] == "/v1/messages"]
    assert model.offered_tool, [r.body.get("tools") for r in messages if isinstance(r.body, dict)]
    assert all(r.api_key_hint == "0001" for r in model.requests)  # the provider's key, not the virtual key
    # Claude Code saw the workspace's tools minus the denied one (deferred tools are listed by name
    # in the conversation, loaded ones in `tools`), and the denied one never reached the server.
    seen = json.dumps([r.body for r in messages])
    assert f"mcp__{MCP_NAME}__tools__add" in seen and "tools__fail" not in seen
    assert upstream.called("fail") == []
    # The MCP server got the call with the configured credential, never the virtual key.
    calls = upstream.called("echo")
    assert [c.arguments for c in calls] == [{"text": marker}]
    assert calls[0].headers.get("authorization") == "Bearer up-secret"
    assert key not in json.dumps(calls[0].headers)

    # The tool call is on the run: a tool.call event, and its price next to the model's cost.
    tool_calls = await eventually(lambda: _nonempty(_journal(gateway, "tool.call", run)), timeout=20)
    assert [(c["server"], c["tool"], c["status"], c["cost_nanos"], c.get("agent_id")) for c in tool_calls] == [
        ("tools", "echo", "ok", TOOL_PRICE_NANOS, agent)]
    llm_nanos = sum(IN_NANOS_PER_TOKEN * a.input_tokens + OUT_NANOS_PER_TOKEN * a.output_tokens
                    for a in (model.answer_for(r.body) for r in messages))
    expected_llm = Decimal(llm_nanos) / 10**9

    last: dict[str, Any] = {}

    async def summary() -> dict[str, Any] | None:
        status, body = await asyncio.to_thread(admin.request, "GET", f"/admin/v1/runs/{run}?workspace_id={ws}")
        last.update(status=status, body=body)
        done = status == 200 and body.get("tool_cost_usd") == TOOL_PRICE_USD and Decimal(
            body.get("llm_cost_usd") or "0") == expected_llm
        return body if done else None

    try:
        run_summary = await eventually(summary, timeout=30)
    except pytest.fail.Exception:
        pytest.fail(f"the run never showed tool_cost_usd {TOOL_PRICE_USD} and llm_cost_usd {expected_llm}: {last}")
    assert run_summary["agents"] == [agent]
    assert Decimal(run_summary["llm_cost_usd"]) > 0


async def _nonempty(rows: Any) -> Any:
    found = await rows
    return found or None
