"""Admin commands of routers (see commands.py for how a command is validated and committed).

A router is a named set of upstream targets of one workspace with a strategy, conditional rules,
retries, timeouts and passive health (`schemas.entities.Router`; the data plane's use of it is
`dataplane.routing`). Its name is an `Ident`, unique in the workspace (409 `router_name_taken`):
clients call it as `model: "router/<name>"` or `/router/{id}/v1/...`.

Every refusal is a 400 (404 for a referenced entity that does not exist) whose `param` points at
the field, e.g. `targets[1].model` or `rules[0].targets`: a target set that is empty
(`router_no_targets`) or longer than 16 (`too_many_targets`), more than 32 rules
(`too_many_rules`), a model that is not `provider/model` (`invalid_model`), a provider the
workspace has not configured (404 `provider_not_found`), a weight below 0 or above 1,000,000
(`invalid_weight`), weights that sum to zero under `weighted` (`weights_sum_to_zero`), a pinned
`provider_key_id` that does not exist (404 `provider_key_not_found`) or is another provider's or
workspace's (`provider_key_mismatch`), and retry, timeout and health numbers out of range.
"""

from __future__ import annotations

import re
from typing import Annotated, Any

import msgspec
import psycopg

from controlplane.commands import ConfigCommands, KindSpec, Prior, _builtins, taken_by
from controlplane.inputs import Command, Globs, Ident, ModelId, ModelRef
from controlplane.references import router_target_sets
from schemas.entities import OPERATOR, Router, RouterStrategy
from schemas.errors import Conflict, InvalidRequest, NotFound
from schemas.ids import new_id

MAX_TARGETS = 16
MAX_RULES = 32
MAX_WEIGHT = 1_000_000
MAX_TIMEOUT_S = 3600.0
_PROVIDER = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")  # the Ident rule, for the part before the "/"

Seconds = Annotated[float, msgspec.Meta(gt=0, le=MAX_TIMEOUT_S)]
Percent = Annotated[int, msgspec.Meta(ge=0, le=100)]
MatchKey = Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
MatchValue = Annotated[str, msgspec.Meta(max_length=1024)]
MatchMap = Annotated[dict[MatchKey, MatchValue], msgspec.Meta(max_length=32)]
Tokens = Annotated[int, msgspec.Meta(ge=0, le=10**8)]


class TargetIn(Command):
    """`model`: `provider/model` (`provider/*`: the model the request named), the provider by its
    name in the router's workspace. `weight`: share under `weighted` (0..1,000,000; default 1).
    `provider_key_id`: pin a credential of that provider (the workspace's, or an operator master
    key of its type). `models`: requested model -> this target's model name."""

    model: ModelRef
    weight: int = 1
    provider_key_id: Ident | None = None
    models: Annotated[dict[ModelId, ModelId], msgspec.Meta(max_length=64)] = msgspec.field(default_factory=dict)


class MatchIn(Command):
    """When a rule applies; every condition given must hold. Globs (`fnmatch`) over the requested
    model, the agent id and the workflow id; exact `properties` (Alephant-Property-*) and
    `headers`; bounds on the estimated input tokens; whether the request offers tools."""

    model: Globs = ()
    agent: Globs = ()
    workflow: Globs = ()
    properties: MatchMap = msgspec.field(default_factory=dict)
    headers: MatchMap = msgspec.field(default_factory=dict)
    min_input_tokens: Tokens | None = None
    max_input_tokens: Tokens | None = None
    tools: bool | None = None


class RuleIn(Command):
    name: Annotated[str, msgspec.Meta(max_length=120)] = ""
    when: MatchIn = msgspec.field(default_factory=MatchIn)
    targets: tuple[TargetIn, ...] = ()
    strategy: RouterStrategy | None = None


class RetryIn(Command):
    """Retries of one target (0..5) with backoff in ms; the retry budget in percent of active calls."""

    retries: Annotated[int, msgspec.Meta(ge=0, le=5)] = 1
    backoff_ms: Annotated[int, msgspec.Meta(ge=0, le=60_000)] = 50
    max_backoff_ms: Annotated[int, msgspec.Meta(ge=0, le=600_000)] = 1000
    budget_percent: Percent = 20
    min_retries: Annotated[int, msgspec.Meta(ge=0, le=1000)] = 3


