"""schemas/snapshot.py (immutable indexes over the config entities) and dataplane/snapshot.py (KV entry
application)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from nats.js.kv import KV_DEL, KV_PURGE
from structlog.testing import capture_logs

from dataplane.snapshot import _apply
from schemas.entities import (
    Agent,
    ConfigEntity,
    Heartbeat,
    ModelAlias,
    PriceOverride,
    Provider,
    VirtualKey,
    Workspace,
    entity_encoder,
    kv_key,
)
from schemas.snapshot import Snapshot

WS = Workspace(id="ws_1", name="one")
AGENT = Agent(id="agent_1", workspace_id="ws_1", name="bot")
PROVIDER = Provider(id="prov_1", workspace_id="ws_1", name="mock", type="mock")
VK = VirtualKey(id="vk_1", workspace_id="ws_1", key_hash="ab" * 32, agent_id="agent_1")
ALIAS = ModelAlias(id="al_1", workspace_id="ws_1", alias="cheap", target="mock/fixed")
PRICE = PriceOverride(id="price_1", provider="mock", model="echo", input_per_mtok_nanos=5)
BEAT = Heartbeat(ts_ms=1_700_000_000_000)
ALL: list[ConfigEntity] = [WS, AGENT, PROVIDER, VK, ALIAS, PRICE, BEAT]


def entities(*ents: ConfigEntity) -> dict[str, ConfigEntity]:
    return {kv_key(e): e for e in ents}


# --- Snapshot.build ----------------------------------------------------------------------------


def test_build_indexes_every_kind() -> None:
    snap = Snapshot.build(entities(*ALL), 42)
    assert snap.revision == 42
    assert snap.keys_by_hash == {VK.key_hash: VK}
    assert snap.workspaces == {"ws_1": WS}
    assert snap.agents == {"agent_1": AGENT}
    assert snap.providers == {("ws_1", "mock"): PROVIDER}
    assert snap.aliases == {("ws_1", "cheap"): ALIAS}
    assert snap.prices == {("mock", "echo"): PRICE}
    assert snap.heartbeat_ms == BEAT.ts_ms
    assert len(snap.entities) == len(ALL)


def test_providers_are_indexed_per_workspace() -> None:
    other = Provider(id="prov_2", workspace_id="ws_2", name="mock", type="openai")
    snap = Snapshot.build(entities(PROVIDER, other), 1)
    assert snap.providers[("ws_1", "mock")] is PROVIDER
    assert snap.providers[("ws_2", "mock")] is other


def test_empty_snapshot() -> None:
    snap = Snapshot.empty()
    assert snap.revision == 0
    assert snap.heartbeat_ms is None
    assert not snap.entities
    assert not snap.keys_by_hash


def test_snapshot_is_immutable_and_detached_from_its_source() -> None:
    source = entities(*ALL)
    snap = Snapshot.build(source, 1)
    source.clear()
    assert len(snap.entities) == len(ALL)
    with pytest.raises(TypeError):
        snap.workspaces["ws_x"] = WS  # type: ignore[index]
    with pytest.raises(TypeError):
        snap.entities["x"] = WS  # type: ignore[index]
    with pytest.raises(AttributeError):
        snap.revision = 2  # type: ignore[misc]


# --- _apply ------------------------------------------------------------------------------------


def test_apply_puts_decoded_entities() -> None:
    staging: dict[str, ConfigEntity] = {}
    for ent in ALL:
        _apply(staging, kv_key(ent), None, entity_encoder.encode(ent))
    assert staging == entities(*ALL)


def test_apply_replaces_an_existing_key() -> None:
    staging = entities(WS)
    renamed = Workspace(id="ws_1", name="renamed")
    _apply(staging, "ws.ws_1", "PUT", entity_encoder.encode(renamed))
    assert staging["ws.ws_1"] == renamed


@pytest.mark.parametrize("op", [KV_DEL, KV_PURGE])
def test_apply_deletes_on_del_and_purge(op: str) -> None:
    staging = entities(WS, PROVIDER)
    _apply(staging, kv_key(PROVIDER), op, b"")
    assert staging == entities(WS)
    _apply(staging, "never.there", op, None)  # deleting a missing key is not an error
    assert staging == entities(WS)


def test_apply_deletes_even_if_a_tombstone_has_a_value() -> None:
    staging = entities(WS)
    _apply(staging, "ws.ws_1", KV_DEL, entity_encoder.encode(WS))
    assert staging == {}


@pytest.mark.parametrize(
    "value",
    [
        b"{not json",
        b'{"kind": "unknown_kind", "id": "x"}',
        b'{"kind": "ws"}',
        b"[]",
        b'{"kind": "ws", "id": 5, "name": "x"}',
    ],
)
def test_apply_skips_invalid_entries_and_logs(value: bytes) -> None:
    staging = entities(WS)
    with capture_logs() as logs:
        _apply(staging, "ws.ws_2", None, value)
        _apply(staging, "ws.ws_1", None, value)  # a bad update keeps the last good value
    assert staging == entities(WS)
    assert [entry["event"] for entry in logs] == ["snapshot_entry_invalid"] * 2
    assert logs[0]["key"] == "ws.ws_2"


def test_apply_tolerates_unknown_fields() -> None:
    staging: dict[str, ConfigEntity] = {}
    _apply(staging, "ws.ws_1", None, b'{"kind": "ws", "id": "ws_1", "name": "one", "added_later": 1}')
    assert staging == entities(WS)


ops = st.lists(
    st.tuples(st.sampled_from(ALL), st.sampled_from([None, "PUT", KV_DEL, KV_PURGE])),
    max_size=40,
)


@given(history=ops)
def test_apply_matches_last_write_wins_model(history: list[tuple[ConfigEntity, str | None]]) -> None:
    staging: dict[str, ConfigEntity] = {}
    model: dict[str, ConfigEntity] = {}
    for ent, op in history:
        key = kv_key(ent)
        _apply(staging, key, op, entity_encoder.encode(ent))
        if op in (KV_DEL, KV_PURGE):
            model.pop(key, None)
        else:
            model[key] = ent
    assert staging == model
    snap = Snapshot.build(staging, len(history))
    assert len(snap.entities) == len(model)
    assert (snap.heartbeat_ms is not None) == (kv_key(BEAT) in model)
