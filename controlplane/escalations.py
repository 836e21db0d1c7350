"""Escalations: calls a policy held for an admin's decision (`escalate_over_usd`).

The data plane refuses such a call with `escalation_required` and an escalation id, and emits a
`policy.decision` event (outcome "escalate"); the ledger projector folds it into the `escalation`
table as `pending` (events/projector.py). Here an admin lists, approves or rejects them:

- approve: `pending` -> `approved`, and in the SAME transaction an `EscalationGrant` config entity
  (id = the escalation id) goes through the normal command path, so every worker's snapshot gets
  it; the key may then retry once with `Alephant-Escalation-Id: <id>` until `expires_at`
  (single use is enforced by the data plane in Redis);
- reject: `pending` -> `rejected` (no config change).
Deciding an escalation that is not pending is 409 `escalation_not_pending`; an unknown id is 404
`escalation_not_found`.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Sequence
from typing import Annotated, Any

import msgspec
import psycopg
from psycopg.rows import dict_row
from redis.asyncio import Redis
from redis.exceptions import RedisError

from controlplane.commands import ACTOR, CommitHook, ConfigCommands, Write, public_view
from controlplane.inputs import Command, iso_ms, now_ms
from schemas.budget_keys import escalation_key
from schemas.entities import EscalationGrant
from schemas.errors import Conflict, NotFound

DEFAULT_GRANT_TTL_S = 900
MAX_GRANT_TTL_S = 7 * 86400
# The table also allows "used" for a later sweep; today use shows as the `used` field.
STATUSES: tuple[str, ...] = ("pending", "approved", "rejected")
# A grant's id becomes a KV key (`escalation.<id>`): only ids a KV key can carry are approvable.
_KV_SAFE = re.compile(r"^[A-Za-z0-9_-]{1,128}$")
# Approving also deletes up to this many grants expired for over GRANT_GC_AFTER_MS, so the
# workers' snapshots do not accumulate them.
GRANT_GC_BATCH = 100
GRANT_GC_AFTER_MS = 60_000
# Constant column list (no input): the f-strings below interpolate only this.
_COLUMNS = ("id, workspace_id, key_id, agent_id, run_id, request_id, rule, scope, scope_id, model, endpoint, "
            "message, status, created_at, decided_at, decided_by, expires_at")


class ApproveEscalation(Command):
    """The grant admits one retry within `ttl_s` seconds of the approval (default 900)."""

    ttl_s: Annotated[int, msgspec.Meta(ge=1, le=MAX_GRANT_TTL_S)] = DEFAULT_GRANT_TTL_S


class RejectEscalation(Command):
    pass


def _view(row: dict[str, Any]) -> dict[str, Any]:
    return {k: v.isoformat() if isinstance(v, dt.datetime) else v for k, v in row.items()}


def _now_iso() -> str:
    return dt.datetime.now(dt.UTC).isoformat()


class Escalations:
    """Rows carry `used` for an approved escalation whose grant is live: whether its one retry
    happened (from the data plane's Redis marker); null when unknown (not approved, expired, or
    Redis unreachable)."""

    def __init__(self, commands: ConfigCommands, redis: Redis | None = None) -> None:
        self._commands = commands
        self._redis = redis

    async def _with_use(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        now = dt.datetime.now(dt.UTC)
        live = [r for r in rows if r["status"] == "approved" and r["expires_at"] is not None and r["expires_at"] > now]
        for r in rows:
            r["used"] = None
        if live and self._redis is not None:
            # One GET each in a plain pipeline: the keys carry different workspaces' hash tags.
            pipe = self._redis.pipeline(transaction=False)
            for r in live:
                pipe.exists(escalation_key(r["workspace_id"], r["id"]))
            try:
                found = await pipe.execute()
            except (RedisError, OSError, TimeoutError):
                return rows
            for r, hit in zip(live, found, strict=True):
                r["used"] = bool(hit)
        return rows

    async def list(self, workspace_id: str | None, status: str | None, limit: int = 500) -> list[dict[str, Any]]:
        """Newest first, at most `limit`."""
        async with self._commands.pool.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
            await cur.execute(
                f"SELECT {_COLUMNS} FROM escalation WHERE (%(ws)s::text IS NULL OR workspace_id = %(ws)s) "  # noqa: S608
                "AND (%(st)s::text IS NULL OR status = %(st)s) ORDER BY created_at DESC, id LIMIT %(n)s",
                {"ws": workspace_id, "st": status, "n": limit})
            rows = await cur.fetchall()
        return [_view(r) for r in await self._with_use(rows)]

    async def get(self, escalation_id: str) -> dict[str, Any]:
        async with self._commands.pool.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
            await cur.execute(f"SELECT {_COLUMNS} FROM escalation WHERE id = %s", (escalation_id,))  # noqa: S608
            row = await cur.fetchone()
        if row is None:
            raise NotFound(f"No escalation with id '{escalation_id}'.", code="escalation_not_found")
        return _view((await self._with_use([row]))[0])

    async def _pending(self, conn: psycopg.AsyncConnection[Any], escalation_id: str) -> dict[str, Any]:
        async with conn.cursor(row_factory=dict_row) as cur:
            await cur.execute(f"SELECT {_COLUMNS} FROM escalation WHERE id = %s FOR UPDATE",  # noqa: S608
                              (escalation_id,))
            row = await cur.fetchone()
        if row is None:
            raise NotFound(f"No escalation with id '{escalation_id}'.", code="escalation_not_found")
        if row["status"] != "pending":
            raise Conflict(f"Escalation '{escalation_id}' is already {row['status']}; only a pending one can be "
                           "decided.", code="escalation_not_pending")
        return row

    async def approve(self, escalation_id: str, cmd: ApproveEscalation,
                      on_commit: CommitHook | None = None) -> dict[str, Any]:
        async def plan(conn: psycopg.AsyncConnection[Any]) -> tuple[Sequence[Write], dict[str, Any]]:
            row = await self._pending(conn, escalation_id)
            if not row["key_id"] or not _KV_SAFE.match(escalation_id):
                raise Conflict(f"Escalation '{escalation_id}' names no virtual key (or its id cannot be a config "
                               "key), so no grant can be issued; reject it instead.", code="escalation_not_grantable")
            expires_ms = now_ms() + cmd.ttl_s * 1000
            await conn.execute(
                "UPDATE escalation SET status = 'approved', decided_at = now(), decided_by = %s, "
                "expires_at = to_timestamp(%s / 1000.0) WHERE id = %s", (ACTOR.get(), expires_ms, escalation_id))
            grant = EscalationGrant(id=escalation_id, workspace_id=row["workspace_id"], key_id=row["key_id"],
                                    rule=row["rule"], expires_at_ms=expires_ms)
            body = _view(row) | {"status": "approved", "used": False, "decided_at": _now_iso(),
                                 "decided_by": ACTOR.get(), "expires_at": iso_ms(expires_ms),
                                 "grant": public_view(grant)}
            return [Write(grant, "approved"), *await _expired_grants(conn)], body
        return await self._commands.commit(plan, on_commit)

    async def reject(self, escalation_id: str, on_commit: CommitHook | None = None) -> dict[str, Any]:
        """No config changes, so nothing to propagate: `propagated` is true and the revision is the
        control plane's current one."""
        async with self._commands.pool.connection() as conn, conn.transaction():
            row = await self._pending(conn, escalation_id)
            await conn.execute("UPDATE escalation SET status = 'rejected', decided_at = now(), decided_by = %s "
                               "WHERE id = %s", (ACTOR.get(), escalation_id))
            body = _view(row) | {"status": "rejected", "decided_at": _now_iso(), "decided_by": ACTOR.get()}
            if on_commit is not None:
                await on_commit(conn, body | {"propagated": False, "snapshot_revision": None, "revision": None})
        rev = self._commands.relay.last_revision or None
        return body | {"propagated": True, "snapshot_revision": rev, "revision": rev}


async def _expired_grants(conn: psycopg.AsyncConnection[Any]) -> list[Write]:
    """Deletes of grants long expired (any workspace), skipping rows another approval holds."""
    cur = await conn.execute(
        "SELECT body FROM config_entity WHERE kind = 'escalation' AND deleted_at IS NULL "
        "AND (body->>'expires_at_ms')::bigint < %s ORDER BY id LIMIT %s FOR UPDATE SKIP LOCKED",
        (now_ms() - GRANT_GC_AFTER_MS, GRANT_GC_BATCH))
    return [Write(msgspec.convert(r[0], EscalationGrant), "expired", delete=True) for r in await cur.fetchall()]
