"""The paid endpoints admin API and CLI on the real stack: create, list, get (with the revenue
recorded for the endpoint), PATCH and DELETE; every refused body names its field and problem and
writes nothing; slugs unique across the gateway; `agent_id` and `serve.model` references checked
(and the agent, provider or router an endpoint uses cannot be deleted under it); revenue from a
`payment.inbound` event folded by the stack's finance projector."""

from __future__ import annotations

import datetime as dt
import json
import secrets
from typing import Any

import aiohttp
import pytest
import pytest_asyncio

from events.jetstream import connect
from events.publisher import EventPublisher
from schemas.events import PaymentInbound
from schemas.ids import uuid7
from tests.conftest import AdminHttp as Admin
from tests.conftest import Gateway, cli_json, eventually, run_cli
from tests.integration.test_routers_admin import _refused

A = "/admin/v1"
P = f"{A}/paid-endpoints"
PAY_TO = "0x" + "12" * 20
USDC = "0x036CbD53842c5426634e7929541eC2318f3dCF7e"
# A loopback address (the stack allows 127.0.0.1 for its fakes): the tests resolve no public names.
FACILITATOR = "http://127.0.0.1:9/facilitator"
X402: dict[str, Any] = {"network": "eip155:84532", "pay_to": PAY_TO, "facilitator_url": FACILITATOR}


@pytest_asyncio.fixture
async def ws(admin: Admin) -> dict[str, str]:
    """A fresh workspace with a provider `mock`, an agent and a router `main`; their ids."""
    ws_id = f"paid{secrets.token_hex(4)}"
    await admin.ok("POST", f"{A}/workspaces", {"id": ws_id, "name": "Paid endpoints"})
    await admin.ok("POST", f"{A}/providers", {"workspace_id": ws_id, "name": "mock", "type": "mock"})
    agent = await admin.ok("POST", f"{A}/agents", {"workspace_id": ws_id, "name": "Seller"})
    router = await admin.ok("POST", f"{A}/routers", {"workspace_id": ws_id, "name": "main",
                                                     "targets": [{"model": "mock/echo"}]})
    return {"ws": ws_id, "agent": agent["id"], "router": router["id"]}


def _slug() -> str:
    return f"s-{secrets.token_hex(5)}"


def _body(ws: str, **extra: Any) -> dict[str, Any]:
    return {"workspace_id": ws, "slug": _slug(), "serve": {"model": "mock/echo"},
            "price": {"per_call": {"amount": "10000", "asset": USDC}}, "rails": {"x402": X402}} | extra


# ---- create, list, get, patch, delete ----------------------------------------------------------

