"""Unknown-key refusals, counted instead of recorded one by one.

A request whose key is unknown or malformed belongs to no workspace, and a key-guessing flood
must not become a flood of events. `RefusalCounter` tallies them per worker; `flush` emits one
`auth.refusals` event per interval with the counts by code and endpoint (the worker's task calls
it every `ALEPHANT_REFUSAL_FLUSH_S`), so "was this allowed?" still has an answer for them.
"""

from __future__ import annotations

import datetime as dt
import time
from dataclasses import dataclass, field

from dataplane.ports import EventSink
from schemas.events import AuthRefusals
from schemas.ids import uuid7

UNKNOWN_WORKSPACE = "_unknown"
MAX_ENDPOINTS = 64  # distinct paths kept per interval; the rest are counted under "other"


@dataclass
class RefusalCounter:
    count_total: int = 0
    codes: dict[str, int] = field(default_factory=dict)
    endpoints: dict[str, int] = field(default_factory=dict)
    since_ms: int = field(default_factory=lambda: int(time.time() * 1000))

    def count(self, code: str, path: str) -> None:
        self.count_total += 1
        self.codes[code] = self.codes.get(code, 0) + 1
        if path not in self.endpoints and len(self.endpoints) >= MAX_ENDPOINTS:
            path = "other"
        self.endpoints[path] = self.endpoints.get(path, 0) + 1

    def flush(self, sink: EventSink) -> AuthRefusals | None:
        """Emit what was counted since the last flush (nothing when nothing was) and start over."""
        now_ms = int(time.time() * 1000)
        if not self.count_total:
            self.since_ms = now_ms
            return None
        event = AuthRefusals(event_id=uuid7(), occurred_at=dt.datetime.now(dt.UTC), workspace_id=UNKNOWN_WORKSPACE,
                             count=self.count_total, window_start_ms=self.since_ms, window_end_ms=now_ms,
                             codes=self.codes, endpoints=self.endpoints)
        sink.emit(event)
        self.count_total, self.codes, self.endpoints, self.since_ms = 0, {}, {}, now_ms
        return event
