"""Pure request decisions over one snapshot: authentication, agent context, model resolution.

No IO, no clock, no globals: each function takes the snapshot and request facts and returns a
value or raises a `GatewayError`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from operator import attrgetter

from dataplane.edge import check_properties, check_text
from schemas.catalog import offers
from schemas.entities import OPERATOR, Provider, ProviderKey, VirtualKey
from schemas.errors import AuthenticationFailed, NotFound, PermissionDenied
from schemas.snapshot import Snapshot

MAX_HEADER_ID_LEN = 200

# Agent-context headers (contract).
AGENT_ID = "Alephant-Agent-Id"
RUN_ID = "Alephant-Run-Id"
SESSION_ID = "Alephant-Session-Id"
WORKFLOW_ID = "Alephant-Workflow-Id"
REQUEST_ID = "Alephant-Request-Id"
# The client's own deadline for the whole call, in milliseconds (bounded by the route's total timeout).
TIMEOUT_MS = "Alephant-Timeout-Ms"


@dataclass(frozen=True, slots=True)
class AgentContext:
    request_id: str
    agent_id: str | None
    run_id: str | None
    session_id: str | None
    workflow_id: str | None
    properties: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True)
class Target:
    """Where a call goes: a provider entity and its upstream model id. A router's target may pin
    its credential (`key_id`, a ProviderKey id) and carries its `weight` (`dataplane.routing`)."""

    provider: Provider
    model: str
    key_id: str | None = None
    weight: int = 1


def bearer_token(authorization: str | None, x_api_key: str | None = None) -> str:
    """The credential from `Authorization: Bearer <key>` (or `x-api-key`, for Anthropic clients)."""
    if authorization:
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
        raise AuthenticationFailed("Malformed Authorization header; expected 'Bearer <virtual key>'.")
    if x_api_key:
        return x_api_key.strip()
    raise AuthenticationFailed(
        "You didn't provide an API key. Send your virtual key as 'Authorization: Bearer <key>'."
    )


def authenticate(snap: Snapshot, key: str, hash_key: Callable[[str], str]) -> VirtualKey:
    """The virtual key whose keyed hash matches, or 401 `invalid_api_key`."""
    vk = snap.keys_by_hash.get(hash_key(key))
    if vk is None:
        raise AuthenticationFailed("Incorrect API key provided. The key is unknown or has been revoked.")
    return vk


def _header_id(headers: Mapping[str, str], name: str) -> str | None:
    value = headers.get(name)
    if value is None or value == "":
        return None
    return check_text(value, name, MAX_HEADER_ID_LEN)


def request_id_of(headers: Mapping[str, str]) -> str | None:
    """The client's `Alephant-Request-Id`, checked (InvalidValue when unusable), or None."""
    return _header_id(headers, REQUEST_ID)


def agent_context(headers: Mapping[str, str], vk: VirtualKey, new_request_id: Callable[[], str]) -> AgentContext:
    """Agent context from the contract headers. A key bound to an agent may only act as it.
    Every value passes the edge checks (`dataplane.edge`): InvalidValue (400) names the header."""
    agent = _header_id(headers, AGENT_ID)
    if vk.agent_id is not None:
        if agent is not None and agent != vk.agent_id:
            raise PermissionDenied(
                f"This key is bound to agent '{vk.agent_id}' and cannot act as '{agent}'.", code="agent_mismatch"
            )
        agent = vk.agent_id
    props = check_properties(headers.items())
    return AgentContext(
        request_id=_header_id(headers, REQUEST_ID) or new_request_id(),
        agent_id=agent,
        run_id=_header_id(headers, RUN_ID),
        session_id=_header_id(headers, SESSION_ID),
        workflow_id=_header_id(headers, WORKFLOW_ID),
        properties=props,
    )


def resolve_model(snap: Snapshot, workspace_id: str, model: str) -> Target:
    """`provider/model_id` or a workspace alias, to the provider entity and upstream model id.

    A bare name (no `/`; the OpenAI Agents SDK, litellm and llama-index send `gpt-4o`) that is no
    alias goes to the workspace's `default_provider`, else to the one configured provider whose
    catalog (or operator prices) offers it (`bare_model_candidates`). Raises NotFound (404
    `model_not_found`) naming the candidates when several match, or saying none did."""
    alias = snap.aliases.get((workspace_id, model))
    name = alias.target if alias is not None else model
    provider_name, sep, model_id = name.partition("/")
    if not sep:
        return _resolve_bare(snap, workspace_id, name)
    if not provider_name or not model_id:
        raise NotFound(
            f"The model '{model}' does not exist. Name models as 'provider/model_id' (for example 'mock/echo').",
            param="model",
        )
    provider = snap.providers.get((workspace_id, provider_name))
    if provider is None:
        raise NotFound(f"The model '{model}' does not exist: provider '{provider_name}' is not configured "
                       "for this workspace.", param="model")
    return Target(provider=provider, model=model_id)


