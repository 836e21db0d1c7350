"""`tests.bench.report`: the pure comparisons behind `make bench`'s tables (no timing here)."""

from __future__ import annotations

from typing import Any

from tests.bench.report import (
    compare,
    comparison_table,
    governance,
    governance_table,
    observability,
    observability_table,
    results_table,
    scaleout_lines,
)


def _result(scenario: str, target: str, rps: float, p50: float | None, **extra: Any) -> dict[str, Any]:
    connections = int(scenario.split("c", 1)[0])
    return {"scenario": scenario, "target": target, "connections": connections, "stream": "non" not in scenario,
            "rps": rps, "p50_ms": p50, "p99_ms": p50, "ttfb_p50_ms": None, "errors": 0, "error_kinds": {}, **extra}


RESULTS = [
    _result("32c non-stream", "direct", 4000.0, 5.0),
    _result("32c non-stream", "gateway", 1000.0, 20.0, cpu_ms_per_req=0.5, redis_evalsha_per_req=0.0,
            redis_reads_per_req=0.01),
    _result("32c non-stream", "governed", 850.0, 24.0, cpu_ms_per_req=0.6, redis_evalsha_per_req=2.0,
            redis_reads_per_req=1.1),
    _result("1c non-stream", "direct", 2000.0, 0.4),
    _result("1c non-stream", "governed", 500.0, None),
]


def test_compare_gives_each_gateway_target_against_direct_and_governed_against_the_gateway() -> None:
    rows = {(c["scenario"], c["target"]): c for c in compare(RESULTS)}
    assert list(rows) == [("32c non-stream", "gateway"), ("32c non-stream", "governed"), ("1c non-stream", "governed")]
    assert rows[("32c non-stream", "gateway")]["throughput_pct"] == 25.0
    assert "vs_gateway_pct" not in rows[("32c non-stream", "gateway")]
    governed = rows[("32c non-stream", "governed")]
    assert governed["throughput_pct"] == 21.25
    assert governed["vs_gateway_pct"] == 85.0
    assert governed["added_p50_ms"] == 19.0 and governed["added_p50_vs_gateway_ms"] == 4.0
    lone = rows[("1c non-stream", "governed")]  # no gateway run, no successes: nothing to subtract
    assert lone["vs_gateway_pct"] is None and lone["added_p50_ms"] is None


def test_governance_pairs_gateway_and_governed_runs_with_their_server_costs() -> None:
    (row,) = governance(RESULTS)
    assert row["scenario"] == "32c non-stream"
    assert row["governed_vs_gateway"] == 0.85
    assert abs(row["added_cpu_ms_per_req"] - 0.1) < 1e-12
    assert row["governed_evalsha_per_req"] == 2.0 and row["governed_redis_reads_per_req"] == 1.1


def test_tables_render_missing_measurements_as_dashes() -> None:
    assert "-" in results_table(RESULTS).splitlines()[-1]
    assert "85.0%" in comparison_table(compare(RESULTS))
    table = governance_table(governance(RESULTS))
    assert "0.85x" in table and "+0.100" in table
    assert governance([_result("1c stream", "governed", 1.0, 1.0)]) == []


def test_median_run_reports_the_middle_round_whole_with_every_rounds_throughput() -> None:
    from tests.bench.run import median_run

    runs = [_result("32c stream", "governed", rps, p50) for rps, p50 in ((900.0, 9.0), (700.0, 7.0), (800.0, 8.0))]
    median = median_run(runs)
    assert (median["rps"], median["p50_ms"]) == (800.0, 8.0)  # one run's figures, not a mix
    assert median["rounds_rps"] == [900.0, 700.0, 800.0]
    assert median_run(runs[:2])["rps"] == 700.0  # an even count takes the lower middle
    table = results_table([median])
    assert "700-900" in table


def test_observability_sets_the_observed_stack_against_the_plain_gateway() -> None:
    results = [*RESULTS,
               _result("32c non-stream", "observed", 920.0, 21.5, cpu_ms_per_req=0.55),
               _result("1c non-stream", "observed", 450.0, 2.0)]  # no gateway run in 1c: no row
    (row,) = observability(results)
    assert row["scenario"] == "32c non-stream"
    assert row["observed_vs_gateway"] == 0.92
    assert abs(row["added_cpu_ms_per_req"] - 0.05) < 1e-12 and row["added_p50_ms"] == 1.5
    observed = {(c["scenario"], c["target"]): c for c in compare(results)}[("32c non-stream", "observed")]
    assert observed["vs_gateway_pct"] == 92.0
    table = observability_table([row])
    assert "0.92x" in table and "+0.050" in table and ">= 0.9x" in table
    assert row["traced_vs_gateway"] is None and "-" in table.splitlines()[2]  # no traced run
    (both,) = observability([*results, _result("32c non-stream", "traced", 960.0, 21.0, cpu_ms_per_req=0.52)])
    assert both["traced_vs_gateway"] == 0.96 and abs(both["traced_added_cpu_ms_per_req"] - 0.02) < 1e-12
    assert "0.96x" in observability_table([both])
    no_cpu = observability([_result("1c stream", "gateway", 10.0, 1.0), _result("1c stream", "observed", 0.0, None)])
    assert no_cpu[0]["observed_vs_gateway"] == 0.0 and no_cpu[0]["added_cpu_ms_per_req"] is None
    assert "-" in observability_table(no_cpu).splitlines()[2]


def test_scaleout_lines_print_each_part_against_its_target_and_skip_absent_parts() -> None:
    q = {"p50_ms": 40.0, "p99_ms": 260.0, "max_ms": 260.0}
    doc = {
        "propagation": {"changes": 50, "workers": 4, "poll_interval_ms": 5.0, "wall_s": 51.0, "load_avg_1m": 1.0,
                        "all_workers": q, "first_worker": q, "admin_answer": q, "via_leader": q,
                        "via_follower": {"p50_ms": None, "p99_ms": None, "max_ms": None},
                        "not_propagated_in_wait": 0, "target_p99_ms": 250.0},
        "cold_start": None,
        "scaling": {"connections": 32, "cpus": 2, "wall_s": 38.0, "ratios": {"2/1": 1.5, "4/1": None},
                    "runs": [{"workers": w, "rps": rps, "p50_ms": 1.0, "p99_ms": 2.0, "cpu_ms_per_req": 0.8,
                              "box_cpu_ms_per_req": 3.0, "box_busy_pct": 99.0, "load_avg_1m": None,
                              "worker_cpu_share_pct": [100.0 / w] * w} for w, rps in ((1, 500.0), (2, 750.0))]},
    }
    text = "\n".join(scaleout_lines(doc))
    assert "p99 260.0 ms (target p99 <= 250 ms: OVER)" in text
    assert "via the follower p50 - ms" in text
    assert "Cold start" not in text
    assert "2/1: 1.50x, 4/1: -" in text and "50% / 50%" in text
    assert scaleout_lines({"propagation": None, "cold_start": None, "scaling": None}) == []
