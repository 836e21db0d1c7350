"""`alephant ledger rebuild`: fold the event history again into new projection tables and compare
them with the live ones.

The history comes from the stream (an ephemeral pull consumer from its first sequence) or from
the S3 archive (`events.archive`: every object, deduplicated by sequence, with any sequence the
archive lacks read from the stream, e.g. what the archiver has not flushed yet). It is folded
with the projector's own `apply_batch`, for every projection in `PROJECTIONS`, into a fresh
Postgres schema (`rebuild_<UTC timestamp>_<random>`) whose tables are `LIKE <live table>
INCLUDING ALL`; the session's `search_path` is that schema alone, so nothing live is written.

No false differences on a busy system: the live side is read in one REPEATABLE READ snapshot
taken first, and each projection is folded exactly up to its own checkpoint in that snapshot
(the checkpoint commits with the rows), so both sides describe the same prefix of the stream.
That read-only transaction stays open for the whole replay: on a big database, vacuum cannot
remove rows that died meanwhile until the rebuild ends.

Then, per comparison (`COMPARISONS`), rows are merged in key order from both sides (server-side
cursors: memory stays flat whatever the size) and every difference counted, with samples.
The schema is dropped afterwards unless `keep`.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import decimal
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import psycopg
import structlog
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from psycopg import sql

from events.archive import ArchiveStore, decode_object, open_store
from events.jetstream import bus_auth, connect
from events.projector import PROJECTIONS, apply_batch
from schemas.settings import Settings

log = structlog.get_logger(__name__)

Message = tuple[int, str, bytes]
Source = Literal["stream", "archive"]

# The projections' tables (all of them: `apply_batch` may write any).
PROJECTION_TABLES = ("event_journal", "ledger_account", "ledger_transfer", "run_usage", "escalation", "dead_letter",
                     "projector_checkpoint", "finance_fact", "run_outcome")
BATCH = 512
SAMPLES = 10
_FETCH_TIMEOUT_S = 5.0


@dataclass(frozen=True, slots=True)
class Comparison:
    """`query` selects key columns (the first `keys`) then value columns from schema `{schema}`; rows
    are compared key by key. Keys are text (collated "C"), uuids or integers, so Postgres's order
    is Python's."""

    name: str
    what: str
    keys: int
    query: str


_FINANCE_SUMS = ("sum(requests), sum(errors), sum(input_tokens), sum(output_tokens), sum(llm_cost_nanos), "
                 "sum(tool_cost_nanos), sum(payments_out_nanos), sum(revenue_nanos), sum(cache_savings_nanos), "
                 "sum(estimated_cost_nanos), sum(unpriced_tokens), sum(refunds_due_nanos), count(*)")

# (the f-strings below join constants only)
COMPARISONS = (
    Comparison("accounts", "ledger accounts: debits and credits posted", 1,
               'SELECT id COLLATE "C", currency, debits_posted, credits_posted FROM {schema}.ledger_account'),
    Comparison("transfers", "ledger transfers", 1,
               "SELECT id, event_id, leg, debit_account_id, credit_account_id, amount, currency, code "
               "FROM {schema}.ledger_transfer"),
    Comparison("journal", "journalled event ids", 1, "SELECT event_id, type FROM {schema}.event_journal"),
    Comparison("finance_by_run", "finance totals per (workspace, run, currency)", 3,
               'SELECT workspace_id COLLATE "C", coalesce(run_id, \'\') COLLATE "C", currency COLLATE "C", '  # noqa: S608
               f"{_FINANCE_SUMS} FROM {{schema}}.finance_fact GROUP BY 1, 2, 3"),
    Comparison("finance_by_kind", "finance totals per (workspace, kind, currency)", 3,
               'SELECT workspace_id COLLATE "C", kind COLLATE "C", currency COLLATE "C", '  # noqa: S608
               f"{_FINANCE_SUMS} FROM {{schema}}.finance_fact GROUP BY 1, 2, 3"),
    Comparison("run_usage", "run usage rows", 2,
               'SELECT workspace_id COLLATE "C", run_id COLLATE "C", requests, errors, input_tokens, output_tokens, '
               "cost_nanos, agents, first_at, last_at FROM {schema}.run_usage"),
    Comparison("run_outcome", "run outcomes", 2,
               'SELECT workspace_id COLLATE "C", run_id COLLATE "C", outcome, event_id, completed_at '
               "FROM {schema}.run_outcome"),
    Comparison("escalations", "escalations (ids; their status is the admins', not the stream's)", 1,
               'SELECT id COLLATE "C", event_id FROM {schema}.escalation'),
    Comparison("dead_letters", "dead-lettered stream sequences", 1,
               "SELECT stream_seq, event_id FROM {schema}.dead_letter WHERE stream = %(stream)s"),
)


