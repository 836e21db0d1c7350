"""dataplane/governor_plan.py: the PlanCache gives the same plans as building afresh, follows
budget windows and replaced entities, and the packed script fields carry any id intact."""

from __future__ import annotations

import datetime as dt

import msgspec

from dataplane.governor_plan import Plan, PlanCache, build_plan, netstring
from dataplane.ports import Admission, AdmitRequest
from schemas.entities import Budget, Limit

MONTH = Budget(id="bud_m", workspace_id="ws_1", scope="agent", scope_id="a1", period="month", limit_nanos=10**9,
               alert_at=(50, 80))
TOTAL = Budget(id="bud_t", workspace_id="ws_1", scope="workspace", scope_id="ws_1", period="total", limit_nanos=10**9)
LIMIT = Limit(id="lim_1", workspace_id="ws_1", scope="key", scope_id="k1", rpm=60, tpm=1000, concurrency=2)


def ms(year: int, month: int, day: int, hour: int = 0, minute: int = 0) -> int:
    return int(dt.datetime(year, month, day, hour, minute, tzinfo=dt.UTC).timestamp() * 1000)


def request(at_ms: int, *, limits: tuple[Limit, ...] = (LIMIT,), budgets: tuple[Budget, ...] = (MONTH, TOTAL),
            rid: str = "req_1", tokens: int = 100) -> AdmitRequest:
    return AdmitRequest(workspace_id="ws_1", request_id=rid, limits=limits, budgets=budgets, tokens=tokens,
                        hold_nanos=10**7, now_ms=at_ms)


def plan(req: AdmitRequest, cache: PlanCache | None = None) -> Plan:
    built = build_plan(req, cache)
    assert isinstance(built, Plan)
    return built


def test_netstrings_count_bytes() -> None:
    assert netstring("b:x,y:z") == "7:b:x,y:z,"
    assert netstring("é") == "2:é,"


def test_a_cached_plan_packs_what_a_fresh_one_does() -> None:
    cache = PlanCache()
    limits, budgets = (LIMIT,), (MONTH, TOTAL)
    for i, at in enumerate((ms(2025, 3, 9, 12), ms(2025, 3, 31, 23, 59), ms(2025, 4, 1), ms(2025, 4, 2))):
        req = request(at, limits=limits, budgets=budgets, rid=f"r{i}", tokens=10 * i)
        cached, fresh = plan(req, cache), plan(req)
        assert cached.admit_call(120_000, netstring("lease:w0")) == fresh.admit_call(120_000, netstring("lease:w0"))
        assert (cached.settle_call(5, 7, 900_000, redis_charged=True) ==
                fresh.settle_call(5, 7, 900_000, redis_charged=True))
        assert cached.void_call(900_000) == fresh.void_call(900_000)
        assert cached.extend_call(1, 2) == fresh.extend_call(1, 2)


def test_the_cache_follows_the_window_and_replaced_entities() -> None:
    cache = PlanCache()
    limits, budgets = (LIMIT,), (MONTH, TOTAL)
    march = plan(request(ms(2025, 3, 31, 23, 59), limits=limits, budgets=budgets), cache)
    april = plan(request(ms(2025, 4, 1), limits=limits, budgets=budgets), cache)
    assert [b.period_key for b in march.budgets] == ["2025-03", "total"]
    assert [b.period_key for b in april.budgets] == ["2025-04", "total"]
    assert "b:bud_m:2025-04" in april.admit_call(1, netstring("l"))[1]
    raised = msgspec.structs.replace(MONTH, limit_nanos=5 * 10**9)
    again = plan(request(ms(2025, 4, 2), limits=limits, budgets=(raised, TOTAL)), cache)
    assert again.budgets[0].budget.limit_nanos == 5 * 10**9
    assert ",5000000000," in again.admit_call(1, netstring("l"))[1]


def test_a_limit_of_zero_is_refused_without_io_every_time() -> None:
    cache = PlanCache()
    zero = (msgspec.structs.replace(LIMIT, rpm=0),)
    for _ in range(2):
        refused = build_plan(request(ms(2025, 3, 9), limits=zero), cache)
        assert isinstance(refused, Admission) and not refused.ok and refused.code == "rate_limit_exceeded"
        assert refused.message == "Rate limit lim_1 (key k1) allows no requests per minute."


def test_token_limiters_are_charged_the_tokens_and_request_limiters_one() -> None:
    p = plan(request(ms(2025, 3, 9), tokens=250))
    assert [(r.kind, q) for r, q in zip(p.rates, p.quantities, strict=True)] == [("rpm", 1), ("tpm", 250)]
