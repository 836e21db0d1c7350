"""The multi-node local stack behind `alephant dev --cluster` (`make cluster`), the cluster test and
the fault suite: the production shape on one machine, on loopback, from the same pip wheels and
the same `alephant <role>` commands as the single-node stack (`deploy.stack.Stack`).

* NATS: a 3-node JetStream cluster, `services["nats-1"]` ... `["nats-3"]` (own client, route and
  monitoring ports, own store, `sync_interval: always`, the role users of the single node); the
  event stream and the config bucket at R3 (`ALEPHANT_STREAM_REPLICAS=3`). Every client gets all
  three URLs.
* 2 control planes, `procs["controlplane-0"]` and `["controlplane-1"]` on `admin_ports`; one
  relays the config outbox at a time (a Postgres advisory lock, controlplane/relay.py), the other
  takes over within seconds; both answer admin commands.
* 4 data-plane workers, `procs["dataplane-<i>"]` on `ports[i]` (separate ports, no SO_REUSEPORT
  sharing), each with its own spool slot under `<state_dir>/spool` and its own metrics.
* 2 projectors on `projector_ports`: `projector-0` runs every projection, the S3 archiver and log
  delivery; `projector-1` the ledger and finance projections only. The two share those durable
  pull consumers (JetStream hands each batch to one of them; a batch locks its projection's
  checkpoint row and dedups by event id, so either may fold any batch). The archiver and log
  delivery run once: an archive object must hold a gapless run of sequences, which two
  archivers splitting one consumer would break, and delivery keeps one process per destination
  consumer so its concurrency bound and backoff hold.
* Postgres, Redis and S3 as in the single-node stack.

`ALEPHANT_*_URL` replace the embedded services as for the single node; ALEPHANT_NATS_URL may list
several servers (comma-separated), and the stream and bucket are still made R3 unless
ALEPHANT_STREAM_REPLICAS says otherwise. `demo.env` adds `ALEPHANT_BASE_URLS`,
`ALEPHANT_ADMIN_URLS` and `ALEPHANT_PROJECTOR_METRICS_URLS` (comma-separated, in process order;
`ALEPHANT_BASE_URL` and `ALEPHANT_ADMIN_URL` are the first of each).
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from deploy.services import Service, free_port, port_open
from deploy.stack import MULTIPROC_ENV, AdminClient, Stack

if TYPE_CHECKING:
    from events.jetstream import BusRole

# `projector-0` runs everything; the others only what two instances can share.
SHARED_PROJECTIONS = ("ledger", "finance")


def _health(url: str) -> dict[str, object] | None:
    """The JSON of a 200 answer from `url`, else None."""
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:  # noqa: S310 - loopback probe
            body = json.loads(resp.read())
            return body if resp.status == 200 and isinstance(body, dict) else None
    except (urllib.error.URLError, OSError, ValueError):
        return None


@dataclass
class ClusterStack(Stack):
    """The multi-node stack (see the module docstring). `port`, `admin_port` and
    `projector_metrics_port` are the first worker's, control plane's and projector's; the others
    follow on the next ports (0: free ports)."""

    workers: int = 4
    controlplanes: int = 2
    projectors: int = 2
    nats_nodes: int = 3
    ports: list[int] = field(default_factory=list)
    admin_ports: list[int] = field(default_factory=list)
    projector_ports: list[int] = field(default_factory=list)

    # ---- addresses -------------------------------------------------------------------------
    @property
    def worker_origins(self) -> list[str]:
        return [f"http://127.0.0.1:{p}" for p in self.ports]

    @property
    def admin_urls(self) -> list[str]:
        return [f"http://127.0.0.1:{p}" for p in self.admin_ports]

    @property
    def projector_urls(self) -> list[str]:
        """Each projector's health and metrics server (`/healthz`, `/readyz`, `/metrics`)."""
        return [f"http://127.0.0.1:{p}" for p in self.projector_ports]

    @property
    def nats_monitor_urls(self) -> dict[str, str]:
        """Each embedded NATS node's monitoring endpoint (`/varz`, `/jsz`, `/routez`, `/healthz`)."""
        return {svc.name: svc.extra["monitor"] for svc in self.nats_services if "monitor" in svc.extra}

    def admin_at(self, index: int) -> AdminClient:
        """An admin client of control plane `index`."""
        return AdminClient(self.admin_urls[index], self._secrets()["ALEPHANT_ADMIN_TOKEN"])

    def relay_leader(self) -> str | None:
        """The name of the control plane that says it leads the relay (`leader: true` on its
        /admin/v1/healthz), or None (none does, or none answers)."""
        for index, url in enumerate(self.admin_urls):
            name = f"controlplane-{index}"
            svc = self.procs.get(name)
            if svc is None or svc.exited():
                continue
            health = _health(f"{url}/admin/v1/healthz")
            if health is not None and health.get("leader") is True:
                return name
        return None

    def demo_urls(self) -> dict[str, str]:
        return {"ALEPHANT_BASE_URLS": ",".join(f"{o}/v1" for o in self.worker_origins),
                "ALEPHANT_ADMIN_URLS": ",".join(self.admin_urls),
                "ALEPHANT_PROJECTOR_METRICS_URLS": ",".join(f"{u}/metrics" for u in self.projector_urls)}

    # ---- configuration ---------------------------------------------------------------------
    def child_env(self, role: BusRole | None = None) -> dict[str, str]:
        env = super().child_env(role)
        # Workers on separate ports answer their own /metrics: no shared multiprocess directory.
        env.pop(MULTIPROC_ENV, None)
        # R3 (a majority of three nodes stores each acked write), unless the environment says otherwise.
        env.setdefault("ALEPHANT_STREAM_REPLICAS", str(min(3, self.nats_nodes)) if self.nats_embedded else "3")
        if self.nats_embedded:  # where strict mode (ALEPHANT_STRICT=1) reads each node's /varz
            env.setdefault("ALEPHANT_NATS_MONITOR_URLS", ",".join(self.nats_monitor_urls.values()))
        return env

    def _pick_ports(self) -> None:
        taken: set[int] = set()
        base_projector = self.projector_metrics_port or int(
            {**self.env, **self.extra_env}.get("ALEPHANT_PROJECTOR_METRICS_PORT") or 0)
        self.ports = self._consecutive(self.port, self.workers, taken)
        self.admin_ports = self._consecutive(self.admin_port, self.controlplanes, taken)
        self.projector_ports = self._consecutive(base_projector, self.projectors, taken)
        self.port, self.admin_port, self.projector_metrics_port = (
            self.ports[0], self.admin_ports[0], self.projector_ports[0])

    def _consecutive(self, base: int, count: int, taken: set[int]) -> list[int]:
        """`base`, `base+1`, ... (0: free ports); a busy one is replaced by a free one."""
        chosen: list[int] = []
        for i in range(count):
            wanted = base + i if base else 0
            port = wanted
            while port == 0 or port in taken or port_open(port):
                port = free_port()
            if wanted and port != wanted:
                self.log(f"  port {wanted} is busy; using {port} instead")
            taken.add(port)
            chosen.append(port)
        return chosen

    # ---- processes -------------------------------------------------------------------------
    def start_controlplane(self) -> None:
        """Both control planes, one after the other (each runs the migrations at start): the
        first takes the relay lock."""
        for index in range(self.controlplanes):
            self.start_controlplane_at(index)

    def start_controlplane_at(self, index: int) -> Service:
        svc = self.spawn(f"controlplane-{index}", "controlplane",
                         env={"ALEPHANT_ADMIN_PORT": str(self.admin_ports[index])})
        self._wait_http(svc, f"{self.admin_urls[index]}/admin/v1/healthz", 60)
        return svc

    def start_worker(self, index: int) -> None:
        svc = self.spawn(f"dataplane-{index}", "dataplane", env={"ALEPHANT_PORT": str(self.ports[index])})
        self._wait_http(svc, f"{self.worker_origins[index]}/readyz", 60)

    def start_projector(self) -> None:
        for index in range(self.projectors):
            self.start_projector_at(index)

    def start_projector_at(self, index: int) -> Service:
        only = [] if index == 0 else [arg for name in SHARED_PROJECTIONS for arg in ("--only", name)]
        svc = self.spawn(f"projector-{index}", "projector", *only,
                         env={"ALEPHANT_PROJECTOR_METRICS_PORT": str(self.projector_ports[index])})
        self._wait_http(svc, f"{self.projector_urls[index]}/readyz", 60)
        return svc
