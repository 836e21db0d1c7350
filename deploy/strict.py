"""Strict durability mode (`ALEPHANT_STRICT=1`, on in every deploy/ manifest): a gateway process
refuses to start on a deployment that can lose acknowledged events (RELIABILITY.md #20).

What is checked, by every process (control plane, data plane, projector) before it serves:
- `ALEPHANT_STREAM_REPLICAS` asks for at least 3, and the event stream and the config bucket
  (the stream `KV_<bucket>` underneath) have at least 3 replicas. The control plane first raises
  them to `ALEPHANT_STREAM_REPLICAS` (`events.jetstream.ensure_stream`/`ensure_kv`, never lowered);
  the data plane only reads them. The projector reads the event stream's count only: it does not
  use the bucket and its NATS user may not read it (least privilege; the control plane and every
  worker check the bucket).
- Every NATS server in `ALEPHANT_NATS_MONITOR_URLS` reports `sync_interval: always`. nats-server
  shows it in `GET /varz` as `jetstream.config.sync_always: true`. The `sync_interval` field next
  to it is the periodic flush interval in nanoseconds (2 min by default) and keeps that value
  under `always`, so it is not the field to read. `/jsz` carries the same `config` block. A
  server that does not answer is a violation: strict mode cannot vouch for it.
- The data plane's event spool can be written. The spool cannot be turned off in code; a spool
  that cannot write degrades to memory-only events, which is the spool disabled in effect.

`strict_violations` is the decision (pure, over observed `DurabilityFacts`); `observe` gathers
the facts (NATS API, HTTP, the spool directory); `refusal` is what `alephant <role>` calls.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import msgspec

from schemas.settings import Settings

MIN_REPLICAS = 3
MONITOR_TIMEOUT_S = 3.0

StrictRole = Literal["controlplane", "dataplane", "projector"]


class StreamFact(msgspec.Struct, frozen=True, kw_only=True):
    """A JetStream stream's replica count as the server reports it, or why it could not be read."""

    name: str
    replicas: int = 0
    error: str = ""


class ServerSync(msgspec.Struct, frozen=True, kw_only=True):
    """Whether one NATS server fsyncs every write (`sync_interval: always`), or why it is unknown."""

    url: str
    sync_always: bool = False
    error: str = ""


class DurabilityFacts(msgspec.Struct, frozen=True, kw_only=True):
    stream: StreamFact
    bucket: StreamFact | None  # None: not checked by this role (the projector)
    servers: tuple[ServerSync, ...] = ()
    # The data plane's spool directory and why it cannot be written; both empty for other roles.
    spool_dir: str = ""
    spool_error: str = ""


def monitor_urls(settings: Settings) -> list[str]:
    return [u.strip().rstrip("/") for u in settings.nats_monitor_urls.split(",") if u.strip()]


def server_sync(url: str, varz: Mapping[str, Any]) -> ServerSync:
    """Read one server's `/varz` answer (see the module docstring for the field)."""
    jetstream = varz.get("jetstream")
    if not isinstance(jetstream, Mapping) or not isinstance(jetstream.get("config"), Mapping):
        return ServerSync(url=url, error="JetStream is not enabled on this server (no jetstream.config in /varz)")
    return ServerSync(url=url, sync_always=jetstream["config"].get("sync_always") is True)


def strict_violations(settings: Settings, facts: DurabilityFacts) -> list[str]:
    """Every reason strict mode refuses to start, each naming what to change; [] when none."""
    out: list[str] = []
    fix_replicas = ("set ALEPHANT_STREAM_REPLICAS=3 (a JetStream cluster of at least 3 servers) and run "
                    "`alephant migrate` or start the control plane, which raise the count")
    if settings.stream_replicas < MIN_REPLICAS:
        out.append(f"ALEPHANT_STREAM_REPLICAS={settings.stream_replicas}: strict mode needs at least "
                   f"{MIN_REPLICAS} replicas of the event stream and the config bucket")
    for what, fact in (("event stream", facts.stream), ("config bucket stream", facts.bucket)):
        if fact is None:
            continue
        if fact.error:
            out.append(f"{what} {fact.name}: {fact.error}; {fix_replicas}")
        elif fact.replicas < MIN_REPLICAS:
            out.append(f"{what} {fact.name} has {fact.replicas} replica(s), strict mode needs at least "
                       f"{MIN_REPLICAS}: {fix_replicas}")
    if not monitor_urls(settings):
        out.append("ALEPHANT_NATS_MONITOR_URLS is empty: strict mode reads each NATS server's sync_interval from "
                   "its monitoring endpoint; set it to every server's http://<host>:8222, comma-separated")
    for server in facts.servers:
        if server.error:
            out.append(f"NATS monitoring endpoint {server.url} (ALEPHANT_NATS_MONITOR_URLS): {server.error}; "
                       "strict mode cannot confirm the server's sync_interval")
        elif not server.sync_always:
            out.append(f"NATS server {server.url} does not report sync_interval: always (a PubAck may then mean "
                       "'in the page cache' only): set `sync_interval: always` in its jetstream block, as "
                       "deploy/nats/nats-cluster.conf does")
    if facts.spool_error:
        out.append(f"the event spool at {facts.spool_dir} cannot be written ({facts.spool_error}): set "
                   "ALEPHANT_SPOOL_DIR (or ALEPHANT_STATE_DIR) to a writable, persistent directory")
    return out


