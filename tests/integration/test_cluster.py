"""The multi-node stack (`alephant dev --cluster`, deploy/cluster.py) end to end: a 3-node NATS
cluster with the stream and bucket at R3, two control planes of which exactly one relays the
config outbox, four workers on their own ports, two projectors sharing the ledger consumers.

One cluster for the module (it takes ~20 s to start); the failover test kills the leading control
plane, so it runs last.
"""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import psycopg
import pytest

from deploy.cluster import ClusterStack
from events.jetstream import connect
from tests.conftest import cluster_stack, eventually

# In the fault suite (make test-faults): it starts the whole multi-node stack and kills its relay leader.
pytestmark = [pytest.mark.timeout(300), pytest.mark.fault]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClusterStack]:
    with cluster_stack(Path(tmp_path_factory.mktemp("cluster"))) as stack:
        yield stack


def _get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as resp:
        return json.loads(resp.read())


async def _chat(http: aiohttp.ClientSession, origin: str, key: str) -> aiohttp.ClientResponse:
    async with http.post(f"{origin}/v1/chat/completions", headers={"Authorization": f"Bearer {key}"},
                         json={"model": "mock/echo", "messages": [{"role": "user", "content": "hi"}]}) as resp:
        await resp.read()
        return resp


async def _applied_everywhere(cluster: ClusterStack, revision: int) -> None:
    """Every worker reports a snapshot at or after `revision`."""
    async def check() -> bool | None:
        revisions = [_get_json(f"{o}/healthz")["snapshot_revision"] for o in cluster.worker_origins]
        return True if all(r >= revision for r in revisions) else None

    await eventually(check, timeout=10)


def test_nats_is_a_three_node_cluster_with_r3_stream_and_bucket(cluster: ClusterStack) -> None:
    monitors = cluster.nats_monitor_urls
    assert sorted(monitors) == ["nats-1", "nats-2", "nats-3"]
    for monitor in monitors.values():
        varz = _get_json(f"{monitor}/varz")
        assert varz["jetstream"]["config"]["sync_always"] is True
        assert len(_get_json(f"{monitor}/routez")["routes"]) >= 2  # routes to both other nodes
        assert _get_json(f"{monitor}/jsz")["meta_cluster"]["cluster_size"] == 3
    env = cluster.child_env()
    assert env["ALEPHANT_NATS_URL"].count("nats://") == 3

    async def replicas() -> dict[str, tuple[int, int]]:
        nc = await connect(cluster.nats_url("admin"), "test-cluster")
        try:
            js = nc.jetstream()
            out = {}
            for name in (env.get("ALEPHANT_STREAM", "ALEPHANT_EVENTS"),
                         f"KV_{env.get('ALEPHANT_KV_BUCKET', 'alephant_config')}"):
                info = await js.stream_info(name)
                assert info.cluster is not None
                out[name] = (info.config.num_replicas or 1, 1 + len(info.cluster.replicas or []))
            return out
        finally:
            await nc.close()

    for name, (configured, placed) in asyncio.run(replicas()).items():
        assert (configured, placed) == (3, 3), name


async def test_a_change_on_the_follower_reaches_all_four_workers(cluster: ClusterStack,
                                                                 http: aiohttp.ClientSession) -> None:
    leader = cluster.relay_leader()
    assert leader is not None
    follower = 1 - int(leader.rsplit("-", 1)[1])
    health = [_get_json(f"{u}/admin/v1/healthz") for u in cluster.admin_urls]
    assert [h["leader"] for h in health].count(True) == 1

    started = time.monotonic()
    created = cluster.admin_at(follower).call("POST", "/admin/v1/virtual-keys",
                                              {"workspace_id": "demo", "name": "via-follower"})
    answered_s = time.monotonic() - started
    assert created["propagated"] is True and created["revision"], created
    await _applied_everywhere(cluster, created["revision"])
    for origin in cluster.worker_origins:
        assert (await _chat(http, origin, created["key"])).status == 200, origin
    print(f"follower change answered in {answered_s * 1000:.0f} ms, revision {created['revision']}")


