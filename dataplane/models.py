"""`GET /v1/models` (and `GET /v1/models/{id}`): the models a workspace's key may call.

The list itself is pure data (`schemas.catalog.catalog_entries`); each entry's extra
`context_window` field is tolerated by the OpenAI SDKs. `ModelCatalog` caches the rendered body per
workspace while the snapshot's provider, alias and price indexes are the same objects: heartbeat
swaps keep them, real config changes rebuild them and so invalidate the cache.
"""

from __future__ import annotations

import msgspec
from aiohttp import web

from dataplane.lifecycle import begin
from dataplane.state import WORKER
from schemas.catalog import ModelEntry, ModelEntryList, catalog_entries
from schemas.errors import NotFound
from schemas.snapshot import Snapshot

_encoder = msgspec.json.Encoder()


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
