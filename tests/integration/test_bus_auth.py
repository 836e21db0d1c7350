"""Bus credentials (issue 7, item 6): the embedded NATS refuses anonymous clients, and each role can
do on the bus exactly what its process needs. The permissions are `events.jetstream.role_permissions`,
served by the stack's generated `authorization` block; the deploy/ configs carry the same table.

A refused publish never reaches JetStream: the server drops it and sends the client a
`Permissions Violation` error, so a JetStream request times out and the error callback names the
subject. Each check asserts both, and that the bucket did not change.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import aiohttp
import nats
import nats.errors
import psycopg
import pytest
import pytest_asyncio
from nats.aio.client import Client as NATS
from nats.js.errors import KeyNotFoundError

from deploy.services import render_nats_authorization
from deploy.stack import BUS_PASSWORD_VARS, read_env_file
from events.jetstream import role_inbox, role_permissions
from events.publisher import EventPublisher
from schemas.entities import HEARTBEAT_KEY, Heartbeat, entity_encoder
from schemas.events import LlmCall, Usage
from schemas.ids import uuid7
from schemas.settings import Settings
from tests.conftest import Gateway, wait_until_true

Connector = Callable[[str], Awaitable[tuple[NATS, list[str]]]]


@pytest.fixture
def bucket(gateway: Gateway) -> str:
    return gateway.stack.child_env()["ALEPHANT_KV_BUCKET"]


@pytest_asyncio.fixture
async def as_role(gateway: Gateway) -> AsyncIterator[Connector]:
    """Connect as a role of the embedded NATS; each connection collects the server's errors."""
    if not gateway.stack.nats_embedded:
        pytest.skip("bus credentials are the embedded NATS's; an external server has the operator's")
    opened: list[NATS] = []

    async def connect(role: str) -> tuple[NATS, list[str]]:
        errors: list[str] = []

        async def on_error(exc: Exception) -> None:
            errors.append(str(exc))

        nc = await nats.connect(gateway.stack.nats_url(role), name=f"alephant-tests-{role}",
                                inbox_prefix=role_inbox(role), error_cb=on_error, allow_reconnect=False)
        opened.append(nc)
        return nc, errors

    yield connect
    for nc in opened:
        await nc.close()


def _violations(errors: list[str], subject: str) -> list[str]:
    # nats-py lower-cases the server's error line, subject included.
    return [e for e in errors if "permissions violation" in e.lower() and subject.lower() in e.lower()]


async def _violated(errors: list[str], subject: str) -> None:
    """The server's -ERR line reaches the error callback on its own task, possibly after flush() returns."""
    async def seen() -> bool:
        return bool(_violations(errors, subject))
    await wait_until_true(seen, timeout=5)


async def _quiet(_exc: Exception) -> None:
    """nats-py's default error callback logs a traceback; the refusal is what these tests assert."""


async def _refused(call: Awaitable[object], errors: list[str], subject: str) -> None:
    with pytest.raises((nats.errors.TimeoutError, nats.errors.NoRespondersError)):
        await call
    await _violated(errors, subject)


async def _login_error(url: str) -> Exception:
    """The error a single connect attempt to `url` fails with (the client is closed either way:
    nats-py leaves the socket of a refused login open otherwise)."""
    nc = NATS()
    try:
        await nc.connect(url, allow_reconnect=False, max_reconnect_attempts=0, connect_timeout=2, error_cb=_quiet)
    except nats.errors.Error as exc:
        return exc
    finally:
        await nc.close()
    pytest.fail(f"connected to {url.split('@')[-1]} without valid credentials")


async def test_connect_without_credentials_is_refused(gateway: Gateway, as_role: Connector) -> None:
    plain = gateway.stack.services["nats"].url
    anonymous = await _login_error(plain)
    guessed = await _login_error(plain.replace("nats://", "nats://dataplane:not-the-password@", 1))
    assert "authorization violation" in str(anonymous).lower()
    assert "authorization violation" in str(guessed).lower()
    print(f"anonymous: {anonymous!r}; wrong password: {guessed!r}")


