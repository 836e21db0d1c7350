"""``make bench``: the gateway against the fake upstream called directly, in the same run.

Steps: start the fake upstream (own process, recording off) -> start ``alephant dev`` on a
fresh state dir -> wait for ``demo.env`` and ``/readyz`` -> register the fake as provider
``fake`` with a price -> wait until ``fake/gpt-4o-mini`` answers 200 -> set up the governed
tenant (:mod:`tests.bench.governed`) and the router (:mod:`tests.bench.routed`) -> for each
scenario ({connections} x {non-stream, stream}) run :mod:`tests.bench.loadgen` in its own process
against four targets in turn -> stop the stack -> run the micro-benchmark
:mod:`tests.bench.governance_micro`, the projector, finance-query and scale-out benchmarks
(:mod:`tests.bench.scaleout`: config propagation to 4 cluster workers, a cold start over 100k keys,
throughput with 1, 2 and 4 workers; stacks of their own) -> print the tables and write JSON.

Targets: ``direct`` (the fake itself), ``gateway`` (the demo key: nothing governs its path, so
no Redis call), ``governed`` (issue 8's full governance: a key bound to an agent in a member and
a department of workspace ``bench-gov``, with a policy, two limits and two budgets on its path,
all far above what the bench reaches, so every request is admitted through one Redis script),
``router`` (the demo key through ``POST /router/{id}/v1/chat/completions``: a weighted router over
two targets that are both the fake, as providers ``fake`` and ``fake2``; skipped, with a note, when
the stack's admin API has no routers), ``cached`` (the gateway's request with
``Alephant-Cache-Ttl``: every request after the first is an exact cache hit), ``semantic`` (a key
with a semantic cache setting, embedding with the built-in ``mock/embed``, and a new prompt every
request: each one is embedded, looked up in Qdrant, missed, called and stored; its p50 over the
plain gateway's is the semantic path's added latency), ``observed`` (the gateway's request to a
second ``alephant dev`` of the same build, state in ``<state-dir>/observed``, exporting traces to a
null OTLP collector this process runs and archiving every body to its S3:
:mod:`tests.bench.observed`; ``--only observed`` measures ``gateway`` and ``traced`` too),
``traced`` (the same second stack through a key that keeps no bodies: tracing alone). The
first stack runs with every ``OTEL_*`` variable removed from its environment, so tracing is off
there whatever the caller's environment says.
Every request names ``max_tokens`` (``BENCH_MAX_TOKENS``), as agents' clients usually do: the
budget hold is then small (otherwise the gateway injects what the budget affords, up to the
model's whole output limit, and the hold and token-limit charge grow with it).

Around each gateway-served run the runner reads the data-plane workers' CPU time from
``/proc/<pid>/stat`` (the workers are the ``dataplane`` children of the serving ``alephant dev``)
and Redis ``INFO`` (``EVALSHA`` calls, client reads), and divides both by the requests the run
completed (loadgen's ``completed``: warm-up and errors included, all of which the worker served).
The closing reading is taken once the workers are idle again (``settle_s`` in the JSON, at most
30 s), so work deferred past the last answer (span export, body uploads, settlements) counts. Redis
counts include traffic that is not the requests' (the governor's lease refreshes): the ``gateway``
row, whose path has nothing to govern, shows that baseline.

All traffic goes to 127.0.0.1. Every process this starts is stopped on the way out, also on
failure or Ctrl-C: ``alephant dev`` with SIGINT (SIGKILL after 20 s), the fake with SIGTERM.
Nothing is pass/fail: the exit status is non-zero only when the stack or a load run fails.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import Any

from tests.bench.governance_micro import summary_table as micro_table
from tests.bench.governed import (
    GOV_AGENT,
    GOV_DEPARTMENT,
    GOV_MEMBER,
    GOV_WORKSPACE,
    Governed,
    budget_state,
    register_governed,
)
from tests.bench.loadgen import chat_body
from tests.bench.observed import (
    NullCollector,
    S3Target,
    body_objects,
    ready_observed,
    register_traced_key,
    tracing_env,
)
from tests.bench.processes import BenchError, Child, admin_post, http, say, spawn, wait_for
from tests.bench.report import (
    GOVERNANCE_TARGETS,
    TARGET_NAMES,
    TARGETS,
    compare,
    comparison_table,
    governance,
    governance_table,
    observability,
    observability_table,
    results_table,
    routing,
    routing_table,
    scaleout_lines,
    scenario_name,
)
from tests.bench.routed import Routed, RouterUnavailable, register_router
from tests.bench.server_costs import RedisCounters, cpu_seconds, per_request, redis_url, settle, worker_pids

FAKE_PROVIDER_KEY = "sk-fake-upstream"
DIRECT_MODEL = "gpt-4o-mini"
GATEWAY_MODEL = "fake/gpt-4o-mini"
GATEWAY_HEADERS = {"Alephant-Agent-Id": "bench-agent", "Alephant-Run-Id": "bench-run"}
BENCH_MAX_TOKENS = 64
STOP_GRACE_S = 20.0
FAKE_PRICE = {"input_per_mtok_nanos": 150_000_000, "output_per_mtok_nanos": 600_000_000}

def start_fake(state_dir: Path, words: int) -> tuple[Child, str]:
    """Start the fake upstream on a free port; return it and its base URL."""
    log = state_dir / "fake-upstream.log"
    log.unlink(missing_ok=True)  # a reused state dir must not offer a previous run's port
    argv = [sys.executable, "-m", "tests.fakes.upstream", "--port", "0", "--no-record", "--words", str(words)]
    child = spawn("fake upstream", argv, log)

    def listening() -> str | None:
        lines = [line for line in log.read_text(errors="replace").splitlines() if line.startswith("fake upstream")]
        return lines[-1].rsplit(" ", 1)[1] if lines and " listening on " in lines[-1] else None

    url = wait_for(child, "the fake upstream to listen", 20, listening)
    return child, url


def read_env_file(path: Path) -> dict[str, str]:
    """``KEY=value`` lines of ``path`` (comments and blanks skipped); ``{}`` if absent."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return {}
    out: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.strip().partition("=")
        if sep and not key.startswith("#"):
            out[key.strip()] = value.strip()
    return out


