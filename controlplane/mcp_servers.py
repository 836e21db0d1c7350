"""Admin commands of MCP servers (see commands.py for how a command is validated and committed).

An MCP server (`schemas.entities.McpServer`) is an upstream Streamable HTTP MCP server that a
workspace's virtual keys reach through the data plane at `/mcp/{name}` and, its tools prefixed
`<name>.`, at the aggregate `/mcp`. Its `headers` (e.g. `Authorization`) are stored only
Fernet-encrypted (like provider keys) and sent on every upstream request; answers and events show
the header names only (`"headers": ["Authorization"]`), never a value or its ciphertext. A PATCH
without `headers` keeps the stored ones; `"headers": null` (or `{}`) removes them; a PATCH that
moves `url` to another origin (scheme, host, port) must give `headers` anew, so stored secrets
never follow the URL somewhere else. `tools` sets each tool's price per call (`price_usd`, a
decimal string, stored as integer nano-USD) and switch (`allowed`); a tool not named costs 0 and
is allowed. A given `tools` replaces the stored map whole. `payments` says what a paid tool's x402
PaymentRequired gets: "pass" (default, relayed to the client) or "pay" (paid from the wallet open
to the caller's agent, under its policy and budgets).

Every refusal is a 400 (409 for a taken name, 404 for a missing workspace) whose `param` names the
field, and nothing is written:

* `name` not `[a-z0-9][a-z0-9_-]{0,63}` (`invalid_name`), or another live MCP server of the
  workspace has it (409 `name_taken`);
* `url` not an http(s) URL with a host (`invalid_url`), or reaching an internal address (the
  provider base URL's SSRF rules, `ssrf.py`, with the allow list ALEPHANT_SSRF_ALLOW:
  `base_url_not_allowed`, `base_url_unresolvable`, `invalid_base_url`; param `url`);
* more than 16 `headers` (`too_many_headers`); a header name that is not an HTTP token of at most
  128 characters (`invalid_header_name`, param `headers`), given twice in different case
  (`duplicate_header`), or one the gateway sets itself (`reserved_header`: Host, Content-Length,
  Content-Type, Accept, Mcp-Session-Id, ...); a value empty, longer than 4096 characters or not
  printable ASCII (`invalid_header_value`, param `headers.<name>`; CR, LF and other control
  characters: `invalid_characters`); the message never quotes a value;
* more than 256 `tools` (`too_many_tools`); a tool name empty, longer than 128 characters or with
  whitespace (`invalid_tool_name`, param `tools`); a `price_usd` that is not a non-negative
  decimal string of at most 9 decimals and at most 1000000 (`invalid_amount`, param
  `tools.<name>.price_usd`);
* `timeout_s` outside 1..300 (`invalid_timeout`); `payments` not "pass" or "pay";
* a PATCH moving `url` to another origin without `headers` while headers are stored
  (`headers_required`).
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import msgspec

from controlplane.commands import ConfigCommands, KindSpec, Prior, _builtins, unique_name
from controlplane.governance import usd_to_nanos
from controlplane.inputs import PRINTABLE_ASCII, BaseUrl, Command, Ident
from controlplane.paid_admin import check_http_url, check_url_resolving
from schemas.entities import McpServer, McpTool
from schemas.errors import InvalidRequest
from schemas.ids import new_id
from schemas.money import nanos_to_decimal_str

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
# RFC 9110 `token`: the characters a header field name may hold.
HEADER_NAME_RE = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]{1,128}$")
MAX_HEADERS = 16
MAX_HEADER_VALUE = 4096
MAX_TOOLS = 256
MAX_TOOL_NAME = 128
MIN_TIMEOUT_S, MAX_TIMEOUT_S = 1.0, 300.0
# Set by the gateway's MCP client itself (framing, the protocol's session and version, hop by hop):
# an operator's value would break the transport or smuggle a second request.
RESERVED_HEADERS = frozenset({
    "host", "content-length", "content-type", "transfer-encoding", "connection", "keep-alive", "upgrade", "te",
    "trailer", "proxy-connection", "accept", "mcp-session-id", "mcp-protocol-version", "last-event-id",
})

# The length caps only bound what is decoded; the rules (with messages naming the field) are in `check`.
ServerName = Annotated[str, msgspec.Meta(max_length=128)]
HeaderName = Annotated[str, msgspec.Meta(max_length=256)]
HeaderValue = Annotated[str, msgspec.Meta(max_length=4 * MAX_HEADER_VALUE)]
Headers = Annotated[dict[HeaderName, HeaderValue], msgspec.Meta(max_length=4 * MAX_HEADERS)]
ToolName = Annotated[str, msgspec.Meta(max_length=1024)]
UsdText = Annotated[str, msgspec.Meta(max_length=40)]


FieldName = Annotated[str, msgspec.Meta(max_length=64)]


class ToolIn(Command):
    """A tool's price per call (`price_usd`, a decimal string such as "0.01"; default 0) and
    switch (`allowed`: false hides it from tools/list and refuses tools/call for every key).
    Per-unit pricing: `unit_price_usd` per unit, the units read from the result's
    `structuredContent[unit_field]`, at most `max_units` (what the budget hold reserves); all
    three together. Limits of the tool across the workspace's keys: `calls_per_minute` and
    `max_concurrent`."""

    price_usd: UsdText | None = None
    allowed: bool = True
    unit_price_usd: UsdText | None = None
    unit_field: FieldName | None = None
    max_units: Annotated[int, msgspec.Meta(ge=1, le=1_000_000_000)] | None = None
    calls_per_minute: Annotated[int, msgspec.Meta(ge=1, le=1_000_000)] | None = None
    max_concurrent: Annotated[int, msgspec.Meta(ge=1, le=100_000)] | None = None


Tools = Annotated[dict[ToolName, ToolIn], msgspec.Meta(max_length=4 * MAX_TOOLS)]


class CreateMcpServer(Command):
    """An upstream MCP server (Streamable HTTP) of `workspace_id`, reached by its keys at
    `/mcp/{name}` and through the aggregate `/mcp` (tools named `<name>.<tool>`). `name`:
    `[a-z0-9][a-z0-9_-]{0,63}`, unique in the workspace. `url`: the server's MCP endpoint, http(s),
    never an internal address (unless allow-listed, ALEPHANT_SSRF_ALLOW). `headers`: sent on every
    upstream request (at most 16, e.g. `{"Authorization": "Bearer ..."}`), stored encrypted and
    never shown (answers list the names). `tools`: per tool, `price_usd` per call (default "0") and
    `allowed` (default true); tools not named cost nothing and are allowed. `timeout_s`: per
    upstream request, 1..300 (default 30). `payments`: "pass" (default) relays a paid tool's x402
    PaymentRequired to the client; "pay" pays it from the wallet open to the caller's agent."""

    workspace_id: Ident
    name: ServerName
    url: BaseUrl
    headers: Headers | None = None
    tools: Tools = msgspec.field(default_factory=dict)
    timeout_s: float = 30.0
    payments: Literal["pass", "pay"] = "pass"

    def check(self) -> None:
        check_name(self.name)
        check_http_url(self.url, "url")
        if self.headers is not None:
            check_headers(self.headers)
        check_tools(self.tools)
        check_timeout(self.timeout_s)


