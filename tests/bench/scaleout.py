"""Scale-out figures (issue 14's Performance section), three parts, each skippable; ``make bench``
runs them after the load runs, with the gateway stack stopped.

``python -m tests.bench.scaleout [--propagation-changes 50] [--coldstart-keys 100000]
[--scaling-duration 5] [--json-out FILE]`` (0 skips a part). Progress goes to stdout as it
happens; the figures to ``--json-out`` (else a summary on stdout).

1. **Config propagation** on the multi-node stack (``tests.conftest.cluster_stack``: 3 NATS
   nodes at R3, 2 control planes, 4 workers on their own ports). N times, a virtual key's name is
   PATCHed, alternately through each control plane (one leads the relay; the other's command
   wakes the leader and waits for its rows). Timed from just before the PATCH is sent until each
   of the 4 workers' ``/healthz`` reports ``snapshot_revision`` at or past the ``revision`` of the
   answer: each worker is polled every ``POLL_S`` from the moment the PATCH is sent, so a worker
   that applied the change before the answer arrived counts from its first poll that saw it. Unit
   ms; a sample's figure is an upper bound by up to one poll interval and one /healthz round trip.
   Target: p99 <= 250 ms (printed against it, never enforced). With 50 changes, p99 is the worst.
2. **Cold start**: a single-node stack (``tests.conftest.dedicated_stack``); N virtual keys of
   the demo workspace (the real entity, hashed with the stack's master secret, under ``kv_key``)
   are put straight into its config bucket with nats-py, ``WRITE_CONCURRENCY`` puts in flight (the
   control plane's Postgres does not know them: a relay resync on a leadership change would
   delete them, which a bench stack never sees). Then a fresh data-plane worker starts on a port
   of its own: time from spawn to its first ``/healthz`` answer (the process is up) and to
   ``/readyz`` 200 (the bucket replayed, the first snapshot built), and its RSS then and 2 s
   later (plus its peak, ``VmHWM``). One of the bulk keys must then answer 200 on it. Target:
   RSS <= 150 MB per worker.
3. **Throughput with 1, 2 and 4 workers** on the same single-node stack (before part 2 writes
   its keys): workers sharing one port (``SO_REUSEPORT``, as ``alephant dev --workers N``),
   started one by one on the running stack, each run a closed loop of ``--scaling-connections``
   non-streaming chat completions against the fake upstream (:mod:`tests.bench.loadgen`). Printed:
   req/s per worker count, the ratios 2/1 and 4/1, worker CPU per request (after the workers are
   idle again), the whole box's CPU per request and how busy it was (``/proc/stat``: the load
   generator, the fake, NATS, Redis and the projector included), and each worker's share of the
   worker CPU (the kernel spreads connections by hash, not by load).

Every process is on 127.0.0.1 and stopped on the way out.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import aiohttp

from deploy.cluster import ClusterStack
from deploy.services import free_port
from deploy.stack import DEMO_MODEL, DEMO_WORKSPACE, Stack
from events.jetstream import connect
from schemas.entities import VirtualKey, entity_encoder, kv_key
from schemas.keys import KeyRing, display_prefix, generate_virtual_key
from schemas.settings import load_settings
from tests.bench.loadgen import percentile
from tests.bench.processes import BenchError, Child, http, say
from tests.bench.run import (
    GATEWAY_HEADERS,
    GATEWAY_MODEL,
    loadgen,
    register_fake,
    start_fake,
)
from tests.bench.server_costs import box_cpu_seconds, cpu_seconds, per_request, settle
from tests.conftest import cluster_stack, dedicated_stack

TARGET_PROPAGATION_P99_MS = 250.0
TARGET_RSS_MB = 150.0
SCALING_WORKERS = (1, 2, 4)
POLL_S = 0.005  # /healthz poll interval per worker while a change propagates
WRITE_CONCURRENCY = 256


# -- 1. config propagation ---------------------------------------------------------------------


@dataclass
class _Change:
    """One admin change: when the answer came and when each worker was first seen applying it
    (ms from just before the PATCH was sent)."""

    via: str
    leader: bool
    admin_ms: float = 0.0
    revision: int | None = None
    applied_ms: list[float] = field(default_factory=list)


async def _revision(http_: aiohttp.ClientSession, origin: str) -> int:
    async with http_.get(f"{origin}/healthz") as resp:
        body = await resp.json()
        return int(body["snapshot_revision"])


async def _change(http_: aiohttp.ClientSession, stack: ClusterStack, index: int, key_id: str,
                  name: str, leader: str | None) -> _Change:
    via = f"controlplane-{index}"
    change = _Change(via=via, leader=via == leader)
    auth = {"Authorization": f"Bearer {stack.demo['ALEPHANT_ADMIN_TOKEN']}"}
    wanted: list[int] = []  # the answer's revision, once known
    t0 = time.perf_counter()

    async def watch(origin: str) -> float:
        # Polling starts with the PATCH: a worker may apply the change before its answer arrives.
        seen: list[tuple[float, int]] = []
        while True:
            rev = await _revision(http_, origin)
            seen.append(((time.perf_counter() - t0) * 1000, rev))
            if wanted and (hit := next((ms for ms, r in seen if r >= wanted[0]), None)) is not None:
                return hit
            await asyncio.sleep(POLL_S)

    watchers = [asyncio.create_task(watch(origin)) for origin in stack.worker_origins]
    try:
        async with http_.patch(f"{stack.admin_urls[index]}/admin/v1/virtual-keys/{key_id}", json={"name": name},
                               headers=auth) as resp:
            body = await resp.json()
            change.admin_ms = (time.perf_counter() - t0) * 1000
        if resp.status != 200:
            raise BenchError(f"PATCH virtual key via {via} -> {resp.status}: {body}")
        change.revision = body.get("revision")  # None: not propagated within the control plane's wait
        if change.revision is not None:
            wanted.append(change.revision)
            change.applied_ms = list(await asyncio.wait_for(asyncio.gather(*watchers), 30))
    finally:
        for task in watchers:
            task.cancel()
        await asyncio.gather(*watchers, return_exceptions=True)
    return change


async def _propagation(stack: ClusterStack, changes: int) -> list[_Change]:
    auth = {"Authorization": f"Bearer {stack.demo['ALEPHANT_ADMIN_TOKEN']}"}
    leader = stack.relay_leader()
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(timeout=timeout) as http_:
        async with http_.post(f"{stack.admin_urls[0]}/admin/v1/virtual-keys", headers=auth,
                              json={"workspace_id": DEMO_WORKSPACE, "name": "bench-propagation"}) as resp:
            created = await resp.json()
            if resp.status not in (201, 202):
                raise BenchError(f"POST virtual key -> {resp.status}: {created}")
        deadline = time.monotonic() + 30
        while min([await _revision(http_, o) for o in stack.worker_origins]) < (created.get("revision") or 0):
            if time.monotonic() > deadline:
                raise BenchError("the workers did not apply the bench key within 30 s")
            await asyncio.sleep(0.05)
        out: list[_Change] = []
        for n in range(changes):
            out.append(await _change(http_, stack, n % len(stack.admin_urls), created["id"], f"bench-{n}", leader))
            if (n + 1) % 10 == 0 or n + 1 == changes:
                done = [max(c.applied_ms) for c in out if c.applied_ms]
                say(f"  {n + 1}/{changes} changes; all 4 workers applied within p50 "
                    f"{statistics.median(done):.1f} ms so far")
            await asyncio.sleep(0.1)  # changes one at a time, not a burst the relay coalesces
        return out


def _ms(values: list[float], q: float) -> float | None:
    got = percentile(sorted(int(v * 1e6) for v in values), q)
    return None if got is None else round(got, 1)


def _quantiles(values: list[float]) -> dict[str, float | None]:
    return {"p50_ms": _ms(values, 0.5), "p99_ms": _ms(values, 0.99), "max_ms": _ms(values, 1.0)}


def propagation(changes: int, state_dir: Path) -> dict[str, Any]:
    """Part 1 (module docstring): its figures, `wall_s` included."""
    t_part = time.monotonic()
    say(f"==> propagation: starting the multi-node stack (3 NATS at R3, 2 control planes, 4 workers; "
        f"log: {state_dir}/logs)")
    with cluster_stack(state_dir, log=lambda line: say(f"  {line}")) as stack:
        say(f"  up in {time.monotonic() - t_part:.1f}s; relay leader: {stack.relay_leader()}")
        say(f"==> propagation: {changes} virtual-key renames, alternately via each control plane, "
            f"until all {len(stack.worker_origins)} workers report the answer's revision")
        results = asyncio.run(_propagation(stack, changes))
        load_avg = round(os.getloadavg()[0], 2)
    applied = [c for c in results if c.applied_ms]
    every = [max(c.applied_ms) for c in applied]
    return {
        "changes": changes,
        "workers": len(applied[0].applied_ms) if applied else 0,
        "not_propagated_in_wait": sum(1 for c in results if c.revision is None),
        "all_workers": _quantiles(every),
        "first_worker": _quantiles([min(c.applied_ms) for c in applied]),
        "admin_answer": _quantiles([c.admin_ms for c in results]),
        "via_leader": _quantiles([max(c.applied_ms) for c in applied if c.leader]),
        "via_follower": _quantiles([max(c.applied_ms) for c in applied if not c.leader]),
        "poll_interval_ms": POLL_S * 1000,
        "target_p99_ms": TARGET_PROPAGATION_P99_MS,
        "load_avg_1m": load_avg,
        "wall_s": round(time.monotonic() - t_part, 1),
    }


# -- 2. cold start ------------------------------------------------------------------------------


async def _bulk_write(stack: Stack, keys: int) -> tuple[float, str]:
    """Put `keys` virtual keys into the stack's bucket; (seconds, one plaintext key)."""
    settings = load_settings(stack.child_env("dataplane"))
    keyring = KeyRing(settings.secret_key)
    nc = await connect(stack.nats_url("admin"), "alephant-bench-coldstart")
    sample = generate_virtual_key()
    written = 0
    t0 = time.perf_counter()
    try:
        kv = await nc.jetstream().key_value(settings.kv_bucket)

        async def writer(start: int) -> None:
            nonlocal written
            for i in range(start, keys, WRITE_CONCURRENCY):
                plaintext = sample if i == keys - 1 else generate_virtual_key()
                vk = VirtualKey(id=f"vk_bench{i:06d}", workspace_id=DEMO_WORKSPACE, name=f"bench-{i}",
                                key_hash=keyring.hash_key(plaintext), prefix=display_prefix(plaintext))
                await kv.put(kv_key(vk), entity_encoder.encode(vk))
                written += 1
                if written % max(1, keys // 10) == 0:
                    rate = written / (time.perf_counter() - t0)
                    say(f"  {written:,}/{keys:,} keys written ({rate:,.0f}/s)")

        await asyncio.gather(*(writer(s) for s in range(min(WRITE_CONCURRENCY, keys))))
    finally:
        await nc.close()
    return time.perf_counter() - t0, sample


def _memory_mb(pid: int, field: str = "VmRSS") -> float | None:
    """A ``/proc/<pid>/status`` memory field in MB (``VmRSS``: resident now; ``VmHWM``: the peak
    resident set), or None (the process is gone)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return round(int(line.split()[1]) / 1024, 1)  # kB
    return None


def _json(url: str) -> tuple[int, Any]:
    status, raw = http("GET", url, timeout=2)
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, None


def cold_start(stack: Stack, keys: int) -> dict[str, Any]:
    """Part 2 (module docstring) on a running single-node stack: its figures, `wall_s` included."""
    t_part = time.monotonic()
    live = stack.procs["dataplane-0"]
    assert live.proc is not None
    baseline = _memory_mb(live.proc.pid)
    say(f"==> cold start: writing {keys:,} virtual keys into the config bucket ({WRITE_CONCURRENCY} puts in flight)")
    write_s, sample = asyncio.run(_bulk_write(stack, keys))
    say(f"  written in {write_s:.1f}s ({keys / write_s:,.0f} keys/s)")
    port = free_port()
    origin = f"http://127.0.0.1:{port}"
    say(f"==> cold start: a fresh data-plane worker on {origin} replays the bucket")
    t0 = time.monotonic()
    svc = stack.spawn("dataplane-cold", "dataplane", env={"ALEPHANT_PORT": str(port)})
    assert svc.proc is not None
    pid = svc.proc.pid
    up_s: float | None = None
    try:
        while True:
            if svc.exited():
                raise BenchError(f"the cold worker exited with {svc.proc.returncode} (log: {svc.log})")
            if time.monotonic() - t0 > 600:
                raise BenchError(f"the cold worker was not ready within 600 s (log: {svc.log})")
            try:
                if up_s is None and http("GET", f"{origin}/healthz", timeout=1)[0] == 200:
                    up_s = time.monotonic() - t0
                if up_s is not None and http("GET", f"{origin}/readyz", timeout=1)[0] == 200:
                    break
            except OSError:
                pass
            time.sleep(0.02)
        ready_s = time.monotonic() - t0
        rss_ready = _memory_mb(pid)
        time.sleep(2.0)
        rss_later, peak = _memory_mb(pid), _memory_mb(pid, "VmHWM")
        health = _json(f"{origin}/healthz")[1] or {}
        status, _ = http("POST", f"{origin}/v1/chat/completions", headers={"Authorization": f"Bearer {sample}"},
                         body={"model": DEMO_MODEL, "messages": [{"role": "user", "content": "hi"}]}, timeout=10)
        live_rss = _memory_mb(live.proc.pid)
        load_avg = round(os.getloadavg()[0], 2)
    finally:
        svc.stop(timeout=15)
    say(f"  up in {up_s or 0:.2f}s, ready in {ready_s:.2f}s; RSS {rss_ready} MB ({rss_later} MB 2 s later); "
        f"a bulk key answered {status}")
    return {
        "keys": keys,
        "write_s": round(write_s, 2),
        "keys_written_per_s": round(keys / write_s),
        "entities": health.get("entities"),
        "up_s": None if up_s is None else round(up_s, 2),
        "ready_s": round(ready_s, 2),
        "replay_s": None if up_s is None else round(ready_s - up_s, 2),
        "rss_ready_mb": rss_ready,
        "rss_after_2s_mb": rss_later,
        "rss_peak_mb": peak,
        "rss_baseline_mb": baseline,
        "rss_live_worker_mb": live_rss,
        "bulk_key_status": status,
        "target_rss_mb": TARGET_RSS_MB,
        "load_avg_1m": load_avg,
        "wall_s": round(time.monotonic() - t_part, 1),
    }


# -- 3. throughput with 1, 2 and 4 workers ----------------------------------------------------


def _worker_pids(stack: Stack) -> list[int]:
    return [svc.proc.pid for name, svc in sorted(stack.procs.items())
            if name.startswith("dataplane-") and name[10:].isdigit() and svc.proc is not None and not svc.exited()]


def _log_size(log: Path) -> int:
    return log.stat().st_size if log.exists() else 0


def _wait_snapshot(log: Path, offset: int, timeout_s: float = 60) -> None:
    """Until the worker logs `snapshot_ready` past `offset` (on a shared port, /readyz may be
    answered by another worker)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), log.open("rb") as f:
            f.seek(offset)
            if b"snapshot_ready" in f.read():
                return
        time.sleep(0.1)
    raise BenchError(f"a worker did not log snapshot_ready within {timeout_s:.0f}s (log: {log})")


