"""Downstream log delivery end to end, on a DEDICATED stack with fast retry settings: destinations
made through the admin API, events from real chat calls through the data plane, NATS and the
projector process's delivery task, to receivers on 127.0.0.1 (on the stack's SSRF allow list)
and to the embedded S3.

* a webhook that answers 500 to its first requests still gets every event, delivered (2xx) once
  each, and every body verifies with the README's signature recipe;
* a destination that refuses connections and one that hangs slow no request, and end with every
  event dead-lettered after the configured attempts (visible in GET and /dead-letters);
* S3: NDJSON objects under the prefix; OTLP: JSON logs at {url}/v1/logs;
* bad input: private-network URLs and unknown event types are refused; the secret is never shown
  (nor logged); the CLI round trip.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import aioboto3
import aiohttp
import pytest
import pytest_asyncio
from aiohttp import web

from deploy.stack import EMBEDDED_S3_CREDENTIALS, Stack
from events.delivery import consumer_name
from events.jetstream import connect
from tests.conftest import dedicated_stack, eventually

MAX_ATTEMPTS = 4
ENV = {"ALEPHANT_DELIVERY_MAX_ATTEMPTS": str(MAX_ATTEMPTS), "ALEPHANT_DELIVERY_BACKOFF_S": "0.2",
       "ALEPHANT_DELIVERY_BACKOFF_MAX_S": "1", "ALEPHANT_DELIVERY_TIMEOUT_S": "1", "ALEPHANT_DELIVERY_LINGER_S": "0.3",
       "ALEPHANT_DELIVERY_REFRESH_S": "0.3"}
CHAT = {"model": "mock/echo", "messages": [{"role": "user", "content": "hi"}]}
SECRET = "whsec_test_canary_5f1e0c3a"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with dedicated_stack(tmp_path_factory.mktemp("delivery"), ENV) as s:
        yield s


@pytest_asyncio.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def admin(http: aiohttp.ClientSession, stack: Stack, method: str, path: str,
                body: Any = None) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {stack.demo['ALEPHANT_ADMIN_TOKEN']}"}
    async with http.request(method, f"{stack.admin_url}{path}", json=body, headers=headers) as resp:
        return resp.status, await resp.json(content_type=None)


async def create(http: aiohttp.ClientSession, stack: Stack, body: dict[str, Any]) -> dict[str, Any]:
    status, answer = await admin(http, stack, "POST", "/admin/v1/log-destinations", body)
    assert status == 201, answer
    return dict(answer)


async def chat(http: aiohttp.ClientSession, stack: Stack) -> float:
    """One chat call; its latency in seconds."""
    started = time.monotonic()
    headers = {"Authorization": f"Bearer {stack.demo['ALEPHANT_API_KEY']}"}
    async with http.post(f"{stack.origin}/v1/chat/completions", json=CHAT, headers=headers) as resp:
        assert resp.status == 200, await resp.text()
        await resp.read()
    return time.monotonic() - started


async def state(http: aiohttp.ClientSession, stack: Stack, dest_id: str) -> dict[str, Any]:
    status, body = await admin(http, stack, "GET", f"/admin/v1/log-destinations/{dest_id}")
    assert status == 200, body
    return dict(body)


@dataclass
class Receiver:
    """An HTTP receiver on 127.0.0.1: answers `fail_first` requests with 500 (or hangs when
    `hang`), then 200; records every request with the status it answered."""

    fail_first: int = 0
    hang: bool = False
    requests: list[tuple[dict[str, str], bytes, int]] = field(default_factory=list)
    port: int = 0
    _runner: web.AppRunner | None = None

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        if self.hang:
            await asyncio.sleep(3600)
        status = 500 if len(self.requests) < self.fail_first else 200
        self.requests.append(({k: v for k, v in request.headers.items()}, body, status))
        return web.Response(status=status, text="ok")

    async def __aenter__(self) -> Receiver:
        app = web.Application()
        app.router.add_post("/{tail:.*}", self.handle)
        self._runner = web.AppRunner(app, shutdown_timeout=0.1)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._runner is not None
        await self._runner.cleanup()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def verify(secret: str, header: str, body: bytes, tolerance_s: int = 300) -> bool:
    """The README's verification recipe, as a receiver writes it."""
    fields = dict(part.split("=", 1) for part in header.split(","))
    t, v1 = fields["t"], fields["v1"]
    expected = hmac.new(secret.encode(), f"{t}.".encode() + body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected, v1) and abs(time.time() - int(t)) <= tolerance_s


