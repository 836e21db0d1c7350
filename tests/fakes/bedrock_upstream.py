"""A fake of the Bedrock Runtime Converse API on 127.0.0.1, for adapter tests.

Endpoints: ``POST /model/{modelId}/converse`` (JSON) and ``POST /model/{modelId}/converse-stream``
(``application/vnd.amazon.eventstream`` frames built with our own encoder). The answer is a
:class:`Script` (``FakeBedrock.script``; a fixed greeting when unset); the same script yields
the non-streamed body (:func:`converse_body`) and the stream frames (:func:`stream_frames`),
so "stream reassembled == non-stream" can be checked without a model.

Auth, as Bedrock checks it:

* ``Authorization: Bearer <key>`` must equal ``bearer_token`` when that is set.
* ``Authorization: AWS4-HMAC-SHA256 ...`` must be well formed, sign ``host`` and
  ``x-amz-date``, carry ``x-amz-content-sha256`` equal to the body's SHA-256, name service
  ``bedrock`` and the fake's region, and, when ``credentials`` is set, match the signature the
  fake recomputes over the request *as received* (raw path, headers, body) — 403
  ``InvalidSignatureException`` otherwise.

Requests are also validated like Converse does (roles alternate starting with ``user``, no
blank text, ``toolConfig`` present when the history holds tool blocks): 400
``ValidationException``. Knobs: :meth:`fail_next` (any ``x-amzn-ErrorType`` and status),
``stream_exception_after`` (an exception frame after N frames), ``truncate_after`` (N frames,
then half a frame and a clean end of body), ``corrupt_after`` (frame N has a flipped byte).
"""

from __future__ import annotations

import hashlib
import hmac
from collections import deque
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote

import msgspec
from aiohttp import web

from dataplane.providers.aws_sigv4 import (
    AwsCredentials,
    canonical_request,
    credential_scope,
    parse_authorization,
    signing_key,
    string_to_sign,
)
from dataplane.providers.eventstream import encode_message
from tests.fakes.server import Failure, FakeServer, parse_body, redacted_headers

__all__ = ["FakeBedrock", "Reasoning", "Script", "Text", "ToolUse", "converse_body", "exception_frame",
           "stream_frames"]


@dataclass(frozen=True, slots=True)
class Text:
    text: str


@dataclass(frozen=True, slots=True)
class ToolUse:
    tool_use_id: str
    name: str
    input: Any


@dataclass(frozen=True, slots=True)
class Reasoning:
    text: str
    signature: str = "sig-fake"


Block = Text | ToolUse | Reasoning


@dataclass(frozen=True, slots=True)
class Script:
    """One model answer: content blocks, stop reason, token counts."""

    blocks: tuple[Block, ...] = (Text("Hello from the fake Bedrock."),)
    stop_reason: str = "end_turn"
    input_tokens: int = 11
    output_tokens: int = 7
    cache_read: int = 0
    cache_write: int = 0
    text_piece: int = 4  # stream: characters per text delta
    args_piece: int = 5  # stream: characters per toolUse.input delta

    def usage(self) -> dict[str, int]:
        u = {"inputTokens": self.input_tokens, "outputTokens": self.output_tokens,
             "totalTokens": self.input_tokens + self.output_tokens + self.cache_read + self.cache_write}
        if self.cache_read or self.cache_write:
            u["cacheReadInputTokens"] = self.cache_read
            u["cacheWriteInputTokens"] = self.cache_write
        return u


def converse_body(script: Script) -> bytes:
    content: list[dict[str, Any]] = []
    for block in script.blocks:
        if isinstance(block, Text):
            content.append({"text": block.text})
        elif isinstance(block, ToolUse):
            content.append({"toolUse": {"toolUseId": block.tool_use_id, "name": block.name, "input": block.input}})
        else:
            content.append({"reasoningContent": {"reasoningText": {"text": block.text,
                                                                   "signature": block.signature}}})
    return msgspec.json.encode({
        "output": {"message": {"role": "assistant", "content": content}},
        "stopReason": script.stop_reason,
        "usage": script.usage(),
        "metrics": {"latencyMs": 42},
    })


def _event(event_type: str, payload: dict[str, Any]) -> bytes:
    # Bedrock pads payloads with a "p" field of varying length; the adapter must ignore it.
    body = msgspec.json.encode({**payload, "p": "abcdefghij"[: len(event_type) % 10]})
    return encode_message({":event-type": event_type, ":content-type": "application/json",
                           ":message-type": "event"}, body)