class PatchMcpServer(Command):
    """Any field but `workspace_id`. `headers` replaces the stored headers whole (null or {}:
    none); omitted, they are kept, unless `url` moves to another origin (then give them anew).
    `tools` replaces the stored map whole."""

    name: ServerName | msgspec.UnsetType = msgspec.UNSET
    url: BaseUrl | msgspec.UnsetType = msgspec.UNSET
    headers: Headers | msgspec.UnsetType | None = msgspec.UNSET
    tools: Tools | msgspec.UnsetType = msgspec.UNSET
    timeout_s: float | msgspec.UnsetType = msgspec.UNSET
    payments: Literal["pass", "pay"] | msgspec.UnsetType = msgspec.UNSET


# ---- pure checks (each raises InvalidRequest naming the field) ------------------------------------

def check_name(name: str) -> None:
    if not NAME_RE.match(name):
        raise InvalidRequest(f"'name' must be 1 to 64 lower-case letters, digits, '-' or '_', starting with a letter "
                             f"or digit (it is the path segment of /mcp/{{name}} and the prefix of its tools' names); "
                             f"got {name[:80]!r}.", param="name", code="invalid_name")


def check_headers(headers: dict[str, str]) -> None:
    if len(headers) > MAX_HEADERS:
        raise InvalidRequest(f"'headers' may hold at most {MAX_HEADERS} headers; got {len(headers)}.",
                             param="headers", code="too_many_headers")
    seen: dict[str, str] = {}
    for name, value in headers.items():
        if not HEADER_NAME_RE.match(name):
            raise InvalidRequest(f"A header name must be an HTTP token of 1 to 128 characters (letters, digits and "
                                 f"!#$%&'*+.^_`|~-), e.g. 'Authorization'; got {name[:80]!r}.", param="headers",
                                 code="invalid_header_name")
        folded = name.lower()
        if folded in RESERVED_HEADERS:
            raise InvalidRequest(f"Header '{name}' is set by the gateway itself; it cannot be configured. Reserved: "
                                 + ", ".join(sorted(RESERVED_HEADERS)) + ".", param="headers", code="reserved_header")
        if folded in seen:
            raise InvalidRequest(f"Header '{name}' is given twice ('{seen[folded]}' and '{name}'; header names are "
                                 "case-insensitive).", param="headers", code="duplicate_header")
        seen[folded] = name
        # Never quote the value, not even a prefix: it is a credential.
        if not value or len(value) > MAX_HEADER_VALUE or not PRINTABLE_ASCII.match(value):
            raise InvalidRequest(f"The value of header '{name}' must be 1 to {MAX_HEADER_VALUE} printable ASCII "
                                 f"characters (the value given has {len(value)}).", param=f"headers.{name}",
                                 code="invalid_header_value")


