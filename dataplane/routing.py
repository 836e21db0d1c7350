"""Routing decisions: which upstream targets a call may go to, and in which order. Pure over the
snapshot, the request's facts and the worker's health view: no IO, the clock and the random pick
are arguments.

`route_plan` turns a request into a `RoutePlan`: a direct `provider/model` (or alias, or bare
name) is one target; a router (`/router/{id}/v1/...`, `model: "router/<name>"`, or the key's or
agent's default router for a model that names no provider) gives the targets of its first rule
that holds, else its own, each with its model remapped. `order` sorts a plan's targets by its
strategy and puts every target that cannot take a call now (ejected, cooling down, at its
in-flight cap) after the ones that can.

Strategies: `weighted` (one drawn by weight, then the rest by weight), `latency` (lowest EWMA of
total time, time to first byte before any finished; unmeasured first), `least_busy` (fewest in
flight on this worker), `cost` (cheapest input plus output price per token in the catalog;
unpriced last), `fallback` (as listed).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping
from dataclasses import dataclass

from dataplane.decisions import Target, resolve_model
from dataplane.health import HealthBoard, TargetKey
from dataplane.pricing import call_unit_prices
from schemas.entities import (
    ANY_REQUESTED,
    HealthPolicy,
    Provider,
    RetryPolicy,
    Router,
    RouterRule,
    RouterTarget,
    Timeouts,
)
from schemas.errors import InvalidRequest, NotFound
from schemas.snapshot import Snapshot

ROUTER_PREFIX = "router/"
DIRECT_RETRY = RetryPolicy(retries=0)  # a direct call is not retried unless its provider says so
DIRECT_HEALTH = HealthPolicy()
NO_TIMEOUTS = Timeouts()


@dataclass(frozen=True, slots=True)
class RequestFacts:
    """What a router's rules may look at."""

    model: str
    agent_id: str | None = None
    workflow_id: str | None = None
    properties: tuple[tuple[str, str], ...] = ()
    headers: Mapping[str, str] | None = None
    input_tokens: int = 0
    tools: bool = False


@dataclass(frozen=True, slots=True)
class RoutePlan:
    """The targets a call may use, before ordering, and how: the router (None: a direct call), the
    rule that picked the set ("" : the router's own), the strategy, retries, timeouts, health."""

    targets: tuple[Target, ...]
    router: Router | None = None
    rule: str = ""
    strategy: str = "fallback"
    retry: RetryPolicy = DIRECT_RETRY
    timeouts: Timeouts = NO_TIMEOUTS
    health: HealthPolicy = DIRECT_HEALTH


def _float_option(options: Mapping[str, str], name: str) -> float | None:
    try:
        value = float(options.get(name, ""))
    except ValueError:
        return None
    return value if value > 0 else None


def provider_timeouts(target: Target) -> Timeouts:
    """A provider's own timeouts, from its options (`connect_timeout_s`, `first_byte_timeout_s`,
    `total_timeout_s`, `idle_timeout_s`)."""
    o = target.provider.options
    return Timeouts(connect_s=_float_option(o, "connect_timeout_s"),
                    first_byte_s=_float_option(o, "first_byte_timeout_s"),
                    total_s=_float_option(o, "total_timeout_s"), idle_s=_float_option(o, "idle_timeout_s"))


# Per provider entity (by identity; a changed provider is a new object): its retry policy and
# timeouts, parsed from its options once rather than per request.
_provider_policy: dict[int, tuple[Provider, RetryPolicy, Timeouts]] = {}


def direct_route(target: Target) -> RoutePlan:
    """The plan of a call to one named target: its provider's retries and timeouts."""
    provider = target.provider
    cached = _provider_policy.get(id(provider))
    if cached is None or cached[0] is not provider:
        if len(_provider_policy) > 10_000:
            _provider_policy.clear()
        retries = provider.options.get("retries", "")
        retry = RetryPolicy(retries=min(int(retries), 5)) if retries.isdigit() else DIRECT_RETRY
        cached = _provider_policy[id(provider)] = (provider, retry, provider_timeouts(target))
    return RoutePlan(targets=(target,), retry=cached[1], timeouts=cached[2])


