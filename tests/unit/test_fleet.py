"""schemas/fleet.py (the roster of worker beats, the /admin/v1/fleet body) and dataplane/fleet.py
(the peer count and this worker's beat)."""

from __future__ import annotations

from dataplane.fleet import Beacon, FleetView
from dataplane.snapshot import SnapshotStore
from events.jetstream import role_permissions
from schemas.entities import Heartbeat
from schemas.fleet import FleetRoster, WorkerBeat, beat_decoder, beat_encoder, fleet_report, fleet_subject
from schemas.snapshot import Snapshot

T0 = 1_700_000_000_000


def beat(worker: str, revision: int = 7, ts_ms: int = T0) -> WorkerBeat:
    return WorkerBeat(worker_id=worker, pid=1, host="h", applied_revision=revision, stale=False,
                      heartbeat_age_s=0.5, started_at_ms=T0 - 1000, ts_ms=ts_ms)


def test_the_subject_is_outside_the_event_stream() -> None:
    assert fleet_subject("events") == "events-fleet.heartbeat"
    assert not fleet_subject("events").startswith("events.")


def test_roster_keeps_the_newest_beat_per_worker_and_forgets_the_silent() -> None:
    roster = FleetRoster()
    roster.observe(beat("w1", 5, T0), T0)
    roster.observe(beat("w1", 6, T0 + 1000), T0 + 1000)
    roster.observe(beat("w1", 4, T0 + 500), T0 + 1100)  # late, older beat: ignored
    roster.observe(beat("w2", 6, T0), T0)
    assert [(s.beat.worker_id, s.beat.applied_revision) for s in roster.live(T0 + 1100, 30)] == [("w1", 6), ("w2", 6)]
    assert [s.beat.worker_id for s in roster.live(T0 + 5500, 5)] == ["w1"]
    assert roster.live(T0 + 5500, 30) == roster.live(T0 + 5500, 5)  # w2 is forgotten, not only hidden


def test_age_is_by_the_receivers_clock() -> None:
    roster = FleetRoster()
    roster.observe(beat("w1", ts_ms=T0 + 3_600_000), T0)  # a sender an hour ahead
    assert roster.live(T0 + 2000, 30)[0].age_s(T0 + 2000) == 2.0


def test_fleet_report_shape() -> None:
    roster = FleetRoster()
    roster.observe(beat("w1", 9), T0)
    roster.observe(beat("w0", 8), T0 - 40_000)
    assert fleet_report(roster, 9, T0 + 1500) == {"revision": 9, "workers": [
        {"worker_id": "w1", "host": "h", "pid": 1, "applied_revision": 9, "stale": False,
         "last_heartbeat_ms": T0, "age_s": 1.5}]}


def test_view_size_is_at_least_one_and_counts_live_peers() -> None:
    view = FleetView(live_within_s=5)
    assert view.size() == 1
    view.observe(beat("w1"), T0)
    view.observe(beat("w2"), T0)
    view.observe(beat("w3"), T0 + 100)
    assert view.size() == 3
    view.refresh(T0 + 5050)
    assert view.size() == 1  # only w3 is recent
    view.refresh(T0 + 60_000)
    assert view.size() == 1


def test_beacon_reports_the_applied_revision_and_staleness() -> None:
    store = SnapshotStore(stale_after_s=15)
    store.swap(Snapshot.build({"meta.heartbeat": Heartbeat(ts_ms=T0)}, 42))
    store.ready.set()
    clock = iter([T0 - 5, T0 + 2000, T0 + 60_000])
    beacon = Beacon(store, clock_ms=lambda: next(clock))
    fresh = beacon.beat()
    assert (fresh.applied_revision, fresh.stale, fresh.heartbeat_age_s, fresh.ts_ms) == (42, False, 2.0, T0 + 2000)
    assert beacon.beat().stale
    assert beat_decoder.decode(beat_encoder.encode(fresh)) == fresh


def test_a_swap_signals_the_beacon() -> None:
    store = SnapshotStore()
    assert not store.swapped.is_set()
    store.swap(Snapshot.empty())
    assert store.swapped.is_set()


def test_beats_tolerate_unknown_fields() -> None:
    body = beat_encoder.encode(beat("w1"))[:-1] + b',"added_later":1}'
    assert beat_decoder.decode(body) == beat("w1")


def test_bus_roles_may_use_the_fleet_subject_as_the_design_says() -> None:
    names = {"stream": "S", "kv_bucket": "b", "subject_prefix": "events"}
    subject = fleet_subject("events")
    dataplane, controlplane = role_permissions("dataplane", **names), role_permissions("controlplane", **names)
    projector = role_permissions("projector", **names)
    assert subject in dataplane["publish"] and subject in dataplane["subscribe"]
    assert subject in controlplane["subscribe"] and subject not in controlplane["publish"]
    assert subject not in projector["publish"] + projector["subscribe"]

