"""Admin commands of the response cache: cache settings (see commands.py for how a command is
validated and committed) and the cache purge.

A `CacheSettings` says whether and how calls of a workspace, a virtual key or a router are
answered from the cache (`schemas.entities.CacheSettings`; the data plane's use of it is
`dataplane.cache`). There is one per (workspace, scope, scope id): setting it again replaces it
(its id is derived from that triple, so the scope is fixed once set).

Every refusal is a 400 (404 for a referenced entity that does not exist) whose `param` is the
field: an unknown `mode` (`invalid_mode`) or `scope` (`invalid_scope`), a `ttl_s` outside 1 s..30
days (`invalid_ttl`), a `similarity` outside (0, 1] (`invalid_similarity`), a workspace-scoped
setting whose `scope_id` is not its workspace (`scope_mismatch`), a key or router that does not
exist (404 `virtual_key_not_found` / `router_not_found`) or is another workspace's
(`..._workspace_mismatch`), `semantic` without `embedding_model` (`embedding_model_required`), an
embedding model that is not `provider/model` (`invalid_model`) or whose provider the workspace has
not configured (404 `provider_not_found`), and a `namespace` that is not an id of at most 64
characters or "".

A purge (`DELETE /admin/v1/cache?workspace_id=&namespace=`) writes the `CachePurge` of (workspace,
namespace) with a new `generation` (its time in ms, above the previous one) through the normal
command path, so every worker stops serving older entries once it applies that revision; then it
frees what it can reach, best effort and bounded in time: the Redis keys
`alc:{workspace}:{namespace or "_"}:{older generation}:*` and, with a Qdrant server
(`ALEPHANT_QDRANT_URL`), the points of collections `alephant_cache_d*` whose payload names the
workspace and namespace with an older generation. Storage errors are logged, never raised: the
generation alone already makes the old entries unreachable.
"""

from __future__ import annotations

import asyncio
import re
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, cast, get_args

import msgspec
import psycopg
import structlog
from redis.asyncio import Redis

from controlplane.commands import CommitHook, ConfigCommands, KindSpec, Prior, Write, _builtins, _stable_id
from controlplane.inputs import Command, Ident, ModelRef, now_ms
from controlplane.references import references
from schemas.entities import CacheMode, CachePurge, CacheScope, CacheSettings
from schemas.errors import InvalidRequest, NotFound

if TYPE_CHECKING:
    from qdrant_client import AsyncQdrantClient

log = structlog.get_logger(__name__)

MAX_CACHE_TTL_S = 30 * 86400
CACHE_MODES: tuple[str, ...] = get_args(CacheMode)
CACHE_SCOPES: tuple[str, ...] = get_args(CacheScope)
# The namespace is a segment of a Redis key and of a SCAN pattern: no ':' and no glob characters.
NAMESPACE_RE = re.compile(r"^(?:[A-Za-z0-9][A-Za-z0-9_-]{0,63})?$")
_IDENT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
Namespace = Annotated[str, msgspec.Meta(pattern=NAMESPACE_RE.pattern)]
Word = Annotated[str, msgspec.Meta(max_length=32)]

QDRANT_COLLECTION_PREFIX = "alephant_cache_d"
REDIS_SCAN_COUNT = 1000
REDIS_UNLINK_BATCH = 500
PURGE_STORAGE_BUDGET_S = 5.0  # per store (Redis, Qdrant): the purge answers within about twice this


class SetCacheSettings(Command):
    """The cache setting of `workspace_id` at `scope` (workspace | key | router) `scope_id` (the
    workspace itself, a virtual key id or a router id of that workspace). `mode`: exact | semantic
    | off. `ttl_s`: seconds an answer is kept, 1..2592000 (30 days), default 3600. Semantic:
    `similarity` in (0, 1] (default 0.95) and `embedding_model` (`provider/model`, required, the
    provider configured in the workspace); `exclude_tools` (default true) and
    `exclude_temperature` (default false) keep requests with tools / a non-zero temperature out of
    the cache. `namespace`: partitions the cache (an id of at most 64 characters; "" the default).
    Setting it again for the same (workspace, scope, scope_id) replaces it."""

    workspace_id: Ident
    scope: Word
    scope_id: Ident
    mode: Word
    ttl_s: int = 3600
    similarity: float = 0.95
    embedding_model: ModelRef | None = None
    exclude_tools: bool = True
    exclude_temperature: bool = False
    namespace: Namespace = ""

    def check(self) -> None:
        check_cache_settings(self)


