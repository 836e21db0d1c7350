"""Admin command bodies: every string capped and free of control characters, provider names that
collide with gateway routes refused, prices capped below what the ledger can hold (issue 7, "Why" 11)."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from controlplane import commands as c
from controlplane.app import openapi_document
from schemas.entities import RESERVED_PROVIDER_NAMES
from schemas.errors import InvalidRequest

PROVIDER = {"workspace_id": "demo", "name": "groq", "type": "openai", "base_url": "https://api.groq.com/openai/v1",
            "api_key": "gsk_0123456789", "options": {"api_version": "2024-10-21"}}


def _refused(schema: type[Any], raw: dict[str, Any]) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as info:
        c.parse_command(raw, schema)
    assert info.value.status == 400
    return info.value


@pytest.mark.parametrize(("schema", "raw", "param"), [
    (c.CreateWorkspace, {"name": "acme\x00corp"}, "name"),
    (c.CreateAgent, {"workspace_id": "demo", "name": "bot\r\nX-Injected: 1"}, "name"),
    (c.CreateVirtualKey, {"workspace_id": "demo", "name": "k\x1b[31m"}, "name"),
    (c.UpsertProvider, PROVIDER | {"api_key": "sk-abc\r\nX-Evil: 1"}, "api_key"),
    (c.UpsertProvider, PROVIDER | {"api_key": "sk-\x00"}, "api_key"),
    (c.UpsertProvider, PROVIDER | {"base_url": "https://example.com/\x00"}, "base_url"),
    (c.UpsertProvider, PROVIDER | {"options": {"region": "us-east-1\n"}}, "options.region"),
    (c.UpsertAlias, {"workspace_id": "demo", "alias": "fast", "target": "openai/gpt\x00-4o"}, "target"),
    (c.UpsertAlias, {"workspace_id": "demo", "alias": "fa\x7fst", "target": "openai/gpt-4o"}, "alias"),
    (c.UpsertPrice, {"provider": "openai", "model": "gpt\u00854o", "input_per_mtok_nanos": 1,
                     "output_per_mtok_nanos": 1}, "model"),
])
def test_control_characters_are_refused_naming_the_field(schema: type[Any], raw: dict[str, Any], param: str) -> None:
    err = _refused(schema, raw)
    assert err.param == param
    assert err.code == "invalid_characters"


@pytest.mark.parametrize(("schema", "raw", "param"), [
    (c.CreateWorkspace, {"name": "x" * 200_000}, "name"),
    (c.CreateVirtualKey, {"workspace_id": "demo", "name": "x" * 200_000}, "name"),
    (c.CreateAgent, {"workspace_id": "demo", "name": "x" * 121}, "name"),
    (c.UpsertProvider, PROVIDER | {"api_key": "k" * 4097}, "api_key"),
    (c.UpsertProvider, PROVIDER | {"base_url": "https://a.example/" + "p" * 2048}, "base_url"),
    (c.UpsertProvider, PROVIDER | {"options": {"deployment": "d" * 1025}}, "options[...]"),
    (c.UpsertProvider, PROVIDER | {"options": {f"k{i}": "v" for i in range(33)}}, "options"),
    (c.UpsertPrice, {"provider": "openai", "model": "m" * 257, "input_per_mtok_nanos": 1,
                     "output_per_mtok_nanos": 1}, "model"),
    # Ids that reference other entities go into SQL and KV keys: the Ident rule, not free text.
    (c.CreateAgent, {"workspace_id": "demo\x00", "name": "bot"}, "workspace_id"),
    (c.CreateVirtualKey, {"workspace_id": "demo", "agent_id": "a" * 65}, "agent_id"),
])
def test_lengths_are_capped_naming_the_field(schema: type[Any], raw: dict[str, Any], param: str) -> None:
    assert _refused(schema, raw).param == param


@pytest.mark.parametrize("name", [*sorted(RESERVED_PROVIDER_NAMES), "V1", "Admin", "HEALTHZ"])
def test_provider_names_that_are_gateway_paths_are_refused(name: str) -> None:
    err = _refused(c.UpsertProvider, PROVIDER | {"name": name})
    assert (err.param, err.code) == ("name", "reserved_name")


def test_reserved_names_are_the_data_planes_own_list() -> None:
    from dataplane.ingress.passthrough import RESERVED

    assert RESERVED is RESERVED_PROVIDER_NAMES
    assert {"v1", "admin", "healthz", "readyz", "metrics", "router"} <= RESERVED_PROVIDER_NAMES


@pytest.mark.parametrize("api_key", ["sk-café", "sk-\u2028x", "sk- tab\tkey"])
def test_provider_key_must_be_printable_ascii(api_key: str) -> None:
    assert _refused(c.UpsertProvider, PROVIDER | {"api_key": api_key}).param == "api_key"


@pytest.mark.parametrize("field", ["input_per_mtok_nanos", "output_per_mtok_nanos", "cache_read_per_mtok_nanos",
                                   "cache_write_per_mtok_nanos"])
@pytest.mark.parametrize("value", [2**80, c.MAX_PRICE_PER_MTOK_NANOS + 1, -1])
def test_prices_are_capped_so_no_call_can_overflow(field: str, value: int) -> None:
    raw = {"provider": "openai", "model": "gpt-4o", "input_per_mtok_nanos": 0, "output_per_mtok_nanos": 0}
    assert _refused(c.UpsertPrice, raw | {field: value}).param == field


def test_cost_at_the_price_cap_fits_a_bigint_for_a_billion_tokens() -> None:
    # The documented bound: 10**9 tokens at the cap is 10**18 nanos, below 2**63 - 1.
    assert 10**9 * c.MAX_PRICE_PER_MTOK_NANOS // 10**6 < 2**63 - 1


def test_valid_bodies_pass_unchanged() -> None:
    provider = c.parse_command(PROVIDER, c.UpsertProvider)
    assert provider.api_key == "gsk_0123456789" and provider.options == {"api_version": "2024-10-21"}
    # Non-ASCII text is fine where it is a display name; only control characters are refused.
    assert c.parse_command({"name": "Équipe données 🚀"}, c.CreateWorkspace).name == "Équipe données 🚀"
    price = c.parse_command({"provider": "openai", "model": "gpt-4o", "input_per_mtok_nanos": 10**15,
                             "output_per_mtok_nanos": 0}, c.UpsertPrice)
    assert price.input_per_mtok_nanos == c.MAX_PRICE_PER_MTOK_NANOS
    alias = c.parse_command({"workspace_id": "demo", "alias": "fast", "target": "openai/gpt-4o-mini"}, c.UpsertAlias)
    assert alias.target == "openai/gpt-4o-mini"


def test_alias_target_needs_a_provider() -> None:
    assert _refused(c.UpsertAlias, {"workspace_id": "demo", "alias": "a", "target": "gpt-4o"}).param == "target"


def test_unknown_fields_are_still_refused() -> None:
    assert "`owner`" in _refused(c.CreateWorkspace, {"name": "a", "owner": "x"}).message


def test_openapi_documents_202_and_the_idempotency_key() -> None:
    doc = openapi_document()
    create = doc["paths"]["/admin/v1/virtual-keys"]["post"]
    assert {"201", "202", "409", "422"} <= set(create["responses"])
    assert "propagated: false" in create["responses"]["202"]["description"]
    assert any(p["name"] == "Idempotency-Key" and p["in"] == "header" for p in create["parameters"])
    revoke = doc["paths"]["/admin/v1/virtual-keys/{id}/revoke"]["post"]
    assert {"200", "202"} <= set(revoke["responses"])
    assert [p["name"] for p in revoke["parameters"]] == ["id", "Idempotency-Key"]
    assert "parameters" not in doc["paths"]["/admin/v1/workspaces"]["get"]
    # The caps are visible to clients in the schema.
    schema = doc["components"]["schemas"]["UpsertPrice"]["properties"]["input_per_mtok_nanos"]
    assert schema["maximum"] == c.MAX_PRICE_PER_MTOK_NANOS
    assert msgspec.json.encode(doc)  # serialisable
