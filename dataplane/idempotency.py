"""`RedisIdempotencyStore`: the data plane's `Idempotency-Key` records, fleet-wide in Redis (the
`dataplane.ports.IdempotencyStore` port; `POST /v1/alephant/spend` uses it).

One HASH per `(workspace, key id, Idempotency-Key)`, in the workspace's hash-tag slot like every
governance key (`schemas.budget_keys.workspace_tag`); the Idempotency-Key itself is stored only
as its SHA-256, so a key of any printable form makes a bounded Redis key:

    gov:{<ws>}:idem:<key_id>:<sha256(idempotency key)>   HASH
        state  in_flight | done
        fp     the request's fingerprint (the caller's keyed hash of the canonical request)
        token  the claiming request's random token
        status, body   the done request's answer (HTTP status, response bytes)

Lifetimes are the key's expiry: an in-flight record lives `lease_s` (a request whose worker died
frees its key after that), a done one `ttl_s` (24 h by default) from its completion. Each step is
one Lua script, so a claim, a completion and a release are atomic against each other:

* claim: no record -> write it in flight (this token) and answer `claimed`; a record of the same
  token (a retried command whose first reply was lost) -> `claimed` again; in flight -> `in_flight`
  whatever its fingerprint; done -> `replay` (same fingerprint, with the answer) or `mismatch`.
* complete: only while the record's token is this request's (not once its lease lapsed and
  another request claimed the key).
* release: only an in-flight record of this token.

Faults: every Redis error or timeout is logged and answered as `unavailable` / False; nothing
raises. Each operation is bounded by `timeout_s` per socket read and `3 * timeout_s` in all.
Releases run off the request path (`release` schedules them; `flush` and `close` wait for them).
"""

from __future__ import annotations

import asyncio
import hashlib
import secrets
from typing import Any

import structlog
from redis.asyncio import Redis
from redis.exceptions import RedisError

from dataplane.ports import IdempotencyClaim
from schemas.budget_keys import workspace_tag

log = structlog.get_logger(__name__)

DEFAULT_TTL_S = 24 * 3600
# Longer than a spend takes (two Redis round trips and a spooled event), short enough that a key
# whose worker died mid-request is usable again within a minute.
DEFAULT_LEASE_S = 60

_CLAIM = """
local rec = redis.call('HMGET', KEYS[1], 'state', 'fp', 'token', 'status', 'body')
if not rec[1] then
  redis.call('HSET', KEYS[1], 'state', 'in_flight', 'fp', ARGV[2], 'token', ARGV[1])
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
  return {'claimed'}
end
if rec[1] == 'in_flight' then
  if rec[3] == ARGV[1] then return {'claimed'} end
  return {'in_flight'}
end
if rec[2] ~= ARGV[2] then return {'mismatch'} end
return {'replay', rec[4], rec[5]}
"""

_COMPLETE = """
if redis.call('HGET', KEYS[1], 'token') ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'state', 'done', 'status', ARGV[2], 'body', ARGV[3])
redis.call('PEXPIRE', KEYS[1], ARGV[4])
return 1
"""

_RELEASE = """
local rec = redis.call('HMGET', KEYS[1], 'state', 'token')
if rec[1] == 'in_flight' and rec[2] == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

_FAULTS = (RedisError, OSError, TimeoutError, ValueError)


def record_key(workspace_id: str, key_id: str, idempotency_key: str) -> str:
    """The Redis key of one record (ValueError for a workspace id that cannot be a hash tag)."""
    digest = hashlib.sha256(idempotency_key.encode()).hexdigest()
    return f"{workspace_tag(workspace_id)}:idem:{key_id}:{digest}"


class RedisIdempotencyStore:
    """See the module docstring. One per worker; `close()` waits for queued releases and closes
    the client when the store made it (`url`)."""

    def __init__(self, redis: Redis | str, *, timeout_s: float = 1.0, ttl_s: int = DEFAULT_TTL_S,
                 lease_s: int = DEFAULT_LEASE_S) -> None:
        self._owns = isinstance(redis, str)
        self._redis = Redis.from_url(redis, socket_timeout=timeout_s, socket_connect_timeout=timeout_s) \
            if isinstance(redis, str) else redis
        self._deadline_s = 3 * timeout_s
        self._ttl_ms, self._lease_ms = ttl_s * 1000, lease_s * 1000
        self._claim = self._redis.register_script(_CLAIM)
        self._complete = self._redis.register_script(_COMPLETE)
        self._release = self._redis.register_script(_RELEASE)
        self._pending: set[asyncio.Task[None]] = set()

    async def _run(self, script: Any, key: str, *args: str | int | bytes) -> Any:
        async with asyncio.timeout(self._deadline_s):
            return await script(keys=[key], args=list(args))

    async def claim(self, workspace_id: str, key_id: str, idempotency_key: str, fingerprint: str) -> IdempotencyClaim:
        token = secrets.token_hex(16)
        try:
            reply = await self._run(self._claim, record_key(workspace_id, key_id, idempotency_key),
                                    token, fingerprint, self._lease_ms)
        except _FAULTS as exc:
            log.warning("idempotency_store_unavailable", op="claim", error=type(exc).__name__)
            return IdempotencyClaim(outcome="unavailable")
        outcome = reply[0].decode()
        if outcome == "claimed":
            return IdempotencyClaim(outcome="claimed", token=token)
        if outcome == "replay":
            return IdempotencyClaim(outcome="replay", status=int(reply[1]), body=bytes(reply[2]))
        return IdempotencyClaim(outcome="mismatch" if outcome == "mismatch" else "in_flight")

    async def complete(self, workspace_id: str, key_id: str, idempotency_key: str, token: str, status: int,
                       body: bytes) -> bool:
        try:
            done = await self._run(self._complete, record_key(workspace_id, key_id, idempotency_key),
                                   token, status, body, self._ttl_ms)
        except _FAULTS as exc:
            log.warning("idempotency_store_unavailable", op="complete", error=type(exc).__name__)
            return False
        return bool(done)

    def release(self, workspace_id: str, key_id: str, idempotency_key: str, token: str) -> None:
        task = asyncio.get_running_loop().create_task(self._release_now(workspace_id, key_id, idempotency_key, token))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _release_now(self, workspace_id: str, key_id: str, idempotency_key: str, token: str) -> None:
        try:
            await self._run(self._release, record_key(workspace_id, key_id, idempotency_key), token)
        except _FAULTS as exc:  # the lease ends the claim instead
            log.warning("idempotency_store_unavailable", op="release", error=type(exc).__name__)

    async def flush(self) -> None:
        """Wait for the releases queued so far (each is bounded by the operation deadline)."""
        if self._pending:
            await asyncio.wait(set(self._pending), timeout=self._deadline_s)

    async def close(self) -> None:
        await self.flush()
        if self._owns:
            await self._redis.aclose()
