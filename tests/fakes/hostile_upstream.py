"""A provider that attacks the gateway: redirects, key echoes, absurd usage, DNS rebinding.

:class:`HostileUpstream` answers every method and path (OpenAI-shaped bodies) according to
``script``, one of the :class:`Act` values, changeable between requests:

* ``REDIRECT``: ``307`` with ``Location: redirect_to`` (a refused address, or a :class:`Trap`).
* ``ECHO_HEADER``: a normal chat completion, plus the credential it received in ``X-Echo-Key``
  (and in a header whose name carries it).
* ``ECHO_OCTET``: ``application/octet-stream`` bytes with the credential inside (with
  ``octet_streamed``: no length, two writes that cut the credential in half).
* ``ECHO_SSE_SPLIT``: a chat completion stream whose content is the credential, written so the
  credential is cut in the middle between two network writes.
* ``ABSURD_USAGE``: a normal completion (or stream, when the body asks for one) whose usage is
  ``usage`` (default ``prompt_tokens = 10**19``), for the gateway's range checks.
* ``OK``: a plain, honest completion.

Every request is recorded in ``requests`` (credentials redacted, :func:`recorded`) and the
credential it carried is kept in ``keys_seen``, so a test can assert what reached it.

:class:`Trap` is a listener that records every request and answers ``200 trapped``: the target
of a redirect, which must never be reached. :class:`RebindingResolver` is the DNS-rebind hook:
an aiohttp resolver whose answers a test rewrites (``table[name] = ["10.0.0.1"]``), for
``dataplane.outbound.make_session(settings, resolver=...)``.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import json
import socket
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from aiohttp.abc import AbstractResolver, ResolveResult

from tests.fakes.server import FakeServer, RecordedRequest, recorded

__all__ = ["Act", "HostileUpstream", "RebindingResolver", "Trap", "credential_of"]

_CREDENTIAL_HEADERS = ("authorization", "x-api-key", "x-goog-api-key", "api-key")


class Act(enum.Enum):
    OK = "ok"
    REDIRECT = "redirect"
    ECHO_HEADER = "echo_header"
    ECHO_OCTET = "echo_octet"
    ECHO_SSE_SPLIT = "echo_sse_split"
    ABSURD_USAGE = "absurd_usage"


def credential_of(request: web.BaseRequest) -> str:
    """The provider credential a request carried (Bearer, x-api-key, x-goog-api-key, api-key)."""
    for name in _CREDENTIAL_HEADERS:
        value = request.headers.get(name)
        if value:
            return value.removeprefix("Bearer ").strip()
    return ""


def _completion(content: str, usage: dict[str, Any]) -> bytes:
    # stdlib json: it writes integers of any size, which is the point of ABSURD_USAGE.
    return json.dumps({
        "id": "chatcmpl-hostile", "object": "chat.completion", "created": 1, "model": "gpt-4o-mini",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
        "usage": usage,
    }).encode()


def _chunk(delta: dict[str, Any], finish: str | None = None, usage: dict[str, Any] | None = None) -> bytes:
    body: dict[str, Any] = {"id": "chatcmpl-hostile", "object": "chat.completion.chunk", "created": 1,
                            "model": "gpt-4o-mini",
                            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}] if usage is None else []}
    if usage is not None:
        body["usage"] = usage
    return b"data: " + json.dumps(body).encode() + b"\n\n"


@dataclass
class HostileUpstream(FakeServer):
    host: str = "127.0.0.1"
    port: int = 0
    script: Act = Act.OK
    redirect_to: str = "http://169.254.169.254/latest/meta-data/"
    redirect_status: int = 307
    octet_streamed: bool = False  # ECHO_OCTET without a length, in two writes cutting the key
    usage: dict[str, Any] = field(default_factory=lambda: {
        "prompt_tokens": 10**19, "completion_tokens": 3, "total_tokens": 10**19 + 3})
    requests: list[RecordedRequest] = field(default_factory=list)
    keys_seen: list[str] = field(default_factory=list)

    def clear(self) -> None:
        self.requests.clear()
        self.keys_seen.clear()

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        raw = await request.read()
        key = credential_of(request)
        self.keys_seen.append(key)
        self.requests.append(recorded(request, raw, key, secrets=_CREDENTIAL_HEADERS))
        wants_stream = b'"stream":true' in raw.replace(b" ", b"")
        act = self.script
        if act is Act.REDIRECT:
            return web.Response(status=self.redirect_status, headers={"Location": self.redirect_to},
                                text="moved")
        if act is Act.ECHO_HEADER:
            return web.Response(body=_completion("fine", {"prompt_tokens": 1, "completion_tokens": 1,
                                                          "total_tokens": 2}),
                                content_type="application/json",
                                headers={"X-Echo-Key": f"Bearer {key}", f"X-Key-{key}": "1"})
        if act is Act.ECHO_OCTET:
            body = b"\x00\x01binary:" + key.encode() + b"\xff"
            if not self.octet_streamed:
                return web.Response(body=body, content_type="application/octet-stream")
            cut = body.index(key.encode()) + len(key) // 2
            return await self._stream(request, [body[:cut], body[cut:]], "application/octet-stream")
        if act is Act.ECHO_SSE_SPLIT:
            return await self._split_stream(request, key)
        usage = self.usage if act is Act.ABSURD_USAGE else {"prompt_tokens": 5, "completion_tokens": 2,
                                                            "total_tokens": 7}
        if wants_stream:
            return await self._stream(request, [_chunk({"role": "assistant", "content": "hello"}),
                                                _chunk({}, "stop"), _chunk({}, usage=usage), b"data: [DONE]\n\n"])
        return web.Response(body=_completion("hello", usage), content_type="application/json")

    async def _stream(self, request: web.BaseRequest, writes: list[bytes],
                      content_type: str = "text/event-stream") -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": content_type})
        await resp.prepare(request)
        with contextlib.suppress(ConnectionResetError):  # the gateway may stop reading after [DONE]
            for data in writes:
                await resp.write(data)
                await asyncio.sleep(0.01)  # separate network reads on the gateway's side
            await resp.write_eof()
        return resp

    async def _split_stream(self, request: web.BaseRequest, key: str) -> web.StreamResponse:
        event = _chunk({"role": "assistant", "content": f"your key is {key}!"})
        cut = event.index(key.encode()) + len(key) // 2 if key else len(event) // 2
        usage = {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}
        return await self._stream(request, [event[:cut], event[cut:], _chunk({}, "stop"), _chunk({}, usage=usage),
                                            b"data: [DONE]\n\n"])


@dataclass
class Trap(FakeServer):
    """Where a followed redirect would land: records everything, answers 200 ``trapped``."""

    host: str = "127.0.0.1"
    port: int = 0
    requests: list[RecordedRequest] = field(default_factory=list)
    keys_seen: list[str] = field(default_factory=list)

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        raw = await request.read()
        key = credential_of(request)
        self.keys_seen.append(key)
        self.requests.append(recorded(request, raw, key, secrets=_CREDENTIAL_HEADERS))
        return web.Response(text="trapped")


class RebindingResolver(AbstractResolver):
    """A scripted DNS: `table[name]` is the list of addresses `name` resolves to right now.
    `lookups` counts resolutions per name (the guard's check runs per resolution)."""

    def __init__(self, table: dict[str, list[str]] | None = None) -> None:
        self.table: dict[str, list[str]] = dict(table or {})
        self.lookups: dict[str, int] = {}

    async def resolve(self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET,
                      ) -> list[ResolveResult]:
        self.lookups[host] = self.lookups.get(host, 0) + 1
        addresses = self.table.get(host)
        if not addresses:
            raise OSError(f"{host} does not resolve")
        return [ResolveResult(hostname=host, host=a, port=port,
                              family=socket.AF_INET6 if ":" in a else socket.AF_INET, proto=0,
                              flags=socket.AI_NUMERICHOST) for a in addresses]

    async def close(self) -> None:
        return None
