"""The delivery adapters: how one batch of events reaches a webhook, an OTLP collector or an S3
prefix. Each `send` returns one `Attempt` per item, in order, and never raises for a failed
delivery (an unexpected bug still raises, and the worker restarts).

Errors are described without the URL (webhook URLs often carry tokens in their path) and without
the secret: an HTTP status, a timeout, a refused connection, an S3 error code.

Outbound HTTP goes through `guarded_session`: every address a connection is opened to passes the
SSRF policy again (`schemas.ssrf.AddressPolicy`, the allow list `ALEPHANT_SSRF_ALLOW`), so a name
that resolves to an internal address after the destination was registered (DNS rebinding) is
refused at connect time; redirects are never followed. An allow-listed host name must resolve to
allow-listed addresses too (the local stack allows 127.0.0.1 and ::1 themselves).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import errno
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import aioboto3
import aiohttp
from aiobotocore.config import AioConfig
from botocore.exceptions import BotoCoreError, ClientError
from nats.aio.msg import Msg

from schemas.log_delivery import (
    EVENT_ID_HEADER,
    SIGNATURE_HEADER,
    Envelope,
    Outcome,
    S3Target,
    http_outcome,
    ndjson,
    otlp_logs_body,
    otlp_logs_url,
    otlp_record,
    s3_object_key,
    signature,
)
from schemas.settings import Secret
from schemas.ssrf import AddressPolicy, parse_host_address

USER_AGENT = "alephant-gateway-delivery/1"


@dataclass(frozen=True, slots=True)
class Item:
    """One event to deliver: its stream message, the raw bytes as stored, its envelope, and which
    delivery attempt this is (1-based: JetStream's delivery count)."""

    msg: Msg
    seq: int
    body: bytes
    env: Envelope
    attempt: int
    stored_at: dt.datetime


@dataclass(frozen=True, slots=True)
class Attempt:
    outcome: Outcome
    error: str | None = None  # why it failed; never a URL or a secret


class Sender(Protocol):
    async def send(self, items: Sequence[Item]) -> list[Attempt]: ...


# -- HTTP ------------------------------------------------------------------------------------------

class AddressRefused(OSError):
    def __init__(self, reason: str) -> None:
        super().__init__(errno.EACCES, reason)


def guarded_session(allow: Sequence[str], timeout_s: float) -> aiohttp.ClientSession:
    """A client session whose connector refuses internal addresses (unless allow-listed) at
    connect time, on the exact address dialled. No proxy from the environment: it would dial past
    the guard. The caller closes it."""
    policy = AddressPolicy(allow)

    def socket_factory(addr_info: aiohttp.AddrInfoType) -> socket.socket:
        family, type_, proto, _, sockaddr = addr_info
        addr = parse_host_address(str(sockaddr[0]).partition("%")[0])
        problem = "is not an IP address" if addr is None else policy.refusal(addr)
        if problem is not None:
            raise AddressRefused(f"{sockaddr[0]} {problem}")
        return socket.socket(family=family, type=type_, proto=proto)

    connector = aiohttp.TCPConnector(limit=0, limit_per_host=16, keepalive_timeout=30, ttl_dns_cache=60,
                                     socket_factory=socket_factory)
    return aiohttp.ClientSession(connector=connector, trust_env=False,
                                 timeout=aiohttp.ClientTimeout(total=timeout_s))


def describe(exc: BaseException, timeout_s: float) -> str:
    """A failed request, without the URL aiohttp puts in its messages."""
    if isinstance(exc, TimeoutError):
        return f"timeout after {timeout_s:g} s"
    os_error = getattr(exc, "os_error", None)
    if isinstance(os_error, AddressRefused):
        return "address refused by the SSRF guard"
    if isinstance(os_error, OSError):
        return f"connect error: {os_error.strerror or type(os_error).__name__}"
    return f"request error: {type(exc).__name__}"


async def _post(session: aiohttp.ClientSession, url: str, body: bytes, headers: dict[str, str],
                timeout_s: float) -> Attempt:
    try:
        async with session.post(url, data=body, headers=headers, allow_redirects=False) as resp:
            await resp.read()  # drain, so the connection is reused; bounded by the total timeout
            outcome = http_outcome(resp.status)
            return Attempt(outcome, None if outcome == "delivered" else f"HTTP {resp.status}")
    except (aiohttp.ClientError, TimeoutError, OSError) as exc:
        return Attempt("retry", describe(exc, timeout_s))


class WebhookSender:
    """One POST per event, the event JSON as stored, up to `concurrency` in flight; signed with
    `secret` when the destination has one (`Alephant-Signature`, see `schemas.log_delivery`)."""

    def __init__(self, session: aiohttp.ClientSession, url: str, secret: Secret | None, *, timeout_s: float,
                 concurrency: int) -> None:
        self._session, self._url, self._secret, self._timeout_s = session, url, secret, timeout_s
        self._limit = asyncio.Semaphore(max(1, concurrency))

    async def _one(self, item: Item) -> Attempt:
        headers = {"Content-Type": "application/json", "User-Agent": USER_AGENT, EVENT_ID_HEADER: item.env.event_id,
                   "Alephant-Event-Type": item.env.type}
        async with self._limit:
            if self._secret is not None:
                headers[SIGNATURE_HEADER] = signature(self._secret.reveal(), int(time.time()), item.body)
            return await _post(self._session, self._url, item.body, headers, self._timeout_s)

    async def send(self, items: Sequence[Item]) -> list[Attempt]:
        return list(await asyncio.gather(*(self._one(i) for i in items)))


class OtlpSender:
    """One OTLP/HTTP JSON export of the batch to `{url}/v1/logs` (one logRecord per event); the
    secret, when set, as `Authorization: Bearer`. The batch succeeds or fails as a whole."""

    def __init__(self, session: aiohttp.ClientSession, url: str, secret: Secret | None, *, timeout_s: float) -> None:
        self._session, self._url, self._secret, self._timeout_s = session, otlp_logs_url(url), secret, timeout_s

    async def send(self, items: Sequence[Item]) -> list[Attempt]:
        now_ns = time.time_ns()
        records = [otlp_record(i.env, i.body, _event_time_ns(i), now_ns) for i in items]
        headers = {"Content-Type": "application/json", "User-Agent": USER_AGENT}
        if self._secret is not None:
            headers["Authorization"] = f"Bearer {self._secret.reveal()}"
        result = await _post(self._session, self._url, otlp_logs_body(records), headers, self._timeout_s)
        return [result] * len(items)


def _event_time_ns(item: Item) -> int:
    try:
        when = dt.datetime.fromisoformat(item.env.occurred_at)
    except ValueError:
        when = item.stored_at
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return int(when.timestamp() * 1e9)


# -- S3 --------------------------------------------------------------------------------------------

class S3Sender:
    """The batch as one NDJSON object under the destination's prefix (`s3_object_key`). The batch
    succeeds or fails as a whole; every S3 error is retried (a missing bucket or a denied key may
    be fixed by the operator before the attempts run out)."""

    def __init__(self, client: Any, target: S3Target, dest_id: str) -> None:
        self._s3, self._target, self._dest_id = client, target, dest_id

    async def send(self, items: Sequence[Item]) -> list[Attempt]:
        ordered = sorted(items, key=lambda i: i.seq)
        first = ordered[0].stored_at.astimezone(dt.UTC)
        key = s3_object_key(self._target, self._dest_id, f"{first:%Y-%m-%d}", first.hour, ordered[0].seq,
                            ordered[-1].seq)
        try:
            await self._s3.put_object(Bucket=self._target.bucket, Key=key, Body=ndjson(i.body for i in ordered),
                                      ContentType="application/x-ndjson")
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "unknown")
            return [Attempt("retry", f"S3 error {code}")] * len(items)
        except (BotoCoreError, OSError) as exc:
            return [Attempt("retry", f"S3 error: {type(exc).__name__}")] * len(items)
        return [Attempt("delivered")] * len(items)


def s3_client(endpoint_url: str, region: str, secret: Secret | None, timeout_s: float) -> Any:
    """An aioboto3 S3 client context (`async with`): `endpoint_url` (empty: AWS), path-style
    addressing, the destination's `access_key_id:secret_access_key` or the AWS variables."""
    config = AioConfig(s3={"addressing_style": "path"}, retries={"max_attempts": 1, "mode": "standard"},
                       connect_timeout=timeout_s, read_timeout=timeout_s)
    creds: dict[str, str] = {}
    if secret is not None:
        key_id, _, key = secret.reveal().partition(":")
        creds = {"aws_access_key_id": key_id, "aws_secret_access_key": key}
    return aioboto3.Session().client("s3", endpoint_url=endpoint_url or None, region_name=region, config=config,
                                     **creds)
