"""`POST /v1/embeddings`: OpenAI's embeddings API, relayed to any adapter that can `embed`.

Embeddings are not chat, so this is a pipeline endpoint of its own rather than an `Ingress`; it
runs the same stages (auth, policy, limits, budget hold) and records an `llm.call` with ingress
"embeddings", priced by input tokens.

Formats: the client's `encoding_format` (default `float`; the python SDK sends `base64` unless
told otherwise) decides the answer's format. When the provider answered in that format the body
is relayed byte-for-byte; otherwise each vector is converted, float <-> base64 of little-endian
float32 (what OpenAI sends and the SDKs decode).
"""

from __future__ import annotations

import binascii
from collections.abc import Awaitable, Callable
from typing import Annotated, Any, Literal, Protocol

import msgspec
from aiohttp import web

from dataplane.attempts import open_upstream
from dataplane.call import Call
from dataplane.edge import check_model
from dataplane.lifecycle import bearer, note_disconnect, priced_json, read_object, upstream_call
from dataplane.providers.base import ChatResponse, UpstreamCall
from dataplane.providers.registry import adapter_for
from dataplane.stages.governance import input_bound
from dataplane.stages.route import plan_route
from dataplane.vectors import base64_to_floats, floats_to_base64
from schemas.errors import InvalidRequest, UpstreamError
from schemas.http import validate

INGRESS = "embeddings"
MAX_INPUTS = 2048  # OpenAI's limit on array inputs

EncodingFormat = Literal["float", "base64"]


class EmbeddingsProvider(Protocol):
    """Optional adapter capability: `POST /embeddings` upstream. Detected by the presence of an
    `embed` attribute (a runtime Protocol isinstance check costs too much per request).

    `call.body` is the client's embeddings body with `model` set to the upstream id. The answer
    is the provider's body (either encoding) with `usage.prompt_tokens` parsed as input tokens.
    Raises GatewayError on upstream failure."""

    async def embed(self, call: UpstreamCall) -> ChatResponse: ...


class EmbeddingsRequest(msgspec.Struct, frozen=True, kw_only=True):
    """What the gateway checks; the decoded body is forwarded as-is, unknown fields included."""

    model: str
    # str | list[str] | list[int] | list[list[int]]; msgspec unions hold one array type, so the
    # element types are checked by `check_input`.
    input: str | list[Any]
    encoding_format: EncodingFormat | None = None
    dimensions: Annotated[int, msgspec.Meta(ge=1)] | None = None
    user: str | None = None


def _is_token(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def check_input(value: str | list[Any]) -> None:
    """Raise InvalidRequest(param="input") unless `value` is a non-empty string, or a list of
    1..2048 non-empty strings, or of token ids (ints >= 0), or of non-empty token-id lists."""
    shape = "'input' must be a non-empty string, an array of strings, an array of token ids, or an array " \
            "of token-id arrays."
    if isinstance(value, str):
        if not value:
            raise InvalidRequest("'input' cannot be an empty string.", param="input")
        return
    if not value:
        raise InvalidRequest("'input' cannot be an empty array.", param="input")
    if len(value) > MAX_INPUTS:
        raise InvalidRequest(f"'input' can hold at most {MAX_INPUTS} items; got {len(value)}.", param="input")
    first = value[0]
    if isinstance(first, str):
        ok = all(isinstance(v, str) and v for v in value)
    elif _is_token(first):
        ok = all(_is_token(v) for v in value)
    elif isinstance(first, list):
        ok = all(isinstance(v, list) and v and all(_is_token(t) for t in v) for v in value)
    else:
        ok = False
    if not ok:
        raise InvalidRequest(shape, param="input")


def parse_request(raw: Any) -> EmbeddingsRequest:
    """The validated request, or InvalidRequest naming the offending field in `param`."""
    typed = validate(raw, EmbeddingsRequest)
    check_input(typed.input)
    return typed


class _ItemProbe(msgspec.Struct):
    embedding: msgspec.Raw = msgspec.Raw(b"")


class _BodyProbe(msgspec.Struct):
    data: list[_ItemProbe]


_probe_decoder = msgspec.json.Decoder(_BodyProbe)
_any_decoder: msgspec.json.Decoder[Any] = msgspec.json.Decoder()
_encoder = msgspec.json.Encoder()


def _format_of(raw: msgspec.Raw) -> EncodingFormat | None:
    head = bytes(raw).lstrip()[:1]
    return "base64" if head == b'"' else "float" if head == b"[" else None


def reformat(body: bytes, wanted: EncodingFormat, provider: str = "provider") -> bytes:
    """`body` (an embeddings answer) with every vector in `wanted` encoding. Returned unchanged,
    byte for byte, when it already is. Raises UpstreamError for a malformed answer."""
    bad = UpstreamError(f"Provider '{provider}' returned an embeddings body the gateway cannot read.")
    try:
        probe = _probe_decoder.decode(body)
    except (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError):
        raise bad from None
    formats = {_format_of(item.embedding) for item in probe.data}
    if None in formats:
        raise bad
    if formats <= {wanted}:
        return body
    payload = _any_decoder.decode(body)
    try:
        for item in payload["data"]:
            vector = item["embedding"]
            if wanted == "base64" and isinstance(vector, list):
                item["embedding"] = floats_to_base64(vector)
            elif wanted == "float" and isinstance(vector, str):
                item["embedding"] = base64_to_floats(vector)
    except (TypeError, ValueError, binascii.Error):
        raise bad from None
    return _encoder.encode(payload)


# --- endpoint -----------------------------------------------------------------------------------


class Embeddings:
    """`POST /v1/embeddings` as a pipeline endpoint (ingress "embeddings"); priced by input tokens."""

    name = INGRESS
    governed = True
    records_success = True

    def credential(self, request: web.Request) -> str:
        return bearer(request)

    async def intake(self, call: Call) -> None:
        await read_object(call)

    def plan(self, call: Call) -> None:
        typed = parse_request(call.raw)
        call.requested_model = check_model(typed.model)
        call.input_bound = input_bound(len(call.body_bytes))
        plan_route(call, typed.model)
        call.max_tokens = 0  # an embedding has no output tokens: the hold is the input alone

    def set_max_tokens(self, call: Call, value: int) -> bool:
        return True  # nothing to cap: no output tokens

    def strip_tools(self, call: Call, names: tuple[str, ...]) -> bool:
        return True  # no tools

    async def dispatch(self, call: Call) -> web.StreamResponse:
        raw = call.raw
        assert isinstance(raw, dict)
        result = await open_upstream(call, lambda: _embed(call, raw))
        target = call.target
        assert target is not None
        call.usage = result.usage
        note_disconnect(call.request, call)
        wanted: EncodingFormat = raw.get("encoding_format") or "float"
        return priced_json(call, reformat(result.body, wanted, target.provider.name))


async def _embed(call: Call, raw: dict[str, Any]) -> ChatResponse:
    """One attempt at the call's current target."""
    target = call.target
    assert target is not None
    embed: Callable[[UpstreamCall], Awaitable[ChatResponse]] | None = getattr(
        adapter_for(target.provider.type), "embed", None)
    if embed is None:
        raise InvalidRequest(f"Provider '{target.provider.name}' (type '{target.provider.type}') does "
                             "not serve embeddings through this gateway.", param="model",
                             code="embeddings_not_supported")
    return await embed(upstream_call(call, {**raw, "model": target.model}))
