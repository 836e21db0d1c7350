"""`/{provider}/*` passthrough: the pure pieces (credentials, URLs, header rewriting, model and
usage extraction incl. streams split at every byte), then the route in-process against the fakes
(Bedrock SigV4 and event streams, Ollama NDJSON, Azure, masking, limits, disconnects)."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from typing import Any

import aiohttp
import msgspec
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from yarl import URL

from dataplane.ingress import passthrough as pt
from dataplane.ingress import passthrough_rules as rules
from dataplane.ingress.passthrough_usage import (
    EventStreamSniffer,
    NdjsonSniffer,
    SseSniffer,
    sniffer_for,
    usage_from_body,
    usage_from_dict,
    usage_from_headers,
)
from dataplane.outbound import make_session
from dataplane.providers.aws_sigv4 import (
    AwsCredentials,
    canonical_request,
    credential_scope,
    parse_authorization,
    signing_key,
    string_to_sign,
)
from dataplane.providers.eventstream import encode_message
from dataplane.snapshot import SnapshotStore
from dataplane.state import WORKER, WorkerState
from schemas.entities import ConfigEntity, Provider, VirtualKey
from schemas.errors import AuthenticationFailed, InvalidRequest, UpstreamError
from schemas.events import LlmCall, Usage
from schemas.http import error_middleware
from schemas.keys import KeyRing
from schemas.settings import Secret, Settings
from schemas.snapshot import Snapshot
from tests.fakes.anthropic_upstream import FakeAnswer, sse_bytes, stream_events
from tests.fakes.azure_upstream import FakeAzure
from tests.fakes.bedrock_upstream import FakeBedrock, Script, stream_frames
from tests.fakes.hostile_upstream import Act, HostileUpstream, Trap
from tests.fakes.ollama_upstream import FakeOllama
from tests.fakes.upstream import FakeUpstream
from tests.unit.conftest import Recorder

NOW = datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC)


def provider(kind: str, base_url: str = "", **options: str) -> Provider:
    return Provider(id="p", workspace_id="ws", name="p", type=kind, base_url=base_url,  # type: ignore[arg-type]
                    options=options)


# -- credentials, paths, URLs ------------------------------------------------------------------


@pytest.mark.parametrize(("headers", "query", "expected"), [
    ({"Authorization": "Bearer vk-1 "}, "", ("vk-1", False)),
    ({"x-api-key": "vk-2"}, "", ("vk-2", False)),
    ({"x-goog-api-key": "vk-3"}, "key=other", ("vk-3", False)),
    ({"api-key": "vk-4"}, "", ("vk-4", False)),
    ({}, "alt=sse&key=vk%2B5", ("vk+5", True)),
])
def test_client_credential_sources(headers: dict[str, str], query: str, expected: tuple[str, bool]) -> None:
    assert pt.client_credential(headers, query) == expected


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Basic abc"}, {"Authorization": "Bearer "}])
def test_client_credential_missing_or_malformed_is_401(headers: dict[str, str]) -> None:
    with pytest.raises(AuthenticationFailed):
        pt.client_credential(headers, "alt=sse")


def test_query_helpers_keep_other_parameters_byte_exact() -> None:
    query = "alt=sse&key=sk%2Dx&api-version=2024-10-21&q=a%20b+c"
    assert pt.query_param(query, "key") == "sk-x"
    assert pt.query_param(query, "q") == "a b c"
    assert pt.query_param(query, "missing") is None
    assert pt.drop_query_param(query, "key") == "alt=sse&api-version=2024-10-21&q=a%20b+c"
    assert pt.drop_query_param("key=1", "key") == ""


def test_split_target_keeps_encoding() -> None:
    assert pt.split_target("/bedrock/model/arn%3Aaws%3Abedrock%2Fx/converse?a=1") == (
        "model/arn%3Aaws%3Abedrock%2Fx/converse", "a=1")
    assert pt.split_target("/openai/") == ("", "")
    assert pt.split_target("/openai") == ("", "")


@pytest.mark.parametrize("rest", ["v1/../admin", "v1/./x", "%2e%2e/x", "a/%2E%2E%2Fb", "x/..%5Cy"])
def test_dot_segments_are_refused(rest: str) -> None:
    with pytest.raises(InvalidRequest):
        pt.check_path(rest)


def test_ordinary_paths_pass() -> None:
    pt.check_path("v1beta/models/gemini-2.5-flash:generateContent")
    pt.check_path("model/anthropic.claude-3-5-sonnet-20240620-v1%3A0/converse")
    pt.check_path("v1/files/file-abc..txt")


@pytest.mark.parametrize(("rest", "model"), [
    ("v1beta/models/gemini-2.5-flash:streamGenerateContent", "gemini-2.5-flash"),
    ("v1beta/models/gemini-2.5-flash%3AgenerateContent", "gemini-2.5-flash"),
    ("v1beta/tunedModels/my-tune:generateContent", "my-tune"),
    ("model/anthropic.claude-3-5-sonnet-20240620-v1:0/converse-stream", "anthropic.claude-3-5-sonnet-20240620-v1:0"),
    ("model/arn%3Aaws%3Abedrock%3Aus-east-1%3A1%3Ainference-profile%2Fus.x/converse",
     "arn:aws:bedrock:us-east-1:1:inference-profile/us.x"),
    ("openai/deployments/gpt4o-prod/chat/completions", "gpt4o-prod"),
    ("v1/chat/completions", ""),
    ("v1/models/", ""),
])
def test_model_from_path(rest: str, model: str) -> None:
    assert pt.model_from_path(rest) == model


def test_model_of_prefers_the_json_body() -> None:
    assert pt.model_of(b'{"messages":[],"model":"gpt-4o"}', "application/json; charset=utf-8",
                       "v1/chat/completions") == "gpt-4o"
    assert pt.model_of(b'{"model":"x"}', "multipart/form-data", "openai/deployments/d/x") == "d"
    assert pt.model_of(b"not json", "application/json", "model/m1/converse") == "m1"
    assert pt.model_of(b'[{"model":"x"}]', "application/json", "") == ""
    assert pt.model_of(b'{"model":7}', "application/json", "") == ""


@pytest.mark.parametrize(("base", "rest", "query", "url"), [
    ("https://api.openai.com/v1", "v1/chat/completions", "", "https://api.openai.com/v1/chat/completions"),
    ("https://api.openai.com/v1/", "chat/completions", "", "https://api.openai.com/v1/chat/completions"),
    ("https://api.groq.com/openai/v1", "openai/v1/chat/completions", "", "https://api.groq.com/openai/v1/chat/completions"),
    ("https://api.groq.com/openai/v1", "v1/models", "", "https://api.groq.com/openai/v1/models"),
    ("https://api.anthropic.com", "v1/messages", "beta=true", "https://api.anthropic.com/v1/messages?beta=true"),
    ("https://r.openai.azure.com/openai", "openai/deployments/d/chat/completions", "api-version=2024-10-21",
     "https://r.openai.azure.com/openai/deployments/d/chat/completions?api-version=2024-10-21"),
    ("http://h:1/base?tenant=a", "v1/x", "b=2", "http://h:1/base/v1/x?tenant=a&b=2"),
    ("http://h:1", "", "", "http://h:1"),
    ("http://h:1/v1", "v1/", "", "http://h:1/v1/"),
])
def test_join_url_merges_the_repeated_base_path(base: str, rest: str, query: str, url: str) -> None:
    assert pt.join_url(base, rest, query) == url


def test_default_base_urls_come_from_the_adapters() -> None:
    assert pt.upstream_url(provider("openai"), "v1/chat/completions", "") == "https://api.openai.com/v1/chat/completions"
    assert pt.upstream_url(provider("xai"), "v1/chat/completions", "") == "https://api.x.ai/v1/chat/completions"
    assert pt.upstream_url(provider("anthropic"), "v1/messages", "") == "https://api.anthropic.com/v1/messages"
    assert pt.upstream_url(provider("gemini"), "v1beta/models/g:generateContent", "alt=sse") == (
        "https://generativelanguage.googleapis.com/v1beta/models/g:generateContent?alt=sse")
    assert pt.upstream_url(provider("ollama"), "api/chat", "") == "http://127.0.0.1:11434/api/chat"
    assert pt.upstream_url(provider("bedrock", region="eu-west-1"), "model/m/converse", "") == (
        "https://bedrock-runtime.eu-west-1.amazonaws.com/model/m/converse")
    assert pt.upstream_url(provider("ollama", "http://10.0.0.2:11434/"), "api/tags", "") == "http://10.0.0.2:11434/api/tags"
    with pytest.raises(UpstreamError) as azure:
        pt.upstream_url(provider("azure"), "openai/v1/chat/completions", "")
    assert azure.value.code == "provider_misconfigured"
    with pytest.raises(UpstreamError):
        pt.upstream_url(provider("bedrock", region="eu-west-1/../x"), "model/m/converse", "")
    with pytest.raises(InvalidRequest) as mock:
        pt.upstream_url(provider("mock"), "v1/chat/completions", "")
    assert mock.value.code == "passthrough_unsupported"


# -- headers ------------------------------------------------------------------------------------

CLIENT_HEADERS = [
    ("Authorization", "Bearer vk-client"), ("X-Api-Key", "vk-client"), ("x-goog-api-key", "vk-client"),
    ("api-key", "vk-client"), ("Host", "gateway:8080"), ("Content-Length", "12"), ("Connection", "keep-alive, X-Hop"),
    ("X-Hop", "1"), ("Keep-Alive", "timeout=5"), ("Transfer-Encoding", "chunked"), ("Cookie", "session=1"),
    ("Accept-Encoding", "gzip, br"), ("Alephant-Run-Id", "run-1"), ("alephant-property-team", "a"),
    ("Content-Type", "application/json"), ("anthropic-version", "2026-10-21"), ("anthropic-beta", "a-1"),
    ("anthropic-beta", "b-2"), ("User-Agent", "sdk/1.0"), ("OpenAI-Beta", "assistants=v2"),
]


def test_forward_headers_strips_credentials_hop_by_hop_and_ours() -> None:
    out = pt.forward_headers(CLIENT_HEADERS)
    assert out == {"content-type": "application/json", "anthropic-version": "2026-10-21",
                   "anthropic-beta": "a-1, b-2", "user-agent": "sdk/1.0", "openai-beta": "assistants=v2"}


def _auth_of(kind: str, key: str | None = "sk-provider-0123456789", **options: str) -> dict[str, str]:
    out = pt.upstream_headers(CLIENT_HEADERS, provider(kind, "http://h", **options), key, method="POST",
                              url="http://h/x", body=b"{}", now=NOW)
    assert "vk-client" not in " ".join(out.values())
    assert out["accept-encoding"] == "identity"
    return {k: v for k, v in out.items() if k in ("authorization", "api-key", "x-api-key", "x-goog-api-key")}


def test_provider_auth_per_type() -> None:
    bearer = {"authorization": "Bearer sk-provider-0123456789"}
    assert _auth_of("openai") == bearer
    assert _auth_of("groq") == bearer
    assert _auth_of("ollama") == bearer
    assert _auth_of("ollama", None) == {}
    assert _auth_of("azure") == {"api-key": "sk-provider-0123456789"}
    assert _auth_of("azure", auth="bearer") == bearer
    assert _auth_of("anthropic") == {"x-api-key": "sk-provider-0123456789"}
    assert _auth_of("gemini") == {"x-goog-api-key": "sk-provider-0123456789"}
    assert _auth_of("bedrock", "bedrock-api-key-abcdef") == {"authorization": "Bearer bedrock-api-key-abcdef"}


def test_anthropic_version_is_kept_or_defaulted() -> None:
    kept = pt.upstream_headers(CLIENT_HEADERS, provider("anthropic"), "k" * 10, method="POST", url="u",
                               body=b"", now=NOW)
    assert (kept["anthropic-version"], kept["anthropic-beta"]) == ("2026-10-21", "a-1, b-2")
    default = pt.upstream_headers([], provider("anthropic"), "k" * 10, method="POST", url="u", body=b"", now=NOW)
    assert default["anthropic-version"] == "2023-06-01"


def test_bedrock_sigv4_signs_exactly_what_is_sent() -> None:
    creds = AwsCredentials("AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY", "session-token-1")
    url = "http://127.0.0.1:9/model/arn%3Aaws%3Abedrock%3Aus-west-2%3A1%3Ax%2Fy/converse?a=1"
    body = b'{"messages":[]}'
    client = [*CLIENT_HEADERS, ("X-Amz-Date", "20000101T000000Z"), ("x-amz-security-token", "client-token")]
    out = pt.upstream_headers(client, provider("bedrock", region="us-west-2"),
                              "AKIDEXAMPLE:wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY:session-token-1",
                              method="POST", url=url, body=body, now=NOW)
    parsed = parse_authorization(out["Authorization"])
    assert parsed is not None and (parsed.region, parsed.service) == ("us-west-2", "bedrock")
    assert {"host", "x-amz-date", "x-amz-content-sha256", "x-amz-security-token", "content-type"} <= set(
        parsed.signed_headers)
    assert out["X-Amz-Security-Token"] == "session-token-1" and "x-amz-security-token" not in out
    assert out["X-Amz-Date"] == "20250102T030405Z" and "x-amz-date" not in out
    signed = {name: out[next(k for k in out if k.lower() == name)] for name in parsed.signed_headers}
    canonical, _ = canonical_request("POST", url, signed, hashlib.sha256(body).hexdigest())
    to_sign = string_to_sign(out["X-Amz-Date"], credential_scope("20250102", "us-west-2", "bedrock"), canonical)
    key = signing_key(creds.secret_access_key, "20250102", "us-west-2", "bedrock")
    assert hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest() == parsed.signature
    assert out["anthropic-beta"] == "a-1, b-2"  # unsigned extras still travel


def test_bedrock_without_credentials_is_an_operator_error() -> None:
    with pytest.raises(UpstreamError) as err:
        pt.upstream_headers([], provider("bedrock"), None, method="POST", url="http://h/x", body=b"", now=NOW)
    assert err.value.code == "upstream_auth_error"
    with pytest.raises(UpstreamError):
        pt.upstream_headers([], provider("bedrock", auth="sigv4"), "no-colon-here", method="POST",
                            url="http://h/x", body=b"", now=NOW)


def test_masking_covers_bedrock_parts_and_skips_short_keys() -> None:
    secrets = pt.secrets_of("bedrock", "AKIDEXAMPLE12:secretsecretsecret:tok")
    assert secrets[0] == b"AKIDEXAMPLE12:secretsecretsecret:tok"
    body = b'{"message":"bad key AKIDEXAMPLE12 / secretsecretsecret / AKIDEXAMPLE12:secretsecretsecret:tok"}'
    assert pt.mask(body, secrets) == b'{"message":"bad key *** / *** / ***"}'
    assert pt.secrets_of("ollama", "x") == ()
    assert pt.secrets_of("openai", None) == ()
    assert pt.secrets_of("openai", "sk-a:b-long-enough") == (b"sk-a:b-long-enough",)


def test_anthropic_error_shape_choice() -> None:
    assert pt.anthropic_client("anthropic", "/claude/v2/other")
    assert pt.anthropic_client(None, "/claude/v1/messages?beta=true")
    assert pt.anthropic_client("ollama", "/local/v1/messages/count_tokens")
    assert not pt.anthropic_client(None, "/oai/v1/chat/completions")
    assert not pt.anthropic_client("openai", "/oai/v1/responses")


def test_relay_headers_and_stream_detection() -> None:
    out = pt.relay_headers({"Content-Type": "application/json", "Set-Cookie": "a=b", "Transfer-Encoding": "chunked",
                            "Retry-After": "7", "x-request-id": "r", "Alephant-Cost-Usd": "9", "Server": "x",
                            "Content-Length": "10"})
    assert dict(out) == {"Content-Type": "application/json", "Retry-After": "7", "x-request-id": "r"}
    assert pt.is_streamed("text/event-stream; charset=utf-8", None)
    assert pt.is_streamed("application/x-ndjson", 100)
    assert pt.is_streamed("application/vnd.amazon.eventstream", None)
    assert pt.is_streamed("audio/mpeg", None)
    assert not pt.is_streamed("audio/mpeg", 1000)
    assert not pt.is_streamed("application/json", None)


# -- usage: whole bodies ---------------------------------------------------------------------------


def enc(value: Any) -> bytes:
    return msgspec.json.encode(value)


@pytest.mark.parametrize(("kind", "body", "usage"), [
    ("openai", {"choices": [], "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15,
                                         "prompt_tokens_details": {"cached_tokens": 4, "cache_write_tokens": 2},
                                         "completion_tokens_details": {"reasoning_tokens": 3}}},
     Usage(input_tokens=10, output_tokens=5, cache_read_tokens=4, cache_write_tokens=2, reasoning_tokens=3)),
    ("openai", {"object": "list", "data": [{"embedding": [0.1] * 8}], "usage": {"prompt_tokens": 7,
                                                                                 "total_tokens": 7}},
     Usage(input_tokens=7)),
    ("xai", {"usage": {"prompt_tokens": 10, "completion_tokens": 5,
                       "completion_tokens_details": {"reasoning_tokens": 20}}},
     Usage(input_tokens=10, output_tokens=25, reasoning_tokens=20)),
    ("deepseek", {"usage": {"prompt_tokens": 10, "completion_tokens": 1, "prompt_cache_hit_tokens": 6}},
     Usage(input_tokens=10, output_tokens=1, cache_read_tokens=6)),
    ("groq", {"x_groq": {"usage": {"prompt_tokens": 3, "completion_tokens": 2}}},
     Usage(input_tokens=3, output_tokens=2)),
    ("openai", {"object": "response", "usage": {"input_tokens": 30, "input_tokens_details": {"cached_tokens": 10},
                                                "output_tokens": 9, "output_tokens_details": {"reasoning_tokens": 4}}},
     Usage(input_tokens=30, output_tokens=9, cache_read_tokens=10, reasoning_tokens=4)),
    ("openai", {"usage": {"input_tokens": 30, "input_tokens_details": None, "output_tokens": 9}},
     Usage(input_tokens=30, output_tokens=9)),
    ("anthropic", {"type": "message", "usage": {"input_tokens": 25, "cache_read_input_tokens": 100,
                                                "cache_creation_input_tokens": 50, "output_tokens": 12}},
     Usage(input_tokens=175, output_tokens=12, cache_read_tokens=100, cache_write_tokens=50)),
    ("ollama", {"type": "message", "usage": {"input_tokens": 5, "cache_read_input_tokens": 2, "output_tokens": 1}},
     Usage(input_tokens=7, output_tokens=1, cache_read_tokens=2)),
    ("bedrock", {"output": {"message": {"content": [{"text": "hi"}]}}, "message": "not a dict",
                 "usage": {"inputTokens": 11, "outputTokens": 7, "cacheReadInputTokens": 3,
                           "cacheWriteInputTokens": 2}},
     Usage(input_tokens=16, output_tokens=7, cache_read_tokens=3, cache_write_tokens=2)),
    ("gemini", {"candidates": [], "usageMetadata": {"promptTokenCount": 8, "candidatesTokenCount": 4,
                                                     "thoughtsTokenCount": 6, "cachedContentTokenCount": 2,
                                                     "toolUsePromptTokenCount": 1}},
     Usage(input_tokens=9, output_tokens=10, cache_read_tokens=2, reasoning_tokens=6)),
    ("gemini", [{"usageMetadata": {"promptTokenCount": 8, "candidatesTokenCount": 1}},
                {"usageMetadata": {"promptTokenCount": 8, "candidatesTokenCount": 5}}, {"candidates": []}],
     Usage(input_tokens=8, output_tokens=5)),
    ("ollama", {"model": "llama3", "message": {"role": "assistant", "content": "hi"}, "done": True,
                "prompt_eval_count": 26, "eval_count": 290},
     Usage(input_tokens=26, output_tokens=290)),
])
def test_usage_from_native_bodies(kind: str, body: Any, usage: Usage) -> None:
    assert usage_from_body(enc(body), kind) == usage


@pytest.mark.parametrize("raw", [b"", b"not json", b'{"usage": null}', b'{"usage": "x"}', b'{"data": []}',
                                 b'{"usage": {"weird": 1}}', b'{"usageMetadata": {"promptTokenCount": "x"}}'])
def test_bodies_without_usage(raw: bytes) -> None:
    assert usage_from_body(raw, "openai") is None


def test_usage_from_bedrock_invoke_headers() -> None:
    assert usage_from_headers({"x-amzn-bedrock-input-token-count": "12", "x-amzn-bedrock-output-token-count": "3"}) == \
        Usage(input_tokens=12, output_tokens=3)
    assert usage_from_headers({}) is None
    assert usage_from_headers({"x-amzn-bedrock-input-token-count": "many"}) is None


def test_anthropic_shape_wins_for_anthropic_type_even_without_cache_fields() -> None:
    assert usage_from_dict({"input_tokens": 5, "output_tokens": 2}, "anthropic") == Usage(input_tokens=5,
                                                                                            output_tokens=2)


# -- usage: streams, split at every position ------------------------------------------------------


def splits(data: bytes) -> list[list[bytes]]:
    """One chunking per cut size: 1 byte, 2 bytes, ... plus the whole stream and two odd cuts."""
    sizes = [1, 2, 3, 5, 7, 13, 64, len(data)]
    out = [[data[i:i + n] for i in range(0, len(data), n)] for n in sizes]
    out.append([data[:len(data) // 3], data[len(data) // 3:]])
    return out


def sniffed(make: Callable[[], Any], data: bytes) -> set[Usage | None]:
    results = set()
    for chunks in splits(data):
        sniffer = make()
        for chunk in chunks:
            sniffer.feed(chunk)
        sniffer.close()
        results.add(sniffer.usage)
    return results


def sse(*payloads: Any, crlf: bool = False) -> bytes:
    nl = b"\r\n" if crlf else b"\n"
    return b"".join(b"data: " + (p if isinstance(p, bytes) else enc(p)) + nl + nl for p in payloads)


def test_openai_chat_stream_usage_from_the_last_chunk() -> None:
    data = b": keep-alive\n\n" + sse(
        {"choices": [{"delta": {"content": 'he said "usage":{'}}], "usage": None},
        {"choices": [{"delta": {}, "finish_reason": "stop"}], "usage": None},
        {"choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 4,
                                  "prompt_tokens_details": {"cached_tokens": 2}}},
        b"[DONE]")
    assert sniffed(lambda: SseSniffer("openai"), data) == {Usage(input_tokens=9, output_tokens=4, cache_read_tokens=2)}
    assert sniffed(lambda: SseSniffer("openai"), data.replace(b"\n", b"\r\n")) == {
        Usage(input_tokens=9, output_tokens=4, cache_read_tokens=2)}


def test_responses_stream_usage_from_response_completed() -> None:
    data = (b"event: response.created\n" + sse({"type": "response.created", "response": {"usage": None}})
            + b"event: response.output_text.delta\n" + sse({"type": "response.output_text.delta", "delta": "x"})
            + b"event: response.completed\n" + sse({"type": "response.completed", "response": {
                "output": [{"type": "message"}], "usage": {"input_tokens": 20, "output_tokens": 6,
                                                           "output_tokens_details": {"reasoning_tokens": 2}}}}))
    assert sniffed(lambda: SseSniffer("openai"), data) == {Usage(input_tokens=20, output_tokens=6, reasoning_tokens=2)}


@pytest.mark.parametrize("full_delta_usage", [False, True])
def test_anthropic_stream_merges_message_start_and_delta(full_delta_usage: bool) -> None:
    answer = FakeAnswer(input_tokens=25, output_tokens=12, cache_read_input_tokens=100, cache_creation_input_tokens=50)
    data = b"".join(sse_bytes(n, p) for n, p in stream_events(answer, msg_id="m", model="c",
                                                              full_delta_usage=full_delta_usage))
    expected = Usage(input_tokens=175, output_tokens=12, cache_read_tokens=100, cache_write_tokens=50)
    assert sniffed(lambda: SseSniffer("anthropic"), data) == {expected}
    # Without event names (some compatible servers): `type` inside the data decides.
    unnamed = b"".join(sse(p) for _, p in stream_events(answer, msg_id="m", model="c"))
    assert sniffed(lambda: SseSniffer("ollama"), unnamed) == {expected}


def test_anthropic_stream_cut_after_message_start_keeps_the_input() -> None:
    answer = FakeAnswer(input_tokens=25, output_tokens=12)
    events = stream_events(answer, msg_id="m", model="c")[:4]
    data = b"".join(sse_bytes(n, p) for n, p in events)
    assert sniffed(lambda: SseSniffer("anthropic"), data) == {Usage(input_tokens=25, output_tokens=1)}


def test_gemini_stream_last_usage_metadata_wins() -> None:
    chunks = [{"candidates": [{"content": {"parts": [{"text": f"w{i}"}]}}],
               "usageMetadata": {"promptTokenCount": 8, "candidatesTokenCount": i, "thoughtsTokenCount": 2}}
              for i in range(1, 5)]
    assert sniffed(lambda: SseSniffer("gemini"), sse(*chunks, crlf=True)) == {
        Usage(input_tokens=8, output_tokens=6, reasoning_tokens=2)}


def test_ollama_ndjson_final_line() -> None:
    lines = [enc({"model": "m", "message": {"role": "assistant", "content": w}, "done": False}) for w in ("a", "b")]
    lines.append(enc({"model": "m", "message": {"role": "assistant", "content": ""}, "done": True,
                      "done_reason": "stop", "prompt_eval_count": 26, "eval_count": 2}))
    data = b"\n".join(lines) + b"\n"
    assert sniffed(lambda: NdjsonSniffer("ollama"), data) == {Usage(input_tokens=26, output_tokens=2)}
    assert sniffed(lambda: NdjsonSniffer("ollama"), data[:-1]) == {Usage(input_tokens=26, output_tokens=2)}
    assert sniffed(lambda: NdjsonSniffer("ollama"), b"\n".join(lines[:2])) == {None}


def test_bedrock_event_stream_metadata_event() -> None:
    data = b"".join(stream_frames(Script(input_tokens=11, output_tokens=7, cache_read=3)))
    assert sniffed(lambda: EventStreamSniffer("bedrock"), data) == {
        Usage(input_tokens=14, output_tokens=7, cache_read_tokens=3, cache_write_tokens=0)}


def test_bedrock_corrupt_stream_stops_sniffing_without_raising() -> None:
    frames = stream_frames(Script())
    bad = bytearray(frames[1])
    bad[-6] ^= 0xFF
    sniffer = EventStreamSniffer("bedrock")
    for frame in [frames[0], bytes(bad), *frames[2:]]:
        sniffer.feed(frame)
    sniffer.close()
    assert sniffer.usage is None
    exception = encode_message({":message-type": "exception", ":exception-type": "throttlingException"}, b"{}")
    sniffer = EventStreamSniffer("bedrock")
    sniffer.feed(exception)
    assert sniffer.usage is None


def test_sniffer_for_media_types() -> None:
    assert isinstance(sniffer_for("text/event-stream; charset=utf-8", "openai"), SseSniffer)
    assert isinstance(sniffer_for("application/x-ndjson", "ollama"), NdjsonSniffer)
    assert isinstance(sniffer_for("application/vnd.amazon.eventstream", "bedrock"), EventStreamSniffer)
    assert sniffer_for("audio/mpeg", "openai") is None
    assert sniffer_for(None, "openai") is None


def test_oversized_event_stops_sniffing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("dataplane.ingress.passthrough_usage.MAX_PENDING", 64)
    sniffer = SseSniffer("openai")
    sniffer.feed(b"data: " + b"x" * 100)
    sniffer.feed(b"\n\n" + sse({"usage": {"prompt_tokens": 1, "completion_tokens": 1}}))
    sniffer.close()
    assert sniffer.usage is None


# -- the route, in-process --------------------------------------------------------------------------

CLIENT_KEY = "sk-alph-passthrough-client"
IAM_KEY = "AKIDPASSTHROUGH1:passthrough/secret/key/0123456789"
HOSTILE_KEY = "sk-hostile-operator-key-0123456789"


class Gw:
    def __init__(self, url: str, session: aiohttp.ClientSession, recorder: Recorder) -> None:
        self.url, self.session, self.recorder = url, session, recorder

    async def last_event(self) -> LlmCall:
        for _ in range(100):  # the event is emitted as the handler returns, just after the client's read
            if self.recorder.events:
                return self.recorder.events[-1]
            await asyncio.sleep(0.01)
        raise AssertionError("no llm.call event")


SLOW_STARTED = web.AppKey("slow_started", asyncio.Event)
SLOW_CLOSED = web.AppKey("slow_closed", asyncio.Event)


async def _echo_key(request: web.Request) -> web.StreamResponse:
    """An upstream that echoes the credential it got, like some providers' 401 bodies do."""
    key = request.headers.get("Authorization", "").removeprefix("Bearer ")
    if "slow" in request.query:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        start = {"type": "message_start", "message": {"usage": {"input_tokens": 40, "output_tokens": 1}}}
        await resp.write(sse_bytes("message_start", start))
        request.app[SLOW_STARTED].set()
        try:
            await asyncio.sleep(30)
        finally:
            request.app[SLOW_CLOSED].set()
        return resp
    return web.json_response({"error": {"message": f"Incorrect API key provided: {key}"}}, status=401)


