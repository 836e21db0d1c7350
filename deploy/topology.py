"""The production shape, declared once: which processes run, how many of each, with which command,
settings and probes. The local multi-node stack (`alephant dev --cluster`), `deploy/compose` and
`deploy/k8s` describe this same table; `tests/unit/test_deploy_agreement.py` holds the manifests
to it, so a change starts here.

Pure data: nothing here starts anything.
"""

from __future__ import annotations

import msgspec

# Settings every gateway process gets (the k8s ConfigMap `alephant-config`, compose's
# `x-alephant-env`): where the bus is, strict durability mode, listeners, local state.
COMMON_ENV: frozenset[str] = frozenset({
    "ALEPHANT_NATS_URL", "ALEPHANT_NATS_MONITOR_URLS", "ALEPHANT_STREAM_REPLICAS", "ALEPHANT_STRICT",
    "ALEPHANT_HOST", "ALEPHANT_PORT", "ALEPHANT_ADMIN_HOST", "ALEPHANT_ADMIN_PORT",
    "ALEPHANT_PROJECTOR_METRICS_PORT", "ALEPHANT_STATE_DIR", "ALEPHANT_LOG_LEVEL",
})
# The values strict production needs (deploy/strict.py): R3 stream and bucket, strict on.
DURABILITY_ENV: dict[str, str] = {"ALEPHANT_STRICT": "1", "ALEPHANT_STREAM_REPLICAS": "3"}

DATAPLANE_PORT = 8080
ADMIN_PORT = 8081
# The projector's /metrics, /healthz and /readyz (ALEPHANT_PROJECTOR_METRICS_PORT; 0, any free
# port, is for the local stack only).
PROJECTOR_PORT = 8082
NATS_MONITOR_PORT = 8222
# The projections a second projector shares with the first (deploy/cluster.py SHARED_PROJECTIONS).
SHARED_PROJECTIONS = ("ledger", "finance")


class Process(msgspec.Struct, frozen=True, kw_only=True):
    """One gateway process kind. `replicas` 0 marks a one-shot (the migrate job)."""

    name: str
    command: tuple[str, ...]  # the arguments after `alephant`
    replicas: int
    # The NATS user it logs in as (events.jetstream.BusRole).
    bus_role: str
    # Variables (settings and secrets) it gets beyond COMMON_ENV; a secret goes only where it is used.
    env: frozenset[str]
    port: int | None = None
    liveness: str | None = None  # GET path on `port`: 200 while the process serves
    readiness: str | None = None  # GET path on `port`: 200 when it should get traffic


_NATS_LOGIN = frozenset({"ALEPHANT_NATS_USER", "ALEPHANT_NATS_PASSWORD"})

PROCESSES: tuple[Process, ...] = (
    Process(name="migrate", command=("migrate",), replicas=0, bus_role="controlplane",
            env=_NATS_LOGIN | {"ALEPHANT_DATABASE_URL"}),
    # Two: the outbox relay is led through a Postgres advisory lock, one relays, the other takes over.
    Process(name="controlplane", command=("controlplane",), replicas=2, bus_role="controlplane",
            env=_NATS_LOGIN | {"ALEPHANT_DATABASE_URL", "ALEPHANT_REDIS_URL", "ALEPHANT_SECRET_KEY",
                               "ALEPHANT_ADMIN_TOKEN"},
            port=ADMIN_PORT, liveness="/healthz", readiness="/readyz"),
    # Two projectors (deploy/cluster.py): the first runs every projection, the S3 archiver and log
    # delivery; the second only the projections two instances can share (each batch locks its
    # checkpoint row, the journal dedups by event id). The archiver and delivery run once: an
    # archive object must hold a gapless run of sequences, and a destination's concurrency bound
    # and backoff hold within one process.
    Process(name="projector", command=("projector",), replicas=1, bus_role="projector",
            env=_NATS_LOGIN | {"ALEPHANT_DATABASE_URL", "ALEPHANT_SECRET_KEY"},
            port=PROJECTOR_PORT, liveness="/healthz", readiness="/readyz"),
    Process(name="projector-shared", command=("projector", *(a for n in SHARED_PROJECTIONS for a in ("--only", n))),
            replicas=1, bus_role="projector", env=_NATS_LOGIN | {"ALEPHANT_DATABASE_URL"},
            port=PROJECTOR_PORT, liveness="/healthz", readiness="/readyz"),
    # No database URL and no admin token: a worker reads the bucket and publishes events.
    Process(name="dataplane", command=("dataplane",), replicas=4, bus_role="dataplane",
            env=_NATS_LOGIN | {"ALEPHANT_SECRET_KEY", "ALEPHANT_REDIS_URL"},
            port=DATAPLANE_PORT, liveness="/healthz", readiness="/readyz"),
)


class Backing(msgspec.Struct, frozen=True, kw_only=True):
    """An engine underneath, run by its own operator in production."""

    name: str
    replicas: int


# NATS: a JetStream cluster, sync_interval: always (deploy/nats/nats-cluster.conf).
NATS_NODES = 3
BACKING: tuple[Backing, ...] = (
    Backing(name="nats", replicas=NATS_NODES), Backing(name="postgres", replicas=1), Backing(name="redis", replicas=1),
)


def process(name: str) -> Process:
    return next(p for p in PROCESSES if p.name == name)
