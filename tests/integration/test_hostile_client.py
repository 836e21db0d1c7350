"""A hostile or careless client against the real stack (issue 7, "Why" 1, 2 and 10; "What to build"
1 and 8): every input below gets a clean 4xx in the API's error shape (Anthropic's on
/v1/messages*), never echoes a credential, records no event for a value the ledger could not
store, and the ledger keeps journalling afterwards. An upstream reporting absurd usage gives a 200
whose event is clamped and flagged.

Valid HTTP goes through aiohttp's client; malformed HTTP (bare LF, oversized or too many headers,
a broken request line, bytes that are not UTF-8) through a raw socket, since no client library
sends it. The stack is the one `alephant dev` runs, so the parser-error rendering tested here is
the one `alephant dataplane` / `alephant controlplane` serve with.
"""

from __future__ import annotations

import asyncio
import io
import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import psycopg
import pytest
import pytest_asyncio

from tests.conftest import Gateway, eventually, journal_event
from tests.fakes.hostile_upstream import Act, HostileUpstream

TAG = uuid.uuid4().hex[:6]
NUL_MODEL = "mock/echo\u0000x"
HUGE_MODEL = "mock/" + "m" * 1_200_000
MSGS = [{"role": "user", "content": "hi"}]
ADMIN_TOKEN_MARK = "<admin>"  # stands for the admin token in a case's headers
KEY_MARK = "<key>"  # stands for the demo virtual key


def deep(depth: int = 1000) -> bytes:
    """A chat body whose `messages[0].content` nests `depth` arrays deep."""
    return (b'{"model":"mock/echo","messages":[{"role":"user","content":' + b"[" * depth + b"]" * depth + b"}]}")


@dataclass(frozen=True)
class Case:
    id: str
    path: str  # on the gateway's origin, or on the admin API's when `admin`
    status: int
    code: str | None  # OpenAI-shaped `error.code`; None on Anthropic paths (their shape has none)
    body: bytes | None = None
    headers: dict[str, str] = field(default_factory=dict)
    raw: bytes | None = None  # send these bytes as they are (malformed HTTP), instead of a request
    admin: bool = False
    anthropic: bool = False
    param: str | None = None
    recorded: bool | None = False  # an event for this request id? (None: not asserted)


def js(value: Any) -> bytes:
    return json.dumps(value).encode()


def raw_request(path: str, headers: list[tuple[bytes, bytes]], body: bytes = b"{}", eol: bytes = b"\r\n") -> bytes:
    # `Connection: close`: the test reads to EOF, and a well-formed request's error answer otherwise
    # keeps the connection alive until the idle timeout (which raced the read's timeout).
    lines = [b"POST " + path.encode() + b" HTTP/1.1", b"Host: gateway", b"Content-Type: application/json",
             b"Connection: close", *(k + b": " + v for k, v in headers), b"Content-Length: " + str(len(body)).encode()]
    return eol.join(lines) + eol + eol + body


AUTH = (b"Authorization", b"Bearer " + KEY_MARK.encode())
GZIP = {"Content-Encoding": "gzip"}

