"""`alephant ledger reconcile`: check the stream, the journal, the ledger, the finance facts and
the archive against each other, without changing anything.

The database is read in one REPEATABLE READ, read-only snapshot, so every check sees each
projection exactly at its checkpoint. `C` is the smallest projection checkpoint: the prefix of
the stream that every projection has folded. Checks (`Finding.check`):

* `lag`: the stream's last sequence minus each projection's checkpoint (and the archiver's ack
  floor); a problem beyond `max_lag`.
* `gaps`: stream sequences up to `C` (from the stream's first: older ones are past retention)
  that are neither journalled nor dead-lettered. Each is read back from the stream: a second
  copy of a journalled event (a replay outside the dedup window) is fine, so is a message outside
  the events subjects; anything else is a gap.
* `balance`: per currency, debits posted equal credits posted.
* `accounts`: each account's posted debits and credits equal the sums of its transfers.
* `references`: every transfer's event is journalled and both its accounts exist (the table has
  no foreign keys: the projector writes all three in one transaction, and checking them row by
  row cost a third of its database time).
* `transfers`: every journalled event has exactly the transfers `events.ledger.transfers_for`
  derives from its body (ids, legs, accounts, amounts, currencies, codes).
* `finance`: per workspace and currency, the finance facts' llm cost, tool cost, payments out,
  revenue and unpriced tokens equal the ledger's transfers of the same events (journalled at or
  before `C`).
* `archive` (S3 configured): the archive objects cover every sequence from 1 to the archiver's
  ack floor, without holes.
"""

from __future__ import annotations

import contextlib
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal

import msgspec
import psycopg
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from events.archive import ARCHIVE_CONSUMER, merge_ranges, open_store
from events.jetstream import bus_auth, connect
from events.ledger import transfers_for
from events.projector import PROJECTIONS
from events.rebuild import plain
from schemas.events import LlmCall, LlmRepriced, PaymentInbound, PaymentOutbound, ToolCall, ToolSpend, event_decoder
from schemas.settings import Settings

Status = Literal["ok", "warning", "problem"]
MONEY_TYPES = tuple(str(t.__struct_config__.tag) for t in (LlmCall, LlmRepriced, ToolSpend, ToolCall, PaymentOutbound,
                                                           PaymentInbound))
SAMPLES = 10
# Gap candidates read back from the stream, at most (each is one request).
MAX_GAP_READS = 2000


@dataclass
class Finding:
    check: str
    status: Status
    summary: str
    samples: list[dict[str, Any]] = field(default_factory=list)
    count: int = 0


@dataclass
class ReconcileReport:
    stream: str
    stream_first_seq: int
    stream_last_seq: int
    checkpoints: dict[str, int]
    findings: list[Finding] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(f.status != "problem" for f in self.findings)

    def as_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "stream": self.stream, "stream_first_seq": self.stream_first_seq,
                "stream_last_seq": self.stream_last_seq, "checkpoints": self.checkpoints,
                "findings": [{"check": f.check, "status": f.status, "summary": f.summary, "count": f.count,
                              "samples": f.samples} for f in self.findings]}


