"""`GET /v1/models` (and `GET /v1/models/{id}`): the models a workspace's key may call.

The list itself is pure data (`schemas.catalog.catalog_entries`); each entry's extra
`context_window` field is tolerated by the OpenAI SDKs. `ModelCatalog` caches the rendered body per
workspace while the snapshot's provider, alias, price and router indexes are the same objects: heartbeat
swaps keep them, real config changes rebuild them and so invalidate the cache.
"""

from __future__ import annotations

import msgspec
from aiohttp import web

from dataplane.call import Call
from dataplane.lifecycle import bearer
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
        self._key: tuple[object, object, object, object] | None = None
        self._bodies: dict[str, tuple[bytes, dict[str, ModelEntry]]] = {}

    def _entry(self, snap: Snapshot, workspace_id: str) -> tuple[bytes, dict[str, ModelEntry]]:
        key = (snap.providers, snap.aliases, snap.prices, snap.routers_by_name)
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

    # -- the pipeline endpoint: authenticated and policy-checked like any call; free, so not
    # governed, and only a refusal is recorded.
    name = "models"
    governed = False
    records_success = False

    def credential(self, request: web.Request) -> str:
        return bearer(request)

    async def intake(self, call: Call) -> None:
        return None  # a GET: no body

    def plan(self, call: Call) -> None:
        return None  # lists models; names none

    def set_max_tokens(self, call: Call, value: int) -> bool:
        return True

    def strip_tools(self, call: Call, names: tuple[str, ...]) -> bool:
        return True

    async def dispatch(self, call: Call) -> web.StreamResponse:
        """`GET /v1/models`, or `GET /v1/models/{model}` (the route lets `{model}` contain `/`)."""
        model_id = call.request.match_info.get("model")
        ws = call.vk.workspace_id
        body = self.body(call.snap, ws) if model_id is None else self.model(call.snap, ws, model_id)
        return web.Response(body=body, content_type="application/json", headers={"Alephant-Request-Id":
                                                                                  call.ctx.request_id})
