"""`alephant log-destinations create|list|get|update|delete|dead-letters`: where the event stream is
delivered (webhook, OTLP collector, S3 prefix), one thin admin API call each (deploy/admin_cli.py).
Secrets are read from an environment variable (`--secret-env`), never from an argument."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any
from urllib.parse import urlencode

from deploy.admin_cli import Args, Commands, default_ws, drop_none

BASE = "/admin/v1/log-destinations"


def destination_body(a: Args, create: bool) -> dict[str, Any]:
    """The create or PATCH body from the flags (a PATCH sends only what was given)."""
    body: dict[str, Any] = drop_none({"kind": a.kind, "url": a.url, "name": a.name, "event_types": a.event_type})
    if create:
        if a.all_workspaces and a.workspace:
            sys.exit("alephant: give --workspace or --all-workspaces, not both")
        body["workspace_id"] = None if a.all_workspaces else default_ws(a)
        if a.disabled:
            body["enabled"] = False
    else:
        if a.enable and a.disable:
            sys.exit("alephant: give --enable or --disable, not both")
        if a.enable or a.disable:
            body["enabled"] = bool(a.enable)
        if a.no_secret:
            body["secret"] = None
    if a.secret_env is not None:
        secret = os.environ.get(a.secret_env)
        if not secret:
            sys.exit(f"alephant: --secret-env: the environment variable {a.secret_env} is not set")
        body["secret"] = secret
    return body


def _flags(p: argparse.ArgumentParser, create: bool) -> None:
    p.add_argument("--kind", choices=["webhook", "otlp", "s3"], required=create,
                   help="webhook (signed HTTPS POST per event), otlp (OTLP/HTTP JSON logs) or s3 (NDJSON objects)")
    p.add_argument("--url", required=create,
                   help="https://... (webhook; otlp: the collector's base URL, logs go to {url}/v1/logs) or "
                        "s3://bucket/prefix")
    p.add_argument("--event-type", action="append", metavar="TYPE",
                   help="deliver only this event type, e.g. llm.call (repeatable; none: every type)"
                   + ("" if create else "; replaces the whole list"))
    p.add_argument("--name", help="a label")
    p.add_argument("--secret-env", metavar="VAR",
                   help="read the secret from this environment variable (webhook: the HMAC signing secret; otlp: a "
                        "bearer token; s3: access_key_id:secret_access_key)")


def add_log_destination_commands(cmds: Commands) -> None:
    leaf = cmds.leaf
    g = cmds.group("log-destinations", "Log destinations: the event stream delivered at least once to a signed "
                   "webhook, an OTLP collector or an S3 prefix, filtered by workspace and event type")
    p = leaf(g, "create", "Create a log destination, e.g. alephant log-destinations create --kind webhook --url "
             "https://siem.example.com/hook --event-type llm.call --secret-env HOOK_SECRET", "POST",
             lambda a: BASE, lambda a: destination_body(a, create=True))
    _flags(p, create=True)
    p.add_argument("--all-workspaces", action="store_true",
                   help="every workspace's events (operator level) instead of one workspace's")
    p.add_argument("--disabled", action="store_true", help="create it paused")
    p = leaf(g, "list", "List log destinations (--workspace: one workspace's; default: all)", "GET",
             lambda a: BASE + (f"?{urlencode({'workspace_id': a.workspace})}" if a.workspace else ""), ws=False)
    p.add_argument("--workspace", "-w", help="only this workspace's destinations")
    leaf(g, "get", "Get a log destination with its delivery state (delivered, failed, dead_lettered, last_error)",
         "GET", lambda a: f"{BASE}/{a.id}", ws=False).add_argument("id")
    p = leaf(g, "update", "Change a log destination: the fields given", "PATCH", lambda a: f"{BASE}/{a.id}",
             lambda a: destination_body(a, create=False), ws=False)
    p.add_argument("id")
    _flags(p, create=False)
    p.add_argument("--enable", action="store_true", help="resume delivery")
    p.add_argument("--disable", action="store_true", help="pause delivery (events wait in the stream)")
    p.add_argument("--no-secret", action="store_true", help="remove the secret")
    leaf(g, "delete", "Delete a log destination (its delivery stops, its consumer is removed)", "DELETE",
         lambda a: f"{BASE}/{a.id}", ws=False).add_argument("id")
    leaf(g, "dead-letters", "The events given up on for a destination, newest first, with the reason", "GET",
         lambda a: f"{BASE}/{a.id}/dead-letters", ws=False).add_argument("id")
