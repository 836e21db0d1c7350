"""`alephant <group> <action>`: the admin commands, one thin call each to the admin API.

Every command prints the API's JSON answer on stdout. A change (POST, PATCH, DELETE) also says on
stderr which config `snapshot_revision` it produced; with `--wait` it then polls
`GET /admin/v1/fleet` until every live data-plane worker has applied that revision (or
`--wait-timeout` passes: exit status 1), so a script can act on the change knowing the whole fleet
enforces it.

The admin API is ALEPHANT_ADMIN_URL with ALEPHANT_ADMIN_TOKEN; when those are unset, the
`<state-dir>/demo.env` that `alephant dev` writes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path
from typing import Any, TextIO, get_args
from urllib.parse import urlencode

from deploy.stack import AdminClient, AdminError, read_env_file
from schemas.entities import SCOPES, BudgetPeriod, CacheMode, CacheScope, ProviderKind

Args = argparse.Namespace
Path_ = Callable[[Args], str]
Body = Callable[[Args], Any]

WAIT_TIMEOUT_S = 30.0
WAIT_POLL_S = 0.2


def admin_client(args: Args) -> AdminClient:
    demo = read_env_file(Path(args.state_dir) / "demo.env")
    url = os.environ.get("ALEPHANT_ADMIN_URL") or demo.get("ALEPHANT_ADMIN_URL")
    token = os.environ.get("ALEPHANT_ADMIN_TOKEN") or demo.get("ALEPHANT_ADMIN_TOKEN")
    if not url or not token:
        sys.exit("alephant: set ALEPHANT_ADMIN_URL and ALEPHANT_ADMIN_TOKEN (or start `alephant dev`, "
                 "which writes them to .alephant/demo.env)")
    return AdminClient(url, token)


def default_ws(args: Args) -> str:
    ws: str | None = getattr(args, "workspace", None) or os.environ.get("ALEPHANT_WORKSPACE")
    return ws or "demo"


def drop_none(d: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if v is not None}


def wait_for_fleet(client: AdminClient, revision: int, timeout_s: float, out: TextIO = sys.stderr,
                   poll_s: float = WAIT_POLL_S) -> bool:
    """Poll the fleet until at least one worker is live and every live worker's `applied_revision`
    is >= `revision`. Prints progress on `out` when it changes; False on timeout."""
    deadline = time.monotonic() + timeout_s
    said = ""
    while True:
        workers: list[dict[str, Any]] = client.call("GET", "/admin/v1/fleet")["workers"]
        behind = [w for w in workers if w["applied_revision"] < revision]
        done = len(workers) - len(behind)
        if workers and not behind:
            print(f"alephant: revision {revision} applied by {done}/{len(workers)} workers", file=out, flush=True)
            return True
        line = (f"alephant: waiting for revision {revision}: {done}/{len(workers)} workers applied"
                if workers else "alephant: waiting for a data-plane worker to report")
        if line != said:
            print(line, file=out, flush=True)
            said = line
        if time.monotonic() >= deadline:
            lagging = ", ".join(f"{w['host']}:{w['pid']} at {w['applied_revision']}" for w in behind) or "none live"
            print(f"alephant: timed out after {timeout_s:g} s waiting for revision {revision} ({lagging})", file=out)
            return False
        time.sleep(poll_s)


def admin_call(method: str, path: Path_, body: Body | None = None, *, change: bool | None = None) -> Callable[
        [Args], None]:
    """The command that sends `method path` (with `body(args)`) and prints the answer. A `change`
    (default: any method but GET) reports its snapshot revision and honours `--wait`."""
    is_change = method != "GET" if change is None else change

    def run(args: Args) -> None:
        client = admin_client(args)
        try:
            result = client.call(method, path(args), body(args) if body else None)
            print(json.dumps(result, indent=2))
            if is_change and isinstance(result, dict):
                _after_change(client, result, args)
        except AdminError as exc:
            sys.exit(f"alephant: {exc}")
        except OSError as exc:
            sys.exit(f"alephant: cannot reach the admin API: {exc}")

    return run


def _after_change(client: AdminClient, result: dict[str, Any], args: Args) -> None:
    if result.get("propagated") is False:
        print("alephant: saved, but not yet propagated to the workers (NATS unreachable); the control plane "
              "keeps retrying. Do not repeat the command.", file=sys.stderr)
    revision = result.get("snapshot_revision")
    if revision is not None:
        print(f"alephant: snapshot revision {revision}", file=sys.stderr)
    if not getattr(args, "wait", False):
        return
    if not isinstance(revision, int):
        sys.exit("alephant: --wait: the change has no snapshot revision yet (not propagated); "
                 "check `alephant fleet` later")
    if not wait_for_fleet(client, revision, args.wait_timeout):
        sys.exit(1)


def read_json_arg(value: str) -> Any:
    """A JSON value given inline, or `@path` to read it from a file (`@-`: stdin)."""
    text = value
    if value.startswith("@"):
        text = sys.stdin.read() if value == "@-" else Path(value[1:]).read_text()
    try:
        return json.loads(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON: {exc}") from None


def _pairs(items: list[str]) -> dict[str, str]:
    return dict(item.split("=", 1) for item in items)


class Commands:
    """Builds the admin subcommand tree: `group(...)` then `leaf(...)` per action."""

    def __init__(self, sub: Any) -> None:
        self._sub = sub

    def group(self, name: str, help_text: str) -> Any:
        p = self._sub.add_parser(name, help=help_text, description=help_text)
        return p.add_subparsers(dest="action", required=True, metavar="ACTION")

    @staticmethod
    def leaf(parent: Any, name: str, help_text: str, method: str, path: Path_, body: Body | None = None, *,
             ws: bool = True, change: bool | None = None) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = parent.add_parser(name, help=help_text, description=help_text)
        if ws:
            p.add_argument("--workspace", "-w", help="workspace id (default: $ALEPHANT_WORKSPACE or 'demo')")
        if method != "GET" if change is None else change:
            p.add_argument("--wait", action="store_true",
                           help="after the change, wait until every live data-plane worker has applied it")
            p.add_argument("--wait-timeout", type=float, default=WAIT_TIMEOUT_S, metavar="SECONDS",
                           help=f"give up waiting after this long, exit status 1 (default {WAIT_TIMEOUT_S:g})")
        p.set_defaults(fn=admin_call(method, path, body, change=change))
        return p

    def crud_tail(self, g: Any, path: str, noun: str, *, get: bool = True, ws_list: bool = True,
                  plural: str | None = None, get_help: str = "") -> None:
        """`list`, `get ID`, `delete ID` and a generic `patch ID --set field=JSON` for one kind."""
        base = f"/admin/v1/{path}"
        many = plural or f"{noun}s"
        article = "an" if noun[:1] in "aeiou" else "a"
        if ws_list:
            self.leaf(g, "list", f"List {many}", "GET", lambda a: f"{base}?workspace_id={default_ws(a)}")
        else:
            self.leaf(g, "list", f"List {many}", "GET", lambda a: base, ws=False)
        if get:
            self.leaf(g, "get", f"Get {article} {noun}{get_help}", "GET", lambda a: f"{base}/{a.id}",
                      ws=False).add_argument("id")
        p = self.leaf(g, "patch", f"Change fields of {article} {noun} (validated as on create)", "PATCH",
                      lambda a: f"{base}/{a.id}", lambda a: {k: read_json_arg(v) for k, v in _pairs(a.set).items()},
                      ws=False)
        p.add_argument("id")
        p.add_argument("--set", action="append", default=[], required=True, metavar="FIELD=JSON",
                       help='a field and its JSON value, e.g. --set name=\'"Platform"\' or --set rpm=null')
        self.leaf(g, "delete", f"Delete {article} {noun}", "DELETE", lambda a: f"{base}/{a.id}",
                  ws=False).add_argument("id")


def add_scope(p: argparse.ArgumentParser) -> None:
    p.add_argument("--scope", required=True, choices=list(SCOPES), help="what the rule attaches to")
    p.add_argument("--scope-id", required=True, help="the id of that workspace, department, member, agent or key")


def add_admin_commands(sub: Any) -> None:
    """Register every admin group on the top-level `alephant` subparsers."""
    cmds = Commands(sub)
    leaf = cmds.leaf

    g = cmds.group("workspaces", "Create and list workspaces")
    p = leaf(g, "create", "Create a workspace", "POST", lambda a: "/admin/v1/workspaces",
             lambda a: drop_none({"name": a.name, "id": a.id, "default_provider": a.default_provider}), ws=False)
    p.add_argument("name")
    p.add_argument("--id")
    p.add_argument("--default-provider", help="the provider (by name) a bare model name such as gpt-4o goes to")
    cmds.crud_tail(g, "workspaces", "workspace", ws_list=False)

    g = cmds.group("departments", "Departments: groups of members, agents and keys that budgets and policies "
                   "can target")
    p = leaf(g, "create", "Create a department", "POST", lambda a: "/admin/v1/departments",
             lambda a: drop_none({"workspace_id": default_ws(a), "name": a.name, "id": a.id}))
    p.add_argument("name")
    p.add_argument("--id")
    cmds.crud_tail(g, "departments", "department")

    g = cmds.group("members", "Members: the people agents and keys act for")
    p = leaf(g, "create", "Create a member", "POST", lambda a: "/admin/v1/members",
             lambda a: drop_none({"workspace_id": default_ws(a), "name": a.name, "department_id": a.department,
                                  "email": a.email, "id": a.id}))
    p.add_argument("name")
    p.add_argument("--department", metavar="ID", help="the member's department id")
    p.add_argument("--email")
    p.add_argument("--id")
    cmds.crud_tail(g, "members", "member")

    g = cmds.group("agents", "Register and list agents")
    p = leaf(g, "create", "Register an agent", "POST", lambda a: "/admin/v1/agents",
             lambda a: drop_none({"workspace_id": default_ws(a), "name": a.name, "id": a.id,
                                  "department_id": a.department, "member_id": a.member, "router_id": a.router}))
    p.add_argument("name")
    p.add_argument("--department", metavar="ID", help="the department the agent's spend counts against")
    p.add_argument("--member", metavar="ID", help="the member the agent acts for")
    p.add_argument("--router", metavar="ID", help=_ROUTER_BINDING_HELP)
    p.add_argument("--id")
    _binding_update(cmds, g, "agents", "agent")
    cmds.crud_tail(g, "agents", "agent")

    g = cmds.group("providers", "Configure upstream providers (keys are encrypted at rest)")
    p = leaf(g, "set", "Create or replace a provider", "POST", lambda a: "/admin/v1/providers",
             lambda a: drop_none({"workspace_id": default_ws(a), "name": a.name, "type": a.type,
                                  "base_url": a.base_url, "api_key": a.api_key_from_env and
                                  os.environ.get(a.api_key_from_env), "options": _pairs(a.option) or None}))
    p.add_argument("name", help="the name clients use as the model prefix, e.g. 'openai' in openai/gpt-4o")
    p.add_argument("--type", required=True, choices=list(get_args(ProviderKind)))
    p.add_argument("--base-url")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="type-specific setting, e.g. api_version=2024-10-21 (azure), region=us-east-1 (bedrock)")
    p.add_argument("--api-key-from-env", metavar="VAR",
                   help="read the provider key from this environment variable (never pass keys as arguments)")
    cmds.crud_tail(g, "providers", "provider")

    g = cmds.group("provider-keys", "Upstream credentials: a workspace's own (BYO) keys per provider, by weight, "
                   "and operator master keys per provider type for workspaces without their own")
    p = leaf(g, "create", "Add a provider key (read from an environment variable, never an argument)", "POST",
             lambda a: "/admin/v1/provider-keys",
             lambda a: drop_none({"workspace_id": None if a.master else default_ws(a), "provider": a.provider,
                                  "api_key": os.environ.get(a.api_key_from_env, ""), "weight": a.weight,
                                  "name": a.name}))
    p.add_argument("provider", help="the workspace's provider name (BYO), or with --master a provider type")
    p.add_argument("--api-key-from-env", metavar="VAR", required=True, help="the environment variable holding it")
    p.add_argument("--master", action="store_true",
                   help="an operator master key for the provider type, serving every workspace without its own")
    p.add_argument("--weight", type=int, help="share of traffic among one provider's keys (default 1)")
    p.add_argument("--name")
    cmds.crud_tail(g, "provider-keys", "provider key")

    g = cmds.group("keys", "Virtual keys for clients")
    p = leaf(g, "create", "Create a virtual key (the key is printed once)", "POST",
             lambda a: "/admin/v1/virtual-keys",
             lambda a: drop_none({"workspace_id": default_ws(a), "name": a.name, "agent_id": a.agent,
                                  "department_id": a.department, "member_id": a.member, "router_id": a.router}))
    p.add_argument("--name", default="")
    p.add_argument("--agent", help="bind the key to one agent id")
    p.add_argument("--department", metavar="ID", help="the department the key's spend counts against")
    p.add_argument("--member", metavar="ID", help="the member the key acts for")
    p.add_argument("--router", metavar="ID", help=_ROUTER_BINDING_HELP + " (it wins over its agent's)")
    _binding_update(cmds, g, "virtual-keys", "virtual key")
    leaf(g, "revoke", "Revoke a key fleet-wide", "POST", lambda a: f"/admin/v1/virtual-keys/{a.id}/revoke",
         ws=False).add_argument("id")
    cmds.crud_tail(g, "virtual-keys", "virtual key")

    g = cmds.group("aliases", "Model aliases")
    p = leaf(g, "set", "Point an alias at provider/model", "POST", lambda a: "/admin/v1/model-aliases",
             lambda a: {"workspace_id": default_ws(a), "alias": a.alias, "target": a.target})
    p.add_argument("alias")
    p.add_argument("target", help="provider/model_id")
    cmds.crud_tail(g, "model-aliases", "alias")

    g = cmds.group("prices", "Operator price overrides (integer nano-USD per million tokens), for every workspace, "
                   "one workspace or one provider key; negotiated discounts; per-request fees")
    p = leaf(g, "set", "Set the price of provider/model (model '*': every model of the provider). Most specific "
             "wins: provider key, workspace, platform, built-in, catalog", "POST", lambda a: "/admin/v1/prices",
             _price_body, ws=False)
    p.add_argument("provider", help="the provider name, as in provider/model")
    p.add_argument("model", help="the model id, or '*' for every model of the provider (with a discount or fee)")
    p.add_argument("--input", type=int, help="nano-USD per million input tokens ($2.50 = 2500000000); "
                   "with --output, or neither")
    p.add_argument("--output", type=int, help="nano-USD per million output tokens")
    p.add_argument("--cache-read", type=int, help="nano-USD per million cached input tokens (default: --input)")
    p.add_argument("--scope", choices=["platform", "workspace", "provider_key"],
                   help="where it applies (default: provider_key with --provider-key, workspace with --workspace, "
                        "else platform)")
    p.add_argument("--workspace", "-w", help="the workspace of a workspace-scoped price (default with "
                   "--scope workspace: $ALEPHANT_WORKSPACE or 'demo')")
    p.add_argument("--provider-key", metavar="ID", help="the provider key of a provider_key-scoped price")
    p.add_argument("--discount-pct", metavar="PCT",
                   help="percent off, a decimal string such as 12.5 (without --input/--output: off the price "
                        "found below this one, e.g. the catalog's)")
    p.add_argument("--per-request-usd", metavar="USD", help="a fee added to each successful call, e.g. 0.002")
    cmds.crud_tail(g, "prices", "price override", ws_list=False)

    _governance(cmds)
    _routers(cmds)
    _cache(cmds)
    _paid(cmds)
    _wallets(cmds)
    from deploy.log_destinations_cli import add_log_destination_commands  # it imports this module

    add_log_destination_commands(cmds)
    from deploy.log_settings_cli import add_log_settings_commands  # it imports this module

    add_log_settings_commands(cmds)
    from deploy.mcp_servers_cli import add_mcp_server_commands  # it imports this module

    add_mcp_server_commands(cmds)
    _finance_commands(cmds)

    g = cmds.group("models", "The model catalog")
    leaf(g, "list", "Models the workspace's keys may call, with context windows", "GET",
         lambda a: f"/admin/v1/models?workspace_id={default_ws(a)}")
    leaf(g, "catalog", "Provider types and the models known for each", "GET", lambda a: "/admin/v1/catalog",
         ws=False)

    from deploy.timeline_cli import add_run_timeline, add_sessions  # it imports this module

    g = cmds.group("runs", "Agent runs: cost and usage from the ledger, and their timelines")
    leaf(g, "get", "Cost and usage of one run", "GET", lambda a: f"/admin/v1/runs/{a.run_id}",
         ws=False).add_argument("run_id")
    add_run_timeline(g)
    add_sessions(cmds)

    g = cmds.group("ledger", "The double-entry ledger")
    leaf(g, "balance", "Debits and credits per currency", "GET", lambda a: "/admin/v1/ledger/balance", ws=False)
    _ledger_ops(g)
    p = leaf(g, "reprice", "Price calls recorded as unpriced (their tokens wait in a suspense account) with "
             "today's prices, after setting one with `alephant prices set`. Idempotent: a call is re-priced once. "
             "Prints repriced, cost_usd, still_unpriced and more (true: run it again)", "POST",
             lambda a: "/admin/v1/finance/reprice",
             lambda a: drop_none({"provider": a.provider, "model": a.model, "workspace_id": a.workspace}),
             ws=False, change=False)
    p.add_argument("--provider", required=True, help="the provider name the calls were made to")
    p.add_argument("--model", required=True, help="the model id, or '*' for every model of the provider")
    p.add_argument("--workspace", "-w", help="only this workspace's calls (default: every workspace's)")

    help_text = "Data-plane workers heard in the last 30 s and the config revision each has applied"
    sub.add_parser("fleet", help=help_text, description=help_text).set_defaults(
        fn=admin_call("GET", lambda a: "/admin/v1/fleet"))


# ---- routers ------------------------------------------------------------------------------------

_ROUTER_BINDING_HELP = "the router (id) its calls go through when they name no provider/model"


def _binding_update(cmds: Commands, g: Any, path: str, noun: str) -> None:
    """`<group> update ID [--name] [--router ID|none]`."""
    p = cmds.leaf(g, "update", f"Change a {noun}'s name or default router", "PATCH",
                  lambda a: f"/admin/v1/{path}/{a.id}",
                  lambda a: drop_none({"name": a.name}) | ({} if a.router is None else {
                      "router_id": None if a.router == "none" else a.router}), ws=False)
    p.add_argument("id")
    p.add_argument("--name")
    p.add_argument("--router", metavar="ID|none", help=_ROUTER_BINDING_HELP + "; 'none' unbinds it")


def parse_target(text: str) -> dict[str, Any]:
    """`provider/model[:weight]` -> a target body. The weight is the last `:<digits>`, so a model
    id that itself ends in `:<digits>` (Bedrock's `...-v1:0`) needs an explicit weight after it."""
    model, sep, weight = text.rpartition(":")
    if sep and weight.isdigit():
        body: dict[str, Any] = {"model": model, "weight": int(weight)}
    else:
        body = {"model": text}
    if "/" not in body["model"]:
        raise argparse.ArgumentTypeError(f"{text!r} is not provider/model[:weight] (e.g. openai/gpt-4o:3)")
    return body


def read_json_value(value: str) -> Any:
    """`read_json_arg`, plus a bare path to an existing file."""
    if not value.lstrip().startswith(("{", "[", "@")) and Path(value).is_file():
        value = "@" + value
    return read_json_arg(value)


_ROUTER_JSON_HELP = ("more fields as a JSON object, inline or a FILE (@FILE also works): rules, retry, timeouts, "
                     "health, or targets with provider_key_id/models, e.g. '{\"rules\": [{\"when\": {\"tools\": "
                     "true}, \"targets\": [{\"model\": \"anthropic/claude-sonnet-4\"}]}], \"retry\": "
                     "{\"retries\": 2}}'; the flags win over the same fields given here")
_STRATEGIES = ["weighted", "latency", "least_busy", "cost", "fallback"]


def _router_body(a: Args, create: bool) -> dict[str, Any]:
    body: dict[str, Any] = {}
    if a.json is not None:
        if not isinstance(a.json, dict):
            sys.exit("alephant: --json must be a JSON object")
        body.update(a.json)
    if create:
        body["workspace_id"] = default_ws(a)
    body.update(drop_none({"name": a.name, "strategy": a.strategy, "targets": a.target}))
    return body


def _routers(cmds: Commands) -> None:
    """Routers: create, list, show, update, delete, health."""
    leaf = cmds.leaf
    g = cmds.group("routers", "Routers: one name for several upstream targets with a strategy (weighted, latency, "
                   "least_busy, cost, fallback), conditional rules, retries, timeouts and outlier ejection. Clients "
                   "call one as model 'router/<name>' or at /router/<id>/v1/...; keys and agents can default to one")
    base = "/admin/v1/routers"
    p = leaf(g, "create", "Create a router, e.g. alephant routers create --name main --strategy weighted "
             "--target openai/gpt-4o:3 --target azure/gpt-4o:1", "POST", lambda a: base,
             lambda a: _router_body(a, create=True))
    p.add_argument("--name", required=True, help="unique in the workspace; clients send model 'router/<name>'")
    p.add_argument("--strategy", choices=_STRATEGIES, help="how a target is chosen (default fallback: in order)")
    p.add_argument("--target", action="append", type=parse_target, metavar="PROVIDER/MODEL[:WEIGHT]",
                   help="a target (repeatable, in order): the provider's name in the workspace and a model, or '*' "
                        "for the model the request names; ':WEIGHT' for the weighted strategy (default 1)")
    p.add_argument("--json", type=read_json_value, metavar="JSON|FILE", help=_ROUTER_JSON_HELP)
    leaf(g, "list", "List the workspace's routers", "GET", lambda a: f"{base}?workspace_id={default_ws(a)}")
    leaf(g, "show", "Show a router", "GET", lambda a: f"{base}/{a.id}", ws=False).add_argument("id")
    p = leaf(g, "update", "Change a router: the fields given (--target replaces the whole target list; a --json "
             "rules, retry, timeouts or health replaces that whole field)", "PATCH", lambda a: f"{base}/{a.id}",
             lambda a: _router_body(a, create=False), ws=False)
    p.add_argument("id")
    p.add_argument("--name")
    p.add_argument("--strategy", choices=_STRATEGIES)
    p.add_argument("--target", action="append", type=parse_target, metavar="PROVIDER/MODEL[:WEIGHT]",
                   help="the new targets (repeatable)")
    p.add_argument("--json", type=read_json_value, metavar="JSON|FILE", help=_ROUTER_JSON_HELP)
    leaf(g, "delete", "Delete a router (refused while a key or agent uses it as its default)", "DELETE",
         lambda a: f"{base}/{a.id}", ws=False).add_argument("id")
    leaf(g, "health", "Each target's health on every live data-plane worker: in flight, successes, failures, "
         "latency, ejections and cool-downs", "GET", lambda a: f"{base}/{a.id}/health", ws=False).add_argument("id")


# ---- the response cache --------------------------------------------------------------------------

_CACHE_MODES = list(get_args(CacheMode))
_CACHE_SCOPES = list(get_args(CacheScope))


def cache_settings_body(a: Args) -> dict[str, Any]:
    """`cache settings set`'s POST body: only the flags given (the API's defaults for the rest); a
    workspace-scoped setting's scope id is the workspace."""
    ws = default_ws(a)
    scope_id = a.scope_id if a.scope_id is not None else ws if a.scope == "workspace" else None
    if scope_id is None:
        sys.exit(f"alephant: --scope {a.scope} needs --scope-id (the {'virtual key' if a.scope == 'key' else 'router'}"
                 " id)")
    return drop_none({"workspace_id": ws, "scope": a.scope, "scope_id": scope_id, "mode": a.mode, "ttl_s": a.ttl_s,
                      "similarity": a.similarity, "embedding_model": a.embedding_model,
                      "exclude_tools": a.exclude_tools, "exclude_temperature": a.exclude_temperature,
                      "namespace": a.namespace})


def cache_purge_path(a: Args) -> str:
    return "/admin/v1/cache?" + urlencode(drop_none({"workspace_id": a.workspace, "namespace": a.namespace}))


def _cache(cmds: Commands) -> None:
    """`cache settings set|list|show|delete` and `cache purge`."""
    leaf = cmds.leaf
    g = cmds.group("cache", "The response cache: settings per workspace, virtual key or router (exact answers in "
                   "Redis, semantic matches in Qdrant), and purges")
    text = ("Cache settings: whether and how calls are answered from the cache, per workspace, key or router (the "
            "most specific wins: key, then router, then workspace)")
    settings = g.add_parser("settings", help=text, description=text).add_subparsers(
        dest="settings_action", required=True, metavar="ACTION")
    base = "/admin/v1/cache-settings"
    p = leaf(settings, "set", "Create or replace the cache setting of a workspace, key or router (one per scope), "
             "e.g. alephant cache settings set --mode exact --ttl-s 600, or --scope key --scope-id vk_... --mode "
             "semantic --embedding-model openai/text-embedding-3-small", "POST", lambda a: base, cache_settings_body)
    p.add_argument("--scope", choices=_CACHE_SCOPES, default="workspace",
                   help="what the setting applies to (default workspace)")
    p.add_argument("--scope-id", metavar="ID", help="the virtual key id or router id (default with --scope "
                   "workspace: the workspace)")
    p.add_argument("--mode", required=True, choices=_CACHE_MODES,
                   help="exact: the same request answered from Redis; semantic: exact, then the nearest earlier "
                        "prompt above --similarity (Qdrant); off: never cached (e.g. a key under a cached workspace)")
    p.add_argument("--ttl-s", type=int, metavar="SECONDS", help="how long an answer is kept, 1..2592000 (30 days; "
                   "default 3600)")
    p.add_argument("--similarity", type=float, help="semantic: the least similarity served, in (0, 1] (default 0.95)")
    p.add_argument("--embedding-model", metavar="PROVIDER/MODEL",
                   help="semantic (required): the model that embeds prompts, a provider of the workspace")
    p.add_argument("--exclude-tools", action=argparse.BooleanOptionalAction, default=None,
                   help="keep requests offering tools out of the cache (default: yes)")
    p.add_argument("--exclude-temperature", action=argparse.BooleanOptionalAction, default=None,
                   help="keep requests with a non-zero temperature out of the cache (default: no)")
    p.add_argument("--namespace", metavar="NS", help="a partition of the cache (an id; default: the default "
                   "namespace)")
    leaf(settings, "list", "List the workspace's cache settings", "GET",
         lambda a: f"{base}?workspace_id={default_ws(a)}")
    leaf(settings, "show", "Show a cache setting", "GET", lambda a: f"{base}/{a.id}", ws=False).add_argument("id")
    leaf(settings, "delete", "Delete a cache setting (its scope falls back to the next one on the call's path)",
         "DELETE", lambda a: f"{base}/{a.id}", ws=False).add_argument("id")

    p = leaf(g, "purge", "Forget every cached answer of a workspace in one namespace: workers stop serving them "
             "once they apply the purge's revision (--wait waits for that); the Redis keys (and a Qdrant server's "
             "points) are deleted too", "DELETE", cache_purge_path, ws=False)
    p.add_argument("--workspace", "-w", required=True, help="the workspace whose cache to purge")
    p.add_argument("--namespace", metavar="NS", help="the namespace to purge (default: the default namespace)")


# ---- finance reads: tables in decimal USD, or the API's JSON, or CSV ---------------------------

# ---- paid endpoints -----------------------------------------------------------------------------

_PAID_JSON_HELP = ("the whole body (or more fields) as a JSON object, inline or a FILE (@FILE also works), e.g. "
                   "'{\"rails\": {\"x402\": {\"extra\": {\"name\": \"USDC\", \"version\": \"2\"}}}}'; "
                   "the flags win over the same fields given here")


def parse_versions(text: str) -> list[int]:
    """`2,1` -> [2, 1] (x402 protocol versions, in order of preference)."""
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of versions such as 2,1") from None


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """`extra` over `base`, nested objects merged key by key."""
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def parse_per_token(value: str) -> tuple[str, str, str]:
    """`--per-token IN,OUT,MAX`: three non-negative integer strings (the API checks their ranges)."""
    parts = tuple(part.strip() for part in value.split(","))
    if len(parts) != 3 or not all(part.isdigit() for part in parts):
        raise argparse.ArgumentTypeError("expected IN,OUT,MAX: three integers (atomic units), e.g. 150000,600000,50000")
    return parts[0], parts[1], parts[2]


def paid_body(a: Args, create: bool, current: Callable[[], dict[str, Any]] | None = None) -> dict[str, Any]:
    """`paid create|update`'s body: --json, then the flags over it. On update, a price or x402 flag
    is merged over the endpoint's current price or x402 settings (`current()`: a GET), because a
    PATCH replaces `price` and `rails` whole."""
    body: dict[str, Any] = {}
    if a.json is not None:
        if not isinstance(a.json, dict):
            sys.exit("alephant: --json must be a JSON object")
        body.update(a.json)
    if create and (a.workspace is not None or "workspace_id" not in body):
        body["workspace_id"] = default_ws(a)
    if a.model is not None and a.backend_url is not None:
        sys.exit("alephant: give --model or --backend-url, not both")
    flags: dict[str, Any] = drop_none({"slug": a.slug, "agent_id": a.agent, "workflow_id": a.workflow,
                                       "description": a.description})
    if a.model is not None or a.backend_url is not None:
        flags["serve"] = drop_none({"model": a.model, "backend_url": a.backend_url})
    if a.amount is not None and a.per_token is not None:
        sys.exit("alephant: give --amount or --per-token, not both")
    per_call = drop_none({"amount": a.amount, "asset": a.asset, "decimals": a.decimals})
    x402 = drop_none({"network": a.network, "pay_to": a.pay_to, "facilitator_url": a.facilitator,
                      "versions": a.x402_versions, "max_timeout_s": a.max_timeout})
    stored = current() if not create and current is not None and (per_call or x402 or a.per_token) else {}
    if a.per_token is not None:
        rates = dict(zip(("input_per_mtok", "output_per_mtok", "max_amount"), a.per_token, strict=True))
        flags["price"] = {"per_token": _merge(stored.get("price", {}).get("per_token", {}),
                                              drop_none({"asset": a.asset, "decimals": a.decimals}) | rates)}
    elif per_call:
        flags["price"] = {"per_call": _merge(stored.get("price", {}).get("per_call", {}), per_call)}
    if x402:
        flags["rails"] = {"x402": _merge(stored.get("rails", {}).get("x402", {}), x402)}
    body = _merge(body, flags)
    if "serve" in flags:
        body["serve"] = flags["serve"]  # exactly one of model / backend_url: never merged with --json's
    if a.per_token is not None:
        body["price"] = flags["price"]  # likewise one of per_call / per_token
    if not create:
        # The API shows these; a PATCH takes only the settings.
        for key in ("id", "workspace_id", "revenue_usd", "revenue_nanos", "calls"):
            body.pop(key, None)
    return body


def _paid_flags(p: argparse.ArgumentParser, create: bool) -> None:
    p.add_argument("--slug", help="the path segment clients call, /paid/<slug>/...: 1-64 letters, digits, '-' or "
                   "'_', unique across the gateway" + (" (required, here or in --json)" if create else ""))
    serve = p.add_argument_group("what serves a paid call (one of)")
    serve.add_argument("--model", help="a model the gateway serves: provider/model, router/<name> or an alias")
    serve.add_argument("--backend-url", metavar="URL",
                       help="your backend (http/https); the call's path below /paid/<slug> is appended")
    price = p.add_argument_group("price of one call, in the payment asset's atomic units")
    price.add_argument("--amount", help='a positive integer string, e.g. 10000 (= 0.01 USDC at 6 decimals)')
    price.add_argument("--per-token", type=parse_per_token, metavar="IN,OUT,MAX",
                       help="a metered price instead of --amount (model-served endpoints): atomic units per million "
                       "input and output tokens, and the most one call is charged (what the caller authorizes; "
                       "the unmetered rest is owed back), e.g. 150000,600000,50000")
    price.add_argument("--asset", help="the asset; for x402 the token contract address (e.g. USDC's)")
    price.add_argument("--decimals", type=int, help="the asset's decimals, 0-18 (default 6)")
    rail = p.add_argument_group("x402 rail")
    rail.add_argument("--network", help="CAIP-2 network, e.g. eip155:8453 (Base) or eip155:84532 (Base Sepolia)")
    rail.add_argument("--pay-to", metavar="ADDRESS", help="the 0x address payments go to")
    rail.add_argument("--facilitator", metavar="URL", help="the x402 facilitator that verifies and settles")
    rail.add_argument("--x402-versions", type=parse_versions, metavar="2,1",
                      help="x402 versions accepted, in order (default 2,1)")
    rail.add_argument("--max-timeout", type=int, metavar="SECONDS",
                      help="how long a payment authorization stays valid, 1-3600 (default 60)")
    p.add_argument("--agent", metavar="ID", help="the agent (of the workspace) the revenue belongs to")
    p.add_argument("--workflow", metavar="ID", help="the workflow the revenue belongs to")
    p.add_argument("--description", help="what the endpoint sells")
    p.add_argument("--json", type=read_json_value, metavar="JSON|FILE", help=_PAID_JSON_HELP)


def _paid(cmds: Commands) -> None:
    """`paid create|list|show|update|delete`."""
    leaf = cmds.leaf
    g = cmds.group("paid", "Paid endpoints: sell an agent capability per call at /paid/<slug>/... over x402 "
                   "(a backend of yours or a model the gateway serves; a fixed price per call in a stablecoin)")
    base = "/admin/v1/paid-endpoints"
    p = leaf(g, "create", "Create a paid endpoint, e.g. alephant paid create --slug summarize --model openai/gpt-4o "
             "--amount 10000 --asset 0x036CbD53842c5426634e7929541eC2318f3dCF7e --network eip155:84532 "
             "--pay-to 0xYourAddress --facilitator https://x402.org/facilitator", "POST", lambda a: base,
             lambda a: paid_body(a, create=True))
    _paid_flags(p, create=True)
    leaf(g, "list", "List the workspace's paid endpoints", "GET", lambda a: f"{base}?workspace_id={default_ws(a)}")
    leaf(g, "show", "Show a paid endpoint with its revenue (revenue_usd, calls)", "GET", lambda a: f"{base}/{a.id}",
         ws=False).add_argument("id")

    def update_body(a: Args) -> dict[str, Any]:
        return paid_body(a, create=False, current=lambda: dict(admin_client(a).call("GET", f"{base}/{a.id}")))

    p = leaf(g, "update", "Change a paid endpoint: the fields given (price and x402 flags are merged over the current "
             "settings; --model or --backend-url replaces what serves it)", "PATCH", lambda a: f"{base}/{a.id}",
             update_body, ws=False)
    p.add_argument("id")
    _paid_flags(p, create=False)
    leaf(g, "delete", "Delete a paid endpoint", "DELETE", lambda a: f"{base}/{a.id}", ws=False).add_argument("id")

    g = cmds.group("payments", "Paid calls whose settlement is pending (broadcast, not confirmed): list and resolve "
                   "them once the chain says how they ended")
    leaf(g, "pending", "List the workspace's unresolved pending settlements (replay_key, endpoint, run, amount_usd "
         "earned once settled, refund_usd owed back, transaction)", "GET",
         lambda a: f"/admin/v1/payments/pending?workspace_id={default_ws(a)}")
    p = leaf(g, "resolve", "Resolve a pending settlement: --settled books its revenue on the serving run (and what it "
             "owes back), --failed books a loss. Once per payment", "POST", lambda a: "/admin/v1/payments/resolve",
             lambda a: drop_none({"workspace_id": default_ws(a), "replay_key": a.replay_key,
                                  "outcome": "settled" if a.settled else "failed", "transaction": a.transaction}),
             change=False)
    p.add_argument("replay_key", help="the payment's replay key, as `alephant payments pending` lists it")
    outcome = p.add_mutually_exclusive_group(required=True)
    outcome.add_argument("--settled", action="store_true", help="the settlement reached the chain")
    outcome.add_argument("--failed", action="store_true", help="the settlement never will (the authorization lapsed)")
    p.add_argument("--transaction", metavar="HASH", help="the settlement's transaction hash, when known")


# ---- wallets (outbound payments) -----------------------------------------------------------------

_WALLET_JSON_HELP = ("the whole body (or more fields) as a JSON object, inline or a FILE (@FILE also works), e.g. "
                     "'{\"agent_ids\": []}' to let every key of the workspace pay; the flags win over the same fields "
                     "given here")


def parse_wallet_asset(text: str) -> dict[str, Any]:
    """`network:asset:max_amount[:decimals]` -> an asset body; the network is CAIP-2, so it has a
    colon of its own: `eip155:84532:0x036C...:1000000:6`."""
    parts = text.split(":")
    if len(parts) not in (4, 5):
        raise argparse.ArgumentTypeError(f"{text!r} is not network:asset:max_amount[:decimals] (e.g. "
                                         "eip155:84532:0x036CbD53842c5426634e7929541eC2318f3dCF7e:1000000:6)")
    body: dict[str, Any] = {"network": ":".join(parts[:2]), "asset": parts[2], "max_amount": parts[3]}
    if len(parts) == 5:
        try:
            body["decimals"] = int(parts[4])
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r}: decimals must be an integer, got {parts[4]!r}") from None
    return body