@pytest.fixture
async def upstreams() -> AsyncIterator[dict[str, Any]]:
    echo = web.Application()
    echo[SLOW_STARTED], echo[SLOW_CLOSED] = asyncio.Event(), asyncio.Event()
    echo.router.add_route("*", "/{tail:.*}", _echo_key)
    async with FakeBedrock(credentials=AwsCredentials.parse(IAM_KEY)) as bedrock, FakeOllama() as ollama, \
            FakeAzure() as azure, FakeUpstream() as openai, TestServer(echo, host="127.0.0.1") as echo_server, \
            HostileUpstream() as hostile, Trap() as trap:
        yield {"bedrock": bedrock, "ollama": ollama, "azure": azure, "openai": openai, "echo": echo_server,
               "echo_app": echo, "hostile": hostile, "trap": trap}


@pytest.fixture
async def gw(upstreams: dict[str, Any]) -> AsyncIterator[Gw]:
    keyring = KeyRing(Secret("test-master-secret-0123456789"))

    def prov(name: str, kind: str, base_url: str, key: str | None, **options: str) -> Provider:
        return Provider(id=name, workspace_id="ws", name=name, type=kind, base_url=base_url,  # type: ignore[arg-type]
                        api_key_enc=keyring.encrypt(key) if key else None, options=options)

    entities: dict[str, ConfigEntity] = {p.id: p for p in (
        prov("bedrock", "bedrock", upstreams["bedrock"].base_url, IAM_KEY),
        prov("ollama", "ollama", upstreams["ollama"].base_url, None),
        prov("azure", "azure", upstreams["azure"].base_url, "azure-key-0123456789"),
        prov("oai", "openai", upstreams["openai"].base_url, "sk-upstream-0123456789"),
        prov("echo", "openai", str(upstreams["echo"].make_url("/v1")), "sk-echo-secret-0123456789"),
        prov("claude", "anthropic", str(upstreams["echo"].make_url("/")), "sk-ant-secret-0123456789"),
        prov("closed", "openai", upstreams["openai"].base_url, "sk-x-0123456789", passthrough="off"),
        prov("mock", "mock", "", None),
        prov("hostile", "openai", upstreams["hostile"].base_url + "/v1", HOSTILE_KEY),
        prov("hostile-all", "openai", upstreams["hostile"].base_url + "/v1", HOSTILE_KEY,
             passthrough_allow="files,organization", forward_account_headers="true"),
    )}
    entities["k1"] = VirtualKey(id="k1", workspace_id="ws", key_hash=keyring.hash_key(CLIENT_KEY))
    store = SnapshotStore()
    store.swap(Snapshot.build(entities, 1))
    store.ready.set()
    recorder = Recorder()
    settings = Settings(max_body_bytes=64 * 1024, ssrf_allow="127.0.0.1")
    async with make_session(settings) as session:  # the worker's own guarded session
        app = web.Application(middlewares=[error_middleware])
        app[WORKER] = WorkerState(settings=settings, keyring=keyring, store=store,
                                  events=recorder, session=session)

        async def v1(request: web.Request) -> web.Response:
            return web.json_response({"route": "v1"})

        app.router.add_post("/v1/chat/completions", v1)
        app.router.add_route("*", pt.ROUTE, pt.passthrough)
        # As `web.run_app` serves the data plane: handlers are NOT cancelled when a client leaves.
        runner = web.AppRunner(app, handler_cancellation=False, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        try:
            yield Gw(f"http://127.0.0.1:{runner.addresses[0][1]}", session, recorder)
        finally:
            await runner.cleanup()


AUTH = {"Authorization": f"Bearer {CLIENT_KEY}"}
CONVERSE = {"messages": [{"role": "user", "content": [{"text": "hi"}]}]}
MODEL_ARN = "arn:aws:bedrock:us-east-1:123:inference-profile/us.anthropic.claude-x"


async def test_bedrock_sigv4_converse_and_stream(gw: Gw, upstreams: dict[str, Any]) -> None:
    path = f"/bedrock/model/{MODEL_ARN.replace(':', '%3A').replace('/', '%2F')}/converse"
    async with gw.session.post(URL(gw.url + path, encoded=True), json=CONVERSE, headers=AUTH) as resp:
        assert resp.status == 200, await resp.text()
        body = await resp.json()
        assert resp.headers["Alephant-Provider"] == "bedrock" and "Alephant-Cost-Usd" in resp.headers
    assert body["usage"]["inputTokens"] == 11
    event = await gw.last_event()
    assert (event.ingress, event.model, event.stream, event.status) == ("passthrough", MODEL_ARN, False, 200)
    assert event.usage == Usage(input_tokens=11, output_tokens=7)
    # The model ARN reaches Bedrock encoded exactly as the client sent it (and as it was signed).
    assert upstreams["bedrock"].requests[-1].raw_path.startswith(
        "/model/arn%3Aaws%3Abedrock%3Aus-east-1%3A123%3Ainference-profile%2F")

    upstreams["bedrock"].script = Script(input_tokens=20, output_tokens=9, cache_write=4)
    async with gw.session.post(URL(gw.url + path + "-stream", encoded=True), json=CONVERSE, headers=AUTH) as resp:
        assert resp.status == 200 and resp.content_type == "application/vnd.amazon.eventstream"
        raw = await resp.read()
    assert raw == b"".join(stream_frames(upstreams["bedrock"].script))  # byte for byte
    event = await gw.last_event()
    assert event.stream and event.usage == Usage(input_tokens=24, output_tokens=9, cache_write_tokens=4)


async def test_bedrock_error_is_relayed_natively(gw: Gw, upstreams: dict[str, Any]) -> None:
    upstreams["bedrock"].fail_next(429, "ThrottlingException", "Too many requests, please wait.")
    async with gw.session.post(gw.url + "/bedrock/model/m1/converse", json=CONVERSE, headers=AUTH) as resp:
        assert resp.status == 429
        assert resp.headers["x-amzn-ErrorType"].startswith("ThrottlingException")
        assert await resp.json() == {"message": "Too many requests, please wait."}
    event = await gw.last_event()
    assert (event.status, event.error_code, event.usage) == (429, "upstream_error", Usage())


async def test_ollama_ndjson_stream(gw: Gw, upstreams: dict[str, Any]) -> None:
    body = {"model": "llama3.2", "messages": [{"role": "user", "content": "hello there friend"}]}
    async with gw.session.post(gw.url + "/ollama/api/chat", json=body, headers={"x-api-key": CLIENT_KEY}) as resp:
        assert resp.status == 200 and resp.content_type == "application/x-ndjson"
        lines = (await resp.read()).splitlines()
    final = msgspec.json.decode(lines[-1])
    assert final["done"] is True
    event = await gw.last_event()
    assert event.stream and event.model == "llama3.2"
    assert event.usage == Usage(input_tokens=final["prompt_eval_count"], output_tokens=final["eval_count"])
    assert "authorization" not in upstreams["ollama"].requests[-1].headers  # no key configured: none sent


async def test_azure_deployment_path_uses_api_key(gw: Gw, upstreams: dict[str, Any]) -> None:
    body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}
    url = gw.url + "/azure/openai/deployments/gpt4o-prod/chat/completions?api-version=2024-10-21"
    async with gw.session.post(url, json=body, headers={"api-key": CLIENT_KEY}) as resp:
        assert resp.status == 200, await resp.text()
        usage = (await resp.json())["usage"]
    seen = upstreams["azure"].requests[-1]
    assert seen.api_key_hint == "6789"
    assert seen.path == "/openai/deployments/gpt4o-prod/chat/completions?api-version=2024-10-21"
    event = await gw.last_event()
    assert event.model == "gpt-4o" and event.usage.input_tokens == usage["prompt_tokens"]