def scaling(stack: Stack, state_dir: Path, *, duration_s: float, warmup_s: float, connections: int,
            words: int) -> dict[str, Any]:
    """Part 3 (module docstring) on a running single-node stack with one worker; leaves it with
    one worker again. Its figures, `wall_s` included."""
    t_part = time.monotonic()
    fake, fake_url = start_fake(state_dir, words)
    env = stack.demo
    runs: list[dict[str, Any]] = []
    try:
        first = stack.procs["dataplane-0"]
        assert first.proc is not None and first.log is not None
        register_fake(env, fake_url, Child("dataplane-0", first.proc, first.log))
        for n in SCALING_WORKERS:
            while len(_worker_pids(stack)) < n:
                index = len(_worker_pids(stack))
                log = stack.state_dir / "logs" / f"dataplane-{index}.log"
                offset = _log_size(log)
                stack.start_worker(index)
                _wait_snapshot(log, offset)
            pids = _worker_pids(stack)
            settle(pids)  # a worker just started may still be warming up
            say(f"==> scaling: {n} worker{'s' if n > 1 else ''} on one port, {connections} connections "
                f"({warmup_s:g}s warm-up + {duration_s:g}s)")
            per0 = [cpu_seconds([p]) for p in pids]
            cpu0, box0 = cpu_seconds(pids), box_cpu_seconds()
            result = loadgen(label=f"{n} workers", url=env["ALEPHANT_BASE_URL"], api_key=env["ALEPHANT_API_KEY"],
                             model=GATEWAY_MODEL, connections=connections, stream=False, headers=GATEWAY_HEADERS,
                             duration_s=duration_s, warmup_s=warmup_s, log_dir=state_dir)
            box1 = box_cpu_seconds()
            settle(pids)
            cpu1 = cpu_seconds(pids)
            per1 = [cpu_seconds([p]) for p in pids]
            done = int(result.get("completed", 0))
            spent = [(b or 0.0) - (a or 0.0) for a, b in zip(per0, per1, strict=True)]
            run = {
                "workers": n, "rps": result["rps"], "p50_ms": result["p50_ms"], "p99_ms": result["p99_ms"],
                "errors": result["errors"], "completed": done,
                "cpu_ms_per_req": _round(per_request(cpu0, cpu1, done, 1000.0), 3),
                "box_cpu_ms_per_req": _round(per_request(box0[0], box1[0], done, 1000.0), 3),
                "box_busy_pct": round(100 * (box1[0] - box0[0]) / max(1e-9, box1[1] - box0[1]), 1),
                "worker_cpu_share_pct": [round(100 * s / max(1e-9, sum(spent)), 1) for s in spent],
                "load_avg_1m": round(os.getloadavg()[0], 2),
            }
            runs.append(run)
            say(f"  {run['rps']:.1f} req/s, p50 {run['p50_ms'] or 0:.2f} ms, worker CPU {run['cpu_ms_per_req']} "
                f"ms/req, box CPU {run['box_cpu_ms_per_req']} ms/req ({run['box_busy_pct']}% busy), "
                f"shares {run['worker_cpu_share_pct']}")
    finally:
        fake.stop(signal.SIGTERM, 5.0)
        for name in [n for n in stack.procs if n.startswith("dataplane-") and n != "dataplane-0"]:
            stack.procs[name].stop(timeout=15)
    base = runs[0]["rps"] if runs else 0.0
    return {
        "connections": connections, "duration_s": duration_s, "cpus": os.cpu_count(), "runs": runs,
        "ratios": {f"{r['workers']}/1": round(r["rps"] / base, 2) if base else None for r in runs[1:]},
        "wall_s": round(time.monotonic() - t_part, 1),
    }


