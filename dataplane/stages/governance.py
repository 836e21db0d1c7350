"""Stages 6-7, governance before the call: policy, then limits and the budget hold; and the
settlement `finish` runs after the call.

* `policy`: the pure `schemas.policy.decide` over the policies on the request's path
  (workspace -> department -> member -> agent -> key, and its workflow). A refusal raises in the
  client's API shape (403 `policy_denied` / `outside_time_window` / `escalation_required`) and
  emits a `policy.decision` event naming the rule; so do clamps and strips. Plain allows are only
  counted (`WorkerState.policy_allows`).
* `admit`: every limit and budget on the path in ONE governor call (one Redis round trip; none
  when nothing is on the path). The hold is the call's worst case: an upper bound on its input
  tokens times the input price plus `max_tokens` times the output price; a call whose cost is
  known up front (`Call.fixed_cost_nanos`: the spend API) holds exactly that, with no tokens, and
  the policy stage sees it as the cost estimate. A request without
  `max_tokens` under a budget gets one injected: what the remaining budget can pay for, bounded by
  the model's output limit. Over a limit: 429 `rate_limit_exceeded` (with `Retry-After`) or
  `concurrency_limit_exceeded`; over a budget: 429 `insufficient_quota` / `budget_exceeded`.
* `settle`: the hold becomes the actual cost (0 when the call never reached a provider), off the
  request path.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import os
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from dataplane.call import Call
from dataplane.ports import Admission, AdmitRequest
from dataplane.pricing import call_unit_prices, hold_nanos
from schemas.entities import Budget, EscalationGrant, Limit, Policy, Workspace
from schemas.errors import BudgetExceeded, PermissionDenied, RateLimited
from schemas.events import BudgetAlert, PolicyDecision
from schemas.ids import uuid7
from schemas.policy import PolicyInput, Verdict, decide

ESCALATION_ID = "Alephant-Escalation-Id"
# Output tokens assumed for a model whose limit is unknown, when the gateway must bound a call
# that names no `max_tokens` (a provider option `max_output_tokens` overrides it).
DEFAULT_MAX_OUTPUT_TOKENS = 16_384
# Tokens are at least one byte of the request body each, most are 3-4; half the body's bytes
# plus a per-request margin bounds the input of text requests (images are not counted).
INPUT_MARGIN_TOKENS = 64


def input_bound(body_len: int) -> int:
    """An upper bound on the input tokens of a request whose JSON body is `body_len` bytes."""
    return body_len // 2 + INPUT_MARGIN_TOKENS


def scope_path(call: Call) -> tuple[tuple[str, str], ...]:
    """The (scope, id) pairs a request acts under, least specific first."""
    vk, ctx = call.vk, call.ctx
    path: list[tuple[str, str]] = [("workspace", vk.workspace_id)]
    if call.department_id:
        path.append(("department", call.department_id))
    if call.member_id:
        path.append(("member", call.member_id))
    if ctx.agent_id:
        path.append(("agent", ctx.agent_id))
    path.append(("key", vk.id))
    if ctx.workflow_id:
        path.append(("workflow", ctx.workflow_id))
    return tuple(path)


@dataclass(frozen=True, slots=True)
class OnPath:
    """The policies, limits and budgets attached anywhere on a request's path."""

    policies: tuple[Policy, ...] = ()
    limits: tuple[Limit, ...] = ()
    budgets: tuple[Budget, ...] = ()


NOTHING_ON_PATH = OnPath()
ON_PATH_MEMO_MAX = 100_000  # distinct (workspace, path) pairs a worker remembers


def _collect(index: Mapping[tuple[str, str, str], tuple[Policy | Limit | Budget, ...]], ws: str,
             path: tuple[tuple[str, str], ...]) -> OnPath:
    hits: tuple[Policy | Limit | Budget, ...] = ()
    for scope, scope_id in path:
        hit = index.get((ws, scope, scope_id))
        if hit:
            hits += hit
    if not hits:
        return NOTHING_ON_PATH
    return OnPath(policies=tuple(e for e in hits if isinstance(e, Policy)),
                  limits=tuple(e for e in hits if isinstance(e, Limit)),
                  budgets=tuple(e for e in hits if isinstance(e, Budget)))


