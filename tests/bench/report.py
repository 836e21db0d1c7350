"""Pure summarising of benchmark results: comparisons between targets and the text tables.

Inputs are the JSON objects :mod:`tests.bench.loadgen` prints, each extended by the runner
with ``"scenario"`` (e.g. ``"1c non-stream"``), ``"target"`` (one of ``TARGET_NAMES``) and, for
targets served by the gateway, the server-side costs measured around the run (``None`` when not
measured): ``"cpu_ms_per_req"`` (the data-plane workers' user+system CPU milliseconds over
``completed`` requests) and ``"redis_evalsha_per_req"`` / ``"redis_reads_per_req"`` (Redis
``EVALSHA`` calls and client reads, i.e. about one per round trip, over ``completed`` requests).
Nothing here does IO; :mod:`tests.bench.run` prints the returned strings.
"""

from __future__ import annotations

from typing import Any

#: ``direct``: the fake upstream itself; ``gateway``: through the gateway with nothing governing
#: the request; ``governed``: through the gateway with a policy, two limits and two budgets on
#: the request's path (issue 8's full-governance scenario); ``router``: the plain gateway's path
#: through a weighted router over two targets that are both the fake (:mod:`tests.bench.routed`);
#: ``cached``: the plain gateway's request with ``Alephant-Cache-Ttl``, so every request after the
#: first is an exact cache hit from Redis (issue 11's bar: at least 0.5x direct at 32 connections);
#: ``semantic``: a new prompt every request through a semantic cache setting (embed, look up, miss,
#: call, store): its p50 over the gateway's is the semantic path's added latency;
#: ``observed``: the gateway's request to a second stack of the same build with tracing exported
#: (to a null OTLP collector) and every body archived to S3 (:mod:`tests.bench.observed`);
#: ``traced``: the same second stack with a key that keeps no bodies (tracing alone).
TARGET_NAMES = ("direct", "gateway", "governed", "router", "cached", "semantic", "traced", "observed")

#: The targets that are the plain gateway plus one feature, set against the plain gateway.
VS_GATEWAY = ("governed", "router", "cached", "semantic", "traced", "observed")

#: Issue 13 ("Performance"), shown for reference only (never enforced): throughput with tracing
#: exported and bodies archived over the same build with them off.
OBSERVABILITY_TARGET = 0.9

#: ARCHITECTURE.md section 9, shown next to the measurements for reference only (never enforced).
TARGETS = {
    "throughput_pct": 30.0,
    "added_p50_ms_1c": 0.5,
    "added_p99_ms_1c": 2.0,
    "added_ttfb_ms": 1.0,
}

#: Issue 8 ("Governance before the call"), shown for reference only (never enforced): governed
#: throughput at 32 connections over the plain gateway's, worker CPU per governed request, Redis
#: round trips per governed request, and the in-memory decision steps (the micro-benchmark).
GOVERNANCE_TARGETS = {
    "governed_vs_gateway_32c": 0.8,
    "governed_cpu_ms_per_req": 0.4,
    "redis_round_trips_per_req": 1.0,
    "decision_us_per_req": 50.0,
}


def scenario_name(connections: int, stream: bool) -> str:
    """``"<n>c stream"`` or ``"<n>c non-stream"``."""
    return f"{connections}c {'stream' if stream else 'non-stream'}"


def _delta(a: Any, b: Any) -> float | None:
    if isinstance(a, int | float) and isinstance(b, int | float):
        return float(a) - float(b)
    return None


def _ratio(a: Any, b: Any) -> float | None:
    if isinstance(a, int | float) and isinstance(b, int | float) and b:
        return float(a) / float(b)
    return None


