"""The model catalog's pure data: which models a provider type offers, and what a workspace lists.

Per workspace provider: the models the operator registered (price overrides, aliases), then the
bundled genai-prices catalog for the provider's type (or a built-in provider's own list), as
`provider/model` ids. Each entry carries `context_window` where the catalog knows it.

Shared by both planes: the data plane renders `GET /v1/models` from it (`dataplane.models`), the
control plane answers the same question from Postgres state, so the two can never disagree.
No IO, no clock; genai-prices' catalog is read once per provider type and cached.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any, Literal

import msgspec
from genai_prices import data_snapshot

from schemas.snapshot import Snapshot

# Our provider `type` -> the genai-prices provider id whose catalog prices it.
CATALOG_PROVIDER = {
    "openai": "openai", "azure": "azure", "anthropic": "anthropic", "gemini": "google", "bedrock": "aws",
    "groq": "groq", "mistral": "mistral", "deepseek": "deepseek", "xai": "x-ai", "together": "together",
    "fireworks": "fireworks", "openrouter": "openrouter", "perplexity": "perplexity", "cohere": "cohere",
}

# The built-in `mock` provider's models (dataplane/providers/mock.py answers any id; these are
# the ones listed and priced).
MOCK_MODELS = ("echo", "fixed")
MOCK_EMBEDDING_MODELS = ("embed",)  # any id embeds; this one is listed by GET /v1/models


class ModelEntry(msgspec.Struct, kw_only=True, omit_defaults=True):
    """An OpenAI model object plus `context_window` (omitted when unknown)."""

    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    context_window: int | None = None


class ModelEntryList(msgspec.Struct, kw_only=True):
    object: Literal["list"]
    data: list[ModelEntry]


@functools.lru_cache(maxsize=64)
def catalog_models(provider_type: str) -> tuple[tuple[str, int | None], ...]:
    """`(model_id, context_window)` pairs the bundled catalog knows for a provider type."""
    catalog_id = CATALOG_PROVIDER.get(provider_type)
    if catalog_id is None:
        return ()
    for prov in data_snapshot.get_snapshot().providers:
        if prov.id == catalog_id:
            return tuple((m.id, m.context_window) for m in prov.models if not m.deprecated)
    return ()


@functools.lru_cache(maxsize=64)
def _catalog(provider_type: str) -> tuple[tuple[str, int | None], ...]:
    if provider_type == "mock":
        return tuple((m, None) for m in (*MOCK_MODELS, *MOCK_EMBEDDING_MODELS))
    return catalog_models(provider_type)


@functools.lru_cache(maxsize=64)
def _context_windows(provider_type: str) -> Mapping[str, int]:
    return {model: ctx for model, ctx in _catalog(provider_type) if ctx}


@functools.lru_cache(maxsize=64)
def _model_ids(provider_type: str) -> frozenset[str]:
    return frozenset(model for model, _ctx in _catalog(provider_type))


def offers(provider_type: str, model: str) -> bool:
    """Whether the bundled catalog (or a built-in provider's list) has `model` for the type."""
    return model in _model_ids(provider_type)


# Published output-token caps of OpenAI chat models (genai-prices carries context windows, not
# output limits), longest matching prefix wins. A model not listed is not clamped.
OPENAI_MAX_OUTPUT_TOKENS: tuple[tuple[str, int], ...] = (
    ("gpt-3.5-turbo", 4_096), ("gpt-4-turbo", 4_096), ("gpt-4", 8_192), ("gpt-4o", 16_384),
    ("gpt-4o-mini", 16_384), ("chatgpt-4o", 16_384), ("gpt-4.1", 32_768), ("gpt-5", 128_000),
    ("o1", 100_000), ("o1-mini", 65_536), ("o1-preview", 32_768), ("o3", 100_000), ("o3-mini", 100_000),
    ("o4-mini", 100_000),
)
# Families that take `max_completion_tokens` and refuse `max_tokens` (OpenAI's reasoning models).
REASONING_FAMILIES = ("o1", "o3", "o4", "gpt-5")


def _family_match(model: str, prefix: str) -> bool:
    return model == prefix or model.startswith((prefix + "-", prefix + "."))


def max_output_tokens(provider_type: str, model: str) -> int | None:
    """The output-token cap the catalog knows for an OpenAI(-hosted) model, or None (unknown)."""
    if provider_type not in ("openai", "azure"):
        return None
    best: tuple[int, int] | None = None  # (prefix length, cap)
    for prefix, cap in OPENAI_MAX_OUTPUT_TOKENS:
        if _family_match(model, prefix) and (best is None or len(prefix) > best[0]):
            best = (len(prefix), cap)
    return best[1] if best is not None else None


def is_reasoning_model(model: str) -> bool:
    """OpenAI's reasoning families (o1, o3, o4, gpt-5 and their dated or sized variants)."""
    return any(_family_match(model, family) for family in REASONING_FAMILIES)


def catalog_entries(snap: Snapshot, workspace_id: str) -> list[ModelEntry]:
    """Routers (`router/<name>`), aliases, operator-priced models and catalog models of the
    workspace's providers, first occurrence of each id wins. Pure: a function of the snapshot and
    the bundled catalog."""
    entries: dict[str, ModelEntry] = {}

    def add(model_id: str, owner: str, provider_type: str | None, upstream_model: str) -> None:
        if model_id not in entries:
            ctx = _context_windows(provider_type).get(upstream_model) if provider_type else None
            entries[model_id] = ModelEntry(id=model_id, object="model", created=0, owned_by=owner,
                                           context_window=ctx)

    providers = {name: p for (ws, name), p in snap.providers.items() if ws == workspace_id}
    # Routers whose targets all name a model are callable as `router/<name>` (a `provider/*`
    # target needs the request's model: those are reached by `/router/{id}/v1/...` instead).
    for (ws, name), router in sorted(snap.routers_by_name.items()):
        if ws == workspace_id and not any(t.model.endswith("/*") for t in router.targets):
            first, _, upstream = router.targets[0].model.partition("/")
            target = providers.get(first)
            add(f"router/{name}", "alephant-router", target.type if target else None, upstream)
    for (ws, alias), ent in sorted(snap.aliases.items()):
        if ws == workspace_id:
            owner, _, upstream = ent.target.partition("/")
            target = providers.get(owner)
            add(alias, owner, target.type if target else None, upstream)
    for name, provider in sorted(providers.items()):
        for pname, model in sorted(snap.prices):
            if pname == name:
                add(f"{name}/{model}", name, provider.type, model)
        for model, _ctx in _catalog(provider.type):
            add(f"{name}/{model}", name, provider.type, model)
    return list(entries.values())


def type_catalog(provider_type: str) -> list[dict[str, Any]]:
    """The models the bundled catalog (or a built-in provider) knows for a provider type."""
    return [{"id": model, "context_window": ctx} for model, ctx in _catalog(provider_type)]
