"""Data-plane, Redis and control-plane faults on the multi-node stack (issue 14, part 4;
RELIABILITY rows 5, 6, 10 and 12): the gateway's half of the fault suite (the NATS half is in
its own module).

One cluster for the module (deploy/cluster.py: 3 NATS at R3, 2 control planes, 4 workers on
their own ports, 2 projectors) with a short hold TTL and reconcile interval. Light load is
generated in each test: concurrent clients on the mock model across the four workers' URLs,
recording every answered request's `Alephant-Request-Id`, which must then be in the ledger
exactly once. Each test prints its figures (`-rA` or `-s`) and asserts its differences are 0.

In order (each later test disturbs the stack more):
1. a worker SIGKILLed with events in its spool and budget holds open: the events arrive once, the
   holds lapse within the hold TTL;
2. Redis paused: no 5xx, rate limits on each worker's share, budgets on the leases granted before;
   after the resume everything reconciles;
3. the relay leader killed during a burst of admin changes: the other control plane leads, and
   every acknowledged change is in Postgres, the bucket and every worker's snapshot exactly once;
4. a cold start against a bucket of 50k keys: /readyz is 503 until the replay ends and no call is
   served from an empty snapshot. Last: the 50k keys exist only in the bucket (a later leader's
   resync would delete them), and every worker carries them.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import itertools
import json
import os
import signal
import time
import uuid
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import nats.errors
import psycopg
import pytest
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import KeyNotFoundError
from redis.asyncio import Redis

from deploy.cluster import ClusterStack
from deploy.stack import EMBEDDED_S3_CREDENTIALS
from events.jetstream import connect
from events.reconcile import reconcile
from events.spool import decode_records
from schemas.budget_keys import budget_keys
from schemas.entities import VirtualKey, entity_encoder, kv_key
from schemas.settings import load_settings
from tests.conftest import Gateway, cluster_stack, eventually, wait_until_true
from tests.fakes.upstream import FakeUpstream
from tests.integration.test_governance_e2e import CENT, PROMPT, Org, budget_view, make_org, usd

pytestmark = [pytest.mark.fault, pytest.mark.timeout(240)]

HOLD_TTL_S = 4.0
REFRESH_S = 5.0  # RedisGovernor's lease refresh and hold sweep interval
DOLLAR = 1_000_000_000
VICTIM = 3  # the worker killed, then restarted, in tests 1 and 4


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClusterStack]:
    env = {"ALEPHANT_HOLD_TTL_S": str(HOLD_TTL_S), "ALEPHANT_RECONCILE_INTERVAL_S": "1"}
    with cluster_stack(Path(tmp_path_factory.mktemp("cluster-faults")), env) as stack:
        yield stack


@pytest.fixture(scope="module")
def gw(cluster: ClusterStack) -> Gateway:
    """The cluster seen through the session suite's handle (so the governance helpers apply)."""
    env = cluster.child_env()
    names = load_settings(env)
    return Gateway(stack=cluster, base_url=cluster.demo["ALEPHANT_BASE_URL"], admin=cluster.admin(),
                   database_url=env["ALEPHANT_DATABASE_URL"], nats_url=cluster.nats_url("admin"),
                   stream=names.stream, subject_prefix=names.subject_prefix, demo_key=cluster.demo["ALEPHANT_API_KEY"])


# -- clients -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Reply:
    origin: str
    status: int  # 0: no answer (connection refused or dropped)
    request_id: str
    code: str = ""
    headers: dict[str, str] = field(default_factory=dict)


async def call(http: aiohttp.ClientSession, origin: str, key: str, model: str, *, run_id: str,
               max_tokens: int = 10) -> Reply:
    """One chat call; never raises for a dead worker (status 0)."""
    body = {"model": model, "max_tokens": max_tokens, "messages": [{"role": "user", "content": PROMPT}]}
    headers = {"Authorization": f"Bearer {key}", "Alephant-Run-Id": run_id}
    try:
        async with http.post(f"{origin}/v1/chat/completions", json=body, headers=headers) as resp:
            data = await resp.json(content_type=None)
            code = (data.get("error") or {}).get("code") or "" if isinstance(data, dict) else ""
            return Reply(origin, resp.status, resp.headers.get("Alephant-Request-Id", ""), str(code),
                         {k.lower(): v for k, v in resp.headers.items()})
    except (aiohttp.ClientError, TimeoutError, ValueError):
        return Reply(origin, 0, "")


