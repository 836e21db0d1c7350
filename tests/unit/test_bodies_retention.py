"""The body sweeper's decision (which keys expire: dates, per-workspace retention, the default,
malformed keys kept), its listing/deleting loop against an in-memory S3 client (batches of at
most 1000, refused deletes counted, a missing bucket holds nothing), and the background loop (a
failed sweep is logged, the next one still runs)."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
from collections.abc import AsyncIterator
from typing import Any

import pytest
from botocore.exceptions import ClientError
from hypothesis import given
from hypothesis import strategies as st
from structlog.testing import capture_logs

from controlplane import bodies_retention
from controlplane.bodies_retention import (
    DEFAULT_RETENTION_DAYS,
    DELETE_BATCH,
    SweepResult,
    expired_keys,
    retention_by_workspace,
    run_sweeper,
    sweep,
)
from schemas.body_archive import parse_key
from schemas.entities import LogSettings
from schemas.settings import Settings

NOW = dt.datetime(2026, 5, 20, 12, 0, tzinfo=dt.UTC)


def key(ws: str, day: dt.date | str, name: str = "req_1.json.gz") -> str:
    return f"bodies/{ws}/{day}/{name}"


def days_ago(n: int) -> dt.date:
    return NOW.date() - dt.timedelta(days=n)


def test_keys_of_the_layout_parse() -> None:
    assert parse_key("bodies/acme/2026-05-01/req_1.json.gz") == ("acme", dt.date(2026, 5, 1))


@pytest.mark.parametrize("bad", [
    "bodies/acme/2026-05-01/", "bodies//2026-05-01/r.json.gz", "bodies/acme/2026-05-01", "bodies/acme",
    "bodies/acme/2026-5-1/r.json.gz", "bodies/acme/20260501/r.json.gz", "bodies/acme/2026-02-30/r.json.gz",
    "bodies/acme/2026-13-01/r.json.gz", "bodies/acme/2026-05-01/sub/r.json.gz", "bodies/acme/latest/r.json.gz",
    "events/S/dt=2026-05-01/hour=09/1-2.jsonl.gz", "other/acme/2026-05-01/r.json.gz",
    "Bodies/acme/2026-05-01/r.json.gz", "", "/", "bodies/acme/2026-05-01T00/r.json.gz",
])
def test_malformed_keys_do_not_parse(bad: str) -> None:
    assert parse_key(bad) is None


def test_a_day_expires_once_it_is_wholly_past_the_retention() -> None:
    keys = [key("acme", days_ago(n), f"r{n}.json.gz") for n in range(0, 12)]
    # 7 days: days 0..7 ago are kept (day 7 ago started less than 8 days ago), 8 and older go.
    assert expired_keys(keys, {"acme": 7}, NOW) == keys[8:]
    assert expired_keys(keys, {"acme": 1}, NOW) == keys[2:]
    assert expired_keys(keys, {"acme": 11}, NOW) == []
    # Just before and after midnight UTC.
    late = dt.datetime(2026, 5, 20, 23, 59, 59, tzinfo=dt.UTC)
    assert expired_keys([key("acme", "2026-05-18")], {"acme": 1}, late) == [key("acme", "2026-05-18")]
    assert expired_keys([key("acme", "2026-05-19")], {"acme": 1}, late) == []
    assert expired_keys([key("acme", "2026-05-19")], {"acme": 1}, late + dt.timedelta(seconds=1)) == [
        key("acme", "2026-05-19")]


def test_now_counts_in_utc() -> None:
    # 01:00 in UTC+3 on the 21st is 22:00 UTC on the 20th.
    east = dt.datetime(2026, 5, 21, 1, 0, tzinfo=dt.timezone(dt.timedelta(hours=3)))
    assert expired_keys([key("acme", "2026-05-19")], {"acme": 1}, east) == []
    with pytest.raises(ValueError, match="aware"):
        expired_keys([], {}, dt.datetime(2026, 5, 20))


def test_each_workspace_has_its_own_retention_and_the_rest_the_default() -> None:
    old5, old40 = days_ago(5), days_ago(40)
    keys = [key("short", old5), key("short", old40), key("long", old5), key("long", old40), key("none", old5),
            key("none", old40), key("none", days_ago(DEFAULT_RETENTION_DAYS)),
            key("none", days_ago(DEFAULT_RETENTION_DAYS + 1))]
    assert expired_keys(keys, {"short": 3, "long": 365}, NOW) == [
        key("short", old5), key("short", old40), key("none", old40), key("none", days_ago(DEFAULT_RETENTION_DAYS + 1))]
    # Without settings every workspace has the default: here all of them are 5 days old or more.
    assert expired_keys(keys, {}, NOW, default_days=4) == keys
    assert expired_keys(keys, {}, NOW) == [key(ws, old40) for ws in ("short", "long", "none")] + [
        key("none", days_ago(DEFAULT_RETENTION_DAYS + 1))]


def test_malformed_and_future_keys_are_kept() -> None:
    keys = ["bodies/acme/2001-01-01/", "bodies/acme/2001-01-01/x/y.json.gz", "bodies/acme/2001-02-30/r.json.gz",
            "bodies/acme/notadate/r.json.gz", "events/ALEPHANT_EVENTS/dt=2001-01-01/hour=00/1-1.jsonl.gz",
            "bodies/acme/2001-01-01", key("acme", days_ago(-3))]
    assert expired_keys(keys, {"acme": 1}, NOW) == []


def test_only_workspace_scoped_settings_set_the_retention() -> None:
    settings = [LogSettings(id="1", workspace_id="a", scope="workspace", scope_id="a", retention_days=7),
                LogSettings(id="2", workspace_id="a", scope="key", scope_id="vk_1", retention_days=900),
                LogSettings(id="3", workspace_id="b", scope="key", scope_id="vk_2", retention_days=900)]
    assert retention_by_workspace(settings) == {"a": 7}


@given(st.lists(st.tuples(st.sampled_from(["a", "b", "c"]), st.integers(-5, 60))), st.integers(1, 40),
       st.integers(1, 40))
def test_expired_means_older_than_retention_and_nothing_else(entries: list[tuple[str, int]], ret_a: int,
                                                            default: int) -> None:
    keys = [key(ws, days_ago(n), f"r{i}.json.gz") for i, (ws, n) in enumerate(entries)]
    gone = set(expired_keys(keys, {"a": ret_a}, NOW, default_days=default))
    for k, (ws, n) in zip(keys, entries, strict=True):
        assert (k in gone) == (n > (ret_a if ws == "a" else default))


# ---- the loop, against an in-memory client ---------------------------------------------------------

class FakeS3:
    """`list_objects_v2` pages of `page_size` and `delete_objects` over a dict; keys in `refuse`
    come back as delete errors."""

    def __init__(self, keys: list[str], page_size: int = 1000, refuse: frozenset[str] = frozenset(),
                 bucket_exists: bool = True) -> None:
        self.objects = dict.fromkeys(sorted(keys), b"x")
        self.page_size = page_size
        self.refuse = refuse
        self.bucket_exists = bucket_exists
        self.delete_calls: list[int] = []

    def get_paginator(self, name: str) -> FakeS3:
        assert name == "list_objects_v2"
        return self

    async def paginate(self, *, Bucket: str, Prefix: str) -> AsyncIterator[dict[str, Any]]:
        if not self.bucket_exists:
            raise ClientError({"Error": {"Code": "NoSuchBucket", "Message": "no"}}, "ListObjectsV2")
        after = ""
        while True:
            page = [k for k in sorted(self.objects) if k.startswith(Prefix) and k > after][:self.page_size]
            if not page:
                return
            yield {"Contents": [{"Key": k} for k in page]}
            after = page[-1]

    async def delete_objects(self, *, Bucket: str, Delete: dict[str, Any]) -> dict[str, Any]:
        keys = [o["Key"] for o in Delete["Objects"]]
        assert len(keys) <= DELETE_BATCH and Delete["Quiet"] is True
        self.delete_calls.append(len(keys))
        errors = [{"Key": k, "Code": "AccessDenied", "Message": "no"} for k in keys if k in self.refuse]
        for k in keys:
            if k not in self.refuse:
                self.objects.pop(k, None)
        return {"Errors": errors} if errors else {}


async def test_the_loop_deletes_in_batches_of_at_most_1000() -> None:
    old = [key("acme", days_ago(40), f"r{i:05}.json.gz") for i in range(2500)]
    new = [key("acme", days_ago(1), f"r{i:05}.json.gz") for i in range(300)]
    other = ["events/x/dt=2001-01-01/hour=00/1-1.jsonl.gz", "bodies/acme/junk"]
    s3 = FakeS3(old + new + other, page_size=700)
    result = await sweep(s3, "bucket", {}, NOW)
    assert (result.scanned, result.deleted, result.failed) == (2801, 2500, 0)
    assert s3.delete_calls == [1000, 1000, 500]
    assert sorted(s3.objects) == sorted(new + other)
    again = await sweep(s3, "bucket", {}, NOW)  # idempotent
    assert (again.deleted, s3.delete_calls[3:]) == (0, [])


async def test_refused_deletes_are_counted_and_left() -> None:
    old = [key("acme", days_ago(40), f"r{i}.json.gz") for i in range(5)]
    s3 = FakeS3(old, refuse=frozenset(old[:2]))
    result = await sweep(s3, "bucket", {"acme": 30}, NOW)
    assert (result.deleted, result.failed) == (3, 2) and sorted(s3.objects) == sorted(old[:2])


async def test_a_missing_bucket_holds_nothing_to_sweep() -> None:
    result = await sweep(FakeS3([], bucket_exists=False), "bucket", {}, NOW)
    assert (result.scanned, result.deleted, result.failed) == (0, 0, 0)


async def test_other_store_errors_propagate() -> None:
    class Denied(FakeS3):
        async def paginate(self, *, Bucket: str, Prefix: str) -> AsyncIterator[dict[str, Any]]:
            raise ClientError({"Error": {"Code": "AccessDenied", "Message": "no"}}, "ListObjectsV2")
            yield {}

    with pytest.raises(ClientError):
        await sweep(Denied([]), "bucket", {}, NOW)


async def test_the_background_loop_logs_failures_and_goes_on(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []

    async def flaky(settings: Settings, pool: Any) -> SweepResult:
        calls.append(1)
        if len(calls) == 1:
            raise OSError("S3 unreachable")
        return SweepResult()

    monkeypatch.setattr(bodies_retention, "sweep_once", flaky)
    with capture_logs() as logs:
        task = asyncio.create_task(run_sweeper(Settings(body_sweep_interval_s=0.01), None))  # type: ignore[arg-type]
        while len(calls) < 3:
            await asyncio.sleep(0.01)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    failed = [e for e in logs if e["event"] == "body_sweep_failed"]
    assert len(failed) == 1 and "S3 unreachable" in failed[0]["error"]
