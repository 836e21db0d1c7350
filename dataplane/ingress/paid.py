"""`/paid/{slug}/...`: an agent capability sold per call over the x402 rail (issue 12).

The caller has no virtual key: it pays. The endpoint's workspace and agent are the call's
principal (`principal`), so the workspace's and agent's policies, limits and budgets govern what
serving costs, and the revenue lands on the run that served it. The flow (authorization:
verify, serve, settle; `dataplane.payments.x402_rail` talks to the facilitator):

1. No payment header: one 402 challenge (`PAYMENT-REQUIRED` for x402 v2, a problem+json body with
   the v1 `accepts`), recorded as a `payment.event` challenge.
2. A payment: its credential is claimed fleet-wide before anything else (the idempotency store,
   keyed by the rail's replay key `(chain, asset, from, nonce)`, and by the x402
   `payment-identifier` when the client sends one): a concurrent duplicate is a 409, a replayed
   credential a 402, a retry with the same payment identifier the first call's answer.
3. Verify (a refusal releases the claim and answers a fresh 402 naming the reason).
4. Serve: the gateway's own model call (`serve.model`: the body is a Chat Completions request
   whose model is replaced) or the operator's backend (`serve.backend_url` + the path below the
   slug; it gets `Alephant-Run-Id` and `Alephant-Request-Id`, and may answer its own
   `Alephant-Run-Id`). Each paid call gets a run id of its own.
5. A serving failure (any status >= 400, or an error) is never settled: the claim is released,
   the payment voided, the error answered as is.
6. Settle: on success `PAYMENT-RESPONSE` and a `payment.inbound` (the revenue) on the serving
   run; a pending settlement keeps the claim; a failed one after serving is a `payment.event`
   loss and a 402 with `success: false`.

Streaming paid calls (a model-served endpoint, `stream: true`) settle upfront, before the first
byte: see `PaidCall._stream` (revenue on delivery, a `refund_due` memo for a stream that failed).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import msgspec
import structlog
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from dataplane.call import Call
from dataplane.decisions import AgentContext
from dataplane.ingress.chat import ChatIngress
from dataplane.lifecycle import ModelCall, read_object
from dataplane.limits import body_within
from dataplane.payments import mpp_rail, x402_rail
from dataplane.payments.prices import amount_nanos, atomic_nanos, metered
from dataplane.pipeline import run
from dataplane.providers.upstream import read_whole, send
from dataplane.stages.governance import input_bound
from schemas.entities import PaidEndpoint, VirtualKey
from schemas.errors import Conflict, GatewayError, InvalidRequest, NotFound, UpstreamError
from schemas.events import PaymentEvent, PaymentInbound, inbound_payment_event_id
from schemas.http import read_body
from schemas.ids import uuid7

log = structlog.get_logger(__name__)

PAID_ROUTE = "/paid/{slug}{tail:(/.*)?}"
RUN_ID = "Alephant-Run-Id"
REQUEST_ID = "Alephant-Request-Id"
MAX_BACKEND_ANSWER = 16 * 1024 * 1024


@dataclass(slots=True)
class Payment:
    """One request's payment, rail-neutral: its replay key and payload (the claim), the payer, the
    client's idempotency id (x402 `payment-identifier`, MPP `Idempotency-Key`), and the rail's
    verify, settle and receipt header."""

    rail: str
    replay_key: str
    payload: Any
    payer: str
    payment_identifier: str | None
    verify: Callable[[], Awaitable[x402_rail.Verdict]]
    settle: Callable[[], Awaitable[x402_rail.Settlement]]
    receipt: Callable[[x402_rail.Settlement], tuple[str, str] | None]


def _idempotency_key(headers: Any) -> str | None:
    """MPP's retry key: the request's `Idempotency-Key` (1-255 visible ASCII), else None."""
    key = headers.get("Idempotency-Key")
    return key if isinstance(key, str) and 0 < len(key) <= 255 and key.isascii() and key.isprintable() else None


def endpoint_of(call: Call) -> PaidEndpoint:
    slug = call.request.match_info["slug"]
    endpoint = call.snap.paid_endpoints.get(slug)
    if endpoint is None:
        raise NotFound(f"No paid endpoint '{slug}'.", code="paid_endpoint_not_found")
    return endpoint


class PaidCall:
    """The pipeline endpoint of `/paid/{slug}/...` (see the module docstring)."""

    name = "paid"
    governed = True
    records_success = True

    def __init__(self) -> None:
        self.model_call = ModelCall(ChatIngress())

    def credential(self, request: web.Request) -> str:
        return ""  # a paid call authenticates by paying; see `principal`

    def principal(self, call: Call) -> VirtualKey:
        """Who the call acts as: the endpoint's workspace (and agent), under a key id of its own."""
        endpoint = endpoint_of(call)
        return VirtualKey(id=f"paid:{endpoint.id}", workspace_id=endpoint.workspace_id, key_hash="",
                          agent_id=None)

    async def intake(self, call: Call) -> None:
        endpoint = endpoint_of(call)
        # The caller's own Alephant-* headers do not attribute this call: the run is the endpoint's.
        call.ctx = AgentContext(request_id=call.ctx.request_id, agent_id=endpoint.agent_id,
                                run_id="run_" + os.urandom(12).hex(), session_id=None,
                                workflow_id=endpoint.workflow_id)
        agent = call.snap.agents.get(endpoint.agent_id) if endpoint.agent_id else None
        call.department_id = agent.department_id if agent is not None else None
        call.member_id = agent.member_id if agent is not None else None
        call.on_path = None  # what governs the call follows the endpoint's agent, not the caller's headers
        if endpoint.serve.model is not None:
            await read_object(call)
        else:
            settings = call.worker.settings
            call.body_bytes = await body_within(call.request, read_body(call.request, settings.max_body_bytes),
                                                settings.body_read_timeout_s)

    def plan(self, call: Call) -> None:
        endpoint = endpoint_of(call)
        if endpoint.serve.model is None:
            call.input_bound = input_bound(len(call.body_bytes))
            return
        raw = call.raw
        assert isinstance(raw, dict)
        raw["model"] = endpoint.serve.model
        self.model_call.plan(call)

    def set_max_tokens(self, call: Call, value: int) -> bool:
        return self.model_call.set_max_tokens(call, value) if call.plan is not None else value == call.max_tokens

    def strip_tools(self, call: Call, names: tuple[str, ...]) -> bool:
        return self.model_call.strip_tools(call, names) if call.plan is not None else not names

    async def dispatch(self, call: Call) -> web.StreamResponse:
        endpoint = endpoint_of(call)
        payment = self._payment(call, endpoint)
        if payment is None:
            return self._challenge(call, endpoint, "payment required", "challenge")
        fingerprint = hashlib.sha256(msgspec.json.encode(payment.payload)).hexdigest()
        idem, principal_id = call.worker.idempotency, call.vk.id
        claims: list[tuple[str, str]] = []
        try:
            if payment.payment_identifier:
                pid = f"pid:{payment.payment_identifier}"
                claim = await idem.claim(endpoint.workspace_id, principal_id, pid, fingerprint)
                if claim.outcome == "replay":
                    call.success_event = self._memo(call, endpoint, payment, "replayed")
                    return web.Response(status=claim.status, body=claim.body, content_type="application/json",
                                        headers={"Alephant-Payment": "replayed"})
                self._refuse_claim(claim.outcome, "payment identifier")
                claims.append((pid, claim.token))
            claim = await idem.claim(endpoint.workspace_id, principal_id, payment.replay_key, fingerprint)
            if claim.outcome in ("replay", "mismatch"):
                self._release(call, endpoint, claims)
                claims = []
                return self._challenge(call, endpoint, "this payment was already used", "rejected", payment,
                                       reason="payment_replayed")
            self._refuse_claim(claim.outcome, "payment")
            claims.append((payment.replay_key, claim.token))
            verdict = await payment.verify()
            if not verdict.ok:
                self._release(call, endpoint, claims)
                claims = []
                return self._challenge(call, endpoint, f"payment refused: {verdict.reason}", "rejected", payment,
                                       reason=verdict.reason)
            payment.payer = verdict.payer or payment.payer
            if call.stream:
                return await self._stream(call, endpoint, payment, claims)
            answer = await self._serve(call, endpoint)
            if answer.status >= 400:
                self._release(call, endpoint, claims)
                claims = []
                self._record(call, endpoint, self._memo(call, endpoint, payment, "voided",
                                                        reason=f"served {answer.status}"))
                return answer
            return await self._settle(call, endpoint, payment, answer, claims)
        except BaseException:
            self._release(call, endpoint, claims)
            raise

    def _payment(self, call: Call, endpoint: PaidEndpoint) -> Payment | None:
        """The request's payment on a rail the endpoint accepts (400 for an ambiguous or malformed
        one, or one on a rail it does not accept), or None for an unpaid call."""
        headers, resource = call.request.headers, str(call.request.url)
        session = call.worker.session
        parsed = x402_rail.parse(headers)
        if parsed is not None:
            if endpoint.rails.x402 is None:
                raise InvalidRequest(f"Paid endpoint '{endpoint.slug}' does not accept x402 payments.",
                                     code="unsupported_rail")
            x = parsed
            return Payment(
                rail="x402", replay_key=x402_rail.replay_key(x, endpoint), payload=x.payload, payer=x.payer or "",
                payment_identifier=x.payment_identifier,
                verify=lambda: x402_rail.verify(session, endpoint, x, resource_url=resource),
                settle=lambda: x402_rail.settle(session, endpoint, x, resource_url=resource),
                receipt=lambda done: x402_rail.payment_response_header(done, x.version))
        mpp = mpp_rail.parse(headers)
        if mpp is None:
            return None
        rail = endpoint.rails.mpp
        if rail is None:
            raise InvalidRequest(f"Paid endpoint '{endpoint.slug}' does not accept MPP payments.",
                                 code="unsupported_rail")
        m, secret = mpp, self._mpp_secret(call)

        async def verify() -> x402_rail.Verdict:
            return mpp_rail.verify(m, endpoint, secret, time.time())

        return Payment(
            rail="mpp", replay_key=mpp_rail.replay_key(m), payload=m.payload, payer=m.payer,
            payment_identifier=_idempotency_key(headers), verify=verify,
            settle=lambda: mpp_rail.settle(mpp_rail.HttpSubmitter(session, rail.relayer_url), m, endpoint),
            receipt=lambda done: mpp_rail.receipt_header(done, m.method) if done.success else None)

    @staticmethod
    def _mpp_secret(call: Call) -> bytes:
        """The key MPP challenge ids are bound with: the same on every worker (derived from the
        gateway's secret), so any worker verifies a challenge another one issued."""
        return hmac.new(call.worker.settings.secret_key.reveal().encode(), b"alephant-mpp-challenge",
                        hashlib.sha256).digest()

    # --- steps ---------------------------------------------------------------------------------

    def _refuse_claim(self, outcome: str, what: str) -> None:
        if outcome == "claimed":
            return
        if outcome == "unavailable":
            raise UpstreamError(f"The {what} could not be recorded (the claim store is unreachable); nothing was "
                                "charged. Retry shortly.", status=503, code="payment_store_unavailable")
        if outcome == "mismatch":
            raise Conflict(f"This {what} was used with a different payment.", code="payment_identifier_mismatch")
        raise Conflict(f"This {what} is being processed by another request.", code="payment_in_flight")

    def _release(self, call: Call, endpoint: PaidEndpoint, claims: list[tuple[str, str]]) -> None:
        for key, token in claims:
            call.worker.idempotency.release(endpoint.workspace_id, call.vk.id, key, token)

    def _challenge(self, call: Call, endpoint: PaidEndpoint, error: str, status: str, payment: Payment | None = None,
                   *, reason: str = "") -> web.Response:
        """One 402 carrying every rail the endpoint accepts: x402 (`PAYMENT-REQUIRED` and the
        problem+json body) and one `WWW-Authenticate: Payment` per MPP method."""
        headers = self._challenge_headers(call, endpoint, error)
        body = self._problem(call, endpoint, error)
        call.status, call.error_code = 402, "payment_required"
        call.success_event = self._memo(call, endpoint, payment, status, reason=reason)
        return web.Response(status=402, body=body, headers=headers)

    def _challenge_headers(self, call: Call, endpoint: PaidEndpoint, error: str) -> CIMultiDict[str]:
        headers: CIMultiDict[str] = CIMultiDict({REQUEST_ID: call.ctx.request_id, "Cache-Control": "no-store",
                                                 "Content-Type": "application/problem+json"})
        if endpoint.rails.x402 is not None:
            for name, value in x402_rail.challenge(endpoint, str(call.request.url), error)[0].items():
                headers[name] = value
        if endpoint.rails.mpp is not None:
            for value in mpp_rail.challenge_headers(endpoint, str(call.request.url), self._mpp_secret(call),
                                                    time.time()):
                headers.add(mpp_rail.WWW_AUTHENTICATE_HEADER, value)
        return headers

    def _problem(self, call: Call, endpoint: PaidEndpoint, error: str) -> bytes:
        if endpoint.rails.x402 is not None:
            return x402_rail.challenge(endpoint, str(call.request.url), error)[1]
        return msgspec.json.encode({"type": "https://paymentauth.org/problems/payment-required",
                                    "title": "Payment Required", "status": 402, "detail": error})

    async def _serve(self, call: Call, endpoint: PaidEndpoint) -> web.Response:
        """The paid capability's answer, not yet sent."""
        if endpoint.serve.model is not None:
            try:
                resp = await self.model_call.dispatch(call)
            except GatewayError as err:
                return web.Response(status=err.status, body=msgspec.json.encode(
                    {"error": {"message": err.message, "type": err.type, "param": err.param, "code": err.code}}),
                    content_type="application/json")
            assert isinstance(resp, web.Response)
            return resp
        return await self._backend(call, endpoint)

    async def _backend(self, call: Call, endpoint: PaidEndpoint) -> web.Response:
        assert endpoint.serve.backend_url is not None
        request, worker = call.request, call.worker
        tail = request.match_info.get("tail") or ""
        url = endpoint.serve.backend_url.rstrip("/") + tail + (f"?{request.query_string}" if request.query_string
                                                               else "")
        headers = {RUN_ID: call.ctx.run_id or "", REQUEST_ID: call.ctx.request_id,
                   "Content-Type": request.headers.get("Content-Type", "application/json")}
        up = await send(worker.session, f"paid:{endpoint.slug}", request.method, URL(url), call.body_bytes or None,
                        headers, worker.settings.upstream_timeout_s)
        body = await read_whole(up, MAX_BACKEND_ANSWER, f"The backend of paid endpoint '{endpoint.slug}'")
        own_run = up.headers.get(RUN_ID)
        if own_run and len(own_run) <= 200 and own_run.isprintable():
            call.ctx = AgentContext(request_id=call.ctx.request_id, agent_id=call.ctx.agent_id, run_id=own_run,
                                    session_id=None, workflow_id=call.ctx.workflow_id)
        call.status = up.status
        return web.Response(status=up.status, body=body, headers={REQUEST_ID: call.ctx.request_id},
                            content_type=up.headers.get("Content-Type", "application/json").split(";")[0])

    async def _settle(self, call: Call, endpoint: PaidEndpoint, payment: Payment, answer: web.Response,
                      claims: list[tuple[str, str]]) -> web.Response:
        settlement = await payment.settle()
        receipt = payment.receipt(settlement)
        if settlement.success or settlement.pending:
            if receipt is not None:
                answer.headers[receipt[0]] = receipt[1]
            if payment.rail == "mpp":
                answer.headers["Cache-Control"] = "private"
            answer.headers[RUN_ID] = call.ctx.run_id or ""
            if settlement.success:
                self._earn(call, endpoint, payment, settlement.transaction)
            else:  # booked when reconciled (`alephant payments resolve`): the revenue and what it owes back
                earned, owed = self._charged(call, endpoint)
                self._record(call, endpoint, self._memo(call, endpoint, payment, "pending", amount=earned,
                                                        transaction=settlement.transaction, refund=owed))
            final = answer
        else:
            lost = self._charged(call, endpoint)[0]  # served and not collected
            self._record(call, endpoint, self._memo(call, endpoint, payment, "loss", amount=lost,
                                                    reason=settlement.reason))
            error = f"settlement failed: {settlement.reason}"
            headers = self._challenge_headers(call, endpoint, error)
            if receipt is not None:
                headers[receipt[0]] = receipt[1]
            final = web.Response(status=402, body=self._problem(call, endpoint, error), headers=headers)
            call.status, call.error_code = 402, "payment_settlement_failed"
        body = final.body if isinstance(final.body, bytes) else b""
        for key, token in claims:  # the answer is kept: a retry with the payment identifier gets it again
            await call.worker.idempotency.complete(endpoint.workspace_id, call.vk.id, key, token, final.status, body)
        return final

    async def _stream(self, call: Call, endpoint: PaidEndpoint, payment: Payment,
                      claims: list[tuple[str, str]]) -> web.StreamResponse:
        """A streamed paid call settles upfront: the answer goes to the client as it is made, so it
        cannot be withheld until payment. Settled: a `payment.event` "settled" memo, the receipt
        and run id on the stream's headers, then the stream (a pending settlement streams too, and
        its "pending" memo, written once the stream ended, says what it earned and owes). Revenue is recognised on
        delivery: a `payment.inbound` once the stream completed; a stream that failed or was cut
        off owes the payer the whole amount settled back, recorded as a `payment.event`
        "refund_due" (the gateway holds no chain key: the operator refunds). A failed settlement
        serves nothing (402, the claim released)."""
        settlement = await payment.settle()
        amount = amount_nanos(endpoint)
        if not settlement.success and not settlement.pending:
            self._release(call, endpoint, claims)
            claims.clear()
            return self._challenge(call, endpoint, f"settlement failed: {settlement.reason}", "rejected", payment,
                                   reason=settlement.reason)
        receipt = payment.receipt(settlement)
        if receipt is not None:
            call.extra_headers[receipt[0]] = receipt[1]
        call.extra_headers[RUN_ID] = call.ctx.run_id or ""
        if settlement.success:
            call.worker.events.emit(self._memo(call, endpoint, payment, "settled", amount=amount,
                                               transaction=settlement.transaction))
        used = msgspec.json.encode({"error": {
            "message": "This payment paid for a streamed answer, which is not replayed; pay again for a new one.",
            "type": "invalid_request_error", "param": None, "code": "payment_already_used"}})
        for key, token in claims:
            await call.worker.idempotency.complete(endpoint.workspace_id, call.vk.id, key, token, 409, used)
        delivered = False
        try:
            response = await self.model_call.dispatch(call)
            delivered = call.status < 400 and not call.partial
            return response
        finally:
            if settlement.pending:  # booked when reconciled: what it earned, and what it will owe back
                earned, owed = self._charged(call, endpoint) if delivered else (0, amount)
                call.worker.events.emit(self._memo(call, endpoint, payment, "pending", amount=earned,
                                                   transaction=settlement.transaction, refund=owed))
            elif not delivered:
                call.worker.events.emit(self._memo(call, endpoint, payment, "refund_due", amount=amount,
                                                   transaction=settlement.transaction,
                                                   reason=call.error_code or "not delivered"))
            else:
                self._earn(call, endpoint, payment, settlement.transaction)

    def _charged(self, call: Call, endpoint: PaidEndpoint) -> tuple[int, int]:
        """(earned, owed back) in nano-USD for a delivered call: a per-call price earns what it
        asked; a per-token price earns its metered charge and owes the rest of the authorization."""
        price = endpoint.price.per_token
        if price is None:
            return amount_nanos(endpoint), 0
        earned = metered(price, call.usage)
        return atomic_nanos(earned, price.decimals), atomic_nanos(int(price.max_amount) - earned, price.decimals)

    def _earn(self, call: Call, endpoint: PaidEndpoint, payment: Payment, transaction: str) -> None:
        """A delivered, settled call's revenue, and the refund a metered price owes."""
        earned, owed = self._charged(call, endpoint)
        self._record(call, endpoint, self._revenue(call, endpoint, payment, earned))
        if owed > 0:
            call.worker.events.emit(self._memo(call, endpoint, payment, "refund_due", amount=owed,
                                               transaction=transaction, reason="metered"))

    # --- events --------------------------------------------------------------------------------

    def _record(self, call: Call, endpoint: PaidEndpoint, event: PaymentEvent | PaymentInbound) -> None:
        """A model-served call's own event is its `llm.call` (what serving cost), so the payment's
        is emitted beside it; a backend-served call has no cost of its own here (the backend's
        calls through the gateway carry the run): the payment's event is the call's event."""
        if endpoint.serve.model is not None:
            call.worker.events.emit(event)
        else:
            call.success_event = event

    def _envelope(self, call: Call) -> dict[str, Any]:
        ctx = call.ctx
        return {"occurred_at": dt.datetime.now(dt.UTC), "workspace_id": call.vk.workspace_id,
                "agent_id": ctx.agent_id, "run_id": ctx.run_id, "workflow_id": ctx.workflow_id,
                "request_id": ctx.request_id, "snapshot_revision": call.snap.revision, "key_id": call.vk.id,
                "department_id": call.department_id, "member_id": call.member_id}

    def _memo(self, call: Call, endpoint: PaidEndpoint, payment: Payment | None, status: str, *,
              reason: str = "", amount: int = 0, transaction: str = "", refund: int = 0) -> PaymentEvent:
        return PaymentEvent(event_id=uuid7(), **self._envelope(call), endpoint_id=endpoint.id, status=status,
                            rail=payment.rail if payment is not None else "x402",
                            replay_key=payment.replay_key if payment is not None else "",
                            payer=payment.payer if payment is not None else "", reason=reason[:200],
                            amount_nanos=amount, transaction=transaction, refund_nanos=refund)

    def _revenue(self, call: Call, endpoint: PaidEndpoint, payment: Payment, amount: int) -> PaymentInbound:
        # The event id is the credential's: a settlement recorded twice is one revenue entry.
        return PaymentInbound(event_id=inbound_payment_event_id(payment.replay_key), **self._envelope(call),
                              payment_id=payment.replay_key, amount_nanos=amount, rail=payment.rail,
                              endpoint_id=endpoint.id, payer=payment.payer)


_ENDPOINT = PaidCall()


async def paid(request: web.Request) -> web.StreamResponse:
    """The route handler."""
    return await run(request, _ENDPOINT)


__all__ = ["PAID_ROUTE", "PaidCall", "paid"]
