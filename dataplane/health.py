"""What one worker knows about the health of the upstream targets it calls: in-flight counts,
latency EWMAs, consecutive failures and outlier ejections, `Retry-After` cool-downs, and the retry
budget. Routing reads it (`dataplane.routing.order`); the attempt loop (`dataplane.attempts`)
writes it. Per worker by design (no IO on the request path): the fleet's view is the union of the
workers' beats (`schemas.fleet.TargetState`, `GET /admin/v1/routers/{id}/health`).

A target here is (provider entity id, credential id, model). A cool-down belongs to the
credential, (provider, key), whatever the model: a provider's 429 says that key is throttled.

Ejection (Envoy's outlier detection, passive): `consecutive_failures` retryable failures in a row
eject a target for `base_ejection_s` x its ejection count (capped at `max_ejection_s`); a success
resets the run; at most `max_ejected_percent` of the target set it was chosen from is ejected at
once (one always may be). Ejected and cooled targets are tried only after every available one.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from schemas.entities import HealthPolicy, RetryPolicy
from schemas.fleet import MAX_REPORTED_TARGETS, TargetState

EWMA_ALPHA = 0.3
MAX_TRACKED = 4096  # targets remembered per worker; the least recently used are forgotten first
REPORTED_WITHIN_S = 300.0  # a beat lists targets used within this window

TargetKey = tuple[str, str, str]  # (provider id, credential id or "", model)
CoolKey = tuple[str, str]  # (provider id, credential id or "")


@dataclass(slots=True)
class TargetHealth:
    """One target's state on this worker (monotonic clock seconds)."""

    key: TargetKey
    workspace_id: str
    provider: str  # the provider's name, for reports
    in_flight: int = 0
    consecutive_failures: int = 0
    ejections: int = 0
    ejected_until: float = 0.0
    ewma_ttfb_ms: float | None = None
    ewma_total_ms: float | None = None
    successes: int = 0
    failures: int = 0
    last_used: float = 0.0
    last_error: str = ""
    # Set when an ejection's policy probes: (interval s, path); when it was last probed.
    probe: tuple[float, str] | None = None
    last_probe: float = 0.0

    def latency_score(self) -> float:
        """What latency routing sorts by: the total-time EWMA (time to first byte when no call
        has finished yet); 0 for a target never measured, so it gets tried."""
        if self.ewma_total_ms is not None:
            return self.ewma_total_ms
        return self.ewma_ttfb_ms or 0.0


def _ewma(prior: float | None, sample: float) -> float:
    return sample if prior is None else prior + EWMA_ALPHA * (sample - prior)