def _round(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)


# -- entry point --------------------------------------------------------------------------------


@contextlib.contextmanager
def _scratch(given: Path | None) -> Iterator[Path]:
    if given is not None:
        given.mkdir(parents=True, exist_ok=True)
        yield given.resolve()
        return
    path = Path(tempfile.mkdtemp(prefix="alephant-bench-scaleout-"))
    path.chmod(0o755)  # the embedded Postgres may run as another user (see deploy/services.py)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Every part not skipped; ``{"propagation", "cold_start", "scaling"}`` (None: skipped)."""
    out: dict[str, Any] = {"propagation": None, "cold_start": None, "scaling": None}
    with _scratch(args.state_dir) as state:
        if args.propagation_changes > 0:
            (state / "cluster").mkdir(exist_ok=True)
            out["propagation"] = propagation(args.propagation_changes, state / "cluster")
            say(f"  propagation part took {out['propagation']['wall_s']}s")
        if args.coldstart_keys > 0 or args.scaling_duration > 0:
            t0 = time.monotonic()
            (state / "single").mkdir(exist_ok=True)
            say(f"==> starting a single-node stack for the cold-start and scaling parts (log: {state}/single/logs)")
            with dedicated_stack(state / "single", log=lambda line: say(f"  {line}")) as stack:
                started = time.monotonic() - t0
                if args.scaling_duration > 0:
                    out["scaling"] = scaling(stack, state, duration_s=args.scaling_duration, warmup_s=args.warmup,
                                             connections=args.scaling_connections, words=args.words)
                    out["scaling"]["stack_start_s"] = round(started, 1)
                    say(f"  scaling part took {out['scaling']['wall_s']}s (+{started:.0f}s stack start)")
                if args.coldstart_keys > 0:
                    out["cold_start"] = cold_start(stack, args.coldstart_keys)
                    say(f"  cold-start part took {out['cold_start']['wall_s']}s")
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.scaleout", description=__doc__.split("\n\n")[0])
    parser.add_argument("--propagation-changes", type=int, default=50,
                        help="admin changes timed to all 4 cluster workers (default 50; 0 skips)")
    parser.add_argument("--coldstart-keys", type=int, default=100_000,
                        help="virtual keys in the bucket a fresh worker replays (default 100000; 0 skips)")
    parser.add_argument("--scaling-duration", type=float, default=5.0,
                        help="measured seconds per worker count, 1, 2 and 4 (default 5; 0 skips)")
    parser.add_argument("--scaling-connections", type=int, default=32, help="connections (default 32)")
    parser.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds before each run (default 1)")
    parser.add_argument("--words", type=int, default=8, help="words per fake answer (default 8)")
    parser.add_argument("--state-dir", type=Path, help="where the stacks live (default: a temp dir, removed)")
    parser.add_argument("--json-out", type=Path, help="write the figures here (default: a summary on stdout)")
    return parser.parse_args(argv)


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    from tests.bench.report import scaleout_lines

    args = parse_args(argv)
    # Started in a session of its own by the runner, which forwards SIGINT; SIGTERM stops it the same way.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _interrupt)
    doc = run(args)
    if args.json_out is not None:
        args.json_out.write_text(json.dumps(doc, indent=2) + "\n")
    else:
        say("\n".join(scaleout_lines(doc)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
