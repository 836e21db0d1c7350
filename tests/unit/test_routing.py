"""Routing decisions and the worker's health view (dataplane/routing.py, dataplane/health.py):
route plans, rules and remapping, every strategy's order, ejection, cool-downs, the ejection cap
and the retry budget. Pure: the clock and the random pick are passed in."""

from __future__ import annotations

from collections import Counter

import pytest

from dataplane.attempts import retry_after_s
from dataplane.decisions import Target
from dataplane.health import HealthBoard, TargetKey
from dataplane.providers.upstream import map_upstream_error
from dataplane.routing import RequestFacts, RoutePlan, order, route_plan, target_key
from schemas.catalog import catalog_entries
from schemas.entities import (
    ConfigEntity,
    HealthPolicy,
    PriceOverride,
    Provider,
    RetryPolicy,
    RouteMatch,
    Router,
    RouterRule,
    RouterTarget,
    Workspace,
    kv_key,
)
from schemas.errors import InvalidRequest, NotFound
from schemas.snapshot import Snapshot

WS = "ws_r"
OAI = Provider(id="ws_r.oai", workspace_id=WS, name="oai", type="openai")
AZ = Provider(id="ws_r.az", workspace_id=WS, name="az", type="azure")
CLAUDE = Provider(id="ws_r.claude", workspace_id=WS, name="claude", type="anthropic")

MAIN = Router(id="rtr_main", workspace_id=WS, name="main", strategy="fallback",
              targets=(RouterTarget(model="oai/*"), RouterTarget(model="az/*", models={"gpt-4o": "gpt4o-prod"})),
              rules=(RouterRule(name="big", when=RouteMatch(min_input_tokens=1000),
                                targets=(RouterTarget(model="claude/claude-sonnet-4-5"),)),
                     RouterRule(name="tools-for-billing", when=RouteMatch(tools=True, properties={"team": "billing"}),
                                targets=(RouterTarget(model="az/tools-model"),), strategy="latency"),
                     RouterRule(name="agents", when=RouteMatch(agent=("research-*",), model=("gpt-4o*",)),
                                targets=(RouterTarget(model="claude/claude-haiku-4-5"),))))
GHOST = Router(id="rtr_ghost", workspace_id=WS, name="ghost", targets=(RouterTarget(model="gone/x"),))
OTHER_WS = Router(id="rtr_other", workspace_id="ws_x", name="main", targets=(RouterTarget(model="oai/x"),))

ENTITIES: list[ConfigEntity] = [
    Workspace(id=WS, name="r"), OAI, AZ, CLAUDE, MAIN, GHOST, OTHER_WS,
    PriceOverride(id="p1", provider="oai", model="m", input_per_mtok_nanos=5_000, output_per_mtok_nanos=5_000),
    PriceOverride(id="p2", provider="az", model="m", input_per_mtok_nanos=1_000, output_per_mtok_nanos=2_000),
]
SNAP = Snapshot.build({kv_key(e): e for e in ENTITIES}, 1)


def _plan(model: str, **facts: object) -> RoutePlan:
    return route_plan(SNAP, WS, RequestFacts(model=model, **facts), router_ref="main")  # type: ignore[arg-type]


def _refs(plan: RoutePlan) -> list[str]:
    return [f"{t.provider.name}/{t.model}" for t in plan.targets]


# --- plans: how a request reaches a router, rules, remapping ------------------------------------


def test_a_router_is_reached_by_path_id_name_or_model_and_remaps_the_requested_model() -> None:
    by_id = route_plan(SNAP, WS, RequestFacts(model="gpt-4o"), router_ref="rtr_main")
    by_name = route_plan(SNAP, WS, RequestFacts(model="gpt-4o"), router_ref="main")
    assert _refs(by_id) == _refs(by_name) == ["oai/gpt-4o", "az/gpt4o-prod"]  # `models` remaps on Azure
    assert by_id.router is MAIN and by_id.rule == ""
    assert _refs(_plan("o3")) == ["oai/o3", "az/o3"]  # no remap entry: the requested name
    assert _refs(_plan("oai/o3")) == ["oai/o3", "az/o3"]  # a provider prefix is not part of the name
    # `model: "router/<name>"` on /v1: a `*` target has no requested model to forward.
    with pytest.raises(InvalidRequest, match="names none"):
        route_plan(SNAP, WS, RequestFacts(model="router/main"))


