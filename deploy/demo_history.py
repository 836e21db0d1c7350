"""Synthetic agent history for the demo workspace and the console's tests: a few agents' runs
over the last days (model calls, tool spend, cache hits, paid-endpoint revenue, run outcomes),
published as ordinary events to the stack's stream and folded by its projector, exactly like the
data plane's. Every event carries the property `demo=history`, so finance can tell it apart.

Deterministic: the same `seed`, workspace and day give the same events with the same ids, so
publishing twice (a restarted `alephant dev`) changes nothing (the ids are the stream's
`Nats-Msg-Id` and the projector's unique keys).
"""

from __future__ import annotations

import datetime as dt
import random
import uuid
from collections.abc import Sequence
from typing import Any

from schemas.events import CacheHit, Event, LlmCall, PaymentInbound, RunCompleted, ToolSpend, Usage

# (agent, workflow, models it calls, runs a day)
AGENTS: tuple[tuple[str, str, tuple[tuple[str, str, int, int], ...], int], ...] = (
    # model: (provider, model, input nano-USD per token, output nano-USD per token)
    ("research-agent", "market-research", (("openai", "gpt-4o", 2_500, 10_000),
                                           ("anthropic", "claude-sonnet-4", 3_000, 15_000)), 3),
    ("support-agent", "ticket-triage", (("openai", "gpt-4o-mini", 150, 600),), 6),
    ("coder-agent", "code-review", (("anthropic", "claude-sonnet-4", 3_000, 15_000),
                                    ("openai", "gpt-4o-mini", 150, 600)), 2),
)
_NAMESPACE = uuid.UUID("6c0d7a52-2f7e-4a83-9d8a-0e6f4b2f9c11")
PROPERTIES = {"demo": "history"}


def history(workspace_id: str, now: dt.datetime, *, days: int = 14, seed: str = "demo",
            agents: Sequence[tuple[str, str, tuple[tuple[str, str, int, int], ...], int]] = AGENTS) -> list[Event]:
    """The events of `days` days of runs ending at `now` (UTC), oldest first. A spike: the
    research agent's run three days ago costs several times its usual."""
    rng = random.Random(f"{seed}:{workspace_id}:{now.date().isoformat()}:{days}")  # noqa: S311 (demo data)
    start = (now - dt.timedelta(days=days - 1)).replace(hour=0, minute=0, second=0, microsecond=0)
    out: list[Event] = []
    serial = 0

    def ids() -> tuple[uuid.UUID, str]:
        nonlocal serial
        serial += 1
        event_id = uuid.uuid5(_NAMESPACE, f"{seed}:{workspace_id}:{now.date().isoformat()}:{days}:{serial}")
        return event_id, f"req_demo_{event_id.hex[:20]}"

    for day in range(days):
        day_start = start + dt.timedelta(days=day)
        for agent, workflow, models, runs_a_day in agents:
            for n in range(runs_a_day):
                at = day_start + dt.timedelta(minutes=rng.randint(0, 23 * 60))
                if at >= now:
                    continue
                run = f"run-{agent.split('-')[0]}-{day_start:%m%d}-{n + 1}"
                spike = agent == agents[0][0] and day == days - 4 and n == 0
                env: dict[str, Any] = {"workspace_id": workspace_id, "agent_id": agent, "run_id": run,
                                       "workflow_id": workflow}
                for _ in range(rng.randint(2, 5) * (4 if spike else 1)):
                    provider, model, per_in, per_out = rng.choice(models)
                    event_id, request_id = ids()
                    status = 200 if rng.random() > 0.04 else rng.choice((429, 500, 503))
                    usage = Usage(input_tokens=rng.randint(300, 4_000),
                                  output_tokens=rng.randint(50, 900) if status == 200 else 0)
                    cost = usage.input_tokens * per_in + usage.output_tokens * per_out if status == 200 else 0
                    out.append(LlmCall(event_id=event_id, occurred_at=at, request_id=request_id, provider=provider,
                                       model=model, status=status, usage=usage, cost_nanos=cost,
                                       latency_ms=float(rng.randint(300, 4_000)), properties=PROPERTIES,
                                       price_source="catalog", **env))
                    at += dt.timedelta(seconds=rng.randint(2, 40))
                    if rng.random() < 0.2:
                        event_id, request_id = ids()
                        saved = rng.randint(300, 2_000) * per_in
                        out.append(CacheHit(event_id=event_id, occurred_at=at, request_id=request_id,
                                            provider=provider, model=model, saved_nanos=saved, **env))
                if agent == "research-agent" and rng.random() < 0.6:
                    event_id, request_id = ids()
                    out.append(ToolSpend(event_id=event_id, occurred_at=at, request_id=request_id,
                                         spend_id=f"tool-{event_id.hex[:12]}", vendor="serpapi",
                                         amount_nanos=rng.randint(1, 5) * 5_000_000, **env))
                if agent == "research-agent":
                    event_id, request_id = ids()
                    out.append(PaymentInbound(event_id=event_id, occurred_at=at, request_id=request_id,
                                              payment_id=f"pay-{event_id.hex[:12]}", amount_nanos=50_000_000,
                                              rail="x402", endpoint_id="market-report", **env))
                event_id, _ = ids()
                out.append(RunCompleted(event_id=event_id, occurred_at=at + dt.timedelta(seconds=5),
                                        outcome="succeeded" if rng.random() > 0.1 else "failed", **env))
    out.sort(key=lambda e: e.occurred_at)
    return out


