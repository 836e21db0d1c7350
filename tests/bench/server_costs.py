"""Server-side costs of a benchmark run, read from outside the processes: the data-plane workers'
CPU time (``/proc/<pid>/stat``) and the Redis counters (``INFO``). Linux only; every reader
returns ``None`` rather than raising when its source is gone, so a run is never lost to a probe.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import redis

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


def box_cpu_seconds() -> tuple[float, float]:
    """``(busy, total)`` CPU seconds of the whole machine since boot (``/proc/stat``; busy is all
    but idle and iowait): whatever ran, the load generator and other users' work included."""
    ticks = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:9]]
    idle = ticks[3] + ticks[4]
    return (sum(ticks) - idle) / _CLK_TCK, sum(ticks) / _CLK_TCK


def settle(pids: list[int], *, idle_share: float = 0.05, interval_s: float = 0.5, max_s: float = 30.0) -> float:
    """Wait until the workers are idle: their CPU over ``interval_s`` below ``idle_share`` of a
    core each, i.e. a clock tick or two (or ``max_s`` passed, or a worker gone). Returns the seconds
    waited. Run after a load run so work the workers defer past the last answer (span export, body
    uploads, settlement batches) is counted in that run's CPU and does not spill into the next run."""
    started = time.monotonic()
    before = cpu_seconds(pids)
    while before is not None and time.monotonic() - started < max_s:
        time.sleep(interval_s)
        after = cpu_seconds(pids)
        if after is None or after - before < idle_share * interval_s * len(pids):
            break
        before = after
    return time.monotonic() - started


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
    """``(EVALSHA calls, client reads, CPU seconds)`` from Redis ``INFO``, over one kept
    connection; ``None`` when Redis cannot be read (the columns then stay empty)."""

    def __init__(self, url: str | None) -> None:
        self._client = redis.Redis.from_url(url, socket_timeout=2) if url else None

    def read(self) -> tuple[int, int, float] | None:
        if self._client is None:
            return None
        try:
            info = self._client.info("all")
        except redis.RedisError:
            return None
        calls = info.get("cmdstat_evalsha", {}).get("calls", 0) + info.get("cmdstat_eval", {}).get("calls", 0)
        cpu = float(info.get("used_cpu_user", 0.0)) + float(info.get("used_cpu_sys", 0.0))
        return int(calls), int(info.get("total_reads_processed", 0)), cpu

    def close(self) -> None:
        if self._client is not None:
            self._client.close()


def per_request(before: float | None, after: float | None, completed: int, scale: float = 1.0) -> float | None:
    """``(after - before) * scale / completed``, or ``None`` when either reading or the count is missing."""
    if before is None or after is None or completed <= 0:
        return None
    return (after - before) * scale / completed