def bare_model_candidates(snap: Snapshot, workspace_id: str, model: str) -> list[Provider]:
    """The workspace's providers that offer `model` by name: in their type's bundled catalog
    (`schemas.catalog.offers`) or priced by the operator for that provider. Sorted by name."""
    found = [p for (ws, name), p in snap.providers.items()
             if ws == workspace_id and (offers(p.type, model) or (name, model) in snap.prices)]
    return sorted(found, key=attrgetter("name"))


def _resolve_bare(snap: Snapshot, workspace_id: str, model: str) -> Target:
    ws = snap.workspaces.get(workspace_id)
    if ws is not None and ws.default_provider:
        provider = snap.providers.get((workspace_id, ws.default_provider))
        if provider is not None:
            return Target(provider=provider, model=model)
    found = bare_model_candidates(snap, workspace_id, model)
    if len(found) == 1:
        return Target(provider=found[0], model=model)
    if found:
        names = ", ".join(f"'{p.name}/{model}'" for p in found[:10])
        raise NotFound(f"The model '{model}' is ambiguous: several configured providers offer it. Name one of "
                       f"{names}, or set the workspace's default_provider.", param="model")
    raise NotFound(f"The model '{model}' does not exist: it is not an alias and no configured provider of this "
                   "workspace offers it. Name models as 'provider/model_id' (for example 'mock/echo').",
                   param="model")


@dataclass(frozen=True, slots=True)
class KeyChoice:
    """The upstream credential a call uses: `key_id` (a ProviderKey id, or the provider's own id
    for its inline key; None for a keyless provider), where it came from (`key`: the virtual
    key's own choice; `workspace`: the workspace's BYO key; `operator`: a master key; `none`),
    and its ciphertext. Events record the id and source, never the secret."""

    key_id: str | None
    source: str
    ciphertext: str | None


NO_KEY = KeyChoice(key_id=None, source="none", ciphertext=None)


def _weighted(keys: tuple[ProviderKey, ...], pick: float) -> ProviderKey:
    """The key `pick` (uniform in [0, 1)) lands on when keys share traffic by weight."""
    if len(keys) == 1:
        return keys[0]
    total = sum(max(k.weight, 0) for k in keys)
    if total <= 0:
        return keys[0]
    point = pick * total
    for key in keys:
        point -= max(key.weight, 0)
        if point < 0:
            return key
    return keys[-1]


def _usable(keys: tuple[ProviderKey, ...], usable: Callable[[str], bool] | None) -> tuple[ProviderKey, ...]:
    """The keys `usable` accepts (not cooling down), or all of them when it accepts none."""
    if usable is None or len(keys) < 2:
        return keys
    return tuple(k for k in keys if usable(k.id)) or keys


def choose_provider_key(snap: Snapshot, vk: VirtualKey, provider: Provider, pick: float,
                        usable: Callable[[str], bool] | None = None) -> KeyChoice:
    """Master-key resolution, most specific first: the virtual key's own choice for this provider;
    else the workspace's BYO keys for it (by weight), else the provider's inline key; else the
    operator's master keys for its type (by weight); else no key (e.g. the built-in mock). Among
    several keys that share traffic, those `usable` refuses (cooling down after a provider's
    `Retry-After`) are passed over while another one is usable."""
    own = vk.provider_keys.get(provider.name)
    if own is not None:
        pk = snap.provider_keys.get(own)
        if pk is not None and pk.workspace_id in (vk.workspace_id, OPERATOR) and pk.provider_type == provider.type:
            return KeyChoice(pk.id, "key", pk.api_key_enc)
    byo = snap.provider_keys_for.get((provider.workspace_id, provider.name))
    if byo:
        pk = _weighted(_usable(byo, usable), pick)
        return KeyChoice(pk.id, "workspace", pk.api_key_enc)
    if provider.api_key_enc is not None:
        return KeyChoice(provider.id, "workspace", provider.api_key_enc)
    master = snap.master_keys.get((OPERATOR, provider.type))
    if master:
        pk = _weighted(_usable(master, usable), pick)
        return KeyChoice(pk.id, "operator", pk.api_key_enc)
    return NO_KEY


def target_key(snap: Snapshot, vk: VirtualKey, target: Target, pick: float,
               usable: Callable[[str], bool] | None = None) -> KeyChoice:
    """The credential for a target: the one a router pinned (`Target.key_id`, if it is the
    workspace's or the operator's key of the provider's type), else `choose_provider_key`."""
    if target.key_id is not None:
        pk = snap.provider_keys.get(target.key_id)
        if (pk is not None and pk.workspace_id in (vk.workspace_id, OPERATOR)
                and pk.provider_type == target.provider.type):
            return KeyChoice(pk.id, "operator" if pk.workspace_id == OPERATOR else "workspace", pk.api_key_enc)
    return choose_provider_key(snap, vk, target.provider, pick, usable)
