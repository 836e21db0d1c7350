"""Router admin inputs (the checks that need no database) and the pure matching behind
`GET /admin/v1/routers/{id}/health` over synthetic worker beats."""

from __future__ import annotations

import argparse
from typing import Any

import msgspec
import pytest

from controlplane import commands as c
from controlplane.app import openapi_document
from controlplane.fleet import router_health, router_targets, target_matches
from controlplane.routers import MAX_RULES, MAX_TARGETS, CreateRouter, PatchRouter
from deploy.admin_cli import parse_target
from schemas.entities import Router, RouterTarget
from schemas.errors import InvalidRequest
from schemas.fleet import TargetState, WorkerBeat

BASE: dict[str, Any] = {"workspace_id": "demo", "name": "main", "targets": [{"model": "openai/gpt-4o"}]}


def _refused(raw: dict[str, Any]) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as info:
        c.parse_command(raw, CreateRouter)
    assert info.value.status == 400
    return info.value


def test_a_full_router_body_parses_into_the_entity() -> None:
    raw = BASE | {
        "strategy": "weighted",
        "targets": [{"model": "openai/gpt-4o", "weight": 3, "provider_key_id": "pkey_1"},
                    {"model": "azure/*", "weight": 0, "models": {"gpt-4o": "my-deployment"}}],
        "rules": [{"name": "long", "when": {"model": ["gpt-4*"], "min_input_tokens": 10_000, "tools": True,
                                            "properties": {"tier": "gold"}},
                   "targets": [{"model": "anthropic/claude-sonnet-4"}], "strategy": "latency"}],
        "retry": {"retries": 5, "budget_percent": 100}, "timeouts": {"first_byte_s": 2.5, "total_s": 3600},
        "health": {"consecutive_failures": 1, "max_ejected_percent": 0, "max_in_flight": 64}}
    cmd = c.parse_command(raw, CreateRouter)
    router = msgspec.convert(msgspec.to_builtins(cmd) | {"id": "rtr_x"}, Router)
    assert router.targets[1].models == {"gpt-4o": "my-deployment"} and router.targets[0].weight == 3
    assert router.rules[0].when.min_input_tokens == 10_000 and router.rules[0].strategy == "latency"
    assert router.retry.retries == 5 and router.timeouts.total_s == 3600 and router.health.max_in_flight == 64
    assert c.parse_command(BASE, CreateRouter).strategy == "fallback"  # the default


@pytest.mark.parametrize(("patch", "param", "code", "words"), [
    ({"targets": []}, "targets", "router_no_targets", "at least one target"),
    ({"targets": None}, "targets", None, "null"),
    ({"targets": [{"model": "gpt-4o"}]}, "targets[0].model", "invalid_model", "'provider/model'"),
    ({"targets": [{"model": "openai/gpt-4o"}, {"model": "openai/"}]}, "targets[1].model", "invalid_model",
     "'provider/model'"),
    ({"targets": [{"model": "open ai/gpt-4o"}]}, "targets[0].model", "invalid_model", "'provider/model'"),
    ({"targets": [{"model": "openai/gpt-4o", "weight": -1}]}, "targets[0].weight", "invalid_weight",
     "between 0 and"),
    ({"targets": [{"model": "openai/a", "weight": 10**7}]}, "targets[0].weight", "invalid_weight", "between 0 and"),
    ({"strategy": "weighted", "targets": [{"model": "openai/a", "weight": 0}, {"model": "openai/b", "weight": 0}]},
     "targets", "weights_sum_to_zero", "sum to zero"),
    ({"strategy": "round_robin"}, "strategy", None, "round_robin"),
    ({"targets": [{"model": f"openai/m{i}"} for i in range(MAX_TARGETS + 1)]}, "targets", "too_many_targets",
     f"at most {MAX_TARGETS}"),
    ({"rules": [{"targets": [{"model": "openai/a"}]}] * (MAX_RULES + 1)}, "rules", "too_many_rules",
     f"at most {MAX_RULES} rules"),
    ({"rules": [{"when": {"tools": True}}]}, "rules[0].targets", "router_no_targets", "at least one target"),
    ({"rules": [{"targets": [{"model": "openai/a"}]}, {"targets": [{"model": "nope"}]}]}, "rules[1].targets[0].model",
     "invalid_model", "'provider/model'"),
    ({"rules": [{"strategy": "weighted", "targets": [{"model": "openai/a", "weight": 0}]}]}, "rules[0].targets",
     "weights_sum_to_zero", "sum to zero"),
    ({"rules": [{"when": {"min_input_tokens": 10, "max_input_tokens": 5}, "targets": [{"model": "openai/a"}]}]},
     "rules[0].when.min_input_tokens", "invalid_range", "could never hold"),
    ({"rules": [{"when": {"colour": "red"}, "targets": [{"model": "openai/a"}]}]}, "rules[0].when", None, "colour"),
    ({"retry": {"retries": 6}}, "retry.retries", None, "<= 5"),
    ({"retry": {"retries": -1}}, "retry.retries", None, ">= 0"),
    ({"retry": {"budget_percent": 101}}, "retry.budget_percent", None, "<= 100"),
    ({"retry": {"backoff_ms": 500, "max_backoff_ms": 100}}, "retry.backoff_ms", "invalid_range", "above"),
    ({"timeouts": {"total_s": 0}}, "timeouts.total_s", None, "> 0"),
    ({"timeouts": {"first_byte_s": 3601}}, "timeouts.first_byte_s", None, "<= 3600"),
    ({"health": {"consecutive_failures": 0}}, "health.consecutive_failures", None, ">= 1"),
    ({"health": {"max_ejected_percent": 150}}, "health.max_ejected_percent", None, "<= 100"),
    ({"health": {"max_ejected_percent": -1}}, "health.max_ejected_percent", None, ">= 0"),
    ({"health": {"base_ejection_s": 60, "max_ejection_s": 10}}, "health.base_ejection_s", "invalid_range", "above"),
    ({"health": {"probe_path": "models"}}, "health.probe_path", None, "^/"),
    ({"name": "router/x"}, "name", None, "name"),
    ({"workspace_id": None}, "workspace_id", None, "workspace_id"),
])
def test_bad_router_bodies_are_refused_naming_field_and_problem(patch: dict[str, Any], param: str, code: str | None,
                                                              words: str) -> None:
    err = _refused(BASE | patch)
    assert err.param == param, err.message
    assert err.code == code, err.message
    assert words in err.message and param.rpartition(".")[2].partition("[")[0] in err.message


