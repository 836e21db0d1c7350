"""ALEPHANT_STALE_POLICY on a DEDICATED stack: the control plane is SIGSTOPped so its heartbeats
stop, and the worker turns stale after ALEPHANT_STALE_AFTER_S. `refuse` answers 503
`config_stale` in each API's error shape; `serve` keeps serving and counts it in /healthz."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest

from deploy.stack import Stack
from tests.conftest import dedicated_stack, wait_until_true

STALE_AFTER_S = 1.5
CHAT = {"model": "mock/echo", "messages": [{"role": "user", "content": "hi"}]}
MESSAGES = {"model": "mock/echo", "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    env = {"ALEPHANT_STALE_AFTER_S": str(STALE_AFTER_S), "ALEPHANT_STALE_POLICY": "refuse"}
    with dedicated_stack(tmp_path_factory.mktemp("stale"), env) as s:
        yield s


async def _health(http: aiohttp.ClientSession, stack: Stack) -> dict[str, Any]:
    async with http.get(f"{stack.origin}/healthz") as resp:
        data: dict[str, Any] = await resp.json()
        return data


async def _post(http: aiohttp.ClientSession, stack: Stack, path: str, body: dict[str, Any]) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {stack.demo['ALEPHANT_API_KEY']}"}
    async with http.post(f"{stack.origin}{path}", json=body, headers=headers) as resp:
        return resp.status, await resp.json(content_type=None)


async def _go_stale(http: aiohttp.ClientSession, stack: Stack) -> float:
    stack.procs["controlplane"].pause()
    paused = time.monotonic()

    async def stale() -> bool:
        return bool((await _health(http, stack))["stale"])

    await wait_until_true(stale, timeout=STALE_AFTER_S + 10)
    return time.monotonic() - paused


async def _go_fresh(http: aiohttp.ClientSession, stack: Stack) -> None:
    stack.procs["controlplane"].resume()

    async def fresh() -> bool:
        return not (await _health(http, stack))["stale"]

    await wait_until_true(fresh, timeout=15)


async def test_refuse_policy_answers_503_config_stale_then_recovers(
        stack: Stack, http: aiohttp.ClientSession) -> None:
    assert (await _post(http, stack, "/v1/chat/completions", CHAT))[0] == 200
    health = await _health(http, stack)
    assert (health["stale"], health["stale_policy"]) == (False, "refuse")
    try:
        took = await _go_stale(http, stack)
        status, body = await _post(http, stack, "/v1/chat/completions", CHAT)
        assert status == 503
        assert body["error"]["code"] == "config_stale" and set(body["error"]) == {"message", "type", "param", "code"}
        status, body = await _post(http, stack, "/v1/messages", MESSAGES)
        assert status == 503 and body["type"] == "error" and body["error"]["type"] == "overloaded_error"
        status, _ = await _post(http, stack, "/mock/v1/chat/completions", CHAT)  # passthrough too
        assert status == 503
        assert (await _health(http, stack))["served_while_stale"] == 0
    finally:
        await _go_fresh(http, stack)
    print(f"refuse: stale {took:.2f}s after the control plane stopped (ALEPHANT_STALE_AFTER_S={STALE_AFTER_S})")
    assert (await _post(http, stack, "/v1/chat/completions", CHAT))[0] == 200


async def test_serve_policy_keeps_serving_and_counts(stack: Stack, http: aiohttp.ClientSession) -> None:
    # The same stack, its worker restarted with the other policy.
    stack.kill("dataplane-0", signal.SIGTERM)
    log_path = stack.state_dir / "logs" / "dataplane-0.log"
    offset = log_path.stat().st_size  # the restarted worker appends to the same log

    def new_log() -> str:
        return log_path.read_bytes()[offset:].decode()

    assert isinstance(stack.extra_env, dict)
    stack.extra_env["ALEPHANT_STALE_POLICY"] = "serve"
    stack.start_worker(0)
    assert (await _health(http, stack))["stale_policy"] == "serve"
    try:
        await _go_stale(http, stack)
        before = (await _health(http, stack))["served_while_stale"]
        statuses = [(await _post(http, stack, "/v1/chat/completions", CHAT))[0] for _ in range(5)]
        health = await _health(http, stack)

        async def logged() -> bool:
            return "snapshot_stale" in new_log()

        await wait_until_true(logged, timeout=10)  # the reporter polls once a second
        await asyncio.sleep(3)  # several more polls while still stale
        stale_lines = new_log().count("snapshot_stale")
    finally:
        await _go_fresh(http, stack)
    print(f"serve: {statuses.count(200)}/5 calls served while stale; healthz served_while_stale="
          f"{health['served_while_stale']}")
    assert statuses == [200] * 5
    assert health["stale"] is True and health["served_while_stale"] - before == 5
    assert stale_lines == 1  # at most once a minute

    async def recovered() -> bool:
        return "snapshot_fresh" in new_log()

    await wait_until_true(recovered, timeout=10)