async def delete(http: aiohttp.ClientSession, stack: Stack, dest_id: str) -> None:
    status, body = await admin(http, stack, "DELETE", f"/admin/v1/log-destinations/{dest_id}")
    assert status == 200, body


async def test_a_failing_webhook_still_gets_every_event_once_signed(stack: Stack, http: aiohttp.ClientSession) -> None:
    async with Receiver(fail_first=3) as hook:
        dest = await create(http, stack, {"workspace_id": "demo", "kind": "webhook", "url": f"{hook.url}/hook",
                                          "secret": SECRET, "event_types": ["llm.call"], "name": "siem"})
        assert dest["has_secret"] is True and SECRET not in json.dumps(dest) and "secret_enc" not in dest
        for _ in range(12):
            await chat(http, stack)

        async def all_delivered() -> dict[str, list[int]] | None:
            by_id: dict[str, list[int]] = defaultdict(list)
            for headers, _, status in hook.requests:
                by_id[headers["Alephant-Event-Id"]].append(status)
            delivered = [i for i, statuses in by_id.items() if 200 in statuses]
            return by_id if len(delivered) >= 12 else None

        by_id = await eventually(all_delivered, timeout=60)
        await asyncio.sleep(1.0)  # room for a stray duplicate to show up
        assert len(by_id) == 12
        # Exactly once delivered: one 2xx per event; any other request for it was a retry after a 500.
        for event_id, statuses in by_id.items():
            assert statuses.count(200) == 1 and statuses[-1] == 200, (event_id, statuses)
        assert sum(s == 500 for _, _, s in hook.requests) == 3
        for headers, body, _ in hook.requests:
            event = json.loads(body)
            assert verify(SECRET, headers["Alephant-Signature"], body)
            assert not verify("another-secret", headers["Alephant-Signature"], body)
            assert event["event_id"] == headers["Alephant-Event-Id"]
            assert (event["type"], event["workspace_id"]) == ("llm.call", "demo")  # the filters

        async def counted() -> dict[str, Any] | None:
            st = await state(http, stack, dest["id"])
            return st if st["delivered"] >= 12 else None

        st = await eventually(counted, timeout=10)
        assert (st["delivered"], st["failed"], st["dead_lettered"]) == (12, 3, 0)
        assert st["last_error"] == "HTTP 500" and SECRET not in json.dumps(st)
        await delete(http, stack, dest["id"])
    for name in ("projector", "controlplane"):
        assert SECRET not in _log(stack, name)
    await _consumer_gone(stack, dest["id"])


def _log(stack: Stack, name: str) -> str:
    path = stack.procs[name].log
    assert path is not None
    return path.read_text(errors="replace")


async def _consumer_gone(stack: Stack, dest_id: str) -> None:
    nc = await connect(stack.nats_url("admin"), "tests-delivery")
    try:
        js = nc.jetstream()
        stream = stack.child_env().get("ALEPHANT_STREAM", "ALEPHANT_EVENTS")

        async def gone() -> bool | None:
            names = [c.name for c in await js.consumers_info(stream)]
            return True if consumer_name(dest_id) not in names else None

        await eventually(gone, timeout=15)
    finally:
        await nc.close()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


