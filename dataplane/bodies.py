"""Request and response bodies archived to S3, redacted, off the request path (issue 13).

Which calls: a model call whose `LogSettings` (the virtual key's, else its workspace's) keep
`request` or `both` bodies; the default keeps none (metadata only: the event). Where: the event
archive's bucket (`ALEPHANT_S3_BUCKET` at `ALEPHANT_S3_URL`; the local stack's embedded S3 server),
in the layout of `schemas.body_archive`: gzip JSON-lines objects, one record per call,

    {"request_id", "workspace_id", "key_id", "agent_id", "run_id", "session_id", "trace_id",
     "occurred_at", "ingress", "model", "status", "stream",
     "request": <the JSON body as received>, "response": <the JSON answer> | "<the SSE text relayed>"}

Batches, not an object per call: botocore spends 2-3 ms of CPU on one PUT, more than a whole
request costs the worker, so each worker keeps one open batch per workspace and uploads it once it
holds `BATCH_MAX` records or is `FLUSH_S` old (and every call promised to it has arrived, or
`LATE_S` more passed). The call's `llm.call` names its record when the event is made (`key_for`:
`<object key>#<request_id>`), and `finish` hands the record over (`submit`), redacted then.

Redaction (`schemas.redaction.redact_json`): the call's own virtual key and provider key, every
key-shaped string, secret-named fields, and the setting's `redact_paths` (relative to each body)
and `redact_patterns`. Headers are never archived. A streamed answer is kept as its relayed SSE
text (the first `TAP_KEEP_BYTES`).

Best effort by design, never at a request's expense: what is buffered lives in the worker's memory
(a worker killed loses its open batches; at most `BUFFER_MAX_BYTES`, beyond which records are
dropped), S3 errors are retried a few times and then the batch is dropped; drops are counted and
logged. Retention (`LogSettings.retention_days`) is the control plane's sweeper
(`controlplane/bodies_retention.py`).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import gzip
import os
import re
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import msgspec
import structlog

from schemas.body_archive import body_key, object_key, split_body_key
from schemas.entities import LogSettings
from schemas.redaction import redact_json
from schemas.settings import Settings

if TYPE_CHECKING:
    from dataplane.call import Call
    from events.archive import ArchiveStore

log = structlog.get_logger(__name__)

BATCH_MAX = 500  # records per object
FLUSH_S = 5.0  # an open batch is closed this old
LATE_S = 30.0  # a closed batch waits this long more for records promised to it
BUFFER_MAX_BYTES = 64 * 1024 * 1024  # records held per worker, beyond which new ones are dropped
_ATTEMPTS = 3
_TICK_S = 0.5
_MAX_PATTERN_CACHE = 1024
_encoder = msgspec.json.Encoder()


def settings_for(call: Call) -> LogSettings | None:
    """The log settings on the call's path that keep bodies (the key's, else the workspace's)."""
    vk, index = call.vk, call.snap.log_settings
    if not index:
        return None
    found = index.get((vk.workspace_id, "key", vk.id)) or index.get((vk.workspace_id, "workspace", vk.workspace_id))
    return found if found is not None and found.bodies != "none" else None


@dataclass(slots=True)
class Batch:
    """One object being filled: the records promised to it (`promised`) and those arrived."""

    key: str
    workspace_id: str
    opened: float  # time.monotonic()
    promised: int = 0
    lines: list[bytes] = field(default_factory=list)
    size: int = 0
    closed: bool = False


