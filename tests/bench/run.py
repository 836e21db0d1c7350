"""``make bench``: the gateway against the fake upstream called directly, in the same run.

Steps: start the fake upstream (own process, recording off) -> start ``alephant dev`` on a
fresh state dir -> wait for ``demo.env`` and ``/readyz`` -> register the fake as provider
``fake`` with a price -> wait until ``fake/gpt-4o-mini`` answers 200 -> set up the governed
tenant (`register_governed`) -> for each scenario ({connections} x {non-stream, stream}) run
:mod:`tests.bench.loadgen` in its own process against three targets in turn -> stop the stack
-> run the micro-benchmark :mod:`tests.bench.governance_micro` -> print the tables and write JSON.

Targets: ``direct`` (the fake itself), ``gateway`` (the demo key: nothing governs its path, so
no Redis call), ``governed`` (issue 8's full governance: a key bound to an agent in a member and
a department of workspace ``bench-gov``, with a policy, two limits and two budgets on its path,
all far above what the bench reaches, so every request is admitted through one Redis script).
Every request names ``max_tokens`` (``BENCH_MAX_TOKENS``), as agents' clients usually do: the
budget hold is then small (otherwise the gateway injects what the budget affords, up to the
model's whole output limit, and the hold and token-limit charge grow with it).

Around each gateway and governed run the runner reads the data-plane workers' CPU time from
``/proc/<pid>/stat`` (the workers are the ``dataplane`` children of ``alephant dev``) and Redis
``INFO`` (``EVALSHA`` calls, client reads), and divides both by the requests the run completed
(loadgen's ``completed``: warm-up and errors included, all of which the worker served). Redis
counts include traffic that is not the requests' (lease refreshes, fleet beats): the ``gateway``
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
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any, TypeVar

import redis

from tests.bench.governance_micro import summary_table as micro_table
from tests.bench.loadgen import chat_body
from tests.bench.report import (
    GOVERNANCE_TARGETS,
    TARGET_NAMES,
    TARGETS,
    compare,
    comparison_table,
    governance,
    governance_table,
    results_table,
    scenario_name,
)

FAKE_PROVIDER_KEY = "sk-fake-upstream"
DIRECT_MODEL = "gpt-4o-mini"
GATEWAY_MODEL = "fake/gpt-4o-mini"
GATEWAY_HEADERS = {"Alephant-Agent-Id": "bench-agent", "Alephant-Run-Id": "bench-run"}
BENCH_MAX_TOKENS = 64
STOP_GRACE_S = 20.0
# The governed tenant: its own workspace, so the workspace-level limit and budget never reach
# the demo key's path (the plain `gateway` target must stay ungoverned).
GOV_WORKSPACE = "bench-gov"
GOV_DEPARTMENT, GOV_MEMBER, GOV_AGENT = "bench-gov-dept", "bench-gov-member", "bench-gov-agent"
GOV_RPM_PER_KEY = 100_000_000  # about 1.7M req/s: far above one machine's bench
# The admin API's ceiling; over 15x what 5k req/s charge (about 200 tokens a request: the input
# bound, half the body's bytes plus 64, and max_tokens).
GOV_TPM_PER_WORKSPACE = 1_000_000_000
GOV_BUDGET_USD = "1000000"

T = TypeVar("T")


class BenchError(RuntimeError):
    """The stack or a load run failed; the message says what and where to look."""


def say(message: str) -> None:
    """A progress line on stdout (flushed: ``make`` output is often piped)."""
    print(message, flush=True)


# -- HTTP to our own loopback services (no proxies, whatever the environment says) -------------

_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def http(
    method: str,
    url: str,
    *,
    headers: dict[str, str] | None = None,
    body: Any = None,
    timeout: float = 5.0,
    response_headers: dict[str, str] | None = None,
) -> tuple[int, bytes]:
    """``(status, body)``; HTTP error statuses are returned, transport errors raise ``OSError``.
    ``response_headers``, when given, is filled with the answer's headers (names lower-cased)."""
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    if data is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with _OPENER.open(req, timeout=timeout) as resp:
            if response_headers is not None:
                response_headers.update({k.lower(): v for k, v in resp.headers.items()})
            return int(resp.status), bytes(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


# -- child processes -------------------------------------------------------------------------


@dataclass
class Child:
    """A process this benchmark started (in its own session, so Ctrl-C reaches only us)."""

    name: str
    proc: subprocess.Popen[bytes]
    log: Path

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, sig: int, grace_s: float) -> bool:
        """Send ``sig``, wait ``grace_s``, then SIGKILL. Idempotent; true if it had to be killed."""
        if not self.alive():
            return False
        self.proc.send_signal(sig)
        try:
            self.proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            say(f"  {self.name} did not stop within {grace_s:.0f}s; killing it")
            self.proc.kill()
            self.proc.wait(5)
            return True
        return False

    def tail(self, lines: int = 30) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join("    | " + line for line in text.splitlines()[-lines:])


