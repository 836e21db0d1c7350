"""`alephant`: the one command line for every process and for administration.

    alephant dev            the whole stack on this machine (what `make run` starts; `--cluster`:
                            the multi-node one, `make cluster`)
    alephant dataplane      a data-plane worker (stateless; run N behind a load balancer)
    alephant controlplane   the admin API and the config-snapshot publisher
    alephant projector      folds the event stream into the Postgres ledgers
    alephant migrate        Postgres migrations + JetStream stream + config bucket (idempotent)
    alephant workspaces|departments|members|agents|providers|keys|aliases|prices|budgets|limits|
             policies|escalations|decisions|mcp-servers|models|runs|ledger ...   admin commands
    alephant fleet          the data-plane workers and the config revision each has applied

Admin commands (deploy/admin_cli.py) talk to the admin API at ALEPHANT_ADMIN_URL with
ALEPHANT_ADMIN_TOKEN; when those are unset they read `.alephant/demo.env`, so they work against
`make run` out of the box. Changes print their snapshot revision; `--wait` waits for the fleet.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from deploy.admin_cli import add_admin_commands
from deploy.strict import StrictRole
from schemas.settings import Settings, SettingsError, load_settings


def _settings() -> Settings:
    try:
        return load_settings()
    except SettingsError as exc:
        sys.exit(f"alephant: {exc}")


def _enforce_strict(settings: Settings, role: StrictRole, loop: asyncio.AbstractEventLoop) -> None:
    """Under ALEPHANT_STRICT=1, exit non-zero naming each setting to fix when the deployment can
    lose acknowledged events (deploy/strict.py); nothing otherwise."""
    from deploy.strict import refusal

    message = loop.run_until_complete(refusal(settings, role))
    if message:
        sys.exit(message)


def _uvloop_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency off Windows
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


# ---- process roles -----------------------------------------------------------------------------

def cmd_dataplane(args: argparse.Namespace) -> None:
    from dataplane.app import build_app
    from dataplane.http_server import run_app
    from deploy.logs import configure_logging

    settings = _settings()
    configure_logging(settings.log_level, service="dataplane")
    loop = _uvloop_loop()
    _enforce_strict(settings, "dataplane", loop)
    # reuse_port lets several workers share one port; the kernel balances connections.
    # run_app: aiohttp's own parser errors are answered in the API's JSON error shape too.
    run_app(build_app(settings), host=args.host or settings.host, port=args.port or settings.port,
            reuse_port=True, loop=loop, shutdown_timeout=10, keepalive_timeout=settings.keepalive_timeout_s,
            max_connections=settings.max_connections)


def cmd_controlplane(args: argparse.Namespace) -> None:
    from controlplane.app import build_admin_app
    from dataplane.http_server import run_app
    from deploy.logs import configure_logging
    from events.db import migrate

    settings = _settings()
    configure_logging(settings.log_level, service="controlplane")
    loop = _uvloop_loop()
    loop.run_until_complete(migrate(settings.database_url))
    _enforce_strict(settings, "controlplane", loop)
    try:
        app = build_admin_app(settings)
    except ValueError as exc:
        sys.exit(f"alephant controlplane: {exc}")
    run_app(app, host=args.host or settings.admin_host, port=args.port or settings.admin_port, loop=loop)


async def _run_projector(settings: Settings, only: list[str] | None = None) -> None:
    from events.jetstream import bus_auth, connect, ensure_stream
    from events.projector import PROJECTIONS, Projector
    from events.projector_metrics import serving_metrics

    nc = await connect(settings.nats_url, "alephant-projector", bus_auth(settings, "projector"))
    try:
        js = nc.jetstream()
        await ensure_stream(js, settings.stream, settings.subject_prefix, settings.stream_replicas)
        projectors = [Projector(js, settings.database_url, stream=settings.stream,
                                subject_prefix=settings.subject_prefix, batch=settings.projector_batch,
                                ack_wait_s=settings.projector_ack_wait_s, projection=projection)
                      for projection in PROJECTIONS if not only or projection.name in only]
        runs = [p.run() for p in projectors]
        if settings.s3_url and (not only or "archive" in only):  # the raw stream to S3 (events/archive.py)
            from events.archive import run_archiver

            runs.append(run_archiver(js, settings))
        if not only or "delivery" in only:  # log destinations (events/delivery.py)
            from events.delivery import run_delivery

            runs.append(run_delivery(js, settings))
        async with serving_metrics(js, settings.stream, projectors, settings.host, settings.projector_metrics_port):
            task = asyncio.ensure_future(asyncio.gather(*runs))
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, task.cancel)
            with contextlib.suppress(asyncio.CancelledError):
                await task
    finally:
        await nc.close()


def cmd_projector(args: argparse.Namespace) -> None:
    from deploy.logs import configure_logging

    settings = _settings()
    configure_logging(settings.log_level, service="projector")
    loop = _uvloop_loop()
    _enforce_strict(settings, "projector", loop)
    loop.run_until_complete(_run_projector(settings, args.only))


async def _migrate(settings: Settings) -> list[str]:
    from events.db import migrate
    from events.jetstream import bus_auth, connect, ensure_kv, ensure_stream

    applied = await migrate(settings.database_url)
    nc = await connect(settings.nats_url, "alephant-migrate", bus_auth(settings, "controlplane"))
    try:
        js = nc.jetstream()
        await ensure_stream(js, settings.stream, settings.subject_prefix, settings.stream_replicas)
        await ensure_kv(js, settings.kv_bucket, settings.stream_replicas)
    finally:
        await nc.close()
    return applied


def cmd_migrate(args: argparse.Namespace) -> None:
    settings = _settings()
    applied = asyncio.run(_migrate(settings))
    print(f"migrations applied: {', '.join(applied) if applied else 'none pending'}")
    print(f"stream {settings.stream} and bucket {settings.kv_bucket} are in place")


def cmd_dev(args: argparse.Namespace) -> None:
    from deploy.cluster import ClusterStack
    from deploy.stack import Stack

    if args.dev_state_dir:
        args.state_dir = args.dev_state_dir
    stack: Stack
    if args.cluster:
        stack = ClusterStack(state_dir=Path(args.state_dir), port=args.port,
                             admin_port=8090 if args.admin_port is None else args.admin_port,
                             workers=args.workers or 4, demo_activity=not args.no_demo_activity)
    else:
        stack = Stack(state_dir=Path(args.state_dir), port=args.port,
                      admin_port=8081 if args.admin_port is None else args.admin_port, workers=args.workers or 1,
                      demo_activity=not args.no_demo_activity)
    shape = "multi-node stack" if args.cluster else "local stack"
    print(f"Alephant Gateway: starting the {shape} (state in {args.state_dir}/)", flush=True)

    def interrupted(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupted)
    # A shell may start background jobs with SIGINT ignored; Ctrl-C/kill -INT must still stop us.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        stack.start()
        _print_banner(stack)
        stack.supervise()
    except KeyboardInterrupt:
        print("\n==> stopping", flush=True)
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not abandon the children
        stack.stop()
        print("stopped.", flush=True)


def _print_banner(stack: Any) -> None:
    d = stack.demo
    env_path = Path(stack.state_dir) / "demo.env"
    cluster = ""
    if "ALEPHANT_BASE_URLS" in d:
        nats = ", ".join(svc.url for svc in stack.nats_services)
        cluster = f"""
  workers    {d['ALEPHANT_BASE_URLS'].replace(',', ', ')}
  admin      {d['ALEPHANT_ADMIN_URLS'].replace(',', ', ')}  (one relays config: leader on /admin/v1/healthz)
  projectors {d['ALEPHANT_PROJECTOR_METRICS_URLS'].replace('/metrics', '').replace(',', ', ')}  (/healthz)
  nats       {nats}"""
    print(f"""
