"""Stage: route. Today it picks the upstream credential for the resolved target (master-key
resolution, `decisions.choose_provider_key`); routers, fallbacks and health join it here."""

from __future__ import annotations

import random

from dataplane.call import Call
from dataplane.decisions import choose_provider_key


async def route(call: Call) -> None:
    if call.target is not None:
        call.provider_key = choose_provider_key(call.snap, call.vk, call.target.provider, random.random())  # noqa: S311 (load spreading, not security)