def on_path(call: Call) -> OnPath:
    """What governs this call: one snapshot lookup per scope on its path (`Snapshot.governance`),
    memoized per worker for as long as that index is the same object (a config change to a
    policy, limit or budget replaces it), and kept on the call."""
    found = call.on_path
    if found is not None:
        return found
    index, ws, worker = call.snap.governance, call.vk.workspace_id, call.worker
    path = scope_path(call)
    memo = worker.on_path_memo
    if worker.on_path_index is not index or len(memo) >= ON_PATH_MEMO_MAX:
        memo.clear()
        worker.on_path_index = index
    found = memo.get((ws, path))
    if found is None:
        found = memo[(ws, path)] = _collect(index, ws, path)
    call.on_path = found
    return found


def max_output_tokens(call: Call) -> int:
    if call.target is None:
        return DEFAULT_MAX_OUTPUT_TOKENS
    option = call.target.provider.options.get("max_output_tokens", "")
    return int(option) if option.isdigit() and int(option) > 0 else DEFAULT_MAX_OUTPUT_TOKENS


def _unit(call: Call) -> tuple[int, int] | None:
    """Unit prices for the hold: the workspace's and platform prices, discounts included (the
    provider key is chosen after admission, so a price scoped to one key is not seen here). A
    router's call may end at any of its targets: it is held at the dearest of them."""
    if call.target is None:
        return None
    targets = call.route.targets if call.route is not None and len(call.route.targets) > 1 else (call.target,)
    units = [u for t in targets if (u := call_unit_prices(call.snap, t.provider.name, t.provider.type, t.model,
                                                          workspace_id=call.vk.workspace_id)) is not None]
    if not units:
        return None
    return (max(u[0] for u in units), max(u[1] for u in units))


def _estimate(call: Call, unit: tuple[int, int] | None) -> int:
    if call.fixed_cost_nanos is not None:
        return call.fixed_cost_nanos
    output = call.max_tokens if call.max_tokens is not None else max_output_tokens(call)
    return hold_nanos(unit, call.input_bound, output)


def _grant(call: Call) -> EscalationGrant | None:
    esc_id = call.request.headers.get(ESCALATION_ID)
    if not esc_id:
        return None
    grant = call.snap.escalations.get(esc_id)
    if grant is None or grant.key_id != call.vk.id or grant.expires_at_ms <= time.time() * 1000:
        return None
    return grant


def _policy_event(call: Call, outcome: str, code: str, rule: str, scope: str, scope_id: str, message: str,
                  escalation_id: str | None = None) -> PolicyDecision:
    ctx = call.ctx
    return PolicyDecision(
        event_id=uuid7(), occurred_at=dt.datetime.now(dt.UTC), workspace_id=call.vk.workspace_id,
        agent_id=ctx.agent_id, run_id=ctx.run_id, session_id=ctx.session_id, workflow_id=ctx.workflow_id,
        request_id=ctx.request_id, snapshot_revision=call.snap.revision, key_id=call.vk.id, outcome=outcome,
        code=code, rule=rule, scope=scope, scope_id=scope_id, message=message[:1000], endpoint=call.request.path,
        model=call.model_ref, escalation_id=escalation_id)


def _refuse(call: Call, verdict: Verdict) -> None:
    """Emit the refusal's `policy.decision` and raise it (an escalation creates its record)."""
    esc_id = None
    message = verdict.message
    if verdict.outcome == "escalate":
        esc_id = "esc_" + os.urandom(12).hex()
        message = f"{message} Escalation {esc_id} was created; retry with 'Alephant-Escalation-Id: {esc_id}' " \
                  "once an admin approves it."
    code = verdict.code or "policy_denied"
    call.worker.events.emit(_policy_event(call, verdict.outcome, code, verdict.rule, verdict.scope,
                                          verdict.scope_id, message, esc_id))
    call.decision = code
    raise PermissionDenied(message, code=code, param=verdict.rule or None)


