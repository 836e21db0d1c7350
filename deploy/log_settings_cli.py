"""`alephant log-settings set|list|get|delete`: what is kept of a workspace's or a virtual key's
requests (bodies archived to S3, redaction, retention), and `alephant bodies sweep`: delete the
archived bodies past their retention now. Thin admin API calls (deploy/admin_cli.py).

`set` creates the setting of the workspace (or of `--key`) or, when it exists, changes the fields
given (one setting per workspace or key)."""

from __future__ import annotations

import argparse
import sys
from typing import Any
from urllib.parse import quote, urlencode

from deploy.admin_cli import Args, Commands, admin_call, admin_client, default_ws, drop_none
from deploy.stack import AdminError

BASE = "/admin/v1/log-settings"


def scope_of(a: Args) -> tuple[str, str]:
    """(scope, scope id): `--key`'s, else the workspace's."""
    return ("key", a.key) if a.key else ("workspace", default_ws(a))


def settings_fields(a: Args) -> dict[str, Any]:
    """The fields the flags give (a list flag replaces the whole list; --no-* empties it)."""
    fields = drop_none({"bodies": a.bodies, "retention_days": a.retention_days,
                        "redact_paths": a.redact_path, "redact_patterns": a.redact_pattern})
    if a.no_redact_paths:
        fields["redact_paths"] = []
    if a.no_redact_patterns:
        fields["redact_patterns"] = []
    return fields


def _find(a: Args) -> dict[str, Any] | None:
    """The existing setting of the flags' workspace and scope, or None."""
    ws = default_ws(a)
    scope, scope_id = scope_of(a)
    try:
        items = admin_client(a).call("GET", f"{BASE}?{urlencode({'workspace_id': ws})}")["data"]
    except AdminError as exc:
        sys.exit(f"alephant: {exc}")
    except OSError as exc:
        sys.exit(f"alephant: cannot reach the admin API: {exc}")
    return next((s for s in items if (s["scope"], s["scope_id"]) == (scope, scope_id)), None)


def run_set(a: Args) -> None:
    if a.redact_path and a.no_redact_paths:
        sys.exit("alephant: give --redact-path or --no-redact-paths, not both")
    if a.redact_pattern and a.no_redact_patterns:
        sys.exit("alephant: give --redact-pattern or --no-redact-patterns, not both")
    existing = _find(a)
    fields = settings_fields(a)
    if existing is None:
        scope, scope_id = scope_of(a)
        body = {"workspace_id": default_ws(a), "scope": scope, "scope_id": scope_id} | fields
        admin_call("POST", lambda _: BASE, lambda _: body)(a)
    else:
        if not fields:
            sys.exit(f"alephant: {existing['id']} exists; give the flags to change (see --help)")
        admin_call("PATCH", lambda _: f"{BASE}/{quote(existing['id'], safe='')}", lambda _: fields)(a)


def _by_id_or_scope(method: str) -> Any:
    """`get`/`delete`: the id given, else the setting of the workspace (or of `--key`)."""
    def run(a: Args) -> None:
        if a.id and a.key:
            sys.exit("alephant: give an id or --key, not both")
        ident = a.id
        if ident is None:
            found = _find(a)
            if found is None:
                scope, scope_id = scope_of(a)
                sys.exit(f"alephant: workspace '{default_ws(a)}' has no log setting for "
                         f"{'key ' + repr(scope_id) if scope == 'key' else 'the workspace'}")
            ident = found["id"]
        admin_call(method, lambda _: f"{BASE}/{quote(ident, safe='')}")(a)

    return run


def _target(p: argparse.ArgumentParser) -> None:
    p.add_argument("--key", metavar="KEY_ID", help="the virtual key's setting (it wins over the workspace's) instead "
                   "of the workspace's")


def add_log_settings_commands(cmds: Commands) -> None:
    leaf = cmds.leaf
    g = cmds.group("log-settings", "What is kept of requests, per workspace or virtual key: metadata only (the "
                   "default), or request (and response) bodies archived to S3, redacted, for a retention period")
    p = leaf(g, "set", "Create or change the log setting of the workspace (or of --key). Keys, Authorization "
             "values and secret-named fields are always masked; the flags add JSON paths and patterns. E.g. "
             "alephant log-settings set --bodies both --redact-path messages.*.content --redact-pattern 'SSN-\\d+' "
             "--retention-days 14 [--key KEY_ID]", "POST", lambda a: BASE)
    p.set_defaults(fn=run_set)
    _target(p)
    p.add_argument("--bodies", choices=["none", "request", "both"],
                   help="none: metadata only (the default); request: the request body; both: request and response")
    p.add_argument("--redact-path", action="append", metavar="PATH",
                   help="mask this JSON path whole: keys or list indexes separated by dots, * for any, e.g. "
                        "messages.*.content (repeatable, at most 32; replaces the stored list)")
    p.add_argument("--redact-pattern", action="append", metavar="REGEX",
                   help="mask every match of this Python regular expression in any string, e.g. 'SSN-\\d+' "
                        "(repeatable, at most 16; replaces the stored list)")
    p.add_argument("--no-redact-paths", action="store_true", help="remove every configured path")
    p.add_argument("--no-redact-patterns", action="store_true", help="remove every configured pattern")
    p.add_argument("--retention-days", type=int, metavar="DAYS",
                   help="delete archived bodies after this many days, 1..3650 (default 30); the workspace's "
                        "setting applies to every body of the workspace")
    leaf(g, "list", "List the workspace's log settings", "GET",
         lambda a: f"{BASE}?{urlencode({'workspace_id': default_ws(a)})}")
    p = leaf(g, "get", "Show a log setting: by id, or the workspace's (or --key's)", "GET", lambda a: BASE)
    p.set_defaults(fn=_by_id_or_scope("GET"))
    p.add_argument("id", nargs="?")
    _target(p)
    p = leaf(g, "delete", "Delete a log setting (by id, or the workspace's or --key's): a key falls back to its "
             "workspace's, a workspace to metadata only and the default retention (30 days)", "DELETE",
             lambda a: BASE)
    p.set_defaults(fn=_by_id_or_scope("DELETE"))
    p.add_argument("id", nargs="?")
    _target(p)

    g = cmds.group("bodies", "Archived request bodies (S3)")
    leaf(g, "sweep", "Delete the archived bodies past their workspace's retention now (the control plane also "
         "sweeps every ALEPHANT_BODY_SWEEP_INTERVAL_S); prints scanned, deleted and failed", "POST",
         lambda a: "/admin/v1/bodies/sweep", ws=False, change=False)
    leaf(g, "get", "Print one call's archived, redacted request and response (the request id from its answer's "
         "Alephant-Request-Id, a run timeline or the access log)", "GET",
         lambda a: f"/admin/v1/requests/{a.request_id}/body?workspace_id={default_ws(a)}").add_argument("request_id")