async def reconcile(settings: Settings, *, max_lag: int = 10_000, archive: bool | None = None) -> ReconcileReport:
    """Run every check (see the module docstring). `archive`: check the archive (default: when
    `settings.s3_url` is set). Raises on an unreachable NATS, Postgres or S3."""
    async with contextlib.AsyncExitStack() as stack:
        nc = await connect(settings.nats_url, "alephant-ledger-reconcile", bus_auth(settings, "admin"))
        stack.push_async_callback(nc.close)
        conn = await psycopg.AsyncConnection.connect(settings.database_url)
        stack.push_async_callback(conn.close)
        await conn.set_isolation_level(psycopg.IsolationLevel.REPEATABLE_READ)
        await conn.set_read_only(True)
        js = nc.jetstream()
        cur = await conn.execute("SELECT projector, last_seq FROM projector_checkpoint WHERE stream = %s",
                                 (settings.stream,))  # the snapshot starts here
        found = {str(name): int(seq) for name, seq in await cur.fetchall()}
        info = await js.stream_info(settings.stream)
        report = ReconcileReport(settings.stream, int(info.state.first_seq), int(info.state.last_seq),
                                 {p.name: found.get(p.name, 0) for p in PROJECTIONS})
        upto = min(report.checkpoints.values(), default=0)
        archive_floor = await _archive_floor(js, settings.stream) if archive is not False and settings.s3_url else None
        report.findings.append(_lag(report, archive_floor, max_lag))
        report.findings.append(await _gaps(conn, js, settings, report, upto))
        report.findings.append(await _balance(conn))
        report.findings.append(await _accounts(conn))
        report.findings.append(await _references(conn))
        report.findings.append(await _transfers(conn))
        report.findings.append(await _finance(conn, upto))
        if archive is True or (archive is None and settings.s3_url):
            report.findings.append(await _archive(settings, archive_floor))
        await conn.rollback()
        return report
    raise AssertionError("unreachable")  # pragma: no cover - mypy: AsyncExitStack may swallow exceptions


def _lag(report: ReconcileReport, archive_floor: int | None, max_lag: int) -> Finding:
    lags = {name: report.stream_last_seq - seq for name, seq in report.checkpoints.items()}
    if archive_floor is not None:
        lags[ARCHIVE_CONSUMER] = report.stream_last_seq - archive_floor
    behind = {name: lag for name, lag in lags.items() if lag > max_lag}
    text = ", ".join(f"{name} {lag}" for name, lag in lags.items())
    if behind:
        return Finding("lag", "problem", f"behind the stream by more than {max_lag}: {text}", count=len(behind),
                       samples=[{"consumer": n, "behind": lag} for n, lag in behind.items()])
    return Finding("lag", "ok", f"messages behind the stream's last ({report.stream_last_seq}): {text}")


async def _archive_floor(js: JetStreamContext, stream: str) -> int | None:
    try:
        info = await js.consumer_info(stream, ARCHIVE_CONSUMER)
    except NotFoundError:
        return None
    return int(info.ack_floor.stream_seq) if info.ack_floor is not None else 0


async def _gaps(conn: psycopg.AsyncConnection[Any], js: JetStreamContext, settings: Settings,
                report: ReconcileReport, upto: int) -> Finding:
    first = max(1, report.stream_first_seq)
    if upto < first:
        return Finding("gaps", "ok", f"nothing folded by every projection yet (checkpoint {upto})")
    cur = await conn.execute(
        "SELECT s FROM generate_series(%s::bigint, %s::bigint) AS s "
        "WHERE NOT EXISTS (SELECT 1 FROM event_journal j WHERE j.stream_seq = s) "
        "AND NOT EXISTS (SELECT 1 FROM dead_letter d WHERE d.stream = %s AND d.stream_seq = s) ORDER BY s",
        (first, upto, settings.stream))
    candidates = [int(r[0]) for r in await cur.fetchall()]
    prefix = f"{settings.subject_prefix}."
    gaps: list[dict[str, Any]] = []
    duplicates = foreign = unread = 0
    ids: dict[int, uuid.UUID] = {}
    for seq in candidates[:MAX_GAP_READS]:
        try:
            msg = await js.get_msg(settings.stream, seq)
        except NotFoundError:
            gaps.append({"seq": seq, "reason": "no longer in the stream"})
            continue
        if not (msg.subject or "").startswith(prefix):
            foreign += 1
            continue
        try:
            ids[seq] = event_decoder.decode(msg.data or b"").event_id
        except (msgspec.DecodeError, msgspec.ValidationError):
            gaps.append({"seq": seq, "reason": "undecodable and not dead-lettered"})
    if ids:
        cur = await conn.execute("SELECT event_id FROM event_journal WHERE event_id = ANY(%s)", (list(ids.values()),))
        journalled = {r[0] for r in await cur.fetchall()}
        for seq, eid in ids.items():
            if eid in journalled:
                duplicates += 1
            else:
                gaps.append({"seq": seq, "event_id": str(eid), "reason": "event neither journalled nor dead-lettered"})
    unread = max(0, len(candidates) - MAX_GAP_READS)
    gaps.sort(key=lambda g: int(g["seq"]))
    extra = (f"; {duplicates} later cop{'y' if duplicates == 1 else 'ies'} of journalled events"
             f"{f', {foreign} messages outside {prefix}>' if foreign else ''}")
    if gaps or unread:
        more = f" ({unread} more candidates not read back)" if unread else ""
        return Finding("gaps", "problem", f"{len(gaps)} of sequences {first}..{upto} neither journalled nor "
                                          f"dead-lettered{more}{extra}", samples=gaps[:SAMPLES], count=len(gaps))
    return Finding("gaps", "ok", f"sequences {first}..{upto} all journalled or dead-lettered{extra}")


