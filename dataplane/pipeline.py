"""The staged request pipeline every endpoint runs: chat, responses, messages, count_tokens,
embeddings, passthrough and models.

    ready -> authenticate -> agent context -> intake -> plan -> policy -> cache key -> admit (limits
    + budget hold, one Redis round trip) -> cache (a hit answers here) -> route (targets in order, their
    credentials) -> dispatch (adapt, call with fallback, relay) ... finish (settle, release, emit)

`PIPELINE` is that list; a new capability (cache, route) is one more stage in it. An `Endpoint`
supplies what differs between APIs: how its credential is read, how its body is taken in and
planned, and how it is dispatched. `run` drives the stages over one `Call`, and its one
`finally` (`finish`) settles the budget hold, releases concurrency slots and emits exactly one
event whatever happened: a refusal at any stage included.
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable, Iterator
from typing import Protocol

from aiohttp import web

from dataplane import tracing
from dataplane.access_log import access_line
from dataplane.call import Call
from dataplane.stages import access, governance
from dataplane.stages.cache import cache, cache_key
from dataplane.stages.route import route
from dataplane.state import WORKER, WorkerState
from schemas.errors import GatewayError, InvalidValue
from schemas.http import client_fault


class Endpoint(Protocol):
    """What one API adds to the pipeline.

    `governed`: the call spends (limits and budgets apply). `records_success`: a successful call
    is recorded as an `llm.call` (refusals always are). `intake` reads the body (limit and
    timeout enforced), `plan` validates it and resolves the model (setting `call.target`,
    `requested_model`, `stream`, `tools`, `max_tokens`, `input_bound`), `dispatch` produces the
    answer. `set_max_tokens` / `strip_tools` apply a policy or budget change to the planned body
    and return False when this API cannot (the request is then refused rather than overspent)."""

    name: str
    governed: bool
    records_success: bool

    def credential(self, request: web.Request) -> str: ...

    async def intake(self, call: Call) -> None: ...

    def plan(self, call: Call) -> None: ...

    def set_max_tokens(self, call: Call, value: int) -> bool: ...

    def strip_tools(self, call: Call, names: tuple[str, ...]) -> bool: ...

    async def dispatch(self, call: Call) -> web.StreamResponse: ...


async def _intake(call: Call) -> None:
    await call.endpoint.intake(call)


async def _plan(call: Call) -> None:
    call.endpoint.plan(call)


async def _dispatch(call: Call) -> None:
    call.response = await call.endpoint.dispatch(call)


Stage = Callable[[Call], Awaitable[None]]

PIPELINE: tuple[Stage, ...] = (
    access.ready,
    access.authenticate,
    access.agent,
    _intake,
    _plan,
    governance.policy,
    cache_key,
    governance.admit,
    cache,
    route,
    _dispatch,
)


def _record(call: Call, exc: BaseException) -> bool:
    """Note how `exc` ends the call; False when the call must not be recorded at all (a client
    string refused at the edge: it may hold what Postgres cannot store)."""
    if isinstance(exc, InvalidValue):
        call.status, call.error_code = exc.status, exc.code  # for metrics only: no event
        return False
    if isinstance(exc, GatewayError):
        call.status, call.error_code = exc.status, exc.code
        if call.decision == "allow" and exc.status in (401, 403, 429):
            call.decision = exc.code or "refused"
        return True
    fault = client_fault(exc)  # rendered by the error middleware as this 4xx, or a 500: record the same
    call.status, call.error_code = (fault.status, fault.code) if fault else (500, "internal_error")
    return True


@contextlib.contextmanager
def finish(call: Call) -> Iterator[None]:
    """Around the stages: note how the call ended, then settle its admission (actual cost, or 0
    for a call that never reached a provider), release every slot it holds, and emit its one
    event (the unknown-key refusals are counted instead, see `access.RefusalCounter`); every call,
    recorded or not, is counted in the worker's metrics (`dataplane.metrics`)."""
    record = True
    try:
        yield
    except BaseException as exc:
        record = _record(call, exc)
        raise
    finally:
        try:
            call.held.close()
        finally:
            governance.settle(call)
            if record:
                emit_once(call)
            if call.body_key is not None:  # promised on the event: the bodies follow, off the request path
                call.worker.bodies.submit(call, call.body_key)
            call.worker.metrics.observe(call)
            if call.worker.access_log:
                access_line(call)


def emit_once(call: Call) -> None:
    """Emit the call's event unless it already was: its `success_event` when dispatch set one,
    else its `llm.call`. Streams call it before their last write (`write_eof`), so the event is
    spooled before the client can see the answer complete: a worker killed right after a client
    got its answer never loses the call."""
    if call.emitted:
        return
    call.emitted = True
    worker = call.worker
    if not call.authenticated:
        worker.refusals.count(call.error_code or "invalid_api_key", call.request.path)
    elif call.success_event is not None:
        worker.events.emit(call.success_event)
    elif call.status >= 400 or call.endpoint.records_success:
        worker.events.emit(call.event())


async def run(request: web.Request, endpoint: Endpoint) -> web.StreamResponse:
    """Every stage of `PIPELINE` over one `Call`, in order, until one answers (traced when
    `dataplane.tracing` is on)."""
    worker: WorkerState = request.app[WORKER]
    call = Call(request=request, worker=worker, endpoint=endpoint, snap=worker.store.current)
    if tracing.TRACER is not None:
        return await _traced(call)
    with finish(call):
        for stage in PIPELINE:
            await stage(call)
            if call.response is not None:
                return call.response
    raise AssertionError("the pipeline ended without an answer")  # dispatch always answers


async def _traced(call: Call) -> web.StreamResponse:
    """`run` with spans: the request's, the stages that wait on something, the upstream call's."""
    with tracing.request_span(call), finish(call):
        for stage in PIPELINE:
            if stage is _dispatch:
                with tracing.dispatch_span(call):
                    await stage(call)
            elif (name := _TRACED_STAGES.get(stage)) is not None and _waits(stage, call):
                with tracing.stage_span(name):
                    await stage(call)
            else:
                await stage(call)
            if call.response is not None:
                return call.response
    raise AssertionError("the pipeline ended without an answer")


_TRACED_STAGES: dict[Stage, str] = {governance.admit: "alephant.admit", cache: "alephant.cache"}


def _waits(stage: Stage, call: Call) -> bool:
    """Whether a traced stage has work to do (a span costs ~25 µs; a no-op stage gets none): admit
    when limits or budgets govern the call, cache when the call has a cache plan to read."""
    if stage is cache:
        return call.cache_plan is not None and call.cache_plan.read
    governing = governance.on_path(call)
    return call.endpoint.governed and bool(governing.limits or governing.budgets)
