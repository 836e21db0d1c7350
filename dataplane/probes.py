"""Optional active health probes: a router whose `health.probe_interval_s` is set has its ejected
targets probed, every that many seconds, with a GET of `health.probe_path` under the provider's
base URL (default `/models`) and the target's own credential; a 2xx readmits the target before its
ejection ends. Off the request path: one task per worker (`run_probes`), sequential, each probe
bounded by `PROBE_TIMEOUT_S`. Only ejected targets are probed, so a healthy fleet sends none."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import structlog
from yarl import URL

from dataplane.health import TargetHealth
from dataplane.ingress.passthrough import upstream_headers, upstream_url
from dataplane.providers.upstream import send
from dataplane.state import WorkerState
from schemas.entities import Provider
from schemas.errors import GatewayError

log = structlog.get_logger(__name__)

PROBE_TIMEOUT_S = 5.0
TICK_S = 0.25


def _credential(worker: WorkerState, provider: Provider, key_id: str) -> str | None:
    snap = worker.store.current
    pk = snap.provider_keys.get(key_id) if key_id else None
    ciphertext = pk.api_key_enc if pk is not None else provider.api_key_enc if key_id == provider.id else None
    secret = worker.provider_key(ciphertext)
    return secret.reveal() if secret is not None else None


async def probe(worker: WorkerState, th: TargetHealth) -> bool:
    """Probe one ejected target; True (and readmitted) on a 2xx."""
    assert th.probe is not None
    provider = worker.store.current.providers.get((th.workspace_id, th.provider))
    if provider is None or provider.id != th.key[0]:
        return False  # the provider changed or went away since the ejection
    url = upstream_url(provider, th.probe[1].lstrip("/"), "")
    headers = upstream_headers((), provider, _credential(worker, provider, th.key[1]), method="GET", url=url,
                               body=b"", now=datetime.now(UTC))
    try:
        resp = await send(worker.session, provider.name, "GET", URL(url, encoded=True), None, headers,
                          PROBE_TIMEOUT_S, PROBE_TIMEOUT_S)
    except GatewayError:
        return False
    status = resp.status
    resp.release()
    if 200 <= status < 300:
        worker.health.readmit(th)
        log.info("target_readmitted_by_probe", provider=provider.name, model=th.key[2])
        return True
    return False


async def probe_due(worker: WorkerState) -> int:
    """Probe every ejected target whose probe is due; how many were readmitted."""
    board = worker.health
    now = board.clock()
    due = [th for th in board.targets.values()
           if th.probe is not None and th.ejected_until > now and now - th.last_probe >= th.probe[0]]
    readmitted = 0
    for th in due:
        th.last_probe = now
        readmitted += await probe(worker, th)
    return readmitted


async def run_probes(worker: WorkerState) -> None:
    """Probe until cancelled (one task per worker)."""
    while True:
        await asyncio.sleep(TICK_S)
        try:
            await probe_due(worker)
        except Exception as exc:  # a probe's failure never stops the loop
            log.warning("health_probe_failed", error=type(exc).__name__)
