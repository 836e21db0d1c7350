"""The S3 archive of the raw stream, against the moto server the stack launches and the real
stream: the projector process's archiver writes gzip JSON-lines objects under the documented
layout, byte for byte what was published (poison included), and a SIGKILLed projector leaves
no hole in the archive once it is back. First, the pure object format: any bytes round-trip, and
objects are runs of consecutive sequences within one hour.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import gzip
import json
import re
import signal
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import pytest_asyncio
from hypothesis import given
from hypothesis import strategies as st
from nats.aio.client import Client as NATS
from nats.js.errors import NotFoundError

from deploy.stack import Stack
from events.archive import (
    ARCHIVE_CONSUMER,
    ArchiveStore,
    Record,
    decode_object,
    encode_object,
    key_range,
    merge_ranges,
    object_key,
    open_store,
    plan_objects,
)
from events.jetstream import connect
from events.publisher import EventPublisher
from schemas.events import LlmCall, Usage
from schemas.ids import uuid7
from schemas.settings import Settings, load_settings
from tests.conftest import dedicated_stack, wait_until_true

STREAM, PREFIX = "ALEPHANT_EVENTS", "events"
MAX_EVENTS = 40
KEY = re.compile(rf"^events/{STREAM}/dt=(\d{{4}}-\d{{2}}-\d{{2}})/hour=(\d{{2}})/(\d{{20}})-(\d{{20}})\.jsonl\.gz$")


T0 = dt.datetime(2026, 5, 1, 9, 59, 58, tzinfo=dt.UTC)


@given(st.lists(st.tuples(st.text(min_size=1, max_size=20), st.one_of(
    st.binary(max_size=64),
    st.builds(lambda before, v, after: before + json.dumps(v).encode() + after,
              st.sampled_from([b"", b" ", b"\t"]), st.recursive(
                  st.none() | st.booleans() | st.integers() | st.text(),
                  lambda inner: st.lists(inner) | st.dictionaries(st.text(), inner), max_leaves=8),
              st.sampled_from([b"", b"", b" ", b"\r\n"])),
)), max_size=20))
def test_any_message_round_trips_through_an_object(messages: list[tuple[str, bytes]]) -> None:
    records = [Record(seq, subject, data, T0) for seq, (subject, data) in enumerate(messages, start=1)]
    assert decode_object(encode_object(records)) == [(r.seq, r.subject, r.data) for r in records]


def test_objects_are_consecutive_runs_within_one_hour() -> None:
    def rec(seq: int, seconds: int) -> Record:
        return Record(seq, "events.ws.llm.call", b"{}", T0 + dt.timedelta(seconds=seconds))

    # 1-3 before 10:00, 4-5 after; 6 missing (a redelivery pending); 7 twice; at most 3 per object
    records = [rec(2, 0), rec(1, 0), rec(3, 1), rec(4, 2), rec(5, 3), rec(7, 4), rec(8, 4), rec(7, 4), rec(9, 5),
               rec(10, 5), rec(11, 6)]
    objects = plan_objects(records, max_events=3)
    assert [[r.seq for r in o] for o in objects] == [[1, 2, 3], [4, 5], [7, 8, 9], [10, 11]]
    keys = [object_key("S", o[0].stored_at, o[0].seq, o[-1].seq) for o in objects]
    assert keys[0] == "events/S/dt=2026-05-01/hour=09/00000000000000000001-00000000000000000003.jsonl.gz"
    assert keys[1].startswith("events/S/dt=2026-05-01/hour=10/")
    assert [key_range(k) for k in keys] == [(1, 3), (4, 5), (7, 9), (10, 11)]
    assert merge_ranges([(7, 9), (1, 3), (4, 5), (10, 11), (2, 3)]) == [(1, 5), (7, 11)]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with dedicated_stack(Path(tmp_path_factory.mktemp("archive")),
                         extra_env={"ALEPHANT_ARCHIVE_FLUSH_S": "0.3",
                                    "ALEPHANT_ARCHIVE_MAX_EVENTS": str(MAX_EVENTS)}) as s:
        yield s


@pytest.fixture(scope="module")
def settings(stack: Stack) -> Iterator[Settings]:
    """The projector's settings; the environment holds the placeholder AWS credentials the
    embedded S3 takes (boto reads them from there)."""
    env = stack.child_env()
    with pytest.MonkeyPatch.context() as mp:
        for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION"):
            mp.setenv(key, env[key])
        yield load_settings(env)


@pytest_asyncio.fixture
async def store(settings: Settings) -> AsyncIterator[ArchiveStore]:
    async with open_store(settings) as s:
        yield s


@pytest_asyncio.fixture
async def nc(stack: Stack) -> AsyncIterator[NATS]:
    client = await connect(stack.nats_url("admin"), "tests-archive")
    yield client
    await client.close()


def call(i: int) -> LlmCall:
    return LlmCall(event_id=uuid7(), occurred_at=dt.datetime.now(dt.UTC), workspace_id="demo", agent_id="demo-agent",
                   run_id=f"run-archive-{i % 5}", provider="mock", model="echo", cost_nanos=1000 + i,
                   usage=Usage(input_tokens=i, output_tokens=1))


async def archived_through(nc: NATS, seq: int, timeout: float = 60) -> None:
    async def done() -> bool:
        try:
            info = await nc.jetstream().consumer_info(STREAM, ARCHIVE_CONSUMER)
        except NotFoundError:
            return False
        return info.ack_floor is not None and info.ack_floor.stream_seq >= seq

    await wait_until_true(done, timeout=timeout)


async def test_archiver_writes_gzip_jsonl_objects_of_the_raw_stream(stack: Stack, store: ArchiveStore,
                                                                    nc: NATS) -> None:
    js = nc.jetstream()
    publisher = EventPublisher(js, stream=STREAM, subject_prefix=PREFIX)
    published: dict[int, tuple[str, bytes]] = {}
    before = dt.datetime.now(dt.UTC)
    for i in range(100):
        event = call(i)
        ack = await publisher.publish(event)
        published[ack.seq] = (f"{PREFIX}.demo.llm.call", publisher.encode(event).payload)
        if i == 50:  # poison: not JSON, with a newline and a NUL; the archive keeps it as it came
            poison = b"\xff\x00 not json\n{"
            ack = await js.publish(f"{PREFIX}.demo.llm.call", poison, stream=STREAM)
            published[ack.seq] = (f"{PREFIX}.demo.llm.call", poison)
    last = max(published)
    await archived_through(nc, last)
    after = dt.datetime.now(dt.UTC)

    objects = await store.archived(STREAM)
    assert merge_ranges((first, last_seq) for first, last_seq, _ in objects) == [(1, objects[-1][1])]
    lines: dict[int, tuple[str, bytes]] = {}
    parsed: dict[int, dict[str, object]] = {}
    for first, last_seq, key in objects:
        m = KEY.match(key)
        assert m is not None, key
        hours = {f"{t:%Y-%m-%d}/{t:%H}" for t in (before, after)}
        if first in published:
            assert f"{m.group(1)}/{m.group(2)}" in hours
        body = await store.get(key)
        raw = gzip.decompress(body).splitlines()
        assert len(raw) == last_seq - first + 1 <= MAX_EVENTS  # every sequence of the range, no more
        rows = [json.loads(line) for line in raw]
        assert [r["seq"] for r in rows] == list(range(first, last_seq + 1))
        parsed.update((r["seq"], r) for r in rows)
        for seq, subject, data in decode_object(body):
            lines[seq] = (subject, data)
    for seq, (subject, data) in published.items():
        assert lines[seq] == (subject, data), seq
    poison_seq = next(s for s, (_, d) in published.items() if d.startswith(b"\xff"))
    assert set(parsed[poison_seq]) == {"seq", "subject", "raw_b64"}
    good = parsed[last]
    assert set(good) == {"seq", "subject", "event"} and good["subject"] == f"{PREFIX}.demo.llm.call"
    assert isinstance(good["event"], dict) and good["event"]["type"] == "llm.call"


async def test_archiver_killed_mid_stream_leaves_no_gap(stack: Stack, store: ArchiveStore, nc: NATS) -> None:
    js = nc.jetstream()
    publisher = EventPublisher(js, stream=STREAM, subject_prefix=PREFIX)
    start = (await js.stream_info(STREAM)).state.last_seq
    await archived_through(nc, start)
    payloads: dict[int, bytes] = {}
    half = asyncio.Event()

    async def load() -> None:
        for i in range(300):
            event = call(i)
            ack = await publisher.publish(event)
            payloads[ack.seq] = publisher.encode(event).payload
            if i == 150:
                half.set()
            await asyncio.sleep(0.005)

    loading = asyncio.ensure_future(load())
    await half.wait()
    await archived_through(nc, start + 60)  # the archiver is mid-stream
    stack.kill("projector", signal.SIGKILL)
    await loading
    last = max(payloads)
    info = await js.consumer_info(STREAM, ARCHIVE_CONSUMER)
    assert info.ack_floor is not None and info.ack_floor.stream_seq < last  # killed before it was done
    stack.start_projector()
    await archived_through(nc, last)

    objects = await store.archived(STREAM)
    assert merge_ranges((first, last_seq) for first, last_seq, _ in objects) == [(1, objects[-1][1])]
    seen: dict[int, bytes] = {}
    for _, last_seq, key in objects:
        if last_seq <= start:
            continue
        for seq, _, data in decode_object(await store.get(key)):
            assert seen.setdefault(seq, data) == data  # an overlapping object repeats the same bytes
    assert all(seen[seq] == data for seq, data in payloads.items())


async def test_embedded_s3_keeps_the_archive_across_a_restart(stack: Stack, settings: Settings, nc: NATS) -> None:
    """Moto keeps objects in memory; the launcher's recording brings them back after a crash."""
    publisher = EventPublisher(nc.jetstream(), stream=STREAM, subject_prefix=PREFIX)
    await archived_through(nc, (await publisher.publish(call(0))).seq)
    async with open_store(settings) as store:
        before = {key: await store.get(key) for _, _, key in await store.archived(STREAM)}
    assert before
    s3 = stack.services["s3"]
    assert s3.proc is not None
    s3.proc.send_signal(signal.SIGKILL)
    s3.proc.wait(10)
    assert stack.supervise_once() == ["s3"]  # what `alephant dev` does for a service that died
    async with open_store(settings) as store:
        after = {key: await store.get(key) for _, _, key in await store.archived(STREAM)}
    assert after == before
    # and the archiver goes on writing to the restarted server
    ack = await publisher.publish(call(1))
    await archived_through(nc, ack.seq)
    async with open_store(settings) as store:
        assert (await store.archived(STREAM))[-1][1] == ack.seq