async def test_upstream_key_echo_is_masked(gw: Gw) -> None:
    async with gw.session.post(gw.url + "/echo/v1/chat/completions", json={"model": "m"}, headers=AUTH) as resp:
        assert resp.status == 401
        text = await resp.text()
    assert "sk-echo-secret" not in text and "Incorrect API key provided: ***" in text


async def test_errors_reserved_names_limits_and_shapes(gw: Gw) -> None:
    async with gw.session.post(gw.url + "/nope/v1/chat/completions", json={}, headers=AUTH) as resp:
        assert resp.status == 404 and (await resp.json())["error"]["code"] == "provider_not_found"
    async with gw.session.post(gw.url + "/oai/v1/chat/completions", json={}) as resp:
        assert resp.status == 401 and (await resp.json())["error"]["code"] == "invalid_api_key"
    async with gw.session.get(gw.url + "/v1/chat/completions", headers=AUTH) as resp:
        assert resp.status == 405  # the /v1 route's own answer, not a provider named "v1"
    async with gw.session.post(gw.url + "/v1/chat/completions", headers=AUTH) as resp:
        assert await resp.json() == {"route": "v1"}
    async with gw.session.get(gw.url + "/router/r1/x", headers=AUTH) as resp:
        assert resp.status == 404
    async with gw.session.post(gw.url + "/mock/v1/chat/completions", json={}, headers=AUTH) as resp:
        assert resp.status == 400 and (await resp.json())["error"]["code"] == "passthrough_unsupported"
    async with gw.session.post(gw.url + "/closed/v1/chat/completions", json={}, headers=AUTH) as resp:
        assert resp.status == 403 and (await resp.json())["error"]["code"] == "passthrough_disabled"
    async with gw.session.post(URL(gw.url + "/oai/v1/%2e%2e/admin", encoded=True), json={}, headers=AUTH) as resp:
        assert resp.status == 400 and (await resp.json())["error"]["code"] == "invalid_path"
    big = b"x" * (64 * 1024 + 1)
    async with gw.session.post(gw.url + "/oai/v1/chat/completions", data=big, headers=AUTH) as resp:
        assert resp.status == 413

    async def chunked() -> AsyncIterator[bytes]:
        for _ in range(65):
            yield b"y" * 1024

    async with gw.session.post(gw.url + "/oai/v1/chat/completions", data=chunked(), headers=AUTH) as resp:
        assert resp.status == 413  # no declared length: counted while reading
    async with gw.session.post(gw.url + "/claude/v1/messages", data=big, headers=AUTH) as resp:
        assert resp.status == 413
        assert (await resp.json())["type"] == "error"  # Anthropic's shape for an Anthropic-type provider


