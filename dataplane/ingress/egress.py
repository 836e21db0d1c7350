"""`/egress`: an agent calls an external endpoint through the gateway, which pays it when it asks
to be paid (x402 or MPP), from the workspace's wallet, within policy and budget (issue 12).

    /egress?url=https://api.example.com/summarise      any method; the body is forwarded as is
    /egress/{alias}/summarise?x=1                      a wallet's alias: its base URL + the path

The caller authenticates with its virtual key (and names its agent and run with the usual
`Alephant-*` headers), so the call runs the staged pipeline like any other: policy, limits and
the budgets on its path. Dispatch:

1. The request goes out unpaid (SSRF-checked at connect time, like every upstream; no redirect
   is followed; the caller's credentials and `Alephant-*` headers are not forwarded). An answer
   other than 402 is relayed as is, and costs nothing.
2. A 402: its payment options are read (`dataplane.payments.wallet.offers`) and the wallet
   chosen (the `Alephant-Wallet` header names one by name or id; an alias's owner; else the
   workspace's first wallet open to the caller's agent) picks one within its policy: the rail,
   the asset allowlist, the per-payment cap (403 `egress_asset_not_allowed`,
   `egress_payment_over_cap`, 402 `egress_no_payable_offer`, 403 `egress_no_wallet`).
3. Its price is decided against the policies (`max_cost_usd`) and reserved against the
   budgets (`stages.governance.reserve`: 429 `budget_exceeded`), then signed. Nothing is signed
   before that: a refused payment never leaves the gateway.
4. The request is sent again with the credential. The seller's answer is relayed with
   `Alephant-Payment: paid` and its receipt. The call is recorded as a `payment.outbound` (the
   spend, on the caller's run; its event id is derived from the credential, so a payment is one
   ledger entry) when the seller served (2xx) or its receipt says it settled; a seller that
   refuses the payment (402 again, or a failure without a settled receipt) is answered as it
   answered, with `Alephant-Payment: refused`, and the call is recorded as an `llm.call` refusal
   with no cost.

Answers are read whole (at most 16 MiB), not streamed.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlsplit

import structlog
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from dataplane.call import Call
from dataplane.lifecycle import bearer
from dataplane.limits import body_within
from dataplane.payments import wallet as payments
from dataplane.payments.outbound import WALLET_HEADER, outbound_event, payer
from dataplane.pipeline import run
from dataplane.providers.upstream import read_whole, send
from dataplane.stages import governance
from schemas.errors import InvalidRequest, NotFound, PermissionDenied, UpstreamError
from schemas.http import read_limited

log = structlog.get_logger(__name__)

EGRESS_ROUTE = "/egress"
EGRESS_ALIAS_ROUTE = "/egress/{alias:[A-Za-z0-9_-]{1,64}}{tail:(/.*)?}"
PAYMENT_HEADER = "Alephant-Payment"
MAX_ANSWER = 16 * 1024 * 1024
# Never forwarded: the caller's gateway credentials, hop-by-hop headers, our own, and payment
# credentials (the gateway pays; a client's own would be a second payment).
_DROP = frozenset({"authorization", "proxy-authorization", "x-api-key", "cookie", "host", "content-length",
                   "transfer-encoding", "connection", "keep-alive", "upgrade", "te", "trailer",
                   "proxy-connection", "payment-signature", "x-payment", "payment-authorization",
                   "accept-encoding"})
_DROP_ANSWER = frozenset({"content-length", "transfer-encoding", "connection", "keep-alive", "content-encoding",
                          "set-cookie", "www-authenticate", "payment-required"})


class EgressRefused(PermissionDenied):
    """The wallet pays none of the options the seller offered (its policy), before signing."""

    default_code = "egress_refused"


@dataclass(slots=True)
class Answer:
    status: int
    headers: CIMultiDictProxy[str]
    body: bytes


_TARGET: web.RequestKey[str] = web.RequestKey("egress_target", str)


def _target(call: Call) -> str:
    """The URL to call (400 `invalid_url` when `?url=` is missing or not an http(s) URL; 404 for an
    unknown alias)."""
    request = call.request
    alias = request.match_info.get("alias")
    if alias is not None:
        base = next((w.aliases[alias] for w in call.snap.wallets.get(call.vk.workspace_id, ()) if alias in w.aliases),
                    None)
        if base is None:
            raise NotFound(f"No egress alias '{alias}' in this workspace.", code="egress_alias_not_found")
        tail = request.match_info.get("tail") or ""
        return base.rstrip("/") + tail + (f"?{request.query_string}" if request.query_string else "")
    url = request.query.get("url", "")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.username or parts.password \
            or len(url) > 8192:
        raise InvalidRequest("Name the endpoint to call as ?url=<http(s) URL> (no credentials in it).", param="url",
                             code="invalid_url")
    return url


def _forwarded(request: web.Request) -> dict[str, str]:
    return {k: v for k, v in request.headers.items()
            if k.lower() not in _DROP and not k.lower().startswith("alephant-")}


class EgressCall:
    """The pipeline endpoint of `/egress` (see the module docstring)."""

    name = "egress"
    governed = True
    records_success = False  # a free call is not an event; a paid one is its `payment.outbound`

    def credential(self, request: web.Request) -> str:
        return bearer(request)

    async def intake(self, call: Call) -> None:
        url = _target(call)
        call.request[_TARGET] = url
        call.requested_model = "egress/" + (urlsplit(url).hostname or "")[:200]
        settings = call.worker.settings
        call.body_bytes = await body_within(call.request, read_limited(call.request, settings.max_body_bytes),
                                            settings.body_read_timeout_s)

    def plan(self, call: Call) -> None:
        call.fixed_cost_nanos = 0  # the price is known only from the seller's 402 (`governance.reserve`)
        call.max_tokens = 0
        call.input_bound = 0

    def set_max_tokens(self, call: Call, value: int) -> bool:
        return True  # no tokens

    def strip_tools(self, call: Call, names: tuple[str, ...]) -> bool:
        return True  # offers no tools

    async def _send(self, call: Call, extra: dict[str, str] | None = None) -> Answer:
        request, worker = call.request, call.worker
        host = urlsplit(call.request[_TARGET]).hostname or "endpoint"
        headers = _forwarded(request) | (extra or {})
        up = await send(worker.session, f"egress:{host}", request.method, URL(call.request[_TARGET], encoded=True),
                        call.body_bytes or None, headers, worker.settings.upstream_timeout_s)
        body = await read_whole(up, MAX_ANSWER, f"'{host}'")
        if 300 <= up.status < 400:
            raise UpstreamError(f"'{host}' answered with a redirect ({up.status}); the gateway does not follow "
                                "redirects on egress.", code="upstream_redirect")
        return Answer(up.status, up.headers, body)

    def _relay(self, call: Call, answer: Answer, extra: dict[str, str] | None = None) -> web.Response:
        headers: CIMultiDict[str] = CIMultiDict((k, v) for k, v in answer.headers.items()
                                                if k.lower() not in _DROP_ANSWER)
        if answer.status == 402:  # a 402 passed back keeps its payment options
            for name in ("WWW-Authenticate", "PAYMENT-REQUIRED"):
                for value in answer.headers.getall(name, []):
                    headers.add(name, value)
        headers.update(extra or {})
        headers["Alephant-Request-Id"] = call.ctx.request_id
        headers.update(call.extra_headers)
        call.status = answer.status
        return web.Response(status=answer.status, body=answer.body, headers=headers)

    async def dispatch(self, call: Call) -> web.StreamResponse:
        first = await self._send(call)
        if first.status != 402:
            return self._relay(call, first)
        found = payments.offers(first.headers, first.body)
        wallet = payer(call, lambda message: EgressRefused(message, param=WALLET_HEADER, code="egress_no_wallet"),
                       alias=call.request.match_info.get("alias"))
        choice = payments.choose(wallet, found)
        if isinstance(choice, payments.Refusal):
            if choice.code == "egress_no_payable_offer":
                raise InvalidRequest(choice.message, code=choice.code, status=402)
            raise EgressRefused(choice.message, code=choice.code)
        # Decided and reserved before signing: a payment over a policy or a budget is never made.
        call.fixed_cost_nanos = choice.nanos
        await governance.policy(call)
        await governance.reserve(call, choice.nanos)
        secret = call.worker.provider_key(wallet.private_key_enc)
        assert secret is not None
        signed = await payments.sign(choice, payments.account_of(secret.reveal()))
        answer = await self._send(call, {signed.header: signed.value})
        ok, detail = payments.settled(answer.headers)
        if ok is False or (ok is None and not 200 <= answer.status < 300):
            call.error_code = "egress_payment_refused"
            log.info("egress_payment_refused", status=answer.status, reason=detail[:100], rail=choice.offer.rail)
            return self._relay(call, answer, {PAYMENT_HEADER: "refused"})
        call.cost_nanos = choice.nanos
        call.success_event = outbound_event(call, wallet, choice, signed, detail,
                                            resource=call.request[_TARGET].split("?", 1)[0])
        return self._relay(call, answer, {PAYMENT_HEADER: "paid", "Alephant-Payment-Id": signed.payment_id})


_ENDPOINT = EgressCall()


async def egress(request: web.Request) -> web.StreamResponse:
    """The route handler of both egress routes."""
    return await run(request, _ENDPOINT)


__all__ = ["EGRESS_ALIAS_ROUTE", "EGRESS_ROUTE", "EgressCall", "EgressRefused", "egress"]