@dataclass
class Difference:
    comparison: str
    what: str
    live_rows: int = 0
    rebuilt_rows: int = 0
    differences: int = 0
    samples: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class Progress:
    replayed: int
    last_seq: int
    upto: int
    seconds: float

    @property
    def rate(self) -> float:
        return self.replayed / self.seconds if self.seconds > 0 else 0.0


@dataclass
class RebuildReport:
    schema: str
    source: Source
    stream: str
    kept: bool
    stream_first_seq: int
    stream_last_seq: int
    checkpoints: dict[str, int]
    replayed: int = 0
    from_archive: int = 0
    from_stream: int = 0
    # Sequences up to the checkpoints that neither source had (retention, archive holes).
    missing: list[tuple[int, int]] = field(default_factory=list)
    seconds: float = 0.0
    comparisons: list[Difference] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def equal(self) -> bool:
        return not self.missing and all(c.differences == 0 for c in self.comparisons)

    @property
    def rate(self) -> float:
        return self.replayed / self.seconds if self.seconds > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "equal": self.equal, "schema": self.schema, "kept": self.kept, "source": self.source,
            "stream": self.stream, "stream_first_seq": self.stream_first_seq, "stream_last_seq": self.stream_last_seq,
            "checkpoints": self.checkpoints, "replayed": self.replayed, "from_archive": self.from_archive,
            "from_stream": self.from_stream, "missing": [list(r) for r in self.missing],
            "seconds": round(self.seconds, 3), "rate_per_s": round(self.rate, 1), "notes": self.notes,
            "comparisons": [{"name": c.comparison, "what": c.what, "live_rows": c.live_rows,
                             "rebuilt_rows": c.rebuilt_rows, "differences": c.differences, "samples": c.samples}
                            for c in self.comparisons],
        }


# -- sources -----------------------------------------------------------------------------------

async def stream_messages(js: JetStreamContext, stream: str, subject: str, first: int,
                          last: int) -> AsyncIterator[list[Message]]:
    """Batches of `(seq, subject, data)` for the stream's sequences `first..last` in order, through
    an ephemeral pull consumer (no acks; removed afterwards, or by the server after a minute idle).
    Ends early if the stream stops delivering (sequences no longer there)."""
    if last < first:
        return
    name = f"alephant-replay-{secrets.token_hex(6)}"
    await js.add_consumer(stream, config=ConsumerConfig(
        name=name, filter_subject=subject, ack_policy=AckPolicy.NONE,
        deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=first, inactive_threshold=60.0,
        mem_storage=True, num_replicas=1))
    psub = await js.pull_subscribe_bind(name, stream=stream)
    try:
        seq = first - 1
        while seq < last:
            try:
                msgs = await psub.fetch(BATCH, timeout=_FETCH_TIMEOUT_S)
            except TimeoutError:
                return
            batch = [(m.metadata.sequence.stream, m.subject, m.data) for m in msgs]
            batch = [m for m in batch if m[0] <= last]
            if batch:
                seq = batch[-1][0]
                yield batch
            if len(batch) < len(msgs):
                return
    finally:
        try:
            await psub.unsubscribe()
            await js.delete_consumer(stream, name)
        except Exception as exc:  # the server drops it after inactive_threshold anyway
            log.debug("replay_consumer_cleanup_failed", error=type(exc).__name__)


