"""The staged pipeline's contract, without a server: one event per request whatever ends it, an
unexpected exception recorded as a 500, unknown keys counted instead of recorded, and (a
Hypothesis property) a request the policy refuses never reaches dispatch (the provider)."""

from __future__ import annotations

import datetime as dt
from typing import cast

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dataplane.call import Call
from dataplane.decisions import Target, bearer_token, resolve_model
from dataplane.pipeline import PIPELINE, run
from dataplane.snapshot import SnapshotStore
from dataplane.stages import governance
from dataplane.state import WORKER, WorkerState
from schemas.entities import ConfigEntity, Policy, Provider, VirtualKey, Workspace, kv_key
from schemas.errors import GatewayError, PermissionDenied
from schemas.keys import KeyRing
from schemas.policy import PolicyInput, decide
from schemas.settings import Secret, Settings
from schemas.snapshot import Snapshot
from tests.unit.conftest import Recorder

SECRET = Secret("unit-test-secret-key-0123456789")
KEY = "sk-alph-pipeline-test"
KEYRING = KeyRing(SECRET)
VK = VirtualKey(id="vk_1", workspace_id="ws_1", key_hash=KEYRING.hash_key(KEY))
PROVIDER = Provider(id="ws_1.up", workspace_id="ws_1", name="up", type="openai")


class Probe:
    """An endpoint that plans `model` and records whether it was dispatched; `fail` raises there."""

    name = "probe"
    governed = True
    records_success = True

    def __init__(self, model: str, fail: BaseException | None = None) -> None:
        self.model, self.fail, self.dispatched = model, fail, 0

    def credential(self, request: web.Request) -> str:
        return bearer_token(request.headers.get("Authorization"))

    async def intake(self, call: Call) -> None:
        return None

    def plan(self, call: Call) -> None:
        call.requested_model = self.model
        call.target = resolve_model(call.snap, call.vk.workspace_id, self.model)

    def set_max_tokens(self, call: Call, value: int) -> bool:
        call.max_tokens = value
        return True

    def strip_tools(self, call: Call, names: tuple[str, ...]) -> bool:
        return True

    async def dispatch(self, call: Call) -> web.StreamResponse:
        self.dispatched += 1
        if self.fail is not None:
            raise self.fail
        return web.Response(text="ok")


def _worker(*entities: ConfigEntity) -> tuple[WorkerState, Recorder]:
    store = SnapshotStore()
    store.swap(Snapshot.build({kv_key(e): e for e in (Workspace(id="ws_1", name="w"), VK, PROVIDER, *entities)}, 7))
    store.ready.set()
    recorder = Recorder()
    worker = WorkerState(settings=Settings(secret_key=SECRET), keyring=KEYRING, store=store, events=recorder,
                         session=cast(aiohttp.ClientSession, None))
    return worker, recorder


def _request(worker: WorkerState, key: str = KEY) -> web.Request:
    app = web.Application()
    app[WORKER] = worker
    return make_mocked_request("POST", "/v1/chat/completions", headers={"Authorization": f"Bearer {key}"}, app=app)


def test_policy_and_admission_come_before_route_and_dispatch() -> None:
    order = [stage.__name__ for stage in PIPELINE]
    assert order.index("policy") < order.index("admit") < order.index("route") < order.index("_dispatch")
    assert order[-1] == "_dispatch"


async def test_a_success_emits_one_event() -> None:
    worker, recorder = _worker()
    probe = Probe("up/gpt-4o")
    resp = await run(_request(worker), probe)
    assert resp.status == 200 and probe.dispatched == 1
    assert [(e.status, e.model, e.ingress, e.decision) for e in recorder.events] == [(200, "gpt-4o", "probe", "allow")]


async def test_an_unexpected_exception_is_recorded_as_a_500() -> None:
    worker, recorder = _worker()
    with pytest.raises(RuntimeError):
        await run(_request(worker), Probe("up/gpt-4o", fail=RuntimeError("bug")))
    assert [(e.status, e.error_code) for e in recorder.events] == [(500, "internal_error")]


async def test_a_refusal_before_the_model_is_known_is_recorded_once() -> None:
    worker, recorder = _worker()
    with pytest.raises(GatewayError) as err:
        await run(_request(worker), Probe("nosuch/model"))
    assert err.value.status == 404
    assert [(e.status, e.key_id, e.model) for e in recorder.events] == [(404, "vk_1", "nosuch/model")]


async def test_unknown_keys_are_counted_not_recorded() -> None:
    worker, recorder = _worker()
    for _ in range(3):
        with pytest.raises(GatewayError):
            await run(_request(worker, key="sk-alph-guess"), Probe("up/gpt-4o"))
    assert recorder.events == []
    flushed = worker.refusals.flush(recorder)
    assert flushed is not None and flushed.count == 3 and flushed.codes == {"invalid_api_key": 3}
    assert flushed.endpoints == {"/v1/chat/completions": 3} and recorder.others == [flushed]


GLOBS = st.sampled_from(["up/*", "up/gpt-*", "up/gpt-4o", "up/o1*", "other/*", "*"])
SCOPES = st.sampled_from([("workspace", "ws_1"), ("key", "vk_1")])
POLICIES = st.lists(st.builds(
    lambda i, scope, allow, deny: Policy(id=f"pol_{i}", workspace_id="ws_1", scope=scope[0], scope_id=scope[1],
                                         models_allow=tuple(allow), models_deny=tuple(deny)),
    st.integers(0, 99), SCOPES, st.lists(GLOBS, max_size=2), st.lists(GLOBS, max_size=2)),
    max_size=3, unique_by=lambda p: p.id)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(POLICIES, st.sampled_from(["up/gpt-4o", "up/gpt-4o-mini", "up/o1-mini", "up/claude"]))
async def test_a_refused_request_never_reaches_the_provider(policies: list[Policy], model: str) -> None:
    worker, recorder = _worker(*policies)
    probe = Probe(model)
    snap = worker.store.current
    expected = decide(policies, VK, snap.workspaces["ws_1"],
                      PolicyInput(endpoint="/v1/chat/completions", model=model, provider_type="openai", tools=(),
                                  max_tokens=None, est_cost_nanos=0), dt.datetime.now(dt.UTC))
    try:
        await run(_request(worker), probe)
        refused = False
    except PermissionDenied:
        refused = True
    assert refused == (not expected.allowed)
    assert probe.dispatched == (0 if refused else 1)
    assert len(recorder.events) == 1 and recorder.events[0].status == (403 if refused else 200)


def test_on_path_is_memoized_per_worker_until_the_governance_index_changes() -> None:
    pol = Policy(id="pol_1", workspace_id="ws_1", scope="key", scope_id="vk_1", models_deny=("up/x",))
    worker, _ = _worker(pol)
    call = Call(request=_request(worker), worker=worker, endpoint=Probe("up/gpt-4o"), snap=worker.store.current,
                vk=VK, target=Target(PROVIDER, "gpt-4o"))
    assert governance.on_path(call).policies == (pol,)
    later = worker.store.current.with_changes({kv_key(pol): None}, 8)
    again = Call(request=_request(worker), worker=worker, endpoint=Probe("up/gpt-4o"), snap=later, vk=VK)
    assert governance.on_path(again).policies == ()
