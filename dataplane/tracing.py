"""OpenTelemetry traces of the data plane (issue 13), off unless configured.

Configured by the standard variables: an exporter endpoint (`OTEL_EXPORTER_OTLP_ENDPOINT` or
`OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`, OTLP over HTTP/protobuf) turns tracing on, unless
`OTEL_TRACES_EXPORTER=none`; `OTEL_SERVICE_NAME` (default `alephant-dataplane`),
`OTEL_TRACES_SAMPLER` / `_ARG`, `OTEL_EXPORTER_OTLP_HEADERS` and the batch processor's
`OTEL_BSP_*` are read by the SDK itself. Off, a request pays one `is None` test.

Per request (`pipeline.run`):

* a SERVER span `{method} {route}`: the incoming W3C `traceparent` (and `tracestate`) is its
  parent; attributes `http.request.method`, `url.path`, `http.route`,
  `http.response.status_code`, `error.type` (the error code), and the agent context
  (`alephant.request_id`, `.agent_id`, `.run_id`, `.session_id`, `.workspace_id`, `.key_id`);
* INTERNAL spans for the stages that wait on something: `alephant.admit` (limits and the budget
  hold, a Redis round trip) and `alephant.cache` (the cache lookup), only when they have work to
  do (a call with no limits, budgets or cache gets two spans in all);
* a CLIENT span for the upstream call (the dispatch stage), named and attributed after the
  OpenTelemetry GenAI semantic conventions: `{gen_ai.operation.name} {gen_ai.request.model}`
  with `gen_ai.operation.name` (chat, embeddings), `gen_ai.system` (openai, anthropic,
  aws.bedrock, ...), `gen_ai.request.model`, `gen_ai.response.model`,
  `gen_ai.request.max_tokens`, `gen_ai.usage.input_tokens` / `output_tokens`, `server.address`,
  and `alephant.attempts`, `alephant.cost_usd`, `alephant.cache`. Other endpoints (the spend
  API, paid endpoints, egress) get an `alephant.dispatch` span.

The upstream request carries the CLIENT span as its `traceparent` (`inject`, from
`providers.upstream.send`: every outbound call, so a paid endpoint's backend and an egress target
join the trace too). The call's `llm.call` event carries the trace id (`trace_id`), and the
answer an `Alephant-Trace-Id` header, so a ledger row leads to its trace.

Spans cost about 25 µs each in the Python SDK; a request makes two to four, and only these
stages are spans for that reason (`make bench` measures it with an exporter configured).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, MutableMapping
from typing import TYPE_CHECKING, Any

import structlog

if TYPE_CHECKING:
    from opentelemetry.trace import Span, Tracer

    from dataplane.call import Call

log = structlog.get_logger(__name__)

TRACER: Tracer | None = None
_PROVIDER: Any = None
TRACE_HEADER = "Alephant-Trace-Id"

# gen_ai.system per provider type (semantic-conventions names where they exist).
_SYSTEMS = {"openai": "openai", "azure": "az.ai.openai", "anthropic": "anthropic", "bedrock": "aws.bedrock",
            "gemini": "gcp.gemini", "vertex": "gcp.vertex_ai", "mistral": "mistral_ai", "groq": "groq",
            "deepseek": "deepseek", "xai": "xai", "cohere": "cohere", "ollama": "ollama", "mock": "alephant.mock"}
_OPERATIONS = {"chat.completions": "chat", "messages": "chat", "responses": "chat", "embeddings": "embeddings",
               "passthrough": "chat", "count_tokens": "count_tokens", "cache.embed": "embeddings"}


def configured(environ: MutableMapping[str, str] | None = None) -> bool:
    """Whether the OTEL_* variables ask for trace export (see the module docstring)."""
    env = os.environ if environ is None else environ
    if env.get("OTEL_TRACES_EXPORTER", "").strip().lower() == "none" or env.get("OTEL_SDK_DISABLED") == "true":
        return False
    return bool(env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_ENDPOINT"))


def setup(service_name: str = "alephant-dataplane", exporter: Any = None, *, batch: bool = True) -> bool:
    """Turn tracing on with the OTLP/HTTP exporter when `configured()` (or with `exporter`, e.g.
    the tests' in-memory one; `batch=False` exports each span as it ends). True when on."""
    global TRACER, _PROVIDER
    if exporter is None and not configured():
        return False
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor

    if exporter is None:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        exporter = OTLPSpanExporter()
    name = os.environ.get("OTEL_SERVICE_NAME") or service_name
    provider = TracerProvider(resource=Resource.create({"service.name": name}))
    provider.add_span_processor(BatchSpanProcessor(exporter) if batch else SimpleSpanProcessor(exporter))
    _PROVIDER, TRACER = provider, provider.get_tracer("alephant.dataplane")
    log.info("tracing_on", service=name)
    return True


def shutdown() -> None:
    """Flush and stop the exporter (at worker shutdown)."""
    global TRACER, _PROVIDER
    if _PROVIDER is not None:
        _PROVIDER.shutdown()
    TRACER = _PROVIDER = None


@contextlib.contextmanager
def request_span(call: Call) -> Iterator[Span]:
    """The request's SERVER span, around every stage and `finish` (so the event gets its id)."""
    from opentelemetry import propagate
    from opentelemetry.trace import SpanKind, Status, StatusCode

    assert TRACER is not None
    request = call.request
    route = request.match_info.route.resource
    template = route.canonical if route is not None else request.path
    # Most callers send no trace context: skip the propagator's parsing then.
    parent = propagate.extract(request.headers) if "traceparent" in request.headers else None
    with TRACER.start_as_current_span(f"{request.method} {template}", context=parent, kind=SpanKind.SERVER,
                                      record_exception=False, set_status_on_exception=False) as span:
        ctx = span.get_span_context()
        if ctx.is_valid:
            call.trace_id = format(ctx.trace_id, "032x")
            call.extra_headers[TRACE_HEADER] = call.trace_id
        try:
            yield span
        finally:
            if span.is_recording():
                span.set_attributes({"http.request.method": request.method, "url.path": request.path,
                                     "http.route": template, "http.response.status_code": call.status})
                span.set_attributes({k: v for k, v in (
                    ("alephant.request_id", call.ctx.request_id), ("alephant.agent_id", call.ctx.agent_id),
                    ("alephant.run_id", call.ctx.run_id), ("alephant.session_id", call.ctx.session_id),
                    ("alephant.workspace_id", call.vk.workspace_id), ("alephant.key_id", call.vk.id)) if v})
                if call.status >= 400:
                    span.set_attribute("error.type", call.error_code or str(call.status))
                    span.set_status(Status(StatusCode.ERROR))


@contextlib.contextmanager
def stage_span(name: str) -> Iterator[None]:
    """An INTERNAL span for one stage (see the module docstring for which)."""
    assert TRACER is not None
    with TRACER.start_as_current_span(name, record_exception=False, set_status_on_exception=False):
        yield


@contextlib.contextmanager
def dispatch_span(call: Call) -> Iterator[None]:
    """The upstream call's CLIENT span (GenAI conventions) or the endpoint's `alephant.dispatch`."""
    from opentelemetry.trace import SpanKind, Status, StatusCode

    assert TRACER is not None
    operation = _OPERATIONS.get(call.ingress) if call.target is not None else None
    requested = call.requested_model or (call.model_ref if call.target is not None else "")
    name = f"{operation} {requested}" if operation else "alephant.dispatch"
    kind = SpanKind.CLIENT if operation else SpanKind.INTERNAL
    with TRACER.start_as_current_span(name, kind=kind, record_exception=False, set_status_on_exception=False) as span:
        try:
            yield
        finally:
            if span.is_recording():
                _gen_ai_attributes(span, call, operation)
                if call.status >= 400:
                    span.set_attribute("error.type", call.error_code or str(call.status))
                    span.set_status(Status(StatusCode.ERROR))


def _gen_ai_attributes(span: Span, call: Call, operation: str | None) -> None:
    attrs: dict[str, Any] = {"alephant.cache": call.cache}
    if operation is not None and call.target is not None:
        provider = call.target.provider
        attrs |= {"gen_ai.operation.name": operation, "gen_ai.system": _SYSTEMS.get(provider.type, provider.type),
                  "gen_ai.request.model": call.requested_model or call.target.model,
                  "gen_ai.response.model": call.target.model, "alephant.provider": provider.name}
        if call.max_tokens:
            attrs["gen_ai.request.max_tokens"] = call.max_tokens
        host = provider.base_url.split("://", 1)[-1].split("/", 1)[0] if provider.base_url else ""
        if host:
            attrs["server.address"] = host.rsplit("@", 1)[-1]
    if call.usage is not None:
        attrs["gen_ai.usage.input_tokens"] = call.usage.input_tokens
        attrs["gen_ai.usage.output_tokens"] = call.usage.output_tokens
    if call.attempts:
        attrs["alephant.attempts"] = len(call.attempts)
    attrs["alephant.cost_usd"] = call.cost_nanos / 1e9  # a span attribute for dashboards, never money
    span.set_attributes(attrs)


def inject(headers: MutableMapping[str, str]) -> None:
    """Put the current span's `traceparent` (and `tracestate`) into an outbound request's headers."""
    if TRACER is None:
        return
    from opentelemetry import propagate
    propagate.inject(headers)


__all__ = ["TRACER", "TRACE_HEADER", "configured", "dispatch_span", "inject", "request_span", "setup", "shutdown",
           "stage_span"]