def start_stack(state_dir: Path, workers: int, timeout_s: float, *, name: str = "alephant dev",
                extra_env: dict[str, str] | None = None) -> tuple[Child, dict[str, str]]:
    """Start ``alephant dev`` on free ports; return it and its ``demo.env`` once ``/readyz`` is 200.
    Its environment is this process's without the ``OTEL_*`` variables (tracing off), plus
    ``extra_env``; ``alephant dev`` hands it on to every gateway process it starts."""
    alephant = Path(sys.executable).with_name("alephant")
    command = [str(alephant)] if alephant.exists() else [sys.executable, "-m", "deploy.cli"]
    demo_path = state_dir / "demo.env"
    # A reused state dir already has a demo.env; only one written by this start counts.
    stale = demo_path.stat().st_mtime_ns if demo_path.exists() else None
    argv = [*command, "--state-dir", str(state_dir), "dev", "--port", "0", "--admin-port", "0"]
    argv += ["--workers", str(workers)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")} | (extra_env or {})
    child = spawn(name, argv, state_dir / "alephant-dev.log", env=env)
    required = ("ALEPHANT_BASE_URL", "ALEPHANT_API_KEY", "ALEPHANT_ADMIN_URL", "ALEPHANT_ADMIN_TOKEN")

    def demo_env() -> dict[str, str] | None:
        if stale is not None and demo_path.exists() and demo_path.stat().st_mtime_ns == stale:
            return None
        env = read_env_file(demo_path)
        return env if all(env.get(k) for k in required) else None

    demo = wait_for(child, "demo.env", timeout_s, demo_env)
    origin = demo["ALEPHANT_BASE_URL"].removesuffix("/").removesuffix("/v1")

    def ready() -> bool:
        try:
            return http("GET", f"{origin}/readyz", timeout=1)[0] == 200
        except OSError:
            return False

    wait_for(child, f"{origin}/readyz", timeout_s, ready)
    return child, demo


def register_fake(env: dict[str, str], fake_url: str, stack: Child) -> None:
    """Add provider ``fake`` and its price via the admin API; wait until the gateway routes to it."""
    admin, auth = env["ALEPHANT_ADMIN_URL"], {"Authorization": f"Bearer {env['ALEPHANT_ADMIN_TOKEN']}"}
    calls = [
        (
            "/admin/v1/providers",
            {
                "workspace_id": "demo",
                "name": "fake",
                "type": "openai",
                "base_url": fake_url,
                "api_key": FAKE_PROVIDER_KEY,
            },
        ),
        (
            "/admin/v1/prices",
            {"provider": "fake", "model": DIRECT_MODEL, **FAKE_PRICE},
        ),
    ]
    for path, body in calls:
        status, raw = http("POST", admin + path, headers=auth, body=body)
        if status not in (200, 201):
            raise BenchError(f"POST {path} -> {status}: {raw.decode(errors='replace')[:500]}")

    headers = {"Authorization": f"Bearer {env['ALEPHANT_API_KEY']}", **GATEWAY_HEADERS}
    url = env["ALEPHANT_BASE_URL"].rstrip("/") + "/chat/completions"
    last: list[tuple[int, bytes]] = []

    def routed() -> bool:
        try:
            result = http("POST", url, headers=headers, body=chat_body(GATEWAY_MODEL, stream=False))
        except OSError as exc:
            result = (0, str(exc).encode())
        last[:] = [result]
        return result[0] == 200

    try:
        wait_for(stack, f"{GATEWAY_MODEL} to answer 200 through the gateway", 30, routed)
    except BenchError as exc:
        status, raw = last[0] if last else (0, b"")
        raise BenchError(f"{exc}\n  last answer: {status} {raw.decode(errors='replace')[:500]}") from None


# -- load runs -------------------------------------------------------------------------------


def register_semantic(env: dict[str, str]) -> str:
    """A demo-workspace key with a semantic cache setting (embedding model `mock/embed`); its
    plaintext key."""
    key = admin_post(env, "/admin/v1/virtual-keys", {"workspace_id": "demo", "name": "bench-semantic"})
    admin_post(env, "/admin/v1/cache-settings", {
        "workspace_id": "demo", "scope": "key", "scope_id": key["id"], "mode": "semantic", "ttl_s": 3600,
        "similarity": 0.99, "embedding_model": "mock/embed"})
    time.sleep(1.5)  # the setting reaches the worker within a second
    return str(key["key"])


def loadgen(
    *,
    label: str,
    url: str,
    api_key: str,
    model: str,
    connections: int,
    stream: bool,
    headers: dict[str, str],
    duration_s: float,
    warmup_s: float,
    log_dir: Path,
    vary: bool = False,
) -> dict[str, Any]:
    """Run :mod:`tests.bench.loadgen` in its own process and return its JSON result."""
    argv = [sys.executable, "-m", "tests.bench.loadgen", "--url", url, "--api-key", api_key, "--model", model]
    argv += ["--connections", str(connections), "--duration", str(duration_s), "--warmup", str(warmup_s)]
    argv += ["--label", label, "--max-tokens", str(BENCH_MAX_TOKENS)]
    if stream:
        argv.append("--stream")
    if vary:
        argv.append("--vary")
    for name, value in headers.items():
        argv += ["--header", f"{name}: {value}"]
    return run_json(argv, duration_s + warmup_s + 60, log_dir / "loadgen-error.log", f"loadgen {label}")


def run_json(argv: list[str], timeout_s: float, error_log: Path, what: str) -> dict[str, Any]:
    """Run a measuring child process in its own session; its JSON result from stdout. On failure
    its stderr goes to `error_log` and BenchError names `what`."""
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout_s)
    except BaseException:
        proc.kill()
        proc.wait(5)
        raise
    if proc.returncode != 0:
        error_log.write_bytes(err)
        raise BenchError(f"{what} exited with {proc.returncode}:\n{err.decode(errors='replace')[-2000:]}")
    result: dict[str, Any] = json.loads(out)
    return result


