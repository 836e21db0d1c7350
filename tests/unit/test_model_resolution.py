"""Model resolution for clients that send bare model names, and the output-bound fit for OpenAI
models (dataplane/decisions.py, dataplane/output_fit.py, schemas/catalog.py), plus the usage and
overload details clients of other APIs see (schemas/errors.py, the OpenAI relays)."""

from __future__ import annotations

from typing import Any, cast

import aiohttp
import msgspec
import pytest

from controlplane.commands import CreateWorkspace, PatchWorkspace
from dataplane.decisions import AgentContext, Target, bare_model_candidates, resolve_model
from dataplane.output_fit import CLAMPED, RENAMED, fit_call_output, fit_output_tokens
from dataplane.providers.base import CallStats, UpstreamCall
from dataplane.providers.openai import _relay_events
from dataplane.providers.openai_compat import PROFILES, fix_chunk
from dataplane.providers.upstream import map_upstream_error
from schemas.catalog import is_reasoning_model, max_output_tokens, offers
from schemas.entities import ConfigEntity, ModelAlias, PriceOverride, Provider, VirtualKey, Workspace, kv_key
from schemas.errors import NotFound, UpstreamError, anthropic_status, render_anthropic, render_openai
from schemas.snapshot import Snapshot
from tests.unit.conftest import bare_call

MOCK = Provider(id="ws_a.mock", workspace_id="ws_a", name="mock", type="mock")
OPENAI = Provider(id="ws_a.oai", workspace_id="ws_a", name="oai", type="openai")
ANTHROPIC = Provider(id="ws_a.claude", workspace_id="ws_a", name="claude", type="anthropic")
# ws_b has two OpenAI-type providers: bare OpenAI names are ambiguous there.
OPENAI_B1 = Provider(id="ws_b.east", workspace_id="ws_b", name="east", type="openai")
OPENAI_B2 = Provider(id="ws_b.west", workspace_id="ws_b", name="west", type="openai")
# ws_c names a default provider.
GROQ_C = Provider(id="ws_c.groq", workspace_id="ws_c", name="groq", type="groq")
OPENAI_C = Provider(id="ws_c.oai", workspace_id="ws_c", name="oai", type="openai")

ENTITIES: list[ConfigEntity] = [
    Workspace(id="ws_a", name="a"), Workspace(id="ws_b", name="b"),
    Workspace(id="ws_c", name="c", default_provider="groq"),
    Workspace(id="ws_d", name="d", default_provider="gone"),  # names a provider that does not exist
    MOCK, OPENAI, ANTHROPIC, OPENAI_B1, OPENAI_B2, GROQ_C, OPENAI_C,
    Provider(id="ws_d.oai", workspace_id="ws_d", name="oai", type="openai"),
    ModelAlias(id="al_1", workspace_id="ws_a", alias="gpt-4o", target="claude/claude-sonnet-4-5"),
    ModelAlias(id="al_2", workspace_id="ws_b", alias="smart", target="west/o3"),
    # An operator-priced private model on one provider of ws_b: unique by its price.
    PriceOverride(id="pr_1", provider="east", model="house-model-v1", input_per_mtok_nanos=1,
                  output_per_mtok_nanos=1),
]
SNAP = Snapshot.build({kv_key(e): e for e in ENTITIES}, 3)


# --- bare names ----------------------------------------------------------------------------------


def test_alias_wins_over_a_catalog_match() -> None:
    # ws_a's openai provider offers gpt-4o, but the workspace aliased the bare name elsewhere.
    assert offers("openai", "gpt-4o")
    target = resolve_model(SNAP, "ws_a", "gpt-4o")
    assert (target.provider, target.model) == (ANTHROPIC, "claude-sonnet-4-5")


def test_alias_to_provider_model_in_an_ambiguous_workspace() -> None:
    target = resolve_model(SNAP, "ws_b", "smart")
    assert (target.provider, target.model) == (OPENAI_B2, "o3")


