"""`alephant runs timeline <id>` and `alephant sessions show <id>`: a run's or session's events as
a table (time, type, request id, model or vendor, status, cost, latency) and the finance totals,
or with `--json` the admin API's answer (`GET /admin/v1/runs/{id}/timeline`,
`GET /admin/v1/sessions/{id}`)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, TextIO
from urllib.parse import quote, urlencode

from deploy.admin_cli import admin_client, print_table, show_usd
from deploy.stack import AdminError

Args = argparse.Namespace

COLUMNS = [("time", "time"), ("type", "type"), ("request id", "request_id"), ("model / vendor", "what"),
           ("status", "status"), ("cost", "cost_usd"), ("latency", "latency")]
REVENUE_COLUMN = ("revenue", "revenue_usd")


def _what(item: dict[str, Any]) -> str | None:
    """What the event is about: the model, the tool vendor, the payment rail and counterparty, the
    policy rule, the budget."""
    kind = item.get("type")
    if item.get("provider") and item.get("model"):
        return f"{item['provider']}/{item['model']}"
    if kind in ("tool.spend", "tool.call"):
        return "/".join(x for x in (item.get("vendor"), item.get("tool")) if x) or None
    if kind == "policy.decision":
        return item.get("rule") or None
    if kind == "budget.alert":
        return item.get("budget_id")
    if str(kind).startswith("payment."):
        other = item.get("payee") or item.get("endpoint_id") or item.get("payer")
        return " ".join(x for x in (item.get("rail"), other) if x) or None
    return None


def _status(item: dict[str, Any]) -> str | None:
    kind = item.get("type")
    if kind == "llm.call":
        code = item.get("error_code")
        cache = " (cache hit)" if item.get("cache") == "hit" else ""
        return f"{item.get('status')}{' ' + code if code else ''}{cache}"
    if kind == "policy.decision":
        return f"{item.get('decision')}: {item.get('code')}"
    if kind == "cache.hit":
        return f"{item.get('cache')}, saved {show_usd(item.get('saved_usd') or '0')}"
    if kind == "tool.call":
        code = item.get("error_code")
        return f"{item.get('status')}{' ' + code if code else ''}"
    status = item.get("status")
    return None if status is None else str(status)


def table_row(item: dict[str, Any]) -> dict[str, Any]:
    """One item of the API's answer as a table row (`COLUMNS`)."""
    when = str(item.get("occurred_at") or "")
    latency = item.get("latency_ms")
    return {"time": when.replace("T", " ").removesuffix("+00:00")[:23] or None, "type": item.get("type"),
            "request_id": item.get("request_id"), "what": _what(item), "status": _status(item),
            "cost_usd": item.get("cost_usd") or "0", "revenue_usd": item.get("revenue_usd"),
            "latency": None if latency is None else f"{latency:,.0f} ms"}


def totals_line(totals: dict[str, Any]) -> str:
    t = {k: show_usd(v) for k, v in totals.items() if k.endswith("_usd")}
    return (f"total cost {t['cost_usd']} (model {t['llm_cost_usd']}, tool {t['tool_cost_usd']}, payments "
            f"{t['payments_out_usd']}); revenue {t['revenue_usd']}; margin {t['margin_usd']}; cache savings "
            f"{t['cache_savings_usd']}; {totals['requests']} requests, {totals['errors']} errors, "
            f"{totals['input_tokens']} input / {totals['output_tokens']} output tokens")


def print_timeline(result: dict[str, Any], out: TextIO) -> None:
    items = result["items"]
    columns = COLUMNS + ([REVENUE_COLUMN] if any(i.get("revenue_usd") for i in items) else [])
    print_table([table_row(i) for i in items], columns, out)
    print(f"\n{totals_line(result['totals'])} (USD)", file=out)


def timeline_call(kind: str) -> Any:
    """The command: GET the timeline of run/session `args.id`; print the table or the JSON."""
    def run(args: Args) -> None:
        base = "/admin/v1/runs/{}/timeline" if kind == "run" else "/admin/v1/sessions/{}"
        workspace = args.workspace or os.environ.get("ALEPHANT_WORKSPACE")
        params = {k: v for k, v in (("workspace_id", workspace), ("limit", args.limit)) if v is not None}
        path = base.format(quote(args.id, safe="")) + (f"?{urlencode(params)}" if params else "")
        client = admin_client(args)
        try:
            result = client.call("GET", path)
        except AdminError as exc:
            sys.exit(f"alephant: {exc}")
        except OSError as exc:
            sys.exit(f"alephant: cannot reach the admin API: {exc}")
        if args.json:
            print(json.dumps(result, indent=2))
        else:
            print_timeline(result, sys.stdout)
        if result.get("truncated"):
            print(f"alephant: only the first {result['limit']} events are shown; raise --limit (at most 10000)",
                  file=sys.stderr)

    return run


def _leaf(parent: Any, name: str, kind: str, help_text: str, example: str) -> None:
    p: argparse.ArgumentParser = parent.add_parser(name, help=help_text, description=help_text,
                                                   epilog=f"example: {example}")
    p.add_argument("id", help=f"the {kind} id (the `Alephant-{kind.capitalize()}-Id` the client sent)")
    p.add_argument("--workspace", "-w", help="the workspace the id belongs to (default: $ALEPHANT_WORKSPACE, "
                   "else every workspace)")
    p.add_argument("--limit", type=int, help="at most this many events, oldest first (default 1000, at most 10000)")
    p.add_argument("--json", action="store_true",
                   help="print the API's answer (every field of every event, totals as *_usd and *_nanos)")
    p.set_defaults(fn=timeline_call(kind))


def add_run_timeline(runs: Any) -> None:
    """`alephant runs timeline` on the `runs` group."""
    _leaf(runs, "timeline", "run", "Every event of one run in time order (model calls, tool spend, policy decisions, "
          "cache hits, payments) with cost and latency, then the run's totals (they equal `alephant runs get`)",
          "alephant runs timeline run-42 -w demo")


def add_sessions(cmds: Any) -> None:
    """The `alephant sessions` group."""
    g = cmds.group("sessions", "Sessions: the events of every run a client tagged with one Alephant-Session-Id")
    _leaf(g, "show", "session", "Every event of one session in time order with cost and latency, then the "
          "session's totals", "alephant sessions show chat-7 -w demo")