def find_router(snap: Snapshot, workspace_id: str, ref: str) -> Router:
    """A router of the workspace by id or by name; 404 `router_not_found` otherwise."""
    router = snap.routers.get(ref)
    if router is None or router.workspace_id != workspace_id:
        router = snap.routers_by_name.get((workspace_id, ref))
    if router is None:
        raise NotFound(f"The router '{ref}' does not exist in this workspace.", code="router_not_found",
                       param="model")
    return router


def routed(model: str, router_ref: str | None, bound_router: str | None) -> bool:
    """Whether a request may go through a router (else it is a direct call: no facts needed)."""
    return router_ref is not None or model.startswith(ROUTER_PREFIX) or (bound_router is not None and "/" not in model)


def direct_plan(snap: Snapshot, workspace_id: str, model: str) -> RoutePlan:
    return direct_route(resolve_model(snap, workspace_id, model))


def route_plan(snap: Snapshot, workspace_id: str, facts: RequestFacts, *, router_ref: str | None = None,
               bound_router: str | None = None) -> RoutePlan:
    """The plan for a request (see the module docstring). `router_ref`: the `/router/{id}` of the
    path; `bound_router`: the key's (else agent's) default router id."""
    model = facts.model
    if router_ref is not None:
        return _router_plan(snap, find_router(snap, workspace_id, router_ref), facts)
    if model.startswith(ROUTER_PREFIX):
        return _router_plan(snap, find_router(snap, workspace_id, model[len(ROUTER_PREFIX):]), facts)
    if bound_router is not None and "/" not in model and (workspace_id, model) not in snap.aliases:
        router = snap.routers.get(bound_router)
        if router is not None and router.workspace_id == workspace_id:
            return _router_plan(snap, router, facts)
    return direct_route(resolve_model(snap, workspace_id, model))


def _matches(rule: RouterRule, facts: RequestFacts) -> bool:
    w = rule.when
    if w.model and not any(fnmatch.fnmatchcase(facts.model, p) for p in w.model):
        return False
    if w.agent and not any(fnmatch.fnmatchcase(facts.agent_id or "", p) for p in w.agent):
        return False
    if w.workflow and not any(fnmatch.fnmatchcase(facts.workflow_id or "", p) for p in w.workflow):
        return False
    if w.properties:
        props = {k.lower(): v for k, v in facts.properties}
        if any(props.get(k.lower()) != v for k, v in w.properties.items()):
            return False
    if w.headers:
        headers = facts.headers or {}
        if any(headers.get(k) != v for k, v in w.headers.items()):
            return False
    if w.min_input_tokens is not None and facts.input_tokens < w.min_input_tokens:
        return False
    if w.max_input_tokens is not None and facts.input_tokens > w.max_input_tokens:
        return False
    return w.tools is None or w.tools == facts.tools


def requested_name(model: str) -> str:
    """The model name a router's `*` targets and `models` remaps see: the request's model without
    a `router/<name>` (nothing left) or a provider prefix."""
    if model.startswith(ROUTER_PREFIX):
        return ""
    return model.rpartition("/")[2]


def _target(snap: Snapshot, router: Router, spec: RouterTarget, requested: str) -> Target | None:
    provider_name, _, model = spec.model.partition("/")
    provider = snap.providers.get((router.workspace_id, provider_name))
    if provider is None:
        return None  # deleted since the router was saved: skipped, the others still serve
    if model == ANY_REQUESTED:
        if not requested:
            return None
        model = requested
    model = spec.models.get(requested, model) if requested else model
    return Target(provider=provider, model=model, key_id=spec.provider_key_id, weight=spec.weight)


