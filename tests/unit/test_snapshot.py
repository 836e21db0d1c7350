"""schemas/snapshot.py (immutable indexes over the config entities) and dataplane/snapshot.py (KV entry
application)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from nats.js.kv import KV_DEL, KV_PURGE
from structlog.testing import capture_logs

from dataplane.snapshot import _apply
from schemas.entities import (
    OPERATOR,
    Agent,
    Budget,
    CachePurge,
    CacheSettings,
    ConfigEntity,
    Department,
    EscalationGrant,
    Heartbeat,
    Limit,
    LogDestination,
    LogSettings,
    McpServer,
    McpTool,
    Member,
    ModelAlias,
    PaidAmount,
    PaidEndpoint,
    PaidPrice,
    PaidRails,
    PaidServe,
    Policy,
    PriceOverride,
    PromptMessage,
    PromptTemplate,
    Provider,
    ProviderKey,
    Router,
    RouterTarget,
    VirtualKey,
    Wallet,
    WalletAsset,
    Workspace,
    X402Rail,
    entity_encoder,
    kv_key,
)
from schemas.snapshot import INDEXES, Snapshot

WS = Workspace(id="ws_1", name="one")
AGENT = Agent(id="agent_1", workspace_id="ws_1", name="bot")
PROVIDER = Provider(id="prov_1", workspace_id="ws_1", name="mock", type="mock")
VK = VirtualKey(id="vk_1", workspace_id="ws_1", key_hash="ab" * 32, agent_id="agent_1")
ALIAS = ModelAlias(id="al_1", workspace_id="ws_1", alias="cheap", target="mock/fixed")
PRICE = PriceOverride(id="price_1", provider="mock", model="echo", input_per_mtok_nanos=5)
BEAT = Heartbeat(ts_ms=1_700_000_000_000)
DEPT = Department(id="dept_1", workspace_id="ws_1", name="Eng")
MEMBER = Member(id="mem_1", workspace_id="ws_1", name="Ada", department_id="dept_1")
GRANT = EscalationGrant(id="esc_1", workspace_id="ws_1", key_id="vk_1", rule="cost", expires_at_ms=1)
BUDGET = Budget(id="bud_1", workspace_id="ws_1", scope="agent", scope_id="agent_1", period="month",
                limit_nanos=10**9)
BUDGET_DAY = Budget(id="bud_0", workspace_id="ws_1", scope="agent", scope_id="agent_1", period="day",
                    limit_nanos=10**8)
LIMIT = Limit(id="lim_1", workspace_id="ws_1", scope="workspace", scope_id="ws_1", rpm=60)
POLICY = Policy(id="pol_1", workspace_id="ws_1", scope="department", scope_id="dept_1", models_deny=("*gpt*",))
BYO_KEY = ProviderKey(id="pk_1", workspace_id="ws_1", provider_type="mock", provider_name="mock", api_key_enc="c1")
MASTER_KEY = ProviderKey(id="pk_0", workspace_id=OPERATOR, provider_type="openai", api_key_enc="c0")
PROMPT = PromptTemplate(id="prompt_1", workspace_id="ws_1", name="greet", version=1,
                        messages=(PromptMessage(role="user", content="Hi {{name}}"),))
ROUTER = Router(id="rtr_1", workspace_id="ws_1", name="main", strategy="weighted",
                targets=(RouterTarget(model="mock/echo", weight=3), RouterTarget(model="mock/*")))
CACHE = CacheSettings(id="cache_1", workspace_id="ws_1", scope="workspace", scope_id="ws_1", ttl_s=60)
ALL: list[ConfigEntity] = [WS, AGENT, PROVIDER, VK, ALIAS, PRICE, BEAT, DEPT, MEMBER, GRANT, BUDGET, BUDGET_DAY,
                           LIMIT, POLICY, BYO_KEY, MASTER_KEY, PROMPT, ROUTER, CACHE,
                           CachePurge(id="cpurge_1", workspace_id="ws_1", generation=1),
                           PaidEndpoint(id="paid_1", workspace_id="ws_1", slug="summarize",
                                        serve=PaidServe(model="mock/echo"),
                                        price=PaidPrice(per_call=PaidAmount(amount="10000", asset="0xUSDC")),
                                        rails=PaidRails(x402=X402Rail(network="eip155:84532", pay_to="0xPAY",
                                                                      facilitator_url="http://127.0.0.1:1"))),
                           Wallet(id="wallet_1", workspace_id="ws_1", name="ops", address="0x" + "ab" * 20,
                                  private_key_enc="gAAAA", assets=(WalletAsset(network="eip155:84532",
                                                                               asset="0xUSDC", max_amount="100"),)),
                           LogDestination(id="logdest_1", type="webhook", url="https://example.com/hook",
                                          workspace_id="ws_1", secret_enc="gAAAA", event_types=("llm.call",)),
                           LogSettings(id="logset_1", workspace_id="ws_1", scope="workspace", scope_id="ws_1",
                                       bodies="both"),
                           McpServer(id="mcp_1", workspace_id="ws_1", name="search", url="https://mcp.example.com/mcp",
                                     headers_enc={"Authorization": "gAAAA"},
                                     tools={"web_search": McpTool(price_nanos=10_000_000)})]


def entities(*ents: ConfigEntity) -> dict[str, ConfigEntity]:
    return {kv_key(e): e for e in ents}


# --- Snapshot.build ----------------------------------------------------------------------------


def test_build_indexes_every_kind() -> None:
    snap = Snapshot.build(entities(*ALL), 42)
    assert snap.revision == 42
    assert snap.keys_by_hash == {VK.key_hash: VK}
    assert snap.workspaces == {"ws_1": WS}
    assert snap.agents == {"agent_1": AGENT}
    assert snap.providers == {("ws_1", "mock"): PROVIDER}
    assert snap.aliases == {("ws_1", "cheap"): ALIAS}
    assert snap.prices == {("mock", "echo"): PRICE}
    assert snap.heartbeat_ms == BEAT.ts_ms
    assert snap.departments == {"dept_1": DEPT}
    assert snap.provider_keys == {"pk_1": BYO_KEY, "pk_0": MASTER_KEY}
    assert snap.provider_keys_for[("ws_1", "mock")] == (BYO_KEY,)
    assert snap.master_keys[(OPERATOR, "openai")] == (MASTER_KEY,)
    assert snap.members == {"mem_1": MEMBER}
    assert snap.escalations == {"esc_1": GRANT}
    assert snap.budgets_by_id == {"bud_1": BUDGET, "bud_0": BUDGET_DAY}
    assert snap.governance == {("ws_1", "agent", "agent_1"): (BUDGET_DAY, BUDGET),  # grouped, by id
                               ("ws_1", "workspace", "ws_1"): (LIMIT,),
                               ("ws_1", "department", "dept_1"): (POLICY,)}
    assert snap.prompts == {("ws_1", "greet"): (PROMPT,)}
    assert len(snap.entities) == len(ALL)


def test_every_config_kind_but_the_heartbeat_has_an_index_and_every_index_a_field() -> None:
    kinds = {type(e) for e in ALL} - {Heartbeat}
    assert {row.kind for row in INDEXES} == kinds
    fields = set(Snapshot.__dataclass_fields__)
    assert {row.name for row in INDEXES} <= fields
    assert fields - {row.name for row in INDEXES} == {"revision", "entities", "heartbeat_ms"}


def test_grouped_indexes_keep_scopes_and_workspaces_apart() -> None:
    other_ws = Limit(id="lim_2", workspace_id="ws_2", scope="workspace", scope_id="ws_1", rpm=1)
    agent_scope = Limit(id="lim_3", workspace_id="ws_1", scope="agent", scope_id="ws_1", rpm=2)
    snap = Snapshot.build(entities(LIMIT, other_ws, agent_scope), 1)
    assert snap.governance == {("ws_1", "workspace", "ws_1"): (LIMIT,), ("ws_2", "workspace", "ws_1"): (other_ws,),
                               ("ws_1", "agent", "ws_1"): (agent_scope,)}


def test_providers_are_indexed_per_workspace() -> None:
    other = Provider(id="prov_2", workspace_id="ws_2", name="mock", type="openai")
    snap = Snapshot.build(entities(PROVIDER, other), 1)
    assert snap.providers[("ws_1", "mock")] is PROVIDER
    assert snap.providers[("ws_2", "mock")] is other


def test_empty_snapshot() -> None:
    snap = Snapshot.empty()
    assert snap.revision == 0
    assert snap.heartbeat_ms is None
    assert not snap.entities
    assert not snap.keys_by_hash


def test_snapshot_is_immutable_and_detached_from_its_source() -> None:
    source = entities(*ALL)
    snap = Snapshot.build(source, 1)
    source.clear()
    assert len(snap.entities) == len(ALL)
    with pytest.raises(TypeError):
        snap.workspaces["ws_x"] = WS  # type: ignore[index]
    with pytest.raises(TypeError):
        snap.entities["x"] = WS  # type: ignore[index]
    with pytest.raises(AttributeError):
        snap.revision = 2  # type: ignore[misc]


# --- Snapshot.with_changes --------------------------------------------------------------------


def test_with_changes_copies_only_the_indexes_of_changed_kinds() -> None:
    snap = Snapshot.build(entities(*ALL), 1)
    raised = Budget(id="bud_1", workspace_id="ws_1", scope="agent", scope_id="agent_1", period="month",
                    limit_nanos=2 * 10**9)
    after = snap.with_changes({kv_key(raised): raised}, 2)
    assert after.revision == 2
    assert after.budgets_by_id["bud_1"] is raised
    assert after.governance[("ws_1", "agent", "agent_1")] == (BUDGET_DAY, raised)
    assert snap.budgets_by_id["bud_1"] is BUDGET  # the old snapshot is untouched
    for name in ("keys_by_hash", "providers", "aliases", "prices", "members"):
        assert getattr(after, name) is getattr(snap, name), name


def test_a_heartbeat_change_shares_every_index() -> None:
    snap = Snapshot.build(entities(*ALL), 1)
    after = snap.with_changes({kv_key(BEAT): Heartbeat(ts_ms=5)}, 2)
    assert after.heartbeat_ms == 5
    assert all(getattr(after, row.name) is getattr(snap, row.name) for row in INDEXES)


def test_deleting_the_last_entity_of_a_group_drops_the_key() -> None:
    snap = Snapshot.build(entities(WS, POLICY), 1)
    after = snap.with_changes({kv_key(POLICY): None, "never.there": None}, 2)
    assert after.governance == {}
    assert after.entities == entities(WS)


def test_a_rename_in_one_burst_keeps_the_new_name_whatever_the_order() -> None:
    renamed = Provider(id="prov_9", workspace_id="ws_1", name="mock", type="openai")
    snap = Snapshot.build(entities(PROVIDER), 1)
    new_first = snap.with_changes({kv_key(renamed): renamed, kv_key(PROVIDER): None}, 2)
    old_first = snap.with_changes({kv_key(PROVIDER): None, kv_key(renamed): renamed}, 2)
    assert new_first.providers == old_first.providers == {("ws_1", "mock"): renamed}


def _variants() -> list[ConfigEntity]:
    """Entities whose index keys collide only where the control plane allows it (same scope)."""
    return [*ALL,
            Budget(id="bud_1", workspace_id="ws_1", scope="agent", scope_id="agent_1", period="day", limit_nanos=1),
            Policy(id="pol_2", workspace_id="ws_1", scope="department", scope_id="dept_1"),
            Policy(id="pol_1", workspace_id="ws_1", scope="key", scope_id="vk_1"),
            Member(id="mem_1", workspace_id="ws_1", name="renamed"),
            McpServer(id="mcp_1", workspace_id="ws_1", name="search", url="https://mcp.example.com/v2", timeout_s=5),
            Heartbeat(ts_ms=7)]


@given(start=st.lists(st.sampled_from(_variants()), max_size=12), bursts=st.lists(
    st.lists(st.tuples(st.sampled_from(_variants()), st.booleans()), max_size=6), max_size=8))
def test_with_changes_equals_a_fresh_build(start: list[ConfigEntity],
                                           bursts: list[list[tuple[ConfigEntity, bool]]]) -> None:
    state = entities(*start)
    snap = Snapshot.build(state, 0)
    for rev, burst in enumerate(bursts, start=1):
        delta: dict[str, ConfigEntity | None] = {}
        for ent, delete in burst:
            delta[kv_key(ent)] = None if delete else ent
        for key, value in delta.items():
            if value is None:
                state.pop(key, None)
            else:
                state[key] = value
        snap = snap.with_changes(delta, rev)
        assert snap == Snapshot.build(state, rev)


# --- _apply ------------------------------------------------------------------------------------


def test_apply_puts_decoded_entities() -> None:
    staging: dict[str, ConfigEntity] = {}
    for ent in ALL:
        _apply(staging, kv_key(ent), None, entity_encoder.encode(ent))
    assert staging == entities(*ALL)


def test_apply_replaces_an_existing_key() -> None:
    staging = entities(WS)
    renamed = Workspace(id="ws_1", name="renamed")
    _apply(staging, "ws.ws_1", "PUT", entity_encoder.encode(renamed))
    assert staging["ws.ws_1"] == renamed


@pytest.mark.parametrize("op", [KV_DEL, KV_PURGE])
def test_apply_deletes_on_del_and_purge(op: str) -> None:
    staging = entities(WS, PROVIDER)
    _apply(staging, kv_key(PROVIDER), op, b"")
    assert staging == entities(WS)
    _apply(staging, "never.there", op, None)  # deleting a missing key is not an error
    assert staging == entities(WS)


def test_apply_deletes_even_if_a_tombstone_has_a_value() -> None:
    staging = entities(WS)
    _apply(staging, "ws.ws_1", KV_DEL, entity_encoder.encode(WS))
    assert staging == {}


@pytest.mark.parametrize(
    "value",
    [
        b"{not json",
        b'{"kind": "unknown_kind", "id": "x"}',
        b'{"kind": "ws"}',
        b"[]",
        b'{"kind": "ws", "id": 5, "name": "x"}',
    ],
)
def test_apply_skips_invalid_entries_and_logs(value: bytes) -> None:
    staging = entities(WS)
    with capture_logs() as logs:
        _apply(staging, "ws.ws_2", None, value)
        _apply(staging, "ws.ws_1", None, value)  # a bad update keeps the last good value
    assert staging == entities(WS)
    assert [entry["event"] for entry in logs] == ["snapshot_entry_invalid"] * 2
    assert logs[0]["key"] == "ws.ws_2"


def test_apply_tolerates_unknown_fields() -> None:
    staging: dict[str, ConfigEntity] = {}
    _apply(staging, "ws.ws_1", None, b'{"kind": "ws", "id": "ws_1", "name": "one", "added_later": 1}')
    assert staging == entities(WS)


ops = st.lists(
    st.tuples(st.sampled_from(ALL), st.sampled_from([None, "PUT", KV_DEL, KV_PURGE])),
    max_size=40,
)


@given(history=ops)
def test_apply_matches_last_write_wins_model(history: list[tuple[ConfigEntity, str | None]]) -> None:
    staging: dict[str, ConfigEntity] = {}
    model: dict[str, ConfigEntity] = {}
    for ent, op in history:
        key = kv_key(ent)
        _apply(staging, key, op, entity_encoder.encode(ent))
        if op in (KV_DEL, KV_PURGE):
            model.pop(key, None)
        else:
            model[key] = ent
    assert staging == model
    snap = Snapshot.build(staging, len(history))
    assert len(snap.entities) == len(model)
    assert (snap.heartbeat_ms is not None) == (kv_key(BEAT) in model)
