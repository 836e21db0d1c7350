"""`GET /v1/models`: the models a workspace's key may call, as `provider/model` ids."""

from __future__ import annotations

from dataplane.pricing import catalog_models
from dataplane.providers.mock import MODELS as MOCK_MODELS
from dataplane.snapshot import Snapshot
from schemas.openai import Model


def list_models(snap: Snapshot, workspace_id: str) -> list[Model]:
    """Aliases, operator-priced models, and each provider's catalog models, deduplicated."""
    ids: dict[str, str] = {}
    for (ws, alias), ent in snap.aliases.items():
        if ws == workspace_id:
            ids.setdefault(alias, ent.target.partition("/")[0])
    for (ws, name), provider in sorted(snap.providers.items()):
        if ws != workspace_id:
            continue
        catalog = MOCK_MODELS if provider.type == "mock" else tuple(m for m, _ in catalog_models(provider.type))
        priced = tuple(model for (pname, model) in snap.prices if pname == name)
        for model in (*priced, *catalog):
            ids.setdefault(f"{name}/{model}", name)
    return [Model(id=mid, owned_by=owner) for mid, owner in ids.items()]