def test_bound_router_takes_bare_names_only_and_unknown_routers_are_404() -> None:
    bound = route_plan(SNAP, WS, RequestFacts(model="gpt-4o"), bound_router="rtr_main")
    assert bound.router is MAIN
    direct = route_plan(SNAP, WS, RequestFacts(model="oai/gpt-4o"), bound_router="rtr_main")
    assert direct.router is None and _refs(direct) == ["oai/gpt-4o"]
    with pytest.raises(NotFound) as info:
        route_plan(SNAP, WS, RequestFacts(model="x"), router_ref="nope")
    assert info.value.code == "router_not_found" and "'nope'" in info.value.message
    with pytest.raises(NotFound):  # another workspace's router is not reachable, by id or name
        route_plan(SNAP, WS, RequestFacts(model="x"), router_ref="rtr_other")
    with pytest.raises(NotFound) as info:
        route_plan(SNAP, WS, RequestFacts(model="x"), router_ref="ghost")
    assert info.value.code == "router_no_targets" and "'ghost'" in info.value.message


def test_rules_pick_target_sets_by_request_facts_first_match_wins() -> None:
    assert _plan("gpt-4o", input_tokens=5000).rule == "big"
    assert _refs(_plan("gpt-4o", input_tokens=5000)) == ["claude/claude-sonnet-4-5"]
    billing = _plan("gpt-4o", tools=True, properties=(("Team", "billing"),))
    assert billing.rule == "tools-for-billing" and billing.strategy == "latency"
    assert _plan("gpt-4o", tools=False, properties=(("team", "billing"),)).rule == ""  # tools must be present
    assert _plan("gpt-4o-mini", agent_id="research-7").rule == "agents"
    assert _plan("o3", agent_id="research-7").rule == ""  # the model glob does not hold
    assert _plan("gpt-4o", agent_id="support-1").rule == ""


# --- strategies ------------------------------------------------------------------------------------


def _targets(*specs: tuple[Provider, str, int]) -> RoutePlan:
    return RoutePlan(targets=tuple(Target(provider=p, model=m, weight=w) for p, m, w in specs), router=MAIN,
                     strategy="fallback")


def _keys(plan: RoutePlan) -> list[TargetKey]:
    return [target_key(t, None) for t in plan.targets]


def _first(plan: RoutePlan, board: HealthBoard, strategy: str, pick: float = 0.5) -> str:
    p = RoutePlan(targets=plan.targets, router=plan.router, strategy=strategy, health=plan.health)
    t = p.targets[order(p, _keys(p), board, SNAP, WS, pick, board.clock())[0]]
    return t.provider.name


def test_weighted_order_follows_the_weights() -> None:
    plan = _targets((OAI, "m", 3), (AZ, "m", 1))
    board = HealthBoard(clock=lambda: 100.0)
    firsts = Counter(_first(plan, board, "weighted", pick=i / 1000) for i in range(1000))
    assert firsts == {"oai": 750, "az": 250}
    # The rest follow, so a failure of the drawn target falls back to the other.
    p = RoutePlan(targets=plan.targets, router=MAIN, strategy="weighted")
    assert order(p, _keys(p), board, SNAP, WS, 0.9, 100.0) == [1, 0]


