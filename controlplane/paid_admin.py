"""Admin commands of paid endpoints (see commands.py for how a command is validated and committed).

A paid endpoint (`schemas.entities.PaidEndpoint`) sells one capability per call at
`/paid/{slug}/...`: what serves it (`serve`: the operator's `backend_url`, or a `model` the
gateway serves), its `price` in a payment asset's atomic units (per call, or metered per token),
and the `rails` it accepts (x402, MPP or both). Its `slug` is unique across the gateway (409 `slug_taken`).

Every refusal is a 400 (404 for a referenced entity that does not exist) whose `param` is the
field path, and nothing is written:

* `slug` not 1..64 letters, digits, '-' or '_' (`invalid_slug`);
* `serve` with neither or both of `backend_url` and `model` (`invalid_serve`); a `backend_url`
  that is not http(s) (`invalid_url`) or reaches an internal address (the provider base URL's
  SSRF rules, `ssrf.py`); a `model` that is not `provider/model`, `router/<name>` or an alias
  name (`invalid_model`), or names a provider or router the workspace has not configured (404
  `provider_not_found` / `router_not_found`);
* `price` without `per_call` or `per_token` (`missing_price`), or with both (`invalid_price`); an
  `amount` (or a per-token `max_amount`) that is not a positive integer string below 10**30, a
  per-token rate that is not a non-negative one, or two zero rates (`invalid_amount`), an empty
  `asset` (`invalid_asset`), `decimals` outside 0..18 (`invalid_decimals`); a per-token price on a
  backend-served endpoint (`per_token_needs_model`: only the gateway's own model call is metered);
* `rails` with neither `x402` nor `mpp` (`missing_rail`), an MPP method other than `evm`
  (`unsupported_method`); an x402 `network` that is not CAIP-2 `eip155:<chain id>` (`invalid_network`), a `pay_to` that
  is not a 0x + 40 hex address (`invalid_address`), a `facilitator_url` that is not http(s) or is
  internal, `versions` that are not a non-empty subset of {1, 2} (`invalid_versions`), a `scheme`
  other than `exact` (`unsupported_scheme`), `max_timeout_s` outside 1..3600 (`invalid_timeout`);
* an `agent_id` that is not an agent of the workspace (references.py).

`GET /admin/v1/paid-endpoints/{id}` adds the revenue recorded for it (`paid_revenue`).
"""

from __future__ import annotations

import re
from typing import Annotated, Any
from urllib.parse import urlsplit

import msgspec
import psycopg
from psycopg_pool import AsyncConnectionPool

from controlplane.commands import ConfigCommands, KindSpec, Prior, _builtins, taken_by
from controlplane.inputs import BaseUrl, Command, Ident
from controlplane.ssrf import check_base_url_resolving
from schemas.entities import (
    MppRail,
    PaidAmount,
    PaidEndpoint,
    PaidPerToken,
    PaidPrice,
    PaidRails,
    PaidServe,
    X402Rail,
)
from schemas.errors import Conflict, InvalidRequest, NotFound
from schemas.ids import new_id
from schemas.money import nanos_to_decimal_str

SLUG_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_IDENT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
_AMOUNT_RE = re.compile(r"^[1-9][0-9]*$")
NETWORK_RE = re.compile(r"^eip155:[0-9]{1,20}$")
ADDRESS_RE = re.compile(r"^0x[0-9a-fA-F]{40}$")
MAX_AMOUNT = 10**30
MAX_DECIMALS = 18
MAX_TIMEOUT_S = 3600
X402_VERSIONS = frozenset({1, 2})
X402_SCHEMES = ("exact",)
MPP_METHODS = frozenset({"evm"})

Short = Annotated[str, msgspec.Meta(max_length=128)]
AmountText = Annotated[str, msgspec.Meta(max_length=40)]
ModelText = Annotated[str, msgspec.Meta(max_length=321)]
ExtraMap = Annotated[dict[Annotated[str, msgspec.Meta(min_length=1, max_length=64)],
                          Annotated[str, msgspec.Meta(max_length=256)]], msgspec.Meta(max_length=16)]


