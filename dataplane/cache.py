"""The response cache: an exact cache in Redis (and, for `semantic` settings, a nearest-prompt index
in Qdrant, `dataplane.cache_semantic`) that answers a repeated model call without calling upstream.

Which calls: the model APIs (chat, responses, messages), when a `CacheSettings` on the call's path
is on (the key's, else its router's, else its workspace's), or when the request sends
`Alephant-Cache-Ttl: <seconds>` (an exact cache for that long). Controls: `Cache-Control:
no-cache` or `Alephant-Cache: skip` (neither read nor written), `Alephant-Cache: refresh` (not
read, written), `Alephant-Cache-Namespace` (a partition of the workspace's cache).

The key (`exact_key`) is a SHA-256 over the workspace, the namespace's purge generation, the target
(the resolved `provider/model`, or the router and the requested model) and the request in Chat
Completions shape with the fields that do not change the answer removed (`IGNORED`). Every
ingress plans to that shape, so an answer cached from one API is a hit for the same question in
another. An answer is stored once, in that internal shape (a `chat.completion` plus the usage and
cost it had), compressed when large, never past `cache_max_entry_bytes`; a cached call is
therefore dispatched through translation, not native passthrough. A hit is replayed in the
client's API, streamed or not, with zero usage (no tokens were spent again).

Fail-open: every Redis operation is bounded by `cache_timeout_s`; a timeout or error is a miss
(counted in `ExactCache.failures`), and after `BREAKER_FAILURES` in a row the cache is skipped for
`BREAKER_OPEN_S`, so an outage costs no request more than one deadline. Each worker also keeps
the entries it read or wrote in the last `NEAR_TTL_S` seconds in memory (the near cache).
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import time
import zlib
from collections import Counter
from collections.abc import AsyncGenerator, Awaitable, Mapping
from dataclasses import dataclass
from typing import Any

import msgspec
import structlog
from redis.asyncio import Redis

from schemas.entities import CacheSettings
from schemas.errors import InvalidRequest
from schemas.events import Usage
from schemas.snapshot import Snapshot

log = structlog.get_logger(__name__)

CACHE = "Alephant-Cache"
CACHE_TTL = "Alephant-Cache-Ttl"
CACHE_NAMESPACE = "Alephant-Cache-Namespace"
CACHE_SIMILARITY = "Alephant-Cache-Similarity"
MAX_TTL_S = 30 * 86400
BREAKER_FAILURES = 3
BREAKER_OPEN_S = 1.0
# The near cache: entries this worker read or wrote lately, kept in memory for at most this long
# (and never past their TTL), so a hot answer is served without a Redis round trip. Another
# worker's `refresh` reaches this one's memory at most this late; purges change the key at once.
NEAR_TTL_S = 2.0
NEAR_MAX = 2048
COMPRESS_OVER = 1024
NAMESPACE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")  # the admin API's rule for a cache namespace

# Request fields that do not change the answer (the rest do: messages, tools, sampling, limits).
IGNORED = frozenset({"model", "user", "stream", "stream_options", "metadata", "store", "service_tier",
                     "prompt_cache_key", "safety_identifier"})

_enc = msgspec.json.Encoder(order="sorted")
_dec = msgspec.json.Decoder()


@dataclass(frozen=True, slots=True)
class CachePlan:
    """How one call uses the cache: `mode` exact or semantic, for `ttl_s`; `read` (not a refresh)
    and the namespace. `settings` is the entity that turned it on (None: the request's own TTL)."""

    mode: str
    ttl_s: int
    read: bool
    namespace: str
    settings: CacheSettings | None = None


def _ttl(raw: str | None) -> int | None:
    if raw is None or not raw.strip().isdigit():
        return None
    ttl = int(raw.strip())
    return min(ttl, MAX_TTL_S) if ttl > 0 else None


def cache_plan(snap: Snapshot, workspace_id: str, key_id: str, router_id: str | None,
               headers: Mapping[str, str]) -> CachePlan | str | None:
    """The call's cache plan; None when caching is off for it; "skip" when the request opts out."""
    control = headers.get(CACHE, "").strip().lower()
    if control == "skip" or "no-cache" in headers.get("Cache-Control", "").lower():
        return "skip"
    settings = snap.cache_settings
    found = settings.get((workspace_id, "key", key_id)) if settings else None
    if found is None and router_id is not None and settings:
        found = settings.get((workspace_id, "router", router_id))
    if found is None and settings:
        found = settings.get((workspace_id, "workspace", workspace_id))
    ttl = _ttl(headers.get(CACHE_TTL))
    namespace = headers.get(CACHE_NAMESPACE, "").strip()
    if namespace and not NAMESPACE.match(namespace):
        raise InvalidRequest(f"{CACHE_NAMESPACE} must be 1-64 letters, digits, '_' or '-' (starting with a letter "
                             "or digit), the rule the purge (DELETE /admin/v1/cache) accepts.",
                             param=CACHE_NAMESPACE, code="invalid_cache_namespace")
    if found is not None and found.mode != "off":
        return CachePlan(mode=found.mode, ttl_s=ttl or found.ttl_s, read=control != "refresh",
                         namespace=namespace or found.namespace, settings=found)
    if ttl is not None and (found is None or found.mode != "off"):
        return CachePlan(mode="exact", ttl_s=ttl, read=control != "refresh", namespace=namespace)
    return None


def normalised(body: Mapping[str, Any]) -> dict[str, Any]:
    """The request fields that change the answer (`max_completion_tokens` counted as `max_tokens`)."""
    out = {k: v for k, v in body.items() if k not in IGNORED}
    if "max_completion_tokens" in out:
        out["max_tokens"] = out.pop("max_completion_tokens")
    return out


def exact_key(workspace_id: str, namespace: str, generation: int, target: str, body: Mapping[str, Any]) -> str:
    """`alc:{workspace}:{namespace or _}:{generation}:{sha256}` (the layout the control plane's
    purge scans)."""
    digest = hashlib.sha256(_enc.encode([workspace_id, target, normalised(body)])).hexdigest()
    return f"alc:{workspace_id}:{namespace or '_'}:{generation}:{digest}"


class Entry(msgspec.Struct, frozen=True, kw_only=True):
    """One cached answer: the `chat.completion` body, the provider and model that produced it,
    its usage and cost then, and when it was stored."""

    body: bytes
    provider: str
    model: str
    usage: Usage
    cost_nanos: int
    stored_ms: int
    expires_ms: int = 0  # when its TTL ends (0: unknown, e.g. stored by an older worker)


_entry_enc = msgspec.msgpack.Encoder()
_entry_dec = msgspec.msgpack.Decoder(Entry)


def pack(entry: Entry) -> bytes:
    raw = _entry_enc.encode(entry)
    return b"z" + zlib.compress(raw, 1) if len(raw) > COMPRESS_OVER else b"r" + raw


def unpack(data: bytes) -> Entry | None:
    try:
        raw = zlib.decompress(data[1:]) if data[:1] == b"z" else data[1:]
        return _entry_dec.decode(raw)
    except (zlib.error, msgspec.DecodeError):
        return None


class ExactCache:
    """Entries in Redis, fail-open (see the module docstring). One per worker."""

    def __init__(self, redis_url: str, timeout_s: float, max_entry_bytes: int) -> None:
        self._url = redis_url
        self._redis: Redis | None = None
        self.timeout_s = timeout_s
        self.max_entry_bytes = max_entry_bytes
        self.failures = 0
        self._failing = 0
        self._open_until = 0.0
        # Lookups by (workspace, outcome: hit | semantic-hit | miss), for metrics' hit rates.
        self.outcomes: Counter[tuple[str, str]] = Counter()
        self._near: dict[str, tuple[float, Entry]] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def _client(self) -> Redis:
        if self._redis is None:
            self._redis = Redis.from_url(self._url, socket_timeout=max(self.timeout_s * 4, 0.2),
                                         socket_connect_timeout=max(self.timeout_s * 4, 0.2))
        return self._redis

    def available(self) -> bool:
        return time.monotonic() >= self._open_until

    def _failed(self, what: str, exc: BaseException) -> None:
        self.failures += 1
        self._failing += 1
        if self._failing >= BREAKER_FAILURES:
            self._open_until = time.monotonic() + BREAKER_OPEN_S
            self._failing = 0
        if self.failures == 1 or self.failures % 1000 == 0:
            log.warning("cache_unavailable", op=what, error=type(exc).__name__, failures=self.failures)

    def _remember(self, key: str, entry: Entry) -> None:
        now = time.monotonic()
        until = now + NEAR_TTL_S
        if entry.expires_ms:
            until = min(until, now + (entry.expires_ms - time.time() * 1000) / 1000)
        if until <= now:
            return
        if len(self._near) >= NEAR_MAX:
            self._near.clear()
        self._near[key] = (until, entry)

    async def get(self, key: str) -> Entry | None:
        near = self._near.get(key)
        if near is not None:
            if near[0] > time.monotonic():
                return near[1]
            del self._near[key]
        if not self.available():
            return None
        try:
            async with asyncio.timeout(self.timeout_s):
                data = await self._client().get(key)
        except Exception as exc:  # a timeout or any Redis error: a miss, never a failed call
            self._failed("get", exc)
            return None
        self._failing = 0
        entry = unpack(data) if isinstance(data, bytes) else None
        if entry is not None:
            self._remember(key, entry)
        return entry

    def put(self, key: str, entry: Entry, ttl_s: int) -> bool:
        """Store off the request path (a task); False when the entry is too large to cache."""
        data = pack(entry)
        if len(data) > self.max_entry_bytes or not self.available():
            return False
        self._remember(key, entry)
        self.spawn(self._put(key, data, ttl_s))
        return True

    def spawn(self, work: Awaitable[None]) -> None:
        """Run `work` off the request path (awaited on close)."""
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _put(self, key: str, data: bytes, ttl_s: int) -> None:
        try:
            async with asyncio.timeout(self.timeout_s * 4):
                await self._client().set(key, data, ex=ttl_s)
        except Exception as exc:  # the answer was served; only the cache entry is lost
            self._failed("set", exc)

    async def close(self) -> None:
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=1.0)
        if self._redis is not None:
            await self._redis.aclose()