CASES = [
    # --- a client string the ledger could not store: 400 naming the field, no event ------------
    Case("nul model, chat", "/v1/chat/completions", 400, "invalid_value",
         js({"model": NUL_MODEL, "messages": MSGS}), param="model"),
    Case("nul model, responses", "/v1/responses", 400, "invalid_value", js({"model": NUL_MODEL, "input": "hi"}),
         param="model"),
    Case("nul model, messages", "/v1/messages", 400, None,
         js({"model": NUL_MODEL, "max_tokens": 8, "messages": MSGS}), anthropic=True),
    Case("nul model, count_tokens", "/v1/messages/count_tokens", 400, None,
         js({"model": NUL_MODEL, "messages": MSGS}), anthropic=True),
    Case("nul model, embeddings", "/v1/embeddings", 400, "invalid_value", js({"model": NUL_MODEL, "input": "hi"}),
         param="model"),
    Case("nul model, passthrough", "/fake/v1/chat/completions", 400, "invalid_value",
         js({"model": "gpt-4o-mini\u0000x", "messages": MSGS}), param="model"),
    Case("1.2 MB model", "/v1/chat/completions", 400, "invalid_value", js({"model": HUGE_MODEL, "messages": MSGS}),
         param="model"),
    Case("control character in model", "/v1/chat/completions", 400, "invalid_value",
         js({"model": "mock/echo\u001b[2J", "messages": MSGS}), param="model"),
    Case("long run id", "/v1/chat/completions", 400, "invalid_value", js({"model": "mock/echo", "messages": MSGS}),
         headers={"Alephant-Run-Id": "r" * 201}, param="Alephant-Run-Id"),
    Case("property value over 1 KiB", "/v1/chat/completions", 400, "invalid_value",
         js({"model": "mock/echo", "messages": MSGS}), headers={"Alephant-Property-Team": "t" * 1025},
         param="Alephant-Property-Team"),
    Case("33 properties", "/v1/chat/completions", 400, "invalid_value", js({"model": "mock/echo", "messages": MSGS}),
         headers={f"Alephant-Property-P{i}": "v" for i in range(33)}, param="Alephant-Property-*"),
    Case("invalid utf-8 in an agent id", "/v1/chat/completions", 400, "invalid_value", recorded=None,
         raw=raw_request("/v1/chat/completions", [AUTH, (b"Alephant-Agent-Id", b"agent-\xc3\x28")],
                         js({"model": "mock/echo", "messages": MSGS})), param="Alephant-Agent-Id"),
    Case("invalid utf-8 in a property", "/v1/chat/completions", 400, "invalid_value", recorded=None,
         raw=raw_request("/v1/chat/completions", [AUTH, (b"Alephant-Property-Team", b"\xff\xfe")],
                         js({"model": "mock/echo", "messages": MSGS})), param="Alephant-Property-Team"),
    # --- deep JSON: 400 on every POST route and on the admin API ------------------------------
    Case("deep json, chat", "/v1/chat/completions", 400, "json_too_deep", deep(), recorded=True),
    Case("deep json, responses", "/v1/responses", 400, "json_too_deep", deep(), recorded=True),
    Case("deep json, messages", "/v1/messages", 400, None, deep(), anthropic=True, recorded=True),
    Case("deep json, count_tokens", "/v1/messages/count_tokens", 400, None, deep(), anthropic=True, recorded=True),
    Case("deep json, embeddings", "/v1/embeddings", 400, "json_too_deep", deep(), recorded=True),
    Case("very deep json, passthrough", "/fake/v1/chat/completions", 400, "json_too_deep", deep(100_000),
         recorded=True),
    Case("deep json, admin", "/admin/v1/workspaces", 400, "json_too_deep", deep(), admin=True, recorded=None),
    # --- compressed bodies ---------------------------------------------------------------------
    Case("garbage gzip, chat", "/v1/chat/completions", 400, "invalid_body_encoding", b"this is not gzip",
         headers=GZIP, recorded=True),
    Case("garbage gzip, messages", "/v1/messages", 400, None, b"this is not gzip", headers=GZIP, anthropic=True,
         recorded=True),
    Case("garbage gzip, admin", "/admin/v1/workspaces", 400, "invalid_body_encoding", b"not gzip", headers=GZIP,
         admin=True, recorded=None),
    Case("brotli body", "/v1/chat/completions", 415, "unsupported_content_encoding", b"{}",
         headers={"Content-Encoding": "br"}, recorded=None),
    Case("zstd body", "/v1/chat/completions", 415, "unsupported_content_encoding", b"{}",
         headers={"Content-Encoding": "zstd"}, recorded=None),
    # --- aiohttp's own parser errors: our JSON, nothing echoed ---------------------------------
    Case("header over 8 KB", "/v1/chat/completions", 400, "header_too_large", recorded=None,
         raw=raw_request("/v1/chat/completions", [AUTH, (b"X-Big", b"a" * 9000)])),
    Case("authorization over 8 KB", "/v1/chat/completions", 400, "header_too_large", recorded=None,
         raw=raw_request("/v1/chat/completions", [(b"Authorization", b"Bearer " + KEY_MARK.encode() + b"x" * 9000)])),
    Case("129 headers", "/v1/chat/completions", 400, "malformed_request", recorded=None,
         raw=raw_request("/v1/chat/completions", [AUTH, *((b"X-H%d" % i, b"1") for i in range(129))])),
    Case("bare LF line endings", "/v1/chat/completions", 400, "malformed_request", recorded=None,
         raw=raw_request("/v1/chat/completions", [AUTH], eol=b"\n")),
    Case("malformed request line", "/v1/chat/completions", 400, "malformed_request", recorded=None,
         raw=b"GARBAGE /v1/chat/completions HTTP/1.1 extra\r\nAuthorization: Bearer " + KEY_MARK.encode()
         + b"\r\n\r\n"),
    Case("bare LF, admin", "/admin/v1/workspaces", 400, "malformed_request", admin=True, recorded=None,
         raw=raw_request("/admin/v1/workspaces", [(b"Authorization", b"Bearer " + ADMIN_TOKEN_MARK.encode())],
                         eol=b"\n")),
]