async def test_openai_stream_relayed_byte_for_byte(gw: Gw, upstreams: dict[str, Any]) -> None:
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "stream": True,
            "stream_options": {"include_usage": True}}
    headers = {**AUTH, "x-fake-chunk-delay-ms": "1", "Alephant-Run-Id": "run-x"}
    async with gw.session.post(gw.url + "/oai/v1/chat/completions", json=body, headers=headers) as resp:
        assert resp.status == 200 and resp.content_type == "text/event-stream"
        assert "Alephant-Cost-Usd" not in resp.headers and resp.headers["x-request-id"].startswith("req_")
        raw = await resp.read()
    assert raw.endswith(b"data: [DONE]\n\n")
    seen = upstreams["openai"].requests[-1]
    assert seen.api_key_hint == "6789" and "alephant-run-id" not in seen.headers
    assert seen.headers["accept-encoding"] == "identity"
    event = await gw.last_event()
    assert event.stream and event.run_id == "run-x" and event.usage.output_tokens == 8 and event.ttfb_ms is not None


async def test_upstream_cut_mid_stream_cuts_the_client(gw: Gw) -> None:
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    headers = {**AUTH, "x-fake-truncate-after": "2", "x-fake-chunk-delay-ms": "1"}
    with pytest.raises(aiohttp.ClientPayloadError):
        async with gw.session.post(gw.url + "/oai/v1/chat/completions", json=body, headers=headers) as resp:
            await resp.read()
    event = await gw.last_event()
    assert event.partial and event.error_code == "upstream_interrupted"