class TimeoutsIn(Command):
    """Seconds, each > 0 and <= 3600 (null: the worker's default)."""

    connect_s: Seconds | None = None
    first_byte_s: Seconds | None = None
    total_s: Seconds | None = None
    idle_s: Seconds | None = None


class HealthIn(Command):
    consecutive_failures: Annotated[int, msgspec.Meta(ge=1, le=1000)] = 5
    base_ejection_s: Seconds = 30.0
    max_ejection_s: Annotated[float, msgspec.Meta(gt=0, le=86_400)] = 300.0
    max_ejected_percent: Percent = 50
    max_in_flight: Annotated[int, msgspec.Meta(ge=1, le=1_000_000)] | None = None
    probe_interval_s: Seconds | None = None
    probe_path: Annotated[str, msgspec.Meta(pattern=r"^/", max_length=256)] = "/models"


class CreateRouter(Command):
    """A router of `workspace_id` named `name`: `targets` (1..16), `strategy` (weighted | latency
    | least_busy | cost | fallback, default fallback), optional `rules` (at most 32; the first
    whose `when` holds picks its own targets), `retry`, `timeouts` and `health`."""

    workspace_id: Ident
    name: Ident
    strategy: RouterStrategy = "fallback"
    targets: tuple[TargetIn, ...] = ()
    rules: tuple[RuleIn, ...] = ()
    retry: RetryIn = msgspec.field(default_factory=RetryIn)
    timeouts: TimeoutsIn = msgspec.field(default_factory=TimeoutsIn)
    health: HealthIn = msgspec.field(default_factory=HealthIn)

    def check(self) -> None:
        _check_targets(self.targets, "targets", self.strategy)
        if len(self.rules) > MAX_RULES:
            raise InvalidRequest(f"A router has at most {MAX_RULES} rules; got {len(self.rules)}.", param="rules",
                                 code="too_many_rules")
        for i, rule in enumerate(self.rules):
            _check_targets(rule.targets, f"rules[{i}].targets", rule.strategy or self.strategy)
            w = rule.when
            if w.min_input_tokens is not None and w.max_input_tokens is not None \
                    and w.min_input_tokens > w.max_input_tokens:
                raise InvalidRequest(f"'rules[{i}].when.min_input_tokens' ({w.min_input_tokens}) is above "
                                     f"'max_input_tokens' ({w.max_input_tokens}): the rule could never hold.",
                                     param=f"rules[{i}].when.min_input_tokens", code="invalid_range")
        if self.retry.backoff_ms > self.retry.max_backoff_ms:
            raise InvalidRequest(f"'retry.backoff_ms' ({self.retry.backoff_ms}) is above 'retry.max_backoff_ms' "
                                 f"({self.retry.max_backoff_ms}).", param="retry.backoff_ms", code="invalid_range")
        if self.health.base_ejection_s > self.health.max_ejection_s:
            raise InvalidRequest(f"'health.base_ejection_s' ({self.health.base_ejection_s:g}) is above "
                                 f"'health.max_ejection_s' ({self.health.max_ejection_s:g}).",
                                 param="health.base_ejection_s", code="invalid_range")


class PatchRouter(Command):
    """Any field but `workspace_id`; a given `targets`, `rules`, `retry`, `timeouts` or `health`
    replaces the stored one whole."""

    name: Ident | msgspec.UnsetType = msgspec.UNSET
    strategy: RouterStrategy | msgspec.UnsetType = msgspec.UNSET
    targets: tuple[TargetIn, ...] | msgspec.UnsetType = msgspec.UNSET
    rules: tuple[RuleIn, ...] | msgspec.UnsetType = msgspec.UNSET
    retry: RetryIn | msgspec.UnsetType = msgspec.UNSET
    timeouts: TimeoutsIn | msgspec.UnsetType = msgspec.UNSET
    health: HealthIn | msgspec.UnsetType = msgspec.UNSET


