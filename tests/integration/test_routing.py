"""Routers and resilience end to end (issue 10): the real stack, two fake OpenAI upstreams as
providers `ra` and `rb` of the demo workspace, routers made through the admin API.

What each test proves is in its name; counts at the fakes are upstream attempts, and the
journalled `llm.call` events carry the attempt trail."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
import pytest_asyncio

from tests.conftest import Gateway, eventually, journal_event
from tests.fakes.upstream import FakeUpstream

MODEL = "gpt-4o-mini"
# Target health is per (provider, credential, model) on a worker and outlives a router, so the
# load test asks for a model no earlier test ejected.
LOAD_MODEL = "gpt-4o-mini-2024-07-18"
HELLO = [{"role": "user", "content": "hello"}]


@pytest_asyncio.fixture(scope="module")
async def fakes(gateway: Gateway) -> AsyncIterator[tuple[FakeUpstream, FakeUpstream]]:
    async with FakeUpstream(max_recorded=100_000) as ra, FakeUpstream(max_recorded=100_000) as rb:
        for name, fake in (("ra", ra), ("rb", rb)):
            gateway.admin.call("POST", "/admin/v1/providers", {
                "workspace_id": "demo", "name": name, "type": "openai", "base_url": fake.base_url,
                "api_key": f"sk-{name}-upstream-0123456789"})
        for name, model in ((p, m) for p in ("ra", "rb") for m in (MODEL, LOAD_MODEL)):
            gateway.admin.call("POST", "/admin/v1/prices", {"provider": name, "model": model,
                                                            "input_per_mtok_nanos": 150_000_000,
                                                            "output_per_mtok_nanos": 600_000_000})
        yield ra, rb


@pytest.fixture(autouse=True)
def _reset(fakes: tuple[FakeUpstream, FakeUpstream]) -> None:
    for fake in fakes:
        fake.clear()
        fake.latency_ms = 0.0
        fake.truncate_after = None


def attempts_at(fake: FakeUpstream) -> int:
    return sum(1 for r in fake.requests if r.path == "/v1/chat/completions")


async def make_router(gateway: Gateway, **body: Any) -> dict[str, Any]:
    """A router in the demo workspace, live on the worker once this returns."""
    name = body.pop("name", None) or f"r{os.urandom(4).hex()}"
    router: dict[str, Any] = gateway.admin.call("POST", "/admin/v1/routers", {"workspace_id": "demo", "name": name,
                                                                               **body})
    return router


async def live_router(gateway: Gateway, http: aiohttp.ClientSession, **body: Any) -> tuple[dict[str, Any], str]:
    """A router made and live, with its chat completions path."""
    router = await make_router(gateway, **body)
    await until_live(gateway, http, router["id"])
    return router, f"/router/{router['id']}/v1/chat/completions"


def fresh_provider(gateway: Gateway, fake: FakeUpstream, prefix: str) -> str:
    """A provider of its own on `fake`'s upstream, with one credential: target health and
    cool-downs are per (provider, credential, model) and outlive a test, and other tests add
    provider keys to `ra`, so a test that counts attempts must not share a target with them."""
    name = f"{prefix}{os.urandom(3).hex()}"
    gateway.admin.call("POST", "/admin/v1/providers", {"workspace_id": "demo", "name": name, "type": "openai",
                                                       "base_url": fake.base_url,
                                                       "api_key": f"sk-{prefix}-upstream-0123456789"})
    return name


def root(gateway: Gateway) -> str:
    return gateway.base_url.removesuffix("/v1")


async def chat(gateway: Gateway, http: aiohttp.ClientSession, path: str, *, stream: bool = False,
               model: str = MODEL, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], Any]:
    body: dict[str, Any] = {"model": model, "messages": HELLO, "max_tokens": 16}
    if stream:
        body["stream"] = True
    async with http.post(root(gateway) + path, json=body,
                         headers={"Authorization": f"Bearer {gateway.demo_key}", **(headers or {})}) as resp:
        payload: Any = await resp.text() if stream else await resp.json()
        return resp.status, dict(resp.headers), payload


async def served_by(gateway: Gateway, http: aiohttp.ClientSession, path: str, model: str = MODEL) -> str:
    status, headers, body = await chat(gateway, http, path, model=model)
    assert status == 200, body
    return headers["Alephant-Provider"]


async def until_live(gateway: Gateway, http: aiohttp.ClientSession, router_id: str) -> None:
    """Wait until the worker's snapshot has the router (its creation propagated)."""
    async def ok() -> bool | None:
        status, _, _ = await chat(gateway, http, f"/router/{router_id}/v1/chat/completions")
        return True if status == 200 else None
    await eventually(ok, timeout=10)