async def test_dead_destinations_slow_no_request_and_end_dead_lettered(stack: Stack,
                                                                       http: aiohttp.ClientSession) -> None:
    baseline = [await chat(http, stack) for _ in range(10)]
    async with Receiver(hang=True) as hanging:
        refused = await create(http, stack, {"workspace_id": "demo", "kind": "webhook", "event_types": ["llm.call"],
                                             "url": f"http://127.0.0.1:{_closed_port()}/hook"})
        hung = await create(http, stack, {"workspace_id": "demo", "kind": "webhook", "event_types": ["llm.call"],
                                          "url": f"{hanging.url}/hook", "secret": SECRET})
        await asyncio.sleep(1.0)  # both workers are up and failing
        during = [await chat(http, stack) for _ in range(10)]
        # Delivery is off the request path: a destination that hangs for the attempt timeout (1 s,
        # several attempts) would add seconds per call if it were on it.
        assert max(during) < 1.0, during
        assert statistics.median(during) < statistics.median(baseline) * 3 + 0.1, (baseline, during)

        async def all_dead(dest_id: str) -> dict[str, Any] | None:
            st = await state(http, stack, dest_id)
            return st if st["dead_lettered"] >= 10 else None

        for dest, error in ((refused, "connect error"), (hung, "timeout after 1 s")):
            st = await eventually(lambda d=dest["id"]: all_dead(d), timeout=90)  # type: ignore[misc]
            assert st["delivered"] == 0 and st["failed"] >= 10 * MAX_ATTEMPTS
            assert error in st["last_error"], st  # the last attempt's error, or the give-up naming it
            status, letters = await admin(http, stack, "GET", f"/admin/v1/log-destinations/{dest['id']}/dead-letters")
            # The 10 calls made while it was dead, and (on a loaded machine) maybe a baseline call
            # whose event reached the stream after the destination was created: each one dead-lettered.
            assert status == 200 and len(letters["data"]) == st["dead_lettered"] >= 10
            for letter in letters["data"]:
                assert letter["attempts"] == MAX_ATTEMPTS and letter["type"] == "llm.call"
                assert letter["reason"].startswith(f"gave up after {MAX_ATTEMPTS} attempts: {error}")
                assert letter["event"]["event_id"] == letter["event_id"]
        await delete(http, stack, refused["id"])
        await delete(http, stack, hung["id"])
    log = _log(stack, "projector")
    assert "delivery_dead_lettered" in log and SECRET not in log


async def test_s3_destination_writes_ndjson_objects(stack: Stack, http: aiohttp.ClientSession) -> None:
    s3_url = stack.child_env()["ALEPHANT_S3_URL"]
    session = aioboto3.Session(aws_access_key_id=EMBEDDED_S3_CREDENTIALS["AWS_ACCESS_KEY_ID"],
                               aws_secret_access_key=EMBEDDED_S3_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
                               region_name="us-east-1")
    async with session.client("s3", endpoint_url=s3_url) as s3:
        await s3.create_bucket(Bucket="delivery-test")
        dest = await create(http, stack, {"workspace_id": "demo", "kind": "s3", "url": "s3://delivery-test/logs/gw",
                                          "event_types": ["llm.call"]})
        for _ in range(5):
            await chat(http, stack)

        async def lines() -> list[dict[str, Any]] | None:
            found: dict[str, dict[str, Any]] = {}
            listing = await s3.list_objects_v2(Bucket="delivery-test", Prefix="logs/gw/")
            for obj in listing.get("Contents", []):
                assert obj["Key"].endswith(f"-{dest['id']}.ndjson") and "/dt=" in obj["Key"]
                resp = await s3.get_object(Bucket="delivery-test", Key=obj["Key"])
                async with resp["Body"] as body:
                    data = await body.read()
                assert data.endswith(b"\n")
                for line in data.splitlines():
                    event = json.loads(line)
                    found[event["event_id"]] = event
            return list(found.values()) if len(found) >= 5 else None

        events = await eventually(lines, timeout=30)
        assert len(events) == 5 and {(e["type"], e["workspace_id"]) for e in events} == {("llm.call", "demo")}
        await delete(http, stack, dest["id"])