async def _balance(conn: psycopg.AsyncConnection[Any]) -> Finding:
    cur = await conn.execute("SELECT currency, sum(debits_posted), sum(credits_posted) FROM ledger_account "
                             "GROUP BY currency ORDER BY currency")
    rows = await cur.fetchall()
    off = [{"currency": c, "debits": plain(d), "credits": plain(cr)} for c, d, cr in rows if d != cr]
    if off:
        return Finding("balance", "problem", "debits differ from credits in " + ", ".join(
            f"{o['currency']} ({o['debits']} vs {o['credits']})" for o in off), samples=off, count=len(off))
    return Finding("balance", "ok", f"debits equal credits in {len(rows)} currenc{'y' if len(rows) == 1 else 'ies'}")


async def _accounts(conn: psycopg.AsyncConnection[Any]) -> Finding:
    cur = await conn.execute(
        """
        WITH t AS (
            SELECT account, sum(debits) AS debits, sum(credits) AS credits FROM (
                SELECT debit_account_id AS account, amount AS debits, 0 AS credits FROM ledger_transfer
                UNION ALL
                SELECT credit_account_id, 0, amount FROM ledger_transfer) x
            GROUP BY account)
        SELECT coalesce(a.id, t.account), a.debits_posted, a.credits_posted, t.debits, t.credits
        FROM ledger_account a FULL JOIN t ON t.account = a.id
        WHERE coalesce(a.debits_posted, 0) <> coalesce(t.debits, 0)
           OR coalesce(a.credits_posted, 0) <> coalesce(t.credits, 0)
        ORDER BY 1
        """)
    rows = await cur.fetchall()
    cur = await conn.execute("SELECT count(*) FROM ledger_account")
    total = int((await cur.fetchone() or (0,))[0])
    samples = [{"account": a, "debits_posted": plain(d), "credits_posted": plain(c), "transfer_debits": plain(td),
                "transfer_credits": plain(tc)} for a, d, c, td, tc in rows[:SAMPLES]]
    if rows:
        return Finding("accounts", "problem", f"{len(rows)} of {total} accounts' balances differ from the sums of "
                                              "their transfers", samples=samples, count=len(rows))
    return Finding("accounts", "ok", f"{total} account balances equal the sums of their transfers")


async def _references(conn: psycopg.AsyncConnection[Any]) -> Finding:
    cur = await conn.execute(
        """
        SELECT t.id, t.event_id, t.debit_account_id, t.credit_account_id,
               j.event_id IS NULL, d.id IS NULL, c.id IS NULL
        FROM ledger_transfer t
        LEFT JOIN event_journal j ON j.event_id = t.event_id
        LEFT JOIN ledger_account d ON d.id = t.debit_account_id
        LEFT JOIN ledger_account c ON c.id = t.credit_account_id
        WHERE j.event_id IS NULL OR d.id IS NULL OR c.id IS NULL
        ORDER BY t.id
        """)
    rows = await cur.fetchall()
    if not rows:
        return Finding("references", "ok", "every transfer's event is journalled and its accounts exist")
    samples = [{"transfer": str(tid), "missing": ", ".join(
        what for what, gone in ((f"event {eid}", no_event), (f"debit account {debit}", no_debit),
                                (f"credit account {credit}", no_credit)) if gone)}
        for tid, eid, debit, credit, no_event, no_debit, no_credit in rows[:SAMPLES]]
    return Finding("references", "problem", f"{len(rows)} transfers name an event or account that does not exist",
                   samples=samples, count=len(rows))