def check_tools(tools: dict[str, ToolIn]) -> None:
    if len(tools) > MAX_TOOLS:
        raise InvalidRequest(f"'tools' may configure at most {MAX_TOOLS} tools; got {len(tools)}.", param="tools",
                             code="too_many_tools")
    for name, tool in tools.items():
        if not name or len(name) > MAX_TOOL_NAME or any(c.isspace() for c in name):
            raise InvalidRequest(f"A tool name must be 1 to {MAX_TOOL_NAME} characters without whitespace; got "
                                 f"{name[:80]!r}.", param="tools", code="invalid_tool_name")
        if tool.price_usd is not None:
            tool_price_nanos(tool.price_usd, name)
        unit = (tool.unit_price_usd, tool.unit_field, tool.max_units)
        if any(v is not None for v in unit):
            if any(v is None for v in unit):
                raise InvalidRequest(f"Per-unit pricing of tool '{name}' needs all of 'unit_price_usd', 'unit_field' "
                                     "and 'max_units'.", param=f"tools.{name}", code="incomplete_unit_price")
            usd_to_nanos(str(tool.unit_price_usd), f"tools.{name}.unit_price_usd", allow_zero=True)
            if not str(tool.unit_field).isidentifier():
                raise InvalidRequest(f"'unit_field' of tool '{name}' must be a field name (letters, digits, _).",
                                     param=f"tools.{name}.unit_field", code="invalid_unit_field")


def tool_price_nanos(price_usd: str, tool: str) -> int:
    """`price_usd` ("0.01") -> integer nano-USD; 400 `invalid_amount` naming `tools.<tool>.price_usd`."""
    return usd_to_nanos(price_usd, f"tools.{tool}.price_usd", allow_zero=True)