async def test_otlp_destination_exports_json_logs(stack: Stack, http: aiohttp.ClientSession) -> None:
    async with Receiver() as collector:
        dest = await create(http, stack, {"kind": "otlp", "url": collector.url, "secret": "otlp-token-canary",
                                          "event_types": ["llm.call"]})
        assert dest["workspace_id"] is None  # operator level: every workspace
        for _ in range(3):
            await chat(http, stack)

        async def records() -> list[tuple[dict[str, str], dict[str, Any]]] | None:
            out = []
            for headers, body, _ in collector.requests:
                doc = json.loads(body)
                for rl in doc["resourceLogs"]:
                    for sl in rl["scopeLogs"]:
                        out += [(headers, r) for r in sl["logRecords"]]
            return out if len(out) >= 3 else None

        got = await eventually(records, timeout=30)
        assert len(got) == 3
        for headers, record in got:
            assert headers["Authorization"] == "Bearer otlp-token-canary"
            attrs = {a["key"]: a["value"]["stringValue"] for a in record["attributes"]}
            event = json.loads(record["body"]["stringValue"])
            assert attrs["event.name"] == "llm.call" and attrs["alephant.workspace.id"] == "demo"
            assert attrs["alephant.event.id"] == event["event_id"]
            assert attrs.get("alephant.request.id") == event.get("request_id")
            assert record.get("traceId") == event.get("trace_id")
        await delete(http, stack, dest["id"])


@pytest.mark.parametrize(("body", "param", "code"), [
    ({"kind": "webhook", "url": "http://10.0.0.1/hook"}, "url", "base_url_not_allowed"),
    ({"kind": "webhook", "url": "https://10.0.0.1/hook"}, "url", "base_url_not_allowed"),
    ({"kind": "otlp", "url": "http://169.254.169.254/"}, "url", "base_url_not_allowed"),
    ({"kind": "webhook", "url": "https://metadata.google.internal/x"}, "url", "base_url_not_allowed"),
    ({"kind": "webhook", "url": "https://example.com/hook", "event_types": ["llm.calls"]}, "event_types[0]",
     "unknown_event_type"),
    ({"kind": "kafka", "url": "https://example.com"}, "kind", "invalid_kind"),
    ({"kind": "s3", "url": "s3://Bad_Bucket/x"}, "url", "invalid_s3_url"),
])
async def test_bad_destinations_are_refused(stack: Stack, http: aiohttp.ClientSession, body: dict[str, Any],
                                            param: str, code: str) -> None:
    status, answer = await admin(http, stack, "POST", "/admin/v1/log-destinations", {"workspace_id": "demo"} | body)
    assert status == 400, answer
    assert (answer["error"]["param"], answer["error"]["code"]) == (param, code)


async def test_an_unknown_workspace_is_refused(stack: Stack, http: aiohttp.ClientSession) -> None:
    status, answer = await admin(http, stack, "POST", "/admin/v1/log-destinations",
                                 {"workspace_id": "nope", "kind": "webhook", "url": "http://127.0.0.1:1/x"})
    assert status == 404 and answer["error"]["code"] == "workspace_not_found"


def test_cli_round_trip(stack: Stack) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ALEPHANT_")}
    env.update(ALEPHANT_ADMIN_URL=stack.admin_url, ALEPHANT_ADMIN_TOKEN=stack.demo["ALEPHANT_ADMIN_TOKEN"],
               HOOK_SECRET="cli-secret-canary")

    def cli(*args: str) -> Any:
        done = subprocess.run([sys.executable, "-m", "deploy.cli", "log-destinations", *args], env=env,
                              capture_output=True, text=True, timeout=60, check=False)
        assert done.returncode == 0, done.stderr
        assert "cli-secret-canary" not in done.stdout + done.stderr
        return json.loads(done.stdout)

    made = cli("create", "--kind", "webhook", "--url", "http://127.0.0.1:9/hook", "--event-type", "llm.call",
               "--secret-env", "HOOK_SECRET", "--name", "cli", "-w", "demo")
    assert made["has_secret"] and made["kind"] == "webhook" and made["event_types"] == ["llm.call"]
    assert made["id"] in [d["id"] for d in cli("list", "-w", "demo")["data"]]
    changed = cli("update", made["id"], "--disable", "--event-type", "policy.decision")
    assert changed["enabled"] is False and changed["event_types"] == ["policy.decision"] and changed["has_secret"]
    got = cli("get", made["id"])
    assert (got["delivered"], got["dead_lettered"]) == (0, 0)
    assert cli("dead-letters", made["id"])["data"] == []
    assert cli("delete", made["id"])["deleted"] is True