def parse_alias(text: str) -> tuple[str, str]:
    """`name=url` -> (name, url)."""
    name, sep, url = text.partition("=")
    if not sep or not name or not url:
        raise argparse.ArgumentTypeError(f"{text!r} is not name=url (e.g. search=https://api.example.com/v1)")
    return name, url


def wallet_body(a: Args, create: bool) -> dict[str, Any]:
    """`wallets create|update`'s body: --json, then the flags over it. A list flag (--asset,
    --agent, --alias, --rail) replaces that whole field; the key comes from the environment
    variable --private-key-env names, never from an argument."""
    body: dict[str, Any] = {}
    if a.json is not None:
        if not isinstance(a.json, dict):
            sys.exit("alephant: --json must be a JSON object")
        body.update(a.json)
    if create and (a.workspace is not None or "workspace_id" not in body):
        body["workspace_id"] = default_ws(a)
    body.update(drop_none({"name": a.name, "assets": a.asset, "agent_ids": a.agent, "rails": a.rail,
                           "aliases": None if a.alias is None else dict(a.alias)}))
    if a.private_key_env is not None:
        key = os.environ.get(a.private_key_env)
        if not key:
            sys.exit(f"alephant: --private-key-env: the environment variable {a.private_key_env} is not set")
        body["private_key"] = key
    if not create:
        # The API shows these; a PATCH takes only the settings.
        for key in ("id", "workspace_id", "address", "has_private_key"):
            body.pop(key, None)
    return body