async def paced(http: aiohttp.ClientSession, origins: Sequence[str], key: str, model: str, *, run_id: str,
                rate: float, duration_s: float, max_tokens: int = 10) -> list[Reply]:
    """Open-loop load: `rate` calls a second for `duration_s`, round-robin over `origins`."""
    tasks: list[asyncio.Task[Reply]] = []
    start, ring = time.monotonic(), itertools.cycle(origins)
    for i in range(int(rate * duration_s)):
        await asyncio.sleep(max(0.0, start + i / rate - time.monotonic()))
        tasks.append(asyncio.create_task(call(http, next(ring), key, model, run_id=run_id, max_tokens=max_tokens)))
    return list(await asyncio.gather(*tasks))


def client() -> aiohttp.ClientSession:
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=aiohttp.ClientTimeout(total=30))


async def get_json(http: aiohttp.ClientSession, url: str) -> Any:
    async with http.get(url) as resp:
        return await resp.json()


async def all_applied(cluster: ClusterStack, revision: int, timeout: float = 15) -> None:
    """Wait until every worker (its own /healthz, not the fleet view, which lists a killed worker
    for a while) has applied `revision`."""
    async with client() as http:
        async def applied() -> bool:
            revisions = [int((await get_json(http, f"{o}/healthz"))["snapshot_revision"])
                         for o in cluster.worker_origins]
            return min(revisions) >= revision

        await wait_until_true(applied, timeout=timeout)


async def synced(cluster: ClusterStack, org: Org) -> None:
    await all_applied(cluster, max(org.revisions))


# -- ledger and stream -----------------------------------------------------------------------------


async def journalled(gw: Gateway, run_ids: Sequence[str]) -> Counter[str]:
    """Journalled `llm.call`s of the runs: request id -> rows (a row per event id)."""
    async with await psycopg.AsyncConnection.connect(gw.database_url) as conn:
        cur = await conn.execute("SELECT body->>'request_id' FROM event_journal WHERE type = 'llm.call' "
                                 "AND body->>'run_id' = ANY(%s)", (list(run_ids),))
        return Counter(row[0] for row in await cur.fetchall())


async def all_journalled(gw: Gateway, run_ids: Sequence[str], answered: set[str], timeout: float = 30) -> Counter[str]:
    async def check() -> Counter[str] | None:
        found = await journalled(gw, run_ids)
        return found if answered <= set(found) else None

    try:
        return await eventually(check, timeout=timeout, interval=0.25)
    except pytest.fail.Exception:
        return await journalled(gw, run_ids)


async def ledger_duplicates(gw: Gateway) -> int:
    async with await psycopg.AsyncConnection.connect(gw.database_url) as conn:
        cur = await conn.execute(
            "SELECT count(*) FROM (SELECT id FROM ledger_transfer GROUP BY id HAVING count(*) > 1) d")
        return int((await cur.fetchone() or (0,))[0])


async def stream_messages(gw: Gateway, subject: str) -> list[tuple[str, dict[str, Any]]]:
    """Every message of the event stream on `subject` (wildcards allowed): (msg id, decoded body)."""
    nc = await connect(gw.nats_url, "alephant-fault-tests")
    out: list[tuple[str, dict[str, Any]]] = []
    try:
        sub = await nc.jetstream().pull_subscribe(subject, stream=gw.stream, config=ConsumerConfig(
            ack_policy=AckPolicy.NONE, deliver_policy=DeliverPolicy.ALL))
        while True:
            try:
                msgs = await sub.fetch(1000, timeout=1)
            except (nats.errors.TimeoutError, TimeoutError):
                break
            out += [((m.headers or {}).get("Nats-Msg-Id", ""), json.loads(m.data)) for m in msgs]
        await sub.unsubscribe()
    finally:
        await nc.close()
    return out


