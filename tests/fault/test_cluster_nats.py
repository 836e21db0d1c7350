"""NATS faults on the multi-node stack (issue 14, part 4; RELIABILITY rows 4, 8, 9 and 20).

One cluster for the module (deploy/cluster.py: 3 NATS nodes with the stream and bucket at R3, 2
control planes, 4 workers, 2 projectors). Every test runs light load of its own (`Load`: a few
clients calling `mock/echo` with the demo key across the workers, one run id, every answered
`Alephant-Request-Id` recorded), heals its fault, and ends with the same proof: every answered
request's `llm.call` is in the ledger (`event_journal`) exactly once, nothing journalled that was
not answered, every worker's spool drained, and `alephant ledger reconcile` clean (balances,
accounts, references, transfers, finance, no gaps against the stream). Each prints its figures:
served, events published (the workers' `/healthz` counters, every kind), `llm.call` events in the
ledger, differences (missing + duplicated + unexpected), asserted to be 0.

1. A NATS node SIGKILLed under load, the event stream's leader (`stream_info().cluster.leader`),
   then restarted.
2. All three NATS nodes SIGSTOPped for `ALEPHANT_FAULT_NATS_PAUSE_S` seconds (default 60, the
   issue's figure; CI may set less): the workers keep answering from their snapshots and spool,
   and the spools drain after SIGCONT.
3. One worker partitioned from NATS: an extra worker whose only NATS link runs through a relay in
   the test (`Link`); `cut()` stops moving bytes both ways with the connections left open, as a
   network partition does (pausing a NATS node instead would also partition every other client
   of that node, the control planes included). The worker reports `stale` and keeps serving; a
   key created meanwhile is live on the other workers and not on it; after `heal()` it applies
   the change and is fresh again. The cut lasts `ALEPHANT_FAULT_PARTITION_S` (default 8 s: the
   worker is stale after 3 s; row 8's 60 s shows nothing more and costs the suite a minute).
4. Watcher reset: the extra worker's ordered consumer on the config bucket is deleted and the NATS
   node that held it SIGKILLed (a restarted node restores its consumers, and a consumer silent for
   less than two idle heartbeats is waited for, so a kill alone does not make the watcher reset);
   a burst of 22 config changes (creates, renames, revokes) is made meanwhile, the node comes
   back. Then, with the control planes paused so the bucket holds still, every worker's
   `/healthz/snapshot` (revision and digest of its entities) equals a full `kv.keys()`/`get` dump
   of the bucket digested the same way, and the worker follows the bucket on a new consumer.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import nats.errors
import psycopg
import pytest

from dataplane.snapshot import entities_digest
from deploy.cluster import ClusterStack
from deploy.services import free_port
from events.jetstream import connect
from schemas.entities import ConfigEntity, entity_decoder
from schemas.settings import load_settings
from tests.conftest import cluster_stack, eventually

# The all-NATS pause (test 2); the issue says 60 s. Every other test takes 15-30 s.
PAUSE_S = float(os.environ.get("ALEPHANT_FAULT_NATS_PAUSE_S", "60"))
# How long the partitioned worker stays cut off, at least (RELIABILITY row 8 says 60 s).
PARTITION_S = float(os.environ.get("ALEPHANT_FAULT_PARTITION_S", "8"))
CLIENTS = 4
CALL_GAP_S = 0.05  # per client: light load, ~60 req/s in all
EDGE_STALE_AFTER_S = 3.0  # the extra worker's ALEPHANT_STALE_AFTER_S (default 15)

pytestmark = [pytest.mark.fault, pytest.mark.timeout(180 + 2 * max(PAUSE_S, PARTITION_S))]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClusterStack]:
    with cluster_stack(Path(tmp_path_factory.mktemp("cluster-nats"))) as stack:
        yield stack


# ---- load and the ledger proof -------------------------------------------------------------------
@dataclass
class Load:
    """`CLIENTS` clients calling chat completions on `mock/echo` with the demo key, each going round
    `origins` with `CALL_GAP_S` between calls, all under one `Alephant-Run-Id`, from entering the
    `async with` to leaving it. `answered` maps each request id answered 200 to (monotonic time,
    origin); `failed` lists every other outcome."""

    origins: list[str]
    key: str
    run_id: str = field(default_factory=lambda: f"fault-{uuid.uuid4().hex[:10]}")
    answered: dict[str, tuple[float, str]] = field(default_factory=dict)
    failed: list[str] = field(default_factory=list)
    _stop: asyncio.Event = field(default_factory=asyncio.Event)
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)

    async def __aenter__(self) -> Load:
        self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=15))
        self._tasks = [asyncio.create_task(self._client(i)) for i in range(CLIENTS)]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)
        await self._http.close()

    def between(self, start: float, end: float, origin: str | None = None) -> int:
        return sum(1 for at, o in self.answered.values() if start <= at <= end and origin in (None, o))

    async def _client(self, n: int) -> None:
        headers = {"Authorization": f"Bearer {self.key}", "Alephant-Run-Id": self.run_id}
        i = n
        while not self._stop.is_set():
            origin = self.origins[i % len(self.origins)]
            body = {"model": "mock/echo", "messages": [{"role": "user", "content": f"client {n} call {i}"}]}
            try:
                async with self._http.post(f"{origin}/v1/chat/completions", json=body, headers=headers) as resp:
                    await resp.read()
                    if resp.status == 200:
                        self.answered[resp.headers["Alephant-Request-Id"]] = (time.monotonic(), origin)
                    else:
                        self.failed.append(f"{origin} {resp.status}")
            except (aiohttp.ClientError, TimeoutError) as exc:
                self.failed.append(f"{origin} {type(exc).__name__}")
            i += CLIENTS
            await asyncio.sleep(CALL_GAP_S)


async def _get(url: str) -> Any:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http, http.get(url) as resp:
        return await resp.json()


async def _published(origins: list[str]) -> int:
    return sum([int((await _get(f"{o}/healthz"))["events_published"]) for o in origins])


async def _journalled(database_url: str, run_id: str) -> dict[str, int]:
    """request id -> number of `llm.call` rows journalled for it, for the run."""
    async with await psycopg.AsyncConnection.connect(database_url) as conn:
        cur = await conn.execute("SELECT body->>'request_id', count(*) FROM event_journal "
                                 "WHERE type = 'llm.call' AND body->>'run_id' = %s GROUP BY 1", (run_id,))
        return {str(r): int(c) for r, c in await cur.fetchall()}


async def prove_ledger(cluster: ClusterStack, load: Load, origins: list[str], published_before: int,
                       label: str, timeout: float = 60.0) -> None:
    """Wait until `origins` have no event pending and every answered request is journalled (up to
    `timeout`), print the figures, and assert: differences 0, no failed call, the ledger reconciles."""
    async def drained() -> bool | None:
        pending = [int((await _get(f"{o}/healthz"))["events_pending"]) for o in origins]
        return True if not any(pending) else None

    await eventually(drained, timeout=timeout, interval=0.25)
    database_url = cluster.child_env()["ALEPHANT_DATABASE_URL"]

    async def complete() -> dict[str, int] | None:
        rows = await _journalled(database_url, load.run_id)
        return rows if set(load.answered) <= set(rows) else None

    with contextlib.suppress(pytest.fail.Exception):
        await eventually(complete, timeout=timeout, interval=0.25)
    rows = await _journalled(database_url, load.run_id)
    published = await _published(origins) - published_before
    missing = len(set(load.answered) - set(rows))
    duplicated = sum(count - 1 for count in rows.values())
    unexpected = len(set(rows) - set(load.answered))
    differences = missing + duplicated + unexpected
    print(f"{label}: served {len(load.answered)}, events published {published}, "
          f"in ledger {sum(rows.values())}, differences {differences} "
          f"(missing {missing}, duplicated {duplicated}, unexpected {unexpected}); failed calls {len(load.failed)}")
    problems = await reconcile_problems(cluster)
    assert load.answered, "nothing was served: the test proves nothing"
    assert differences == 0
    assert load.failed == []
    assert problems == []


async def reconcile_problems(cluster: ClusterStack) -> list[tuple[str, str]]:
    """`alephant ledger reconcile --json` as an operator runs it against the stack (its ops.env):
    the (check, summary) of every finding that is a problem."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ALEPHANT_", "AWS_"))}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "deploy.cli", "--state-dir", str(cluster.state_dir), "ledger", "reconcile", "--json",
        env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode in (0, 1), err.decode()
    report = json.loads(out)
    return [(f["check"], f["summary"]) for f in report["findings"] if f["status"] == "problem"]


