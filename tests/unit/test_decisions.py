"""dataplane/decisions.py: credential parsing, authentication, agent context, model resolution."""

from __future__ import annotations

import itertools

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st
from multidict import CIMultiDict

from dataplane.decisions import (
    MAX_HEADER_ID_LEN,
    NO_KEY,
    AgentContext,
    KeyChoice,
    agent_context,
    authenticate,
    bearer_token,
    choose_provider_key,
    resolve_model,
)
from schemas.entities import OPERATOR, ConfigEntity, ModelAlias, Provider, ProviderKey, VirtualKey, Workspace, kv_key
from schemas.errors import AuthenticationFailed, InvalidRequest, NotFound, PermissionDenied
from schemas.keys import KeyRing
from schemas.settings import Secret
from schemas.snapshot import Snapshot

RING = KeyRing(Secret("unit-test-master-secret-0123456789"))
KEY_FREE = "sk-alph-free-key"
KEY_BOUND = "sk-alph-bound-key"

VK_FREE = VirtualKey(id="vk_1", workspace_id="ws_1", key_hash=RING.hash_key(KEY_FREE))
VK_BOUND = VirtualKey(id="vk_2", workspace_id="ws_1", key_hash=RING.hash_key(KEY_BOUND), agent_id="agent_1")
MOCK_1 = Provider(id="prov_1", workspace_id="ws_1", name="mock", type="mock")
OPENAI_1 = Provider(id="prov_2", workspace_id="ws_1", name="openai", type="openai")
MOCK_2 = Provider(id="prov_3", workspace_id="ws_2", name="mock2", type="mock")
ALIAS = ModelAlias(id="al_1", workspace_id="ws_1", alias="cheap", target="mock/fixed")
BROKEN_ALIAS = ModelAlias(id="al_2", workspace_id="ws_1", alias="broken", target="nowhere")
ENTITIES: list[ConfigEntity] = [
    Workspace(id="ws_1", name="one"), Workspace(id="ws_2", name="two"),
    VK_FREE, VK_BOUND, MOCK_1, OPENAI_1, MOCK_2, ALIAS, BROKEN_ALIAS,
]
SNAP = Snapshot.build({kv_key(e): e for e in ENTITIES}, 17)


def request_ids() -> str:
    return "req_generated"


# --- bearer_token ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("authorization", "x_api_key", "expected"),
    [
        ("Bearer sk-alph-abc", None, "sk-alph-abc"),
        ("bearer sk-alph-abc", None, "sk-alph-abc"),
        ("BEARER  sk-alph-abc  ", None, "sk-alph-abc"),
        (None, "sk-alph-xyz", "sk-alph-xyz"),
        (None, "  sk-alph-xyz ", "sk-alph-xyz"),
        ("", "sk-alph-xyz", "sk-alph-xyz"),
        ("Bearer sk-alph-abc", "sk-alph-xyz", "sk-alph-abc"),  # Authorization wins
    ],
)
def test_bearer_token_extracts_the_key(authorization: str | None, x_api_key: str | None, expected: str) -> None:
    assert bearer_token(authorization, x_api_key) == expected


@pytest.mark.parametrize("authorization", ["Basic dXNlcjpwYXNz", "Bearer", "Bearer    ", "sk-alph-abc", "Token x"])
def test_malformed_authorization_is_401(authorization: str) -> None:
    with pytest.raises(AuthenticationFailed, match="Malformed") as info:
        bearer_token(authorization, "sk-alph-would-otherwise-work")
    assert info.value.status == 401
    assert info.value.code == "invalid_api_key"


@pytest.mark.parametrize(("authorization", "x_api_key"), [(None, None), ("", ""), (None, "")])
def test_missing_credentials_is_401(authorization: str | None, x_api_key: str | None) -> None:
    with pytest.raises(AuthenticationFailed, match="didn't provide"):
        bearer_token(authorization, x_api_key)


@given(token=st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=126), min_size=1, max_size=60))
def test_bearer_round_trip(token: str) -> None:
    assert bearer_token(f"Bearer {token}") == token


# --- authenticate ------------------------------------------------------------------------------


def test_authenticate_finds_the_key_by_hash() -> None:
    assert authenticate(SNAP, KEY_FREE, RING.hash_key) is VK_FREE
    assert authenticate(SNAP, KEY_BOUND, RING.hash_key) is VK_BOUND