async def test_dataplane_reads_the_bucket_and_publishes_events_but_cannot_write_the_bucket(
        gateway: Gateway, as_role: Connector, bucket: str) -> None:
    nc, errors = await as_role("dataplane")
    js = nc.jetstream(timeout=1.5)
    kv = await js.key_value(bucket)  # what the worker's ensure_kv does when the bucket exists
    assert (await kv.get(HEARTBEAT_KEY)).value
    watcher = await kv.watchall()
    assert await watcher.updates(timeout=5) is not None  # type: ignore[no-untyped-call]
    await watcher.stop()  # type: ignore[no-untyped-call]

    event = LlmCall(event_id=uuid7(), occurred_at=dt.datetime.now(dt.UTC), workspace_id="demo",
                    agent_id="demo-agent", run_id=f"run-bus-{uuid.uuid4().hex[:8]}", provider="mock", model="echo",
                    usage=Usage(input_tokens=3, output_tokens=2), cost_nanos=0)
    ack = await EventPublisher(js, stream=gateway.stream, subject_prefix=gateway.subject_prefix).publish(event)
    assert ack.stream == gateway.stream and ack.seq > 0
    assert errors == []

    before = (await kv.get(HEARTBEAT_KEY)).revision
    forged = entity_encoder.encode(Heartbeat(ts_ms=int(time.time() * 1000)))
    await _refused(kv.put(HEARTBEAT_KEY, forged), errors, f"$KV.{bucket}.{HEARTBEAT_KEY}")
    errors.clear()
    await _refused(kv.delete(HEARTBEAT_KEY), errors, f"$KV.{bucket}.{HEARTBEAT_KEY}")
    errors.clear()
    await _refused(js.purge_stream(f"KV_{bucket}"), errors, f"$JS.API.STREAM.PURGE.KV_{bucket}")
    errors.clear()
    await _refused(js.delete_stream(gateway.stream), errors, f"$JS.API.STREAM.DELETE.{gateway.stream}")
    # Not even a plain publish to the bucket's subjects, which would bypass the KV client.
    errors.clear()
    await nc.publish(f"$KV.{bucket}.provider.demo.evil", b"{}")
    await nc.flush()
    await _violated(errors, f"$KV.{bucket}.provider.demo.evil")
    # Nor reading other roles' replies.
    errors.clear()
    await nc.subscribe("_INBOX.controlplane.>")
    await nc.flush()
    await _violated(errors, "_INBOX.controlplane.>")

    # The heartbeat may have moved on (the control plane writes it), but never to a refused write.
    entry = await kv.get(HEARTBEAT_KEY)
    assert entry.revision is not None and before is not None and entry.revision >= before
    with pytest.raises(KeyNotFoundError):
        await kv.get("provider.demo.evil")


async def test_projector_consumes_but_cannot_write_the_bucket(
        gateway: Gateway, as_role: Connector, bucket: str) -> None:
    nc, errors = await as_role("projector")
    js = nc.jetstream(timeout=1.5)
    info = await js.consumer_info(gateway.stream, "ledger")  # its durable consumer, made by the stack's projector
    assert info.config.durable_name == "ledger"
    assert errors == []
    await _refused(js.publish(f"$KV.{bucket}.{HEARTBEAT_KEY}", b"{}"), errors, f"$KV.{bucket}.{HEARTBEAT_KEY}")
    errors.clear()
    await _refused(js.stream_info(f"KV_{bucket}"), errors, f"$JS.API.STREAM.INFO.KV_{bucket}")
    errors.clear()  # it journals events, it does not make them
    await _refused(js.publish(f"{gateway.subject_prefix}.demo.llm.call", b"{}"), errors,
                   f"{gateway.subject_prefix}.demo.llm.call")


async def test_controlplane_writes_the_bucket(gateway: Gateway, as_role: Connector, bucket: str) -> None:
    nc, errors = await as_role("controlplane")
    kv = await nc.jetstream(timeout=5).key_value(bucket)
    key = f"test.bus-auth-{uuid.uuid4().hex[:8]}"
    # A value workers can decode (a heartbeat), so the live snapshot stays clean.
    revision = await kv.put(key, entity_encoder.encode(Heartbeat(ts_ms=int(time.time() * 1000))))
    assert (await kv.get(key)).revision == revision
    await kv.delete(key)
    with pytest.raises(KeyNotFoundError):
        await kv.get(key)
    assert errors == []