def test_patch_cannot_move_a_router_to_another_workspace() -> None:
    with pytest.raises(InvalidRequest) as info:
        c.parse_command({"workspace_id": "other"}, PatchRouter)
    assert "workspace_id" in info.value.message


def test_router_id_binding_is_an_ident_on_keys_and_agents() -> None:
    assert c.parse_command({"workspace_id": "demo", "router_id": "rtr_1"}, c.CreateVirtualKey).router_id == "rtr_1"
    assert c.parse_command({"router_id": None}, c.PatchAgent).router_id is None
    with pytest.raises(InvalidRequest) as info:
        c.parse_command({"workspace_id": "demo", "name": "a", "router_id": "rtr 1"}, c.CreateAgent)
    assert info.value.param == "router_id"


def test_openapi_lists_the_router_routes() -> None:
    paths = openapi_document()["paths"]
    assert {"post", "get"} <= set(paths["/admin/v1/routers"])
    assert {"get", "patch", "delete"} <= set(paths["/admin/v1/routers/{id}"])
    assert "get" in paths["/admin/v1/routers/{id}/health"]


# ---- router health over synthetic beats -------------------------------------------------------

NOW = 1_800_000_000_000


def _router(**extra: Any) -> Router:
    return msgspec.convert({"id": "rtr_1", "workspace_id": "ws1", "name": "main"} | extra, Router)


def _state(provider: str = "openai", model: str = "gpt-4o", **extra: Any) -> TargetState:
    return TargetState(workspace_id=extra.pop("workspace_id", "ws1"), provider=provider, provider_id=f"ws1.{provider}",
                       model=model, **extra)


def _beat(worker_id: str, *states: TargetState) -> WorkerBeat:
    return WorkerBeat(worker_id=worker_id, pid=1, host="h", applied_revision=1, stale=False, heartbeat_age_s=0.1,
                      started_at_ms=NOW - 1000, ts_ms=NOW, targets=states)


def test_targets_are_the_routers_and_its_rules_once_each() -> None:
    router = _router(targets=[{"model": "openai/gpt-4o"}, {"model": "anthropic/*"}],
                     rules=[{"targets": [{"model": "openai/gpt-4o"},
                                         {"model": "openai/gpt-4o", "provider_key_id": "k"}]}])
    assert [(t.model, t.provider_key_id) for t in router_targets(router)] == [
        ("openai/gpt-4o", None), ("anthropic/*", None), ("openai/gpt-4o", "k")]