def _check_targets(targets: tuple[TargetIn, ...], param: str, strategy: str) -> None:
    """One target set: 1..16 targets, each `provider/model` with a weight in range; under
    `weighted`, weights that are not all 0."""
    if not targets:
        raise InvalidRequest(f"'{param}' is empty: a router (and each of its rules) needs at least one target "
                             "such as {\"model\": \"openai/gpt-4o\"}.", param=param, code="router_no_targets")
    if len(targets) > MAX_TARGETS:
        raise InvalidRequest(f"'{param}' has {len(targets)} targets; at most {MAX_TARGETS} are allowed.",
                             param=param, code="too_many_targets")
    for i, t in enumerate(targets):
        provider, slash, model = t.model.partition("/")
        if not slash or not _PROVIDER.match(provider) or not model or model.endswith("/"):
            raise InvalidRequest(f"'{param}[{i}].model' must be 'provider/model' (or 'provider/*' for the model the "
                                 f"request names), with the provider's name in this workspace; got {t.model!r}.",
                                 param=f"{param}[{i}].model", code="invalid_model")
        if not 0 <= t.weight <= MAX_WEIGHT:
            raise InvalidRequest(f"'{param}[{i}].weight' must be between 0 and {MAX_WEIGHT}; got {t.weight}.",
                                 param=f"{param}[{i}].weight", code="invalid_weight")
    if strategy == "weighted" and sum(t.weight for t in targets) == 0:
        raise InvalidRequest(f"The weights of '{param}' sum to zero, so the weighted strategy could pick none; "
                             "give at least one target a weight above 0.", param=param, code="weights_sum_to_zero")


async def _check_references(cc: ConfigCommands, router: Router) -> None:
    """Each target's provider is configured in the workspace (404 naming it) and a pinned
    provider key exists and is a key of that provider (the workspace's, or a master key of its
    type). The transaction re-checks them (`references`), so a concurrent delete cannot slip by."""
    providers: dict[str, Any] = {}
    for where, targets in router_target_sets(router):
        for i, t in enumerate(targets):
            name = t.model.partition("/")[0]
            if name not in providers:
                providers[name] = await cc.load("provider", f"{router.workspace_id}.{name}")
            provider = providers[name]
            if provider is None:
                raise NotFound(f"Workspace '{router.workspace_id}' has no provider named '{name}' (in "
                               f"'{where}[{i}].model': {t.model!r}); add it first with POST /admin/v1/providers.",
                               param=f"{where}[{i}].model", code="provider_not_found")
            if t.provider_key_id is None:
                continue
            param = f"{where}[{i}].provider_key_id"
            pk = await cc.load("pkey", t.provider_key_id)
            if pk is None:
                raise NotFound(f"Provider key '{t.provider_key_id}' does not exist.", param=param,
                               code="provider_key_not_found")
            if pk.workspace_id == OPERATOR:
                if pk.provider_type != provider.type:
                    raise InvalidRequest(f"Provider key '{pk.id}' is a master key for provider type "
                                         f"'{pk.provider_type}', but '{name}' is of type '{provider.type}'.",
                                         param=param, code="provider_key_mismatch")
            elif pk.workspace_id != router.workspace_id:
                raise InvalidRequest(f"Provider key '{pk.id}' belongs to another workspace; pin a key of workspace "
                                     f"'{router.workspace_id}' or an operator master key.", param=param,
                                     code="provider_key_mismatch")
            elif pk.provider_name != name:
                raise InvalidRequest(f"Provider key '{pk.id}' is a key of provider '{pk.provider_name}', not "
                                     f"'{name}'.", param=param, code="provider_key_mismatch")


async def _build(cc: ConfigCommands, cmd: CreateRouter, ent_id: str, prior: Prior | None) -> Router:
    body = msgspec.to_builtins(cmd) | {"id": ent_id}
    router = msgspec.convert(body, Router)
    await _check_references(cc, router)
    return router


async def _unique_name(conn: psycopg.AsyncConnection[Any], router: Any) -> None:
    """409 `router_name_taken` when another live router of the workspace has this name."""
    other = await taken_by(conn, "router", "name", router.name, router.id, router.workspace_id)
    if other is not None:
        raise Conflict(f"Workspace '{router.workspace_id}' already has a router named '{router.name}' ({other}); "
                       "router names are unique in a workspace (clients call them as model 'router/<name>').",
                       param="name", code="router_name_taken")


def _fields(router: Router) -> dict[str, Any]:
    return _builtins(router, "workspace_id", "name", "strategy", "targets", "rules", "retry", "timeouts", "health")


ROUTER = KindSpec("router", "Router", CreateRouter, PatchRouter, lambda c: new_id("rtr"), _fields, _build,
                  guard=_unique_name)