Alephant Gateway is running.
  gateway    {d['ALEPHANT_BASE_URL']}
  admin API  {d['ALEPHANT_ADMIN_URL']}/admin/v1  (OpenAPI: /admin/v1/openapi.json){cluster}
  console    {d['ALEPHANT_ADMIN_URL']}/console  (sign in with ALEPHANT_ADMIN_TOKEN from {env_path})
  demo key   {d['ALEPHANT_API_KEY'][:12]}...   (full key and admin token in {env_path})
  logs       {stack.state_dir}/logs/

Try it:
  set -a; . {env_path}; set +a
  curl -s $ALEPHANT_BASE_URL/chat/completions -H "Authorization: Bearer $ALEPHANT_API_KEY" \\
    -H 'Content-Type: application/json' -H 'Alephant-Agent-Id: demo-agent' -H 'Alephant-Run-Id: run-1' \\
    -d '{{"model":"'$ALEPHANT_DEMO_MODEL'","messages":[{{"role":"user","content":"hello gateway"}}]}}'
  .venv/bin/alephant runs get run-1
{_escalation_hint(d)}
Ctrl-C stops everything.""", flush=True)


def _escalation_hint(d: dict[str, str]) -> str:
    """How to see the demo escalation through: approve it in the console, then retry."""
    esc = d.get("ALEPHANT_DEMO_ESCALATION_ID")
    if not esc:
        return ""
    import json

    from deploy.demo_history import REVIEW_AGENT, escalation_request

    body = json.dumps(escalation_request())
    return f"""