async def _transfers(conn: psycopg.AsyncConnection[Any]) -> Finding:
    bad: list[dict[str, Any]] = []
    count = checked = 0
    async with conn.cursor(name="reconcile_transfers") as cur:
        await cur.execute(
            """
            SELECT j.event_id, j.body::text,
                   coalesce(jsonb_agg(jsonb_build_array(t.id, t.leg, t.debit_account_id, t.credit_account_id,
                                                        t.amount::text, t.currency, t.code))
                            FILTER (WHERE t.id IS NOT NULL), '[]'::jsonb)::text
            FROM event_journal j LEFT JOIN ledger_transfer t ON t.event_id = j.event_id
            WHERE j.type = ANY(%s) OR EXISTS (SELECT 1 FROM ledger_transfer x WHERE x.event_id = j.event_id)
            GROUP BY j.event_id
            """, (list(MONEY_TYPES),))
        async for event_id, body, posted in cur:
            checked += 1
            actual = sorted(msgspec.json.decode(posted.encode()))
            try:
                event = event_decoder.decode(body.encode())
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                expected: list[list[Any]] | str = f"journal body does not decode: {exc}"[:200]
            else:
                expected = sorted([str(t.id), t.leg, t.debit, t.credit, str(t.amount), t.currency, t.code]
                                  for t in transfers_for(event))
            if expected != actual:
                count += 1
                if len(bad) < SAMPLES:
                    bad.append({"event_id": str(event_id), "expected": expected, "posted": actual})
    if count:
        return Finding("transfers", "problem", f"{count} of {checked} money events' transfers differ from what "
                                               "their journal bodies derive", samples=bad, count=count)
    return Finding("transfers", "ok", f"{checked} money events have exactly the transfers their bodies derive")


_MEASURES = ("llm_cost", "tool_cost", "payments_out", "revenue", "unpriced_tokens")


async def _finance(conn: psycopg.AsyncConnection[Any], upto: int) -> Finding:
    cur = await conn.execute(
        """
        WITH f AS (
            SELECT f.workspace_id, f.currency, sum(f.llm_cost_nanos) AS llm_cost, sum(f.tool_cost_nanos) AS tool_cost,
                   sum(f.payments_out_nanos) AS payments_out, sum(f.revenue_nanos) AS revenue,
                   sum(f.unpriced_tokens) AS unpriced_tokens
            FROM finance_fact f JOIN event_journal j ON j.event_id = f.event_id
            WHERE j.stream_seq <= %(upto)s GROUP BY 1, 2),
        l AS (
            SELECT t.workspace_id, t.currency,
                   sum(t.amount) FILTER (WHERE t.code IN ('llm_cost', 'llm_cost_repriced')) AS llm_cost,
                   sum(t.amount) FILTER (WHERE t.code IN ('tool_spend', 'tool_call')) AS tool_cost,
                   sum(t.amount) FILTER (WHERE t.code = 'payment_outbound') AS payments_out,
                   sum(t.amount) FILTER (WHERE t.code = 'payment_inbound') AS revenue
            FROM ledger_transfer t JOIN event_journal j ON j.event_id = t.event_id
            WHERE j.stream_seq <= %(upto)s AND t.currency <> 'TOKENS' GROUP BY 1, 2),
        tokens AS (
            SELECT t.workspace_id,
                   sum(CASE WHEN t.code = 'llm_unpriced' THEN t.amount ELSE -t.amount END) AS unpriced_tokens
            FROM ledger_transfer t JOIN event_journal j ON j.event_id = t.event_id
            WHERE j.stream_seq <= %(upto)s AND t.currency = 'TOKENS' GROUP BY 1),
        ft AS (SELECT workspace_id, sum(unpriced_tokens) AS unpriced_tokens FROM f GROUP BY 1)
        SELECT coalesce(f.workspace_id, l.workspace_id), coalesce(f.currency, l.currency),
               coalesce(f.llm_cost, 0), coalesce(l.llm_cost, 0), coalesce(f.tool_cost, 0), coalesce(l.tool_cost, 0),
               coalesce(f.payments_out, 0), coalesce(l.payments_out, 0), coalesce(f.revenue, 0),
               coalesce(l.revenue, 0), NULL, NULL
        FROM f FULL JOIN l ON l.workspace_id = f.workspace_id AND l.currency = f.currency
        UNION ALL
        SELECT coalesce(ft.workspace_id, tokens.workspace_id), 'TOKENS', 0, 0, 0, 0, 0, 0, 0, 0,
               coalesce(ft.unpriced_tokens, 0), coalesce(tokens.unpriced_tokens, 0)
        FROM ft FULL JOIN tokens ON tokens.workspace_id = ft.workspace_id
        ORDER BY 1, 2
        """, {"upto": upto})
    rows = await cur.fetchall()
    off: list[dict[str, Any]] = []
    for ws, currency, *values in rows:
        pairs = dict(zip(_MEASURES[:4], zip(values[0:8:2], values[1:8:2], strict=True), strict=True))
        if currency == "TOKENS":
            pairs = {"unpriced_tokens": (values[8], values[9])}
        for measure, (finance, ledger) in pairs.items():
            if finance != ledger:
                off.append({"workspace_id": ws, "currency": currency, "measure": measure, "finance": plain(finance),
                            "ledger": plain(ledger)})
    workspaces = len({r[0] for r in rows})
    if off:
        return Finding("finance", "problem", f"{len(off)} finance totals differ from the ledger's (events up to "
                                             f"sequence {upto})", samples=off[:SAMPLES], count=len(off))
    return Finding("finance", "ok", f"finance totals equal the ledger's in {workspaces} workspaces (events up to "
                                    f"sequence {upto})")


