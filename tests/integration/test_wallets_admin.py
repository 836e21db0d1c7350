"""The wallets admin API and CLI on the real stack: create (a given key or a generated one), list,
get, PATCH and DELETE; the key never appears in an answer, an event or a config row, only its
ciphertext in the entity (and the snapshot KV entry workers read), which decrypts to it; PATCH
keeps the key unless given one; every refused body names its field and problem and writes
nothing; names unique per workspace; `agent_ids` checked (and an agent a wallet names cannot be
deleted under it)."""

from __future__ import annotations

import json
import secrets
from typing import Any

import msgspec
import psycopg
import pytest
import pytest_asyncio

from events.jetstream import connect
from schemas.entities import Wallet
from schemas.evm import address_of, generate_private_key
from schemas.keys import KeyRing
from schemas.settings import Secret
from tests.conftest import AdminHttp as Admin
from tests.conftest import Gateway, cli_json, run_cli
from tests.integration.test_routers_admin import _refused

A = "/admin/v1"
W = f"{A}/wallets"
USDC = "0x036CbD53842c5426634e7929541eC2318f3dCF7e"
# Hardhat's account #0: a well-known test key and its address.
KEY = "0xac0974bec39a17e36ba4a6b4d238ff944bacb478cbed5efcae784d7bf4f2ff80"
ADDRESS = "0xf39Fd6e51aad88F6F4ce6aB8827279cffFb92266"
ASSET: dict[str, Any] = {"network": "eip155:84532", "asset": USDC, "max_amount": "1000000"}
# A loopback address (the stack allows 127.0.0.1 for its fakes): the tests resolve no public names.
UPSTREAM = "http://127.0.0.1:9/api"


@pytest_asyncio.fixture
async def ws(admin: Admin) -> dict[str, str]:
    """A fresh workspace with an agent; their ids."""
    ws_id = f"wal{secrets.token_hex(4)}"
    await admin.ok("POST", f"{A}/workspaces", {"id": ws_id, "name": "Wallets"})
    agent = await admin.ok("POST", f"{A}/agents", {"workspace_id": ws_id, "name": "Buyer"})
    return {"ws": ws_id, "agent": agent["id"]}


def _name() -> str:
    return f"w-{secrets.token_hex(4)}"


def _body(ws: str, **extra: Any) -> dict[str, Any]:
    return {"workspace_id": ws, "name": _name(), "assets": [ASSET]} | extra


def _keyring(gateway: Gateway) -> KeyRing:
    return KeyRing(Secret(gateway.stack.child_env()["ALEPHANT_SECRET_KEY"]))


async def _kv_wallet(gateway: Gateway, wallet_id: str) -> Wallet:
    """The wallet as the workers read it: its entry in the snapshot KV bucket."""
    nc = await connect(gateway.nats_url, "alephant-tests")
    try:
        kv = await nc.jetstream().key_value(gateway.stack.child_env()["ALEPHANT_KV_BUCKET"])
        entry = await kv.get(f"wallet.{wallet_id}")
        assert entry.value is not None
        return msgspec.json.decode(entry.value, type=Wallet)
    finally:
        await nc.close()


async def _config_text(gateway: Gateway) -> tuple[str, str]:
    """(every config row and outbox KV value, every outbox `config.changed` event), as text."""
    async with await psycopg.AsyncConnection.connect(gateway.database_url) as conn:
        cur = await conn.execute("SELECT (SELECT string_agg(body::text, ' ') FROM config_entity) || ' ' || "
                                 "(SELECT string_agg(coalesce(encode(kv_value, 'escape'), ''), ' ') "
                                 "FROM config_outbox), "
                                 "(SELECT string_agg(encode(event, 'escape'), ' ') FROM config_outbox)")
        row = await cur.fetchone()
    assert row is not None
    return str(row[0]), str(row[1])


def _no_secret(answer: Any, *secret_texts: str) -> None:
    text = json.dumps(answer)
    assert "private_key_enc" not in text and '"private_key"' not in text, text
    for secret in secret_texts:
        assert secret not in text and secret[2:] not in text


# ---- create, list, get, patch, delete ----------------------------------------------------------