# --- answers in the internal shape ---------------------------------------------------------------


class ChunkAccumulator:
    """Folds a stream of `chat.completion.chunk` SSE bytes into one `chat.completion` body (for the
    cache). Only single-choice answers are kept (`ok` False otherwise, or on anything unreadable)."""

    def __init__(self) -> None:
        self.ok = True
        self.id = ""
        self.model = ""
        self.created = 0
        self.content: list[str] = []
        self.tools: dict[int, dict[str, Any]] = {}
        self.finish: str | None = None
        self._buf = b""

    def feed(self, data: bytes) -> None:
        if not self.ok:
            return
        self._buf += data
        *lines, self._buf = self._buf.split(b"\n")
        for line in lines:
            if line.startswith(b"data: ") and not line.startswith(b"data: [DONE]"):
                try:
                    self._chunk(_dec.decode(line[6:]))
                except (msgspec.DecodeError, TypeError, KeyError, AttributeError):
                    self.ok = False

    def _chunk(self, chunk: Any) -> None:
        self.id = self.id or chunk.get("id", "")
        self.model = self.model or chunk.get("model", "")
        self.created = self.created or chunk.get("created", 0)
        for choice in chunk.get("choices") or ():
            if choice.get("index", 0) != 0:
                self.ok = False
                return
            delta = choice.get("delta") or {}
            if isinstance(delta.get("content"), str):
                self.content.append(delta["content"])
            for call in delta.get("tool_calls") or ():
                slot = self.tools.setdefault(call.get("index", 0), {"id": "", "type": "function",
                                                                    "function": {"name": "", "arguments": ""}})
                slot["id"] = slot["id"] or call.get("id") or ""
                fn = call.get("function") or {}
                slot["function"]["name"] += fn.get("name") or ""
                slot["function"]["arguments"] += fn.get("arguments") or ""
            if choice.get("finish_reason"):
                self.finish = choice["finish_reason"]

    def completion(self) -> bytes | None:
        if not self.ok or self.finish is None:
            return None
        message: dict[str, Any] = {"role": "assistant", "content": "".join(self.content) or None}
        if self.tools:
            message["tool_calls"] = [self.tools[i] for i in sorted(self.tools)]
        return msgspec.json.encode({"id": self.id, "object": "chat.completion", "created": self.created,
                                    "model": self.model, "choices": [{"index": 0, "message": message,
                                                                      "finish_reason": self.finish}]})


