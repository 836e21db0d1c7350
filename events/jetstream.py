"""JetStream resources: the event stream and the config KV bucket, created idempotently; and the
bus credentials: who connects as which NATS user, and what each role may do on the bus.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Literal

import msgspec
import nats
import structlog
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.api import DiscardPolicy, KeyValueConfig, RetentionPolicy, StorageType, StreamConfig
from nats.js.errors import BucketNotFoundError, NotFoundError
from nats.js.kv import KeyValue

from schemas.fleet import fleet_subject
from schemas.settings import Secret, Settings

log = structlog.get_logger(__name__)

DUPLICATE_WINDOW_S = 600.0
KV_HISTORY = 5
# The projector's durable consumer on the event stream (events/projector.py names it too).
# The projector's durable consumers: one per projection (events/projector.py PROJECTIONS) and the
# S3 archiver's.
PROJECTOR_CONSUMERS = ("ledger", "finance", "archive")

BusRole = Literal["controlplane", "dataplane", "projector", "admin"]
BUS_ROLES: tuple[BusRole, ...] = ("controlplane", "dataplane", "projector", "admin")
_INBOX_SAFE = re.compile(r"[A-Za-z0-9_-]+")


def stream_subjects(subject_prefix: str) -> list[str]:
    return [f"{subject_prefix}.>"]


class BusAuth(msgspec.Struct, frozen=True, kw_only=True):
    """How one process proves itself to NATS. All empty: connect without credentials (a server
    without authorization, e.g. an operator's own). `creds_file` is a NATS `.creds` file (JWT +
    nkey seed, decentralized auth); `user`/`password` match an `authorization { users }` entry.
    """

    user: str = ""
    password: Secret = Secret("")
    creds_file: str = ""
    # Replies (JetStream API answers, KV watch deliveries, pull batches) arrive under this prefix,
    # so a role's subscribe permission can be its own inboxes, not every process's `_INBOX.>`.
    inbox_prefix: str = "_INBOX"


def bus_auth(settings: Settings, role: BusRole) -> BusAuth:
    """The credentials `settings` carry for a process of `role` (`ALEPHANT_NATS_USER`,
    `ALEPHANT_NATS_PASSWORD`, `ALEPHANT_NATS_CREDS`), with that role's inbox prefix."""
    return BusAuth(user=settings.nats_user, password=settings.nats_password, creds_file=settings.nats_creds,
                   inbox_prefix=role_inbox(role))


def role_inbox(role: str) -> str:
    """`_INBOX.<role>`: the reply prefix a role's processes use and may subscribe to."""
    if not _INBOX_SAFE.fullmatch(role):
        raise ValueError(f"bus role must be letters, digits, '_' or '-': {role!r}")
    return f"_INBOX.{role}"


async def _log_nats_error(exc: Exception) -> None:
    # nats-py's default callback logs a traceback per error; a permissions violation (a role
    # doing what it may not) or an auth failure is one line here. Messages carry subjects, never
    # passwords.
    log.warning("nats_error", error=type(exc).__name__, detail=str(exc)[:300])


async def connect(url: str, name: str, auth: BusAuth | None = None) -> NATS:
    """Connect with unbounded reconnects: a worker must outlive a NATS restart.

    `url` may list several servers separated by commas (a NATS cluster), and may carry
    `user:password@` itself (then `auth` may be omitted). Raises if the first connect fails,
    e.g. with `nats.errors.Error('nats: Authorization Violation')` for wrong credentials.
    """
    servers = [u.strip() for u in url.split(",") if u.strip()]
    auth = auth or BusAuth()
    options: dict[str, object] = {"inbox_prefix": auth.inbox_prefix}
    if auth.user:
        options.update(user=auth.user, password=auth.password.reveal())
    if auth.creds_file:
        options["user_credentials"] = auth.creds_file
    return await nats.connect(
        servers, name=name, max_reconnect_attempts=-1, reconnect_time_wait=0.5, connect_timeout=5,
        allow_reconnect=True, error_cb=_log_nats_error, **options,
    )