async def test_client_disconnect_stops_upstream_and_records_partial_usage(gw: Gw, upstreams: dict[str, Any]) -> None:
    app = upstreams["echo_app"]
    resp = await gw.session.post(gw.url + "/claude/v1/messages?slow=1", json={"model": "claude-x"}, headers=AUTH)
    assert resp.status == 200
    await resp.content.readuntil(b"\n\n")
    await app[SLOW_STARTED].wait()
    resp.close()  # the client goes away mid-stream
    await asyncio.wait_for(app[SLOW_CLOSED].wait(), 5)  # the gateway dropped the upstream connection
    event = await gw.last_event()
    assert (event.status, event.error_code, event.partial) == (499, "client_disconnected", True)
    assert event.usage == Usage(input_tokens=40, output_tokens=1) and event.model == "claude-x"


# -- outbound hardening: allowlist, account headers, redirects, key echoes --------------------------


@pytest.mark.parametrize(("kind", "method", "path", "options", "allowed"), [
    ("openai", "POST", "v1/chat/completions", {}, True),
    ("openai", "POST", "chat/completions", {}, True),
    ("openai", "POST", "v1/responses", {}, True),
    ("openai", "POST", "v1/embeddings", {}, True),
    ("openai", "GET", "v1/models", {}, True),
    ("openai", "GET", "v1/models/gpt-4o", {}, True),
    ("openai", "DELETE", "v1/models/ft:gpt-4o:acme", {}, False),
    ("openai", "DELETE", "v1/files/file-1", {}, False),
    ("openai", "GET", "v1/files", {}, False),
    ("openai", "GET", "v1/organization/users", {}, False),
    ("openai", "POST", "v1/fine_tuning/jobs", {}, False),
    ("openai", "POST", "v1/batches", {}, False),
    ("openai", "POST", "v1/vector_stores", {}, False),
    ("openai", "GET", "v1/chat/completions", {}, False),
    ("openai", "POST", "v1/audio/speech", {}, False),
    ("openai", "TRACE", "v1/chat/completions", {}, False),
    ("openai", "PROPFIND", "v1/models", {"passthrough_allow": "all"}, False),
    ("openai", "DELETE", "v1/files/file-1", {"passthrough_allow": "files"}, True),
    ("openai", "GET", "v1/organization/users", {"passthrough_allow": "files, organization"}, True),
    ("openai", "POST", "v1/audio/transcriptions", {"passthrough_allow": "audio"}, True),
    ("openai", "DELETE", "v1/anything/at/all", {"passthrough_allow": "all"}, True),
    ("openai", "POST", "v1/organization/x/chat/completions", {}, False),
    ("groq", "POST", "openai/v1/chat/completions", {}, True),
    ("azure", "POST", "openai/deployments/gpt4o/chat/completions", {}, True),
    ("azure", "POST", "openai/v1/chat/completions", {}, True),
    ("azure", "GET", "openai/files", {}, False),
    ("anthropic", "POST", "v1/messages", {}, True),
    ("anthropic", "POST", "v1/messages/count_tokens", {}, True),
    ("anthropic", "GET", "v1/models", {}, True),
    ("anthropic", "POST", "v1/messages/batches", {}, False),
    ("anthropic", "POST", "v1/messages/batches", {"passthrough_allow": "batches"}, True),
    ("anthropic", "GET", "v1/organizations/users", {}, False),
    ("gemini", "POST", "v1beta/models/gemini-2.5-flash:generateContent", {}, True),
    ("gemini", "POST", "v1beta/models/gemini-2.5-flash%3AstreamGenerateContent", {}, True),
    ("gemini", "POST", "v1beta/models/text-embedding-004:embedContent", {}, True),
    ("gemini", "GET", "v1beta/models", {}, True),
    ("gemini", "POST", "upload/v1beta/files", {}, False),
    ("gemini", "POST", "v1beta/cachedContents", {}, False),
    ("gemini", "POST", "v1beta/models/gemini-2.5-flash:batchGenerateContent", {}, False),
    ("bedrock", "POST", "model/arn%3Aaws%3Abedrock%3Aus-east-1%3A1%3Ainference-profile%2Fus.x/converse", {}, True),
    ("bedrock", "POST", "model/m1/invoke-with-response-stream", {}, True),
    ("bedrock", "POST", "async-invoke", {}, False),
    ("ollama", "POST", "api/chat", {}, True),
    ("ollama", "GET", "api/tags", {}, True),
    ("ollama", "POST", "v1/chat/completions", {}, True),
    ("ollama", "DELETE", "api/delete", {}, False),
    ("ollama", "POST", "api/pull", {"passthrough_allow": "model_management"}, True),
])
def test_passthrough_allowlist(kind: str, method: str, path: str, options: dict[str, str], allowed: bool) -> None:
    why = rules.refusal(kind, options, method, path)
    assert (why is None) is allowed, why
    if why is not None:
        assert method in why


