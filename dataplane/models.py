"""`GET /v1/models` (and `GET /v1/models/{id}`): the models a workspace's key may call.

Per workspace provider: the models the operator registered (price overrides, aliases), then the
bundled genai-prices catalog for the provider's type, as `provider/model` ids. Each entry carries
`context_window` where the catalog knows it; that extra field is tolerated by the OpenAI SDKs.

Building the list is pure (`catalog_entries`). `ModelCatalog` caches the rendered body per
workspace while the snapshot's provider, alias and price indexes are the same objects: heartbeat
swaps keep them, real config changes rebuild them and so invalidate the cache.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any, Literal

import msgspec
from aiohttp import web

from dataplane.lifecycle import begin
from dataplane.pricing import catalog_models
from dataplane.providers.mock import EMBEDDING_MODELS as MOCK_EMBEDDING_MODELS
from dataplane.providers.mock import MODELS as MOCK_MODELS
from dataplane.snapshot import Snapshot
from dataplane.state import WORKER
from schemas.errors import NotFound


class ModelEntry(msgspec.Struct, kw_only=True, omit_defaults=True):
    """An OpenAI model object plus `context_window` (omitted when unknown)."""

    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    context_window: int | None = None


class ModelEntryList(msgspec.Struct, kw_only=True):
    object: Literal["list"]
    data: list[ModelEntry]


_encoder = msgspec.json.Encoder()


@functools.lru_cache(maxsize=64)
def _catalog(provider_type: str) -> tuple[tuple[str, int | None], ...]:
    if provider_type == "mock":
        return tuple((m, None) for m in (*MOCK_MODELS, *MOCK_EMBEDDING_MODELS))
    return catalog_models(provider_type)


@functools.lru_cache(maxsize=64)
def _context_windows(provider_type: str) -> Mapping[str, int]:
    return {model: ctx for model, ctx in _catalog(provider_type) if ctx}


def catalog_entries(snap: Snapshot, workspace_id: str) -> list[ModelEntry]:
    """Aliases, operator-priced models and catalog models of the workspace's providers, first
    occurrence of each id wins. Pure: a function of the snapshot and the bundled catalog."""
    entries: dict[str, ModelEntry] = {}

    def add(model_id: str, owner: str, provider_type: str | None, upstream_model: str) -> None:
        if model_id not in entries:
            ctx = _context_windows(provider_type).get(upstream_model) if provider_type else None
            entries[model_id] = ModelEntry(id=model_id, object="model", created=0, owned_by=owner,
                                           context_window=ctx)

    providers = {name: p for (ws, name), p in snap.providers.items() if ws == workspace_id}
    for (ws, alias), ent in sorted(snap.aliases.items()):
        if ws == workspace_id:
            owner, _, upstream = ent.target.partition("/")
            target = providers.get(owner)
            add(alias, owner, target.type if target else None, upstream)
    for name, provider in sorted(providers.items()):
        for pname, model in sorted(snap.prices):
            if pname == name:
                add(f"{name}/{model}", name, provider.type, model)
        for model, _ctx in _catalog(provider.type):
            add(f"{name}/{model}", name, provider.type, model)
    return list(entries.values())


def type_catalog(provider_type: str) -> list[dict[str, Any]]:
    """The models the bundled catalog (or a built-in provider) knows for a provider type."""
    return [{"id": model, "context_window": ctx} for model, ctx in _catalog(provider_type)]


class ModelCatalog:
    """Rendered `/v1/models` bodies, cached per workspace for the current config indexes.

    One per app (no module state). Bounded: the cache is cleared when it would exceed
    `max_workspaces` entries. Not thread-safe; used from the event loop only."""

    def __init__(self, max_workspaces: int = 10_000) -> None:
        self._max = max_workspaces
        self._key: tuple[object, object, object] | None = None
        self._bodies: dict[str, tuple[bytes, dict[str, ModelEntry]]] = {}

    def _entry(self, snap: Snapshot, workspace_id: str) -> tuple[bytes, dict[str, ModelEntry]]:
        key = (snap.providers, snap.aliases, snap.prices)
        if self._key is None or any(a is not b for a, b in zip(key, self._key, strict=True)):
            self._key, self._bodies = key, {}
        cached = self._bodies.get(workspace_id)
        if cached is None:
            entries = catalog_entries(snap, workspace_id)
            if len(self._bodies) >= self._max:
                self._bodies.clear()
            cached = self._bodies[workspace_id] = (
                _encoder.encode(ModelEntryList(object="list", data=entries)), {e.id: e for e in entries})
        return cached

    def body(self, snap: Snapshot, workspace_id: str) -> bytes:
        """The JSON list body for the workspace (`{"object": "list", "data": [...]}`)."""
        return self._entry(snap, workspace_id)[0]

    def model(self, snap: Snapshot, workspace_id: str, model_id: str) -> bytes:
        """One model object as JSON, or NotFound (404 model_not_found)."""
        entry = self._entry(snap, workspace_id)[1].get(model_id)
        if entry is None:
            raise NotFound(f"The model '{model_id}' does not exist.", param="model")
        return _encoder.encode(entry)

    async def list_handler(self, request: web.Request) -> web.Response:
        """`GET /v1/models`."""
        rec = begin(request, request.app[WORKER])
        return web.Response(body=self.body(rec.snap, rec.vk.workspace_id), content_type="application/json",
                            headers={"Alephant-Request-Id": rec.ctx.request_id})

    async def retrieve_handler(self, request: web.Request) -> web.Response:
        """`GET /v1/models/{model}` (the route must let `{model}` contain `/`)."""
        rec = begin(request, request.app[WORKER])
        body = self.model(rec.snap, rec.vk.workspace_id, request.match_info["model"])
        return web.Response(body=body, content_type="application/json",
                            headers={"Alephant-Request-Id": rec.ctx.request_id})
