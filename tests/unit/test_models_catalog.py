"""schemas/catalog.py and dataplane/models.py: the per-workspace model list, its context windows, and its cache."""

from __future__ import annotations

import dataclasses
from typing import Any

import aiohttp
import msgspec
import openai
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from dataplane.models import ModelCatalog
from dataplane.pipeline import run
from dataplane.snapshot import SnapshotStore
from dataplane.state import WORKER, WorkerState
from schemas.catalog import catalog_entries, catalog_models
from schemas.entities import ModelAlias, PriceOverride, Provider, VirtualKey, kv_key
from schemas.errors import NotFound
from schemas.http import error_middleware
from schemas.keys import KeyRing
from schemas.settings import Secret, Settings
from schemas.snapshot import Snapshot
from tests.unit.conftest import Recorder


def snapshot(*extra: Any, revision: int = 1) -> Snapshot:
    entities: list[Any] = [
        Provider(id="ws.mock", workspace_id="ws", name="mock", type="mock"),
        Provider(id="ws.oai", workspace_id="ws", name="oai", type="openai"),
        Provider(id="ws.ds", workspace_id="ws", name="ds", type="deepseek"),
        Provider(id="other.secret", workspace_id="other", name="secret", type="openai"),
        ModelAlias(id="a1", workspace_id="ws", alias="smart", target="ds/deepseek-chat"),
        ModelAlias(id="a2", workspace_id="other", alias="theirs", target="secret/gpt-4o"),
        PriceOverride(id="p1", provider="oai", model="my-finetune", input_per_mtok_nanos=1),
        *extra,
    ]
    return Snapshot.build({kv_key(e): e for e in entities}, revision)


def test_entries_per_workspace_with_context_windows() -> None:
    entries = {e.id: e for e in catalog_entries(snapshot(), "ws")}
    assert next(iter(entries)) == "smart"  # aliases first
    assert entries["smart"].owned_by == "ds"
    deepseek_ctx = dict(catalog_models("deepseek"))["deepseek-chat"]
    assert deepseek_ctx and entries["smart"].context_window == deepseek_ctx
    assert entries["ds/deepseek-chat"].context_window == deepseek_ctx
    assert "oai/my-finetune" in entries and entries["oai/my-finetune"].context_window is None
    assert {"mock/echo", "mock/fixed", "mock/embed"} <= set(entries)
    assert len([m for m in entries if m.startswith("oai/")]) == len(catalog_models("openai")) + 1
    assert not any(m.startswith("secret/") or m == "theirs" for m in entries)
    assert catalog_entries(snapshot(), "nobody") == []


def test_json_shape_is_an_openai_model_list_with_an_optional_context_window() -> None:
    body = msgspec.json.decode(ModelCatalog().body(snapshot(), "ws"))
    assert body["object"] == "list"
    by_id = {m["id"]: m for m in body["data"]}
    assert by_id["mock/echo"] == {"id": "mock/echo", "object": "model", "created": 0, "owned_by": "mock"}
    assert by_id["ds/deepseek-chat"]["context_window"] > 0


def test_cache_survives_heartbeats_and_follows_config_changes() -> None:
    catalog = ModelCatalog()
    snap = snapshot()
    first = catalog.body(snap, "ws")
    beat = dataclasses.replace(snap, revision=snap.revision + 1, heartbeat_ms=123)
    assert catalog.body(beat, "ws") is first  # same indexes: no rebuild
    changed = snapshot(ModelAlias(id="a3", workspace_id="ws", alias="fast", target="oai/gpt-4o-mini"), revision=3)
    second = catalog.body(changed, "ws")
    assert second is not first and b'"fast"' in second


def test_cache_is_bounded() -> None:
    catalog = ModelCatalog(max_workspaces=2)
    snap = snapshot()
    for ws in ("a", "b", "c", "ws"):
        catalog.body(snap, ws)
    assert len(catalog._bodies) <= 2


def test_retrieve_one_model() -> None:
    catalog = ModelCatalog()
    one = msgspec.json.decode(catalog.model(snapshot(), "ws", "ds/deepseek-chat"))
    assert one["id"] == "ds/deepseek-chat" and one["object"] == "model"
    with pytest.raises(NotFound):
        catalog.model(snapshot(), "ws", "secret/gpt-4o")


async def test_handlers_serve_the_sdk() -> None:
    secret = Secret("unit-test-master-secret-0123456789")
    keyring = KeyRing(secret)
    store = SnapshotStore()
    vk = VirtualKey(id="vk_1", workspace_id="ws", key_hash=keyring.hash_key("sk-alph-models"))
    store.swap(snapshot(vk))
    store.ready.set()
    catalog = ModelCatalog()
    async with aiohttp.ClientSession() as session:
        app = web.Application(middlewares=[error_middleware])
        app[WORKER] = WorkerState(settings=Settings(secret_key=secret), keyring=keyring, store=store,
                                  events=Recorder(), session=session)

        async def models(request: web.Request) -> web.StreamResponse:
            return await run(request, catalog)

        app.router.add_get("/v1/models", models)
        app.router.add_get("/v1/models/{model:.+}", models)
        async with TestClient(TestServer(app, host="127.0.0.1")) as client:
            sdk = openai.AsyncOpenAI(base_url=str(client.make_url("/v1")), api_key="sk-alph-models", max_retries=0)
            try:
                listed = [m async for m in sdk.models.list()]
                one = await sdk.models.retrieve("ds/deepseek-chat")
                with pytest.raises(openai.NotFoundError):
                    await sdk.models.retrieve("secret/gpt-4o")
            finally:
                await sdk.close()
    assert "mock/echo" in {m.id for m in listed}
    assert one.id == "ds/deepseek-chat" and (one.model_extra or {}).get("context_window")