# Plans by (router identity, rule index, requested model): a plan is a pure function of those and
# the router's providers, which the entry remembers (a changed router or provider is a new object).
_plans: dict[tuple[int, int, str], tuple[Router, Mapping[tuple[str, str], Provider], RoutePlan]] = {}


def _router_plan(snap: Snapshot, router: Router, facts: RequestFacts) -> RoutePlan:
    index = next((i for i, r in enumerate(router.rules) if _matches(r, facts)), -1)
    requested = requested_name(facts.model)
    memo = (id(router), index, requested)
    hit = _plans.get(memo)
    if hit is not None and hit[0] is router and hit[1] is snap.providers:
        return hit[2]
    plan = _build_plan(snap, router, router.rules[index] if index >= 0 else None, requested)
    if len(_plans) >= 10_000:
        _plans.clear()
    _plans[memo] = (router, snap.providers, plan)
    return plan


def _build_plan(snap: Snapshot, router: Router, rule: RouterRule | None, requested: str) -> RoutePlan:
    specs = rule.targets if rule is not None else router.targets
    targets = tuple(t for spec in specs if (t := _target(snap, router, spec, requested)) is not None)
    if not targets:
        if not requested and any(s.model.endswith("/" + ANY_REQUESTED) for s in specs):
            raise InvalidRequest(f"The router '{router.name}' forwards the requested model, but the request names "
                                 "none: call it as /router/{id}/v1/... with a model.", param="model")
        raise NotFound(f"The router '{router.name}' has no usable target: its providers are not configured.",
                       code="router_no_targets", param="model")
    return RoutePlan(targets=targets, router=router, rule=rule.name if rule is not None else "",
                     strategy=rule.strategy or router.strategy if rule is not None else router.strategy,
                     retry=router.retry, timeouts=router.timeouts, health=router.health)


def target_key(target: Target, key_id: str | None) -> TargetKey:
    return (target.provider.id, key_id or "", target.model)


def _weighted_first(targets: list[Target], pick: float) -> list[Target]:
    total = sum(max(t.weight, 0) for t in targets)
    if total <= 0 or len(targets) < 2:
        return targets
    point = pick * total
    chosen = targets[-1]
    for t in targets:
        point -= max(t.weight, 0)
        if point < 0:
            chosen = t
            break
    rest = sorted((t for t in targets if t is not chosen), key=lambda t: -t.weight)
    return [chosen, *rest]


def _cost(snap: Snapshot, workspace_id: str, target: Target) -> tuple[int, int]:
    unit = call_unit_prices(snap, target.provider.name, target.provider.type, target.model,
                            workspace_id=workspace_id, provider_key_id=target.key_id)
    return (0, unit[0] + unit[1]) if unit is not None else (1, 0)


def order(plan: RoutePlan, keys: list[TargetKey], board: HealthBoard, snap: Snapshot, workspace_id: str,
          pick: float, now: float) -> list[int]:
    """Indexes into `plan.targets` (with `keys[i]` the health key each would use), in the order to
    try them: the strategy's order among targets available now, then the unavailable ones by when
    they are available again. `pick` is uniform in [0, 1) (the weighted draw)."""
    idx = list(range(len(plan.targets)))
    if len(idx) > 1:
        strategy = plan.strategy
        if strategy == "weighted":
            ordered = _weighted_first([plan.targets[i] for i in idx], pick)
            idx = [plan.targets.index(t) for t in ordered]
        elif strategy == "latency":
            idx.sort(key=lambda i: th.latency_score() if (th := board.peek(keys[i])) is not None else 0.0)
        elif strategy == "least_busy":
            idx.sort(key=lambda i: th.in_flight if (th := board.peek(keys[i])) is not None else 0)
        elif strategy == "cost":
            idx.sort(key=lambda i: _cost(snap, workspace_id, plan.targets[i]))
    until = [board.unavailable_until(keys[i], plan.health, now) for i in range(len(plan.targets))]
    ready = [i for i in idx if not until[i]]
    later = sorted((i for i in idx if until[i]), key=lambda i: until[i])
    return ready + later
