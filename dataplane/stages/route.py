"""Stage: route. Orders the call's targets (`dataplane.routing.order`: the plan's strategy over
this worker's health view), gives each its upstream credential (master-key resolution, a
router's pinned key, cooling keys passed over) and sets the call's deadline. The first target
becomes `call.target`; the attempt loop (`dataplane.attempts`) walks the rest on failure.

A call with a target but no plan (the passthrough names its provider) gets just its credential."""

from __future__ import annotations

import random

from dataplane.call import Call
from dataplane.decisions import TIMEOUT_MS, choose_provider_key, target_key
from dataplane.routing import RequestFacts, direct_plan, order, route_plan, routed
from dataplane.routing import target_key as health_key

MAX_CLIENT_TIMEOUT_MS = 24 * 3600 * 1000


def client_deadline_s(raw: str | None) -> float | None:
    """`Alephant-Timeout-Ms` in seconds, or None when absent or not a positive integer."""
    if raw is None or not raw.isdigit():
        return None
    ms = int(raw)
    return min(ms, MAX_CLIENT_TIMEOUT_MS) / 1000 if ms > 0 else None


async def route(call: Call) -> None:
    plan = call.route
    if plan is None:
        if call.target is not None:
            call.provider_key = choose_provider_key(call.snap, call.vk, call.target.provider, random.random())  # noqa: S311 (load spreading, not security)
        return
    board, snap, vk = call.worker.health, call.snap, call.vk
    now = board.clock()
    pick = random.random()  # noqa: S311 (load spreading, not security)
    choices = []
    for target in plan.targets:
        pid = target.provider.id

        def usable(key_id: str, pid: str = pid) -> bool:
            return not board.cooling_until((pid, key_id), now)

        key = target_key(snap, vk, target, pick, usable)
        choices.append((target, key, health_key(target, key.key_id)))
    ranked = order(plan, [c[2] for c in choices], board, snap, vk.workspace_id, pick, now)
    call.order = [choices[i] for i in ranked]
    call.target, call.provider_key = call.order[0][0], call.order[0][1]
    totals = [t for t in (plan.timeouts.total_s, client_deadline_s(call.request.headers.get(TIMEOUT_MS))) if t]
    if totals:
        call.deadline = call.started + min(totals)


ROUTER_ID = "router_id"  # the `/router/{router_id}/...` path parameter


def plan_route(call: Call, model: str) -> None:
    """Plan stage helper: the call's `RoutePlan` for `model` (`dataplane.routing.route_plan`),
    with its first target as `call.target`. A direct `provider/model` takes the fast path (no
    request facts are gathered for it). Needs `call.tools` and `call.input_bound` set."""
    snap, vk = call.snap, call.vk
    router_ref = call.request.match_info.get(ROUTER_ID)
    bound = vk.router_id
    if bound is None and call.ctx.agent_id is not None:
        agent = snap.agents.get(call.ctx.agent_id)
        bound = agent.router_id if agent is not None and agent.workspace_id == vk.workspace_id else None
    if not routed(model, router_ref, bound):
        call.route = direct_plan(snap, vk.workspace_id, model)
    else:
        ctx = call.ctx
        facts = RequestFacts(model=model, agent_id=ctx.agent_id, workflow_id=ctx.workflow_id,
                             properties=ctx.properties, headers=call.request.headers,
                             input_tokens=call.input_bound, tools=bool(call.tools))
        call.route = route_plan(snap, vk.workspace_id, facts, router_ref=router_ref, bound_router=bound)
    call.target = call.route.targets[0]
