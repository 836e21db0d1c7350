"""The router target of ``make bench``: the plain gateway's path plus a router, set up through the
admin API.

A router in the demo workspace with strategy ``weighted`` (1:1) over two targets that are both
the fake upstream: provider ``fake`` (the runner's) and provider ``fake2`` (same base URL, key and
price). Requests go to ``POST /router/{id}/v1/chat/completions`` with the demo key, so against the
``gateway`` target the difference is what routing costs: the route plan, the weighted draw, the
per-worker target health and the attempt loop. Its name is new on every run (a reused state dir
keeps the previous run's router).
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass

from tests.bench.loadgen import chat_body
from tests.bench.processes import BenchError, Child, admin_post, http, wait_for

SECOND_PROVIDER = "fake2"
ROUTER_STRATEGY = "weighted"


class RouterUnavailable(BenchError):
    """The stack's admin API has no ``/admin/v1/routers`` (an older or unfinished control plane)."""


@dataclass
class Routed:
    """The router the bench calls: its id and name, the OpenAI base URL through it, and which
    providers answered the readiness probes (both must have)."""

    router_id: str
    name: str
    base_url: str
    probes_served_by: dict[str, int]


def register_router(env: dict[str, str], fake_url: str, stack: Child, *, first_provider: str, provider_key: str,
                    model: str, price: dict[str, int], headers: dict[str, str], max_tokens: int) -> Routed:
    """Register ``fake2`` at ``fake_url`` (with ``provider_key`` and ``price`` for ``model``), then
    a weighted router over ``<first_provider>/<model>`` and ``fake2/<model>``. Waits until calls
    through it answer 200 and both providers have served one (the worker has the router and both
    providers). Raises RouterUnavailable when the admin API answers 404 or 405 for routers."""
    admin_post(env, "/admin/v1/providers", {"workspace_id": "demo", "name": SECOND_PROVIDER, "type": "openai",
                                            "base_url": fake_url, "api_key": provider_key}, exists_ok=True)
    admin_post(env, "/admin/v1/prices", {"provider": SECOND_PROVIDER, "model": model, **price}, exists_ok=True)
    name = f"bench-router-{os.urandom(3).hex()}"
    body = {"workspace_id": "demo", "name": name, "strategy": ROUTER_STRATEGY,
            "targets": [{"model": f"{first_provider}/{model}", "weight": 1},
                        {"model": f"{SECOND_PROVIDER}/{model}", "weight": 1}]}
    auth = {"Authorization": f"Bearer {env['ALEPHANT_ADMIN_TOKEN']}"}
    status, raw = http("POST", env["ALEPHANT_ADMIN_URL"] + "/admin/v1/routers", headers=auth, body=body)
    if status in (404, 405):
        raise RouterUnavailable(f"POST /admin/v1/routers -> {status}: {raw.decode(errors='replace')[:200]}")
    if status not in (200, 201, 202):
        raise BenchError(f"POST /admin/v1/routers -> {status}: {raw.decode(errors='replace')[:500]}")
    router_id = str(json.loads(raw)["id"])
    base_url = env["ALEPHANT_BASE_URL"].rstrip("/").removesuffix("/v1") + f"/router/{router_id}/v1"

    served: Counter[str] = Counter()
    last: list[tuple[int, bytes]] = []
    request_headers = {"Authorization": f"Bearer {env['ALEPHANT_API_KEY']}", **headers}

    def both_serve() -> bool:
        got: dict[str, str] = {}
        try:
            result = http("POST", base_url + "/chat/completions", headers=request_headers,
                          body=chat_body(model, stream=False, max_tokens=max_tokens), response_headers=got)
        except OSError as exc:
            result = (0, str(exc).encode())
        last[:] = [result]
        if result[0] == 200:
            served[got.get("alephant-provider", "?")] += 1
        return result[0] == 200 and {first_provider, SECOND_PROVIDER} <= set(served)

    try:
        wait_for(stack, f"router {name} to answer 200 from both of its targets", 30, both_serve)
    except BenchError as exc:
        status, raw = last[0] if last else (0, b"")
        raise BenchError(f"{exc}\n  served so far: {dict(served)}; last answer: {status} "
                         f"{raw.decode(errors='replace')[:500]}") from None
    return Routed(router_id=router_id, name=name, base_url=base_url, probes_served_by=dict(served))