def _wallet_flags(p: argparse.ArgumentParser, create: bool) -> None:
    replaces = "" if create else "; replaces the whole list"
    p.add_argument("--name", help="1-64 letters, digits, '-' or '_', unique in the workspace"
                   + (" (required, here or in --json)" if create else ""))
    p.add_argument("--asset", action="append", type=parse_wallet_asset, metavar="NETWORK:ASSET:MAX_AMOUNT[:DECIMALS]",
                   help="an asset the wallet may pay with (repeatable; at least one on create): the CAIP-2 network, "
                        "the token contract address and the most ONE payment may spend in the token's atomic units, "
                        "e.g. eip155:84532:0x036CbD53842c5426634e7929541eC2318f3dCF7e:1000000:6 (1 USDC at 6 "
                        "decimals; decimals default 6)" + replaces)
    p.add_argument("--agent", action="append", metavar="ID",
                   help="an agent of the workspace allowed to pay with it (repeatable; none: every key of the "
                        "workspace)" + replaces)
    p.add_argument("--alias", action="append", type=parse_alias, metavar="NAME=URL",
                   help="a named upstream, called as /egress/NAME/... (repeatable; http/https, no internal "
                        "addresses)" + replaces)
    p.add_argument("--rail", action="append", choices=["x402", "mpp"],
                   help="a rail it pays on (repeatable; default both)" + replaces)
    p.add_argument("--private-key-env", metavar="VAR",
                   help="read the wallet's EVM private key (0x + 64 hex) from this environment variable (never "
                        "pass keys as arguments)" + ("; omitted: the gateway generates a key, never shown: fund "
                        "the answer's address" if create else "; replaces the key and its address"))
    p.add_argument("--json", type=read_json_value, metavar="JSON|FILE", help=_WALLET_JSON_HELP)


