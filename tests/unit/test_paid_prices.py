"""What a paid call asks and earns (`dataplane.payments.prices`): per-call amounts, a per-token
price's maximum authorization and metered charge, and atomic units in nano-USD."""

from __future__ import annotations

from dataplane.payments.prices import amount_nanos, atomic_nanos, metered, per_call
from schemas.entities import PaidAmount, PaidEndpoint, PaidPerToken, PaidPrice, PaidRails, PaidServe
from schemas.events import Usage

TOKEN = PaidPerToken(asset="0xUSDC", input_per_mtok="1000000", output_per_mtok="2500000", max_amount="100")


def _endpoint(price: PaidPrice) -> PaidEndpoint:
    return PaidEndpoint(id="paid_1", workspace_id="ws", slug="s", serve=PaidServe(model="mock/echo"), price=price,
                        rails=PaidRails())


def test_the_challenge_asks_the_per_call_amount_or_the_per_token_maximum() -> None:
    assert per_call(_endpoint(PaidPrice(per_call=PaidAmount(amount="10000", asset="0xUSDC")))).amount == "10000"
    asked = per_call(_endpoint(PaidPrice(per_token=TOKEN)))
    assert (asked.amount, asked.asset, asked.decimals) == ("100", "0xUSDC", 6)
    assert amount_nanos(_endpoint(PaidPrice(per_token=TOKEN))) == 100_000


def test_metered_charges_round_up_and_stop_at_the_maximum() -> None:
    assert metered(TOKEN, None) == 0
    assert metered(TOKEN, Usage(input_tokens=10, output_tokens=4)) == 20  # 10*1 + 4*2.5
    assert metered(TOKEN, Usage(input_tokens=1, output_tokens=1)) == 4  # 3.5 rounds up
    assert metered(TOKEN, Usage(input_tokens=10**6, output_tokens=0)) == 100  # capped


def test_atomic_units_in_nano_usd() -> None:
    assert atomic_nanos(10_000, 6) == 10_000_000
    assert atomic_nanos(3, 0) == 3_000_000_000
    assert atomic_nanos(10**9 + 5, 18) == 1  # sub-nano remainders are dropped