def test_account_headers_are_dropped_unless_the_provider_allows_them() -> None:
    client = [("OpenAI-Organization", "org-other"), ("OpenAI-Project", "proj_x"), ("x-goog-user-project", "p"),
              ("OpenAI-Beta", "assistants=v2")]
    assert pt.upstream_headers(client, provider("openai"), "sk-k", method="POST", url="u", body=b"", now=NOW) == {
        "openai-beta": "assistants=v2", "accept-encoding": "identity", "authorization": "Bearer sk-k"}
    allowing = provider("openai", forward_account_headers="true")
    out = pt.upstream_headers(client, allowing, "sk-k", method="POST", url="u", body=b"", now=NOW)
    assert out["openai-organization"] == "org-other" and out["openai-project"] == "proj_x"


def test_relayed_headers_mask_the_key_and_drop_location() -> None:
    secrets = (b"sk-secret-0123456789",)
    out = pt.relay_headers({"X-Echo": "key sk-secret-0123456789", "Location": "http://169.254.169.254/",
                            "x-sk-secret-0123456789": "1", "Content-Type": "text/plain"}, secrets)
    assert dict(out) == {"X-Echo": "key ***", "Content-Type": "text/plain"}


@pytest.mark.parametrize(("method", "path", "headers"), [
    ("DELETE", "/hostile/v1/files/file-1", {}),
    ("GET", "/hostile/v1/organization/users", {}),
    ("TRACE", "/hostile/v1/chat/completions", {}),
    ("PROPFIND", "/hostile/v1/models", {}),
    ("POST", "/hostile/v1/fine_tuning/jobs", {}),
])
async def test_refused_passthrough_forwards_nothing(gw: Gw, upstreams: dict[str, Any], method: str, path: str,
                                                    headers: dict[str, str]) -> None:
    hostile: HostileUpstream = upstreams["hostile"]
    async with gw.session.request(method, gw.url + path, data=b"{}", headers={**AUTH, **headers}) as resp:
        body = await resp.json()
    assert resp.status == 403 and body["error"]["code"] == "passthrough_not_allowed"
    assert method in body["error"]["message"]
    assert hostile.requests == []
    event = await gw.last_event()
    assert (event.status, event.error_code, event.provider) == (403, "passthrough_not_allowed", "hostile")