@pytest.mark.parametrize(("target", "state", "matches"), [
    (RouterTarget(model="openai/gpt-4o"), _state(), True),
    (RouterTarget(model="openai/gpt-4o"), _state(model="gpt-4o-mini"), False),
    (RouterTarget(model="openai/gpt-4o"), _state(provider="azure"), False),
    (RouterTarget(model="openai/gpt-4o"), _state(workspace_id="ws2"), False),
    (RouterTarget(model="openai/*"), _state(model="anything"), True),
    (RouterTarget(model="openai/*"), _state(provider="openai2"), False),
    (RouterTarget(model="openai/gpt-4o", provider_key_id="k1"), _state(provider_key_id="k1"), True),
    (RouterTarget(model="openai/gpt-4o", provider_key_id="k1"), _state(provider_key_id="k2"), False),
    (RouterTarget(model="openai/gpt-4o", provider_key_id="k1"), _state(), False),
    (RouterTarget(model="openai/gpt-4o"), _state(provider_key_id="k2"), True),  # unpinned: any credential
    (RouterTarget(model="azure/gpt-4o", models={"gpt-4o": "dep1"}), _state(provider="azure", model="dep1"), True),
])
def test_target_matching(target: RouterTarget, state: TargetState, matches: bool) -> None:
    assert target_matches(_router(targets=[{"model": "x/y"}]), target, state) is matches


def test_health_gathers_each_targets_states_across_workers() -> None:
    router = _router(strategy="latency", targets=[{"model": "openai/gpt-4o"}, {"model": "mock/*"}],
                     rules=[{"targets": [{"model": "anthropic/claude"}]}])
    beats = [
        _beat("w2", _state(in_flight=2, successes=10, failures=1, ewma_ttfb_ms=120.5, ewma_total_ms=900.0),
              _state(provider="mock", model="echo", successes=3),
              _state(provider="mock", model="slow", failures=4, cooldown_until_ms=NOW + 5000, last_error="429")),
        _beat("w1", _state(successes=5, consecutive_failures=5, ejections=1, ejected_until_ms=NOW + 30_000,
                           last_error="HTTP 503"),
              _state(provider="openai", model="gpt-4o-mini", successes=99),  # another model: not this router's
              _state(provider="mock", model="echo", workspace_id="ws2", successes=7)),  # another workspace
        _beat("w3"),
    ]
    report = router_health(router, beats, NOW)
    assert (report["router_id"], report["name"], report["strategy"], report["workers"]) == (
        "rtr_1", "main", "latency", 3)
    openai, mock, claude = report["targets"]
    assert (openai["model"], openai["provider_key_id"]) == ("openai/gpt-4o", None)
    assert [w["worker_id"] for w in openai["workers"]] == ["w1", "w2"]
    w1 = openai["workers"][0]
    assert w1["ejected"] is True and w1["ejected_until_ms"] == NOW + 30_000 and w1["ejections"] == 1
    assert w1["cooling_down"] is False and w1["last_error"] == "HTTP 503" and w1["consecutive_failures"] == 5
    assert openai["workers"][1]["ewma_ttfb_ms"] == 120.5 and openai["workers"][1]["in_flight"] == 2
    assert openai["summary"] == {"in_flight": 2, "successes": 15, "failures": 1, "workers_ejected": 1,
                                 "workers_cooling": 0}
    assert [(w["worker_id"], w["model"]) for w in mock["workers"]] == [("w2", "echo"), ("w2", "slow")]
    assert mock["summary"] == {"in_flight": 0, "successes": 3, "failures": 4, "workers_ejected": 0,
                               "workers_cooling": 1}
    assert claude["workers"] == [] and claude["summary"]["successes"] == 0


def test_an_ejection_or_cool_down_in_the_past_is_over() -> None:
    router = _router(targets=[{"model": "openai/gpt-4o"}])
    beat = _beat("w1", _state(ejected_until_ms=NOW - 1, cooldown_until_ms=NOW - 1))
    (target,) = router_health(router, [beat], NOW)["targets"]
    assert target["workers"][0]["ejected"] is False and target["workers"][0]["cooling_down"] is False
    assert target["summary"]["workers_ejected"] == 0 and target["summary"]["workers_cooling"] == 0


# ---- the CLI's --target ------------------------------------------------------------------------

@pytest.mark.parametrize(("text", "body"), [
    ("openai/gpt-4o", {"model": "openai/gpt-4o"}),
    ("openai/gpt-4o:3", {"model": "openai/gpt-4o", "weight": 3}),
    ("azure/*:0", {"model": "azure/*", "weight": 0}),
    ("bedrock/anthropic.claude-v2:1:5", {"model": "bedrock/anthropic.claude-v2:1", "weight": 5}),
    ("ollama/llama3:latest", {"model": "ollama/llama3:latest"}),
])
def test_cli_targets_take_an_optional_trailing_weight(text: str, body: dict[str, Any]) -> None:
    assert parse_target(text) == body


def test_cli_target_without_a_provider_is_refused() -> None:
    with pytest.raises(argparse.ArgumentTypeError, match="provider/model"):
        parse_target("gpt-4o:2")
