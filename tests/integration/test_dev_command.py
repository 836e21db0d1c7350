"""`alephant dev` (what `make run` starts): demo.env contract, Ctrl-C/SIGTERM stops every child, and a
second start reuses the state (same key, same ledger)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest

from deploy.stack import DEMO_ENV_KEYS, read_env_file

_SCRUBBED = ("OPENAI_API_KEY", "OPENAI_BASE_URL", "ANTHROPIC_API_KEY", "ALEPHANT_SECRET_KEY", "ALEPHANT_ADMIN_TOKEN")


@dataclass
class Reply:
    status_code: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def _http(method: str, url: str, headers: dict[str, str] | None = None, body: Any = None) -> Reply:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method, headers={
        **(headers or {}), **({"Content-Type": "application/json"} if data else {})})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return Reply(resp.status, {k.lower(): v for k, v in resp.headers.items()}, resp.read())
    except urllib.error.HTTPError as exc:
        return Reply(exc.code, {k.lower(): v for k, v in exc.headers.items()}, exc.read())


def _start(state_dir: Path) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if k not in _SCRUBBED and not k.startswith("ALEPHANT_")}
    with (state_dir.parent / "dev.out").open("ab") as out:
        return subprocess.Popen([sys.executable, "-m", "deploy.cli", "--state-dir", str(state_dir), "dev",
                                 "--port", "0", "--admin-port", "0"], env=env, stdout=out, stderr=subprocess.STDOUT)


def _wait_ready(proc: subprocess.Popen[bytes], state_dir: Path, after: float) -> dict[str, str]:
    demo = state_dir / "demo.env"
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            out = (state_dir.parent / "dev.out").read_text()
            pytest.fail(f"alephant dev exited with {proc.returncode}:\n{out}")
        if demo.exists() and demo.stat().st_mtime >= after:
            env = read_env_file(demo)
            try:
                if _http("GET", env["ALEPHANT_BASE_URL"].removesuffix("/v1") + "/readyz").status_code == 200:
                    return env
            except OSError:
                pass
        time.sleep(0.2)
    pytest.fail("alephant dev did not become ready in 90 s")


def _stop(proc: subprocess.Popen[bytes]) -> list[psutil.Process]:
    children = psutil.Process(proc.pid).children(recursive=True)
    proc.send_signal(signal.SIGTERM)
    proc.wait(60)
    return children


def _chat(env: dict[str, str], run_id: str) -> Reply:
    return _http("POST", f"{env['ALEPHANT_BASE_URL']}/chat/completions", body={
        "model": env["ALEPHANT_DEMO_MODEL"], "messages": [{"role": "user", "content": "hello"}]},
        headers={"Authorization": f"Bearer {env['ALEPHANT_API_KEY']}", "Alephant-Run-Id": run_id})


def _run(env: dict[str, str], run_id: str) -> Reply:
    return _http("GET", f"{env['ALEPHANT_ADMIN_URL']}/admin/v1/runs/{run_id}",
                 headers={"Authorization": f"Bearer {env['ALEPHANT_ADMIN_TOKEN']}"})


def test_dev_stack_starts_stops_and_restarts_on_its_state(tmp_path: Path) -> None:
    state = tmp_path / "state"
    proc = _start(state)
    try:
        env = _wait_ready(proc, state, after=0)
        assert set(DEMO_ENV_KEYS) <= set(env)
        assert env["ALEPHANT_DEMO_MODEL"] == "mock/echo"
        resp = _chat(env, "dev-run")
        assert resp.status_code == 200 and resp.json()["choices"][0]["message"]["content"] == "hello"
        cost = resp.headers["alephant-cost-usd"]
        deadline = time.monotonic() + 15
        while _run(env, "dev-run").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _run(env, "dev-run").json()["cost_usd"] == cost
    finally:
        children = _stop(proc)
    assert proc.returncode == 0
    assert children, "dev should have started child processes"
    assert not [c for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]

    second = _start(state)
    try:
        again = _wait_ready(second, state, after=time.time() - 1)
        assert again["ALEPHANT_API_KEY"] == env["ALEPHANT_API_KEY"]
        summary = _run(again, "dev-run")
        assert summary.status_code == 200 and summary.json()["requests"] == 1
        assert _chat(again, "dev-run-2").status_code == 200
    finally:
        _stop(second)


def test_children_do_not_outlive_a_killed_dev_stack(tmp_path: Path) -> None:
    state = tmp_path / "state"
    proc = _start(state)
    try:
        _wait_ready(proc, state, after=0)
        children = psutil.Process(proc.pid).children(recursive=True)
        names = {c.name() for c in children}
        assert {"nats-server", "postgres", "redis-server"} <= names, names
    finally:
        proc.kill()  # no chance to clean up: the kernel's parent-death signal must do it
        proc.wait(10)
    _gone, alive = psutil.wait_procs(children, timeout=30)
    assert not [p for p in alive if p.status() != psutil.STATUS_ZOMBIE], [p.name() for p in alive]