def refusal_message(role: str, violations: list[str]) -> str:
    lines = "\n".join(f"  - {v}" for v in violations)
    return (f"alephant {role}: strict durability mode (ALEPHANT_STRICT=1) refuses to start:\n{lines}\n"
            "(ALEPHANT_STRICT=0 turns these checks off; only for development.)")


# ---- observing the deployment (IO) -------------------------------------------------------------

async def _stream_fact(js: Any, name: str) -> StreamFact:
    from nats.js.errors import NotFoundError

    try:
        info = await js.stream_info(name)
    except NotFoundError:
        return StreamFact(name=name, error="not found")
    except Exception as exc:  # a timeout or permissions violation: report it, do not crash on it
        return StreamFact(name=name, error=f"could not read its info ({type(exc).__name__}: {exc})")
    return StreamFact(name=name, replicas=info.config.num_replicas or 1)


async def _streams(settings: Settings, role: StrictRole) -> tuple[StreamFact, StreamFact | None]:
    from events.jetstream import bus_auth, connect, ensure_kv, ensure_stream

    bucket = f"KV_{settings.kv_bucket}"
    try:
        nc = await connect(settings.nats_url, f"alephant-{role}-strict", bus_auth(settings, role))
    except Exception as exc:  # no server answers: every fact is unknown
        error = f"NATS at ALEPHANT_NATS_URL is unreachable ({type(exc).__name__}: {exc})"
        return StreamFact(name=settings.stream, error=error), StreamFact(name=bucket, error=error)
    try:
        js = nc.jetstream(timeout=5.0)
        if role == "controlplane":  # the one role that reconciles the counts upward on start
            await ensure_stream(js, settings.stream, settings.subject_prefix, settings.stream_replicas)
            await ensure_kv(js, settings.kv_bucket, settings.stream_replicas)
        stream = await _stream_fact(js, settings.stream)
        return stream, None if role == "projector" else await _stream_fact(js, bucket)
    finally:
        await nc.close()


async def _server(session: Any, url: str) -> ServerSync:
    try:
        async with session.get(f"{url}/varz") as resp:
            if resp.status != 200:
                return ServerSync(url=url, error=f"GET /varz answered {resp.status}")
            varz = await resp.json(content_type=None)
    except Exception as exc:  # unreachable, timed out or not JSON: unknown, hence refused
        return ServerSync(url=url, error=f"GET /varz failed ({type(exc).__name__}: {exc})")
    return server_sync(url, varz if isinstance(varz, Mapping) else {})


async def _servers(urls: list[str]) -> tuple[ServerSync, ...]:
    import aiohttp

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=MONITOR_TIMEOUT_S)) as session:
        return tuple(await asyncio.gather(*(_server(session, url) for url in urls)))


def _spool_error(directory: Path) -> str:
    """'' when a file can be created, written and fsynced in `directory` (created if missing)."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".strict-probe-") as probe:
            probe.write(b"x")
            probe.flush()
            os.fsync(probe.fileno())
    except OSError as exc:
        return f"{type(exc).__name__}: {exc.strerror or exc}"
    return ""


async def observe(settings: Settings, role: StrictRole) -> DurabilityFacts:
    """The facts strict mode judges; the control plane first raises the replica counts."""
    stream, bucket = await _streams(settings, role)
    servers = await _servers(monitor_urls(settings))
    if role != "dataplane":
        return DurabilityFacts(stream=stream, bucket=bucket, servers=servers)
    spool_dir = Path(settings.spool_dir or Path(settings.state_dir) / "spool")
    return DurabilityFacts(stream=stream, bucket=bucket, servers=servers, spool_dir=str(spool_dir),
                           spool_error=await asyncio.to_thread(_spool_error, spool_dir))


async def refusal(settings: Settings, role: StrictRole) -> str | None:
    """None when strict mode is off or satisfied; else the message `alephant <role>` exits with."""
    if not settings.strict:
        return None
    violations = strict_violations(settings, await observe(settings, role))
    return refusal_message(role, violations) if violations else None
