"""Wallet admin inputs: every refusal a 400 naming the field path and the problem (the key never
quoted), the key handling of `build` (generated, given, kept on PATCH), the public view (no key,
no ciphertext), the OpenAPI entries and the CLI's body."""

from __future__ import annotations

import argparse
import subprocess
import sys
from types import SimpleNamespace
from typing import Any, cast

import msgspec
import pytest

from controlplane import commands as c
from controlplane.app import openapi_document
from controlplane.commands import ConfigCommands, Prior
from controlplane.inputs import given_fields
from controlplane.wallets import WALLET, CreateWallet, PatchWallet
from deploy.admin_cli import parse_alias, parse_wallet_asset, wallet_body
from schemas.entities import Wallet, WalletAsset
from schemas.errors import InvalidRequest
from schemas.evm import address_of, generate_private_key
from schemas.keys import KeyRing
from schemas.settings import Secret

USDC = "0x036CbD53842c5426634e7929541eC2318f3dCF7e"
# A well-known test key (hardhat's account #0) and its address.
KEY = "0xac0974bec39a17e36ba4a6b4d238ff944bacb478cbed5efcae784d7bf4f2ff80"
ADDRESS = "0xf39Fd6e51aad88F6F4ce6aB8827279cffFb92266"
ASSET: dict[str, Any] = {"network": "eip155:84532", "asset": USDC, "max_amount": "1000000"}
BASE: dict[str, Any] = {"workspace_id": "demo", "name": "ops", "assets": [ASSET]}


def _refused(raw: dict[str, Any], param: str | None, code: str | None, *words: str,
             schema: type[Any] = CreateWallet) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as info:
        c.parse_command(raw, schema)
    err = info.value
    assert err.status == 400
    assert (err.param, err.code) == (param, code), err.message
    for word in words:
        assert word in err.message, (word, err.message)
    return err


def _asset(**change: Any) -> dict[str, Any]:
    return BASE | {"assets": [ASSET | change]}


def test_a_minimal_body_parses_with_defaults() -> None:
    cmd = c.parse_command(BASE, CreateWallet)
    assert cmd.private_key is None and cmd.agent_ids == () and cmd.aliases == {}
    assert cmd.rails == ("x402", "mpp")
    assert cmd.assets is not None and cmd.assets[0].decimals == 6


def test_a_full_body_parses() -> None:
    raw = BASE | {"private_key": KEY, "agent_ids": ["agent_1", "agent_2"], "rails": ["mpp"],
                  "aliases": {"search": "https://api.example.com/v1", "a_b-9": "http://b.example"},
                  "assets": [ASSET | {"decimals": 18}, ASSET | {"network": "eip155:8453"},
                             ASSET | {"asset": "0x" + "ab" * 20, "max_amount": str(10**30 - 1), "decimals": 0}]}
    cmd = c.parse_command(raw, CreateWallet)
    assert cmd.rails == ("mpp",) and len(cmd.assets or ()) == 3 and cmd.agent_ids == ("agent_1", "agent_2")


@pytest.mark.parametrize("name", ["", "x" * 65, "has space", "a/b", "dot.ted", "ünï"])
def test_bad_names(name: str) -> None:
    _refused(BASE | {"name": name}, "name", "invalid_name", "'name'", "letters, digits")


@pytest.mark.parametrize("key", ["", "0x", KEY[2:], KEY[:-1], KEY + "0", "0x" + "g" * 64, " " + KEY, "0X" + KEY[2:]])
def test_bad_private_keys_are_refused_without_quoting_them(key: str) -> None:
    err = _refused(BASE | {"private_key": key}, "private_key", "invalid_private_key", "0x and 64 hex digits")
    if len(key) > 4:
        assert key.strip()[4:20] not in err.message


async def test_a_private_key_that_is_no_secp256k1_scalar_is_refused_on_build() -> None:
    for key in ("0x" + "00" * 32, "0x" + "ff" * 32):
        cmd = c.parse_command(BASE | {"private_key": key}, CreateWallet)  # the format is fine
        with pytest.raises(InvalidRequest) as info:
            await _build(cmd)
        assert (info.value.param, info.value.code) == ("private_key", "invalid_private_key")
        assert key[2:] not in info.value.message


