"""The exact cache's pure parts (dataplane/cache.py): which setting applies, the key, the stored
entry, folding a chunk stream into one completion, and replaying it as chunks."""

from __future__ import annotations

import asyncio
import time

import msgspec
import pytest

from dataplane.cache import (
    ChunkAccumulator,
    Entry,
    ExactCache,
    cache_plan,
    exact_key,
    pack,
    replay_body,
    replay_chunks,
    unpack,
)
from schemas.entities import CacheSettings, ConfigEntity, Workspace, kv_key
from schemas.errors import InvalidRequest
from schemas.events import Usage
from schemas.snapshot import Snapshot

WS = "ws_c"
SETTINGS: list[ConfigEntity] = [
    Workspace(id=WS, name="c"),
    CacheSettings(id="c1", workspace_id=WS, scope="workspace", scope_id=WS, mode="exact", ttl_s=600),
    CacheSettings(id="c2", workspace_id=WS, scope="key", scope_id="vk_off", mode="off"),
    CacheSettings(id="c3", workspace_id=WS, scope="router", scope_id="rtr_1", mode="semantic", ttl_s=60,
                  embedding_model="mock/embed", namespace="routed"),
]
SNAP = Snapshot.build({kv_key(e): e for e in SETTINGS}, 1)


def test_the_most_specific_setting_applies_and_requests_can_opt_out_or_set_a_ttl() -> None:
    plan = cache_plan(SNAP, WS, "vk_a", None, {})
    assert not isinstance(plan, str) and plan is not None
    assert (plan.mode, plan.ttl_s, plan.read, plan.namespace) == ("exact", 600, True, "")
    routed = cache_plan(SNAP, WS, "vk_a", "rtr_1", {})
    assert not isinstance(routed, str) and routed is not None
    assert (routed.mode, routed.ttl_s, routed.namespace) == ("semantic", 60, "routed")
    assert cache_plan(SNAP, WS, "vk_off", "rtr_1", {}) is None  # the key's own `off` wins
    assert cache_plan(SNAP, WS, "vk_off", None, {"Alephant-Cache-Ttl": "30"}) is None  # off is off
    assert cache_plan(SNAP, WS, "vk_a", None, {"Alephant-Cache": "skip"}) == "skip"
    assert cache_plan(SNAP, WS, "vk_a", None, {"Cache-Control": "no-cache, no-store"}) == "skip"
    refresh = cache_plan(SNAP, WS, "vk_a", None, {"Alephant-Cache": "refresh", "Alephant-Cache-Ttl": "5",
                                                   "Alephant-Cache-Namespace": "n1"})
    assert not isinstance(refresh, str) and refresh is not None
    assert (refresh.read, refresh.ttl_s, refresh.namespace) == (False, 5, "n1")
    other = Snapshot.build({}, 1)
    assert cache_plan(other, "ws_x", "vk", None, {}) is None  # off by default
    on_request = cache_plan(other, "ws_x", "vk", None, {"Alephant-Cache-Ttl": "45"})
    assert not isinstance(on_request, str) and on_request is not None and on_request.ttl_s == 45
    for bad in ("0", "-3", "soon", ""):
        assert cache_plan(other, "ws_x", "vk", None, {"Alephant-Cache-Ttl": bad}) is None
    for bad_ns in ("a:b", "*", "-x", "x" * 65):
        with pytest.raises(InvalidRequest) as info:
            cache_plan(other, "ws_x", "vk", None, {"Alephant-Cache-Ttl": "5", "Alephant-Cache-Namespace": bad_ns})
        assert info.value.param == "Alephant-Cache-Namespace"


def test_the_key_ignores_fields_that_do_not_change_the_answer() -> None:
    base = {"model": "a", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10, "temperature": 0}
    key = exact_key(WS, "", 0, "p/m", base)
    assert key.startswith(f"alc:{WS}:_:0:") and len(key.rsplit(":", 1)[1]) == 64
    same = {**base, "model": "b", "user": "u", "stream": True, "stream_options": {"include_usage": True},
            "metadata": {"x": "y"}}
    assert exact_key(WS, "", 0, "p/m", same) == key
    renamed = {k: v for k, v in base.items() if k != "max_tokens"} | {"max_completion_tokens": 10}
    assert exact_key(WS, "", 0, "p/m", renamed) == key
    for changed in ({**base, "temperature": 1}, {**base, "max_tokens": 11}, {**base, "tools": []},
                    {**base, "messages": [{"role": "user", "content": "hi!"}]}):
        assert exact_key(WS, "", 0, "p/m", changed) != key
    assert exact_key(WS, "", 0, "p/other", base) != key  # another target
    assert exact_key("ws_other", "", 0, "p/m", base).rsplit(":", 1)[1] != key.rsplit(":", 1)[1]
    assert exact_key(WS, "n", 0, "p/m", base).startswith(f"alc:{WS}:n:0:")
    assert exact_key(WS, "", 7, "p/m", base).startswith(f"alc:{WS}:_:7:")  # a purge's generation