async def test_paid_endpoint_lifecycle(admin: Admin, ws: dict[str, str]) -> None:
    body = _body(ws["ws"], agent_id=ws["agent"], workflow_id="wf-sell", description="Echo, a cent a call")
    created = await admin.ok("POST", P, body)
    pid = created["id"]
    assert pid.startswith("paid_") and created["propagated"] is True
    assert isinstance(created["revision"], int) and created["revision"] == created["snapshot_revision"]
    assert (created["workspace_id"], created["slug"], created["serve"], created["agent_id"], created["workflow_id"],
            created["description"]) == (ws["ws"], body["slug"], {"model": "mock/echo"}, ws["agent"], "wf-sell",
                                        "Echo, a cent a call")
    # Defaults are shown with the values given.
    assert created["price"] == {"per_call": {"amount": "10000", "asset": USDC, "decimals": 6}}
    assert created["rails"] == {"x402": X402 | {"versions": [2, 1], "scheme": "exact", "max_timeout_s": 60,
                                                "extra": {}}}

    got = await admin.ok("GET", f"{P}/{pid}")
    assert (got["revenue_usd"], got["revenue_nanos"], got["calls"]) == ("0", 0, 0)
    assert (got["cost_nanos"], got["margin_nanos"], got["margin_usd"]) == (0, 0, "0")
    assert (got["refunds_due_usd"], got["refunds_due_nanos"]) == ("0", 0)
    books = ("revenue_usd", "revenue_nanos", "calls", "cost_usd", "cost_nanos", "margin_usd", "margin_nanos",
             "refunds_due_usd", "refunds_due_nanos")
    assert {k: v for k, v in got.items() if k not in books} == {
        k: v for k, v in created.items() if k not in ("revision", "snapshot_revision", "propagated")}
    listed = await admin.ok("GET", f"{P}?workspace_id={ws['ws']}")
    assert [e["id"] for e in listed["data"]] == [pid]
    other = await admin.ok("GET", f"{P}?workspace_id=nobody-{ws['ws']}")
    assert other["data"] == []

    # PATCH: the fields given; serve, price and rails replaced whole and re-validated.
    patched = await admin.ok("PATCH", f"{P}/{pid}", {
        "serve": {"backend_url": "http://127.0.0.1:9/api"}, "agent_id": None,
        "price": {"per_call": {"amount": "2500", "asset": USDC, "decimals": 6}},
        "rails": {"x402": X402 | {"versions": [2], "max_timeout_s": 120, "extra": {"name": "USDC", "version": "2"}}}})
    assert patched["revision"] > created["revision"]
    assert (patched["serve"], patched["agent_id"], patched["slug"], patched["workflow_id"]) == (
        {"backend_url": "http://127.0.0.1:9/api"}, None, body["slug"], "wf-sell")
    assert patched["price"]["per_call"]["amount"] == "2500"
    assert patched["rails"]["x402"]["versions"] == [2] and patched["rails"]["x402"]["extra"]["version"] == "2"
    again = await admin.ok("PATCH", f"{P}/{pid}", {"serve": {"model": "router/main"}, "slug": _slug()})
    assert again["serve"] == {"model": "router/main"}
    mpp = {"realm": "gw", "recipient": "0x" + "ab" * 20, "network": "eip155:84532",
           "relayer_url": "http://127.0.0.1:9/mpp"}
    both = await admin.ok("PATCH", f"{P}/{pid}", {"rails": {"x402": X402, "mpp": mpp}})
    assert both["rails"]["mpp"] == mpp | {"methods": ["evm"], "challenge_ttl_s": 300}  # every rail is shown
    assert set((await admin.ok("GET", f"{P}/{pid}"))["rails"]) == {"x402", "mpp"}

    deleted = await admin.ok("DELETE", f"{P}/{pid}")
    assert deleted["deleted"] is True and deleted["id"] == pid
    status, err, _ = await admin.call("GET", f"{P}/{pid}")
    assert status == 404 and err["error"]["code"] == "paid_endpoint_not_found"
    status, err, _ = await admin.call("PATCH", f"{P}/{pid}", {"description": "x"})
    assert status == 404 and err["error"]["code"] == "paid_endpoint_not_found"
    assert (await admin.ok("GET", f"{P}?workspace_id={ws['ws']}"))["data"] == []


# ---- every refusal names its field and writes nothing -------------------------------------------

def _without(body: dict[str, Any], field: str) -> dict[str, Any]:
    return {k: v for k, v in body.items() if k != field}