async def test_five_consecutive_5xx_eject_a_target_and_traffic_moves_to_the_fallback(
        gateway: Gateway, http: aiohttp.ClientSession, fakes: tuple[FakeUpstream, FakeUpstream]) -> None:
    ra, rb = fakes
    router, path = await live_router(gateway, http, strategy="fallback", targets=[{"model": "ra/*"}, {"model": "rb/*"}],
                               retry={"retries": 0})
    ra.clear()
    rb.clear()
    ra.fail_next(500, count=10_000)
    trails = []
    for _ in range(5):
        status, headers, body = await chat(gateway, http, path)
        assert status == 200, body
        assert headers["Alephant-Provider"] == "rb" and headers["Alephant-Attempts"] == "2"
        trails.append(headers["Alephant-Request-Id"])
    assert attempts_at(ra) == 5
    for _ in range(10):  # ejected: straight to the fallback
        status, headers, _ = await chat(gateway, http, path)
        assert (status, headers["Alephant-Provider"], headers["Alephant-Attempts"]) == (200, "rb", "1")
    assert attempts_at(ra) == 5 and attempts_at(rb) == 15
    event = await eventually(lambda: journal_event(gateway.database_url, trails[0]))
    assert event["router_id"] == router["id"] and (event["provider"], event["model"]) == ("rb", MODEL)
    assert [(a["target"], a["status"]) for a in event["attempts"]] == [(f"ra/{MODEL}", 500), (f"rb/{MODEL}", 200)]
    assert event["attempts"][0]["reason"] == "upstream_error" and event["attempts"][0]["retryable"] is True


async def test_no_retry_storm_attempts_stay_within_1_2_times_the_requests(
        gateway: Gateway, http: aiohttp.ClientSession, fakes: tuple[FakeUpstream, FakeUpstream]) -> None:
    ra, rb = fakes
    pair = await make_router(gateway, strategy="fallback", targets=[{"model": "ra/*"}, {"model": "rb/*"}],
                             retry={"retries": 2, "backoff_ms": 5})
    alone = await make_router(gateway, strategy="fallback", targets=[{"model": "ra/*"}],
                              retry={"retries": 2, "backoff_ms": 5})
    await until_live(gateway, http, pair["id"])
    await until_live(gateway, http, alone["id"])
    ra.clear()
    rb.clear()
    ra.fail_next(503, count=100_000)
    requests, statuses = 200, []
    sem = asyncio.Semaphore(16)

    async def one(path: str) -> None:
        async with sem:
            statuses.append((await chat(gateway, http, path))[0])

    await asyncio.gather(*(one(f"/router/{pair['id']}/v1/chat/completions") for _ in range(requests)))
    assert statuses.count(200) == requests, "every call fell back and succeeded"
    total = attempts_at(ra) + attempts_at(rb)
    assert total <= 1.2 * requests, (attempts_at(ra), attempts_at(rb))
    # A router whose only target fails: retries are bounded by the budget, then ejection stops them.
    ra.requests.clear()
    statuses.clear()
    await asyncio.gather(*(one(f"/router/{alone['id']}/v1/chat/completions") for _ in range(requests)))
    assert set(statuses) <= {502, 503}
    assert attempts_at(ra) <= 1.2 * requests, attempts_at(ra)


async def test_a_429_with_retry_after_cools_only_that_credential_for_that_long(
        gateway: Gateway, http: aiohttp.ClientSession, fakes: tuple[FakeUpstream, FakeUpstream]) -> None:
    ra, _ = fakes
    keys = [gateway.admin.call("POST", "/admin/v1/provider-keys", {
        "workspace_id": "demo", "provider": "ra", "api_key": f"sk-ra-key-{i}-0123456789", "name": f"k{i}"})
        for i in (1, 2)]
    _, path = await live_router(gateway, http, strategy="fallback", targets=[
        {"model": "ra/*", "provider_key_id": keys[0]["id"]}, {"model": "ra/*", "provider_key_id": keys[1]["id"]}])

    async def key_used() -> tuple[str, str]:
        status, headers, body = await chat(gateway, http, path)
        assert status == 200, body
        event = await eventually(lambda: journal_event(gateway.database_url, headers["Alephant-Request-Id"]))
        return event["provider_key_id"], headers["Alephant-Attempts"]

    assert await key_used() == (keys[0]["id"], "1")
    ra.fail_next(429, retry_after="3")
    cooled_at = time.monotonic()
    assert await key_used() == (keys[1]["id"], "2")  # the 429 moved the call to the other key
    while time.monotonic() - cooled_at < 2.5:
        assert await key_used() == (keys[1]["id"], "1")  # the first key is passed over while it cools
        await asyncio.sleep(0.2)
    await asyncio.sleep(max(0.0, 3.2 - (time.monotonic() - cooled_at)))
    assert await key_used() == (keys[0]["id"], "1")  # and is back right after


