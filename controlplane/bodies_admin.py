"""`GET /admin/v1/requests/{request_id}/body`: one call's archived, redacted bodies (issue 13).

The link from a run timeline item (or a trace, or an access-log line) to what was said: the
request's `llm.call` (or an MCP tool call's `tool.call`) in the event journal names its object (`body_key`, written by
`dataplane.bodies`); the object is read from the archive bucket and answered as JSON. 404
`request_not_found` for a request the journal does not know (in the workspace, when given),
`body_not_archived` when its settings kept metadata only, `body_not_found` when the object is
gone (its retention passed, or its upload was dropped); 409 `body_archive_off` without
`ALEPHANT_S3_URL`.
"""

from __future__ import annotations

import gzip
from typing import Any

import msgspec
from psycopg_pool import AsyncConnectionPool

from schemas.body_archive import split_body_key
from schemas.errors import Conflict, NotFound
from schemas.settings import Settings

_FIND = ("SELECT body->>'body_key' FROM event_journal WHERE type IN ('llm.call', 'tool.call') "
         "AND body->>'request_id' = %s "
         "AND (%s::text IS NULL OR workspace_id = %s) ORDER BY occurred_at DESC LIMIT 1")


async def body_key(pool: AsyncConnectionPool[Any], request_id: str, workspace_id: str | None) -> str:
    """The object key the request's `llm.call` names (see the module docstring for the 404s)."""
    async with pool.connection() as conn:
        cur = await conn.execute(_FIND, (request_id, workspace_id, workspace_id))
        row = await cur.fetchone()
    if row is None:
        raise NotFound(f"No model call with request id '{request_id}' is recorded"
                       + (f" in workspace '{workspace_id}'." if workspace_id else "."), code="request_not_found")
    if not row[0]:
        raise NotFound("This call's log settings kept metadata only: its bodies were not archived.",
                       code="body_not_archived")
    return str(row[0])


async def archived_body(pool: AsyncConnectionPool[Any], settings: Settings, request_id: str,
                        workspace_id: str | None) -> dict[str, Any]:
    if not settings.s3_url:
        raise Conflict("Body archival is off: ALEPHANT_S3_URL is not set.", code="body_archive_off")
    key = await body_key(pool, request_id, workspace_id)
    obj, wanted = split_body_key(key)
    from botocore.exceptions import ClientError

    from events.archive import open_store

    gone = NotFound(f"The archived bodies of '{request_id}' are gone (past their retention, or never uploaded: "
                    "a batch still in its worker's buffer arrives within seconds).", code="body_not_found")
    async with open_store(settings) as store:
        try:
            raw = await store.get(obj)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404", "NoSuchBucket"):
                raise gone from None
            raise
    for line in gzip.decompress(raw).splitlines():
        record: dict[str, Any] = msgspec.json.decode(line)
        if record.get("request_id") == (wanted or request_id):
            return {"object": "request.body", "key": key, **record}
    raise gone
