"""Serving an app so that aiohttp's own low-level errors take the API's error shape too.

aiohttp answers what its HTTP parser refuses (a header over 8 KB, more than 128 headers, bare-LF
line endings, a malformed request line, a Content-Encoding it cannot decode) before any middleware
runs, in plain text that quotes the offending bytes, the `Authorization` header included.
`RequestHandler.handle_error` is the one method that renders those answers (and the last-resort
500/504 when a handler escapes its middleware); `JsonErrorRequestHandler` renders them as
`{"error": {...}}` bodies from `schemas.errors`, with our own messages, never echoing the request.

aiohttp has no setting for the protocol class, so the hook is three small subclasses: the
handler, a `web.Server` that builds it, and a `web.AppRunner` whose `_make_server` (the runner's
abstract construction hook) hands the app's server over to it. `run_app` serves an app with them,
like the subset of `web.run_app` the CLI used. In-process test apps do not need any of this: only
the parser's own errors differ.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import structlog
from aiohttp import web
from aiohttp.web_protocol import RequestPayloadError
from aiohttp.web_request import BaseRequest

from dataplane.limits import CappedTCPSite
from schemas.errors import GatewayError, InternalError, InvalidRequest, UpstreamError, render_anthropic, render_openai
from schemas.http import client_fault, is_anthropic_path

log = structlog.get_logger(__name__)


def protocol_error(status: int, exc: BaseException | None) -> GatewayError:
    """The error to answer for aiohttp's `handle_error(status, exc)`. Pure."""
    fault = client_fault(exc) if exc is not None else None
    if fault is not None:
        return fault
    if status == 504:
        return UpstreamError("The request timed out.", status=504, code="timeout")
    if 400 <= status < 500:
        return InvalidRequest("The HTTP request is malformed.", code="malformed_request", status=status)
    return InternalError("The gateway hit an internal error. It has been logged.")


class JsonErrorRequestHandler(web.RequestHandler):
    """aiohttp's connection protocol, with `handle_error` answering in the API's error shape."""

    __slots__ = ()

    def handle_error(self, request: BaseRequest, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        """Same contract as aiohttp's: a response that closes the connection, or ConnectionError
        when part of a response already left. `message` (aiohttp's text, which may quote request
        bytes) is ignored."""
        err = protocol_error(status, exc)
        if err.status >= 500:
            log.error("unhandled_error", status=err.status, exc_info=exc)
        else:
            # Only the class: aiohttp's exception text quotes the request, secrets included.
            log.info("http_protocol_error", status=err.status, error=type(exc).__name__ if exc else None)
        if request.writer.output_size > 0:
            raise ConnectionError("Response is sent already, cannot send another response with the error message")
        body = render_anthropic(err) if is_anthropic_path(request.path) else render_openai(err)
        resp = web.Response(status=err.status, body=body, content_type="application/json", headers=err.headers)
        resp.force_close()
        return resp


    def log_exception(self, *args: Any, **kw: Any) -> None:
        # After answering 400 to a body that does not match its Content-Encoding, aiohttp drains
        # the rest of it and logs the same client error again, with a traceback.
        if isinstance(kw.get("exc_info"), RequestPayloadError):
            log.info("http_body_unreadable")
            return
        super().log_exception(*args, **kw)


class JsonErrorServer(web.Server):
    """`web.Server` whose connections use `JsonErrorRequestHandler`."""

    def __call__(self) -> web.RequestHandler:
        return JsonErrorRequestHandler(self, loop=self._loop, **self._kwargs)


class JsonErrorAppRunner(web.AppRunner):
    """`web.AppRunner` serving its app through `JsonErrorServer` (same settings, same app)."""

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        return JsonErrorServer(server.request_handler, request_factory=server.request_factory,
                               handler_cancellation=server.handler_cancellation,
                               loop=asyncio.get_running_loop(), **server._kwargs)


LEFTOVER_WAIT_S = 5.0  # for tasks still running once the app is cleaned up


def run_app(app: web.Application, *, host: str, port: int, loop: asyncio.AbstractEventLoop,
            reuse_port: bool | None = None, shutdown_timeout: float = 60.0, keepalive_timeout: float = 75.0,
            max_connections: int = 0, **handler_args: Any) -> None:
    """Serve `app` on `host:port` until SIGINT/SIGTERM, then shut down gracefully (at most
    `shutdown_timeout` s for requests in flight, then the app's cleanup) and close `loop`.
    Beyond `max_connections` open connections (0: no cap) a new one is answered 503 and closed.
    `handler_args` go to each connection's `RequestHandler`, as with `web.run_app`. No access log."""
    runner = JsonErrorAppRunner(app, handle_signals=True, access_log=None, shutdown_timeout=shutdown_timeout,
                                keepalive_timeout=keepalive_timeout, **handler_args)

    async def serve() -> None:
        await runner.setup()
        try:
            await CappedTCPSite(runner, host, port, reuse_port=reuse_port, max_connections=max_connections).start()
            await asyncio.Event().wait()  # until a signal raises GracefulExit out of the loop
        finally:
            await runner.cleanup()

    asyncio.set_event_loop(loop)
    task = loop.create_task(serve())
    try:
        loop.run_until_complete(task)
    except (web.GracefulExit, KeyboardInterrupt):
        pass
    finally:
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                loop.run_until_complete(task)
        leftover = asyncio.all_tasks(loop)
        for other in leftover:
            other.cancel()
        if leftover:
            # Bounded: nats-py's reconnect task swallows cancellation while its server is gone (the
            # launcher died and took NATS with it), and waiting for it would keep this process alive.
            loop.run_until_complete(asyncio.wait(leftover, timeout=LEFTOVER_WAIT_S))
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()