async def published_calls(gw: Gateway, workspace: str) -> Counter[str]:
    """The workspace's `llm.call` messages in the stream: request id -> messages."""
    messages = await stream_messages(gw, f"{gw.subject_prefix}.{workspace}.llm.call")
    return Counter(body["request_id"] for _, body in messages)


def dead_slot_records(cluster: ClusterStack) -> list[tuple[str, str]]:
    """(msg id, subject) of every record in the spool slots no live worker holds (a dead worker's)."""
    records: list[tuple[str, str]] = []
    for slot in sorted((cluster.state_dir / "spool").glob("slot-*")):
        fd = os.open(slot / "lock", os.O_RDWR | os.O_CREAT)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            continue  # a live worker's
        finally:
            os.close(fd)  # releases the probe's lock, if it took it
        for segment in sorted(slot.glob("*.seg")):
            records += [(r.msg_id, r.subject) for r in decode_records(segment.read_bytes())[0]]
    return records


async def held_and_spent(gw: Gateway, budget_id: str) -> tuple[Decimal, Decimal] | None:
    view = await budget_view(gw, budget_id)
    if view.get("held_usd") is None or view.get("spent_usd") is None:
        return None
    return usd(view["held_usd"]), usd(view["spent_usd"])


async def ledger_cost(gw: Gateway, agent: str) -> int:
    async with await psycopg.AsyncConnection.connect(gw.database_url) as conn:
        cur = await conn.execute("SELECT coalesce(sum((body->>'cost_nanos')::bigint), 0) FROM event_journal "
                                 "WHERE type = 'llm.call' AND body->>'agent_id' = %s", (agent,))
        return int((await cur.fetchone() or (0,))[0])


async def reconcile_problems(cluster: ClusterStack) -> list[tuple[str, str]]:
    """`alephant ledger reconcile`'s problems (balances, accounts, references, transfers, finance,
    gaps against the stream): RELIABILITY's invariants after every fault."""
    with pytest.MonkeyPatch.context() as env:  # the embedded S3's placeholder credentials, for the archive check
        for name, value in EMBEDDED_S3_CREDENTIALS.items():
            env.setenv(name, value)
        report = await reconcile(load_settings(cluster.child_env("admin")))
    return [(f.check, f.summary) for f in report.findings if f.status == "problem"]


def exactly_once_figures(name: str, answered: set[str], journal: Counter[str], published: Counter[str]) -> int:
    """Print served / published / in ledger; return the differences (lost + duplicated)."""
    lost = len(answered - set(journal))
    duplicated = sum(n - 1 for n in journal.values() if n > 1) + sum(n - 1 for n in published.values() if n > 1)
    unpublished = len(answered - set(published))
    print(f"{name}: served {len(answered)}, published {sum(published[r] for r in answered)} "
          f"(unpublished {unpublished}), in ledger {sum(journal[r] for r in answered)}, "
          f"lost {lost}, duplicated {duplicated}")
    return lost + duplicated + unpublished


# -- 1. a worker killed with a spool and open holds -------------------------------------------------


