"""Stages 1-3: readiness (pin a snapshot), authentication, agent context.

Pure decisions live in `dataplane.decisions`; these stages apply them to the `Call`.
"""

from __future__ import annotations

import time

from dataplane.call import Call, new_request_id
from dataplane.decisions import AgentContext, agent_context, request_id_of
from dataplane.decisions import authenticate as authenticate_key
from schemas.errors import AuthenticationFailed, InvalidValue, PermissionDenied, UpstreamError
from schemas.http import REQUEST_ID


async def ready(call: Call) -> None:
    """503 `not_ready` until the first snapshot is loaded; then pin the one this call uses (503
    `config_stale` while stale under ALEPHANT_STALE_POLICY=refuse)."""
    store = call.worker.store
    if not store.ready.is_set():
        raise UpstreamError("The gateway is starting and has not loaded its configuration yet.",
                            status=503, code="not_ready")
    call.snap = store.pin(time.time())


async def authenticate(call: Call) -> None:
    """The virtual key, by its keyed hash (401 `invalid_api_key`); an expired key is 401
    `key_expired` and, being known, is recorded against its workspace. An endpoint whose callers
    pay instead of holding a key (`/paid/...`) names its own principal."""
    principal = getattr(call.endpoint, "principal", None)
    if principal is not None:
        call.vk = principal(call)
        return
    vk = authenticate_key(call.snap, call.endpoint.credential(call.request), call.worker.keyring.hash_key)
    if vk.expires_at_ms is not None and vk.expires_at_ms <= time.time() * 1000:
        call.vk = vk
        raise AuthenticationFailed("This API key has expired (it was rotated or given an expiry). Use its "
                                   "replacement.", code="key_expired")
    call.vk = vk


async def agent(call: Call) -> None:
    """Agent context from the contract headers (403 `agent_mismatch` for a key bound to another
    agent), and the department and member the request acts under: the key's own binding, else
    its agent's."""
    vk = call.vk
    try:
        call.ctx = agent_context(call.request.headers, vk, new_request_id)
    except PermissionDenied:  # an agent mismatch is recorded too: under the client's request id if valid
        try:
            rid = request_id_of(call.request.headers) or new_request_id()
        except InvalidValue:
            rid = new_request_id()
        call.ctx = AgentContext(request_id=rid, agent_id=None, run_id=None, session_id=None, workflow_id=None)
        call.request[REQUEST_ID] = call.ctx.request_id
        raise
    call.request[REQUEST_ID] = call.ctx.request_id
    department, member = vk.department_id, vk.member_id
    if call.ctx.agent_id is not None and (department is None or member is None):
        ag = call.snap.agents.get(call.ctx.agent_id)
        if ag is not None and ag.workspace_id == vk.workspace_id:
            department = department or ag.department_id
            member = member or ag.member_id
    if member is not None and department is None:
        mem = call.snap.members.get(member)
        if mem is not None:
            department = mem.department_id
    call.department_id, call.member_id = department, member
