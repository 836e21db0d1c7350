"""Data-plane metrics without a server: label bounding (no client string grows the series count),
what one call adds through the pipeline's `finish`, the gauges `refresh` copies in, and the
multiprocess merge of two workers' files."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from dataplane.health import HealthBoard
from dataplane.metrics import MAX_MODELS, DataPlaneMetrics, known_model, status_class
from dataplane.pipeline import run
from schemas.entities import Provider
from schemas.errors import GatewayError
from schemas.events import Usage
from schemas.prometheus import OTHER, BoundedLabel
from schemas.snapshot import Snapshot
from tests.unit.test_pipeline import PROVIDER, Probe, _request, _worker


def samples(metrics: DataPlaneMetrics) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    text = generate_latest(metrics.scrape()).decode()
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(metrics: DataPlaneMetrics, name: str, **labels: str) -> float:
    return samples(metrics).get((name, frozenset(labels.items())), 0.0)


def test_a_bounded_label_folds_values_past_its_cap() -> None:
    label = BoundedLabel(3)
    assert [label(v) for v in ("a", "b", "c", "d", "a", "e")] == ["a", "b", "c", OTHER, "a", OTHER]
    assert label.seen == {"a", "b", "c"}


def test_known_models_come_from_the_catalog_or_a_price() -> None:
    snap = Snapshot.empty()
    mock = Provider(id="ws.m", workspace_id="ws", name="mock", type="mock")
    assert known_model(snap, mock, "echo", "ws")
    assert known_model(snap, PROVIDER, "gpt-4o", "ws_1")
    assert not known_model(snap, PROVIDER, "my-secret-run-42", "ws_1")
    assert status_class(200) == "2xx" and status_class(429) == "4xx" and status_class(999) == "other"


async def test_a_call_moves_requests_latency_tokens_and_cost() -> None:
    worker, _ = _worker()
    probe = Probe("up/gpt-4o")
    await run(_request(worker), probe)
    m = worker.metrics
    assert value(m, "alephant_requests_total", ingress="probe", provider="up", model="gpt-4o", status="200") == 1
    assert value(m, "alephant_request_duration_seconds_count", ingress="probe", provider="up", model="gpt-4o",
                 status_class="2xx") == 1
    # No usage, no cost: the spend counters have no series yet.
    assert value(m, "alephant_tokens_total", provider="up", direction="input") == 0


async def test_usage_and_cost_are_counted_by_provider_and_direction() -> None:
    worker, _ = _worker()

    class Spending(Probe):
        async def dispatch(self, call):  # type: ignore[no-untyped-def]
            call.usage, call.cost_nanos, call.ttfb_ms = Usage(input_tokens=7, output_tokens=3), 1_500_000_000, 12.0
            return await super().dispatch(call)

    for _ in range(2):
        await run(_request(worker), Spending("up/gpt-4o"))
    m = worker.metrics
    assert value(m, "alephant_tokens_total", provider="up", direction="input") == 14
    assert value(m, "alephant_tokens_total", provider="up", direction="output") == 6
    assert value(m, "alephant_cost_usd_total", provider="up") == pytest.approx(3.0)
    assert value(m, "alephant_workspace_cost_usd_total", workspace="ws_1") == pytest.approx(3.0)
    assert value(m, "alephant_time_to_first_byte_seconds_count", ingress="probe", provider="up",
                 model="gpt-4o") == 2
    assert value(m, "alephant_time_to_first_byte_seconds_sum", ingress="probe", provider="up",
                 model="gpt-4o") == pytest.approx(0.024)


async def test_refusals_are_counted_by_reason_and_unknown_keys_have_no_provider() -> None:
    worker, _ = _worker()
    with pytest.raises(GatewayError):
        await run(_request(worker, key="sk-alph-guess"), Probe("up/gpt-4o"))
    m = worker.metrics
    assert value(m, "alephant_refusals_total", reason="invalid_api_key") == 1
    assert value(m, "alephant_requests_total", ingress="probe", provider="none", model="none", status="401") == 1


async def test_client_model_strings_never_become_labels() -> None:
    worker, _ = _worker()
    for i in range(MAX_MODELS + 20):
        await run(_request(worker), Probe(f"up/run-{i}-secret"))
    families = samples(worker.metrics)
    models = {dict(labels)["model"] for (name, labels) in families if name == "alephant_requests_total"}
    assert models == {OTHER}
    assert value(worker.metrics, "alephant_requests_total", ingress="probe", provider="up", model=OTHER,
                 status="200") == MAX_MODELS + 20


def test_refresh_copies_gauges_and_health_totals() -> None:
    worker, _ = _worker()
    board = HealthBoard()
    board.retries_total, board.ejections_total = 3, 1
    worker.metrics.refresh(worker.store, None, board)
    board.retries_total = 5
    worker.metrics.refresh(worker.store, None, board)
    m = worker.metrics
    assert value(m, "alephant_upstream_retries_total") == 5
    assert value(m, "alephant_upstream_ejections_total") == 1
    assert value(m, "alephant_snapshot_revision") == 7
    assert value(m, "alephant_snapshot_staleness_seconds") == float("inf")  # no heartbeat in this snapshot


async def test_observe_is_cheap() -> None:
    """Not a benchmark: a guard against an accidental slow path (a registry lookup per call)."""
    worker, _ = _worker()
    call_probe = Probe("up/gpt-4o")
    await run(_request(worker), call_probe)
    from dataplane.call import Call  # a finished call, observed again and again

    call = Call(request=_request(worker), worker=worker, endpoint=call_probe, snap=worker.store.current)
    call.target = None
    n = 20_000
    start = time.perf_counter()
    for _ in range(n):
        worker.metrics.observe(call)
    per_call_us = (time.perf_counter() - start) / n * 1e6
    assert per_call_us < 50, per_call_us


_WORKER_SCRIPT = textwrap.dedent("""
    from dataplane.metrics import DataPlaneMetrics
    from dataplane.health import HealthBoard
    from dataplane.snapshot import SnapshotStore
    m = DataPlaneMetrics()
    assert m.shared is not None
    m.requests.labels("chat.completions", "mock", "echo", "200").inc(3)
    m.refresh(SnapshotStore(), None, HealthBoard())
""")


def test_two_worker_processes_are_merged(tmp_path: Path) -> None:
    shared = tmp_path / "metrics"
    env = {"PROMETHEUS_MULTIPROC_DIR": str(shared), "PATH": "/usr/bin:/bin"}
    for _ in range(2):
        subprocess.run([sys.executable, "-c", _WORKER_SCRIPT], env=env, check=True, cwd=Path(__file__).parents[2])
    merged = DataPlaneMetrics(shared, from_env=False)
    assert value(merged, "alephant_requests_total", ingress="chat.completions", provider="mock", model="echo",
                 status="200") == 6
    # Both workers exited without saying so: their live gauges are dropped by the next worker's start.
    assert not list(shared.glob("gauge_live*"))