def _parse_connections(raw: str) -> list[int]:
    try:
        values = [int(part) for part in raw.split(",") if part.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"--connections takes integers like 1,32, got {raw!r}") from exc
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"--connections takes positive integers, got {raw!r}")
    return values


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m tests.bench.run",
        description="Benchmark the gateway against the fake upstream called directly, in the same run. "
        "Pass options through make as BENCH_ARGS='--duration 3'.",
    )
    parser.add_argument("--duration", type=float, default=5.0, help="measured seconds per run (default 5)")
    parser.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds before each run (default 1)")
    parser.add_argument("--workers", type=int, default=1, help="data-plane workers for alephant dev (default 1)")
    parser.add_argument(
        "--connections",
        type=_parse_connections,
        default=[1, 32],
        help="comma-separated concurrency levels (default 1,32)",
    )
    parser.add_argument(
        "--rounds",
        type=_positive_int,
        default=3,
        help="runs per scenario and target, interleaved; the run with the median req/s is reported (default 3)",
    )
    parser.add_argument("--only", choices=list(TARGET_NAMES), help="measure one target (direct skips the stack)")
    parser.add_argument("--mode", choices=["both", "non-stream", "stream"], default="both")
    parser.add_argument("--words", type=int, default=8, help="words per fake answer (default 8)")
    parser.add_argument(
        "--state-dir",
        type=Path,
        help="state dir for alephant dev (default: a fresh temp dir, removed after a clean run)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        help="results JSON (default: <state-dir>/bench.json if --state-dir, else .alephant/bench.json)",
    )
    parser.add_argument("--startup-timeout", type=float, default=180.0, help="seconds to wait for the stack")
    parser.add_argument(
        "--projector-events",
        type=int,
        default=50_000,
        help="events folded by the projector benchmark after the load runs (default 50000; 0 skips it)",
    )
    parser.add_argument(
        "--finance-rows",
        type=int,
        default=1_000_000,
        help="finance facts the finance-query benchmark loads and queries (default 1000000; 0 skips it)",
    )
    parser.add_argument("--console-rows", type=int, default=1_000_000,
                        help="finance facts under the console page benchmark (tests.bench.console_pages; default "
                        "1000000; 0 skips it)")
    parser.add_argument("--mcp-calls", type=int, default=300,
                        help="sequential MCP tool calls, direct and through /mcp/{name} (tests.bench.mcp_latency; "
                        "default 300; 0 skips it)")
    parser.add_argument("--propagation-changes", type=int, default=50,
                        help="admin changes timed until all 4 workers of a multi-node stack apply each "
                        "(tests.bench.scaleout; default 50, about 45 s with the cluster's start; 0 skips it)")
    parser.add_argument("--coldstart-keys", type=int, default=100_000,
                        help="virtual keys a fresh worker replays from the bucket before /readyz "
                        "(tests.bench.scaleout; default 100000, about 60 s; 0 skips it)")
    parser.add_argument("--scaling-duration", type=float, default=5.0,
                        help="measured seconds at each of 1, 2 and 4 workers on one port (tests.bench.scaleout; "
                        "default 5, about 40 s with a stack start; 0 skips it)")
    parser.add_argument("--paid-calls", type=int, default=100,
                        help="sequential calls per series of the paid-path latency run (default 100; 0 skips it)")
    parser.add_argument(
        "--micro-iterations",
        type=int,
        default=100_000,
        help="requests timed by the governance micro-benchmark after the load runs (default 100000; 0 skips it)",
    )
    return parser.parse_args(argv)


