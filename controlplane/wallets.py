"""Admin commands of wallets (see commands.py for how a command is validated and committed).

A wallet (`schemas.entities.Wallet`) pays the x402 and MPP endpoints a workspace's agents call
through the gateway's egress: an EVM key, the assets it may pay with (each with a per-payment cap
`max_amount` in atomic units), the agents allowed to use it (`agent_ids`; empty: every key of the
workspace), named upstreams (`aliases`: name -> base URL) and the `rails` it pays on. Its `name`
is unique in the workspace (409 `name_taken`).

The key: `private_key` (0x + 64 hex digits, a secp256k1 key) or, omitted on create, a fresh one
generated here. Only its Fernet ciphertext is stored (`private_key_enc`, like provider keys) with
its public `address`; no answer, event or log carries the key or the ciphertext (answers show
`has_private_key` and `address`: fund that address). A PATCH without `private_key` keeps the
stored key and address; one with it replaces both.

Every refusal is a 400 (404 for a referenced entity that does not exist) whose `param` is the
field path, and nothing is written:

* `name` not 1..64 letters, digits, '-' or '_' (`invalid_name`);
* `private_key` not 0x + 64 hex digits, or not a valid secp256k1 key (`invalid_private_key`; the
  message never quotes it);
* `assets` missing or empty (`missing_assets`) or more than 16 (`too_many_assets`); an asset's
  `network` not CAIP-2 `eip155:<chain id>` (`invalid_network`), `asset` not a 0x + 40 hex token
  address (`invalid_address`), `max_amount` not a positive integer string below 10**30
  (`invalid_amount`), `decimals` outside 0..18 (`invalid_decimals`), one of `domain_name` and
  `domain_version` without the other (`incomplete_domain`); the same network and asset twice
  (`duplicate_asset`, the address compared case-insensitively);
* `rails` empty, with a rail other than `x402` or `mpp`, or one twice (`invalid_rails`);
* more than 32 `aliases` (`too_many_aliases`); an alias name not 1..64 letters, digits, '-' or
  '_' (`invalid_alias`, param `aliases`); an alias URL that is not http(s) (`invalid_url`) or
  reaches an internal address (the provider base URL's SSRF rules, `ssrf.py`; param
  `aliases.<name>`);
* an `agent_ids` entry twice (`duplicate_agent`), or not an agent of the workspace (404
  `agent_not_found` / 400 `agent_workspace_mismatch`, param `agent_ids[i]`, references.py).
"""

from __future__ import annotations

from typing import Annotated, Any

import msgspec

from controlplane.commands import ConfigCommands, KindSpec, Prior, _builtins, unique_name
from controlplane.inputs import BaseUrl, Command, Ident
from controlplane.paid_admin import (
    SLUG_RE,
    AmountText,
    Short,
    check_address,
    check_atomic_amount,
    check_decimals,
    check_http_url,
    check_network,
    check_url_resolving,
)
from schemas.entities import Wallet, WalletAsset
from schemas.errors import InvalidRequest
from schemas.evm import PRIVATE_KEY_RE, address_of, generate_private_key
from schemas.ids import new_id

RAILS = ("x402", "mpp")
MAX_ASSETS = 16
MAX_ALIASES = 32
MAX_AGENTS = 64

# The length caps only bound what is decoded; the rules are in `check`.
PrivateKey = Annotated[str, msgspec.Meta(max_length=256)]
AliasName = Annotated[str, msgspec.Meta(max_length=128)]
Aliases = dict[AliasName, BaseUrl]
AgentIds = Annotated[tuple[Ident, ...], msgspec.Meta(max_length=MAX_AGENTS)]
Rails = Annotated[tuple[Short, ...], msgspec.Meta(max_length=8)]