def spawn(name: str, argv: list[str], log: Path) -> Child:
    """Start ``argv`` with stdout and stderr appended to ``log``."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    return Child(name, proc, log)


def wait_for(child: Child, what: str, timeout_s: float, check: Callable[[], T | None]) -> T:
    """Poll ``check()`` every 100 ms until it returns a truthy value; fail if ``child`` exits."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not child.alive():
            raise BenchError(
                f"{child.name} exited with {child.proc.returncode} while waiting for {what}:\n{child.tail()}"
            )
        value = check()
        if value:
            return value
        time.sleep(0.1)
    raise BenchError(f"timed out after {timeout_s:.0f}s waiting for {what} (log: {child.log}):\n{child.tail()}")


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


def start_stack(state_dir: Path, workers: int, timeout_s: float) -> tuple[Child, dict[str, str]]:
    """Start ``alephant dev`` on free ports; return it and its ``demo.env`` once ``/readyz`` is 200."""
    alephant = Path(sys.executable).with_name("alephant")
    command = [str(alephant)] if alephant.exists() else [sys.executable, "-m", "deploy.cli"]
    demo_path = state_dir / "demo.env"
    # A reused state dir already has a demo.env; only one written by this start counts.
    stale = demo_path.stat().st_mtime_ns if demo_path.exists() else None
    argv = [*command, "--state-dir", str(state_dir), "dev", "--port", "0", "--admin-port", "0"]
    argv += ["--workers", str(workers)]
    child = spawn("alephant dev", argv, state_dir / "alephant-dev.log")
    required = ("ALEPHANT_BASE_URL", "ALEPHANT_API_KEY", "ALEPHANT_ADMIN_URL", "ALEPHANT_ADMIN_TOKEN")

    def demo_env() -> dict[str, str] | None:
        if stale is not None and demo_path.exists() and demo_path.stat().st_mtime_ns == stale:
            return None
        env = read_env_file(demo_path)
        return env if all(env.get(k) for k in required) else None

    env = wait_for(child, "demo.env", timeout_s, demo_env)
    origin = env["ALEPHANT_BASE_URL"].removesuffix("/").removesuffix("/v1")

    def ready() -> bool:
        try:
            return http("GET", f"{origin}/readyz", timeout=1)[0] == 200
        except OSError:
            return False

    wait_for(child, f"{origin}/readyz", timeout_s, ready)
    return child, env


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
            {
                "provider": "fake",
                "model": DIRECT_MODEL,
                "input_per_mtok_nanos": 150_000_000,
                "output_per_mtok_nanos": 600_000_000,
            },
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


def _admin_post(env: dict[str, str], path: str, body: dict[str, Any], *, exists_ok: bool = False) -> dict[str, Any]:
    """POST to the admin API; the created entity. With ``exists_ok`` a 409 (a reused state dir
    already has this id) returns ``{}``."""
    auth = {"Authorization": f"Bearer {env['ALEPHANT_ADMIN_TOKEN']}"}
    status, raw = http("POST", env["ALEPHANT_ADMIN_URL"] + path, headers=auth, body=body)
    if status == 409 and exists_ok:
        return {}
    if status not in (200, 201, 202):
        raise BenchError(f"POST {path} -> {status}: {raw.decode(errors='replace')[:500]}")
    created: dict[str, Any] = json.loads(raw)
    return created


@dataclass
class Governed:
    """The governed tenant's credentials and what governs its path (ids for the JSON)."""

    key: str
    key_id: str
    headers: dict[str, str]
    budget_ids: list[str]
    limit_ids: list[str]
    policy_ids: list[str]


