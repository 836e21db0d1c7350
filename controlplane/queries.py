"""Finance read queries over the projected ledger (Postgres)."""

from __future__ import annotations

from typing import Any, get_args

import msgspec
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool

from schemas.catalog import catalog_entries, type_catalog
from schemas.entities import ConfigEntity, ProviderKind
from schemas.errors import NotFound
from schemas.money import nanos_to_decimal_str
from schemas.snapshot import Snapshot


async def run_summary(pool: AsyncConnectionPool[Any], run_id: str, workspace_id: str | None) -> dict[str, Any]:
    """Totals for one run across workspaces (or one workspace): requests, tokens, cost."""
    async with pool.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(
            """
            SELECT count(*) AS workspaces, coalesce(sum(requests), 0) AS requests, coalesce(sum(errors), 0) AS errors,
                   coalesce(sum(input_tokens), 0) AS input_tokens, coalesce(sum(output_tokens), 0) AS output_tokens,
                   coalesce(sum(cost_nanos), 0) AS cost_nanos, min(first_at) AS first_at, max(last_at) AS last_at,
                   array(SELECT DISTINCT a FROM run_usage r2, unnest(r2.agents) a
                         WHERE r2.run_id = %(run)s AND (%(ws)s::text IS NULL OR r2.workspace_id = %(ws)s)
                         ORDER BY a) AS agents
            FROM run_usage WHERE run_id = %(run)s AND (%(ws)s::text IS NULL OR workspace_id = %(ws)s)
            """,
            {"run": run_id, "ws": workspace_id},
        )
        row = await cur.fetchone()
    if row is None or row["workspaces"] == 0:
        raise NotFound(f"No calls recorded for run '{run_id}' yet.", code="run_not_found")
    cost = int(row["cost_nanos"])
    return {
        "run_id": run_id,
        "requests": int(row["requests"]),
        "errors": int(row["errors"]),
        "input_tokens": int(row["input_tokens"]),
        "output_tokens": int(row["output_tokens"]),
        "cost_nanos": cost,
        "cost_usd": nanos_to_decimal_str(cost),
        "agents": list(row["agents"]),
        "first_at": row["first_at"].isoformat() if row["first_at"] else None,
        "last_at": row["last_at"].isoformat() if row["last_at"] else None,
    }


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
