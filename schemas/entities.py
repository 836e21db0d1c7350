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
RESERVED_PROVIDER_NAMES = frozenset({"v1", "router", "admin", "healthz", "readyz", "metrics"})


class Workspace(msgspec.Struct, frozen=True, kw_only=True, tag_field="kind", tag="ws"):
    id: str
    name: str


class Agent(msgspec.Struct, frozen=True, kw_only=True, tag_field="kind", tag="agent"):
    id: str
    workspace_id: str
    name: str


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


class VirtualKey(msgspec.Struct, frozen=True, kw_only=True, tag_field="kind", tag="vk"):
    """A client credential, stored only as a keyed hash. KV key: `vk.<key_hash>`."""

    id: str
    workspace_id: str
    key_hash: str
    name: str = ""
    agent_id: str | None = None
    prefix: str = ""


class ModelAlias(msgspec.Struct, frozen=True, kw_only=True, tag_field="kind", tag="alias"):
    """`alias` (what clients send as `model`) resolves to `target` (`provider/model`)."""

    id: str
    workspace_id: str
    alias: str
    target: str


class PriceOverride(msgspec.Struct, frozen=True, kw_only=True, tag_field="kind", tag="price"):
    """Operator price for `provider/model`, in integer nano-USD per million tokens.

    It wins over the bundled genai-prices catalog.
    """

    id: str
    provider: str
    model: str
    input_per_mtok_nanos: int = 0
    output_per_mtok_nanos: int = 0
    cache_read_per_mtok_nanos: int | None = None
    cache_write_per_mtok_nanos: int | None = None


class Heartbeat(msgspec.Struct, frozen=True, kw_only=True, tag_field="kind", tag="heartbeat"):
    """Written by the control plane every few seconds; its age tells workers if they are stale."""

    ts_ms: int


ConfigEntity = Workspace | Agent | Provider | VirtualKey | ModelAlias | PriceOverride | Heartbeat

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
