"""The local stack behind `alephant dev` (and the integration tests and the benchmark).

Order: backing services (embedded or `ALEPHANT_*_URL`) -> `alephant migrate` (Postgres
migrations, JetStream stream, KV bucket) -> control plane -> data-plane worker(s) -> projector
-> demo seed -> `<state_dir>/demo.env`. Every gateway process is a child running the same
`alephant <role>` command an operator would run, so the stack exercises the real entry points.

State lives under `state_dir`: service data, logs, generated secrets (`secrets.env`), the
demo credentials (`demo.env`) and the operator's direct-access settings (`ops.env`: database,
NATS as the admin user, S3, for `alephant ledger rebuild|reconcile`), so a second start reuses
all of it.

The embedded NATS requires credentials: one user per role (`events.jetstream.role_permissions`),
with passwords generated once into `secrets.env`; each child gets only its own role's
(`ALEPHANT_NATS_USER` / `ALEPHANT_NATS_PASSWORD`). An external `ALEPHANT_NATS_URL` is used with
whatever credentials the environment carries.

`supervise()` keeps it all running: a gateway process, or an embedded NATS, Postgres or Redis,
that dies is started again (services on the same port and data, so clients reconnect).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from deploy.services import (
    Service,
    ServiceStartError,
    die_with_parent,
    free_port,
    port_open,
    render_nats_authorization,
    start_services,
    wait_until,
)

if TYPE_CHECKING:
    from events.jetstream import BusRole

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"  # prometheus-client's variable (schemas.prometheus)

DEMO_WORKSPACE = "demo"
DEMO_AGENT = "demo-agent"
DEMO_MODEL = "mock/echo"

# The embedded S3 server (moto) checks no credentials; these keep a developer's real AWS keys away from it.
EMBEDDED_S3_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "alephant-dev", "AWS_SECRET_ACCESS_KEY": "alephant-dev",
                           "AWS_DEFAULT_REGION": "us-east-1"}

# Contract: the variables `.alephant/demo.env` carries.
DEMO_ENV_KEYS = ("ALEPHANT_BASE_URL", "ALEPHANT_API_KEY", "ALEPHANT_ADMIN_URL", "ALEPHANT_ADMIN_TOKEN",
                 "ALEPHANT_DEMO_MODEL")

# The embedded NATS's users (events.jetstream.BUS_ROLES) and the secrets.env variable holding each
# one's password; the deploy/ configs read the same names from their environment. `migrate` runs
# as controlplane; `admin` is for operators (`nats` CLI) and tests, never for a gateway process.
BUS_PASSWORD_VARS: dict[BusRole, str] = {
    "controlplane": "NATS_CONTROLPLANE_PASSWORD", "dataplane": "NATS_DATAPLANE_PASSWORD",
    "projector": "NATS_PROJECTOR_PASSWORD", "admin": "NATS_ADMIN_PASSWORD"}
# The bus role of each `alephant <command>` the stack runs.
_COMMAND_ROLES: dict[str, BusRole] = {"controlplane": "controlplane", "migrate": "controlplane",
                                      "dataplane": "dataplane", "projector": "projector"}


def read_env_file(path: Path) -> dict[str, str]:
    """`KEY=value` lines (comments and blanks ignored); empty dict if the file is absent."""
    if not path.exists():
        return {}
    out: dict[str, str] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            key, _, value = line.partition("=")
            out[key.strip()] = value.strip()
    return out


def write_env_file(path: Path, values: Mapping[str, str], header: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(f"# {header}\n" + "".join(f"{k}={v}\n" for k, v in values.items()))
    tmp.chmod(0o600)
    tmp.replace(path)


class AdminClient:
    """A minimal synchronous client for the admin API (the CLI and the stack seeder use it)."""

    def __init__(self, base_url: str, token: str, timeout: float = 30.0) -> None:
        if not base_url.startswith(("http://", "https://")):
            raise ValueError(f"admin URL must be http(s): {base_url!r}")
        self.base_url = base_url.rstrip("/")
        self._token = token
        self._timeout = timeout

    def __repr__(self) -> str:
        return f"AdminClient({self.base_url!r}, token=***)"

    def request(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        """`(status, decoded JSON)`; HTTP errors are returned, not raised."""
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.base_url + path, data=data, method=method)  # noqa: S310 - http(s) only
        req.add_header("Authorization", f"Bearer {self._token}")
        if data is not None:
            req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=self._timeout) as resp:  # noqa: S310 - our own admin URL
                return resp.status, json.loads(resp.read() or b"null")
        except urllib.error.HTTPError as exc:
            raw = exc.read()
            try:
                return exc.code, json.loads(raw)
            except ValueError:
                return exc.code, {"error": {"message": raw.decode("utf-8", "replace")}}

    def call(self, method: str, path: str, body: Any = None, ok: tuple[int, ...] = (200, 201, 202)) -> Any:
        """The decoded body of a success. 202 is one: the change is committed and the control plane
        keeps relaying it (`propagated: false`) until NATS takes it."""
        status, data = self.request(method, path, body)
        if status not in ok:
            message = data.get("error", {}).get("message") if isinstance(data, dict) else data
            raise AdminError(status, f"{method} {path} -> {status}: {message}")
        return data


class AdminError(RuntimeError):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as resp:  # noqa: S310 - loopback health check
            return bool(resp.status == 200)
    except (urllib.error.URLError, OSError):
        return False


@dataclass
class Stack:
    """The whole gateway on one machine. `start()` is idempotent over a reused `state_dir`."""

    state_dir: Path
    port: int = 8080
    admin_port: int = 8081
    workers: int = 1
    # The projector's /metrics port: ALEPHANT_PROJECTOR_METRICS_PORT, else (0) a free one picked at start.
    projector_metrics_port: int = 0
    env: Mapping[str, str] = field(default_factory=lambda: dict(os.environ))
    extra_env: Mapping[str, str] = field(default_factory=dict)
    log: Callable[[str], None] = print
    services: dict[str, Service] = field(default_factory=dict)
    procs: dict[str, Service] = field(default_factory=dict)
    demo: dict[str, str] = field(default_factory=dict)
    # Embedded NATS nodes: 1 is the single server `services["nats"]`; more is a JetStream
    # cluster, `services["nats-1"]`, ... (deploy.services.start_nats_cluster).
    nats_nodes: int = 1
    # `alephant dev` also seeds demo activity (deploy/demo_history.py): two weeks of synthetic
    # agent history (once per state dir) and a pending escalation for the console's queue.
    demo_activity: bool = False
    # How each child was started (`spawn`): the supervisor restarts it the same way.
    _spawned: dict[str, tuple[tuple[str, ...], dict[str, str]]] = field(default_factory=dict, init=False, repr=False)

    # ---- configuration handed to every child process -------------------------------------
    def _secrets(self) -> dict[str, str]:
        """The master secret, admin token and bus passwords: from the environment, else generated
        once and kept in `secrets.env` (mode 0600)."""
        path = self.state_dir / "secrets.env"
        saved = read_env_file(path)
        values = {
            "ALEPHANT_SECRET_KEY": self.env.get("ALEPHANT_SECRET_KEY") or saved.get("ALEPHANT_SECRET_KEY")
            or secrets.token_urlsafe(32),
            "ALEPHANT_ADMIN_TOKEN": self.env.get("ALEPHANT_ADMIN_TOKEN") or saved.get("ALEPHANT_ADMIN_TOKEN")
            or "adm-" + secrets.token_urlsafe(24),
        }
        for var in BUS_PASSWORD_VARS.values():
            values[var] = self.env.get(var) or saved.get(var) or secrets.token_urlsafe(24)
        if values != {k: saved.get(k) for k in values}:
            write_env_file(path, values, "Generated by `alephant dev`; keep private. Reused on the next start.")
        return values

    @property
    def nats_services(self) -> list[Service]:
        """The NATS server(s): `nats`, or a cluster's `nats-1`, `nats-2`, ..."""
        return [svc for name, svc in self.services.items() if name == "nats" or name.startswith("nats-")]

    @property
    def nats_embedded(self) -> bool:
        return any(svc.argv for svc in self.nats_services)

    @property
    def nats_servers(self) -> str:
        """Every NATS server's URL, comma-separated (what ALEPHANT_NATS_URL carries)."""
        return ",".join(svc.url for svc in self.nats_services)

    def _nats_authorization(self) -> str:
        """The embedded NATS's users and permissions, for this stack's stream, bucket and prefix."""
        from events.jetstream import role_permissions  # not at import: the admin CLI imports this module
        from schemas.settings import load_settings

        names = load_settings({**self.env, **self.extra_env})
        passwords = self._secrets()
        return render_nats_authorization({
            role: (json.dumps(passwords[var]), role_permissions(
                role, stream=names.stream, kv_bucket=names.kv_bucket, subject_prefix=names.subject_prefix))
            for role, var in BUS_PASSWORD_VARS.items()})

    def nats_url(self, role: BusRole = "admin") -> str:
        """The NATS URL with `role`'s credentials in it (embedded NATS; tests, the `nats` CLI);
        for an external server, its URL as given."""
        url = self.nats_servers
        if not self.nats_embedded:
            return url
        password = quote(self._secrets()[BUS_PASSWORD_VARS[role]], safe="")
        return url.replace("nats://", f"nats://{role}:{password}@")  # every server of a cluster

    def child_env(self, role: BusRole | None = None) -> dict[str, str]:
        """The environment of a child process; with the embedded NATS, `role`'s bus credentials
        (none without a role: such a process cannot use the bus)."""
        env = {k: v for k, v in self.env.items()}
        env.update({k: v for k, v in self._secrets().items() if k not in BUS_PASSWORD_VARS.values()})
        if self.nats_embedded:
            env.pop("ALEPHANT_NATS_USER", None)
            env.pop("ALEPHANT_NATS_PASSWORD", None)
            env.pop("ALEPHANT_NATS_CREDS", None)
            if role is not None:
                env["ALEPHANT_NATS_USER"] = role
                env["ALEPHANT_NATS_PASSWORD"] = self._secrets()[BUS_PASSWORD_VARS[role]]
        env.update({
            "ALEPHANT_NATS_URL": self.nats_servers,
            "ALEPHANT_DATABASE_URL": self.services["postgres"].url,
            "ALEPHANT_REDIS_URL": self.services["redis"].url,
            "ALEPHANT_PORT": str(self.port),
            "ALEPHANT_ADMIN_PORT": str(self.admin_port),
            "ALEPHANT_STATE_DIR": str(self.state_dir),
            # The local stack talks to providers on this machine (Ollama, fakes); production leaves it empty.
            "ALEPHANT_SSRF_ALLOW": self.env.get("ALEPHANT_SSRF_ALLOW", "127.0.0.1,::1,localhost"),
            "PYTHONUNBUFFERED": "1",
        })
        env.update(self._s3_env())
        env.update(self.extra_env)
        if self.projector_metrics_port:
            env["ALEPHANT_PROJECTOR_METRICS_PORT"] = str(self.projector_metrics_port)
        # Data-plane workers share one port, so their metrics share a directory (multiprocess mode);
        # every other process keeps its own.
        env.pop(MULTIPROC_ENV, None)
        if role == "dataplane":
            env[MULTIPROC_ENV] = str(self.metrics_dir)
        return env

    @property
    def metrics_dir(self) -> Path:
        """Where the data-plane workers' metrics live (`PROMETHEUS_MULTIPROC_DIR`), wiped at each start."""
        return self.state_dir / "metrics"

    @property
    def projector_metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.projector_metrics_port}/metrics"

    def _s3_env(self) -> dict[str, str]:
        """`ALEPHANT_S3_URL`, and for the embedded server its placeholder AWS credentials."""
        s3 = self.services.get("s3")
        if s3 is None:
            return {}
        return {"ALEPHANT_S3_URL": s3.url, **(EMBEDDED_S3_CREDENTIALS if s3.argv else {})}

    def write_ops_env(self) -> Path:
        """`<state_dir>/ops.env` (mode 0600): what a direct-access operator command needs against this
        stack: the database, NATS as the `admin` user (embedded NATS), the stream names and S3."""
        names = {k: v for k, v in self.child_env().items()
                 if k in ("ALEPHANT_STREAM", "ALEPHANT_SUBJECT_PREFIX", "ALEPHANT_KV_BUCKET", "ALEPHANT_S3_BUCKET")}
        values = {"ALEPHANT_DATABASE_URL": self.services["postgres"].url,
                  "ALEPHANT_NATS_URL": self.nats_servers, **names, **self._s3_env()}
        if self.nats_embedded:
            values.update(ALEPHANT_NATS_USER="admin",
                          ALEPHANT_NATS_PASSWORD=self._secrets()[BUS_PASSWORD_VARS["admin"]])
        path = self.state_dir / "ops.env"
        write_env_file(path, values, "Written by `alephant dev`: direct access for operator commands; keep private.")
        return path

    @property
    def origin(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    def admin(self) -> AdminClient:
        return AdminClient(self.admin_url, self._secrets()["ALEPHANT_ADMIN_TOKEN"])

    # ---- processes -----------------------------------------------------------------------
    def _pick_ports(self) -> None:
        for attr in ("port", "admin_port"):
            wanted = getattr(self, attr)
            if wanted == 0 or port_open(wanted):
                chosen = free_port()
                if wanted:
                    self.log(f"  port {wanted} is busy; using {chosen} instead")
                setattr(self, attr, chosen)
        wanted = self.projector_metrics_port or int(
            {**self.env, **self.extra_env}.get("ALEPHANT_PROJECTOR_METRICS_PORT") or 0)
        self.projector_metrics_port = wanted if wanted and not port_open(wanted) else free_port()

    def spawn(self, name: str, *args: str, env: Mapping[str, str] | None = None) -> Service:
        """Start `alephant <args>` as a child named `name`, logging to `<state_dir>/logs/<name>.log`;
        `env` is added to its environment (its own port, say). Remembered for the supervisor."""
        log = self.state_dir / "logs" / f"{name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        self._spawned[name] = (args, dict(env or {}))
        with log.open("ab") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "deploy.cli", *args], stdout=out, stderr=subprocess.STDOUT,
                env={**self.child_env(_COMMAND_ROLES.get(args[0])), **(env or {})}, start_new_session=True,
                preexec_fn=die_with_parent,
            )
        svc = Service(name, "", proc, log, stop_signal=signal.SIGTERM)
        self.procs[name] = svc
        return svc

    def _wait_http(self, svc: Service, url: str, timeout: float) -> None:
        def ready() -> bool:
            if svc.proc is not None and svc.proc.poll() is not None:
                raise ServiceStartError(f"{svc.name} exited with {svc.proc.returncode} (log: {svc.log})")
            return _http_ok(url)

        wait_until(ready, timeout, svc.name, svc.log)

    def start_controlplane(self) -> None:
        svc = self.spawn("controlplane", "controlplane")
        self._wait_http(svc, f"{self.admin_url}/admin/v1/healthz", 60)

    def start_worker(self, index: int) -> None:
        svc = self.spawn(f"dataplane-{index}", "dataplane")
        self._wait_http(svc, f"{self.origin}/readyz", 60)

    def start_projector(self) -> None:
        self.spawn("projector", "projector")

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Send `sig` to a child (fault tests). The entry stays, so `procs[name].proc` shows the exit."""
        svc = self.procs[name]
        if svc.proc is not None and svc.proc.poll() is None:
            svc.proc.send_signal(sig)
            svc.proc.wait(10)

    # ---- lifecycle -----------------------------------------------------------------------
    def start(self, *, seed: bool = True) -> None:
        """Bring everything up; on any failure, stop what was started and re-raise."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        try:
            self.log("==> backing services")
            self.services = start_services(self.state_dir, self.env, self.log,
                                           nats_authorization=self._nats_authorization(), nats_nodes=self.nats_nodes)
            self._pick_ports()
            self.write_ops_env()
            self.log("==> migrations, event stream and config bucket")
            subprocess.run([sys.executable, "-m", "deploy.cli", "migrate"], env=self.child_env("controlplane"),
                           check=True, stdout=subprocess.DEVNULL)
            self.log("==> control plane")
            self.start_controlplane()
            self.log(f"==> data plane ({self.workers} worker{'s' if self.workers != 1 else ''})")
            # Counters from an earlier run must not be summed into this one's.
            shutil.rmtree(self.metrics_dir, ignore_errors=True)
            self.metrics_dir.mkdir(parents=True)
            for i in range(self.workers):
                self.start_worker(i)
            self.log("==> projector")
            self.start_projector()
            if seed:
                self.log("==> demo workspace")
                self.demo = self.seed_demo()
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Stop gateway processes first (so they flush events), then the backing services."""
        for svc in reversed(list(self.procs.values())):
            svc.stop(timeout=15)
        for svc in reversed(list(self.services.values())):
            svc.stop()

    def supervise(self, poll_s: float = 1.0) -> None:
        """Block until interrupted, running `supervise_once` every `poll_s` seconds."""
        while True:
            time.sleep(poll_s)
            self.supervise_once()

    def supervise_once(self) -> list[str]:
        """Restart whatever died, with a notice line each; return the names restarted.

        Backing services first (NATS, Postgres, Redis we started; never external ones), on the
        same port and data dir, so clients reconnect and a restarted NATS keeps its JetStream
        store; then gateway processes. A service that will not come back is reported and tried
        again on the next pass.
        """
        restarted: list[str] = []
        for name, svc in self.services.items():
            if not svc.exited():
                continue
            code = svc.proc.returncode if svc.proc is not None else None
            self.log(f"!! {name} exited with {code}; restarting on {svc.url.rsplit('@', 1)[-1]} (log: {svc.log})")
            try:
                svc.restart()
            except ServiceStartError as exc:
                self.log(f"!! {name} did not come back: {exc}")
                continue
            restarted.append(name)
        for name, svc in list(self.procs.items()):
            if svc.exited():
                code = svc.proc.returncode if svc.proc is not None else None
                self.log(f"!! {name} exited with {code}; restarting (log: {svc.log})")
                args, env = self._spawned.get(name, (("dataplane",) if name.startswith("dataplane") else (name,), {}))
                self.spawn(name, *args, env=env)
                restarted.append(name)
        return restarted

    # ---- demo seed -----------------------------------------------------------------------
    def demo_urls(self) -> dict[str, str]:
        """More demo.env addresses (a cluster's every worker, control plane and projector)."""
        return {}

    def seed_demo(self) -> dict[str, str]:
        """Create the demo workspace, agent, providers and key (idempotent) and write demo.env."""
        admin = self.admin()
        admin.call("POST", "/admin/v1/workspaces", {"id": DEMO_WORKSPACE, "name": "Demo workspace"},
                   ok=(201, 202, 409))
        admin.call("POST", "/admin/v1/agents", {"workspace_id": DEMO_WORKSPACE, "id": DEMO_AGENT, "name": "Demo agent"},
                   ok=(201, 202, 409))
        admin.call("POST", "/admin/v1/providers", {"workspace_id": DEMO_WORKSPACE, "name": "mock", "type": "mock",
                                                   "options": {"enabled": "true"}})
        if self.env.get("OPENAI_API_KEY"):
            body = {"workspace_id": DEMO_WORKSPACE, "name": "openai", "type": "openai",
                    "api_key": self.env["OPENAI_API_KEY"]}
            if self.env.get("OPENAI_BASE_URL"):
                body["base_url"] = self.env["OPENAI_BASE_URL"]
            admin.call("POST", "/admin/v1/providers", body)
            self.log("  provider  openai (OPENAI_API_KEY)")
        demo_path = self.state_dir / "demo.env"
        previous = read_env_file(demo_path)
        key, key_id = previous.get("ALEPHANT_API_KEY"), previous.get("ALEPHANT_DEMO_KEY_ID")
        live = {k["id"] for k in admin.call("GET", f"/admin/v1/virtual-keys?workspace_id={DEMO_WORKSPACE}")["data"]}
        if not key or key_id not in live:
            created = admin.call("POST", "/admin/v1/virtual-keys", {"workspace_id": DEMO_WORKSPACE, "name": "demo"})
            key, key_id = created["key"], created["id"]
        values = {
            "ALEPHANT_BASE_URL": f"{self.origin}/v1",
            "ALEPHANT_API_KEY": key,
            "ALEPHANT_ADMIN_URL": self.admin_url,
            "ALEPHANT_ADMIN_TOKEN": self._secrets()["ALEPHANT_ADMIN_TOKEN"],
            "ALEPHANT_DEMO_MODEL": DEMO_MODEL,
            "ALEPHANT_DEMO_KEY_ID": key_id or "",
            "ALEPHANT_DEMO_WORKSPACE": DEMO_WORKSPACE,
            # Prometheus targets: the gateway and the admin API serve /metrics on their own ports.
            "ALEPHANT_PROJECTOR_METRICS_URL": self.projector_metrics_url,
            **self.demo_urls(),
        }
        if self.demo_activity:
            values |= self.seed_demo_activity(admin, previous)
        write_env_file(demo_path, values, "Written by `alephant dev`: the demo gateway's URLs and credentials.")
        return values

    def seed_demo_activity(self, admin: AdminClient, previous: Mapping[str, str]) -> dict[str, str]:
        """Two weeks of demo history (published once per state dir) and the review agent's
        pending escalation; returns the demo.env additions (its key and the escalation id)."""
        import asyncio
        import datetime as dt

        from deploy import demo_history

        marker = self.state_dir / "demo-history.done"
        if not marker.exists():
            events = demo_history.history(DEMO_WORKSPACE, dt.datetime.now(dt.UTC))
            self.log(f"  history   {len(events)} events of demo agent runs over 14 days")
            from schemas.settings import load_settings

            names = load_settings({**self.env, **self.extra_env})
            asyncio.run(demo_history.publish(self.nats_url("admin"), names.stream, names.subject_prefix, events))
            marker.write_text("published\n")
        live = {k["id"] for k in admin.call("GET", f"/admin/v1/virtual-keys?workspace_id={DEMO_WORKSPACE}")["data"]}
        key, key_id, escalation = demo_history.seed_escalation(
            admin, DEMO_WORKSPACE, f"{self.origin}/v1", previous.get("ALEPHANT_REVIEW_KEY"), live,
            previous.get("ALEPHANT_REVIEW_KEY_ID"))
        if escalation:
            self.log(f"  escalation {escalation} (review-agent) waits in the console's queue")
        return {"ALEPHANT_REVIEW_KEY": key, "ALEPHANT_REVIEW_KEY_ID": key_id,
                "ALEPHANT_DEMO_ESCALATION_ID": escalation or ""}
