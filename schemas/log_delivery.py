"""Downstream log delivery, the pure half: which events a destination wants, how a webhook body is
signed, how long a retry waits, what an answer means, and the OTLP and S3 payload shapes.

No IO, no clock reads, no randomness: the caller passes `now` and the jitter draw. The delivery
task (`events.delivery`) and the admin API (`controlplane.log_destinations`) both use it.

Webhook signature (documented in the README, "Log delivery"): the header

    Alephant-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>." + body)>

over the exact body bytes, with `Alephant-Event-Id: <event_id>` beside it. A receiver recomputes
the HMAC with its copy of the secret, compares in constant time, and refuses a `t` too far from
its clock (replay window).
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, get_args

import msgspec

from schemas.entities import LogDestination
from schemas.events import Event

# Every event type the stream carries: the tags of the `Event` union.
EVENT_TYPES: frozenset[str] = frozenset(str(t.__struct_config__.tag) for t in get_args(Event))

SIGNATURE_HEADER = "Alephant-Signature"
EVENT_ID_HEADER = "Alephant-Event-Id"
DEFAULT_TOLERANCE_S = 300

Outcome = Literal["delivered", "retry", "permanent"]
Settle = Literal["ack", "retry", "dead"]

_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_PREFIX_RE = re.compile(r"^[A-Za-z0-9!_.*'()/=-]{0,512}$")


# -- filtering -----------------------------------------------------------------------------------

def subject_parts(subject: str, subject_prefix: str) -> tuple[str, str] | None:
    """`(workspace_id, event_type)` of a stream subject `<prefix>.<workspace>.<type>`, or None
    for a subject of another shape (the type may hold dots, the workspace may not)."""
    head = subject_prefix + "."
    if not subject.startswith(head):
        return None
    workspace, dot, event_type = subject[len(head):].partition(".")
    if not dot or not workspace or not event_type:
        return None
    return workspace, event_type


def wants(dest: LogDestination, workspace_id: str, event_type: str) -> bool:
    """Whether `dest` delivers an event of `event_type` from `workspace_id`: its workspace (none:
    every workspace) and its event types (none: every type). `enabled` is not looked at here."""
    if dest.workspace_id and dest.workspace_id != workspace_id:
        return False
    return not dest.event_types or event_type in dest.event_types


# -- webhook signature ---------------------------------------------------------------------------

def signature(secret: str, timestamp: int, body: bytes) -> str:
    """The `Alephant-Signature` value: `t=<timestamp>,v1=<hex HMAC-SHA256(secret, "<t>." + body)>`."""
    mac = hmac.new(secret.encode(), str(timestamp).encode() + b"." + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={mac}"


def verify_signature(secret: str, header: str, body: bytes, now: int, tolerance_s: int = DEFAULT_TOLERANCE_S) -> bool:
    """What a receiver does: parse `t` and every `v1`, refuse a `t` more than `tolerance_s` from
    `now` (unix seconds), and compare the HMAC in constant time."""
    parts = [p.partition("=") for p in header.split(",")]
    stamps = [v for k, _, v in parts if k.strip() == "t"]
    macs = [v.strip() for k, _, v in parts if k.strip() == "v1"]
    if len(stamps) != 1 or not stamps[0].strip().isdigit() or not macs:
        return False
    t = int(stamps[0])
    if abs(now - t) > tolerance_s:
        return False
    expected = signature(secret, t, body).rpartition("v1=")[2]
    return any(hmac.compare_digest(expected, mac) for mac in macs)


# -- retries -------------------------------------------------------------------------------------

def http_outcome(status: int) -> Outcome:
    """2xx delivered; 4xx other than 408 and 429 a permanent failure (the receiver refuses the
    event: retrying changes nothing); anything else (408, 429, 5xx, 3xx: redirects are not
    followed) is retried."""
    if 200 <= status < 300:
        return "delivered"
    if 400 <= status < 500 and status not in (408, 429):
        return "permanent"
    return "retry"


def settle(outcome: Outcome, attempt: int, max_attempts: int) -> Settle:
    """What becomes of an event after its `attempt`-th delivery (1-based): acked when delivered,
    dead-lettered when refused for good or after `max_attempts` failures, else retried."""
    if outcome == "delivered":
        return "ack"
    if outcome == "permanent" or attempt >= max_attempts:
        return "dead"
    return "retry"


def retry_delay_s(attempt: int, base_s: float, max_s: float, jitter: float) -> float:
    """The wait before attempt `attempt + 1`: `base_s * 2**(attempt - 1)` capped at `max_s`, with
    equal jitter (half fixed, half scaled by `jitter` in [0, 1)) so retries of a batch spread."""
    full = min(max_s, base_s * 2.0 ** max(0, attempt - 1))
    return full / 2 + full / 2 * min(max(jitter, 0.0), 1.0)


# -- the event's envelope -------------------------------------------------------------------------

class Envelope(msgspec.Struct, frozen=True, kw_only=True):
    """The fields delivery reads from a stored event (the rest travels verbatim). Unknown fields
    are ignored; the event is not re-encoded."""

    event_id: str
    type: str
    workspace_id: str
    occurred_at: str = ""
    agent_id: str | None = None
    run_id: str | None = None
    session_id: str | None = None
    request_id: str | None = None
    trace_id: str | None = None
    status: int | None = None


envelope_decoder = msgspec.json.Decoder(Envelope)


# -- OTLP/HTTP JSON logs ----------------------------------------------------------------------------

_TRACE_ID_RE = re.compile(r"^[0-9a-f]{32}$")


def _attr(key: str, value: str) -> dict[str, Any]:
    return {"key": key, "value": {"stringValue": value}}


def _severity(env: Envelope) -> tuple[int, str]:
    if env.status is not None and env.status >= 500:
        return 17, "ERROR"
    if env.status is not None and env.status >= 400:
        return 13, "WARN"
    return 9, "INFO"


def otlp_record(env: Envelope, body: bytes, time_unix_nano: int, observed_unix_nano: int) -> dict[str, Any]:
    """One OTLP logRecord: the event JSON as its string body, its type as `event.name`, the
    attribution ids as attributes, and its trace id as the record's `traceId` when it has one."""
    severity, text = _severity(env)
    attrs = [_attr("event.name", env.type), _attr("alephant.event.id", env.event_id),
             _attr("alephant.workspace.id", env.workspace_id)]
    for key, value in (("alephant.agent.id", env.agent_id), ("alephant.run.id", env.run_id),
                       ("alephant.session.id", env.session_id), ("alephant.request.id", env.request_id)):
        if value:
            attrs.append(_attr(key, value))
    record: dict[str, Any] = {
        "timeUnixNano": str(time_unix_nano), "observedTimeUnixNano": str(observed_unix_nano),
        "severityNumber": severity, "severityText": text,
        "body": {"stringValue": body.decode("utf-8", "replace")}, "attributes": attrs,
    }
    if env.trace_id and _TRACE_ID_RE.match(env.trace_id):
        record["traceId"] = env.trace_id  # OTLP/JSON: trace ids as hex, not base64
    return record


