"""The semantic cache's index: the nearest earlier prompt, in Qdrant, and the embedding it is found by.

`SemanticIndex` keeps one point per cached answer: the embedding of the prompt (`semantic_text`
of the request) with the payload `workspace_id`, `namespace`, `partition` (what else must match,
e.g. the target and the request's non-prompt fields, as the caller decides), `generation` (the
namespace's purge generation when stored), `entry_key` (where the answer is, in Redis) and
`expires_at_ms`. A `lookup` returns the nearest point with the same four keys, not expired and at
least as similar as the threshold; the answer itself is read by the caller under `entry_key`.

Storage: one collection per vector dimension, `alephant_cache_d{dim}` (cosine), created on the
first store of that dimension; on a server, with payload indexes on the matched fields. With
`qdrant_url` empty the index is qdrant-client's local mode: in-process, on disk under
`<state_dir>/qdrant/slot-<n>`, the lowest slot no live process holds (an flock on
`slot-<n>.lock`), so a restarted worker finds its earlier entries and workers sharing a state
dir never share a slot. Local mode does its work synchronously (sqlite writes, a brute-force
search), so it runs on one thread of its own, never on the event loop; the remote mode is
qdrant-client's `AsyncQdrantClient`.

Fail-open: nothing here raises to the caller. Qdrant is opened on first use only (a worker that
never uses the semantic cache never opens it), in the background (local mode's first open loads
the collections from disk): until it is ready every call is a miss. Each operation is bounded by
`timeout_s` (`cache_timeout_s`); a timeout or error is a miss or a skipped store, counted in
`failures` and logged at most once a minute. After `BREAKER_FAILURES` failures in a row the
index is skipped for `BREAKER_OPEN_S` (counted in `skipped`), so an outage costs a request at
most one deadline. `sweep` deletes expired points; a worker task calls it periodically.

`embed_text` calls an embedding model through the gateway's own adapters (the caller books its
usage); `semantic_text` is the text a Chat Completions request is embedded by.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import fcntl
import hashlib
import itertools
import os
import random
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, cast

import msgspec
import structlog

from dataplane.decisions import KeyChoice, Target, resolve_model, target_key
from dataplane.providers.base import ChatResponse, UpstreamCall
from dataplane.providers.registry import adapter_for
from dataplane.state import WorkerState
from dataplane.vectors import base64_to_floats
from schemas.entities import VirtualKey
from schemas.errors import InvalidRequest, UpstreamError
from schemas.events import Usage
from schemas.settings import Settings
from schemas.snapshot import Snapshot

__all__ = ["COLLECTION_PREFIX", "Embedded", "SemanticIndex", "collection_name", "embed_text", "point_id",
           "semantic_text"]

if TYPE_CHECKING:
    from qdrant_client import QdrantClient, models

log = structlog.get_logger(__name__)


def _qdrant() -> Any:
    """qdrant-client, imported on first use: it brings numpy, grpc and pydantic (300 modules, twice
    the worker's live objects, so every full garbage collection costs more), which a worker that
    never uses the semantic cache should not carry."""
    import qdrant_client

    return qdrant_client

COLLECTION_PREFIX: Final = "alephant_cache_d"
BREAKER_FAILURES: Final = 3
BREAKER_OPEN_S: Final = 1.0
LOG_EVERY_S: Final = 60.0
# Local mode's first open reads every collection from disk; a failed open is retried after this.
INIT_TIMEOUT_S: Final = 60.0
REOPEN_AFTER_S: Final = 30.0
SWEEP_TIMEOUT_S: Final = 10.0
# Local operations queued on its thread beyond this are refused (a miss): a slow disk must not
# build an unbounded backlog of stores.
MAX_LOCAL_BACKLOG: Final = 256
# Local mode holds every vector in memory and searches them all (1536 floats x 10k ~ 60 MB, a few
# ms a lookup); past this many points it stores nothing more until a sweep frees room.
LOCAL_MAX_POINTS: Final = 10_000
_POINT_NAMESPACE: Final = uuid.UUID("6f1d3c52-8a1e-4c3b-9a57-2f0e4b1d7c10")
_KEYWORD_FIELDS: Final = ("workspace_id", "namespace", "partition")
_INTEGER_FIELDS: Final = ("generation", "expires_at_ms")


def collection_name(dim: int) -> str:
    """The collection holding `dim`-long vectors."""
    return f"{COLLECTION_PREFIX}{dim}"


def point_id(entry_key: str) -> str:
    """The point id of an entry: a UUID derived from `entry_key`, so a re-store overwrites."""
    return str(uuid.uuid5(_POINT_NAMESPACE, entry_key))


def _scope_filter(workspace_id: str, namespace: str, partition: str, generation: int, now_ms: int) -> models.Filter:
    m = _qdrant().models
    return cast("models.Filter", m.Filter(must=[
        m.FieldCondition(key="workspace_id", match=m.MatchValue(value=workspace_id)),
        m.FieldCondition(key="namespace", match=m.MatchValue(value=namespace)),
        m.FieldCondition(key="partition", match=m.MatchValue(value=partition)),
        m.FieldCondition(key="generation", match=m.MatchValue(value=generation)),
        m.FieldCondition(key="expires_at_ms", range=m.Range(gt=now_ms)),
    ]))


def _expired_filter(now_ms: int) -> models.Filter:
    m = _qdrant().models
    return cast("models.Filter", m.Filter(must=[m.FieldCondition(key="expires_at_ms", range=m.Range(lte=now_ms))]))


class _Unavailable(Exception):
    """The index is open but refuses work (the local backlog is full)."""


class _Slot:
    """An flock'ed local-mode directory `<root>/slot-<n>`, held while the process uses it."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self._fd: int | None = fd

    @classmethod
    def claim(cls, root: Path) -> _Slot:
        root.mkdir(parents=True, exist_ok=True)
        for n in itertools.count():
            fd = os.open(root / f"slot-{n}.lock", os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            return cls(root / f"slot-{n}", fd)
        raise AssertionError("unreachable")

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)


class _Local:
    """qdrant-client's local mode on a thread of its own (its work is synchronous)."""

    def __init__(self, root: Path) -> None:
        self._root = root
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="qdrant-local")
        self._client: QdrantClient | None = None
        self._slot: _Slot | None = None
        self.backlog = 0
        self.remote = False

    def _open(self) -> None:
        slot = _Slot.claim(self._root)
        try:
            self._client = _qdrant().QdrantClient(path=str(slot.path))
        except BaseException:
            slot.release()
            raise
        self._slot = slot

    @property
    def path(self) -> Path | None:
        return self._slot.path if self._slot is not None else None

    async def open(self) -> None:
        await self._submit(self._open)

    async def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        client = self._client
        assert client is not None
        if self.backlog >= MAX_LOCAL_BACKLOG:
            raise _Unavailable("local index backlog full")
        return await self._submit(getattr(client, method), *args, **kwargs)

    async def _submit(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        # The backlog counts work until the thread has finished it, not until the caller stopped
        # waiting (a timed-out store is still queued).
        loop = asyncio.get_running_loop()
        self.backlog += 1

        def finished(_: Any) -> None:
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                loop.call_soon_threadsafe(self._finished)

        job = self._pool.submit(fn, *args, **kwargs)
        job.add_done_callback(finished)
        return await asyncio.wrap_future(job)

    def _finished(self) -> None:
        self.backlog -= 1

    def _close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None
        if self._slot is not None:
            self._slot.release()
            self._slot = None

    async def close(self) -> None:
        try:
            await asyncio.get_running_loop().run_in_executor(self._pool, self._close)
        finally:
            self._pool.shutdown(wait=False)


class _Remote:
    """A Qdrant server through `AsyncQdrantClient` (built without IO: no version check)."""

    path = None
    backlog = 0
    remote = True

    def __init__(self, url: str, timeout_s: float) -> None:
        self._client = _qdrant().AsyncQdrantClient(url=url, timeout=max(1, int(timeout_s + 0.999)),
                                                   check_compatibility=False)

    async def open(self) -> None:
        return None

    async def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return await getattr(self._client, method)(*args, **kwargs)

    async def close(self) -> None:
        await self._client.close()


class SemanticIndex:
    """Nearest-prompt lookups and stores over Qdrant; fail-open (see the module docstring).

    Used from one event loop. `url` a Qdrant server, else local mode under `root` (required then).
    Local mode stores at most `max_points` points (see `LOCAL_MAX_POINTS`).
    Counters: `failures` (operations that errored or timed out, and failed opens), `skipped`
    (calls refused while the breaker was open, stores refused while local mode was full), `hits`,
    `misses` (lookups that ran and found nothing; not those made before the index was ready,
    counted in `not_ready`)."""

    def __init__(self, *, url: str = "", root: str | Path | None = None, timeout_s: float = 0.05,
                 init_timeout_s: float = INIT_TIMEOUT_S, max_points: int = LOCAL_MAX_POINTS) -> None:
        if not url and root is None:
            raise ValueError("SemanticIndex needs a Qdrant url or a local root directory")
        self.url = url
        self.root = Path(root) if root is not None else None
        self.timeout_s = timeout_s
        self.init_timeout_s = init_timeout_s
        self.max_points = max_points
        self._points = 0  # local mode: an upper bound (a re-store counts again), recounted by sweeps
        self.failures = 0
        self.skipped = 0
        self.hits = 0
        self.misses = 0
        self.not_ready = 0
        self._backend: _Local | _Remote | None = None
        self._opening: asyncio.Task[None] | None = None
        self._reopen_at = 0.0
        self._collections: set[int] = set()
        self._creating: dict[int, asyncio.Task[None]] = {}
        self._streak = 0
        self._open_until = 0.0
        self._last_log = -LOG_EVERY_S
        self._suppressed = 0
        self._closed = False

    @classmethod
    def from_settings(cls, settings: Settings) -> SemanticIndex:
        """`qdrant_url`, else local mode under `<state_dir>/qdrant`; bounded by `cache_timeout_s`."""
        return cls(url=settings.qdrant_url, root=Path(settings.state_dir) / "qdrant",
                   timeout_s=settings.cache_timeout_s)

    # -- lifecycle -------------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        """Whether Qdrant is open (until then every call is a miss)."""
        return self._backend is not None

    @property
    def local_path(self) -> Path | None:
        """Local mode: the claimed slot directory, once open."""
        return self._backend.path if self._backend is not None else None

    def _start_open(self) -> None:
        if self._closed or self._opening is not None or time.monotonic() < self._reopen_at:
            return
        if self.url:  # building the remote client does no IO: ready at once
            self._backend = _Remote(self.url, self.timeout_s)
            return
        self._opening = asyncio.create_task(self._open(), name="semantic-index-open")

    async def _open(self) -> None:
        backend = _Local(self._root())
        try:
            await asyncio.wait_for(backend.open(), self.init_timeout_s)
            self._points = await asyncio.wait_for(self._count(backend), self.init_timeout_s)
        except Exception as exc:  # fail-open: any error is a failed open
            self._failed("open", exc)
            self._reopen_at = time.monotonic() + REOPEN_AFTER_S
            with contextlib.suppress(Exception):
                await backend.close()
        else:
            if self._closed:
                await backend.close()
            else:
                self._backend = backend
                log.info("semantic_index_open", mode="local", path=str(backend.path))
        finally:
            self._opening = None

    def _root(self) -> Path:
        assert self.root is not None
        return self.root

    async def open(self) -> bool:
        """Open now (or wait for the open under way); whether the index is ready. For tests, and
        a worker that wants its index warm; lookups and stores never wait for it."""
        if self._backend is None:
            self._start_open()
            if self._opening is not None:
                await asyncio.shield(self._opening)
        return self._backend is not None

    async def close(self) -> None:
        """Close Qdrant (local mode: release the slot). Idempotent; later calls are misses."""
        self._closed = True
        opening = self._opening
        if opening is not None:
            with contextlib.suppress(Exception):
                await asyncio.shield(opening)
        backend, self._backend = self._backend, None
        if backend is not None:
            with contextlib.suppress(Exception):
                await backend.close()

    # -- failure accounting ----------------------------------------------------------------------

    def _failed(self, op: str, exc: BaseException) -> None:
        self.failures += 1
        self._streak += 1
        if self._streak >= BREAKER_FAILURES:
            self._open_until = time.monotonic() + BREAKER_OPEN_S
        now = time.monotonic()
        if now - self._last_log >= LOG_EVERY_S:
            log.warning("semantic_cache_unavailable", op=op, error=type(exc).__name__, detail=str(exc)[:200],
                        failures=self.failures, suppressed=self._suppressed)
            self._last_log, self._suppressed = now, 0
        else:
            self._suppressed += 1

    def _usable(self) -> _Local | _Remote | None:
        """The open backend, or None (not open yet: the open is started; breaker open)."""
        if self._backend is None:
            self._start_open()
        backend = self._backend
        if backend is None:
            return None
        if self._open_until and time.monotonic() < self._open_until:
            self.skipped += 1
            return None
        return backend

    async def _bounded(self, op: str, work: Awaitable[Any], timeout_s: float | None = None) -> tuple[bool, Any]:
        try:
            result = await asyncio.wait_for(work, self.timeout_s if timeout_s is None else timeout_s)
        except Exception as exc:  # fail-open: every error is a miss
            self._failed(op, exc)
            return False, None
        self._streak = 0
        return True, result

    # -- operations ------------------------------------------------------------------------------

    async def _has_collection(self, backend: _Local | _Remote, dim: int) -> bool:
        if dim in self._collections:
            return True
        if await backend.call("collection_exists", collection_name(dim)):
            self._collections.add(dim)
            return True
        return False

    async def _ensure_collection(self, backend: _Local | _Remote, dim: int) -> None:
        """Create the collection of `dim` (and its payload indexes) in a task of its own, which a
        store's deadline does not cut short: the next store finds it done."""
        if dim in self._collections:
            return
        task = self._creating.get(dim)
        if task is None:
            task = self._creating[dim] = asyncio.create_task(
                asyncio.wait_for(self._create_collection(backend, dim), max(self.timeout_s, SWEEP_TIMEOUT_S)))

            def created(done: asyncio.Task[None]) -> None:
                self._creating.pop(dim, None)
                if not done.cancelled():
                    done.exception()  # retrieved: a store that gave up waiting counted it already

            task.add_done_callback(created)
        await asyncio.shield(task)

    async def _create_collection(self, backend: _Local | _Remote, dim: int) -> None:
        name = collection_name(dim)
        if not await backend.call("collection_exists", name):
            try:
                await backend.call("create_collection", name, vectors_config=_qdrant().models.VectorParams(
                    size=dim, distance=_qdrant().models.Distance.COSINE))
            except Exception:
                if not await backend.call("collection_exists", name):  # another worker made it
                    raise
        if backend.remote:  # local mode ignores payload indexes (and warns about them)
            for field in _KEYWORD_FIELDS:
                await backend.call("create_payload_index", name, field, _qdrant().models.PayloadSchemaType.KEYWORD)
            for field in _INTEGER_FIELDS:
                await backend.call("create_payload_index", name, field, _qdrant().models.PayloadSchemaType.INTEGER)
        self._collections.add(dim)

    async def lookup(self, vector: list[float], *, workspace_id: str, namespace: str, partition: str,
                     generation: int, threshold: float, now_ms: int) -> tuple[str, float] | None:
        """`(entry_key, score)` of the nearest point with the same workspace, namespace, partition
        and generation, `expires_at_ms > now_ms` and cosine `score >= threshold`; else None (also
        when not ready, on a timeout or an error)."""
        backend = self._usable()
        if backend is None or not vector:
            self.not_ready += self._backend is None
            return None

        async def work() -> Any:
            if not await self._has_collection(backend, len(vector)):
                return None
            return await backend.call(
                "query_points", collection_name(len(vector)), query=vector, limit=1, score_threshold=threshold,
                query_filter=_scope_filter(workspace_id, namespace, partition, generation, now_ms),
                with_payload=["entry_key"], with_vectors=False)

        ok, result = await self._bounded("lookup", work())
        points = result.points if ok and result is not None else []
        if not points or not isinstance((points[0].payload or {}).get("entry_key"), str):
            self.misses += ok
            return None
        self.hits += 1
        best = points[0]
        assert best.payload is not None
        return best.payload["entry_key"], float(best.score)

    async def store(self, vector: list[float], *, workspace_id: str, namespace: str, partition: str,
                    generation: int, entry_key: str, expires_at_ms: int) -> None:
        """Insert or overwrite the point of `entry_key` (idempotent). A no-op when not ready, on a
        timeout or an error (the answer is then only in the exact cache)."""
        backend = self._usable()
        if backend is None or not vector:
            return
        if not backend.remote and self._points >= self.max_points:
            self.skipped += 1
            return
        point = _qdrant().models.PointStruct(id=point_id(entry_key), vector=vector, payload={
            "workspace_id": workspace_id, "namespace": namespace, "partition": partition,
            "generation": generation, "entry_key": entry_key, "expires_at_ms": expires_at_ms})

        async def work() -> None:
            await self._ensure_collection(backend, len(vector))
            await backend.call("upsert", collection_name(len(vector)), points=[point], wait=True)

        ok, _ = await self._bounded("store", work())
        self._points += ok

    async def sweep(self, now_ms: int) -> bool:
        """Delete every point with `expires_at_ms <= now_ms`, in each of our collections. Bounded by
        `SWEEP_TIMEOUT_S`; does nothing (False) until the index is open. Whether it ran."""
        backend = self._backend
        if backend is None:
            return False

        async def work() -> int:
            found = await backend.call("get_collections")
            for info in found.collections:
                if info.name.startswith(COLLECTION_PREFIX):
                    await backend.call("delete", info.name, points_selector=_qdrant().models.FilterSelector(
                        filter=_expired_filter(now_ms)), wait=True)
            return 0 if backend.remote else await self._count(backend)

        ok, points = await self._bounded("sweep", work(), max(self.timeout_s, SWEEP_TIMEOUT_S))
        if ok:
            self._points = points
        return bool(ok)

    @staticmethod
    async def _count(backend: _Local | _Remote) -> int:
        found = await backend.call("get_collections")
        total = 0
        for info in found.collections:
            if info.name.startswith(COLLECTION_PREFIX):
                total += (await backend.call("count", info.name, exact=True)).count
        return int(total)

    async def count(self) -> int | None:
        """Points in our collections (expired ones included until swept); None when not open or
        on an error. For health reports and tests."""
        backend = self._backend
        if backend is None:
            return None

        ok, total = await self._bounded("count", self._count(backend), max(self.timeout_s, SWEEP_TIMEOUT_S))
        return total if ok else None

    async def run_sweeps(self, interval_s: float = 60.0, clock: Callable[[], float] = time.time) -> None:
        """Sweep every `interval_s` for ever (a worker task; cancel it to stop). Never opens Qdrant:
        a worker whose index was never used sweeps nothing."""
        while True:
            await asyncio.sleep(interval_s)
            await self.sweep(int(clock() * 1000))


# --- the text and its embedding ---------------------------------------------------------------------

_FIRST_ROLES: Final = ("system", "developer")
_part_encoder = msgspec.json.Encoder(order="sorted")


def _squash(text: str) -> str:
    return " ".join(text.split())


def _content_text(content: Any) -> str:
    if isinstance(content, str):
        return _squash(content)
    if not isinstance(content, list):
        return ""
    pieces: list[str] = []
    for part in content:
        if not isinstance(part, Mapping):
            continue
        if part.get("type") in ("text", "input_text") and isinstance(part.get("text"), str):
            pieces.append(_squash(part["text"]))
        elif isinstance(part.get("type"), str):
            # A non-text part (an image, audio, a file) becomes a marker naming its content, so two
            # prompts that differ only in the image never embed to the same text.
            digest = hashlib.sha256(_part_encoder.encode(part)).hexdigest()[:16]
            pieces.append(f"[{part['type']} {digest}]")
    return " ".join(p for p in pieces if p)


def semantic_text(body: Mapping[str, Any]) -> str:
    """The prompt text a Chat Completions `body` is embedded by: one line per message, `role:
    text`, the system and developer messages first (in their order), then the others in order.
    Text is whitespace-normalised (runs of whitespace are one space, ends trimmed); a non-text
    content part is a marker with a digest of the part; tool definitions, tool calls and every
    other field are left out; messages with no text are skipped. Deterministic; not truncated
    (an over-long text fails at the embedding model, which the caller treats as a miss)."""
    messages = body.get("messages")
    if not isinstance(messages, list):
        return ""
    first: list[str] = []
    rest: list[str] = []
    for message in messages:
        if not isinstance(message, Mapping):
            continue
        role = message.get("role")
        role = role if isinstance(role, str) else "user"
        text = _content_text(message.get("content"))
        if not text:
            continue
        (first if role in _FIRST_ROLES else rest).append(f"{role}: {text}")
    return "\n".join(first + rest)


@dataclass(frozen=True, slots=True)
class Embedded:
    """One embedding call's result: the vector, its usage (to be priced and booked by the caller),
    where it went and with which credential, and how long it took."""

    vector: list[float]
    usage: Usage
    target: Target
    key: KeyChoice
    latency_ms: float


class _Item(msgspec.Struct):
    embedding: list[float] | str


class _Answer(msgspec.Struct):
    data: list[_Item]


_answer_decoder = msgspec.json.Decoder(_Answer)


def _vector_of(resp: ChatResponse, provider: str) -> list[float]:
    bad = UpstreamError(f"Provider '{provider}' returned an embeddings body the gateway cannot read.")
    try:
        answer = _answer_decoder.decode(resp.body)
        raw = answer.data[0].embedding
        vector = base64_to_floats(raw) if isinstance(raw, str) else raw
    except (msgspec.DecodeError, msgspec.ValidationError, IndexError, ValueError):
        raise bad from None
    if not vector:
        raise bad
    return vector


async def embed_text(worker: WorkerState, snap: Snapshot, vk: VirtualKey, model_ref: str, text: str, *,
                     timeout_s: float | None = None, pick: float | None = None) -> Embedded:
    """Embed `text` with `model_ref` (`provider/model` or an alias of the key's workspace), through
    the provider's adapter, with the credential the key would use for it (`target_key`; `pick` in
    [0, 1) chooses among weighted keys, random by default). Floats are requested; a base64 answer
    is decoded too. Bounded by `timeout_s` (default: `upstream_timeout_s`) as a whole.

    Raises on failure, never returns a partial result: `GatewayError`s (NotFound for an unknown
    model, InvalidRequest `embeddings_not_supported` for an adapter without `embed`, the adapter's
    upstream errors, UpstreamError for an unreadable answer) and TimeoutError. The cache treats any
    exception as a miss; no usage is owed then."""
    target = resolve_model(snap, vk.workspace_id, model_ref)
    embed: Callable[[UpstreamCall], Awaitable[ChatResponse]] | None = getattr(
        adapter_for(target.provider.type), "embed", None)
    if embed is None:
        raise InvalidRequest(f"Provider '{target.provider.name}' (type '{target.provider.type}') does not serve "
                             "embeddings through this gateway.", param="model", code="embeddings_not_supported")
    key = target_key(snap, vk, target, random.random() if pick is None else pick)  # noqa: S311 (load spreading)
    limit = worker.settings.upstream_timeout_s if timeout_s is None else timeout_s
    call = UpstreamCall(provider=target.provider, model=target.model,
                        body={"model": target.model, "input": text, "encoding_format": "float"},
                        api_key=worker.provider_key(key.ciphertext), session=worker.session, timeout_s=limit,
                        connect_timeout_s=min(limit, 10.0))
    started = time.perf_counter()
    resp = await asyncio.wait_for(embed(call), limit)
    latency_ms = (time.perf_counter() - started) * 1000
    return Embedded(vector=_vector_of(resp, target.provider.name), usage=resp.usage or Usage(), target=target,
                    key=key, latency_ms=latency_ms)