async def _nats_healthy(cluster: ClusterStack) -> None:
    async def check() -> bool | None:
        for monitor in cluster.nats_monitor_urls.values():
            try:
                async with aiohttp.ClientSession() as http, http.get(f"{monitor}/healthz") as resp:
                    if resp.status != 200:
                        return None
            except aiohttp.ClientError:
                return None
        return True

    await eventually(check, timeout=60, interval=0.25)


async def _stream_leader(cluster: ClusterStack, stream: str) -> str:
    """The node leading `stream` (asked until one answers: right after a kill there may be none)."""
    nc = await connect(cluster.nats_url("admin"), "alephant-fault-tests")
    try:
        async def leader() -> str | None:
            try:
                info = await nc.jetstream().stream_info(stream)
            except (nats.errors.Error, TimeoutError):
                return None
            return str(info.cluster.leader) if info.cluster is not None and info.cluster.leader else None

        return await eventually(leader, timeout=30, interval=0.5)
    finally:
        await nc.close()


def _sigkill(cluster: ClusterStack, node: str) -> None:
    proc = cluster.services[node].proc
    assert proc is not None and proc.poll() is None, node
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)


# ---- 1. a node killed under load, the stream leader ----------------------------------------------
async def test_stream_leader_killed_under_load_loses_nothing(cluster: ClusterStack) -> None:
    origins = cluster.worker_origins
    stream = load_settings(cluster.child_env()).stream
    before = await _published(origins)
    async with Load(origins, cluster.demo["ALEPHANT_API_KEY"]) as load:
        await asyncio.sleep(2)
        leader = await _stream_leader(cluster, stream)
        await asyncio.to_thread(_sigkill, cluster, leader)
        killed_at = time.monotonic()
        await asyncio.sleep(4)  # served meanwhile: the survivors elect a leader, the publishers retry
        new_leader = await _stream_leader(cluster, stream)
        await asyncio.to_thread(cluster.services[leader].restart)
        restarted_at = time.monotonic()
        await _nats_healthy(cluster)
        await asyncio.sleep(1)
    print(f"stream leader {leader} SIGKILLed, new leader {new_leader}; served while it was down "
          f"{load.between(killed_at, restarted_at)}, restarted in {time.monotonic() - restarted_at:.1f} s")
    assert new_leader != leader
    await prove_ledger(cluster, load, origins, before, "nats stream leader killed")