@contextlib.contextmanager
def _state_dir(given: Path | None) -> Iterator[tuple[Path, list[bool]]]:
    """Yield the state dir and a one-item ``[keep]`` flag; a temp dir is removed unless kept."""
    if given is not None:
        given.mkdir(parents=True, exist_ok=True)
        yield given.resolve(), [True]
        return
    path = Path(tempfile.mkdtemp(prefix="alephant-bench-"))
    # mkdtemp makes it 0700; as root the embedded Postgres runs as another user that still has
    # gid 0, so it needs the group bits too (the secrets inside are 0600 files).
    path.chmod(0o755)
    keep = [False]
    try:
        yield path, keep
    finally:
        if keep[0]:
            say(f"  state and logs kept in {path}")
        else:
            shutil.rmtree(path, ignore_errors=True)


def bench(args: argparse.Namespace, state_dir: Path, keep: list[bool]) -> dict[str, Any]:
    """Run every scenario; return the JSON document (also the caller's source for the tables).

    Sets ``keep[0]`` when ``alephant dev`` had to be SIGKILLed: its children (NATS, Postgres,
    gateway processes) run in their own sessions and may outlive it, so their state must stay.
    """
    children: list[tuple[Child, int, float]] = []
    results: list[dict[str, Any]] = []
    all_runs: list[dict[str, Any]] = []
    gov: Governed | None = None
    router: Routed | None = None
    semantic_key: str | None = None
    paid: dict[str, Any] | None = None
    gov_budgets: list[dict[str, Any]] = []
    counters = RedisCounters(None)
    observed_counters = RedisCounters(None)
    collector: NullCollector | None = None
    observed_stack: Child | None = None
    observed_env: dict[str, str] = {}
    observed_setup: dict[str, Any] | None = None
    s3: S3Target | None = None
    traced_key: str | None = None
    started = time.time()
    try:
        say(f"==> starting fake upstream ({args.words} words per answer)")
        fake, fake_url = start_fake(state_dir, args.words)
        children.append((fake, signal.SIGTERM, 5.0))
        say(f"  fake upstream at {fake_url}")

        env: dict[str, str] = {}
        # `observed` and `traced` are read against `gateway`, so they bring it along (`observed` brings `traced`).
        along = {"observed": ("gateway", "traced"), "traced": ("gateway",)}.get(args.only or "", ())
        targets = [t for t in TARGET_NAMES if args.only in (None, t) or t in along]
        stack: Child | None = None
        if args.only != "direct":
            say(f"==> starting stack: alephant dev --workers {args.workers} (log: {state_dir}/alephant-dev.log)")
            t0 = time.monotonic()
            stack, env = start_stack(state_dir, args.workers, args.startup_timeout)
            children.append((stack, signal.SIGINT, STOP_GRACE_S))
            say(f"  gateway at {env['ALEPHANT_BASE_URL']} (ready in {time.monotonic() - t0:.1f}s)")
            say(f"==> registering provider 'fake' -> {fake_url} and its price")
            register_fake(env, fake_url, stack)
            say(f"  {GATEWAY_MODEL} answers through the gateway")
            if "governed" in targets:
                say(f"==> governed tenant: workspace {GOV_WORKSPACE}, department, member, agent, key; "
                    "a policy, two budgets, two limits on the key's path")
                gov = register_governed(env, fake_url, stack, provider_key=FAKE_PROVIDER_KEY, model=GATEWAY_MODEL,
                                        max_tokens=BENCH_MAX_TOKENS)
                say("  the governed key answers 200 under its limits")
            if "semantic" in targets:
                say("==> semantic: a key whose cache setting is semantic (embedding model mock/embed)")
                semantic_key = register_semantic(env)
            if "router" in targets:
                say("==> router: provider 'fake2' (the same fake) and a weighted router over fake and fake2")
                try:
                    router = register_router(env, fake_url, stack, first_provider="fake",
                                             provider_key=FAKE_PROVIDER_KEY, model=DIRECT_MODEL, price=FAKE_PRICE,
                                             headers=GATEWAY_HEADERS, max_tokens=BENCH_MAX_TOKENS)
                except RouterUnavailable as exc:
                    say(f"!! router target skipped: the admin API has no routers ({exc})")
                    targets.remove("router")
                else:
                    say(f"  router {router.name} ({router.router_id}) answers 200 from both targets "
                        f"(probes: {router.probes_served_by})")
            counters = RedisCounters(redis_url(state_dir))
            if counters.read() is None:
                say("  (Redis INFO unavailable: the Redis columns stay empty)")
            if "observed" in targets or "traced" in targets:
                observed_dir = state_dir / "observed"
                collector = NullCollector()
                say(f"==> observed: a second stack of this build, traces to a null OTLP collector at "
                    f"{collector.endpoint}, bodies archived (log: {observed_dir}/alephant-dev.log)")
                t0 = time.monotonic()
                observed_stack, observed_env = start_stack(observed_dir, args.workers, args.startup_timeout,
                                                           name="alephant dev (observed)",
                                                           extra_env=tracing_env(collector))
                children.append((observed_stack, signal.SIGINT, STOP_GRACE_S))
                say(f"  observed gateway at {observed_env['ALEPHANT_BASE_URL']} "
                    f"(ready in {time.monotonic() - t0:.1f}s)")
                register_fake(observed_env, fake_url, observed_stack)
                s3 = S3Target.from_ops_env(read_env_file(observed_dir / "ops.env"))
                traced_key = register_traced_key(observed_env)
                setting = ready_observed(observed_env, observed_stack, collector, s3, model=GATEWAY_MODEL,
                                         headers=GATEWAY_HEADERS, max_tokens=BENCH_MAX_TOKENS)
                observed_setup = {"otlp_endpoint": collector.endpoint, "log_setting": setting.get("id"),
                                  "bucket": s3.bucket, "setup_spans": collector.counts()["spans"],
                                  "setup_body_objects": body_objects(s3)}
                say(f"  bodies kept for workspace demo; the collector has {observed_setup['setup_spans']} spans "
                    f"and the bucket {observed_setup['setup_body_objects']} body objects already")
                observed_counters = RedisCounters(redis_url(observed_dir))

        modes = {"both": [False, True], "non-stream": [False], "stream": [True]}[args.mode]
        for connections in args.connections:
            for stream in modes:
                scenario = scenario_name(connections, stream)
                runs: dict[str, list[dict[str, Any]]] = {t: [] for t in targets}
                for round_no, target in ((n, t) for n in range(1, args.rounds + 1) for t in targets):
                    of = f", round {round_no}/{args.rounds}" if args.rounds > 1 else ""
                    say(f"==> scenario {scenario} {target} ({args.warmup:g}s warm-up + {args.duration:g}s{of})")
                    if target == "direct":
                        url, key, model, headers = fake_url, "sk-bench-direct", DIRECT_MODEL, {}
                    elif target == "gateway":
                        url, key, model = env["ALEPHANT_BASE_URL"], env["ALEPHANT_API_KEY"], GATEWAY_MODEL
                        headers = GATEWAY_HEADERS
                    elif target == "router":
                        assert router is not None
                        url, key, model = router.base_url, env["ALEPHANT_API_KEY"], DIRECT_MODEL
                        headers = GATEWAY_HEADERS
                    elif target == "cached":  # the same body every time: all hits after the first
                        url, key, model = env["ALEPHANT_BASE_URL"], env["ALEPHANT_API_KEY"], GATEWAY_MODEL
                        headers = {**GATEWAY_HEADERS, "Alephant-Cache-Ttl": "3600"}
                    elif target == "semantic":  # a new prompt every time: embed, look up, miss, call, store
                        assert semantic_key is not None
                        url, key, model = env["ALEPHANT_BASE_URL"], semantic_key, GATEWAY_MODEL
                        headers = GATEWAY_HEADERS
                    elif target in ("observed", "traced"):  # the gateway's request, to the stack with tracing on
                        assert traced_key is not None
                        url, model, headers = observed_env["ALEPHANT_BASE_URL"], GATEWAY_MODEL, GATEWAY_HEADERS
                        key = observed_env["ALEPHANT_API_KEY"] if target == "observed" else traced_key
                    else:
                        assert gov is not None
                        url, key, model, headers = env["ALEPHANT_BASE_URL"], gov.key, GATEWAY_MODEL, gov.headers
                    observed = target in ("observed", "traced")
                    serving, redis_counters = (observed_stack, observed_counters) if observed else (stack, counters)
                    pids = worker_pids(serving.proc.pid) if serving is not None and target != "direct" else []
                    cpu0, redis0 = cpu_seconds(pids) if pids else None, redis_counters.read() if pids else None
                    result = loadgen(
                        label=f"{scenario} {target}",
                        url=url,
                        api_key=key,
                        model=model,
                        connections=connections,
                        stream=stream,
                        headers=headers,
                        duration_s=args.duration,
                        warmup_s=args.warmup,
                        log_dir=state_dir,
                        vary=target == "semantic",
                    )
                    settle_s = settle(pids) if pids else None
                    cpu1, redis1 = cpu_seconds(pids) if pids else None, redis_counters.read() if pids else None
                    done = int(result.get("completed", 0))
                    result.update(
                        scenario=scenario,
                        target=target,
                        workers=len(pids) or None,
                        settle_s=None if settle_s is None else round(settle_s, 2),
                        cpu_ms_per_req=per_request(cpu0, cpu1, done, 1000.0),
                        redis_evalsha_per_req=per_request(redis0 and redis0[0], redis1 and redis1[0], done),
                        redis_reads_per_req=per_request(redis0 and redis0[1], redis1 and redis1[1], done),
                        redis_cpu_ms_per_req=per_request(redis0 and redis0[2], redis1 and redis1[2], done, 1000.0),
                    )
                    runs[target].append(result)
                    all_runs.append(result)
                    errors = f", {result['errors']} errors" if result["errors"] else ""
                    server = ""
                    if result["cpu_ms_per_req"] is not None:
                        server = f", worker CPU {result['cpu_ms_per_req']:.3f} ms/req"
                    if result["redis_evalsha_per_req"] is not None:
                        server += (f", {result['redis_evalsha_per_req']:.2f} EVALSHA/req, "
                                   f"Redis CPU {result['redis_cpu_ms_per_req']:.3f} ms/req")
                    say(f"  {result['rps']:.1f} req/s, p50 {result['p50_ms'] or 0:.3f} ms{errors}{server}")
                results.extend(median_run(runs[t]) for t in targets)
        if gov is not None:
            gov_budgets = [budget_state(env, budget_id) for budget_id in gov.budget_ids]
        if collector is not None and s3 is not None and observed_setup is not None:
            say("==> observed: waiting for the last spans and body uploads")
            o = observed_setup
            o.update(observed_totals(collector, s3, state_dir / "observed" / "logs"))
            # Measured requests: every run's, warm-up included (the setup's calls are subtracted); the
            # traced key's are traced too but keep no body.
            served = {t: sum(int(r.get("completed", 0)) for r in all_runs if r["target"] == t)
                      for t in ("observed", "traced")}
            o["requests_measured"], o["traced_requests_measured"] = served["observed"], served["traced"]
            o["spans_per_request"] = per_request(o["setup_spans"], o["spans"], sum(served.values()))
            o["objects_per_request"] = per_request(o["setup_body_objects"], o["body_objects"], served["observed"])
        if args.paid_calls > 0 and stack is not None:
            say(f"==> paid path: {args.paid_calls} sequential calls each of model, challenge and paid "
                "(local fake facilitator)")
            paid = run_json([sys.executable, "-m", "tests.bench.paid", "--base-url", env["ALEPHANT_BASE_URL"],
                             "--admin-url", env["ALEPHANT_ADMIN_URL"], "--admin-token", env["ALEPHANT_ADMIN_TOKEN"],
                             "--api-key", env["ALEPHANT_API_KEY"], "--calls", str(args.paid_calls)],
                            300, state_dir / "paid-error.log", "paid path")
    finally:
        counters.close()
        observed_counters.close()
        # A second Ctrl-C must not abandon the stack half-stopped.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        for child, sig, grace in reversed(children):
            if child.alive():
                say(f"==> stopping {child.name}")
            if child.stop(sig, grace) and child.name.startswith("alephant dev"):
                keep[0] = True
                say(f"!! alephant dev was killed; its services may still run (look for {state_dir} in ps)")
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, _raise_interrupt)
        if collector is not None:
            collector.close()

    micro = governance_micro(args.micro_iterations, state_dir) if args.micro_iterations > 0 else None
    projector = projector_bench(args.projector_events, state_dir) if args.projector_events > 0 else None
    finance = finance_bench(args.finance_rows, state_dir) if args.finance_rows > 0 else None
    console = console_bench(args.console_rows, state_dir) if args.console_rows > 0 else None
    mcp = mcp_bench(args.mcp_calls, state_dir) if args.mcp_calls > 0 else None
    scaleout = scaleout_bench(args, state_dir)

    return {
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "settings": {
            "duration_s": args.duration,
            "warmup_s": args.warmup,
            "rounds": args.rounds,
            "workers": args.workers,
            "connections": args.connections,
            "words": args.words,
            "only": args.only,
            "mode": args.mode,
        },
        "targets": TARGETS,
        "governance_targets": GOVERNANCE_TARGETS,
        "results": results,
        "comparisons": compare(results),
        "governance": governance(results),
        "routing": routing(results),
        "observability": observability(results),
        "observed_setup": observed_setup,
        "router_setup": None if router is None else {
            "router_id": router.router_id, "name": router.name, "strategy": "weighted",
            "targets": [f"fake/{DIRECT_MODEL}", f"fake2/{DIRECT_MODEL}"], "probes_served_by": router.probes_served_by,
        },
        "governed_setup": None if gov is None else {
            "workspace": GOV_WORKSPACE, "department": GOV_DEPARTMENT, "member": GOV_MEMBER, "agent": GOV_AGENT,
            "key_id": gov.key_id, "policies": gov.policy_ids, "limits": gov.limit_ids, "budgets": gov_budgets,
        },
        "micro": micro,
        "paid": paid,
        "projector": projector,
        "finance_queries": finance,
        "console_pages": console,
        "mcp_latency": mcp,
        **scaleout,
    }