class AssetIn(Command):
    """One asset the wallet may pay with: the token contract `asset` (0x address) on `network`
    (CAIP-2, `eip155:84532`), `max_amount` the most one payment may spend, in the asset's atomic
    units (a positive integer string: "1000000" = 1 USDC at 6 decimals), `decimals` 0..18, and
    optionally the token's EIP-712 domain (`domain_name` and `domain_version`, both or neither),
    which MPP challenges do not carry: without it only tokens the gateway knows are paid over MPP."""

    network: Short
    asset: Short
    max_amount: AmountText
    decimals: int = 6
    domain_name: Short = ""
    domain_version: Short = ""


class CreateWallet(Command):
    """An outbound payment wallet of `workspace_id` named `name` (unique in the workspace):
    `private_key` (0x + 64 hex; omitted: a fresh key is generated and never shown, fund the
    answer's `address`), `assets` (1..16, each with its per-payment cap), `agent_ids` (agents of
    the workspace allowed to pay with it; empty: every key of the workspace), `aliases` (up to 32,
    name -> http(s) base URL, for `/egress/{alias}/...`) and `rails` (a non-empty subset of
    ["x402", "mpp"], default both)."""

    workspace_id: Ident
    name: Short
    private_key: PrivateKey | None = None
    assets: tuple[AssetIn, ...] | None = None
    agent_ids: AgentIds = ()
    aliases: Aliases = msgspec.field(default_factory=dict)
    rails: Rails = RAILS

    def check(self) -> None:
        check_name(self.name)
        if self.private_key is not None:
            check_private_key_format(self.private_key)
        check_assets(self.assets)
        check_rails(self.rails)
        check_aliases(self.aliases)
        check_agent_ids(self.agent_ids)


class PatchWallet(Command):
    """Any field but `workspace_id`; a given `assets`, `agent_ids`, `aliases` or `rails` replaces
    the stored one whole. A `private_key` replaces the key and its address; omitted, the stored
    key is kept."""

    name: Short | msgspec.UnsetType = msgspec.UNSET
    private_key: PrivateKey | msgspec.UnsetType = msgspec.UNSET
    assets: tuple[AssetIn, ...] | msgspec.UnsetType = msgspec.UNSET
    agent_ids: AgentIds | msgspec.UnsetType = msgspec.UNSET
    aliases: Aliases | msgspec.UnsetType = msgspec.UNSET
    rails: Rails | msgspec.UnsetType = msgspec.UNSET


# ---- pure checks (each raises InvalidRequest naming the field) ------------------------------------

def check_name(name: str) -> None:
    if not SLUG_RE.match(name):
        raise InvalidRequest(f"'name' must be 1 to 64 letters, digits, '-' or '_'; got {name[:80]!r}.",
                             param="name", code="invalid_name")


def check_private_key_format(key: str) -> None:
    # Never echo the key, not even a prefix: a near-miss is still a secret.
    if not PRIVATE_KEY_RE.match(key):
        raise InvalidRequest(f"'private_key' must be an EVM (secp256k1) private key: 0x and 64 hex digits (the "
                             f"value given has {len(key)} characters); omit it to have one generated.",
                             param="private_key", code="invalid_private_key")


def check_assets(assets: tuple[AssetIn, ...] | None) -> None:
    if not assets:
        raise InvalidRequest("A wallet needs 'assets': the tokens it may pay with and the most one payment may "
                             "spend, e.g. [{\"network\": \"eip155:84532\", \"asset\": \"0x...\", \"max_amount\": "
                             "\"1000000\", \"decimals\": 6}].", param="assets", code="missing_assets")
    if len(assets) > MAX_ASSETS:
        raise InvalidRequest(f"'assets' may list at most {MAX_ASSETS} assets; got {len(assets)}.", param="assets",
                             code="too_many_assets")
    seen: dict[tuple[str, str], int] = {}
    for i, a in enumerate(assets):
        where = f"assets[{i}]"
        check_network(a.network, f"{where}.network")
        check_address(a.asset, f"{where}.asset")
        check_atomic_amount(a.max_amount, f"{where}.max_amount")
        check_decimals(a.decimals, f"{where}.decimals")
        if bool(a.domain_name.strip()) != bool(a.domain_version.strip()):
            missing = "domain_version" if a.domain_name.strip() else "domain_name"
            raise InvalidRequest(f"'{where}' gives one half of the token's EIP-712 domain: give both 'domain_name' and "
                                 "'domain_version' (e.g. \"USDC\" and \"2\"), or neither.",
                                 param=f"{where}.{missing}", code="incomplete_domain")
        first = seen.setdefault((a.network, a.asset.lower()), i)
        if first != i:
            raise InvalidRequest(f"'{where}' repeats assets[{first}] ({a.asset} on {a.network}); list each asset "
                                 "once.", param=where, code="duplicate_asset")