def test_unique_catalog_match() -> None:
    target = resolve_model(SNAP, "ws_a", "o3-mini")
    assert (target.provider, target.model) == (OPENAI, "o3-mini")
    target = resolve_model(SNAP, "ws_a", "echo")  # the built-in mock's own list
    assert (target.provider, target.model) == (MOCK, "echo")


def test_default_provider_wins_over_a_catalog_match() -> None:
    # gpt-4o-mini is in the OpenAI catalog (ws_c has an openai provider), but ws_c's default is groq.
    target = resolve_model(SNAP, "ws_c", "gpt-4o-mini")
    assert (target.provider, target.model) == (GROQ_C, "gpt-4o-mini")
    # Any bare name goes to the default, known to the catalog or not.
    assert resolve_model(SNAP, "ws_c", "llama-3.3-70b-versatile").provider is GROQ_C


def test_default_provider_that_is_gone_falls_back_to_the_catalog() -> None:
    target = resolve_model(SNAP, "ws_d", "gpt-4o")
    assert (target.provider.name, target.model) == ("oai", "gpt-4o")


def test_operator_price_makes_a_private_model_resolvable() -> None:
    target = resolve_model(SNAP, "ws_b", "house-model-v1")
    assert (target.provider, target.model) == (OPENAI_B1, "house-model-v1")


def test_ambiguous_bare_name_is_404_listing_the_candidates() -> None:
    assert [p.name for p in bare_model_candidates(SNAP, "ws_b", "gpt-4o")] == ["east", "west"]
    with pytest.raises(NotFound) as info:
        resolve_model(SNAP, "ws_b", "gpt-4o")
    err = info.value
    assert (err.status, err.code, err.param) == (404, "model_not_found", "model")
    assert "'east/gpt-4o'" in err.message and "'west/gpt-4o'" in err.message
    assert "ambiguous" in err.message and "default_provider" in err.message


@pytest.mark.parametrize(("ws", "model"), [("ws_a", "no-such-model"), ("ws_b", "echo"), ("nobody", "gpt-4o")])
def test_unmatched_bare_name_is_404_saying_none_matched(ws: str, model: str) -> None:
    with pytest.raises(NotFound) as info:
        resolve_model(SNAP, ws, model)
    assert info.value.code == "model_not_found" and info.value.param == "model"
    assert "no configured provider" in info.value.message


@pytest.mark.parametrize(("ws", "model", "provider", "upstream"), [
    ("ws_a", "oai/gpt-4o", OPENAI, "gpt-4o"),  # the alias `gpt-4o` does not touch provider/model
    ("ws_c", "oai/gpt-4o-mini", OPENAI_C, "gpt-4o-mini"),  # nor does the default provider
    ("ws_b", "east/ft:gpt-4o/org/x", OPENAI_B1, "ft:gpt-4o/org/x"),
])
def test_provider_slash_model_is_unchanged(ws: str, model: str, provider: Provider, upstream: str) -> None:
    target = resolve_model(SNAP, ws, model)
    assert (target.provider, target.model) == (provider, upstream)


def test_unknown_provider_prefix_is_still_404() -> None:
    with pytest.raises(NotFound) as info:
        resolve_model(SNAP, "ws_c", "nope/gpt-4o")  # not sent to the default provider
    assert "provider 'nope' is not configured" in info.value.message


def test_admin_inputs_take_default_provider() -> None:
    cmd = msgspec.convert({"name": "w", "default_provider": "openai"}, CreateWorkspace)
    assert cmd.default_provider == "openai"
    assert msgspec.convert({"name": "w"}, CreateWorkspace).default_provider is None
    assert msgspec.convert({"default_provider": None}, PatchWorkspace).default_provider is None
    with pytest.raises(msgspec.ValidationError):
        msgspec.convert({"name": "w", "default_provider": "not a name/"}, CreateWorkspace)


# --- max_tokens fit ------------------------------------------------------------------------------