def _wallets(cmds: Commands) -> None:
    """`wallets create|list|get|update|delete`."""
    leaf = cmds.leaf
    g = cmds.group("wallets", "Wallets: an EVM key that pays the x402/MPP endpoints agents call through the "
                   "gateway's /egress, only in allow-listed assets and under a per-payment cap (the key is stored "
                   "encrypted and never shown)")
    base = "/admin/v1/wallets"
    p = leaf(g, "create", "Create a wallet, e.g. alephant wallets create --name ops --asset "
             "eip155:84532:0x036CbD53842c5426634e7929541eC2318f3dCF7e:1000000 --agent agent_... --alias "
             "search=https://api.example.com (with --private-key-env VAR to bring your own key)", "POST",
             lambda a: base, lambda a: wallet_body(a, create=True))
    _wallet_flags(p, create=True)
    leaf(g, "list", "List the workspace's wallets", "GET", lambda a: f"{base}?workspace_id={default_ws(a)}")
    leaf(g, "get", "Get a wallet (its address, assets, agents, aliases and rails; never the key)", "GET",
         lambda a: f"{base}/{a.id}", ws=False).add_argument("id")
    p = leaf(g, "update", "Change a wallet: the fields given (a list flag replaces that whole list; without "
             "--private-key-env the key and address are kept)", "PATCH", lambda a: f"{base}/{a.id}",
             lambda a: wallet_body(a, create=False), ws=False)
    p.add_argument("id")
    _wallet_flags(p, create=False)
    leaf(g, "delete", "Delete a wallet: the gateway stops paying with it (a generated key was never shown: spend or "
         "move its funds first)", "DELETE",
         lambda a: f"{base}/{a.id}", ws=False).add_argument("id")


