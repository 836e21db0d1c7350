"""events/spool.py: framing, torn tails, replay, deletion after ack, slot locking and adoption."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from events.spool import DEAD_LETTER_FILE, Record, Segment, Spool, decode_records, encode_record

ids = st.text(min_size=1, max_size=40)
payloads = st.binary(max_size=2000)


@given(st.lists(st.tuples(ids, ids, payloads), max_size=20))
def test_framing_round_trips(records: list[tuple[str, str, bytes]]) -> None:
    data = b"".join(encode_record(*r) for r in records)
    decoded, valid = decode_records(data)
    assert [(r.msg_id, r.subject, r.payload) for r in decoded] == records
    assert valid == len(data)


@given(st.lists(st.tuples(ids, ids, payloads), min_size=1, max_size=8), st.data())
def test_a_torn_tail_keeps_every_whole_record_before_it(records: list[tuple[str, str, bytes]],
                                                         data: st.DataObject) -> None:
    frames = [encode_record(*r) for r in records]
    whole = b"".join(frames[:-1])
    cut = data.draw(st.integers(0, len(frames[-1]) - 1))
    decoded, valid = decode_records(whole + frames[-1][:cut])
    assert [(r.msg_id, r.subject, r.payload) for r in decoded] == records[:-1]
    assert valid == len(whole)


def test_a_corrupt_record_stops_reading_at_it() -> None:
    good, bad = encode_record("a", "s", b"one"), bytearray(encode_record("b", "s", b"two"))
    bad[-1] ^= 0xFF  # payload byte flipped: CRC mismatch
    decoded, valid = decode_records(good + bytes(bad) + encode_record("c", "s", b"three"))
    assert decoded == [Record("a", "s", b"one")]
    assert valid == len(good)


def _append(spool: Spool, n: int, start: int = 0) -> list[Segment]:
    return [spool.append(f"id-{i}", "events.ws.llm.call", b"x" * 100) for i in range(start, start + n)]


def test_replay_returns_every_unacked_record_in_order(tmp_path: Path) -> None:
    spool = Spool.open(tmp_path)
    _append(spool, 5)
    assert spool.close() == 5
    again = Spool.open(tmp_path)
    assert [r.msg_id for r, _ in again.recovered] == [f"id-{i}" for i in range(5)]
    assert again.unsettled == 5
    again.close()


def test_replay_skips_a_torn_tail(tmp_path: Path) -> None:
    spool = Spool.open(tmp_path)
    _append(spool, 3)
    spool.close()
    [segment] = list((tmp_path / "slot-0").glob("*.seg"))
    with segment.open("ab") as f:
        f.write(encode_record("torn", "s", b"p" * 50)[:30])  # a write cut by a crash
    again = Spool.open(tmp_path)
    assert [r.msg_id for r, _ in again.recovered] == ["id-0", "id-1", "id-2"]
    assert again.torn_bytes == 30
    again.close()


def test_segments_rotate_and_are_deleted_only_when_every_record_is_acked(tmp_path: Path) -> None:
    spool = Spool.open(tmp_path, segment_bytes=1000)
    segs = _append(spool, 25)  # ~130 bytes a record: several segments
    files = sorted((tmp_path / "slot-0").glob("*.seg"))
    assert len(files) >= 3
    first = segs[0]
    in_first = sum(1 for s in segs if s is first)
    for seg in segs[: in_first - 1]:
        spool.settle(seg)
    assert files[0].exists()  # one record of it still unacked
    spool.settle(segs[in_first - 1])
    assert not files[0].exists()
    for seg in segs[in_first:]:
        spool.settle(seg)
    assert spool.unsettled == 0
    assert spool.close() == 0
    assert list((tmp_path / "slot-0").glob("*.seg")) == []
    assert Spool.open(tmp_path).recovered == []


def test_a_fully_acked_active_segment_is_kept_until_close_when_small(tmp_path: Path) -> None:
    spool = Spool.open(tmp_path)
    for seg in _append(spool, 3):
        spool.settle(seg)
    assert len(list((tmp_path / "slot-0").glob("*.seg"))) == 1  # small: no rotation churn
    more = _append(spool, 2, start=3)
    spool.settle(more[0])
    assert spool.close() == 1
    assert [r.msg_id for r, _ in Spool.open(tmp_path).recovered] == ["id-0", "id-1", "id-2", "id-3", "id-4"]


async def test_sync_fsyncs_without_closing_the_active_segment(tmp_path: Path) -> None:
    spool = Spool.open(tmp_path, segment_bytes=500)
    segs = _append(spool, 6)
    await spool.sync()
    _append(spool, 2, start=6)  # appends keep working after a sync
    await spool.sync()
    for seg in segs:
        spool.settle(seg)
    assert spool.close() == 2


def test_fsync_always_still_appends_and_replays(tmp_path: Path) -> None:
    spool = Spool.open(tmp_path, fsync="always")
    _append(spool, 3)
    spool.close()
    assert len(Spool.open(tmp_path).recovered) == 3


def test_dead_letter_file_keeps_refused_records(tmp_path: Path) -> None:
    spool = Spool.open(tmp_path)
    spool.dead_letter("bad", "events.ws.llm.call", b"{}")
    records, _ = decode_records((tmp_path / DEAD_LETTER_FILE).read_bytes())
    assert records == [Record("bad", "events.ws.llm.call", b"{}")]
    spool.close()


def test_two_live_spools_get_different_slots(tmp_path: Path) -> None:
    a, b = Spool.open(tmp_path), Spool.open(tmp_path)  # flock is per open file: works in one process
    assert a.slot != b.slot
    _append(a, 2)
    _append(b, 3, start=10)
    # b is alive: a third spool must not adopt b's records.
    c = Spool.open(tmp_path)
    assert c.recovered == [] and c.slot not in (a.slot, b.slot)
    for s in (a, b, c):
        s.close()


def _child_spool(root: Path, n: int) -> subprocess.Popen[bytes]:
    """A process that spools `n` records and is then killed with its slot still locked."""
    code = textwrap.dedent(f"""
        import sys, time
        from pathlib import Path
        from events.spool import Spool
        s = Spool.open(Path({str(root)!r}))
        for i in range({n}):
            s.append(f"dead-{{i}}", "events.ws.llm.call", b"payload")
        print(s.slot.name, flush=True)
        time.sleep(60)
    """)
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, cwd=os.getcwd())


def test_a_dead_workers_slot_is_adopted_and_replayed(tmp_path: Path) -> None:
    live = Spool.open(tmp_path)  # slot-0 stays with a live worker
    child = _child_spool(tmp_path, 4)
    assert child.stdout is not None
    child_slot = child.stdout.readline().decode().strip()
    assert child_slot == "slot-1"
    blocked = Spool.open(tmp_path)  # the child still holds slot-1: nothing adopted
    assert blocked.recovered == [] and blocked.slot.name == "slot-2"
    blocked.close()
    child.kill()  # SIGKILL: no cleanup, the kernel drops its flock
    child.wait(10)
    child.stdout.close()
    restarted = Spool.open(tmp_path)
    assert restarted.slot.name == "slot-1"
    assert sorted(r.msg_id for r, _ in restarted.recovered) == [f"dead-{i}" for i in range(4)]
    restarted.close()
    live.close()


def test_orphan_slots_are_adopted_by_any_starting_worker(tmp_path: Path) -> None:
    # Three workers leave unacked records behind (e.g. WORKERS=3, then a restart with WORKERS=1).
    spools = [Spool.open(tmp_path) for _ in range(3)]
    for n, s in enumerate(spools):
        s.append(f"orphan-{n}", "events.ws.llm.call", b"p")
    assert [s.close() for s in spools] == [1, 1, 1]
    one = Spool.open(tmp_path)
    assert one.slot.name == "slot-0"
    assert sorted(r.msg_id for r, _ in one.recovered) == ["orphan-0", "orphan-1", "orphan-2"]
    assert [list(p.glob("*.seg")) for p in (tmp_path / "slot-1", tmp_path / "slot-2")] == [[], []]
    for _, seg in one.recovered:
        one.settle(seg)
    assert one.close() == 0
    assert not list(tmp_path.glob("slot-*/*.seg"))