def _allowed_targets(call: Call, policies: Sequence[Policy], ws: Workspace | None, req: PolicyInput,
                     now: dt.datetime) -> PolicyInput:
    """A router's targets that the policies allow (each decided as if the call went there): the
    others are dropped from the plan, so no fallback reaches them. The input for the first kept
    one is returned (the call's target is now it); with none kept, the first target's, which the
    caller refuses."""
    assert call.route is not None
    kept, first_req = [], None
    for target in call.route.targets:
        t_req = dataclasses.replace(req, model=f"{target.provider.name}/{target.model}",
                                    provider_type=target.provider.type)
        if decide(policies, call.vk, ws, t_req, now).outcome == "allow":
            kept.append(target)
            first_req = first_req or t_req
    if not kept or len(kept) == len(call.route.targets):
        return req
    call.route = dataclasses.replace(call.route, targets=tuple(kept))
    call.target = kept[0]
    assert first_req is not None
    return first_req


async def policy(call: Call) -> None:
    """Decide the request against its policies (see the module docstring). No-op, with no
    allocation beyond the path, when nothing on the path constrains anything."""
    vk, snap = call.vk, call.snap
    ws = snap.workspaces.get(vk.workspace_id)
    policies = on_path(call).policies
    if not policies and not vk.models_allow and not vk.providers_allow and (ws is None or not ws.providers_allow):
        call.worker.policy_allows += 1
        return
    unit = _unit(call)
    req = PolicyInput(endpoint=call.request.path, model=call.model_ref,
                      provider_type=call.target.provider.type if call.target else "", tools=call.tools,
                      max_tokens=call.max_tokens, est_cost_nanos=_estimate(call, unit), prompt=call.prompt_id or "")
    now = dt.datetime.now(dt.UTC)
    if call.route is not None and len(call.route.targets) > 1:
        req = _allowed_targets(call, policies, ws, req, now)
    verdict = decide(policies, vk, ws, req, now)
    if verdict.outcome == "escalate":
        grant = _grant(call)
        if grant is not None:
            if await call.worker.governor.use_escalation(vk.workspace_id, grant.id,
                                                         max(1, int(grant.expires_at_ms / 1000 - time.time()))):
                verdict = decide(policies, vk, ws, PolicyInput(
                    endpoint=req.endpoint, model=req.model, provider_type=req.provider_type, tools=req.tools,
                    max_tokens=req.max_tokens, est_cost_nanos=req.est_cost_nanos, escalation=grant,
                    prompt=req.prompt), now)
            else:
                verdict = Verdict(allowed=False, code="escalation_required", outcome="escalate", rule=verdict.rule,
                                  scope=verdict.scope, scope_id=verdict.scope_id,
                                  message=f"Escalation {grant.id} was already used (an approval admits one retry). "
                                          + verdict.message)
    if not verdict.allowed:
        _refuse(call, verdict)
    call.verdict = verdict
    for effect in verdict.effects:
        call.worker.events.emit(_policy_event(call, effect.kind, effect.kind, effect.rule, effect.scope,
                                              effect.scope_id, effect.detail))
    if verdict.strip_tools and not call.endpoint.strip_tools(call, verdict.strip_tools):
        _refuse(call, Verdict(allowed=False, code="policy_denied", outcome="deny", rule=verdict.effects[0].rule,
                              message="A policy strips tools from this request, which this endpoint cannot do."))
    if verdict.max_tokens is not None:
        if not call.endpoint.set_max_tokens(call, verdict.max_tokens):
            clamp = next(e for e in verdict.effects if e.kind == "clamp")
            _refuse(call, Verdict(allowed=False, code="policy_denied", outcome="deny", rule=clamp.rule,
                                  scope=clamp.scope, scope_id=clamp.scope_id,
                                  message=f"{clamp.detail} This endpoint forwards bodies unchanged, so the "
                                          "request is refused instead; send max_tokens within the cap."))
        call.max_tokens = verdict.max_tokens
    if not verdict.effects:
        call.worker.policy_allows += 1


