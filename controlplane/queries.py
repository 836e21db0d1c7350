"""Finance read queries over the projected ledger (Postgres)."""

from __future__ import annotations

from typing import Any, get_args

import msgspec
from psycopg_pool import AsyncConnectionPool

from controlplane.finance import run_detail
from schemas.catalog import catalog_entries, type_catalog
from schemas.entities import ConfigEntity, ProviderKind
from schemas.snapshot import Snapshot


async def run_summary(pool: AsyncConnectionPool[Any], run_id: str, workspace_id: str | None) -> dict[str, Any]:
    """One run's counts and money from the finance projection (`controlplane.finance.run_detail`):
    `cost_*` is the total (llm + tool + payments out), with each part, revenue, margin, cache
    savings, estimated cost, agents and outcome. 404 `run_not_found` until its first event."""
    return await run_detail(pool, run_id, workspace_id)


async def ledger_balance(pool: AsyncConnectionPool[Any]) -> dict[str, Any]:
    """Per currency: total debits, total credits, and whether they are equal."""
    async with pool.connection() as conn:
        cur = await conn.execute(
            "SELECT currency, coalesce(sum(debits_posted), 0), coalesce(sum(credits_posted), 0) "
            "FROM ledger_account GROUP BY currency ORDER BY currency"
        )
        rows = await cur.fetchall()
    return {
        "currencies": [
            {"currency": c, "debits_nanos": int(d), "credits_nanos": int(cr), "balanced": d == cr} for c, d, cr in rows
        ]
    }


async def workspace_models(pool: AsyncConnectionPool[Any], workspace_id: str) -> dict[str, Any]:
    """What `GET /v1/models` shows a key of this workspace, computed from Postgres state with the
    data plane's own pure catalog function, so the two can never disagree."""
    async with pool.connection() as conn:
        cur = await conn.execute(
            "SELECT kv_key, body FROM config_entity WHERE deleted_at IS NULL "
            "AND (workspace_id = %s OR kind = 'price')", (workspace_id,))
        rows = await cur.fetchall()
    entities = {key: msgspec.convert(body, ConfigEntity) for key, body in rows}
    models = catalog_entries(Snapshot.build(entities, 0), workspace_id)
    return {"object": "list", "workspace_id": workspace_id, "data": msgspec.to_builtins(models)}


def provider_catalog() -> dict[str, Any]:
    """Every provider type this gateway can call, with the models and context windows it knows."""
    return {"object": "list", "data": [{"type": kind, "models": type_catalog(kind)} for kind in get_args(ProviderKind)]}