def _scenarios(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The first result of each scenario, in input order."""
    seen: dict[str, dict[str, Any]] = {}
    for r in results:
        seen.setdefault(r["scenario"], r)
    return list(seen.values())


def compare(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One comparison per (scenario, gateway-served target) that has a direct result as well,
    in input order of scenarios, then ``TARGET_NAMES`` order.

    ``throughput_pct`` is the target's req/s over direct req/s in percent (``None`` when direct
    is 0); ``added_*_ms`` are target minus direct (``None`` when either side has no successes).
    ``vs_gateway_pct`` (``VS_GATEWAY`` targets only) is its req/s over the plain gateway's in
    percent, and ``added_p50_vs_gateway_ms`` its p50 minus the gateway's; ``None`` without a
    gateway result.
    """
    by_key = {(r["scenario"], r["target"]): r for r in results}
    out: list[dict[str, Any]] = []
    for first in _scenarios(results):
        scenario, stream = first["scenario"], first["stream"]
        direct = by_key.get((scenario, "direct"))
        if direct is None:
            continue
        gateway = by_key.get((scenario, "gateway"))
        for target in TARGET_NAMES[1:]:
            r = by_key.get((scenario, target))
            if r is None:
                continue
            row: dict[str, Any] = {
                "scenario": scenario,
                "target": target,
                "connections": first["connections"],
                "stream": stream,
                "throughput_pct": 100.0 * r["rps"] / direct["rps"] if direct["rps"] else None,
                "added_p50_ms": _delta(r["p50_ms"], direct["p50_ms"]),
                "added_p99_ms": _delta(r["p99_ms"], direct["p99_ms"]),
                "added_ttfb_p50_ms": _delta(r["ttfb_p50_ms"], direct["ttfb_p50_ms"]) if stream else None,
            }
            if target in VS_GATEWAY:
                ratio = _ratio(r["rps"], gateway["rps"]) if gateway is not None else None
                row["vs_gateway_pct"] = None if ratio is None else 100.0 * ratio
                row["added_p50_vs_gateway_ms"] = _delta(r["p50_ms"], gateway["p50_ms"]) if gateway else None
            out.append(row)
    return out


def governance(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per scenario with both a ``gateway`` and a ``governed`` result: req/s of each and their
    ratio (``governed_vs_gateway``, a fraction), worker CPU ms per request of each and the
    difference, and the governed run's Redis EVALSHA calls and reads per request (gateway's too,
    as the baseline of Redis traffic that is not the requests')."""
    by_key = {(r["scenario"], r["target"]): r for r in results}
    out: list[dict[str, Any]] = []
    for first in _scenarios(results):
        scenario = first["scenario"]
        gateway, governed = by_key.get((scenario, "gateway")), by_key.get((scenario, "governed"))
        if gateway is None or governed is None:
            continue
        out.append({
            "scenario": scenario,
            "connections": first["connections"],
            "stream": first["stream"],
            "gateway_rps": gateway["rps"],
            "governed_rps": governed["rps"],
            "governed_vs_gateway": _ratio(governed["rps"], gateway["rps"]),
            "gateway_cpu_ms_per_req": gateway.get("cpu_ms_per_req"),
            "governed_cpu_ms_per_req": governed.get("cpu_ms_per_req"),
            "added_cpu_ms_per_req": _delta(governed.get("cpu_ms_per_req"), gateway.get("cpu_ms_per_req")),
            "gateway_evalsha_per_req": gateway.get("redis_evalsha_per_req"),
            "governed_evalsha_per_req": governed.get("redis_evalsha_per_req"),
            "gateway_redis_reads_per_req": gateway.get("redis_reads_per_req"),
            "governed_redis_reads_per_req": governed.get("redis_reads_per_req"),
            "governed_redis_cpu_ms_per_req": governed.get("redis_cpu_ms_per_req"),
        })
    return out


def routing(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per scenario with a ``router`` result: its req/s over the plain gateway's and over direct
    (fractions; ``None`` when either is missing or 0), and the worker CPU ms per request of the
    router, the gateway and their difference."""
    by_key = {(r["scenario"], r["target"]): r for r in results}
    out: list[dict[str, Any]] = []
    for first in _scenarios(results):
        scenario = first["scenario"]
        router = by_key.get((scenario, "router"))
        if router is None:
            continue
        gateway, direct = by_key.get((scenario, "gateway")), by_key.get((scenario, "direct"))
        out.append({
            "scenario": scenario,
            "connections": first["connections"],
            "stream": first["stream"],
            "router_rps": router["rps"],
            "router_vs_gateway": _ratio(router["rps"], gateway["rps"]) if gateway else None,
            "router_vs_direct": _ratio(router["rps"], direct["rps"]) if direct else None,
            "gateway_cpu_ms_per_req": gateway.get("cpu_ms_per_req") if gateway else None,
            "router_cpu_ms_per_req": router.get("cpu_ms_per_req"),
            "added_cpu_ms_per_req": _delta(router.get("cpu_ms_per_req"),
                                           gateway.get("cpu_ms_per_req") if gateway else None),
        })
    return out


def observability(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per scenario with both a ``gateway`` and an ``observed`` result: req/s of each, their
    ratio (``observed_vs_gateway``, a fraction; ``None`` when the gateway's is 0), worker CPU ms
    per request of each and the difference, the added p50, and the same for ``traced`` (tracing
    without bodies) when measured (``None`` where not measured)."""
    by_key = {(r["scenario"], r["target"]): r for r in results}
    out: list[dict[str, Any]] = []
    for first in _scenarios(results):
        scenario = first["scenario"]
        gateway, observed = by_key.get((scenario, "gateway")), by_key.get((scenario, "observed"))
        if gateway is None or observed is None:
            continue
        traced = by_key.get((scenario, "traced")) or {}
        out.append({
            "scenario": scenario,
            "connections": first["connections"],
            "stream": first["stream"],
            "gateway_rps": gateway["rps"],
            "observed_rps": observed["rps"],
            "observed_vs_gateway": _ratio(observed["rps"], gateway["rps"]),
            "gateway_cpu_ms_per_req": gateway.get("cpu_ms_per_req"),
            "observed_cpu_ms_per_req": observed.get("cpu_ms_per_req"),
            "added_cpu_ms_per_req": _delta(observed.get("cpu_ms_per_req"), gateway.get("cpu_ms_per_req")),
            "added_p50_ms": _delta(observed["p50_ms"], gateway["p50_ms"]),
            "traced_rps": traced.get("rps"),
            "traced_vs_gateway": _ratio(traced.get("rps"), gateway["rps"]),
            "traced_cpu_ms_per_req": traced.get("cpu_ms_per_req"),
            "traced_added_cpu_ms_per_req": _delta(traced.get("cpu_ms_per_req"), gateway.get("cpu_ms_per_req")),
        })
    return out


def _num(value: Any, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def results_table(results: list[dict[str, Any]]) -> str:
    """The per-run table: scenario, target, req/s, p50, p99, TTFB p50 (streams), errors, the
    worker CPU ms and Redis EVALSHA calls per request (gateway-served targets), and the req/s
    spread over the rounds (the row is the median round)."""
    header = (f"{'scenario':<16} {'target':<8} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'ttfb p50':>9} "
              f"{'errors':>7} {'cpu ms/req':>10} {'evalsha/req':>11} {'rounds req/s':>16}")
    lines = [header, "-" * len(header)]
    for r in results:
        lines.append(
            f"{r['scenario']:<16} {r['target']:<8} {r['rps']:>9.1f} {_num(r['p50_ms'], '.3f'):>8} "
            f"{_num(r['p99_ms'], '.3f'):>8} {_num(r['ttfb_p50_ms'], '.3f'):>9} {r['errors']:>7} "
            f"{_num(r.get('cpu_ms_per_req'), '.3f'):>10} {_num(r.get('redis_evalsha_per_req'), '.2f'):>11} "
            f"{_spread(r.get('rounds_rps')):>16}"
        )
    for r in results:
        if r["error_kinds"]:
            kinds = ", ".join(f"{kind} x{count}" for kind, count in sorted(r["error_kinds"].items()))
            lines.append(f"  errors in {r['scenario']} {r['target']}: {kinds}")
    return "\n".join(lines)


def _spread(rounds: list[float] | None) -> str:
    """``min-max`` req/s over the rounds, or ``-`` for a single run."""
    if not rounds or len(rounds) < 2:
        return "-"
    return f"{min(rounds):.0f}-{max(rounds):.0f}"


def _pct(value: Any) -> str:
    return "-" if value is None else f"{value:.1f}%"


def comparison_table(comparisons: list[dict[str, Any]]) -> str:
    """Each gateway-served target relative to direct per scenario (and ``governed`` relative to
    the plain gateway), with the section 9 targets alongside."""
    t = TARGETS
    header = (f"{'scenario':<16} {'target':<8} {'req/s vs direct':>16} {'+p50 ms':>9} {'+p99 ms':>9} "
              f"{'+ttfb p50 ms':>13} {'req/s vs gateway':>17} {'+p50 vs gw':>11}")
    lines = [header, "-" * len(header)]
    for c in comparisons:
        lines.append(
            f"{c['scenario']:<16} {c['target']:<8} {_pct(c['throughput_pct']):>16} "
            f"{_num(c['added_p50_ms'], '+.3f'):>9} {_num(c['added_p99_ms'], '+.3f'):>9} "
            f"{_num(c['added_ttfb_p50_ms'], '+.3f'):>13} {_pct(c.get('vs_gateway_pct')):>17} "
            f"{_num(c.get('added_p50_vs_gateway_ms'), '+.3f'):>11}"
        )
    lines.append(
        f"{'targets (§9)':<16} {'':<8} {'>= ' + format(t['throughput_pct'], '.0f') + '%':>16} "
        f"{'<= ' + format(t['added_p50_ms_1c'], '.1f'):>9} {'<= ' + format(t['added_p99_ms_1c'], '.1f'):>9} "
        f"{'<= ' + format(t['added_ttfb_ms'], '.1f'):>13} "
        f"{'>= ' + format(100 * GOVERNANCE_TARGETS['governed_vs_gateway_32c'], '.0f') + '% @32c':>17}"
    )
    lines.append(
        "  for reference only, not enforced: the latency targets apply at 1 connection, TTFB to streams; "
        "throughput is per worker with full governance on."
    )
    return "\n".join(lines)


def governance_table(rows: list[dict[str, Any]]) -> str:
    """Governed against the plain gateway per scenario: req/s ratio, worker CPU ms per request
    and Redis calls per request, with issue 8's bars alongside."""
    g = GOVERNANCE_TARGETS
    header = (f"{'scenario':<16} {'gov/gw req/s':>12} {'gw cpu ms':>10} {'gov cpu ms':>11} {'+cpu ms':>8} "
              f"{'gov evalsha':>12} {'gov reads':>10} {'gw reads':>9} {'redis cpu ms':>13}")
    lines = [header, "-" * len(header)]
    for row in rows:
        ratio = row["governed_vs_gateway"]
        lines.append(
            f"{row['scenario']:<16} {_num(ratio, '.2f') + ('x' if ratio is not None else ''):>12} "
            f"{_num(row['gateway_cpu_ms_per_req'], '.3f'):>10} {_num(row['governed_cpu_ms_per_req'], '.3f'):>11} "
            f"{_num(row['added_cpu_ms_per_req'], '+.3f'):>8} {_num(row['governed_evalsha_per_req'], '.2f'):>12} "
            f"{_num(row['governed_redis_reads_per_req'], '.2f'):>10} "
            f"{_num(row['gateway_redis_reads_per_req'], '.2f'):>9} "
            f"{_num(row.get('governed_redis_cpu_ms_per_req'), '.3f'):>13}"
        )
    lines.append(
        f"{'targets (#8)':<16} {'>= ' + format(g['governed_vs_gateway_32c'], '.1f') + 'x':>12} {'':>10} "
        f"{'<= ' + format(g['governed_cpu_ms_per_req'], '.1f'):>11} {'':>8} {'':>12} "
        f"{'~' + format(g['redis_round_trips_per_req'], '.0f'):>10}"
    )
    lines.append(
        "  per request, all server-side: cpu = the data-plane workers' user+system CPU (/proc) over every request "
        "they answered in the run (warm-up included); evalsha = Redis EVALSHA calls (the admission, plus its "
        "settlement sent later in batches off the request path); reads = Redis client reads, about one per round "
        "trip (a batch of settlements is one); redis cpu = the Redis server's CPU per governed request (INFO). The "
        "ratio bar applies at 32 connections; for reference only."
    )
    return "\n".join(lines)


def routing_table(rows: list[dict[str, Any]]) -> str:
    """The router against the plain gateway and direct per scenario: req/s, both ratios, worker
    CPU ms per request of each and the difference."""
    header = (f"{'scenario':<16} {'router req/s':>12} {'rtr/gw req/s':>12} {'rtr/direct':>10} {'gw cpu ms':>10} "
              f"{'rtr cpu ms':>11} {'+cpu ms':>8}")
    lines = [header, "-" * len(header)]
    for row in rows:
        vs_gw, vs_direct = row["router_vs_gateway"], row["router_vs_direct"]
        lines.append(
            f"{row['scenario']:<16} {row['router_rps']:>12.1f} "
            f"{_num(vs_gw, '.2f') + ('x' if vs_gw is not None else ''):>12} "
            f"{_pct(None if vs_direct is None else 100 * vs_direct):>10} "
            f"{_num(row['gateway_cpu_ms_per_req'], '.3f'):>10} {_num(row['router_cpu_ms_per_req'], '.3f'):>11} "
            f"{_num(row['added_cpu_ms_per_req'], '+.3f'):>8}"
        )
    lines.append(
        "  router = the demo key through POST /router/{id}/v1/chat/completions, a weighted router over two targets "
        "that are both the fake; cpu = the data-plane workers' user+system CPU per request, as above."
    )
    return "\n".join(lines)


def observability_table(rows: list[dict[str, Any]]) -> str:
    """The observed stack against the plain gateway per scenario: req/s of each, their ratio with
    issue 13's bar, worker CPU ms per request of each and the difference, the added p50; then the
    traced key's ratio and added CPU (tracing alone)."""
    header = (f"{'scenario':<16} {'gw req/s':>9} {'obs req/s':>10} {'obs/gw req/s':>12} {'gw cpu ms':>10} "
              f"{'obs cpu ms':>11} {'+cpu ms':>8} {'+p50 ms':>8} {'trc/gw req/s':>12} {'trc +cpu ms':>11}")
    lines = [header, "-" * len(header)]
    for row in rows:
        ratio, traced = row["observed_vs_gateway"], row.get("traced_vs_gateway")
        lines.append(
            f"{row['scenario']:<16} {row['gateway_rps']:>9.1f} {row['observed_rps']:>10.1f} "
            f"{_num(ratio, '.2f') + ('x' if ratio is not None else ''):>12} "
            f"{_num(row['gateway_cpu_ms_per_req'], '.3f'):>10} {_num(row['observed_cpu_ms_per_req'], '.3f'):>11} "
            f"{_num(row['added_cpu_ms_per_req'], '+.3f'):>8} {_num(row['added_p50_ms'], '+.3f'):>8} "
            f"{_num(traced, '.2f') + ('x' if traced is not None else ''):>12} "
            f"{_num(row.get('traced_added_cpu_ms_per_req'), '+.3f'):>11}"
        )
    lines.append(f"{'target (#13)':<16} {'':>9} {'':>10} {'>= ' + format(OBSERVABILITY_TARGET, '.1f') + 'x':>12}")
    lines.append(
        "  observed = a second stack of the same build with traces exported over OTLP/HTTP (to a null collector "
        "the bench runs) and every request's body archived to S3; trc = the same stack through a key that keeps "
        "no bodies (tracing alone); gateway = the first stack, tracing off, no bodies kept; metrics and the "
        "access log are on in both. cpu = the data-plane workers' user+system CPU per request, deferred export "
        "and upload work included (measured until the workers are idle, at most 30 s); for reference only."
    )
    return "\n".join(lines)


def _verdict(value: Any, target: float) -> str:
    """``within`` / ``OVER`` a ceiling target (reference only), ``-`` when not measured."""
    if value is None:
        return "-"
    return "within" if value <= target else "OVER"


def scaleout_lines(doc: dict[str, Any]) -> list[str]:
    """The scale-out parts (:mod:`tests.bench.scaleout`: ``propagation``, ``cold_start`` and
    ``scaling``, each None when skipped) as printed lines, issue 14's targets alongside (reference
    only, never enforced)."""
    lines: list[str] = []
    p = doc.get("propagation")
    if p:
        every, admin = p["all_workers"], p["admin_answer"]
        lines += [
            f"Config propagation (tests.bench.scaleout, multi-node stack): {p['changes']} virtual-key renames "
            f"alternately via each control plane, until all {p['workers']} workers report the revision "
            f"(polled every {p['poll_interval_ms']:g} ms; {p['wall_s']}s; load average "
            f"{_num(p.get('load_avg_1m'), '.1f')}):",
            f"  all workers applied: p50 {_num(every['p50_ms'], '.1f')} ms, p99 {_num(every['p99_ms'], '.1f')} ms "
            f"(target p99 <= {p['target_p99_ms']:g} ms: {_verdict(every['p99_ms'], p['target_p99_ms'])}), "
            f"max {_num(every['max_ms'], '.1f')} ms",
            f"  first worker p50 {_num(p['first_worker']['p50_ms'], '.1f')} ms; admin answer p50 "
            f"{_num(admin['p50_ms'], '.1f')} / p99 {_num(admin['p99_ms'], '.1f')} ms; via the relay leader p50 "
            f"{_num(p['via_leader']['p50_ms'], '.1f')} ms, via the follower p50 "
            f"{_num(p['via_follower']['p50_ms'], '.1f')} ms; not propagated within the admin wait: "
            f"{p['not_propagated_in_wait']}",
        ]
    c = doc.get("cold_start")
    if c:
        lines += [
            f"Cold start (single-node stack, {c['keys']:,} virtual keys written straight into the bucket in "
            f"{c['write_s']}s, {c['keys_written_per_s']:,} keys/s; {c['wall_s']}s; load average "
            f"{_num(c.get('load_avg_1m'), '.1f')}):",
            f"  a fresh worker: up (/healthz) in {_num(c['up_s'], '.2f')}s, ready (/readyz 200) in "
            f"{c['ready_s']:.2f}s (replay {_num(c['replay_s'], '.2f')}s, {c['entities']} entities); "
            f"a bulk key answered {c['bulk_key_status']}",
            f"  RSS when ready {_num(c['rss_ready_mb'], '.1f')} MB (target <= {c['target_rss_mb']:g} MB: "
            f"{_verdict(c['rss_ready_mb'], c['target_rss_mb'])}), 2 s later {_num(c['rss_after_2s_mb'], '.1f')} MB, "
            f"peak {_num(c['rss_peak_mb'], '.1f')} MB; a worker with the demo config only "
            f"{_num(c['rss_baseline_mb'], '.1f')} MB, the live worker that followed the writes "
            f"{_num(c['rss_live_worker_mb'], '.1f')} MB",
        ]
    s = doc.get("scaling")
    if s:
        lines.append(f"Throughput by worker count (single-node stack, workers sharing one port, "
                     f"{s['connections']} connections, non-stream, fake upstream; {s['cpus']} CPUs; {s['wall_s']}s):")
        header = (f"  {'workers':>7} {'req/s':>9} {'vs 1':>6} {'p50 ms':>8} {'p99 ms':>8} {'cpu ms/req':>10} "
                  f"{'box cpu ms/req':>14} {'box busy':>8} {'load':>5}  worker CPU shares")
        lines += [header, "  " + "-" * (len(header) - 2)]
        base = s["runs"][0]["rps"] if s["runs"] else None
        for r in s["runs"]:
            shares = " / ".join(f"{x:.0f}%" for x in r["worker_cpu_share_pct"])
            lines.append(
                f"  {r['workers']:>7} {r['rps']:>9.1f} {_num(_ratio(r['rps'], base), '.2f'):>6} "
                f"{_num(r['p50_ms'], '.2f'):>8} {_num(r['p99_ms'], '.2f'):>8} {_num(r['cpu_ms_per_req'], '.3f'):>10} "
                f"{_num(r['box_cpu_ms_per_req'], '.3f'):>14} {_num(r['box_busy_pct'], '.0f'):>7}% "
                f"{_num(r.get('load_avg_1m'), '.1f'):>5}  {shares}")
        ratios = ", ".join(f"{k}: {'-' if v is None else f'{v:.2f}x'}" for k, v in s["ratios"].items())
        lines.append(f"  ratios {ratios}")
    return lines
