"""`tests.bench.report` for the `router` target: against direct and the plain gateway (no timing here)."""

from __future__ import annotations

from typing import Any

from tests.bench.report import TARGET_NAMES, compare, comparison_table, routing, routing_table


def _result(scenario: str, target: str, rps: float, p50: float, **extra: Any) -> dict[str, Any]:
    return {"scenario": scenario, "target": target, "connections": int(scenario.split("c", 1)[0]),
            "stream": "non" not in scenario, "rps": rps, "p50_ms": p50, "p99_ms": p50, "ttfb_p50_ms": None,
            "errors": 0, "error_kinds": {}, **extra}


RESULTS = [
    _result("32c non-stream", "direct", 4000.0, 5.0),
    _result("32c non-stream", "gateway", 1000.0, 20.0, cpu_ms_per_req=0.5),
    _result("32c non-stream", "router", 900.0, 22.0, cpu_ms_per_req=0.55),
    _result("1c stream", "router", 300.0, 3.0, cpu_ms_per_req=None),
]


def test_router_is_a_bench_target_compared_with_direct_and_the_gateway() -> None:
    assert "router" in TARGET_NAMES
    rows = {(c["scenario"], c["target"]): c for c in compare(RESULTS)}
    router = rows[("32c non-stream", "router")]
    assert router["throughput_pct"] == 22.5 and router["vs_gateway_pct"] == 90.0
    assert router["added_p50_vs_gateway_ms"] == 2.0
    assert ("1c stream", "router") not in rows  # no direct run in that scenario
    assert "90.0%" in comparison_table(compare(RESULTS))


def test_routing_rows_give_both_ratios_and_the_worker_cpu_per_request() -> None:
    full, lone = routing(RESULTS)
    assert (full["router_vs_gateway"], full["router_vs_direct"]) == (0.9, 0.225)
    assert (full["gateway_cpu_ms_per_req"], full["router_cpu_ms_per_req"]) == (0.5, 0.55)
    assert abs(full["added_cpu_ms_per_req"] - 0.05) < 1e-12
    assert lone["router_vs_gateway"] is None and lone["added_cpu_ms_per_req"] is None
    table = routing_table([full, lone]).splitlines()
    assert "0.90x" in table[2] and "22.5%" in table[2] and "+0.050" in table[2]
    assert table[3].split()[-4:] == ["-", "-", "-", "-"]
    assert routing([r for r in RESULTS if r["target"] != "router"]) == []