class BodyArchive:
    """One worker's body batches and their uploader (see the module docstring). `enabled` is False
    without an S3 URL: bodies are then never promised (`key_for` is None)."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self.enabled = bool(settings.s3_url)
        self._worker = os.urandom(4).hex()
        self._seq = 0
        self._open: dict[str, Batch] = {}  # workspace -> the batch taking new promises
        self._batches: dict[str, Batch] = {}  # object key -> every batch not uploaded yet
        self._buffered = 0
        self._patterns: dict[str, re.Pattern[str]] = {}
        self._wake = asyncio.Event()
        self.uploaded = 0  # records
        self.dropped = 0  # records
        self._warned = False

    def key_for(self, call: Call) -> str | None:
        """The record the call's bodies go to, when its settings keep them (the event carries it)."""
        if settings_for(call) is None:
            return None
        if not self.enabled:
            if not self._warned:
                self._warned = True
                log.warning("body_archive_unavailable", hint="log settings keep bodies but ALEPHANT_S3_URL is not set")
            return None
        ws = call.vk.workspace_id
        batch = self._open.get(ws)
        now = time.monotonic()
        if batch is None or batch.promised >= BATCH_MAX or now - batch.opened >= FLUSH_S:
            if batch is not None:
                batch.closed = True
            self._seq += 1
            batch = Batch(object_key(ws, dt.datetime.now(dt.UTC), self._worker, self._seq), ws, now)
            self._open[ws] = self._batches[batch.key] = batch
        batch.promised += 1
        if batch.promised >= BATCH_MAX:
            self._wake.set()
        return body_key(batch.key, call.ctx.request_id)

    def submit(self, call: Call, key: str) -> None:
        """Add the call's redacted record to the batch its event named (never blocks)."""
        setting = settings_for(call)
        batch = self._batches.get(split_body_key(key)[0])
        if setting is None or batch is None:  # the setting changed meanwhile, or the batch is gone
            self.dropped += 1
            if batch is not None:
                batch.promised -= 1
            return
        if self._buffered >= BUFFER_MAX_BYTES:
            batch.promised -= 1
            self.dropped += 1
            log.warning("body_archive_buffer_full", dropped=self.dropped)
            return
        record: dict[str, Any] = {
            "request_id": call.ctx.request_id, "workspace_id": call.vk.workspace_id, "key_id": call.vk.id,
            "agent_id": call.ctx.agent_id, "run_id": call.ctx.run_id, "session_id": call.ctx.session_id,
            "trace_id": call.trace_id, "occurred_at": dt.datetime.now(dt.UTC).isoformat(), "ingress": call.ingress,
            "model": call.model_ref or call.requested_model, "status": call.status, "stream": call.stream,
            "request": _request_of(call)}
        if setting.bodies == "both":
            record["response"] = _response_of(call)
        secrets = tuple(s for s in (_bearer(call), _provider_secret(call)) if s)
        line = self._redact(record, setting, secrets)
        batch.lines.append(line)
        batch.size += len(line)
        self._buffered += len(line)

    def _redact(self, record: dict[str, Any], setting: LogSettings, secrets: tuple[str, ...]) -> bytes:
        patterns = []
        for text in setting.redact_patterns:
            compiled = self._patterns.get(text)
            if compiled is None:
                if len(self._patterns) >= _MAX_PATTERN_CACHE:
                    self._patterns.clear()
                try:
                    compiled = self._patterns[text] = re.compile(text)
                except re.error:  # the admin API refuses these; a hand-edited bucket may not
                    continue
            patterns.append(compiled)
        # Paths are relative to each body (`messages.*.content`), not to the record around them.
        clean = {k: redact_json(v, setting.redact_paths if k in ("request", "response") else (), patterns, secrets)
                 for k, v in record.items()}
        return _encoder.encode(clean)

    def _ready(self, now: float, final: bool = False) -> list[Batch]:
        """Batches to upload now: closed (full, old, or at shutdown) and complete, or past waiting."""
        out = []
        for batch in list(self._batches.values()):
            age = now - batch.opened
            if not batch.closed and (final or batch.promised >= BATCH_MAX or age >= FLUSH_S):
                batch.closed = True
                if self._open.get(batch.workspace_id) is batch:
                    del self._open[batch.workspace_id]
            if batch.closed and (final or len(batch.lines) >= batch.promised or age >= FLUSH_S + LATE_S):
                del self._batches[batch.key]
                out.append(batch)
        return out

    async def run(self) -> None:
        """Upload batches until cancelled (S3 opened on the first one)."""
        if not self.enabled:
            return
        from events.archive import open_store

        async with open_store(self._settings) as store:
            bucket_ready = False
            while True:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), _TICK_S)
                self._wake.clear()
                for batch in self._ready(time.monotonic()):
                    bucket_ready = await self._upload(store, batch, bucket_ready)

    async def _upload(self, store: ArchiveStore, batch: Batch, bucket_ready: bool) -> bool:
        """One object, retried a few times, then dropped and counted; True once the bucket exists."""
        from events.archive import s3_region

        self._buffered -= batch.size
        if not batch.lines:
            return bucket_ready
        body = await asyncio.to_thread(gzip.compress, b"\n".join(batch.lines) + b"\n", 6)
        for attempt in range(_ATTEMPTS):
            try:
                if not bucket_ready:
                    await store.ensure_bucket(s3_region(self._settings))
                    bucket_ready = True
                await store.put(batch.key, body)
                self.uploaded += len(batch.lines)
                return bucket_ready
            except Exception as exc:  # S3 and network errors alike: retry, then drop
                if attempt == _ATTEMPTS - 1:
                    self.dropped += len(batch.lines)
                    log.warning("body_archive_failed", error=type(exc).__name__, dropped=self.dropped)
                else:
                    await asyncio.sleep(0.2 * 2 ** attempt)
        return bucket_ready

    async def drain(self, timeout_s: float = 5.0) -> None:
        """At shutdown: upload what is buffered, within a bounded time."""
        if not self.enabled or not self._batches:
            return
        from events.archive import open_store

        async def flush() -> None:
            async with open_store(self._settings) as store:
                ready = False
                for batch in self._ready(time.monotonic(), final=True):
                    ready = await self._upload(store, batch, ready)
        try:
            await asyncio.wait_for(flush(), timeout_s)
        except TimeoutError:
            log.warning("body_archive_not_drained")


def _request_of(call: Call) -> Any:
    if call.raw is not None:
        return call.raw
    if call.body_bytes:
        try:
            return msgspec.json.decode(call.body_bytes)
        except msgspec.DecodeError:
            return call.body_bytes[:65_536].decode("utf-8", "replace")
    return None


def _response_of(call: Call) -> Any:
    resp = call.response
    body = getattr(resp, "body", None)
    if isinstance(body, bytes) and body:
        try:
            return msgspec.json.decode(body)
        except msgspec.DecodeError:
            return body[:65_536].decode("utf-8", "replace")
    tap = call.relay_tap
    return tap.text() if tap is not None else None


def _bearer(call: Call) -> str:
    auth = call.request.headers.get("Authorization", "") or call.request.headers.get("x-api-key", "")
    return auth.split(" ", 1)[1].strip() if auth.lower().startswith("bearer ") else auth.strip()


def _provider_secret(call: Call) -> str:
    secret = call.worker.provider_key(call.provider_key.ciphertext)
    return secret.reveal() if secret is not None else ""


__all__ = ["BATCH_MAX", "FLUSH_S", "BodyArchive", "settings_for"]