@pytest.mark.parametrize("size", [10, 50_000])
def test_entries_round_trip_compressed_when_large(size: int) -> None:
    entry = Entry(body=b'{"x": "' + b"a" * size + b'"}', provider="p", model="m",
                  usage=Usage(input_tokens=3, output_tokens=4), cost_nanos=99, stored_ms=1)
    packed = pack(entry)
    assert packed[:1] == (b"z" if size > 1024 else b"r")
    if size > 1024:
        assert len(packed) < size // 10
    assert unpack(packed) == entry
    assert unpack(b"z-not-zlib") is None and unpack(b"r\xc1") is None


def _sse(obj: object) -> bytes:
    return b"data: " + msgspec.json.encode(obj) + b"\n\n"


def test_a_chunk_stream_folds_into_one_completion_and_replays_as_the_same_chunks() -> None:
    acc = ChunkAccumulator()
    base = {"id": "c1", "object": "chat.completion.chunk", "created": 5, "model": "m"}
    stream = (_sse({**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": "Hel"}}]})
              + _sse({**base, "choices": [{"index": 0, "delta": {"content": "lo"}}]})
              + _sse({**base, "choices": [{"index": 0, "delta": {"tool_calls": [
                  {"index": 0, "id": "t1", "type": "function", "function": {"name": "get", "arguments": '{"a"'}}]}}]})
              + _sse({**base, "choices": [{"index": 0, "delta": {"tool_calls": [
                  {"index": 0, "function": {"arguments": ": 1}"}}]}}]})
              + _sse({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]})
              + b"data: [DONE]\n\n")
    for i in range(0, len(stream), 7):  # arbitrary network reads
        acc.feed(stream[i:i + 7])
    body = acc.completion()
    assert body is not None
    done = msgspec.json.decode(body)
    message = done["choices"][0]["message"]
    assert message["content"] == "Hello" and done["choices"][0]["finish_reason"] == "tool_calls"
    assert message["tool_calls"] == [{"id": "t1", "type": "function", "function": {"name": "get",
                                                                                 "arguments": '{"a": 1}'}}]
    entry = Entry(body=body, provider="p", model="m", usage=Usage(), cost_nanos=0, stored_ms=0)
    assert msgspec.json.decode(replay_body(entry))["usage"] == {"prompt_tokens": 0, "completion_tokens": 0,
                                                                "total_tokens": 0}


async def test_replayed_chunks_fold_back_into_the_stored_answer() -> None:
    body = msgspec.json.encode({"id": "c2", "object": "chat.completion", "created": 1, "model": "m", "choices": [
        {"index": 0, "message": {"role": "assistant", "content": "Hi there"}, "finish_reason": "stop"}]})
    entry = Entry(body=body, provider="p", model="m", usage=Usage(), cost_nanos=0, stored_ms=0)
    acc = ChunkAccumulator()
    chunks = [c async for c in replay_chunks(entry, with_usage=True)]
    for chunk in chunks:
        acc.feed(chunk)
    again = acc.completion()
    assert again is not None
    assert msgspec.json.decode(again)["choices"] == msgspec.json.decode(body)["choices"]
    assert b'"usage":{"prompt_tokens":0' in chunks[-2] and chunks[-1] == b"data: [DONE]\n\n"
    assert not any(b"usage" in c for c in [c async for c in replay_chunks(entry, with_usage=False)])


def test_several_choices_or_garbage_are_not_cached() -> None:
    acc = ChunkAccumulator()
    acc.feed(_sse({"choices": [{"index": 1, "delta": {"content": "x"}}]}))
    assert acc.completion() is None
    acc = ChunkAccumulator()
    acc.feed(b"data: {not json\n\n")
    assert acc.completion() is None
    acc = ChunkAccumulator()
    acc.feed(_sse({"choices": [{"index": 0, "delta": {"content": "cut"}}]}))
    assert acc.completion() is None  # never finished


async def test_the_near_cache_serves_recent_entries_without_redis_and_never_past_their_ttl() -> None:
    cache = ExactCache("redis://127.0.0.1:1/0", timeout_s=0.05, max_entry_bytes=1 << 20)  # nothing listens
    now_ms = int(time.time() * 1000)
    entry = Entry(body=b"{}", provider="p", model="m", usage=Usage(), cost_nanos=1, stored_ms=now_ms,
                  expires_ms=now_ms + 60_000)
    assert cache.put("k1", entry, 60)
    assert await cache.get("k1") == entry  # from memory: Redis is unreachable
    short = Entry(body=b"{}", provider="p", model="m", usage=Usage(), cost_nanos=1, stored_ms=now_ms,
                  expires_ms=now_ms + 100)
    cache.put("k2", short, 1)
    await asyncio.sleep(0.15)
    assert await cache.get("k2") is None  # its TTL ended before the near cache's own lifetime
    await cache.close()
