"""What a worker decides on its own when Redis is unreachable (`RedisGovernor`'s local mode), and
the GCRA arithmetic both modes share. No IO, no clock: callers pass `now_ms`.

* Rate limits fail OPEN onto a per-worker GCRA sized at the limit / fleet size (Envoy's
  `failure_mode_allowed`): the fleet as a whole stays near the global limit.
* Concurrency limits: a per-worker count, capped at the limit / fleet size.
* Budgets fail CLOSED onto this worker's lease: a slice of the budget the worker reserved in
  Redis (as a hold) while Redis was healthy. Requests are admitted while the lease covers their
  hold and the lease has not lapsed; beyond that they are refused.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class Gcra:
    """One GCRA decision: `ok`, the limiter's new theoretical arrival time (ms, only stored when
    ok), what remains after it, when the limiter is back to full (ms from now) and, when refused,
    how long until the same request would pass (ms)."""

    ok: bool
    new_tat: float
    remaining: int
    reset_ms: int
    retry_after_ms: int


def gcra(tat: float, now_ms: float, period_ms: float, limit: int, quantity: int) -> Gcra:
    """Charge `quantity` units to a limiter of `limit` units per `period_ms` whose stored arrival
    time is `tat` (0 = never used). The burst is the limit itself. Mirrors `governor_scripts.ADMIT`."""
    emission = period_ms / limit
    tat = max(tat, now_ms)
    new = tat + quantity * emission
    if new - now_ms <= period_ms + 0.001:
        return Gcra(True, new, math.floor((period_ms - (new - now_ms)) / emission + 1e-9), math.ceil(new - now_ms), 0)
    remaining = math.floor(max(0.0, period_ms - (tat - now_ms)) / emission + 1e-9)
    return Gcra(False, tat, remaining, math.ceil(tat - now_ms), math.ceil(new - now_ms - period_ms))


def local_share(limit: int, fleet_size: int) -> int:
    """This worker's share of a fleet-wide limit: limit / fleet, at least 1 (rates fail open)."""
    return max(1, limit // max(1, fleet_size))


@dataclass(slots=True)
class Lease:
    nanos: int
    expires_ms: int


@dataclass(slots=True)
class LocalState:
    """One worker's local limiter and its copy of its budget leases (keyed by the Redis key of the
    limiter / the budget's key prefix). One event loop: no locking."""

    tats: dict[str, float] = field(default_factory=dict)
    in_flight: dict[str, int] = field(default_factory=dict)
    leases: dict[str, Lease] = field(default_factory=dict)

    def rate(self, key: str, now_ms: int, period_ms: int, share: int, quantity: int) -> Gcra:
        """Decide one local rate limiter (not charged: `charge_rate` does that once all pass)."""
        return gcra(self.tats.get(key, 0.0), now_ms, period_ms, share, quantity)

    def charge_rate(self, key: str, decision: Gcra, now_ms: int) -> None:
        self.tats[key] = decision.new_tat
        if len(self.tats) > 10_000:  # limiters come and go with config; drop the ones at rest
            self.tats = {k: t for k, t in self.tats.items() if t > now_ms}

    def lease_covers(self, prefix: str, hold: int, now_ms: int) -> int:
        """What is left of the lease on budget `prefix` if it can pay `hold`, else -1 (none, lapsed
        or too small)."""
        lease = self.leases.get(prefix)
        if lease is None or lease.expires_ms <= now_ms or lease.nanos < hold:
            return -1
        return lease.nanos - hold

    def lease_left(self, prefix: str, now_ms: int) -> int:
        lease = self.leases.get(prefix)
        return 0 if lease is None or lease.expires_ms <= now_ms else lease.nanos

    def set_lease(self, prefix: str, nanos: int, expires_ms: int) -> None:
        if nanos <= 0:
            self.leases.pop(prefix, None)
        elif (lease := self.leases.get(prefix)) is not None:
            lease.nanos, lease.expires_ms = nanos, expires_ms
        else:
            self.leases[prefix] = Lease(nanos, expires_ms)

    def take_slot(self, key: str) -> None:
        self.in_flight[key] = self.in_flight.get(key, 0) + 1

    def release_slot(self, key: str) -> None:
        left = self.in_flight.get(key, 0) - 1
        if left > 0:
            self.in_flight[key] = left
        else:
            self.in_flight.pop(key, None)
