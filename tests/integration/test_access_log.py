"""The access log (issue 13): one structured line per data-plane request, with its request id,
status, latency, key id, agent context and model, and never the key itself."""

from __future__ import annotations

import json
from typing import Any

import aiohttp

from tests.conftest import Gateway, eventually


def _access_lines(gateway: Gateway) -> list[dict[str, Any]]:
    lines = []
    for path in (gateway.stack.state_dir / "logs").glob("dataplane-*.log"):
        for raw in path.read_text(errors="replace").splitlines():
            if '"access"' in raw:
                try:
                    lines.append(json.loads(raw))
                except ValueError:
                    continue
    return [line for line in lines if line.get("event") == "access"]


async def test_every_request_gets_one_access_line_without_secrets(gateway: Gateway,
                                                                  http: aiohttp.ClientSession) -> None:
    body = {"model": "mock/echo", "messages": [{"role": "user", "content": "log me"}]}
    async with http.post(f"{gateway.base_url}/chat/completions", json=body,
                         headers={"Authorization": f"Bearer {gateway.demo_key}", "Alephant-Run-Id": "run-access",
                                  "Alephant-Agent-Id": "agent-access"}) as resp:
        assert resp.status == 200
        served = resp.headers["Alephant-Request-Id"]
    async with http.post(f"{gateway.base_url}/chat/completions", json=body,
                         headers={"Authorization": f"Bearer {gateway.demo_key}x"}) as resp:
        assert resp.status == 401

    async def logged() -> list[dict[str, Any]] | None:
        lines = _access_lines(gateway)
        mine = [line for line in lines if line.get("request_id") == served]
        refused = [line for line in lines if line.get("status") == 401]
        return [*mine, refused[-1]] if mine and refused else None
    (line, refused) = await eventually(logged)
    assert (line["status"], line["path"], line["method"], line["run_id"], line["provider"], line["model"]) == (
        200, "/v1/chat/completions", "POST", "run-access", "mock", "echo")
    assert line["key_id"] and line["latency_ms"] >= 0 and line["level"] == "info"
    assert refused["error"] == "invalid_api_key" and refused["key_id"] is None
    assert len([x for x in _access_lines(gateway) if x.get("request_id") == served]) == 1
    assert not any(gateway.demo_key in json.dumps(x) for x in _access_lines(gateway))