@dataclass
class _Replay:
    """Where the replayed messages came from, and the sequences no source had."""

    from_archive: int = 0
    from_stream: int = 0
    missing: list[tuple[int, int]] = field(default_factory=list)
    next_seq: int = 1

    def saw(self, batch: list[Message], archive: bool) -> list[Message]:
        """`batch` less what was already replayed; notes the holes before it."""
        fresh = []
        for m in batch:
            if m[0] < self.next_seq:
                continue
            if m[0] > self.next_seq:
                self.missing.append((self.next_seq, m[0] - 1))
            self.next_seq = m[0] + 1
            fresh.append(m)
        if archive:
            self.from_archive += len(fresh)
        else:
            self.from_stream += len(fresh)
        return fresh


async def _from_stream(js: JetStreamContext, settings: Settings, replay: _Replay, first: int,
                       last: int) -> AsyncIterator[list[Message]]:
    async for batch in stream_messages(js, settings.stream, f"{settings.subject_prefix}.>", first, last):
        fresh = replay.saw(batch, archive=False)
        if fresh:
            yield fresh


async def _from_archive(js: JetStreamContext, store: ArchiveStore, settings: Settings, replay: _Replay,
                        last: int) -> AsyncIterator[list[Message]]:
    """The archive's objects in sequence order; a hole between them, and what follows the last
    one, read from the stream."""
    for first_seq, last_seq, key in await store.archived(settings.stream):
        if last_seq < replay.next_seq:
            continue
        if first_seq > last:
            break
        if first_seq > replay.next_seq:
            async for batch in _from_stream(js, settings, replay, replay.next_seq, first_seq - 1):
                yield batch
        lines = [m for m in decode_object(await store.get(key)) if m[0] <= last]
        for i in range(0, len(lines), BATCH):
            fresh = replay.saw(lines[i:i + BATCH], archive=True)
            if fresh:
                yield fresh
    if replay.next_seq <= last:
        async for batch in _from_stream(js, settings, replay, replay.next_seq, last):
            yield batch


# -- the rebuild -------------------------------------------------------------------------------

def new_schema_name(now: dt.datetime | None = None) -> str:
    now = now or dt.datetime.now(dt.UTC)
    return f"rebuild_{now:%Y%m%d_%H%M%S}_{secrets.token_hex(2)}"


async def create_schema(conn: psycopg.AsyncConnection[Any], schema: str, live_schema: str) -> None:
    """`schema` with an empty copy of each projection table (`LIKE ... INCLUDING ALL`: columns,
    defaults, constraints, indexes; not foreign keys or triggers)."""
    async with conn.transaction():
        await conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
        for table in PROJECTION_TABLES:
            await conn.execute(sql.SQL("CREATE TABLE {}.{} (LIKE {}.{} INCLUDING ALL)").format(
                sql.Identifier(schema), sql.Identifier(table), sql.Identifier(live_schema), sql.Identifier(table)))


async def drop_schema(conn: psycopg.AsyncConnection[Any], schema: str) -> None:
    await conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))


