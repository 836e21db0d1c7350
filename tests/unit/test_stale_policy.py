"""The staleness gate every model call passes (`SnapshotStore.pin`) and its health and log facts."""

from __future__ import annotations

import asyncio

import pytest
from structlog.testing import capture_logs

from dataplane.snapshot import SnapshotStore
from schemas.entities import HEARTBEAT_KEY, Heartbeat
from schemas.errors import UpstreamError
from schemas.snapshot import Snapshot

NOW = 1_700_000_000.0


def _store(beat_age_s: float | None, *, refuse: bool = False, stale_after_s: float = 5.0) -> SnapshotStore:
    entities = {} if beat_age_s is None else {HEARTBEAT_KEY: Heartbeat(ts_ms=int((NOW - beat_age_s) * 1000))}
    store = SnapshotStore(stale_after_s=stale_after_s, refuse_stale=refuse)
    store.swap(Snapshot.build(entities, 7))
    store.ready.set()
    return store


@pytest.mark.parametrize("refuse", [False, True])
def test_fresh_snapshot_is_served_and_not_counted(refuse: bool) -> None:
    store = _store(1.0, refuse=refuse)
    assert store.pin(NOW) is store.current
    assert store.served_stale == 0
    assert store.status(int(NOW * 1000))["stale"] is False


@pytest.mark.parametrize("age", [5.001, 60.0, None])
def test_serve_policy_serves_a_stale_snapshot_and_counts_it(age: float | None) -> None:
    store = _store(age)
    for _ in range(3):
        assert store.pin(NOW) is store.current
    status = store.status(int(NOW * 1000))
    assert (status["stale"], status["stale_policy"], status["served_while_stale"]) == (True, "serve", 3)


@pytest.mark.parametrize("age", [5.001, None])
def test_refuse_policy_answers_503_config_stale(age: float | None) -> None:
    store = _store(age, refuse=True)
    with pytest.raises(UpstreamError) as info:
        store.pin(NOW)
    assert (info.value.status, info.value.code) == (503, "config_stale")
    assert store.served_stale == 0
    assert store.status(int(NOW * 1000))["stale_policy"] == "refuse"


def test_the_boundary_is_the_same_as_healthz() -> None:
    store = _store(5.0, refuse=True)
    store.pin(NOW)  # exactly stale_after_s old is still fresh, as in status()
    assert store.status(int(NOW * 1000))["stale"] is False
    later = NOW + 0.01  # just past the bound: stale for the gate and for /healthz alike
    with pytest.raises(UpstreamError):
        store.pin(later)
    assert store.status(int(later * 1000))["stale"] is True


async def test_stale_log_line_at_most_once_per_period_then_fresh() -> None:
    store = _store(None, stale_after_s=5.0)  # no heartbeat at all: stale against any clock
    with capture_logs() as logs:
        task = asyncio.create_task(store.report_staleness(every_s=3600, poll_s=0.01))
        await asyncio.sleep(0.1)
        store.pin(NOW)
        store.swap(Snapshot.build({HEARTBEAT_KEY: Heartbeat(ts_ms=10**15)}, 8))  # far-future beat: fresh
        await asyncio.sleep(0.1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    events = [e["event"] for e in logs]
    assert events == ["snapshot_stale", "snapshot_fresh"]
    assert logs[0]["policy"] == "serve" and logs[0]["heartbeat_age_s"] is None
    assert logs[1]["served_while_stale"] == 1