def register_governed(env: dict[str, str], fake_url: str, stack: Child) -> Governed:
    """Create workspace ``bench-gov`` with provider ``fake``, a department, a member in it, an
    agent of both, and a virtual key bound to the agent; then on that key's path a policy
    (agent: models_allow ``fake/*``), two budgets (agent: month; workspace: total; $1M each) and
    two limits (key: rpm; workspace: tpm), the limits last. Waits until a governed request
    answers 200 with both x-ratelimit trios, i.e. until the worker has applied the limits, and
    so everything created before them. Idempotent over a reused state dir, except that each
    run mints a new key (with its own rpm limit)."""
    ws = GOV_WORKSPACE
    _admin_post(env, "/admin/v1/workspaces", {"id": ws, "name": "Bench: full governance"}, exists_ok=True)
    _admin_post(env, "/admin/v1/providers", {"workspace_id": ws, "name": "fake", "type": "openai",
                                             "base_url": fake_url, "api_key": FAKE_PROVIDER_KEY}, exists_ok=True)
    _admin_post(env, "/admin/v1/departments", {"workspace_id": ws, "id": GOV_DEPARTMENT, "name": "Bench department"},
                exists_ok=True)
    _admin_post(env, "/admin/v1/members", {"workspace_id": ws, "id": GOV_MEMBER, "name": "Bench member",
                                           "department_id": GOV_DEPARTMENT}, exists_ok=True)
    _admin_post(env, "/admin/v1/agents", {"workspace_id": ws, "id": GOV_AGENT, "name": "Bench agent",
                                          "department_id": GOV_DEPARTMENT, "member_id": GOV_MEMBER}, exists_ok=True)
    created = _admin_post(env, "/admin/v1/virtual-keys", {"workspace_id": ws, "name": "bench governed",
                                                          "agent_id": GOV_AGENT})
    key, key_id = str(created["key"]), str(created["id"])
    policy = {"workspace_id": ws, "id": "bench-gov-policy", "scope": "agent", "scope_id": GOV_AGENT,
              "models_allow": ["fake/*"]}
    _admin_post(env, "/admin/v1/policies", policy, exists_ok=True)
    budgets = [
        {"workspace_id": ws, "id": "bench-gov-agent-budget", "scope": "agent", "scope_id": GOV_AGENT,
         "period": "month", "limit_usd": GOV_BUDGET_USD},
        {"workspace_id": ws, "id": "bench-gov-ws-budget", "scope": "workspace", "scope_id": ws,
         "period": "total", "limit_usd": GOV_BUDGET_USD},
    ]
    for budget in budgets:
        _admin_post(env, "/admin/v1/budgets", budget, exists_ok=True)
    rpm = _admin_post(env, "/admin/v1/limits", {"workspace_id": ws, "scope": "key", "scope_id": key_id,
                                                "rpm": GOV_RPM_PER_KEY})
    _admin_post(env, "/admin/v1/limits", {"workspace_id": ws, "id": "bench-gov-ws-tpm", "scope": "workspace",
                                          "scope_id": ws, "tpm": GOV_TPM_PER_WORKSPACE}, exists_ok=True)

    headers = {"Alephant-Agent-Id": GOV_AGENT, "Alephant-Run-Id": "bench-run"}
    url = env["ALEPHANT_BASE_URL"].rstrip("/") + "/chat/completions"
    last: list[tuple[int, bytes, dict[str, str]]] = []
    wanted = ("x-ratelimit-limit-requests", "x-ratelimit-limit-tokens")

    def governed() -> bool:
        got: dict[str, str] = {}
        try:
            status, raw = http("POST", url, headers={"Authorization": f"Bearer {key}", **headers},
                               body=chat_body(GATEWAY_MODEL, stream=False, max_tokens=BENCH_MAX_TOKENS),
                               response_headers=got)
        except OSError as exc:
            status, raw = 0, str(exc).encode()
        last[:] = [(status, raw, got)]
        return status == 200 and all(h in got for h in wanted)

    try:
        wait_for(stack, "the governed key to answer 200 under its limits", 30, governed)
    except BenchError as exc:
        status, raw, got = last[0] if last else (0, b"", {})
        limits = {k: v for k, v in got.items() if k.startswith("x-ratelimit")}
        raise BenchError(f"{exc}\n  last answer: {status} {limits} {raw.decode(errors='replace')[:500]}") from None
    return Governed(key=key, key_id=key_id, headers=headers, budget_ids=[str(b["id"]) for b in budgets],
                    limit_ids=[str(rpm["id"]), "bench-gov-ws-tpm"], policy_ids=["bench-gov-policy"])


def budget_state(env: dict[str, str], budget_id: str) -> dict[str, Any]:
    """``GET /admin/v1/budgets/{id}``'s spent, held and remaining (``{}`` if it fails)."""
    auth = {"Authorization": f"Bearer {env['ALEPHANT_ADMIN_TOKEN']}"}
    try:
        status, raw = http("GET", f"{env['ALEPHANT_ADMIN_URL']}/admin/v1/budgets/{budget_id}", headers=auth)
    except OSError:
        return {}
    if status != 200:
        return {}
    doc = json.loads(raw)
    return {k: doc.get(k) for k in ("id", "scope", "limit_usd", "spent_usd", "held_usd", "remaining_usd")}