class ServeIn(Command):
    """Exactly one: `backend_url` (http/https; the call's path below `/paid/{slug}` is appended) or
    `model` (`provider/model`, `router/<name>` or an alias name of the workspace)."""

    backend_url: BaseUrl | None = None
    model: ModelText | None = None


class AmountIn(Command):
    """`amount`: a positive integer string in the asset's atomic units ("10000" = 0.01 USDC at 6
    decimals), below 10**30; `asset`: the token (for x402, its contract address); `decimals` 0..18."""

    amount: AmountText
    asset: Short
    decimals: int = 6


class PerTokenIn(Command):
    """A metered price: `input_per_mtok` and `output_per_mtok` (integer strings, atomic units of
    `asset` per million tokens, at least one positive), `max_amount` (the authorization each call
    asks for, settled whole; the unmetered rest is owed back), `decimals` 0..18."""

    asset: Short
    input_per_mtok: AmountText
    output_per_mtok: AmountText
    max_amount: AmountText
    decimals: int = 6


class PriceIn(Command):
    """Exactly one of `per_call` and `per_token`."""

    per_call: AmountIn | None = None
    per_token: PerTokenIn | None = None


class X402In(Command):
    """`network` CAIP-2 (`eip155:84532`), `pay_to` a 0x address, `facilitator_url` http/https,
    `versions` a non-empty subset of [1, 2] (default [2, 1]), `scheme` `exact`, `max_timeout_s`
    1..3600 (default 60), `extra` the scheme's extra data (USDC: EIP-712 `name` and `version`)."""

    network: Short
    pay_to: Short
    facilitator_url: BaseUrl
    versions: Annotated[tuple[int, ...], msgspec.Meta(max_length=8)] = (2, 1)
    scheme: Short = "exact"
    max_timeout_s: int = 60
    extra: ExtraMap = msgspec.field(default_factory=dict)


class MppIn(Command):
    """MPP (`Payment` auth scheme) acceptance: the `charge` intent over `methods` (`evm` only for
    now), challenges bound to `realm` (e.g. the gateway's host) and valid `challenge_ttl_s`
    (30..3600, default 300), payments to `recipient` on `network` (CAIP-2 `eip155:<chain id>`),
    settled through `relayer_url` (the service that submits the signed authorization on chain)."""

    realm: Short
    recipient: Short
    network: Short
    relayer_url: BaseUrl
    methods: Annotated[tuple[Short, ...], msgspec.Meta(max_length=8)] = ("evm",)
    challenge_ttl_s: int = 300


class RailsIn(Command):
    """`x402` and/or `mpp`: at least one."""

    x402: X402In | None = None
    mpp: MppIn | None = None


class CreatePaidEndpoint(Command):
    """A paid endpoint of `workspace_id` at `/paid/{slug}/...` (slug unique across the gateway):
    `serve`, `price` (`per_call`), `rails` (`x402`), and optionally the `agent_id` (an agent of the
    workspace) or `workflow_id` its revenue is attributed to, and a `description`."""

    workspace_id: Ident
    slug: Short
    serve: ServeIn | None = None
    price: PriceIn | None = None
    rails: RailsIn | None = None
    agent_id: Ident | None = None
    workflow_id: Annotated[str, msgspec.Meta(min_length=1, max_length=128)] | None = None
    description: Annotated[str, msgspec.Meta(max_length=1000)] = ""

    def check(self) -> None:
        check_slug(self.slug)
        if self.serve is None:
            raise InvalidRequest("A paid endpoint needs 'serve': {\"backend_url\": \"https://...\"} or "
                                 "{\"model\": \"provider/model\"}.", param="serve", code="invalid_serve")
        check_serve(self.serve)
        check_price(self.price, self.serve)
        if self.rails is None:
            raise InvalidRequest("A paid endpoint needs 'rails': {\"x402\": {\"network\": \"eip155:84532\", "
                                 "\"pay_to\": \"0x...\", \"facilitator_url\": \"https://...\"}}.", param="rails",
                                 code="missing_rail")
        check_rails(self.rails)