def test_an_over_long_private_key_is_refused_without_quoting_it() -> None:
    err = _refused(BASE | {"private_key": "0x" + "a" * 300}, "private_key", None, "length")
    assert "a" * 20 not in err.message


def test_assets_missing_or_empty_or_too_many() -> None:
    _refused({k: v for k, v in BASE.items() if k != "assets"}, "assets", "missing_assets", "needs 'assets'")
    _refused(BASE | {"assets": []}, "assets", "missing_assets")
    many = [ASSET | {"network": f"eip155:{i}"} for i in range(17)]
    _refused(BASE | {"assets": many}, "assets", "too_many_assets", "at most 16")
    c.parse_command(BASE | {"assets": many[:16]}, CreateWallet)


@pytest.mark.parametrize("network", ["base-sepolia", "eip155:", "eip155:abc", "solana:mainnet", "EIP155:1",
                                     "eip155:1:2"])
def test_bad_networks(network: str) -> None:
    _refused(_asset(network=network), "assets[0].network", "invalid_network", "eip155:<chain id>")


@pytest.mark.parametrize("asset", ["", "USDC", "0x123", "ab" * 20, "0x" + "g" * 40, "0x" + "a" * 41, USDC + " "])
def test_bad_asset_addresses(asset: str) -> None:
    _refused(_asset(asset=asset), "assets[0].asset", "invalid_address", "0x and 40 hex")


@pytest.mark.parametrize("amount", ["0", "-1", "1.5", "", "abc", "01", "1e6", " 1", str(10**30), "9" * 31])
def test_bad_max_amounts(amount: str) -> None:
    _refused(_asset(max_amount=amount), "assets[0].max_amount", "invalid_amount", "positive integer string",
             "10^30")


def test_max_amount_must_be_a_string() -> None:
    _refused(_asset(max_amount=1000), "assets[0].max_amount", None, "Expected `str`")


@pytest.mark.parametrize("decimals", [-1, 19, 100])
def test_bad_decimals(decimals: int) -> None:
    _refused(_asset(decimals=decimals), "assets[0].decimals", "invalid_decimals", "0 and 18")


@pytest.mark.parametrize(("domain", "param"), [({"domain_name": "USDC"}, "domain_version"),
                                               ({"domain_version": "2"}, "domain_name"),
                                               ({"domain_name": " ", "domain_version": "2"}, "domain_name")])
def test_half_a_token_domain_is_refused(domain: dict[str, str], param: str) -> None:
    _refused(_asset(**domain), f"assets[0].{param}", "incomplete_domain", "both", "EIP-712")


async def test_a_token_domain_is_stored() -> None:
    w = await _build(c.parse_command(_asset(domain_name="USD Coin", domain_version="2"), CreateWallet))
    assert (w.assets[0].domain_name, w.assets[0].domain_version) == ("USD Coin", "2")


def test_the_second_asset_names_its_index() -> None:
    _refused(BASE | {"assets": [ASSET, ASSET | {"network": "eip155:x"}]}, "assets[1].network", "invalid_network")


def test_duplicate_assets_compare_addresses_case_insensitively() -> None:
    twice = [ASSET, ASSET | {"asset": USDC.lower(), "max_amount": "5"}]
    _refused(BASE | {"assets": twice}, "assets[1]", "duplicate_asset", "assets[0]")
    # The same token on another network is another asset.
    c.parse_command(BASE | {"assets": [ASSET, ASSET | {"network": "eip155:8453"}]}, CreateWallet)


@pytest.mark.parametrize("rails", [[], ["x402", "x402"], ["stripe"], ["x402", "tempo"], ["X402"]])
def test_bad_rails(rails: list[str]) -> None:
    _refused(BASE | {"rails": rails}, "rails", "invalid_rails", "x402", "mpp")


@pytest.mark.parametrize("name", ["", "a b", "a/b", "x" * 65, "dot.ted"])
def test_bad_alias_names(name: str) -> None:
    _refused(BASE | {"aliases": {name: "https://a.example"}}, "aliases", "invalid_alias", "/egress/{alias}")