ZERO_USAGE = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}


def replay_body(entry: Entry) -> bytes:
    """The cached `chat.completion` with zero usage (the tokens were not spent again)."""
    body = _dec.decode(entry.body)
    body["usage"] = ZERO_USAGE
    return msgspec.json.encode(body)


async def replay_chunks(entry: Entry, with_usage: bool) -> AsyncGenerator[bytes, None]:
    """The cached answer as a `chat.completion.chunk` SSE stream: the role and content, each tool
    call, the finish reason, then (`with_usage`) a zero usage chunk and `[DONE]`."""
    body = _dec.decode(entry.body)
    choice = body["choices"][0]
    message = choice.get("message") or {}
    base = {"id": body.get("id", ""), "object": "chat.completion.chunk", "created": body.get("created", 0),
            "model": body.get("model", "")}

    def event(choices: list[Any], **extra: Any) -> bytes:
        return b"data: " + msgspec.json.encode({**base, "choices": choices, **extra}) + b"\n\n"

    yield event([{"index": 0, "delta": {"role": "assistant", "content": message.get("content") or ""},
                  "finish_reason": None}])
    for i, call in enumerate(message.get("tool_calls") or ()):
        yield event([{"index": 0, "delta": {"tool_calls": [{"index": i, **call}]}, "finish_reason": None}])
    yield event([{"index": 0, "delta": {}, "finish_reason": choice.get("finish_reason") or "stop"}])
    if with_usage:
        yield event([], usage=ZERO_USAGE)
    yield b"data: [DONE]\n\n"