class PatchPaidEndpoint(Command):
    """Any field but `workspace_id`; a given `serve`, `price` or `rails` replaces the stored one
    whole. null unbinds `agent_id` or `workflow_id`."""

    slug: Short | msgspec.UnsetType = msgspec.UNSET
    serve: ServeIn | msgspec.UnsetType = msgspec.UNSET
    price: PriceIn | msgspec.UnsetType = msgspec.UNSET
    rails: RailsIn | msgspec.UnsetType = msgspec.UNSET
    agent_id: Ident | msgspec.UnsetType | None = msgspec.UNSET
    workflow_id: Annotated[str, msgspec.Meta(min_length=1, max_length=128)] | msgspec.UnsetType | None = \
        msgspec.UNSET
    description: Annotated[str, msgspec.Meta(max_length=1000)] | msgspec.UnsetType = msgspec.UNSET


# ---- pure checks (each raises InvalidRequest naming the field) ------------------------------------

def check_slug(slug: str) -> None:
    if not SLUG_RE.match(slug):
        raise InvalidRequest(f"'slug' must be 1 to 64 letters, digits, '-' or '_' (it is the path segment of "
                             f"/paid/{{slug}}/...); got {slug[:80]!r}.", param="slug", code="invalid_slug")


def check_http_url(url: str, param: str) -> None:
    """An absolute http(s) URL with a host (the SSRF rules run later, with DNS)."""
    try:
        parts = urlsplit(url)
        ok = parts.scheme in ("http", "https") and bool(parts.hostname)
    except ValueError:
        ok = False
    if not ok:
        raise InvalidRequest(f"'{param}' must be an http:// or https:// URL with a host; got {url[:120]!r}.",
                             param=param, code="invalid_url")


def check_model(model: str, param: str = "serve.model") -> None:
    """`provider/model`, `router/<name>` or an alias name (no '/')."""
    head, slash, tail = model.partition("/")
    if not slash:
        ok = 1 <= len(model) <= 120 and model.strip() == model
    elif head == "router":
        ok = bool(_IDENT_RE.match(tail))
    else:
        ok = bool(_IDENT_RE.match(head)) and bool(tail) and not tail.endswith("/")
    if not ok:
        raise InvalidRequest(f"'{param}' must be 'provider/model', 'router/<name>' or a model alias name of the "
                             f"workspace; got {model[:120]!r}.", param=param, code="invalid_model")


def check_serve(serve: ServeIn) -> None:
    given = [name for name in ("backend_url", "model") if getattr(serve, name) is not None]
    if len(given) != 1:
        raise InvalidRequest("'serve' must give exactly one of 'backend_url' (your backend, http/https) or 'model' "
                             f"('provider/model', 'router/<name>' or an alias); got {len(given)}"
                             + (f" ({', '.join(given)})" if given else "") + ".",
                             param="serve", code="invalid_serve")
    if serve.backend_url is not None:
        check_http_url(serve.backend_url, "serve.backend_url")
    if serve.model is not None:
        check_model(serve.model)


def check_atomic_amount(amount: str, param: str) -> None:
    """A positive integer string below 10**30: an amount in an asset's atomic units."""
    if not _AMOUNT_RE.match(amount) or int(amount) >= MAX_AMOUNT:
        raise InvalidRequest(f"'{param}' must be a positive integer string in the asset's atomic units, below "
                             f"10^30 (e.g. \"10000\" = 0.01 USDC at 6 decimals); got {amount!r}.",
                             param=param, code="invalid_amount")


def check_decimals(decimals: int, param: str) -> None:
    if not 0 <= decimals <= MAX_DECIMALS:
        raise InvalidRequest(f"'{param}' must be between 0 and {MAX_DECIMALS}; got {decimals}.", param=param,
                             code="invalid_decimals")


def check_network(network: str, param: str) -> None:
    """A CAIP-2 EVM network, `eip155:<chain id>`."""
    if not NETWORK_RE.match(network):
        raise InvalidRequest(f"'{param}' must be a CAIP-2 EVM network 'eip155:<chain id>' (e.g. 'eip155:8453' for "
                             f"Base, 'eip155:84532' for Base Sepolia); got {network!r}.", param=param,
                             code="invalid_network")


def check_address(address: str, param: str) -> None:
    """An EVM address: 0x and 40 hex digits (any case; the checksum is not enforced)."""
    if not ADDRESS_RE.match(address):
        raise InvalidRequest(f"'{param}' must be an EVM address: 0x and 40 hex digits; got {address!r}.",
                             param=param, code="invalid_address")