async def test_gateway_processes_stay_within_their_rights(gateway: Gateway, http: aiohttp.ClientSession) -> None:
    """A call end to end (worker, control plane heartbeat and relay, projector) under the stack's
    own credentials: journalled, with no permission error in any log and no bus password either
    (the password checks only with the embedded NATS, whose logins the stack generates)."""
    run_id = f"run-bus-{uuid.uuid4().hex[:8]}"
    async with http.post(f"{gateway.base_url}/chat/completions", headers={
            "Authorization": f"Bearer {gateway.demo_key}", "Alephant-Run-Id": run_id},
            json={"model": "mock/echo", "messages": [{"role": "user", "content": "hi"}]}) as resp:
        assert resp.status == 200

    async def journalled() -> bool:
        async with await psycopg.AsyncConnection.connect(gateway.database_url) as conn:
            cur = await conn.execute("SELECT count(*) FROM event_journal WHERE body->>'run_id' = %s", (run_id,))
            return (await cur.fetchone() or (0,))[0] == 1

    await wait_until_true(journalled)
    logs = {p.name: p.read_text(errors="replace") for p in (gateway.stack.state_dir / "logs").glob("*.log")}
    assert not [name for name, text in logs.items() if "permissions violation" in text.lower()]
    assert not [name for name, text in logs.items() if "nats_error" in text]
    if not gateway.stack.nats_embedded:
        return  # an external server: its logins are the operator's, not generated here
    saved = read_env_file(gateway.stack.state_dir / "secrets.env")
    passwords = [saved[var] for var in BUS_PASSWORD_VARS.values()]
    assert len(set(passwords)) == len(passwords) and all(len(p) >= 24 for p in passwords)
    assert not [name for name, text in logs.items() if any(p in text for p in passwords)]
    for path in (gateway.stack.state_dir / "secrets.env", gateway.stack.state_dir / "nats" / "server.conf"):
        assert path.stat().st_mode & 0o077 == 0, path


_DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


def _deploy_users() -> dict[str, tuple[str, dict[str, list[str]]]]:
    names = Settings()  # deploy/ uses the default stream, bucket and subject prefix
    return {role: (f"${var}", role_permissions(role, stream=names.stream, kv_bucket=names.kv_bucket,
                                                subject_prefix=names.subject_prefix))
            for role, var in BUS_PASSWORD_VARS.items()}


def test_deploy_nats_configs_carry_the_tested_permissions(tmp_path: Path) -> None:
    """deploy/nats/auth.conf and the Helm values are the table the tests above run with; both
    server configs parse, and refuse to load without the passwords."""
    block = render_nats_authorization(_deploy_users())
    assert (_DEPLOY / "nats" / "auth.conf").read_text().endswith(block)
    values = (_DEPLOY / "k8s" / "nats-values.yaml").read_text()
    for role, (password, perms) in _deploy_users().items():
        section = values.split(f"- user: {role}\n", 1)[1].split("- user:", 1)[0]
        assert f"password: << {password} >>" in section
        assert [json.loads(line.strip()[2:]) for line in section.splitlines() if line.strip().startswith('- "')] == [
            *perms["publish"], *perms["subscribe"]], role
    passwords = {var: "x" for var in BUS_PASSWORD_VARS.values()}
    for conf in ("nats.conf", "nats-cluster.conf"):
        argv = [str(Path(sys.executable).parent / "nats-server"), "-t", "-c", str(_DEPLOY / "nats" / conf)]
        base = {"PATH": os.environ.get("PATH", ""), "NATS_SERVER_NAME": "nats-1"}
        ok = subprocess.run(argv, env={**base, **passwords}, capture_output=True, text=True, cwd=tmp_path)
        assert ok.returncode == 0, ok.stdout + ok.stderr
        missing = subprocess.run(argv, env=base, capture_output=True, text=True, cwd=tmp_path)
        assert missing.returncode != 0 and "NATS_" in missing.stdout + missing.stderr
