"""Child processes and loopback HTTP for the benchmark runner: start, wait for, stop, and talk to
what :mod:`tests.bench.run` starts. No proxies are used, whatever the environment says.
"""

from __future__ import annotations

import json
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

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


def admin_post(env: dict[str, str], path: str, body: dict[str, Any], *, exists_ok: bool = False) -> dict[str, Any]:
    """POST to the stack's admin API (``env`` is its ``demo.env``); the created entity. With
    ``exists_ok`` a 409 (a reused state dir already has this id) returns ``{}``; any other status
    but 200/201/202 is a BenchError naming the path."""
    auth = {"Authorization": f"Bearer {env['ALEPHANT_ADMIN_TOKEN']}"}
    status, raw = http("POST", env["ALEPHANT_ADMIN_URL"] + path, headers=auth, body=body)
    if status == 409 and exists_ok:
        return {}
    if status not in (200, 201, 202):
        raise BenchError(f"POST {path} -> {status}: {raw.decode(errors='replace')[:500]}")
    created: dict[str, Any] = json.loads(raw)
    return created


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


def spawn(name: str, argv: list[str], log: Path, env: dict[str, str] | None = None) -> Child:
    """Start ``argv`` with stdout and stderr appended to ``log``, in ``env`` (default: ours)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, env=env)
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