def check_amount(amount: AmountIn, param: str) -> None:
    check_atomic_amount(amount.amount, f"{param}.amount")
    if not amount.asset.strip():
        raise InvalidRequest(f"'{param}.asset' must name the payment asset (for x402, the token contract "
                             "address); it is empty.", param=f"{param}.asset", code="invalid_asset")
    check_decimals(amount.decimals, f"{param}.decimals")


def check_price(price: PriceIn | None, serve: ServeIn) -> None:
    """Exactly one of `per_call` (`check_amount`) and `per_token` (its rates non-negative, one at
    least positive, its maximum positive; a model-served endpoint only: tokens are counted by the
    gateway's own model call)."""
    if price is None or (price.per_call is None and price.per_token is None):
        param = "price" if price is None else "price.per_call"
        raise InvalidRequest(f"A paid endpoint needs '{param}': the price of one call, e.g. \"price\": "
                             "{\"per_call\": {\"amount\": \"10000\", \"asset\": \"<token>\", \"decimals\": 6}}, "
                             "or a metered \"per_token\" price.", param=param, code="missing_price")
    if price.per_call is not None and price.per_token is not None:
        raise InvalidRequest("Give one of 'price.per_call' and 'price.per_token', not both.", param="price",
                             code="invalid_price")
    if price.per_call is not None:
        check_amount(price.per_call, "price.per_call")
        return
    token = price.per_token
    assert token is not None
    for name in ("input_per_mtok", "output_per_mtok"):
        rate = getattr(token, name)
        if rate != "0":
            check_atomic_amount(rate, f"price.per_token.{name}")
    if token.input_per_mtok == token.output_per_mtok == "0":
        raise InvalidRequest("A per-token price needs a positive input or output rate.",
                             param="price.per_token", code="invalid_amount")
    check_atomic_amount(token.max_amount, "price.per_token.max_amount")
    check_amount(AmountIn(amount=token.max_amount, asset=token.asset, decimals=token.decimals), "price.per_token")
    if serve.model is None:
        raise InvalidRequest("A per-token price needs a model-served endpoint ('serve.model'): the gateway counts "
                             "the tokens of its own model call only.", param="price.per_token",
                             code="per_token_needs_model")


def check_rails(rails: RailsIn) -> None:
    if rails.x402 is None and rails.mpp is None:
        raise InvalidRequest("'rails' must configure 'x402', 'mpp' or both.", param="rails", code="missing_rail")
    if rails.x402 is not None:
        check_x402(rails.x402)
    if rails.mpp is not None:
        check_mpp(rails.mpp)


def check_mpp(m: MppIn, param: str = "rails.mpp") -> None:
    check_network(m.network, f"{param}.network")
    check_address(m.recipient, f"{param}.recipient")
    if not m.methods or any(method not in MPP_METHODS for method in m.methods):
        raise InvalidRequest(f"'{param}.methods' must list methods from {sorted(MPP_METHODS)} (the ones this "
                             f"gateway settles); got {list(m.methods)}.", param=f"{param}.methods",
                             code="unsupported_method")
    if not m.realm.strip():
        raise InvalidRequest(f"'{param}.realm' must name the protection space (e.g. the gateway's host).",
                             param=f"{param}.realm", code="invalid_realm")
    if not 30 <= m.challenge_ttl_s <= MAX_TIMEOUT_S:
        raise InvalidRequest(f"'{param}.challenge_ttl_s' must be between 30 and {MAX_TIMEOUT_S} seconds; got "
                             f"{m.challenge_ttl_s}.", param=f"{param}.challenge_ttl_s", code="invalid_ttl")
    check_http_url(m.relayer_url, f"{param}.relayer_url")


