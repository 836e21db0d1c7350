"""Config entities: what the control plane stores in Postgres and publishes to the KV bucket.

Each entity is one KV key (`<kind>.<id>`), and its value is the JSON of one member of the
`ConfigEntity` tagged union. Readers tolerate unknown fields so old workers read new entries.
Secrets travel only encrypted (`api_key_enc`), never in plaintext.
"""

from __future__ import annotations

from typing import Literal

import msgspec

# Provider types the gateway has an adapter for. The OpenAI-compatible family (groq ... cohere) shares
# the OpenAI adapter with a per-type quirks table; `openai` and `anthropic` also serve any custom base
# URL that speaks those APIs.
ProviderKind = Literal[
    "mock", "openai", "azure", "anthropic", "gemini", "bedrock", "ollama",
    "groq", "mistral", "deepseek", "xai", "together", "fireworks", "openrouter", "perplexity", "cohere",
]

# First path segments the data plane serves itself. A provider is reachable as `/{name}/...`
# (passthrough), so these names are refused by the admin API and never match that route.
RESERVED_PROVIDER_NAMES = frozenset({"v1", "ai", "router", "paid", "egress", "mcp", "admin", "healthz", "readyz",
                                    "metrics"})


# Where a budget, limit or policy attaches. A request's path is workspace -> department -> member
# -> agent -> key (and its workflow label, for budgets): see `dataplane.governance.scope_path`.
Scope = Literal["workspace", "department", "member", "agent", "key", "workflow"]
SCOPES: tuple[Scope, ...] = ("workspace", "department", "member", "agent", "key", "workflow")
# Least to most specific: the most specific policy rule decides (a deny anywhere wins).
SCOPE_SPECIFICITY: dict[str, int] = {s: i for i, s in enumerate(SCOPES)}

BudgetPeriod = Literal["day", "week", "month", "total"]


class Workspace(msgspec.Struct, frozen=True, kw_only=True, tag_field="kind", tag="ws"):
    id: str
    name: str
    # Provider *types* (e.g. "openai") this workspace may call; empty = any.
    providers_allow: tuple[str, ...] = ()
    # The provider (by name) a bare model name (`gpt-4o`, no `provider/`) goes to; None: a bare
    # name resolves by a unique catalog match (`dataplane.decisions.resolve_model`).
    default_provider: str | None = None


class Department(msgspec.Struct, frozen=True, kw_only=True, tag_field="kind", tag="dept"):
    id: str
    workspace_id: str
    name: str


class Member(msgspec.Struct, frozen=True, kw_only=True, tag_field="kind", tag="member"):
    """A person (or team account) in a workspace, optionally in a department."""

    id: str
    workspace_id: str
    name: str
    department_id: str | None = None
    email: str = ""


class Agent(msgspec.Struct, frozen=True, kw_only=True, tag_field="kind", tag="agent"):
    id: str
    workspace_id: str
    name: str
    department_id: str | None = None
    member_id: str | None = None
    # The router this agent's calls go through when they name no `provider/model` (see Router).
    router_id: str | None = None


class Provider(msgspec.Struct, frozen=True, kw_only=True, tag_field="kind", tag="provider"):
    """An upstream a workspace may call as `<name>/<model>`. `api_key_enc` is Fernet ciphertext."""

    id: str
    workspace_id: str
    name: str
    type: ProviderKind
    base_url: str = ""
    api_key_enc: str | None = None
    # Non-secret, type-specific settings, e.g. `api_version` (azure), `region` (bedrock); for the
    # `/{provider}/*` passthrough: `passthrough` (off), `passthrough_allow` (opt-in endpoint groups)
    # and `forward_account_headers` (true), see dataplane/ingress/passthrough_rules.py; `enabled`
    # (true) for the built-in `mock`.
    options: dict[str, str] = msgspec.field(default_factory=dict)

    def option_on(self, name: str) -> bool:
        """Whether the switch option `name` is on: `true`, `1` or `yes`, any case."""
        return self.options.get(name, "").strip().lower() in ("true", "1", "yes")


