"""Request and response bodies archived to S3, redacted, off the request path (issue 13).

Which calls: a model call whose `LogSettings` (the virtual key's, else its workspace's) keep
`request` or `both` bodies; the default keeps none (metadata only: the event). Where: the event
archive's bucket (`ALEPHANT_S3_BUCKET` at `ALEPHANT_S3_URL`; the local stack's embedded S3 server),
one gzip JSON object per call:

    bodies/<workspace_id>/<YYYY-MM-DD>/<request_id>.json.gz

    {"request_id", "workspace_id", "key_id", "agent_id", "run_id", "session_id", "trace_id",
     "occurred_at", "ingress", "model", "status", "stream",
     "request": <the JSON body as received>, "response": <the JSON answer> | "<the SSE text relayed>"}

The call's `llm.call` event names the object (`body_key`) whatever happens to the upload, so a
ledger row leads to its bodies. A streamed answer is kept as the SSE text relayed (its first
`TAP_KEEP_BYTES`). Redaction comes first (`schemas.redaction.redact_json`): the call's own
virtual key and provider key, every key-shaped string, secret-named fields, and the setting's
`redact_paths` and `redact_patterns`. Headers are never archived.

Uploads run in one background task per worker through a bounded queue: a full queue drops the
body (counted, logged) rather than slow or grow anything; S3 errors are retried a few times,
then dropped and counted. Retention (`LogSettings.retention_days`) is the control plane's
sweeper (`controlplane/bodies_retention.py`).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import gzip
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import msgspec
import structlog

from schemas.body_archive import PREFIX, object_key
from schemas.entities import LogSettings
from schemas.redaction import redact_json
from schemas.settings import Settings

if TYPE_CHECKING:
    from dataplane.call import Call
    from events.archive import ArchiveStore

log = structlog.get_logger(__name__)

QUEUE_MAX = 2000
_ATTEMPTS = 3
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
class Upload:
    key: str
    record: dict[str, Any]
    setting: LogSettings
    secrets: tuple[str, ...]


class BodyArchive:
    """One worker's uploader (see the module docstring). `enabled` is False without an S3 URL:
    bodies are then never promised (`key_for` is None)."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self.enabled = bool(settings.s3_url)
        self._queue: asyncio.Queue[Upload] = asyncio.Queue(QUEUE_MAX)
        self._patterns: dict[str, re.Pattern[str]] = {}
        self.uploaded = 0
        self.dropped = 0
        self._warned = False

    def key_for(self, call: Call) -> str | None:
        """The object the call's bodies go to, when its settings keep them (the event carries it)."""
        if settings_for(call) is None:
            return None
        if not self.enabled:
            if not self._warned:
                self._warned = True
                log.warning("body_archive_unavailable", hint="log settings keep bodies but ALEPHANT_S3_URL is not set")
            return None
        return object_key(call.vk.workspace_id, call.ctx.request_id, dt.datetime.now(dt.UTC))

    def submit(self, call: Call, key: str) -> None:
        """Queue the call's bodies for upload (never blocks; a full queue drops them)."""
        setting = settings_for(call)
        if setting is None:
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
        try:
            self._queue.put_nowait(Upload(key, record, setting, secrets))
        except asyncio.QueueFull:
            self.dropped += 1
            log.warning("body_archive_queue_full", dropped=self.dropped)

    def _redact(self, upload: Upload) -> bytes:
        patterns = []
        for text in upload.setting.redact_patterns:
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
        clean = {k: redact_json(v, upload.setting.redact_paths if k in ("request", "response") else (), patterns,
                                upload.secrets) for k, v in upload.record.items()}
        return gzip.compress(_encoder.encode(clean), compresslevel=6)

    async def run(self) -> None:
        """Upload queued bodies until cancelled (S3 opened on the first one)."""
        if not self.enabled:
            return
        from events.archive import open_store

        async with open_store(self._settings) as store:
            bucket_ready = False
            while True:
                upload = await self._queue.get()
                try:
                    bucket_ready = await self._upload(store, upload, bucket_ready)
                finally:
                    self._queue.task_done()

    async def _upload(self, store: ArchiveStore, upload: Upload, bucket_ready: bool) -> bool:
        """One object, retried a few times, then dropped and counted; True once the bucket exists."""
        from events.archive import s3_region

        body = self._redact(upload)
        for attempt in range(_ATTEMPTS):
            try:
                if not bucket_ready:
                    await store.ensure_bucket(s3_region(self._settings))
                    bucket_ready = True
                await store.put(upload.key, body)
                self.uploaded += 1
                return bucket_ready
            except Exception as exc:  # S3 and network errors alike: retry, then drop
                if attempt == _ATTEMPTS - 1:
                    self.dropped += 1
                    log.warning("body_archive_failed", error=type(exc).__name__, dropped=self.dropped)
                else:
                    await asyncio.sleep(0.2 * 2 ** attempt)
        return bucket_ready

    async def drain(self, timeout_s: float = 5.0) -> None:
        """At shutdown: give queued uploads a bounded time to finish."""
        if not self.enabled:
            return
        try:
            await asyncio.wait_for(self._queue.join(), timeout_s)
        except TimeoutError:
            log.warning("body_archive_not_drained", pending=self._queue.qsize())


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


__all__ = ["PREFIX", "BodyArchive", "object_key", "settings_for"]