async def publish(nats_url: str, stream: str, subject_prefix: str, events: Sequence[Event]) -> int:
    """Publish `events` to the stream (deduplicated by event id); returns how many were new."""
    from events.jetstream import connect
    from events.publisher import EventPublisher

    nc = await connect(nats_url, "alephant-demo-history")
    try:
        publisher = EventPublisher(nc.jetstream(), stream=stream, subject_prefix=subject_prefix)
        new = 0
        for event in events:
            ack = await publisher.publish(event)
            new += 0 if ack.duplicate else 1
        return new
    finally:
        await nc.close()


# -- a pending escalation for the console's queue ---------------------------------------------------

REVIEW_AGENT = "review-agent"
PREMIUM = "premium"  # a mock provider priced like a frontier model, so a long answer needs approval


def escalation_request(model: str = f"{PREMIUM}/echo") -> dict[str, object]:
    """A request the review agent's policy escalates: 1000 output tokens estimate $0.015."""
    return {"model": model, "max_tokens": 1000,
            "messages": [{"role": "user", "content": "Draft the quarterly spend review."}]}


def seed_escalation(admin: object, workspace_id: str, gateway_url: str, key: str | None,
                    live_keys: set[str], key_id: str | None) -> tuple[str, str, str | None]:
    """The review agent (a key bound to it, a policy escalating calls estimated above $0.01, a
    `premium` mock provider at $15/MTok output) and one escalated request, unless one is already
    pending. Returns (key, key id, the pending escalation's id or None)."""
    import json
    import time
    import urllib.error
    import urllib.request

    call = admin.call  # type: ignore[attr-defined]
    call("POST", "/admin/v1/agents", {"workspace_id": workspace_id, "id": REVIEW_AGENT, "name": "Review agent"},
         ok=(201, 202, 409))
    call("POST", "/admin/v1/providers", {"workspace_id": workspace_id, "name": PREMIUM, "type": "mock",
                                         "options": {"enabled": "true"}})
    call("POST", "/admin/v1/prices", {"provider": PREMIUM, "model": "*", "scope": "workspace",
                                      "workspace_id": workspace_id, "input_per_mtok_nanos": 3_000_000_000,
                                      "output_per_mtok_nanos": 15_000_000_000})
    policies = call("GET", f"/admin/v1/policies?workspace_id={workspace_id}")["data"]
    if not any(p.get("scope_id") == REVIEW_AGENT and p.get("escalate_over_usd") for p in policies):
        call("POST", "/admin/v1/policies", {"workspace_id": workspace_id, "scope": "agent", "scope_id": REVIEW_AGENT,
                                            "escalate_over_usd": "0.01"})
    if not key or key_id not in live_keys:
        created = call("POST", "/admin/v1/virtual-keys", {"workspace_id": workspace_id, "name": REVIEW_AGENT,
                                                          "agent_id": REVIEW_AGENT})
        key, key_id = created["key"], created["id"]
    assert key is not None and key_id is not None
    pending = call("GET", f"/admin/v1/escalations?workspace_id={workspace_id}&status=pending")["data"]
    if pending:
        return key, key_id, str(pending[0]["id"])
    body = json.dumps(escalation_request()).encode()
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:  # until the policy and key reached the worker
        req = urllib.request.Request(f"{gateway_url}/chat/completions", data=body, method="POST", headers={  # noqa: S310
            "Authorization": f"Bearer {key}", "Content-Type": "application/json",
            "Alephant-Agent-Id": REVIEW_AGENT, "Alephant-Run-Id": "run-review-1"})
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:  # noqa: S310 (our own loopback gateway)
                resp.read()
        except urllib.error.HTTPError as err:
            error = json.loads(err.read() or b"{}").get("error", {})
            if error.get("code") == "escalation_required":
                break
        time.sleep(0.3)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:  # the escalation row is written from the event
        pending = call("GET", f"/admin/v1/escalations?workspace_id={workspace_id}&status=pending")["data"]
        if pending:
            return key, key_id, str(pending[0]["id"])
        time.sleep(0.3)
    return key, key_id, None
