"""Strict durability mode's decision (deploy/strict.py) and the replica-raise rule
(events/jetstream.replicas_to_apply): pure, no servers."""

from __future__ import annotations

import pytest

from deploy.strict import (
    DurabilityFacts,
    ServerSync,
    StreamFact,
    monitor_urls,
    refusal_message,
    server_sync,
    strict_violations,
)
from events.jetstream import replicas_to_apply
from schemas.settings import load_settings

MONITORS = "http://nats-1:8222,http://nats-2:8222/, http://nats-3:8222"
STRICT_ENV = {"ALEPHANT_STRICT": "1", "ALEPHANT_STREAM_REPLICAS": "3", "ALEPHANT_NATS_MONITOR_URLS": MONITORS}


def _facts(stream: int = 3, bucket: int = 3, sync: tuple[bool, ...] = (True, True, True),
           spool_error: str = "") -> DurabilityFacts:
    return DurabilityFacts(
        stream=StreamFact(name="ALEPHANT_EVENTS", replicas=stream),
        bucket=StreamFact(name="KV_alephant_config", replicas=bucket),
        servers=tuple(ServerSync(url=f"http://nats-{i}:8222", sync_always=s) for i, s in enumerate(sync, 1)),
        spool_dir="/var/lib/alephant/spool", spool_error=spool_error)


def test_settings_parse_strict_and_monitor_urls() -> None:
    assert load_settings({}).strict is False
    settings = load_settings(STRICT_ENV)
    assert settings.strict is True
    assert monitor_urls(settings) == ["http://nats-1:8222", "http://nats-2:8222", "http://nats-3:8222"]
    assert load_settings({"ALEPHANT_STRICT": "0"}).strict is False


def test_a_durable_deployment_has_no_violations() -> None:
    assert strict_violations(load_settings(STRICT_ENV), _facts()) == []


@pytest.mark.parametrize(("facts", "names"), [
    (_facts(stream=1), ["event stream ALEPHANT_EVENTS has 1 replica(s)", "ALEPHANT_STREAM_REPLICAS=3"]),
    (_facts(bucket=2), ["config bucket stream KV_alephant_config has 2 replica(s)", "ALEPHANT_STREAM_REPLICAS=3"]),
    (_facts(sync=(True, False, True)), ["http://nats-2:8222 does not report sync_interval: always"]),
    (_facts(spool_error="PermissionError: Permission denied"),
     ["/var/lib/alephant/spool cannot be written", "ALEPHANT_SPOOL_DIR"]),
])
def test_each_violation_names_what_to_fix(facts: DurabilityFacts, names: list[str]) -> None:
    violations = strict_violations(load_settings(STRICT_ENV), facts)
    assert len(violations) == 1, violations
    for name in names:
        assert name in violations[0]


def test_settings_below_three_replicas_and_without_monitor_urls_are_refused() -> None:
    violations = strict_violations(load_settings({"ALEPHANT_STRICT": "1"}), _facts(sync=()))
    assert [v.split(":")[0].split("=")[0] for v in violations] == [
        "ALEPHANT_STREAM_REPLICAS", "ALEPHANT_NATS_MONITOR_URLS is empty"]


def test_unknown_facts_are_refused_not_assumed() -> None:
    facts = DurabilityFacts(
        stream=StreamFact(name="ALEPHANT_EVENTS", error="not found"),
        bucket=StreamFact(name="KV_alephant_config", error="could not read its info (TimeoutError: )"),
        servers=(ServerSync(url="http://nats-1:8222", error="GET /varz failed (ClientConnectorError: ...)"),))
    violations = strict_violations(load_settings(STRICT_ENV), facts)
    assert len(violations) == 3
    assert "ALEPHANT_EVENTS: not found" in violations[0]
    assert "ALEPHANT_NATS_MONITOR_URLS" in violations[2] and "cannot confirm" in violations[2]


def test_sync_always_is_read_from_varz_jetstream_config() -> None:
    # What nats-server 2.15 answers: sync_interval stays the periodic interval (ns) under `always`.
    always = {"jetstream": {"config": {"sync_interval": 120_000_000_000, "sync_always": True}}}
    default = {"jetstream": {"config": {"sync_interval": 120_000_000_000}}}
    assert server_sync("u", always) == ServerSync(url="u", sync_always=True)
    assert server_sync("u", default) == ServerSync(url="u", sync_always=False)
    no_js = server_sync("u", {"server_id": "x"})
    assert not no_js.sync_always and "JetStream is not enabled" in no_js.error


def test_refusal_message_names_the_switch_and_every_violation() -> None:
    message = refusal_message("dataplane", ["a", "b"])
    assert message.startswith("alephant dataplane: strict durability mode (ALEPHANT_STRICT=1) refuses to start")
    assert "  - a\n  - b\n" in message


@pytest.mark.parametrize(("current", "wanted", "applied"), [
    (1, 1, None), (None, 1, None), (0, 1, None), (1, 3, 3), (None, 3, 3), (3, 3, None), (3, 1, None), (5, 3, None),
    (3, 5, 5),
])
def test_replicas_are_raised_never_lowered(current: int | None, wanted: int, applied: int | None) -> None:
    assert replicas_to_apply(current, wanted) == applied
