"""events/ledger.py: the double-entry transfers an event posts."""

from __future__ import annotations

import datetime as dt
from collections import Counter

from hypothesis import given
from hypothesis import strategies as st

from events.ledger import UNATTRIBUTED_AGENT, transfers_for
from schemas.events import ConfigChanged, Event, LlmCall
from schemas.ids import uuid7

T0 = dt.datetime(2025, 3, 1, tzinfo=dt.UTC)


def call(cost: int, agent: str | None = "agent_1", **kw: object) -> LlmCall:
    return LlmCall(
        event_id=kw.pop("event_id", uuid7()), occurred_at=T0, workspace_id="ws_1",  # type: ignore[arg-type]
        agent_id=agent, provider="openai", model="gpt-4o-mini", cost_nanos=cost, **kw,  # type: ignore[arg-type]
    )


def test_positive_cost_posts_one_transfer_from_agent_to_provider() -> None:
    event = call(450_000)
    [transfer] = transfers_for(event)
    assert transfer.debit == "agent:ws_1:agent_1:llm_cost"
    assert transfer.credit == "provider:ws_1:openai:payable"
    assert transfer.amount == 450_000
    assert transfer.currency == "USD"
    assert transfer.code == "llm_cost"
    assert transfer.leg == 0


def test_transfer_ids_are_deterministic_per_event() -> None:
    event = call(1)
    again = LlmCall(**{f: getattr(event, f) for f in event.__struct_fields__})
    assert [t.id for t in transfers_for(event)] == [t.id for t in transfers_for(again)]
    assert transfers_for(event) == transfers_for(event)


def test_transfer_ids_differ_across_events() -> None:
    assert transfers_for(call(1))[0].id != transfers_for(call(1))[0].id


def test_transfer_id_is_not_the_event_id() -> None:
    event = call(5)
    assert transfers_for(event)[0].id != event.event_id


def test_zero_or_negative_cost_posts_nothing() -> None:
    assert transfers_for(call(0)) == []
    assert transfers_for(call(-5)) == []


def test_missing_agent_books_to_unattributed() -> None:
    [transfer] = transfers_for(call(10, agent=None))
    assert transfer.debit == f"agent:ws_1:{UNATTRIBUTED_AGENT}:llm_cost"
    assert UNATTRIBUTED_AGENT == "unattributed"


def test_currency_is_carried() -> None:
    [transfer] = transfers_for(call(10, currency="EUR"))
    assert transfer.currency == "EUR"


def test_config_events_post_nothing() -> None:
    event = ConfigChanged(event_id=uuid7(), occurred_at=T0, workspace_id="ws_1", entity="vk",
                          entity_id="vk_1", op="create")
    assert transfers_for(event) == []


costs = st.integers(min_value=-(10**12), max_value=10**15)
events = st.lists(
    st.builds(call, cost=costs, agent=st.none() | st.sampled_from(["a1", "a2"]),
              currency=st.sampled_from(["USD", "EUR"])),
    max_size=30,
)


@given(batch=events)
def test_debits_equal_credits_per_currency(batch: list[Event]) -> None:
    debits: Counter[str] = Counter()
    credits: Counter[str] = Counter()
    balances: Counter[str] = Counter()
    for event in batch:
        for t in transfers_for(event):
            assert t.amount > 0
            assert t.debit != t.credit
            debits[t.currency] += t.amount
            credits[t.currency] += t.amount
            balances[t.debit] -= t.amount
            balances[t.credit] += t.amount
    assert debits == credits
    assert sum(balances.values()) == 0
    expected: Counter[str] = Counter()
    for event in batch:
        assert isinstance(event, LlmCall)
        if event.cost_nanos > 0:
            expected[event.currency] += event.cost_nanos
    assert debits == expected


@given(batch=events)
def test_transfer_ids_are_unique_across_events(batch: list[Event]) -> None:
    ids = [t.id for e in batch for t in transfers_for(e)]
    assert len(ids) == len(set(ids))
