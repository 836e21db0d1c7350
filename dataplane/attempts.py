"""The attempt loop: open a call's upstream, target after target, until one answers.

`open_upstream(call, open_)` runs `open_` (the endpoint's "open the upstream until its first
byte": a whole answer for a non-streamed call, the first event of a stream) against `call.order`
(the route stage's ordered targets). On a failure that came from the upstream it records an
`Attempt`, updates the worker's health view, then retries the same target (retryable errors only,
jittered exponential backoff, within the retry budget and the deadline) or falls back to the next
one. Nothing has reached the client yet, so a stream fails over cleanly; once `open_` returns,
the relay is the endpoint's and never falls back.

Timeouts: a stream's first event within `first_byte_s`; every attempt, backoffs included, within
the call's deadline (`total_s`, or the client's own `Alephant-Timeout-Ms` when shorter).

A direct call (`provider/model`, no router) has one target and, unless its provider's `retries`
option says otherwise, one attempt: its health is recorded, never used to refuse it. A router
skips a target that cannot take a call now (ejected, cooling down after a `Retry-After`, at its
in-flight cap); when none can, it sends one trial to an ejected target with nothing in flight, or
answers 503 at once with `Retry-After` (no traffic reaches a provider that asked for a pause).
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from dataplane.call import Call
from dataplane.health import HealthBoard, TargetHealth, TargetKey
from dataplane.routing import RoutePlan
from schemas.errors import GatewayError, UpstreamError
from schemas.events import Attempt

T = TypeVar("T")

MAX_COOL_S = 600.0  # a Retry-After beyond this is taken as this (a provider's typo must not park a key for days)
MIN_ATTEMPT_S = 0.02  # less time than this left before the deadline: no further attempt is started
TARGET_FAULTS = frozenset({"upstream_auth_error", "upstream_redirect", "upstream_address_refused"})
NO_FALLBACK_CODES = frozenset({"upstream_invalid_request"})  # the request's own fault: another target refuses it too


def retry_after_s(err: GatewayError) -> float | None:
    """Seconds from the error's `Retry-After` (delta-seconds form), bounded; None without one."""
    value = err.headers.get("Retry-After")
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        return None
    return min(seconds, MAX_COOL_S) if seconds > 0 and math.isfinite(seconds) else None


def _remaining(call: Call) -> float | None:
    return None if call.deadline is None else call.deadline - time.perf_counter()


def _timed_out(call: Call, first_byte: bool, seconds: float) -> UpstreamError:
    """The 504 for an attempt past its bound: the first-byte timeout (`seconds`), or the call's
    total timeout (named by its whole length, not what was left of it)."""
    if not first_byte and call.deadline is not None:
        seconds = call.deadline - call.started
    what = f"send its first byte within {seconds:.3g} s" if first_byte else \
        f"answer within the call's total timeout of {seconds:.3g} s"
    return UpstreamError(f"Provider target '{call.model_ref}' did not {what}.", status=504, code="upstream_timeout",
                         upstream_status=0)


def _bound(call: Call) -> tuple[float | None, bool]:
    """How long this attempt may take to open, and whether the first-byte timeout is the bound."""
    remaining = _remaining(call)
    first = call.route.timeouts.first_byte_s if call.route is not None and call.stream else None
    if first is not None and (remaining is None or first <= remaining):
        return first, True
    return remaining, False


def _backoff_s(plan: RoutePlan, retry: int) -> float:
    """Full-jitter exponential backoff (AWS's): uniform in [0, min(max, base * 2^retry)]."""
    cap = min(plan.retry.max_backoff_ms, plan.retry.backoff_ms * (2 ** retry)) / 1000
    return random.uniform(0, cap)  # noqa: S311 (jitter, not security)


def _exhausted(call: Call, last: GatewayError | None) -> GatewayError:
    """The one error for a call whose every attempt failed (or that had none it could make)."""
    if last is None:
        return UpstreamError("No upstream target could take the call now.", status=503, code="upstream_unavailable")
    attempts = call.attempts
    if len(attempts) <= 1:
        last.headers = {**last.headers, **_trail_headers(call)}
        return last
    status = 504 if last.code == "upstream_timeout" else 503 if last.upstream_status in (429, 503, 529) else 502
    trail = ", ".join(f"{a.target} {a.status or a.reason}" for a in attempts[-5:])
    err = UpstreamError(f"All {len(attempts)} upstream attempts failed ({trail}); the last: {last.message}",
                        status=status, code=last.code, headers={**last.headers, **_trail_headers(call)},
                        upstream_status=last.upstream_status)
    return err


def _trail_headers(call: Call) -> dict[str, str]:
    h = {"Alephant-Attempts": str(len(call.attempts))}
    if call.target is not None:
        h["Alephant-Provider"] = call.target.provider.name
    return h


def _refuse_all(call: Call, board: HealthBoard) -> GatewayError:
    """A router with no target that can take a call now: 503 with the soonest `Retry-After`."""
    plan, now = call.route, board.clock()
    assert plan is not None
    soonest = min((board.unavailable_until(k, plan.health, now) for _, _, k in call.order), default=now)
    wait = max(1, math.ceil(soonest - now))
    name = plan.router.name if plan.router is not None else call.model_ref
    return UpstreamError(f"Every target of router '{name}' is cooling down, ejected or at capacity; retry in "
                         f"{wait} s.", status=503, code="upstream_unavailable", headers={"Retry-After": str(wait)})


