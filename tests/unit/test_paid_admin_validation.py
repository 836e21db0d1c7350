"""Paid endpoint admin inputs: the checks that need no database (each refusal a 400 naming the
field path and the problem), the public view, and the OpenAPI entries."""

from __future__ import annotations

import argparse
from typing import Any

import msgspec
import pytest

from controlplane import commands as c
from controlplane.app import openapi_document
from controlplane.inputs import given_fields
from controlplane.paid_admin import PAID_ENDPOINT, CreatePaidEndpoint, PatchPaidEndpoint
from deploy.admin_cli import paid_body, parse_per_token, parse_versions
from schemas.entities import PaidAmount, PaidEndpoint, PaidPrice, PaidRails, PaidServe, X402Rail
from schemas.errors import InvalidRequest

PAY_TO = "0x" + "ab" * 20
X402: dict[str, Any] = {"network": "eip155:84532", "pay_to": PAY_TO, "facilitator_url": "https://x402.org/facilitator"}
BASE: dict[str, Any] = {
    "workspace_id": "demo", "slug": "summarize", "serve": {"model": "openai/gpt-4o"},
    "price": {"per_call": {"amount": "10000", "asset": "0x036CbD53842c5426634e7929541eC2318f3dCF7e"}},
    "rails": {"x402": X402},
}


def _refused(raw: dict[str, Any], param: str | None, code: str | None, *words: str) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as info:
        c.parse_command(raw, CreatePaidEndpoint)
    err = info.value
    assert err.status == 400
    assert (err.param, err.code) == (param, code), err.message
    for word in words:
        assert word in err.message, (word, err.message)
    return err


def _with(path: str, value: Any) -> dict[str, Any]:
    """BASE with the field at dotted `path` set to `value` (msgspec.UNSET: removed)."""
    body: dict[str, Any] = msgspec.json.decode(msgspec.json.encode(BASE))
    *parents, last = path.split(".")
    node = body
    for p in parents:
        node = node[p]
    if value is msgspec.UNSET:
        del node[last]
    else:
        node[last] = value
    return body


def test_a_minimal_body_parses_with_defaults() -> None:
    cmd = c.parse_command(BASE, CreatePaidEndpoint)
    assert cmd.serve is not None and cmd.serve.model == "openai/gpt-4o" and cmd.serve.backend_url is None
    assert cmd.price is not None and cmd.price.per_call is not None and cmd.price.per_call.decimals == 6
    assert cmd.rails is not None and cmd.rails.x402 is not None
    x = cmd.rails.x402
    assert (x.versions, x.scheme, x.max_timeout_s, x.extra) == ((2, 1), "exact", 60, {})


def test_a_full_body_parses() -> None:
    raw = BASE | {"serve": {"backend_url": "https://api.example.com/v1"}, "agent_id": "agent_1",
                  "workflow_id": "wf-research", "description": "Summaries, $0.01 each",
                  "price": {"per_call": {"amount": "1", "asset": "USDC", "decimals": 0}},
                  "rails": {"x402": X402 | {"versions": [1], "max_timeout_s": 3600,
                                            "extra": {"name": "USDC", "version": "2"}}}}
    cmd = c.parse_command(raw, CreatePaidEndpoint)
    assert cmd.rails is not None and cmd.rails.x402 is not None and cmd.rails.x402.versions == (1,)
    assert cmd.agent_id == "agent_1" and cmd.workflow_id == "wf-research"


@pytest.mark.parametrize("slug", ["a", "A-b_9", "_x", "x" * 64, "-lead"])
def test_good_slugs(slug: str) -> None:
    c.parse_command(BASE | {"slug": slug}, CreatePaidEndpoint)


@pytest.mark.parametrize("slug", ["", "x" * 65, "has space", "a/b", "dot.ted", "ünï"])
def test_bad_slugs(slug: str) -> None:
    _refused(BASE | {"slug": slug}, "slug", "invalid_slug", "'slug'", "letters, digits")


@pytest.mark.parametrize("serve, words", [
    ({}, ("exactly one", "got 0")),
    ({"backend_url": "https://a.example", "model": "openai/gpt-4o"}, ("exactly one", "backend_url, model")),
])
def test_serve_needs_exactly_one(serve: dict[str, Any], words: tuple[str, ...]) -> None:
    _refused(BASE | {"serve": serve}, "serve", "invalid_serve", *words)