@pytest.mark.parametrize("key", ["sk-alph-unknown", "", KEY_FREE + "x", KEY_FREE.upper()])
def test_authenticate_unknown_key_is_401(key: str) -> None:
    with pytest.raises(AuthenticationFailed) as info:
        authenticate(SNAP, key, RING.hash_key)
    assert info.value.code == "invalid_api_key"
    if key:
        assert key not in info.value.message


def test_authenticate_with_another_master_secret_fails() -> None:
    other = KeyRing(Secret("a-different-master-secret-987654321"))
    with pytest.raises(AuthenticationFailed):
        authenticate(SNAP, KEY_FREE, other.hash_key)


def test_authenticate_against_empty_snapshot_fails() -> None:
    with pytest.raises(AuthenticationFailed):
        authenticate(Snapshot.empty(), KEY_FREE, RING.hash_key)


# --- agent_context -----------------------------------------------------------------------------


def test_context_from_headers() -> None:
    headers = CIMultiDict({
        "alephant-agent-id": "agent_7", "Alephant-Run-Id": "run_1", "Alephant-Session-Id": "sess_1",
        "Alephant-Workflow-Id": "wf_1", "Alephant-Request-Id": "req_client",
    })
    ctx = agent_context(headers, VK_FREE, request_ids)
    assert ctx == AgentContext(request_id="req_client", agent_id="agent_7", run_id="run_1",
                               session_id="sess_1", workflow_id="wf_1")


def test_request_id_is_generated_when_absent_or_empty() -> None:
    counter = itertools.count()

    def gen() -> str:
        return f"req_{next(counter)}"

    assert agent_context(CIMultiDict(), VK_FREE, gen).request_id == "req_0"
    assert agent_context(CIMultiDict({"Alephant-Request-Id": ""}), VK_FREE, gen).request_id == "req_1"


def test_no_headers_gives_empty_context() -> None:
    ctx = agent_context(CIMultiDict(), VK_FREE, request_ids)
    assert ctx == AgentContext(request_id="req_generated", agent_id=None, run_id=None, session_id=None,
                               workflow_id=None, properties=())


def test_bound_key_acts_as_its_agent() -> None:
    assert agent_context(CIMultiDict(), VK_BOUND, request_ids).agent_id == "agent_1"
    same = CIMultiDict({"Alephant-Agent-Id": "agent_1"})
    assert agent_context(same, VK_BOUND, request_ids).agent_id == "agent_1"


def test_bound_key_cannot_act_as_another_agent() -> None:
    with pytest.raises(PermissionDenied) as info:
        agent_context(CIMultiDict({"Alephant-Agent-Id": "agent_2"}), VK_BOUND, request_ids)
    assert info.value.status == 403
    assert info.value.code == "agent_mismatch"


@pytest.mark.parametrize("name", ["Alephant-Agent-Id", "Alephant-Run-Id", "Alephant-Session-Id",
                                  "Alephant-Workflow-Id", "Alephant-Request-Id"])
def test_header_length_limit_is_400(name: str) -> None:
    ok = CIMultiDict({name: "x" * MAX_HEADER_ID_LEN})
    agent_context(ok, VK_FREE, request_ids)
    with pytest.raises(InvalidRequest) as info:
        agent_context(CIMultiDict({name: "x" * (MAX_HEADER_ID_LEN + 1)}), VK_FREE, request_ids)
    assert info.value.status == 400
    assert info.value.param == name


def test_non_printable_header_is_400() -> None:
    with pytest.raises(InvalidRequest):
        agent_context(CIMultiDict({"Alephant-Run-Id": "run\x00one"}), VK_FREE, request_ids)


def test_properties_are_collected_case_insensitively() -> None:
    headers = CIMultiDict([
        ("Alephant-Property-Team", "search"),
        ("alephant-property-cost-center", "42"),
        ("Alephant-Agent-Id", "agent_1"),
        ("X-Other", "ignored"),
    ])
    ctx = agent_context(headers, VK_FREE, request_ids)
    assert sorted(ctx.properties) == [("Team", "search"), ("cost-center", "42")]


# --- resolve_model -----------------------------------------------------------------------------


def test_resolve_provider_slash_model() -> None:
    target = resolve_model(SNAP, "ws_1", "mock/echo")
    assert target.provider is MOCK_1
    assert target.model == "echo"