class PatchCacheSettings(Command):
    """Any field but `workspace_id`, `scope` and `scope_id` (they name the setting); null removes
    the embedding model. The result is validated as a create."""

    mode: Word | msgspec.UnsetType = msgspec.UNSET
    ttl_s: int | msgspec.UnsetType = msgspec.UNSET
    similarity: float | msgspec.UnsetType = msgspec.UNSET
    embedding_model: ModelRef | msgspec.UnsetType | None = msgspec.UNSET
    exclude_tools: bool | msgspec.UnsetType = msgspec.UNSET
    exclude_temperature: bool | msgspec.UnsetType = msgspec.UNSET
    namespace: Namespace | msgspec.UnsetType = msgspec.UNSET


def check_cache_settings(cmd: SetCacheSettings) -> None:
    """The rules that need no database; raises InvalidRequest naming the field."""
    if cmd.mode not in CACHE_MODES:
        raise InvalidRequest(f"Unknown cache mode {cmd.mode!r}: 'mode' must be one of {', '.join(CACHE_MODES)}.",
                             param="mode", code="invalid_mode")
    if cmd.scope not in CACHE_SCOPES:
        raise InvalidRequest(f"Unknown cache scope {cmd.scope!r}: 'scope' must be one of {', '.join(CACHE_SCOPES)}.",
                             param="scope", code="invalid_scope")
    if not 1 <= cmd.ttl_s <= MAX_CACHE_TTL_S:
        # A JSON integer may have thousands of digits: not echoed whole.
        got = str(cmd.ttl_s) if abs(cmd.ttl_s) < 10**18 else "a number of more than 18 digits"
        raise InvalidRequest(f"'ttl_s' must be between 1 and {MAX_CACHE_TTL_S} seconds (30 days); got {got}.",
                             param="ttl_s", code="invalid_ttl")
    # `not (0 < x <= 1)` also refuses NaN.
    if not 0 < cmd.similarity <= 1:
        raise InvalidRequest(f"'similarity' must be above 0 and at most 1; got {cmd.similarity!r}.",
                             param="similarity", code="invalid_similarity")
    if cmd.scope == "workspace" and cmd.scope_id != cmd.workspace_id:
        raise InvalidRequest(f"A workspace-scoped cache setting's 'scope_id' is its workspace "
                             f"('{cmd.workspace_id}'); got '{cmd.scope_id}'.", param="scope_id",
                             code="scope_mismatch")
    if cmd.embedding_model is not None:
        provider, slash, model = cmd.embedding_model.partition("/")
        if not slash or not _IDENT_RE.match(provider) or not model:
            raise InvalidRequest(f"'embedding_model' must be 'provider/model' with the provider's name in this "
                                 f"workspace, e.g. 'openai/text-embedding-3-small'; got {cmd.embedding_model!r}.",
                                 param="embedding_model", code="invalid_model")
    elif cmd.mode == "semantic":
        raise InvalidRequest("A semantic cache needs 'embedding_model' ('provider/model', e.g. "
                             "'openai/text-embedding-3-small'): the model that embeds prompts to compare them.",
                             param="embedding_model", code="embedding_model_required")


def cache_settings_id(workspace_id: str, scope: str, scope_id: str) -> str:
    """The id of the one setting of (workspace, scope, scope id): setting it again replaces it."""
    return "cache_" + _stable_id("cache", workspace_id, scope, scope_id)


