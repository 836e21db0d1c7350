"""`alephant ledger rebuild` and `alephant ledger reconcile` against a stack of their own (the
tests tamper with its ledger), run as an operator runs them: the CLI, configured by nothing but
the `ops.env` that `alephant dev` writes.

A generated workload goes to the real stream: priced and unpriced `llm.call`s, a re-pricing,
`tool.spend`, `payment.outbound`, `payment.inbound`, `cache.hit`, `run.completed`, a second copy
of an event (published outside the dedup window) and two poison messages. Once the projections
and the archiver have it all, both rebuilds (from the stream, from the S3 archive) report the
live tables equal and reconcile finds nothing; a tampered account balance or a deleted finance
fact is reported by both, with exit status 1.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import random
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from nats.js.errors import NotFoundError

from deploy.stack import Stack, read_env_file
from events.archive import ARCHIVE_CONSUMER
from events.jetstream import connect
from events.ledger import agent_account
from events.publisher import EventPublisher
from events.rebuild import rebuild
from schemas.events import (
    CacheHit,
    Event,
    LlmCall,
    LlmRepriced,
    PaymentInbound,
    PaymentOutbound,
    RunCompleted,
    ToolSpend,
    Usage,
)
from schemas.ids import uuid7
from schemas.settings import load_settings
from tests.conftest import dedicated_stack, wait_until_true

STREAM, PREFIX = "ALEPHANT_EVENTS", "events"
WORKSPACES = ("demo", "ops-acme")
T0 = dt.datetime(2026, 3, 1, 12, tzinfo=dt.UTC)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with dedicated_stack(Path(tmp_path_factory.mktemp("ledger-ops")),
                         extra_env={"ALEPHANT_ARCHIVE_FLUSH_S": "0.3", "ALEPHANT_ARCHIVE_MAX_EVENTS": "64"}) as s:
        yield s


def workload(seed: int = 9) -> tuple[list[Event], Event]:
    """About 250 events of every money kind over two workspaces, and the one to publish twice."""
    rng = random.Random(seed)
    events: list[Event] = []
    unpriced: list[LlmCall] = []

    def env(i: int) -> dict[str, Any]:
        ws = WORKSPACES[i % 2]
        return {"event_id": uuid7(), "occurred_at": T0 + dt.timedelta(seconds=i), "workspace_id": ws,
                "agent_id": f"agent-{i % 3}", "run_id": f"run-{ws}-{i % 7}", "workflow_id": "wf-1"}

    for i in range(120):
        events.append(LlmCall(**env(i), provider="fake", model="gpt-4o-mini", cost_nanos=rng.randint(1, 9) * 10**6,
                              usage=Usage(input_tokens=rng.randint(10, 900), output_tokens=rng.randint(1, 300)),
                              status=200 if i % 11 else 502, price_source="override"))
    for i in range(20):
        call = LlmCall(**env(200 + i), provider="fake", model="unknown-model", cost_nanos=0, priced=False,
                       usage=Usage(input_tokens=100 + i, output_tokens=20), price_source="unpriced")
        unpriced.append(call)
        events.append(call)
    for call in unpriced[:5]:
        events.append(LlmRepriced(**env(300), original_event_id=call.event_id, provider="fake", model="unknown-model",
                                  tokens=call.usage.input_tokens + call.usage.output_tokens, cost_nanos=77_000,
                                  price_id="price-late", original_occurred_at=call.occurred_at))
    for i in range(25):
        events.append(ToolSpend(**env(400 + i), spend_id=f"sp-{i}", amount_nanos=rng.randint(1, 50) * 10**5,
                                vendor=f"vendor-{i % 4}", tool="search"))
        events.append(PaymentOutbound(**env(500 + i), payment_id=f"po-{i}", amount_nanos=rng.randint(1, 9) * 10**7,
                                      rail="x402", payee=f"payee-{i % 3}"))
        events.append(PaymentInbound(**env(600 + i), payment_id=f"pi-{i}", amount_nanos=rng.randint(1, 9) * 10**8,
                                     rail="x402", endpoint_id=f"ep-{i % 2}", payer="someone"))
        events.append(CacheHit(**env(700 + i), provider="fake", model="gpt-4o-mini", saved_nanos=rng.randint(1, 9000)))
    for i in range(7):
        events.append(RunCompleted(**env(800 + i), outcome="succeeded" if i % 3 else "failed", metadata={"n": str(i)}))
    return events, events[3]


async def publish(stack: Stack, events: list[Event], duplicate: Event) -> int:
    """Publish the workload, a second copy of `duplicate` (another Nats-Msg-Id: outside the dedup
    window) and two poison messages; the stream's last sequence."""
    nc = await connect(stack.nats_url("admin"), "tests-ledger-ops")
    try:
        js = nc.jetstream()
        publisher = EventPublisher(js, stream=STREAM, subject_prefix=PREFIX)
        for i, event in enumerate(events):
            await publisher.publish(event)
            if i == 60:
                copy = publisher.encode(duplicate)
                await js.publish(copy.subject, copy.payload, stream=STREAM,
                                 headers={"Nats-Msg-Id": f"replay-{copy.msg_id}"})
                await js.publish(f"{PREFIX}.demo.llm.call", b"\xff\x00 not json\nat all", stream=STREAM)
            if i == 150:  # decodes, but the journal refuses it (NUL in a string)
                bad = LlmCall(**{**_envelope(events[0]), "event_id": uuid7()}, provider="fake", model="m\x00",
                              cost_nanos=5)
                await publisher.publish(bad)
        info = await js.stream_info(STREAM)
        return int(info.state.last_seq)
    finally:
        await nc.close()