async def test_weighted_routing_follows_weights_and_latency_routing_prefers_the_faster(
        gateway: Gateway, http: aiohttp.ClientSession, fakes: tuple[FakeUpstream, FakeUpstream]) -> None:
    ra, rb = fakes
    weighted = await make_router(gateway, strategy="weighted",
                                 targets=[{"model": "ra/*", "weight": 3}, {"model": "rb/*", "weight": 1}])
    await until_live(gateway, http, weighted["id"])
    ra.clear()
    rb.clear()
    n = 400
    sem = asyncio.Semaphore(8)

    async def one(path: str) -> str:
        async with sem:
            return await served_by(gateway, http, path)

    served = await asyncio.gather(*(one(f"/router/{weighted['id']}/v1/chat/completions") for _ in range(n)))
    share = served.count("ra") / n
    assert abs(share - 0.75) < 0.08, share  # > 3.5 standard deviations of a fair draw
    assert attempts_at(ra) + attempts_at(rb) == n

    latency = await make_router(gateway, strategy="latency", targets=[{"model": "ra/*"}, {"model": "rb/*"}])
    await until_live(gateway, http, latency["id"])
    ra.latency_ms = 80.0
    for _ in range(4):  # both measured
        await served_by(gateway, http, f"/router/{latency['id']}/v1/chat/completions")
    sequential = [await served_by(gateway, http, f"/router/{latency['id']}/v1/chat/completions") for _ in range(30)]
    assert sequential.count("rb") >= 27, sequential


async def test_a_stream_falls_back_before_its_first_byte_and_never_after(
        gateway: Gateway, http: aiohttp.ClientSession, fakes: tuple[FakeUpstream, FakeUpstream]) -> None:
    ra, rb = fakes
    _, path = await live_router(gateway, http, strategy="fallback", targets=[{"model": "ra/*"}, {"model": "rb/*"}],
                               retry={"retries": 0}, health={"consecutive_failures": 100})
    ra.clear()
    rb.clear()
    ra.fail_next(503)
    status, headers, text = await chat(gateway, http, path, stream=True)
    assert status == 200 and headers["Alephant-Provider"] == "rb" and headers["Alephant-Attempts"] == "2"
    assert text.rstrip().endswith("data: [DONE]") and '"error"' not in text
    # Cut after two content chunks: the client already has bytes, so there is no fallback.
    ra.truncate_after = 2
    before_b = attempts_at(rb)
    status, headers, text = await chat(gateway, http, path, stream=True)
    assert status == 200 and headers["Alephant-Provider"] == "ra" and headers["Alephant-Attempts"] == "1"
    assert '"error"' in text and "interrupted" in text
    assert attempts_at(rb) == before_b
    event = await eventually(lambda: journal_event(gateway.database_url, headers["Alephant-Request-Id"]))
    assert event["partial"] is True and [a["target"] for a in event["attempts"]] == [f"ra/{MODEL}"]


async def test_the_client_never_waits_past_the_total_timeout(
        gateway: Gateway, http: aiohttp.ClientSession, fakes: tuple[FakeUpstream, FakeUpstream]) -> None:
    ra, rb = fakes
    _, path = await live_router(gateway, http, strategy="fallback", targets=[{"model": "ra/*"}, {"model": "rb/*"}],
                               timeouts={"total_s": 1.0})
    ra.latency_ms = rb.latency_ms = 4000.0
    for stream in (False, True):
        started = time.monotonic()
        status, headers, body = await chat(gateway, http, path, stream=stream)
        waited = time.monotonic() - started
        assert status == 504 and waited < 2.0, (status, waited)
        assert headers["Alephant-Attempts"] == "1"  # the deadline left no time for a fallback
    # The client's own deadline (Alephant-Timeout-Ms) on a direct call.
    started = time.monotonic()
    status, _, body = await chat(gateway, http, "/v1/chat/completions", model=f"ra/{MODEL}",
                                 headers={"Alephant-Timeout-Ms": "700"})
    assert status == 504 and time.monotonic() - started < 1.7
    assert body["error"]["code"] == "upstream_timeout" and "total timeout of 0.7 s" in body["error"]["message"]
    # A first-byte timeout moves a slow stream to the next target, inside the total.
    quick = await make_router(gateway, strategy="fallback", targets=[{"model": "ra/*"}, {"model": "rb/*"}],
                              timeouts={"first_byte_s": 0.5, "total_s": 5})
    await until_live(gateway, http, quick["id"])
    rb.latency_ms = 0.0
    started = time.monotonic()
    status, headers, text = await chat(gateway, http, f"/router/{quick['id']}/v1/chat/completions", stream=True)
    assert status == 200 and headers["Alephant-Provider"] == "rb" and time.monotonic() - started < 2.0
    assert text.rstrip().endswith("data: [DONE]")