async def test_killed_worker_events_arrive_once_and_its_holds_lapse(cluster: ClusterStack, gw: Gateway) -> None:
    """Mock load on all four workers (80 calls/s for 3 s, on a key with no budget) and eight slow
    calls of $0.01 on a budgeted agent (six on the victim, two on a survivor) while the victim is
    SIGKILLed; the victim is started again on its port (it adopts its old spool slot and replays it)."""
    started = time.monotonic()
    origins, victim = cluster.worker_origins, cluster.worker_origins[VICTIM]
    async with FakeUpstream(words=10, latency_ms=2500, record=False) as slow, client() as http:
        org = make_org(gw, slow)
        budget = org.create("budgets", scope="agent", scope_id=org.agent, period="total", limit_usd="1.00")
        load_key, _ = org.new_key()  # not the agent's: its calls take no hold on the budget
        await synced(cluster, org)
        run_load, run_slow = f"kill-load-{uuid.uuid4().hex[:8]}", f"kill-slow-{uuid.uuid4().hex[:8]}"
        load = asyncio.create_task(paced(http, origins, load_key, org.model, run_id=run_load, rate=80, duration_s=3))
        slow_model = f"{org.fake}/gpt-4o-mini"
        slow_calls = asyncio.gather(*(call(http, victim if i < 6 else origins[0], org.key, slow_model,
                                           run_id=run_slow) for i in range(8)))

        async def all_held() -> bool:
            figures = await held_and_spent(gw, budget["id"])
            return figures is not None and figures[0] == Decimal("0.08")

        await wait_until_true(all_held, timeout=5)
        await asyncio.sleep(0.5)  # mid-load: the victim's spool holds its newest events
        killed_at = time.monotonic()
        await asyncio.to_thread(cluster.kill, f"dataplane-{VICTIM}")
        spooled = dead_slot_records(cluster)
        at_kill = {mid for mid, _ in await stream_messages(gw, f"{gw.subject_prefix}.{org.ws}.>")}
        unpublished_at_kill = sum(1 for mid, subject in spooled if subject.startswith(f"{gw.subject_prefix}.{org.ws}.")
                                  and mid not in at_kill)
        restart = asyncio.create_task(asyncio.to_thread(cluster.start_worker, VICTIM))
        replies = [*await load, *await slow_calls]

        # The dead worker's holds lapse within the hold TTL (plus one sweep by a survivor's refresh);
        # the survivors' settle. Spent then equals the ledger (the reconciler restores the
        # settlements the dead worker had queued).
        async def holds_gone() -> bool:
            figures = await held_and_spent(gw, budget["id"])
            return figures is not None and figures[0] == 0

        await wait_until_true(holds_gone, timeout=HOLD_TTL_S + REFRESH_S + 2)
        released_s = time.monotonic() - killed_at
        await restart

    answered = {r.request_id for r in replies if r.status == 200}
    statuses = Counter((r.origin == victim, r.status) for r in replies)
    journal = await all_journalled(gw, [run_load, run_slow], answered)
    published = await published_calls(gw, org.ws)
    agent_cost = await ledger_cost(gw, org.agent)

    async def spent_is_ledger() -> tuple[Decimal, Decimal] | None:
        figures = await held_and_spent(gw, budget["id"])
        return figures if figures is not None and figures[1] * DOLLAR == agent_cost else None

    held, spent = await eventually(spent_is_ledger, timeout=10)
    slow_served = sum(r.status == 200 for r in replies[-8:])
    differences = exactly_once_figures("worker killed", answered, journal, published)
    differences += await ledger_duplicates(gw)
    print(f"worker killed: {len(spooled)} records in its spool slot at the kill ({unpublished_at_kill} of this "
          f"workspace not yet in the stream); replies by (victim, status) {dict(statuses)}; holds of $0.08 released "
          f"{released_s:.1f} s after the kill (hold TTL {HOLD_TTL_S:.0f} s); budget held ${held}, spent ${spent} = "
          f"ledger ${Decimal(agent_cost) / DOLLAR} ({slow_served} slow calls served); "
          f"differences {differences}; {time.monotonic() - started:.1f} s")
    assert spooled, "the victim's spool slot was empty at the kill: the test proves nothing"
    assert statuses[(True, 200)] and statuses[(True, 0)], "the victim must have answered and dropped calls"
    assert {s for on_victim, s in statuses if not on_victim} == {200}, statuses
    assert slow_served == 2 and agent_cost == 2 * CENT and held == 0
    assert released_s <= HOLD_TTL_S + REFRESH_S + 2
    assert differences == 0
    assert await reconcile_problems(cluster) == []


# -- 2. Redis paused ------------------------------------------------------------------------------


async def leases(redis: Redis, gw: Gateway, org: Org, budget_id: str) -> dict[str, int]:
    """The worker leases held on the budget's current window: lease id -> nano-USD."""
    view = await budget_view(gw, budget_id)
    keys = budget_keys(org.ws, budget_id, view["period_key"])
    members = {str(m) for m in await redis.smembers(keys.leases)}
    holds = {str(k): int(v) for k, v in (await redis.hgetall(keys.holds)).items()}
    return {m: holds[m] for m in members if m in holds}


async def local_admissions(http: aiohttp.ClientSession, cluster: ClusterStack) -> int:
    return sum([(await get_json(http, f"{o}/healthz"))["limiter_failure_mode_allowed"]
                for o in cluster.worker_origins])