# -- server-side costs: worker CPU from /proc, Redis calls from INFO ----------------------------

_CLK_TCK = os.sysconf("SC_CLK_TCK")


def worker_pids(stack_pid: int) -> list[int]:
    """The data-plane workers: children of ``alephant dev`` running ``deploy.cli dataplane``."""
    pids: list[int] = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
            if ppid == stack_pid and b"dataplane" in (entry / "cmdline").read_bytes().split(b"\0"):
                pids.append(int(entry.name))
        except (OSError, ValueError):
            continue
    return sorted(pids)


def cpu_seconds(pids: list[int]) -> float | None:
    """User + system CPU seconds of ``pids`` (``None`` if any has gone)."""
    total = 0
    for pid in pids:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return None
        fields = stat[stat.rindex(")") + 2 :].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime: fields 14 and 15 of stat(5)
    return total / _CLK_TCK


def redis_url(state_dir: Path) -> str | None:
    """The stack's Redis: ``ALEPHANT_REDIS_URL`` if set (external), else the embedded one's URL
    from ``alephant dev``'s log (``redis  embedded  redis://...``)."""
    if os.environ.get("ALEPHANT_REDIS_URL"):
        return os.environ["ALEPHANT_REDIS_URL"]
    try:
        lines = (state_dir / "alephant-dev.log").read_text(errors="replace").splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        parts = line.split()
        if len(parts) >= 3 and parts[0] == "redis" and parts[1] == "embedded":
            return parts[2]
    return None


class RedisCounters:
    """``(EVALSHA calls, client reads)`` from Redis ``INFO``, over one kept connection; ``None``
    when Redis cannot be read (the columns then stay empty)."""

    def __init__(self, url: str | None) -> None:
        self._client = redis.Redis.from_url(url, socket_timeout=2) if url else None

    def read(self) -> tuple[int, int] | None:
        if self._client is None:
            return None
        try:
            info = self._client.info("all")
        except redis.RedisError:
            return None
        calls = info.get("cmdstat_evalsha", {}).get("calls", 0) + info.get("cmdstat_eval", {}).get("calls", 0)
        return int(calls), int(info.get("total_reads_processed", 0))

    def close(self) -> None:
        if self._client is not None:
            self._client.close()


def _per_request(before: float | None, after: float | None, completed: int, scale: float = 1.0) -> float | None:
    if before is None or after is None or completed <= 0:
        return None
    return (after - before) * scale / completed