async def test_every_target_failing_is_one_clear_error_in_each_api_shape(
        gateway: Gateway, http: aiohttp.ClientSession, fakes: tuple[FakeUpstream, FakeUpstream]) -> None:
    ra, rb = fakes
    pa, pb = fresh_provider(gateway, ra, "pa"), fresh_provider(gateway, rb, "pb")
    router = await make_router(gateway, strategy="fallback", targets=[{"model": f"{pa}/*"}, {"model": f"{pb}/*"}],
                               retry={"retries": 0}, health={"consecutive_failures": 100})
    await until_live(gateway, http, router["id"])
    ra.fail_next(500)
    rb.fail_next(503)
    status, headers, body = await chat(gateway, http, f"/router/{router['id']}/v1/chat/completions")
    assert status == 503 and headers["Alephant-Attempts"] == "2" and headers["Alephant-Provider"] == pb
    message = body["error"]["message"]
    assert "All 2 upstream attempts failed" in message and f"{pa}/" in message and f"{pb}/" in message
    assert "returned 503" in message  # the last upstream reason
    ra.fail_next(500)
    rb.fail_next(502)
    async with http.post(f"{root(gateway)}/router/{router['id']}/v1/messages",
                         json={"model": MODEL, "max_tokens": 16, "messages": HELLO},
                         headers={"x-api-key": gateway.demo_key, "anthropic-version": "2023-06-01"}) as resp:
        data = await resp.json()
    assert resp.status == 502 and data["type"] == "error" and data["error"]["type"] == "api_error"
    assert "All 2 upstream attempts failed" in data["error"]["message"]


async def test_routers_by_model_name_and_the_ai_surface(
        gateway: Gateway, http: aiohttp.ClientSession, fakes: tuple[FakeUpstream, FakeUpstream]) -> None:
    router = await make_router(gateway, strategy="fallback", targets=[{"model": f"rb/{MODEL}"}])
    await until_live(gateway, http, router["id"])
    status, headers, body = await chat(gateway, http, "/v1/chat/completions", model=f"router/{router['name']}")
    assert status == 200 and headers["Alephant-Provider"] == "rb", body
    status, headers, body = await chat(gateway, http, "/ai/chat/completions", model=f"router/{router['name']}")
    assert status == 200 and headers["Alephant-Provider"] == "rb", body
    status, _, body = await chat(gateway, http, "/v1/chat/completions", model="router/no-such-router")
    assert status == 404 and body["error"]["code"] == "router_not_found"
    assert "no-such-router" in body["error"]["message"]
    status, _, body = await chat(gateway, http, "/router/rtr_nope/v1/chat/completions")
    assert status == 404 and body["error"]["code"] == "router_not_found"


async def test_a_router_change_applies_live_on_every_worker(gateway: Gateway, http: aiohttp.ClientSession,
                                                             fakes: tuple[FakeUpstream, FakeUpstream]) -> None:
    router, path = await live_router(gateway, http, strategy="fallback", targets=[{"model": "ra/*"}])
    assert await served_by(gateway, http, path) == "ra"
    started = time.monotonic()
    changed = gateway.admin.call("PATCH", f"/admin/v1/routers/{router['id']}", {"targets": [{"model": "rb/*"}]})
    revision = changed["snapshot_revision"]

    async def applied() -> bool | None:
        fleet = await asyncio.to_thread(gateway.admin.call, "GET", "/admin/v1/fleet")
        workers = fleet["workers"]
        return True if len(workers) == gateway.stack.workers and all(
            w["applied_revision"] >= revision for w in workers) else None
    await eventually(applied, timeout=5)
    assert time.monotonic() - started < 2.0  # no restart, within the propagation budget
    # Whichever worker takes each call, the new target serves it.
    assert {await served_by(gateway, http, path) for _ in range(4 * gateway.stack.workers)} == {"rb"}


