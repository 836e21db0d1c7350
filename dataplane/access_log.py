"""The access log: one structured line per request (issue 13), `event: "access"` on the logger
`alephant.access`, at info: request id, method, path, status, error code, latency, the key id,
agent, run and session, provider and model, cost, cache result and attempts. Never a key, a body
or a header value. On by default; `ALEPHANT_ACCESS_LOG=false` (or a log level above info) turns
it off. About 25 µs a request (structlog JSON with the redaction processor)."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import structlog

from schemas.money import nanos_to_decimal_str

if TYPE_CHECKING:
    from dataplane.call import Call

log = structlog.get_logger("alephant.access")


def access_line(call: Call) -> None:
    ctx, target = call.ctx, call.target
    latency_ms = round((time.perf_counter() - call.started) * 1000, 2)
    log.info("access", request_id=ctx.request_id, method=call.request.method, path=call.request.path,
             status=call.status, error=call.error_code, latency_ms=latency_ms,
             key_id=call.vk.id or None, workspace_id=call.vk.workspace_id or None, agent_id=ctx.agent_id,
             run_id=ctx.run_id, session_id=ctx.session_id, provider=target.provider.name if target else None,
             model=target.model if target else None, cost_usd=nanos_to_decimal_str(call.cost_nanos),
             cache=call.cache, attempts=len(call.attempts) or None, trace_id=call.trace_id)