async def _build(cc: ConfigCommands, cmd: SetCacheSettings, ent_id: str, prior: Prior | None) -> CacheSettings:
    # The scope id and the provider are re-checked in the write's transaction (`references`); the
    # provider here too, for a message that names the model as given.
    if cmd.embedding_model is not None:
        name = cmd.embedding_model.partition("/")[0]
        if await cc.load("provider", f"{cmd.workspace_id}.{name}") is None:
            raise NotFound(f"Workspace '{cmd.workspace_id}' has no provider named '{name}' (in 'embedding_model': "
                           f"{cmd.embedding_model!r}); add it first with POST /admin/v1/providers.",
                           param="embedding_model", code="provider_not_found")
    return CacheSettings(
        id=ent_id, workspace_id=cmd.workspace_id, scope=cast(CacheScope, cmd.scope), scope_id=cmd.scope_id,
        mode=cast(CacheMode, cmd.mode), ttl_s=cmd.ttl_s, similarity=cmd.similarity,
        embedding_model=cmd.embedding_model, exclude_tools=cmd.exclude_tools,
        exclude_temperature=cmd.exclude_temperature, namespace=cmd.namespace)


def _fields(s: CacheSettings) -> dict[str, Any]:
    return _builtins(s, "workspace_id", "scope", "scope_id", "mode", "ttl_s", "similarity", "embedding_model",
                     "exclude_tools", "exclude_temperature", "namespace")


CACHE_SETTINGS = KindSpec("cache", "Cache setting", SetCacheSettings, PatchCacheSettings,
                          lambda c: cache_settings_id(c.workspace_id, c.scope, c.scope_id), _fields, _build,
                          upsert=True)


# ---- purge --------------------------------------------------------------------------------------

def purge_target(workspace_id: str | None, namespace: str | None) -> tuple[str, str]:
    """The query of `DELETE /admin/v1/cache` -> (workspace, namespace); an omitted namespace is
    the default one, "". 400 naming the parameter."""
    if not workspace_id:
        raise InvalidRequest("'workspace_id' is required: the workspace whose cache to purge, as "
                             "DELETE /admin/v1/cache?workspace_id=<id>[&namespace=<ns>].", param="workspace_id",
                             code="missing_parameter")
    if not _IDENT_RE.match(workspace_id):
        raise InvalidRequest(f"'workspace_id' must be an id (letters, digits, '_', '-'; at most 64); got "
                             f"{workspace_id[:64]!r}.", param="workspace_id", code="invalid_parameter")
    ns = namespace or ""
    if not NAMESPACE_RE.match(ns):
        raise InvalidRequest(f"'namespace' must be an id (letters, digits, '_', '-'; at most 64) or empty for the "
                             f"default namespace; got {ns[:64]!r}.", param="namespace", code="invalid_parameter")
    return workspace_id, ns


def purge_id(workspace_id: str, namespace: str) -> str:
    return "cpurge_" + _stable_id("cachepurge", workspace_id, namespace)


def redis_pattern(workspace_id: str, namespace: str) -> str:
    """The SCAN pattern of every exact-cache key of (workspace, namespace), any generation."""
    return f"alc:{workspace_id}:{namespace or '_'}:*"


def next_generation(previous: int | None, now: int) -> int:
    """The purge's time in ms, strictly above the previous generation (clocks may step back)."""
    return now if previous is None or now > previous else previous + 1


@dataclass(frozen=True, slots=True)
class Storage:
    """What a purge frees besides writing the generation: the exact cache's Redis, and a Qdrant
    server's URL (empty: the workers' in-process Qdrant, which the control plane cannot reach)."""

    redis: Redis | None
    qdrant_url: str = ""
    budget_s: float = PURGE_STORAGE_BUDGET_S


async def purge(cc: ConfigCommands, storage: Storage, workspace_id: str, namespace: str,
                on_commit: CommitHook | None = None) -> dict[str, Any]:
    """Commit the new generation of (workspace, namespace) (404 `workspace_not_found` for an
    unknown workspace), then free storage best effort. The body: the `CachePurge` fields,
    `redis_keys_deleted`, `redis_complete` (false: the scan stopped on an error or the time bound;
    the rest expire with their TTL) and `qdrant` (`deleted`, `failed`, or `skipped` without a
    server), plus the usual `revision`, `snapshot_revision` and `propagated`."""
    ent_id = purge_id(workspace_id, namespace)

    async def plan(conn: psycopg.AsyncConnection[Any]) -> tuple[list[Write], dict[str, Any]]:
        # Serialises purges of one (workspace, namespace), so generations strictly increase.
        await conn.execute("SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))", (f"cachepurge/{ent_id}",))
        cur = await conn.execute("SELECT body FROM config_entity WHERE kind = 'cachepurge' AND id = %s", (ent_id,))
        row = await cur.fetchone()
        previous = None if row is None else int(row[0]["generation"])
        entity = CachePurge(id=ent_id, workspace_id=workspace_id, namespace=namespace,
                            generation=next_generation(previous, now_ms()))
        return [Write(entity, "purged", references(entity))], msgspec.to_builtins(entity)

    body = await cc.commit(plan, on_commit)
    generation: int = body["generation"]
    deleted, complete = await _free_redis(storage, workspace_id, namespace, generation)
    qdrant = await _free_qdrant(storage, workspace_id, namespace, generation)
    return body | {"redis_keys_deleted": deleted, "redis_complete": complete, "qdrant": qdrant}