BAD: list[tuple[str, Any, str, str | None, tuple[str, ...]]] = [
    # (case, change to the good body, param, code, words in the message)
    ("slug", {"slug": "has space"}, "slug", "invalid_slug", ("'slug'", "letters, digits")),
    ("slug-long", {"slug": "x" * 65}, "slug", "invalid_slug", ("1 to 64",)),
    ("serve-none", {"serve": {}}, "serve", "invalid_serve", ("exactly one",)),
    ("serve-both", {"serve": {"model": "mock/echo", "backend_url": "https://a.example"}}, "serve", "invalid_serve",
     ("exactly one", "backend_url, model")),
    ("backend-scheme", {"serve": {"backend_url": "ftp://a.example"}}, "serve.backend_url", "invalid_url",
     ("http:// or https://",)),
    ("backend-metadata", {"serve": {"backend_url": "http://169.254.169.254/latest"}}, "serve.backend_url",
     "base_url_not_allowed", ("'serve.backend_url'", "169.254.169.254")),
    ("backend-private", {"serve": {"backend_url": "http://10.1.2.3/"}}, "serve.backend_url", "base_url_not_allowed",
     ("10.1.2.3",)),
    ("model", {"serve": {"model": "mock/"}}, "serve.model", "invalid_model", ("'provider/model'",)),
    ("amount-zero", {"price": {"per_call": {"amount": "0", "asset": USDC}}}, "price.per_call.amount",
     "invalid_amount", ("positive integer string",)),
    ("amount-decimal", {"price": {"per_call": {"amount": "0.01", "asset": USDC}}}, "price.per_call.amount",
     "invalid_amount", ("atomic units",)),
    ("amount-huge", {"price": {"per_call": {"amount": str(10**30), "asset": USDC}}}, "price.per_call.amount",
     "invalid_amount", ("10^30",)),
    ("asset", {"price": {"per_call": {"amount": "1", "asset": ""}}}, "price.per_call.asset", "invalid_asset",
     ("asset",)),
    ("decimals", {"price": {"per_call": {"amount": "1", "asset": USDC, "decimals": 19}}}, "price.per_call.decimals",
     "invalid_decimals", ("0 and 18",)),
    ("per-call", {"price": {}}, "price.per_call", "missing_price", ("needs 'price.per_call'",)),
    ("rails-empty", {"rails": {}}, "rails", "missing_rail", ("x402", "mpp")),
    ("mpp-method", {"rails": {"mpp": {"realm": "gw", "recipient": "0x" + "ab" * 20, "network": "eip155:84532",
                                      "relayer_url": "http://127.0.0.1:9", "methods": ["tempo"]}}},
     "rails.mpp.methods", "unsupported_method", ("evm",)),
    ("network", {"rails": {"x402": X402 | {"network": "base-sepolia"}}}, "rails.x402.network", "invalid_network",
     ("eip155:<chain id>",)),
    ("pay-to", {"rails": {"x402": X402 | {"pay_to": "0x1234"}}}, "rails.x402.pay_to", "invalid_address",
     ("0x and 40 hex",)),
    ("facilitator-scheme", {"rails": {"x402": X402 | {"facilitator_url": "gopher://f.example"}}},
     "rails.x402.facilitator_url", "invalid_url", ("http://",)),
    ("facilitator-loopback-name", {"rails": {"x402": X402 | {"facilitator_url": "http://metadata.google.internal/"}}},
     "rails.x402.facilitator_url", "base_url_not_allowed", ("metadata",)),
    ("versions", {"rails": {"x402": X402 | {"versions": [3]}}}, "rails.x402.versions", "invalid_versions",
     ("[1, 2]",)),
    ("versions-empty", {"rails": {"x402": X402 | {"versions": []}}}, "rails.x402.versions", "invalid_versions",
     ("non-empty",)),
    ("scheme", {"rails": {"x402": X402 | {"scheme": "upto"}}}, "rails.x402.scheme", "unsupported_scheme",
     ("'exact'",)),
    ("timeout", {"rails": {"x402": X402 | {"max_timeout_s": 3601}}}, "rails.x402.max_timeout_s", "invalid_timeout",
     ("1 and 3600",)),
]


@pytest.mark.parametrize("change, param, code, words", [case[1:] for case in BAD], ids=[case[0] for case in BAD])
async def test_bad_input_is_refused(gateway: Gateway, admin: Admin, ws: dict[str, str], change: dict[str, Any],
                                    param: str, code: str | None, words: tuple[str, ...]) -> None:
    await _refused(gateway, admin, "POST", P, _body(ws["ws"]) | change, 400, param, code, *words)
    # The same body as a PATCH of a good endpoint: refused the same way, the endpoint unchanged.
    good = await admin.ok("POST", P, _body(ws["ws"]))
    await _refused(gateway, admin, "PATCH", f"{P}/{good['id']}", change, 400, param, code, *words)
    assert (await admin.ok("GET", f"{P}/{good['id']}"))["slug"] == good["slug"]


async def test_missing_price_or_rails(gateway: Gateway, admin: Admin, ws: dict[str, str]) -> None:
    body = _body(ws["ws"])
    await _refused(gateway, admin, "POST", P, _without(body, "price"), 400, "price", "missing_price", "needs 'price'")
    await _refused(gateway, admin, "POST", P, _without(body, "rails"), 400, "rails", "missing_rail", "needs 'rails'")
    await _refused(gateway, admin, "POST", P, _without(body, "serve"), 400, "serve", "invalid_serve", "needs 'serve'")
    await _refused(gateway, admin, "POST", P, body | {"price": {"per_call": {"amount": 10000, "asset": USDC}}}, 400,
                   "price.per_call.amount", None, "Expected `str`")
    await _refused(gateway, admin, "POST", P, body | {"fee": 1}, 400, None, None, "unknown field `fee`")
    good = await admin.ok("POST", P, body)
    await _refused(gateway, admin, "PATCH", f"{P}/{good['id']}", {"workspace_id": "other"}, 400, None, None,
                   "unknown field `workspace_id`")
    await _refused(gateway, admin, "PATCH", f"{P}/{good['id']}", {}, 400, None, "empty_patch", "Nothing to change")


