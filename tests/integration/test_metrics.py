"""`GET /metrics` on every process of the real stack, parsed with Prometheus' own text parser:
the data plane's counters move by exactly what the traffic did (a served chat call: its request,
latency, tokens and cost; a refused one: its refusal reason), the control plane counts admin
requests by route template and shows the config revision, the projector reports what it folded
and its lag; and with two workers sharing the port, whichever answers a scrape reports the
traffic of both."""

from __future__ import annotations

import asyncio
import json
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import Gateway, dedicated_stack, eventually

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]
CHAT = {"model": "mock/echo", "messages": [{"role": "user", "content": "count me in the metrics"}]}


async def scrape(http: aiohttp.ClientSession, url: str) -> Samples:
    async with http.get(url) as resp:
        assert resp.status == 200, await resp.text()
        assert resp.headers["Content-Type"].startswith("text/plain")
        text = await resp.text()
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def get(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def moved(before: Samples, after: Samples, name: str, **labels: str) -> float:
    return get(after, name, **labels) - get(before, name, **labels)


async def chat(http: aiohttp.ClientSession, base_url: str, key: str) -> tuple[int, dict[str, Any], dict[str, str]]:
    async with http.post(f"{base_url}/chat/completions", json=CHAT,
                         headers={"Authorization": f"Bearer {key}", "Alephant-Run-Id": "run-metrics"}) as resp:
        return resp.status, await resp.json(), dict(resp.headers)


async def streamed_usage(http: aiohttp.ClientSession, base_url: str, key: str) -> dict[str, int]:
    """A streamed chat call; the usage of its last chunk."""
    body = {**CHAT, "stream": True, "stream_options": {"include_usage": True}}
    async with http.post(f"{base_url}/chat/completions", json=body,
                         headers={"Authorization": f"Bearer {key}"}) as resp:
        assert resp.status == 200
        text = await resp.text()
    chunks = [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: {")]
    usage: dict[str, int] = chunks[-1]["usage"]
    return usage


async def test_data_plane_counters_move_with_traffic(gateway: Gateway, http: aiohttp.ClientSession) -> None:
    url = f"{gateway.stack.origin}/metrics"
    before = await scrape(http, url)
    status, body, headers = await chat(http, gateway.base_url, gateway.demo_key)
    assert status == 200, body
    streamed = await streamed_usage(http, gateway.base_url, gateway.demo_key)
    refused, _, _ = await chat(http, gateway.base_url, "sk-alph-not-a-real-key-0000000000")
    assert refused == 401
    after = await scrape(http, url)

    served = {"ingress": "chat.completions", "provider": "mock", "model": "echo"}
    assert moved(before, after, "alephant_requests_total", **served, status="200") == 2
    assert moved(before, after, "alephant_request_duration_seconds_count", **served, status_class="2xx") == 2
    assert moved(before, after, "alephant_time_to_first_byte_seconds_count", **served) == 1  # the stream's
    usage = body["usage"]
    assert moved(before, after, "alephant_tokens_total", provider="mock",
                 direction="input") == usage["prompt_tokens"] + streamed["prompt_tokens"]
    assert moved(before, after, "alephant_tokens_total", provider="mock",
                 direction="output") == usage["completion_tokens"] + streamed["completion_tokens"]
    # The same prompt and answer: the stream cost what the plain call did.
    cost = 2 * float(Decimal(headers["Alephant-Cost-Usd"]))
    assert moved(before, after, "alephant_cost_usd_total", provider="mock") == pytest.approx(cost, abs=1e-12)
    # The refusal: no provider or model known, counted by its code.
    assert moved(before, after, "alephant_requests_total", ingress="chat.completions", provider="none",
                 model="none", status="401") == 1
    assert moved(before, after, "alephant_refusals_total", reason="invalid_api_key") == 1
    # Gauges: the config this worker applied, and the event spool (it drains to 0).
    async with http.get(f"{gateway.stack.origin}/healthz") as resp:
        health = await resp.json()
    assert get(after, "alephant_snapshot_revision") >= 1
    assert get(after, "alephant_snapshot_staleness_seconds") < 15
    assert ("alephant_event_spool_depth", frozenset()) in after
    assert health["ready"]

    async def drained() -> bool | None:
        now = await scrape(http, url)
        return True if get(now, "alephant_event_spool_depth") == 0 else None

    await eventually(drained)
    # No id of any kind becomes a label value.
    labels = {v for (_, ls) in after for _, v in ls}
    assert not any(v.startswith(("run-", "req_", "sk-", "vk_")) for v in labels)
    assert gateway.demo_key not in str(after)


async def test_control_plane_metrics_need_no_token_and_count_admin_routes(
        gateway: Gateway, http: aiohttp.ClientSession) -> None:
    url = f"{gateway.stack.admin_url}/metrics"
    before = await scrape(http, url)
    gateway.admin.call("GET", "/admin/v1/workspaces")
    created = gateway.create_key(name="metrics-route-template")
    gateway.admin.call("GET", f"/admin/v1/virtual-keys/{created['id']}")
    async with http.get(f"{gateway.stack.admin_url}/admin/v1/workspaces") as resp:
        assert resp.status == 401  # the API itself still wants the token
    after = await scrape(http, url)
    assert moved(before, after, "alephant_admin_requests_total", method="GET", route="/admin/v1/workspaces",
                 status="200") == 1
    assert moved(before, after, "alephant_admin_requests_total", method="GET", route="/admin/v1/workspaces",
                 status="401") == 1
    # Route templates, never the id in the path.
    assert moved(before, after, "alephant_admin_requests_total", method="GET", route="/admin/v1/virtual-keys/{id}",
                 status="200") == 1
    assert moved(before, after, "alephant_admin_request_duration_seconds_count", method="POST",
                 route="/admin/v1/virtual-keys") == 1
    health = gateway.admin.call("GET", "/admin/v1/healthz")
    assert get(after, "alephant_config_revision") >= 1
    assert get(after, "alephant_config_revision") <= health["snapshot_revision"]
    text = str(after)
    assert created["id"] not in text and gateway.stack.demo["ALEPHANT_ADMIN_TOKEN"] not in text


async def test_projector_reports_folded_events_and_lag(gateway: Gateway, http: aiohttp.ClientSession) -> None:
    url = gateway.stack.projector_metrics_url
    assert url == gateway.stack.demo["ALEPHANT_PROJECTOR_METRICS_URL"]

    async def listening() -> Samples | None:  # the stack does not wait for the projector
        try:
            return await scrape(http, url)
        except aiohttp.ClientConnectionError:
            return None

    before = await eventually(listening, timeout=60, interval=0.5)
    for _ in range(3):
        status, _, _ = await chat(http, gateway.base_url, gateway.demo_key)
        assert status == 200

    async def caught_up() -> Samples | None:
        now = await scrape(http, url)
        folded = moved(before, now, "alephant_projector_events_folded_total", projection="ledger")
        lag = get(now, "alephant_projector_lag_events", projection="ledger")
        return now if folded >= 3 and lag == 0 else None

    after = await eventually(caught_up, timeout=30)
    assert get(after, "alephant_projector_lag_seconds", projection="ledger") == 0
    assert moved(before, after, "alephant_projector_events_folded_total", projection="finance") >= 0
    assert get(after, "alephant_projector_dead_lettered_total", projection="ledger") == 0
    assert ("alephant_projector_lag_events", frozenset({("projection", "finance")})) in after


def _requests_by_pid(shared: Path) -> dict[int, float]:
    """Each worker's own count of served chat calls, from its file in the multiprocess directory."""
    out: dict[int, float] = {}
    for path in shared.glob("counter_*.db"):
        pid = int(path.stem.rsplit("_", 1)[-1])
        for metric in MultiProcessCollector.merge([str(path)]):
            for s in metric.samples:
                if s.name == "alephant_requests_total" and s.labels.get("status") == "200":
                    out[pid] = out.get(pid, 0.0) + s.value
    return out


async def test_two_workers_each_scrape_reports_both(tmp_path_factory: pytest.TempPathFactory) -> None:
    with dedicated_stack(Path(tmp_path_factory.mktemp("metrics2")), workers=2) as stack:
        pids = {svc.proc.pid for name, svc in stack.procs.items() if name.startswith("dataplane") and svc.proc}
        served = {"ingress": "chat.completions", "provider": "mock", "model": "echo", "status": "200"}
        # A new connection per request: the kernel spreads them over both workers (once both listen:
        # the stack's readiness check on the shared port may have been answered by the first).
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as http:
            base, key = stack.demo["ALEPHANT_BASE_URL"], stack.demo["ALEPHANT_API_KEY"]
            sent = 0

            async def both_served() -> dict[int, float] | None:
                nonlocal sent
                for _ in range(10):
                    status, body, _ = await chat(http, base, key)
                    assert status == 200, body
                    sent += 1
                await asyncio.sleep(1.2)  # workers write their tallies every second
                per_worker = _requests_by_pid(stack.metrics_dir)
                return per_worker if set(per_worker) == pids and all(per_worker.values()) else None

            await eventually(both_served, timeout=60)

            async def every_scrape_counts_all() -> bool | None:
                counts = [get(await scrape(http, f"{stack.origin}/metrics"), "alephant_requests_total", **served)
                          for _ in range(6)]
                return True if counts == [sent] * 6 else None

            await eventually(every_scrape_counts_all, timeout=20)
        assert sum(_requests_by_pid(stack.metrics_dir).values()) == sent