def check_x402(x: X402In, param: str = "rails.x402") -> None:
    check_network(x.network, f"{param}.network")
    check_address(x.pay_to, f"{param}.pay_to")
    check_http_url(x.facilitator_url, f"{param}.facilitator_url")
    if not x.versions or not set(x.versions) <= X402_VERSIONS or len(set(x.versions)) != len(x.versions):
        raise InvalidRequest(f"'{param}.versions' must be a non-empty list of distinct x402 versions from [1, 2]; "
                             f"got {list(x.versions)}.", param=f"{param}.versions", code="invalid_versions")
    if x.scheme not in X402_SCHEMES:
        raise InvalidRequest(f"'{param}.scheme' must be 'exact' (the only x402 scheme supported for now); got "
                             f"{x.scheme!r}.", param=f"{param}.scheme", code="unsupported_scheme")
    if not 1 <= x.max_timeout_s <= MAX_TIMEOUT_S:
        raise InvalidRequest(f"'{param}.max_timeout_s' must be between 1 and {MAX_TIMEOUT_S} seconds; got "
                             f"{x.max_timeout_s}.", param=f"{param}.max_timeout_s", code="invalid_timeout")


# ---- IO checks and the kind ---------------------------------------------------------------------

async def check_url_resolving(cc: ConfigCommands, url: str, param: str) -> None:
    """The provider base URL's SSRF rules (with DNS), re-raised naming `param` (same codes:
    `base_url_not_allowed`, `base_url_unresolvable`, `invalid_base_url`). Wallets use it too."""
    try:
        await check_base_url_resolving(url, cc.ssrf_allow)
    except InvalidRequest as exc:
        message = exc.message.replace("base_url", f"'{param}'", 1) if exc.message.startswith("base_url") \
            else f"'{param}': {exc.message}"
        raise InvalidRequest(message, param=param, code=exc.code) from None


async def _router_named(pool: AsyncConnectionPool[Any], workspace_id: str, name: str) -> str | None:
    async with pool.connection() as conn:
        cur = await conn.execute("SELECT id FROM config_entity WHERE kind = 'router' AND workspace_id = %s "
                                 "AND body->>'name' = %s AND deleted_at IS NULL LIMIT 1", (workspace_id, name))
        row = await cur.fetchone()
    return None if row is None else str(row[0])


async def _build(cc: ConfigCommands, cmd: CreatePaidEndpoint, ent_id: str, prior: Prior | None) -> PaidEndpoint:
    # CreatePaidEndpoint.check has run: serve, price.per_call and rails.x402 are set.
    assert cmd.serve is not None and cmd.price is not None
    assert cmd.rails is not None and (cmd.rails.x402 is not None or cmd.rails.mpp is not None)
    x, m = cmd.rails.x402, cmd.rails.mpp
    if cmd.serve.backend_url is not None:
        await check_url_resolving(cc, cmd.serve.backend_url, "serve.backend_url")
    model = cmd.serve.model
    if model is not None and model.startswith("router/"):
        name = model.removeprefix("router/")
        if await _router_named(cc.pool, cmd.workspace_id, name) is None:
            raise NotFound(f"Workspace '{cmd.workspace_id}' has no router named '{name}' (in 'serve.model': "
                           f"{model!r}); create it first with POST /admin/v1/routers.", param="serve.model",
                           code="router_not_found")
    elif model is not None and "/" in model:
        # Also re-checked in the write's transaction (references.py), so a concurrent delete cannot slip by.
        name = model.partition("/")[0]
        if await cc.load("provider", f"{cmd.workspace_id}.{name}") is None:
            raise NotFound(f"Workspace '{cmd.workspace_id}' has no provider named '{name}' (in 'serve.model': "
                           f"{model!r}); add it first with POST /admin/v1/providers.", param="serve.model",
                           code="provider_not_found")
    if x is not None:
        await check_url_resolving(cc, x.facilitator_url, "rails.x402.facilitator_url")
    if m is not None:
        await check_url_resolving(cc, m.relayer_url, "rails.mpp.relayer_url")
    per_call, per_token = cmd.price.per_call, cmd.price.per_token
    if per_token is not None:
        price = PaidPrice(per_token=PaidPerToken(
            asset=per_token.asset, input_per_mtok=per_token.input_per_mtok, output_per_mtok=per_token.output_per_mtok,
            max_amount=per_token.max_amount, decimals=per_token.decimals))
    else:
        assert per_call is not None  # check_price: exactly one
        price = PaidPrice(per_call=PaidAmount(amount=per_call.amount, asset=per_call.asset,
                                              decimals=per_call.decimals))
    return PaidEndpoint(
        id=ent_id, workspace_id=cmd.workspace_id, slug=cmd.slug,
        serve=PaidServe(backend_url=cmd.serve.backend_url, model=model),
        price=price,
        rails=PaidRails(
            x402=None if x is None else X402Rail(
                network=x.network, pay_to=x.pay_to, facilitator_url=x.facilitator_url, versions=x.versions,
                scheme=x.scheme, max_timeout_s=x.max_timeout_s, extra=dict(x.extra)),
            mpp=None if m is None else MppRail(realm=m.realm, recipient=m.recipient, network=m.network,
                                               relayer_url=m.relayer_url, methods=m.methods,
                                               challenge_ttl_s=m.challenge_ttl_s)),
        agent_id=cmd.agent_id, workflow_id=cmd.workflow_id, description=cmd.description)


