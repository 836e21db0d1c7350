"""The paid path's added latency (issue 12), measured against a running stack: one connection,
sequential calls, against the local fake facilitator (the x402 SDK's own facilitator over a fake
EIP-3009 USDC chain, `tests.fakes.facilitator`) run in this process.

Three series of `--calls` each, the same Chat request every time: `model` (the demo key on
`POST /v1/chat/completions`, `mock/echo`: the baseline), `challenge` (`POST /paid/{slug}` without
payment: the 402) and `paid` (with a payment signed beforehand, so signing, the client's work, is
not timed: claim, verify, serve, settle). Prints one JSON object: the p50 and p90 of each, and the
paid and challenge p50s over the model call's.

    python -m tests.bench.paid --base-url http://127.0.0.1:8080/v1 --admin-url ... --admin-token ... \
        --api-key ... [--calls 100]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
from typing import Any

import aiohttp

from tests.fakes.facilitator import BASE_SEPOLIA_USDC, FakeFacilitator, pay

BODY = {"model": "mock/echo", "messages": [{"role": "user", "content": "Summarize: a paid call."}], "max_tokens": 16}


def _p(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 3)


async def _timed(http: aiohttp.ClientSession, url: str, headers: dict[str, str], want: int) -> float:
    started = time.perf_counter()
    async with http.post(url, json=BODY, headers=headers) as resp:
        await resp.read()
        if resp.status != want:
            raise RuntimeError(f"POST {url} answered {resp.status}, expected {want}")
    return (time.perf_counter() - started) * 1000


async def measure(base_url: str, admin_url: str, admin_token: str, api_key: str, calls: int) -> dict[str, Any]:
    origin = base_url.removesuffix("/v1")
    async with FakeFacilitator() as fac, aiohttp.ClientSession() as http:
        slug = f"bench-paid-{os.urandom(3).hex()}"
        async with http.post(admin_url + "/admin/v1/paid-endpoints", headers={"Authorization": f"Bearer {admin_token}"},
                             json={"workspace_id": "demo", "slug": slug, "serve": {"model": "mock/echo"},
                                   "price": {"per_call": {"amount": "1000", "asset": BASE_SEPOLIA_USDC}},
                                   "rails": {"x402": {"network": "eip155:84532", "pay_to": "0x" + "ab" * 20,
                                                      "facilitator_url": fac.base_url,
                                                      "extra": {"name": "USDC", "version": "2"}}}}) as resp:
            if resp.status not in (200, 201, 202):
                raise RuntimeError(f"creating the paid endpoint: {resp.status} {await resp.text()}")
        paid_url = f"{origin}/paid/{slug}"
        challenge: tuple[dict[str, str], bytes] | None = None
        for _ in range(100):  # until the worker has the endpoint
            async with http.post(paid_url, json=BODY) as resp:
                if resp.status == 402:
                    challenge = (dict(resp.headers), await resp.read())
                    break
            await asyncio.sleep(0.1)
        if challenge is None:
            raise RuntimeError("the paid endpoint never answered its 402")
        payments = [await pay(challenge) for _ in range(calls)]
        model = [await _timed(http, base_url + "/chat/completions", {"Authorization": f"Bearer {api_key}"}, 200)
                 for _ in range(calls)]
        unpaid = [await _timed(http, paid_url, {}, 402) for _ in range(calls)]
        paid = [await _timed(http, paid_url, payment, 200) for payment in payments]
    out: dict[str, Any] = {"calls": calls}
    for name, series in (("model", model), ("challenge", unpaid), ("paid", paid)):
        out[f"{name}_p50_ms"], out[f"{name}_p90_ms"] = _p(series, 0.5), _p(series, 0.9)
    out["paid_added_p50_ms"] = round(out["paid_p50_ms"] - out["model_p50_ms"], 3)
    out["challenge_added_p50_ms"] = round(out["challenge_p50_ms"] - out["model_p50_ms"], 3)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.paid", description=__doc__.split("\n")[0])
    parser.add_argument("--base-url", required=True, help="the gateway's /v1 base URL")
    parser.add_argument("--admin-url", required=True)
    parser.add_argument("--admin-token", required=True)
    parser.add_argument("--api-key", required=True, help="the demo virtual key (the baseline model calls)")
    parser.add_argument("--calls", type=int, default=100, help="calls per series (default 100)")
    args = parser.parse_args()
    print(json.dumps(asyncio.run(measure(args.base_url, args.admin_url, args.admin_token, args.api_key,
                                         args.calls))))


if __name__ == "__main__":
    main()