# ---- 2. all of NATS paused -----------------------------------------------------------------------
async def test_all_nats_paused_serving_continues_and_the_spool_drains(cluster: ClusterStack) -> None:
    """All three nodes SIGSTOPped for PAUSE_S (ALEPHANT_FAULT_NATS_PAUSE_S, default 60)."""
    origins = cluster.worker_origins
    before = await _published(origins)
    nodes = cluster.nats_services
    async with Load(origins, cluster.demo["ALEPHANT_API_KEY"]) as load:
        await asyncio.sleep(1)
        paused_at = time.monotonic()
        try:
            for svc in nodes:
                svc.pause()
            await asyncio.sleep(PAUSE_S)
            pending = [int((await _get(f"{o}/healthz"))["events_pending"]) for o in origins]
        finally:
            for svc in nodes:
                svc.resume()
        resumed_at = time.monotonic()
        await _nats_healthy(cluster)
        await asyncio.sleep(1)
    during = load.between(paused_at, resumed_at)
    print(f"all NATS paused {PAUSE_S:.0f} s: served during the pause {during}, spooled at its end {sum(pending)} "
          f"({pending}), healthy again {time.monotonic() - resumed_at:.1f} s after SIGCONT")
    assert during > 0 and all(p > 0 for p in pending)
    await prove_ledger(cluster, load, origins, before, "all nats paused", timeout=90)


