"""Payment rails for paid endpoints (``/paid/{slug}/...``): each rail owns its IO behind plain
functions over the caller's HTTP session. :mod:`.x402_rail` is x402 (``PAYMENT-SIGNATURE`` /
``X-PAYMENT``) verified and settled by a facilitator; :mod:`.mpp_rail` is MPP (``Authorization:
Payment``, evm charge) verified statelessly and settled through a relayer; :mod:`.prices` is what
a call costs, for both."""

from dataplane.payments import x402_rail

__all__ = ["x402_rail"]