RPM = 40


async def test_redis_paused_no_5xx_local_limits_budgets_on_leases_then_reconciled(
        cluster: ClusterStack, gw: Gateway) -> None:
    started = time.monotonic()
    origins = cluster.worker_origins
    org = make_org(gw)
    budget = org.create("budgets", scope="agent", scope_id=org.agent, period="total", limit_usd="1.00")
    rated_key, rated_id = org.new_key()
    org.create("limits", scope="key", scope_id=rated_id, rpm=RPM)
    plain_key, _ = org.new_key()
    await synced(cluster, org)
    run_id = f"redis-{uuid.uuid4().hex[:8]}"
    redis = Redis.from_url(cluster.services["redis"].url, socket_timeout=5, decode_responses=True)
    async with client() as http:
        try:
            # Every worker serves the budget once, so each takes a lease; wait for the refresh.
            warm = [await call(http, o, org.key, org.model, run_id=run_id) for o in origins]
            assert {r.status for r in warm} == {200}, warm

            async def four_leases() -> dict[str, int] | None:
                granted = await leases(redis, gw, org, budget["id"])
                return granted if len(granted) == 4 and all(v >= CENT for v in granted.values()) else None

            granted = await eventually(four_leases, timeout=REFRESH_S + 5)
            allowed_before = await local_admissions(http, cluster)
        finally:
            await redis.aclose()

        cluster.services["redis"].pause()
        try:
            budgeted, rated, plain = await asyncio.gather(
                paced(http, origins, org.key, org.model, run_id=run_id, rate=8, duration_s=5),
                paced(http, origins, rated_key, org.model, run_id=run_id, rate=16, duration_s=5, max_tokens=1),
                paced(http, origins, plain_key, org.model, run_id=run_id, rate=8, duration_s=5, max_tokens=1))
            allowed_during = await local_admissions(http, cluster) - allowed_before
        finally:
            cluster.services["redis"].resume()

        everything = [*warm, *budgeted, *rated, *plain]
        answered = {r.request_id for r in everything if r.status == 200}
        outage_spend = sum(r.status == 200 for r in budgeted) * CENT
        total = len(warm) * CENT + outage_spend

        # Reconciled: the outage's lease admissions recorded, nothing held, spent = the ledger.
        async def settled() -> tuple[Decimal, Decimal] | None:
            figures = await held_and_spent(gw, budget["id"])
            return figures if figures is not None and figures[0] == 0 and figures[1] * DOLLAR == total else None

        settled_figures = await eventually(settled, timeout=20)
        journal = await all_journalled(gw, [run_id], answered)
        published = await published_calls(gw, org.ws)
        agent_cost = await ledger_cost(gw, org.agent)

        async def all_back() -> bool:
            return {(await get_json(http, f"{o}/healthz"))["budget_store"] for o in origins} == {"ok"}

        await wait_until_true(all_back, timeout=10)

    statuses = Counter((kind, r.status, r.code) for kind, replies in (("budget", budgeted), ("rated", rated),
                                                                     ("plain", plain)) for r in replies)
    rated_ok = Counter(r.origin for r in rated if r.status == 200)
    share = RPM // len(origins)
    per_worker_bound = 1.5 * share * (1 + 5 / 60)
    differences = exactly_once_figures("redis paused", answered, journal, published) + await ledger_duplicates(gw)
    differences += agent_cost != total
    print(f"redis paused 5 s: {dict(statuses)}; leases before ${Decimal(sum(granted.values())) / DOLLAR} "
          f"({len(granted)}), outage budget spend ${Decimal(outage_spend) / DOLLAR}; rated admitted per worker "
          f"{dict(rated_ok)} (share {share}/min, bound {per_worker_bound:.1f}); local admissions {allowed_during}; "
          f"after resume held ${settled_figures[0]}, spent ${settled_figures[1]} = ledger "
          f"${Decimal(agent_cost) / DOLLAR}; differences {differences}; {time.monotonic() - started:.1f} s")
    assert all(0 < r.status < 500 for r in everything), statuses
    assert {r.status for r in plain} == {200}
    assert 0 < outage_spend <= sum(granted.values())
    assert {r.code for r in budgeted if r.status != 200} <= {"budget_exceeded"}
    assert {r.code for r in rated if r.status != 200} <= {"rate_limit_exceeded"}
    assert len(rated_ok) == len(origins) and all(n <= per_worker_bound for n in rated_ok.values()), rated_ok
    assert {r.headers.get("x-ratelimit-limit-requests") for r in rated if r.status == 200} == {str(share)}
    assert allowed_during > 0
    assert differences == 0
    assert await reconcile_problems(cluster) == []