async def _archive(settings: Settings, floor: int | None) -> Finding:
    async with open_store(settings) as store:
        objects = await store.archived(settings.stream)
    covered = merge_ranges((first, last) for first, last, _ in objects)
    top = covered[-1][1] if covered else 0
    expected_to = floor if floor is not None else top
    holes: list[tuple[int, int]] = []
    nxt = 1
    for first, last in covered:
        if first > expected_to:
            break
        if first > nxt:
            holes.append((nxt, first - 1))
        nxt = max(nxt, last + 1)
    if nxt <= expected_to:
        holes.append((nxt, expected_to))
    where = f"s3 bucket {settings.s3_bucket}, {len(objects)} objects"
    if holes:
        missing = sum(b - a + 1 for a, b in holes)
        return Finding("archive", "problem", f"{missing} sequences up to {expected_to} are not archived ({where})",
                       samples=[{"first": a, "last": b} for a, b in holes[:SAMPLES]], count=missing)
    if floor is None:
        return Finding("archive", "warning", f"no `{ARCHIVE_CONSUMER}` consumer on the stream (is the archiver "
                                             f"running?); objects cover 1..{top} ({where})")
    return Finding("archive", "ok", f"sequences 1..{expected_to} (the archiver's ack floor) are archived "
                                    f"({where}; archived through {top})")


def render(report: ReconcileReport) -> str:
    lines = [f"ledger reconcile of stream {report.stream} (sequences {report.stream_first_seq}.."
             f"{report.stream_last_seq}; checkpoints: "
             + ", ".join(f"{n} {s}" for n, s in report.checkpoints.items()) + ")"]
    marks = {"ok": "ok     ", "warning": "WARNING", "problem": "PROBLEM"}
    for f in report.findings:
        lines.append(f"  {marks[f.status]}  {f.check}: {f.summary}")
        if f.status != "ok":
            lines += ["             " + ", ".join(f"{k} {v}" for k, v in s.items()) for s in f.samples]
    problems = sum(f.status == "problem" for f in report.findings)
    lines.append("result: OK" if report.ok else f"result: {problems} PROBLEM{'S' if problems != 1 else ''}")
    return "\n".join(lines)