async def test_slugs_are_unique_across_the_gateway(gateway: Gateway, admin: Admin, ws: dict[str, str]) -> None:
    first = await admin.ok("POST", P, _body(ws["ws"]))
    other_ws = f"paid{secrets.token_hex(4)}"
    await admin.ok("POST", f"{A}/workspaces", {"id": other_ws, "name": "Other"})
    await admin.ok("POST", f"{A}/providers", {"workspace_id": other_ws, "name": "mock", "type": "mock"})
    err = await _refused(gateway, admin, "POST", P, _body(other_ws, slug=first["slug"]), 409, "slug", "slug_taken",
                         f"'{first['slug']}'", "unique across the gateway")
    assert err["type"] == "invalid_request_error"
    second = await admin.ok("POST", P, _body(other_ws))
    await _refused(gateway, admin, "PATCH", f"{P}/{second['id']}", {"slug": first["slug"]}, 409, "slug",
                   "slug_taken")
    # Re-saving an endpoint with its own slug is no conflict; a deleted endpoint's slug is free again.
    await admin.ok("PATCH", f"{P}/{first['id']}", {"slug": first["slug"], "description": "same"})
    await admin.ok("DELETE", f"{P}/{first['id']}")
    await admin.ok("PATCH", f"{P}/{second['id']}", {"slug": first["slug"]})


async def test_references(gateway: Gateway, admin: Admin, ws: dict[str, str]) -> None:
    w = ws["ws"]
    await _refused(gateway, admin, "POST", P, _body(w, agent_id="agent_nope"), 404, "agent_id", "agent_not_found",
                   "agent_nope")
    await _refused(gateway, admin, "POST", P, _body(w, serve={"model": "nope/echo"}), 404, "serve.model",
                   "provider_not_found", "'nope'")
    await _refused(gateway, admin, "POST", P, _body(w, serve={"model": "router/nope"}), 404, "serve.model",
                   "router_not_found", "'nope'")
    other_ws = f"paid{secrets.token_hex(4)}"
    await admin.ok("POST", f"{A}/workspaces", {"id": other_ws, "name": "Other"})
    stranger = await admin.ok("POST", f"{A}/agents", {"workspace_id": other_ws, "name": "Stranger"})
    await _refused(gateway, admin, "POST", P, _body(w, agent_id=stranger["id"]), 400, "agent_id",
                   "agent_workspace_mismatch", stranger["id"], w)
    # An alias name is resolved per call, so it is not checked here.
    await admin.ok("POST", P, _body(w, serve={"model": "some-alias"}))

    # What an endpoint uses cannot be deleted under it.
    ep = await admin.ok("POST", P, _body(w, agent_id=ws["agent"]))
    by_router = await admin.ok("POST", P, _body(w, serve={"model": "router/main"}))
    for path, user in ((f"{A}/agents/{ws['agent']}", ep["id"]), (f"{A}/providers/{w}.mock", ep["id"]),
                       (f"{A}/routers/{ws['router']}", by_router["id"])):
        err = await _refused(gateway, admin, "DELETE", path, None, 409, None, "still_referenced", f"paid {user}")
        assert "paid" in err["message"]
    await admin.ok("PATCH", f"{P}/{ep['id']}", {"agent_id": None, "serve": {"backend_url": "http://127.0.0.1:9/"}})
    await admin.ok("DELETE", f"{A}/agents/{ws['agent']}")


# ---- revenue -------------------------------------------------------------------------------------