async def test_a_call_on_each_worker_is_in_the_ledger_exactly_once(cluster: ClusterStack,
                                                                   http: aiohttp.ClientSession) -> None:
    key = cluster.demo["ALEPHANT_API_KEY"]
    request_ids = []
    for origin in cluster.worker_origins:
        resp = await _chat(http, origin, key)
        assert resp.status == 200, origin
        request_ids.append(resp.headers["alephant-request-id"])
    database_url = cluster.child_env()["ALEPHANT_DATABASE_URL"]

    async def counts() -> list[int] | None:
        async with await psycopg.AsyncConnection.connect(database_url) as conn:
            cur = await conn.execute(
                "SELECT body->>'request_id', count(*) FROM event_journal WHERE type = 'llm.call' "
                "AND body->>'request_id' = ANY(%s) GROUP BY 1", (request_ids,))
            journal: dict[str, int] = dict(await cur.fetchall())
            cur = await conn.execute(
                "SELECT count(*) FROM (SELECT id FROM ledger_transfer GROUP BY id HAVING count(*) > 1) d")
            duplicates = (await cur.fetchone() or (0,))[0]
        assert duplicates == 0
        return [journal.get(r, 0) for r in request_ids] if len(journal) == len(request_ids) else None

    assert await eventually(counts, timeout=20) == [1, 1, 1, 1]


def test_both_projectors_are_healthy_and_bound(cluster: ClusterStack) -> None:
    for url in cluster.projector_urls:
        assert _get_json(f"{url}/readyz") == {"ready": True}
        health = _get_json(f"{url}/healthz")
        assert health["ok"] is True
        for name in ("ledger", "finance"):
            projection = health["projections"][name]
            assert projection["bound"] is True and projection["lag_events"] >= 0
    # The first one also archives and delivers; the second shares only the projections.
    assert sorted(_get_json(f"{cluster.projector_urls[1]}/healthz")["projections"]) == ["finance", "ledger"]


async def test_a_stopped_leader_is_replaced_and_steps_down_when_resumed(cluster: ClusterStack,
                                                                        http: aiohttp.ClientSession) -> None:
    """SIGSTOP keeps the leader's Postgres session open (and its lock held): the follower ends that
    session once it has been idle past the stall limit (10 s here), takes the lead, and the
    stopped one, resumed, finds its session gone and follows."""
    leader = cluster.relay_leader()
    assert leader is not None
    index = int(leader.rsplit("-", 1)[1])
    survivor_url = cluster.admin_urls[1 - index]
    cluster.procs[leader].pause()
    stopped_at = time.monotonic()
    try:
        async def survivor_leads() -> bool | None:
            return True if _get_json(f"{survivor_url}/admin/v1/healthz")["leader"] else None

        await eventually(survivor_leads, timeout=20, interval=0.2)
        takeover_s = time.monotonic() - stopped_at
        created = cluster.admin_at(1 - index).call("POST", "/admin/v1/virtual-keys",
                                                   {"workspace_id": "demo", "name": "while-stopped"})
        assert created["propagated"] is True, created
        await _applied_everywhere(cluster, created["revision"])
    finally:
        cluster.procs[leader].resume()

    async def one_leader() -> bool | None:
        leaders = [_get_json(f"{u}/admin/v1/healthz")["leader"] for u in cluster.admin_urls]
        return True if leaders == [i != index for i in range(2)] else None

    await eventually(one_leader, timeout=10, interval=0.2)
    print(f"relay takeover from a stopped leader: {takeover_s:.1f} s")


async def test_killing_the_leader_hands_the_relay_over(cluster: ClusterStack, http: aiohttp.ClientSession) -> None:
    leader = cluster.relay_leader()
    assert leader is not None
    survivor = 1 - int(leader.rsplit("-", 1)[1])
    killed_at = time.monotonic()
    cluster.kill(leader)

    async def new_leader() -> str | None:
        return await asyncio.to_thread(cluster.relay_leader)

    assert await eventually(new_leader, timeout=10) == f"controlplane-{survivor}"
    takeover_s = time.monotonic() - killed_at

    created = cluster.admin_at(survivor).call("POST", "/admin/v1/virtual-keys",
                                              {"workspace_id": "demo", "name": f"after-{uuid.uuid4().hex[:6]}"})
    assert created["propagated"] is True, created
    await _applied_everywhere(cluster, created["revision"])
    for origin in cluster.worker_origins:
        assert (await _chat(http, origin, created["key"])).status == 200, origin

    # The killed one comes back as a follower; a change through it still propagates.
    await asyncio.to_thread(cluster.start_controlplane_at, 1 - survivor)
    assert cluster.relay_leader() == f"controlplane-{survivor}"
    again = cluster.admin_at(1 - survivor).call("POST", "/admin/v1/virtual-keys",
                                                {"workspace_id": "demo", "name": "via-restarted"})
    assert again["propagated"] is True, again
    await _applied_everywhere(cluster, again["revision"])
    print(f"relay takeover after SIGKILL of {leader}: {takeover_s:.2f} s")