async def test_opted_in_groups_and_account_headers_are_forwarded(gw: Gw, upstreams: dict[str, Any]) -> None:
    hostile: HostileUpstream = upstreams["hostile"]
    headers = {**AUTH, "OpenAI-Organization": "org-x"}
    async with gw.session.delete(gw.url + "/hostile-all/v1/files/file-1", headers=headers) as resp:
        assert resp.status == 200
    async with gw.session.post(gw.url + "/hostile/v1/chat/completions", json={"model": "m"}, headers=headers) as resp:
        assert resp.status == 200
    assert [(r.method, r.path) for r in hostile.requests] == [("DELETE", "/v1/files/file-1"),
                                                              ("POST", "/v1/chat/completions")]
    assert hostile.requests[0].headers["openai-organization"] == "org-x"
    assert "openai-organization" not in hostile.requests[1].headers


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
async def test_passthrough_redirect_is_neither_followed_nor_relayed(gw: Gw, upstreams: dict[str, Any],
                                                                    status: int) -> None:
    hostile, trap = upstreams["hostile"], upstreams["trap"]
    hostile.script, hostile.redirect_status, hostile.redirect_to = Act.REDIRECT, status, trap.base_url + "/x"
    async with gw.session.post(gw.url + "/hostile/v1/chat/completions", json={"model": "m"}, headers=AUTH,
                               allow_redirects=False) as resp:
        body = await resp.json()
    assert resp.status == 502 and body["error"]["code"] == "upstream_redirect"
    assert "Location" not in resp.headers and trap.base_url not in str(body)
    assert len(hostile.requests) == 1 and trap.requests == []
    event = await gw.last_event()
    assert (event.status, event.error_code) == (502, "upstream_redirect")


@pytest.mark.parametrize(("act", "streamed"), [(Act.ECHO_HEADER, False), (Act.ECHO_OCTET, False),
                                               (Act.ECHO_OCTET, True), (Act.ECHO_SSE_SPLIT, True)])
async def test_passthrough_never_returns_the_key(gw: Gw, upstreams: dict[str, Any], act: Act, streamed: bool) -> None:
    hostile: HostileUpstream = upstreams["hostile"]
    hostile.script, hostile.octet_streamed = act, streamed
    async with gw.session.post(gw.url + "/hostile/v1/chat/completions", json={"model": "m", "stream": streamed},
                               headers=AUTH) as resp:
        raw = await resp.read()
        head = "\n".join(f"{k}: {v}" for k, v in resp.headers.items())
    assert resp.status == 200
    assert hostile.keys_seen == [HOSTILE_KEY]  # it did get the key, and echoed it
    assert HOSTILE_KEY.encode() not in raw and HOSTILE_KEY not in head
    assert b"***" in raw or "***" in head