# ---- the extra worker behind a link the test can cut ---------------------------------------------
class Link:
    """A TCP relay on 127.0.0.1 to one NATS node: a worker's network link. `cut()` stops moving
    bytes both ways (connections stay open, nothing is refused: what a client sees of a network
    partition); `heal()` moves them again. A closed side closes the other."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self._open = asyncio.Event()
        self._open.set()
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    def cut(self) -> None:
        self._open.clear()

    def heal(self) -> None:
        self._open.set()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await self._open.wait()
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.close()
            return
        for src, dst in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.create_task(self._pump(src, dst))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pump(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        try:
            while True:
                await self._open.wait()
                data = await src.read(65536)
                if not data:
                    break
                await self._open.wait()  # read before the cut: held, as the network would
                dst.write(data)
                await dst.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            dst.close()


@contextlib.asynccontextmanager
async def edge_worker(cluster: ClusterStack, node: str) -> AsyncIterator[tuple[str, Link]]:
    """An extra worker (`dataplane-edge`, its own port and spool slot) whose NATS URL is a `Link`
    to `node`, stale after EDGE_STALE_AFTER_S; yields its origin and the link. Stopped (SIGTERM,
    it drains its spool) on exit, the link healed first."""
    link = Link(int(cluster.services[node].url.rsplit(":", 1)[1]))
    await link.start()
    port = free_port()
    origin = f"http://127.0.0.1:{port}"
    svc = cluster.spawn("dataplane-edge", "dataplane", env={
        "ALEPHANT_NATS_URL": f"nats://127.0.0.1:{link.port}", "ALEPHANT_PORT": str(port),
        "ALEPHANT_STALE_AFTER_S": str(EDGE_STALE_AFTER_S)})
    try:
        async def ready() -> bool | None:
            assert not svc.exited(), f"dataplane-edge exited (log: {svc.log})"
            try:
                return True if (await _get(f"{origin}/healthz"))["stale"] is False else None
            except aiohttp.ClientError:
                return None

        await eventually(ready, timeout=60, interval=0.2)
        yield origin, link
    finally:
        link.heal()
        await asyncio.to_thread(svc.stop, 15)
        await link.close()


async def _call(origin: str, key: str) -> int:
    body = {"model": "mock/echo", "messages": [{"role": "user", "content": "which config do you hold?"}]}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http, http.post(
            f"{origin}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"}) as resp:
        await resp.read()
        return resp.status


# ---- 3. one worker partitioned from NATS ---------------------------------------------------------
async def test_partitioned_worker_reports_stale_keeps_serving_and_catches_up(cluster: ClusterStack) -> None:
    async with edge_worker(cluster, "nats-1") as (edge, link):
        origins = [*cluster.worker_origins, edge]
        before = await _published(origins)
        async with Load(origins, cluster.demo["ALEPHANT_API_KEY"]) as load:
            await asyncio.sleep(1)
            link.cut()
            cut_at = time.monotonic()

            async def stale() -> bool | None:
                return True if (await _get(f"{edge}/healthz"))["stale"] is True else None

            await eventually(stale, timeout=EDGE_STALE_AFTER_S + 10, interval=0.2)
            stale_after = time.monotonic() - cut_at
            created = await asyncio.to_thread(cluster.admin().call, "POST", "/admin/v1/virtual-keys",
                                              {"workspace_id": "demo", "name": f"partition-{uuid.uuid4().hex[:6]}"})
            revision = int(created["revision"])

            async def others_applied() -> bool | None:
                revisions = [(await _get(f"{o}/healthz"))["snapshot_revision"] for o in cluster.worker_origins]
                return True if min(revisions) >= revision else None

            await eventually(others_applied, timeout=10)
            await asyncio.sleep(max(2.0, PARTITION_S - (time.monotonic() - cut_at)))  # serving, stale
            behind = await _get(f"{edge}/healthz")
            statuses = [await _call(o, created["key"]) for o in origins]
            await asyncio.sleep(1)
            link.heal()
            healed_at = time.monotonic()

            async def caught_up() -> bool | None:
                health = await _get(f"{edge}/healthz")
                return True if health["snapshot_revision"] >= revision and health["stale"] is False else None

            await eventually(caught_up, timeout=30, interval=0.1)
            catch_up_s = time.monotonic() - healed_at
            after = await _call(edge, created["key"])
        served_cut = load.between(cut_at, healed_at, edge)
        print(f"partitioned worker: stale after {stale_after:.1f} s (heartbeat age {behind['heartbeat_age_s']} s), "
              f"served {served_cut} while cut off (served_while_stale {behind['served_while_stale']}), "
              f"revision {behind['snapshot_revision']} < {revision} while the others had it; caught up "
              f"{catch_up_s:.2f} s after the heal; new key on the others / the edge: {statuses[:-1]} / "
              f"{statuses[-1]} -> {after}")
        assert behind["stale"] is True and behind["snapshot_revision"] < revision
        assert served_cut > 0 and behind["served_while_stale"] > 0
        assert statuses == [200] * len(cluster.worker_origins) + [401]
        assert after == 200
        await prove_ledger(cluster, load, origins, before, "worker partitioned from nats")


# ---- 4. watcher reset: the final snapshot equals the bucket --------------------------------------
async def _kv_consumers(cluster: ClusterStack, bucket: str) -> dict[str, str]:
    """The config bucket stream's consumers: name -> the node that holds it."""
    nc = await connect(cluster.nats_url("admin"), "alephant-fault-tests")
    try:
        infos = await nc.jetstream().consumers_info(f"KV_{bucket}")
        return {str(c.name): str(c.cluster.leader) for c in infos if c.cluster is not None and c.cluster.leader}
    finally:
        await nc.close()