def test_serve_missing() -> None:
    _refused(_with("serve", msgspec.UNSET), "serve", "invalid_serve", "needs 'serve'")


@pytest.mark.parametrize("url", ["ftp://a.example/x", "a.example", "https://", "file:///etc/passwd", "http:///x"])
def test_backend_url_must_be_http(url: str) -> None:
    _refused(BASE | {"serve": {"backend_url": url}}, "serve.backend_url", "invalid_url", "http:// or https://")


@pytest.mark.parametrize("model", ["openai/", "/gpt", "router/", "router/a b", "bad name!/x", " spaced", "a/b/"])
def test_bad_models(model: str) -> None:
    _refused(BASE | {"serve": {"model": model}}, "serve.model", "invalid_model", "'provider/model'", "router/<name>")


@pytest.mark.parametrize("model", ["openai/gpt-4o", "router/main", "fast", "bedrock/anthropic.claude-v2:1"])
def test_good_models(model: str) -> None:
    c.parse_command(BASE | {"serve": {"model": model}}, CreatePaidEndpoint)


def test_price_missing() -> None:
    _refused(_with("price", msgspec.UNSET), "price", "missing_price", "needs 'price'")
    _refused(BASE | {"price": {}}, "price.per_call", "missing_price", "needs 'price.per_call'")


PER_TOKEN: dict[str, Any] = {"asset": "0x036CbD53842c5426634e7929541eC2318f3dCF7e", "input_per_mtok": "150000",
                             "output_per_mtok": "600000", "max_amount": "50000"}


def test_a_per_token_price_parses_and_needs_a_model_served_endpoint() -> None:
    cmd = c.parse_command(BASE | {"price": {"per_token": PER_TOKEN}}, CreatePaidEndpoint)
    assert cmd.price is not None and cmd.price.per_token is not None and cmd.price.per_call is None
    assert cmd.price.per_token.decimals == 6
    c.parse_command(BASE | {"price": {"per_token": PER_TOKEN | {"input_per_mtok": "0"}}}, CreatePaidEndpoint)
    _refused(BASE | {"price": {"per_token": PER_TOKEN}, "serve": {"backend_url": "https://agent.example/api"}},
             "price.per_token", "per_token_needs_model", "serve.model")
    _refused(BASE | {"price": {"per_call": BASE["price"]["per_call"], "per_token": PER_TOKEN}}, "price",
             "invalid_price", "not both")


@pytest.mark.parametrize(("field", "value", "param"), [
    ("input_per_mtok", "-1", "price.per_token.input_per_mtok"),
    ("output_per_mtok", "1.5", "price.per_token.output_per_mtok"),
    ("max_amount", "0", "price.per_token.max_amount"),
    ("max_amount", str(10**30), "price.per_token.max_amount"),
])
def test_bad_per_token_prices(field: str, value: str, param: str) -> None:
    _refused(BASE | {"price": {"per_token": PER_TOKEN | {field: value}}}, param, "invalid_amount")


def test_a_per_token_price_needs_a_rate_and_an_asset() -> None:
    _refused(BASE | {"price": {"per_token": PER_TOKEN | {"input_per_mtok": "0", "output_per_mtok": "0"}}},
             "price.per_token", "invalid_amount", "positive input or output rate")
    _refused(BASE | {"price": {"per_token": PER_TOKEN | {"asset": " "}}}, "price.per_token.asset", "invalid_asset")


@pytest.mark.parametrize("amount", ["0", "-1", "1.5", "", "abc", "01", "1e6", " 1", str(10**30), "9" * 31])
def test_bad_amounts(amount: str) -> None:
    _refused(_with("price.per_call.amount", amount), "price.per_call.amount", "invalid_amount",
             "positive integer string", "10^30")


def test_largest_amount_is_accepted() -> None:
    c.parse_command(_with("price.per_call.amount", str(10**30 - 1)), CreatePaidEndpoint)


def test_amount_must_be_a_string() -> None:
    err = _refused(_with("price.per_call.amount", 10000), "price.per_call.amount", None, "Expected `str`")
    assert err.status == 400


@pytest.mark.parametrize("asset", ["", "   "])
def test_asset_must_be_given(asset: str) -> None:
    _refused(_with("price.per_call.asset", asset), "price.per_call.asset", "invalid_asset", "empty")