def check_rails(rails: tuple[str, ...]) -> None:
    if not rails or not set(rails) <= set(RAILS) or len(set(rails)) != len(rails):
        raise InvalidRequest(f"'rails' must be a non-empty list of distinct rails from {list(RAILS)}; got "
                             f"{list(rails)[:8]}.", param="rails", code="invalid_rails")


def check_aliases(aliases: dict[str, str]) -> None:
    if len(aliases) > MAX_ALIASES:
        raise InvalidRequest(f"'aliases' may name at most {MAX_ALIASES} upstreams; got {len(aliases)}.",
                             param="aliases", code="too_many_aliases")
    for name, url in aliases.items():
        if not SLUG_RE.match(name):
            raise InvalidRequest(f"An alias name must be 1 to 64 letters, digits, '-' or '_' (it is the path segment "
                                 f"of /egress/{{alias}}/...); got {name[:80]!r}.", param="aliases",
                                 code="invalid_alias")
        check_http_url(url, f"aliases.{name}")


def check_agent_ids(agent_ids: tuple[str, ...]) -> None:
    seen: set[str] = set()
    for i, agent_id in enumerate(agent_ids):
        if agent_id in seen:
            raise InvalidRequest(f"'agent_ids[{i}]' repeats agent '{agent_id}'; list each agent once.",
                                 param=f"agent_ids[{i}]", code="duplicate_agent")
        seen.add(agent_id)


# ---- IO checks and the kind ---------------------------------------------------------------------

def _address(key: str) -> str:
    try:
        return address_of(key)
    except ValueError:
        raise InvalidRequest("'private_key' is not a valid secp256k1 private key (it is zero, or not below the "
                             "curve order).", param="private_key", code="invalid_private_key") from None


async def _build(cc: ConfigCommands, cmd: CreateWallet, ent_id: str, prior: Prior | None) -> Wallet:
    # CreateWallet.check has run: assets is non-empty.
    assert cmd.assets
    for name, url in cmd.aliases.items():
        await check_url_resolving(cc, url, f"aliases.{name}")
    if prior is not None and "private_key" not in prior.given:
        key_enc, address = prior.entity.private_key_enc, prior.entity.address
    else:
        key = cmd.private_key if cmd.private_key is not None else generate_private_key()
        address = _address(key)
        key_enc = cc.keyring.encrypt(key)
    return Wallet(
        id=ent_id, workspace_id=cmd.workspace_id, name=cmd.name, address=address, private_key_enc=key_enc,
        assets=tuple(WalletAsset(network=a.network, asset=a.asset, max_amount=a.max_amount, decimals=a.decimals,
                                 domain_name=a.domain_name.strip(), domain_version=a.domain_version.strip())
                     for a in cmd.assets),
        agent_ids=cmd.agent_ids, aliases=dict(cmd.aliases), rails=cmd.rails)


def _fields(wallet: Wallet) -> dict[str, Any]:
    # What a PATCH merges over: no `private_key` (only its ciphertext is stored), so `_build`
    # keeps the stored key unless the PATCH gives one.
    return _builtins(wallet, "workspace_id", "name", "assets", "agent_ids", "aliases", "rails")


WALLET = KindSpec("wallet", "Wallet", CreateWallet, PatchWallet, lambda c: new_id("wallet"), _fields, _build,
                  guard=unique_name("wallet", "wallet"))