async def _unique_slug(conn: psycopg.AsyncConnection[Any], endpoint: Any) -> None:
    """409 `slug_taken` when another live paid endpoint (of any workspace) has this slug."""
    if await taken_by(conn, "paid", "slug", endpoint.slug, endpoint.id) is not None:
        raise Conflict(f"The slug '{endpoint.slug}' is taken by another paid endpoint; slugs are unique across the "
                       "gateway (they are the path /paid/{slug}/...).", param="slug", code="slug_taken")


def _fields(endpoint: PaidEndpoint) -> dict[str, Any]:
    return _builtins(endpoint, "workspace_id", "slug", "serve", "price", "rails", "agent_id", "workflow_id",
                     "description")


PAID_ENDPOINT = KindSpec("paid", "Paid endpoint", CreatePaidEndpoint, PatchPaidEndpoint, lambda c: new_id("paid"),
                         _fields, _build, guard=_unique_slug)


async def paid_revenue(pool: AsyncConnectionPool[Any], endpoint: PaidEndpoint) -> dict[str, Any]:
    """What the endpoint earned and what serving it cost, from the finance projection (USD only, as
    finance counts money): `revenue_usd`/`_nanos` and `calls` from its `revenue` rows; `cost_usd`/
    `_nanos`, the model, tool and outbound-payment cost of the runs that served those calls (each
    paid call has a run of its own, its backend's calls through the gateway included);
    `refunds_due_usd`/`_nanos`, what it owes back to payers (revenue is booked net of it); and
    `margin_usd`/`_nanos`, revenue less cost: did the endpoint earn more than it cost?"""
    async with pool.connection() as conn:
        cur = await conn.execute(
            "WITH paid AS (SELECT revenue_nanos, currency, run_id FROM finance_fact "
            "WHERE kind = 'revenue' AND workspace_id = %s AND endpoint_id = %s) "
            "SELECT (SELECT coalesce(sum(revenue_nanos) FILTER (WHERE currency = 'USD'), 0) FROM paid), "
            "(SELECT count(*) FROM paid), "
            "(SELECT coalesce(sum(refunds_due_nanos) FILTER (WHERE currency = 'USD'), 0) FROM finance_fact "
            "WHERE kind = 'refund_due' AND workspace_id = %s AND endpoint_id = %s), "
            "(SELECT coalesce(sum(coalesce(llm_cost_nanos, 0) + coalesce(tool_cost_nanos, 0) "
            "+ coalesce(payments_out_nanos, 0)) FILTER (WHERE currency = 'USD'), 0) FROM finance_fact "
            "WHERE workspace_id = %s AND run_id IN (SELECT run_id FROM paid WHERE run_id IS NOT NULL))",
            (endpoint.workspace_id, endpoint.id, endpoint.workspace_id, endpoint.id, endpoint.workspace_id))
        row = await cur.fetchone()
    nanos, calls, owed, cost = (int(row[0]), int(row[1]), int(row[2]), int(row[3])) if row is not None \
        else (0, 0, 0, 0)
    return {"revenue_usd": nanos_to_decimal_str(nanos), "revenue_nanos": nanos, "calls": calls,
            "refunds_due_usd": nanos_to_decimal_str(owed), "refunds_due_nanos": owed,
            "cost_usd": nanos_to_decimal_str(cost), "cost_nanos": cost,
            "margin_usd": nanos_to_decimal_str(nanos - cost), "margin_nanos": nanos - cost}