# --- helpers -----------------------------------------------------------------------------------


@dataclass
class Reply:
    status: int
    content_type: str
    raw: bytes  # every header and the body, as bytes

    @property
    def body(self) -> Any:
        return json.loads(self.raw.partition(b"\r\n\r\n")[2])


def fill(text: bytes, gateway: Gateway) -> bytes:
    return (text.replace(KEY_MARK.encode(), gateway.demo_key.encode())
            .replace(ADMIN_TOKEN_MARK.encode(), gateway.stack.demo["ALEPHANT_ADMIN_TOKEN"].encode()))


async def send_raw(url: str, data: bytes) -> Reply:
    parts = urlsplit(url)
    reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
    try:
        writer.write(data)
        await writer.drain()
        response = await asyncio.wait_for(reader.read(), timeout=15)  # `Connection: close`, or a parser error
    finally:
        writer.close()
    head, _, body = response.partition(b"\r\n\r\n")
    status_line, _, headers = head.partition(b"\r\n")
    ctype = next((line.split(b":", 1)[1].strip().decode() for line in headers.split(b"\r\n")
                  if line.lower().startswith(b"content-type:")), "")
    return Reply(int(status_line.split()[1]), ctype.split(";")[0], headers + b"\r\n\r\n" + body)


async def send(http: aiohttp.ClientSession, url: str, body: bytes | None, headers: dict[str, str]) -> Reply:
    data = io.BytesIO(body) if body is not None else None  # aiohttp warns on large raw bytes
    async with http.post(url, data=data, headers=headers) as resp:
        content = await resp.read()
        head = b"\r\n".join(k + b": " + v for k, v in resp.raw_headers)
        return Reply(resp.status, resp.content_type, head + b"\r\n\r\n" + content)


async def ledger_advances(gateway: Gateway, http: aiohttp.ClientSession) -> dict[str, Any]:
    """One ordinary call with a fresh request id, journalled: the books did not stall."""
    request_id = f"req-after-{uuid.uuid4().hex[:12]}"
    async with http.post(f"{gateway.base_url}/chat/completions", json={"model": "mock/echo", "messages": MSGS},
                         headers={"Authorization": f"Bearer {gateway.demo_key}",
                                  "Alephant-Request-Id": request_id}) as resp:
        assert resp.status == 200, await resp.text()
    event: dict[str, Any] = await eventually(lambda: journal_event(gateway.database_url, request_id), timeout=20)
    return event


def assert_error_shape(reply: Reply, case: Case) -> None:
    assert reply.content_type == "application/json", reply.raw[:300]
    body = reply.body
    if case.anthropic:
        assert set(body) == {"type", "error"} and body["type"] == "error"
        assert set(body["error"]) == {"type", "message"}
        assert body["error"]["type"] in ("invalid_request_error", "request_too_large")
    else:
        assert set(body) == {"error"}
        assert set(body["error"]) == {"message", "type", "param", "code"}
        assert body["error"]["type"] == "invalid_request_error"
        assert body["error"]["code"] == case.code
        if case.param is not None:
            assert body["error"]["param"] == case.param
    message = body["error"]["message"]
    assert message and "Traceback" not in message and "\x00" not in message


# --- tests -------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
async def test_hostile_input_is_a_clean_4xx(gateway: Gateway, fake_provider: str, http: aiohttp.ClientSession,
                                            case: Case) -> None:
    origin = gateway.admin.base_url if case.admin else gateway.base_url.removesuffix("/v1")
    request_id = f"req-hostile-{uuid.uuid4().hex[:12]}"
    if case.raw is not None:
        reply = await send_raw(origin, fill(case.raw, gateway))
    else:
        token = gateway.stack.demo["ALEPHANT_ADMIN_TOKEN"] if case.admin else gateway.demo_key
        headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json",
                   "Alephant-Request-Id": request_id, **case.headers}
        reply = await send(http, origin + case.path, case.body, headers)
    assert reply.status == case.status, reply.raw[:500]
    assert_error_shape(reply, case)
    for secret in (gateway.demo_key, gateway.stack.demo["ALEPHANT_ADMIN_TOKEN"], "sk-fake-upstream-canary"):
        assert secret.encode() not in reply.raw
    assert b"Authorization" not in reply.raw and b"GARBAGE" not in reply.raw

    after = await ledger_advances(gateway, http)
    assert after["status"] == 200
    if case.recorded is not None and case.raw is None:
        # The journal is in publish order per worker, and the call after this one is in it.
        if case.recorded:
            event: dict[str, Any] = await eventually(lambda: journal_event(gateway.database_url, request_id),
                                                     timeout=20)
            assert event["status"] == case.status
        else:
            assert await journal_event(gateway.database_url, request_id) is None