def otlp_logs_body(records: Sequence[dict[str, Any]], service_name: str = "alephant-gateway") -> bytes:
    """An OTLP/HTTP JSON `ExportLogsServiceRequest` holding `records` under one resource and scope."""
    return msgspec.json.encode({"resourceLogs": [{
        "resource": {"attributes": [_attr("service.name", service_name)]},
        "scopeLogs": [{"scope": {"name": "alephant.events"}, "logRecords": list(records)}],
    }]})


def otlp_logs_url(url: str) -> str:
    """`{url}/v1/logs` (a URL already ending in `/v1/logs` is kept)."""
    base = url.rstrip("/")
    return base if base.endswith("/v1/logs") else base + "/v1/logs"


# -- S3 -----------------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class S3Target:
    bucket: str
    prefix: str  # without leading or trailing "/"; may be empty


def parse_s3_url(url: str) -> S3Target | None:
    """`s3://bucket/prefix` (the prefix optional) as a bucket and prefix, or None when the bucket
    name is not a valid S3 bucket name or the prefix holds characters S3 keys should not."""
    if not url.startswith("s3://"):
        return None
    bucket, _, prefix = url[len("s3://"):].partition("/")
    prefix = prefix.strip("/")
    if not _BUCKET_RE.match(bucket) or ".." in bucket or not _PREFIX_RE.match(prefix) or "//" in prefix:
        return None
    return S3Target(bucket, prefix)


def s3_object_key(target: S3Target, dest_id: str, year_month_day: str, hour: int, first_seq: int,
                  last_seq: int) -> str:
    """`<prefix>/dt=YYYY-MM-DD/hour=HH/<first_seq>-<last_seq>-<destination id>.ndjson`: the same
    events give the same key, so a redelivered batch overwrites its own object."""
    name = f"dt={year_month_day}/hour={hour:02d}/{first_seq:020d}-{last_seq:020d}-{dest_id}.ndjson"
    return f"{target.prefix}/{name}" if target.prefix else name


def ndjson(bodies: Iterable[bytes]) -> bytes:
    """One event per line. A stored event is one line of JSON already; one that is not (written
    by another publisher with whitespace) is re-encoded compactly."""
    lines = []
    for body in bodies:
        if b"\n" in body or b"\r" in body:
            body = msgspec.json.encode(msgspec.json.decode(body))
        lines.append(body)
    return b"".join(line + b"\n" for line in lines)