async def rebuild(settings: Settings, *, source: Source = "stream", keep: bool = False,
                  progress: Callable[[Progress], None] | None = None, progress_every_s: float = 1.0,
                  schema: str | None = None) -> RebuildReport:
    """Replay and compare (see the module docstring). Raises on an unreachable NATS, Postgres or S3;
    the rebuild schema is dropped then too, unless `keep`."""
    started = time.monotonic()
    schema = schema or new_schema_name()
    async with contextlib.AsyncExitStack() as stack:
        nc = await connect(settings.nats_url, "alephant-ledger-rebuild", bus_auth(settings, "admin"))
        stack.push_async_callback(nc.close)
        live = await psycopg.AsyncConnection.connect(settings.database_url)
        stack.push_async_callback(live.close)
        work = await psycopg.AsyncConnection.connect(settings.database_url, autocommit=True)
        stack.push_async_callback(work.close)
        js = nc.jetstream()
        await live.set_isolation_level(psycopg.IsolationLevel.REPEATABLE_READ)
        await live.set_read_only(True)
        cur = await live.execute("SELECT projector, last_seq FROM projector_checkpoint WHERE stream = %s",
                                 (settings.stream,))  # the snapshot starts here
        live_checkpoints = {str(name): int(seq) for name, seq in await cur.fetchall()}
        cur = await live.execute("SELECT current_schema()")
        live_schema = str((await cur.fetchone() or ("public",))[0])
        info = await js.stream_info(settings.stream)
        cutoffs = {p.name: live_checkpoints.get(p.name, 0) for p in PROJECTIONS}
        upto = max(cutoffs.values(), default=0)
        report = RebuildReport(schema=schema, source=source, stream=settings.stream, kept=keep,
                               stream_first_seq=int(info.state.first_seq), stream_last_seq=int(info.state.last_seq),
                               checkpoints=cutoffs)
        await create_schema(work, schema, live_schema)
        if not keep:
            stack.push_async_callback(drop_schema, work, schema)
        await work.execute(sql.SQL("SET search_path TO {}").format(sql.Identifier(schema)))

        replay = _Replay()
        if source == "archive":
            async with open_store(settings) as store:
                await _fold(work, settings, _from_archive(js, store, settings, replay, upto), cutoffs, upto, report,
                            started, progress, progress_every_s)
        else:
            replay.next_seq = max(1, report.stream_first_seq)
            if report.stream_first_seq > 1:
                report.notes.append(f"the stream begins at sequence {report.stream_first_seq} (older messages are "
                                    "past its retention): use --from archive to replay them")
            await _fold(work, settings, _from_stream(js, settings, replay, replay.next_seq, upto), cutoffs, upto,
                        report, started, progress, progress_every_s)
        if replay.next_seq <= upto:
            replay.missing.append((replay.next_seq, upto))
        report.from_archive, report.from_stream = replay.from_archive, replay.from_stream
        report.missing = replay.missing
        report.seconds = time.monotonic() - started
        for comparison in COMPARISONS:
            report.comparisons.append(await compare(live, live_schema, work, schema, comparison, settings.stream))
        await live.rollback()
        return report
    raise AssertionError("unreachable")  # pragma: no cover - mypy: AsyncExitStack may swallow exceptions


async def _fold(work: psycopg.AsyncConnection[Any], settings: Settings, batches: AsyncIterator[list[Message]],
                cutoffs: dict[str, int], upto: int, report: RebuildReport, started: float,
                progress: Callable[[Progress], None] | None, every_s: float) -> None:
    said = time.monotonic()
    last_seq = 0
    async for batch in batches:
        for projection in PROJECTIONS:
            mine = [m for m in batch if m[0] <= cutoffs[projection.name]]
            if mine:
                await apply_batch(work, settings.stream, mine, projection)
        report.replayed += len(batch)
        last_seq = batch[-1][0]
        if progress is not None and time.monotonic() - said >= every_s:
            said = time.monotonic()
            progress(Progress(report.replayed, last_seq, upto, said - started))
    if progress is not None:
        progress(Progress(report.replayed, last_seq, upto, time.monotonic() - started))


# -- comparison --------------------------------------------------------------------------------

def plain(value: Any) -> Any:
    """A JSON-friendly value: integral numerics as int, times as ISO strings, uuids as strings."""
    if isinstance(value, decimal.Decimal):
        return int(value) if value == value.to_integral_value() else str(value)
    if isinstance(value, dt.datetime):
        return value.isoformat()
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    return value


async def _rows(conn: psycopg.AsyncConnection[Any], query: sql.Composed,
                params: dict[str, Any]) -> AsyncIterator[tuple[Any, ...]]:
    # A named (server-side) cursor streams the rows; it needs a transaction, which `live` has.
    async with conn.cursor(name=f"cmp_{secrets.token_hex(4)}") as cur:
        await cur.execute(query, params or None)
        async for row in cur:
            yield tuple(row)