# The workspace id of operator-level (master) provider keys: they serve every workspace that has
# no key of its own for that provider.
OPERATOR = "_operator"


class ProviderKey(msgspec.Struct, frozen=True, kw_only=True, tag_field="kind", tag="pkey"):
    """One upstream credential, encrypted (`api_key_enc`, Fernet). A workspace's BYO key names
    its provider by `provider_name`; an operator-level key (`workspace_id == OPERATOR`) serves
    every workspace's providers of `provider_type` that have no key of their own. Several keys
    for one provider share its traffic by `weight`."""

    id: str
    workspace_id: str
    provider_type: ProviderKind
    provider_name: str = ""
    api_key_enc: str
    weight: int = 1
    name: str = ""


class VirtualKey(msgspec.Struct, frozen=True, kw_only=True, tag_field="kind", tag="vk"):
    """A client credential, stored only as a keyed hash. KV key: `vk.<key_hash>`."""

    id: str
    workspace_id: str
    key_hash: str
    name: str = ""
    agent_id: str | None = None
    prefix: str = ""
    department_id: str | None = None
    member_id: str | None = None
    # Glob patterns over `provider/model` (empty = any) and provider names (empty = any).
    models_allow: tuple[str, ...] = ()
    providers_allow: tuple[str, ...] = ()
    # Epoch ms after which the key no longer authenticates (rotation overlap, or an expiry).
    expires_at_ms: int | None = None
    # Provider name -> ProviderKey id: this key's own choice of upstream credential (it overrides
    # the workspace's and the operator's keys for that provider).
    provider_keys: dict[str, str] = msgspec.field(default_factory=dict)
    # The router this key's calls go through when they name no `provider/model` (see Router); it
    # wins over its agent's.
    router_id: str | None = None


class Budget(msgspec.Struct, frozen=True, kw_only=True, tag_field="kind", tag="budget"):
    """A spend ceiling in integer nano-USD over a calendar `period` in `timezone` (or `total`).
    `alert_at` are percentages of the limit that emit one `budget.alert` each per period."""

    id: str
    workspace_id: str
    scope: Scope
    scope_id: str
    period: BudgetPeriod
    limit_nanos: int
    timezone: str = "UTC"
    alert_at: tuple[int, ...] = ()


class Limit(msgspec.Struct, frozen=True, kw_only=True, tag_field="kind", tag="limit"):
    """Rate and concurrency limits on one scope; None = no limit of that kind."""

    id: str
    workspace_id: str
    scope: Scope
    scope_id: str
    rpm: int | None = None
    rpd: int | None = None
    tpm: int | None = None
    tpd: int | None = None
    concurrency: int | None = None


class TimeWindow(msgspec.Struct, frozen=True, kw_only=True):
    """Allowed days (0 = Monday .. 6 = Sunday) and hours [start, end) as "HH:MM" in `timezone`.
    `end` <= `start` spans midnight."""

    days: tuple[int, ...] = (0, 1, 2, 3, 4, 5, 6)
    start: str = "00:00"
    end: str = "24:00"
    timezone: str = "UTC"


class Policy(msgspec.Struct, frozen=True, kw_only=True, tag_field="kind", tag="policy"):
    """Rules on one scope. Model and endpoint patterns are globs (`fnmatch`, case-sensitive) over
    `provider/model` and the route path; tools are matched by name. Empty lists constrain nothing."""

    id: str
    workspace_id: str
    scope: Scope
    scope_id: str
    models_allow: tuple[str, ...] = ()
    models_deny: tuple[str, ...] = ()
    tools_allow: tuple[str, ...] = ()
    tools_deny: tuple[str, ...] = ()
    tool_action: Literal["deny", "strip"] = "deny"
    endpoints_allow: tuple[str, ...] = ()
    windows: tuple[TimeWindow, ...] = ()
    max_tokens_cap: int | None = None
    max_tokens_action: Literal["clamp", "reject"] = "clamp"
    max_cost_nanos: int | None = None
    escalate_over_nanos: int | None = None
    # Globs over the names of the prompt templates a request may render (empty = any).
    prompts_allow: tuple[str, ...] = ()


