"""The S3 archive of the raw event stream: the record of truth once the stream's retention drops
old messages, and a source `alephant ledger rebuild --from archive` replays.

Layout (one bucket, `ALEPHANT_S3_BUCKET`):

    events/<stream>/dt=YYYY-MM-DD/hour=HH/<first_seq:020d>-<last_seq:020d>.jsonl.gz

Each object is gzip-compressed JSON lines, one per stream message, in stream order:
`{"seq": N, "subject": "...", "event": <the message's bytes, verbatim>}`. A message whose bytes
are not one line of valid JSON (a poison message: the archive keeps those too) is stored as
`{"seq": N, "subject": "...", "raw_b64": "<base64 of its bytes>"}` instead.

Contracts:
* An object holds every stream sequence from `first_seq` to `last_seq`, with no hole, so the key
  names alone tell which sequences the archive covers (`archived_ranges`).
* Objects are partitioned by the UTC hour in which JetStream stored their messages (the
  message timestamp, not the event's `occurred_at`: the same for a redelivery, known for a
  poison message, and a late event never splits a run of sequences). An object never spans an
  hour.
* The archiver (`Archiver`) reads its own durable pull consumer, `archive`, and acks a message
  only after the object holding it is stored. A crash before the ack redelivers the message, so
  an object may overlap another; readers (`read_object`, the rebuild) dedup by sequence, and the
  projections dedup by event id.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import gzip
import re
import time
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import aioboto3
import msgspec
import structlog
from aiobotocore.config import AioConfig
from botocore.exceptions import BotoCoreError, ClientError
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from events.pull import BatchPuller
from schemas.settings import Settings

log = structlog.get_logger(__name__)

ARCHIVE_CONSUMER = "archive"
KEY_ROOT = "events"
_KEY_RE = re.compile(r"/dt=(\d{4}-\d{2}-\d{2})/hour=(\d{2})/(\d{20})-(\d{20})\.jsonl\.gz$")
_RETRY_FIRST_S = 0.5
_RETRY_MAX_S = 30.0


# -- object format (pure) ----------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Record:
    """One archived stream message."""

    seq: int
    subject: str
    data: bytes
    stored_at: dt.datetime


class _Line(msgspec.Struct):
    seq: int
    subject: str
    event: msgspec.Raw = msgspec.field(default_factory=msgspec.Raw)
    raw_b64: str | None = None


_line_decoder = msgspec.json.Decoder(_Line)
_any_decoder = msgspec.json.Decoder()


def stream_prefix(stream: str) -> str:
    return f"{KEY_ROOT}/{stream}/"


def object_key(stream: str, stored_at: dt.datetime, first_seq: int, last_seq: int) -> str:
    hour = stored_at.astimezone(dt.UTC)
    return (f"{stream_prefix(stream)}dt={hour:%Y-%m-%d}/hour={hour:%H}/"
            f"{first_seq:020d}-{last_seq:020d}.jsonl.gz")


def key_range(key: str) -> tuple[int, int] | None:
    """`(first_seq, last_seq)` of an archive object key, or None for any other key."""
    m = _KEY_RE.search(key)
    return None if m is None else (int(m.group(3)), int(m.group(4)))


_JSON_SPACE = frozenset(b" \t\r\n")


def _is_json_line(data: bytes) -> bool:
    """One JSON value on one line, with nothing around it that a JSON reader would drop."""
    if not data or b"\n" in data or b"\r" in data or data[0] in _JSON_SPACE or data[-1] in _JSON_SPACE:
        return False
    try:
        _any_decoder.decode(data)
    except msgspec.DecodeError:
        return False
    return True


def encode_line(seq: int, subject: str, data: bytes) -> bytes:
    """One JSON line; the message bytes verbatim when they are one line of valid JSON."""
    head = b'{"seq":%d,"subject":%s' % (seq, msgspec.json.encode(subject))
    if _is_json_line(data):
        return head + b',"event":' + data + b"}\n"
    return head + b',"raw_b64":"' + base64.b64encode(data) + b'"}\n'


def encode_object(records: Iterable[Record]) -> bytes:
    # mtime=0: the same records always give the same bytes (an overlapping rewrite is identical).
    return gzip.compress(b"".join(encode_line(r.seq, r.subject, r.data) for r in records), mtime=0)


def decode_object(body: bytes) -> list[tuple[int, str, bytes]]:
    """`(seq, subject, data)` per line of an archive object, `data` exactly as it was published."""
    out: list[tuple[int, str, bytes]] = []
    for line in gzip.decompress(body).splitlines():
        if not line:
            continue
        rec = _line_decoder.decode(line)
        if rec.raw_b64 is not None:
            out.append((rec.seq, rec.subject, base64.b64decode(rec.raw_b64)))
        else:
            out.append((rec.seq, rec.subject, bytes(rec.event)))
    return out


def plan_objects(records: Iterable[Record], max_events: int) -> list[list[Record]]:
    """Split records into objects: sorted by sequence, one copy per sequence, each object a run of
    consecutive sequences within one UTC hour of storage and at most `max_events` long."""
    by_seq = {r.seq: r for r in records}
    objects: list[list[Record]] = []
    current: list[Record] = []
    for seq in sorted(by_seq):
        r = by_seq[seq]
        if current and (seq != current[-1].seq + 1 or len(current) >= max_events
                        or _hour(r.stored_at) != _hour(current[0].stored_at)):
            objects.append(current)
            current = []
        current.append(r)
    if current:
        objects.append(current)
    return objects


def _hour(t: dt.datetime) -> tuple[int, int, int, int]:
    u = t.astimezone(dt.UTC)
    return u.year, u.month, u.day, u.hour


def merge_ranges(ranges: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """Overlapping or adjacent `(first, last)` ranges merged, in order."""
    merged: list[tuple[int, int]] = []
    for first, last in sorted(ranges):
        if merged and first <= merged[-1][1] + 1:
            merged[-1] = (merged[-1][0], max(merged[-1][1], last))
        else:
            merged.append((first, last))
    return merged


# -- the store (IO) ----------------------------------------------------------------------------

class ArchiveStore:
    """The archive bucket through an aioboto3 S3 client (`open_store`). Errors propagate as
    botocore's `ClientError` / `BotoCoreError`."""

    def __init__(self, client: Any, bucket: str) -> None:
        self._s3 = client
        self.bucket = bucket

    async def ensure_bucket(self, region: str) -> None:
        """Create the bucket if it does not exist. Idempotent."""
        try:
            await self._s3.head_bucket(Bucket=self.bucket)
            return
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") not in ("404", "NoSuchBucket", "NotFound"):
                raise
        extra = {} if region == "us-east-1" else {"CreateBucketConfiguration": {"LocationConstraint": region}}
        try:
            await self._s3.create_bucket(Bucket=self.bucket, **extra)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                raise
        log.info("archive_bucket_created", bucket=self.bucket)

    async def put(self, key: str, body: bytes) -> None:
        # A .gz object, not Content-Encoding gzip (which HTTP clients would decompress on the way).
        await self._s3.put_object(Bucket=self.bucket, Key=key, Body=body, ContentType="application/gzip")

    async def get(self, key: str) -> bytes:
        resp = await self._s3.get_object(Bucket=self.bucket, Key=key)
        async with resp["Body"] as body:
            data: bytes = await body.read()
        return data

    async def keys(self, prefix: str) -> list[str]:
        """Every key under `prefix` (all pages), in S3's (lexicographic) order."""
        out: list[str] = []
        paginator = self._s3.get_paginator("list_objects_v2")
        async for page in paginator.paginate(Bucket=self.bucket, Prefix=prefix):
            out += [o["Key"] for o in page.get("Contents", [])]
        return out

    async def archived(self, stream: str) -> list[tuple[int, int, str]]:
        """`(first_seq, last_seq, key)` of each archive object of `stream`, by first sequence."""
        found = [(r[0], r[1], k) for k in await self.keys(stream_prefix(stream)) if (r := key_range(k))]
        return sorted(found)