async def test_wallet_lifecycle(gateway: Gateway, admin: Admin, ws: dict[str, str]) -> None:
    body = _body(ws["ws"], private_key=KEY, agent_ids=[ws["agent"]], aliases={"search": UPSTREAM}, rails=["x402"])
    created = await admin.ok("POST", W, body)
    wid = created["id"]
    assert wid.startswith("wallet_") and created["propagated"] is True
    assert isinstance(created["revision"], int) and created["revision"] == created["snapshot_revision"]
    assert (created["workspace_id"], created["name"], created["address"], created["has_private_key"],
            created["agent_ids"], created["aliases"], created["rails"]) == (
        ws["ws"], body["name"], ADDRESS, True, [ws["agent"]], {"search": UPSTREAM}, ["x402"])
    assert created["assets"] == [ASSET | {"decimals": 6, "domain_name": "", "domain_version": ""}]

    # The snapshot entry the workers read holds the ciphertext, which decrypts to the key.
    stored = await _kv_wallet(gateway, wid)
    assert stored.address == ADDRESS and KEY not in stored.private_key_enc
    assert _keyring(gateway).decrypt(stored.private_key_enc).reveal() == KEY
    _no_secret(created, KEY, stored.private_key_enc)

    got = await admin.ok("GET", f"{W}/{wid}")
    assert got == {k: v for k, v in created.items() if k not in ("revision", "snapshot_revision", "propagated")}
    listed = await admin.ok("GET", f"{W}?workspace_id={ws['ws']}")
    assert [w["id"] for w in listed["data"]] == [wid]
    _no_secret([got, listed], KEY, stored.private_key_enc)
    assert (await admin.ok("GET", f"{W}?workspace_id=nobody-{ws['ws']}"))["data"] == []

    # PATCH without a key keeps it (and its address); list fields are replaced whole.
    patched = await admin.ok("PATCH", f"{W}/{wid}", {"name": "renamed-" + secrets.token_hex(3), "agent_ids": [],
                                                     "assets": [ASSET | {"max_amount": "5"}]})
    assert patched["revision"] > created["revision"]
    assert (patched["address"], patched["has_private_key"], patched["agent_ids"], patched["aliases"]) == (
        ADDRESS, True, [], {"search": UPSTREAM})
    assert patched["assets"][0]["max_amount"] == "5"
    kept = await _kv_wallet(gateway, wid)
    assert kept.private_key_enc == stored.private_key_enc and kept.name == patched["name"]

    # PATCH with a key replaces the key and the address.
    other = generate_private_key()
    rotated = await admin.ok("PATCH", f"{W}/{wid}", {"private_key": other})
    assert rotated["address"] == address_of(other) != ADDRESS
    fresh = await _kv_wallet(gateway, wid)
    assert _keyring(gateway).decrypt(fresh.private_key_enc).reveal() == other
    _no_secret(rotated, other, fresh.private_key_enc)

    # Neither key is in any config row, event or outbox KV value in plaintext; the events (which
    # carry the public view) hold no ciphertext either.
    state, events = await _config_text(gateway)
    assert stored.private_key_enc in state and fresh.private_key_enc in state
    for text in (state, events):
        assert KEY[2:] not in text and other[2:] not in text
    assert stored.private_key_enc not in events and fresh.private_key_enc not in events
    assert "has_private_key" in events

    deleted = await admin.ok("DELETE", f"{W}/{wid}")
    assert deleted["deleted"] is True and deleted["id"] == wid
    _no_secret(deleted, other, fresh.private_key_enc)
    status, _, _ = await admin.call("GET", f"{W}/{wid}")
    assert status == 404
    status, err, _ = await admin.call("PATCH", f"{W}/{wid}", {"name": "x"})
    assert status == 404 and err["error"]["code"] == "wallet_not_found"
    assert (await admin.ok("GET", f"{W}?workspace_id={ws['ws']}"))["data"] == []


async def test_an_omitted_key_is_generated(gateway: Gateway, admin: Admin, ws: dict[str, str]) -> None:
    first = await admin.ok("POST", W, _body(ws["ws"]))
    second = await admin.ok("POST", W, _body(ws["ws"]))
    assert first["has_private_key"] is True and first["address"] != second["address"]
    stored = await _kv_wallet(gateway, first["id"])
    key = _keyring(gateway).decrypt(stored.private_key_enc).reveal()
    assert address_of(key) == first["address"] == stored.address
    _no_secret(first, key, stored.private_key_enc)


# ---- every refusal names its field and writes nothing -------------------------------------------