def role_permissions(role: BusRole, *, stream: str, kv_bucket: str, subject_prefix: str,
                     consumers: tuple[str, ...] = PROJECTOR_CONSUMERS) -> dict[str, list[str]]:
    """The NATS subjects a role may publish to and subscribe to (`{"publish": [...], "subscribe": [...]}`),
    for a server `authorization { users }` entry. Everything not listed is refused by the server.

    JetStream is driven by requests to `$JS.API.<op>.<stream>[...]`, KV writes are publishes to
    `$KV.<bucket>.<key>`, acks go to `$JS.ACK.<stream>.<consumer>.>` and push-consumer flow control
    replies to `$JS.FC.<stream>.>`. Only the control plane writes the bucket or changes streams;
    the data plane reads the bucket, publishes events and beats on the fleet subject (and hears
    its peers' beats there, as the control plane does); the projector reads its consumers. Every
    role may read the event stream's info (its replica count, for strict mode).
    `admin` (operators' `nats` CLI, tests) may do anything.
    """
    if role == "admin":
        return {"publish": [">"], "subscribe": [">"]}
    api, kv = "$JS.API", f"KV_{kv_bucket}"
    kv_read = [
        f"{api}.STREAM.INFO.{kv}",                                        # js.key_value(), kv.status()
        f"{api}.CONSUMER.CREATE.{kv}", f"{api}.CONSUMER.CREATE.{kv}.>",   # watch (ordered consumer)
        f"{api}.CONSUMER.INFO.{kv}.*",                                    # kv.keys()
        f"{api}.DIRECT.GET.{kv}", f"{api}.DIRECT.GET.{kv}.>",             # kv.get(), allow_direct
        f"{api}.STREAM.MSG.GET.{kv}",                                     # kv.get() without direct
        f"$JS.FC.{kv}.>",                                                 # watch flow control
    ]
    events = f"{subject_prefix}.>"
    fleet = fleet_subject(subject_prefix)  # workers' beats: workers publish and hear them, the control plane hears
    publish: list[str]
    subscribe: list[str] = []
    if role == "controlplane":  # also `alephant migrate`
        publish = [f"{api}.INFO"]
        for name in (stream, kv):
            publish += [f"{api}.STREAM.INFO.{name}", f"{api}.STREAM.CREATE.{name}", f"{api}.STREAM.UPDATE.{name}"]
        publish += [p for p in kv_read if p != f"{api}.STREAM.INFO.{kv}"] + [f"$KV.{kv_bucket}.>", events]
        # The fleet's beats, and the calls as they are published (the console's live tail).
        subscribe = [fleet, f"{subject_prefix}.*.llm.call"]
    elif role == "dataplane":
        # The event stream's info: strict mode checks its replica count (deploy/strict.py).
        publish = [f"{api}.STREAM.INFO.{stream}", *kv_read, events, fleet]
        subscribe = [fleet]
    elif role == "projector":
        publish = [f"{api}.STREAM.INFO.{stream}"]
        for consumer in consumers:
            publish += [
                f"{api}.CONSUMER.INFO.{stream}.{consumer}",
                f"{api}.CONSUMER.CREATE.{stream}.{consumer}", f"{api}.CONSUMER.CREATE.{stream}.{consumer}.>",
                f"{api}.CONSUMER.DURABLE.CREATE.{stream}.{consumer}",
                f"{api}.CONSUMER.MSG.NEXT.{stream}.{consumer}",
                f"$JS.ACK.{stream}.{consumer}.>",
            ]
        # Log delivery (events/delivery.py): one durable consumer per destination, `deliver_<id>`,
        # made and removed as destinations come and go, so their names are not known here.
        publish += [
            f"{api}.CONSUMER.INFO.{stream}.*", f"{api}.CONSUMER.DURABLE.CREATE.{stream}.*",
            f"{api}.CONSUMER.DELETE.{stream}.*", f"{api}.CONSUMER.MSG.NEXT.{stream}.*", f"$JS.ACK.{stream}.*.>",
        ]
    else:
        raise ValueError(f"unknown bus role {role!r}")
    return {"publish": publish, "subscribe": [f"{role_inbox(role)}.>", *subscribe]}


async def ensure_stream(js: JetStreamContext, name: str, subject_prefix: str, replicas: int = 1) -> None:
    """Create the event stream, or update its config to what we expect. Idempotent."""
    config = StreamConfig(
        name=name,
        subjects=stream_subjects(subject_prefix),
        retention=RetentionPolicy.LIMITS,
        storage=StorageType.FILE,
        discard=DiscardPolicy.OLD,
        num_replicas=replicas,
        duplicate_window=DUPLICATE_WINDOW_S,
        deny_delete=True,
        max_msg_size=1024 * 1024,
    )
    try:
        info = await js.stream_info(name)
    except NotFoundError:
        await js.add_stream(config)
        return
    # Never lower durability: a process started without ALEPHANT_STREAM_REPLICAS must not turn an
    # R3 stream into R1.
    config.num_replicas = max(replicas, info.config.num_replicas or 1)
    if _stream_matches(info.config, config):
        return  # nothing to change: roles without STREAM.UPDATE rights (the projector) get here
    await js.update_stream(config)


def _stream_matches(current: StreamConfig, wanted: StreamConfig) -> bool:
    """Every field `wanted` sets (not None) already has that value on the server."""
    return all(getattr(current, f.name) == getattr(wanted, f.name)
               for f in dataclasses.fields(wanted) if getattr(wanted, f.name) is not None)


async def ensure_kv(js: JetStreamContext, bucket: str, replicas: int = 1, *, raise_replicas: bool = True) -> KeyValue:
    """Create (or open) the config snapshot bucket. Idempotent.

    An existing bucket's replica count is raised to `replicas` when lower (`raise_replicas`; the
    bucket is the stream `KV_<bucket>` underneath), never lowered. Roles that may not update
    streams (the data plane) pass `raise_replicas=False`. Raises the server's error when the raise
    is refused, e.g. more replicas than JetStream servers.
    """
    try:
        kv = await js.key_value(bucket)
    except BucketNotFoundError:
        return await js.create_key_value(
            KeyValueConfig(bucket=bucket, history=KV_HISTORY, replicas=replicas, storage=StorageType.FILE)
        )
    if raise_replicas:
        await _raise_replicas(js, f"KV_{bucket}", replicas)
    return kv


def replicas_to_apply(current: int | None, wanted: int) -> int | None:
    """The replica count to set on an existing stream: `wanted` when above `current` (unset reads
    as 1, the server's default), else None: leave it. Never lowers durability, so a process
    started without ALEPHANT_STREAM_REPLICAS cannot turn an R3 stream into R1."""
    return wanted if wanted > (current or 1) else None


async def _raise_replicas(js: JetStreamContext, stream: str, replicas: int) -> None:
    info = await js.stream_info(stream)
    target = replicas_to_apply(info.config.num_replicas, replicas)
    if target is None:
        return
    log.info("stream_replicas_raised", stream=stream, replicas_before=info.config.num_replicas or 1,
             replicas=target)
    await js.update_stream(dataclasses.replace(info.config, num_replicas=target))
