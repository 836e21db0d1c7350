"""The request context: one `Call` flows through every stage of the pipeline (`dataplane.pipeline`)
and becomes the request's one `llm.call` event at the end.

A `Call` exists from the first byte: before authentication its key is `ANONYMOUS` and its snapshot
the one current at arrival, so a refusal at any stage is recorded with what was known then.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from aiohttp import web

from dataplane.decisions import NO_KEY, AgentContext, KeyChoice, Target
from dataplane.pricing import CallPrice, bounded_usage, price_call
from dataplane.usage_estimate import RelayTap, estimate
from schemas.entities import VirtualKey
from schemas.events import Attempt, Event, LlmCall, Usage
from schemas.ids import uuid7
from schemas.snapshot import Snapshot

if TYPE_CHECKING:
    from dataplane.cache import CachePlan, ChunkAccumulator
    from dataplane.health import TargetKey
    from dataplane.ingress.base import ChatPlan
    from dataplane.pipeline import Endpoint
    from dataplane.ports import Admission
    from dataplane.routing import RoutePlan
    from dataplane.stages.governance import OnPath
    from dataplane.state import WorkerState
    from schemas.policy import Verdict

# The key of a call not (yet) authenticated; never in a snapshot (no hash matches "").
ANONYMOUS = VirtualKey(id="", workspace_id="", key_hash="")


def new_request_id() -> str:
    return "req_" + os.urandom(16).hex()


def _no_context() -> AgentContext:
    return AgentContext(request_id="", agent_id=None, run_id=None, session_id=None, workflow_id=None)


@dataclass(slots=True)
class Call:
    """Everything one request's stages decide and observe. Stages read and add to it; the
    pipeline's `finish` settles its admission, releases what it holds and emits its event."""

    request: web.Request
    worker: WorkerState
    endpoint: Endpoint
    snap: Snapshot
    started: float = field(default_factory=time.perf_counter)
    vk: VirtualKey = ANONYMOUS
    ctx: AgentContext = field(default_factory=_no_context)
    department_id: str | None = None
    member_id: str | None = None
    # intake and plan
    raw: Any = None  # the decoded JSON body (or None)
    body_bytes: bytes = b""
    plan: ChatPlan | None = None
    target: Target | None = None
    requested_model: str = ""
    stream: bool = False
    tools: tuple[str, ...] = ()
    max_tokens: int | None = None  # what the upstream will be told (after clamp or injection)
    input_bound: int = 0  # an upper bound on input tokens, for holds and token limits
    # The prompt template the request rendered (schemas.prompts): its name and version.
    prompt_id: str | None = None
    prompt_version: int | None = None
    provider_key: KeyChoice = NO_KEY  # the upstream credential (route stage)
    # routing: the plan (plan stage), the targets in the order to try them with their credential
    # and health key (route stage), the deadline (perf_counter; None: none), every attempt made
    route: RoutePlan | None = None
    order: list[tuple[Target, KeyChoice, TargetKey]] = field(default_factory=list)
    deadline: float | None = None
    attempts: list[Attempt] = field(default_factory=list)
    # cache (stages.cache): the header value (hit | semantic-hit | miss | skip), the plan and key
    # when the call uses the cache, the similarity of a semantic hit, the stream being folded for
    # storage, and the prompt's embedding (a semantic miss stores it with the answer)
    cache: str = "miss"
    cache_plan: CachePlan | None = None
    cache_key: str = ""
    cache_similarity: float | None = None
    cache_fold: ChunkAccumulator | None = None
    cache_vector: list[float] | None = None
    cache_partition: str = ""
    cache_text: str = ""  # the prompt a semantic lookup embeds
    cache_generation: int = 0  # the namespace's purge generation, in the key and the semantic entry
    # Spend the call caused besides its own answer, booked in events of their own (the semantic
    # lookup's embedding call): settled against its budgets with it.
    side_cost_nanos: int = 0
    # governance
    on_path: OnPath | None = None  # what governs the call (stages.governance.on_path)
    verdict: Verdict | None = None
    hold_nanos: int = 0
    # A cost known before dispatch (the spend API's amount): the budget hold and the policy's cost
    # estimate are exactly this, with no tokens, instead of the token-price bound.
    fixed_cost_nanos: int | None = None
    admission: Admission | None = None
    decision: str = "allow"
    extra_headers: dict[str, str] = field(default_factory=dict)  # x-ratelimit-*, on every answer
    # outcome
    status: int = 200
    error_code: str | None = None
    usage: Usage | None = None
    cost_nanos: int = 0
    priced: bool = True
    pricing: CallPrice | None = None  # what priced it (price()); None: never priced (no usage)
    ttfb_ms: float | None = None
    partial: bool = False
    anomalies: tuple[str, ...] = ()  # see LlmCall.anomalies
    usage_estimated: bool = False
    emitted: bool = False
    trace_id: str | None = None  # the W3C trace id when the request is traced (dataplane.tracing)
    # The archived bodies' object key (dataplane.bodies; None: metadata only) and a streamed
    # answer's relayed bytes (their kept head), which the archive stores as the response.
    body_key: str | None = None
    relay_tap: RelayTap | None = None
    # What a successful call records instead of its `llm.call` (e.g. the spend API's `tool.spend`),
    # set by dispatch once the outcome is final; refusals are still `llm.call`s (`pipeline.emit_once`).
    success_event: Event | None = None
    bounded_to: Usage | None = None  # the usage `_bound_usage` last checked (see there)
    held: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)  # slots released in `finish`
    response: web.StreamResponse | None = None  # set by the stage that answers (dispatch, later a cache hit)

    @property
    def ingress(self) -> str:
        return self.endpoint.name

    @property
    def authenticated(self) -> bool:
        return self.vk is not ANONYMOUS

    @property
    def model_ref(self) -> str:
        """`provider/model` as resolved (aliases applied), or "" before a model is known."""
        return f"{self.target.provider.name}/{self.target.model}" if self.target is not None else ""

    def flag(self, anomaly: str) -> None:
        if anomaly not in self.anomalies:
            self.anomalies = (*self.anomalies, anomaly)

    def _bound_usage(self) -> None:
        # Every path that records usage (chat, native, passthrough sniffer, embeddings, estimates)
        # passes here, via price() and again in event(): impossible counts never reach the ledger.
        # `bounded_to` remembers the last usage checked, so the second pass is one identity test.
        usage = self.usage
        if usage is None or usage is self.bounded_to:
            return
        bounded = bounded_usage(usage)
        if bounded is not None:
            self.usage = usage = bounded
            self.flag("usage_clamped")
        self.bounded_to = usage

    def settle_usage(self, reported: Usage | None, request_body: Any, tap: RelayTap) -> None:
        """Record `reported` usage, or an estimate when it is missing (`usage_estimate.estimate`,
        which tokenizes only then), and price it."""
        estimated = estimate(reported, request_body, tap, partial=self.partial)
        self.usage, self.usage_estimated = (reported, False) if estimated is None else (estimated, True)
        self.price()

    def price(self) -> None:
        """Price the usage (`schemas.pricing.price_call`: this call's provider key, then its
        workspace, then platform overrides, built-in, catalog); the per-request fee only if the
        call succeeded so far (status < 400)."""
        self._bound_usage()
        if self.usage is not None and self.target is not None:
            provider = self.target.provider
            self.pricing = p = price_call(self.snap, provider.name, provider.type, self.target.model, self.usage,
                                          workspace_id=self.vk.workspace_id,
                                          provider_key_id=self.provider_key.key_id, success=self.status < 400)
            self.cost_nanos, self.priced = p.cost_nanos, p.priced
            if p.clamped:
                self.flag("cost_clamped")

    def event(self) -> LlmCall:
        self._bound_usage()
        provider = self.target.provider.name if self.target else self.requested_model.partition("/")[0]
        model = self.target.model if self.target else self.requested_model
        pricing = self.pricing
        # Client labels, already bounded by the edge checks (count, name and value sizes).
        props = self.ctx.properties
        return LlmCall(
            event_id=uuid7(),
            occurred_at=dt.datetime.now(dt.UTC),
            workspace_id=self.vk.workspace_id,
            agent_id=self.ctx.agent_id,
            run_id=self.ctx.run_id,
            session_id=self.ctx.session_id,
            workflow_id=self.ctx.workflow_id,
            request_id=self.ctx.request_id,
            snapshot_revision=self.snap.revision,
            provider=provider,
            model=model,
            ingress=self.ingress,
            stream=self.stream,
            status=self.status,
            error_code=self.error_code,
            usage=self.usage or Usage(),
            cost_nanos=self.cost_nanos,
            priced=self.priced,
            key_id=self.vk.id,
            latency_ms=round((time.perf_counter() - self.started) * 1000, 3),
            ttfb_ms=self.ttfb_ms,
            partial=self.partial,
            anomalies=self.anomalies,
            usage_estimated=self.usage_estimated,
            department_id=self.department_id,
            member_id=self.member_id,
            hold_nanos=self.hold_nanos,
            decision=self.decision,
            endpoint=self.request.path,
            provider_key_id=self.provider_key.key_id,
            provider_key_source=self.provider_key.source,
            prompt_id=self.prompt_id,
            prompt_version=self.prompt_version,
            properties={name.lower(): value for name, value in props} if props else {},
            price_source=pricing.source if pricing is not None else "",
            price_id=pricing.price_id if pricing is not None else None,
            price_scope=pricing.scope if pricing is not None else "",
            catalog_version=pricing.catalog_version if pricing is not None else "",
            router_id=self.route.router.id if self.route is not None and self.route.router is not None else None,
            router_rule=self.route.rule if self.route is not None else "",
            attempts=tuple(self.attempts),
            trace_id=self.trace_id,
            body_key=self.archive_key(),
        )

    def archive_key(self) -> str | None:
        """Decided when the event is made (a stream's before its last write): the archive is
        promised on the event, and `finish` queues the upload under the same key."""
        if self.body_key is None and self.authenticated:
            self.body_key = self.worker.bodies.key_for(self)
        return self.body_key

    def headers(self) -> dict[str, str]:
        h = {"Alephant-Request-Id": self.ctx.request_id, "Alephant-Cache": self.cache}
        if self.cache_similarity is not None:
            h["Alephant-Cache-Similarity"] = f"{self.cache_similarity:.4f}"
        if self.target is not None:
            h["Alephant-Provider"] = self.target.provider.name
        if self.attempts:
            h["Alephant-Attempts"] = str(len(self.attempts))
        if self.extra_headers:
            h.update(self.extra_headers)
        return h
