"""The local disk spool: every event a worker emits is on disk before its response completes.

Layout under the spool root (`ALEPHANT_SPOOL_DIR`, default `<state_dir>/spool`):

    slot-<n>/lock           flock'ed by the worker that owns the slot, for as long as it lives
    slot-<n>/<seq>.seg      append-only segments of framed records
    dead-letter.spool       records JetStream refused for good (same framing), for an operator

A record is `u32 body length | u32 crc32(body) | body`, body = `u16 len(msg_id) | u16
len(subject) | msg_id | subject | payload` (little-endian, UTF-8). A torn tail (a crash in the
middle of a write) fails its length or CRC check and is skipped on reading, with everything
before it kept.

Contracts:
- `append` is one `os.write` of the already-encoded bytes: in the page cache when it returns, so
  it survives the process being killed. With `fsync="always"` it is also fsynced (survives an OS
  crash); with `fsync="batch"` the publisher calls `sync()` once per flush interval (group commit).
- A record is `settle`d once JetStream acked it (or it was dead-lettered). A segment is deleted
  only when every record in it is settled and it is sealed (no more appends).
- `open` claims the lowest free slot with `fcntl.flock`, so several workers can share a state
  dir; slots whose owner died (their lock is free) are adopted: their segments move into the
  claimed slot, and every record found is returned for replay. Replaying an already-published
  record is harmless: JetStream dedups on the msg id within its window, the projector on the
  event id forever.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import itertools
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import structlog

log = structlog.get_logger(__name__)

FsyncPolicy = Literal["batch", "always"]

_FRAME = struct.Struct("<II")  # body length, crc32(body)
_HEAD = struct.Struct("<HH")  # len(msg_id), len(subject)
# Rotate a segment past this size; a fully settled active segment is rotated once past _ROTATE_MIN
# so that a crash replays little that was already published.
SEGMENT_BYTES = 4 * 1024 * 1024
_ROTATE_MIN = 64 * 1024
DEAD_LETTER_FILE = "dead-letter.spool"


@dataclass(frozen=True, slots=True)
class Record:
    msg_id: str
    subject: str
    payload: bytes


def encode_record(msg_id: str, subject: str, payload: bytes) -> bytes:
    """One framed record. Raises ValueError if the msg id or subject exceeds 65535 bytes."""
    mid, subj = msg_id.encode(), subject.encode()
    try:
        body = _HEAD.pack(len(mid), len(subj)) + mid + subj + payload
    except struct.error as exc:
        raise ValueError(f"msg id or subject too long for a spool record: {exc}") from None
    return _FRAME.pack(len(body), zlib.crc32(body)) + body


def decode_records(data: bytes) -> tuple[list[Record], int]:
    """The records framed in `data`, and the offset where valid framing ends (`len(data)` when
    the data is clean; less when the tail is torn or corrupt, and everything from there is
    ignored)."""
    records: list[Record] = []
    pos, end = 0, len(data)
    while pos + _FRAME.size <= end:
        length, crc = _FRAME.unpack_from(data, pos)
        start = pos + _FRAME.size
        if length < _HEAD.size or start + length > end:
            break
        body = data[start:start + length]
        if zlib.crc32(body) != crc:
            break
        mlen, slen = _HEAD.unpack_from(body)
        if _HEAD.size + mlen + slen > length:
            break
        try:
            mid = body[_HEAD.size:_HEAD.size + mlen].decode()
            subj = body[_HEAD.size + mlen:_HEAD.size + mlen + slen].decode()
        except UnicodeDecodeError:
            break
        records.append(Record(mid, subj, body[_HEAD.size + mlen + slen:]))
        pos = start + length
    return records, pos


class Segment:
    """One segment file and its bookkeeping; only the Spool mutates it."""

    __slots__ = ("dirty", "fd", "path", "records", "sealed", "settled", "size")

    def __init__(self, path: Path, fd: int, *, records: int = 0, size: int = 0, sealed: bool = False) -> None:
        self.path = path
        self.fd = fd  # -1 once closed (or for a segment recovered from disk)
        self.records = records
        self.settled = 0
        self.size = size
        self.sealed = sealed
        self.dirty = False


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _fsync_and_close(fds: list[int]) -> None:
    for fd in fds:
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _try_lock(slot: Path) -> int | None:
    """An fd holding the slot's exclusive flock, or None if another live process holds it."""
    slot.mkdir(parents=True, exist_ok=True)
    fd = os.open(slot / "lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def _segments(slot: Path) -> list[Path]:
    return sorted(p for p in slot.iterdir() if p.suffix == ".seg")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Spool:
    """The claimed slot of one worker. Not thread-safe: used from the event loop only."""

    def __init__(self, root: Path, slot: Path, lock_fd: int, *, fsync: FsyncPolicy,
                 segment_bytes: int = SEGMENT_BYTES) -> None:
        self.root = root
        self.slot = slot
        self._lock_fd = lock_fd
        self._always = fsync == "always"
        self._segment_bytes = segment_bytes
        self._active: Segment | None = None
        self._live: set[Segment] = set()
        self._dirty: list[Segment] = []
        self._dir_dirty = False
        self._next_seq = 1
        self.recovered: list[tuple[Record, Segment]] = []
        self.torn_bytes = 0

    @classmethod
    def open(cls, root: Path, *, fsync: FsyncPolicy = "batch", segment_bytes: int = SEGMENT_BYTES) -> Spool:
        """Claim a slot under `root`, adopt the slots of dead workers, and load every record
        found into `recovered` (in append order per segment) for the caller to replay."""
        root.mkdir(parents=True, exist_ok=True)
        for n in itertools.count():
            slot = root / f"slot-{n}"
            fd = _try_lock(slot)
            if fd is not None:
                spool = cls(root, slot, fd, fsync=fsync, segment_bytes=segment_bytes)
                break
        spool._adopt_orphans()
        spool._load()
        return spool

    def _adopt_orphans(self) -> None:
        existing = _segments(self.slot)
        self._next_seq = 1 + max((int(p.stem) for p in existing if p.stem.isdigit()), default=0)
        adopted = 0
        for other in sorted(self.root.glob("slot-*")):
            if other == self.slot or not other.is_dir():
                continue
            fd = _try_lock(other)
            if fd is None:
                continue  # a live worker owns it
            try:
                for seg in _segments(other):
                    os.rename(seg, self._new_path())
                    adopted += 1
                if adopted:
                    _fsync_dir(other)
            finally:
                os.close(fd)  # releases the flock; the empty slot stays for the next worker
        if adopted:
            _fsync_dir(self.slot)
            log.info("spool_adopted_segments", segments=adopted, slot=str(self.slot))

    def _load(self) -> None:
        for path in _segments(self.slot):
            data = path.read_bytes()
            records, valid = decode_records(data)
            if valid < len(data):
                self.torn_bytes += len(data) - valid
                log.warning("spool_torn_tail", segment=str(path), skipped_bytes=len(data) - valid,
                            records=len(records))
            if not records:
                path.unlink()
                continue
            seg = Segment(path, -1, records=len(records), size=valid, sealed=True)
            self._live.add(seg)
            self.recovered.extend((r, seg) for r in records)

    def _new_path(self) -> Path:
        path = self.slot / f"{self._next_seq:012d}.seg"
        self._next_seq += 1
        return path

    # ---- request path --------------------------------------------------------------------
    def append(self, msg_id: str, subject: str, payload: bytes) -> Segment:
        """Append one record (one `os.write`; plus an fsync under `fsync="always"`) and return
        the segment that holds it, to `settle` later. Raises OSError (disk full, ...) or
        ValueError (msg id or subject over 64 KiB)."""
        frame = encode_record(msg_id, subject, payload)
        seg = self._active
        if seg is None:
            path = self._new_path()
            seg = self._active = Segment(path, os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600))
            self._live.add(seg)
            self._dir_dirty = True
            if self._always:
                _fsync_dir(self.slot)
                self._dir_dirty = False
        _write_all(seg.fd, frame)
        seg.records += 1
        seg.size += len(frame)
        if self._always:
            os.fsync(seg.fd)
        elif not seg.dirty:
            seg.dirty = True
            self._dirty.append(seg)
        if seg.size >= self._segment_bytes:
            self._seal(seg)
        return seg

    # ---- publisher side ------------------------------------------------------------------
    async def sync(self) -> None:
        """Make every record appended so far durable (no-op under `fsync="always"`). The fsync
        runs in a thread on duplicated fds, so the loop keeps serving and appends continue."""
        if not self._dirty and not self._dir_dirty:
            return
        fds: list[int] = []
        for seg in self._dirty:
            seg.dirty = False
            if seg.fd >= 0:
                fds.append(os.dup(seg.fd))
                if seg.sealed:
                    self._close(seg)
        self._dirty.clear()
        if self._dir_dirty:
            self._dir_dirty = False
            fds.append(os.open(self.slot, os.O_RDONLY))
        await asyncio.to_thread(_fsync_and_close, fds)

    def settle(self, seg: Segment) -> None:
        """One record of `seg` is acked by JetStream (or dead-lettered): it may be deleted."""
        seg.settled += 1
        if seg.settled < seg.records:
            return
        if not seg.sealed:
            if seg.size < _ROTATE_MIN:
                return
            self._seal(seg)
        self._delete(seg)

    def dead_letter(self, msg_id: str, subject: str, payload: bytes) -> None:
        """Keep a record JetStream refused for good in `dead-letter.spool`, fsynced (rare)."""
        fd = os.open(self.root / DEAD_LETTER_FILE, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            _write_all(fd, encode_record(msg_id, subject, payload))
            os.fsync(fd)
        finally:
            os.close(fd)

    @property
    def unsettled(self) -> int:
        """Records on disk not yet acked by JetStream."""
        return sum(s.records - s.settled for s in self._live)

    def close(self) -> int:
        """Release the slot. Fully settled segments are deleted; the rest stay for the next
        worker to replay. Returns the number of unsettled records left on disk."""
        for seg in list(self._live):
            if seg.settled >= seg.records:
                self._delete(seg)
            elif seg.fd >= 0:
                if not self._always:
                    os.fsync(seg.fd)
                self._close(seg)
        self._active = None
        self._dirty.clear()
        left = self.unsettled
        os.close(self._lock_fd)
        return left

    # ---- internals -----------------------------------------------------------------------
    def _seal(self, seg: Segment) -> None:
        seg.sealed = True
        if self._active is seg:
            self._active = None
        if not seg.dirty:
            self._close(seg)  # a dirty one is closed by the next sync(), after its fsync

    def _close(self, seg: Segment) -> None:
        if seg.fd >= 0:
            os.close(seg.fd)
            seg.fd = -1

    def _delete(self, seg: Segment) -> None:
        self._close(seg)
        self._live.discard(seg)
        if seg.dirty:
            seg.dirty = False
            with contextlib.suppress(ValueError):
                self._dirty.remove(seg)
        with contextlib.suppress(FileNotFoundError):
            seg.path.unlink()
