"""Postgres access shared by the control plane and the projectors: pools and migrations.

Migrations are the numbered `migrations/*.sql` files, each applied once, in order, inside one
transaction under an advisory lock, so concurrent starters never race.
"""

from __future__ import annotations

from importlib import resources

import psycopg
from psycopg_pool import AsyncConnectionPool

_MIGRATION_LOCK = 0x616C6570  # "alep"


def _migration_files() -> list[tuple[str, str]]:
    folder = resources.files("events") / "migrations"
    files = sorted((p.name, p.read_text()) for p in folder.iterdir() if p.name.endswith(".sql"))
    return files


async def migrate(database_url: str) -> list[str]:
    """Apply pending migrations; return the names applied. Idempotent and safe to run concurrently."""
    applied: list[str] = []
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations "
            "(name text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
        )
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
            cur = await conn.execute("SELECT name FROM schema_migrations")
            done = {row[0] for row in await cur.fetchall()}
            for name, sql in _migration_files():
                if name in done:
                    continue
                await conn.execute(sql.encode())
                await conn.execute("INSERT INTO schema_migrations (name) VALUES (%s)", (name,))
                applied.append(name)
    return applied


def open_pool(database_url: str, *, min_size: int = 1, max_size: int = 8) -> AsyncConnectionPool:
    """A pool that is opened by the caller (`await pool.open()`) inside its cleanup context."""
    return AsyncConnectionPool(database_url, min_size=min_size, max_size=max_size, open=False)