# -- load runs -------------------------------------------------------------------------------


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
) -> dict[str, Any]:
    """Run :mod:`tests.bench.loadgen` in its own process and return its JSON result."""
    argv = [sys.executable, "-m", "tests.bench.loadgen", "--url", url, "--api-key", api_key, "--model", model]
    argv += ["--connections", str(connections), "--duration", str(duration_s), "--warmup", str(warmup_s)]
    argv += ["--label", label, "--max-tokens", str(BENCH_MAX_TOKENS)]
    if stream:
        argv.append("--stream")
    for name, value in headers.items():
        argv += ["--header", f"{name}: {value}"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=duration_s + warmup_s + 60)
    except BaseException:
        proc.kill()
        proc.wait(5)
        raise
    if proc.returncode != 0:
        (log_dir / "loadgen-error.log").write_bytes(err)
        raise BenchError(f"loadgen {label} exited with {proc.returncode}:\n{err.decode(errors='replace')[-2000:]}")
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
    gov: Governed | None = None
    gov_budgets: list[dict[str, Any]] = []
    counters = RedisCounters(None)
    started = time.time()
    try:
        say(f"==> starting fake upstream ({args.words} words per answer)")
        fake, fake_url = start_fake(state_dir, args.words)
        children.append((fake, signal.SIGTERM, 5.0))
        say(f"  fake upstream at {fake_url}")

        env: dict[str, str] = {}
        targets = [t for t in TARGET_NAMES if args.only in (None, t)]
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
                gov = register_governed(env, fake_url, stack)
                say("  the governed key answers 200 under its limits")
            counters = RedisCounters(redis_url(state_dir))
            if counters.read() is None:
                say("  (Redis INFO unavailable: the Redis columns stay empty)")

        modes = {"both": [False, True], "non-stream": [False], "stream": [True]}[args.mode]
        for connections in args.connections:
            for stream in modes:
                scenario = scenario_name(connections, stream)
                for target in targets:
                    say(f"==> scenario {scenario} {target} ({args.warmup:g}s warm-up + {args.duration:g}s)")
                    if target == "direct":
                        url, key, model, headers = fake_url, "sk-bench-direct", DIRECT_MODEL, {}
                    elif target == "gateway":
                        url, key, model = env["ALEPHANT_BASE_URL"], env["ALEPHANT_API_KEY"], GATEWAY_MODEL
                        headers = GATEWAY_HEADERS
                    else:
                        assert gov is not None
                        url, key, model, headers = env["ALEPHANT_BASE_URL"], gov.key, GATEWAY_MODEL, gov.headers
                    pids = worker_pids(stack.proc.pid) if stack is not None and target != "direct" else []
                    cpu0, redis0 = cpu_seconds(pids) if pids else None, counters.read() if pids else None
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
                    )
                    cpu1, redis1 = cpu_seconds(pids) if pids else None, counters.read() if pids else None
                    done = int(result.get("completed", 0))
                    result.update(
                        scenario=scenario,
                        target=target,
                        workers=len(pids) or None,
                        cpu_ms_per_req=_per_request(cpu0, cpu1, done, 1000.0),
                        redis_evalsha_per_req=_per_request(redis0 and redis0[0], redis1 and redis1[0], done),
                        redis_reads_per_req=_per_request(redis0 and redis0[1], redis1 and redis1[1], done),
                    )
                    results.append(result)
                    errors = f", {result['errors']} errors" if result["errors"] else ""
                    server = ""
                    if result["cpu_ms_per_req"] is not None:
                        server = f", worker CPU {result['cpu_ms_per_req']:.3f} ms/req"
                    if result["redis_evalsha_per_req"] is not None:
                        server += f", {result['redis_evalsha_per_req']:.2f} EVALSHA/req"
                    say(f"  {result['rps']:.1f} req/s, p50 {result['p50_ms'] or 0:.3f} ms{errors}{server}")
        if gov is not None:
            gov_budgets = [budget_state(env, budget_id) for budget_id in gov.budget_ids]
    finally:
        counters.close()
        # A second Ctrl-C must not abandon the stack half-stopped.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        for child, sig, grace in reversed(children):
            if child.alive():
                say(f"==> stopping {child.name}")
            if child.stop(sig, grace) and child.name == "alephant dev":
                keep[0] = True
                say(f"!! alephant dev was killed; its services may still run (look for {state_dir} in ps)")
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, _raise_interrupt)

    micro = governance_micro(args.micro_iterations, state_dir) if args.micro_iterations > 0 else None

    return {
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "settings": {
            "duration_s": args.duration,
            "warmup_s": args.warmup,
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
        "governed_setup": None if gov is None else {
            "workspace": GOV_WORKSPACE, "department": GOV_DEPARTMENT, "member": GOV_MEMBER, "agent": GOV_AGENT,
            "key_id": gov.key_id, "policies": gov.policy_ids, "limits": gov.limit_ids, "budgets": gov_budgets,
        },
        "micro": micro,
    }


def governance_micro(iterations: int, log_dir: Path) -> dict[str, Any]:
    """Run :mod:`tests.bench.governance_micro` in its own process (the stack stopped, so it has
    the CPU to itself as far as this run goes) and return its JSON result."""
    say(f"==> governance micro-benchmark ({iterations:,} requests over a 100k-key snapshot)")
    argv = [sys.executable, "-m", "tests.bench.governance_micro", "--json", "--iterations", str(iterations)]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=600)
    except BaseException:
        proc.kill()
        proc.wait(5)
        raise
    if proc.returncode != 0:
        (log_dir / "micro-error.log").write_bytes(err)
        raise BenchError(f"governance_micro exited with {proc.returncode}:\n{err.decode(errors='replace')[-2000:]}")
    result: dict[str, Any] = json.loads(out)
    return result


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
        say("Gateway and governed relative to direct, governed relative to the plain gateway (same run):")
        say(comparison_table(doc["comparisons"]))
    if doc["governance"]:
        say("")
        say("Full governance (a policy, two limits, two budgets on the path) against the plain gateway:")
        say(governance_table(doc["governance"]))
    setup = doc["governed_setup"]
    if setup and setup["budgets"]:
        spent = ", ".join(f"{b.get('scope')} spent ${b.get('spent_usd')} held ${b.get('held_usd')}"
                          for b in setup["budgets"])
        say(f"  governed budgets after the runs: {spent}")
    if doc["micro"]:
        say("")
        say("In-memory governance steps before Redis (tests.bench.governance_micro):")
        say(micro_table(doc["micro"]))
    say(f"\nresults written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
