"""The layout of archived request bodies in the archive bucket, shared by the data plane that
writes them (`dataplane.bodies`) and the control plane that reads and expires them
(`controlplane.bodies_admin`, `controlplane.bodies_retention`).

Bodies are written in batches (one S3 PUT per batch: botocore costs milliseconds of CPU a request,
too much per call), one gzip JSON-lines object per worker, workspace and few seconds:

    bodies/<workspace_id>/<YYYY-MM-DD>/<HHMMSS>-<worker>-<seq>.jsonl.gz     one record per line

A call's body key (its `llm.call`'s `body_key`) is `<object key>#<request_id>`.
"""

from __future__ import annotations

import datetime as dt
import re

PREFIX = "bodies/"
_DATE_RE = re.compile(r"^\d{4}-\d{2}-\d{2}$")


def object_key(workspace_id: str, when: dt.datetime, worker: str, seq: int) -> str:
    return f"{PREFIX}{workspace_id}/{when:%Y-%m-%d}/{when:%H%M%S}-{worker}-{seq}.jsonl.gz"


def body_key(object_key: str, request_id: str) -> str:
    return f"{object_key}#{request_id}"


def split_body_key(key: str) -> tuple[str, str]:
    """(object key, request id) of a body key; the request id is "" for a bare object key."""
    obj, _, request_id = key.partition("#")
    return obj, request_id


def parse_key(key: str) -> tuple[str, dt.date] | None:
    """(workspace id, day) of a `bodies/<workspace>/<YYYY-MM-DD>/<name>` key; None for any other
    key (another layout, an empty segment, a deeper path, an impossible date)."""
    parts = key.split("/")
    if len(parts) != 4 or f"{parts[0]}/" != PREFIX or not parts[1] or not parts[3] or not _DATE_RE.match(parts[2]):
        return None
    try:
        return parts[1], dt.date.fromisoformat(parts[2])
    except ValueError:
        return None
