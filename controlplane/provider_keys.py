"""Provider keys: several upstream credentials per provider, by weight, and operator-level
master keys (issue #8, "master-key resolution").

`POST /admin/v1/provider-keys` with a `workspace_id` adds a workspace's own (BYO) key for its
provider named `provider`; without one it adds an operator master key for the provider TYPE
`provider` (e.g. "openai"), which serves every workspace's providers of that type that have no
key of their own. The data plane picks, most specific first: the virtual key's own choice
(`provider_keys` on the key), the workspace's BYO keys, the provider's inline key, the master
keys (`dataplane.decisions.choose_provider_key`). Keys are encrypted at rest and in the snapshot;
responses show `has_api_key`, never the key.
"""

from __future__ import annotations

from typing import Annotated, Any, cast, get_args

import msgspec

from controlplane.commands import ConfigCommands, KindSpec, Prior, _builtins
from controlplane.inputs import PRINTABLE_ASCII, ApiKey, Command, Ident, Name
from schemas.entities import OPERATOR, ProviderKey, ProviderKind
from schemas.errors import InvalidRequest, NotFound
from schemas.ids import new_id

Weight = Annotated[int, msgspec.Meta(ge=1, le=1000)]
_KINDS = frozenset(get_args(ProviderKind))


class CreateProviderKey(Command):
    """`workspace_id` given: `provider` names one of its providers (a BYO key). Omitted: `provider`
    is a provider type and the key is an operator master key. `weight` shares traffic among the
    keys of one provider (1..1000)."""

    provider: Ident
    api_key: ApiKey
    workspace_id: Ident | None = None
    weight: Weight = 1
    name: Name | None = None

    def check(self) -> None:
        if not PRINTABLE_ASCII.match(self.api_key):
            raise InvalidRequest("'api_key' must be printable ASCII.", param="api_key", code="invalid_characters")
        if self.workspace_id is None and self.provider not in _KINDS:
            raise InvalidRequest(f"A master key (no workspace_id) names a provider type; '{self.provider}' is not "
                                 "one. Types: " + ", ".join(sorted(_KINDS)) + ".", param="provider",
                                 code="unknown_provider_type")


class PatchProviderKey(Command):
    """Rotate the secret (`api_key`), change the `weight` or the `name`; the rest is fixed."""

    api_key: ApiKey | msgspec.UnsetType = msgspec.UNSET
    weight: Weight | msgspec.UnsetType = msgspec.UNSET
    name: Name | msgspec.UnsetType | None = msgspec.UNSET


def _fields(pk: ProviderKey) -> dict[str, Any]:
    # What a PATCH merges over: the stored secret is kept unless a new `api_key` is given.
    return {"provider": pk.provider_name or pk.provider_type, "api_key": "stored",
            "workspace_id": None if pk.workspace_id == OPERATOR else pk.workspace_id} | _builtins(pk, "weight") \
        | {"name": pk.name or None}


async def _build(cc: ConfigCommands, cmd: CreateProviderKey, ent_id: str, prior: Prior | None) -> ProviderKey:
    if prior is not None and "api_key" not in prior.given:
        key_enc = prior.entity.api_key_enc
    else:
        key_enc = cc.keyring.encrypt(cmd.api_key)
    if cmd.workspace_id is None:
        return ProviderKey(id=ent_id, workspace_id=OPERATOR, provider_type=cast(ProviderKind, cmd.provider),
                           api_key_enc=key_enc, weight=cmd.weight, name=cmd.name or "")
    provider = await cc.load("provider", f"{cmd.workspace_id}.{cmd.provider}")
    if provider is None:
        raise NotFound(f"Workspace '{cmd.workspace_id}' has no provider named '{cmd.provider}'.", param="provider",
                       code="provider_not_found")
    return ProviderKey(id=ent_id, workspace_id=cmd.workspace_id, provider_type=provider.type,
                       provider_name=cmd.provider, api_key_enc=key_enc, weight=cmd.weight, name=cmd.name or "")


PROVIDER_KEY = KindSpec("pkey", "Provider key", CreateProviderKey, PatchProviderKey, lambda c: new_id("pkey"),
                        _fields, _build)