# -- 3. the relay leader killed during a burst of admin changes ------------------------------------

BURST = 60


async def test_killed_relay_leader_loses_no_change_and_applies_none_twice(cluster: ClusterStack, gw: Gateway) -> None:
    """Four admin clients (two per control plane) create virtual keys, one after another, until 60
    were attempted; the relay leader is SIGKILLed once 15 were acknowledged, and a client whose
    control plane is gone moves to the other. Acknowledged = 201 or 202 (committed; 202: still
    being relayed)."""
    started = time.monotonic()
    leader = cluster.relay_leader()
    assert leader is not None
    leader_index = int(leader.rsplit("-", 1)[1])
    survivor = 1 - leader_index
    tag = uuid.uuid4().hex[:8]
    token = cluster.demo["ALEPHANT_ADMIN_TOKEN"]
    acked: dict[str, dict[str, Any]] = {}  # name -> the admin answer
    unknown: list[str] = []  # names whose call got no answer (committed or not)
    counter = itertools.count()
    kill_now = asyncio.Event()

    async def admin_client(http: aiohttp.ClientSession, index: int) -> None:
        while (n := next(counter)) < BURST:
            name = f"burst-{tag}-{n}"
            url = cluster.admin_urls[index]
            try:
                async with http.post(f"{url}/admin/v1/virtual-keys", json={"workspace_id": "demo", "name": name},
                                     headers={"Authorization": f"Bearer {token}"}) as resp:
                    body = await resp.json()
                    assert resp.status in (201, 202), (resp.status, body)
                    acked[name] = body
            except (aiohttp.ClientError, TimeoutError):
                unknown.append(name)
                index = survivor  # the client retries elsewhere, with its next change
            if len(acked) >= 15:
                kill_now.set()

    async def killer() -> float:
        await kill_now.wait()
        await asyncio.to_thread(cluster.kill, leader)
        return time.monotonic()

    async with client() as http:
        killing = asyncio.create_task(killer())
        await asyncio.gather(*(admin_client(http, i % 2) for i in range(4)))
        killed_at = await killing

        async def new_leader() -> str | None:
            return await asyncio.to_thread(cluster.relay_leader)

        assert await eventually(new_leader, timeout=10) == f"controlplane-{survivor}"
        takeover_s = time.monotonic() - killed_at

        # Postgres: the changes committed (acknowledged ones and, perhaps, some unanswered ones).
        async with await psycopg.AsyncConnection.connect(gw.database_url) as conn:
            cur = await conn.execute("SELECT body->>'name', id, kv_key FROM config_entity WHERE kv_key LIKE 'vk.%%' "
                                     "AND deleted_at IS NULL AND body->>'name' LIKE %s", (f"burst-{tag}-%",))
            rows = await cur.fetchall()
        pg_names = Counter(name for name, _, _ in rows)
        pg_keys = {name: key for name, _, key in rows}
        pg_ids = {name: entity_id for name, entity_id, _ in rows}

        # The bucket (once the outbox is drained): each committed change's entry, its value, its revisions.
        nc = await connect(gw.nats_url, "alephant-fault-tests")
        try:
            bucket = load_settings(cluster.child_env()).kv_bucket
            kv = await nc.jetstream().key_value(bucket)

            async def relayed() -> bool:
                async with await psycopg.AsyncConnection.connect(gw.database_url) as conn:
                    cur = await conn.execute("SELECT count(*) FROM config_outbox WHERE published_at IS NULL")
                    return int((await cur.fetchone() or (0,))[0]) == 0

            await wait_until_true(relayed, timeout=15)
            # Revisions kept per key (the bucket keeps 5): a change relayed twice has two.
            kept = (await nc.jetstream().stream_info(f"KV_{bucket}", subjects_filter=f"$KV.{bucket}.vk.>")).state
            bucket_revisions = {name: (kept.subjects or {}).get(f"$KV.{bucket}.{key}", 0)
                                for name, key in pg_keys.items()}
            in_bucket: Counter[str] = Counter()
            for name, key in pg_keys.items():
                with contextlib.suppress(KeyNotFoundError):
                    entity = json.loads((await kv.get(key)).value or b"{}")
                    in_bucket[name] += entity.get("name") == name and entity.get("id") == pg_ids[name]
            bucket_keys = len(await kv.keys())
            last_seq = (await kv.status()).stream_info.state.last_seq
        finally:
            await nc.close()

        # Every worker's snapshot: has applied the bucket, holds as many entities, and serves every
        # acknowledged key.
        async def workers_caught_up() -> list[dict[str, Any]] | None:
            health = [await get_json(http, f"{o}/healthz") for o in cluster.worker_origins]
            return health if all(h["snapshot_revision"] >= last_seq for h in health) else None

        health = await eventually(workers_caught_up, timeout=10)
        served: Counter[str] = Counter()
        for name, answer in acked.items():
            replies = await asyncio.gather(*(call(http, o, answer["key"], "mock/echo", run_id=f"burst-{tag}")
                                             for o in cluster.worker_origins))
            served[name] = sum(r.status == 200 for r in replies)

    lost = [n for n in acked if pg_names[n] != 1 or in_bucket[n] != 1 or served[n] != len(cluster.worker_origins)]
    doubled = [n for n, count in pg_names.items() if count > 1] + [n for n in pg_names if n not in acked
                                                                     and n not in unknown]
    entity_counts = {h["entities"] for h in health}
    reputs = sum(max(0, n - 1) for n in bucket_revisions.values())
    differences = len(lost) + len(doubled) + len(set(pg_names) ^ set(pg_keys)) + (len(entity_counts) != 1)
    print(f"relay leader {leader} killed after 15 acknowledged changes: changes attempted {BURST}, "
          f"acknowledged {len(acked)} ({sum(a.get('propagated') is not True for a in acked.values())} not yet "
          f"propagated when answered), unanswered {len(unknown)} (of which committed "
          f"{sum(1 for n in unknown if n in pg_names)}); in Postgres {sum(pg_names.values())}, in the bucket "
          f"{sum(in_bucket.values())} (re-puts of an identical value {reputs}), served by all 4 workers "
          f"{sum(n == 4 for n in served.values())}; worker entity counts {sorted(entity_counts)} vs bucket keys "
          f"{bucket_keys}; takeover {takeover_s:.2f} s; differences {differences}; {time.monotonic() - started:.1f} s")
    assert len(acked) + len(unknown) == BURST and len(acked) >= 15
    assert differences == 0, (lost, doubled, entity_counts)


