"""The IO interfaces a worker holds (`WorkerState`). Stages and handlers talk to these, never to a
client library, so tests substitute them with plain objects (no `type: ignore`).

- `EventSink`: where events go (the spooled NATS publisher in production).
- `Governor`: limits and budgets, one atomic admission per request (Redis in production, with a
  local fallback), settlements off the request path.
- `IdempotencyStore`: fleet-wide `Idempotency-Key` records of the money-moving data-plane routes
  (`POST /v1/alephant/spend`; Redis in production, `dataplane.idempotency`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Protocol

from schemas.entities import Budget, Limit
from schemas.events import Event


class EventSink(Protocol):
    def emit(self, event: Event) -> None:
        """Queue `event` for publishing; never blocks, never raises (spooled to disk first)."""
        ...


@dataclass(frozen=True, slots=True)
class AdmitRequest:
    """Everything one admission checks, for the limits and budgets on a request's path.

    `tokens` is the estimated token count (input upper bound + max output) charged to tpm/tpd;
    `hold_nanos` the budget hold (a true upper bound on the call's cost when the provider honours
    `max_tokens`). `now_ms` is the caller's clock (epoch ms)."""

    workspace_id: str
    request_id: str
    limits: tuple[Limit, ...]
    budgets: tuple[Budget, ...]
    tokens: int
    hold_nanos: int
    now_ms: int


@dataclass(frozen=True, slots=True)
class BudgetCrossing:
    """A budget whose spent + held crossed an `alert_at` threshold in its current period (the
    governor reports each (budget, threshold, period) at most once)."""

    budget: Budget
    threshold_pct: int
    period_start: str
    spent_nanos: int


@dataclass(slots=True)
class Admission:
    """The outcome. `ok` False carries `code` (rate_limit_exceeded, concurrency_limit_exceeded,
    budget_exceeded), a `message` that names the limit or budget, and `retry_after_s` for rates.
    `headers` are the OpenAI-style x-ratelimit-* headers of the tightest request and token limits
    (empty when no limit is on the path). `mode` is "redis", "local" (Redis unreachable: local
    rate buckets and budget leases) or "none" (nothing on the path, no IO done)."""

    ok: bool
    code: str | None = None
    message: str = ""
    retry_after_s: float | None = None
    headers: dict[str, str] = field(default_factory=dict)
    mode: str = "none"
    hold_nanos: int = 0
    remaining_nanos: int | None = None  # the smallest remaining (limit - spent - held) after this hold
    alerts: tuple[BudgetCrossing, ...] = ()
    # Opaque to callers: what `settle` needs to undo or settle this admission.
    token: object = None


class Governor(Protocol):
    # Admissions this worker decided alone while the store was unreachable (a metric).
    local_admissions: int

    @property
    def store_healthy(self) -> bool:
        """False while the store is considered down (local mode: rates local, budgets on leases)."""
        ...

    async def admit(self, req: AdmitRequest) -> Admission:
        """One atomic check of every limit and budget in `req` (one Redis round trip): either all
        are charged (a request counted, a concurrency slot taken, a hold added to each budget) or
        none is. Never raises: Redis faults switch to local mode."""
        ...

    def settle(self, admission: Admission, cost_nanos: int, tokens: int) -> None:
        """Off the request path: turn the admission's holds into `cost_nanos` of spend on each
        budget (0 releases them), release its concurrency slots, and correct token limits to the
        actual `tokens`. Idempotent per admission; never raises."""
        ...

    async def use_escalation(self, workspace_id: str, escalation_id: str, ttl_s: int) -> bool:
        """Mark an approved escalation used: True the first time only, fleet-wide. False when the
        store is unreachable (an escalation fails closed)."""
        ...


class NoGovernor:
    """The governor of a worker built without a budget store (unit-test apps): nothing on a path
    may be admitted, so a budget or limit can never be silently ignored (it fails closed)."""

    local_admissions = 0
    store_healthy = False

    async def admit(self, req: AdmitRequest) -> Admission:
        return Admission(ok=False, code="budget_exceeded", message="This gateway has no budget store configured.")

    def settle(self, admission: Admission, cost_nanos: int, tokens: int) -> None:
        return None

    async def use_escalation(self, workspace_id: str, escalation_id: str, ttl_s: int) -> bool:
        return False


ClaimOutcome = Literal["claimed", "replay", "mismatch", "in_flight", "unavailable"]


@dataclass(frozen=True, slots=True)
class IdempotencyClaim:
    """What `IdempotencyStore.claim` found for a key.

    * `claimed`: no record; this request now owns it (in flight, `token`) until it completes or
      releases it, or the in-flight lease lapses.
    * `replay`: a finished request with the same fingerprint; its answer is `status` and `body`.
    * `mismatch`: a finished request with another fingerprint.
    * `in_flight`: a request with this key has not finished (whatever its fingerprint).
    * `unavailable`: the store could not be reached; nothing is recorded."""

    outcome: ClaimOutcome
    token: str = ""
    status: int = 0
    body: bytes = b""


class IdempotencyStore(Protocol):
    """Records per `(workspace, key id, Idempotency-Key)`: a request fingerprint, in flight or done,
    and the done request's answer. No method raises; an unreachable store is `unavailable` (or
    False), and the caller decides what that means."""

    async def claim(self, workspace_id: str, key_id: str, idempotency_key: str, fingerprint: str) -> IdempotencyClaim:
        """Atomically: claim the key for this request, or report the record already there."""
        ...

    async def complete(self, workspace_id: str, key_id: str, idempotency_key: str, token: str, status: int,
                       body: bytes) -> bool:
        """Record the claimed request's answer for the records' lifetime. False when the claim is
        no longer this request's (its lease lapsed) or the store is unreachable."""
        ...

    def release(self, workspace_id: str, key_id: str, idempotency_key: str, token: str) -> None:
        """Off the request path: forget a claim still in flight (the request failed before its
        effect), so a retry runs again. Never waits; a claim completed meanwhile is kept."""
        ...


class NoIdempotencyStore:
    """The store of a worker built without Redis (unit-test apps): every claim is `unavailable`."""

    async def claim(self, workspace_id: str, key_id: str, idempotency_key: str, fingerprint: str) -> IdempotencyClaim:
        return IdempotencyClaim(outcome="unavailable")

    async def complete(self, workspace_id: str, key_id: str, idempotency_key: str, token: str, status: int,
                       body: bytes) -> bool:
        return False

    def release(self, workspace_id: str, key_id: str, idempotency_key: str, token: str) -> None:
        return None
