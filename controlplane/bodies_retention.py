"""Retention of archived request bodies: the sweeper that deletes what a workspace no longer keeps.

The data plane archives bodies (`dataplane.bodies`) in the bucket `ALEPHANT_S3_BUCKET` at
`ALEPHANT_S3_URL`, one object per call:

    bodies/<workspace_id>/<YYYY-MM-DD>/<request_id>.json.gz      (the date is the UTC day written)

An object is expired once its whole day is older than the workspace's retention: with `N` =
`retention_days` of the workspace-scoped `LogSettings` (30 when the workspace has none), objects of
day `D` are deleted from day `D + N + 1` (UTC) on, so a body is kept at least `N` days and at most
one day more. A key-scoped setting's `retention_days` is not applied: objects are stored per
workspace, not per key. Keys that do not have that shape are never deleted.

`expired_keys` is the decision (pure); `sweep` lists `bodies/` page by page with the S3 paginator
and deletes expired keys in batches of at most 1000 (`DeleteObjects`); `run_sweeper` sweeps at
start and then every `ALEPHANT_BODY_SWEEP_INTERVAL_S` in the control plane, and
`POST /admin/v1/bodies/sweep` (`alephant bodies sweep`) runs one sweep now. A sweep is idempotent;
two at once (several control planes) only repeat deletes. Its errors are logged by the loop and
never end it.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import msgspec
import structlog
from botocore.exceptions import ClientError
from psycopg_pool import AsyncConnectionPool

from events.archive import open_s3
from schemas.body_archive import PREFIX, parse_key
from schemas.entities import LogSettings
from schemas.settings import Settings

log = structlog.get_logger(__name__)

DEFAULT_RETENTION_DAYS = 30
DELETE_BATCH = 1000  # the most keys one DeleteObjects call takes


# -- the decision (pure) -------------------------------------------------------------------------

def retention_by_workspace(settings: Iterable[LogSettings]) -> dict[str, int]:
    """Workspace id -> retention days, from the workspace-scoped settings (key-scoped ones ignored)."""
    return {s.workspace_id: s.retention_days for s in settings if s.scope == "workspace"}


def expired_keys(keys: Iterable[str], retention: Mapping[str, int], now: dt.datetime,
                 default_days: int = DEFAULT_RETENTION_DAYS) -> list[str]:
    """The keys among `keys` to delete at `now` (an aware datetime): body objects whose day is
    before `now`'s UTC day minus the workspace's retention (`retention`, else `default_days`).
    Malformed keys are kept. Order is preserved."""
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    today = now.astimezone(dt.UTC).date()
    out: list[str] = []
    for key in keys:
        parsed = parse_key(key)
        if parsed is None:
            continue
        workspace, day = parsed
        if day < today - dt.timedelta(days=retention.get(workspace, default_days)):
            out.append(key)
    return out


# -- the store (IO) ------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class SweepResult:
    """`scanned` body-prefix keys listed, `deleted` objects removed, `failed` keys S3 refused to
    delete (retried by the next sweep)."""

    scanned: int = 0
    deleted: int = 0
    failed: int = 0




async def sweep(client: Any, bucket: str, retention: Mapping[str, int], now: dt.datetime,
                default_days: int = DEFAULT_RETENTION_DAYS) -> SweepResult:
    """List `bodies/` in `bucket` page by page and delete the expired keys in batches of at most
    `DELETE_BATCH`. A bucket that does not exist yet holds nothing to sweep. Other S3 errors
    propagate (what was deleted before stays deleted)."""
    scanned = deleted = failed = 0
    batch: list[str] = []

    async def flush() -> None:
        nonlocal deleted, failed, batch
        if not batch:
            return
        resp = await client.delete_objects(Bucket=bucket, Delete={"Objects": [{"Key": k} for k in batch],
                                                                  "Quiet": True})
        errors = resp.get("Errors", [])
        for error in errors[:5]:
            log.warning("body_sweep_delete_failed", key=error.get("Key"), code=error.get("Code"),
                        message=error.get("Message"))
        failed += len(errors)
        deleted += len(batch) - len(errors)
        batch = []

    paginator = client.get_paginator("list_objects_v2")
    try:
        async for page in paginator.paginate(Bucket=bucket, Prefix=PREFIX):
            keys = [o["Key"] for o in page.get("Contents", [])]
            scanned += len(keys)
            # Deleting listed keys does not disturb the listing: the next page starts after them.
            for key in expired_keys(keys, retention, now, default_days):
                batch.append(key)
                if len(batch) >= DELETE_BATCH:
                    await flush()
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") not in ("NoSuchBucket", "404"):
            raise
    await flush()
    return SweepResult(scanned, deleted, failed)


async def load_retention(pool: AsyncConnectionPool[Any]) -> dict[str, int]:
    """Workspace id -> retention days of the live workspace-scoped log settings."""
    async with pool.connection() as conn:
        cur = await conn.execute("SELECT body FROM config_entity WHERE kind = 'logsettings' AND deleted_at IS NULL "
                                 "AND body->>'scope' = 'workspace'")
        rows = await cur.fetchall()
    return retention_by_workspace(msgspec.convert(r[0] | {"kind": "logsettings"}, LogSettings) for r in rows)


async def sweep_once(settings: Settings, pool: AsyncConnectionPool[Any], now: dt.datetime | None = None) -> SweepResult:
    """One sweep of `settings.s3_bucket` with the retention in force now. Raises what Postgres or
    S3 raise."""
    retention = await load_retention(pool)
    async with open_s3(settings) as client:
        result = await sweep(client, settings.s3_bucket, retention, now or dt.datetime.now(dt.UTC))
    log.info("body_sweep_done", scanned=result.scanned, deleted=result.deleted, failed=result.failed)
    return result


async def run_sweeper(settings: Settings, pool: AsyncConnectionPool[Any]) -> None:
    """`sweep_once` at start and then every `settings.body_sweep_interval_s`, until cancelled. A
    failed sweep (S3 or Postgres unreachable) is logged and retried at the next interval."""
    while True:
        try:
            await sweep_once(settings, pool)
        except Exception as exc:  # any store fault: the next round retries; never kill the loop
            log.warning("body_sweep_failed", error=f"{type(exc).__name__}: {exc}")
        await asyncio.sleep(settings.body_sweep_interval_s)