BAD: list[tuple[str, dict[str, Any], str, str | None, tuple[str, ...]]] = [
    # (case, change to the good body, param, code, words in the message)
    ("name", {"name": "has space"}, "name", "invalid_name", ("'name'", "letters, digits")),
    ("key-format", {"private_key": "0x1234"}, "private_key", "invalid_private_key", ("64 hex",)),
    ("key-scalar", {"private_key": "0x" + "00" * 32}, "private_key", "invalid_private_key", ("secp256k1",)),
    ("assets-empty", {"assets": []}, "assets", "missing_assets", ("'assets'",)),
    ("assets-many", {"assets": [ASSET | {"network": f"eip155:{i}"} for i in range(17)]}, "assets",
     "too_many_assets", ("16",)),
    ("network", {"assets": [ASSET | {"network": "base"}]}, "assets[0].network", "invalid_network",
     ("eip155:<chain id>",)),
    ("asset", {"assets": [ASSET | {"asset": "USDC"}]}, "assets[0].asset", "invalid_address", ("0x and 40 hex",)),
    ("amount", {"assets": [ASSET | {"max_amount": "0.5"}]}, "assets[0].max_amount", "invalid_amount",
     ("atomic units",)),
    ("decimals", {"assets": [ASSET | {"decimals": 19}]}, "assets[0].decimals", "invalid_decimals", ("0 and 18",)),
    ("domain", {"assets": [ASSET | {"domain_name": "USDC"}]}, "assets[0].domain_version", "incomplete_domain",
     ("both",)),
    ("duplicate", {"assets": [ASSET, ASSET | {"asset": USDC.upper().replace("0X", "0x")}]}, "assets[1]",
     "duplicate_asset", ("assets[0]",)),
    ("rails", {"rails": ["x402", "stripe"]}, "rails", "invalid_rails", ("x402", "mpp")),
    ("alias-name", {"aliases": {"a b": UPSTREAM}}, "aliases", "invalid_alias", ("/egress/{alias}",)),
    ("alias-url", {"aliases": {"s": "ftp://a.example"}}, "aliases.s", "invalid_url", ("http://",)),
    ("alias-metadata", {"aliases": {"s": "http://169.254.169.254/latest"}}, "aliases.s", "base_url_not_allowed",
     ("'aliases.s'", "169.254.169.254")),
    ("alias-private", {"aliases": {"s": "http://10.1.2.3/"}}, "aliases.s", "base_url_not_allowed", ("10.1.2.3",)),
    ("alias-internal-name", {"aliases": {"s": "http://metadata.google.internal/"}}, "aliases.s",
     "base_url_not_allowed", ("metadata",)),
    ("aliases-many", {"aliases": {f"a{i}": UPSTREAM for i in range(33)}}, "aliases", "too_many_aliases", ("32",)),
    ("agent-twice", {"agent_ids": ["agent_a", "agent_a"]}, "agent_ids[1]", "duplicate_agent", ("agent_a",)),
]


@pytest.mark.parametrize("change, param, code, words", [case[1:] for case in BAD], ids=[case[0] for case in BAD])
async def test_bad_input_is_refused(gateway: Gateway, admin: Admin, ws: dict[str, str], change: dict[str, Any],
                                    param: str, code: str | None, words: tuple[str, ...]) -> None:
    await _refused(gateway, admin, "POST", W, _body(ws["ws"]) | change, 400, param, code, *words)
    # The same change as a PATCH of a good wallet: refused the same way, the wallet unchanged.
    good = await admin.ok("POST", W, _body(ws["ws"]))
    await _refused(gateway, admin, "PATCH", f"{W}/{good['id']}", change, 400, param, code, *words)
    assert await admin.ok("GET", f"{W}/{good['id']}") == {
        k: v for k, v in good.items() if k not in ("revision", "snapshot_revision", "propagated")}


async def test_missing_fields_and_unknown_ones(gateway: Gateway, admin: Admin, ws: dict[str, str]) -> None:
    body = _body(ws["ws"])
    await _refused(gateway, admin, "POST", W, {k: v for k, v in body.items() if k != "assets"}, 400, "assets",
                   "missing_assets", "needs 'assets'")
    await _refused(gateway, admin, "POST", W, body | {"address": ADDRESS}, 400, None, None,
                   "unknown field `address`")
    good = await admin.ok("POST", W, body)
    await _refused(gateway, admin, "PATCH", f"{W}/{good['id']}", {"workspace_id": "other"}, 400, None, None,
                   "unknown field `workspace_id`")
    await _refused(gateway, admin, "PATCH", f"{W}/{good['id']}", {}, 400, None, "empty_patch", "Nothing to change")


async def test_names_are_unique_in_a_workspace(gateway: Gateway, admin: Admin, ws: dict[str, str]) -> None:
    first = await admin.ok("POST", W, _body(ws["ws"]))
    err = await _refused(gateway, admin, "POST", W, _body(ws["ws"], name=first["name"]), 409, "name", "name_taken",
                         f"'{first['name']}'", "unique in a workspace")
    assert err["type"] == "invalid_request_error"
    second = await admin.ok("POST", W, _body(ws["ws"]))
    await _refused(gateway, admin, "PATCH", f"{W}/{second['id']}", {"name": first["name"]}, 409, "name",
                   "name_taken")
    # Another workspace may use the name; re-saving a wallet with its own name is no conflict; a
    # deleted wallet's name is free again.
    other_ws = f"wal{secrets.token_hex(4)}"
    await admin.ok("POST", f"{A}/workspaces", {"id": other_ws, "name": "Other"})
    await admin.ok("POST", W, _body(other_ws, name=first["name"]))
    await admin.ok("PATCH", f"{W}/{first['id']}", {"name": first["name"], "rails": ["mpp"]})
    await admin.ok("DELETE", f"{W}/{first['id']}")
    await admin.ok("PATCH", f"{W}/{second['id']}", {"name": first["name"]})