def _older_generation(key: bytes | str, generation: int) -> bool:
    """Whether an exact-cache key (`alc:ws:ns:gen:hash`) is of a generation before `generation`
    (a key a worker stored after the purge is kept)."""
    text = key.decode("utf-8", "replace") if isinstance(key, bytes) else key
    parts = text.split(":")
    return len(parts) < 5 or not parts[3].isdigit() or int(parts[3]) < generation


async def _free_redis(storage: Storage, workspace_id: str, namespace: str, generation: int) -> tuple[int, bool]:
    """(keys deleted, whether the scan finished)."""
    if storage.redis is None:
        return 0, False
    redis = storage.redis
    deleted = 0
    started = time.monotonic()

    async def sweep() -> None:
        nonlocal deleted
        batch: list[bytes | str] = []
        async for key in redis.scan_iter(match=redis_pattern(workspace_id, namespace), count=REDIS_SCAN_COUNT):
            if _older_generation(key, generation):
                batch.append(key)
            if len(batch) >= REDIS_UNLINK_BATCH:
                deleted += int(await redis.unlink(*batch))
                batch = []
        if batch:
            deleted += int(await redis.unlink(*batch))

    try:
        async with asyncio.timeout(storage.budget_s):
            await sweep()
    except Exception as exc:  # best effort: the generation already hides these entries
        log.warning("cache_purge_redis_incomplete", workspace_id=workspace_id, namespace=namespace, deleted=deleted,
                    elapsed_s=round(time.monotonic() - started, 3), error=f"{type(exc).__name__}: {exc}")
        return deleted, False
    return deleted, True


async def _free_qdrant(storage: Storage, workspace_id: str, namespace: str, generation: int) -> str:
    if not storage.qdrant_url:
        return "skipped"
    # Imported here: only a purge with a Qdrant server needs the client.
    from qdrant_client import AsyncQdrantClient

    client = AsyncQdrantClient(url=storage.qdrant_url, timeout=max(1, int(storage.budget_s)),
                               check_compatibility=False)
    try:
        async with asyncio.timeout(storage.budget_s):
            await delete_qdrant_points(client, workspace_id, namespace, generation)
    except Exception as exc:  # best effort, as for Redis
        log.warning("cache_purge_qdrant_failed", workspace_id=workspace_id, namespace=namespace,
                    error=f"{type(exc).__name__}: {exc}")
        return "failed"
    finally:
        try:
            await client.close()
        except Exception as exc:  # closing must not turn a purge into an error
            log.debug("qdrant_close_failed", error=f"{type(exc).__name__}: {exc}")
    return "deleted"


async def delete_qdrant_points(client: AsyncQdrantClient, workspace_id: str, namespace: str,
                               generation: int) -> list[str]:
    """Delete, in every `alephant_cache_d*` collection, the points of (workspace, namespace) stored
    under a generation before `generation`; the collections visited. Raises what the client raises."""
    from qdrant_client import models

    selector = models.FilterSelector(filter=models.Filter(must=[
        models.FieldCondition(key="workspace_id", match=models.MatchValue(value=workspace_id)),
        models.FieldCondition(key="namespace", match=models.MatchValue(value=namespace)),
        models.FieldCondition(key="generation", range=models.Range(lt=generation)),
    ]))
    names = [c.name for c in (await client.get_collections()).collections
             if c.name.startswith(QDRANT_COLLECTION_PREFIX)]
    for name in names:
        await client.delete(name, points_selector=selector)
    return names