_MONEY = (("model cost", "llm_cost_usd"), ("tool cost", "tool_cost_usd"), ("payments", "payments_out_usd"),
          ("total cost", "cost_usd"), ("revenue", "revenue_usd"), ("margin", "margin_usd"),
          ("cache savings", "cache_savings_usd"))
_PERIOD_CHARS = {"hour": 13, "day": 10, "month": 7}
Columns = list[tuple[str, str]]


def show_usd(value: str) -> str:
    """A decimal USD string for a table: thousands separators, at least 2 decimals, never rounded."""
    amount = Decimal(value)
    return f"{amount:,.2f}" if amount == amount.quantize(Decimal("0.01")) else f"{amount:,f}"


def print_table(rows: list[dict[str, Any]], columns: Columns, out: TextIO, period: str | None = None) -> None:
    """`rows` as aligned text columns (`(header, key)`): money keys (`*_usd`) via `show_usd`,
    numbers right-aligned, null as `-`."""
    def cell(row: dict[str, Any], key: str) -> str:
        value = row.get(key)
        if value is None:
            return "-"
        if key.endswith("_usd"):
            return show_usd(value)
        if key == "period_start" and period is not None:
            return str(value)[:_PERIOD_CHARS[period]].replace("T", " ") + (":00" if period == "hour" else "")
        return str(value)

    body = [[cell(r, key) for _, key in columns] for r in rows]
    header = [h for h, _ in columns]
    widths = [max(len(x) for x in col) for col in zip(header, *body, strict=True)]
    right = [key.endswith(("_usd", "_tokens", "_runs", "_calls")) or key in ("requests", "errors", "rank", "ratio",
                                                                             "workspaces", "used_pct")
             for _, key in columns]
    for line in [header, *body]:
        print("  ".join(x.rjust(w) if r else x.ljust(w) for x, w, r in zip(line, widths, right, strict=True)).rstrip(),
              file=out)
    if not rows:
        print("(no rows)", file=out)


