"""`Idempotency-Key` for the admin API's POST routes (Stripe's semantics, RELIABILITY.md row 19).

A request with a key first claims `(route, key)` in `admin_idempotency` (its own committed row,
so concurrent requests see it), runs the command, and the command writes its response into that
row inside its own transaction (`Claim.record`): the change and its record commit together or not
at all. After propagation the row gets the final status and body (`Claim.finish`).

Outcomes for a later request with the same route and key, for 24 hours:
- same request (method, path and canonical body): the first response, same status and body,
  including a created virtual key's plaintext (stored only as Fernet ciphertext);
- a different request: 422 `idempotency_key_mismatch`;
- the first request still in flight: 409 `idempotency_key_in_use`.
A command that fails (4xx) releases its claim, so a retry runs it again. A claim whose request
died before committing is taken over after `LEASE_S`; the claim token guarantees that at most one
of two such requests can commit.
"""

from __future__ import annotations

import hmac
import re
import uuid
from dataclasses import dataclass
from typing import Any

import msgspec
import psycopg
from psycopg_pool import AsyncConnectionPool

from schemas.errors import Conflict, InvalidRequest
from schemas.keys import KeyRing

HEADER = "Idempotency-Key"
TTL_S = 24 * 3600
# Longer than any admin command takes (they are a few queries and one DNS check).
LEASE_S = 60
_KEY_RE = re.compile(r"^[\x21-\x7e]{1,255}$")

_encoder = msgspec.json.Encoder(order="sorted")
_body_decoder: msgspec.json.Decoder[dict[str, Any]] = msgspec.json.Decoder(dict[str, Any])


@dataclass(frozen=True, slots=True)
class Replay:
    """The stored response of the first request with this key."""

    status: int
    body: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Claim:
    """This request owns `(route, key)` until it records, finishes or releases it."""

    store: IdempotencyStore
    route: str
    key: str
    token: uuid.UUID

    async def record(self, conn: psycopg.AsyncConnection[Any], body: dict[str, Any], status: int = 202) -> None:
        """Inside the command's transaction: store the response it is committing. Raises 409 if
        the claim was taken over (this request outlived its lease), which rolls the command back."""
        cur = await conn.execute(
            "UPDATE admin_idempotency SET status = %s, response = %s "
            "WHERE route = %s AND key = %s AND token = %s",
            (status, self.store.seal(body), self.route, self.key, self.token))
        if cur.rowcount != 1:
            raise _in_use()

    async def finish(self, status: int, body: dict[str, Any]) -> None:
        """After propagation: the final status and body (e.g. 201 instead of the committed 202)."""
        async with self.store.pool.connection() as conn:
            await conn.execute(
                "UPDATE admin_idempotency SET status = %s, response = %s "
                "WHERE route = %s AND key = %s AND token = %s",
                (status, self.store.seal(body), self.route, self.key, self.token))

    async def release(self) -> None:
        """The command failed before committing: forget the claim so a retry runs it again."""
        async with self.store.pool.connection() as conn:
            await conn.execute(
                "DELETE FROM admin_idempotency WHERE route = %s AND key = %s AND token = %s AND status IS NULL",
                (self.route, self.key, self.token))


def _in_use() -> Conflict:
    return Conflict("A request with this Idempotency-Key is still in progress; retry later.", param=HEADER,
                    code="idempotency_key_in_use")


def check_key(value: str) -> str:
    """The header's value, or a 400: 1-255 visible ASCII characters."""
    if not _KEY_RE.match(value):
        raise InvalidRequest(f"{HEADER} must be 1-255 visible ASCII characters.", param=HEADER,
                             code="invalid_idempotency_key")
    return value


class IdempotencyStore:
    def __init__(self, pool: AsyncConnectionPool[Any], keyring: KeyRing) -> None:
        self.pool = pool
        self._keyring = keyring

    def seal(self, body: dict[str, Any]) -> str:
        return self._keyring.encrypt(_encoder.encode(body).decode())

    def fingerprint(self, method: str, path: str, body: Any) -> str:
        """Keyed hash of the request: a body may hold a provider key, so a plain hash could be
        brute-forced from a database dump. `body` is the decoded JSON (key order does not matter)."""
        canonical = _encoder.encode([method, path, body]).decode()
        return self._keyring.hash_key(canonical)

    async def claim(self, route: str, key: str, fingerprint: str) -> Claim | Replay:
        """Claim `(route, key)` for this request, or return the first request's response.

        Raises 422 `idempotency_key_mismatch` (another request used the key) or 409
        `idempotency_key_in_use` (the first request has not finished).
        """
        token = uuid.uuid4()
        async with self.pool.connection() as conn:
            await conn.execute("DELETE FROM admin_idempotency WHERE expires_at < now()")
            for _ in range(3):  # the row may expire or be released between the two statements
                cur = await conn.execute(
                    "INSERT INTO admin_idempotency (route, key, request_hash, token, expires_at) "
                    "VALUES (%s, %s, %s, %s, now() + make_interval(secs => %s)) "
                    "ON CONFLICT (route, key) DO UPDATE SET request_hash = EXCLUDED.request_hash, "
                    "token = EXCLUDED.token, status = NULL, response = NULL, created_at = now(), "
                    "expires_at = EXCLUDED.expires_at "
                    "WHERE admin_idempotency.status IS NULL "
                    "AND admin_idempotency.created_at < now() - make_interval(secs => %s) "
                    "RETURNING token",
                    (route, key, fingerprint, token, TTL_S, LEASE_S))
                if await cur.fetchone() is not None:
                    return Claim(self, route, key, token)
                cur = await conn.execute(
                    "SELECT request_hash, status, response FROM admin_idempotency WHERE route = %s AND key = %s",
                    (route, key))
                row = await cur.fetchone()
                if row is None:
                    continue
                first_hash, status, response = row
                if not hmac.compare_digest(first_hash, fingerprint):
                    raise InvalidRequest(
                        f"This {HEADER} was already used with a different request; use a new key for a new request.",
                        param=HEADER, code="idempotency_key_mismatch", status=422)
                if status is None:
                    raise _in_use()
                return Replay(status, _body_decoder.decode(self._keyring.decrypt(response).reveal()))
        raise _in_use()