def _pieces(text: str, size: int) -> list[str]:
    return [text[i : i + size] for i in range(0, len(text), max(size, 1))]


def stream_frames(script: Script) -> list[bytes]:
    """The ConverseStream frames for `script`, in Bedrock's order."""
    frames = [_event("messageStart", {"role": "assistant"})]
    for index, block in enumerate(script.blocks):
        if isinstance(block, ToolUse):
            frames.append(_event("contentBlockStart", {"contentBlockIndex": index, "start": {
                "toolUse": {"toolUseId": block.tool_use_id, "name": block.name}}}))
            args = msgspec.json.encode(block.input).decode()
            frames.extend(_event("contentBlockDelta", {"contentBlockIndex": index, "delta": {"toolUse": {"input": p}}})
                          for p in _pieces(args, script.args_piece))
        elif isinstance(block, Text):
            frames.extend(_event("contentBlockDelta", {"contentBlockIndex": index, "delta": {"text": p}})
                          for p in _pieces(block.text, script.text_piece))
        else:
            frames.extend(_event("contentBlockDelta", {"contentBlockIndex": index,
                                                       "delta": {"reasoningContent": {"text": p}}})
                          for p in _pieces(block.text, script.text_piece))
            frames.append(_event("contentBlockDelta", {"contentBlockIndex": index,
                                                       "delta": {"reasoningContent": {"signature": block.signature}}}))
        frames.append(_event("contentBlockStop", {"contentBlockIndex": index}))
    frames.append(_event("messageStop", {"stopReason": script.stop_reason}))
    frames.append(_event("metadata", {"usage": script.usage(), "metrics": {"latencyMs": 42}}))
    return frames


def exception_frame(exception_type: str, message: str) -> bytes:
    return encode_message({":exception-type": exception_type, ":content-type": "application/json",
                           ":message-type": "exception"}, msgspec.json.encode({"message": message}))


def validation_problem(body: Any) -> str | None:
    """What Converse would reject in this request body, or None."""
    if not isinstance(body, dict) or not isinstance(body.get("messages"), list) or not body["messages"]:
        return "messages must be a non-empty list"
    expected, tool_blocks = "user", False
    for msg in body["messages"]:
        if not isinstance(msg, dict) or msg.get("role") != expected:
            return "A conversation must start with a user message and alternate between user and assistant roles."
        content = msg.get("content")
        if not isinstance(content, list) or not content:
            return "The content field in the Message object is empty."
        for block in content:
            if "text" in block and not str(block["text"]).strip():
                return "The text field in the ContentBlock object is blank."
            tool_blocks = tool_blocks or "toolUse" in block or "toolResult" in block
        expected = "assistant" if expected == "user" else "user"
    if tool_blocks and "toolConfig" not in body:
        return "The toolConfig field must be defined when using toolUse and toolResult content blocks."
    return None


@dataclass(slots=True)
class RecordedRequest:
    """`raw_path` as received (percent-encoding intact); `model_id` decoded; auth redacted."""

    raw_path: str
    model_id: str
    action: str
    headers: dict[str, str]
    body: Any
    auth_scheme: str