@pytest.mark.parametrize(("ptype", "model", "body", "expected", "notes"), [
    # Claude Code's 32000 to a reasoning model: renamed (o3's cap is 100k: no clamp).
    ("openai", "o3", {"max_tokens": 32000}, {"max_completion_tokens": 32000}, (RENAMED,)),
    ("openai", "gpt-5-mini", {"max_tokens": 32000}, {"max_completion_tokens": 32000}, (RENAMED,)),
    # Renamed and clamped.
    ("openai", "o4-mini", {"max_tokens": 200000}, {"max_completion_tokens": 100000}, (RENAMED, CLAMPED)),
    ("openai", "o1-preview", {"max_tokens": 64000}, {"max_completion_tokens": 32768}, (RENAMED, CLAMPED)),
    # A non-reasoning model keeps max_tokens, clamped to its cap.
    ("openai", "gpt-4o", {"max_tokens": 32000}, {"max_tokens": 16384}, (CLAMPED,)),
    ("openai", "gpt-4o-2024-08-06", {"max_tokens": 32000}, {"max_tokens": 16384}, (CLAMPED,)),
    ("openai", "gpt-4.1-mini", {"max_completion_tokens": 50000}, {"max_completion_tokens": 32768}, (CLAMPED,)),
    ("azure", "gpt-4o", {"max_tokens": 20000}, {"max_tokens": 16384}, (CLAMPED,)),
    # Within the cap: unchanged.
    ("openai", "gpt-4o", {"max_tokens": 1000}, {"max_tokens": 1000}, ()),
    ("openai", "o3", {"max_completion_tokens": 1000}, {"max_completion_tokens": 1000}, ()),
    # Both named: the client's max_completion_tokens wins, the other is dropped.
    ("openai", "o3", {"max_tokens": 5, "max_completion_tokens": 7}, {"max_completion_tokens": 7}, (RENAMED,)),
    # Unknown cap: renamed only where the family is known; never clamped.
    ("openai", "my-finetune", {"max_tokens": 999999}, {"max_tokens": 999999}, ()),
    ("openai", "o3-future-x", {"max_tokens": 999999}, {"max_completion_tokens": 100000}, (RENAMED, CLAMPED)),
    # Other provider types are left alone, even for OpenAI-looking names.
    ("groq", "o3", {"max_tokens": 32000}, {"max_tokens": 32000}, ()),
    ("anthropic", "gpt-4o", {"max_tokens": 32000}, {"max_tokens": 32000}, ()),
    # No bound at all: nothing to do.
    ("openai", "o3", {}, {}, ()),
])
def test_fit_table(ptype: str, model: str, body: dict[str, Any], expected: dict[str, Any],
                   notes: tuple[str, ...]) -> None:
    out = dict(body)
    assert fit_output_tokens(out, ptype, model) == notes
    assert out == expected
    assert fit_output_tokens(out, ptype, model) == ()  # idempotent: nothing left to do


@pytest.mark.parametrize(("model", "reasoning", "cap"), [
    ("o1", True, 100000), ("o1-mini", True, 65536), ("o3-mini-2025-01-31", True, 100000), ("o4-mini", True, 100000),
    ("gpt-5", True, 128000), ("gpt-5.1", True, 128000), ("gpt-4o-mini", False, 16384), ("gpt-4", False, 8192),
    ("gpt-4-turbo", False, 4096), ("gpt-3.5-turbo", False, 4096), ("o10", False, None), ("gpt-50", False, None),
])
def test_catalog_families(model: str, reasoning: bool, cap: int | None) -> None:
    assert is_reasoning_model(model) is reasoning
    assert max_output_tokens("openai", model) == cap


def _call(max_tokens: int | None, model: str = "gpt-4o") -> Any:
    vk = VirtualKey(id="vk_1", workspace_id="ws_a", key_hash="h")
    ctx = AgentContext(request_id="req_1", agent_id=None, run_id=None, session_id=None, workflow_id=None)
    call = bare_call(SNAP, vk, ctx, Target(OPENAI, model))
    call.max_tokens = max_tokens
    return call