The review agent's request {esc} waits for approval: approve it in the console (Policy &
escalations), then the agent's retry goes through:
  curl -s $ALEPHANT_BASE_URL/chat/completions -H "Authorization: Bearer $ALEPHANT_REVIEW_KEY" \\
    -H 'Content-Type: application/json' -H 'Alephant-Agent-Id: {REVIEW_AGENT}' -H 'Alephant-Escalation-Id: {esc}' \\
    -d '{body}'
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="alephant", description="Alephant Gateway: an agentic finance gateway for LLM calls.",
        epilog="Configuration comes from ALEPHANT_* environment variables; see the README.",
    )
    parser.add_argument("--state-dir", default=os.environ.get("ALEPHANT_STATE_DIR", ".alephant"),
                        help="local state directory (default: .alephant)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("dev", help="run the whole stack locally with a demo workspace and key",
                       description="Start NATS, Postgres and Redis (embedded unless ALEPHANT_*_URL is set), the "
                                   "control plane, data-plane workers and the projector; seed a demo workspace; "
                                   "write <state-dir>/demo.env. Ctrl-C stops everything.")
    p.add_argument("--port", type=int, default=8080, help="gateway port (default 8080; 0 = any free port)")
    p.add_argument("--admin-port", type=int, default=None,
                   help="admin API port (default 8081, with --cluster 8090 and the next; 0 = any free port)")
    p.add_argument("--workers", type=int, default=None,
                   help="data-plane worker processes (default 1, sharing the port; with --cluster 4, on --port "
                        "and the next ports)")
    p.add_argument("--cluster", action="store_true",
                   help="the multi-node stack: a 3-node NATS cluster (R3), 2 control planes (one relays), "
                        "4 workers on their own ports, 2 projectors (see deploy/cluster.py)")
    p.add_argument("--state-dir", dest="dev_state_dir", metavar="DIR",
                   help="local state directory (same as the global --state-dir)")
    p.add_argument("--no-demo-activity", action="store_true",
                   help="do not seed demo activity (two weeks of synthetic agent runs, once per state dir, and a "
                        "pending escalation of the review agent) for the console")
    p.set_defaults(fn=cmd_dev)

    for name, fn, help_text in (
        ("dataplane", cmd_dataplane, "run one data-plane worker (ALEPHANT_HOST/ALEPHANT_PORT)"),
        ("controlplane", cmd_controlplane, "run the admin API (ALEPHANT_ADMIN_HOST/ALEPHANT_ADMIN_PORT)"),
    ):
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--host")
        p.add_argument("--port", type=int)
        p.set_defaults(fn=fn)
    proj = sub.add_parser(
        "projector", help="fold the event stream into the Postgres ledgers (and archive it to S3)",
        description="Runs every projection (ledger, finance), each on its own durable JetStream consumer, and the "
        "S3 archiver when ALEPHANT_S3_URL is set, and log delivery to the configured log destinations (webhook, "
        "OTLP, S3; one durable consumer each). Safe to restart or to run twice. To use more cores, run one "
        "process per projection: `alephant projector --only ledger` and `alephant projector --only finance "
        "--only archive`.")
    proj.add_argument("--only", action="append", choices=["ledger", "finance", "archive", "delivery"],
                      help="run only this projection, the archiver or log delivery (repeatable; default: all)")
    proj.set_defaults(fn=cmd_projector)
    sub.add_parser("migrate", help="apply Postgres migrations and create the stream and config bucket",
                   description="Idempotent; safe to run on every deploy.").set_defaults(fn=cmd_migrate)
    add_admin_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    args.fn(args)


if __name__ == "__main__":
    main()