@pytest.mark.parametrize("decimals", [-1, 19, 100])
def test_bad_decimals(decimals: int) -> None:
    _refused(_with("price.per_call.decimals", decimals), "price.per_call.decimals", "invalid_decimals", "0 and 18")


MPP: dict[str, Any] = {"realm": "gateway.example", "recipient": PAY_TO, "network": "eip155:84532",
                       "relayer_url": "https://relayer.example"}


def test_rails_missing_or_empty() -> None:
    _refused(_with("rails", msgspec.UNSET), "rails", "missing_rail", "needs 'rails'")
    _refused(BASE | {"rails": {}}, "rails", "missing_rail", "'x402', 'mpp' or both")


def test_mpp_alone_or_beside_x402_is_accepted() -> None:
    for rails in ({"mpp": MPP}, {"x402": X402, "mpp": MPP}):
        cmd = c.parse_command(BASE | {"rails": rails}, CreatePaidEndpoint)
        assert cmd.rails is not None and cmd.rails.mpp is not None and cmd.rails.mpp.methods == ("evm",)


@pytest.mark.parametrize(("field", "value", "code"), [
    ("network", "base", "invalid_network"), ("recipient", "0x12", "invalid_address"),
    ("methods", ["tempo"], "unsupported_method"), ("methods", [], "unsupported_method"),
    ("realm", " ", "invalid_realm"), ("challenge_ttl_s", 5, "invalid_ttl"),
])
def test_bad_mpp_rails(field: str, value: Any, code: str) -> None:
    _refused(BASE | {"rails": {"mpp": {**MPP, field: value}}}, f"rails.mpp.{field}", code)


@pytest.mark.parametrize("network", ["base-sepolia", "eip155:", "eip155:abc", "solana:mainnet", "EIP155:1",
                                     "eip155:1:2"])
def test_bad_networks(network: str) -> None:
    _refused(_with("rails.x402.network", network), "rails.x402.network", "invalid_network", "eip155:<chain id>")


@pytest.mark.parametrize("pay_to", ["", "0x123", "ab" * 20, "0x" + "g" * 40, "0x" + "a" * 41, PAY_TO + " "])
def test_bad_addresses(pay_to: str) -> None:
    _refused(_with("rails.x402.pay_to", pay_to), "rails.x402.pay_to", "invalid_address", "0x and 40 hex")


@pytest.mark.parametrize("url", ["", "ftp://f.example", "facilitator.example"])
def test_bad_facilitator_urls(url: str) -> None:
    _refused(_with("rails.x402.facilitator_url", url), "rails.x402.facilitator_url", "invalid_url", "http://")


@pytest.mark.parametrize("versions", [[], [3], [0, 1], [2, 2]])
def test_bad_versions(versions: list[int]) -> None:
    _refused(_with("rails.x402.versions", versions), "rails.x402.versions", "invalid_versions", "[1, 2]")


def test_only_the_exact_scheme() -> None:
    _refused(_with("rails.x402.scheme", "upto"), "rails.x402.scheme", "unsupported_scheme", "'exact'")


@pytest.mark.parametrize("timeout", [0, -5, 3601])
def test_bad_timeouts(timeout: int) -> None:
    _refused(_with("rails.x402.max_timeout_s", timeout), "rails.x402.max_timeout_s", "invalid_timeout",
             "1 and 3600")


def test_unknown_fields_are_refused() -> None:
    # The shared decoder names an unknown field in the message; `param` is the object holding it.
    _refused(BASE | {"colour": "red"}, None, None, "unknown field `colour`")
    _refused(_with("rails.x402.fee", 1), "rails.x402", None, "unknown field `fee`")


def test_patch_cannot_move_workspace_and_refuses_empty_fields() -> None:
    with pytest.raises(InvalidRequest) as info:
        c.parse_command({"workspace_id": "other"}, PatchPaidEndpoint)
    assert "unknown field `workspace_id`" in info.value.message
    patch = c.parse_command({"agent_id": None, "description": "x"}, PatchPaidEndpoint)
    assert given_fields(patch) == {"agent_id": None, "description": "x"}


def _entity() -> PaidEndpoint:
    return PaidEndpoint(id="paid_1", workspace_id="demo", slug="s", serve=PaidServe(model="openai/gpt-4o"),
                        price=PaidPrice(per_call=PaidAmount(amount="10000", asset="USDC")),
                        rails=PaidRails(x402=X402Rail(network="eip155:84532", pay_to=PAY_TO,
                                                      facilitator_url="https://f.example")))