def check_timeout(timeout_s: float) -> None:
    if not MIN_TIMEOUT_S <= timeout_s <= MAX_TIMEOUT_S:
        raise InvalidRequest(f"'timeout_s' must be between {MIN_TIMEOUT_S:g} and {MAX_TIMEOUT_S:g} seconds; got "
                             f"{timeout_s:g}.", param="timeout_s", code="invalid_timeout")


def same_origin(a: str, b: str) -> bool:
    """Whether two http(s) URLs have the same scheme, host and port (the default port spelled or not)."""
    pa, pb = urlsplit(a), urlsplit(b)
    default = {"http": 80, "https": 443}
    return ((pa.scheme.lower(), (pa.hostname or "").rstrip("."), pa.port or default.get(pa.scheme.lower()))
            == (pb.scheme.lower(), (pb.hostname or "").rstrip("."), pb.port or default.get(pb.scheme.lower())))


# ---- IO checks and the kind ---------------------------------------------------------------------

async def _build(cc: ConfigCommands, cmd: CreateMcpServer, ent_id: str, prior: Prior | None) -> McpServer:
    await check_url_resolving(cc, cmd.url, "url")
    if prior is not None and "headers" not in prior.given:
        headers_enc: dict[str, str] = dict(prior.entity.headers_enc)
        if headers_enc and not same_origin(cmd.url, prior.entity.url):
            raise InvalidRequest("'url' moves to another origin: give 'headers' anew (or null for none), so the "
                                 "stored credentials are not sent to a server they were not meant for.",
                                 param="headers", code="headers_required")
    else:
        headers_enc = {name: cc.keyring.encrypt(value) for name, value in (cmd.headers or {}).items()}
    tools = {name: _tool(name, t) for name, t in cmd.tools.items()}
    return McpServer(id=ent_id, workspace_id=cmd.workspace_id, name=cmd.name, url=cmd.url, headers_enc=headers_enc,
                     tools=tools, timeout_s=float(cmd.timeout_s), payments=cmd.payments)


def _tool(name: str, t: ToolIn) -> McpTool:
    return McpTool(
        price_nanos=0 if t.price_usd is None else tool_price_nanos(t.price_usd, name), allowed=t.allowed,
        unit_price_nanos=0 if t.unit_price_usd is None else usd_to_nanos(
            t.unit_price_usd, f"tools.{name}.unit_price_usd", allow_zero=True),
        unit_field=t.unit_field or "", max_units=t.max_units or 0, calls_per_minute=t.calls_per_minute,
        max_concurrent=t.max_concurrent)


def tool_view(t: McpTool) -> dict[str, Any]:
    """A tool's config as the API shows it (and a PATCH merges over)."""
    out: dict[str, Any] = {"price_usd": nanos_to_decimal_str(t.price_nanos), "allowed": t.allowed}
    if t.unit_field:
        out |= {"unit_price_usd": nanos_to_decimal_str(t.unit_price_nanos), "unit_field": t.unit_field,
                "max_units": t.max_units}
    if t.calls_per_minute is not None:
        out["calls_per_minute"] = t.calls_per_minute
    if t.max_concurrent is not None:
        out["max_concurrent"] = t.max_concurrent
    return out


def _fields(server: McpServer) -> dict[str, Any]:
    # What a PATCH merges over: no `headers` (only their ciphertext is stored), so `_build` keeps
    # them unless the PATCH gives some.
    tools = {name: tool_view(t) for name, t in server.tools.items()}
    return _builtins(server, "workspace_id", "name", "url", "timeout_s", "payments") | {"tools": tools}


MCP_SERVER = KindSpec("mcp", "MCP server", CreateMcpServer, PatchMcpServer, lambda c: new_id("mcp"), _fields, _build,
                      guard=unique_name("mcp", "MCP server"))