def _envelope(e: Event) -> dict[str, Any]:
    return {"event_id": e.event_id, "occurred_at": e.occurred_at, "workspace_id": e.workspace_id,
            "agent_id": e.agent_id, "run_id": e.run_id}


async def caught_up(stack: Stack, last_seq: int) -> None:
    """Both projections' checkpoints and the archiver's ack floor at `last_seq`."""
    database_url = stack.child_env()["ALEPHANT_DATABASE_URL"]
    nc = await connect(stack.nats_url("admin"), "tests-ledger-ops")

    async def done() -> bool:
        async with await psycopg.AsyncConnection.connect(database_url) as conn:
            cur = await conn.execute("SELECT count(*) FROM projector_checkpoint WHERE last_seq >= %s", (last_seq,))
            projected = (await cur.fetchone() or (0,))[0] == 2
        try:
            info = await nc.jetstream().consumer_info(STREAM, ARCHIVE_CONSUMER)
        except NotFoundError:
            return False
        return bool(projected and info.ack_floor is not None and info.ack_floor.stream_seq >= last_seq)

    try:
        await wait_until_true(done, timeout=60)
    finally:
        await nc.close()


def cli(stack: Stack, *args: str) -> tuple[int, dict[str, Any], str]:
    """`alephant ledger <args> --json` with an environment that holds no ALEPHANT_* nor AWS_*
    variable: everything comes from `<state-dir>/ops.env`. (exit status, JSON report, stderr)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ALEPHANT_", "AWS_"))}
    done = subprocess.run([sys.executable, "-m", "deploy.cli", "--state-dir", str(stack.state_dir), "ledger", *args,
                           "--json"], env=env, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode in (0, 1), f"alephant ledger {' '.join(args)} failed: {done.stderr}"
    return done.returncode, json.loads(done.stdout), done.stderr


def comparisons(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["name"]: c for c in report["comparisons"]}


def findings(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {f["check"]: f for f in report["findings"]}


async def test_rebuild_and_reconcile_agree_then_catch_tampering(stack: Stack) -> None:
    events, duplicate = workload()
    last_seq = await publish(stack, events, duplicate)
    await caught_up(stack, last_seq)
    ops = read_env_file(stack.state_dir / "ops.env")
    assert ops["ALEPHANT_S3_URL"] == stack.services["s3"].url and ops["ALEPHANT_NATS_USER"] == "admin"

    # 1. Both sources replay everything and fold to exactly the live tables.
    code, report, _ = cli(stack, "rebuild", "--from", "stream")
    assert code == 0 and report["equal"], report
    assert report["checkpoints"] == {"ledger": last_seq, "finance": last_seq}
    assert (report["replayed"], report["from_stream"], report["from_archive"]) == (last_seq, last_seq, 0)
    rows = comparisons(report)
    assert rows["journal"]["live_rows"] >= len(events)  # the stack's own config events are in it too
    # priced and unpriced calls, two legs per re-pricing, tool spend, payments out and in
    assert rows["dead_letters"]["live_rows"] == 2 and rows["transfers"]["live_rows"] == 120 + 20 + 2 * 5 + 3 * 25
    assert rows["run_outcome"]["live_rows"] == 7 and rows["finance_by_kind"]["differences"] == 0

    code, report, _ = cli(stack, "rebuild", "--from", "archive")
    assert code == 0 and report["equal"], report
    assert (report["replayed"], report["from_archive"], report["from_stream"]) == (last_seq, last_seq, 0)

    code, report, _ = cli(stack, "reconcile")
    assert code == 0 and report["ok"], report
    found = findings(report)
    assert set(found) == {"lag", "gaps", "balance", "accounts", "references", "transfers", "finance", "archive"}
    assert all(f["status"] == "ok" for f in found.values()), found
    assert "1 later copy of journalled events" in found["gaps"]["summary"]
    assert f"sequences 1..{last_seq}" in found["archive"]["summary"]

    # 2. A credit posted to an account behind the projector's back.
    tampered = agent_account("demo", "agent-0", "tool_cost")
    database_url = stack.child_env()["ALEPHANT_DATABASE_URL"]
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        cur = await conn.execute("UPDATE ledger_account SET credits_posted = credits_posted + 1000 WHERE id = %s "
                                 "RETURNING debits_posted, credits_posted", (tampered,))
        debits, credits = (await cur.fetchone()) or (0, 0)
    code, report, _ = cli(stack, "rebuild", "--from", "stream")
    assert code == 1 and not report["equal"]
    differing = {name: c for name, c in comparisons(report).items() if c["differences"]}
    assert list(differing) == ["accounts"]
    assert differing["accounts"]["samples"] == [
        {"key": [tampered], "live": ["USD", int(debits), int(credits)],
         "rebuilt": ["USD", int(debits), int(credits) - 1000]}]

    code, report, _ = cli(stack, "reconcile")
    assert code == 1 and not report["ok"]
    found = findings(report)
    assert {c for c, f in found.items() if f["status"] == "problem"} == {"balance", "accounts"}
    assert found["balance"]["samples"][0]["currency"] == "USD"
    assert found["balance"]["samples"][0]["credits"] - found["balance"]["samples"][0]["debits"] == 1000
    assert [s["account"] for s in found["accounts"]["samples"]] == [tampered]

    # 3. Undone; then a finance fact's amount changed instead.
    spend = next(e for e in events if isinstance(e, ToolSpend))
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        await conn.execute("UPDATE ledger_account SET credits_posted = credits_posted - 1000 WHERE id = %s",
                           (tampered,))
        await conn.execute("UPDATE finance_fact SET tool_cost_nanos = tool_cost_nanos + 500 WHERE event_id = %s",
                           (spend.event_id,))
    code, report, _ = cli(stack, "rebuild", "--from", "archive")
    assert code == 1
    assert {name for name, c in comparisons(report).items() if c["differences"]} == {"finance_by_run",
                                                                                     "finance_by_kind"}
    kind_diff = comparisons(report)["finance_by_kind"]["samples"]
    assert [s["key"] for s in kind_diff] == [[spend.workspace_id, "tool", "USD"]]

    code, report, _ = cli(stack, "reconcile", "--no-archive")
    assert code == 1
    found = findings(report)
    assert {c for c, f in found.items() if f["status"] == "problem"} == {"finance"}
    assert "archive" not in found
    [sample] = found["finance"]["samples"]
    assert (sample["workspace_id"], sample["currency"], sample["measure"]) == (spend.workspace_id, "USD", "tool_cost")
    assert sample["finance"] - sample["ledger"] == 500

    # 4. Undone; then a transfer whose event and accounts do not exist (ledger_transfer has no
    #    foreign keys: reconcile is what checks them).
    orphan, ghost_event = uuid.uuid4(), uuid.uuid4()
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        await conn.execute("UPDATE finance_fact SET tool_cost_nanos = tool_cost_nanos - 500 WHERE event_id = %s",
                           (spend.event_id,))
        await conn.execute(
            "INSERT INTO ledger_transfer (id, event_id, leg, debit_account_id, credit_account_id, amount, currency, "
            "code, workspace_id, created_at) VALUES (%s, %s, 0, 'agent:demo:ghost:llm_cost', "
            "'provider:demo:ghost:payable', 5, 'USD', 'llm_cost', 'demo', now())", (orphan, ghost_event))
    try:
        code, report, _ = cli(stack, "reconcile", "--no-archive")
        assert code == 1
        found = findings(report)
        assert {c for c, f in found.items() if f["status"] == "problem"} == {"references", "accounts"}
        assert found["references"]["samples"] == [{"transfer": str(orphan), "missing": (
            f"event {ghost_event}, debit account agent:demo:ghost:llm_cost, "
            "credit account provider:demo:ghost:payable")}]
    finally:
        async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
            await conn.execute("SET session_replication_role = replica")  # past the immutability trigger
            await conn.execute("DELETE FROM ledger_transfer WHERE id = %s", (orphan,))
    code, report, _ = cli(stack, "reconcile")
    assert code == 0, report


async def test_rebuild_stops_at_the_live_checkpoints_and_keeps_its_schema(stack: Stack) -> None:
    """A projector that is behind (here: stopped) is no difference: the rebuild folds each
    projection up to its own live checkpoint. Reconcile reports the lag past --max-lag."""
    stack.kill("projector")
    try:
        events, _ = workload(seed=11)
        last_seq = await publish(stack, events[:40], events[0])
        settings = load_settings({**stack.child_env(), "ALEPHANT_NATS_USER": "admin",
                                  "ALEPHANT_NATS_PASSWORD": read_env_file(stack.state_dir / "ops.env")[
                                      "ALEPHANT_NATS_PASSWORD"]})
        database_url = settings.database_url
        report = await rebuild(settings, keep=True, schema=f"rebuild_test_{uuid.uuid4().hex[:6]}")
        try:
            assert max(report.checkpoints.values()) < last_seq
            assert report.replayed == max(report.checkpoints.values())
            async with await psycopg.AsyncConnection.connect(database_url) as conn:
                cur = await conn.execute("SELECT last_seq FROM projector_checkpoint WHERE projector = 'ledger'")
                live = (await cur.fetchone() or (0,))[0]
                cur = await conn.execute(f'SELECT last_seq FROM "{report.schema}".projector_checkpoint '
                                         "WHERE projector = 'ledger'")
                rebuilt = (await cur.fetchone() or (0,))[0]
            assert rebuilt == live == report.checkpoints["ledger"]
            assert report.kept and report.equal, report
        finally:
            async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
                await conn.execute(f'DROP SCHEMA "{report.schema}" CASCADE')

        code, out, _ = cli(stack, "reconcile", "--max-lag", "5", "--no-archive")
        assert code == 1
        lag = findings(out)["lag"]
        assert lag["status"] == "problem" and {s["consumer"] for s in lag["samples"]} == {"ledger", "finance"}
    finally:
        stack.start_projector()