async def test_a_nul_model_leaves_nothing_in_the_journal(gateway: Gateway, http: aiohttp.ClientSession) -> None:
    """The reproduction from the issue, repeated: every call is refused and none is journalled,
    while the ordinary calls around them are."""
    ids = [f"req-nul-{uuid.uuid4().hex[:12]}" for _ in range(20)]
    for request_id in ids:
        reply = await send(http, f"{gateway.base_url}/chat/completions", js({"model": NUL_MODEL, "messages": MSGS}),
                           {"Authorization": f"Bearer {gateway.demo_key}", "Content-Type": "application/json",
                            "Alephant-Request-Id": request_id})
        assert reply.status == 400 and reply.body["error"]["param"] == "model"
    await ledger_advances(gateway, http)
    async with await psycopg.AsyncConnection.connect(gateway.database_url) as conn:
        cur = await conn.execute("SELECT count(*) FROM event_journal WHERE body->>'request_id' = ANY(%s)", (ids,))
        row = await cur.fetchone()
    assert row is not None and row[0] == 0


# --- an upstream reporting absurd usage ---------------------------------------------------------


@pytest_asyncio.fixture(scope="module")
async def absurd() -> AsyncIterator[HostileUpstream]:
    async with HostileUpstream(script=Act.ABSURD_USAGE) as fake:
        yield fake


@pytest.fixture(scope="module")
def absurd_provider(gateway: Gateway, absurd: HostileUpstream) -> str:
    name = f"absurd-{TAG}"
    gateway.admin.call("POST", "/admin/v1/providers", {"workspace_id": "demo", "name": name, "type": "openai",
                                                       "base_url": absurd.base_url + "/v1",
                                                       "api_key": "sk-absurd-operator-0123456789"})
    gateway.admin.call("POST", "/admin/v1/prices", {"provider": name, "model": "gpt-4o-mini",
                                                    "input_per_mtok_nanos": 150_000_000,
                                                    "output_per_mtok_nanos": 600_000_000})
    return name


ABSURD_PATHS = [
    ("chat", "/v1/chat/completions", {"stream": False}),
    ("chat stream", "/v1/chat/completions", {"stream": True, "stream_options": {"include_usage": True}}),
    ("passthrough", "/{name}/v1/chat/completions", {"stream": False}),
    ("passthrough stream", "/{name}/v1/chat/completions", {"stream": True, "stream_options": {"include_usage": True}}),
]


@pytest.mark.parametrize(("label", "path", "extra"), ABSURD_PATHS, ids=[p[0] for p in ABSURD_PATHS])
async def test_absurd_upstream_usage_is_clamped_and_flagged(gateway: Gateway, http: aiohttp.ClientSession,
                                                            absurd_provider: str, label: str, path: str,
                                                            extra: dict[str, Any]) -> None:
    request_id = f"req-absurd-{uuid.uuid4().hex[:12]}"
    passthrough = path.startswith("/{name}")
    model = "gpt-4o-mini" if passthrough else f"{absurd_provider}/gpt-4o-mini"
    url = gateway.base_url.removesuffix("/v1") + path.format(name=absurd_provider)
    async with http.post(url, json={"model": model, "messages": MSGS, **extra},
                         headers={"Authorization": f"Bearer {gateway.demo_key}",
                                  "Alephant-Request-Id": request_id}) as resp:
        assert resp.status == 200, await resp.text()
        await resp.read()
    event = await eventually(lambda: journal_event(gateway.database_url, request_id), timeout=20)
    print(f"{label}: upstream said prompt_tokens=10**19; journalled usage={event['usage']} "
          f"cost_nanos={event['cost_nanos']} anomalies={event['anomalies']}")
    assert event["status"] == 200
    assert event["usage"]["input_tokens"] == 10**9
    assert event["usage"]["output_tokens"] == 3
    assert "usage_clamped" in event["anomalies"]
    assert 0 < event["cost_nanos"] < 2**63
    await ledger_advances(gateway, http)