async def admit(call: Call) -> None:
    """Limits and the budget hold, atomically (see the module docstring)."""
    if not call.endpoint.governed:
        return
    vk = call.vk
    governing = on_path(call)
    limits, budgets = governing.limits, governing.budgets
    if not limits and not budgets:
        return
    unit = _unit(call)
    if budgets and call.max_tokens is None and unit is not None and unit[1] > 0:
        # Inject what the smallest remaining budget (as last seen) can pay for after the input.
        hints = call.worker.budget_remaining
        remaining = min(hints.get(b.id, b.limit_nanos) for b in budgets)
        affordable = (remaining - hold_nanos(unit, call.input_bound, 0)) * 1_000_000 // unit[1]
        injected = max(1, min(affordable, max_output_tokens(call)))
        if call.endpoint.set_max_tokens(call, injected):
            call.max_tokens = injected
    call.hold_nanos = _estimate(call, unit) if budgets else 0
    tokens = 0 if call.fixed_cost_nanos is not None else \
        call.input_bound + (call.max_tokens if call.max_tokens is not None else max_output_tokens(call))
    admission = await call.worker.governor.admit(AdmitRequest(
        workspace_id=vk.workspace_id, request_id=call.ctx.request_id, limits=limits, budgets=budgets,
        tokens=tokens, hold_nanos=call.hold_nanos,
        now_ms=int(time.time() * 1000)))
    _admitted(call, admission, budgets)


async def reserve(call: Call, nanos: int) -> None:
    """Hold `nanos` against the call's budgets for a cost learned only during dispatch (an egress
    payment's price, read from the seller's 402): a second admission, of the budgets alone (the
    call already passed its limits) under a request id of its own, refused as `admit` refuses
    (429 `budget_exceeded`) before anything is spent. The call's first admission is settled at
    zero when the call finishes; this one at the call's cost (`settle`)."""
    budgets = on_path(call).budgets
    if not call.endpoint.governed or not budgets:
        return
    call.hold_nanos += nanos
    admission = await call.worker.governor.admit(AdmitRequest(
        workspace_id=call.vk.workspace_id, request_id=call.ctx.request_id + ":reserve", limits=(),
        budgets=budgets, tokens=0, hold_nanos=nanos, now_ms=int(time.time() * 1000)))
    first = call.admission
    _admitted(call, admission, budgets)
    if first is not None:
        call.held.callback(call.worker.governor.settle, first, 0, 0)


def _admitted(call: Call, admission: Admission, budgets: tuple[Budget, ...]) -> None:
    """Apply an admission's answer to the call: its headers, the budgets' remaining hints, the
    alerts it crossed; raise its refusal, or keep it as the call's admission."""
    call.extra_headers.update(admission.headers)
    if admission.remaining_nanos is not None:
        hints = call.worker.budget_remaining
        if len(hints) >= ON_PATH_MEMO_MAX:  # deleted budgets' hints: start over rather than grow
            hints.clear()
        for b in budgets:
            hints[b.id] = admission.remaining_nanos
    for crossing in admission.alerts:
        _alert(call, crossing.budget, crossing.threshold_pct, crossing.period_start, crossing.spent_nanos)
    if not admission.ok:
        call.decision = admission.code or "refused"
        headers = dict(admission.headers)
        if admission.code == "budget_exceeded":
            raise BudgetExceeded(admission.message, headers=headers)
        if admission.retry_after_s is not None:
            headers["Retry-After"] = str(max(1, round(admission.retry_after_s + 0.5)))
        raise RateLimited(admission.message, code=admission.code, headers=headers)
    call.admission = admission


def _alert(call: Call, budget: Budget, pct: int, period_start: str, spent: int) -> None:
    # One event per (budget, threshold, period) whoever reports it: the id is derived from them.
    event_id = uuid.uuid5(uuid.NAMESPACE_URL, f"alephant:budget.alert:{budget.id}:{pct}:{period_start}")
    call.worker.events.emit(BudgetAlert(
        event_id=event_id, occurred_at=dt.datetime.now(dt.UTC), workspace_id=budget.workspace_id,
        agent_id=call.ctx.agent_id, run_id=call.ctx.run_id, workflow_id=call.ctx.workflow_id,
        request_id=call.ctx.request_id, snapshot_revision=call.snap.revision, budget_id=budget.id,
        scope=budget.scope, scope_id=budget.scope_id, threshold_pct=pct, period_start=period_start,
        limit_nanos=budget.limit_nanos, spent_nanos=spent))


def settle(call: Call) -> None:
    """Turn the call's admission into its actual cost and tokens (never raises, never waits)."""
    admission = call.admission
    if admission is None:
        return
    call.admission = None
    usage = call.usage
    tokens = (usage.input_tokens + usage.output_tokens) if usage is not None else 0
    call.worker.governor.settle(admission, call.cost_nanos + call.side_cost_nanos, tokens)
