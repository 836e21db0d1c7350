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


def catalog_entries(snap: Snapshot, workspace_id: str) -> list[ModelEntry]:
    """Aliases, operator-priced models and catalog models of the workspace's providers, first
    occurrence of each id wins. Pure: a function of the snapshot and the bundled catalog."""
    entries: dict[str, ModelEntry] = {}

    def add(model_id: str, owner: str, provider_type: str | None, upstream_model: str) -> None:
        if model_id not in entries:
            ctx = _context_windows(provider_type).get(upstream_model) if provider_type else None
            entries[model_id] = ModelEntry(id=model_id, object="model", created=0, owned_by=owner,
                                           context_window=ctx)

    providers = {name: p for (ws, name), p in snap.providers.items() if ws == workspace_id}
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