PromptRole = Literal["system", "developer", "user", "assistant"]


class PromptMessage(msgspec.Struct, frozen=True, kw_only=True):
    """One chat message of a prompt template; `content` may hold `{{variable}}` placeholders."""

    role: PromptRole
    content: str


class PromptParams(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """A template's default sampling parameters (None = not set); a request's own win."""

    temperature: float | None = None
    top_p: float | None = None
    max_tokens: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    seed: int | None = None
    stop: tuple[str, ...] | None = None


class PromptTemplate(msgspec.Struct, frozen=True, kw_only=True, tag_field="kind", tag="prompt"):
    """One version of a named prompt template of a workspace (each version its own entity; the
    name is the stable handle, `version` counts from 1). Rendering is in `schemas.prompts`."""

    id: str
    workspace_id: str
    name: str
    version: int
    messages: tuple[PromptMessage, ...]
    model: str | None = None
    params: PromptParams = msgspec.field(default_factory=PromptParams)


class EscalationGrant(msgspec.Struct, frozen=True, kw_only=True, tag_field="kind", tag="escalation"):
    """An approved escalation: the key `key_id` may retry once with `Alephant-Escalation-Id: <id>`
    until `expires_at_ms`. Single use is enforced in Redis (`esc:{ws}:<id>`), not here."""

    id: str
    workspace_id: str
    key_id: str
    rule: str
    expires_at_ms: int


class ModelAlias(msgspec.Struct, frozen=True, kw_only=True, tag_field="kind", tag="alias"):
    """`alias` (what clients send as `model`) resolves to `target` (`provider/model`)."""

    id: str
    workspace_id: str
    alias: str
    target: str


# Where a price override applies: every workspace (platform), one workspace, or the calls made
# with one upstream credential (a ProviderKey: a negotiated contract).
PriceScope = Literal["platform", "workspace", "provider_key"]


class PriceOverride(msgspec.Struct, frozen=True, kw_only=True, tag_field="kind", tag="price"):
    """Operator price for `provider/model` (`model` "*": every model of the provider), in integer
    nano-USD per million tokens. It wins over the bundled genai-prices catalog; the resolution
    order and arithmetic are in `schemas.pricing`.

    `scope` platform applies everywhere; workspace to `workspace_id`'s calls; provider_key to
    calls made with the ProviderKey `provider_key_id` (`workspace_id` is then that key's
    workspace, None for an operator key). Token prices None (both): no prices of its own, only
    `discount_pct` (a decimal string, 0 < pct < 100, taken off the price found below it) and/or
    `per_request_nanos` (added to each successful call's cost).
    """

    id: str
    provider: str
    model: str
    input_per_mtok_nanos: int | None = 0
    output_per_mtok_nanos: int | None = 0
    cache_read_per_mtok_nanos: int | None = None
    cache_write_per_mtok_nanos: int | None = None
    scope: PriceScope = "platform"
    workspace_id: str | None = None
    provider_key_id: str | None = None
    discount_pct: str | None = None
    per_request_nanos: int | None = None

    @property
    def has_token_prices(self) -> bool:
        return self.input_per_mtok_nanos is not None or self.output_per_mtok_nanos is not None


RouterStrategy = Literal["weighted", "latency", "least_busy", "cost", "fallback"]
ROUTER_STRATEGIES: tuple[str, ...] = ("weighted", "latency", "least_busy", "cost", "fallback")
ANY_REQUESTED = "*"  # a router target's model that stands for the model the request named


class RouterTarget(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """One upstream a router may send a call to: `model` is `provider/model` (`provider/*`: the
    model the request named, after `models`), with `provider_key_id` pinning its credential (else
    the usual key resolution). `models` remaps a requested model name to this target's own, e.g.
    `{"gpt-4o": "my-gpt4o-deployment"}` on an Azure target behind an OpenAI one."""

    model: str
    weight: int = 1
    provider_key_id: str | None = None
    models: dict[str, str] = msgspec.field(default_factory=dict)


class RouteMatch(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """When a router rule applies; every condition set must hold (none set: always). Globs over
    the requested model, the agent and workflow ids; exact `properties` (Alephant-Property-*) and
    `headers` values; bounds on the estimated input tokens; whether the request offers tools."""

    model: tuple[str, ...] = ()
    agent: tuple[str, ...] = ()
    workflow: tuple[str, ...] = ()
    properties: dict[str, str] = msgspec.field(default_factory=dict)
    headers: dict[str, str] = msgspec.field(default_factory=dict)
    min_input_tokens: int | None = None
    max_input_tokens: int | None = None
    tools: bool | None = None


class RouterRule(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """A conditional target set: the first rule whose `when` holds picks `targets` (and, if set,
    its own `strategy`); no rule holding: the router's own targets."""

    name: str = ""
    when: RouteMatch = msgspec.field(default_factory=RouteMatch)
    targets: tuple[RouterTarget, ...]
    strategy: RouterStrategy | None = None


class RetryPolicy(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """Retries of one target on a retryable error (5xx, 408, 409, timeouts, connection errors),
    with jittered exponential backoff from `backoff_ms` up to `max_backoff_ms`. Fallback to the
    next target is separate and always on (before the first byte only). The retry budget: retries
    in flight on a worker stay under `budget_percent` of its active requests, or `min_retries`."""

    retries: int = 1
    backoff_ms: int = 50
    max_backoff_ms: int = 1000
    budget_percent: int = 20
    min_retries: int = 3


class Timeouts(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """Seconds (None: the worker's default). `connect_s` to open a connection, `first_byte_s`
    until the upstream's first byte (fallback happens within it), `total_s` for the whole call,
    attempts included (streams too), `idle_s` between two reads of an answer (a stalled stream is
    cut off)."""

    connect_s: float | None = None
    first_byte_s: float | None = None
    total_s: float | None = None
    idle_s: float | None = None


class HealthPolicy(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """Passive outlier ejection and the in-flight breaker, per target and worker.
    `consecutive_failures` retryable failures in a row eject a target for `base_ejection_s` times
    the number of times it was ejected (capped at `max_ejection_s`); at most `max_ejected_percent`
    of a target set is ejected at once (always at least one may be). `max_in_flight` (None: no
    cap) skips a target with that many calls open. `probe_interval_s` (None: off) probes an
    ejected target's provider with a GET of `probe_path` and readmits it on a 2xx."""

    consecutive_failures: int = 5
    base_ejection_s: float = 30.0
    max_ejection_s: float = 300.0
    max_ejected_percent: int = 50
    max_in_flight: int | None = None
    probe_interval_s: float | None = None
    probe_path: str = "/models"


class Router(msgspec.Struct, frozen=True, kw_only=True, tag_field="kind", tag="router"):
    """A policy router of a workspace: addressable as `/router/{id}/v1/...` or `model:
    "router/<name>"`, and as a key's or agent's default. Its decisions are pure over the snapshot
    and the worker's health view (`dataplane.routing`)."""

    id: str
    workspace_id: str
    name: str
    strategy: RouterStrategy = "fallback"
    targets: tuple[RouterTarget, ...]
    rules: tuple[RouterRule, ...] = ()
    retry: RetryPolicy = msgspec.field(default_factory=RetryPolicy)
    timeouts: Timeouts = msgspec.field(default_factory=Timeouts)
    health: HealthPolicy = msgspec.field(default_factory=HealthPolicy)


CacheMode = Literal["exact", "semantic", "off"]
CacheScope = Literal["workspace", "key", "router"]
CACHE_MODES: tuple[str, ...] = ("exact", "semantic", "off")


class CacheSettings(msgspec.Struct, frozen=True, kw_only=True, tag_field="kind", tag="cache"):
    """Whether and how calls are answered from the cache, for a workspace, a virtual key or a router
    (`scope_id`: the workspace, key or router id; the most specific setting on a call's path wins:
    key, then router, then workspace). `mode` exact (Redis, same normalised request) or semantic
    (exact first, then the nearest earlier prompt above `similarity`, in Qdrant) or off. `ttl_s`:
    how long an answer is kept. Semantic: `embedding_model` (`provider/model`, called through the
    gateway's own adapters, its cost booked), and whether requests with tools or a non-zero
    temperature are excluded. `namespace` partitions the cache (a request may name its own)."""

    id: str
    workspace_id: str
    scope: CacheScope
    scope_id: str
    mode: CacheMode = "exact"
    ttl_s: int = 3600
    similarity: float = 0.95
    embedding_model: str | None = None
    exclude_tools: bool = True
    exclude_temperature: bool = False
    namespace: str = ""


class CachePurge(msgspec.Struct, frozen=True, kw_only=True, tag_field="kind", tag="cachepurge"):
    """`DELETE /admin/v1/cache`: every cached answer of `workspace_id` in `namespace` ("" : the
    default namespace) stored before now is gone. Cache keys and semantic entries carry the
    `generation` current when stored; a purge sets a new one (its time in ms), so older entries
    are never served again, on every worker, within a config propagation (the control plane also
    deletes what it can reach: the Redis keys, a Qdrant server's points)."""

    id: str
    workspace_id: str
    namespace: str = ""
    generation: int


class PaidAmount(msgspec.Struct, frozen=True, kw_only=True):
    """An amount in a payment asset's atomic units (an integer string, e.g. "10000" = 0.01 USDC at
    6 decimals). Assets are USD stablecoins: `decimals` converts to the ledger's nano-USD."""

    amount: str
    asset: str
    decimals: int = 6


class PaidPerToken(msgspec.Struct, frozen=True, kw_only=True):
    """A metered price, in `asset`'s atomic units per million tokens (`input_per_mtok`,
    `output_per_mtok`, integer strings). The caller authorizes `max_amount` (what the challenge
    asks for, settled whole: x402 `exact` and MPP charges are fixed amounts); the call is charged
    the metered amount (rounded up, at most `max_amount`), and the difference is owed back to the
    payer (a `payment.event` `refund_due`)."""

    asset: str
    input_per_mtok: str
    output_per_mtok: str
    max_amount: str
    decimals: int = 6


class PaidPrice(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """What a call costs the caller: exactly one of `per_call` (a fixed amount) or `per_token`
    (metered; model-served endpoints only)."""

    per_call: PaidAmount | None = None
    per_token: PaidPerToken | None = None


class PaidServe(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """What answers a paid call: the operator's backend (`backend_url`, the call's path below
    `/paid/{slug}` appended) or a model served by the gateway itself (`model`: `provider/model`,
    an alias, `router/<name>`)."""

    backend_url: str | None = None
    model: str | None = None


class X402Rail(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """x402 acceptance: `exact` payments on `network` (CAIP-2, e.g. `eip155:84532`) of `asset`
    (the token contract) to `pay_to`, verified and settled by `facilitator_url`; v2
    (`PAYMENT-SIGNATURE`) and/or v1 (`X-PAYMENT`). `extra` is the scheme's extra data (for USDC's
    EIP-3009: the EIP-712 domain `name` and `version`)."""

    network: str
    pay_to: str
    facilitator_url: str
    versions: tuple[int, ...] = (2, 1)
    scheme: str = "exact"
    max_timeout_s: int = 60
    extra: dict[str, str] = msgspec.field(default_factory=dict)


class MppRail(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """MPP (the `Payment` HTTP authentication scheme) acceptance: the `charge` intent with the
    listed `methods` (`evm`: an EIP-3009 authorization of `asset` on `network` to `recipient`),
    challenges bound to `realm` and valid `challenge_ttl_s`. The server settles an evm charge itself:
    `relayer_url` is the service that submits the signed authorization on chain (the gateway holds
    no chain key; `POST {relayer_url}/submit`, see `dataplane.payments.mpp_rail.HttpSubmitter`)."""

    realm: str
    recipient: str
    network: str
    relayer_url: str
    methods: tuple[str, ...] = ("evm",)
    challenge_ttl_s: int = 300


class PaidRails(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    x402: X402Rail | None = None
    mpp: MppRail | None = None


class PaidEndpoint(msgspec.Struct, frozen=True, kw_only=True, tag_field="kind", tag="paid"):
    """An agent capability sold per call at `/paid/{slug}/...`: who serves it, its price, the
    rails it accepts, and the agent or workflow its revenue belongs to."""

    id: str
    workspace_id: str
    slug: str
    serve: PaidServe
    price: PaidPrice
    rails: PaidRails
    agent_id: str | None = None
    workflow_id: str | None = None
    description: str = ""


class WalletAsset(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """One asset a wallet may pay with (the allowlist): `asset` (the token contract) on `network`
    (CAIP-2), `decimals`, and the per-payment cap `max_amount` (atomic units, an integer string).
    Assets are USD stablecoins: one whole unit is one USD in the ledger. `domain_name` and
    `domain_version` are the token's EIP-712 domain, which MPP challenges do not carry (x402 ones
    do, in `extra`); empty: known tokens' domains are used, others are not paid over MPP."""

    network: str
    asset: str
    max_amount: str
    decimals: int = 6
    domain_name: str = ""
    domain_version: str = ""


class Wallet(msgspec.Struct, frozen=True, kw_only=True, tag_field="kind", tag="wallet"):
    """A workspace's outbound payment wallet: an EVM key (`private_key_enc`, Fernet-encrypted like
    provider keys; `address` is its public address) that pays x402 (`exact`) and MPP (`evm`
    charge) endpoints an agent calls through the gateway's egress (`/egress?url=...`), only in the
    allow-listed `assets`, each under its per-payment cap, for the agents in `agent_ids` (empty:
    every key of the workspace). `aliases` name upstreams: `/egress/{alias}/...` calls
    `aliases[alias]` with the path below the alias appended. `rails` are those it pays on."""

    id: str
    workspace_id: str
    name: str
    address: str
    private_key_enc: str
    assets: tuple[WalletAsset, ...]
    agent_ids: tuple[str, ...] = ()
    aliases: dict[str, str] = msgspec.field(default_factory=dict)
    rails: tuple[str, ...] = ("x402", "mpp")


# Where a log destination delivers events (see `schemas.log_delivery` and `events.delivery`).
LogDestinationType = Literal["webhook", "otlp", "s3"]
LOG_DESTINATION_TYPES: tuple[str, ...] = ("webhook", "otlp", "s3")


class LogDestination(msgspec.Struct, frozen=True, kw_only=True, tag_field="kind", tag="logdest"):
    """A downstream system the event stream is delivered to (at least once, by the projector's
    delivery task): a `webhook` (HTTPS POST per event, HMAC-signed with the secret), an `otlp`
    collector (OTLP/HTTP JSON logs to `{url}/v1/logs`) or an `s3` prefix (`s3://bucket/prefix`,
    newline-delimited JSON objects). `type` is the API's `kind` (`kind` is the entity tag here).
    `workspace_id` None: every workspace's events (operator level). `event_types` empty: every
    type. `secret_enc` is Fernet ciphertext (webhook: the signing secret; otlp: a bearer token;
    s3: `access_key_id:secret_access_key`), never shown. `created_at_ms`: delivery starts with
    the events stored from then on."""

    id: str
    type: LogDestinationType
    url: str
    workspace_id: str | None = None
    secret_enc: str | None = None
    event_types: tuple[str, ...] = ()
    name: str = ""
    enabled: bool = True
    created_at_ms: int = 0


LogBodies = Literal["none", "request", "both"]


class LogSettings(msgspec.Struct, frozen=True, kw_only=True, tag_field="kind", tag="logsettings"):
    """What is kept of a workspace's (or one virtual key's) requests beyond the event's metadata
    (the key's setting wins over its workspace's): `bodies` none (metadata only, the default) |
    request | both (request and response), archived to S3 (`dataplane.bodies`) after redaction
    (known secret shapes and the call's own keys always; plus the JSON paths in `redact_paths`,
    dot-separated with `*` for any key or list item, and the regular expressions in
    `redact_patterns`), kept `retention_days` (a sweeper deletes older objects)."""

    id: str
    workspace_id: str
    scope: Literal["workspace", "key"]
    scope_id: str
    bodies: LogBodies = "none"
    redact_paths: tuple[str, ...] = ()
    redact_patterns: tuple[str, ...] = ()
    retention_days: int = 30


class McpTool(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """One tool of an MCP server as the operator configured it (a tool not named: price 0, allowed)."""

    price_nanos: int = 0  # integer nano-USD per call
    allowed: bool = True  # False: hidden from tools/list and refused on tools/call for every key
    # Per-unit pricing: `unit_price_nanos` per unit, the units read from the result's
    # `structuredContent[unit_field]` (a non-negative integer, at most `max_units`); the budget
    # hold reserves `max_units` of them.
    unit_price_nanos: int = 0
    unit_field: str = ""
    max_units: int = 0
    # Limits of this tool across every key of the workspace (cluster-wide, in Redis).
    calls_per_minute: int | None = None
    max_concurrent: int | None = None

    def hold_nanos(self) -> int:
        """What a call of this tool may cost at most (its budget hold)."""
        return self.price_nanos + self.unit_price_nanos * self.max_units


class McpServer(msgspec.Struct, frozen=True, kw_only=True, tag_field="kind", tag="mcp"):
    """An upstream MCP server (Streamable HTTP) a workspace's keys reach at /mcp/{name} and /mcp.

    `name` is `[a-z0-9][a-z0-9_-]{0,63}`, unique in the workspace: the path segment of
    `/mcp/{name}` and the prefix of its tools' names (`<name>.<tool>`) on the aggregate endpoint
    and in policies. `url` is http(s), SSRF-checked like a custom provider's base URL.
    `headers_enc` maps a header name to its value's Fernet ciphertext (the KeyRing, like
    `Provider.api_key_enc`), sent on every upstream request; never shown (the API shows the names).
    `timeout_s` bounds each upstream request. `payments`: what a paid tool's x402 PaymentRequired
    result gets, "pass" (relayed to the client) or "pay" (paid from the caller's agent's wallet,
    `dataplane.mcp_payments`)."""

    id: str
    workspace_id: str
    name: str
    url: str
    headers_enc: dict[str, str] = msgspec.field(default_factory=dict)
    tools: dict[str, McpTool] = msgspec.field(default_factory=dict)
    timeout_s: float = 30.0
    payments: Literal["pass", "pay"] = "pass"

    def tool(self, name: str) -> McpTool:
        """The configured price and switch of tool `name` (not named: price 0, allowed)."""
        return self.tools.get(name, _ANY_TOOL)


_ANY_TOOL = McpTool()


class Heartbeat(msgspec.Struct, frozen=True, kw_only=True, tag_field="kind", tag="heartbeat"):
    """Written by the control plane every few seconds; its age tells workers if they are stale."""

    ts_ms: int


ConfigEntity = (Workspace | Department | Member | Agent | Provider | ProviderKey | VirtualKey | ModelAlias
                | PriceOverride | Budget | Limit | Policy | EscalationGrant | PromptTemplate
                | Router | CacheSettings | CachePurge | PaidEndpoint | Wallet | LogDestination | LogSettings
                | McpServer | Heartbeat)

HEARTBEAT_KEY = "meta.heartbeat"

entity_encoder = msgspec.json.Encoder()
entity_decoder = msgspec.json.Decoder(ConfigEntity)


def kv_key(entity: ConfigEntity) -> str:
    """The KV key of an entity. Virtual keys are addressed by hash, so auth is one dict lookup."""
    match entity:
        case VirtualKey():
            return f"vk.{entity.key_hash}"
        case Heartbeat():
            return HEARTBEAT_KEY
        case Workspace():
            return f"ws.{entity.id}"
        case _:
            return f"{type(entity).__struct_config__.tag}.{entity.id}"