def finance_call(path: str, query: Callable[[Args], dict[str, Any]],
                 columns: Callable[[Args], Columns]) -> Callable[[Args], None]:
    """GET /admin/v1/finance/<path> with the window and workspace options and `query(args)`; print
    a table (`columns(args)`), the JSON answer, or CSV."""
    def run(args: Args) -> None:
        from controlplane.finance import Table

        params = drop_none({"workspace_id": None if args.all_workspaces else default_ws(args), "from": args.from_,
                            "to": args.to, **query(args)})
        client = admin_client(args)
        try:
            result = client.call("GET", f"/admin/v1/finance/{path}?{urlencode(params)}")
        except AdminError as exc:
            sys.exit(f"alephant: {exc}")
        except OSError as exc:
            sys.exit(f"alephant: cannot reach the admin API: {exc}")
        if args.format == "json":
            print(json.dumps(result, indent=2))
        elif args.format == "csv":
            sys.stdout.write(Table(tuple(result["columns"]), result["data"]).to_csv())
        else:
            print_table(result["data"], columns(args), sys.stdout, getattr(args, "interval", None))
        if result.get("has_more"):
            print("alephant: more rows than --limit; narrow the window or raise --limit", file=sys.stderr)

    return run


def _finance_leaf(g: Any, name: str, help_text: str, example: str, window: bool = True) -> argparse.ArgumentParser:
    p: argparse.ArgumentParser = g.add_parser(name, help=help_text, description=help_text,
                                              epilog=f"example: {example}")
    p.add_argument("--workspace", "-w", help="workspace id (default: $ALEPHANT_WORKSPACE or 'demo')")
    p.add_argument("--all-workspaces", action="store_true", help="every workspace (rows say which)")
    if window:
        p.add_argument("--from", dest="from_", metavar="WHEN",
                       help="start of the window, ISO-8601 (2026-01-01 or 2026-01-01T09:00:00Z; no offset = UTC)")
        p.add_argument("--to", metavar="WHEN", help="end of the window, exclusive (same format)")
    else:
        p.set_defaults(from_=None, to=None)
    p.add_argument("--format", choices=["table", "json", "csv"], default="table",
                   help="table (decimal USD, the default), json (the API's answer: *_usd strings and *_nanos "
                        "integers) or csv (a header row, for spreadsheets)")
    return p


def _who(args: Args, key: str, header: str) -> Columns:
    return ([("workspace", "workspace_id")] if args.all_workspaces else []) + [(header, key)]