async def compare(live: psycopg.AsyncConnection[Any], live_schema: str, work: psycopg.AsyncConnection[Any],
                  schema: str, comparison: Comparison, stream: str, samples: int = SAMPLES) -> Difference:
    """Merge both sides of `comparison` in key order; count the keys whose rows differ or that one
    side lacks, keeping the first `samples` of them."""
    order = sql.SQL(" ORDER BY {}").format(sql.SQL(", ").join(sql.Literal(i + 1) for i in range(comparison.keys)))

    def query(schema_name: str) -> sql.Composed:
        return sql.Composed([sql.SQL(comparison.query).format(schema=sql.Identifier(schema_name)), order])

    diff = Difference(comparison.name, comparison.what)
    async with work.transaction():
        params = {"stream": stream} if "%(stream)s" in comparison.query else {}
        a, b = _rows(live, query(live_schema), params), _rows(work, query(schema), params)
        ra, rb = await anext(a, None), await anext(b, None)
        while ra is not None or rb is not None:
            ka = ra[:comparison.keys] if ra is not None else None
            kb = rb[:comparison.keys] if rb is not None else None
            if rb is None or (ra is not None and ka is not None and kb is not None and ka < kb):
                _note(diff, comparison, ra, None, samples)
                diff.live_rows += 1
                ra = await anext(a, None)
            elif ra is None or (ka is not None and kb is not None and kb < ka):
                _note(diff, comparison, None, rb, samples)
                diff.rebuilt_rows += 1
                rb = await anext(b, None)
            else:
                if ra != rb:
                    _note(diff, comparison, ra, rb, samples)
                diff.live_rows += 1
                diff.rebuilt_rows += 1
                ra, rb = await anext(a, None), await anext(b, None)
    return diff


def _note(diff: Difference, comparison: Comparison, live: tuple[Any, ...] | None, rebuilt: tuple[Any, ...] | None,
          samples: int) -> None:
    diff.differences += 1
    if len(diff.samples) < samples:
        row = live if live is not None else rebuilt
        assert row is not None
        diff.samples.append({
            "key": plain(list(row[:comparison.keys])),
            "live": None if live is None else plain(list(live[comparison.keys:])),
            "rebuilt": None if rebuilt is None else plain(list(rebuilt[comparison.keys:])),
        })


# -- the report --------------------------------------------------------------------------------

def render(report: RebuildReport) -> str:
    """The human-readable report."""
    checkpoints = ", ".join(f"{name} {seq}" for name, seq in report.checkpoints.items())
    lines = [
        f"ledger rebuild from the {report.source} of {report.stream} into schema {report.schema}"
        f"{' (kept)' if report.kept else ' (dropped)'}",
        f"  stream holds sequences {report.stream_first_seq}..{report.stream_last_seq}; "
        f"live checkpoints: {checkpoints}",
        f"  replayed {report.replayed} messages in {report.seconds:.1f} s ({report.rate:.0f}/s): "
        f"{report.from_archive} from the archive, {report.from_stream} from the stream",
    ]
    lines += [f"  note: {note}" for note in report.notes]
    for first, last in report.missing:
        lines.append(f"  MISSING: sequences {first}..{last} are in neither source")
    width = max(len(c.comparison) for c in report.comparisons) if report.comparisons else 0
    for c in report.comparisons:
        if c.differences == 0:
            lines.append(f"  {c.comparison:<{width}}  equal ({c.live_rows} rows)")
            continue
        lines.append(f"  {c.comparison:<{width}}  {c.differences} DIFFERENCE{'S' if c.differences != 1 else ''} "
                     f"({c.what}; live {c.live_rows} rows, rebuilt {c.rebuilt_rows})")
        for s in c.samples:
            lines.append(f"      {s['key']}: live {s['live'] if s['live'] is not None else '(absent)'}, "
                         f"rebuilt {s['rebuilt'] if s['rebuilt'] is not None else '(absent)'}")
        if c.differences > len(c.samples):
            lines.append(f"      ... and {c.differences - len(c.samples)} more")
    total = sum(c.differences for c in report.comparisons)
    lines.append("result: EQUAL" if report.equal else
                 f"result: DIFFERENT ({total} differences{', sequences missing' if report.missing else ''})")
    return "\n".join(lines)