async def test_get_shows_the_revenue_recorded(gateway: Gateway, admin: Admin, ws: dict[str, str]) -> None:
    ep = await admin.ok("POST", P, _body(ws["ws"], agent_id=ws["agent"]))
    other = await admin.ok("POST", P, _body(ws["ws"]))
    nc = await connect(gateway.nats_url, "alephant-tests")
    try:
        publisher = EventPublisher(nc.jetstream(), stream=gateway.stream, subject_prefix=gateway.subject_prefix)
        await publisher.publish(PaymentInbound(
            event_id=uuid7(), occurred_at=dt.datetime.now(dt.UTC), workspace_id=ws["ws"], agent_id=ws["agent"],
            payment_id=f"pi-{secrets.token_hex(4)}", amount_nanos=10_000_000, rail="x402", endpoint_id=ep["id"],
            payer="0x" + "9" * 40))
    finally:
        await nc.close()

    async def folded() -> dict[str, Any] | None:
        got: dict[str, Any] = await admin.ok("GET", f"{P}/{ep['id']}")
        return got if got["calls"] else None

    got = await eventually(folded, timeout=60)
    assert (got["revenue_usd"], got["revenue_nanos"], got["calls"]) == ("0.01", 10_000_000, 1)
    untouched = await admin.ok("GET", f"{P}/{other['id']}")
    assert (untouched["revenue_usd"], untouched["calls"]) == ("0", 0)


# ---- CLI -----------------------------------------------------------------------------------------

async def test_cli(gateway: Gateway, admin: Admin, ws: dict[str, str]) -> None:
    w, slug = ws["ws"], _slug()
    help_text = run_cli(gateway, "paid", "create", "--help").stdout
    for word in ("--slug", "--model", "--backend-url", "--amount", "--asset", "--network", "--pay-to",
                 "--facilitator", "--x402-versions", "--agent", "--workflow", "--json", "atomic units"):
        assert word in help_text, word
    created = cli_json(gateway, "paid", "create", "-w", w, "--slug", slug, "--model", "mock/echo", "--amount", "10000",
                       "--asset", USDC, "--network", "eip155:84532", "--pay-to", PAY_TO, "--facilitator", FACILITATOR,
                       "--x402-versions", "2,1", "--agent", ws["agent"], "--workflow", "wf-cli")
    pid = created["id"]
    assert (created["slug"], created["serve"], created["agent_id"], created["workflow_id"]) == (
        slug, {"model": "mock/echo"}, ws["agent"], "wf-cli")
    assert created["rails"]["x402"]["versions"] == [2, 1]
    assert [e["id"] for e in cli_json(gateway, "paid", "list", "-w", w)["data"]] == [pid]
    shown = cli_json(gateway, "paid", "show", pid)
    assert (shown["slug"], shown["revenue_usd"], shown["calls"]) == (slug, "0", 0)

    # An update of one price or x402 flag keeps the other settings.
    updated = cli_json(gateway, "paid", "update", pid, "--amount", "500", "--x402-versions", "2",
                       "--backend-url", "http://127.0.0.1:9/x")
    assert updated["price"]["per_call"] == {"amount": "500", "asset": USDC, "decimals": 6}
    assert updated["rails"]["x402"]["versions"] == [2] and updated["rails"]["x402"]["pay_to"] == PAY_TO
    assert updated["serve"] == {"backend_url": "http://127.0.0.1:9/x"}

    # --json for the whole body; a refusal exits non-zero naming the problem.
    body = _body(w)
    from_json = cli_json(gateway, "paid", "create", "--json", json.dumps(body))
    assert (from_json["workspace_id"], from_json["slug"]) == (w, body["slug"])
    bad = run_cli(gateway, "paid", "create", "-w", w, "--slug", _slug(), "--model", "mock/echo", "--amount", "1",
                  "--asset", USDC, "--network", "base", "--pay-to", PAY_TO, "--facilitator", FACILITATOR, check=False)
    assert bad.returncode != 0 and "eip155" in bad.stderr
    taken = run_cli(gateway, "paid", "create", "--json", json.dumps(_body(w, slug=slug)), check=False)
    assert taken.returncode != 0 and "409" in taken.stderr and "taken" in taken.stderr

    assert cli_json(gateway, "paid", "delete", pid)["deleted"] is True
    assert run_cli(gateway, "paid", "show", pid, check=False).returncode != 0


async def test_openapi_documents_the_routes(gateway: Gateway, http: aiohttp.ClientSession) -> None:
    async with http.get(gateway.stack.admin_url + "/admin/v1/openapi.json") as resp:
        doc = await resp.json()
    assert "CreatePaidEndpoint" in doc["components"]["schemas"]
    assert set(doc["paths"]["/admin/v1/paid-endpoints/{id}"]) == {"get", "patch", "delete"}