def test_resolve_keeps_slashes_in_the_model_id() -> None:
    target = resolve_model(SNAP, "ws_1", "openai/ft:gpt-4o/org/x")
    assert target.provider is OPENAI_1
    assert target.model == "ft:gpt-4o/org/x"


def test_resolve_alias() -> None:
    target = resolve_model(SNAP, "ws_1", "cheap")
    assert target.provider is MOCK_1
    assert target.model == "fixed"


def test_alias_is_per_workspace() -> None:
    with pytest.raises(NotFound):
        resolve_model(SNAP, "ws_2", "cheap")


@pytest.mark.parametrize("model", ["nope/echo", "mock2/echo"])  # mock2 belongs to ws_2
def test_unknown_provider_is_404_model_not_found(model: str) -> None:
    with pytest.raises(NotFound) as info:
        resolve_model(SNAP, "ws_1", model)
    assert info.value.status == 404
    assert info.value.code == "model_not_found"
    assert info.value.param == "model"


@pytest.mark.parametrize("model", ["no-such-model", "", "/echo", "mock/", "broken"])
def test_malformed_model_name_is_404(model: str) -> None:
    with pytest.raises(NotFound) as info:
        resolve_model(SNAP, "ws_1", model)
    assert info.value.code == "model_not_found"
    assert info.value.param == "model"


# --- master-key resolution -----------------------------------------------------------------------

OPENAI = Provider(id="ws_1.openai", workspace_id="ws_1", name="openai", type="openai")
MASTER_A = ProviderKey(id="pk_ma", workspace_id=OPERATOR, provider_type="openai", api_key_enc="ma", weight=3)
MASTER_B = ProviderKey(id="pk_mb", workspace_id=OPERATOR, provider_type="openai", api_key_enc="mb", weight=1)
BYO = ProviderKey(id="pk_byo", workspace_id="ws_1", provider_type="openai", provider_name="openai",
                  api_key_enc="byo")
OTHER_WS = ProviderKey(id="pk_other", workspace_id="ws_2", provider_type="openai", provider_name="openai",
                       api_key_enc="other")
KEY_VK = VirtualKey(id="vk_1", workspace_id="ws_1", key_hash="h")


def _keys_snap(*keys: ProviderKey) -> Snapshot:
    return Snapshot.build({kv_key(k): k for k in keys}, 1)


def test_master_key_serves_a_workspace_without_its_own() -> None:
    choice = choose_provider_key(_keys_snap(MASTER_A), KEY_VK, OPENAI, 0.5)
    assert (choice.key_id, choice.source, choice.ciphertext) == ("pk_ma", "operator", "ma")


def test_master_keys_share_by_weight() -> None:
    snap = _keys_snap(MASTER_A, MASTER_B)
    picks = [choose_provider_key(snap, KEY_VK, OPENAI, i / 100).key_id for i in range(100)]
    assert picks.count("pk_ma") == 75 and picks.count("pk_mb") == 25


def test_workspace_byo_key_overrides_the_master_and_the_inline_key() -> None:
    inline = msgspec.structs.replace(OPENAI, api_key_enc="inline")
    assert choose_provider_key(_keys_snap(MASTER_A, BYO), KEY_VK, inline, 0.1).key_id == "pk_byo"
    assert choose_provider_key(_keys_snap(MASTER_A), KEY_VK, inline, 0.1) == KeyChoice("ws_1.openai", "workspace",
                                                                                      "inline")


def test_the_virtual_keys_choice_overrides_both_but_only_within_its_workspace() -> None:
    snap = _keys_snap(MASTER_A, BYO, MASTER_B, OTHER_WS)
    mine = msgspec.structs.replace(KEY_VK, provider_keys={"openai": "pk_mb"})
    assert choose_provider_key(snap, mine, OPENAI, 0.1) == KeyChoice("pk_mb", "key", "mb")
    theirs = msgspec.structs.replace(KEY_VK, provider_keys={"openai": "pk_other"})
    assert choose_provider_key(snap, theirs, OPENAI, 0.1).key_id == "pk_byo"  # another workspace's key: ignored


def test_no_key_anywhere_is_no_key() -> None:
    mock = Provider(id="ws_1.mock", workspace_id="ws_1", name="mock", type="mock")
    assert choose_provider_key(_keys_snap(MASTER_A), KEY_VK, mock, 0.1) == NO_KEY
