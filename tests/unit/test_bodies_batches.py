"""`dataplane.bodies` batching: records promised on events go to one object per workspace until it
is full or old, a batch is uploaded once every promised record arrived (or it waited long
enough), and records that cannot be kept are counted, never raised."""

from __future__ import annotations

import time
from types import SimpleNamespace
from typing import Any

import pytest

from dataplane import bodies
from schemas.body_archive import split_body_key
from schemas.entities import LogSettings
from schemas.settings import Settings

SETTING = LogSettings(id="logset_1", workspace_id="ws", scope="workspace", scope_id="ws", bodies="both")


def _call(request_id: str, workspace: str = "ws") -> Any:
    snap = SimpleNamespace(log_settings={(workspace, "workspace", workspace): SETTING} if workspace == "ws" else {})
    request = SimpleNamespace(headers={"Authorization": "Bearer sk-alph-secretsecret"})
    return SimpleNamespace(
        vk=SimpleNamespace(workspace_id=workspace, id="vk_1"), snap=snap, request=request,
        ctx=SimpleNamespace(request_id=request_id, agent_id=None, run_id="run_1", session_id=None),
        trace_id=None, ingress="chat.completions", model_ref="mock/echo", requested_model="mock/echo", status=200,
        stream=False, raw={"messages": [{"role": "user", "content": "hi sk-alph-secretsecret"}]}, body_bytes=b"",
        response=SimpleNamespace(body=b'{"ok": true}'), relay_tap=None,
        provider_key=SimpleNamespace(ciphertext=None), worker=SimpleNamespace(provider_key=lambda _c: None))


@pytest.fixture
def archive() -> bodies.BodyArchive:
    return bodies.BodyArchive(Settings(s3_url="http://127.0.0.1:9"))


def test_records_share_a_batch_until_it_is_full(archive: bodies.BodyArchive, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bodies, "BATCH_MAX", 3)
    keys = [archive.key_for(_call(f"req_{i}")) for i in range(4)]
    assert all(k is not None for k in keys)
    objects = [split_body_key(k)[0] for k in keys if k]
    assert objects[0] == objects[1] == objects[2] != objects[3]
    assert [split_body_key(k)[1] for k in keys if k] == ["req_0", "req_1", "req_2", "req_3"]
    assert objects[0].startswith("bodies/ws/") and objects[0].endswith(".jsonl.gz")
    assert archive.key_for(_call("req_x", workspace="other")) is None  # no setting keeps its bodies


def test_a_batch_is_ready_once_its_promised_records_arrived(archive: bodies.BodyArchive) -> None:
    calls = [_call(f"req_{i}") for i in range(2)]
    keys = [archive.key_for(c) for c in calls]
    now = time.monotonic()
    assert archive._ready(now + bodies.FLUSH_S) == []  # closed by age, but a promised record is missing
    archive.submit(calls[0], keys[0] or "")
    archive.submit(calls[1], keys[1] or "")
    (batch,) = archive._ready(now + bodies.FLUSH_S)
    assert len(batch.lines) == 2 and b"sk-alph-secretsecret" not in b"".join(batch.lines)
    assert archive._ready(now + 100) == []


def test_a_late_record_does_not_hold_its_batch_forever(archive: bodies.BodyArchive) -> None:
    first, late = _call("req_a"), _call("req_b")
    key = archive.key_for(first)
    late_key = archive.key_for(late)
    archive.submit(first, key or "")
    now = time.monotonic()
    (batch,) = archive._ready(now + bodies.FLUSH_S + bodies.LATE_S + 1)
    assert len(batch.lines) == 1
    archive.submit(late, late_key or "")  # its batch is gone: dropped and counted
    assert archive.dropped == 1


def test_without_s3_nothing_is_promised() -> None:
    assert bodies.BodyArchive(Settings()).key_for(_call("req_1")) is None