async def _delete_consumer(cluster: ClusterStack, bucket: str, consumer: str) -> None:
    nc = await connect(cluster.nats_url("admin"), "alephant-fault-tests")
    try:
        assert await nc.jetstream().delete_consumer(f"KV_{bucket}", consumer)
    finally:
        await nc.close()


async def _bucket_dump(cluster: ClusterStack, bucket: str) -> tuple[int, dict[str, ConfigEntity]]:
    """The bucket's last sequence and every live key's entity (`kv.keys()` then `get`), decoded as
    a worker decodes them (an undecodable entry is skipped, as the worker skips it)."""
    nc = await connect(cluster.nats_url("admin"), "alephant-fault-tests")
    try:
        kv = await nc.jetstream().key_value(bucket)
        last_seq = int((await kv.status()).stream_info.state.last_seq)
        entities: dict[str, ConfigEntity] = {}
        for key in await kv.keys():
            entry = await kv.get(key)
            if entry.value:
                with contextlib.suppress(Exception):
                    entities[key] = entity_decoder.decode(entry.value)
        return last_seq, entities
    finally:
        await nc.close()


async def _config_burst(cluster: ClusterStack, count: int) -> int:
    """`count` virtual keys created, every second one renamed, every third revoked, through both
    control planes in turn; returns the number of changes."""
    changes = 0
    for i in range(count):
        admin = cluster.admin_at(i % len(cluster.admin_urls))
        created = await asyncio.to_thread(admin.call, "POST", "/admin/v1/virtual-keys",
                                          {"workspace_id": "demo", "name": f"burst-{i}-{uuid.uuid4().hex[:4]}"})
        changes += 1
        if i % 2 == 0:
            await asyncio.to_thread(admin.call, "PATCH", f"/admin/v1/virtual-keys/{created['id']}",
                                    {"name": f"burst-{i}-renamed"})
            changes += 1
        if i % 3 == 0:
            await asyncio.to_thread(admin.call, "POST", f"/admin/v1/virtual-keys/{created['id']}/revoke")
            changes += 1
    return changes


async def test_watcher_reset_ends_on_a_snapshot_equal_to_the_bucket(cluster: ClusterStack) -> None:
    bucket = load_settings(cluster.child_env()).kv_bucket
    known = await _kv_consumers(cluster, bucket)
    async with edge_worker(cluster, "nats-2") as (edge, _link):
        fresh = {n: node for n, node in (await _kv_consumers(cluster, bucket)).items() if n not in known}
        assert len(fresh) == 1, f"cannot tell the edge's ordered consumer apart: {fresh}"
        ((consumer, holder),) = fresh.items()
        origins = [*cluster.worker_origins, edge]
        before = await _published(origins)
        async with Load(origins, cluster.demo["ALEPHANT_API_KEY"]) as load:
            await asyncio.sleep(1)
            # A restarted node restores its consumers, and a consumer silent for less than two idle
            # heartbeats (10 s) is waited for: deleting it as well makes the watcher reset.
            await _delete_consumer(cluster, bucket, consumer)
            await asyncio.to_thread(_sigkill, cluster, holder)
            changes = await _config_burst(cluster, 12)
            await asyncio.to_thread(cluster.services[holder].restart)
            await _nats_healthy(cluster)
            await asyncio.sleep(1)
        controlplanes = [cluster.procs[f"controlplane-{i}"] for i in range(len(cluster.admin_urls))]
        try:
            for svc in controlplanes:  # the bucket's only writers: it holds still while compared
                svc.pause()
            last_seq, entities = await _bucket_dump(cluster, bucket)
            expected = entities_digest(entities)

            async def applied() -> list[dict[str, Any]] | None:
                held = [await _get(f"{o}/healthz/snapshot") for o in origins]
                return held if all(h["snapshot_revision"] >= last_seq for h in held) else None

            held = await eventually(applied, timeout=30, interval=0.2)
            # What the edge applied since came through a consumer it made anew (reset at last_seq + 1).
            now = await _kv_consumers(cluster, bucket)
            reset = consumer not in now and bool(set(now) - set(known))
        finally:
            for svc in controlplanes:
                svc.resume()
        equal = [h["digest"] == expected and h["snapshot_revision"] == last_seq for h in held]
        print(f"watcher reset: the edge's ordered consumer deleted and its node {holder} SIGKILLed during "
              f"{changes} config changes; reset onto a new consumer: {reset}; bucket revision {last_seq}, "
              f"{len(entities)} keys; workers equal to the dump: {equal} (edge last)")
        assert [h["entities"] for h in held] == [len(entities)] * len(origins)
        assert equal == [True] * len(origins)
        assert reset
        await prove_ledger(cluster, load, origins, before, "watcher reset")