@dataclass(slots=True)
class FakeBedrock(FakeServer):
    """Not thread-safe; use from the loop that started it. Knobs apply to the next request."""

    region: str = "us-east-1"
    credentials: AwsCredentials | None = None
    bearer_token: str | None = None
    script: Script | None = None
    stream_exception_after: int | None = None
    stream_exception_type: str = "throttlingException"
    truncate_after: int | None = None
    corrupt_after: int | None = None
    host: str = "127.0.0.1"
    port: int = 0
    requests: list[RecordedRequest] = field(default_factory=list)
    _failures: deque[Failure] = field(default_factory=deque)

    def fail_next(self, status: int, error_type: str, message: str = "Something went wrong.") -> None:
        """Answer the next request with `status`, `x-amzn-ErrorType: error_type` and
        `{"message": message}`."""
        self._failures.append(Failure(status, message=message, error_type=error_type))

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        raw = await request.read()
        path = request.raw_path.split("?", 1)[0]
        prefix, _, rest = path.partition("/model/")
        model_enc, _, action = rest.rpartition("/")
        auth = request.headers.get("Authorization", "")
        headers = redacted_headers(request, ("authorization", "x-amz-security-token"))
        body = parse_body(raw, invalid=None)
        self.requests.append(RecordedRequest(request.raw_path, unquote(model_enc), action, headers, body,
                                             auth.split(" ", 1)[0]))
        if request.method != "POST" or prefix or action not in ("converse", "converse-stream") or not model_enc:
            return _aws_error(404, "UnknownOperationException", "Unknown operation.")
        denied = self._check_auth(request, raw)
        if denied is not None:
            return denied
        if self._failures:
            f = self._failures.popleft()
            return _aws_error(f.status, f.error_type, f.message or "")
        problem = validation_problem(body)
        if problem is not None:
            return _aws_error(400, "ValidationException", problem)
        script = self.script or Script()
        if action == "converse":
            return web.Response(body=converse_body(script), content_type="application/json")
        return await self._stream(request, script)

    def _check_auth(self, request: web.BaseRequest, raw: bytes) -> web.Response | None:
        auth = request.headers.get("Authorization", "")
        if auth.startswith("Bearer "):
            if self.bearer_token is not None and auth[7:] != self.bearer_token:
                return _aws_error(403, "AccessDeniedException", "Authentication failed: invalid API key.")
            return None
        parsed = parse_authorization(auth)
        if parsed is None:
            return _aws_error(403, "MissingAuthenticationTokenException", "Missing Authentication Token")
        hdrs = request.headers
        amz_date = hdrs.get("x-amz-date", "")
        if ({"host", "x-amz-date"} - set(parsed.signed_headers) or parsed.service != "bedrock"
                or parsed.region != self.region or not amz_date.startswith(parsed.datestamp)
                or hdrs.get("x-amz-content-sha256") != hashlib.sha256(raw).hexdigest()):
            return _aws_error(403, "IncompleteSignatureException", "Malformed SigV4 request.")
        creds = self.credentials
        if creds is None:
            return None
        bad_token = creds.session_token and (hdrs.get("x-amz-security-token") != creds.session_token
                                             or "x-amz-security-token" not in parsed.signed_headers)
        if parsed.access_key_id != creds.access_key_id or bad_token:
            return _aws_error(403, "UnrecognizedClientException",
                              "The security token included in the request is invalid.")
        signed = {name: hdrs.get(name, "") for name in parsed.signed_headers}
        canonical, _ = canonical_request(request.method, f"http://{hdrs.get('host', '')}{request.raw_path}", signed,
                                         hashlib.sha256(raw).hexdigest())
        to_sign = string_to_sign(amz_date, credential_scope(parsed.datestamp, parsed.region, parsed.service), canonical)
        key = signing_key(creds.secret_access_key, parsed.datestamp, parsed.region, parsed.service)
        expected = hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()
        if not hmac.compare_digest(expected, parsed.signature):
            return _aws_error(403, "InvalidSignatureException",
                              "The request signature we calculated does not match the signature you provided.")
        return None

    async def _stream(self, request: web.BaseRequest, script: Script) -> web.StreamResponse:
        frames = stream_frames(script)
        if self.stream_exception_after is not None:
            frames = [*frames[: self.stream_exception_after],
                      exception_frame(self.stream_exception_type, "Too many tokens, please wait before trying again.")]
        if self.corrupt_after is not None and self.corrupt_after < len(frames):
            bad = bytearray(frames[self.corrupt_after])
            bad[-6] ^= 0xFF  # inside the payload: the prelude is fine, the message CRC is not
            frames[self.corrupt_after] = bytes(bad)
        if self.truncate_after is not None and self.truncate_after < len(frames):
            cut = frames[self.truncate_after]
            frames = [*frames[: self.truncate_after], cut[: len(cut) // 2]]
        resp = web.StreamResponse(headers={"Content-Type": "application/vnd.amazon.eventstream"})
        await resp.prepare(request)
        for frame in frames:
            await resp.write(frame)
        await resp.write_eof()
        return resp


def _aws_error(status: int, error_type: str, message: str) -> web.Response:
    return web.Response(status=status, body=msgspec.json.encode({"message": message}),
                        content_type="application/json",
                        headers={"x-amzn-ErrorType": f"{error_type}:http://internal.amazon.com/coral/com.amazon.bedrock/"})
