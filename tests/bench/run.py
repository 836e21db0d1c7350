"""``make bench``: the gateway against the fake upstream called directly, in the same run.

Steps: start the fake upstream (own process, recording off) -> start ``alephant dev`` on a
fresh state dir -> wait for ``demo.env`` and ``/readyz`` -> register the fake as provider
``fake`` with a price -> wait until ``fake/gpt-4o-mini`` answers 200 -> for each scenario
({connections} x {non-stream, stream}) run :mod:`tests.bench.loadgen` in its own process
against the fake directly, then through the gateway -> print the tables and write JSON.

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

from tests.bench.loadgen import chat_body
from tests.bench.report import TARGETS, compare, comparison_table, results_table, scenario_name

FAKE_PROVIDER_KEY = "sk-fake-upstream"
DIRECT_MODEL = "gpt-4o-mini"
GATEWAY_MODEL = "fake/gpt-4o-mini"
GATEWAY_HEADERS = {"Alephant-Agent-Id": "bench-agent", "Alephant-Run-Id": "bench-run"}
STOP_GRACE_S = 20.0

T = TypeVar("T")


class BenchError(RuntimeError):
    """The stack or a load run failed; the message says what and where to look."""


def say(message: str) -> None:
    """A progress line on stdout (flushed: ``make`` output is often piped)."""
    print(message, flush=True)


# -- HTTP to our own loopback services (no proxies, whatever the environment says) -------------

_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def http(
    method: str, url: str, *, headers: dict[str, str] | None = None, body: Any = None, timeout: float = 5.0
) -> tuple[int, bytes]:
    """``(status, body)``; HTTP error statuses are returned, transport errors raise ``OSError``."""
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    if data is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with _OPENER.open(req, timeout=timeout) as resp:
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
    argv += ["--label", label]
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
    parser.add_argument("--only", choices=["direct", "gateway"], help="measure one target (direct skips the stack)")
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
    started = time.time()
    try:
        say(f"==> starting fake upstream ({args.words} words per answer)")
        fake, fake_url = start_fake(state_dir, args.words)
        children.append((fake, signal.SIGTERM, 5.0))
        say(f"  fake upstream at {fake_url}")

        env: dict[str, str] = {}
        if args.only != "direct":
            say(f"==> starting stack: alephant dev --workers {args.workers} (log: {state_dir}/alephant-dev.log)")
            t0 = time.monotonic()
            stack, env = start_stack(state_dir, args.workers, args.startup_timeout)
            children.append((stack, signal.SIGINT, STOP_GRACE_S))
            say(f"  gateway at {env['ALEPHANT_BASE_URL']} (ready in {time.monotonic() - t0:.1f}s)")
            say(f"==> registering provider 'fake' -> {fake_url} and its price")
            register_fake(env, fake_url, stack)
            say(f"  {GATEWAY_MODEL} answers through the gateway")

        modes = {"both": [False, True], "non-stream": [False], "stream": [True]}[args.mode]
        targets = [t for t in ("direct", "gateway") if args.only in (None, t)]
        for connections in args.connections:
            for stream in modes:
                scenario = scenario_name(connections, stream)
                for target in targets:
                    say(f"==> scenario {scenario} {target} ({args.warmup:g}s warm-up + {args.duration:g}s)")
                    if target == "direct":
                        url, key, model, headers = fake_url, "sk-bench-direct", DIRECT_MODEL, {}
                    else:
                        url, key, model = env["ALEPHANT_BASE_URL"], env["ALEPHANT_API_KEY"], GATEWAY_MODEL
                        headers = GATEWAY_HEADERS
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
                    result.update(scenario=scenario, target=target)
                    results.append(result)
                    errors = f", {result['errors']} errors" if result["errors"] else ""
                    say(f"  {result['rps']:.1f} req/s, p50 {result['p50_ms'] or 0:.3f} ms{errors}")
    finally:
        # A second Ctrl-C must not abandon the stack half-stopped.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        for child, sig, grace in reversed(children):
            if child.alive():
                say(f"==> stopping {child.name}")
            if child.stop(sig, grace) and child.name == "alephant dev":
                keep[0] = True
                say(f"!! alephant dev was killed; its services may still run (look for {state_dir} in ps)")

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
        "results": results,
        "comparisons": compare(results),
    }


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
        say("Gateway relative to direct (same run):")
        say(comparison_table(doc["comparisons"]))
    say(f"\nresults written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