def _eligible(call: Call, board: HealthBoard, index: int, tried_any: bool) -> bool:
    plan = call.route
    assert plan is not None
    if plan.router is None:
        return True  # a direct call is never refused by health
    _, _, key = call.order[index]
    now = board.clock()
    if not board.unavailable_until(key, plan.health, now):
        return True
    if tried_any:
        return False
    # Nothing available at all: one trial call to an ejected target that is neither cooling down
    # (the provider asked for a pause) nor busy (a trial is already under way).
    th = board.peek(key)
    return (th is not None and th.ejected_until > now and th.in_flight == 0
            and not board.cooling_until((key[0], key[1]), now))


async def open_upstream(call: Call, open_: Callable[[], Awaitable[T]],
                        judge: Callable[[T], GatewayError | None] | None = None,
                        discard: Callable[[T], None] | None = None,
                        status_of: Callable[[T], int] | None = None) -> T:
    """`open_`'s result from the first target that answers (see the module docstring). Raises the
    last upstream error (one clear 502/503/504 after several attempts), or any other error of
    `open_` at once (the request's own fault: not an upstream's).

    `judge` (the passthrough, which relays upstream errors as they are): the error an opened
    answer stands for (a 5xx or 429 answer), or None when it is a success. Such an answer counts
    as a failed attempt; it is `discard`ed when another attempt follows, else returned as is.
    `status_of`: the status a served answer is recorded with (default 200)."""
    plan, board = call.route, call.worker.health
    assert plan is not None and call.order  # set by the route stage
    board.active += 1
    call.held.callback(_leave, board)
    peers = [k for _, _, k in call.order]
    last: GatewayError | None = None
    for index, (target, key, hkey) in enumerate(call.order):
        if not _eligible(call, board, index, tried_any=last is not None):
            continue
        retry = 0
        while True:
            call.target, call.provider_key = target, key
            th = board.get(hkey, call.vk.workspace_id, target.provider.name)
            board.started(th)
            t0 = time.perf_counter()
            try:
                result = await _attempt(call, open_)
            except GatewayError as err:
                if err.upstream_status is None:  # not the upstream's answer: the request's own error
                    board.ended(th)
                    raise
                last, answered = err, None
            except BaseException:
                board.ended(th)
                raise
            else:
                soft = judge(result) if judge is not None else None
                if soft is None:
                    elapsed_ms = (time.perf_counter() - t0) * 1000
                    board.first_byte(th, elapsed_ms)
                    call.attempts.append(Attempt(target=call.model_ref, provider_key_id=key.key_id,
                                                 status=status_of(result) if status_of is not None else 200,
                                                 latency_ms=round(elapsed_ms, 3)))
                    call.held.callback(_served, board, th, t0)
                    return result
                last, answered = soft, result
            finally:
                if retry:
                    board.retries_in_flight -= 1
            step = _after_failure(call, board, th, key.key_id, last, t0, retry, peers)
            if step == "stop":
                if answered is not None:
                    return answered
                raise _exhausted(call, last)
            if answered is not None and discard is not None:
                discard(answered)
            if step == "next":
                break
            retry += 1
            board.retries_in_flight += 1
            board.retries_total += 1
            try:
                await asyncio.sleep(_backoff_s(plan, retry - 1))
            except BaseException:
                board.retries_in_flight -= 1
                raise
    if last is None:
        raise _refuse_all(call, board)
    raise _exhausted(call, last)


async def _attempt(call: Call, open_: Callable[[], Awaitable[T]]) -> T:
    """One `open_` within this attempt's bound (a 504 `upstream_timeout` past it)."""
    bound, first_byte = _bound(call)
    if bound is None:
        return await open_()
    if bound <= 0:
        raise _timed_out(call, False, 0)
    try:
        async with asyncio.timeout(bound):
            return await open_()
    except TimeoutError:
        raise _timed_out(call, first_byte, round(bound, 3)) from None


def _after_failure(call: Call, board: HealthBoard, th: TargetHealth, key_id: str | None, err: GatewayError,
                   t0: float, retry: int, peers: list[TargetKey]) -> str:
    """Record a failed attempt (trail, health) and say what follows: "retry" the same target,
    the "next" target, or "stop" (the request's own fault, or the deadline passed)."""
    plan = call.route
    assert plan is not None
    cool = retry_after_s(err) if err.upstream_status in (429, 503, 529) else None
    # A pause the provider asked for is a cool-down, not a fault; a rejected credential or a
    # misconfigured address is the target's fault even though retrying it is pointless.
    faulty = (err.retryable or err.code in TARGET_FAULTS) and cool is None
    board.failed(th, err.code or "upstream_error", plan.health, peers, counts=faulty, cool_s=cool)
    call.attempts.append(Attempt(target=call.model_ref, provider_key_id=key_id, status=err.upstream_status or 0,
                                 latency_ms=round((time.perf_counter() - t0) * 1000, 3),
                                 reason=err.code or "upstream_error", retryable=err.retryable))
    if err.code in NO_FALLBACK_CODES:
        return "stop"
    remaining = _remaining(call)
    if remaining is not None and remaining <= MIN_ATTEMPT_S:
        return "stop"
    if (err.retryable and cool is None and retry < plan.retry.retries and board.may_retry(plan.retry)
            and th.ejected_until <= board.clock()
            and (remaining is None or plan.retry.backoff_ms / 1000 < remaining)):
        return "retry"
    if not any(_eligible(call, board, i, tried_any=True) for i in range(_index_of(call, th) + 1, len(call.order))):
        return "stop"
    return "next"


def _index_of(call: Call, th: TargetHealth) -> int:
    return next(i for i, (_, _, k) in enumerate(call.order) if k == th.key)


def _leave(board: HealthBoard) -> None:
    board.active -= 1


def _served(board: HealthBoard, th: TargetHealth, t0: float) -> None:
    board.finished(th, (time.perf_counter() - t0) * 1000)
