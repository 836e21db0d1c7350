"""The governed tenant of ``make bench``: issue 8's full-governance scenario, set up through the
admin API. A key bound to an agent, in a member and a department of workspace ``bench-gov``, with
a policy, two limits and two budgets on its path, all far above what a benchmark reaches, so that
every request is admitted (one Redis script) and settled, and none is refused.

Its own workspace, so the workspace-level limit and budget never reach the demo key's path: the
plain ``gateway`` target stays ungoverned.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from tests.bench.loadgen import chat_body
from tests.bench.processes import BenchError, Child, admin_post, http, wait_for

GOV_WORKSPACE = "bench-gov"
GOV_DEPARTMENT, GOV_MEMBER, GOV_AGENT = "bench-gov-dept", "bench-gov-member", "bench-gov-agent"
GOV_RPM_PER_KEY = 100_000_000  # about 1.7M req/s: far above one machine's bench
# The admin API's ceiling; over 15x what 5k req/s charge (about 200 tokens a request: the input
# bound, half the body's bytes plus 64, and max_tokens).
GOV_TPM_PER_WORKSPACE = 1_000_000_000
GOV_BUDGET_USD = "1000000"


@dataclass
class Governed:
    """The governed tenant's credentials and what governs its path (ids for the JSON)."""

    key: str
    key_id: str
    headers: dict[str, str]
    budget_ids: list[str]
    limit_ids: list[str]
    policy_ids: list[str]


def register_governed(env: dict[str, str], fake_url: str, stack: Child, *, provider_key: str, model: str,
                      max_tokens: int) -> Governed:
    """Create workspace ``bench-gov`` with provider ``fake`` (at ``fake_url``, key
    ``provider_key``), a department, a member in it, an agent of both, and a virtual key bound to
    the agent; then on that key's path a policy (agent: models_allow ``fake/*``), two budgets
    (agent: month; workspace: total; $1M each) and two limits (key: rpm; workspace: tpm), the
    limits last. Waits until a request for ``model`` (with ``max_tokens``) answers 200 with both
    x-ratelimit trios, i.e. until the worker has applied the limits, and so everything created
    before them. Idempotent over a reused state dir, except that each run mints a new key (with
    its own rpm limit)."""
    ws = GOV_WORKSPACE
    admin_post(env, "/admin/v1/workspaces", {"id": ws, "name": "Bench: full governance"}, exists_ok=True)
    admin_post(env, "/admin/v1/providers", {"workspace_id": ws, "name": "fake", "type": "openai",
                                             "base_url": fake_url, "api_key": provider_key}, exists_ok=True)
    admin_post(env, "/admin/v1/departments", {"workspace_id": ws, "id": GOV_DEPARTMENT, "name": "Bench department"},
                exists_ok=True)
    admin_post(env, "/admin/v1/members", {"workspace_id": ws, "id": GOV_MEMBER, "name": "Bench member",
                                           "department_id": GOV_DEPARTMENT}, exists_ok=True)
    admin_post(env, "/admin/v1/agents", {"workspace_id": ws, "id": GOV_AGENT, "name": "Bench agent",
                                          "department_id": GOV_DEPARTMENT, "member_id": GOV_MEMBER}, exists_ok=True)
    created = admin_post(env, "/admin/v1/virtual-keys", {"workspace_id": ws, "name": "bench governed",
                                                          "agent_id": GOV_AGENT})
    key, key_id = str(created["key"]), str(created["id"])
    policy = {"workspace_id": ws, "id": "bench-gov-policy", "scope": "agent", "scope_id": GOV_AGENT,
              "models_allow": ["fake/*"]}
    admin_post(env, "/admin/v1/policies", policy, exists_ok=True)
    budgets = [
        {"workspace_id": ws, "id": "bench-gov-agent-budget", "scope": "agent", "scope_id": GOV_AGENT,
         "period": "month", "limit_usd": GOV_BUDGET_USD},
        {"workspace_id": ws, "id": "bench-gov-ws-budget", "scope": "workspace", "scope_id": ws,
         "period": "total", "limit_usd": GOV_BUDGET_USD},
    ]
    for budget in budgets:
        admin_post(env, "/admin/v1/budgets", budget, exists_ok=True)
    rpm = admin_post(env, "/admin/v1/limits", {"workspace_id": ws, "scope": "key", "scope_id": key_id,
                                                "rpm": GOV_RPM_PER_KEY})
    admin_post(env, "/admin/v1/limits", {"workspace_id": ws, "id": "bench-gov-ws-tpm", "scope": "workspace",
                                          "scope_id": ws, "tpm": GOV_TPM_PER_WORKSPACE}, exists_ok=True)

    headers = {"Alephant-Agent-Id": GOV_AGENT, "Alephant-Run-Id": "bench-run"}
    url = env["ALEPHANT_BASE_URL"].rstrip("/") + "/chat/completions"
    last: list[tuple[int, bytes, dict[str, str]]] = []
    wanted = ("x-ratelimit-limit-requests", "x-ratelimit-limit-tokens")

    def governed() -> bool:
        got: dict[str, str] = {}
        try:
            status, raw = http("POST", url, headers={"Authorization": f"Bearer {key}", **headers},
                               body=chat_body(model, stream=False, max_tokens=max_tokens),
                               response_headers=got)
        except OSError as exc:
            status, raw = 0, str(exc).encode()
        last[:] = [(status, raw, got)]
        return status == 200 and all(h in got for h in wanted)

    try:
        wait_for(stack, "the governed key to answer 200 under its limits", 30, governed)
    except BenchError as exc:
        status, raw, got = last[0] if last else (0, b"", {})
        limits = {k: v for k, v in got.items() if k.startswith("x-ratelimit")}
        raise BenchError(f"{exc}\n  last answer: {status} {limits} {raw.decode(errors='replace')[:500]}") from None
    return Governed(key=key, key_id=key_id, headers=headers, budget_ids=[str(b["id"]) for b in budgets],
                    limit_ids=[str(rpm["id"]), "bench-gov-ws-tpm"], policy_ids=["bench-gov-policy"])


def budget_state(env: dict[str, str], budget_id: str) -> dict[str, Any]:
    """``GET /admin/v1/budgets/{id}``'s spent, held and remaining (``{}`` if it fails)."""
    auth = {"Authorization": f"Bearer {env['ALEPHANT_ADMIN_TOKEN']}"}
    try:
        status, raw = http("GET", f"{env['ALEPHANT_ADMIN_URL']}/admin/v1/budgets/{budget_id}", headers=auth)
    except OSError:
        return {}
    if status != 200:
        return {}
    doc = json.loads(raw)
    return {k: doc.get(k) for k in ("id", "scope", "limit_usd", "spent_usd", "held_usd", "remaining_usd")}
