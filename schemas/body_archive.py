"""The layout of archived request bodies in the archive bucket, shared by the data plane that
writes them (`dataplane.bodies`) and the control plane that reads and expires them
(`controlplane.bodies_admin`, `controlplane.bodies_retention`):

    bodies/<workspace_id>/<YYYY-MM-DD>/<request_id>.json.gz
"""

from __future__ import annotations

import datetime as dt
import re

PREFIX = "bodies/"
_DATE_RE = re.compile(r"^\d{4}-\d{2}-\d{2}$")


def object_key(workspace_id: str, request_id: str, when: dt.datetime) -> str:
    return f"{PREFIX}{workspace_id}/{when:%Y-%m-%d}/{request_id}.json.gz"


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
