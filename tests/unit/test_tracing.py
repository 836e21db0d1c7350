"""`dataplane.tracing` with the SDK's in-memory exporter: when the OTEL_* variables turn it on,
the GenAI attributes of the upstream span, error spans, and the traceparent an upstream gets."""

from __future__ import annotations

from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from dataplane import tracing
from schemas.events import Usage


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    assert tracing.setup(exporter=exporter, batch=False)
    yield exporter
    tracing.shutdown()
    assert tracing.TRACER is None


def _call(**overrides: Any) -> Any:
    provider = SimpleNamespace(name="fake", type="openai", base_url="https://api.example.com/v1")
    fields: dict[str, Any] = {
        "ingress": "chat.completions", "target": SimpleNamespace(provider=provider, model="gpt-4o-mini"),
        "requested_model": "fake/gpt-4o-mini", "model_ref": "fake/gpt-4o-mini", "status": 200, "error_code": None,
        "cache": "miss", "usage": Usage(input_tokens=12, output_tokens=5), "attempts": [object(), object()],
        "cost_nanos": 1_500, "max_tokens": 64}
    return SimpleNamespace(**(fields | overrides))


def test_tracing_is_on_only_when_an_exporter_endpoint_is_configured() -> None:
    assert not tracing.configured({})
    assert tracing.configured({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"})
    assert tracing.configured({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://collector:4318/v1/traces"})
    assert not tracing.configured({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", "OTEL_TRACES_EXPORTER": "none"})
    assert not tracing.configured({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", "OTEL_SDK_DISABLED": "true"})


def test_the_upstream_span_follows_the_genai_conventions(spans: InMemorySpanExporter) -> None:
    with tracing.dispatch_span(_call()):
        headers: dict[str, str] = {}
        tracing.inject(headers)
    (span,) = spans.get_finished_spans()
    assert span.name == "chat fake/gpt-4o-mini" and span.kind == SpanKind.CLIENT
    attrs = dict(span.attributes or {})
    assert {k: attrs[k] for k in ("gen_ai.operation.name", "gen_ai.system", "gen_ai.request.model",
                                  "gen_ai.response.model", "gen_ai.request.max_tokens", "gen_ai.usage.input_tokens",
                                  "gen_ai.usage.output_tokens", "server.address", "alephant.attempts")} == {
        "gen_ai.operation.name": "chat", "gen_ai.system": "openai", "gen_ai.request.model": "fake/gpt-4o-mini",
        "gen_ai.response.model": "gpt-4o-mini", "gen_ai.request.max_tokens": 64, "gen_ai.usage.input_tokens": 12,
        "gen_ai.usage.output_tokens": 5, "server.address": "api.example.com", "alephant.attempts": 2}
    # The upstream request carries this span as its parent.
    _version, trace, parent, _flags = headers["traceparent"].split("-")
    assert (trace, parent) == (format(span.context.trace_id, "032x"), format(span.context.span_id, "016x"))


def test_embeddings_failures_and_other_endpoints(spans: InMemorySpanExporter) -> None:
    with tracing.dispatch_span(_call(ingress="embeddings", status=502, error_code="upstream_unreachable",
                                     usage=None)):
        pass
    with tracing.dispatch_span(_call(ingress="alephant.spend", target=None, requested_model="")):
        pass
    embed, spend = spans.get_finished_spans()
    assert embed.name == "embeddings fake/gpt-4o-mini" and not embed.status.is_ok
    assert dict(embed.attributes or {})["error.type"] == "upstream_unreachable"
    assert "gen_ai.usage.input_tokens" not in dict(embed.attributes or {})
    assert spend.name == "alephant.dispatch" and spend.kind == SpanKind.INTERNAL


def test_off_means_no_header_and_no_tracer() -> None:
    assert tracing.TRACER is None
    headers: dict[str, str] = {}
    tracing.inject(headers)
    assert headers == {}