def test_latency_least_busy_cost_and_fallback_orders() -> None:
    plan = _targets((OAI, "m", 1), (AZ, "m", 1))
    board = HealthBoard(clock=lambda: 100.0)
    oai, az = (board.get(k, WS, k[0]) for k in _keys(plan))
    assert _first(plan, board, "latency") == "oai"  # neither measured: as listed
    board.first_byte(oai, 80.0)
    board.finished(oai, 400.0)
    assert _first(plan, board, "latency") == "az"  # unmeasured targets get tried
    board.first_byte(az, 20.0)
    board.finished(az, 900.0)
    assert _first(plan, board, "latency") == "oai"  # total time decides once measured
    board.started(oai)
    board.started(oai)
    board.started(az)
    assert _first(plan, board, "least_busy") == "az"
    assert _first(plan, board, "cost") == "az"  # 3,000 vs 10,000 nano-USD per Mtok in+out
    assert _first(plan, board, "fallback") == "oai"


def test_unavailable_targets_go_last_in_every_strategy() -> None:
    now = [100.0]
    board = HealthBoard(clock=lambda: now[0])
    plan = _targets((OAI, "m", 9), (AZ, "m", 1))
    keys = _keys(plan)
    board.cooldowns[(OAI.id, "")] = 103.0
    for strategy in ("weighted", "latency", "least_busy", "cost", "fallback"):
        assert _first(plan, board, strategy, pick=0.0) == "az", strategy
    now[0] = 103.5  # the cool-down is over
    assert _first(plan, board, "fallback") == "oai"
    assert board.cooling_until((OAI.id, ""), now[0]) == 0.0
    th = board.get(keys[1], WS, "az")
    policy = HealthPolicy(max_in_flight=1)
    board.started(th)
    assert board.unavailable_until(keys[1], policy, now[0]) == now[0]  # at its in-flight cap
    board.ended(th)
    assert board.unavailable_until(keys[1], policy, now[0]) == 0.0


# --- ejection, cool-down, retry budget ----------------------------------------------------------


def test_consecutive_failures_eject_for_growing_times_and_a_success_resets_the_run() -> None:
    now = [0.0]
    board = HealthBoard(clock=lambda: now[0])
    policy = HealthPolicy(consecutive_failures=5, base_ejection_s=30, max_ejection_s=70)
    key: TargetKey = (OAI.id, "", "m")
    th = board.get(key, WS, "oai")
    for _ in range(4):
        board.started(th)
        assert board.failed(th, "upstream_error", policy, [key]) is False
    board.started(th)
    board.first_byte(th, 10.0)  # a success: the run starts over
    board.finished(th, 20.0)
    for i in range(5):
        board.started(th)
        assert board.failed(th, "upstream_error", policy, [key]) is (i == 4)
    assert th.ejected_until == 30.0 and th.ejections == 1
    now[0] = 31.0
    for _ in range(5):
        board.started(th)
        board.failed(th, "upstream_error", policy, [key])
    assert th.ejected_until == 31.0 + 60.0  # the second ejection lasts twice as long
    now[0] = 100.0
    for _ in range(5):
        board.started(th)
        board.failed(th, "upstream_error", policy, [key])
    assert th.ejected_until == 100.0 + 70.0  # capped
    assert th.in_flight == 0
    # Terminal errors (the request's fault) never count toward ejection.
    other = board.get((AZ.id, "", "m"), WS, "az")
    for _ in range(10):
        board.started(other)
        board.failed(other, "upstream_invalid_request", policy, [other.key], counts=False)
    assert other.ejected_until == 0.0 and other.failures == 10


def test_the_ejection_cap_keeps_part_of_a_target_set_in_rotation() -> None:
    board = HealthBoard(clock=lambda: 0.0)
    policy = HealthPolicy(consecutive_failures=1, max_ejected_percent=50)
    keys: list[TargetKey] = [(OAI.id, "", "m"), (AZ.id, "", "m"), (CLAUDE.id, "", "m")]
    ths = [board.get(k, WS, k[0]) for k in keys]
    results = []
    for th in ths:
        board.started(th)
        results.append(board.failed(th, "upstream_error", policy, keys))
    # One of three may always be ejected; a second would be 67% > 50%.
    assert results == [True, False, False]