@pytest.mark.parametrize("url", ["ftp://a.example/x", "a.example", "https://", "file:///etc/passwd", ""])
def test_bad_alias_urls(url: str) -> None:
    _refused(BASE | {"aliases": {"search": url}}, "aliases.search", "invalid_url", "http:// or https://")


def test_too_many_aliases() -> None:
    aliases = {f"a{i}": "https://a.example" for i in range(33)}
    _refused(BASE | {"aliases": aliases}, "aliases", "too_many_aliases", "at most 32")
    c.parse_command(BASE | {"aliases": dict(list(aliases.items())[:32])}, CreateWallet)


def test_duplicate_agents() -> None:
    _refused(BASE | {"agent_ids": ["agent_1", "agent_2", "agent_1"]}, "agent_ids[2]", "duplicate_agent", "agent_1")


def test_unknown_fields_are_refused() -> None:
    _refused(BASE | {"address": ADDRESS}, None, None, "unknown field `address`")
    _refused(BASE | {"private_key_enc": "gAAAA"}, None, None, "unknown field `private_key_enc`")
    _refused(_asset(cap="1"), "assets[0]", None, "unknown field `cap`")


def test_patch_cannot_move_workspace_or_null_the_key() -> None:
    _refused({"workspace_id": "other"}, None, None, "unknown field `workspace_id`", schema=PatchWallet)
    _refused({"private_key": None}, "private_key", None, schema=PatchWallet)
    patch = c.parse_command({"name": "new", "agent_ids": []}, PatchWallet)
    assert given_fields(patch) == {"name": "new", "agent_ids": ()}


# ---- the key: generated, given, kept; never shown -------------------------------------------------

KEYRING = KeyRing(Secret("unit-test-secret-key-0123456789"))


async def _build(cmd: CreateWallet, prior: Prior | None = None) -> Wallet:
    cc = cast(ConfigCommands, SimpleNamespace(keyring=KEYRING, ssrf_allow=()))
    entity = await WALLET.build(cc, cmd, "wallet_1", prior)
    assert isinstance(entity, Wallet)
    return entity


async def test_a_given_key_is_stored_encrypted_with_its_address() -> None:
    w = await _build(c.parse_command(BASE | {"private_key": KEY}, CreateWallet))
    assert w.address == ADDRESS
    assert KEY not in w.private_key_enc and KEYRING.decrypt(w.private_key_enc).reveal() == KEY
    assert w.assets == (WalletAsset(network="eip155:84532", asset=USDC, max_amount="1000000", decimals=6),)


async def test_an_omitted_key_is_generated() -> None:
    first = await _build(c.parse_command(BASE, CreateWallet))
    second = await _build(c.parse_command(BASE, CreateWallet))
    key = KEYRING.decrypt(first.private_key_enc).reveal()
    assert address_of(key) == first.address and first.address != second.address
    assert first.address.startswith("0x") and len(first.address) == 42


async def test_patch_keeps_the_stored_key_unless_given() -> None:
    stored = await _build(c.parse_command(BASE | {"private_key": KEY}, CreateWallet))
    merged = c.parse_command(WALLET.fields(stored) | {"name": "renamed"}, CreateWallet)
    kept = await _build(merged, Prior(stored, frozenset({"name"})))
    assert (kept.name, kept.address, kept.private_key_enc) == ("renamed", ADDRESS, stored.private_key_enc)
    other = generate_private_key()
    merged = c.parse_command(WALLET.fields(stored) | {"private_key": other}, CreateWallet)
    rotated = await _build(merged, Prior(stored, frozenset({"private_key"})))
    assert rotated.address == address_of(other) != ADDRESS
    assert KEYRING.decrypt(rotated.private_key_enc).reveal() == other


async def test_alias_urls_reaching_internal_addresses_are_refused() -> None:
    for url in ("http://10.1.2.3/", "http://169.254.169.254/latest", "http://[::1]:8080/"):
        cmd = c.parse_command(BASE | {"aliases": {"inside": url}}, CreateWallet)
        with pytest.raises(InvalidRequest) as info:
            await _build(cmd)
        assert (info.value.param, info.value.code) == ("aliases.inside", "base_url_not_allowed")
        assert "'aliases.inside'" in info.value.message


