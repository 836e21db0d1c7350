"""A fast, faithful fake of the OpenAI Chat Completions API, for tests and the benchmark.

Endpoints (under ``/v1``):

* ``POST /v1/chat/completions``: non-streaming ``chat.completion`` or, with ``"stream": true``,
  a ``text/event-stream`` of ``chat.completion.chunk`` events (role delta, one content delta
  per word, finish chunk, usage chunk only with ``stream_options.include_usage``, ``[DONE]``).
* ``GET /v1/models`` and ``GET /v1/models/{id}``.

Every request needs ``Authorization: Bearer <anything>``; otherwise 401 ``invalid_api_key``.

Usage is a pure function of the request: prompt tokens are ``3 + ceil(chars / 4)`` per message
(see :func:`tests.fakes.openai_bodies.count_prompt_tokens`), completion tokens are the number
of words emitted. ``max_completion_tokens`` (else ``max_tokens``) caps the words and turns the
finish reason into ``"length"`` unless ``ignore_max_tokens`` is set.

Behaviour knobs are attributes of :class:`FakeUpstream` (read on every request, so tests may
change them at runtime) and may be overridden per request by headers:

=============================  ====================================  ==========================
attribute                      header                                meaning
=============================  ====================================  ==========================
``latency_ms``                 ``x-fake-latency-ms``                 delay before the response
``chunk_delay_ms``             ``x-fake-chunk-delay-ms``             delay between SSE events
``words``                      ``x-fake-words``                      words in the answer
``truncate_after``             ``x-fake-truncate-after``             stream: drop the connection
                                                                     after N content chunks
``ignore_max_tokens``          ``x-fake-ignore-max-tokens`` (1/0)    emit all words regardless
``cached_tokens``              ``x-fake-cached-tokens``              reported cached prompt tokens
``stall_after``                ``x-fake-stall-after``                stream: after N content
                                                                     chunks, silence (connection
                                                                     open), then the rest
``stall_s``                    ``x-fake-stall-s``                    seconds of that silence
                                                                     (default 10)
:meth:`FakeUpstream.fail_next` ``x-fake-fail-status`` (+               answer with an OpenAI error
                               ``x-fake-retry-after``)
``fail_status`` (+             (the header above, per request)       EVERY chat completion fails
``fail_retry_after``)                                                with it (an outage), until
                                                                     reset to None or ``clear()``
``fail_ratio`` (+              ``x-fake-fail-ratio`` (+              that share (0..1) of chat
``fail_ratio_status``, 503)    ``x-fake-fail-ratio-status``)         completions fail, at random
=============================  ====================================  ==========================

``latency_ms`` is also the "slow before the first byte" knob: it runs before the status line
and headers are written, so a client (or the gateway's first-byte timeout) sees no byte at all
until it has passed; ``chunk_delay_ms`` and ``stall_*`` only slow a stream that has started.

Failures apply to chat completions only, after the auth check and the latency delay; the first
that applies wins: ``x-fake-fail-status``, then the ``fail_next`` queue, then ``fail_status``,
then ``fail_ratio`` (drawn from ``FakeUpstream.rng``; seed it for a repeatable sequence).
``chat_attempts`` counts every ``POST /v1/chat/completions`` on arrival (before the auth check,
the latency and any failure), whether or not ``record`` is set. ``clear()`` forgets recorded
requests, queued failures and the count, and turns ``fail_status``, ``fail_ratio`` and
``stall_after`` off. Requests are recorded (bounded, oldest dropped) in
``FakeUpstream.requests`` unless ``record`` is false; the Authorization value is redacted.

Run standalone for the benchmark: ``python -m tests.fakes.upstream --port 9999 --no-record``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import signal
import time
from collections import deque
from typing import Any, Final

import msgspec
from aiohttp import web

from tests.fakes.openai_bodies import (
    DONE_EVENT,
    LISTED_MODELS,
    Answer,
    ChunkFramer,
    completion_body,
    count_prompt_tokens,
    error_body,
    models_body,
    usage,
)
from tests.fakes.server import Failure, FakeServer, RecordedRequest, drop_connection, recorded

__all__ = ["FakeUpstream", "RecordedRequest"]

_JSON: Final = "application/json"
_SSE_HEADERS: Final = {
    "Content-Type": "text/event-stream; charset=utf-8",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",
}
_REDACTED: Final = "Bearer <redacted>"
_MAX_CACHED_ANSWERS: Final = 64
_STALL_POLL_S: Final = 0.05  # how soon a stalled stream notices its client left


class _BadKnob(ValueError):
    """A malformed ``x-fake-*`` header; answered with a 400."""


class FakeUpstream(FakeServer):
    """An OpenAI-compatible upstream on ``host:port`` (port 0 picks a free port at start).

    Not thread-safe: use it from the event loop that started it. ``start`` may be called once;
    ``stop`` is idempotent. Attribute knobs take effect on the next request; ``seed`` seeds
    ``rng`` (the ``fail_ratio`` draws). ``base_url`` is the OpenAI ``base_url``, e.g.
    ``http://127.0.0.1:41234/v1``. Recorded requests have the ``authorization`` value replaced
    by ``"Bearer <redacted>"``.
    """

    _base_path = "/v1"
    _site_options = {"backlog": 1024, "reuse_address": True}

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        latency_ms: float = 0.0,
        chunk_delay_ms: float = 0.0,
        words: int = 8,
        record: bool = True,
        max_recorded: int = 1000,
        seed: int | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.latency_ms = latency_ms
        self.chunk_delay_ms = chunk_delay_ms
        self.words = words
        self.record = record
        self.max_recorded = max_recorded
        self.truncate_after: int | None = None
        self.ignore_max_tokens = False
        self.cached_tokens = 0
        self.stall_after: int | None = None
        self.stall_s = 10.0
        self._fail_status: int | None = None
        self.fail_retry_after: str | None = None
        self._fail_ratio = 0.0
        self.fail_ratio_status = 503
        self.rng = random.Random(seed)
        self.chat_attempts = 0
        self.requests: list[RecordedRequest] = []
        self._failures: deque[Failure] = deque()
        self._answers: dict[int, Answer] = {}
        self._id_prefix = os.urandom(4).hex()
        self._counter = 0
        self._models = models_body(int(time.time()))

    # -- test controls -------------------------------------------------------------------

    def fail_next(self, status: int, *, count: int = 1, retry_after: str | None = None) -> None:
        """Answer the next ``count`` chat completions with ``status`` and an OpenAI error body.

        ``retry_after`` (seconds, as a string) is sent as the ``retry-after`` header.
        Queued failures are consumed in order and stack with earlier calls.
        """
        if not 400 <= status <= 599:
            raise ValueError(f"fail_next status must be 4xx or 5xx, got {status}")
        self._failures.extend(Failure(status, retry_after) for _ in range(count))

    @property
    def fail_status(self) -> int | None:
        """While set (a 4xx or 5xx), every chat completion fails with it (a persistent outage),
        with ``fail_retry_after`` as its ``retry-after`` header when set. None: off."""
        return self._fail_status

    @fail_status.setter
    def fail_status(self, status: int | None) -> None:
        if status is not None and not 400 <= status <= 599:
            raise ValueError(f"fail_status must be 4xx, 5xx or None, got {status}")
        self._fail_status = status

    @property
    def fail_ratio(self) -> float:
        """The share (0..1) of chat completions that fail with ``fail_ratio_status``, at random."""
        return self._fail_ratio

    @fail_ratio.setter
    def fail_ratio(self, ratio: float) -> None:
        self._fail_ratio = _ratio(ratio, "fail_ratio", ValueError)

    def clear(self) -> None:
        """Forget recorded requests, pending failures and ``chat_attempts``; turn the persistent
        faults (``fail_status``, ``fail_ratio``, ``stall_after``) off."""
        self.requests.clear()
        self._failures.clear()
        self.chat_attempts = 0
        self._fail_status, self.fail_retry_after, self._fail_ratio = None, None, 0.0
        self.stall_after = None

    # -- request handling ----------------------------------------------------------------

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        path, method = request.path, request.method
        if path == "/v1/chat/completions" and method == "POST":
            self.chat_attempts += 1  # on arrival: a caller that gave up early still made the attempt
        raw = await request.read() if request.body_exists else b""
        auth = request.headers.get("Authorization", "")
        if self.record:
            self._record(request, raw, auth)
        if not auth.startswith("Bearer ") or not auth[7:].strip():
            return _error(
                401,
                "You didn't provide an API key. You need to provide your API key in an Authorization "
                "header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).",
            )
        if path == "/v1/chat/completions" and method == "POST":
            try:
                return await self._chat(request, raw)
            except _BadKnob as exc:
                return _error(400, str(exc))
        if method == "GET" and path == "/v1/models":
            return web.Response(body=self._models, content_type=_JSON)
        if method == "GET" and path.startswith("/v1/models/"):
            model = path[len("/v1/models/") :]
            if model in LISTED_MODELS:
                body = msgspec.json.encode({"id": model, "object": "model", "created": 0, "owned_by": "system"})
                return web.Response(body=body, content_type=_JSON)
            return _error(404, f"The model '{model}' does not exist", code="model_not_found")
        return _error(404, f"Invalid URL ({method} {path})")

    def _record(self, request: web.BaseRequest, raw: bytes, auth: str) -> None:
        key = auth[7:].strip() if auth.startswith("Bearer ") else ""
        self.requests.append(recorded(request, raw, key, mask=_REDACTED))
        if len(self.requests) > self.max_recorded:
            del self.requests[0]

    def _answer(self, words: int) -> Answer:
        answer = self._answers.get(words)
        if answer is None:
            if len(self._answers) >= _MAX_CACHED_ANSWERS:
                self._answers.clear()
            answer = self._answers[words] = Answer.of_words(words)
        return answer

    def _next_id(self) -> str:
        self._counter += 1
        return f"chatcmpl-fake{self._id_prefix}{self._counter:012d}"

    async def _chat(self, request: web.BaseRequest, raw: bytes) -> web.StreamResponse:
        hdrs = request.headers
        latency_ms = _float_knob(hdrs, "x-fake-latency-ms", self.latency_ms)
        if latency_ms > 0:
            await asyncio.sleep(latency_ms / 1000)

        failure = self._take_failure(hdrs)
        if failure is not None:
            extra = {"retry-after": failure.retry_after} if failure.retry_after is not None else None
            return _error(failure.status, headers=extra)

        try:
            body = msgspec.json.decode(raw)
        except msgspec.DecodeError:
            return _error(400, "We could not parse the JSON body of your request.")
        if not isinstance(body, dict):
            return _error(400, "The request body must be a JSON object.")
        model = body.get("model")
        if not isinstance(model, str) or not model:
            return _error(400, "you must provide a model parameter", param="model")
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            return _error(
                400,
                "Missing required parameter: 'messages'.",
                param="messages",
                code="missing_required_parameter",
            )
        stream = body.get("stream") is True
        stream_options = body.get("stream_options")
        if stream_options is not None and not stream:
            return _error(
                400,
                "The 'stream_options' parameter is only allowed when 'stream' is enabled.",
                param="stream_options",
            )
        cap = body.get("max_completion_tokens", body.get("max_tokens"))
        if cap is not None and (not isinstance(cap, int) or isinstance(cap, bool) or cap < 1):
            return _error(400, f"Invalid 'max_tokens': {cap!r}. Expected an integer >= 1.", param="max_tokens")

        words = _int_knob(hdrs, "x-fake-words", self.words)
        answer = self._answer(words)
        emitted = len(answer.pieces)
        finish_reason = "stop"
        ignore_cap = _bool_knob(hdrs, "x-fake-ignore-max-tokens", self.ignore_max_tokens)
        if cap is not None and cap < emitted and not ignore_cap:
            emitted, finish_reason = cap, "length"
        usage_obj = usage(
            count_prompt_tokens(messages),
            emitted,
            _int_knob(hdrs, "x-fake-cached-tokens", self.cached_tokens),
        )
        completion_id, created = self._next_id(), int(time.time())

        if not stream:
            content = answer.content if emitted == len(answer.pieces) else answer.prefix(emitted)
            out = completion_body(
                completion_id=completion_id,
                created=created,
                model=model,
                content=content,
                finish_reason=finish_reason,
                usage_obj=usage_obj,
            )
            return web.Response(body=out, content_type=_JSON, headers={"x-request-id": "req_" + completion_id[8:]})

        include_usage = isinstance(stream_options, dict) and stream_options.get("include_usage") is True
        framer = ChunkFramer(completion_id=completion_id, created=created, model=model, include_usage=include_usage)
        events = [framer.role_event()]
        events.extend(framer.event(choice) for choice in answer.delta_choices[:emitted])
        events.append(framer.finish_event(finish_reason))
        if include_usage:
            events.append(framer.usage_event(usage_obj))
        events.append(DONE_EVENT)
        truncate_after = _opt_int_knob(hdrs, "x-fake-truncate-after", self.truncate_after)
        chunk_delay_ms = _float_knob(hdrs, "x-fake-chunk-delay-ms", self.chunk_delay_ms)
        stall_after = _opt_int_knob(hdrs, "x-fake-stall-after", self.stall_after)
        stall_s = _float_knob(hdrs, "x-fake-stall-s", self.stall_s)
        return await self._stream(request, events, truncate_after, chunk_delay_ms, completion_id,
                                  stall_after=stall_after, stall_s=stall_s)

    async def _stream(
        self,
        request: web.BaseRequest,
        events: list[bytes],
        truncate_after: int | None,
        chunk_delay_ms: float,
        completion_id: str,
        *,
        stall_after: int | None = None,
        stall_s: float = 0.0,
    ) -> web.StreamResponse:
        headers = dict(_SSE_HEADERS)
        headers["x-request-id"] = "req_" + completion_id[8:]
        resp = web.StreamResponse(headers=headers)
        await resp.prepare(request)
        if truncate_after is not None:
            # Role event plus the first ``truncate_after`` content events, then a hard close:
            # no finish chunk, no usage, no [DONE], no chunked-encoding terminator.
            events = events[: 1 + max(truncate_after, 0)]
        if stall_after is None or stall_s <= 0:
            await _write_events(resp, events, chunk_delay_ms)
        else:
            # Role event plus ``stall_after`` content events, silence, then the rest.
            split = 1 + max(stall_after, 0)
            await _write_events(resp, events[:split], chunk_delay_ms)
            if not await _stall(request, stall_s):
                return resp  # the client gave up during the silence: nothing more to say
            try:
                await _write_events(resp, events[split:], chunk_delay_ms)
            except ConnectionResetError:  # it left just as the silence ended
                return resp
        if truncate_after is not None:
            drop_connection(request)
            # aiohttp's write_eof now hits a closing transport and is treated as a dropped peer.
            return resp
        await resp.write_eof()
        return resp

    def _take_failure(self, hdrs: Any) -> Failure | None:
        """The failure this chat completion answers with, if any (precedence: module docstring).
        Consumes a queued ``fail_next`` entry; raises ``_BadKnob`` on a malformed header."""
        status = hdrs.get("x-fake-fail-status")
        if status is not None:
            try:
                code = int(status)
            except ValueError as exc:
                raise _BadKnob(f"x-fake-fail-status must be an integer, got {status!r}") from exc
            return Failure(code, hdrs.get("x-fake-retry-after"))
        if self._failures:
            return self._failures.popleft()
        if self._fail_status is not None:
            return Failure(self._fail_status, self.fail_retry_after)
        ratio = self._fail_ratio
        if hdrs.get("x-fake-fail-ratio") is not None:
            ratio = _ratio(_float_knob(hdrs, "x-fake-fail-ratio", 0.0), "x-fake-fail-ratio", _BadKnob)
        if ratio > 0 and self.rng.random() < ratio:
            status = _int_knob(hdrs, "x-fake-fail-ratio-status", self.fail_ratio_status)
            if not 400 <= status <= 599:
                raise _BadKnob(f"the fail-ratio status must be 4xx or 5xx, got {status}")
            return Failure(status)
        return None


async def _write_events(resp: web.StreamResponse, events: list[bytes], chunk_delay_ms: float) -> None:
    """``events`` as one write, or one write each ``chunk_delay_ms`` apart."""
    if not events:
        return
    if chunk_delay_ms <= 0:
        # One write keeps the default path cheap; TCP may coalesce separate writes anyway.
        await resp.write(b"".join(events))
        return
    delay = chunk_delay_ms / 1000
    for i, event in enumerate(events):
        if i:
            await asyncio.sleep(delay)
        await resp.write(event)


async def _stall(request: web.BaseRequest, seconds: float) -> bool:
    """Send nothing for ``seconds``; False as soon as the client has closed the connection (so a
    fake whose caller timed out does not hold a handler, and its own shutdown, for the rest)."""
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        if request.transport is None or request.transport.is_closing():
            return False
        await asyncio.sleep(min(left, _STALL_POLL_S))
    return request.transport is not None and not request.transport.is_closing()


def _ratio(value: float, name: str, error: type[ValueError]) -> float:
    if not 0.0 <= value <= 1.0:
        raise error(f"{name} must be between 0 and 1, got {value!r}")
    return float(value)


def _error(
    status: int,
    message: str | None = None,
    *,
    param: str | None = None,
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> web.Response:
    return web.Response(
        status=status,
        body=error_body(status, message, param=param, code=code),
        content_type=_JSON,
        headers=headers,
    )


def _float_knob(hdrs: Any, name: str, default: float) -> float:
    value = hdrs.get(name)
    if value is None:
        return default
    try:
        return float(value)
    except ValueError as exc:
        raise _BadKnob(f"{name} must be a number, got {value!r}") from exc


def _int_knob(hdrs: Any, name: str, default: int) -> int:
    value = hdrs.get(name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError as exc:
        raise _BadKnob(f"{name} must be an integer, got {value!r}") from exc


def _opt_int_knob(hdrs: Any, name: str, default: int | None) -> int | None:
    return _int_knob(hdrs, name, 0) if hdrs.get(name) is not None else default


def _bool_knob(hdrs: Any, name: str, default: bool) -> bool:
    value = hdrs.get(name)
    if value is None:
        return default
    return value.strip().lower() in ("1", "true", "yes", "on")


# -- CLI -------------------------------------------------------------------------------------


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m tests.fakes.upstream",
        description="Serve the fake OpenAI upstream until SIGINT/SIGTERM.",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9999, help="0 picks a free port (printed on start)")
    parser.add_argument("--words", type=int, default=8, help="words per answer (default 8)")
    parser.add_argument("--latency-ms", type=float, default=0.0, help="delay before each response")
    parser.add_argument("--chunk-delay-ms", type=float, default=0.0, help="delay between stream events")
    parser.add_argument("--no-record", action="store_true", help="do not keep received requests (benchmarks)")
    return parser.parse_args(argv)


async def _serve(args: argparse.Namespace) -> None:
    fake = FakeUpstream(
        host=args.host,
        port=args.port,
        latency_ms=args.latency_ms,
        chunk_delay_ms=args.chunk_delay_ms,
        words=args.words,
        record=not args.no_record,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await fake.start()
    # The benchmark waits for this exact line before sending traffic.
    print(f"fake upstream listening on {fake.base_url}", flush=True)
    try:
        await stop.wait()
    finally:
        await fake.stop()


def main(argv: list[str] | None = None) -> None:
    """CLI entry point: serve forever (uvloop when installed); exit 0 on SIGINT/SIGTERM."""
    args = _parse_args(argv)
    try:
        import uvloop
    except ImportError:
        asyncio.run(_serve(args))
    else:
        with contextlib.suppress(KeyboardInterrupt):
            uvloop.run(_serve(args))


if __name__ == "__main__":
    main()