async def test_a_key_bound_to_a_router_sends_bare_model_names_through_its_rules(
        gateway: Gateway, http: aiohttp.ClientSession, fakes: tuple[FakeUpstream, FakeUpstream]) -> None:
    router = await make_router(gateway, strategy="fallback", targets=[{"model": "ra/*"}], rules=[
        {"name": "team-b", "when": {"properties": {"team": "b"}}, "targets": [{"model": "rb/*"}]}])
    key = gateway.create_key(router_id=router["id"])["key"]
    await until_live(gateway, http, router["id"])

    async def call(headers: dict[str, str], model: str = MODEL) -> tuple[int, str, str]:
        async with http.post(gateway.base_url + "/chat/completions", json={"model": model, "messages": HELLO},
                             headers={"Authorization": f"Bearer {key}", **headers}) as resp:
            await resp.read()
            return resp.status, resp.headers.get("Alephant-Provider", ""), resp.headers["Alephant-Request-Id"]

    async def bound() -> tuple[int, str, str] | None:
        answer = await call({})
        return answer if answer[0] == 200 else None
    assert (await eventually(bound))[1] == "ra"
    status, provider, request_id = await call({"Alephant-Property-Team": "b"})
    assert (status, provider) == (200, "rb")
    event = await eventually(lambda: journal_event(gateway.database_url, request_id))
    assert (event["router_id"], event["router_rule"]) == (router["id"], "team-b")
    assert (await call({}, model=f"ra/{MODEL}"))[1] == "ra"  # a named provider bypasses the router


async def test_done_when_one_provider_fails_under_load_the_agent_keeps_succeeding(
        gateway: Gateway, http: aiohttp.ClientSession, fakes: tuple[FakeUpstream, FakeUpstream]) -> None:
    ra, rb = fakes
    _, path = await live_router(gateway, http, strategy="weighted", targets=[{"model": "ra/*"}, {"model": "rb/*"}])
    ra.clear()
    rb.clear()
    results: list[tuple[int, str, str, str]] = []
    sem = asyncio.Semaphore(16)

    async def one(i: int) -> None:
        async with sem:
            if i == 100:
                ra.fail_next(500, count=100_000)  # the outage starts under load
            status, headers, _ = await chat(gateway, http, path, stream=i % 2 == 0, model=LOAD_MODEL,
                                            headers={"Alephant-Agent-Id": "router-agent", "Alephant-Run-Id": "run-r1"})
            results.append((status, headers.get("Alephant-Provider", ""), headers.get("Alephant-Attempts", ""),
                            headers["Alephant-Request-Id"]))

    n = 400
    await asyncio.gather(*(one(i) for i in range(n)))
    assert [r[0] for r in results].count(200) == n
    assert {r[1] for r in results} == {"ra", "rb"}  # every answer names the provider that served it
    assert attempts_at(ra) + attempts_at(rb) <= 1.2 * n
    assert attempts_at(ra) < n / 2  # ejected soon after the outage began
    failed_over = [r for r in results if r[2] == "2"]
    assert failed_over and all(r[1] == "rb" for r in failed_over)
    event = await eventually(lambda: journal_event(gateway.database_url, failed_over[0][3]))
    assert [(a["target"], a["status"]) for a in event["attempts"]] == [(f"ra/{LOAD_MODEL}", 500),
                                                                       (f"rb/{LOAD_MODEL}", 200)]
    assert (event["agent_id"], event["run_id"], event["provider"]) == ("router-agent", "run-r1", "rb")


async def test_an_active_probe_readmits_an_ejected_target_before_its_ejection_ends(
        gateway: Gateway, http: aiohttp.ClientSession, fakes: tuple[FakeUpstream, FakeUpstream]) -> None:
    ra, _ = fakes
    name = fresh_provider(gateway, ra, "rp")  # two failures spread over ra's several credentials eject neither
    _, path = await live_router(gateway, http, strategy="fallback", targets=[{"model": f"{name}/*"}, {"model": "rb/*"}],
                               retry={"retries": 0},
                               health={"consecutive_failures": 2, "base_ejection_s": 120, "probe_interval_s": 0.3})

    async def ra_serves() -> bool | None:
        return True if await served_by(gateway, http, path) == name else None
    await eventually(ra_serves, timeout=10)
    ra.fail_next(500, count=2)
    before = attempts_at(ra)
    assert [await served_by(gateway, http, path) for _ in range(3)] == ["rb", "rb", "rb"]  # ejected after 2
    assert attempts_at(ra) - before == 2  # the two that failed; the third skipped the ejected target
    probes_before = sum(1 for r in ra.requests if r.path == "/v1/models")

    started = time.monotonic()
    await eventually(ra_serves, timeout=5)
    assert time.monotonic() - started < 3.0  # not the 120 s ejection
    assert sum(1 for r in ra.requests if r.path == "/v1/models") > probes_before  # the probe is what readmitted it