async def test_public_view_has_no_key_and_fields_round_trip() -> None:
    # A literal public address: unit tests resolve no names.
    raw = BASE | {"private_key": KEY, "aliases": {"s": "https://93.184.215.14/v1"}}
    w = await _build(c.parse_command(raw, CreateWallet))
    view = msgspec.json.decode(msgspec.json.encode(c.public_view(w)))  # as the API sends it
    assert "private_key_enc" not in view and "private_key" not in view and view["has_private_key"] is True
    assert w.private_key_enc not in str(view) and KEY[2:] not in str(view)
    assert view["address"] == ADDRESS and view["rails"] == ["x402", "mpp"] and view["agent_ids"] == []
    assert view["assets"] == [ASSET | {"decimals": 6, "domain_name": "", "domain_version": ""}]  # defaults shown
    assert view["aliases"] == {"s": "https://93.184.215.14/v1"}
    # A PATCH is merged over `fields` and re-validated as a create: the stored entity must pass.
    assert "private_key" not in WALLET.fields(w)
    c.parse_command(WALLET.fields(w), CreateWallet)


def test_importing_the_control_plane_keeps_the_recursion_limit() -> None:
    """eth-account is imported on the first key operation, not with the module, and the limit
    py_ecc raises on import is put back (checked in a fresh interpreter)."""
    code = ("import sys; import controlplane.wallets, controlplane.app; "
            "assert 'eth_account' not in sys.modules; from schemas.evm import generate_private_key as g, "
            "address_of as a; a(g()); assert 'py_ecc' in sys.modules; print(sys.getrecursionlimit())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "1000"


def test_openapi_lists_the_wallet_routes() -> None:
    doc = openapi_document()
    assert set(doc["paths"]["/admin/v1/wallets"]) == {"post", "get"}
    assert set(doc["paths"]["/admin/v1/wallets/{id}"]) == {"get", "patch", "delete"}
    assert "CreateWallet" in doc["components"]["schemas"]


# ---- the CLI's body ---------------------------------------------------------------------------------

def _cli_args(**given: Any) -> argparse.Namespace:
    names = ("json", "workspace", "name", "asset", "agent", "alias", "rail", "private_key_env")
    return argparse.Namespace(**({n: None for n in names} | given))


def test_cli_parses_assets_and_aliases() -> None:
    assert parse_wallet_asset(f"eip155:84532:{USDC}:1000000") == ASSET
    assert parse_wallet_asset(f"eip155:8453:{USDC}:5:18") == ASSET | {"network": "eip155:8453", "max_amount": "5",
                                                                      "decimals": 18}
    for bad in (f"{USDC}:1000000", "eip155:1:a:b:c:d", f"eip155:1:{USDC}:5:six"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_wallet_asset(bad)
    assert parse_alias("s=https://a.example/x?q=1") == ("s", "https://a.example/x?q=1")
    for bad in ("s", "=https://a.example", "s="):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_alias(bad)


def test_cli_body_reads_the_key_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WALLET_TEST_KEY", KEY)
    body = wallet_body(_cli_args(workspace="acme", name="ops", asset=[ASSET], agent=["agent_1"], rail=["x402"],
                                 alias=[("s", "https://s.example")], private_key_env="WALLET_TEST_KEY"), create=True)
    assert body == {"workspace_id": "acme", "name": "ops", "assets": [ASSET], "agent_ids": ["agent_1"],
                    "rails": ["x402"], "aliases": {"s": "https://s.example"}, "private_key": KEY}
    c.parse_command(body, CreateWallet)
    # --json is the whole body, the flags win; an update sends only the settings.
    current = {"id": "wallet_1", "workspace_id": "acme", "address": ADDRESS, "has_private_key": True, "name": "x"}
    assert wallet_body(_cli_args(json=current, name="y"), create=False) == {"name": "y"}
    monkeypatch.delenv("WALLET_TEST_KEY")
    with pytest.raises(SystemExit) as info:
        wallet_body(_cli_args(private_key_env="WALLET_TEST_KEY"), create=False)
    assert "WALLET_TEST_KEY" in str(info.value.code)
