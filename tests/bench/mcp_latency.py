"""Added latency of an MCP tool call through the gateway (issue 16), against calling the MCP
server directly, in the same run.

``python -m tests.bench.mcp_latency [--calls 300] [--state-dir DIR] [--json]``

Starts a local stack of its own and the MCP test server (tests/fakes/mcp_server.py: the official
SDK's server over Streamable HTTP), registers it in a workspace with a priced tool and a budget
(so the call is fully governed: policy, limits, a budget hold, a `tool.call` event booked to the
ledger), then makes ``--calls`` sequential `tools/call` requests of `echo` with the official SDK
client, once to the server directly and once through `/mcp/{name}` (one client session each,
after a warm-up), and prints both latencies (p50, p90, p99) and the difference.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from deploy.stack import Stack
from tests.fakes.mcp_server import McpTestServer, mcp_client

WORKSPACE = "bench-mcp"


def say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _percentiles(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)

    def at(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 3)
    return {"p50_ms": round(statistics.median(ordered), 3), "p90_ms": at(0.9), "p99_ms": at(0.99)}


async def _time_calls(url: str, headers: dict[str, str], calls: int) -> list[float]:
    async with mcp_client(url, headers) as client:
        for _ in range(20):  # warm-up: sessions, tool schemas, caches
            await client.call_tool("echo", {"text": "warm"})
        samples = []
        for i in range(calls):
            started = time.perf_counter()
            result = await client.call_tool("echo", {"text": f"call {i}"})
            samples.append((time.perf_counter() - started) * 1000)
            assert not result.is_error
    return samples


async def measure(stack: Stack, calls: int) -> dict[str, Any]:
    admin = stack.admin()
    async with McpTestServer() as srv:
        admin.call("POST", "/admin/v1/workspaces", {"id": WORKSPACE, "name": "MCP bench"}, ok=(201, 202, 409))
        admin.call("POST", "/admin/v1/agents", {"workspace_id": WORKSPACE, "id": "bench-agent", "name": "Bench"},
                   ok=(201, 202, 409))
        admin.call("POST", "/admin/v1/mcp-servers", {"workspace_id": WORKSPACE, "name": "tools", "url": srv.url,
                                                     "tools": {"echo": {"price_usd": "0.000001"}}})
        admin.call("POST", "/admin/v1/budgets", {"workspace_id": WORKSPACE, "scope": "agent",
                                                 "scope_id": "bench-agent", "period": "month", "limit_usd": "1000"})
        key = admin.call("POST", "/admin/v1/virtual-keys", {"workspace_id": WORKSPACE, "name": "bench",
                                                            "agent_id": "bench-agent"})["key"]
        await asyncio.sleep(1.5)  # the config reaches the worker
        headers = {"Authorization": f"Bearer {key}", "Alephant-Agent-Id": "bench-agent",
                   "Alephant-Run-Id": "bench-run"}
        direct = await _time_calls(srv.url, {}, calls)
        gateway = await _time_calls(f"{stack.origin}/mcp/tools", headers, calls)
    d, g = _percentiles(direct), _percentiles(gateway)
    return {"calls": calls, "direct": d, "gateway": g,
            "added": {k: round(g[k] - d[k], 3) for k in d}}


def lines(doc: dict[str, Any]) -> list[str]:
    d, g, a = doc["direct"], doc["gateway"], doc["added"]
    return [f"MCP tool call, {doc['calls']} sequential calls with the official SDK client (governed and priced):",
            f"  direct to the MCP server  p50 {d['p50_ms']:.2f} ms  p90 {d['p90_ms']:.2f}  p99 {d['p99_ms']:.2f}",
            f"  through /mcp/{{name}}      p50 {g['p50_ms']:.2f} ms  p90 {g['p90_ms']:.2f}  p99 {g['p99_ms']:.2f}",
            f"  added by the gateway      p50 {a['p50_ms']:+.2f} ms  p90 {a['p90_ms']:+.2f}  p99 {a['p99_ms']:+.2f}"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--calls", type=int, default=300, help="timed tool calls per path (default 300)")
    ap.add_argument("--state-dir", type=Path, help="where the stack keeps its state (default: a temporary dir)")
    ap.add_argument("--json", action="store_true", help="print the result as JSON")
    args = ap.parse_args(argv)
    scratch = Path(tempfile.mkdtemp(prefix="alephant-mcp-bench-")) if args.state_dir is None else None
    stack = Stack(state_dir=args.state_dir or scratch, port=0, admin_port=0, log=lambda _m: None)
    say("==> MCP latency: starting a stack and the MCP test server")
    stack.start()
    try:
        doc = asyncio.run(measure(stack, args.calls))
    finally:
        stack.stop()
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
    print(json.dumps(doc, indent=2) if args.json else "\n".join(lines(doc)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