def _finance_commands(cmds: Commands) -> None:
    """`alephant finance summary|top|spikes|unpriced|budgets`."""
    g = cmds.group("finance", "Spend, revenue and margin by agent, run, workflow, model and period (cost = model "
                   "+ tool + payments; margin = revenue - cost)")
    groups = "agent, run, workflow, member, department, workspace, provider, model or property:<name>"
    p = _finance_leaf(g, "summary", "Totals grouped by a dimension, optionally per hour, day or month",
                      "alephant finance summary --group-by agent --interval day --from 2026-01-01 --to 2026-02-01")
    p.add_argument("--group-by", default="agent", metavar="DIMENSION", help=f"{groups} (default agent)")
    p.add_argument("--interval", choices=["hour", "day", "month"], help="one row per group and period (UTC)")
    p.add_argument("--limit", type=int, help="at most this many rows (default 1000)")
    p.set_defaults(fn=finance_call(
        "summary", lambda a: {"group_by": a.group_by, "interval": a.interval, "limit": a.limit},
        lambda a: ([("workspace", "workspace_id")] if a.all_workspaces and a.group_by not in (
            "provider", "model", "workspace") and not a.group_by.startswith("property:") else [])
        + [(a.group_by, "group")] + ([("period", "period_start")] if a.interval else [])
        + [("requests", "requests"), *_MONEY, ("unpriced tokens", "unpriced_tokens")]))

    p = _finance_leaf(g, "top", "The runs, agents or workflows with the highest cost, revenue or margin",
                      "alephant finance top --by run --metric cost --limit 10")
    p.add_argument("--by", choices=["run", "agent", "workflow"], default="run", help="default run")
    p.add_argument("--metric", choices=["cost", "revenue", "margin"], default="cost", help="default cost")
    p.add_argument("--limit", type=int, default=10, help="how many (default 10)")
    p.add_argument("--lowest", action="store_true", help="the lowest first (e.g. the worst margins)")
    p.set_defaults(fn=finance_call(
        "top", lambda a: {"by": a.by, "metric": a.metric, "limit": a.limit, "order": "asc" if a.lowest else None},
        lambda a: [("#", "rank"), *_who(a, f"{a.by}_id", a.by), ("requests", "requests"), *_MONEY]))

    p = _finance_leaf(g, "spikes", "Runs costing far more than their agent's baseline (the median cost of the "
                      "agent's other runs in the window)", "alephant finance spikes --from 2026-01-01 --factor 5")
    p.add_argument("--factor", help="how many times the baseline counts as a spike (default 3)")
    p.add_argument("--min-runs", type=int, help="other runs an agent needs for a baseline (default 5)")
    p.set_defaults(fn=finance_call(
        "spikes", lambda a: {"factor": a.factor, "min_runs": a.min_runs},
        lambda a: [*_who(a, "agent_id", "agent"), ("run", "run_id"), ("cost", "cost_usd"),
                   ("baseline", "baseline_usd"), ("ratio", "ratio"), ("baseline runs", "baseline_runs")]))

    p = _finance_leaf(g, "unpriced", "Tokens and calls no price covered, per provider and model (set a price with "
                      "`alephant prices set`, then `alephant ledger reprice`)", "alephant finance unpriced")
    p.set_defaults(fn=finance_call(
        "unpriced", lambda a: {},
        lambda a: [("provider", "provider"), ("model", "model"), ("unpriced tokens", "unpriced_tokens"),
                   ("calls", "unpriced_calls"), ("workspaces", "workspaces"), ("last call", "last_at")]))

    p = _finance_leaf(g, "budgets", "Each budget's consumption in its current period", "alephant finance budgets",
                      window=False)
    p.set_defaults(fn=finance_call(
        "budgets", lambda a: {},
        lambda a: [("budget", "id"), ("scope", "scope"), ("scope id", "scope_id"), ("period", "period"),
                   ("limit", "limit_usd"), ("spent", "spent_usd"), ("held", "held_usd"),
                   ("remaining", "remaining_usd"), ("used %", "used_pct")]))


def _governance(cmds: Commands) -> None:
    """Budgets, limits, policies, escalations and the policy dry run."""
    leaf = cmds.leaf

    g = cmds.group("budgets", "Spend budgets per period (USD as decimal strings, e.g. 1.00)")
    p = leaf(g, "create", "Create a budget", "POST", lambda a: "/admin/v1/budgets",
             lambda a: drop_none({"workspace_id": default_ws(a), "scope": a.scope, "scope_id": a.scope_id,
                                  "period": a.period, "limit_usd": a.limit_usd, "timezone": a.timezone,
                                  "alert_at": a.alert_at or None, "id": a.id}))
    add_scope(p)
    p.add_argument("--period", required=True, choices=list(get_args(BudgetPeriod)))
    p.add_argument("--limit-usd", required=True, metavar="USD", help="e.g. 1.00 (a decimal string, never a float)")
    p.add_argument("--timezone", help="where the period's days begin (IANA name; default UTC)")
    p.add_argument("--alert-at", type=int, action="append", metavar="PERCENT",
                   help="emit budget.alert when spend crosses this percent (repeatable, e.g. 50 --alert-at 90)")
    p.add_argument("--id")
    p = leaf(g, "update", "Change a budget's limit, alerts or time zone", "PATCH",
             lambda a: f"/admin/v1/budgets/{a.id}",
             lambda a: drop_none({"limit_usd": a.limit_usd, "alert_at": a.alert_at, "timezone": a.timezone}),
             ws=False)
    p.add_argument("id")
    p.add_argument("--limit-usd", metavar="USD")
    p.add_argument("--alert-at", type=int, action="append", metavar="PERCENT")
    p.add_argument("--timezone")
    cmds.crud_tail(g, "budgets", "budget", get_help=" with its spent, held and remaining amounts")

    g = cmds.group("limits", "Rate and concurrency limits (requests and tokens per minute / day)")
    p = leaf(g, "create", "Create a limit (at least one of the rates)", "POST", lambda a: "/admin/v1/limits",
             lambda a: drop_none({"workspace_id": default_ws(a), "scope": a.scope, "scope_id": a.scope_id,
                                  "rpm": a.rpm, "rpd": a.rpd, "tpm": a.tpm, "tpd": a.tpd,
                                  "concurrency": a.concurrency, "id": a.id}))
    add_scope(p)
    for name, what in (("rpm", "requests per minute"), ("rpd", "requests per day"), ("tpm", "tokens per minute"),
                       ("tpd", "tokens per day"), ("concurrency", "calls in flight at once")):
        p.add_argument(f"--{name}", type=int, help=what)
    p.add_argument("--id")
    cmds.crud_tail(g, "limits", "limit")

    g = cmds.group("policies", "What calls may do: models, tools, endpoints, hours, token and cost caps")
    p = leaf(g, "create", "Create a policy (globs like 'openai/gpt-4o*'; repeat a flag for several)", "POST",
             lambda a: "/admin/v1/policies", _policy_body)
    add_scope(p)
    for flag, what in (("models-allow", "models allowed"), ("models-deny", "models denied"),
                       ("tools-allow", "tool names allowed"), ("tools-deny", "tool names denied"),
                       ("endpoints-allow", "endpoints allowed, e.g. /v1/chat/*"),
                       ("prompts-allow", "prompt template names allowed")):
        p.add_argument(f"--{flag}", action="append", metavar="GLOB", help=f"{what} (repeatable)")
    p.add_argument("--tool-action", choices=["deny", "strip"], help="a denied tool refuses the call or is removed")
    p.add_argument("--window", action="append", type=read_json_arg, metavar="JSON",
                   help='hours calls are allowed, e.g. \'{"days": [0,1,2,3,4], "start": "08:00", "end": "18:00", '
                        '"timezone": "Europe/Paris"}\' (repeatable)')
    p.add_argument("--max-tokens-cap", type=int, metavar="N")
    p.add_argument("--max-tokens-action", choices=["clamp", "reject"])
    p.add_argument("--max-cost-usd", metavar="USD", help="refuse a call estimated to cost more")
    p.add_argument("--escalate-over-usd", metavar="USD", help="hold a call estimated to cost more for approval")
    p.add_argument("--id")
    cmds.crud_tail(g, "policies", "policy", plural="policies")

    g = cmds.group("prompts", "Versioned prompt templates: messages with {{variable}} placeholders that requests "
                   "name with `prompt: {id, version?, variables}`")
    p = leaf(g, "create", "Create the next version of a template (version 1 of a new name)", "POST",
             lambda a: "/admin/v1/prompts", _prompt_body)
    p.add_argument("name")
    p.add_argument("--messages", required=True, type=read_json_arg, metavar="JSON|@FILE",
                   help='the chat messages, e.g. \'[{"role": "system", "content": "You help {{customer}}."}]\'')
    p.add_argument("--model", help="default model (provider/model or an alias) when a request names none")
    p.add_argument("--params", type=read_json_arg, metavar="JSON",
                   help='default parameters, e.g. \'{"temperature": 0.2, "max_tokens": 500}\'')
    p = leaf(g, "list", "Every version of one template (NAME), or every template version of the workspace", "GET",
             lambda a: f"/admin/v1/prompts/{a.name}?workspace_id={default_ws(a)}" if a.name
             else f"/admin/v1/prompts?workspace_id={default_ws(a)}")
    p.add_argument("name", nargs="?")

    g = cmds.group("escalations", "Calls held for approval by a policy")
    p = leaf(g, "list", "Escalations, newest first", "GET",
             lambda a: "/admin/v1/escalations?" + "&".join(
                 f"{k}={v}" for k, v in (("workspace_id", default_ws(a)), ("status", a.status)) if v))
    p.add_argument("--status", choices=["pending", "approved", "rejected", "used"])
    leaf(g, "get", "Get an escalation", "GET", lambda a: f"/admin/v1/escalations/{a.id}", ws=False).add_argument("id")
    p = leaf(g, "approve", "Approve: the key may retry the call once, with Alephant-Escalation-Id", "POST",
             lambda a: f"/admin/v1/escalations/{a.id}/approve", lambda a: drop_none({"ttl_s": a.ttl_s}), ws=False)
    p.add_argument("id")
    p.add_argument("--ttl-s", type=int, help="seconds the approval stays usable (default 900)")
    leaf(g, "reject", "Reject a pending escalation", "POST", lambda a: f"/admin/v1/escalations/{a.id}/reject",
         lambda a: {}, ws=False).add_argument("id")

    g = cmds.group("decisions", "What the gateway would decide for a request")
    p = leaf(g, "dry-run", "The policy decision for a request, without making the call", "POST",
             lambda a: "/admin/v1/decisions/dry-run",
             lambda a: drop_none({"key": a.key, "key_id": a.key_id, "body": a.body, "endpoint": a.endpoint,
                                  "headers": _pairs(a.header) or None, "est_cost_usd": a.est_cost_usd}),
             ws=False, change=False)
    who = p.add_mutually_exclusive_group(required=True)
    who.add_argument("--key", help="the virtual key as a client sends it")
    who.add_argument("--key-id", help="a virtual key's id")
    p.add_argument("--body", required=True, type=read_json_arg, metavar="JSON|@FILE",
                   help="the request body, inline or @file.json")
    p.add_argument("--endpoint", help="default /v1/chat/completions")
    p.add_argument("--header", action="append", default=[], metavar="NAME=VALUE",
                   help="an Alephant-* header of the request (repeatable)")
    p.add_argument("--est-cost-usd", metavar="USD", help="the cost estimate to decide with (default 0)")


