"""Pure summarising of benchmark results: gateway-vs-direct comparisons and the text tables.

Inputs are the JSON objects :mod:`tests.bench.loadgen` prints, each extended by the runner
with ``"scenario"`` (e.g. ``"1c non-stream"``) and ``"target"`` (``"direct"`` or ``"gateway"``).
Nothing here does IO; :mod:`tests.bench.run` prints the returned strings.
"""

from __future__ import annotations

from typing import Any

#: ARCHITECTURE.md section 9, shown next to the measurements for reference only (never enforced).
TARGETS = {
    "throughput_pct": 30.0,
    "added_p50_ms_1c": 0.5,
    "added_p99_ms_1c": 2.0,
    "added_ttfb_ms": 1.0,
}


def scenario_name(connections: int, stream: bool) -> str:
    """``"<n>c stream"`` or ``"<n>c non-stream"``."""
    return f"{connections}c {'stream' if stream else 'non-stream'}"


def _delta(gateway: Any, direct: Any) -> float | None:
    if isinstance(gateway, int | float) and isinstance(direct, int | float):
        return float(gateway) - float(direct)
    return None


def compare(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One comparison per scenario that has both a direct and a gateway result, in input order.

    ``throughput_pct`` is gateway req/s over direct req/s in percent (``None`` when direct is 0);
    ``added_*_ms`` are gateway minus direct (``None`` when either side has no successes).
    """
    by_key = {(r["scenario"], r["target"]): r for r in results}
    out: list[dict[str, Any]] = []
    seen: set[str] = set()
    for r in results:
        scenario = r["scenario"]
        if scenario in seen:
            continue
        seen.add(scenario)
        direct, gateway = by_key.get((scenario, "direct")), by_key.get((scenario, "gateway"))
        if direct is None or gateway is None:
            continue
        out.append(
            {
                "scenario": scenario,
                "connections": r["connections"],
                "stream": r["stream"],
                "throughput_pct": 100.0 * gateway["rps"] / direct["rps"] if direct["rps"] else None,
                "added_p50_ms": _delta(gateway["p50_ms"], direct["p50_ms"]),
                "added_p99_ms": _delta(gateway["p99_ms"], direct["p99_ms"]),
                "added_ttfb_p50_ms": _delta(gateway["ttfb_p50_ms"], direct["ttfb_p50_ms"]) if r["stream"] else None,
            }
        )
    return out


def _num(value: Any, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def results_table(results: list[dict[str, Any]]) -> str:
    """The per-run table: scenario, target, req/s, p50, p99, TTFB p50 (streams), errors."""
    header = f"{'scenario':<16} {'target':<8} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'ttfb p50':>9} {'errors':>7}"
    lines = [header, "-" * len(header)]
    for r in results:
        lines.append(
            f"{r['scenario']:<16} {r['target']:<8} {r['rps']:>9.1f} {_num(r['p50_ms'], '.3f'):>8} "
            f"{_num(r['p99_ms'], '.3f'):>8} {_num(r['ttfb_p50_ms'], '.3f'):>9} {r['errors']:>7}"
        )
    for r in results:
        if r["error_kinds"]:
            kinds = ", ".join(f"{kind} x{count}" for kind, count in sorted(r["error_kinds"].items()))
            lines.append(f"  errors in {r['scenario']} {r['target']}: {kinds}")
    return "\n".join(lines)


def comparison_table(comparisons: list[dict[str, Any]]) -> str:
    """Gateway relative to direct per scenario, with the section 9 targets alongside."""
    t = TARGETS
    header = f"{'scenario':<16} {'gw/direct req/s':>16} {'+p50 ms':>9} {'+p99 ms':>9} {'+ttfb p50 ms':>13}"
    lines = [header, "-" * len(header)]
    for c in comparisons:
        pct = "-" if c["throughput_pct"] is None else f"{c['throughput_pct']:.1f}%"
        lines.append(
            f"{c['scenario']:<16} {pct:>16} {_num(c['added_p50_ms'], '+.3f'):>9} "
            f"{_num(c['added_p99_ms'], '+.3f'):>9} {_num(c['added_ttfb_p50_ms'], '+.3f'):>13}"
        )
    lines.append(
        f"{'targets (§9)':<16} {'>= ' + format(t['throughput_pct'], '.0f') + '%':>16} "
        f"{'<= ' + format(t['added_p50_ms_1c'], '.1f'):>9} {'<= ' + format(t['added_p99_ms_1c'], '.1f'):>9} "
        f"{'<= ' + format(t['added_ttfb_ms'], '.1f'):>13}"
    )
    lines.append(
        "  for reference only, not enforced: the latency targets apply at 1 connection, TTFB to streams; "
        "throughput is per worker with full governance on."
    )
    return "\n".join(lines)
