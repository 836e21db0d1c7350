"""`entities_digest` and `SnapshotStore.digest` (`GET /healthz/snapshot`): equal config gives an
equal digest, whatever the order it arrived in; any change of a key or value changes it; a bucket
dump decoded with `entity_decoder` digests like the snapshot built from it."""

from __future__ import annotations

from dataplane.snapshot import SnapshotStore, entities_digest
from schemas.entities import Workspace, entity_decoder, entity_encoder, kv_key
from schemas.snapshot import Snapshot
from tests.unit.test_snapshot import ALL, WS, entities


def test_order_does_not_matter_and_a_decoded_dump_digests_the_same() -> None:
    forward, backward = entities(*ALL), entities(*reversed(ALL))
    dump = {kv_key(e): entity_decoder.decode(entity_encoder.encode(e)) for e in ALL}
    assert entities_digest(forward) == entities_digest(backward) == entities_digest(dump)


def test_a_changed_value_a_missing_key_or_a_renamed_key_changes_it() -> None:
    base = entities(*ALL)
    renamed_ws = {**base, kv_key(WS): Workspace(id=WS.id, name="renamed")}
    missing = {k: v for k, v in base.items() if k != kv_key(WS)}
    moved = {**missing, kv_key(WS) + "x": WS}
    digests = {entities_digest(d) for d in (base, renamed_ws, missing, moved)}
    assert len(digests) == 4


def test_the_store_reports_the_current_snapshot_and_computes_once_per_snapshot() -> None:
    store = SnapshotStore()
    store.swap(Snapshot.build(entities(*ALL), 7))
    first = store.digest()
    assert first == {"snapshot_revision": 7, "entities": len(ALL), "digest": entities_digest(entities(*ALL))}
    cached = store._digest
    assert store.digest() == first and store._digest is cached
    store.swap(store.current.with_changes({kv_key(WS): None}, 8))
    assert store.digest()["snapshot_revision"] == 8 and store.digest()["digest"] != first["digest"]
