"""Traces end to end (issue 13): a stack whose OTEL_* variables point at a local OTLP/HTTP
collector (protobuf, as the SDK's exporter sends it) exports the request's spans: the caller's
`traceparent` is their parent, the upstream call is a GenAI CLIENT span whose context reaches the
provider as its `traceparent`, and the call's event and answer carry the trace id."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import psycopg
import pytest
import pytest_asyncio
from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from deploy.stack import Stack
from tests.conftest import dedicated_stack, eventually
from tests.fakes.upstream import FakeUpstream


class Collector:
    """An OTLP/HTTP trace receiver on a free loopback port: every span it was sent, flattened."""

    def __init__(self) -> None:
        self.spans: list[dict[str, Any]] = []
        self.url = ""

    async def handle(self, request: web.Request) -> web.Response:
        export = ExportTraceServiceRequest()
        export.ParseFromString(await request.read())
        for resource in export.resource_spans:
            service = {a.key: a.value.string_value for a in resource.resource.attributes}.get("service.name")
            for scope in resource.scope_spans:
                for span in scope.spans:
                    attrs = {a.key: _value(a.value) for a in span.attributes}
                    self.spans.append({"name": span.name, "trace_id": span.trace_id.hex(),
                                       "span_id": span.span_id.hex(), "parent": span.parent_span_id.hex(),
                                       "kind": span.kind, "attrs": attrs, "service": service})
        return web.Response(status=200, content_type="application/x-protobuf", body=b"")


def _value(value: Any) -> Any:
    kind = value.WhichOneof("value")
    return getattr(value, kind) if kind else None


@pytest_asyncio.fixture(scope="module")
async def collector() -> AsyncIterator[Collector]:
    found = Collector()
    app = web.Application()
    app.router.add_post("/v1/traces", found.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    found.url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"  # type: ignore[union-attr]
    yield found
    await runner.cleanup()


@pytest_asyncio.fixture(scope="module")
async def upstream() -> AsyncIterator[FakeUpstream]:
    async with FakeUpstream() as fake:
        yield fake


@pytest.fixture(scope="module")
def traced(tmp_path_factory: pytest.TempPathFactory, collector: Collector, upstream: FakeUpstream) -> Iterator[Stack]:
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": collector.url, "OTEL_BSP_SCHEDULE_DELAY": "50",
           "OTEL_SERVICE_NAME": "alephant-test"}
    with dedicated_stack(Path(tmp_path_factory.mktemp("traced")), env) as stack:
        admin = stack.admin()
        admin.call("POST", "/admin/v1/providers", {"workspace_id": "demo", "name": "fake", "type": "openai",
                                                   "base_url": upstream.base_url, "api_key": "sk-fake-0123456789"})
        yield stack


async def _chat(stack: Stack, http: aiohttp.ClientSession, headers: dict[str, str]) -> tuple[int, dict[str, str]]:
    body = {"model": "fake/gpt-4o-mini", "messages": [{"role": "user", "content": "trace me"}], "max_tokens": 16}
    async with http.post(stack.demo["ALEPHANT_BASE_URL"] + "/chat/completions", json=body,
                         headers={"Authorization": f"Bearer {stack.demo['ALEPHANT_API_KEY']}", **headers}) as resp:
        await resp.read()
        return resp.status, dict(resp.headers)


async def test_a_call_is_traced_from_the_callers_traceparent_to_the_provider(
        traced: Stack, collector: Collector, upstream: FakeUpstream) -> None:
    trace, parent = os.urandom(16).hex(), os.urandom(8).hex()
    async with aiohttp.ClientSession() as http:
        async def served() -> dict[str, str] | None:  # the provider reaches the worker first
            status, headers = await _chat(traced, http, {"traceparent": f"00-{trace}-{parent}-01",
                                                         "Alephant-Run-Id": "run-traced"})
            return headers if status == 200 else None
        headers = await eventually(served, timeout=20)
    assert headers["Alephant-Trace-Id"] == trace

    def spans_of_trace() -> dict[str, dict[str, Any]] | None:
        mine = {s["name"]: s for s in collector.spans if s["trace_id"] == trace and s["parent"]}
        return mine if "chat fake/gpt-4o-mini" in mine else None

    async def exported() -> dict[str, dict[str, Any]] | None:
        return spans_of_trace()
    spans = await eventually(exported, timeout=20)
    server = spans["POST /v1/chat/completions"]
    client = spans["chat fake/gpt-4o-mini"]
    assert server["parent"] == parent and server["kind"] == 2 and server["service"] == "alephant-test"  # SERVER
    assert server["attrs"]["http.response.status_code"] == 200
    assert server["attrs"]["alephant.run_id"] == "run-traced"
    assert client["parent"] == server["span_id"] and client["kind"] == 3  # CLIENT, a child of the request
    attrs = client["attrs"]
    assert (attrs["gen_ai.operation.name"], attrs["gen_ai.system"], attrs["gen_ai.request.model"],
            attrs["gen_ai.response.model"], attrs["gen_ai.request.max_tokens"]) == (
        "chat", "openai", "fake/gpt-4o-mini", "gpt-4o-mini", 16)
    assert attrs["gen_ai.usage.input_tokens"] > 0 and attrs["gen_ai.usage.output_tokens"] > 0
    # The provider got the CLIENT span's context as its traceparent.
    sent = [r for r in upstream.requests if r.headers.get("traceparent", "").split("-")[1:2] == [trace]]
    assert sent and sent[-1].headers["traceparent"].split("-")[2] == client["span_id"]

    async def event_trace() -> str | None:
        async with await psycopg.AsyncConnection.connect(traced.child_env()["ALEPHANT_DATABASE_URL"]) as conn:
            cur = await conn.execute("SELECT body->>'trace_id' FROM event_journal WHERE type = 'llm.call' AND "
                                     "body->>'run_id' = 'run-traced'")
            row = await cur.fetchone()
            return None if row is None else str(row[0])
    assert await eventually(event_trace, timeout=20) == trace  # the ledger row leads to its trace


async def test_an_untraced_caller_starts_a_trace_and_a_refusal_is_an_error_span(
        traced: Stack, collector: Collector) -> None:
    async with aiohttp.ClientSession() as http:
        status, headers = await _chat(traced, http, {})
        assert status == 200
        trace = headers["Alephant-Trace-Id"]
        async with http.post(traced.demo["ALEPHANT_BASE_URL"] + "/chat/completions", json={"model": "fake/x"},
                             headers={"Authorization": "Bearer sk-alph-wrong"}) as resp:
            assert resp.status == 401

    async def root() -> dict[str, Any] | None:
        return next((s for s in collector.spans if s["trace_id"] == trace and not s["parent"]), None)
    assert (await eventually(root, timeout=20))["name"] == "POST /v1/chat/completions"

    async def refused() -> dict[str, Any] | None:  # the refusal's own span, marked as an error
        return next((s for s in collector.spans if s["attrs"].get("http.response.status_code") == 401), None)
    span = await eventually(refused, timeout=20)
    assert span["attrs"]["error.type"] == "invalid_api_key" and not span["parent"]