async def test_agent_references(gateway: Gateway, admin: Admin, ws: dict[str, str]) -> None:
    w = ws["ws"]
    await _refused(gateway, admin, "POST", W, _body(w, agent_ids=[ws["agent"], "agent_nope"]), 404, "agent_ids[1]",
                   "agent_not_found", "agent_nope")
    other_ws = f"wal{secrets.token_hex(4)}"
    await admin.ok("POST", f"{A}/workspaces", {"id": other_ws, "name": "Other"})
    stranger = await admin.ok("POST", f"{A}/agents", {"workspace_id": other_ws, "name": "Stranger"})
    await _refused(gateway, admin, "POST", W, _body(w, agent_ids=[stranger["id"]]), 400, "agent_ids[0]",
                   "agent_workspace_mismatch", stranger["id"], w)
    await _refused(gateway, admin, "POST", W, _body("nope-" + w), 404, "workspace_id", "workspace_not_found")

    # An agent a wallet names cannot be deleted under it.
    wallet = await admin.ok("POST", W, _body(w, agent_ids=[ws["agent"]]))
    await _refused(gateway, admin, "DELETE", f"{A}/agents/{ws['agent']}", None, 409, None, "still_referenced",
                   f"wallet {wallet['id']}")
    await admin.ok("PATCH", f"{W}/{wallet['id']}", {"agent_ids": []})
    await admin.ok("DELETE", f"{A}/agents/{ws['agent']}")


# ---- CLI -----------------------------------------------------------------------------------------

async def test_cli(gateway: Gateway, admin: Admin, ws: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    w, name = ws["ws"], _name()
    help_text = run_cli(gateway, "wallets", "create", "--help").stdout
    for word in ("--name", "--asset", "NETWORK:ASSET:MAX_AMOUNT", "--agent", "--alias", "NAME=URL", "--rail",
                 "--private-key-env", "--json", "atomic units", "never"):
        assert word in help_text, word
    # The key travels in an environment variable (run_cli passes the environment on), never argv.
    monkeypatch.setenv("WALLET_CLI_TEST_KEY", KEY)
    created = cli_json(gateway, "wallets", "create", "-w", w, "--name", name, "--asset",
                       f"eip155:84532:{USDC}:1000000:6", "--asset", f"eip155:8453:{USDC}:250",
                       "--agent", ws["agent"], "--alias", f"search={UPSTREAM}", "--rail", "x402",
                       "--private-key-env", "WALLET_CLI_TEST_KEY")
    wid = created["id"]
    assert (created["name"], created["address"], created["has_private_key"], created["agent_ids"],
            created["aliases"], created["rails"]) == (name, ADDRESS, True, [ws["agent"]], {"search": UPSTREAM},
                                                      ["x402"])
    assert [(a["network"], a["max_amount"]) for a in created["assets"]] == [("eip155:84532", "1000000"),
                                                                            ("eip155:8453", "250")]
    _no_secret(created, KEY)
    listed = cli_json(gateway, "wallets", "list", "-w", w)
    assert [x["id"] for x in listed["data"]] == [wid]
    got = cli_json(gateway, "wallets", "get", wid)
    assert got["address"] == ADDRESS
    _no_secret([listed, got], KEY)

    updated = cli_json(gateway, "wallets", "update", wid, "--rail", "mpp", "--rail", "x402")
    assert (updated["rails"], updated["address"], updated["name"]) == (["mpp", "x402"], ADDRESS, name)
    generated = cli_json(gateway, "wallets", "create", "-w", w, "--name", _name(), "--asset",
                         f"eip155:84532:{USDC}:1")
    assert generated["address"] != ADDRESS and generated["has_private_key"] is True

    # A refusal exits non-zero naming the problem; a missing variable is caught before any call.
    bad = run_cli(gateway, "wallets", "create", "-w", w, "--name", _name(), "--asset", f"base:1:{USDC}:1",
                  check=False)
    assert bad.returncode != 0 and "eip155" in bad.stderr
    taken = run_cli(gateway, "wallets", "create", "-w", w, "--name", name, "--asset", f"eip155:1:{USDC}:1",
                    check=False)
    assert taken.returncode != 0 and "409" in taken.stderr and "name" in taken.stderr
    unset = run_cli(gateway, "wallets", "update", wid, "--private-key-env", "WALLET_CLI_UNSET_VAR", check=False)
    assert unset.returncode != 0 and "WALLET_CLI_UNSET_VAR" in unset.stderr

    assert cli_json(gateway, "wallets", "delete", wid)["deleted"] is True
    assert run_cli(gateway, "wallets", "get", wid, check=False).returncode != 0
