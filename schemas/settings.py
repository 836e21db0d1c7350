"""Process configuration: one Struct, loaded from `ALEPHANT_*` environment variables.

Loading fails fast with a message naming the offending variable. Secrets are wrapped in
`Secret`, whose repr is `***`, so a settings object can be logged safely.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, Literal

import msgspec


class Secret:
    """A string that never shows itself in repr, str or logs. Read it with `.reveal()`."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__

    def __bool__(self) -> bool:
        return bool(self._value)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


class SettingsError(ValueError):
    """A configuration variable is missing or malformed; the message names it."""


class Settings(msgspec.Struct, frozen=True, kw_only=True):
    """Everything a process needs, with defaults for the local stack.

    Service URLs are required by the long-running processes; `alephant dev` fills them in for
    the services it launches.
    """

    nats_url: str = "nats://127.0.0.1:4222"
    database_url: str = "postgresql://postgres@127.0.0.1:5432/postgres"
    redis_url: str = "redis://127.0.0.1:6379/0"
    secret_key: Secret = msgspec.field(default_factory=lambda: Secret(""))
    admin_token: Secret = msgspec.field(default_factory=lambda: Secret(""))
    host: str = "127.0.0.1"
    port: int = 8080
    admin_host: str = "127.0.0.1"
    admin_port: int = 8081
    state_dir: str = ".alephant"
    stream: str = "ALEPHANT_EVENTS"
    subject_prefix: str = "events"
    kv_bucket: str = "alephant_config"
    stream_replicas: int = 1
    # Strict durability mode (deploy/strict.py), on in every deploy/ manifest: a process refuses
    # to start when the event stream or the config bucket has fewer than 3 replicas, a NATS server
    # does not fsync every write (`sync_interval: always`), or (data plane) the spool is unusable.
    strict: bool = False
    # NATS monitoring endpoints (`http://host:8222`, comma-separated: every server of the cluster),
    # whose /varz strict mode reads `sync_interval: always` from; required when strict.
    nats_monitor_urls: str = ""
    max_body_bytes: int = 4 * 1024 * 1024
    upstream_timeout_s: float = 600.0
    stale_after_s: float = 15.0
    heartbeat_interval_s: float = 2.0
    event_batch_max: int = 256
    event_flush_interval_s: float = 0.05
    projector_batch: int = 512
    # A batch not acked within this window (its projector died) is redelivered to another one.
    projector_ack_wait_s: float = 30.0
    # The projector's Prometheus endpoint (GET /metrics, on `host`); 0: any free port (logged as
    # `projector_metrics_listening`; the local stack picks one and writes it to demo.env).
    projector_metrics_port: int = 0
    log_level: str = "info"
    # One structured `access` line per data-plane request (dataplane/access_log.py).
    access_log: bool = True
    # -- governance ----------------------------------------------------------------------------------
    # A budget hold not settled within this (its worker died) expires and is swept.
    hold_ttl_s: float = 120.0
    # Longest wait for one Redis reply (admission, escalation) before deciding locally. Generous:
    # a busy event loop delays replies too, and a refused paid call is worse than a slow one;
    # a real outage opens the breaker after one second of failures, then nothing waits.
    redis_timeout_s: float = 1.0
    # The control plane raises each budget's spend in Redis to the journal's figure this often
    # (and at start-up): Redis may lose increments in a failover or restart; it is never lowered.
    reconcile_interval_s: float = 30.0
    # Hosts, IPs or CIDRs that provider base URLs may point at although they are private (SSRF guard).
    ssrf_allow: str = ""
    # -- event durability (spool, publisher, projector) -------------------------------------------
    # Where each worker's disk spool slot lives; empty means `<state_dir>/spool`.
    spool_dir: str = ""
    # `batch`: group commit, one fsync per `spool_sync_interval_s` (a SIGKILL loses nothing, an OS
    # crash at most that interval's events not yet acked); `always`: fsync every append before the
    # response (zero loss, slower).
    spool_fsync: Literal["batch", "always"] = "batch"
    # Under `batch`: the group-commit interval (one fsync per interval, only when something was
    # appended). Each fsync costs about a millisecond of CPU here, so not per publish batch.
    spool_sync_interval_s: float = 0.25
    # Events larger than this never reach NATS (the stream refuses 1 MiB): an llm.call is
    # published with its oversized strings cut and flagged, anything else dead-lettered locally.
    event_max_bytes: int = 256 * 1024
    # -- client edge (input validation, error rendering) ------------------------------------------
    # -- resource limits (timeouts, connection and in-flight caps) --------------------------------
    # A request body that has not fully arrived this many seconds after the handler asks for it is
    # answered 408 `request_timeout` (a stalled upload must not hold a connection forever).
    body_read_timeout_s: float = 30.0
    # Idle connections (between requests, or before the first one) are closed after this long.
    keepalive_timeout_s: float = 15.0
    # Open client connections per worker; one more is answered 503 `connection_limit_exceeded` and closed.
    max_connections: int = 1024
    # Streams in flight per worker and per virtual key; one more is answered 429
    # `concurrency_limit_exceeded` with Retry-After. 0 turns a cap off.
    max_streams: int = 512
    max_streams_per_key: int = 64
    # -- outbound (redirects, connect-time SSRF, passthrough allowlist) ---------------------------
    # -- config path (stale policy, admin) --------------------------------------------------------
    # `serve`: a worker whose config heartbeat is older than stale_after_s keeps serving from its
    # snapshot (counted in /healthz, logged once a minute); `refuse`: it answers 503 config_stale.
    stale_policy: Literal["serve", "refuse"] = "serve"
    # How long an admin change waits for its relay to NATS before answering 202 (propagated: false).
    admin_propagation_wait_s: float = 2.0
    # -- bus credentials (NATS users per role) ----------------------------------------------------
    # This process's NATS user and password (an `authorization { users }` entry; the local stack
    # gives each role its own), or a `.creds` file for NATS accounts/JWT. Empty: no credentials.
    nats_user: str = ""
    nats_password: Secret = msgspec.field(default_factory=lambda: Secret(""))
    nats_creds: str = ""
    # -- event archive (S3) ----------------------------------------------------------------------
    # An S3-compatible endpoint (AWS S3, MinIO, the local stack's moto server) the projector
    # archives the raw event stream to; empty: no archive. Credentials come from the usual AWS
    # variables (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_PROFILE, ...).
    s3_url: str = ""
    s3_bucket: str = "alephant-events"
    # Empty: the AWS variables' region (AWS_REGION, AWS_DEFAULT_REGION), else us-east-1.
    s3_region: str = ""
    # An archive object is written when this many seconds passed since its first event arrived,
    # or when it holds archive_max_events events, whichever comes first.
    archive_flush_s: float = 10.0
    archive_max_events: int = 10_000
    # The control plane deletes archived request bodies past their workspace's retention at start
    # and then this often (controlplane/bodies_retention.py), when s3_url is set; 0: never.
    body_sweep_interval_s: float = 3600.0
    # -- downstream log delivery (events/delivery.py, in the projector process) -------------------
    # An event is dead-lettered after this many failed attempts at one destination; between two,
    # a jittered exponential backoff from delivery_backoff_s up to delivery_backoff_max_s.
    delivery_max_attempts: int = 10
    delivery_backoff_s: float = 2.0
    delivery_backoff_max_s: float = 300.0
    # One attempt (a webhook POST, an OTLP export, an S3 put) gives up after this many seconds.
    delivery_timeout_s: float = 10.0
    # Events fetched per destination at once, and webhook POSTs in flight per destination.
    delivery_batch: int = 64
    delivery_concurrency: int = 8
    # OTLP and S3 destinations gather events this long (or delivery_batch of them) per export/object.
    delivery_linger_s: float = 1.0
    # How often the delivery task re-reads the destinations from Postgres.
    delivery_refresh_s: float = 2.0
    # -- cache (exact in Redis, semantic in Qdrant) -------------------------------------------------
    # A Qdrant server for the semantic cache; empty: qdrant-client's local mode, on disk under
    # `<state_dir>/qdrant/<process>` (in-process, so each worker has its own semantic index; point
    # several workers at a server to share one).
    qdrant_url: str = ""
    # The longest a cache lookup or store may take before the call goes on as a miss (fail-open).
    cache_timeout_s: float = 0.05
    # Answers larger than this (after compression) are not cached.
    cache_max_entry_bytes: int = 512 * 1024


_ENV_PREFIX = "ALEPHANT_"
_SECRET_FIELDS = {"secret_key", "admin_token", "nats_password"}


def load_settings(env: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
    """Build Settings from `ALEPHANT_<FIELD>` variables, then explicit overrides.

    Raises SettingsError naming the variable when a value does not parse.
    """
    source = os.environ if env is None else env
    raw: dict[str, Any] = {}
    for field in msgspec.structs.fields(Settings):
        var = _ENV_PREFIX + field.name.upper()
        if var not in source:
            continue
        value = source[var]
        if field.name in _SECRET_FIELDS:
            raw[field.name] = Secret(value)
            continue
        try:
            raw[field.name] = msgspec.convert(value, field.type, strict=False)
        except msgspec.ValidationError:
            kind = getattr(field.type, "__name__", field.type)
            raise SettingsError(f"{var}={value!r} is not a valid {kind}") from None
    raw.update(overrides)
    return Settings(**raw)
