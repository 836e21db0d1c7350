"""Prometheus exposition shared by every process (data plane, control plane, projector), and the
label bounding their metrics use.

Each process keeps its metrics in a `CollectorRegistry` of its own (no module-level registry):
tests run several apps in one process. `scrape_registry` is what `/metrics` renders: the same
registry, or, for data-plane workers sharing a port (`PROMETHEUS_MULTIPROC_DIR` set), a registry
that merges every worker's files (prometheus-client's multiprocess mode).

`BoundedLabel` keeps a label's distinct values under a cap: values past it are folded into
`OTHER`, so a client sending arbitrary strings cannot grow the series count.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"  # prometheus-client's own variable
OTHER = "other"
NONE = "none"  # a label with no value yet (a call refused before its model was known)


class BoundedLabel:
    """At most `cap` distinct values of one label; later new values are `OTHER`. Per process,
    O(1) per lookup; values already admitted stay admitted."""

    __slots__ = ("cap", "seen")

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.seen: set[str] = set()

    def __call__(self, value: str) -> str:
        if value in self.seen:
            return value
        if len(self.seen) >= self.cap:
            return OTHER
        self.seen.add(value)
        return value


def multiproc_dir(env: dict[str, str] | None = None) -> Path | None:
    """The shared metrics directory of a multi-worker data plane, or None (per-process metrics)."""
    value = (os.environ if env is None else env).get(MULTIPROC_ENV, "")
    return Path(value) if value else None


def scrape_registry(registry: CollectorRegistry, shared: Path | None) -> CollectorRegistry:
    """What `/metrics` renders: `registry` itself, or every worker's files merged from `shared`."""
    if shared is None:
        return registry
    merged = CollectorRegistry(auto_describe=False)
    MultiProcessCollector(merged, path=str(shared))  # type: ignore[no-untyped-call]
    return merged


def forget_dead_workers(shared: Path) -> None:
    """Drop the live-gauge files of workers that are gone (a killed worker cannot do it itself),
    so `live*` gauges sum and compare only running workers. Counters and histograms stay: their
    totals include what dead workers counted."""
    for path in shared.glob("gauge_live*_*.db"):
        pid = path.stem.rsplit("_", 1)[-1]
        if not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            mark_process_dead(int(pid), str(shared))  # type: ignore[no-untyped-call]
        except PermissionError:  # alive, someone else's
            continue


def worker_exits(shared: Path | None) -> None:
    """On a clean worker exit: remove its live-gauge files."""
    if shared is not None:
        with contextlib.suppress(OSError):
            mark_process_dead(os.getpid(), str(shared))  # type: ignore[no-untyped-call]


def render(registry: CollectorRegistry) -> web.Response:
    """The text exposition of `registry` (version 0.0.4, what Prometheus scrapes by default)."""
    return web.Response(body=generate_latest(registry), headers={"Content-Type": CONTENT_TYPE_LATEST})