def test_a_cool_down_belongs_to_the_credential_and_lasts_what_the_provider_asked() -> None:
    now = [10.0]
    board = HealthBoard(clock=lambda: now[0])
    policy = HealthPolicy()
    k1: TargetKey = (OAI.id, "pk_1", "gpt-4o")
    th = board.get(k1, WS, "oai")
    board.started(th)
    board.failed(th, "upstream_rate_limited", policy, [k1], counts=False, cool_s=3.0)
    assert board.unavailable_until((OAI.id, "pk_1", "o3"), policy, now[0]) == 13.0  # every model of the key
    assert board.unavailable_until((OAI.id, "pk_2", "gpt-4o"), policy, now[0]) == 0.0  # another key is not cooled
    assert th.consecutive_failures == 0  # a 429 with Retry-After is a pause, not a fault
    now[0] = 13.01
    assert board.unavailable_until(k1, policy, now[0]) == 0.0


def test_the_retry_budget_is_a_share_of_active_calls_with_a_minimum() -> None:
    board = HealthBoard()
    policy = RetryPolicy(budget_percent=20, min_retries=3)
    board.active = 10
    board.retries_in_flight = 2
    assert board.may_retry(policy)
    board.retries_in_flight = 3
    assert not board.may_retry(policy)  # max(3, 20% of 10) = 3
    board.active = 100
    assert board.may_retry(policy)  # 20% of 100 = 20
    board.retries_in_flight = 20
    assert not board.may_retry(policy)


def test_states_report_what_a_worker_used_with_wall_clock_times() -> None:
    now = [50.0]
    board = HealthBoard(clock=lambda: now[0])
    key: TargetKey = (OAI.id, "pk_1", "gpt-4o")
    th = board.get(key, WS, "oai")
    board.started(th)
    board.failed(th, "upstream_rate_limited", HealthPolicy(), [key], counts=False, cool_s=5.0)
    (state,) = board.states()
    assert (state.provider, state.model, state.provider_key_id, state.failures) == ("oai", "gpt-4o", "pk_1", 1)
    assert state.cooldown_until_ms is not None and state.ejected_until_ms is None
    assert state.last_error == "upstream_rate_limited"
    now[0] = 50.0 + 301  # unused for longer than the report window
    assert board.states() == ()


# --- upstream errors keep their status and whether they may be retried ------------------------------


@pytest.mark.parametrize(("status", "ours", "code", "retryable"), [
    (400, 400, "upstream_invalid_request", False),
    (401, 502, "upstream_auth_error", False),
    (404, 404, "model_not_found", False),
    (408, 504, "upstream_timeout", True),
    (409, 409, "upstream_conflict", True),  # a lock held upstream: retryable, and no longer a 400
    (422, 400, "upstream_invalid_request", False),
    (429, 429, "upstream_rate_limited", True),
    (500, 502, "upstream_error", True),
    (503, 503, "upstream_overloaded", True),
    (529, 503, "upstream_overloaded", True),
])
def test_a_mapped_upstream_error_keeps_the_providers_status_and_retryability(
        status: int, ours: int, code: str, retryable: bool) -> None:
    err = map_upstream_error("p", status, b'{"error": {"message": "nope sk-secret"}}', {"retry-after": "7"},
                             "sk-secret")
    assert (err.status, err.code, err.upstream_status, err.retryable) == (ours, code, status, retryable)
    assert "sk-secret" not in err.message
    if status in (429, 503, 529):
        assert retry_after_s(err) == 7.0  # the cool-down the attempt loop applies to that credential
    else:
        assert retry_after_s(err) is None


def test_routers_with_fixed_targets_are_listed_as_models() -> None:
    fixed = Router(id="rtr_fixed", workspace_id=WS, name="cheap", targets=(RouterTarget(model="az/m"),))
    snap = Snapshot.build({kv_key(e): e for e in [*ENTITIES, fixed]}, 2)
    ids = [e.id for e in catalog_entries(snap, WS)]
    assert "router/cheap" in ids
    assert "router/main" not in ids  # its `provider/*` targets need the request's model
    assert [e.id for e in catalog_entries(snap, "ws_x") if e.id.startswith("router/")] == ["router/main"]  # its own
