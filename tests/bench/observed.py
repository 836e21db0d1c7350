"""The ``observed`` target of ``make bench``: the same build with its observability on (issue 13).

A second ``alephant dev`` (state in ``<state-dir>/observed``) started with
``OTEL_EXPORTER_OTLP_ENDPOINT`` pointing at :class:`NullCollector`, an OTLP/HTTP trace receiver
this process runs on 127.0.0.1 (it answers 200 to ``POST /v1/traces`` and counts the spans), and
a workspace log setting on its ``demo`` workspace keeping both bodies, so every call is traced,
exported, redacted, gzipped and uploaded to the stack's embedded S3 (``bodies/``). Metrics and
the access log are on in both stacks (their defaults; metrics cannot be turned off). The same
fake provider and price are registered, and the demo key is called the way the ``gateway``
target calls the first stack, so ``observed`` over ``gateway`` is what tracing and body
archival cost. ``traced`` calls the same stack with a key whose own log setting keeps no bodies
(a key's setting wins over its workspace's): tracing alone.

:func:`ready_observed` waits until both features demonstrably work (a span received, an object
written) before anything is measured; :func:`body_objects` counts the objects afterwards.
"""

from __future__ import annotations

import asyncio
import gzip
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import aioboto3
from botocore.config import Config
from botocore.exceptions import ClientError
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from events.archive import ArchiveStore
from schemas.body_archive import PREFIX as BODIES_PREFIX
from tests.bench.loadgen import chat_body
from tests.bench.processes import BenchError, Child, admin_post, http, wait_for

OBSERVED_WORKSPACE = "demo"


class NullCollector:
    """An OTLP/HTTP (protobuf) trace receiver on 127.0.0.1 that keeps nothing: ``POST /v1/traces``
    is decoded only to count its spans (``spans``, ``exports``) and answered 200 with an empty
    ``ExportTraceServiceResponse``; anything else is 404. Runs in daemon threads of this process;
    ``close()`` stops it (idempotent)."""

    def __init__(self) -> None:
        self.spans = 0
        self.exports = 0
        self.rejected = 0
        self._lock = threading.Lock()
        collector = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if self.path != "/v1/traces":
                    self._answer(404)
                    return
                try:
                    if self.headers.get("Content-Encoding", "").lower() == "gzip":
                        body = gzip.decompress(body)
                    request = ExportTraceServiceRequest.FromString(body)
                except Exception:  # a body that is not OTLP protobuf: counted, refused
                    with collector._lock:
                        collector.rejected += 1
                    self._answer(400)
                    return
                spans = sum(len(scope.spans) for rs in request.resource_spans for scope in rs.scope_spans)
                with collector._lock:
                    collector.spans += spans
                    collector.exports += 1
                self._answer(200)

            def _answer(self, status: int) -> None:
                self.send_response(status)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:  # one line per export would flood stdout
                return

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="null-otlp", daemon=True)
        self._thread.start()

    @property
    def endpoint(self) -> str:
        """The value for ``OTEL_EXPORTER_OTLP_ENDPOINT`` (the exporter appends ``/v1/traces``)."""
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def counts(self) -> dict[str, int]:
        with self._lock:
            return {"spans": self.spans, "exports": self.exports, "rejected": self.rejected}

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def tracing_env(collector: NullCollector) -> dict[str, str]:
    """The observed stack's extra environment: traces to the null collector (OTLP/HTTP protobuf,
    the SDK's batch processor with its defaults)."""
    return {"OTEL_EXPORTER_OTLP_ENDPOINT": collector.endpoint, "OTEL_SERVICE_NAME": "alephant-bench-observed"}


@dataclass
class S3Target:
    """The observed stack's archive bucket (from its ``ops.env``)."""

    url: str
    bucket: str
    access_key: str
    secret_key: str

    @classmethod
    def from_ops_env(cls, ops: dict[str, str]) -> S3Target:
        if not ops.get("ALEPHANT_S3_URL"):
            raise BenchError("the observed stack's ops.env names no ALEPHANT_S3_URL: body archival has nowhere to go")
        return cls(url=ops["ALEPHANT_S3_URL"], bucket=ops.get("ALEPHANT_S3_BUCKET") or "alephant-events",
                   access_key=ops.get("AWS_ACCESS_KEY_ID", "alephant-dev"),
                   secret_key=ops.get("AWS_SECRET_ACCESS_KEY", "alephant-dev"))


def body_objects(s3: S3Target) -> int:
    """Bodies archived under ``bodies/``: the records (lines) of every batch object (0 before the
    first upload created the bucket)."""

    async def count() -> int:
        session = aioboto3.Session(aws_access_key_id=s3.access_key, aws_secret_access_key=s3.secret_key)
        async with session.client("s3", endpoint_url=s3.url, region_name="us-east-1",
                                  config=Config(s3={"addressing_style": "path"})) as client:
            store = ArchiveStore(client, s3.bucket)
            try:
                keys = await store.keys(BODIES_PREFIX)
            except ClientError as exc:
                if exc.response.get("Error", {}).get("Code") == "NoSuchBucket":
                    return 0
                raise
            records = 0
            for key in keys:
                records += len(gzip.decompress(await store.get(key)).splitlines())
            return records

    return asyncio.run(count())


def register_traced_key(env: dict[str, str]) -> str:
    """A demo-workspace key whose own log setting keeps no bodies; its plaintext key. Create it
    before the workspace setting: once that one is seen working, this one (an earlier revision)
    has reached the worker too."""
    key = admin_post(env, "/admin/v1/virtual-keys", {"workspace_id": OBSERVED_WORKSPACE, "name": "bench-traced"})
    admin_post(env, "/admin/v1/log-settings", {"workspace_id": OBSERVED_WORKSPACE, "scope": "key",
                                               "scope_id": key["id"], "bodies": "none"})
    return str(key["key"])


def ready_observed(env: dict[str, str], stack: Child, collector: NullCollector, s3: S3Target, *, model: str,
                   headers: dict[str, str], max_tokens: int) -> dict[str, Any]:
    """Keep the demo workspace's bodies (``bodies: both``), then call the demo key until the
    collector has received a span and the bucket holds a body object (the setting reached the
    worker, the exporter and the uploader work). Returns the log setting as created."""
    setting = admin_post(env, "/admin/v1/log-settings", {
        "workspace_id": OBSERVED_WORKSPACE, "scope": "workspace", "scope_id": OBSERVED_WORKSPACE,
        "bodies": "both"}, exists_ok=True)
    url = env["ALEPHANT_BASE_URL"].rstrip("/") + "/chat/completions"
    request_headers = {"Authorization": f"Bearer {env['ALEPHANT_API_KEY']}", **headers}
    last: list[tuple[int, bytes]] = []

    def observed() -> bool:
        try:
            result = http("POST", url, headers=request_headers,
                          body=chat_body(model, stream=False, max_tokens=max_tokens))
        except OSError as exc:
            result = (0, str(exc).encode())
        last[:] = [result]
        return result[0] == 200 and collector.counts()["spans"] > 0 and body_objects(s3) > 0

    try:
        # The batch span processor exports every 5 s; the setting reaches the worker within a second or two.
        wait_for(stack, "a span at the null collector and a body object in S3", 45, observed)
    except BenchError as exc:
        status, raw = last[0] if last else (0, b"")
        raise BenchError(f"{exc}\n  collector: {collector.counts()}; last answer: {status} "
                         f"{raw.decode(errors='replace')[:500]}") from None
    return setting