def s3_region(settings: Settings) -> str:
    return settings.s3_region or aioboto3.Session().region_name or "us-east-1"


@asynccontextmanager
async def open_s3(settings: Settings) -> AsyncIterator[Any]:
    """An aioboto3 S3 client on `settings.s3_url` (path-style addressing, which MinIO and moto
    need; bounded retries and timeouts), with credentials from the AWS variables."""
    config = AioConfig(s3={"addressing_style": "path"}, retries={"max_attempts": 3, "mode": "standard"},
                       connect_timeout=5, read_timeout=60)
    session = aioboto3.Session()
    async with session.client("s3", endpoint_url=settings.s3_url, region_name=s3_region(settings),
                              config=config) as client:
        yield client


@asynccontextmanager
async def open_store(settings: Settings) -> AsyncIterator[ArchiveStore]:
    """An `ArchiveStore` on `settings.s3_url` / `s3_bucket` (`open_s3`)."""
    async with open_s3(settings) as client:
        yield ArchiveStore(client, settings.s3_bucket)


# -- the archiver (IO) -------------------------------------------------------------------------

class Archiver:
    """Copies the stream into the archive through the durable pull consumer `archive`.

    Messages are buffered until `flush_s` seconds after the first one arrived or `max_events` are
    buffered, then written as objects (`plan_objects`) and acked. If an upload fails, the whole
    buffer is nak'ed (redelivered after a backoff) and nothing is acked: a message is acked only
    once an object holding it is stored. Runs until cancelled. S3 errors are retried with a
    backoff; any other error ends it, as it ends the projections (the process is restarted). Pulls
    with the projections' `BatchPuller`.
    """

    def __init__(self, js: JetStreamContext, store: ArchiveStore, *, stream: str, subject_prefix: str,
                 flush_s: float = 10.0, max_events: int = 10_000, ack_wait_s: float = 30.0,
                 region: str = "us-east-1") -> None:
        self._js = js
        self._store = store
        self._stream = stream
        self._subject = f"{subject_prefix}.>"
        self._flush_s = flush_s
        self._max_events = max(1, max_events)
        # Buffered messages wait for the flush, then for the upload: not redelivered meanwhile.
        self._ack_wait_s = flush_s + ack_wait_s
        self._region = region
        self.objects = 0
        self.archived = 0

    async def run(self) -> None:
        delay = _RETRY_FIRST_S
        while True:
            try:
                await self._store.ensure_bucket(self._region)
                break
            except (BotoCoreError, ClientError, OSError) as exc:
                log.warning("archive_bucket_unavailable", bucket=self._store.bucket, error=type(exc).__name__,
                            detail=str(exc)[:200])
                await asyncio.sleep(delay)
                delay = min(delay * 2, _RETRY_MAX_S)
        puller = BatchPuller(self._js._nc, self._js, self._stream, ConsumerConfig(
            durable_name=ARCHIVE_CONSUMER, filter_subject=self._subject, ack_policy=AckPolicy.EXPLICIT,
            deliver_policy=DeliverPolicy.ALL, ack_wait=self._ack_wait_s, max_ack_pending=self._max_events * 2))
        await puller.start()
        try:
            await self._archive_forever(puller)
        finally:
            await puller.close()

    async def _archive_forever(self, puller: BatchPuller) -> None:
        buffer: list[Msg] = []
        first_at = 0.0
        delay = _RETRY_FIRST_S
        while True:
            age = time.monotonic() - first_at
            if buffer and (len(buffer) >= self._max_events or age >= self._flush_s):
                stored = await self._flush(buffer)
                buffer = []
                if not stored:
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, _RETRY_MAX_S)
                    continue
                delay = _RETRY_FIRST_S
                continue
            timeout = min(1.0, max(0.05, self._flush_s - age)) if buffer else 1.0
            try:
                got = await puller.fetch(min(512, self._max_events - len(buffer)), timeout=timeout)
            except TimeoutError:
                continue
            if not buffer:
                first_at = time.monotonic()
            buffer += got

    async def _flush(self, msgs: list[Msg]) -> bool:
        """Store `msgs` as objects and ack them; on an upload failure nak them all. True if stored."""
        records = [Record(m.metadata.sequence.stream, m.subject, m.data, m.metadata.timestamp) for m in msgs]
        objects = plan_objects(records, self._max_events)
        try:
            for obj in objects:
                await self._store.put(object_key(self._stream, obj[0].stored_at, obj[0].seq, obj[-1].seq),
                                      encode_object(obj))
        except (BotoCoreError, ClientError, OSError) as exc:
            log.warning("archive_upload_failed", bucket=self._store.bucket, error=type(exc).__name__,
                        detail=str(exc)[:200], events=len(msgs))
            await _settle(msgs, ack=False)
            return False
        await _settle(msgs, ack=True)
        self.objects += len(objects)
        self.archived += len(records)
        log.debug("archive_flushed", objects=len(objects), events=len(records),
                  last_seq=max(r.seq for r in records))
        return True


async def _settle(msgs: list[Msg], *, ack: bool) -> None:
    """Ack (stored) or nak (retry later). A failure here is harmless: an unacked message is
    redelivered and archived again in an overlapping object."""
    try:
        for m in msgs:
            await (m.ack() if ack else m.nak(delay=_RETRY_FIRST_S))
    except Exception as exc:
        log.warning("archive_ack_failed", ack=ack, error=type(exc).__name__)


async def run_archiver(js: JetStreamContext, settings: Settings) -> None:
    """The projector process's archiver task (when `settings.s3_url` is set); runs until cancelled."""
    async with open_store(settings) as store:
        await Archiver(js, store, stream=settings.stream, subject_prefix=settings.subject_prefix,
                       flush_s=settings.archive_flush_s, max_events=settings.archive_max_events,
                       ack_wait_s=settings.projector_ack_wait_s, region=s3_region(settings)).run()