def observed_totals(collector: NullCollector, s3: S3Target, logs: Path) -> dict[str, Any]:
    """What the observed stack exported and archived, read once both counts have stopped growing
    (the batch span processor exports every 5 s; the uploader drains its queue; at most 30 s): the
    collector's counts, the body objects, and the bodies dropped (one warning each, queue full or
    upload failed) in its data-plane workers' logs (``logs/dataplane-*.log``)."""
    deadline, last, steady = time.monotonic() + 30, None, 0
    while time.monotonic() < deadline and steady < 2:
        time.sleep(1.0)
        now = (collector.counts()["spans"], body_objects(s3))
        steady, last = (steady + 1 if now == last else 0), now
    counts, objects = collector.counts(), body_objects(s3)
    dropped = {"body_archive_buffer_full": 0, "body_archive_failed": 0}
    for log in logs.glob("dataplane-*.log"):
        text = log.read_text(errors="replace")
        for event in dropped:
            dropped[event] += text.count(event)
    return {**counts, "body_objects": objects, "bodies_dropped_queue_full": dropped["body_archive_buffer_full"],
            "bodies_dropped_upload_failed": dropped["body_archive_failed"]}


def median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run with the median req/s (the lower middle one for an even count), with every run's
    req/s as ``rounds_rps``: one run's figures, all from the same run, and the spread beside them.
    Targets are measured in turns (round 1 of each, then round 2, ...) so a noisy neighbour on a
    shared machine hits them alike."""
    ordered = sorted(runs, key=lambda r: r["rps"])
    return {**ordered[(len(ordered) - 1) // 2], "rounds_rps": [r["rps"] for r in runs]}


def projector_bench(events: int, log_dir: Path) -> dict[str, Any]:
    """Run :mod:`tests.bench.projector` (its own NATS and Postgres, or the ``ALEPHANT_*_URL``
    ones) in a child process and return its JSON result."""
    say(f"==> projector: {events:,} events published, then folded into Postgres by every projection")
    argv = [sys.executable, "-m", "tests.bench.projector", "--json", "--events", str(events)]
    return run_json(argv, 900, log_dir / "projector-error.log", "projector bench")


def finance_bench(rows: int, log_dir: Path) -> dict[str, Any]:
    """Run :mod:`tests.bench.finance_queries` (a scratch database on its own Postgres) in a child
    process and return its JSON result."""
    say(f"==> finance queries over {rows:,} finance facts (loaded with COPY first)")
    argv = [sys.executable, "-m", "tests.bench.finance_queries", "--json", "--rows", str(rows)]
    return run_json(argv, 1800, log_dir / "finance-error.log", "finance queries bench")


def console_bench(rows: int, log_dir: Path) -> dict[str, Any]:
    """Run :mod:`tests.bench.console_pages` (a stack of its own with `rows` finance facts) in a
    child process and return its JSON result."""
    say(f"==> console pages over {rows:,} finance facts (tests.bench.console_pages)")
    argv = [sys.executable, "-m", "tests.bench.console_pages", "--json", "--rows", str(rows)]
    return run_json(argv, 1800, log_dir / "console-error.log", "console pages bench")


def mcp_bench(calls: int, log_dir: Path) -> dict[str, Any]:
    """Run :mod:`tests.bench.mcp_latency` (a stack and an MCP server of its own) in a child process."""
    say(f"==> MCP tool calls, direct and through the gateway ({calls} each, tests.bench.mcp_latency)")
    argv = [sys.executable, "-m", "tests.bench.mcp_latency", "--json", "--calls", str(calls)]
    return run_json(argv, 900, log_dir / "mcp-error.log", "MCP latency bench")


def scaleout_bench(args: argparse.Namespace, state_dir: Path) -> dict[str, Any]:
    """Run :mod:`tests.bench.scaleout` (stacks of its own under ``<state-dir>/scaleout``) in a child
    process, its progress on our stdout; ``{"propagation", "cold_start", "scaling"}``, each None
    when skipped."""
    skipped: dict[str, Any] = {"propagation": None, "cold_start": None, "scaling": None}
    if args.propagation_changes <= 0 and args.coldstart_keys <= 0 and args.scaling_duration <= 0:
        return skipped
    say("==> scale-out: config propagation, cold start, throughput by worker count (tests.bench.scaleout)")
    out = state_dir / "scaleout.json"
    out.unlink(missing_ok=True)
    argv = [sys.executable, "-m", "tests.bench.scaleout", "--json-out", str(out),
            "--state-dir", str(state_dir / "scaleout"), "--propagation-changes", str(args.propagation_changes),
            "--coldstart-keys", str(args.coldstart_keys), "--scaling-duration", str(args.scaling_duration),
            "--warmup", str(args.warmup), "--words", str(args.words)]
    proc = subprocess.Popen(argv, start_new_session=True)
    try:
        code = proc.wait(1800)
    except BaseException:
        proc.send_signal(signal.SIGINT)  # it stops its stacks on the way out: give it time
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        raise
    if code != 0 or not out.exists():
        raise BenchError(f"the scale-out bench exited with {code} (logs under {state_dir / 'scaleout'})")
    result: dict[str, Any] = {**skipped, **json.loads(out.read_text())}
    return result


def governance_micro(iterations: int, log_dir: Path) -> dict[str, Any]:
    """Run :mod:`tests.bench.governance_micro` in its own process (the stack stopped, so it has
    the CPU to itself as far as this run goes) and return its JSON result."""
    say(f"==> governance micro-benchmark ({iterations:,} requests over a 100k-key snapshot)")
    argv = [sys.executable, "-m", "tests.bench.governance_micro", "--json", "--iterations", str(iterations)]
    return run_json(argv, 600, log_dir / "micro-error.log", "governance_micro")


def _rate(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit status (0 unless the stack or a load run failed)."""
    args = parse_args(argv)
    # SIGINT may arrive ignored (background job of a non-interactive shell) and children would
    # inherit that, so `alephant dev` could not be stopped with it: install real handlers.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _raise_interrupt)
    with _state_dir(args.state_dir) as (state_dir, keep):
        try:
            doc = bench(args, state_dir, keep)
        except BenchError as exc:
            keep[0] = True
            say(f"!! bench failed: {exc}")
            return 1
        except KeyboardInterrupt:
            say("!! interrupted")
            return 130
        out = args.out or ((args.state_dir / "bench.json") if args.state_dir else Path(".alephant") / "bench.json")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(doc, indent=2) + "\n")

    say("")
    say(results_table(doc["results"]))
    if doc["comparisons"]:
        say("")
        say("Gateway, governed, router and cached relative to direct, the last three also relative to the plain "
            "gateway (same run; issue 11's bar: cached >= 50% of direct at 32c):")
        say(comparison_table(doc["comparisons"]))
    if doc["governance"]:
        say("")
        say("Full governance (a policy, two limits, two budgets on the path) against the plain gateway:")
        say(governance_table(doc["governance"]))
    if doc["routing"]:
        say("")
        say("Router (weighted over two targets, both the fake) against the plain gateway and direct:")
        say(routing_table(doc["routing"]))
    if doc["observability"]:
        say("")
        say("Observability (issue 13): the same build with traces exported and bodies archived against the plain "
            "gateway:")
        say(observability_table(doc["observability"]))
        o = doc["observed_setup"]
        if o:
            say(f"  on, as counted: {o['spans']:,} spans received by the null collector in {o['exports']:,} exports "
                f"({_rate(o['spans_per_request'])} per measured request, traced's included), {o['body_objects']:,} "
                f"bodies archived under bodies/ ({_rate(o['objects_per_request'])} per measured observed request; "
                f"{o['requests_measured']:,} of them, warm-up included); bodies dropped: "
                f"{o['bodies_dropped_queue_full']:,} (buffer full), "
                f"{o['bodies_dropped_upload_failed']:,} (upload failed)")
    setup = doc["governed_setup"]
    if setup and setup["budgets"]:
        spent = ", ".join(f"{b.get('scope')} spent ${b.get('spent_usd')} held ${b.get('held_usd')}"
                          for b in setup["budgets"])
        say(f"  governed budgets after the runs: {spent}")
    if doc.get("paid"):
        p = doc["paid"]
        say("")
        say(f"Paid path (x402, local fake facilitator; {p['calls']} sequential calls each, p50 / p90 ms): "
            f"model call {p['model_p50_ms']} / {p['model_p90_ms']}, 402 challenge {p['challenge_p50_ms']} / "
            f"{p['challenge_p90_ms']}, paid call {p['paid_p50_ms']} / {p['paid_p90_ms']}: the paid path adds "
            f"{p['paid_added_p50_ms']} ms p50 (claim, verify and settle at the facilitator, the revenue event)")
    if doc["micro"]:
        say("")
        say("In-memory governance steps before Redis (tests.bench.governance_micro):")
        say(micro_table(doc["micro"]))
    if doc["projector"]:
        p = doc["projector"]
        say("")
        say(f"Projector (tests.bench.projector): {p['events']:,} events, batch {p['batch']} "
            f"(issue 9 bar: >= {p['bar_events_per_s']:,} events/s; reference only)")
        say(f"  all {p['projections']} projections concurrently in one process: {p['events_per_s']:,.0f} events/s "
            f"({p['seconds']}s)")
        for name, rate in p["alone"].items():
            say(f"  {name:<8} alone: {rate:>9,.0f} events/s")
    if doc["finance_queries"]:
        f = doc["finance_queries"]
        say("")
        say(f"Finance queries (tests.bench.finance_queries) over {f['rows']:,} facts (loaded in {f['load_s']}s):")
        for q in f["queries"]:
            say(f"  {q['query']:<40} {q['median_ms']:>9.1f} ms median ({q['rows']:,} rows)")
    if doc.get("console_pages"):
        from tests.bench.console_pages import lines as console_lines

        say("")
        say("\n".join(console_lines(doc["console_pages"])))
    if doc.get("mcp_latency"):
        from tests.bench.mcp_latency import lines as mcp_lines

        say("")
        say("\n".join(mcp_lines(doc["mcp_latency"])))
    scaleout = scaleout_lines(doc)
    if scaleout:
        say("")
        say("\n".join(scaleout))
    say(f"\nresults written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
