"""The plumbing every fake upstream shares: serving on ``host:port`` and recording requests.

:class:`FakeServer` serves ``self._handle`` with aiohttp's low-level server. A fake subclasses
it, sets ``host`` and ``port`` (plain attributes or dataclass fields; port 0 picks a free port,
written back once bound) and implements ``_handle``; it then has ``start``/``stop``,
``async with``, and ``base_url`` (``http://host:port`` plus the class's ``_base_path``).

:class:`RecordedRequest` is the record most fakes keep in ``requests``; :func:`recorded`
builds one with the credentials redacted, from :func:`redacted_headers` and :func:`parse_body`,
which fakes with a record of their own use directly.

:class:`Failure` is one answer queued by a fake's ``fail_next``; each fake reads the fields its
API has. :func:`write_stream` and :func:`drop_connection` serve streams that may break off.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, ClassVar, Final, Self

import msgspec
from aiohttp import web

__all__ = ["REDACTED", "Failure", "FakeServer", "RecordedRequest", "drop_connection", "parse_body", "recorded",
           "redacted_headers", "write_stream"]

REDACTED: Final = "<redacted>"
_TEXT: Final = object()


class FakeServer:
    """Start/stop and ``base_url`` for a fake. Not thread-safe: use it from the loop that started it.

    ``start`` raises if already running; ``stop`` is idempotent.
    """

    host: str
    port: int
    #: Appended to ``base_url``, e.g. ``"/v1"`` where the SDKs' base URL includes the version.
    _base_path: ClassVar[str] = ""
    #: Extra ``web.TCPSite`` arguments (``backlog``, ``reuse_address``...).
    _site_options: ClassVar[dict[str, Any]] = {}
    _runner: web.BaseRunner | None = None

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        raise NotImplementedError

    def _make_runner(self) -> web.BaseRunner:
        return web.ServerRunner(web.Server(self._handle, access_log=None), handle_signals=False, access_log=None)

    async def start(self) -> None:
        """Bind and serve; afterwards ``self.port`` is the bound port."""
        if self._runner is not None:
            raise RuntimeError(f"{type(self).__name__} already started")
        runner = self._make_runner()
        await runner.setup()
        try:
            await web.TCPSite(runner, self.host, self.port, **self._site_options).start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        self.port = int(runner.addresses[0][1])

    async def stop(self) -> None:
        """Close the listener and open connections. Safe to call more than once."""
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    @property
    def base_url(self) -> str:
        """What a client is configured with, e.g. ``http://127.0.0.1:41234`` (+ ``_base_path``)."""
        return f"http://{self.host}:{self.port}{self._base_path}"


@dataclass(slots=True)
class RecordedRequest:
    """One request the fake received.

    ``headers`` has lower-cased names, credentials replaced by a placeholder. ``body`` is the
    parsed JSON body, the raw text when it is not JSON, or ``None`` when empty. ``api_key_hint``
    is the last 4 characters of the key (``""`` when absent), enough to tell which key was
    forwarded without storing it.
    """

    method: str
    path: str
    headers: dict[str, str]
    body: Any
    api_key_hint: str = ""


@dataclass(frozen=True, slots=True)
class Failure:
    """An error answer queued by ``fail_next``."""

    status: int
    retry_after: str | None = None  # the ``retry-after`` header, in seconds
    message: str | None = None  # None: the fake's default message for ``status``
    retry_delay: str | None = None  # Gemini's ``RetryInfo.retryDelay``
    error_type: str = ""  # Bedrock's ``x-amzn-ErrorType``


def redacted_headers(request: web.BaseRequest, secrets: Iterable[str] = (), mask: str = REDACTED) -> dict[str, str]:
    """The request's headers with lower-cased names, each of ``secrets`` present set to ``mask``."""
    headers = {k.lower(): v for k, v in request.headers.items()}
    for name in secrets:
        if name in headers:
            headers[name] = mask
    return headers


def parse_body(raw: bytes, *, invalid: Any = _TEXT) -> Any:
    """The JSON body, ``None`` when empty, ``invalid`` when not JSON (by default the text)."""
    if not raw:
        return None
    try:
        return msgspec.json.decode(raw)
    except msgspec.DecodeError:
        return raw.decode("utf-8", "replace") if invalid is _TEXT else invalid


def recorded(
    request: web.BaseRequest,
    raw: bytes,
    key: str,
    *,
    secrets: Iterable[str] = ("authorization",),
    mask: str = REDACTED,
    path: str | None = None,
) -> RecordedRequest:
    """The record of ``request`` (body ``raw``, credential ``key``), ``secrets`` headers masked.

    ``path`` defaults to the path with its query string.
    """
    return RecordedRequest(
        request.method,
        request.path_qs if path is None else path,
        redacted_headers(request, secrets, mask),
        parse_body(raw),
        key[-4:],
    )


def drop_connection(request: web.BaseRequest) -> None:
    """Close the connection under a response being written: the client sees no clean end of body."""
    if request.transport is not None:
        request.transport.close()


async def write_stream(
    request: web.BaseRequest,
    content_type: str,
    frames: Sequence[bytes],
    *,
    drop_at: int | None = None,
    error_at: int | None = None,
    error: bytes = b"",
) -> web.StreamResponse:
    """Stream ``frames`` one write each, then end the body cleanly.

    Instead of frame ``drop_at``: drop the connection. Instead of frame ``error_at``: write
    ``error`` and end the body.
    """
    resp = web.StreamResponse(headers={"Content-Type": content_type})
    await resp.prepare(request)
    for i, frame in enumerate(frames):
        if i == drop_at:
            drop_connection(request)
            return resp
        if i == error_at:
            await resp.write(error)
            break
        await resp.write(frame)
    await resp.write_eof()
    return resp