# -- 4. cold start against a bucket of 50k keys ----------------------------------------------------

COLD_KEYS = 50_000


async def bulk_put_keys(gw: Gateway, bucket: str, count: int) -> int:
    """`count` virtual keys (real entity format, random hashes) put straight into the bucket, in
    pipelined batches; returns the bucket's last sequence afterwards."""
    nc = await connect(gw.nats_url, "alephant-fault-tests")
    try:
        js = nc.jetstream()
        tag = uuid.uuid4().hex[:6]
        for start in range(0, count, 2000):
            entities = [VirtualKey(id=f"vk_cold_{tag}_{i}", workspace_id="demo", key_hash=os.urandom(16).hex(),
                                   name=f"cold {i}") for i in range(start, min(count, start + 2000))]
            await asyncio.gather(*(js.publish(f"$KV.{bucket}.{kv_key(e)}", entity_encoder.encode(e))
                                   for e in entities))
        kv = await js.key_value(bucket)
        return int((await kv.status()).stream_info.state.last_seq)
    finally:
        await nc.close()


def rss_kib(pid: int) -> int:
    """A process's resident set size (Linux /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for pid {pid}")


async def test_cold_start_on_50k_keys_is_not_ready_until_the_replay_ends(cluster: ClusterStack, gw: Gateway) -> None:
    started = time.monotonic()
    bucket = load_settings(cluster.child_env()).kv_bucket
    other = cluster.procs["dataplane-0"].proc
    assert other is not None
    rss_before_mb = rss_kib(other.pid) / 1024
    last_seq = await bulk_put_keys(gw, bucket, COLD_KEYS)
    put_s = time.monotonic() - started

    # The running workers follow the bulk change (and are not all idle until they have).
    await all_applied(cluster, last_seq, timeout=90)
    followed_s = time.monotonic() - started - put_s
    name, origin = f"dataplane-{VICTIM}", cluster.worker_origins[VICTIM]
    old = cluster.procs[name].proc
    assert old is not None
    stopping = time.monotonic()
    old.send_signal(signal.SIGTERM)  # a graceful stop (it gives its leases back, drains its events)
    await asyncio.to_thread(old.wait, 30)
    stop_s = time.monotonic() - stopping

    probes: list[tuple[float, float, int]] = []  # (sent, answered, /readyz status); 0: no answer
    calls: list[tuple[float, float, int, str]] = []  # (sent, answered, status, error code)
    async with client() as http:
        spawned = time.monotonic()
        svc = cluster.spawn(name, "dataplane", env={"ALEPHANT_PORT": str(cluster.ports[VICTIM])})

        async def readyz() -> None:
            while not probes or probes[-1][2] != 200:
                sent = time.monotonic()
                try:
                    async with http.get(f"{origin}/readyz") as resp:
                        status = resp.status
                except aiohttp.ClientError:
                    status = 0
                probes.append((sent, time.monotonic(), status))
                assert time.monotonic() - spawned < 60 and not svc.exited(), "the worker never became ready"
                await asyncio.sleep(0.02)

        async def chats() -> None:
            while not probes or probes[-1][2] != 200 or len([c for c in calls if c[2] == 200]) < 5:
                sent = time.monotonic()
                reply = await call(http, origin, cluster.demo["ALEPHANT_API_KEY"], "mock/echo", run_id="cold")
                calls.append((sent, time.monotonic(), reply.status, reply.code))
                await asyncio.sleep(0.02)

        await asyncio.gather(readyz(), chats())
        health = await get_json(http, f"{origin}/healthz")

    assert svc.proc is not None
    rss_mb = rss_kib(svc.proc.pid) / 1024
    listening = min((a for _, a, s in probes if s), default=0.0)
    ready_at = probes[-1][1]
    last_not_ready = max((s for s, _, status in probes if status == 503), default=0.0)
    first_served = min((a for _, a, status, _ in calls if status == 200), default=0.0)
    outcomes = Counter((status, code) for _, _, status, code in calls)
    wrong = sum(n for (status, code), n in outcomes.items()
                if not (status in (0, 200) or (status == 503 and code == "not_ready")))
    early = sum(1 for _, answered, status, _ in calls if status == 200 and answered < last_not_ready)
    print(f"cold start on {COLD_KEYS} keys (bulk put in {put_s:.1f} s, bucket last_seq {last_seq}, "
          f"running workers followed it in {followed_s:.1f} s; graceful stop {stop_s:.1f} s): ready "
          f"{ready_at - spawned:.2f} s after the spawn ({ready_at - listening:.2f} s of replay after /readyz first "
          f"answered); snapshot revision {health['snapshot_revision']}, entities {health['entities']}; worker RSS "
          f"{rss_mb:.0f} MB (another worker before the keys: {rss_before_mb:.0f} MB, after: "
          f"{rss_kib(other.pid) / 1024:.0f} MB); calls during the start {dict(outcomes)}; served before ready "
          f"{early}, wrong answers {wrong}; {time.monotonic() - started:.1f} s")
    assert any(status == 503 for _, _, status in probes), "/readyz never said 503: no replay was observed"
    assert any(status == 503 and code == "not_ready" for _, _, status, code in calls)
    assert first_served >= last_not_ready
    assert health["snapshot_revision"] >= last_seq and health["entities"] >= COLD_KEYS
    assert early == 0 and wrong == 0