def test_public_view_shows_every_setting_and_fields_round_trip() -> None:
    entity = _entity()
    view = msgspec.json.decode(msgspec.json.encode(c.public_view(entity)))  # as the API sends it
    assert view["serve"] == {"model": "openai/gpt-4o"}
    assert view["price"] == {"per_call": {"amount": "10000", "asset": "USDC", "decimals": 6}}
    assert view["rails"] == {"x402": {"network": "eip155:84532", "pay_to": PAY_TO,
                                      "facilitator_url": "https://f.example", "versions": [2, 1], "scheme": "exact",
                                      "max_timeout_s": 60, "extra": {}}}
    # A PATCH is merged over `fields` and re-validated as a create: the stored entity must pass.
    cmd = c.parse_command(PAID_ENDPOINT.fields(entity), CreatePaidEndpoint)
    assert cmd.slug == "s" and cmd.serve is not None and cmd.serve.model == "openai/gpt-4o"


def test_openapi_lists_the_paid_endpoint_routes() -> None:
    paths = openapi_document()["paths"]
    assert set(paths["/admin/v1/paid-endpoints"]) == {"post", "get"}
    assert set(paths["/admin/v1/paid-endpoints/{id}"]) == {"get", "patch", "delete"}
    assert "revenue_usd" in paths["/admin/v1/paid-endpoints/{id}"]["get"]["summary"]


def _cli_args(**given: Any) -> argparse.Namespace:
    names = ("json", "workspace", "slug", "model", "backend_url", "agent", "workflow", "description", "amount",
             "asset", "decimals", "network", "pay_to", "facilitator", "x402_versions", "max_timeout", "per_token")
    return argparse.Namespace(**({n: None for n in names} | given))


def test_cli_create_body_from_flags_and_json() -> None:
    body = paid_body(_cli_args(workspace="acme", slug="s", model="openai/gpt-4o", amount="10000", asset="USDC",
                               network="eip155:8453", pay_to=PAY_TO, facilitator="https://f.example",
                               x402_versions=parse_versions("2,1")), create=True)
    assert body == {"workspace_id": "acme", "slug": "s", "serve": {"model": "openai/gpt-4o"},
                    "price": {"per_call": {"amount": "10000", "asset": "USDC"}},
                    "rails": {"x402": {"network": "eip155:8453", "pay_to": PAY_TO, "facilitator_url": "https://f.example",
                                       "versions": [2, 1]}}}
    # --json is the whole body; flags win field by field, and the parsed command accepts it.
    from_json = paid_body(_cli_args(json=BASE, amount="5", backend_url="https://b.example"), create=True)
    assert from_json["workspace_id"] == "demo" and from_json["serve"] == {"backend_url": "https://b.example"}
    assert from_json["price"]["per_call"] == {"amount": "5", "asset": BASE["price"]["per_call"]["asset"]}
    c.parse_command(from_json, CreatePaidEndpoint)


def test_cli_update_merges_price_and_x402_flags_over_the_current_settings() -> None:
    current = c.public_view(_entity()) | {"revenue_usd": "0", "calls": 0}
    body = paid_body(_cli_args(amount="500", x402_versions=[2]), create=False, current=lambda: current)
    assert body == {"price": {"per_call": {"amount": "500", "asset": "USDC", "decimals": 6}},
                    "rails": {"x402": {**current["rails"]["x402"], "versions": [2]}}}
    c.parse_command(body, PatchPaidEndpoint)
    # Without price or x402 flags nothing is fetched.
    assert paid_body(_cli_args(slug="t"), create=False, current=lambda: pytest.fail("fetched")) == {"slug": "t"}


def test_cli_per_token_flag_builds_a_metered_price() -> None:
    body = paid_body(_cli_args(json=BASE, per_token=parse_per_token("150000, 600000,50000"), asset="USDC"),
                     create=True)
    assert body["price"] == {"per_token": {"asset": "USDC", "input_per_mtok": "150000", "output_per_mtok": "600000",
                                           "max_amount": "50000"}}
    c.parse_command(body, CreatePaidEndpoint)
    for bad in ("1,2", "a,b,c", "1,2,3,4", "-1,2,3"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_per_token(bad)


def test_cli_versions_parse() -> None:
    assert parse_versions("2,1") == [2, 1] and parse_versions("1") == [1]
    with pytest.raises(argparse.ArgumentTypeError):
        parse_versions("two")