class HealthBoard:
    """The worker's table of `TargetHealth`, cool-downs and the retry budget. One event loop, no
    locks; `clock` is monotonic seconds (tests pass their own)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.targets: dict[TargetKey, TargetHealth] = {}
        self.cooldowns: dict[CoolKey, float] = {}
        self.active = 0  # calls between their first attempt and their end
        self.retries_in_flight = 0
        # Totals since start, for metrics: retries made, ejections, cool-downs begun, probe readmissions.
        self.retries_total = 0
        self.ejections_total = 0
        self.cooldowns_total = 0
        self.readmissions_total = 0

    def get(self, key: TargetKey, workspace_id: str, provider: str) -> TargetHealth:
        th = self.targets.get(key)
        if th is None:
            if len(self.targets) >= MAX_TRACKED:
                self._forget()
            th = self.targets[key] = TargetHealth(key=key, workspace_id=workspace_id, provider=provider)
        return th

    def peek(self, key: TargetKey) -> TargetHealth | None:
        return self.targets.get(key)

    def _forget(self) -> None:
        idle = sorted((th for th in self.targets.values() if th.in_flight == 0), key=lambda t: t.last_used)
        for th in idle[:max(1, len(idle) // 4)]:
            del self.targets[th.key]

    # --- what routing reads -------------------------------------------------------------------

    def cooling_until(self, key: CoolKey, now: float) -> float:
        """When the credential's cool-down ends (0.0: it is not cooling)."""
        until = self.cooldowns.get(key, 0.0)
        if until and until <= now:
            del self.cooldowns[key]
            return 0.0
        return until

    def unavailable_until(self, key: TargetKey, policy: HealthPolicy, now: float) -> float:
        """0.0 when the target may take a call now; else when it may again (ejection or cool-down
        end; `now` itself for a target at its in-flight cap, which frees up at any moment)."""
        until = self.cooling_until((key[0], key[1]), now)
        th = self.targets.get(key)
        if th is not None:
            if th.ejected_until > now:
                until = max(until, th.ejected_until)
            if policy.max_in_flight is not None and th.in_flight >= policy.max_in_flight:
                until = max(until, now)
        return until

    # --- what the attempt loop writes ---------------------------------------------------------

    def started(self, th: TargetHealth) -> None:
        th.in_flight += 1
        th.last_used = self.clock()

    def ended(self, th: TargetHealth) -> None:
        th.in_flight = max(0, th.in_flight - 1)

    def first_byte(self, th: TargetHealth, ttfb_ms: float) -> None:
        """The target answered (its first byte): a success for ejection purposes."""
        th.ewma_ttfb_ms = _ewma(th.ewma_ttfb_ms, ttfb_ms)
        th.consecutive_failures = 0
        th.successes += 1

    def finished(self, th: TargetHealth, total_ms: float) -> None:
        """A served call ended (its last byte): the total-time sample, and the slot freed."""
        th.ewma_total_ms = _ewma(th.ewma_total_ms, total_ms)
        self.ended(th)

    def failed(self, th: TargetHealth, reason: str, policy: HealthPolicy, peers: Iterable[TargetKey], *,
               counts: bool = True, cool_s: float | None = None) -> bool:
        """Record a failed attempt; True when it ejected the target. `counts`: the failure says
        something about the target (a retryable error); `cool_s`: the provider asked for a pause
        (`Retry-After` on a 429 or 529/503), which cools down the credential for exactly that."""
        now = self.clock()
        th.failures += 1
        th.last_error = reason
        self.ended(th)
        if cool_s is not None and cool_s > 0:
            cool = (th.key[0], th.key[1])
            self.cooldowns[cool] = max(self.cooldowns.get(cool, 0.0), now + cool_s)
            self.cooldowns_total += 1
        if not counts:
            return False
        th.consecutive_failures += 1
        if th.consecutive_failures < policy.consecutive_failures or th.ejected_until > now:
            return False
        set_keys = set(peers) | {th.key}
        ejected = sum(1 for k in set_keys if k != th.key and (p := self.targets.get(k)) is not None
                      and p.ejected_until > now)
        if ejected >= 1 and (ejected + 1) * 100 > policy.max_ejected_percent * len(set_keys):
            return False  # the cap: this set keeps enough targets in rotation
        th.ejections += 1
        self.ejections_total += 1
        th.consecutive_failures = 0
        th.ejected_until = now + min(policy.base_ejection_s * th.ejections, policy.max_ejection_s)
        th.probe = (policy.probe_interval_s, policy.probe_path) if policy.probe_interval_s else None
        th.last_probe = now
        return True

    def readmit(self, th: TargetHealth) -> None:
        """A health probe succeeded: the target takes traffic again (its ejection count stays)."""
        th.ejected_until = 0.0
        th.consecutive_failures = 0
        self.readmissions_total += 1

    # --- the retry budget ---------------------------------------------------------------------

    def may_retry(self, policy: RetryPolicy) -> bool:
        """Whether one more retry fits the budget: retries in flight stay under `budget_percent`
        of active calls, or `min_retries` (Envoy's retry budget)."""
        allowed = max(policy.min_retries, self.active * policy.budget_percent // 100)
        return self.retries_in_flight < allowed

    # --- reports ------------------------------------------------------------------------------

    def states(self) -> tuple[TargetState, ...]:
        """Targets used within `REPORTED_WITHIN_S`, for the worker's beat (wall-clock times)."""
        now, wall_ms = self.clock(), time.time() * 1000

        def wall(t: float) -> int | None:
            return int(wall_ms + (t - now) * 1000) if t > now else None

        out = []
        recent = sorted(self.targets.values(), key=lambda t: t.last_used, reverse=True)[:MAX_REPORTED_TARGETS]
        for th in recent:
            if now - th.last_used > REPORTED_WITHIN_S and th.in_flight == 0:
                continue
            provider_id, key_id, model = th.key
            out.append(TargetState(
                workspace_id=th.workspace_id, provider=th.provider, provider_id=provider_id, model=model,
                provider_key_id=key_id or None, in_flight=th.in_flight,
                consecutive_failures=th.consecutive_failures, ejections=th.ejections,
                ejected_until_ms=wall(th.ejected_until),
                cooldown_until_ms=wall(self.cooldowns.get((provider_id, key_id), 0.0)),
                ewma_ttfb_ms=None if th.ewma_ttfb_ms is None else round(th.ewma_ttfb_ms, 3),
                ewma_total_ms=None if th.ewma_total_ms is None else round(th.ewma_total_ms, 3),
                successes=th.successes, failures=th.failures, last_error=th.last_error))
        return tuple(out)