def test_fit_flags_the_event_and_lowers_the_call_bound() -> None:
    call = _call(32000, "o1-preview")
    body: dict[str, Any] = {"model": "o1-preview", "max_tokens": 32000}
    fit_call_output(call, body)
    assert body == {"model": "o1-preview", "max_completion_tokens": 32000}
    assert call.max_tokens == 32000 and call.event().anomalies == (RENAMED,)
    call = _call(32000)
    body = {"model": "gpt-4o", "max_tokens": 32000}
    fit_call_output(call, body)
    assert call.max_tokens == 16384 and call.event().anomalies == (CLAMPED,)


def test_fit_never_raises_a_hold_bound() -> None:
    # Governance injected a hold's bound (500) below the model cap: the fit leaves it, and the
    # call's bound, as they are.
    call = _call(500)
    body: dict[str, Any] = {"model": "gpt-4o", "max_tokens": 500}
    fit_call_output(call, body)
    assert body["max_tokens"] == 500 and call.max_tokens == 500 and call.anomalies == ()
    # A call whose recorded bound is already lower than the body's keeps the lower one.
    call = _call(100)
    body = {"model": "gpt-4o", "max_tokens": 32000}
    fit_call_output(call, body)
    assert body["max_tokens"] == 16384 and call.max_tokens == 100


# --- overloaded: 529 for Anthropic clients, 503 for OpenAI clients ---------------------------------


def test_upstream_529_is_529_overloaded_for_anthropic_and_503_for_openai() -> None:
    err = map_upstream_error("claude", 529, b'{"type":"error","error":{"type":"overloaded_error",'
                             b'"message":"Overloaded"}}', {}, None)
    assert isinstance(err, UpstreamError)
    assert anthropic_status(err) == 529
    assert msgspec.json.decode(render_anthropic(err))["error"]["type"] == "overloaded_error"
    assert err.status == 503
    body = msgspec.json.decode(render_openai(err))["error"]
    assert body["code"] == "upstream_overloaded" and "Provider 'claude' returned 529: Overloaded" in body["message"]


def test_upstream_503_stays_503_for_anthropic() -> None:
    err = map_upstream_error("claude", 503, b"busy", {}, None)
    assert anthropic_status(err) == 503
    assert msgspec.json.decode(render_anthropic(err))["error"]["type"] == "overloaded_error"


# --- usage only when asked ----------------------------------------------------------------------

CHUNK = (b'data: {"id":"c1","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":'
         b'"say \\"usage\\":null"},"finish_reason":null}],"usage":null}\n\n')
USAGE_CHUNK = (b'data: {"id":"c1","object":"chat.completion.chunk","choices":[],"usage":{"prompt_tokens":3,'
               b'"completion_tokens":2,"total_tokens":5}}\n\n')


def _upstream(wants: bool) -> UpstreamCall:
    return UpstreamCall(provider=OPENAI, model="gpt-4o", body={}, api_key=None,
                        session=cast(aiohttp.ClientSession, None), timeout_s=5.0, client_wants_usage=wants)


def test_openai_relay_without_include_usage_has_no_usage_at_all() -> None:
    stats = CallStats()
    out, done = _relay_events(CHUNK + USAGE_CHUNK + b"data: [DONE]\n\n", _upstream(False), stats)
    assert done and stats.usage is not None and stats.usage.output_tokens == 2
    assert b'"usage"' not in out  # neither the usage chunk nor the null usage OpenAI adds for us
    assert b'"say \\"usage\\":null"' in out  # the content is untouched


def test_openai_relay_with_include_usage_keeps_it() -> None:
    out, done = _relay_events(CHUNK + USAGE_CHUNK + b"data: [DONE]\n\n", _upstream(True), CallStats())
    assert done and out == CHUNK + USAGE_CHUNK


def test_compat_chunk_drops_usage_when_not_asked() -> None:
    profile = PROFILES["groq"]
    data = b'{"id":"c","choices":[{"index":0,"delta":{"content":"hi"},"finish_reason":null}],"usage":null}'
    out, _ = fix_chunk(profile, "groq", data, CallStats(), client_wants_usage=False, secret=None)
    assert out is not None and b'"usage"' not in out and b'"hi"' in out
    out, _ = fix_chunk(profile, "groq", data, CallStats(), client_wants_usage=True, secret=None)
    assert out is not None and b'"usage":null' in out