def _prompt_body(a: Args) -> dict[str, Any]:
    return drop_none({"workspace_id": default_ws(a), "name": a.name, "messages": a.messages, "model": a.model,
                      "params": a.params})


def _policy_body(a: Args) -> dict[str, Any]:
    return drop_none({
        "workspace_id": default_ws(a), "scope": a.scope, "scope_id": a.scope_id,
        "models_allow": a.models_allow, "models_deny": a.models_deny, "tools_allow": a.tools_allow,
        "tools_deny": a.tools_deny, "tool_action": a.tool_action, "endpoints_allow": a.endpoints_allow,
        "prompts_allow": a.prompts_allow, "windows": a.window, "max_tokens_cap": a.max_tokens_cap,
        "max_tokens_action": a.max_tokens_action,
        "max_cost_usd": a.max_cost_usd, "escalate_over_usd": a.escalate_over_usd, "id": a.id,
    })


def _price_body(a: Args) -> dict[str, Any]:
    # An id that does not fit the scope is sent anyway: the API refuses it (400 naming the field)
    # rather than the CLI dropping it silently.
    scope = a.scope or ("provider_key" if a.provider_key else "workspace" if a.workspace else "platform")
    return drop_none({
        "provider": a.provider, "model": a.model, "input_per_mtok_nanos": a.input, "output_per_mtok_nanos": a.output,
        "cache_read_per_mtok_nanos": a.cache_read, "scope": scope,
        "workspace_id": default_ws(a) if scope == "workspace" else a.workspace,
        "provider_key_id": a.provider_key, "discount_pct": a.discount_pct, "per_request_usd": a.per_request_usd,
    })


# ---- ledger operations: direct database, NATS and S3 access (not the admin API) -----------------

def _ledger_ops(g: Any) -> None:
    """`ledger rebuild` and `ledger reconcile` (events/rebuild.py, events/reconcile.py). Exit status
    0: equal / consistent, 1: differences or problems found, 2: could not run."""
    text = ("Replay the event stream (or the S3 archive) into a new schema with the projector's own code and "
            "compare it with the live ledger and finance tables, up to the live checkpoints")
    p = g.add_parser("rebuild", help=text, description=text + ". Exit 0 when equal, 1 with differences.")
    p.add_argument("--from", dest="source", choices=["stream", "archive"], default="stream",
                   help="stream: the JetStream stream from its first sequence; archive: the S3 archive (what it "
                        "does not hold yet comes from the stream). Default: stream")
    p.add_argument("--keep", action="store_true", help="keep the rebuild_<timestamp> schema (default: drop it)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(fn=_ledger_rebuild)
    text = ("Check the stream, journal, ledger, finance facts and S3 archive against each other: projection lag, "
            "sequence gaps, debits = credits, every money event's transfers, finance vs ledger totals, archive "
            "coverage")
    p = g.add_parser("reconcile", help=text, description=text + ". Exit 0 when consistent, 1 with problems.")
    p.add_argument("--max-lag", type=int, default=10_000, metavar="N",
                   help="a consumer more than N messages behind the stream is a problem (default 10000)")
    p.add_argument("--no-archive", action="store_true", help="skip the archive check even with S3 configured")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(fn=_ledger_reconcile)


def ops_settings(args: Args) -> Any:
    """Settings for a direct-access command: `ALEPHANT_*` (and `AWS_*`) from the environment, the
    rest from the `<state-dir>/ops.env` that `alephant dev` writes."""
    from schemas.settings import SettingsError, load_settings

    for key, value in read_env_file(Path(args.state_dir) / "ops.env").items():
        os.environ.setdefault(key, value)  # the environment wins; boto reads the AWS_* from here too
    try:
        return load_settings()
    except SettingsError as exc:
        print(f"alephant: {exc}", file=sys.stderr)
        sys.exit(2)


def _ledger_rebuild(args: Args) -> None:
    from events.rebuild import Progress, rebuild, render

    def progress(p: Progress) -> None:
        print(f"alephant: replayed {p.replayed} messages (sequence {p.last_seq} of {p.upto}), {p.rate:.0f}/s",
              file=sys.stderr, flush=True)

    settings = ops_settings(args)
    try:
        report = asyncio.run(rebuild(settings, source=args.source, keep=args.keep,
                                     progress=None if args.json else progress))
    except Exception as exc:  # unreachable NATS, Postgres or S3: say what, exit 2
        print(f"alephant: ledger rebuild failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        sys.exit(2)
    print(json.dumps(report.as_dict(), indent=2) if args.json else render(report))
    sys.exit(0 if report.equal else 1)


def _ledger_reconcile(args: Args) -> None:
    from events.reconcile import reconcile, render

    settings = ops_settings(args)
    try:
        report = asyncio.run(reconcile(settings, max_lag=args.max_lag, archive=False if args.no_archive else None))
    except Exception as exc:  # unreachable NATS, Postgres or S3: say what, exit 2
        print(f"alephant: ledger reconcile failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        sys.exit(2)
    print(json.dumps(report.as_dict(), indent=2) if args.json else render(report))
    sys.exit(0 if report.ok else 1)
