"""Body archival end to end (issue 13): a key whose log settings keep bodies gets its request and
response archived to the stack's embedded S3 as redacted gzip JSON under the key its llm.call
names; canary secrets (its virtual key, its provider key, key-shaped text) appear in no object; a
key with metadata only stores nothing."""

from __future__ import annotations

import gzip
import json
import os
from typing import Any

import aioboto3
import aiohttp
import psycopg
from botocore.config import Config

from tests.conftest import Gateway, cli_json, eventually
from tests.fakes.upstream import FakeUpstream

PROVIDER_CANARY = "sk-canary-bodies-4e1d8a2c9b7f3e50"


async def _object(gateway: Gateway, body_key: str) -> dict[str, Any] | None:
    """The record a body key (`<object>#<request_id>`) names, once its batch is uploaded."""
    key, request_id = body_key.split("#")
    records = await _records(gateway, key)
    return next((r for r in records if r["request_id"] == request_id), None) if records is not None else None


async def _records(gateway: Gateway, key: str) -> list[dict[str, Any]] | None:
    env = gateway.stack.child_env()
    session = aioboto3.Session(aws_access_key_id=env.get("AWS_ACCESS_KEY_ID"),
                               aws_secret_access_key=env.get("AWS_SECRET_ACCESS_KEY"))
    async with session.client("s3", endpoint_url=env["ALEPHANT_S3_URL"], region_name="us-east-1",
                              config=Config(s3={"addressing_style": "path"})) as s3:
        try:
            got = await s3.get_object(Bucket=env.get("ALEPHANT_S3_BUCKET", "alephant-events"), Key=key)
        except s3.exceptions.NoSuchKey:
            return None
        except Exception as exc:  # the bucket may not exist before the first body
            if "NoSuchBucket" in repr(exc):
                return None
            raise
        async with got["Body"] as body:
            return [json.loads(line) for line in gzip.decompress(await body.read()).splitlines()]


async def _event(gateway: Gateway, request_id: str) -> dict[str, Any] | None:
    async with await psycopg.AsyncConnection.connect(gateway.database_url) as conn:
        cur = await conn.execute("SELECT body FROM event_journal WHERE type = 'llm.call' AND body->>'request_id' = %s",
                                 (request_id,))
        row = await cur.fetchone()
        return None if row is None else dict(row[0])


async def test_bodies_are_archived_redacted_and_metadata_only_keys_keep_none(
        gateway: Gateway, http: aiohttp.ClientSession, fake_upstream: FakeUpstream) -> None:
    name = f"bodies{os.urandom(3).hex()}"
    gateway.admin.call("POST", "/admin/v1/providers", {"workspace_id": "demo", "name": name, "type": "openai",
                                                       "base_url": fake_upstream.base_url, "api_key": PROVIDER_CANARY})
    kept, plain = gateway.create_key(name="bodies-kept"), gateway.create_key(name="bodies-plain")
    gateway.admin.call("POST", "/admin/v1/log-settings", {
        "workspace_id": "demo", "scope": "key", "scope_id": kept["id"], "bodies": "both",
        "redact_paths": ["metadata.email"], "redact_patterns": [r"SSN-\d{3}-\d{2}-\d{4}"]})
    content = f"keys {kept['key']} and {PROVIDER_CANARY} and sk-live-ABCDEFGHIJKLMNOPQR; SSN-123-45-6789; fine"
    body = {"model": f"{name}/gpt-4o-mini", "messages": [{"role": "user", "content": content}],
            "metadata": {"email": "a@example.com", "team": "red"}}

    async def call(key: dict[str, Any], **extra: Any) -> tuple[str, str] | None:
        async with http.post(f"{gateway.base_url}/chat/completions", json=body | extra,
                             headers={"Authorization": f"Bearer {key['key']}"}) as resp:
            text = await resp.text()
            return (resp.headers["Alephant-Request-Id"], text) if resp.status == 200 else None

    async def archived_call() -> str | None:  # once the setting reached the worker, its event names the object
        answer = await call(kept)
        if answer is None:
            return None
        event = await eventually(lambda: _event(gateway, answer[0]))
        return str(event["body_key"]) if event.get("body_key") else None
    key = await eventually(archived_call, timeout=20)
    assert key.startswith("bodies/demo/") and ".jsonl.gz#req_" in key  # one record of a batch object
    stored = await eventually(lambda: _object(gateway, key), timeout=20)
    text = json.dumps(stored)
    for secret in (kept["key"], PROVIDER_CANARY, "sk-live-ABCDEFGHIJKLMNOPQR", "SSN-123-45-6789", "a@example.com"):
        assert secret not in text, secret
    message = stored["request"]["messages"][0]["content"]
    assert message == "keys *** and *** and ***; ***; fine"
    assert stored["request"]["metadata"] == {"email": "***", "team": "red"}
    assert stored["response"]["choices"][0]["message"]["role"] == "assistant"
    assert (stored["workspace_id"], stored["key_id"], stored["status"], stored["stream"]) == (
        "demo", kept["id"], 200, False)

    streamed = await call(kept, stream=True)
    assert streamed is not None
    event = await eventually(lambda: _event(gateway, streamed[0]))
    stream_object = await eventually(lambda: _object(gateway, event["body_key"]), timeout=20)
    assert stream_object["stream"] is True and "data: " in stream_object["response"]

    metadata_only = await call(plain)
    assert metadata_only is not None
    plain_event = await eventually(lambda: _event(gateway, metadata_only[0]))
    assert plain_event["body_key"] is None

    # An operator follows a call (a timeline item, an access-log line) to its archived body.
    request_id = stored["request_id"]
    got = gateway.admin.call("GET", f"/admin/v1/requests/{request_id}/body?workspace_id=demo")
    assert (got["key"], got["request"], got["response"]) == (key, stored["request"], stored["response"])
    assert cli_json(gateway, "bodies", "get", request_id)["key"] == key
    status, err = gateway.admin.request("GET", f"/admin/v1/requests/{metadata_only[0]}/body")
    assert (status, err["error"]["code"]) == (404, "body_not_archived")
    status, err = gateway.admin.request("GET", "/admin/v1/requests/req_nope/body?workspace_id=demo")
    assert (status, err["error"]["code"]) == (404, "request_not_found")
